//! End to end, the faults a new user found, with real daemons and a real witness in their
//! network namespaces: a secondary whose disk fills up, and a witness that restarts or
//! is replaced by an empty one.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::writer::StampWriter;
use common::{sh, wait_until, Cluster, Opts};

const LEASE_MS: u64 = 1500;
const MIB: u64 = 1 << 20;

/// A 40 MiB tmpfs for beta's 128 MiB (sparse) backing file: it fills up after about
/// 40 MiB of writes.
fn small_tmpfs(test: &str) -> PathBuf {
    let dir = PathBuf::from(format!(
        "/var/tmp/tandem-e2e-{test}-{}-tmpfs",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("tmpfs dir");
    sh(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=40M", "tmpfs"])
        .arg(&dir));
    dir
}

#[test]
fn a_secondary_whose_disk_fills_up_is_outdated_at_once_and_never_promoted() {
    let tmp = small_tmpfs("diskfull");
    let mut c = Cluster::new(
        "diskfull",
        Opts {
            beta_disk_dir: Some(tmp.clone()),
            ..Opts::default()
        },
    );
    c.track_mount(tmp.clone());
    c.with_witness("C", LEASE_MS, "");
    c.up(0, true);
    c.wait_for(0, "a lease", 10, |s| {
        s["lease_ms_left"].as_u64().unwrap_or(0) > 0
    });

    // 40 MiB at 20 MiB on alpha: beta runs out of space part of the way.
    let data = c.dir.join("data.bin");
    sh(Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "count=40", "status=none"])
        .arg(format!("of={}", data.display())));
    let dd = Command::new("dd")
        .arg(format!("if={}", data.display()))
        .arg(format!("of={}", c.nodes[0].device.display()))
        .args([
            "bs=1M",
            "seek=20",
            "oflag=direct",
            "conv=fsync",
            "status=none",
        ])
        .output()
        .expect("dd");
    assert!(
        dd.status.success(),
        "the primary's writes failed: {}",
        String::from_utf8_lossy(&dd.stderr)
    );

    // Beta knows at once that its disk is no longer a full copy.
    let b = c.wait_for(1, "outdated and standing alone", 10, |s| {
        s["disk"] == "outdated" && s["connection"] == "standalone"
    });
    assert!(b["disk_errors"].as_u64().unwrap_or(0) > 0, "{b:#}");
    assert!(
        b["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("tandemctl connect")),
        "{b:#}"
    );
    // Alpha fenced it at the witness before it completed what beta lacks.
    let a = c.wait_for(0, "beta outdated at the witness", 10, |s| {
        s["witness"]["up_to_date"] == serde_json::json!(["alpha"])
    });
    assert!(a["out_of_sync_bytes"].as_u64().unwrap_or(0) > 0, "{a:#}");

    // Alpha crashes: beta is not promoted on its partial data, by itself or by hand.
    c.kill(0);
    let e = c.ctl_fails(1, &["promote", "r0"]);
    assert!(e.contains("not UpToDate"), "{e}");
    let b = c.status(1);
    assert_eq!(b["role"], "secondary", "{b:#}");

    // The operator frees space on beta and brings alpha back: alpha is promoted, beta
    // connected again resyncs, and both hold every acknowledged byte.
    sh(Command::new("mount")
        .args(["-o", "remount,size=256M"])
        .arg(&tmp));
    c.start(0);
    c.ctl(0, &["promote", "r0"]);
    c.ctl(1, &["connect", "r0"]);
    c.wait_in_sync(60);
    c.assert_disks_identical();
    let want = std::fs::read(&data).expect("data");
    let mut got = vec![0u8; want.len()];
    let f = std::fs::File::open(&c.nodes[1].disk).expect("beta disk");
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, 20 * MIB).expect("read beta");
    assert!(got == want, "beta lacks acknowledged data after the resync");
}

#[test]
fn a_write_the_primarys_full_disk_fails_gets_eio_and_the_replicas_converge() {
    // Beta, whose disk sits on the small tmpfs, is the primary here.
    let tmp = small_tmpfs("primfull");
    let mut c = Cluster::new(
        "primfull",
        Opts {
            beta_disk_dir: Some(tmp.clone()),
            ..Opts::default()
        },
    );
    c.track_mount(tmp.clone());
    c.up(1, true);
    let dd = Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "seek=20", "count=40"])
        .arg(format!("of={}", c.nodes[1].device.display()))
        .args(["oflag=direct", "status=none"])
        .output()
        .expect("dd");
    assert!(!dd.status.success(), "the full disk failed nothing");
    let e = String::from_utf8_lossy(&dd.stderr);
    assert!(e.contains("Input/output error"), "{e}");
    let s = c.wait_for(1, "the failure counted", 10, |s| {
        s["disk_errors"].as_u64().unwrap_or(0) > 0
    });
    assert!(
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("marked out of sync")),
        "{s:#}"
    );
    // What failed on beta's disk but reached alpha's is resynced from beta: the two
    // end identical, and neither reports anything out of sync.
    c.wait_in_sync(60);
    c.assert_disks_identical();
}

/// SIGTERM while writes wait for a peer that stopped answering (and a ping timeout too
/// long to end the wait): the daemon gives up on them in time, lets its loop device and
/// FUSE mount go, and exits 0; the writer sees errors, not a hang.
#[test]
fn a_stop_with_writes_stuck_still_lets_the_device_go() {
    let mut c = Cluster::new("stuckstop", Opts::default());
    let cfg = std::fs::read_to_string(&c.config).expect("config");
    std::fs::write(
        &c.config,
        cfg.replace(
            "ping-timeout-ms = 2000",
            "ping-timeout-ms = 60000\npromote-margin-ms = 1250",
        ),
    )
    .expect("config");
    c.up(0, true);
    let w = StampWriter::start(&c.nodes[0].device, 0, 1);
    w.wait_more_ok(50, 20, "alpha before beta stops");
    c.signal(1, nix::sys::signal::Signal::SIGSTOP);
    c.wait_for(0, "writes waiting for the stopped peer", 10, |s| {
        s["writes_in_flight"].as_u64().unwrap_or(0) > 0
    });
    let asked = std::time::Instant::now();
    let pid = c.nodes[0].child.as_ref().expect("alpha").id();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let st = c.wait_exit(0, 20);
    assert!(st.success(), "alpha exited with {st}");
    assert!(
        asked.elapsed() < Duration::from_secs(12),
        "stopping took {:?}",
        asked.elapsed()
    );
    let file = c.nodes[0].run_dir.join("fuse-r0/data");
    assert!(
        tandem::shell::fuse_loop::loops_backed_by(&file).is_empty(),
        "the loop device outlived the daemon"
    );
    assert!(
        !c.nodes[0].device.exists(),
        "the device link outlived the daemon"
    );
    w.wait_failed(10, "the writer");
    c.signal(1, nix::sys::signal::Signal::SIGCONT);
}

/// The witness's log lines that refuse something.
fn witness_refusals(c: &Cluster) -> usize {
    std::fs::read_to_string(c.dir.join("witness/witness.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("refused"))
        .count()
}

#[test]
fn a_restarted_or_replaced_witness_is_not_flooded_and_adopt_witness_puts_it_in_service() {
    let mut c = Cluster::new("newwit", Opts::default());
    c.with_witness("C", LEASE_MS, "");
    c.up(0, true);
    c.wait_for(0, "a lease", 10, |s| {
        s["lease_ms_left"].as_u64().unwrap_or(0) > 0
    });
    let w = StampWriter::start(&c.nodes[0].device, 0, 1);
    w.wait_more_ok(100, 20, "alpha before the witness restarts");

    // Restarted with its state: renewals are refused for one lease, then granted. The
    // primary asks again after a back-off, so the refusals are a handful, not thousands.
    c.stop_witness();
    c.start_witness();
    c.wait_for(0, "the witness refusing renewals", 10, |s| {
        s["witness"]["problem"]
            .as_str()
            .is_some_and(|p| p.contains("restarted"))
    });
    c.wait_for(0, "a lease again", 10, |s| {
        s["lease_ms_left"].as_u64().unwrap_or(0) > 0 && s["witness"]["problem"].is_null()
    });
    let n = witness_refusals(&c);
    assert!(n <= 10, "{n} refusals logged in one grace period");

    // Replaced by a witness that knows nothing: both nodes say so, and how to fix it.
    c.stop_witness();
    std::fs::remove_file(c.witness_state_file()).expect("remove state");
    c.start_witness();
    for i in 0..2 {
        let s = c.wait_for(i, "the empty witness reported", 15, |s| {
            s["witness"]["problem"]
                .as_str()
                .is_some_and(|p| p.contains("adopt-witness"))
        });
        assert_eq!(s["degraded"], true, "{s:#}");
        assert_eq!(s["term"], 1, "{s:#}");
    }
    w.wait_more_ok(100, 20, "alpha (its peer still votes)");
    let before = witness_refusals(&c);
    // A few lease periods of the nodes asking: a few requests each, not a flood.
    wait_until(10, "the primary's lease to run out", || {
        c.status(0)["lease_ms_left"] == 0
    });
    std::thread::sleep(Duration::from_millis(LEASE_MS));
    let asked = witness_refusals(&c) - before;
    assert!(asked <= 4, "{asked} refusal lines in {LEASE_MS} ms");

    // The documented command: the witness takes the pair's term, never a lower one.
    let out = c.ctl(0, &["adopt-witness", "r0"]);
    assert!(out.contains("adopted"), "{out}");
    let s = c.wait_for(0, "a lease from the new witness", 10, |s| {
        s["lease_ms_left"].as_u64().unwrap_or(0) > 0
            && s["witness"]["problem"].is_null()
            && s["degraded"] == false
    });
    assert_eq!(s["term"], 1, "{s:#}");
    let st =
        tandem::core::witness::decode_state(&std::fs::read(c.witness_state_file()).expect("state"))
            .expect("state decodes");
    let r0 = &st["r0"];
    assert_eq!(r0.term, 1);
    assert_eq!(r0.primary.as_deref(), Some("alpha"));
    assert_eq!(
        r0.up_to_date.iter().cloned().collect::<Vec<_>>(),
        vec!["alpha".to_string(), "beta".to_string()]
    );
    c.wait_for(1, "beta sees the witness working", 10, |s| {
        s["witness"]["problem"].is_null()
    });
    // Adopting again is refused: the witness has a term now.
    let e = c.ctl_fails(0, &["adopt-witness", "r0"]);
    assert!(e.contains("already holds term"), "{e}");
    w.finish();

    // It works as a witness: alpha crashes, beta takes over in term 2.
    c.kill(0);
    let s = c.wait_for(1, "promoted by the new witness", 30, |s| {
        s["role"] == "primary"
    });
    assert_eq!(s["term"], 2, "{s:#}");
}
