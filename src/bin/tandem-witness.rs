//! `tandem-witness`: the quorum witness for many resources and many pairs. Keeps per
//! resource the term, the primary and the up-to-date set in one state file, written
//! durably (temp file, fsync, rename, fsync the directory) before any reply that depends
//! on it. The decisions are `tandem::core::witness`; this is its shell.
//!
//! Exit codes: 0 after SIGTERM/SIGINT, 1 when it cannot start (bad config, unreadable or
//! corrupt state, port in use), 2 usage.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context};
use clap::Parser;
use tokio::net::{TcpListener, TcpStream};

use tandem::config::WitnessConfig;
use tandem::core::wire::Msg;
use tandem::core::witness::{self, Witness};
use tandem::core::Instant;
use tandem::shell::{net, process};

#[derive(Parser)]
#[command(name = "tandem-witness", about = "Tandem quorum witness")]
struct Cli {
    #[arg(long, default_value = "/etc/tandem/witness.toml")]
    config: PathBuf,
}

struct Shared {
    core: Witness,
    start: std::time::Instant,
    state_file: PathBuf,
    /// The last refusal logged per (resource, node), its numbers left out: a refusal is
    /// logged when it changes, not every time a node asks again.
    refusals: HashMap<(String, String), String>,
}

impl Shared {
    fn now(&self) -> Instant {
        Instant(self.start.elapsed().as_millis() as u64)
    }
}

fn main() -> ExitCode {
    let cli = match process::parse_args::<Cli>() {
        Ok(c) => c,
        Err(code) => return code,
    };
    process::init_logging();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return process::finish(
                "tandem-witness",
                Err(anyhow!("cannot start the runtime: {e}")),
                true,
            )
        }
    };
    process::finish("tandem-witness", rt.block_on(run(cli)), true)
}

/// Write the state so that after a crash either the old or the new file is there, whole.
fn persist(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// One connection per data node and resource: allow as many as the hard limit permits.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, "cannot raise the open-file limit");
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    raise_fd_limit();
    let cfg = WitnessConfig::load(&cli.config)?;
    let secret = Arc::new(net::read_secret(&cfg.secret_file).map_err(|e| anyhow!(e))?);
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("create state dir {}", cfg.state_dir.display()))?;
    let state_file = cfg.state_dir.join("state");
    let state = match std::fs::read(&state_file) {
        Ok(b) => witness::decode_state(&b).map_err(|e| {
            anyhow!(
                "{}: {e}; refusing to start (restore the file from a backup; deleting it forgets every term and lets a stale node be promoted)",
                state_file.display()
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(file = %state_file.display(), "no state yet; starting empty");
            Default::default()
        }
        Err(e) => return Err(anyhow!("{}: {e}", state_file.display())),
    };
    // A witness that cannot store a grant must not run: find out now, not at the first
    // promotion. Rewriting the state it just read changes nothing.
    persist(&state_file, &witness::encode_state(&state)).map_err(|e| {
        anyhow!(
            "cannot write the state file {}: {e}; refusing to start (the state directory must be writable)",
            state_file.display()
        )
    })?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listen on {}", cfg.listen))?;
    let shared = Arc::new(Mutex::new(Shared {
        core: Witness::new(cfg.lease_ms, Instant(0), state),
        start: std::time::Instant::now(),
        state_file,
        refusals: HashMap::new(),
    }));
    tracing::info!(listen = %cfg.listen, lease_ms = cfg.lease_ms, "tandem-witness ready; granting nothing for one lease period");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    process::sd_notify("READY=1");
    let admission = net::Admission::new(net::MAX_HANDSHAKES);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            r = listener.accept() => match r {
                Ok((s, from)) => {
                    let Some(slot) = admission.admit(from) else {
                        continue;
                    };
                    let (secret, shared) = (secret.clone(), shared.clone());
                    tokio::spawn(async move {
                        if let Err(e) = serve(s, &secret, shared, slot).await {
                            tracing::warn!(%from, error = %e, "witness client dropped");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
        }
    }
    tracing::info!("stopping");
    process::sd_notify("STOPPING=1");
    Ok(())
}

async fn serve(
    s: TcpStream,
    secret: &[u8],
    shared: Arc<Mutex<Shared>>,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> anyhow::Result<()> {
    let accepted = net::accept(s, secret).await;
    // Authenticated (or not): the handshake slot is free for the next one.
    drop(slot);
    let (mut s, a) = accepted?;
    if a.channel != net::WITNESS_CHANNEL {
        return Err(anyhow!(
            "node {:?} attached channel {} here; this is a witness",
            a.node,
            a.channel
        ));
    }
    let node = a.node;
    loop {
        let msg = match net::read_small_frame(&mut s).await {
            Ok(f) => f.msg,
            Err(net::NetError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(())
            }
            Err(e) => return Err(e.into()),
        };
        let Msg::WitnessRequest(req) = msg else {
            return Err(anyhow!("node {node:?} sent a non-witness message"));
        };
        let reply = {
            let mut g = shared.lock().map_err(|_| anyhow!("state lock poisoned"))?;
            let now = g.now();
            let out = g.core.handle(now, &node, &req);
            let reply = match out.persist {
                None => out.reply,
                // The reply depends on this change: it is made, and answered, only once
                // it is on disk; a failed write leaves the state as it was.
                Some(staged) => match persist(&g.state_file, &staged.bytes) {
                    Ok(()) => {
                        g.core.commit(staged);
                        out.reply
                    }
                    Err(e) => {
                        let why = format!("{}: {e}", g.state_file.display());
                        tracing::error!(resource = %req.resource, %node, op = ?req.op, error = %why, "cannot store the state; refused");
                        g.core.unstored(&req.resource, &why)
                    }
                },
            };
            let key = (req.resource.clone(), node.clone());
            if reply.granted {
                g.refusals.remove(&key);
                if req.op != witness::Op::Renew && req.op != witness::Op::Query {
                    tracing::info!(resource = %req.resource, %node, op = ?req.op, term = reply.term, primary = %reply.primary, "granted");
                }
            } else {
                let kind: String = format!("{:?} {}", req.op, reply.reason)
                    .chars()
                    .filter(|c| !c.is_ascii_digit())
                    .collect();
                if g.refusals.get(&key) != Some(&kind) {
                    tracing::info!(resource = %req.resource, %node, op = ?req.op, reason = %reply.reason, "refused (logged again when the reason changes)");
                    g.refusals.insert(key, kind);
                } else {
                    tracing::debug!(resource = %req.resource, %node, op = ?req.op, reason = %reply.reason, "refused");
                }
            }
            reply
        };
        net::write_frame(&mut s, &Msg::WitnessReply(reply), &[]).await?;
    }
}
