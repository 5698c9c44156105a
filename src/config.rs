//! The one TOML config both data nodes share, parsed and checked.
//!
//! Every error names the file and the key, so that `tandemd` and `tandemctl` can print
//! one clear line and refuse to start.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::core::promoter::OnDemoteFailure;
use crate::core::quorum::{self, Fencing, OnNoQuorum};
use crate::core::Protocol;
use crate::shell::services::{Service, ServiceKind};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {err}")]
    Read { file: String, err: std::io::Error },
    #[error("{file}: {msg}")]
    Parse { file: String, msg: String },
    #[error("{file}: {key}: {msg}")]
    Key {
        file: String,
        key: String,
        msg: String,
    },
}

/// A config file's text and its name for error messages.
fn read_file(path: &Path) -> Result<(String, String), ConfigError> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((text, file)),
        Err(err) => Err(ConfigError::Read { file, err }),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    #[serde(default)]
    global: RawGlobal,
    #[serde(default)]
    resource: BTreeMap<String, RawResource>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawGlobal {
    secret_file: Option<String>,
    run_dir: Option<String>,
    watchdog: Option<String>,
    watchdog_timeout_s: Option<u32>,
    http_listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawResource {
    protocol: Option<String>,
    on_no_quorum: Option<String>,
    fencing: Option<String>,
    witness: Option<String>,
    al_extents: Option<u32>,
    ping_interval_ms: Option<u64>,
    ping_timeout_ms: Option<u64>,
    lease_ms: Option<u64>,
    promote_margin_ms: Option<u64>,
    auto_promote: Option<bool>,
    fence_peer: Option<String>,
    fence_peer_timeout_ms: Option<u64>,
    resync_window_bytes: Option<u64>,
    on_demote_failure: Option<String>,
    preferred_node: Option<String>,
    fail_back: Option<bool>,
    fail_back_delay_ms: Option<u64>,
    #[serde(default)]
    node: Vec<RawNode>,
    #[serde(default)]
    service: Vec<RawService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawService {
    #[serde(rename = "type")]
    kind: String,
    mount_point: Option<String>,
    fs_type: Option<String>,
    options: Option<String>,
    unit: Option<String>,
    start: Option<String>,
    stop: Option<String>,
    check: Option<String>,
    address: Option<String>,
    interface: Option<String>,
    start_timeout_ms: Option<u64>,
    stop_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawNode {
    name: String,
    address: String,
    disk: String,
    device: Option<String>,
}

/// The longest node name: what the superblock keeps (63 bytes and a terminator).
pub const MAX_NODE_NAME_BYTES: usize = 63;
/// No timeout or delay in the config may exceed an hour.
pub const MAX_TIMEOUT_MS: u64 = 3_600_000;

fn valid_node_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_NODE_NAME_BYTES
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[derive(Debug, Clone)]
pub struct Config {
    pub file: String,
    pub secret_file: PathBuf,
    pub run_dir: PathBuf,
    /// A watchdog device to pet while healthy (off by default).
    pub watchdog: Option<PathBuf>,
    pub watchdog_timeout_s: u32,
    /// The health and metrics endpoint (off when unset).
    pub http_listen: Option<SocketAddr>,
    pub resources: Vec<ResourceConfig>,
}

#[derive(Debug, Clone)]
pub struct ResourceConfig {
    pub name: String,
    pub protocol: Protocol,
    pub al_extents: u32,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    pub witness: Option<SocketAddr>,
    pub on_no_quorum: OnNoQuorum,
    pub fencing: Fencing,
    /// The witness's `lease-ms` (the two must agree; the witness's grant wins).
    pub lease_ms: u64,
    pub promote_margin_ms: u64,
    pub auto_promote: bool,
    /// The `fence-peer` handler (required with `fencing = "stonith"`), run with `sh -c`.
    pub fence_peer: Option<String>,
    pub fence_peer_timeout_ms: u64,
    pub resync_window_bytes: u64,
    pub nodes: [NodeConfig; 2],
    /// Started in order after promotion, stopped in reverse before demotion.
    pub services: Vec<Service>,
    pub on_demote_failure: OnDemoteFailure,
    /// The node that should serve when both can; only acted on with `fail_back`.
    pub preferred_node: Option<String>,
    /// Hand back to `preferred_node` once it is in sync again (off by default).
    pub fail_back: bool,
    pub fail_back_delay_ms: u64,
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub address: SocketAddr,
    pub disk: PathBuf,
    /// Where the device link goes on this node (default `/dev/tandem/RES`).
    pub device: PathBuf,
}

impl ResourceConfig {
    /// This node and its peer, by name.
    pub fn local_and_peer(&self, node: &str) -> Option<(&NodeConfig, &NodeConfig)> {
        match (&self.nodes[0], &self.nodes[1]) {
            (a, b) if a.name == node => Some((a, b)),
            (a, b) if b.name == node => Some((b, a)),
            _ => None,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let (text, file) = read_file(path)?;
        Config::parse(&text, &file)
    }

    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_string(),
            msg: e.to_string().trim().replace('\n', " "),
        })?;
        let key_err = |key: String, msg: String| ConfigError::Key {
            file: file.to_string(),
            key,
            msg,
        };
        if raw.resource.is_empty() {
            return Err(key_err("resource".into(), "no resource defined".into()));
        }
        let mut resources = Vec::new();
        for (name, r) in raw.resource {
            let k = |s: &str| format!("resource.{name}.{s}");
            if name.is_empty()
                || name.len() > 63
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(key_err(
                    format!("resource.{name}"),
                    "resource names are 1-63 characters of [A-Za-z0-9_-]".into(),
                ));
            }
            let protocol = match r.protocol.as_deref() {
                None => Protocol::C,
                Some(p) => Protocol::parse(p).ok_or_else(|| {
                    key_err(
                        k("protocol"),
                        format!("{p:?} is not a protocol; use \"A\", \"B\" or \"C\""),
                    )
                })?,
            };
            let on_no_quorum = match r.on_no_quorum.as_deref() {
                None => OnNoQuorum::SuspendIo,
                Some(v) => OnNoQuorum::parse(v).ok_or_else(|| {
                    key_err(
                        k("on-no-quorum"),
                        format!("{v:?}: use \"suspend-io\" or \"io-error\""),
                    )
                })?,
            };
            let witness = match r.witness.as_deref() {
                None => None,
                Some(w) => Some(w.parse::<SocketAddr>().map_err(|_| {
                    key_err(k("witness"), format!("{w:?} is not an IP:port address"))
                })?),
            };
            let fencing = match r.fencing.as_deref() {
                None if witness.is_some() => Fencing::Resource,
                None => Fencing::None,
                Some(v) => Fencing::parse(v).ok_or_else(|| {
                    key_err(
                        k("fencing"),
                        format!("{v:?}: use \"none\", \"resource\" or \"stonith\""),
                    )
                })?,
            };
            if fencing == Fencing::Resource && witness.is_none() {
                return Err(key_err(
                    k("fencing"),
                    "resource-level fencing needs a `witness` to record the outdated peer".into(),
                ));
            }
            let fence_peer = r.fence_peer.filter(|c| !c.trim().is_empty());
            match (fencing, &fence_peer) {
                (Fencing::Stonith, None) => {
                    return Err(key_err(
                        k("fence-peer"),
                        "fencing = \"stonith\" needs a fence-peer handler command".into(),
                    ))
                }
                (Fencing::None | Fencing::Resource, Some(_)) => {
                    return Err(key_err(
                        k("fence-peer"),
                        "is only run with fencing = \"stonith\"".into(),
                    ))
                }
                _ => {}
            }
            let fence_peer_timeout_ms = r.fence_peer_timeout_ms.unwrap_or(60_000);
            if !(100..=600_000).contains(&fence_peer_timeout_ms) {
                return Err(key_err(
                    k("fence-peer-timeout-ms"),
                    "must be 100..=600000".into(),
                ));
            }
            let al_extents = r.al_extents.unwrap_or(256);
            let al_range = crate::core::al::MIN_EXTENTS..=crate::core::al::MAX_EXTENTS;
            if !al_range.contains(&(al_extents as usize)) {
                return Err(key_err(
                    k("al-extents"),
                    format!(
                        "must be {}..={} (a write may span two 4 MiB extents)",
                        al_range.start(),
                        al_range.end()
                    ),
                ));
            }
            let ping_interval_ms = r.ping_interval_ms.unwrap_or(500);
            let ping_timeout_ms = r.ping_timeout_ms.unwrap_or(2000);
            let lease_ms = r.lease_ms.unwrap_or(2000);
            let promote_margin_ms = r.promote_margin_ms.unwrap_or(500);
            // Bounded, so that no arithmetic on them can overflow.
            for (key, v) in [
                ("ping-interval-ms", ping_interval_ms),
                ("ping-timeout-ms", ping_timeout_ms),
                ("lease-ms", lease_ms),
                ("promote-margin-ms", promote_margin_ms),
                ("fail-back-delay-ms", r.fail_back_delay_ms.unwrap_or(0)),
            ] {
                if v > MAX_TIMEOUT_MS {
                    return Err(key_err(
                        k(key),
                        format!("{v} is more than {MAX_TIMEOUT_MS} (one hour)"),
                    ));
                }
            }
            quorum::check_timeouts(
                ping_interval_ms,
                ping_timeout_ms,
                promote_margin_ms,
                lease_ms,
            )
            .map_err(|msg| key_err(k("ping-timeout-ms"), msg))?;
            if r.node.len() != 2 {
                return Err(key_err(
                    k("node"),
                    format!(
                        "exactly two [[resource.{name}.node]] entries needed, found {}",
                        r.node.len()
                    ),
                ));
            }
            let mut nodes = Vec::new();
            for (i, n) in r.node.into_iter().enumerate() {
                let nk = |s: &str| format!("resource.{name}.node[{i}].{s}");
                if !valid_node_name(&n.name) {
                    return Err(key_err(
                        nk("name"),
                        format!(
                            "{:?}: node names are 1-{MAX_NODE_NAME_BYTES} characters of [A-Za-z0-9._-] (a host name)",
                            n.name
                        ),
                    ));
                }
                let address = n.address.parse::<SocketAddr>().map_err(|_| {
                    key_err(
                        nk("address"),
                        format!("{:?} is not an IP:port address", n.address),
                    )
                })?;
                if n.disk.is_empty() {
                    return Err(key_err(nk("disk"), "missing backing disk path".into()));
                }
                let device = n
                    .device
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from(format!("/dev/tandem/{name}")));
                nodes.push(NodeConfig {
                    name: n.name,
                    address,
                    disk: PathBuf::from(n.disk),
                    device,
                });
            }
            if nodes[0].name == nodes[1].name {
                return Err(key_err(
                    k("node"),
                    format!("both nodes are named {:?}", nodes[0].name),
                ));
            }
            if nodes[0].address == nodes[1].address {
                return Err(key_err(
                    k("node"),
                    format!(
                        "both nodes have the address {}: each node needs its own",
                        nodes[0].address
                    ),
                ));
            }
            let b = nodes
                .pop()
                .ok_or_else(|| key_err(k("node"), "missing".into()))?;
            let a = nodes
                .pop()
                .ok_or_else(|| key_err(k("node"), "missing".into()))?;
            let on_demote_failure = match r.on_demote_failure.as_deref() {
                None => OnDemoteFailure::None,
                Some(v) => OnDemoteFailure::parse(v).ok_or_else(|| {
                    key_err(
                        k("on-demote-failure"),
                        format!("{v:?}: use \"none\", \"exit\", \"reboot\" or \"poweroff\""),
                    )
                })?,
            };
            let mut services = Vec::new();
            for (i, rs) in r.service.into_iter().enumerate() {
                let sk = format!("resource.{name}.service[{i}]");
                services.push(parse_service(rs).map_err(|(key, msg)| {
                    key_err(
                        if key.is_empty() {
                            sk.clone()
                        } else {
                            format!("{sk}.{key}")
                        },
                        msg,
                    )
                })?);
            }
            if let Some(p) = &r.preferred_node {
                if p != &a.name && p != &b.name {
                    return Err(key_err(
                        k("preferred-node"),
                        format!(
                            "{p:?} is not one of the nodes {:?} and {:?}",
                            a.name, b.name
                        ),
                    ));
                }
            }
            let fail_back = r.fail_back.unwrap_or(false);
            if fail_back && r.preferred_node.is_none() {
                return Err(key_err(
                    k("fail-back"),
                    "needs a preferred-node to fail back to".into(),
                ));
            }
            resources.push(ResourceConfig {
                name,
                protocol,
                al_extents,
                ping_interval_ms,
                ping_timeout_ms,
                witness,
                on_no_quorum,
                fencing,
                lease_ms,
                promote_margin_ms,
                auto_promote: r.auto_promote.unwrap_or(true),
                fence_peer,
                fence_peer_timeout_ms,
                resync_window_bytes: r.resync_window_bytes.unwrap_or(4 << 20),
                nodes: [a, b],
                services,
                on_demote_failure,
                preferred_node: r.preferred_node,
                fail_back,
                fail_back_delay_ms: r.fail_back_delay_ms.unwrap_or(10_000),
            });
        }
        let watchdog_timeout_s = raw.global.watchdog_timeout_s.unwrap_or(10);
        if !(2..=600).contains(&watchdog_timeout_s) {
            return Err(key_err(
                "global.watchdog-timeout-s".into(),
                "must be 2..=600".into(),
            ));
        }
        let http_listen = match raw.global.http_listen.as_deref() {
            None => None,
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|_| {
                key_err(
                    "global.http-listen".into(),
                    format!("{a:?} is not an IP:port address"),
                )
            })?),
        };
        Ok(Config {
            file: file.to_string(),
            http_listen,
            watchdog: raw
                .global
                .watchdog
                .filter(|w| !w.is_empty())
                .map(PathBuf::from),
            watchdog_timeout_s,
            secret_file: PathBuf::from(
                raw.global
                    .secret_file
                    .unwrap_or_else(|| "/etc/tandem/secret".into()),
            ),
            run_dir: PathBuf::from(raw.global.run_dir.unwrap_or_else(|| "/run/tandem".into())),
            resources,
        })
    }

    pub fn resource(&self, name: &str) -> Option<&ResourceConfig> {
        self.resources.iter().find(|r| r.name == name)
    }

    /// Check that this node appears in every resource and its disk exists.
    pub fn check_node(&self, node: &str) -> Result<(), ConfigError> {
        for r in &self.resources {
            let (local, _) = r.local_and_peer(node).ok_or_else(|| ConfigError::Key {
                file: self.file.clone(),
                key: format!("resource.{}.node", r.name),
                msg: format!("no node named {node:?} (use --node NAME)"),
            })?;
            if !local.disk.exists() {
                return Err(ConfigError::Key {
                    file: self.file.clone(),
                    key: format!("resource.{}.node.disk", r.name),
                    msg: format!("{} does not exist", local.disk.display()),
                });
            }
        }
        Ok(())
    }
}

/// `tandem-witness`'s own config file.
#[derive(Debug, Clone)]
pub struct WitnessConfig {
    pub file: String,
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub secret_file: PathBuf,
    pub lease_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawWitness {
    listen: Option<String>,
    state_dir: Option<String>,
    secret_file: Option<String>,
    lease_ms: Option<u64>,
}

impl WitnessConfig {
    pub fn load(path: &Path) -> Result<WitnessConfig, ConfigError> {
        let (text, file) = read_file(path)?;
        WitnessConfig::parse(&text, &file)
    }

    pub fn parse(text: &str, file: &str) -> Result<WitnessConfig, ConfigError> {
        let raw: RawWitness = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_string(),
            msg: e.to_string().trim().replace('\n', " "),
        })?;
        let key_err = |key: &str, msg: String| ConfigError::Key {
            file: file.to_string(),
            key: key.to_string(),
            msg,
        };
        let l = raw
            .listen
            .ok_or_else(|| key_err("listen", "missing: the IP:port to serve on".into()))?;
        let listen = l
            .parse::<SocketAddr>()
            .map_err(|_| key_err("listen", format!("{l:?} is not an IP:port address")))?;
        let lease_ms = raw.lease_ms.unwrap_or(2000);
        if !(100..=600_000).contains(&lease_ms) {
            return Err(key_err("lease-ms", "must be 100..=600000".into()));
        }
        Ok(WitnessConfig {
            file: file.to_string(),
            listen,
            state_dir: PathBuf::from(
                raw.state_dir
                    .unwrap_or_else(|| "/var/lib/tandem-witness".into()),
            ),
            secret_file: PathBuf::from(
                raw.secret_file
                    .unwrap_or_else(|| "/etc/tandem/secret".into()),
            ),
            lease_ms,
        })
    }
}

/// One `[[resource.NAME.service]]`; the error names the key (empty: the table itself).
fn parse_service(r: RawService) -> Result<Service, (String, String)> {
    let need = |v: Option<String>, key: &str| {
        v.filter(|s| !s.trim().is_empty()).ok_or_else(|| {
            (
                key.to_string(),
                format!("missing (needed by type = {:?})", r.kind),
            )
        })
    };
    let kind = match r.kind.as_str() {
        "mount" => ServiceKind::Mount {
            mount_point: PathBuf::from(need(r.mount_point.clone(), "mount-point")?),
            fs_type: r.fs_type.clone().unwrap_or_else(|| "ext4".into()),
            options: r.options.clone().unwrap_or_default(),
        },
        "systemd" => ServiceKind::Systemd {
            unit: need(r.unit.clone(), "unit")?,
        },
        "exec" => ServiceKind::Exec {
            start: need(r.start.clone(), "start")?,
            stop: need(r.stop.clone(), "stop")?,
            check: r.check.clone().filter(|c| !c.trim().is_empty()),
        },
        "vip" => {
            let address = need(r.address.clone(), "address")?;
            let ip = address.split('/').next().unwrap_or_default();
            if ip.parse::<std::net::IpAddr>().is_err() || !address.contains('/') {
                return Err((
                    "address".into(),
                    format!("{address:?} is not an address with a prefix (10.0.0.5/24)"),
                ));
            }
            ServiceKind::Vip {
                address,
                interface: need(r.interface.clone(), "interface")?,
            }
        }
        other => {
            return Err((
                "type".into(),
                format!("{other:?}: use \"mount\", \"systemd\", \"exec\" or \"vip\""),
            ))
        }
    };
    let timeout = |v: Option<u64>, key: &str, default: u64| match v.unwrap_or(default) {
        t @ 100..=3_600_000 => Ok(t),
        _ => Err((key.to_string(), "must be 100..=3600000".to_string())),
    };
    Ok(Service {
        kind,
        start_timeout_ms: timeout(r.start_timeout_ms, "start-timeout-ms", 60_000)?,
        stop_timeout_ms: timeout(r.stop_timeout_ms, "stop-timeout-ms", 60_000)?,
    })
}
