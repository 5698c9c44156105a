//! The systemd units in `systemd/`: `systemd-analyze verify` accepts them without a
//! warning (pointed at the binaries just built), and both daemons speak `Type=notify`:
//! `READY=1` once they serve, `STOPPING=1` on SIGTERM, then exit 0.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Cluster, Opts};

#[test]
fn units_pass_systemd_analyze_verify() {
    let dir = std::env::temp_dir().join(format!("tandem-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("unit dir");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_tandemd"))
        .parent()
        .expect("bin dir")
        .display()
        .to_string();
    let mut units = Vec::new();
    for name in ["tandemd.service", "tandem-witness.service"] {
        let text = std::fs::read_to_string(Path::new("systemd").join(name)).expect("unit");
        assert!(
            text.contains("\nType=notify\n"),
            "{name} is not Type=notify"
        );
        let unit = dir.join(name);
        std::fs::write(&unit, text.replace("/usr/local/bin", &bin_dir)).expect("unit");
        units.push(unit);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.expect("systemd-analyze (package systemd; scripts/deps.sh installs it)");
    let said = String::from_utf8_lossy(&out.stderr);
    // Unknown keys and bad values are only warnings: any output is a failure here.
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {}\n{said}",
        out.status
    );
}

/// What a daemon sends to its NOTIFY_SOCKET next, waiting at most 15 s.
fn next_notice(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 256];
    let n = sock
        .recv(&mut buf)
        .expect("no sd_notify message within 15 s");
    String::from_utf8_lossy(&buf[..n]).to_string()
}

fn notify_socket(c: &Cluster, name: &str) -> (UnixDatagram, std::path::PathBuf) {
    let path = c.dir.join(name);
    let sock = UnixDatagram::bind(&path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    (sock, path)
}

/// The daemon's log file (shown when the test fails).
fn log(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("log")
}

fn sigterm(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
}

#[test]
fn both_daemons_tell_systemd_when_they_are_ready_and_when_they_stop() {
    let mut c = Cluster::new("notify", Opts::default());
    c.with_witness("C", 1500, "");

    // The witness, restarted under a notify socket.
    c.stop_witness();
    let (sock, path) = notify_socket(&c, "witness-notify.sock");
    let child = c
        .witness_cmd()
        .env("NOTIFY_SOCKET", &path)
        .stderr(log(&c.dir.join("witness/witness.log")))
        .spawn()
        .expect("spawn witness");
    let pid = child.id();
    c.witness_child = Some(child);
    assert_eq!(next_notice(&sock), "READY=1");
    sigterm(pid);
    assert_eq!(next_notice(&sock), "STOPPING=1");
    let st = c
        .witness_child
        .take()
        .map(|mut ch| ch.wait().expect("wait"));
    assert!(st.is_some_and(|s| s.success()), "witness exit: {st:?}");

    // A data node: ready once its control socket is up, without waiting for the peer.
    c.start_witness();
    c.create_md(0, &["--assume-clean"]);
    let (sock, path) = notify_socket(&c, "tandemd-notify.sock");
    let child = c
        .daemon_cmd(0)
        .env("NOTIFY_SOCKET", &path)
        .stderr(log(&c.nodes[0].log))
        .spawn()
        .expect("spawn tandemd");
    let pid = child.id();
    c.nodes[0].child = Some(child);
    assert_eq!(next_notice(&sock), "READY=1");
    assert_eq!(c.status(0)["connection"], "connecting");
    sigterm(pid);
    assert_eq!(next_notice(&sock), "STOPPING=1");
    let st = c.wait_exit(0, 15);
    assert!(st.success(), "tandemd exit: {st}");
}
