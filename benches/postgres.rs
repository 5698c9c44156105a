//! `cargo bench --bench postgres`: pgbench TPS and latency for PostgreSQL 15 on this
//! machine, one run each, with ratios:
//!
//! 1. a plain local directory;
//! 2. PostgreSQL's synchronous streaming replication (primary and standby in two network
//!    namespaces, `synchronous_standby_names` set);
//! 3. its asynchronous streaming replication (the same pair, that setting cleared);
//! 4. Tandem protocol C (ext4 on the replicated device, PostgreSQL started by the
//!    promoter);
//! 5. Tandem protocol A.
//!
//! pgbench talks to each server over its Unix socket, so the client path is the same
//! everywhere. After loading, each setup checkpoints and syncs before its timed run. `TANDEM_BENCH_SECS` (default 20) sets each run's length,
//! `TANDEM_BENCH_CLIENTS` (default 4) the pgbench clients, `TANDEM_BENCH_SCALE` (default
//! 10) the scale factor, `TANDEM_BENCH_ONLY` (e.g. `plain,C`) which of `plain`,
//! `streaming`, `C`, `A` to run. Needs root and PostgreSQL 15 (`scripts/deps.sh`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::pg::{pg_serving, PG_BIN, PG_PORT};
use common::{sh, Cluster, Opts};

struct Result {
    name: &'static str,
    tps: f64,
    latency_ms: f64,
}

fn as_postgres(ns: Option<&str>) -> Command {
    let mut c = Command::new("nsenter");
    if let Some(ns) = ns {
        c.arg(format!("--net=/run/netns/{ns}"));
    }
    c.args(["--", "runuser", "-u", "postgres", "--"]);
    c
}

/// A directory owned by postgres, mode 0700 (what a data directory must have).
fn owned_dir(p: &Path) {
    std::fs::create_dir_all(p).expect("dir");
    sh(Command::new("chown").arg("postgres:postgres").arg(p));
    std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .expect("chmod");
}

/// Stops the servers it knows of when dropped, also when a step panics.
struct Servers(Vec<(Option<String>, PathBuf)>);

impl Drop for Servers {
    fn drop(&mut self) {
        for (ns, data) in self.0.drain(..).rev() {
            let _ = as_postgres(ns.as_deref())
                .arg(format!("{PG_BIN}/pg_ctl"))
                .arg("-D")
                .arg(&data)
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}

fn initdb(data: &Path) {
    owned_dir(data);
    sh(as_postgres(None)
        .arg(format!("{PG_BIN}/initdb"))
        .args(["-A", "trust", "-U", "postgres", "-D"])
        .arg(data));
    let hba = data.join("pg_hba.conf");
    let mut t = std::fs::read_to_string(&hba).expect("pg_hba");
    t += "host all all 0.0.0.0/0 trust\nhost replication all 0.0.0.0/0 trust\n";
    std::fs::write(&hba, t).expect("pg_hba");
}

fn pg_ctl(ns: Option<&str>, data: &Path, sock: &Path, action: &str) {
    let mut c = as_postgres(ns);
    c.arg(format!("{PG_BIN}/pg_ctl")).arg("-D").arg(data);
    if action == "start" {
        c.arg("-l").arg(sock.join("pg.log")).arg("-o").arg(format!(
            "-p {PG_PORT} -c listen_addresses=* -c unix_socket_directories={}",
            sock.display()
        ));
    } else {
        c.args(["-m", "fast"]);
    }
    sh(c.args(["-w", "-t", "120", action]));
}

fn psql(sock: &Path, sql: &str) -> String {
    sh(as_postgres(None).arg("psql").arg("-h").arg(sock).args([
        "-p",
        &PG_PORT.to_string(),
        "-U",
        "postgres",
        "-qAtX",
        "-c",
        sql,
    ]))
    .trim()
    .to_string()
}

/// `pgbench -i`, then a timed TPC-B-like run over the Unix socket in `sock`.
fn pgbench(name: &'static str, sock: &Path) -> Result {
    let secs: u64 = common::env_or("TANDEM_BENCH_SECS", 20);
    let clients: u32 = common::env_or("TANDEM_BENCH_CLIENTS", 4);
    let scale: u32 = common::env_or("TANDEM_BENCH_SCALE", 10);
    let base = |c: &mut Command| {
        c.arg("pgbench")
            .arg("-h")
            .arg(sock)
            .args(["-p", &PG_PORT.to_string(), "-U", "postgres"]);
    };
    let mut init = as_postgres(None);
    base(&mut init);
    sh(init.args(["-q", "-i", "-s", &scale.to_string(), "postgres"]));
    // Every setup starts its timed run from the same state: the loaded tables written
    // out, so that the kernel's writeback of the load (30 s after it) does not land in
    // some runs and not in others.
    psql(sock, "checkpoint");
    sh(&mut Command::new("sync"));
    let mut run = as_postgres(None);
    base(&mut run);
    let out = sh(run
        .args(["-n", "-c", &clients.to_string(), "-j", "2"])
        .args(["-T", &secs.to_string(), "postgres"]));
    let field = |key: &str| {
        out.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split('=').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let r = Result {
        name,
        tps: field("tps"),
        latency_ms: field("latency average"),
    };
    println!("{:<44} {:>9.0} tps {:>8.2} ms", r.name, r.tps, r.latency_ms);
    r
}

fn plain(c: &Cluster) -> Result {
    let data = c.dir.join("plain");
    let sock = c.dir.join("sock-plain");
    initdb(&data);
    owned_dir(&sock);
    let _servers = Servers(vec![(None, data.clone())]);
    pg_ctl(None, &data, &sock, "start");
    pgbench("plain local directory", &sock)
}

/// Wait (at most a minute) until the primary reports its standby as `want`.
fn wait_sync_state(p_sock: &Path, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while psql(p_sock, "select sync_state from pg_stat_replication") != want {
        assert!(Instant::now() < deadline, "the standby never became {want}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Streaming replication between the cluster's two namespaces: synchronous, then
/// asynchronous on the same pair.
fn streaming(c: &Cluster) -> [Result; 2] {
    let (p_data, s_data) = (c.dir.join("pg-primary"), c.dir.join("pg-standby"));
    let (p_sock, s_sock) = (c.dir.join("sock-primary"), c.dir.join("sock-standby"));
    let p_ip = c.nodes[0]
        .addr
        .split(':')
        .next()
        .unwrap_or_default()
        .to_string();
    initdb(&p_data);
    owned_dir(&p_sock);
    owned_dir(&s_sock);
    let conf = p_data.join("postgresql.conf");
    let mut t = std::fs::read_to_string(&conf).expect("conf");
    t += "synchronous_standby_names = 'standby1'\nsynchronous_commit = on\n";
    std::fs::write(&conf, t).expect("conf");
    let mut servers = Servers(vec![(Some(c.nodes[0].ns.clone()), p_data.clone())]);
    pg_ctl(Some(&c.nodes[0].ns), &p_data, &p_sock, "start");
    owned_dir(&s_data);
    sh(as_postgres(Some(&c.nodes[1].ns))
        .arg(format!("{PG_BIN}/pg_basebackup"))
        .args(["-h", &p_ip, "-p", &PG_PORT.to_string(), "-U", "postgres"])
        .args(["-X", "stream", "-R", "-D"])
        .arg(&s_data));
    let auto = s_data.join("postgresql.auto.conf");
    let mut t = std::fs::read_to_string(&auto).unwrap_or_default();
    t += &format!(
        "primary_conninfo = 'host={p_ip} port={PG_PORT} user=postgres application_name=standby1'\n"
    );
    std::fs::write(&auto, t).expect("auto conf");
    servers
        .0
        .push((Some(c.nodes[1].ns.clone()), s_data.clone()));
    pg_ctl(Some(&c.nodes[1].ns), &s_data, &s_sock, "start");
    wait_sync_state(&p_sock, "sync");
    let sync = pgbench("PostgreSQL synchronous streaming replication", &p_sock);
    psql(&p_sock, "alter system set synchronous_standby_names = ''");
    psql(&p_sock, "select pg_reload_conf()");
    wait_sync_state(&p_sock, "async");
    let asynch = pgbench("PostgreSQL asynchronous streaming replication", &p_sock);
    [sync, asynch]
}

fn tandem(name: &'static str, protocol: &str) -> Result {
    let c = pg_serving(
        &format!("pgbench{}", protocol.to_lowercase()),
        protocol,
        2 << 30,
    );
    let sock: PathBuf = c.dir.join("sock-alpha");
    let r = pgbench(name, &sock);
    // Stop PostgreSQL and unmount through the promoter before the cluster goes.
    c.ctl(0, &["demote", "r0"]);
    r
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("postgres benchmark: run it with `cargo bench --bench postgres`");
        return;
    }
    // A filter on the setups to run: plain, streaming, C, A.
    let only = std::env::var("TANDEM_BENCH_ONLY").unwrap_or_default();
    let run = |name: &str| only.is_empty() || only.split(',').any(|o| o == name);
    let (mut plain_r, mut sync, mut asynch) = (None, None, None);
    if run("plain") || run("streaming") {
        let c = Cluster::new("pgbench", Opts::default());
        if run("plain") {
            plain_r = Some(plain(&c));
        }
        if run("streaming") {
            let [s, a] = streaming(&c);
            (sync, asynch) = (Some(s), Some(a));
        }
    }
    let tc = run("C").then(|| tandem("Tandem protocol C", "C"));
    let ta = run("A").then(|| tandem("Tandem protocol A", "A"));
    println!();
    let ratio = |a: &Result, b: &Result| a.tps / b.tps.max(1e-9);
    if let Some(p) = &plain_r {
        for r in [&sync, &asynch, &tc, &ta].into_iter().flatten() {
            println!("{:<44} {:>5.2} of plain TPS", r.name, ratio(r, p));
        }
    }
    if let (Some(tc), Some(sync)) = (&tc, &sync) {
        println!(
            "Tandem C / PostgreSQL synchronous streaming: {:.2} (goal >= 0.90)",
            ratio(tc, sync)
        );
    }
    if let (Some(ta), Some(asynch)) = (&ta, &asynch) {
        println!(
            "Tandem A / PostgreSQL asynchronous streaming: {:.2}",
            ratio(ta, asynch)
        );
    }
}
