//! End to end with services: the promoter mounts ext4 on the replicated device and runs
//! a service on it after promotion, stops both in reverse before demotion, takes over on
//! the survivor when the primary dies, and demotes again when a service fails to start.
//! A `vip` service puts its address on the primary's interface only, and moves it with a
//! switchover. A service that will not stop keeps the node primary (`none`) or ends the
//! daemon so that the peer takes over (`exit`). `systemd` services call `systemctl` (a
//! stand-in here) after the mount on start and before it on stop.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::pg::HTTP_PORT;
use common::{Cluster, Opts};

const LEASE_MS: u64 = 1500;

/// An `exec` service that drops a marker file on the mount (refusing to start on the
/// node named `fail_on`).
fn marker_service(dir: &str, fail_on: &str) -> String {
    format!(
        "start = \"[ $TANDEM_NODE != {fail_on} ] && echo $TANDEM_NODE > {dir}/mnt-$TANDEM_NODE/serving\"\n\
         check = \"test -f {dir}/mnt-$TANDEM_NODE/serving\"\n\
         stop = \"rm -f {dir}/mnt-$TANDEM_NODE/serving\"\n"
    )
}

/// A pair with a witness and ext4 on the device, then restarted with two services:
/// the file system mounted at `mnt-{node}`, and the `exec` service that
/// `exec(test dir)` gives. Nobody is primary. The daemons find a stand-in `systemctl`
/// first on their PATH (this machine runs no systemd), which logs each call to
/// `systemctl.log`: the node, its arguments, and whether the node's file system is mounted.
fn takeover_cluster(test: &str, extra: &str, exec: impl Fn(&str) -> String) -> Cluster {
    let mut c = Cluster::new(test, Opts::default());
    let bin = c.dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let d = c.dir.display();
    std::fs::write(
        bin.join("systemctl"),
        format!(
            "#!/bin/sh\nmountpoint -q {d}/mnt-$TANDEM_NODE && m=mounted || m=unmounted\n\
             echo \"$TANDEM_NODE $* $m\" >> {d}/systemctl.log\n"
        ),
    )
    .expect("systemctl");
    common::sh(Command::new("chmod").arg("+x").arg(bin.join("systemctl")));
    let path = std::env::var("PATH").unwrap_or_default();
    c.daemon_env
        .push(("PATH".into(), format!("{}:{path}", bin.display())));
    c.with_witness("C", LEASE_MS, extra);
    c.up(0, true);
    c.mkfs(0);
    c.ctl(0, &["demote", "r0"]);
    c.wait_in_sync(30);
    c.stop(0);
    c.stop(1);

    let dir = c.dir.display().to_string();
    // Services' processes outlive SIGKILLed daemons; the cluster kills them on drop.
    c.kill_on_drop(format!("{dir}/mnt-"));
    let services = format!(
        "\n[[resource.r0.service]]\ntype = \"mount\"\nmount-point = \"{dir}/mnt-{{node}}\"\nfs-type = \"ext4\"\n\
         \n[[resource.r0.service]]\ntype = \"exec\"\nstart-timeout-ms = 5000\n{}",
        exec(&dir)
    );
    c.append_config(&services);
    c.add_global(&format!("http-listen = \"0.0.0.0:{HTTP_PORT}\""));
    for n in ["alpha", "beta"] {
        c.track_mount(mnt(&c, n));
    }
    c.start(0);
    c.start(1);
    c.wait_in_sync(30);
    c
}

fn mnt(c: &Cluster, node: &str) -> PathBuf {
    c.dir.join(format!("mnt-{node}"))
}

fn mounted(p: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&*p.to_string_lossy()))
}

fn running(s: &serde_json::Value) -> bool {
    s["role"] == "primary" && s["services"]["phase"] == "running"
}

#[test]
fn services_follow_the_role_and_move_to_the_survivor() {
    let mut c = takeover_cluster("takeover", "", |d| marker_service(d, "nobody"));
    c.ctl(0, &["promote", "r0"]);
    let s = c.wait_for(0, "services running", 30, running);
    let states: Vec<&str> = s["services"]["list"]
        .as_array()
        .map(|l| l.iter().filter_map(|x| x["state"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(states, ["started", "started"], "{s:#}");
    let a = mnt(&c, "alpha");
    assert!(mounted(&a));
    assert_eq!(
        std::fs::read_to_string(a.join("serving")).expect("marker"),
        "alpha\n"
    );

    // Demote: the services stop in reverse (marker gone, then unmounted), then the role.
    let out = c.ctl(0, &["demote", "r0"]);
    assert!(out.contains("secondary"), "{out}");
    assert!(!mounted(&a), "still mounted after demote");
    let s = c.status(0);
    assert_eq!(s["role"], "secondary", "{s:#}");
    assert_eq!(s["services"]["phase"], "idle", "{s:#}");

    // Again primary, with data that must survive the crash.
    c.ctl(0, &["promote", "r0"]);
    let term = c.wait_for(0, "services running", 30, running)["term"]
        .as_u64()
        .unwrap_or(0);
    let data: String = (0..2000).map(|i| format!("row {i}\n")).collect();
    {
        let f = a.join("data.txt");
        std::fs::write(&f, &data).expect("write");
        std::fs::File::open(&f)
            .and_then(|f| f.sync_all())
            .expect("fsync");
    }

    assert_eq!(c.http_get(0, HTTP_PORT, "/primary"), Some(200));
    assert_eq!(c.http_get(1, HTTP_PORT, "/primary"), Some(503));
    assert_eq!(c.http_get(1, HTTP_PORT, "/replica"), Some(200));

    // The primary dies: beta is promoted through the witness and starts the services
    // on its copy; ext4 replays its journal; the data is there. /primary answers 200 on
    // at most one node at every sample, and on beta at the end.
    c.kill(0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut samples = 0;
    loop {
        let a = c.http_get(0, HTTP_PORT, "/primary");
        let b = c.http_get(1, HTTP_PORT, "/primary");
        samples += 1;
        assert!(
            !(a == Some(200) && b == Some(200)),
            "both nodes answered /primary 200"
        );
        if b == Some(200) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "beta never served");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        samples > 5,
        "the takeover was not sampled ({samples} samples)"
    );
    let s = c.wait_for(1, "services running on the survivor", 30, running);
    assert_eq!(s["term"].as_u64(), Some(term + 1), "{s:#}");
    let b = mnt(&c, "beta");
    assert!(mounted(&b));
    assert_eq!(
        std::fs::read_to_string(b.join("data.txt")).expect("data on the survivor"),
        data
    );
    assert_eq!(
        std::fs::read_to_string(b.join("serving")).expect("marker"),
        "beta\n"
    );
}

#[test]
fn systemd_units_start_after_the_mount_and_stop_before_it_on_each_primary() {
    let c = takeover_cluster("sysd", "", |d| {
        marker_service(d, "nobody")
            + "\n[[resource.r0.service]]\ntype = \"systemd\"\nunit = \"tandem-demo.service\"\n"
    });
    let calls = |c: &Cluster| -> Vec<String> {
        std::fs::read_to_string(c.dir.join("systemctl.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    c.ctl(0, &["promote", "r0"]);
    c.wait_for(0, "services running", 30, running);
    assert_eq!(calls(&c), ["alpha start tandem-demo.service mounted"]);
    c.ctl(0, &["switchover", "r0"]);
    c.wait_for(1, "services running on beta", 30, running);
    assert_eq!(
        calls(&c),
        [
            "alpha start tandem-demo.service mounted",
            "alpha stop tandem-demo.service mounted",
            "beta start tandem-demo.service mounted",
        ]
    );
    assert!(!mounted(&mnt(&c, "alpha")));
}

#[test]
fn a_service_failing_on_the_survivor_demotes_it_and_leaves_nothing_mounted() {
    let mut c = takeover_cluster("svcfail", "", |d| marker_service(d, "beta"));
    c.ctl(0, &["promote", "r0"]);
    c.wait_for(0, "services running", 30, running);
    c.kill(0);
    // Beta is promoted, mounts, fails the exec start, unmounts and demotes.
    let s = c.wait_for(1, "the failed takeover reported", 40, |s| {
        s["services"]["last_failure"]
            .as_str()
            .is_some_and(|f| f.contains("exec"))
            && s["role"] == "secondary"
            && s["services"]["phase"] == "idle"
    });
    let states: Vec<&str> = s["services"]["list"]
        .as_array()
        .map(|l| l.iter().filter_map(|x| x["state"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(states, ["stopped", "stopped"], "{s:#}");
    assert!(
        !mounted(&mnt(&c, "beta")),
        "left mounted after a failed start"
    );
    assert!(s["device"].is_null(), "device still attached: {s:#}");
}

#[test]
fn a_service_failing_on_the_primary_hands_the_role_to_the_peer() {
    let c = takeover_cluster("svchand", "", |d| marker_service(d, "alpha"));
    c.ctl(0, &["promote", "r0"]);
    // Alpha mounts, fails the exec start, unmounts, demotes and asks beta to take over.
    let s = c.wait_for(1, "beta serving", 40, running);
    assert_eq!(s["role"], "primary");
    assert_eq!(
        std::fs::read_to_string(mnt(&c, "beta").join("serving")).expect("marker"),
        "beta\n"
    );
    let a = c.wait_for(0, "alpha secondary", 10, |s| {
        s["role"] == "secondary" && s["services"]["phase"] == "idle"
    });
    assert!(
        a["services"]["last_failure"]
            .as_str()
            .is_some_and(|f| f.contains("exec")),
        "{a:#}"
    );
    assert!(!mounted(&mnt(&c, "alpha")), "left mounted on alpha");
}

#[test]
fn services_failing_on_both_nodes_hand_the_role_over_once_not_back() {
    let c = takeover_cluster("svcboth", "", |_| {
        "start = \"false\"\nstop = \"true\"\n".to_string()
    });
    c.ctl(0, &["promote", "r0"]);
    // Alpha fails and hands over; beta fails too and asks alpha, which declines.
    c.wait_log(0, "the services failed to start here last time", 60);
    for i in 0..2 {
        let s = c.wait_for(i, "secondary with the failure reported", 20, |s| {
            s["role"] == "secondary"
                && s["services"]["phase"] == "idle"
                && s["services"]["last_failure"].is_string()
        });
        assert!(s["device"].is_null(), "device still attached: {s:#}");
    }
    assert!(!mounted(&mnt(&c, "alpha")) && !mounted(&mnt(&c, "beta")));
}

/// An `exec` service like [`marker_service`] whose stop fails while the file
/// `stuck-{node}` exists in the test directory.
fn stubborn_service(dir: &str) -> String {
    format!(
        "start = \"echo $TANDEM_NODE > {dir}/mnt-$TANDEM_NODE/serving\"\n\
         stop = \"test ! -f {dir}/stuck-$TANDEM_NODE && rm -f {dir}/mnt-$TANDEM_NODE/serving\"\n"
    )
}

#[test]
fn a_service_that_will_not_stop_keeps_the_node_primary_until_a_demote_succeeds() {
    let c = takeover_cluster("stopfail", "on-demote-failure = \"none\"", stubborn_service);
    c.ctl(0, &["promote", "r0"]);
    c.wait_for(0, "services running", 30, running);
    let stuck = c.dir.join("stuck-alpha");
    std::fs::write(&stuck, "").expect("stuck marker");

    // The stop fails: the node stays primary with the file system mounted (something may
    // still use the device), and says why.
    let err = c.ctl_fails(0, &["demote", "r0"]);
    assert!(err.contains("not demoted"), "{err}");
    let s = c.status(0);
    assert_eq!(s["role"], "primary", "{s:#}");
    assert_eq!(s["services"]["phase"], "stop-failed", "{s:#}");
    assert!(
        s["services"]["last_failure"]
            .as_str()
            .is_some_and(|f| f.contains("exec")),
        "{s:#}"
    );
    assert!(mounted(&mnt(&c, "alpha")), "unmounted after a failed stop");
    assert_eq!(c.http_get(0, HTTP_PORT, "/primary"), Some(503));
    assert_eq!(c.status(1)["role"], "secondary");

    // Once the service lets go, a new demote retries the remaining stops and demotes.
    std::fs::remove_file(&stuck).expect("stuck marker");
    c.ctl(0, &["demote", "r0"]);
    let s = c.wait_for(0, "demoted", 20, |s| {
        s["role"] == "secondary" && s["services"]["phase"] == "idle"
    });
    assert!(s["device"].is_null(), "device still attached: {s:#}");
    assert!(!mounted(&mnt(&c, "alpha")), "left mounted after the demote");
}

#[test]
fn with_on_demote_failure_exit_a_stuck_stop_ends_the_daemon_and_the_peer_takes_over() {
    let mut c = takeover_cluster("stopexit", "on-demote-failure = \"exit\"", stubborn_service);
    c.ctl(0, &["promote", "r0"]);
    c.wait_for(0, "services running", 30, running);
    std::fs::write(c.dir.join("stuck-alpha"), "").expect("stuck marker");

    let out = c.ctl_output(0, &["demote", "r0"]);
    assert!(
        !out.status.success(),
        "demote succeeded with a stuck service"
    );
    let st = c.wait_exit(0, 10);
    assert_eq!(st.code(), Some(1), "tandemd should exit with 1");
    // Its lease runs out; the witness lets beta take over, and beta's services start.
    let s = c.wait_for(1, "beta serving", 40, running);
    assert_eq!(s["role"], "primary");
    assert_eq!(
        std::fs::read_to_string(mnt(&c, "beta").join("serving")).expect("marker"),
        "beta\n"
    );
}

/// A writer as the service: appends numbered rows to `rows` on the mount, syncing each,
/// and records the last acknowledged (synced) row outside the replicated disk (by
/// rename, so a reader never sees it half written). It continues from the last row the
/// file holds, so a takeover shows any loss as a gap. On SIGTERM the shell ends after
/// the command in progress, so no orphaned `sync` keeps the file system busy.
fn writer_service(dir: &str) -> String {
    let m = format!("{dir}/mnt-$TANDEM_NODE");
    let body = format!(
        "trap \\\"exit 0\\\" TERM; i=$(tail -n 1 {m}/rows 2>/dev/null || echo 0); \
         while :; do i=$((i+1)); echo $i >> {m}/rows || exit 1; sync {m}/rows; \
         echo $i > {dir}/acked.tmp && mv {dir}/acked.tmp {dir}/acked; done"
    );
    format!(
        "start = \"nohup sh -c '{body}' >/dev/null 2>&1 & echo $! > {dir}/writer.pid\"\n\
         check = \"test -s {m}/rows\"\n\
         stop = \"p=$(cat {dir}/writer.pid); kill $p; while kill -0 $p 2>/dev/null; do sleep 0.05; done; rm -f {dir}/writer.pid\"\n"
    )
}

fn acked(c: &Cluster) -> u64 {
    std::fs::read_to_string(c.dir.join("acked"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The rows file holds 1..=n without a gap; returns n.
fn rows_contiguous(p: &Path) -> u64 {
    let text = std::fs::read_to_string(p).expect("rows");
    let mut n = 0;
    for l in text.lines() {
        let v: u64 = l
            .parse()
            .unwrap_or_else(|_| panic!("torn row {l:?} after row {n}"));
        assert_eq!(v, n + 1, "row {} follows row {n}", v);
        n = v;
    }
    n
}

#[test]
fn switchover_and_back_under_load_loses_no_acknowledged_row() {
    let c = takeover_cluster("switch", "", writer_service);
    c.ctl(0, &["promote", "r0"]);
    c.wait_for(0, "services running", 30, running);
    let wait_rows = |c: &Cluster, more: u64| {
        let start = acked(c);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while acked(c) < start + more {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer is not writing"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    wait_rows(&c, 50);

    let e = c.ctl_fails(1, &["switchover", "r0"]);
    assert!(e.contains("not primary"), "{e}");
    let e = c.ctl_fails(0, &["switchover", "r0", "--to", "gamma"]);
    assert!(e.contains("not the peer"), "{e}");

    for (from, to, name) in [(0, 1, "beta"), (1, 0, "alpha")] {
        let out = c.ctl(from, &["switchover", "r0", "--to", name]);
        assert!(out.contains("switched over"), "{out}");
        eprintln!("switchover to {name}: {out}");
        let last_acked = acked(&c);
        let s = c.wait_for(to, "services running after the switchover", 30, running);
        assert_eq!(s["role"], "primary");
        assert_eq!(c.status(from)["role"], "secondary");
        assert!(!mounted(&mnt(&c, ["alpha", "beta"][from])));
        // Every row acknowledged before the move is on the new primary, in order.
        let n = rows_contiguous(&mnt(&c, name).join("rows"));
        assert!(
            n >= last_acked,
            "row {last_acked} was acknowledged, {name} has {n}"
        );
        wait_rows(&c, 50);
        c.wait_in_sync(30);
    }
    let n = rows_contiguous(&mnt(&c, "alpha").join("rows"));
    assert!(
        n >= acked(&c).saturating_sub(1),
        "alpha has {n} rows, {} acknowledged",
        acked(&c)
    );
}

#[test]
fn fail_back_to_the_preferred_node_once_it_is_in_sync_again() {
    let mut c = takeover_cluster(
        "failback",
        "preferred-node = \"alpha\"\nfail-back = true\nfail-back-delay-ms = 1000",
        |d| marker_service(d, "nobody"),
    );
    c.ctl(0, &["promote", "r0"]);
    c.wait_for(0, "services running", 30, running);
    c.kill(0);
    c.wait_for(1, "services running on the survivor", 30, running);
    // Alpha returns after its "reboot": it resyncs, and then beta hands back to it.
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(mnt(&c, "alpha"))
        .status();
    c.start(0);
    let s = c.wait_for(0, "serving again after the fail-back", 60, running);
    assert!(mounted(&mnt(&c, "alpha")));
    assert_eq!(c.status(1)["role"], "secondary", "{s:#}");
    assert!(!mounted(&mnt(&c, "beta")));
    assert_eq!(
        std::fs::read_to_string(mnt(&c, "alpha").join("serving")).expect("marker"),
        "alpha\n"
    );
}

/// Whether namespace `ns` has `ip` on its eth0.
fn has_addr(ns: &str, ip: &str) -> bool {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-o", "addr", "show", "dev", "eth0"])
        .output()
        .expect("run ip");
    String::from_utf8_lossy(&out.stdout).contains(&format!(" {ip}/"))
}

#[test]
fn vip_follows_the_primary_through_a_switchover_and_goes_on_demote() {
    let mut c = Cluster::new("vip", Opts::default());
    c.with_witness("C", LEASE_MS, "");
    let subnet = c.nodes[0]
        .addr
        .rsplit_once('.')
        .map(|(s, _)| s.to_string())
        .unwrap_or_default();
    let vip = format!("{subnet}.50");
    c.append_config(&format!(
        "\n[[resource.r0.service]]\ntype = \"vip\"\naddress = \"{vip}/24\"\ninterface = \"eth0\"\n"
    ));
    let (a_ns, b_ns) = (c.nodes[0].ns.clone(), c.nodes[1].ns.clone());
    assert!(!has_addr(&a_ns, &vip) && !has_addr(&b_ns, &vip));
    c.up(0, true);
    c.wait_for(0, "services running", 30, running);
    assert!(has_addr(&a_ns, &vip), "vip not on the primary");
    assert!(!has_addr(&b_ns, &vip), "vip on the secondary");
    c.wait_in_sync(30);

    let out = c.ctl(0, &["switchover", "r0"]);
    assert!(out.contains("beta"), "{out}");
    c.wait_for(1, "services running after the switchover", 30, running);
    assert!(has_addr(&b_ns, &vip), "vip did not move to the new primary");
    assert!(!has_addr(&a_ns, &vip), "vip left on the old primary");

    c.ctl(1, &["demote", "r0"]);
    assert!(!has_addr(&b_ns, &vip), "vip left after demote");
    assert!(!has_addr(&a_ns, &vip));
}
