//! `tandemd`: the daemon on each data node. Serves every resource of the config that
//! names this node: the replicated device, the peer connections, the control socket.
//!
//! Exit codes: 0 after a clean stop (SIGTERM, SIGINT), 1 when it cannot start (the
//! reason is one line on stderr and in the log), 2 usage.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::oneshot;

use tandem::config::Config;
use tandem::core::resource::{AdminCmd, Params, Resource};
use tandem::shell::control::{self, Reply, Request};
use tandem::shell::driver::{self, Event, Handle, PeerSetup, Setup};
use tandem::shell::{md, net, process};

#[derive(Parser)]
#[command(name = "tandemd", about = "Tandem replication daemon")]
struct Cli {
    #[arg(long, default_value = "/etc/tandem/tandem.toml")]
    config: PathBuf,
    /// This node's name in the config (default: the hostname).
    #[arg(long)]
    node: Option<String>,
    /// Overrides the config's run-dir (control socket, FUSE mounts).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Control socket path (default: RUN_DIR/tandemd.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Use pread/pwrite instead of io_uring on the backing disks.
    #[arg(long)]
    no_uring: bool,
}

/// How long SIGTERM waits for the resources to stop.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

struct Daemon {
    resources: BTreeMap<String, Handle>,
    /// Each resource's peer node.
    peers: BTreeMap<String, String>,
    /// SIGTERM or SIGINT arrived.
    stopping: std::sync::atomic::AtomicBool,
}

fn main() -> ExitCode {
    let cli = match process::parse_args::<Cli>() {
        Ok(c) => c,
        Err(code) => return code,
    };
    process::init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return process::finish(
                "tandemd",
                Err(anyhow!("cannot start the runtime: {e}")),
                true,
            )
        }
    };
    process::finish("tandemd", rt.block_on(run(cli)), true)
}

/// A daemon that serves a block device must not wait on memory reclaim that waits on that
/// device: mark it an I/O flusher (its allocations avoid recursing into I/O) and lock its
/// pages in memory. Both are best effort, and logged when refused.
fn avoid_reclaim_deadlocks() {
    const PR_SET_IO_FLUSHER: nix::libc::c_int = 57;
    // SAFETY: prctl with integer arguments only; no pointers are passed.
    let r = unsafe { nix::libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if r != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "PR_SET_IO_FLUSHER refused");
    }
    use nix::sys::mman::{mlockall, MlockAllFlags};
    if let Err(e) = mlockall(MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE) {
        tracing::warn!(error = %e, "mlockall refused; the daemon's memory may be paged out");
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = Config::load(&cli.config)?;
    let node = cli.node.clone().unwrap_or_else(hostname);
    cfg.check_node(&node)?;
    let secret = Arc::new(net::read_secret(&cfg.secret_file).map_err(|e| anyhow!(e))?);
    let run_dir = std::path::absolute(cli.run_dir.clone().unwrap_or_else(|| cfg.run_dir.clone()))
        .context("run dir")?;
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("create run dir {}", run_dir.display()))?;
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod {}", run_dir.display()))?;
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| run_dir.join("tandemd.sock"));

    // Bind everything before starting any resource, so that a busy port or socket fails
    // the start cleanly.
    let mut by_addr: BTreeMap<std::net::SocketAddr, Vec<String>> = BTreeMap::new();
    for r in &cfg.resources {
        if let Some((local, _)) = r.local_and_peer(&node) {
            by_addr
                .entry(local.address)
                .or_default()
                .push(r.name.clone());
        }
    }
    let mut listeners = Vec::new();
    for addr in by_addr.keys() {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen on {addr}"))?;
        listeners.push(l);
    }
    let control = bind_control(&socket)?;

    let mut daemon = Daemon {
        resources: BTreeMap::new(),
        peers: BTreeMap::new(),
        stopping: std::sync::atomic::AtomicBool::new(false),
    };
    for (i, r) in cfg.resources.iter().enumerate() {
        let Some((local, peer)) = r.local_and_peer(&node) else {
            continue;
        };
        let md = md::read_metadata(&local.disk)
            .with_context(|| format!("resource {}: refusing to start", r.name))?;
        if md.sb.resource != r.name || md.sb.node != node {
            bail!(
                "resource {}: {} holds metadata of resource {:?} node {:?}; run `tandemctl create-md {}` for this node",
                r.name,
                local.disk.display(),
                md.sb.resource,
                md.sb.node,
                r.name
            );
        }
        let params = Params {
            resource: r.name.clone(),
            local_node: node.clone(),
            peer_node: peer.name.clone(),
            protocol: r.protocol,
            ping_interval_ms: r.ping_interval_ms,
            ping_timeout_ms: r.ping_timeout_ms,
            resync_window_bytes: r.resync_window_bytes,
            resync_chunk_bytes: 256 << 10,
            witness: r.witness.is_some(),
            lease_ms: r.lease_ms,
            promote_margin_ms: r.promote_margin_ms,
            on_no_quorum: r.on_no_quorum,
            fencing: r.fencing,
            auto_promote: r.auto_promote,
            fence_peer_timeout_ms: r.fence_peer_timeout_ms,
            fail_back_to_peer: r.fail_back && r.preferred_node.as_ref() == Some(&peer.name),
            fail_back_delay_ms: r.fail_back_delay_ms,
            // Above every number an earlier run of this daemon used.
            witness_seq_base: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(1),
            seed: u64::from_le_bytes(
                net::random_nonce()?[..8]
                    .try_into()
                    .map_err(|_| anyhow!("nonce"))?,
            ) ^ i as u64,
        };
        let core = Resource::new(params, md, tandem::core::Instant(0));
        let h = driver::start(Setup {
            core,
            services: r.services.clone(),
            on_demote_failure: r.on_demote_failure,
            disk_path: local.disk.clone(),
            peer: PeerSetup {
                local_node: node.clone(),
                peer_node: peer.name.clone(),
                peer_addr: peer.address,
                secret: secret.clone(),
                witness_addr: r.witness,
                fence_peer: r.fence_peer.clone(),
            },
            link: local.device.clone(),
            mountpoint: run_dir.join(format!("fuse-{}", r.name)),
            want_uring: !cli.no_uring,
        })
        .with_context(|| format!("resource {}", r.name))?;
        daemon.resources.insert(r.name.clone(), h);
        daemon.peers.insert(r.name.clone(), peer.name.clone());
    }
    let daemon = Arc::new(daemon);
    avoid_reclaim_deadlocks();

    for l in listeners {
        tokio::spawn(accept_loop(l, secret.clone(), daemon.clone()));
    }
    tokio::spawn(control_loop(control, daemon.clone()));
    if let Some(addr) = cfg.http_listen {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("http-listen {addr}"))?;
        tracing::info!(%addr, "health and metrics endpoint");
        tokio::spawn(http_loop(l, daemon.clone()));
    }
    // Opened last: from here on a hang resets the node.
    let watchdog = match &cfg.watchdog {
        Some(path) => {
            let wd = tandem::shell::watchdog::Watchdog::open(path, cfg.watchdog_timeout_s)
                .with_context(|| format!("watchdog {}", path.display()))?;
            let (stop_tx, stop_rx) = oneshot::channel();
            let task = tokio::spawn(watchdog_loop(
                wd,
                daemon.clone(),
                cfg.watchdog_timeout_s,
                stop_rx,
            ));
            Some((stop_tx, task))
        }
        None => None,
    };
    tracing::info!(node = %node, socket = %socket.display(), resources = daemon.resources.len(), "tandemd ready");
    process::sd_notify("READY=1");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping");
    process::sd_notify("STOPPING=1");
    daemon
        .stopping
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let mut waits = Vec::new();
    // Each resource gives up on I/O still in flight a second before the daemon stops
    // waiting for it, so that it still lets its device go.
    let give_up_at = std::time::Instant::now() + STOP_WAIT - std::time::Duration::from_secs(1);
    for h in daemon.resources.values() {
        let (tx, rx) = oneshot::channel();
        if h.tx.send(Event::Shutdown {
            reply: tx,
            give_up_at,
        }) {
            waits.push(rx);
        }
    }
    let all = async {
        for w in waits {
            let _ = w.await;
        }
    };
    if tokio::time::timeout(STOP_WAIT, all).await.is_err() {
        tracing::warn!("resources did not stop within {STOP_WAIT:?}");
    }
    if let Some((stop, task)) = watchdog {
        let _ = stop.send(());
        let _ = task.await;
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// Pet the watchdog every quarter of its timeout while every resource thread answers
/// a status request within that time; on `stop`, disarm it. Once stopping, resource
/// threads finish one by one: the watchdog keeps being petted until `stop`.
async fn watchdog_loop(
    mut wd: tandem::shell::watchdog::Watchdog,
    daemon: Arc<Daemon>,
    timeout_s: u32,
    mut stop: oneshot::Receiver<()>,
) {
    let period = std::time::Duration::from_millis(u64::from(timeout_s) * 250);
    let mut healthy_was = true;
    let mut stopping = false;
    loop {
        let healthy = stopping || resources_answer(&daemon, period).await;
        if healthy {
            if let Err(e) = wd.pet() {
                tracing::error!(error = %e, "cannot pet the watchdog");
            }
            if !healthy_was {
                tracing::info!("every resource answers again; petting the watchdog");
            }
        } else if healthy_was {
            tracing::error!(
                timeout_s,
                "a resource thread does not answer: no longer petting the watchdog, the node resets unless it recovers"
            );
        }
        healthy_was = healthy;
        tokio::select! {
            _ = &mut stop => {
                wd.disarm();
                return;
            }
            _ = tokio::time::sleep(period) => {}
        }
        // SIGTERM arrived: the resources are being stopped on purpose.
        stopping = stopping || daemon.stopping.load(std::sync::atomic::Ordering::Relaxed);
    }
}

/// Serve `/primary`, `/replica`, `/health` and `/metrics` (`shell::http`), one request
/// per connection.
async fn http_loop(l: TcpListener, daemon: Arc<Daemon>) {
    use tandem::shell::http;
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            let read = async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match tokio::io::AsyncReadExt::read(&mut s, &mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
            };
            if tokio::time::timeout(std::time::Duration::from_secs(5), read)
                .await
                .is_err()
            {
                return;
            }
            let head = String::from_utf8_lossy(&head);
            let resp = match http::request_path(&head) {
                None => http::Response {
                    code: 400,
                    content_type: "text/plain; charset=utf-8",
                    body: "bad request: GET a path over HTTP/1.x\n".into(),
                },
                Some(path) => {
                    let mut statuses = Vec::new();
                    for h in daemon.resources.values() {
                        let (tx, rx) = oneshot::channel();
                        if h.tx.send(Event::Status { reply: tx }) {
                            if let Ok(Ok(v)) =
                                tokio::time::timeout(std::time::Duration::from_secs(2), rx).await
                            {
                                statuses.push(v);
                            }
                        }
                    }
                    if statuses.len() < daemon.resources.len() {
                        http::Response {
                            code: 503,
                            content_type: "text/plain; charset=utf-8",
                            body: "a resource does not answer\n".into(),
                        }
                    } else {
                        http::respond(path, &statuses)
                    }
                }
            };
            let out = format!(
                "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                resp.code,
                http::reason(resp.code),
                resp.content_type,
                resp.body.len(),
                resp.body
            );
            let _ = s.write_all(out.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

/// Every resource's thread answered a status request within `within`.
async fn resources_answer(daemon: &Daemon, within: std::time::Duration) -> bool {
    for h in daemon.resources.values() {
        let (tx, rx) = oneshot::channel();
        if !h.tx.send(Event::Status { reply: tx }) {
            return false;
        }
        if !matches!(tokio::time::timeout(within, rx).await, Ok(Ok(_))) {
            return false;
        }
    }
    true
}

async fn accept_loop(l: TcpListener, secret: Arc<Vec<u8>>, daemon: Arc<Daemon>) {
    let admission = net::Admission::new(net::MAX_HANDSHAKES);
    loop {
        let (s, from) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = admission.admit(from) else {
            continue;
        };
        let secret = secret.clone();
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let accepted = net::accept(s, &secret).await;
            drop(slot);
            match accepted {
                Ok((stream, a)) => match daemon.resources.get(&a.resource) {
                    Some(h) => {
                        let _ = h.tx.send(Event::Accepted {
                            node: a.node,
                            channel: a.channel,
                            stream,
                        });
                    }
                    None => {
                        tracing::warn!(%from, resource = %a.resource, "connection for a resource this node does not serve refused")
                    }
                },
                Err(e) => tracing::warn!(%from, error = %e, "peer connection refused"),
            }
        });
    }
}

fn bind_control(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!(
            "{}: another tandemd is already listening there",
            path.display()
        );
    }
    let _ = std::fs::remove_file(path);
    // Created 0600 from the start: no window in which another user could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let l = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    l.with_context(|| format!("control socket {}", path.display()))
}

async fn control_loop(l: UnixListener, daemon: Arc<Daemon>) {
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                tokio::spawn(serve_control(s, daemon.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control accept");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn write_line(w: &mut tokio::net::unix::OwnedWriteHalf, v: &str) -> std::io::Result<()> {
    w.write_all(v.as_bytes()).await?;
    w.write_all(b"\n").await
}

fn to_line(r: &Reply) -> String {
    serde_json::to_string(r).unwrap_or_else(|_| r#"{"ok":false,"error":"encode"}"#.into())
}

async fn serve_control(mut s: UnixStream, daemon: Arc<Daemon>) {
    match s.peer_cred() {
        Ok(c) if c.uid() == 0 => {}
        Ok(c) => {
            tracing::warn!(
                uid = c.uid(),
                "control connection from a non-root user refused"
            );
            let why = Reply::err(format!(
                "the control socket is root-only (this client runs as uid {}); run tandemctl as root",
                c.uid()
            ));
            // Its request first (bounded), so the answer does not race its write.
            let mut r = BufReader::new(&mut s);
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                control::read_line(&mut r),
            )
            .await;
            let _ = s.write_all(format!("{}\n", to_line(&why)).as_bytes()).await;
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "control connection without credentials refused");
            return;
        }
    }
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    loop {
        let line = match control::read_line(&mut r).await {
            Ok(control::Line::Text(l)) => l,
            Ok(control::Line::TooLong) => {
                let why = format!(
                    "bad request: a line longer than {} bytes; closing",
                    control::MAX_LINE_BYTES
                );
                let _ = write_line(&mut w, &to_line(&Reply::err(why))).await;
                return;
            }
            Ok(control::Line::Eof) | Err(_) => return,
        };
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                let _ =
                    write_line(&mut w, &to_line(&Reply::err(format!("bad request: {e}")))).await;
                continue;
            }
        };
        let targets: Vec<&Handle> = match req.resource() {
            Some(name) => match daemon.resources.get(name) {
                Some(h) => vec![h],
                None => {
                    let _ = write_line(
                        &mut w,
                        &to_line(&Reply::err(format!("no resource {name:?} on this node"))),
                    )
                    .await;
                    continue;
                }
            },
            None => daemon.resources.values().collect(),
        };
        let reply = match &req {
            Request::Status { .. } => {
                let mut out = Vec::new();
                for h in &targets {
                    let (tx, rx) = oneshot::channel();
                    let _ = h.tx.send(Event::Status { reply: tx });
                    if let Ok(v) = rx.await {
                        out.push(v);
                    }
                }
                Reply {
                    ok: true,
                    status: Some(out),
                    ..Reply::default()
                }
            }
            Request::Events { .. } => {
                let mut subs: Vec<_> = targets.iter().map(|h| h.events.subscribe()).collect();
                // First the current state of each, then every change.
                for h in &targets {
                    let (tx, rx) = oneshot::channel();
                    let _ = h.tx.send(Event::Status { reply: tx });
                    if let Ok(v) = rx.await {
                        let ev =
                            serde_json::json!({"event": "exists", "resource": h.name, "status": v});
                        if write_line(&mut w, &ev.to_string()).await.is_err() {
                            return;
                        }
                    }
                }
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                for mut sub in subs.drain(..) {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        loop {
                            match sub.recv().await {
                                Ok(l) => {
                                    if tx.send(l).is_err() {
                                        return;
                                    }
                                }
                                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                                    let _ = tx.send(
                                        serde_json::json!({"event": "lagged", "missed": n})
                                            .to_string(),
                                    );
                                }
                                Err(_) => return,
                            }
                        }
                    });
                }
                drop(tx);
                while let Some(l) = rx.recv().await {
                    if write_line(&mut w, &l).await.is_err() {
                        return;
                    }
                }
                return;
            }
            Request::Switchover {
                resource,
                to: Some(to),
            } if daemon.peers.get(resource) != Some(to) => Reply::err(format!(
                "{to} is not the peer of this node for {resource} (the peer is {})",
                daemon.peers.get(resource).map_or("unknown", |p| p.as_str())
            )),
            other => {
                let cmd = match other {
                    Request::Switchover { .. } => AdminCmd::Switchover,
                    Request::Promote { force, .. } => AdminCmd::Promote { force: *force },
                    Request::Demote { .. } => AdminCmd::Demote,
                    Request::Connect {
                        discard_my_data, ..
                    } => AdminCmd::Connect {
                        discard_my_data: *discard_my_data,
                    },
                    Request::Disconnect { .. } => AdminCmd::Disconnect,
                    Request::AdoptWitness { force, .. } => AdminCmd::AdoptWitness { force: *force },
                    _ => AdminCmd::Invalidate,
                };
                let (tx, rx) = oneshot::channel();
                let _ = targets[0].tx.send(Event::Admin { cmd, reply: tx });
                rx.await
                    .unwrap_or_else(|_| Reply::err("the resource stopped"))
            }
        };
        if write_line(&mut w, &to_line(&reply)).await.is_err() {
            return;
        }
    }
}
