//! Running the promoter's services (`[[resource.NAME.service]]`): what `mount`, `systemd`,
//! `exec` and `vip` mean on this host. The order, the deadlines and what a failure leads
//! to are decided by `core::promoter`; here each start or stop is one async call that
//! succeeds or says why not. Dropping its future kills whatever it still runs.

use std::path::PathBuf;
use std::time::Duration;

use tokio::process::Command;

use crate::core::promoter::ServiceSpec;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceKind {
    /// Mount the resource's device (the file system replays its journal).
    Mount {
        mount_point: PathBuf,
        fs_type: String,
        options: String,
    },
    /// `systemctl start` / `stop` a unit.
    Systemd { unit: String },
    /// `sh -c` commands; `check`, when given, is retried after `start` until it succeeds.
    Exec {
        start: String,
        stop: String,
        check: Option<String>,
    },
    /// An address added to an interface, announced with a gratuitous ARP.
    Vip { address: String, interface: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub kind: ServiceKind,
    pub start_timeout_ms: u64,
    pub stop_timeout_ms: u64,
}

/// What a service command finds in its environment.
#[derive(Debug, Clone)]
pub struct Context {
    pub resource: String,
    /// This node's name; `{node}` in a mount point stands for it.
    pub node: String,
    /// The resource's device link (`/dev/tandem/NAME`).
    pub device: PathBuf,
}

impl Context {
    /// `{node}` replaced by this node's name: two nodes sharing one file system
    /// namespace (a test host) need different mount points.
    pub fn mount_point(&self, p: &std::path::Path) -> PathBuf {
        PathBuf::from(p.to_string_lossy().replace("{node}", &self.node))
    }
}

impl Service {
    pub fn name(&self) -> String {
        match &self.kind {
            ServiceKind::Mount { mount_point, .. } => format!("mount {}", mount_point.display()),
            ServiceKind::Systemd { unit } => format!("systemd {unit}"),
            ServiceKind::Exec { start, .. } => format!("exec {start}"),
            ServiceKind::Vip { address, interface } => format!("vip {address} on {interface}"),
        }
    }

    pub fn spec(&self) -> ServiceSpec {
        ServiceSpec {
            name: self.name(),
            start_timeout_ms: self.start_timeout_ms,
            stop_timeout_ms: self.stop_timeout_ms,
        }
    }

    pub async fn start(&self, ctx: &Context) -> Result<(), String> {
        match &self.kind {
            ServiceKind::Mount {
                mount_point,
                fs_type,
                options,
            } => {
                let mount_point = &ctx.mount_point(mount_point);
                std::fs::create_dir_all(mount_point)
                    .map_err(|e| format!("create {}: {e}", mount_point.display()))?;
                let mut c = Command::new("mount");
                c.arg("-t").arg(fs_type);
                if !options.is_empty() {
                    c.arg("-o").arg(options);
                }
                run(c.arg(&ctx.device).arg(mount_point), ctx).await
            }
            ServiceKind::Systemd { unit } => {
                run(Command::new("systemctl").arg("start").arg(unit), ctx).await
            }
            ServiceKind::Exec { start, check, .. } => {
                run(Command::new("/bin/sh").arg("-c").arg(start), ctx).await?;
                if let Some(check) = check {
                    // Until it passes; the promoter's deadline bounds the wait.
                    while run(Command::new("/bin/sh").arg("-c").arg(check), ctx)
                        .await
                        .is_err()
                    {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                Ok(())
            }
            ServiceKind::Vip { address, interface } => {
                run(
                    Command::new("ip").args(["addr", "add", address, "dev", interface]),
                    ctx,
                )
                .await?;
                let ip = address.split('/').next().unwrap_or(address);
                // Tell the segment the address moved; a missing arping is not fatal.
                if let Err(e) = run(
                    Command::new("arping").args(["-U", "-c", "2", "-I", interface, ip]),
                    ctx,
                )
                .await
                {
                    tracing::warn!(resource = %ctx.resource, %address, error = %e, "gratuitous ARP not sent");
                }
                Ok(())
            }
        }
    }

    pub async fn stop(&self, ctx: &Context) -> Result<(), String> {
        match &self.kind {
            ServiceKind::Mount { mount_point, .. } => {
                let mount_point = &ctx.mount_point(mount_point);
                if !is_mounted(mount_point) {
                    return Ok(());
                }
                run(Command::new("umount").arg(mount_point), ctx).await
            }
            ServiceKind::Systemd { unit } => {
                run(Command::new("systemctl").arg("stop").arg(unit), ctx).await
            }
            ServiceKind::Exec { stop, .. } => {
                run(Command::new("/bin/sh").arg("-c").arg(stop), ctx).await
            }
            ServiceKind::Vip { address, interface } => {
                match run(
                    Command::new("ip").args(["addr", "del", address, "dev", interface]),
                    ctx,
                )
                .await
                {
                    // Already gone is stopped.
                    Err(e) if e.contains("Cannot assign requested address") => Ok(()),
                    r => r,
                }
            }
        }
    }
}

/// `mount_point` is the target of a mount in /proc/self/mounts.
fn is_mounted(mount_point: &std::path::Path) -> bool {
    let Ok(want) = mount_point.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .any(|p| std::path::Path::new(p) == want)
        })
        .unwrap_or(false)
}

/// Run to completion with the resource in the environment; the error carries the exit
/// status and the last line the command printed on stderr.
async fn run(c: &mut Command, ctx: &Context) -> Result<(), String> {
    let what = format!("{:?}", c.as_std());
    let out = c
        .env("TANDEM_RESOURCE", &ctx.resource)
        .env("TANDEM_NODE", &ctx.node)
        .env("TANDEM_DEVICE", &ctx.device)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    Err(format!("{what} failed ({}): {last}", out.status))
}
