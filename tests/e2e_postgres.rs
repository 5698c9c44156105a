//! End to end with a real PostgreSQL 15 server on ext4 on the replicated device, run by
//! the promoter (`mount` + `exec`), with a client in the witness's namespace committing
//! numbered rows: crash the primary node mid-load, switch over and back. Every
//! acknowledged row must be on the node that serves afterwards.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{sh, Cluster, Opts};

const LEASE_MS: u64 = 1500;
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const PG_PORT: u16 = 5433;

/// A pair with a witness; PostgreSQL initialised on the replicated ext4; both daemons
/// restarted with the services `mount` and `exec` (pg_ctl). Nobody is primary yet.
fn pg_cluster(test: &str) -> Cluster {
    let mut c = Cluster::new(test, Opts::default());
    c.with_witness("C", LEASE_MS, "");
    c.up(0, true);
    c.mkfs(0);
    let dir = c.dir.display().to_string();
    for n in ["alpha", "beta"] {
        let sock = c.dir.join(format!("sock-{n}"));
        std::fs::create_dir_all(&sock).expect("socket dir");
        sh(Command::new("chown").arg("postgres:postgres").arg(&sock));
    }
    let m = c.mount(0);
    let pgdata = m.join("pgdata");
    std::fs::create_dir_all(&pgdata).expect("pgdata");
    sh(Command::new("chown").arg("postgres:postgres").arg(&pgdata));
    sh(Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(format!("{PG_BIN}/initdb"))
        .args(["-A", "trust", "-U", "postgres", "-D"])
        .arg(&pgdata));
    let hba = pgdata.join("pg_hba.conf");
    let mut t = std::fs::read_to_string(&hba).expect("pg_hba");
    t += "host all all 0.0.0.0/0 trust\n";
    std::fs::write(&hba, t).expect("pg_hba");
    c.umount(&m);
    c.ctl(0, &["demote", "r0"]);
    c.wait_in_sync(30);
    c.stop(0);
    c.stop(1);

    let pgd = format!("{dir}/mnt-$TANDEM_NODE/pgdata");
    let sock = format!("{dir}/sock-$TANDEM_NODE");
    let services = format!(
        "\n[[resource.r0.service]]\ntype = \"mount\"\nmount-point = \"{dir}/mnt-{{node}}\"\n\
         \n[[resource.r0.service]]\ntype = \"exec\"\nstart-timeout-ms = 60000\n\
         start = '''runuser -u postgres -- {PG_BIN}/pg_ctl -D {pgd} -l {sock}/pg.log -w -t 60 -o \"-p {PG_PORT} -c listen_addresses=* -c unix_socket_directories={sock}\" start'''\n\
         check = '''{PG_BIN}/pg_isready -q -h {sock} -p {PG_PORT}'''\n\
         stop = '''runuser -u postgres -- {PG_BIN}/pg_ctl -D {pgd} -m fast -w -t 60 stop'''\n"
    );
    let cfg = std::fs::read_to_string(&c.config).expect("config");
    std::fs::write(&c.config, cfg + &services).expect("config");
    c.start(0);
    c.start(1);
    c.wait_in_sync(30);
    c
}

fn running(s: &serde_json::Value) -> bool {
    s["role"] == "primary" && s["services"]["phase"] == "running"
}

/// psql against node `i` from the witness's namespace (a client host).
fn psql(c: &Cluster, i: usize, sql: &str) -> Result<String, String> {
    let ip = c.nodes[i].addr.split(':').next().unwrap_or_default();
    // nsenter, not `ip netns exec`: that one also copies the mount namespace, and a
    // copy holding the replicated file system keeps the device busy after umount.
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", c.witness_ns.as_deref().unwrap_or("")))
        .args(["--", "psql", "-h", ip, "-p", &PG_PORT.to_string()])
        .args(["-U", "postgres", "-d", "postgres", "-qAtX", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "2")
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Commits rows 1, 2, 3, ... one transaction each, against whichever node accepts them
/// (as a client behind a VIP or HAProxy would); a row counts as acknowledged when its
/// INSERT returned success, or a retry found it already committed.
struct RowWriter {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    /// Longest time between two acknowledgements, in ms (the outage a client saw).
    max_gap_ms: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RowWriter {
    fn start(c: &Cluster) -> RowWriter {
        let (stop, acked, gap) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let ips: Vec<String> = c
            .nodes
            .iter()
            .map(|n| n.addr.split(':').next().unwrap_or_default().to_string())
            .collect();
        let ns = c.witness_ns.clone().unwrap_or_default();
        let (s, a, g) = (stop.clone(), acked.clone(), gap.clone());
        let thread = std::thread::spawn(move || {
            let mut target = 0;
            let mut last_ack = Instant::now();
            let mut n = 1u64;
            while !s.load(Ordering::Relaxed) {
                let out = Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{ns}"))
                    .args(["--", "psql", "-h", &ips[target]])
                    .args(["-p", &PG_PORT.to_string(), "-U", "postgres", "-d", "postgres"])
                    .args(["-qAtX", "-c", &format!("insert into t (id) values ({n})")])
                    .env("PGCONNECT_TIMEOUT", "1")
                    .output();
                let ok = match &out {
                    Ok(o) if o.status.success() => true,
                    Ok(o) => String::from_utf8_lossy(&o.stderr).contains("duplicate key"),
                    Err(_) => false,
                };
                if ok {
                    a.store(n, Ordering::Relaxed);
                    g.fetch_max(last_ack.elapsed().as_millis() as u64, Ordering::Relaxed);
                    last_ack = Instant::now();
                    n += 1;
                } else {
                    target = 1 - target;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        RowWriter {
            stop,
            acked,
            max_gap_ms: gap,
            thread: Some(thread),
        }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    fn wait_more(&self, n: u64, secs: u64, what: &str) {
        let start = self.acked();
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.acked() < start + n {
            assert!(Instant::now() < deadline, "{what}: no commits for {secs} s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop; the last acknowledged row and the longest gap between acknowledgements.
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (self.acked(), self.max_gap_ms.load(Ordering::Relaxed))
    }
}

impl Drop for RowWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Every row 1..=acked is on node `i`, without a gap; returns the row count.
fn assert_rows(c: &Cluster, i: usize, acked: u64) -> u64 {
    let out = psql(c, i, "select count(*), coalesce(max(id), 0) from t").expect("count rows");
    let (count, max) = out.split_once('|').expect("count|max");
    let (count, max): (u64, u64) = (count.parse().expect("count"), max.parse().expect("max"));
    assert_eq!(count, max, "rows missing on node {i}: {count} rows up to id {max}");
    assert!(
        max >= acked,
        "acknowledged row {acked} lost on node {i} (it has {max})"
    );
    count
}

fn pg_amcheck(c: &Cluster, i: usize) {
    let sock = c.dir.join(format!("sock-{}", c.nodes[i].name));
    sh(Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(format!("{PG_BIN}/pg_amcheck"))
        .arg("-h")
        .arg(&sock)
        .args(["-p", &PG_PORT.to_string(), "-U", "postgres"])
        .args(["--install-missing", "--heapallindexed", "--all"]));
}

#[test]
fn crash_of_the_primary_node_loses_no_acknowledged_row() {
    let mut c = pg_cluster("pgcrash");
    for n in ["alpha", "beta"] {
        c.track_mount(c.dir.join(format!("mnt-{n}")));
    }
    c.ctl(0, &["promote", "r0"]);
    c.wait_for(0, "PostgreSQL running", 60, running);
    psql(&c, 0, "create table t (id bigint primary key, at timestamptz default now())")
        .expect("create table");
    let w = RowWriter::start(&c);
    w.wait_more(100, 30, "before the crash");

    // The whole primary node dies: PostgreSQL and tandemd, SIGKILL.
    let killed_at = Instant::now();
    let pgdata = c.dir.join("mnt-alpha/pgdata");
    let _ = Command::new("pkill")
        .args(["-9", "-f"])
        .arg(pgdata.display().to_string())
        .status();
    c.kill(0);
    let before = w.acked();
    w.wait_more(50, 60, "after the crash, on the survivor");
    let rto = killed_at.elapsed();
    let s = c.wait_for(1, "PostgreSQL running on the survivor", 10, running);
    assert_eq!(s["role"], "primary");
    let (acked, max_gap_ms) = w.finish();
    eprintln!("crash: {before} rows before, {acked} acknowledged in all; longest client outage {max_gap_ms} ms (RTO bound {} ms)", rto.as_millis());
    assert_rows(&c, 1, acked);
    pg_amcheck(&c, 1);

    // The old node comes back (after its reboot nothing of the dead mount is left) and
    // resyncs from the survivor.
    let _ = Command::new("umount")
        .arg("-l")
        .arg(c.dir.join("mnt-alpha"))
        .status();
    c.start(0);
    let s = c.wait_for(0, "rejoined as secondary", 30, |s| {
        s["role"] == "secondary" && s["connection"] == "connected"
    });
    assert_eq!(s["services"]["phase"], "idle");
    c.wait_in_sync(60);
    let s = c.status(0);
    eprintln!("resynced after rejoin: {} bytes", s["resync"]["total_bytes"]);
    assert!(s["resync"]["total_bytes"].as_u64().unwrap_or(0) > 0, "{s:#}");
}

#[test]
fn switchover_and_back_under_load_loses_no_acknowledged_row() {
    let mut c = pg_cluster("pgswitch");
    for n in ["alpha", "beta"] {
        c.track_mount(c.dir.join(format!("mnt-{n}")));
    }
    c.ctl(0, &["promote", "r0"]);
    c.wait_for(0, "PostgreSQL running", 60, running);
    psql(&c, 0, "create table t (id bigint primary key, at timestamptz default now())")
        .expect("create table");
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
