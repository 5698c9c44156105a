//! End to end: real `tandemd` processes in network namespaces, ext4 on the FUSE + loop
//! device, `fio --verify`, crashes by SIGKILL, split brain, and bad input against a
//! running daemon. Needs root, FUSE, loop devices, `fio`, `mkfs.ext4` (`.ci/run`
//! installs them).

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{sh, wait_until, Cluster, DirectWriter, Opts};

#[test]
fn ext4_fio_verify_then_backing_disks_identical() {
    let mut c = Cluster::new("fio", Opts::default());
    // A new pair: full initial sync after a forced first promotion.
    c.up(0, false);
    let s = c.status(0);
    assert_eq!(s["role"], "primary");
    assert_eq!(s["device"], c.nodes[0].device.to_str().unwrap_or(""));
    // The secondary exposes no device, and its FUSE file refuses writers.
    assert!(!c.nodes[1].device.exists(), "secondary has a device link");
    let fuse_b = c.nodes[1].run_dir.join("fuse-r0/data");
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&fuse_b)
        .expect_err("secondary's device opened for writing");
    assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "{err}");
    // Promoting the other node while this one is primary is refused.
    let e = c.ctl_fails(1, &["promote", "r0"]);
    assert!(e.contains("peer is primary"), "{e}");

    c.mkfs(0);
    let m = c.mount(0);
    // Demote while mounted: refused, clearly, and nothing changes.
    let e = c.ctl_fails(0, &["demote", "r0"]);
    assert!(e.contains("in use"), "{e}");
    assert_eq!(c.status(0)["role"], "primary");

    sh(Command::new("fio")
        .args([
            "--name=verify",
            "--rw=randwrite",
            "--bs=4k",
            "--size=24M",
            "--ioengine=psync",
            "--fsync=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--output-format=terse",
        ])
        .arg(format!("--directory={}", m.display())));
    std::fs::write(m.join("marker"), b"still here").expect("marker");
    c.umount(&m);
    sh(Command::new("e2fsck").arg("-fn").arg(&c.nodes[0].device));
    // The file system survives umount / mount.
    let m = c.mount(0);
    assert_eq!(
        std::fs::read(m.join("marker")).expect("marker after remount"),
        b"still here"
    );
    c.umount(&m);
    c.wait_in_sync(30);
    c.ctl(0, &["demote", "r0"]);
    assert!(!c.nodes[0].device.exists(), "device link left after demote");
    c.stop(0);
    c.stop(1);
    c.assert_disks_identical();
}

/// Writes 4 KiB blocks at random to the primary's device until stopped, remembering
/// which blocks were written while `outage` was set.
struct Writer {
    stop: Arc<AtomicBool>,
    outage: Arc<AtomicBool>,
    in_outage: Arc<Mutex<HashSet<u64>>>,
    written: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(dev: &std::path::Path, blocks: u64, seed: u64) -> Writer {
        let mut w = DirectWriter::open(dev).expect("open device");
        let stop = Arc::new(AtomicBool::new(false));
        let outage = Arc::new(AtomicBool::new(false));
        let in_outage = Arc::new(Mutex::new(HashSet::new()));
        let written = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let (s, o, io, wr, er) = (
            stop.clone(),
            outage.clone(),
            in_outage.clone(),
            written.clone(),
            errors.clone(),
        );
        let thread = std::thread::spawn(move || {
            let mut x = seed | 1;
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let block = x % blocks;
                let in_o = o.load(Ordering::Relaxed);
                match w.write_block(block, x) {
                    Ok(()) => {
                        wr.fetch_add(1, Ordering::Relaxed);
                        if in_o {
                            io.lock().expect("lock").insert(block);
                        }
                    }
                    Err(_) => {
                        // The primary died under us: nothing more to write.
                        er.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
                n += 1;
                if n.is_multiple_of(64) && w.sync().is_err() {
                    er.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                // Pace the writer so the outage writes a known, modest set of blocks.
                std::thread::sleep(Duration::from_micros(500));
            }
            let _ = w.sync();
        });
        Writer {
            stop,
            outage,
            in_outage,
            written,
            errors,
            thread: Some(thread),
        }
    }

    fn wait_written(&self, n: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let start = self.written.load(Ordering::Relaxed);
        while self.written.load(Ordering::Relaxed) < start + n {
            assert!(
                std::time::Instant::now() < deadline,
                "writer stalled ({} errors)",
                self.errors.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.errors.load(Ordering::Relaxed)
    }
}

#[test]
fn kill_secondary_mid_write_resyncs_only_what_changed() {
    let mut c = Cluster::new("killsec", Opts::default());
    c.up(0, true);
    let blocks = c.data_bytes(0) / 4096;
    let w = Writer::start(&c.nodes[0].device, blocks, 7);
    w.wait_written(200);
    w.outage.store(true, Ordering::Relaxed);
    c.kill(1);
    c.wait_for(0, "peer lost", 10, |s| s["connection"] == "connecting");
    w.wait_written(1500);
    // Restart the secondary while writes keep flowing.
    c.start(1);
    w.wait_written(100);
    w.outage.store(false, Ordering::Relaxed);
    let s = c.wait_for(1, "resync done", 60, |s| {
        s["replication"] == "established" && s["disk"] == "uptodate"
    });
    w.wait_written(200);
    let outage_bytes = w.in_outage.lock().expect("lock").len() as u64 * 4096;
    assert_eq!(w.finish(), 0, "the primary failed writes");
    let resynced = s["resync"]["done_bytes"].as_u64().expect("resync bytes");
    let one_extent = 4u64 << 20;
    eprintln!("blocks written during the outage: {outage_bytes} bytes; resynced {resynced} bytes");
    assert!(
        resynced >= outage_bytes.min(1 << 20),
        "resync moved {resynced} bytes, less than the {outage_bytes} written meanwhile"
    );
    assert!(
        resynced <= 2 * outage_bytes + one_extent,
        "resync moved {resynced} bytes for {outage_bytes} written meanwhile: not a quick resync"
    );
    c.wait_in_sync(30);
    c.ctl(0, &["demote", "r0"]);
    c.assert_disks_identical();
}

#[test]
fn kill_primary_mid_write_activity_log_resync() {
    let mut c = Cluster::new("killpri", Opts::default());
    c.up(0, true);
    // Four 4 MiB activity-log extents' worth of blocks: the resync after the crash must
    // cover those and not the whole device.
    let region = 16u64 << 20;
    let w = Writer::start(&c.nodes[0].device, region / 4096, 11);
    w.wait_written(500);
    c.kill(0);
    // The writer sees its device fail and stops.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while w.errors.load(Ordering::Relaxed) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "writes kept succeeding after the primary died"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    w.finish();
    c.wait_for(1, "peer lost", 10, |s| s["connection"] == "connecting");
    c.stop(1);
    // Restart both; the crashed primary's activity log decides what to resync.
    c.start(0);
    let s = c.status(0);
    assert_eq!(s["role"], "secondary");
    c.start(1);
    let s = c.wait_for(0, "resync done", 60, |s| {
        s["replication"] == "established" && s["disk"] == "uptodate"
    });
    c.wait_in_sync(30);
    let resynced = s["resync"]["total_bytes"].as_u64().unwrap_or(0);
    eprintln!("activity-log resync: {resynced} bytes");
    assert!(resynced > 0, "no activity-log resync after a primary crash");
    assert!(
        resynced <= region,
        "a primary crash writing {region} bytes' worth of extents resynced {resynced} bytes"
    );
    c.assert_disks_identical();
}

#[test]
fn split_brain_detected_on_both_resolved_by_discard_my_data() {
    let mut c = Cluster::new("sb", Opts::default());
    c.up(0, true);
    c.ctl(0, &["disconnect", "r0"]);
    c.ctl(1, &["disconnect", "r0"]);
    for i in 0..2 {
        c.wait_for(i, "standalone", 10, |s| s["connection"] == "standalone");
    }
    c.ctl(1, &["promote", "r0"]);
    for (i, blocks) in [(0usize, 0..64u64), (1, 1000..1100)] {
        let mut w = DirectWriter::open(&c.nodes[i].device).expect("device");
        for b in blocks {
            w.write_block(b, 99 + i as u64).expect("write");
        }
        w.sync().expect("sync");
    }
    c.ctl(1, &["demote", "r0"]);
    c.ctl(0, &["connect", "r0"]);
    c.ctl(1, &["connect", "r0"]);
    for i in 0..2 {
        c.wait_for(i, "split brain", 15, |s| {
            s["split_brain"] == true && s["connection"] == "standalone"
        });
    }
    // Never resolved silently: still split a moment later, and no data moved.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.status(0)["split_brain"], true);
    c.ctl(1, &["connect", "r0", "--discard-my-data"]);
    c.ctl(0, &["connect", "r0"]);
    c.wait_in_sync(60);
    assert_eq!(c.status(1)["split_brain"], false);
    c.ctl(0, &["demote", "r0"]);
    c.assert_disks_identical();
}

#[test]
fn different_device_sizes_refused_clearly() {
    let mut c = Cluster::new(
        "size",
        Opts {
            disk_bytes: [128 << 20, 96 << 20],
            ..Opts::default()
        },
    );
    c.create_md(0, &["--assume-clean"]);
    c.create_md(1, &["--assume-clean"]);
    c.start(0);
    c.start(1);
    let s = c.wait_for(0, "size error", 15, |s| {
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("bytes"))
    });
    assert_ne!(s["replication"], "established");
    let e = s["last_error"].as_str().unwrap_or("").to_string();
    assert!(e.contains("size") || e.contains("bytes"), "{e}");
}

#[test]
fn bad_input_gets_a_clear_error_and_the_daemon_keeps_serving() {
    let mut c = Cluster::new("bad", Opts::default());
    c.up(0, true);
    // beta accepts: alpha's name sorts first, so alpha dials.
    let addr: std::net::SocketAddr = c.nodes[1].addr.parse().expect("addr");

    // Random bytes on the replication port.
    common::in_netns(&c.nodes[0].ns, move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        let junk: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
            .collect();
        let _ = s.write_all(&junk);
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut b = [0u8; 64];
        // The daemon closes on us (EOF or reset), it does not hang or crash.
        assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    });

    // A wrong secret.
    let res = common::in_netns(&c.nodes[0].ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(tandem::shell::net::connect(
            addr,
            b"not-the-secret-not-the-secret!!",
            &tandem::shell::net::Attached {
                resource: "r0".into(),
                node: "alpha".into(),
                channel: 0,
            },
        ))
        .map(|_| ())
        .map_err(|e| e.to_string())
    });
    assert!(res.is_err(), "a wrong secret was accepted");
    let log = std::fs::read_to_string(&c.nodes[1].log).unwrap_or_default();
    assert!(
        log.contains("peer connection refused"),
        "refusal not logged"
    );

    // Junk on the control socket.
    {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&c.nodes[0].socket).expect("ctl");
        s.write_all(b"{\"cmd\":\"explode\"}\nnot json at all\n")
            .expect("write");
        let mut r = BufReader::new(s);
        for _ in 0..2 {
            let mut line = String::new();
            r.read_line(&mut line).expect("reply");
            let v: serde_json::Value = serde_json::from_str(&line).expect("reply json");
            assert_eq!(v["ok"], false);
            assert!(
                v["error"].as_str().unwrap_or("").contains("bad request"),
                "{line}"
            );
        }
    }

    // Bad CLI arguments: usage errors exit 2; an unknown resource is a failure.
    let out = c.ctl_output(0, &["promote"]);
    assert_eq!(out.status.code(), Some(2));
    let e = c.ctl_fails(0, &["demote", "nosuch"]);
    assert!(e.contains("no resource"), "{e}");

    // `tandemctl status` as uid 65534, with extra `setpriv` arguments.
    let as_nobody = |caps: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(caps)
            .arg(common::TANDEMCTL)
            .arg("--socket")
            .arg(&c.nodes[0].socket)
            .arg("status")
            .output()
            .expect("setpriv")
    };
    // A non-root client cannot use the control socket.
    let out = as_nobody(&[]);
    assert_eq!(out.status.code(), Some(1), "non-root status: {out:?}");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("root-only"), "{e}");
    // One that may open the socket (CAP_DAC_OVERRIDE) but is not root is told by the
    // daemon, not just cut off.
    let out = as_nobody(&["--inh-caps=+dac_override", "--ambient-caps=+dac_override"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(e.contains("root-only") && e.contains("uid 65534"), "{e}");

    // Events for a resource this node does not serve: refused, and tandemctl exits.
    let e = c.ctl_fails(0, &["events", "nope", "--json"]);
    assert!(e.contains("no resource \"nope\""), "{e}");

    // create-md under the running daemon is refused, --force or not.
    let e = c.ctl_fails(0, &["create-md", "r0", "--force"]);
    assert!(e.contains("in use"), "{e}");

    // Memory before authentication: frames that claim 1 MiB of data are refused from
    // their header, and at most 64 connections are in their handshake at once.
    let rss0 = rss_kib(&c, 1);
    let claim = tandem::core::wire::Msg::Data {
        seq: 1,
        epoch: 1,
        offset: 0,
        len: 1 << 20,
    }
    .encode(0, &vec![0u8; 1 << 20]);
    let held = common::in_netns(&c.nodes[0].ns, move || {
        use std::io::Write;
        let mut held = Vec::new();
        // Every other one stalls inside its header and holds its handshake slot.
        for i in 0..500 {
            if let Ok(mut s) = std::net::TcpStream::connect(addr) {
                let n = if i % 2 == 0 {
                    tandem::core::wire::HEADER_BYTES
                } else {
                    10
                };
                let _ = s.write_all(&claim[..n]);
                held.push(s);
            }
        }
        held
    });
    c.wait_log(1, "too many connections in their handshake", 10);
    let rss1 = rss_kib(&c, 1);
    assert!(
        rss1 < rss0 + 32 * 1024,
        "500 unauthenticated connections took tandemd from {rss0} to {rss1} KiB"
    );
    drop(held);

    // A huge line on the control socket is refused after 64 KiB, not buffered.
    {
        use std::io::{BufRead, BufReader, Write};
        let s = std::os::unix::net::UnixStream::connect(&c.nodes[0].socket).expect("ctl");
        let mut w = s.try_clone().expect("clone");
        let writer = std::thread::spawn(move || {
            let junk = vec![b'x'; 1 << 20];
            let mut sent = 0usize;
            while sent < 300 << 20 && w.write_all(&junk).is_ok() {
                sent += junk.len();
            }
            sent
        });
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("reply");
        assert!(line.contains("longer than 65536 bytes"), "{line}");
        let sent = writer.join().expect("writer");
        assert!(sent < 300 << 20, "the daemon read all {sent} bytes");
    }
    let rss2 = rss_kib(&c, 0);
    assert!(rss2 < 200 * 1024, "tandemd at {rss2} KiB after a huge line");

    // After all that, still replicating.
    {
        let mut w = DirectWriter::open(&c.nodes[0].device).expect("device");
        for b in 0..32 {
            w.write_block(b, 5).expect("write");
        }
        w.sync().expect("sync");
    }
    c.wait_in_sync(30);
    assert!(c.nodes[0]
        .child
        .as_mut()
        .is_some_and(|ch| ch.try_wait().ok().flatten().is_none()));
    // The human form, DRBD-like.
    let human = c.ctl(0, &["status"]);
    assert!(
        human.contains("r0 role:primary disk:uptodate protocol:C device:")
            && human.contains(
                "beta connection:connected replication:established role:secondary disk:uptodate"
            ),
        "{human}"
    );

    // A corrupted superblock: the daemon refuses to start, and says why.
    c.ctl(0, &["demote", "r0"]);
    c.stop(1);
    let size = std::fs::metadata(&c.nodes[1].disk).expect("disk").len();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&c.nodes[1].disk)
            .expect("disk");
        f.write_all_at(b"garbage!", size - 4096 + 64)
            .expect("corrupt");
    }
    let e = c.start_fails(1);
    assert!(e.contains("refusing to start"), "{e}");
    let e = c.ctl_fails(1, &["create-md", "r0"]);
    assert!(e.contains("--force"), "{e}");

    // A malformed config: refused, naming file and key.
    let bad = c.dir.join("bad.toml");
    std::fs::write(&bad, "[resource.r0]\nprotocol = \"D\"\n").expect("bad config");
    let out = Command::new(common::TANDEMD)
        .arg("--config")
        .arg(&bad)
        .arg("--node")
        .arg("alpha")
        .output()
        .expect("tandemd");
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("bad.toml") && e.contains("resource.r0.protocol"),
        "{e}"
    );
    // And alpha kept serving through all of it.
    assert_eq!(c.status(0)["role"], "secondary");
}

#[test]
fn events_report_state_changes_as_they_happen() {
    use std::io::{BufRead, BufReader};
    let mut c = Cluster::new("events", Opts::default());
    c.up(0, true);
    let mut child = Command::new(common::TANDEMCTL)
        .arg("--socket")
        .arg(&c.nodes[0].socket)
        .args(["events", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("events");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let next = |what: &str, pred: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no event for {what}"));
            let v: serde_json::Value = serde_json::from_str(&line).expect("event json");
            if pred(&v) {
                return v;
            }
        }
    };
    let first = next("current state", &|v| v["event"] == "exists");
    assert_eq!(first["status"]["role"], "primary");
    c.ctl(0, &["disconnect", "r0"]);
    next("standalone", &|v| {
        v["event"] == "change" && v["status"]["connection"] == "standalone"
    });
    c.ctl(0, &["connect", "r0"]);
    next("established", &|v| {
        v["event"] == "change" && v["status"]["replication"] == "established"
    });
    c.ctl(0, &["demote", "r0"]);
    next("secondary", &|v| {
        v["event"] == "change" && v["status"]["role"] == "secondary"
    });
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn pread_pwrite_fallback_replicates_too() {
    let mut c = Cluster::new("nouring", Opts::default());
    c.up_with(0, true, &["--no-uring"]);
    assert_eq!(c.status(0)["io_backend"], "pread/pwrite");
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default();
    assert!(log.contains("pread/pwrite"), "the fallback is not logged");
    {
        let mut w = DirectWriter::open(&c.nodes[0].device).expect("device");
        for b in (0..4096u64).step_by(7) {
            w.write_block(b, 3).expect("write");
        }
        w.sync().expect("sync");
    }
    c.wait_in_sync(30);
    c.ctl(0, &["demote", "r0"]);
    c.assert_disks_identical();
}

/// A cluster whose nodes pet a plain file that stands in for /dev/watchdog (every pet is
/// a byte, the magic close a 'V'), 2 s timeout, so a pet every 0.5 s.
fn watchdog_cluster(test: &str) -> (Cluster, std::path::PathBuf) {
    let c = Cluster::new(test, Opts::default());
    let wd = c.dir.join("watchdog");
    std::fs::write(&wd, b"").expect("watchdog file");
    c.add_global(&format!(
        "watchdog = \"{}\"\nwatchdog-timeout-s = 2",
        wd.display()
    ));
    (c, wd)
}

fn pets(wd: &std::path::Path) -> Vec<u8> {
    std::fs::read(wd).expect("watchdog file")
}

fn wait_pets(wd: &std::path::Path, more: usize, what: &str) {
    let start = pets(wd).len();
    wait_until(10, &format!("{what}: {more} pets"), || {
        pets(wd).len() >= start + more
    });
}

#[test]
fn watchdog_is_petted_while_the_daemon_runs_and_disarmed_on_stop() {
    let (mut c, wd) = watchdog_cluster("watchdog");
    c.create_md(0, &["--assume-clean"]);
    c.start(0);
    let pets = || pets(&wd);
    let wait_pets = |more: usize, what: &str| wait_pets(&wd, more, what);
    wait_pets(3, "running");
    // A hung daemon pets nothing: three pet periods (0.5 s each) pass without one.
    c.signal(0, nix::sys::signal::Signal::SIGSTOP);
    std::thread::sleep(Duration::from_millis(100));
    let frozen = pets().len();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(pets().len(), frozen, "petted while frozen");
    c.signal(0, nix::sys::signal::Signal::SIGCONT);
    wait_pets(2, "resumed");
    c.stop(0);
    let all = pets();
    assert_eq!(all.last(), Some(&b'V'), "no magic close on a clean stop");
    assert!(all[..all.len() - 1].iter().all(|&b| b == 0));
}

/// One thread of another process stopped by ptrace while its other threads run: a hung
/// thread. Let go on drop. ptrace requests come from the thread that attached, so the
/// guard stays on the test's thread.
struct FrozenThread(nix::unistd::Pid);

impl FrozenThread {
    fn freeze(pid: u32, comm: &str) -> FrozenThread {
        use nix::sys::{ptrace, wait};
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
        let tid = tasks
            .flatten()
            .find(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == comm)
            })
            .and_then(|t| t.file_name().to_str()?.parse::<i32>().ok())
            .unwrap_or_else(|| panic!("no thread {comm} in pid {pid}"));
        let tid = nix::unistd::Pid::from_raw(tid);
        ptrace::seize(tid, ptrace::Options::empty()).expect("ptrace seize");
        ptrace::interrupt(tid).expect("ptrace interrupt");
        wait::waitpid(tid, Some(wait::WaitPidFlag::__WALL)).expect("thread stopped");
        FrozenThread(tid)
    }
}

impl Drop for FrozenThread {
    fn drop(&mut self) {
        let _ = nix::sys::ptrace::detach(self.0, None);
    }
}

#[test]
fn watchdog_stops_being_petted_while_one_resource_thread_hangs() {
    // One node (both would pet the same file): its resource thread runs without a peer.
    let (mut c, wd) = watchdog_cluster("wdhang");
    c.create_md(0, &["--assume-clean"]);
    c.start(0);
    c.ctl(0, &["promote", "r0"]);
    wait_pets(&wd, 3, "running");
    let pid = c.nodes[0]
        .child
        .as_ref()
        .map(|ch| ch.id())
        .expect("alpha runs");

    // The resource's driver thread hangs; the rest of the daemon (the watchdog's own
    // task among it) runs on. The watchdog is no longer petted.
    let frozen = FrozenThread::freeze(pid, "tandem-r0");
    c.wait_log(0, "a resource thread does not answer", 10);
    let stopped_at = pets(&wd).len();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        pets(&wd).len(),
        stopped_at,
        "petted while a resource thread hangs"
    );

    // The thread recovers before the reset: petting resumes, replication too.
    drop(frozen);
    wait_pets(&wd, 2, "after the thread went on");
    c.wait_log(0, "every resource answers again", 10);
    assert_eq!(c.status(0)["role"], "primary");
    c.ctl(0, &["demote", "r0"]);
    c.stop(0);
    assert_eq!(
        pets(&wd).last(),
        Some(&b'V'),
        "no magic close on a clean stop"
    );
}

/// Resident memory of node `i`'s daemon.
fn rss_kib(c: &Cluster, i: usize) -> u64 {
    let pid = c.nodes[i].child.as_ref().expect("running").id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS")
}
