//! `cargo bench --bench replication`: what the replicated device costs over the bare disk.
//!
//! In one run, `fio` on: a plain file on the same disk; the Tandem device with its peer
//! absent (the frontend alone); the replicated device in protocol C; in protocol A. Two
//! jobs each: 4 KiB random writes at queue depth 1, each made durable (O_DSYNC: the write
//! then a flush, so fio's completion latency is write + fdatasync), median and p99; and
//! 1 MiB sequential writes at queue depth 8, MB/s. Prints the figures and the ratios.
//!
//! Needs root (network namespaces, FUSE, loop devices) and fio (`scripts/deps.sh`).
//! `TANDEM_BENCH_SECS` sets each job's runtime (default 8).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;

use common::{Cluster, Opts};

struct Figures {
    p50_us: f64,
    p99_us: f64,
    iops: f64,
    seq_mb_s: f64,
}

fn fio(target: &Path, args: &[&str], secs: u64) -> serde_json::Value {
    let out = Command::new("fio")
        .arg(format!("--filename={}", target.display()))
        .args([
            "--name=bench",
            "--size=64M",
            "--time_based",
            "--output-format=json",
            "--direct=1",
        ])
        .arg(format!("--runtime={secs}"))
        .args(args)
        .output()
        .expect("run fio");
    assert!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("fio json")
}

fn measure(target: &Path, secs: u64) -> Figures {
    let lat = fio(
        target,
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=1",
            "--ioengine=psync",
            "--sync=dsync",
        ],
        secs,
    );
    let w = &lat["jobs"][0]["write"];
    let pct = |k: &str| w["clat_ns"]["percentile"][k].as_f64().unwrap_or(0.0) / 1000.0;
    let seq = fio(
        target,
        &["--rw=write", "--bs=1M", "--iodepth=8", "--ioengine=libaio"],
        secs,
    );
    Figures {
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        iops: w["iops"].as_f64().unwrap_or(0.0),
        seq_mb_s: seq["jobs"][0]["write"]["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
    }
}

fn print(name: &str, f: &Figures) {
    println!(
        "{name:<28} 4k sync write p50 {:>8.1} us  p99 {:>8.1} us  ({:>6.0} IOPS)   1M seq qd8 {:>7.1} MB/s",
        f.p50_us, f.p99_us, f.iops, f.seq_mb_s
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary too, and
    // a benchmark is not a test: there it only checks that it builds.
    if !std::env::args().any(|a| a == "--bench") {
        println!("replication benchmark: run it with `cargo bench --bench replication`");
        return;
    }
    let secs: u64 = common::env_or("TANDEM_BENCH_SECS", 8);
    let mut results = Vec::new();
    // Extra tandemd flags (e.g. `--no-uring`) and a filter on the configurations to run.
    let daemon_args_s = std::env::var("TANDEM_BENCH_DAEMON_ARGS").unwrap_or_default();
    let daemon_args: Vec<&str> = daemon_args_s.split_whitespace().collect();
    let only = std::env::var("TANDEM_BENCH_ONLY").unwrap_or_default();
    let run = |name: &str| only.is_empty() || only.split(',').any(|o| o == name);

    // A plain file on the same disk as the backing files.
    if run("plain") {
        let c = Cluster::new("bench-plain", Opts::default());
        let plain = c.dir.join("plain.img");
        let f = std::fs::File::create(&plain).expect("plain file");
        f.set_len(64 << 20).expect("size");
        drop(f);
        let r = measure(&plain, secs);
        print("plain file", &r);
        results.push(("plain file", r));
    }
    // The Tandem device with no peer: what the FUSE + loop frontend costs.
    if run("alone") {
        let mut c = Cluster::new("bench-alone", Opts::default());
        c.create_md(0, &["--assume-clean"]);
        c.start_with(0, &daemon_args);
        c.ctl(0, &["promote", "r0"]);
        let dev = c.nodes[0].device.clone();
        let r = measure(&dev, secs);
        print("tandem, peer absent", &r);
        results.push(("peer absent", r));
    }
    for proto in ["C", "A"] {
        if !run(proto) {
            continue;
        }
        let mut c = Cluster::new(
            "bench-repl",
            Opts {
                protocol: if proto == "C" { "C" } else { "A" },
                ..Opts::default()
            },
        );
        c.up_with(0, true, &daemon_args);
        let dev = c.nodes[0].device.clone();
        let r = measure(&dev, secs);
        let name = format!("tandem, protocol {proto}");
        print(&name, &r);
        results.push((
            if proto == "C" {
                "protocol C"
            } else {
                "protocol A"
            },
            r,
        ));
        c.wait_in_sync(60);
    }

    // Diagnostic: protocol C with the secondary's disk in RAM, so that what remains over
    // the peer-absent device is the network path, not the second disk's flush (both nodes'
    // disks share one device on this machine).
    if run("C-ram") {
        let mut c = Cluster::new(
            "bench-ram",
            Opts {
                beta_disk_dir: Some("/dev/shm".into()),
                ..Opts::default()
            },
        );
        c.up_with(0, true, &daemon_args);
        let dev = c.nodes[0].device.clone();
        let r = measure(&dev, secs);
        print("tandem, C, peer disk in RAM", &r);
        results.push(("C, peer in RAM", r));
        c.wait_in_sync(60);
    }

    let get = |n: &str| results.iter().find(|(k, _)| *k == n).map(|(_, f)| f);
    let (Some(plain), Some(alone), Some(c), Some(a)) = (
        get("plain file"),
        get("peer absent"),
        get("protocol C"),
        get("protocol A"),
    ) else {
        return;
    };
    println!();
    println!(
        "peer absent / plain file:  p50 latency x{:.2}   seq throughput {:.0}%",
        alone.p50_us / plain.p50_us,
        100.0 * alone.seq_mb_s / plain.seq_mb_s
    );
    println!(
        "protocol C / peer absent:  p50 latency {:+.0}%   p99 {:+.0}%   seq throughput {:.0}%   (aim: <= +30%, >= 80%)",
        100.0 * (c.p50_us / alone.p50_us - 1.0),
        100.0 * (c.p99_us / alone.p99_us - 1.0),
        100.0 * c.seq_mb_s / alone.seq_mb_s
    );
    println!(
        "protocol A / peer absent:  p50 latency {:+.0}%   p99 {:+.0}%   seq throughput {:.0}%",
        100.0 * (a.p50_us / alone.p50_us - 1.0),
        100.0 * (a.p99_us / alone.p99_us - 1.0),
        100.0 * a.seq_mb_s / alone.seq_mb_s
    );
    if let Some(r) = get("C, peer in RAM") {
        println!(
            "C (peer disk in RAM) / peer absent:  p50 latency {:+.0}%   seq throughput {:.0}%",
            100.0 * (r.p50_us / alone.p50_us - 1.0),
            100.0 * r.seq_mb_s / alone.seq_mb_s
        );
    }
}
