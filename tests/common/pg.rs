//! PostgreSQL on a Tandem pair, for the end-to-end tests, the demo and the benchmarks: a
//! pair with a witness whose promoter mounts ext4 and runs PostgreSQL 15 with pg_ctl,
//! and a client in the witness's namespace committing numbered rows.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{sh, Cluster, Opts};

pub const LEASE_MS: u64 = 1500;
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
pub const PG_PORT: u16 = 5433;

/// A pair with a witness; PostgreSQL initialised on the replicated ext4; both daemons
/// restarted with the services `mount` and `exec` (pg_ctl). Nobody is primary yet.
pub fn pg_cluster(test: &str, protocol: &str, disk_bytes: u64) -> Cluster {
    let mut c = Cluster::new(
        test,
        Opts {
            disk_bytes: [disk_bytes; 2],
            ..Opts::default()
        },
    );
    c.with_witness(protocol, LEASE_MS, "");
    c.kill_on_drop(format!("{}/mnt-", c.dir.display()));
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
    c.append_config(&services);
    c.add_global(&format!("http-listen = \"0.0.0.0:{HTTP_PORT}\""));
    c.start(0);
    c.start(1);
    c.wait_in_sync(30);
    c
}

/// Where the nodes' health endpoint listens (Patroni's port).
pub const HTTP_PORT: u16 = 8008;

/// The nodes whose `/primary` answers 200.
pub fn primaries(c: &Cluster) -> Vec<usize> {
    (0..2)
        .filter(|&i| c.http_get(i, HTTP_PORT, "/primary") == Some(200))
        .collect()
}

pub fn running(s: &serde_json::Value) -> bool {
    s["role"] == "primary" && s["services"]["phase"] == "running"
}

/// psql against node `i` from the witness's namespace (a client host).
pub fn psql(c: &Cluster, i: usize, sql: &str) -> Result<String, String> {
    let ip = c.nodes[i].addr.split(':').next().unwrap_or_default();
    // nsenter, not `ip netns exec`: that one also copies the mount namespace, and a
    // copy holding the replicated file system keeps the device busy after umount.
    let out = Command::new("nsenter")
        .arg(format!(
            "--net=/run/netns/{}",
            c.witness_ns.as_deref().unwrap_or("")
        ))
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
pub struct RowWriter {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    /// Longest time between two acknowledgements, in ms (the outage a client saw).
    max_gap_ms: Arc<AtomicU64>,
    /// When each row was acknowledged (row n at index n - 1), and by which node.
    ack_times: Arc<Mutex<Vec<(Instant, usize)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RowWriter {
    pub fn start(c: &Cluster) -> RowWriter {
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
        let times = Arc::new(Mutex::new(Vec::new()));
        let (s, a, g, tm) = (stop.clone(), acked.clone(), gap.clone(), times.clone());
        let thread = std::thread::spawn(move || {
            let mut target = 0;
            let mut last_ack = Instant::now();
            let mut n = 1u64;
            while !s.load(Ordering::Relaxed) {
                let out = Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{ns}"))
                    .args(["--", "psql", "-h", &ips[target]])
                    .args([
                        "-p",
                        &PG_PORT.to_string(),
                        "-U",
                        "postgres",
                        "-d",
                        "postgres",
                    ])
                    .args(["-qAtX", "-c", &format!("insert into t (id) values ({n})")])
                    .env("PGCONNECT_TIMEOUT", "1")
                    .output();
                let ok = match &out {
                    Ok(o) if o.status.success() => true,
                    Ok(o) => String::from_utf8_lossy(&o.stderr).contains("duplicate key"),
                    Err(_) => false,
                };
                if ok {
                    if let Ok(mut v) = tm.lock() {
                        v.push((Instant::now(), target));
                    }
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
            ack_times: times,
            thread: Some(thread),
        }
    }

    /// The first acknowledgement by node `i` after `t`, as time since `t`. (A commit
    /// the old primary made just before it died can still be acknowledged after the
    /// kill; it does not count as the survivor serving.)
    pub fn first_ack_after(&self, t: Instant, i: usize) -> Option<Duration> {
        let v = self.ack_times.lock().ok()?;
        v.iter()
            .find(|&&(x, node)| x > t && node == i)
            .map(|&(x, _)| x - t)
    }

    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    pub fn wait_more(&self, n: u64, secs: u64, what: &str) {
        let start = self.acked();
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.acked() < start + n {
            assert!(Instant::now() < deadline, "{what}: no commits for {secs} s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop; the last acknowledged row and the longest gap between acknowledgements.
    pub fn finish(mut self) -> (u64, u64) {
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

/// (row count, highest id) of table `t` on node `i`.
pub fn rows(c: &Cluster, i: usize) -> (u64, u64) {
    let out = psql(c, i, "select count(*), coalesce(max(id), 0) from t").expect("count rows");
    let (count, max) = out.split_once('|').expect("count|max");
    (count.parse().expect("count"), max.parse().expect("max"))
}

/// Every row 1..=acked is on node `i`, without a gap; returns the row count.
pub fn assert_rows(c: &Cluster, i: usize, acked: u64) -> u64 {
    let (count, max) = rows(c, i);
    assert_eq!(
        count, max,
        "rows missing on node {i}: {count} rows up to id {max}"
    );
    assert!(
        max >= acked,
        "acknowledged row {acked} lost on node {i} (it has {max})"
    );
    count
}

pub fn pg_amcheck(c: &Cluster, i: usize) {
    let sock = c.dir.join(format!("sock-{}", c.nodes[i].name));
    sh(Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(format!("{PG_BIN}/pg_amcheck"))
        .arg("-h")
        .arg(&sock)
        .args(["-p", &PG_PORT.to_string(), "-U", "postgres"])
        .args(["--install-missing", "--heapallindexed", "--all"]));
}

/// `pg_cluster` with `alpha` promoted, PostgreSQL serving there and table `t` created.
pub fn pg_serving(test: &str, protocol: &str, disk_bytes: u64) -> Cluster {
    let mut c = pg_cluster(test, protocol, disk_bytes);
    for n in ["alpha", "beta"] {
        c.track_mount(c.dir.join(format!("mnt-{n}")));
    }
    c.ctl(0, &["promote", "r0"]);
    c.wait_for(0, "PostgreSQL running", 60, running);
    psql(
        &c,
        0,
        "create table t (id bigint primary key, at timestamptz default now())",
    )
    .expect("create table");
    c
}

/// What a crash of the primary node cost.
#[derive(Debug, Clone)]
pub struct CrashReport {
    pub rows_before: u64,
    pub acked: u64,
    /// Acknowledged rows missing on the survivor (must be 0 in protocol C).
    pub rows_lost: u64,
    /// Kill to the first commit acknowledged by the survivor.
    pub rto: Duration,
    pub resynced_bytes: u64,
}

/// Commit rows on `alpha`, SIGKILL its PostgreSQL and tandemd (the node dies), let
/// `beta` take over and commit more, bring `alpha` back to resync. `say` narrates.
pub fn crash_scenario(test: &str, protocol: &str, say: &dyn Fn(&str)) -> CrashReport {
    say(&format!(
        "starting two data nodes and a witness (protocol {protocol}), PostgreSQL on alpha"
    ));
    let mut c = pg_serving(test, protocol, 128 << 20);
    let w = RowWriter::start(&c);
    w.wait_more(100, 30, "before the crash");
    say(&format!(
        "a client in the witness's namespace commits numbered rows: {} so far",
        w.acked()
    ));

    assert_eq!(primaries(&c), vec![0], "/primary before the crash");

    // The whole primary node dies: PostgreSQL and tandemd, SIGKILL.
    let killed_at = Instant::now();
    let pgdata = c.dir.join("mnt-alpha/pgdata");
    let _ = Command::new("pkill")
        .args(["-9", "-f"])
        .arg(pgdata.display().to_string())
        .status();
    c.kill(0);
    let rows_before = w.acked();
    say(&format!(
        "killed every process of alpha (SIGKILL) after row {rows_before}"
    ));
    // Until the survivor has committed 50 more rows, /primary may answer 200 on at most
    // one node (the dead one answers nothing); once it has, on exactly one: beta.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut samples = 0u32;
    while w.acked() < rows_before + 50 {
        assert!(
            Instant::now() < deadline,
            "after the crash, on the survivor: no commits for 60 s"
        );
        let serving = primaries(&c);
        assert!(serving.len() <= 1, "/primary 200 on {serving:?} at once");
        samples += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(primaries(&c), vec![1], "/primary after the failover");
    say(&format!(
        "/primary answered 200 on at most one node in {samples} samples during the failover, on beta after it"
    ));
    let rto = w.first_ack_after(killed_at, 1).unwrap_or_default();
    let s = c.wait_for(1, "PostgreSQL running on the survivor", 10, running);
    assert_eq!(s["role"], "primary");
    say(&format!(
        "beta took over (term {}), recovered PostgreSQL and committed again {} ms after the kill",
        s["term"],
        rto.as_millis()
    ));
    let (acked, _) = w.finish();
    let (count, max) = rows(&c, 1);
    assert_eq!(count, max, "a gap in the rows on the survivor");
    let rows_lost = acked.saturating_sub(max);
    say(&format!(
        "{acked} rows acknowledged, {max} on beta: {rows_lost} acknowledged rows lost"
    ));
    pg_amcheck(&c, 1);
    say("pg_amcheck on beta: clean");

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
    assert_eq!(primaries(&c), vec![1], "/primary after the rejoin");
    assert_eq!(c.http_get(0, HTTP_PORT, "/replica"), Some(200));
    let resynced_bytes = c.status(0)["resync"]["total_bytes"].as_u64().unwrap_or(0);
    say(&format!(
        "alpha came back as secondary and resynced {resynced_bytes} bytes from beta; the pair is in sync"
    ));
    CrashReport {
        rows_before,
        acked,
        rows_lost,
        rto,
        resynced_bytes,
    }
}
