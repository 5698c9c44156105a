//! `tandemctl`: Tandem's management CLI.
//!
//! Exit codes: 0 success, 1 failure with a one-line reason on stderr, 2 usage.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};
use tandem::config::Config;
use tandem::core::meta;
use tandem::shell::md;

#[derive(Parser)]
#[command(name = "tandemctl", about = "Manage Tandem replicated devices")]
struct Cli {
    /// Config file shared by both data nodes.
    #[arg(long, global = true, default_value = "/etc/tandem/tandem.toml")]
    config: PathBuf,
    /// This node's name in the config (default: the hostname).
    #[arg(long, global = true)]
    node: Option<String>,
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
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

fn run(cli: Cli) -> anyhow::Result<()> {
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
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandemctl: {e:#}");
            ExitCode::from(1)
        }
    }
}
