//! End to end with a real PostgreSQL 15 server on ext4 on the replicated device, run by
//! the promoter (`mount` + `exec`), with a client in the witness's namespace committing
//! numbered rows: crash the primary node mid-load, switch over and back. Every
//! acknowledged row must be on the node that serves afterwards.

mod common;

use common::pg::{assert_rows, crash_scenario, pg_amcheck, pg_serving, running, RowWriter};

#[test]
fn crash_of_the_primary_node_loses_no_acknowledged_row() {
    let r = crash_scenario("pgcrash", "C", &|m| eprintln!("{m}"));
    assert_eq!(r.rows_lost, 0, "{r:?}");
    assert!(r.acked > r.rows_before, "{r:?}");
    assert!(r.resynced_bytes > 0, "no resync after the rejoin: {r:?}");
}

/// The README's demo (`scripts/demo.sh`), not part of the test run.
#[test]
#[ignore]
fn demo() {
    let r = crash_scenario("demo", "C", &|m| println!("== {m}"));
    println!(
        "== result: survivor committing again after {:.1} s; acknowledged rows lost: {}; resynced when the old primary came back: {:.1} MiB",
        r.rto.as_secs_f64(),
        r.rows_lost,
        r.resynced_bytes as f64 / (1 << 20) as f64
    );
    assert_eq!(r.rows_lost, 0);
}

#[test]
fn switchover_and_back_under_load_loses_no_acknowledged_row() {
    let c = pg_serving("pgswitch", "C", 128 << 20);
    let w = RowWriter::start(&c);
    w.wait_more(50, 30, "before the switchover");
    for (from, to) in [(0, 1), (1, 0)] {
        let out = c.ctl(from, &["switchover", "r0"]);
        eprintln!("{out}");
        c.wait_for(to, "PostgreSQL running after the switchover", 60, running);
        w.wait_more(50, 60, "after the switchover");
        c.wait_in_sync(30);
    }
    let (acked, max_gap_ms) = w.finish();
    eprintln!("switchover there and back: {acked} rows acknowledged; longest client outage {max_gap_ms} ms");
    assert_rows(&c, 0, acked);
    pg_amcheck(&c, 0);
}
