//! `tandemctl`: Tandem's management CLI.
//!
//! Exit codes: 0 success, 1 failure with a one-line reason on stderr, 2 usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use tandem::config::Config;
use tandem::core::meta;
use tandem::core::resource::Replication;
use tandem::shell::control::{Client, Request};
use tandem::shell::md;
use tandem::shell::process;
use tandem::shell::status::ResourceStatus;

#[derive(Parser)]
#[command(name = "tandemctl", about = "Manage Tandem replicated devices")]
struct Cli {
    /// Config file shared by both data nodes.
    #[arg(long, global = true, default_value = "/etc/tandem/tandem.toml")]
    config: PathBuf,
    /// This node's name in the config (default: the hostname).
    #[arg(long, global = true)]
    node: Option<String>,
    /// The daemon's control socket (default: the config's run-dir/tandemd.sock).
    #[arg(long, global = true, env = "TANDEM_SOCKET")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write fresh metadata at the end of this node's backing disk.
    CreateMd {
        resource: String,
        /// Overwrite existing or corrupt metadata (loses the generation history).
        #[arg(long)]
        force: bool,
        /// The device is new and empty on both nodes: skip the initial full sync. Run it
        /// on both nodes.
        #[arg(long)]
        assume_clean: bool,
    },
    /// Print this node's metadata for a resource as JSON.
    ShowMd { resource: String },
    /// Show the state of one resource or all.
    Status {
        resource: Option<String>,
        /// One JSON document: {"resources": [...]}.
        #[arg(long)]
        json: bool,
    },
    /// Print one line per state change as it happens, until interrupted.
    Events {
        resource: Option<String>,
        /// JSON lines (the only format).
        #[arg(long)]
        json: bool,
    },
    /// Make this node primary: the device appears and becomes writable. With a witness,
    /// the witness grants a new term first.
    Promote {
        resource: String,
        /// Promote although the local disk is not up to date (a new pair's first
        /// promotion, or a lost peer): serves possibly stale data. With a witness it still
        /// takes a term from it, and yields to any newer one.
        #[arg(long)]
        force: bool,
    },
    /// Make this node secondary. Refused while the device is mounted or held open.
    Demote { resource: String },
    /// Put a new, emptied or restored witness in service: it takes this pair's term (run on the
    /// primary, with the peer connected).
    AdoptWitness {
        resource: String,
        /// The peer is gone for good: take this node's term without checking the peer's.
        #[arg(long)]
        force: bool,
    },
    /// (Re)connect to the peer after `disconnect`, a split brain or a failed disk.
    Connect {
        resource: String,
        /// Resolve a split brain: throw away this node's changes and resync from the peer.
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Drop the peer connection and stay standalone.
    Disconnect { resource: String },
    /// Mark the local disk out of date: a full resync from the peer follows.
    Invalidate { resource: String },
    /// Planned move (run on the primary): stop the services, demote, and have the peer
    /// promote itself and start them; prints how long it took.
    Switchover {
        resource: String,
        /// The node to move to (it must be this node's peer).
        #[arg(long)]
        to: Option<String>,
    },
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let request = match &cli.cmd {
        Cmd::CreateMd { .. } | Cmd::ShowMd { .. } => None,
        Cmd::Status { resource, .. } => Some(Request::Status {
            resource: resource.clone(),
        }),
        Cmd::Events { resource, .. } => Some(Request::Events {
            resource: resource.clone(),
        }),
        Cmd::Promote { resource, force } => Some(Request::Promote {
            resource: resource.clone(),
            force: *force,
        }),
        Cmd::Demote { resource } => Some(Request::Demote {
            resource: resource.clone(),
        }),
        Cmd::Connect {
            resource,
            discard_my_data,
        } => Some(Request::Connect {
            resource: resource.clone(),
            discard_my_data: *discard_my_data,
        }),
        Cmd::Disconnect { resource } => Some(Request::Disconnect {
            resource: resource.clone(),
        }),
        Cmd::Invalidate { resource } => Some(Request::Invalidate {
            resource: resource.clone(),
        }),
        Cmd::Switchover { resource, to } => Some(Request::Switchover {
            resource: resource.clone(),
            to: to.clone(),
        }),
        Cmd::AdoptWitness { resource, force } => Some(Request::AdoptWitness {
            resource: resource.clone(),
            force: *force,
        }),
    };
    if let Some(req) = request {
        let socket = match &cli.socket {
            Some(s) => s.clone(),
            None => Config::load(&cli.config)?.run_dir.join("tandemd.sock"),
        };
        let json = matches!(cli.cmd, Cmd::Status { json: true, .. });
        return call_daemon(&socket, req, json);
    }
    let cfg = Config::load(&cli.config)?;
    let node = cli.node.clone().unwrap_or_else(hostname);
    let resource_disk = |name: &str| -> anyhow::Result<(u32, PathBuf)> {
        let r = cfg
            .resource(name)
            .ok_or_else(|| anyhow!("{}: no resource {name:?}", cfg.file))?;
        let (local, _) = r.local_and_peer(&node).ok_or_else(|| {
            anyhow!(
                "{}: resource {name:?} has no node {node:?} (use --node NAME)",
                cfg.file
            )
        })?;
        Ok((r.al_extents, local.disk.clone()))
    };
    match cli.cmd {
        Cmd::CreateMd {
            resource,
            force,
            assume_clean,
        } => {
            let (al_extents, disk) = resource_disk(&resource)?;
            let sb = md::create_metadata(
                &disk,
                &md::CreateOptions {
                    resource: &resource,
                    node: &node,
                    al_extents,
                    force,
                    assume_clean,
                },
            )?;
            println!(
                "{}: metadata written for resource {resource} node {node}: {} data bytes; disk {}",
                disk.display(),
                sb.layout.data_bytes,
                if sb.has(meta::FLAG_CONSISTENT) {
                    "consistent (initial sync skipped)"
                } else {
                    "inconsistent until its first sync"
                }
            );
        }
        Cmd::ShowMd { resource } => {
            let (_, disk) = resource_disk(&resource)?;
            let m = md::read_metadata(&disk)?;
            let sb = &m.sb;
            let mut bm =
                tandem::core::bitmap::Bitmap::new(sb.layout.data_bytes, sb.layout.block_bytes);
            bm.load(&m.bitmap_bytes);
            let flags: Vec<&str> = [
                (meta::FLAG_CONSISTENT, "consistent"),
                (meta::FLAG_OUTDATED, "outdated"),
                (meta::FLAG_PRIMARY_ACTIVE, "primary"),
                (meta::FLAG_CRASHED_PRIMARY, "crashed-primary"),
            ]
            .iter()
            .filter(|(f, _)| sb.has(*f))
            .map(|(_, n)| *n)
            .collect();
            let v = serde_json::json!({
                "resource": sb.resource,
                "node": sb.node,
                "data_bytes": sb.layout.data_bytes,
                "block_bytes": sb.layout.block_bytes,
                "al_extents": sb.al_extents,
                "flags": flags,
                "current_uuid": format!("{:016X}", sb.gen.current),
                "bitmap_uuid": format!("{:016X}", sb.gen.bitmap),
                "history_uuids": sb.gen.history.iter().map(|h| format!("{h:016X}")).collect::<Vec<_>>(),
                "out_of_sync_bytes": bm.out_of_sync_bytes(),
            });
            println!("{}", serde_json::to_string_pretty(&v).context("json")?);
        }
        _ => unreachable!("daemon commands return above"),
    }
    Ok(())
}

fn call_daemon(socket: &Path, req: Request, json: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    rt.block_on(async {
        let mut c = Client::connect(socket).await?;
        if let Request::Events { .. } = req {
            c.send(&req).await?;
            loop {
                let line = c.next_line().await?;
                // A refusal (say, an unknown resource) is a reply, not an event.
                if let Ok(r) = serde_json::from_str::<tandem::shell::control::Reply>(&line) {
                    if !r.ok {
                        bail!("{}", r.error.unwrap_or_else(|| "failed".into()));
                    }
                }
                println!("{line}");
            }
        }
        if let Request::Promote { force: true, .. } = req {
            eprintln!("tandemctl: --force: this node may serve stale data, and writes made on the peer since become a split brain");
        }
        if let Request::AdoptWitness { force: true, .. } = req {
            eprintln!("tandemctl: --force: if the peer ever held a newer term, the witness now holds an older one and could promote stale data");
        }
        let reply = c.call(&req).await?;
        if !reply.ok {
            bail!("{}", reply.error.unwrap_or_else(|| "failed".into()));
        }
        match reply.status {
            Some(list) if json => {
                let doc = serde_json::json!({ "resources": list });
                println!("{}", serde_json::to_string_pretty(&doc).context("json")?);
            }
            Some(list) => {
                for s in &list {
                    print_status(s);
                }
            }
            None => {
                if let Some(m) = reply.message {
                    println!("{m}");
                }
            }
        }
        Ok(())
    })
}

/// DRBD-like human status: the resource line, then the peer line.
fn print_status(s: &ResourceStatus) {
    let c = &s.core;
    println!(
        "{} role:{} disk:{} protocol:{} device:{}",
        c.name,
        name(&c.role),
        name(&c.disk),
        c.protocol.as_str(),
        s.device.as_deref().unwrap_or("-")
    );
    println!(
        "  {} connection:{} replication:{} role:{} disk:{}",
        c.peer.name,
        name(&c.connection),
        c.replication.as_str(),
        name(&c.peer.role),
        name(&c.peer.disk)
    );
    if c.out_of_sync_bytes > 0 {
        println!("  out-of-sync: {} bytes", c.out_of_sync_bytes);
    }
    let (done, total) = (c.resync.done_bytes, c.resync.total_bytes);
    if total > 0
        && matches!(
            c.replication,
            Replication::SyncSource | Replication::SyncTarget
        )
    {
        println!(
            "  resync: {done} of {total} bytes ({}%) at {} bytes/s",
            done * 100 / total.max(1),
            c.resync.bytes_per_sec
        );
    }
    if c.split_brain {
        println!("  SPLIT BRAIN: resolve with `tandemctl connect {} --discard-my-data` on the node whose changes to throw away", c.name);
    }
    if let Some(p) = &c.witness.problem {
        println!("  witness: {p}");
    }
    if let Some(e) = &c.last_error {
        println!("  last error: {e}");
    }
}

/// The name `status --json` uses for a state, for the human form too.
fn name(v: &impl serde::Serialize) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_else(|| "?".into())
}

fn main() -> ExitCode {
    let cli = match process::parse_args::<Cli>() {
        Ok(c) => c,
        Err(code) => return code,
    };
    process::finish("tandemctl", run(cli), false)
}
