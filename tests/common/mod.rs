//! End-to-end harness: a Tandem cluster of real `tandemd` processes, each data node in its
//! own network namespace, joined by a bridge that lives in a namespace of its own.
//!
//! Traffic stays inside: nodes get addresses on a private /24 that the root namespace has
//! only a blackhole route for, and every network client the tests run enters a node's
//! namespace first ([`in_netns`]). Everything a cluster makes (processes, namespaces,
//! mounts, loop devices, files) is removed when it drops, also when the test fails; the
//! logs of a failed test are printed first.
#![allow(dead_code)]

pub mod pg;
pub mod writer;

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const TANDEMD: &str = env!("CARGO_BIN_EXE_tandemd");
pub const TANDEMCTL: &str = env!("CARGO_BIN_EXE_tandemctl");
pub const WITNESS: &str = env!("CARGO_BIN_EXE_tandem-witness");
pub const SECRET: &str = "e2e-test-secret-0123456789abcdef";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A number from the environment, or `default` (benchmark knobs).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Run a command to completion; panics with its output when it fails.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Run `f` on a thread that has entered network namespace `ns`: how the tests talk to a
/// node's address without touching the root namespace.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

pub struct Node {
    pub name: String,
    pub ns: String,
    pub addr: String,
    pub disk: PathBuf,
    pub run_dir: PathBuf,
    pub socket: PathBuf,
    pub device: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
}

pub struct Opts {
    pub protocol: &'static str,
    pub disk_bytes: [u64; 2],
    /// Extra lines for the resource section.
    pub extra: &'static str,
    /// Put beta's backing disk in this directory instead (e.g. /dev/shm, to take the
    /// secondary's disk out of a measurement).
    pub beta_disk_dir: Option<PathBuf>,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            protocol: "C",
            disk_bytes: [128 << 20, 128 << 20],
            extra: "",
            beta_disk_dir: None,
        }
    }
}

/// Poll `ok` until it holds; panics naming `what` after `secs`.
pub fn wait_until(secs: u64, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "no {what} within {secs} s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct Cluster {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub resource: String,
    pub nodes: Vec<Node>,
    bridge_ns: String,
    subnet: String,
    mounts: Vec<PathBuf>,
    id: String,
    /// The witness host, once added: namespace, address, and its process.
    pub witness_ns: Option<String>,
    pub witness_addr: String,
    pub witness_child: Option<Child>,
    /// Command-line patterns of processes services started (a database), killed first
    /// when the cluster drops.
    kill_patterns: Vec<String>,
    /// Environment for the daemons started from now on.
    pub daemon_env: Vec<(String, String)>,
}

impl Cluster {
    /// Two data nodes `alpha` and `beta`, disks and config written, daemons not started.
    pub fn new(test: &str, o: Opts) -> Cluster {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("t{}{}", std::process::id() % 100000, n);
        let base = std::env::var("TANDEM_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into());
        let dir = PathBuf::from(base).join(format!("tandem-e2e-{test}-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        // The blackhole route doubles as a lock on the subnet among concurrent tests.
        let mut k = (std::process::id() * 7 + n * 13) % 200;
        let subnet = loop {
            let s = format!("10.213.{}", k + 20);
            if quiet(Command::new("ip").args(["route", "add", "blackhole", &format!("{s}.0/24")])) {
                break s;
            }
            k = (k + 1) % 200;
        };
        let mut c = Cluster {
            config: dir.join("tandem.toml"),
            dir: dir.clone(),
            resource: "r0".into(),
            nodes: Vec::new(),
            bridge_ns: format!("{id}br"),
            subnet: subnet.clone(),
            mounts: Vec::new(),
            id: id.clone(),
            witness_ns: None,
            witness_addr: format!("{subnet}.3:7790"),
            witness_child: None,
            kill_patterns: Vec::new(),
            daemon_env: Vec::new(),
        };
        sh(Command::new("ip").args(["netns", "add", &c.bridge_ns]));
        sh(Command::new("ip").args(["-n", &c.bridge_ns, "link", "add", "br0", "type", "bridge"]));
        sh(Command::new("ip").args(["-n", &c.bridge_ns, "link", "set", "br0", "up"]));
        for (i, name) in ["alpha", "beta"].iter().enumerate() {
            let ns = format!("{id}{}", &name[..1]);
            let addr = format!("{subnet}.{}", i + 1);
            c.add_host(&ns, &addr, i);
            let node_dir = dir.join(name);
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let disk = match (&o.beta_disk_dir, i) {
                (Some(d), 1) => d.join(format!("tandem-{id}-beta.img")),
                _ => node_dir.join("disk.img"),
            };
            let f = std::fs::File::create(&disk).expect("disk");
            f.set_len(o.disk_bytes[i]).expect("disk size");
            c.nodes.push(Node {
                name: name.to_string(),
                ns,
                addr: format!("{addr}:7789"),
                disk,
                run_dir: node_dir.join("run"),
                socket: node_dir.join("run/tandemd.sock"),
                device: node_dir.join("dev/r0"),
                log: node_dir.join("tandemd.log"),
                child: None,
            });
        }
        std::fs::write(dir.join("secret"), SECRET).expect("secret");
        std::fs::set_permissions(
            dir.join("secret"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("secret mode");
        c.write_config(
            o.protocol,
            o.extra,
            dir.join("secret").to_str().unwrap_or(""),
        );
        c
    }

    fn add_host(&self, ns: &str, addr: &str, i: usize) {
        sh(Command::new("ip").args(["netns", "add", ns]));
        let v = format!("v{i}");
        sh(Command::new("ip").args([
            "-n",
            &self.bridge_ns,
            "link",
            "add",
            &v,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        ]));
        sh(Command::new("ip").args([
            "-n",
            &self.bridge_ns,
            "link",
            "set",
            &v,
            "master",
            "br0",
            "up",
        ]));
        sh(Command::new("ip").args([
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]));
        sh(Command::new("ip").args(["-n", ns, "link", "set", "eth0", "up"]));
        sh(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]));
    }

    pub fn write_config(&self, protocol: &str, extra: &str, secret: &str) {
        let mut t = format!(
            "[global]\nsecret-file = \"{secret}\"\nrun-dir = \"{}\"\n\n[resource.r0]\nprotocol = \"{protocol}\"\nping-interval-ms = 500\nping-timeout-ms = 2000\n{extra}\n",
            self.dir.join("run").display()
        );
        for n in &self.nodes {
            t += &format!(
                "\n[[resource.r0.node]]\nname = \"{}\"\naddress = \"{}\"\ndisk = \"{}\"\ndevice = \"{}\"\n",
                n.name,
                n.addr,
                n.disk.display(),
                n.device.display()
            );
        }
        std::fs::write(&self.config, t).expect("config");
    }

    pub fn ctl_output(&self, i: usize, args: &[&str]) -> Output {
        Command::new(TANDEMCTL)
            .arg("--config")
            .arg(&self.config)
            .arg("--node")
            .arg(&self.nodes[i].name)
            .arg("--socket")
            .arg(&self.nodes[i].socket)
            .args(args)
            .output()
            .expect("run tandemctl")
    }

    /// tandemctl on node `i`; panics unless it succeeds.
    pub fn ctl(&self, i: usize, args: &[&str]) -> String {
        let out = self.ctl_output(i, args);
        assert!(
            out.status.success(),
            "tandemctl {args:?} on {} failed: {}",
            self.nodes[i].name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// tandemctl on node `i` that must fail; returns its stderr.
    pub fn ctl_fails(&self, i: usize, args: &[&str]) -> String {
        let out = self.ctl_output(i, args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "tandemctl {args:?} on {} should fail with 1: {}{}",
            self.nodes[i].name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).to_string()
    }

    pub fn create_md(&self, i: usize, extra: &[&str]) {
        let mut a = vec!["create-md", "r0"];
        a.extend_from_slice(extra);
        self.ctl(i, &a);
    }

    /// Start node `i`'s daemon in its namespace and wait until its control socket answers.
    pub fn start(&mut self, i: usize) {
        self.start_with(i, &[]);
    }

    /// `tandemd` for node `i`, inside its network namespace (the mount namespace stays
    /// shared, so FUSE and loop devices are visible to the test).
    pub fn daemon_cmd(&self, i: usize) -> Command {
        let n = &self.nodes[i];
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", n.ns))
            .arg("--")
            .arg(TANDEMD)
            .arg("--config")
            .arg(&self.config)
            .arg("--node")
            .arg(&n.name)
            .arg("--run-dir")
            .arg(&n.run_dir)
            .envs(self.daemon_env.iter().map(|(k, v)| (k, v)));
        c
    }

    pub fn start_with(&mut self, i: usize, extra: &[&str]) {
        let n = &self.nodes[i];
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .expect("log");
        let child = self
            .daemon_cmd(i)
            .args(extra)
            .env("TANDEM_LOG", "info,tandem=debug")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn tandemd");
        self.nodes[i].child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.ctl_output(i, &["status", "--json"]).status.success() {
                return;
            }
            if let Some(c) = self.nodes[i].child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("tandemd on {} exited at start: {st}", self.nodes[i].name);
                }
            }
            assert!(
                Instant::now() < deadline,
                "tandemd on node {i} did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start a daemon that must refuse to start; returns what it printed.
    pub fn start_fails(&self, i: usize) -> String {
        let out = self.daemon_cmd(i).output().expect("run tandemd");
        assert_eq!(out.status.code(), Some(1), "tandemd should refuse to start");
        String::from_utf8_lossy(&out.stderr).to_string()
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Poll node `i`'s log until it holds `line`; panics after `secs`.
    pub fn wait_log(&self, i: usize, line: &str, secs: u64) {
        let what = format!("log line {line:?} on {}", self.nodes[i].name);
        wait_until(secs, &what, || {
            std::fs::read_to_string(&self.nodes[i].log)
                .unwrap_or_default()
                .contains(line)
        });
    }

    /// Wait up to `secs` for node `i`'s daemon to exit by itself.
    pub fn wait_exit(&mut self, i: usize, secs: u64) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let c = self.nodes[i].child.as_mut().expect("tandemd not started");
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                self.nodes[i].child = None;
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "tandemd on node {i} still runs after {secs} s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Ok(Some(st)) = c.try_wait() {
                    assert!(st.success(), "tandemd on node {i} exited with {st}");
                    return;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("tandemd on node {i} did not stop on SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn status(&self, i: usize) -> serde_json::Value {
        let out = self.ctl(i, &["status", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("status json");
        v["resources"][0].clone()
    }

    /// Poll node `i`'s status until `pred` holds; panics with the last status at the
    /// deadline.
    pub fn wait_for(
        &self,
        i: usize,
        what: &str,
        secs: u64,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let out = self.ctl_output(i, &["status", "--json"]);
            let s = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .map(|v| v["resources"][0].clone())
                .unwrap_or_default();
            if out.status.success() && pred(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "node {} never reached {what} within {secs} s; last status: {s:#}",
                    self.nodes[i].name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Both nodes connected, in sync, nothing in flight.
    pub fn wait_in_sync(&self, secs: u64) {
        for i in 0..2 {
            self.wait_for(i, "established and up to date", secs, |s| {
                s["replication"] == "established"
                    && s["disk"] == "uptodate"
                    && s["peer"]["disk"] == "uptodate"
                    && s["out_of_sync_bytes"] == 0
                    && s["writes_in_flight"] == 0
            });
        }
    }

    /// Fresh metadata on both, daemons up, `primary` promoted and the pair in sync.
    pub fn up(&mut self, primary: usize, assume_clean: bool) {
        self.up_with(primary, assume_clean, &[]);
    }

    /// [`Cluster::up`] with extra `tandemd` flags.
    pub fn up_with(&mut self, primary: usize, assume_clean: bool, daemon_args: &[&str]) {
        let extra: &[&str] = if assume_clean {
            &["--assume-clean"]
        } else {
            &[]
        };
        self.create_md(0, extra);
        self.create_md(1, extra);
        self.start_with(0, daemon_args);
        self.start_with(1, daemon_args);
        for i in 0..2 {
            self.wait_for(i, "connected", 15, |s| s["connection"] == "connected");
        }
        if assume_clean {
            self.ctl(primary, &["promote", "r0"]);
        } else {
            // Both disks are inconsistent: promotion needs --force, and says why.
            let e = self.ctl_fails(primary, &["promote", "r0"]);
            assert!(e.contains("not UpToDate") && e.contains("--force"), "{e}");
            self.ctl(primary, &["promote", "r0", "--force"]);
        }
        self.wait_in_sync(60);
    }

    /// ext4 on node `i`'s device, its inode tables and journal zeroed now rather than by
    /// a background thread after the first mount (whose writes would land in the middle
    /// of a test or a benchmark).
    pub fn mkfs(&self, i: usize) {
        sh(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&self.nodes[i].device));
    }

    pub fn mount(&mut self, i: usize) -> PathBuf {
        let m = self.dir.join(format!("mnt-{}", self.nodes[i].name));
        std::fs::create_dir_all(&m).expect("mountpoint");
        sh(Command::new("mount").arg(&self.nodes[i].device).arg(&m));
        self.mounts.push(m.clone());
        m
    }

    /// Add tables at the end of the config (services after the node tables).
    pub fn append_config(&self, text: &str) {
        let cfg = std::fs::read_to_string(&self.config).expect("config");
        std::fs::write(&self.config, cfg + text).expect("config");
    }

    /// Add lines to the config's `[global]` table.
    pub fn add_global(&self, lines: &str) {
        let cfg = std::fs::read_to_string(&self.config).expect("config");
        std::fs::write(
            &self.config,
            cfg.replacen("[global]\n", &format!("[global]\n{lines}\n"), 1),
        )
        .expect("config");
    }

    /// `GET path` on node `i`'s health endpoint at `port`, from inside its namespace:
    /// the status code, or `None` when nothing answers.
    pub fn http_get(&self, i: usize, port: u16, path: &str) -> Option<u16> {
        let ip = self.nodes[i].addr.split(':').next().unwrap_or_default();
        let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {ip}\r\n\r\n");
        in_netns(&self.nodes[i].ns, move || {
            use std::io::Read;
            let mut s =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
            s.write_all(req.as_bytes()).ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            out.split_whitespace().nth(1)?.parse().ok()
        })
    }

    /// SIGKILL processes whose command line contains `pattern` when the cluster drops:
    /// what services started outside the daemons' own process tree.
    pub fn kill_on_drop(&mut self, pattern: String) {
        self.kill_patterns.push(pattern);
    }

    /// Unmount `m` when the cluster drops, if something (a service) mounted it.
    pub fn track_mount(&mut self, m: PathBuf) {
        self.mounts.push(m);
    }

    pub fn umount(&mut self, m: &Path) {
        sh(Command::new("umount").arg(m));
        self.mounts.retain(|x| x != m);
    }

    /// Bytes of the data area (the disk minus the metadata at its end).
    pub fn data_bytes(&self, i: usize) -> u64 {
        let out = self.ctl(i, &["show-md", "r0"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("show-md json");
        v["data_bytes"].as_u64().expect("data_bytes")
    }

    /// Both backing disks hold the same bytes outside the metadata area.
    pub fn assert_disks_identical(&self) {
        let n = self.data_bytes(0);
        assert_eq!(n, self.data_bytes(1), "data areas differ in size");
        let a = std::fs::File::open(&self.nodes[0].disk).expect("disk a");
        let b = std::fs::File::open(&self.nodes[1].disk).expect("disk b");
        let chunk = 1 << 20;
        let (mut ba, mut bb) = (vec![0u8; chunk], vec![0u8; chunk]);
        let mut off = 0u64;
        while off < n {
            let len = chunk.min((n - off) as usize);
            a.read_exact_at(&mut ba[..len], off).expect("read a");
            b.read_exact_at(&mut bb[..len], off).expect("read b");
            if ba[..len] != bb[..len] {
                let at = (0..len).find(|&j| ba[j] != bb[j]).unwrap_or(0) as u64 + off;
                panic!("backing disks differ at byte {at} (block {})", at / 4096);
            }
            off += len as u64;
        }
    }

    /// Move the bridge port of node `i` down (a cable pull) or up.
    pub fn link(&self, i: usize, up: bool) {
        sh(Command::new("ip").args([
            "-n",
            &self.bridge_ns,
            "link",
            "set",
            &format!("v{i}"),
            if up { "up" } else { "down" },
        ]));
    }

    /// Cut (or restore) the link between the two data nodes only: each gets a blackhole
    /// route to the other, and both still reach the witness.
    pub fn cut_pair(&self, cut: bool) {
        for (i, j) in [(0, 1), (1, 0)] {
            let peer_ip = self.nodes[j].addr.split(':').next().unwrap_or_default();
            sh(Command::new("ip").args([
                "-n",
                &self.nodes[i].ns,
                "route",
                if cut { "add" } else { "del" },
                "blackhole",
                &format!("{peer_ip}/32"),
            ]));
        }
    }

    /// Send `sig` to node `i`'s daemon (SIGSTOP / SIGCONT: a frozen process).
    pub fn signal(&self, i: usize, sig: nix::sys::signal::Signal) {
        let c = self.nodes[i].child.as_ref().expect("daemon running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig)
            .unwrap_or_else(|e| panic!("kill {sig} node {i}: {e}"));
    }

    /// Add and start a witness with a `lease_ms` lease and point resource `r0` at it
    /// (`extra` goes into the resource section too).
    pub fn with_witness(&mut self, protocol: &str, lease_ms: u64, extra: &str) {
        self.add_witness(lease_ms);
        self.write_config(
            protocol,
            &format!(
                "witness = \"{}\"\nlease-ms = {lease_ms}\n{extra}",
                self.witness_addr
            ),
            self.dir.join("secret").to_str().unwrap_or(""),
        );
        self.start_witness();
    }

    /// A third host for the witness, with its config written (`lease_ms` lease).
    pub fn add_witness(&mut self, lease_ms: u64) {
        let ns = format!("{}w", self.id);
        let addr = format!("{}.3", self.subnet);
        self.add_host(&ns, &addr, 2);
        self.witness_ns = Some(ns);
        std::fs::create_dir_all(self.dir.join("witness")).expect("witness dir");
        std::fs::write(
            self.dir.join("witness/witness.toml"),
            format!(
                "listen = \"{}\"\nstate-dir = \"{}\"\nsecret-file = \"{}\"\nlease-ms = {lease_ms}\n",
                self.witness_addr,
                self.dir.join("witness/state").display(),
                self.dir.join("secret").display()
            ),
        )
        .expect("witness config");
    }

    pub fn witness_cmd(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!(
            "--net=/run/netns/{}",
            self.witness_ns.as_deref().unwrap_or("")
        ))
        .arg("--")
        .arg(WITNESS)
        .arg("--config")
        .arg(self.dir.join("witness/witness.toml"));
        c
    }

    pub fn witness_state_file(&self) -> PathBuf {
        self.dir.join("witness/state/state")
    }

    pub fn start_witness(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("witness/witness.log"))
            .expect("log");
        let child = self
            .witness_cmd()
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn witness");
        self.witness_child = Some(child);
        // Ready once its port answers, asked from inside a node's namespace.
        let addr: std::net::SocketAddr = self.witness_addr.parse().expect("addr");
        let ns = self.nodes[0].ns.clone();
        let up = in_netns(&ns, move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        });
        assert!(up, "witness did not come up");
    }

    /// Start a witness that must refuse to start; returns its stderr.
    pub fn witness_start_fails(&self) -> String {
        let out = self.witness_cmd().output().expect("run witness");
        assert_eq!(
            out.status.code(),
            Some(1),
            "the witness should refuse to start"
        );
        String::from_utf8_lossy(&out.stderr).to_string()
    }

    pub fn stop_witness(&mut self) {
        if let Some(mut c) = self.witness_child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn tail_logs(&self) {
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("----- {} log (last 60 lines) -----", n.name);
            for l in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{l}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.tail_logs();
        }
        for p in &self.kill_patterns {
            let _ = quiet(Command::new("pkill").args(["-9", "-f", p]));
        }
        if !self.kill_patterns.is_empty() {
            // Their children exit once they see the parent gone.
            std::thread::sleep(Duration::from_millis(300));
        }
        for m in self.mounts.clone() {
            if !quiet(Command::new("umount").arg(&m)) {
                let _ = quiet(Command::new("umount").arg("-l").arg(&m));
            }
            // A mount point the test made outside its directory (an empty directory
            // once unmounted; `remove_dir` removes nothing else).
            let _ = std::fs::remove_dir(&m);
        }
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        // Loop devices on the nodes' FUSE files, then the FUSE mounts themselves.
        for n in &self.nodes {
            let file = n.run_dir.join("fuse-r0/data");
            for dev in tandem::shell::fuse_loop::loops_backed_by(&file) {
                let _ = quiet(Command::new("losetup").arg("-d").arg(&dev));
            }
            let _ =
                nix::mount::umount2(&n.run_dir.join("fuse-r0"), nix::mount::MntFlags::MNT_DETACH);
        }
        self.stop_witness();
        if let Some(ns) = &self.witness_ns {
            let _ = quiet(Command::new("ip").args(["netns", "del", ns]));
        }
        for n in &self.nodes {
            let _ = quiet(Command::new("ip").args(["netns", "del", &n.ns]));
        }
        let _ = quiet(Command::new("ip").args(["netns", "del", &self.bridge_ns]));
        let _ = quiet(Command::new("ip").args([
            "route",
            "del",
            "blackhole",
            &format!("{}.0/24", self.subnet),
        ]));
        if !std::thread::panicking() || std::env::var_os("TANDEM_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
            for n in &self.nodes {
                if !n.disk.starts_with(&self.dir) {
                    let _ = std::fs::remove_file(&n.disk);
                }
            }
        }
    }
}

/// Write 4 KiB blocks of recognisable data straight to a block device.
pub struct DirectWriter {
    f: std::fs::File,
    buf: tandem::shell::disk::AlignedBuf,
}

impl DirectWriter {
    pub fn open(dev: &Path) -> std::io::Result<DirectWriter> {
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(dev)?;
        Ok(DirectWriter {
            f,
            buf: tandem::shell::disk::AlignedBuf::zeroed(4096),
        })
    }

    pub fn write_block(&mut self, block: u64, stamp: u64) -> std::io::Result<()> {
        let b = self.buf.as_mut_slice();
        for (j, chunk) in b.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&(stamp ^ (block << 20) ^ j as u64).to_le_bytes());
        }
        self.f.write_all_at(self.buf.as_slice(), block * 4096)
    }

    pub fn sync(&mut self) -> std::io::Result<()> {
        self.f.flush()?;
        self.f.sync_data()
    }
}
