//! The resource's public vocabulary: request and buffer ids, roles and disk states,
//! operator commands and their answers, parameters, actions, timers and status.

use crate::core::quorum::{Fencing, OnNoQuorum};
use crate::core::wire::Msg;
use crate::core::witness;
use crate::core::Protocol;

/// An application request; for writes also the name of the buffer holding its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReqId(pub u64);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufId(pub u64);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IoId(pub u64);

/// Buffers the core asks the driver to allocate (resync reads) have this bit set, so they
/// never collide with the driver's own buffer names.
pub const CORE_BUF_BIT: u64 = 1 << 63;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Secondary,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskState {
    UpToDate,
    Outdated,
    Inconsistent,
    Diskless,
    #[serde(rename = "dunknown")]
    Unknown,
}

impl DiskState {
    pub(super) fn code(self) -> u8 {
        match self {
            DiskState::UpToDate => 1,
            DiskState::Outdated => 2,
            DiskState::Inconsistent => 3,
            DiskState::Diskless => 4,
            DiskState::Unknown => 0,
        }
    }
    pub(super) fn from_code(c: u8) -> DiskState {
        match c {
            1 => DiskState::UpToDate,
            2 => DiskState::Outdated,
            3 => DiskState::Inconsistent,
            4 => DiskState::Diskless,
            _ => DiskState::Unknown,
        }
    }
}

/// Why an application request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReqError {
    /// The device is not writable here (not primary).
    ReadOnly,
    /// Outside the data area.
    OutOfRange,
    /// The local disk failed the request.
    Io,
    /// Larger than the activity log can cover at once (see `al-extents`).
    TooLarge,
}

/// Operator commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCmd {
    Promote {
        force: bool,
    },
    Demote,
    Connect {
        discard_my_data: bool,
    },
    Disconnect,
    Invalidate,
    /// Demote, then have the peer take over once it is up to date (the services are
    /// the driver's to stop first). Answered when the peer reports itself primary.
    Switchover,
    /// Put a new, emptied or restored witness in service: it takes this pair's term (see
    /// [`witness::Op::Adopt`]). Needs the peer connected, so that this node's term is
    /// the pair's highest, unless `force` (the peer is gone for good).
    AdoptWitness {
        force: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("the peer is primary; demote it first")]
    PeerIsPrimary,
    #[error(
        "local disk is {0:?}, not UpToDate; `promote --force` would serve possibly stale data"
    )]
    NotUpToDate(DiskState),
    #[error("local disk is a sync target right now; wait for the resync to finish")]
    SyncTarget,
    #[error("not allowed while primary; demote first")]
    IsPrimary,
    #[error("{0} application requests still in flight")]
    Busy(usize),
    #[error("a promotion through the witness is already in progress")]
    PromoteInProgress,
    #[error("not primary: run switchover on the primary")]
    NotPrimary,
    #[error("the peer is not connected and up to date ({0}); a switchover would lose data")]
    PeerNotReady(String),
    #[error("no witness is configured for this resource")]
    NoWitness,
    #[error("the peer is not connected, so this node's term may not be the pair's highest; connect it first, or use --force if it is gone for good")]
    AdoptNeedsPeer,
    // Outcomes of commands answered later (`Action::AdminDone`).
    #[error("the witness did not answer")]
    WitnessSilent,
    #[error("the witness refused: {0}")]
    WitnessRefused(String),
    #[error("the grant arrived after its lease had run out")]
    GrantExpired,
    #[error("demoted, but the peer did not take over in time; promote one node by hand")]
    PeerDidNotTakeOver,
    #[error("this node was made secondary meanwhile (a newer term)")]
    ReplacedMeanwhile,
    #[error("the flush before the demotion failed; still primary")]
    FlushFailed,
    #[error("fence-peer: {0}; not promoting")]
    FencePeer(String),
    // Refusals and outcomes of the node's role steps (`crate::core::node`).
    #[error("services are already being stopped")]
    ServicesStopping,
    #[error("a role change is still in progress; try again")]
    RoleChangeInProgress,
    #[error("{0}")]
    DeviceBusy(String),
    #[error("promoted, but the device could not be attached: {0}")]
    DeviceAttach(String),
    #[error("promoted, but {0}")]
    DeviceLink(String),
    #[error("not demoted: {0}")]
    NotDemoted(String),
    #[error("the resource is stopping")]
    Stopping,
}

/// How an accepted admin command ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminReply {
    Done,
    /// The answer comes later as [`Action::AdminDone`] (a promotion through the witness).
    Pending,
}

/// Tuning that the config provides.
#[derive(Debug, Clone)]
pub struct Params {
    pub resource: String,
    pub local_node: String,
    pub peer_node: String,
    pub protocol: Protocol,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    /// Resync bytes in flight at most: keeps application I/O moving during a resync.
    pub resync_window_bytes: u64,
    pub resync_chunk_bytes: u64,
    /// Seed for new generation UUIDs.
    pub seed: u64,
    /// A witness is configured: quorum, leases and fencing apply. Without one the pair
    /// behaves as DRBD with `quorum off`.
    pub witness: bool,
    /// The lease length the witness grants (it says so in every grant; this is for
    /// scheduling renewals before the first one).
    pub lease_ms: u64,
    /// Extra silence, beyond `ping_timeout_ms`, before a secondary asks to be promoted.
    pub promote_margin_ms: u64,
    pub on_no_quorum: OnNoQuorum,
    pub fencing: Fencing,
    /// Ask the witness for promotion when the primary is lost.
    pub auto_promote: bool,
    /// Witness requests are numbered from here; it must exceed every number an earlier
    /// run of this node used (the shell passes the wall clock in microseconds).
    pub witness_seq_base: u64,
    /// With `fencing = "stonith"`: how long the `fence-peer` handler may run.
    pub fence_peer_timeout_ms: u64,
    /// `preferred-node` with `fail-back = true`, when that is the peer: a primary hands
    /// over to it once it has been connected and in sync for `fail_back_delay_ms`.
    pub fail_back_to_peer: bool,
    pub fail_back_delay_ms: u64,
}

/// Everything the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    DiskWrite {
        io: IoId,
        offset: u64,
        buf: BufId,
    },
    /// Read `len` bytes into a new buffer named `buf`.
    DiskRead {
        io: IoId,
        offset: u64,
        len: u32,
        buf: BufId,
    },
    DiskFlush {
        io: IoId,
    },
    /// Write and make durable before reporting completion.
    MetaWrite {
        io: IoId,
        offset: u64,
        bytes: Vec<u8>,
    },
    /// Send `msg` stamped with `term` (the frame header's fencing token).
    Send {
        msg: Msg,
        buf: Option<BufId>,
        term: u64,
    },
    /// Ask the witness; answer with
    /// [`Resource::handle_witness_reply`](super::Resource::handle_witness_reply) within
    /// `timeout_ms`, or with `None` once it has passed.
    Witness {
        req: witness::Request,
        timeout_ms: u64,
    },
    /// The outcome of an admin command that returned [`AdminReply::Pending`].
    AdminDone(Result<(), AdminError>),
    /// Fail back: the preferred node (the peer) has been in sync long enough; the driver
    /// runs a switchover (services first) as if an operator had asked.
    FailBack,
    /// Run the `fence-peer` handler (`fencing = "stonith"`, before promoting while the
    /// peer is not connected); answer with
    /// [`Resource::handle_fence_peer_done`](super::Resource::handle_fence_peer_done),
    /// with `None` if it has not exited by itself within `timeout_ms`.
    FencePeer {
        timeout_ms: u64,
    },
    ReleaseBuf(BufId),
    CompleteWrite {
        req: ReqId,
        result: Result<(), ReqError>,
    },
    CompleteFlush {
        req: ReqId,
        result: Result<(), ReqError>,
    },
    /// Close the peer connection now; the core has already forgotten it.
    Disconnect {
        reason: String,
    },
    /// Whether the driver should keep (re)connecting to the peer.
    SetConnect(bool),
    RoleChanged(Role),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Conn {
    StandAlone,
    Connecting,
    /// Connected, waiting for the peer's hello.
    WfHello,
    /// Exchanging bitmaps before a resync.
    WfBitmap {
        source: bool,
    },
    /// Persisting the resync set before starting.
    SyncStarting {
        source: bool,
    },
    Established,
    SyncSource,
    SyncTarget,
}

/// The states whose changes `events` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateKey {
    pub role: Role,
    pub disk: DiskState,
    pub conn: Conn,
    pub peer_role: Role,
    pub peer_disk: DiskState,
    pub split_brain: bool,
    pub quorum: bool,
    pub term: u64,
    pub degraded: bool,
    pub suspended: bool,
}

/// The peer connection as `status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Link {
    Standalone,
    Connecting,
    Connected,
}

/// What the connection does, as `status` names it (DRBD's replication states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Replication {
    Off,
    Handshake,
    WfBitmap,
    Established,
    SyncSource,
    SyncTarget,
}

impl Replication {
    /// The name `status` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Replication::Off => "off",
            Replication::Handshake => "handshake",
            Replication::WfBitmap => "wf-bitmap",
            Replication::Established => "established",
            Replication::SyncSource => "sync-source",
            Replication::SyncTarget => "sync-target",
        }
    }
}

/// How the node reaches its witness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WitnessLinkState {
    /// No witness configured.
    None,
    Connected,
    Unreachable,
}

/// A point-in-time view for `status`: the core's part of what `tandemctl status --json`,
/// `/health` and `/metrics` show (the shell adds its own, `shell::status`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub name: String,
    pub role: Role,
    pub disk: DiskState,
    pub connection: Link,
    pub replication: Replication,
    pub peer: PeerStatus,
    pub quorum: bool,
    pub term: u64,
    /// Witness down while the peers are connected: replication goes on, no failover.
    pub degraded: bool,
    /// Application I/O is held (no quorum, or waiting for the witness to outdate the
    /// peer).
    pub suspended: bool,
    pub lease_ms_left: u64,
    pub witness: WitnessStatus,
    pub protocol: Protocol,
    pub out_of_sync_bytes: u64,
    pub resync: ResyncStatus,
    pub split_brain: bool,
    pub last_error: Option<String>,
    pub generation: GenStatus,
    pub writes_in_flight: usize,
    /// Application flushes not yet completed (queued behind writes or waiting).
    pub flushes_in_flight: usize,
    /// Requests the backing disk failed since the daemon started.
    pub disk_errors: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub role: Role,
    pub disk: DiskState,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WitnessStatus {
    pub connection: WitnessLinkState,
    /// Where the witness listens (the shell fills it in; absent without a witness).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    pub last_reply_ms_ago: Option<u64>,
    /// The witness's view as of its last reply.
    pub primary: String,
    pub up_to_date: Vec<String>,
    /// What is wrong with the witness (unreachable, refusing, behind the pair's term);
    /// absent while it works.
    pub problem: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResyncStatus {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub bytes_per_sec: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GenStatus {
    pub current: String,
    pub bitmap: String,
    pub history: Vec<String>,
}

/// The one timer kind the core asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// Send the next keepalive ping.
    Ping,
    /// The peer has been silent too long.
    PeerTimeout,
    /// Close an epoch that has been open long enough, so the peer flushes it and the
    /// transfer log drains even when the application never flushes.
    EpochClose,
    /// Send the next request to the witness (renewal, query, retry).
    Witness,
    /// Quorum runs out now unless a vote was renewed.
    QuorumLost,
    /// The lost primary has been silent long enough to ask for promotion.
    AutoPromote,
    /// A switchover's peer has not reported itself primary in time.
    Switchover,
    /// The preferred peer has been in sync long enough: fail back to it.
    FailBack,
    /// Write the metadata that failed again.
    MetaRetry,
}
