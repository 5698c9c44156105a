//! `cargo bench --bench failover`: what a failover costs a PostgreSQL client, with the
//! default timeouts (ping 500 / 2000 ms, promote margin 500 ms) and a 1.5 s lease.
//!
//! - RTO: kill every process of the primary node (SIGKILL) while a client commits rows,
//!   until the survivor acknowledges a commit: median and max over `TANDEM_BENCH_RUNS`
//!   runs (default 5); with PostgreSQL's crash recovery included.
//! - Switchover downtime: the longest gap between two acknowledged commits while
//!   `tandemctl switchover` moves PostgreSQL to the other node.
//!
//! Needs root (namespaces, FUSE, loop devices) and PostgreSQL 15 (`scripts/deps.sh`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::pg::{crash_scenario, pg_serving, RowWriter};

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("failover benchmark: run it with `cargo bench --bench failover`");
        return;
    }
    let runs: usize = common::env_or("TANDEM_BENCH_RUNS", 5);
    let mut rtos = Vec::new();
    let mut lost = 0;
    for i in 0..runs {
        let r = crash_scenario(&format!("rto{i}"), "C", &|_| {});
        println!(
            "run {}: RTO {} ms, {} rows acknowledged, {} lost, {} bytes resynced on rejoin",
            i + 1,
            r.rto.as_millis(),
            r.acked,
            r.rows_lost,
            r.resynced_bytes
        );
        lost += r.rows_lost;
        rtos.push(r.rto);
    }
    rtos.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = rtos[rtos.len() / 2];
    let max = rtos[rtos.len() - 1];
    println!(
        "failover RTO (kill -9 of the primary node to the first commit on the survivor), protocol C, {runs} runs: median {:.0} ms, max {:.0} ms; acknowledged rows lost: {lost}",
        ms(median),
        ms(max)
    );
    println!(
        "  ratio to the 5 s goal: median {:.2}; Patroni with its defaults (REFERENCES.md, 27.8 s median): {:.2}",
        ms(median) / 5000.0,
        ms(median) / 27_800.0
    );

    let c = pg_serving("swbench", "C", 128 << 20);
    let w = RowWriter::start(&c);
    w.wait_more(100, 30, "before the switchover");
    let out = c.ctl(0, &["switchover", "r0"]);
    w.wait_more(100, 60, "after the switchover");
    let (acked, gap_ms) = w.finish();
    println!("switchover downtime (longest gap between acknowledged commits): {gap_ms} ms; {acked} rows; tandemctl said: {}", out.trim());
}
