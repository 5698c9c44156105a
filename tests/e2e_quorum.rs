//! End to end with quorum: two real `tandemd` and a real `tandem-witness`, each in its own
//! network namespace, a writer running throughout. Isolating the primary, cutting the
//! secondary off, freezing the primary (SIGSTOP) past its lease, and losing the witness:
//! never two nodes completing writes, never a stale node promoted, and afterwards the
//! pair converges to identical disks.

mod common;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::writer::{StampWriter, REGION_BLOCKS};
use common::{Cluster, Opts};
use nix::sys::signal::Signal;

const LEASE_MS: u64 = 1500;

/// A pair with a witness, `alpha` promoted through it, in sync.
fn quorum_cluster(test: &str, protocol: &str) -> Cluster {
    quorum_cluster_from(test, protocol, true)
}

/// As [`quorum_cluster`]; unless `assume_clean`, both disks start inconsistent and the
/// first promotion is the operator's `promote --force`, as a new pair's is.
fn quorum_cluster_from(test: &str, protocol: &str, assume_clean: bool) -> Cluster {
    let mut c = Cluster::new(test, Opts::default());
    c.with_witness(protocol, LEASE_MS, "");
    c.up(0, assume_clean);
    let s = c.wait_for(0, "quorum with a lease", 10, |s| {
        s["quorum"] == true && s["lease_ms_left"].as_u64().unwrap_or(0) > 0
    });
    assert_eq!(s["term"], 1, "{s:#}");
    assert_eq!(s["degraded"], false, "{s:#}");
    c
}

fn is_primary(s: &serde_json::Value) -> bool {
    s["role"] == "primary"
}

/// Wait until node `i` exposes its device (it attaches it when promoted).
fn wait_device(c: &Cluster, i: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.nodes[i].device.exists() {
        assert!(Instant::now() < deadline, "no device on node {i}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn isolated_primary_stops_within_its_lease_and_rejoins_as_sync_target() {
    isolated_primary(quorum_cluster("isoprim", "C"));
}

/// `promote --force` overrides the disk check of a new pair's first promotion, nothing
/// else: the forced primary took its term from the witness and yields like any other.
#[test]
fn isolated_forced_primary_stops_within_its_lease_and_rejoins_as_sync_target() {
    isolated_primary(quorum_cluster_from("isoforce", "C", false));
}

fn isolated_primary(c: Cluster) {
    let wa = StampWriter::start(&c.nodes[0].device, 0, 1);
    wa.wait_more_ok(200, 20, "alpha before the cut");

    // Alpha loses both the peer and the witness.
    let cut_at = Instant::now();
    c.link(0, false);
    // Its writes stop: held, never completed (they fail once it steps down).
    // Beta takes over through the witness, once alpha's lease has run out.
    let s = c.wait_for(1, "promoted by the witness", 30, is_primary);
    let promoted_after = cut_at.elapsed();
    assert_eq!(s["term"], 2, "{s:#}");
    assert!(
        promoted_after >= Duration::from_millis(LEASE_MS),
        "beta promoted {promoted_after:?} after the cut, before alpha's lease ran out"
    );
    // Not one of alpha's writes completed after its lease ran out.
    let lease_end = cut_at + Duration::from_millis(LEASE_MS);
    let late = wa
        .entries()
        .iter()
        .filter(|e| e.ok && e.done > lease_end)
        .count();
    assert_eq!(
        late, 0,
        "the isolated primary completed {late} writes after its lease ran out"
    );
    let sa = c.status(0);
    assert_eq!(sa["quorum"], false, "{sa:#}");
    assert_eq!(sa["suspended"], true, "{sa:#}");

    wait_device(&c, 1);
    let wb = StampWriter::start(&c.nodes[1].device, REGION_BLOCKS, 1_000_000);
    wb.wait_more_ok(200, 20, "beta after takeover");

    // Heal: alpha learns of term 2, steps down, and becomes beta's sync target.
    c.link(0, true);
    c.wait_for(0, "stepped down", 30, |s| {
        s["role"] == "secondary" && s["term"] == 2
    });
    let wa_log = wa.finish();
    assert!(
        wa_log.iter().any(|e| !e.ok),
        "alpha's held writes never failed"
    );
    wb.wait_more_ok(200, 20, "beta while alpha resyncs");
    c.wait_in_sync(60);
    wb.finish();
    c.wait_in_sync(30);
    c.assert_disks_identical();
    // The witness hears that alpha is up to date again in its own round trip, just
    // after the resync ends.
    let s = c.wait_for(1, "the witness records both up to date", 10, |s| {
        s["witness"]["up_to_date"] == serde_json::json!(["alpha", "beta"])
    });
    assert!(is_primary(&s), "{s:#}");
}

#[test]
fn cut_off_secondary_is_outdated_refuses_promotion_and_resyncs() {
    let c = quorum_cluster("cutsec", "C");
    let wa = StampWriter::start(&c.nodes[0].device, 0, 1);
    wa.wait_more_ok(200, 20, "alpha before the cut");

    // The pair loses its link; both still reach the witness.
    c.cut_pair(true);
    // Alpha has the witness record beta as outdated, then keeps writing.
    c.wait_for(0, "beta outdated at the witness", 30, |s| {
        s["connection"] == "connecting"
            && s["witness"]["up_to_date"] == serde_json::json!(["alpha"])
    });
    wa.wait_more_ok(200, 20, "alpha with beta outdated");
    assert!(is_primary(&c.status(0)));
    // Beta learns it from the witness, and neither it nor the operator promotes it.
    let s = c.wait_for(1, "outdated", 30, |s| s["disk"] == "outdated");
    assert_eq!(s["role"], "secondary", "{s:#}");
    let e = c.ctl_fails(1, &["promote", "r0"]);
    assert!(
        e.to_lowercase().contains("outdated") || e.contains("UpToDate"),
        "{e}"
    );
    assert_eq!(c.status(1)["role"], "secondary");

    c.cut_pair(false);
    c.wait_in_sync(60);
    wa.wait_more_ok(100, 20, "alpha after the heal");
    c.wait_for(0, "beta up to date at the witness", 30, |s| {
        s["witness"]["up_to_date"] == serde_json::json!(["alpha", "beta"])
    });
    let log = wa.finish();
    assert!(log.iter().all(|e| e.ok), "alpha's writes failed");
    c.wait_in_sync(30);
    c.assert_disks_identical();
    let s = c.status(1);
    assert_eq!(s["disk"], "uptodate", "{s:#}");
}

#[test]
fn frozen_primary_resumed_after_takeover_writes_nothing() {
    frozen_primary("sigstop", "C");
}

/// Protocol A completes writes before the peer has them: where a stale primary could.
#[test]
fn frozen_primary_resumed_after_takeover_writes_nothing_protocol_a() {
    frozen_primary("sigstopa", "A");
}

fn frozen_primary(test: &str, protocol: &str) {
    let c = quorum_cluster(test, protocol);
    let wa = StampWriter::start(&c.nodes[0].device, 0, 1);
    wa.wait_more_ok(200, 20, "alpha before the freeze");

    c.signal(0, Signal::SIGSTOP);
    let stopped_at = Instant::now();
    let s = c.wait_for(1, "promoted by the witness", 30, is_primary);
    assert_eq!(s["term"], 2, "{s:#}");
    wait_device(&c, 1);
    let wb = StampWriter::start(&c.nodes[1].device, REGION_BLOCKS, 1_000_000);
    wb.wait_more_ok(100, 20, "beta after takeover");
    assert!(stopped_at.elapsed() > Duration::from_millis(LEASE_MS));
    // Alpha's region as the new primary has it: beta writes elsewhere, so after the
    // heal both disks must hold exactly this there, whatever alpha still had queued.
    let region = region_bytes(&c, 1, 0);

    let resumed_at = Instant::now();
    c.signal(0, Signal::SIGCONT);
    // Alpha finds its lease gone and term 2 on the peer: it steps down and fails the
    // writes it held.
    wa.wait_failed(30, "the resumed old primary");
    c.wait_for(0, "stepped down", 30, |s| {
        s["role"] == "secondary" && s["term"] == 2
    });
    wb.wait_more_ok(100, 20, "beta while alpha rejoins");
    c.wait_in_sync(60);
    let wa_log = wa.finish();
    wb.finish();
    c.wait_in_sync(30);
    c.assert_disks_identical();

    let late = wa_log
        .iter()
        .filter(|e| e.ok && e.done >= resumed_at)
        .count();
    assert_eq!(
        late, 0,
        "the old primary completed {late} writes after SIGCONT"
    );
    for i in 0..2 {
        if let Some(b) = first_difference(&region, &region_bytes(&c, i, 0)) {
            panic!(
                "block {b} of alpha's region on node {i} changed after the takeover: \
                 a write of the frozen primary landed"
            );
        }
    }
}

/// The bytes of the writer region starting at block `first` on node `i`'s backing disk.
fn region_bytes(c: &Cluster, i: usize, first: u64) -> Vec<u8> {
    let f = std::fs::File::open(&c.nodes[i].disk).expect("disk");
    let mut v = vec![0u8; (REGION_BLOCKS * 4096) as usize];
    f.read_exact_at(&mut v, first * 4096).expect("read disk");
    v
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    (0..a.len() / 4096).find(|&k| a[k * 4096..(k + 1) * 4096] != b[k * 4096..(k + 1) * 4096])
}

#[test]
fn witness_lost_pair_continues_degraded_then_lease_after_grace() {
    let mut c = quorum_cluster("witdown", "C");
    let wa = StampWriter::start(&c.nodes[0].device, 0, 1);
    wa.wait_more_ok(100, 20, "alpha before the witness dies");

    c.stop_witness();
    let s = c.wait_for(0, "degraded", 20, |s| {
        s["degraded"] == true && s["lease_ms_left"] == 0
    });
    assert_eq!(s["quorum"], true, "the peer alone keeps quorum: {s:#}");
    assert_eq!(s["suspended"], false, "{s:#}");
    wa.wait_more_ok(300, 20, "alpha with the witness down");
    assert_eq!(c.status(1)["role"], "secondary");

    // Restarted, the witness grants nothing for one lease period, then renews again.
    c.start_witness();
    let restarted = Instant::now();
    c.wait_for(0, "lease again", 20, |s| {
        s["degraded"] == false && s["lease_ms_left"].as_u64().unwrap_or(0) > 0
    });
    let after = restarted.elapsed();
    assert!(
        after >= Duration::from_millis(LEASE_MS * 9 / 10),
        "lease renewed {after:?} after the witness restarted, inside its grace period"
    );
    wa.wait_more_ok(100, 20, "alpha with the witness back");
    let log = wa.finish();
    assert!(
        log.iter().all(|e| e.ok),
        "a write failed while the pair was connected"
    );
    c.wait_in_sync(30);
    c.assert_disks_identical();
}

#[test]
fn stonith_takeover_only_once_fence_peer_says_fenced() {
    let mut c = Cluster::new("stonith", Opts::default());
    // The handler records its environment and exits with the code in a file.
    let script = c.dir.join("fence-peer.sh");
    let code = c.dir.join("fence-peer.code");
    let env_file = c.dir.join("fence-peer.env");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nenv | grep ^TANDEM_ | sort > {}\nexit $(cat {})\n",
            env_file.display(),
            code.display()
        ),
    )
    .expect("script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    std::fs::write(&code, "5").expect("code");
    c.with_witness(
        "C",
        LEASE_MS,
        &format!(
            "fencing = \"stonith\"\nfence-peer = \"{}\"",
            script.display()
        ),
    );
    c.up(0, true);
    let wa = StampWriter::start(&c.nodes[0].device, 0, 1);
    wa.wait_more_ok(100, 20, "alpha before the cut");

    // Alpha vanishes; beta's handler says "unreachable" (5): no takeover.
    c.link(0, false);
    let s = c.wait_for(1, "fence-peer refused", 30, |s| {
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("fence-peer"))
    });
    assert_eq!(s["role"], "secondary", "{s:#}");
    let env = std::fs::read_to_string(&env_file).expect("the handler ran");
    let alpha_addr = &c.nodes[0].addr;
    for want in [
        "TANDEM_NODE=beta".to_string(),
        "TANDEM_PEER=alpha".to_string(),
        format!("TANDEM_PEER_ADDRESS={alpha_addr}"),
        "TANDEM_RESOURCE=r0".to_string(),
    ] {
        assert!(env.lines().any(|l| l == want), "{want} missing in {env}");
    }
    // The operator fences alpha for real (here: says so) and promotes: 7 lets it go on.
    std::fs::write(&code, "7").expect("code");
    c.ctl(1, &["promote", "r0"]);
    let s = c.status(1);
    assert!(is_primary(&s), "{s:#}");
    assert_eq!(s["term"], 2, "{s:#}");

    c.link(0, true);
    c.wait_for(0, "stepped down", 30, |s| {
        s["role"] == "secondary" && s["term"] == 2
    });
    wa.finish();
    c.wait_in_sync(60);
    c.assert_disks_identical();
}
