//! The status of one resource as users see it: what `tandemctl status --json` and
//! `events --json` print and what `/health` and `/metrics` are made from. One type, made
//! in one place (the driver), read by the CLI, the HTTP routes and the tests, so a
//! renamed field is a compile error rather than a silent `null`.

use serde::{Deserialize, Serialize};

use crate::core::promoter::{Phase, ServiceState};
use crate::core::resource::Status;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceStatus {
    /// The core's part: roles, disks, connection, quorum, witness, resync, generation.
    #[serde(flatten)]
    pub core: Status,
    /// This node's name.
    pub node: String,
    /// The device link while primary with the device attached.
    pub device: Option<String>,
    pub backing_disk: String,
    pub io_backend: IoBackend,
    pub app_writes: AppWrites,
    pub services: ServicesStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoBackend {
    #[serde(rename = "io_uring")]
    IoUring,
    #[serde(rename = "pread/pwrite")]
    PreadPwrite,
}

/// Application writes completed since the start, and the sum of their latencies
/// (arrival to completion, the peer's acknowledgement included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AppWrites {
    pub completed: u64,
    pub latency_us_sum: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicesStatus {
    pub phase: Phase,
    pub last_failure: Option<String>,
    pub list: Vec<ServiceEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntry {
    pub name: String,
    pub state: ServiceState,
}

impl ResourceStatus {
    /// Primary with the device attached and, when it has services, all of them running:
    /// what `/primary` answers 200 for.
    pub fn serving_primary(&self) -> bool {
        self.core.role == crate::core::resource::Role::Primary
            && self.device.is_some()
            && self.services.phase == Phase::Running
    }

    /// An up-to-date secondary established with its primary: what `/replica` answers
    /// 200 for.
    pub fn healthy_replica(&self) -> bool {
        use crate::core::resource::{DiskState, Replication, Role};
        self.core.role == Role::Secondary
            && self.core.disk == DiskState::UpToDate
            && self.core.replication == Replication::Established
    }
}
