//! `cargo bench --bench witness`: the cost of lease renewals. One witness serves 1,000
//! resources whose primaries renew every second (one connection per resource, as data
//! nodes hold them); prints the witness's CPU share and resident memory.
//!
//! Needs root (network namespaces). `TANDEM_BENCH_SECS` sets the measured time (default
//! 10), `TANDEM_BENCH_RESOURCES` the number of resources (default 1000).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Cluster, Opts, SECRET};
use tandem::core::witness::{Op, Request};
use tandem::shell::net::WitnessClient;

fn proc_cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    get(11) + get(12)
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("witness benchmark: run it with `cargo bench --bench witness`");
        return;
    }
    let secs: u64 = common::env_or("TANDEM_BENCH_SECS", 10);
    let n: usize = common::env_or("TANDEM_BENCH_RESOURCES", 1000);
    let lease_ms = 3000;
    let mut c = Cluster::new("bench-witness", Opts::default());
    c.add_witness(lease_ms);
    c.start_witness();
    let pid = c.witness_child.as_ref().map(|ch| ch.id()).unwrap_or(0);
    let rss_idle = rss_kib(pid);
    std::thread::sleep(Duration::from_millis(lease_ms + 100));
    let addr: std::net::SocketAddr = c.witness_addr.parse().expect("addr");
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let ns = c.nodes[0].ns.clone();
    let (renewals, failures, cpu_ticks) = common::in_netns(&ns, move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async move {
            let mut clients = Vec::with_capacity(n);
            for i in 0..n {
                let mut w = WitnessClient::connect(addr, SECRET.as_bytes(), "alpha")
                    .await
                    .expect("connect");
                let r = w
                    .call(Request {
                        op: Op::Promote,
                        resource: format!("r{i}"),
                        term: 0,
                        peer: String::new(),
                        uptodate: true,
                        force: false,
                        primary: false,
                        seq: 0,
                    })
                    .await
                    .expect("promote");
                assert!(r.granted, "promote r{i}: {r:?}");
                clients.push((w, r.term, i));
            }
            let t0 = proc_cpu_ticks(pid);
            let start = Instant::now();
            let mut tasks = Vec::new();
            for (mut w, term, i) in clients {
                tasks.push(tokio::spawn(async move {
                    let (mut ok, mut bad) = (0u64, 0u64);
                    // Spread the renewals over the second, as independent nodes would.
                    tokio::time::sleep(Duration::from_micros((i as u64 * 997) % 1_000_000)).await;
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    while start.elapsed() < Duration::from_secs(secs) {
                        tick.tick().await;
                        let r = w
                            .call(Request {
                                op: Op::Renew,
                                resource: format!("r{i}"),
                                term,
                                peer: String::new(),
                                uptodate: true,
                                force: false,
                                primary: false,
                                seq: 0,
                            })
                            .await;
                        match r {
                            Ok(r) if r.granted => ok += 1,
                            _ => bad += 1,
                        }
                    }
                    (ok, bad)
                }));
            }
            let (mut ok, mut bad) = (0, 0);
            for t in tasks {
                if let Ok((o, b)) = t.await {
                    ok += o;
                    bad += b;
                }
            }
            let ticks = proc_cpu_ticks(pid) - t0;
            (ok, bad, (ticks, start.elapsed()))
        })
    });
    let (ticks, elapsed) = cpu_ticks;
    // SAFETY: sysconf with a constant argument.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu_s = ticks as f64 / hz;
    println!(
        "witness, {n} resources renewing every 1 s for {:.1} s: {renewals} renewals ({:.0}/s), {failures} failed",
        elapsed.as_secs_f64(),
        renewals as f64 / elapsed.as_secs_f64()
    );
    println!(
        "witness CPU: {cpu_s:.2} s = {:.1}% of one core; resident memory {} KiB (idle at start {} KiB)",
        100.0 * cpu_s / elapsed.as_secs_f64(),
        rss_kib(pid),
        rss_idle
    );
}
