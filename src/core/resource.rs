//! One replicated resource as a pure state machine.
//!
//! # Driving it
//!
//! Feed events with the `handle_*` methods, each carrying `now`; then drain
//! [`Resource::poll_action`] until it returns `None` and carry every action out; arm a
//! timer for [`Resource::poll_timeout`] and call [`Resource::handle_timeout`] when it
//! fires. Nothing happens behind the driver's back: no clock is read, no thread started.
//!
//! Persist before you acknowledge: metadata changes come out as
//! [`Action::MetaWrite`], one at a time, and the core holds back every write (and every
//! acknowledgement that depends on it) until the driver reports the metadata durable with
//! [`Resource::handle_disk_done`]. A driver that completes `MetaWrite` before it is on
//! stable storage breaks the crash guarantees.
//!
//! Quorum: with a witness configured, a primary completes writes only while it has
//! quorum ([`crate::core::quorum`]); requests to the witness come out as
//! [`Action::Witness`], and the driver must answer every one, exactly once, with
//! [`Resource::handle_witness_reply`] (`None` when it timed out or the witness is
//! unreachable). A promotion granted by the witness is written to the superblock before
//! the node acts as primary of the new term.
//!
//! Buffers: application writes and received block data stay in the driver, named by
//! [`BufId`]; the core says which buffer to write, send or read into, and when the driver
//! may drop it ([`Action::ReleaseBuf`]).

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::core::al::{ActivityLog, AlBlocked, AlTxn};
use crate::core::bitmap::{Bitmap, PAGE_BYTES};
use crate::core::meta::{self, Metadata, Superblock};
use crate::core::quorum::{self, Fencing, OnNoQuorum, Votes};
use crate::core::uuid::{self, Generation, SyncDecision, UuidView};
use crate::core::wire::{self, Hello, Msg};
use crate::core::witness::{self, Op as WitnessOp};
use crate::core::witness_link::WitnessLink;
use crate::core::{Instant, Protocol, SplitMix64};

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
    fn code(self) -> u8 {
        match self {
            DiskState::UpToDate => 1,
            DiskState::Outdated => 2,
            DiskState::Inconsistent => 3,
            DiskState::Diskless => 4,
            DiskState::Unknown => 0,
        }
    }
    fn from_code(c: u8) -> DiskState {
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
    /// Ask the witness; answer with [`Resource::handle_witness_reply`] within
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
    /// peer is not connected); answer with [`Resource::handle_fence_peer_done`], with
    /// `None` if it has not exited by itself within `timeout_ms`.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerState {
    /// Not sent to the peer: its blocks are marked out of sync.
    NotReplicated,
    Sent,
    Received,
    Written,
}

/// Where the `fence-peer` handler stands since the peer was last connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FenceRun {
    NotRun,
    Running,
    /// It said the peer is fenced or outdated: promotion may proceed until the peer
    /// connects again.
    Fenced,
}

#[derive(Debug)]
struct WriteReq {
    offset: u64,
    len: u64,
    epoch: u64,
    submitted: bool,
    local_done: bool,
    local_failed: bool,
    peer: PeerState,
    completed: bool,
}

#[derive(Debug)]
struct FlushReq {
    epoch: u64,
    peer_needed: bool,
    /// `writes_completed` when the flush was issued: the writes it covers.
    covers_writes: u64,
    local_io: Option<IoId>,
    local_done: bool,
    local_failed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Write(ReqId),
    Flush(ReqId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerOpKind {
    Data { seq: u64, epoch: u64 },
    Resync,
}

#[derive(Debug)]
struct PeerOp {
    kind: PeerOpKind,
    offset: u64,
    len: u64,
    buf: BufId,
    io: Option<IoId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResyncStage {
    Reading,
    Sent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoPurpose {
    AppWrite(ReqId),
    AppFlush(ReqId),
    PeerWrite,
    PeerFlush(u64),
    TargetDoneFlush,
    ResyncRead { offset: u64, len: u64, buf: BufId },
    Meta,
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

/// What application I/O on a primary may do right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Open,
    /// Submit, but hold completions: the peer is being outdated at the witness.
    HoldCompletion,
    /// No quorum, `suspend-io`: submit nothing, complete nothing.
    Suspend,
    /// Fail everything with EIO: no quorum with `io-error`, or no longer primary.
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PromoteWant {
    manual: bool,
    /// `promote --force`: the witness is asked not to check this node's disk state.
    force: bool,
    /// A manual promotion gives up (and says why) after this.
    give_up_at: Instant,
}

/// A failed metadata write is tried again after this long.
pub const META_RETRY_MS: u64 = 1000;
const META_HELD: &str = "the metadata write failed; I/O that depends on it is held";

/// Writes per epoch at most (DRBD's max-epoch-size).
pub const MAX_EPOCH_WRITES: u64 = 1024;
/// An epoch with writes is closed after this long.
pub const EPOCH_CLOSE_MS: u64 = 100;

/// The request id of the flush a demotion or switchover issues itself (see
/// `flush_then_demote`); application request ids stay below it.
const ROLE_CHANGE_FLUSH: ReqId = ReqId(u64::MAX);

pub struct Resource {
    p: Params,
    sb: Superblock,
    bitmap: Bitmap,
    al: ActivityLog,
    rng: SplitMix64,
    role: Role,
    conn: Conn,
    peer_role: Role,
    peer_disk: DiskState,
    split_brain: bool,
    last_error: Option<String>,
    discard_my_data: bool,
    actions: VecDeque<Action>,
    next_io: u64,
    next_buf: u64,
    ios: HashMap<IoId, IoPurpose>,
    // Metadata writes, one at a time so that they land in order.
    meta_queue: VecDeque<(u64, Vec<u8>)>,
    /// The metadata write on its way, with what it writes (written again if it fails).
    meta_in_flight: Option<(IoId, u64, Vec<u8>)>,
    /// A metadata write failed: it is retried then, and nothing that depends on it
    /// moves meanwhile.
    meta_retry_at: Option<Instant>,
    /// The peer's disk failed a write of this connection (`NegAck`): it no longer holds
    /// every write, so it must be fenced like a lost peer.
    peer_disk_failed: bool,
    /// Requests the local disk failed since the start.
    disk_errors: u64,
    al_txn_queued: bool,
    // Primary side.
    pending: VecDeque<Pending>,
    writes: BTreeMap<ReqId, WriteReq>,
    flushes: BTreeMap<ReqId, FlushReq>,
    epoch: u64,
    local_pending_by_epoch: BTreeMap<u64, usize>,
    next_seq: u64,
    seq_to_req: HashMap<u64, ReqId>,
    peer_acked_epoch: Option<u64>,
    /// Transfer log: writes the peer has but may not have flushed yet, as
    /// `(epoch, offset, len)`. They keep their AL extents, and go to the bitmap if the
    /// connection drops before the epoch's barrier is acknowledged.
    tl: Vec<(u64, u64, u64)>,
    epoch_writes: u64,
    epoch_opened_at: Option<Instant>,
    // Peer (secondary) side.
    peer_ops: VecDeque<PeerOp>,
    peer_ops_by_io: HashMap<IoId, usize>,
    peer_barriers: VecDeque<u64>,
    peer_barrier_flushing: bool,
    /// The flags of the last hello sent: the comparison on this side must use what
    /// the peer was told, even if the bitmap or role changed since.
    hello_flags: u32,
    // Resync.
    resync_cursor: u64,
    resync_in_flight: Vec<(u64, u64, ResyncStage)>,
    resync_done_bytes: u64,
    resync_total_bytes: u64,
    resync_started: Instant,
    resync_done_pending_gen: Option<Generation>,
    /// A `ResyncDone` that came while this target was still starting.
    resync_done_early: Option<Generation>,
    /// The `fence-peer` handler for the current absence of the peer.
    fence: FenceRun,
    /// This sync source's target has reported its inconsistency durable.
    peer_target_durable: bool,
    /// A switchover waits until then for the peer to report itself primary.
    switchover_until: Option<Instant>,
    /// The services failed to start here and have not started since (see
    /// [`Resource::handle_services`]).
    services_failed: bool,
    /// The next demotion asks the peer to take over (services failed to start here).
    hand_over_on_demote: bool,
    /// Application writes completed, and how many of them the last completed flush
    /// covered: a demotion flushes first when they differ.
    writes_completed: u64,
    writes_flushed: u64,
    /// The demotion or switchover that waits for [`ROLE_CHANGE_FLUSH`].
    flush_then: Option<AdminCmd>,
    /// Since when a fail-back to the preferred peer could run (see `Params`).
    fail_back_ready_since: Option<Instant>,
    // Keepalive.
    last_rx: Instant,
    next_ping: Option<Instant>,
    ping_id: u64,
    pings_sent: VecDeque<(u64, Instant)>,
    // Quorum.
    votes: Votes,
    wl: WitnessLink,
    want_promote: Option<PromoteWant>,
    /// When the primary peer was last heard from, once it is lost.
    primary_lost_at: Option<Instant>,
    gate_was: Gate,
    /// A new term is on its way to the superblock: act on it only once it is there.
    term_persist: bool,
    /// The peer's `gen_term` from its hello: a sync target takes it over with the data.
    peer_gen_term: u64,
    witness_seq: u64,
    /// A promotion request went unanswered: the witness may have granted it. Until a
    /// later request is answered the node keeps away from its peer, whose primary must
    /// not count it as a vote meanwhile.
    promote_uncertain: bool,
    now: Instant,
}

impl Resource {
    /// Attach to metadata read from disk. A node found with the primary flag still set
    /// crashed as primary: its activity log is folded into the bitmap first.
    pub fn new(p: Params, md: Metadata, now: Instant) -> Resource {
        let sb = md.sb;
        let mut bitmap = Bitmap::new(sb.layout.data_bytes, sb.layout.block_bytes);
        bitmap.load(&md.bitmap_bytes);
        // Metadata written with fewer extents than any write may need (an old or
        // crafted superblock) gets the minimum: a smaller log could not serve a write
        // across an extent boundary.
        let mut al = ActivityLog::new(
            (sb.al_extents as usize).max(crate::core::al::MIN_EXTENTS),
            sb.al_extent_bytes,
            sb.layout.al_slots,
        );
        if let Some(txn) = AlTxn::newest_in_ring(&md.al_ring) {
            al.restore(&txn);
        }
        let rng = SplitMix64(p.seed);
        let witness_seq = p.witness_seq_base;
        let mut r = Resource {
            p,
            sb,
            bitmap,
            al,
            rng,
            role: Role::Secondary,
            conn: Conn::Connecting,
            peer_role: Role::Unknown,
            peer_disk: DiskState::Unknown,
            split_brain: false,
            last_error: None,
            discard_my_data: false,
            actions: VecDeque::new(),
            next_io: 1,
            next_buf: 1,
            ios: HashMap::new(),
            meta_queue: VecDeque::new(),
            meta_in_flight: None,
            meta_retry_at: None,
            peer_disk_failed: false,
            disk_errors: 0,
            al_txn_queued: false,
            pending: VecDeque::new(),
            writes: BTreeMap::new(),
            flushes: BTreeMap::new(),
            epoch: 1,
            local_pending_by_epoch: BTreeMap::new(),
            next_seq: 1,
            seq_to_req: HashMap::new(),
            peer_acked_epoch: None,
            tl: Vec::new(),
            epoch_writes: 0,
            epoch_opened_at: None,
            peer_ops: VecDeque::new(),
            peer_ops_by_io: HashMap::new(),
            peer_barriers: VecDeque::new(),
            peer_barrier_flushing: false,
            hello_flags: 0,
            resync_cursor: 0,
            resync_in_flight: Vec::new(),
            resync_done_bytes: 0,
            resync_total_bytes: 0,
            resync_started: now,
            resync_done_pending_gen: None,
            resync_done_early: None,
            fence: FenceRun::NotRun,
            peer_target_durable: false,
            switchover_until: None,
            services_failed: false,
            hand_over_on_demote: false,
            writes_completed: 0,
            writes_flushed: 0,
            flush_then: None,
            fail_back_ready_since: None,
            last_rx: now,
            next_ping: None,
            ping_id: 0,
            pings_sent: VecDeque::new(),
            votes: Votes {
                peer_fresh_until: None,
                lease_until: None,
                peer_counts: true,
            },
            wl: WitnessLink::new(now),
            want_promote: None,
            primary_lost_at: None,
            gate_was: Gate::Open,
            term_persist: false,
            peer_gen_term: 0,
            witness_seq,
            promote_uncertain: false,
            now,
        };
        if r.sb.has(meta::FLAG_PRIMARY_ACTIVE) {
            let extents: Vec<u32> = r.al.active_extents().to_vec();
            let eb = r.al.extent_bytes();
            for e in &extents {
                r.bitmap.set_range(*e as u64 * eb, eb);
            }
            tracing::warn!(
                resource = %r.p.resource,
                extents = extents.len(),
                "crashed as primary: activity log marked out of sync"
            );
            r.sb.set(meta::FLAG_PRIMARY_ACTIVE, false);
            r.sb.set(meta::FLAG_CRASHED_PRIMARY, true);
            r.persist_dirty_pages();
            r.persist_superblock();
        }
        r.actions.push_back(Action::SetConnect(true));
        r
    }

    // ----- queries -------------------------------------------------------------------

    pub fn role(&self) -> Role {
        self.role
    }
    pub fn conn(&self) -> Conn {
        self.conn
    }
    pub fn generation(&self) -> Generation {
        self.sb.gen
    }
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }
    pub fn bitmap(&self) -> &Bitmap {
        &self.bitmap
    }
    pub fn data_bytes(&self) -> u64 {
        self.sb.layout.data_bytes
    }
    /// The highest term this node has seen.
    pub fn term(&self) -> u64 {
        self.sb.term
    }

    /// Quorum at the last `now`: always for a node without a witness (DRBD's `quorum
    /// off`); for a primary its peer or its lease; for a secondary, that it can reach one
    /// of the other two.
    pub fn has_quorum(&self) -> bool {
        if !self.p.witness {
            return true;
        }
        match self.role {
            Role::Primary => self.votes.quorum(self.now),
            _ => self.connected() || self.wl.reachable,
        }
    }

    /// The pair runs, but without a working witness: no automatic failover, and no
    /// fencing if the peer is lost (the witness is unreachable, or refuses what the
    /// node needs, say because it lost its state).
    fn degraded(&self) -> bool {
        self.p.witness && self.connected() && self.wl.trouble.is_some()
    }

    fn gate(&self) -> Gate {
        if self.role != Role::Primary {
            return Gate::Fail;
        }
        if !self.p.witness {
            return Gate::Open;
        }
        if !self.votes.quorum(self.now) {
            return match self.p.on_no_quorum {
                OnNoQuorum::SuspendIo => Gate::Suspend,
                OnNoQuorum::IoError => Gate::Fail,
            };
        }
        // In every protocol: a write or flush completed after the peer was lost may be
        // one the peer lacks (A and B complete without its disk), so the peer must be
        // on record as outdated first, or it could be promoted without it.
        if self.fence_needed() {
            return Gate::HoldCompletion;
        }
        Gate::Open
    }

    /// Application I/O is being held back.
    pub fn io_suspended(&self) -> bool {
        self.role == Role::Primary && matches!(self.gate(), Gate::Suspend | Gate::HoldCompletion)
    }

    pub fn disk_state(&self) -> DiskState {
        if !self.sb.has(meta::FLAG_CONSISTENT) {
            DiskState::Inconsistent
        } else if self.sb.has(meta::FLAG_OUTDATED) {
            DiskState::Outdated
        } else {
            DiskState::UpToDate
        }
    }

    fn connected(&self) -> bool {
        !matches!(self.conn, Conn::StandAlone | Conn::Connecting)
    }

    /// Application writes go to the peer.
    fn replicating(&self) -> bool {
        matches!(self.conn, Conn::Established | Conn::SyncSource)
    }

    /// Nothing in flight anywhere: what the simulator waits for before comparing disks.
    pub fn is_idle(&self) -> bool {
        self.writes.is_empty()
            && self.flushes.is_empty()
            && self.pending.is_empty()
            && self.peer_ops.is_empty()
            && self.peer_barriers.is_empty()
            && self.meta_in_flight.is_none()
            && self.meta_queue.is_empty()
            && self.resync_in_flight.is_empty()
            && self.resync_done_pending_gen.is_none()
            && self.tl.is_empty()
    }

    /// What `events` reports a change of: cheap enough to compare after every event.
    pub fn state_key(&self) -> StateKey {
        StateKey {
            role: self.role,
            disk: self.disk_state(),
            conn: self.conn,
            peer_role: self.peer_role,
            peer_disk: self.peer_disk,
            split_brain: self.split_brain,
            quorum: self.has_quorum(),
            term: self.sb.term,
            degraded: self.degraded(),
            suspended: self.io_suspended(),
        }
    }

    pub fn status(&self) -> Status {
        let (connection, replication) = match self.conn {
            Conn::StandAlone => (Link::Standalone, Replication::Off),
            Conn::Connecting => (Link::Connecting, Replication::Off),
            Conn::WfHello => (Link::Connected, Replication::Handshake),
            Conn::WfBitmap { .. } | Conn::SyncStarting { .. } => {
                (Link::Connected, Replication::WfBitmap)
            }
            Conn::Established => (Link::Connected, Replication::Established),
            Conn::SyncSource => (Link::Connected, Replication::SyncSource),
            Conn::SyncTarget => (Link::Connected, Replication::SyncTarget),
        };
        let elapsed_ms = self.now.ms_since(self.resync_started).max(1);
        let syncing = matches!(self.conn, Conn::SyncSource | Conn::SyncTarget);
        let hex = |u: u64| format!("{u:016X}");
        Status {
            name: self.p.resource.clone(),
            role: self.role,
            disk: self.disk_state(),
            connection,
            replication,
            peer: PeerStatus {
                name: self.p.peer_node.clone(),
                role: if self.connected() {
                    self.peer_role
                } else {
                    Role::Unknown
                },
                disk: if self.connected() {
                    self.peer_disk
                } else {
                    DiskState::Unknown
                },
            },
            quorum: self.has_quorum(),
            term: self.sb.term,
            degraded: self.degraded(),
            suspended: self.io_suspended(),
            lease_ms_left: if self.role == Role::Primary {
                self.votes.lease_left_ms(self.now)
            } else {
                0
            },
            witness: WitnessStatus {
                connection: match (self.p.witness, self.wl.reachable) {
                    (false, _) => WitnessLinkState::None,
                    (true, true) => WitnessLinkState::Connected,
                    (true, false) => WitnessLinkState::Unreachable,
                },
                address: None,
                last_reply_ms_ago: self.wl.last_reply.map(|t| self.now.ms_since(t)),
                primary: self.wl.primary.clone(),
                up_to_date: self.wl.up_to_date.clone(),
                problem: self.wl.trouble.clone(),
            },
            protocol: self.p.protocol,
            out_of_sync_bytes: self.bitmap.out_of_sync_bytes(),
            resync: ResyncStatus {
                done_bytes: self.resync_done_bytes,
                total_bytes: self.resync_total_bytes,
                bytes_per_sec: if syncing {
                    self.resync_done_bytes * 1000 / elapsed_ms
                } else {
                    0
                },
            },
            split_brain: self.split_brain,
            last_error: self.last_error.clone(),
            generation: GenStatus {
                current: hex(self.sb.gen.current),
                bitmap: hex(self.sb.gen.bitmap),
                history: self.sb.gen.history.iter().map(|&h| hex(h)).collect(),
            },
            writes_in_flight: self.writes.len(),
            flushes_in_flight: self.flushes.len(),
            disk_errors: self.disk_errors,
        }
    }

    // ----- outputs -------------------------------------------------------------------

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The earliest deadline at which [`Resource::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = self.timer_deadlines();
        t.iter().filter_map(|(_, d)| *d).min()
    }

    fn timer_deadlines(&self) -> [(Timer, Option<Instant>); 9] {
        let connected = self.connected();
        let witness_due = self.p.witness.then(|| self.wl.due()).flatten();
        let quorum_lost = (self.p.witness && self.role == Role::Primary)
            .then(|| self.votes.quorum_until(self.now))
            .flatten();
        let auto_promote = match (self.auto_promote_possible(), self.primary_lost_at) {
            (true, Some(t)) if self.want_promote.is_none() => Some(quorum::promote_not_before(
                t,
                self.p.ping_timeout_ms,
                self.p.promote_margin_ms,
            )),
            _ => None,
        };
        [
            (Timer::MetaRetry, self.meta_retry_at),
            (
                Timer::FailBack,
                self.fail_back_ready_since
                    .map(|t| t.plus_ms(self.p.fail_back_delay_ms)),
            ),
            (Timer::Switchover, self.switchover_until),
            (Timer::Witness, witness_due),
            (Timer::QuorumLost, quorum_lost),
            (Timer::AutoPromote, auto_promote),
            (
                Timer::EpochClose,
                self.epoch_opened_at.map(|t| t.plus_ms(EPOCH_CLOSE_MS)),
            ),
            (Timer::Ping, if connected { self.next_ping } else { None }),
            (
                Timer::PeerTimeout,
                connected.then(|| self.last_rx.plus_ms(self.p.ping_timeout_ms)),
            ),
        ]
    }

    // ----- inputs --------------------------------------------------------------------

    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        for (timer, deadline) in self.timer_deadlines() {
            let Some(d) = deadline else { continue };
            if d > now {
                continue;
            }
            match timer {
                Timer::Ping => {
                    self.ping_id += 1;
                    self.send(Msg::Ping { id: self.ping_id });
                    if self.pings_sent.len() >= 64 {
                        self.pings_sent.pop_front();
                    }
                    self.pings_sent.push_back((self.ping_id, now));
                    self.next_ping = Some(now.plus_ms(self.p.ping_interval_ms));
                }
                Timer::EpochClose => self.close_epoch(),
                Timer::PeerTimeout => {
                    if self.connected() {
                        self.drop_connection(format!(
                            "peer silent for {} ms",
                            now.ms_since(self.last_rx)
                        ));
                    }
                }
                Timer::Witness => {
                    // Nothing urgent: the periodic renewal or query.
                    self.wl.next_at = now.plus_ms(self.p.lease_ms / 3);
                    self.witness_tick(true);
                }
                Timer::QuorumLost => {}
                Timer::MetaRetry => {
                    self.meta_retry_at = None;
                    self.issue_meta();
                }
                Timer::FailBack => {
                    // Once per period of readiness; re-armed if it is still ready later.
                    self.fail_back_ready_since = None;
                    tracing::info!(resource = %self.p.resource, peer = %self.p.peer_node, "fail-back: handing over to the preferred node");
                    self.actions.push_back(Action::FailBack);
                }
                Timer::Switchover => {
                    self.switchover_until = None;
                    self.actions
                        .push_back(Action::AdminDone(Err(AdminError::PeerDidNotTakeOver)));
                }
                Timer::AutoPromote => {
                    if self.auto_promote_possible() {
                        tracing::warn!(
                            resource = %self.p.resource,
                            silent_ms = self.primary_lost_at.map_or(0, |t| now.ms_since(t)),
                            "primary lost: asking the witness to promote this node"
                        );
                        self.want_promote = Some(PromoteWant {
                            manual: false,
                            force: false,
                            give_up_at: now,
                        });
                        self.witness_tick(false);
                    }
                    self.primary_lost_at = None;
                }
            }
        }
        self.check_gate();
    }

    pub fn handle_app_write(&mut self, now: Instant, req: ReqId, offset: u64, len: u64) {
        self.on_app_write(now, req, offset, len);
        self.check_gate();
    }

    fn on_app_write(&mut self, now: Instant, req: ReqId, offset: u64, len: u64) {
        self.now = now;
        let err = if self.role != Role::Primary {
            Some(ReqError::ReadOnly)
        } else if len == 0
            || offset
                .checked_add(len)
                .is_none_or(|e| e > self.data_bytes())
        {
            Some(ReqError::OutOfRange)
        } else {
            None
        };
        if let Some(e) = err {
            self.actions.push_back(Action::CompleteWrite {
                req,
                result: Err(e),
            });
            self.actions.push_back(Action::ReleaseBuf(BufId(req.0)));
            return;
        }
        self.writes.insert(
            req,
            WriteReq {
                offset,
                len,
                epoch: 0,
                submitted: false,
                local_done: false,
                local_failed: false,
                peer: PeerState::NotReplicated,
                completed: false,
            },
        );
        self.pending.push_back(Pending::Write(req));
        self.pump();
    }

    pub fn handle_app_flush(&mut self, now: Instant, req: ReqId) {
        self.on_app_flush(now, req);
        self.check_gate();
    }

    fn on_app_flush(&mut self, now: Instant, req: ReqId) {
        self.now = now;
        self.flushes.insert(
            req,
            FlushReq {
                epoch: 0,
                peer_needed: false,
                covers_writes: 0,
                local_io: None,
                local_done: false,
                local_failed: false,
            },
        );
        self.pending.push_back(Pending::Flush(req));
        self.pump();
    }

    pub fn handle_disk_done(&mut self, now: Instant, io: IoId, ok: bool) {
        self.on_disk_done(now, io, ok);
        self.check_gate();
    }

    fn on_disk_done(&mut self, now: Instant, io: IoId, ok: bool) {
        self.now = now;
        let Some(purpose) = self.ios.remove(&io) else {
            return;
        };
        match purpose {
            IoPurpose::AppWrite(req) => self.app_write_done(req, ok),
            IoPurpose::AppFlush(req) => {
                if let Some(f) = self.flushes.get_mut(&req) {
                    f.local_done = true;
                    f.local_failed = !ok;
                }
                if !ok {
                    // Which completed writes did not reach the platter is unknown: every
                    // recent one counts as out of sync (the activity log covers them).
                    // This node's own writes: its data is no older than the peer's, so it
                    // is not outdated for it (a demotion may have made it secondary
                    // meanwhile); the resync settles the blocks.
                    self.mark_active_extents_out_of_sync();
                    self.local_disk_failed("the disk failed a flush".into(), false);
                }
                self.check_flushes();
            }
            IoPurpose::PeerWrite => self.peer_write_done(io, ok),
            IoPurpose::PeerFlush(_) if !ok => {
                // No barrier ack: the primary must not count the epoch as durable here.
                self.peer_barrier_flushing = false;
                self.local_disk_failed("the disk failed a flush for the peer".into(), true);
            }
            IoPurpose::TargetDoneFlush if !ok => {
                self.resync_done_pending_gen = None;
                self.local_disk_failed("the disk failed the flush ending the resync".into(), true);
            }
            IoPurpose::PeerFlush(epoch) => {
                self.peer_barrier_flushing = false;
                if self.peer_barriers.front() == Some(&epoch) {
                    self.peer_barriers.pop_front();
                    if self.connected() {
                        self.send(Msg::BarrierAck { epoch });
                    }
                }
                self.check_peer_barriers();
            }
            IoPurpose::TargetDoneFlush => {
                if let Some(gen) = self.resync_done_pending_gen.take() {
                    self.sb.gen = gen;
                    self.sb.gen_term = self.peer_gen_term;
                    self.sb.set(meta::FLAG_CONSISTENT, true);
                    self.sb.set(meta::FLAG_OUTDATED, false);
                    self.sb.set(meta::FLAG_CRASHED_PRIMARY, false);
                    self.bitmap.clear_all();
                    self.persist_dirty_pages();
                    self.persist_superblock();
                    tracing::info!(resource = %self.p.resource, "resync finished: up to date");
                    // The peer may have heard "inconsistent" from this side after it
                    // finished sending (a resync with nothing to send): correct it.
                    self.send_state();
                    // The connection that delivered the end of the resync may be gone
                    // and a new handshake under way with a hello that still says
                    // inconsistent: the peer would decide on stale facts.
                    if !matches!(
                        self.conn,
                        Conn::Established | Conn::Connecting | Conn::StandAlone
                    ) {
                        self.restart_handshake("resync finished during the handshake");
                    }
                }
            }
            IoPurpose::ResyncRead { offset, len, buf } => {
                let entry = self
                    .resync_in_flight
                    .iter_mut()
                    .find(|e| e.0 == offset && e.1 == len && e.2 == ResyncStage::Reading);
                match entry {
                    Some(e) if ok && self.conn == Conn::SyncSource => {
                        e.2 = ResyncStage::Sent;
                        self.send_with(
                            Msg::ResyncData {
                                offset,
                                len: len as u32,
                            },
                            Some(buf),
                        );
                    }
                    _ => {
                        self.resync_in_flight.retain(|e| {
                            !(e.0 == offset && e.1 == len && e.2 == ResyncStage::Reading)
                        });
                        if !ok {
                            self.last_error =
                                Some(format!("read error at byte {offset} during resync"));
                        }
                    }
                }
                self.actions.push_back(Action::ReleaseBuf(buf));
                self.pump();
                self.pump_resync();
            }
            IoPurpose::Meta => {
                let done = self.meta_in_flight.take();
                if !ok {
                    // Nothing may act on metadata that is not on disk: the write goes back
                    // to the head of the queue and is tried again in a second; what
                    // waits for it (writes, acknowledgements) waits on.
                    if let Some((_, offset, bytes)) = done {
                        self.meta_queue.push_front((offset, bytes));
                    }
                    self.meta_retry_at = Some(now.plus_ms(META_RETRY_MS));
                    if self.last_error.as_deref() != Some(META_HELD) {
                        self.local_disk_failed(
                            format!("{META_HELD}; retrying every second"),
                            false,
                        );
                        self.last_error = Some(META_HELD.into());
                    }
                    return;
                }
                if self.last_error.as_deref() == Some(META_HELD) {
                    self.last_error = None;
                }
                self.issue_meta();
                if self.meta_in_flight.is_none() {
                    self.al_txn_queued = false;
                    self.on_meta_idle();
                }
            }
        }
    }

    /// The transport connected and authenticated the peer.
    pub fn handle_peer_connected(&mut self, now: Instant) {
        self.on_peer_connected(now);
        self.check_gate();
    }

    fn on_peer_connected(&mut self, now: Instant) {
        self.now = now;
        if self.conn != Conn::Connecting {
            return;
        }
        self.conn = Conn::WfHello;
        // A peer that can connect is not fenced (any more): fence it again next time.
        self.fence = FenceRun::NotRun;
        self.peer_role = Role::Unknown;
        self.peer_disk = DiskState::Unknown;
        self.last_rx = now;
        // Ping at once: the peer counts toward quorum only once it answered one.
        self.next_ping = Some(now);
        self.pings_sent.clear();
        self.votes.peer_fresh_until = None;
        let mut flags = 0;
        if self.sb.has(meta::FLAG_CRASHED_PRIMARY) {
            flags |= wire::HELLO_CRASHED_PRIMARY;
        }
        match self.disk_state() {
            DiskState::Inconsistent => flags |= wire::HELLO_INCONSISTENT,
            DiskState::Outdated => flags |= wire::HELLO_OUTDATED,
            _ => {}
        }
        if self.role == Role::Primary {
            flags |= wire::HELLO_PRIMARY;
        }
        if self.discard_my_data {
            flags |= wire::HELLO_DISCARD_MY_DATA;
        }
        if self.bitmap.count() > 0 {
            flags |= wire::HELLO_OUT_OF_SYNC;
        }
        self.hello_flags = flags;
        self.send(Msg::Hello(Hello {
            version: wire::PROTOCOL_VERSION,
            resource: self.p.resource.clone(),
            node: self.p.local_node.clone(),
            data_bytes: self.data_bytes(),
            block_bytes: self.sb.layout.block_bytes,
            gen: self.sb.gen,
            flags,
            gen_term: self.sb.gen_term,
        }));
    }

    /// The transport lost the peer (EOF, error, reset).
    pub fn handle_peer_disconnected(&mut self, now: Instant, reason: &str) {
        self.on_peer_disconnected(now, reason);
        self.check_gate();
    }

    fn on_peer_disconnected(&mut self, now: Instant, reason: &str) {
        self.now = now;
        if !self.connected() {
            return;
        }
        tracing::warn!(resource = %self.p.resource, %reason, "peer connection lost");
        self.forget_peer(Conn::Connecting);
    }

    /// A message from the peer, with the term its frame header carried.
    pub fn handle_peer_message(&mut self, now: Instant, term: u64, msg: Msg, buf: Option<BufId>) {
        self.now = now;
        self.last_rx = now;
        if !self.connected() {
            if let Some(b) = buf {
                self.actions.push_back(Action::ReleaseBuf(b));
            }
            return;
        }
        if self.peer_role == Role::Primary {
            self.primary_lost_at = None;
        }
        match msg {
            // The handshake is how a node that was away learns the newer term.
            Msg::Hello(h) => self.on_hello(h, term),
            msg if term < self.sb.term && Self::needs_current_term(&msg) => {
                let what = format!(
                    "{} from term {term}, this node is at term {}",
                    Self::msg_name(&msg),
                    self.sb.term
                );
                self.protocol_error(&what, buf);
            }
            msg => {
                self.adopt_term(term, "the peer");
                self.dispatch_peer_message(msg, buf);
            }
        }
        self.check_gate();
    }

    /// Messages that carry authority (writes, resync data, bitmaps, a primary's claim)
    /// are refused from an older term. Acknowledgements and pings are not: a secondary
    /// that has not yet seen the newer term sends them in good faith.
    fn needs_current_term(msg: &Msg) -> bool {
        matches!(
            msg,
            Msg::Data { .. }
                | Msg::ResyncData { .. }
                | Msg::BitmapRuns { .. }
                | Msg::BitmapEnd
                | Msg::ResyncDone { .. }
                | Msg::Barrier { .. }
                | Msg::State { primary: true, .. }
                | Msg::Handover
        )
    }

    fn msg_name(msg: &Msg) -> &'static str {
        match msg {
            Msg::Data { .. } => "a write",
            Msg::ResyncData { .. } => "resync data",
            Msg::BitmapRuns { .. } | Msg::BitmapEnd => "a bitmap",
            Msg::ResyncDone { .. } => "resync-done",
            Msg::Barrier { .. } => "a barrier",
            Msg::State { .. } => "a primary's state",
            _ => "a message",
        }
    }

    fn dispatch_peer_message(&mut self, msg: Msg, buf: Option<BufId>) {
        match msg {
            Msg::Hello(_) => self.protocol_error("unexpected hello", buf),
            Msg::BitmapRuns { runs } => {
                let n = self.bitmap.nbits();
                for (s, l) in runs {
                    if s < n {
                        self.bitmap.set_bits(s..s.saturating_add(l).min(n));
                    }
                }
            }
            Msg::BitmapEnd => self.on_bitmap_end(),
            Msg::Handover => self.on_handover(),
            Msg::Data {
                seq,
                epoch,
                offset,
                len,
            } => match buf {
                Some(b) if self.role != Role::Primary && self.in_range(offset, len as u64) => {
                    if self.p.protocol == Protocol::B {
                        self.send(Msg::RecvAck { seq });
                    }
                    self.peer_ops.push_back(PeerOp {
                        kind: PeerOpKind::Data { seq, epoch },
                        offset,
                        len: len as u64,
                        buf: b,
                        io: None,
                    });
                    self.pump_peer();
                }
                _ => self.protocol_error("data write not acceptable here", buf),
            },
            Msg::ResyncData { offset, len } => match buf {
                Some(b)
                    if matches!(
                        self.conn,
                        Conn::SyncTarget | Conn::SyncStarting { source: false }
                    ) && self.in_range(offset, len as u64) =>
                {
                    self.peer_ops.push_back(PeerOp {
                        kind: PeerOpKind::Resync,
                        offset,
                        len: len as u64,
                        buf: b,
                        io: None,
                    });
                    self.pump_peer();
                }
                _ => self.protocol_error("resync data while not sync target", buf),
            },
            Msg::Barrier { epoch } => {
                self.peer_barriers.push_back(epoch);
                self.check_peer_barriers();
            }
            Msg::RecvAck { seq } => self.peer_ack(seq, PeerState::Received),
            Msg::WriteAck { seq } => self.peer_ack(seq, PeerState::Written),
            Msg::NegAck { seq } => {
                // The peer's disk failed this write: it is no longer a full copy. Its
                // blocks are out of sync, and the peer must be fenced (recorded as
                // outdated at the witness) before this or any later write completes,
                // as if it had been lost: in C the write does not count as replicated.
                if !self.peer_disk_failed {
                    tracing::error!(resource = %self.p.resource, peer = %self.p.peer_node, "the peer's disk failed a write: it is outdated until a resync");
                }
                self.peer_disk_failed = true;
                self.peer_disk = DiskState::Outdated;
                if let Some(req) = self.seq_to_req.remove(&seq) {
                    if let Some(w) = self.writes.get_mut(&req) {
                        w.peer = PeerState::NotReplicated;
                        let (offset, len) = (w.offset, w.len);
                        self.mark_out_of_sync(offset, len);
                    }
                    self.try_complete(req);
                }
            }
            Msg::BarrierAck { epoch } => {
                self.peer_acked_epoch = Some(self.peer_acked_epoch.map_or(epoch, |e| e.max(epoch)));
                let al = &mut self.al;
                self.tl.retain(|&(e, off, len)| {
                    let keep = e > epoch;
                    if !keep {
                        al.release(al.extents_of(off, len));
                    }
                    keep
                });
                self.check_flushes();
                self.pump();
            }
            Msg::ResyncAck { offset, len, ok } => {
                let before = self.resync_in_flight.len();
                self.resync_in_flight
                    .retain(|e| !(e.0 == offset && e.1 == len as u64 && e.2 == ResyncStage::Sent));
                if self.resync_in_flight.len() < before {
                    if ok {
                        self.bitmap.clear_range(offset, len as u64);
                        self.resync_done_bytes += len as u64;
                    }
                    self.pump_resync();
                }
            }
            Msg::ResyncDone { gen } => match self.conn {
                Conn::SyncTarget => self.target_resync_done(gen),
                // A source with nothing to send finishes before this side has made its
                // resync set durable; finish once it has.
                Conn::SyncStarting { source: false } => self.resync_done_early = Some(gen),
                _ => self.protocol_error("resync-done while not sync target", None),
            },
            Msg::State { primary, disk } => {
                self.peer_role = if primary {
                    Role::Primary
                } else {
                    Role::Secondary
                };
                self.peer_disk = DiskState::from_code(disk);
                if primary && self.switchover_until.take().is_some() {
                    tracing::info!(resource = %self.p.resource, peer = %self.p.peer_node, "switchover: the peer is primary");
                    self.actions.push_back(Action::AdminDone(Ok(())));
                }
                // A sync target says so only once its inconsistency is on disk: from
                // then on a crash of it cannot bring back an older, up-to-date-looking
                // disk, and writes it misses need no fencing.
                if self.peer_disk == DiskState::Inconsistent
                    && matches!(
                        self.conn,
                        Conn::SyncSource | Conn::SyncStarting { source: true }
                    )
                {
                    self.peer_target_durable = true;
                }
            }
            Msg::Ping { id } => self.send(Msg::PingAck { id }),
            Msg::PingAck { id } => {
                // The peer was alive when it answered, which is after the ping was sent:
                // count it as present from the send time, never from the receipt.
                while let Some(&(pid, sent)) = self.pings_sent.front() {
                    if pid > id {
                        break;
                    }
                    self.pings_sent.pop_front();
                    if pid == id {
                        self.note_quorum_loss();
                        let until = sent.plus_ms(self.p.ping_timeout_ms);
                        self.votes.peer_fresh_until =
                            Some(self.votes.peer_fresh_until.map_or(until, |t| t.max(until)));
                    }
                }
            }
            Msg::AuthChallenge { .. }
            | Msg::AuthResponse { .. }
            | Msg::AuthProof { .. }
            | Msg::Attach { .. } => self.protocol_error("handshake message after handshake", buf),
            Msg::WitnessRequest(_) | Msg::WitnessReply(_) => {
                self.protocol_error("witness message on a peer connection", buf)
            }
        }
    }

    /// The shell's promoter started every service on this node (`started`), or one failed
    /// to start and the node is about to demote. After a failure the demotion asks a
    /// connected, up-to-date peer to take over (as a switchover does), and this node
    /// declines such a request itself until its services start again: two nodes that
    /// both cannot start them hand the role over once, not back and forth.
    pub fn handle_services(&mut self, started: bool) {
        self.services_failed = !started;
        self.hand_over_on_demote = !started && self.role == Role::Primary;
    }

    /// An operator command. `Ok(Pending)` means the answer follows as
    /// [`Action::AdminDone`] (promotion through the witness, a demotion that flushes
    /// first, a switchover).
    pub fn handle_admin(&mut self, now: Instant, cmd: AdminCmd) -> Result<AdminReply, AdminError> {
        self.now = now;
        let out = self.admin(cmd);
        self.check_gate();
        out
    }

    fn admin(&mut self, cmd: AdminCmd) -> Result<AdminReply, AdminError> {
        let done = |r: Result<(), AdminError>| r.map(|()| AdminReply::Done);
        match cmd {
            AdminCmd::Promote { force } => {
                if self.role == Role::Primary {
                    return Ok(AdminReply::Done);
                }
                if self.want_promote.is_some_and(|w| w.manual) {
                    return Err(AdminError::PromoteInProgress);
                }
                // `--force` overrides the disk check only: with a witness the node still
                // takes a new term from it (and fencing still runs) like any promotion.
                match self.promote_precheck() {
                    Err(AdminError::NotUpToDate(_)) if force => {}
                    r => r?,
                }
                if !self.p.witness && (force || self.stonith_allows_promotion()) {
                    if force && self.p.fencing == Fencing::Stonith && !self.connected() {
                        tracing::warn!(resource = %self.p.resource, "forced promotion: the fence-peer handler is not run");
                    }
                    return done(self.promote(force));
                }
                let fence_ms = if self.p.fencing == Fencing::Stonith {
                    self.p.fence_peer_timeout_ms
                } else {
                    0
                };
                self.want_promote = Some(PromoteWant {
                    manual: true,
                    force,
                    give_up_at: self
                        .now
                        .plus_ms(2 * self.p.lease_ms + self.p.ping_timeout_ms + fence_ms),
                });
                self.witness_tick(false);
                Ok(AdminReply::Pending)
            }
            AdminCmd::Demote => {
                if self.role != Role::Primary {
                    return Ok(AdminReply::Done);
                }
                self.flush_then_demote(cmd)
            }
            AdminCmd::Switchover => {
                self.switchover_precheck()?;
                self.flush_then_demote(cmd)?;
                Ok(AdminReply::Pending)
            }
            AdminCmd::Connect { discard_my_data } => {
                if discard_my_data && self.role == Role::Primary {
                    return Err(AdminError::IsPrimary);
                }
                self.discard_my_data = discard_my_data;
                self.split_brain = false;
                if self.conn == Conn::StandAlone {
                    self.conn = Conn::Connecting;
                }
                self.actions.push_back(Action::SetConnect(true));
                Ok(AdminReply::Done)
            }
            AdminCmd::Disconnect => {
                if self.connected() {
                    self.forget_peer(Conn::StandAlone);
                    self.actions.push_back(Action::Disconnect {
                        reason: "disconnect requested".into(),
                    });
                }
                self.conn = Conn::StandAlone;
                self.actions.push_back(Action::SetConnect(false));
                Ok(AdminReply::Done)
            }
            AdminCmd::AdoptWitness { force } => {
                if !self.p.witness {
                    return Err(AdminError::NoWitness);
                }
                if self.wl.adopt.is_some() {
                    return Err(AdminError::Busy(1));
                }
                if !force && self.conn != Conn::Established {
                    return Err(AdminError::AdoptNeedsPeer);
                }
                self.wl.adopt = Some(force);
                self.witness_tick(false);
                Ok(AdminReply::Pending)
            }
            AdminCmd::Invalidate => {
                if self.role == Role::Primary {
                    return Err(AdminError::IsPrimary);
                }
                self.sb.gen = Generation::just_created();
                self.sb.set(meta::FLAG_CONSISTENT, false);
                self.sb.set(meta::FLAG_CRASHED_PRIMARY, false);
                self.bitmap.set_all();
                self.persist_dirty_pages();
                self.persist_superblock();
                if self.connected() {
                    self.restart_handshake("invalidate: full resync from the peer");
                }
                Ok(AdminReply::Done)
            }
        }
    }

    // ----- roles ---------------------------------------------------------------------

    /// What refuses a switchover before anything is stopped: the peer must be connected
    /// and hold every write, or handing over would lose data.
    pub fn switchover_precheck(&self) -> Result<(), AdminError> {
        if self.role != Role::Primary {
            return Err(AdminError::NotPrimary);
        }
        if self.conn != Conn::Established
            || self.peer_disk != DiskState::UpToDate
            || self.bitmap.count() > 0
        {
            return Err(AdminError::PeerNotReady(format!(
                "replication {}, peer disk {:?}, {} bytes out of sync",
                self.status().replication.as_str(),
                self.peer_disk,
                self.bitmap.out_of_sync_bytes()
            )));
        }
        Ok(())
    }

    /// A demotion ends the activity log's cover of this node's writes, and a switchover
    /// hands them to the peer: writes completed but not yet flushed, on either disk, could
    /// then be lost in a crash on one side only, and nothing would mark them out of sync.
    /// So they are flushed first (the local disk and, in B and C, the peer's, as an
    /// application flush), and `cmd` finishes when that flush does.
    fn flush_then_demote(&mut self, cmd: AdminCmd) -> Result<AdminReply, AdminError> {
        self.no_requests_in_flight()?;
        if self.flush_then.is_some() {
            return Err(AdminError::Busy(1));
        }
        // Without quorum the flush could not complete; the demotion goes ahead as before.
        if self.writes_completed > self.writes_flushed && matches!(self.gate(), Gate::Open) {
            self.flush_then = Some(cmd);
            let now = self.now;
            self.on_app_flush(now, ROLE_CHANGE_FLUSH);
            return Ok(AdminReply::Pending);
        }
        self.demote_now(cmd)
    }

    /// Demote now (nothing unflushed): for a switchover, ask the peer to take over; after
    /// failed services, ask it too if it is ready.
    fn demote_now(&mut self, cmd: AdminCmd) -> Result<AdminReply, AdminError> {
        if self.role != Role::Primary {
            return Ok(AdminReply::Done);
        }
        let switchover = cmd == AdminCmd::Switchover;
        if switchover {
            self.switchover_precheck()?;
        }
        let hand_over =
            switchover || (self.hand_over_on_demote && self.switchover_precheck().is_ok());
        self.demote()?;
        self.hand_over_on_demote = false;
        if hand_over {
            // After our State: the peer sees a secondary, then the request.
            self.send(Msg::Handover);
        }
        if !switchover {
            if hand_over {
                tracing::info!(resource = %self.p.resource, "services failed to start here: asked the peer to take over");
            }
            return Ok(AdminReply::Done);
        }
        self.switchover_until = Some(
            self.now
                .plus_ms(2 * self.p.lease_ms + 2 * self.p.ping_timeout_ms),
        );
        Ok(AdminReply::Pending)
    }

    /// A role change waits until no application request is in flight.
    fn no_requests_in_flight(&self) -> Result<(), AdminError> {
        match self.writes.len() + self.pending.len() {
            0 => Ok(()),
            n => Err(AdminError::Busy(n)),
        }
    }

    fn demote(&mut self) -> Result<(), AdminError> {
        self.no_requests_in_flight()?;
        self.become_secondary();
        self.send_state();
        Ok(())
    }

    /// The role change itself, persisted, shared by a demotion and a step-down.
    ///
    /// Clearing the primary flag ends the activity log's cover of this node's writes. A
    /// write that is not yet durable on both disks (completed since the last flush that
    /// both sides confirmed, or still in the transfer log) could then be lost by a crash
    /// on one side only with no bitmap bit saying so. A demotion normally flushes first
    /// (`flush_then_demote`); when it could not (no quorum, or a step-down), the active
    /// extents go to the bitmap, as a crash would have put them, before the flag clears.
    fn become_secondary(&mut self) {
        self.role = Role::Secondary;
        if !self.tl.is_empty() || self.writes_completed > self.writes_flushed {
            let extents = self.mark_active_extents_out_of_sync();
            self.writes_flushed = self.writes_completed;
            tracing::warn!(
                resource = %self.p.resource,
                extents,
                "leaving the primary role with writes not flushed on both disks: activity log marked out of sync"
            );
        }
        self.sb.set(meta::FLAG_PRIMARY_ACTIVE, false);
        self.persist_dirty_pages();
        self.persist_superblock();
        self.actions.push_back(Action::RoleChanged(Role::Secondary));
        self.leave_primary();
    }

    /// Every extent of the activity log goes to the bitmap, as a crash would put it
    /// there. Returns how many there were.
    fn mark_active_extents_out_of_sync(&mut self) -> usize {
        let extents: Vec<u32> = self.al.active_extents().to_vec();
        let eb = self.al.extent_bytes();
        for e in &extents {
            self.mark_out_of_sync(*e as u64 * eb, eb);
        }
        extents.len()
    }

    /// Blocks that may differ between the disks now, outside the normal write path (a
    /// write failed on one side, a demotion could not flush): set in the bitmap, and
    /// any resync chunk over them that was read before is forgotten, so that its late
    /// acknowledgement cannot clear them again; the resync reads them anew.
    fn mark_out_of_sync(&mut self, offset: u64, len: u64) {
        self.bitmap.set_range(offset, len);
        self.resync_in_flight
            .retain(|e| !Self::overlaps(e.0, e.1, offset, len));
    }

    /// This node's disk failed a request. A primary goes on (the application saw the
    /// error, the blocks concerned are marked out of sync and resynced from here). A
    /// secondary stands alone, so that its primary fences it and goes on instead of
    /// waiting for it, until the operator has fixed the disk and runs `connect`, which
    /// resyncs it; if the failure lost data the peer sent (`lost_data`), it also marks
    /// itself outdated at once, so it is never promoted on this data.
    fn local_disk_failed(&mut self, what: String, lost_data: bool) {
        tracing::error!(resource = %self.p.resource, "{what}");
        self.disk_errors += 1;
        self.last_error = Some(what.clone());
        if self.role == Role::Primary {
            return;
        }
        if lost_data && self.disk_state() == DiskState::UpToDate {
            self.sb.set(meta::FLAG_OUTDATED, true);
            self.persist_superblock();
        }
        if self.conn != Conn::StandAlone {
            self.go_standalone(format!(
                "{what}: this node is outdated until a resync; fix the disk, then run `tandemctl connect {}`",
                self.p.resource
            ));
        }
    }

    /// The peer asked this node to take over (a switchover): promote it as `promote`
    /// would, through the witness when there is one.
    fn on_handover(&mut self) {
        if self.role == Role::Primary || self.want_promote.is_some() {
            return;
        }
        if self.services_failed {
            tracing::error!(resource = %self.p.resource, "the peer asked this node to take over, but the services failed to start here last time; promote by hand once fixed");
            return;
        }
        if let Err(e) = self.promote_precheck() {
            tracing::error!(resource = %self.p.resource, error = %e, "switchover: the peer asked this node to take over, but it cannot");
            return;
        }
        tracing::info!(resource = %self.p.resource, "switchover: taking over from the peer");
        if !self.p.witness {
            if let Err(e) = self.promote(false) {
                tracing::error!(resource = %self.p.resource, error = %e, "switchover promotion failed");
            }
            return;
        }
        self.want_promote = Some(PromoteWant {
            manual: true,
            force: false,
            give_up_at: self
                .now
                .plus_ms(2 * self.p.lease_ms + self.p.ping_timeout_ms),
        });
        self.witness_tick(false);
    }

    /// What stops a promotion through the witness before it is even asked.
    fn promote_precheck(&self) -> Result<(), AdminError> {
        if self.connected() && self.peer_role == Role::Primary {
            return Err(AdminError::PeerIsPrimary);
        }
        if matches!(
            self.conn,
            Conn::SyncTarget
                | Conn::SyncStarting { source: false }
                | Conn::WfBitmap { source: false }
        ) {
            return Err(AdminError::SyncTarget);
        }
        match self.disk_state() {
            DiskState::UpToDate => Ok(()),
            d => Err(AdminError::NotUpToDate(d)),
        }
    }

    fn promote(&mut self, force: bool) -> Result<(), AdminError> {
        if self.role == Role::Primary {
            return Ok(());
        }
        match self.promote_precheck() {
            Ok(()) => {}
            Err(AdminError::NotUpToDate(_)) if force => {}
            Err(e) => return Err(e),
        }
        let disk = self.disk_state();
        if disk != DiskState::UpToDate {
            tracing::warn!(
                resource = %self.p.resource, ?disk,
                "forced promotion: this node's data now counts as the newest"
            );
            self.sb.set(meta::FLAG_CONSISTENT, true);
            self.sb.set(meta::FLAG_OUTDATED, false);
        }
        self.primary_lost_at = None;
        self.want_promote = None;
        let was_just_created = self.sb.gen.current == uuid::UUID_JUST_CREATED;
        // As DRBD: a primary without its peer starts a new generation, unless it already
        // writes one the peer lacks (a bitmap UUID is set: the bitmap counts from there)
        // and is not forced. Rotating on every such promotion would push the generation
        // the peer holds out of the short history, and turn a plain resync into a split
        // brain (simulator seed 50001642 in C: a node promoted alone five times).
        let diverged = self.sb.gen.bitmap != 0;
        if was_just_created || (!self.replicating() && (force || !diverged)) {
            let fresh = self.rng.next_u64();
            self.sb.gen.new_current(fresh);
            self.sb.gen_term = self.sb.term;
        } else if !self.replicating() {
            // Writing on in this generation, now in this term: what the older-term rule
            // compares after a split brain.
            self.sb.gen_term = self.sb.gen_term.max(self.sb.term);
        }
        self.role = Role::Primary;
        self.sb.set(meta::FLAG_PRIMARY_ACTIVE, true);
        self.persist_superblock();
        self.actions.push_back(Action::RoleChanged(Role::Primary));
        if self.connected() && was_just_created {
            self.restart_handshake("new data generation after forced promotion");
        } else {
            self.send_state();
        }
        Ok(())
    }

    fn send_state(&mut self) {
        if self.connected() {
            self.send(Msg::State {
                primary: self.role == Role::Primary,
                disk: self.disk_state().code(),
            });
        }
    }

    // ----- quorum and the witness ----------------------------------------------------

    /// The witness's answer to the request of the last [`Action::Witness`]; `None` when
    /// it did not come within the timeout.
    pub fn handle_witness_reply(&mut self, now: Instant, reply: Option<witness::Reply>) {
        self.now = now;
        let Some((op, sent_at)) = self.wl.in_flight.take() else {
            return;
        };
        match reply {
            None => {
                self.wl.reachable = false;
                self.wl.back_off(now, op, self.p.lease_ms, 0);
                self.note_witness_trouble(Some("unreachable".into()));
                if op == WitnessOp::Promote && self.role != Role::Primary {
                    self.set_promote_uncertain(true);
                    self.promote_refused(AdminError::WitnessSilent, false);
                }
                if op == WitnessOp::Adopt {
                    self.adopt_done(Err(AdminError::WitnessSilent));
                }
            }
            Some(r) => {
                self.wl.reachable = true;
                self.wl.last_reply = Some(now);
                self.wl.primary = r.primary.clone();
                self.wl.up_to_date = r.up_to_date.clone();
                // Requests are handled in order, so this reply reflects every earlier one.
                self.wl.peer_maybe_up_to_date =
                    r.up_to_date.is_empty() || r.up_to_date.contains(&self.p.peer_node);
                if r.granted {
                    self.wl.granted();
                } else if op != WitnessOp::Query {
                    self.wl.back_off(now, op, self.p.lease_ms, r.lease_ms);
                }
                self.note_witness_reply(op, &r);
                match op {
                    WitnessOp::Promote if r.granted => {
                        self.promoted_by_witness(r.term, sent_at, r.lease_ms)
                    }
                    WitnessOp::Promote => {
                        let me = &self.p.local_node;
                        let outdated = !r.up_to_date.is_empty() && !r.up_to_date.contains(me);
                        self.promote_refused(
                            AdminError::WitnessRefused(r.reason.clone()),
                            outdated,
                        );
                    }
                    WitnessOp::Renew if r.granted && r.term == self.sb.term => {
                        self.votes.peer_counts = true;
                        let until = witness::lease_deadline(
                            sent_at,
                            r.lease_ms,
                            quorum::LEASE_DRIFT_PERMILLE,
                        );
                        let old = self.votes.lease_until;
                        self.votes.lease_until = Some(old.map_or(until, |t| t.max(until)));
                    }
                    WitnessOp::Outdate if r.granted => {
                        tracing::info!(resource = %self.p.resource, peer = %self.p.peer_node, "the witness recorded the peer as outdated");
                    }
                    WitnessOp::Release => self.wl.release_pending = false,
                    WitnessOp::Adopt => self.adopt_done(if r.granted {
                        Ok(())
                    } else {
                        Err(AdminError::WitnessRefused(r.reason.clone()))
                    }),
                    _ => {}
                }
                self.adopt_term(r.term, "the witness");
                if self.promote_uncertain {
                    // This reply is newer than the unanswered promotion: if that was
                    // granted, the witness says so now; otherwise it never will be.
                    if r.primary == self.p.local_node
                        && self.want_promote.is_none()
                        && self.role != Role::Primary
                    {
                        tracing::warn!(resource = %self.p.resource, term = r.term, "an unanswered promotion was granted after all; handing the term back");
                        self.wl.release_pending = true;
                    }
                    self.set_promote_uncertain(false);
                }
                self.check_outdated_by_witness();
            }
        }
        self.witness_tick(false);
        self.check_gate();
    }

    /// What a reply says about the witness itself: behind the pair's term (new, or it
    /// lost its state), refusing what a primary needs, or working.
    fn note_witness_reply(&mut self, op: WitnessOp, r: &witness::Reply) {
        let trouble = if r.term < self.sb.term {
            Some(format!(
                "the witness is at term {}, this node at term {}: it is new, lost its state or was restored from an old copy; run `tandemctl adopt-witness {}` on the primary",
                r.term, self.sb.term, self.p.resource
            ))
        } else {
            match op {
                WitnessOp::Renew
                | WitnessOp::Outdate
                | WitnessOp::UpToDate
                | WitnessOp::Release
                    if !r.granted =>
                {
                    Some(format!("refused {op:?}: {}", r.reason))
                }
                _ => None,
            }
        };
        self.note_witness_trouble(trouble);
    }

    /// Keep what is wrong with the witness for `status`; log it once per change.
    fn note_witness_trouble(&mut self, trouble: Option<String>) {
        match self.wl.set_trouble(trouble) {
            Some(Some(t)) => {
                tracing::warn!(resource = %self.p.resource, problem = %t, "witness trouble")
            }
            Some(None) => tracing::info!(resource = %self.p.resource, "the witness works again"),
            None => {}
        }
    }

    /// Send the next request to the witness if none is in flight and no back-off runs.
    /// `periodic`: the renewal or query timer fired.
    fn witness_tick(&mut self, periodic: bool) {
        if !self.p.witness || !self.wl.may_send(self.now) {
            return;
        }
        if self.want_promote.is_some_and(|w| !w.manual) && !self.auto_promote_possible() {
            self.want_promote = None;
        }
        let peer = self.p.peer_node.clone();
        let renew_due = periodic
            || self
                .votes
                .lease_until
                .is_none_or(|t| t.ms_since(self.now) < self.p.lease_ms * 2 / 3);
        let force = self.want_promote.is_some_and(|w| w.force);
        let (op, peer) = if let Some(adopt_force) = self.wl.adopt {
            // The peer joins the up-to-date set if it is connected and up to date.
            let peer_ok = !adopt_force
                && self.conn == Conn::Established
                && self.peer_disk == DiskState::UpToDate;
            (WitnessOp::Adopt, if peer_ok { peer } else { String::new() })
        } else if self.role != Role::Primary && self.want_promote.is_some() {
            if !self.stonith_allows_promotion() {
                return;
            }
            (WitnessOp::Promote, String::new())
        } else if self.role != Role::Primary && self.promote_uncertain {
            (WitnessOp::Query, String::new())
        } else if self.role == Role::Primary {
            if self.fence_needed() {
                (WitnessOp::Outdate, peer)
            } else if self.peer_needs_uptodate() {
                (WitnessOp::UpToDate, peer)
            } else if renew_due {
                (WitnessOp::Renew, String::new())
            } else {
                return;
            }
        } else if self.wl.release_pending {
            (WitnessOp::Release, String::new())
        } else if periodic {
            (WitnessOp::Query, String::new())
        } else {
            return;
        };
        if op == WitnessOp::Renew {
            self.wl.next_at = self.now.plus_ms(self.p.lease_ms / 3);
        }
        if op == WitnessOp::UpToDate {
            self.wl.peer_maybe_up_to_date = true;
        }
        self.wl.in_flight = Some((op, self.now));
        self.witness_seq += 1;
        self.actions.push_back(Action::Witness {
            req: witness::Request {
                op,
                resource: self.p.resource.clone(),
                term: self.sb.term,
                peer,
                uptodate: self.disk_state() == DiskState::UpToDate,
                force: op == WitnessOp::Promote && force,
                primary: op == WitnessOp::Adopt && self.role == Role::Primary,
                seq: self.witness_seq,
            },
            timeout_ms: (self.p.lease_ms / 4).max(20),
        });
    }

    /// `tandemctl adopt-witness` has its answer.
    fn adopt_done(&mut self, r: Result<(), AdminError>) {
        if self.wl.adopt.take().is_none() {
            return;
        }
        match &r {
            Ok(()) => {
                tracing::info!(resource = %self.p.resource, term = self.sb.term, "the witness adopted this pair's term")
            }
            Err(e) => {
                tracing::error!(resource = %self.p.resource, error = %e, "adopt-witness failed")
            }
        }
        self.actions.push_back(Action::AdminDone(r));
    }

    /// With `fencing = "stonith"`, a node promotes while its peer is not connected only
    /// once the `fence-peer` handler has said the peer is fenced or outdated. Starts the
    /// handler when it has not run yet; `false` until it has answered.
    fn stonith_allows_promotion(&mut self) -> bool {
        if self.p.fencing != Fencing::Stonith || self.connected() {
            return true;
        }
        match self.fence {
            FenceRun::Fenced => true,
            FenceRun::Running => false,
            FenceRun::NotRun => {
                tracing::warn!(resource = %self.p.resource, peer = %self.p.peer_node, "running the fence-peer handler before promotion");
                self.fence = FenceRun::Running;
                self.actions.push_back(Action::FencePeer {
                    timeout_ms: self.p.fence_peer_timeout_ms,
                });
                false
            }
        }
    }

    /// The `fence-peer` handler of the last [`Action::FencePeer`] exited with
    /// `exit_code` (`None`: it did not exit by itself in time).
    pub fn handle_fence_peer_done(&mut self, now: Instant, exit_code: Option<i32>) {
        self.now = now;
        if self.fence != FenceRun::Running {
            return; // the peer came back meanwhile: no longer needed
        }
        match quorum::fence_peer_verdict(exit_code) {
            Ok(what) => {
                tracing::info!(resource = %self.p.resource, peer = %self.p.peer_node, "fence-peer: {what}; promotion may proceed");
                self.fence = FenceRun::Fenced;
                if self.p.witness {
                    self.witness_tick(false);
                } else if let Some(w) = self.want_promote.take() {
                    let r = self.promote(false);
                    if w.manual {
                        self.actions.push_back(Action::AdminDone(r));
                    }
                }
            }
            Err(why) => {
                self.fence = FenceRun::NotRun;
                let err = AdminError::FencePeer(why.to_string());
                tracing::error!(resource = %self.p.resource, peer = %self.p.peer_node, "{err}");
                self.last_error = Some(err.to_string());
                // Not retried: whether the peer is really gone is for the operator now.
                if let Some(w) = self.want_promote.take() {
                    if w.manual {
                        self.actions.push_back(Action::AdminDone(Err(err)));
                    }
                }
            }
        }
        self.check_gate();
    }

    fn set_promote_uncertain(&mut self, on: bool) {
        if on == self.promote_uncertain {
            return;
        }
        self.promote_uncertain = on;
        if on {
            tracing::warn!(resource = %self.p.resource, "promotion request unanswered: keeping away from the peer until the witness answers");
            if self.connected() {
                self.forget_peer(Conn::Connecting);
                self.actions.push_back(Action::Disconnect {
                    reason: "promotion outcome unknown".into(),
                });
            }
            if self.conn == Conn::Connecting {
                self.actions.push_back(Action::SetConnect(false));
            }
        } else if self.conn == Conn::Connecting {
            self.actions.push_back(Action::SetConnect(true));
        }
    }

    /// Resource-level fencing: a primary whose writes do not all reach the peer
    /// completes nothing until the witness no longer counts the peer as up to date, or
    /// the peer could be promoted without them. Not while the peer is a sync target that
    /// has made its inconsistency durable: it receives every new write, and an
    /// inconsistent disk is never promoted.
    fn fence_needed(&self) -> bool {
        let peer_has_every_write = !self.peer_disk_failed
            && (self.conn == Conn::Established
                || (self.conn == Conn::SyncSource && self.peer_target_durable));
        self.role == Role::Primary
            && self.p.witness
            && self.p.fencing != Fencing::None
            && !peer_has_every_write
            && self.wl.peer_maybe_up_to_date
    }

    fn peer_needs_uptodate(&self) -> bool {
        self.conn == Conn::Established
            && self.peer_disk == DiskState::UpToDate
            && self.wl.last_reply.is_some()
            && !self.wl.up_to_date.contains(&self.p.peer_node)
    }

    fn auto_promote_possible(&self) -> bool {
        self.p.witness
            && self.p.auto_promote
            && self.role == Role::Secondary
            && self.disk_state() == DiskState::UpToDate
            && !self.split_brain
            && (!self.connected()
                || (self.conn == Conn::Established && self.peer_role == Role::Secondary))
    }

    fn promoted_by_witness(&mut self, term: u64, sent_at: Instant, lease_ms: u64) {
        let until = witness::lease_deadline(sent_at, lease_ms, quorum::LEASE_DRIFT_PERMILLE);
        if until <= self.now && self.role != Role::Primary {
            // The answer sat unread past its lease (the process was paused): the witness
            // may have granted a newer term since, to a peer with writes this node lacks.
            tracing::warn!(resource = %self.p.resource, term, "the witness's grant arrived after its lease ran out; not promoting on it");
            self.promote_refused(AdminError::GrantExpired, false);
            return;
        }
        let want = self.want_promote.take();
        let manual = want.is_some_and(|w| w.manual);
        if term > self.sb.term {
            self.sb.term = term;
            self.term_persist = true;
        }
        self.votes.lease_until = Some(until);
        self.votes.peer_counts = true;
        let force = want.is_some_and(|w| w.force);
        let out = if self.role == Role::Primary {
            Ok(())
        } else {
            self.promote(force)
        };
        match out {
            Ok(()) => {
                tracing::info!(resource = %self.p.resource, term, manual, "promoted by the witness");
                if manual {
                    self.actions.push_back(Action::AdminDone(Ok(())));
                }
            }
            Err(e) => {
                // Granted, but the node changed meanwhile: hand the term back.
                tracing::warn!(resource = %self.p.resource, term, error = %e, "granted promotion not taken");
                self.wl.release_pending = true;
                self.votes.lease_until = None;
                if manual {
                    self.actions.push_back(Action::AdminDone(Err(e)));
                }
            }
        }
        // The new term reaches the disk before any write of it.
        self.persist_superblock();
    }

    fn promote_refused(&mut self, why: AdminError, outdated: bool) {
        let Some(w) = self.want_promote else {
            return;
        };
        // A forced promotion does not ask the witness about the disk: being outdated
        // there does not stop it.
        let retry = (!outdated || w.force)
            && self.role != Role::Primary
            && if w.manual {
                self.now < w.give_up_at
            } else {
                self.auto_promote_possible()
            };
        if retry {
            // Asked again when the back-off of the refusal ends.
            return;
        }
        self.want_promote = None;
        if w.manual {
            self.actions.push_back(Action::AdminDone(Err(why)));
        } else {
            tracing::warn!(resource = %self.p.resource, reason = %why, "automatic promotion refused");
        }
    }

    /// A disconnected up-to-date secondary that the witness no longer counts as up to
    /// date was outdated by its primary: it says so and refuses automatic promotion.
    fn check_outdated_by_witness(&mut self) {
        let me = &self.p.local_node;
        if self.role == Role::Primary
            || self.connected()
            || self.disk_state() != DiskState::UpToDate
            || self.wl.up_to_date.is_empty()
            || self.wl.up_to_date.contains(me)
        {
            return;
        }
        tracing::warn!(
            resource = %self.p.resource,
            up_to_date = ?self.wl.up_to_date,
            "the witness records this node as outdated: it will not be promoted automatically"
        );
        self.sb.set(meta::FLAG_OUTDATED, true);
        self.persist_superblock();
        self.want_promote = self.want_promote.filter(|w| w.manual);
    }

    /// Adopt a newer term seen on the wire or at the witness; a primary of an older term
    /// has been replaced and steps down.
    fn adopt_term(&mut self, term: u64, from: &str) {
        if term <= self.sb.term {
            return;
        }
        tracing::info!(resource = %self.p.resource, old = self.sb.term, new = term, "newer term from {from}");
        self.sb.term = term;
        self.term_persist = true;
        self.persist_superblock();
        if self.role == Role::Primary {
            self.step_down(format!("replaced by the primary of term {term}"));
        }
    }

    /// A newer primary exists: fail what is held and become secondary (DRBD's
    /// `on-suspended-primary-outdated force-secondary`), so that the node can rejoin as
    /// sync target.
    fn step_down(&mut self, reason: String) {
        tracing::error!(resource = %self.p.resource, %reason, "stepping down");
        self.last_error = Some(reason);
        self.become_secondary();
        self.wl.release_pending = false;
        self.fail_pending();
        self.retry_completions();
        self.send_state();
    }

    /// Give every write and flush another chance to complete (or fail) under the
    /// current gate.
    fn retry_completions(&mut self) {
        let reqs: Vec<ReqId> = self.writes.keys().copied().collect();
        for req in reqs {
            self.try_complete(req);
        }
        self.check_flushes();
    }

    fn leave_primary(&mut self) {
        if self.p.witness {
            self.wl.release_pending = true;
        }
        self.votes.lease_until = None;
        self.witness_tick(false);
    }

    fn fail_pending(&mut self) {
        for p in std::mem::take(&mut self.pending) {
            match p {
                Pending::Write(req) => {
                    if self.writes.remove(&req).is_some() {
                        self.actions.push_back(Action::CompleteWrite {
                            req,
                            result: Err(ReqError::Io),
                        });
                        self.actions.push_back(Action::ReleaseBuf(BufId(req.0)));
                    }
                }
                Pending::Flush(req) => {
                    if self.flushes.remove(&req).is_some() {
                        self.complete_flush(req, false);
                    }
                }
            }
        }
    }

    /// A primary whose votes have all run out stops counting its peer until the witness
    /// renews its lease (see [`Votes::peer_counts`]).
    fn note_quorum_loss(&mut self) {
        if self.role == Role::Primary
            && self.p.witness
            && self.votes.peer_counts
            && !self.votes.quorum(self.now)
        {
            self.votes.peer_counts = false;
        }
    }

    /// React when what application I/O may do has changed: release held I/O, or fail it.
    /// Arm or disarm the fail-back timer.
    fn update_fail_back(&mut self) {
        let ready = self.p.fail_back_to_peer
            && self.peer_role == Role::Secondary
            && self.switchover_until.is_none()
            && self.switchover_precheck().is_ok();
        if !ready {
            self.fail_back_ready_since = None;
        } else if self.fail_back_ready_since.is_none() {
            self.fail_back_ready_since = Some(self.now);
        }
    }

    fn check_gate(&mut self) {
        self.resync_stray_bits();
        self.update_fail_back();
        self.note_quorum_loss();
        let g = self.gate();
        if g == self.gate_was {
            return;
        }
        let was = std::mem::replace(&mut self.gate_was, g);
        if self.role == Role::Primary {
            match g {
                Gate::Suspend | Gate::Fail => tracing::error!(
                    resource = %self.p.resource,
                    term = self.sb.term,
                    policy = ?self.p.on_no_quorum,
                    "quorum lost: neither an answered ping from the peer nor a lease; I/O {}",
                    if g == Gate::Fail { "fails" } else { "suspended" }
                ),
                Gate::HoldCompletion => tracing::warn!(
                    resource = %self.p.resource,
                    "peer lost: writes wait until the witness records it as outdated"
                ),
                Gate::Open if was != Gate::Open => {
                    tracing::info!(resource = %self.p.resource, term = self.sb.term, "quorum: I/O resumes")
                }
                Gate::Open => {}
            }
        }
        self.pump();
        self.retry_completions();
    }

    /// Blocks marked out of sync while the pair is established (a demotion that could
    /// not flush first, a write that failed on one disk) are resynced only by a
    /// handshake: start one, once the bits are on disk. Established normally holds no
    /// bits; a sync target that has just received the last block still does until its
    /// closing flush clears them.
    fn resync_stray_bits(&mut self) {
        if self.conn == Conn::Established
            && self.bitmap.count() > 0
            && self.resync_done_pending_gen.is_none()
            && !self.meta_busy()
        {
            tracing::warn!(
                resource = %self.p.resource,
                bytes = self.bitmap.out_of_sync_bytes(),
                "blocks out of sync while connected: reconnecting to resync them"
            );
            self.restart_handshake("out-of-sync blocks to resync");
        }
    }

    // ----- connection ----------------------------------------------------------------

    fn restart_handshake(&mut self, reason: &str) {
        self.forget_peer(Conn::Connecting);
        self.actions.push_back(Action::Disconnect {
            reason: reason.into(),
        });
        self.actions.push_back(Action::SetConnect(true));
    }

    fn drop_connection(&mut self, reason: String) {
        tracing::warn!(resource = %self.p.resource, %reason, "dropping peer connection");
        self.forget_peer(Conn::Connecting);
        self.actions.push_back(Action::Disconnect { reason });
    }

    fn protocol_error(&mut self, what: &str, buf: Option<BufId>) {
        if let Some(b) = buf {
            self.actions.push_back(Action::ReleaseBuf(b));
        }
        self.last_error = Some(format!("protocol error: {what}"));
        self.drop_connection(format!("protocol error: {what}"));
    }

    fn go_standalone(&mut self, reason: String) {
        tracing::error!(resource = %self.p.resource, %reason, "refusing peer; standing alone");
        self.last_error = Some(reason.clone());
        self.forget_peer(Conn::StandAlone);
        self.actions.push_back(Action::Disconnect { reason });
        self.actions.push_back(Action::SetConnect(false));
    }

    /// Everything the connection carried is gone: writes the peer did not confirm are out
    /// of sync, flushes stop waiting for it, queued peer writes are dropped (the primary
    /// marked them out of sync too).
    fn forget_peer(&mut self, next: Conn) {
        // Only losing an up-to-date peer starts a new generation; a sync target was not
        // consistent anyway and the bitmap keeps counting for it.
        let was_replicating = self.conn == Conn::Established;
        if self.peer_role == Role::Primary && self.role == Role::Secondary {
            self.primary_lost_at = Some(self.last_rx);
        }
        self.votes.peer_fresh_until = None;
        self.pings_sent.clear();
        self.resync_done_early = None;
        self.peer_target_durable = false;
        self.peer_disk_failed = false;
        self.conn = next;
        self.seq_to_req.clear();
        // A write the peer acknowledged is only durable there once the barrier of its
        // epoch has been acknowledged too: until then it counts as out of sync, like
        // the transfer log below. A write left as `Written` would later wait in the
        // transfer log for a barrier ack that no new connection ever sends.
        let acked = self.peer_acked_epoch;
        for w in self.writes.values_mut() {
            let durable_on_peer =
                w.peer == PeerState::Written && acked.is_some_and(|e| e >= w.epoch);
            if w.peer != PeerState::NotReplicated && !durable_on_peer {
                self.bitmap.set_range(w.offset, w.len);
            }
            w.peer = PeerState::NotReplicated;
        }
        for (_, off, len) in std::mem::take(&mut self.tl) {
            self.bitmap.set_range(off, len);
            self.al.release(self.al.extents_of(off, len));
        }
        self.epoch_writes = 0;
        self.epoch_opened_at = None;
        let reqs: Vec<ReqId> = self.writes.keys().copied().collect();
        for req in reqs {
            self.try_complete(req);
        }
        for f in self.flushes.values_mut() {
            f.peer_needed = false;
        }
        self.peer_acked_epoch = None;
        // Peer writes already on their way to the disk finish; queued ones are dropped.
        let mut kept = VecDeque::new();
        for op in std::mem::take(&mut self.peer_ops) {
            if op.io.is_some() {
                kept.push_back(op);
            } else {
                self.actions.push_back(Action::ReleaseBuf(op.buf));
            }
        }
        self.peer_ops = kept;
        self.reindex_peer_ops();
        self.peer_barriers.clear();
        self.resync_in_flight
            .retain(|e| e.2 == ResyncStage::Reading);
        self.peer_role = Role::Unknown;
        self.peer_disk = DiskState::Unknown;
        self.next_ping = None;
        if was_replicating && self.role == Role::Primary {
            // Writing without the peer from now on: a new data generation.
            let fresh = self.rng.next_u64();
            self.sb.gen.new_current(fresh);
            self.sb.gen_term = self.sb.term;
            self.persist_superblock();
        }
        self.check_flushes();
        self.witness_tick(false);
        // Writes and flushes held while the handshake decided go on now, replicated or
        // not: a handshake that ends in a refusal must not leave them queued.
        self.pump();
    }

    fn on_hello(&mut self, h: Hello, peer_term: u64) {
        if self.conn != Conn::WfHello {
            return self.protocol_error("unexpected hello", None);
        }
        let my_term = self.sb.gen_term;
        let peer_term_raw = peer_term;
        let peer_term = h.gen_term;
        self.peer_gen_term = h.gen_term;
        if h.version != wire::PROTOCOL_VERSION {
            return self.go_standalone(format!(
                "peer speaks protocol version {}, this node {}",
                h.version,
                wire::PROTOCOL_VERSION
            ));
        }
        if h.resource != self.p.resource || h.node != self.p.peer_node {
            return self.go_standalone(format!(
                "peer is resource {:?} node {:?}, expected {:?} node {:?}",
                h.resource, h.node, self.p.resource, self.p.peer_node
            ));
        }
        if h.data_bytes != self.data_bytes() || h.block_bytes != self.sb.layout.block_bytes {
            let msg = format!(
                "peer's device has {} data bytes (block {}), this node's {} (block {}): sizes must match",
                h.data_bytes,
                h.block_bytes,
                self.data_bytes(),
                self.sb.layout.block_bytes
            );
            self.last_error = Some(msg.clone());
            return self.drop_connection(msg);
        }
        let peer_primary = h.flags & wire::HELLO_PRIMARY != 0;
        self.peer_role = if peer_primary {
            Role::Primary
        } else {
            Role::Secondary
        };
        self.peer_disk = if h.flags & wire::HELLO_INCONSISTENT != 0 {
            DiskState::Inconsistent
        } else if h.flags & wire::HELLO_OUTDATED != 0 {
            DiskState::Outdated
        } else {
            DiskState::UpToDate
        };
        if peer_primary {
            self.primary_lost_at = None;
        }
        // A newer term on the peer: adopt it first. A primary of an older term learns
        // here that it has been replaced and steps down.
        self.adopt_term(peer_term_raw, "the peer's hello");
        let local = UuidView {
            gen: self.sb.gen,
            crashed_primary: self.sb.has(meta::FLAG_CRASHED_PRIMARY),
            inconsistent: self.disk_state() == DiskState::Inconsistent,
            primary: self.hello_flags & wire::HELLO_PRIMARY != 0,
            out_of_sync: self.hello_flags & wire::HELLO_OUT_OF_SYNC != 0,
        };
        let peer = UuidView {
            gen: h.gen,
            crashed_primary: h.flags & wire::HELLO_CRASHED_PRIMARY != 0,
            inconsistent: h.flags & wire::HELLO_INCONSISTENT != 0,
            primary: peer_primary,
            out_of_sync: h.flags & wire::HELLO_OUT_OF_SYNC != 0,
        };
        let peer_discards = h.flags & wire::HELLO_DISCARD_MY_DATA != 0;
        let (decision, rule) = if self.discard_my_data && peer_discards {
            return self.go_standalone("both nodes asked to discard their data".into());
        } else if self.discard_my_data {
            (SyncDecision::TargetUseBitmap, "discard-my-data-local")
        } else if peer_discards {
            (SyncDecision::SourceUseBitmap, "discard-my-data-peer")
        } else {
            let tie = self.p.local_node < self.p.peer_node;
            let (d, r) = uuid::compare(&local, &peer, tie);
            match d {
                // Both changed the data, but only one held the witness's newer term: the
                // other's changes since the split were never completed under quorum
                // (protocol C fencing) or are the accepted loss of an asynchronous
                // protocol. The older term becomes the sync target.
                SyncDecision::SplitBrain if peer_term > my_term => {
                    (SyncDecision::TargetUseBitmap, "older-term")
                }
                SyncDecision::SplitBrain if peer_term < my_term => {
                    (SyncDecision::SourceUseBitmap, "newer-term")
                }
                d => (d, r.name()),
            }
        };
        tracing::info!(
            resource = %self.p.resource,
            "uuid_compare()={decision:?} by rule={rule} (local {:016X}/{:016X}, peer {:016X}/{:016X})",
            local.gen.current, local.gen.bitmap, peer.gen.current, peer.gen.bitmap
        );
        if self.role == Role::Primary && peer_primary && peer_term_raw < self.sb.term {
            // It steps down when it reads this node's hello; try again then.
            return self.drop_connection(format!(
                "peer is a stale primary of term {peer_term_raw} (this node: term {})",
                self.sb.term
            ));
        }
        if self.role == Role::Primary && peer_primary {
            self.split_brain = true;
            return self
                .go_standalone(format!("both nodes are primary: split brain (rule={rule})"));
        }
        match decision {
            SyncDecision::NoSync => {
                self.discard_my_data = false;
                self.conn = Conn::Established;
                if self.disk_state() == DiskState::Outdated && self.peer_disk == DiskState::UpToDate
                {
                    // Same generation as an up-to-date peer: the same data.
                    self.sb.set(meta::FLAG_OUTDATED, false);
                    self.persist_superblock();
                }
                self.last_error = None;
                self.send_state();
                self.pump();
            }
            SyncDecision::SplitBrain => {
                self.split_brain = true;
                self.go_standalone(format!(
                    "split brain detected (rule={rule}); resolve with `tandemctl connect --discard-my-data` on the node whose changes to drop"
                ));
            }
            SyncDecision::Unrelated => self.go_standalone(format!(
                "unrelated data on the peer (rule={rule}); refusing to connect"
            )),
            d => {
                let source = matches!(
                    d,
                    SyncDecision::SourceUseBitmap | SyncDecision::SourceFullSync
                );
                let full = matches!(
                    d,
                    SyncDecision::SourceFullSync | SyncDecision::TargetFullSync
                );
                if !source && self.role == Role::Primary {
                    return self.go_standalone(format!(
                        "this primary would become sync target (rule={rule}); demote it first"
                    ));
                }
                self.discard_my_data = false;
                if full {
                    self.bitmap.set_all();
                }
                let runs = self.bitmap.runs();
                for chunk in runs.chunks(2048) {
                    self.send(Msg::BitmapRuns {
                        runs: chunk.to_vec(),
                    });
                }
                self.send(Msg::BitmapEnd);
                self.conn = Conn::WfBitmap { source };
            }
        }
    }

    fn on_bitmap_end(&mut self) {
        let Conn::WfBitmap { source } = self.conn else {
            return self.protocol_error("unexpected bitmap end", None);
        };
        if !source {
            self.sb.set(meta::FLAG_CONSISTENT, false);
            self.peer_disk = DiskState::UpToDate;
        } else {
            self.peer_disk = DiskState::Inconsistent;
        }
        self.conn = Conn::SyncStarting { source };
        self.resync_total_bytes = self.bitmap.out_of_sync_bytes();
        self.resync_done_bytes = 0;
        self.resync_started = self.now;
        self.resync_cursor = 0;
        // The resync set must survive a crash of either side before any block moves.
        self.persist_dirty_pages();
        self.persist_superblock();
    }

    /// The source has sent every block: make them durable, then take its generation.
    fn target_resync_done(&mut self, gen: Generation) {
        self.conn = Conn::Established;
        self.resync_done_pending_gen = Some(gen);
        let io = self.new_io(IoPurpose::TargetDoneFlush);
        self.actions.push_back(Action::DiskFlush { io });
        self.peer_disk = DiskState::UpToDate;
    }

    fn on_meta_idle(&mut self) {
        if let Conn::SyncStarting { source } = self.conn {
            tracing::info!(
                resource = %self.p.resource,
                bytes = self.resync_total_bytes,
                "resync starts as {}", if source { "source" } else { "target" }
            );
            self.conn = if source {
                Conn::SyncSource
            } else {
                Conn::SyncTarget
            };
            self.send_state();
            if let Some(gen) = self.resync_done_early.take() {
                self.target_resync_done(gen);
            }
        }
        self.term_persist = false;
        self.pump();
        self.pump_peer();
        self.pump_resync();
    }

    // ----- metadata ------------------------------------------------------------------

    fn persist_superblock(&mut self) {
        let bytes = self.sb.encode();
        self.meta_queue
            .push_back((self.sb.layout.superblock_offset, bytes));
        self.issue_meta();
    }

    fn persist_dirty_pages(&mut self) {
        for page in self.bitmap.dirty_page_indices() {
            self.persist_page(page);
        }
    }

    fn persist_page(&mut self, page: usize) {
        let bytes = self.bitmap.take_page(page);
        let off = self.sb.layout.bitmap_offset + (page * PAGE_BYTES) as u64;
        self.meta_queue.push_back((off, bytes));
        self.issue_meta();
    }

    fn issue_meta(&mut self) {
        if self.meta_in_flight.is_some() {
            return;
        }
        if self.meta_retry_at.is_some() {
            return;
        }
        if let Some((offset, bytes)) = self.meta_queue.pop_front() {
            let io = self.new_io(IoPurpose::Meta);
            self.meta_in_flight = Some((io, offset, bytes.clone()));
            self.actions
                .push_back(Action::MetaWrite { io, offset, bytes });
        }
    }

    fn meta_busy(&self) -> bool {
        self.meta_in_flight.is_some() || !self.meta_queue.is_empty()
    }

    // ----- primary write path --------------------------------------------------------

    fn overlaps(a_off: u64, a_len: u64, b_off: u64, b_len: u64) -> bool {
        a_off < b_off + b_len && b_off < a_off + a_len
    }

    fn in_range(&self, offset: u64, len: u64) -> bool {
        len > 0
            && offset
                .checked_add(len)
                .is_some_and(|e| e <= self.data_bytes())
    }

    fn conflicts(&self, offset: u64, len: u64) -> bool {
        self.writes
            .values()
            .any(|w| w.submitted && !w.local_done && Self::overlaps(w.offset, w.len, offset, len))
            || self
                .resync_in_flight
                .iter()
                .any(|e| e.2 == ResyncStage::Reading && Self::overlaps(e.0, e.1, offset, len))
    }

    /// Move queued writes and flushes forward, in order.
    fn pump(&mut self) {
        if self.pending.is_empty() || (self.term_persist && self.meta_busy()) {
            return;
        }
        match self.gate() {
            Gate::Open | Gate::HoldCompletion => {}
            Gate::Suspend => return,
            Gate::Fail => return self.fail_pending(),
        }
        while let Some(&front) = self.pending.front() {
            if self.meta_busy() {
                return;
            }
            // While the handshake decides, writes wait: they must either all reach the
            // peer or all be in the bitmap that is exchanged.
            if matches!(
                self.conn,
                Conn::WfHello | Conn::WfBitmap { .. } | Conn::SyncStarting { .. }
            ) {
                return;
            }
            match front {
                Pending::Write(req) => {
                    let Some(w) = self.writes.get(&req) else {
                        self.pending.pop_front();
                        continue;
                    };
                    let (offset, len) = (w.offset, w.len);
                    if self.conflicts(offset, len) {
                        return;
                    }
                    let extents = self.al.extents_of(offset, len);
                    let missing = self.al.missing(extents.clone());
                    if !missing.is_empty() {
                        if self.al_txn_queued {
                            return;
                        }
                        match self.al.plan(extents.clone()) {
                            Err(AlBlocked::AllSlotsBusy) => return,
                            Err(AlBlocked::TooManyExtents { needed, capacity }) => {
                                // It could never be served: fail it rather than wait.
                                tracing::error!(resource = %self.p.resource, offset, len, needed, capacity, "a write spans more activity-log extents than al-extents holds; refused");
                                self.pending.pop_front();
                                self.writes.remove(&req);
                                self.actions.push_back(Action::CompleteWrite {
                                    req,
                                    result: Err(ReqError::TooLarge),
                                });
                                self.actions.push_back(Action::ReleaseBuf(BufId(req.0)));
                                continue;
                            }
                            Ok((evicted, txn, slot)) => {
                                // Bits of an evicted extent must be on disk before the AL
                                // stops covering it.
                                let eb = self.al.extent_bytes();
                                for e in evicted {
                                    let bits = self.bitmap.bits_touching(e as u64 * eb, eb);
                                    for page in self.bitmap.pages_for_bit_range(bits) {
                                        if self.bitmap.is_page_dirty(page) {
                                            self.persist_page(page);
                                        }
                                    }
                                }
                                let off = self.sb.layout.al_offset + slot * 4096;
                                self.meta_queue.push_back((off, txn.encode()));
                                self.al_txn_queued = true;
                                self.issue_meta();
                                return;
                            }
                        }
                    }
                    self.pending.pop_front();
                    self.al.acquire(extents);
                    let epoch = self.epoch;
                    let replicate = self.replicating();
                    let seq = self.next_seq;
                    if let Some(w) = self.writes.get_mut(&req) {
                        w.submitted = true;
                        w.epoch = epoch;
                        w.peer = if replicate {
                            PeerState::Sent
                        } else {
                            PeerState::NotReplicated
                        };
                    }
                    *self.local_pending_by_epoch.entry(epoch).or_insert(0) += 1;
                    let io = self.new_io(IoPurpose::AppWrite(req));
                    self.actions.push_back(Action::DiskWrite {
                        io,
                        offset,
                        buf: BufId(req.0),
                    });
                    if replicate {
                        self.next_seq += 1;
                        self.seq_to_req.insert(seq, req);
                        self.epoch_writes += 1;
                        self.epoch_opened_at.get_or_insert(self.now);
                        self.send_with(
                            Msg::Data {
                                seq,
                                epoch,
                                offset,
                                len: len as u32,
                            },
                            Some(BufId(req.0)),
                        );
                    } else {
                        self.bitmap.set_range(offset, len);
                    }
                    if self.epoch_writes >= MAX_EPOCH_WRITES {
                        self.close_epoch();
                    }
                }
                Pending::Flush(req) => {
                    self.pending.pop_front();
                    let epoch = self.epoch;
                    let replicate = self.replicating();
                    self.close_epoch_now(replicate);
                    let covers = self.writes_completed;
                    if let Some(f) = self.flushes.get_mut(&req) {
                        f.epoch = epoch;
                        // The flush before a demotion waits for the peer in every
                        // protocol: it drains the transfer log, so the peer holds every
                        // write durably before this node stops being primary.
                        f.peer_needed = replicate
                            && (self.p.protocol != Protocol::A || req == ROLE_CHANGE_FLUSH);
                        f.covers_writes = covers;
                    }
                    self.check_flushes();
                }
            }
        }
    }

    /// Answer a flush: to the application, or, for the flush a demotion asked for, go on
    /// with the demotion.
    fn complete_flush(&mut self, req: ReqId, ok: bool) {
        if req != ROLE_CHANGE_FLUSH {
            let result = if ok { Ok(()) } else { Err(ReqError::Io) };
            self.actions
                .push_back(Action::CompleteFlush { req, result });
            return;
        }
        let Some(cmd) = self.flush_then.take() else {
            return;
        };
        let switchover = cmd == AdminCmd::Switchover;
        let r = if self.role != Role::Primary {
            match switchover {
                true => Err(AdminError::ReplacedMeanwhile),
                false => Ok(()),
            }
        } else if !ok {
            Err(AdminError::FlushFailed)
        } else {
            self.demote_now(cmd).map(|_| ())
        };
        // A switchover goes on until the peer reports itself primary.
        if r.is_err() || !switchover {
            self.actions.push_back(Action::AdminDone(r));
        }
    }

    fn close_epoch(&mut self) {
        if self.epoch_writes > 0 {
            let replicate = self.replicating();
            self.close_epoch_now(replicate);
        }
        self.epoch_opened_at = None;
    }

    fn close_epoch_now(&mut self, send_barrier: bool) {
        if send_barrier {
            self.send(Msg::Barrier { epoch: self.epoch });
        }
        self.epoch += 1;
        self.epoch_writes = 0;
        self.epoch_opened_at = None;
    }

    fn app_write_done(&mut self, req: ReqId, ok: bool) {
        if let (false, Some(w)) = (ok, self.writes.get(&req)) {
            // The peer may hold the new data and this disk the old (or a torn block):
            // the blocks are out of sync, and the application gets EIO.
            let (offset, len) = (w.offset, w.len);
            self.mark_out_of_sync(offset, len);
            self.local_disk_failed(
                format!("the disk failed a write at byte {offset} (the application got EIO); its blocks are marked out of sync"),
                true,
            );
        }
        if let Some(w) = self.writes.get_mut(&req) {
            w.local_done = true;
            w.local_failed = !ok;
            let epoch = w.epoch;
            if let Some(c) = self.local_pending_by_epoch.get_mut(&epoch) {
                *c -= 1;
                if *c == 0 {
                    self.local_pending_by_epoch.remove(&epoch);
                }
            }
        }
        self.try_complete(req);
        self.check_flushes();
        self.pump();
        self.pump_resync();
        if self.role != Role::Primary {
            self.pump_peer();
        }
    }

    fn peer_ack(&mut self, seq: u64, state: PeerState) {
        let Some(&req) = self.seq_to_req.get(&seq) else {
            return;
        };
        if state == PeerState::Written {
            self.seq_to_req.remove(&seq);
        }
        if let Some(w) = self.writes.get_mut(&req) {
            if w.peer != PeerState::Written {
                w.peer = state;
            }
        }
        self.try_complete(req);
    }

    fn try_complete(&mut self, req: ReqId) {
        let protocol = self.p.protocol;
        let gate = self.gate();
        let Some(w) = self.writes.get_mut(&req) else {
            return;
        };
        if !w.completed && w.local_done {
            let peer_ok = match w.peer {
                PeerState::NotReplicated | PeerState::Written => true,
                PeerState::Received => protocol != Protocol::C,
                PeerState::Sent => protocol == Protocol::A,
            };
            let (complete, fail) = match gate {
                Gate::Open => (peer_ok, false),
                Gate::HoldCompletion | Gate::Suspend => (false, false),
                Gate::Fail => (true, true),
            };
            if complete || w.local_failed {
                w.completed = true;
                let result = if w.local_failed || fail {
                    Err(ReqError::Io)
                } else {
                    Ok(())
                };
                if result.is_ok() {
                    self.writes_completed += 1;
                }
                self.actions
                    .push_back(Action::CompleteWrite { req, result });
            }
        }
        let w = &self.writes[&req];
        let finished =
            w.completed && matches!(w.peer, PeerState::NotReplicated | PeerState::Written);
        if finished {
            if w.peer == PeerState::Written && self.peer_acked_epoch.is_none_or(|e| e < w.epoch) {
                self.tl.push((w.epoch, w.offset, w.len));
            } else {
                let extents = self.al.extents_of(w.offset, w.len);
                self.al.release(extents);
            }
            self.writes.remove(&req);
            self.actions.push_back(Action::ReleaseBuf(BufId(req.0)));
            // A freed AL slot may unblock a queued write.
            if self.pending.front().is_some() {
                self.pump();
            }
        }
    }

    fn check_flushes(&mut self) {
        let gate = self.gate();
        let oldest_pending_epoch = self.local_pending_by_epoch.keys().next().copied();
        let mut done = Vec::new();
        let mut to_issue = Vec::new();
        for (&req, f) in self.flushes.iter_mut() {
            if f.epoch == 0 {
                continue; // still queued behind earlier writes
            }
            if f.local_io.is_none() && oldest_pending_epoch.is_none_or(|e| e > f.epoch) {
                to_issue.push(req);
            }
            let peer_ok = !f.peer_needed || self.peer_acked_epoch.is_some_and(|e| e >= f.epoch);
            match gate {
                Gate::Open if f.local_done && peer_ok => done.push((req, f.local_failed)),
                Gate::Fail if f.local_done => done.push((req, true)),
                _ => {}
            }
        }
        for req in to_issue {
            let io = self.new_io(IoPurpose::AppFlush(req));
            if let Some(f) = self.flushes.get_mut(&req) {
                f.local_io = Some(io);
            }
            self.actions.push_back(Action::DiskFlush { io });
        }
        for (req, failed) in done {
            let covers = self.flushes.remove(&req).map_or(0, |f| f.covers_writes);
            if !failed {
                self.writes_flushed = self.writes_flushed.max(covers);
            }
            self.complete_flush(req, !failed);
        }
    }

    // ----- peer (secondary) write path -----------------------------------------------

    fn reindex_peer_ops(&mut self) {
        self.peer_ops_by_io.clear();
        for (i, op) in self.peer_ops.iter().enumerate() {
            if let Some(io) = op.io {
                self.peer_ops_by_io.insert(io, i);
            }
        }
    }

    /// Submit received writes that do not overlap an earlier one still in flight, so that
    /// overlapping writes land in the primary's order.
    fn pump_peer(&mut self) {
        if self.meta_busy()
            || matches!(self.conn, Conn::WfBitmap { .. } | Conn::SyncStarting { .. })
        {
            return;
        }
        // A primary that just stepped down may still have its own writes on the way to
        // the disk; the peer's blocks must land after them.
        if self.writes.values().any(|w| w.submitted && !w.local_done) {
            return;
        }
        let mut issue = Vec::new();
        for i in 0..self.peer_ops.len() {
            let op = &self.peer_ops[i];
            if op.io.is_some() {
                continue;
            }
            let blocked = self
                .peer_ops
                .iter()
                .take(i)
                .any(|e| Self::overlaps(e.offset, e.len, op.offset, op.len));
            if !blocked {
                issue.push(i);
            }
        }
        for i in issue {
            let io = self.new_io(IoPurpose::PeerWrite);
            let op = &mut self.peer_ops[i];
            op.io = Some(io);
            self.peer_ops_by_io.insert(io, i);
            self.actions.push_back(Action::DiskWrite {
                io,
                offset: op.offset,
                buf: op.buf,
            });
        }
    }

    fn peer_write_done(&mut self, io: IoId, ok: bool) {
        let Some(i) = self.peer_ops_by_io.get(&io).copied() else {
            return;
        };
        let Some(op) = self.peer_ops.remove(i) else {
            return;
        };
        self.reindex_peer_ops();
        self.actions.push_back(Action::ReleaseBuf(op.buf));
        if self.connected() {
            match op.kind {
                PeerOpKind::Data { seq, .. } => {
                    self.send(if ok {
                        Msg::WriteAck { seq }
                    } else {
                        Msg::NegAck { seq }
                    });
                    if ok && self.conn == Conn::SyncTarget {
                        self.bitmap.clear_range(op.offset, op.len);
                    }
                }
                PeerOpKind::Resync => {
                    if ok {
                        self.bitmap.clear_range(op.offset, op.len);
                        self.resync_done_bytes += op.len;
                    }
                    self.send(Msg::ResyncAck {
                        offset: op.offset,
                        len: op.len as u32,
                        ok,
                    });
                }
            }
        }
        if !ok {
            self.local_disk_failed(
                format!("the disk failed a write at byte {} for the peer", op.offset),
                true,
            );
        }
        self.check_peer_barriers();
        self.pump_peer();
    }

    fn check_peer_barriers(&mut self) {
        if self.peer_barrier_flushing {
            return;
        }
        let Some(&epoch) = self.peer_barriers.front() else {
            return;
        };
        let waiting = self.peer_ops.iter().any(|op| match op.kind {
            PeerOpKind::Data { epoch: e, .. } => e <= epoch,
            PeerOpKind::Resync => false,
        });
        if !waiting {
            self.peer_barrier_flushing = true;
            let io = self.new_io(IoPurpose::PeerFlush(epoch));
            self.actions.push_back(Action::DiskFlush { io });
        }
    }

    // ----- resync source -------------------------------------------------------------

    fn pump_resync(&mut self) {
        if self.conn != Conn::SyncSource {
            return;
        }
        let block = self.bitmap.block_bytes();
        let chunk_blocks = (self.p.resync_chunk_bytes / block).max(1);
        let mut scanned_from_start = self.resync_cursor == 0;
        let in_flight_bytes = |s: &Self| s.resync_in_flight.iter().map(|e| e.1).sum::<u64>();
        while in_flight_bytes(self) < self.p.resync_window_bytes {
            let Some(start) = self.bitmap.next_set(self.resync_cursor) else {
                if scanned_from_start {
                    break;
                }
                self.resync_cursor = 0;
                scanned_from_start = true;
                continue;
            };
            let mut end = start + 1;
            while end < self.bitmap.nbits() && end - start < chunk_blocks && self.bitmap.get(end) {
                end += 1;
            }
            self.resync_cursor = end;
            let offset = start * block;
            let len = ((end - start) * block).min(self.data_bytes() - offset);
            let busy = self
                .resync_in_flight
                .iter()
                .any(|e| Self::overlaps(e.0, e.1, offset, len));
            if busy || self.conflicts(offset, len) {
                continue;
            }
            self.resync_in_flight
                .push((offset, len, ResyncStage::Reading));
            let buf = BufId(CORE_BUF_BIT | self.next_buf);
            self.next_buf += 1;
            let io = self.new_io(IoPurpose::ResyncRead { offset, len, buf });
            self.actions.push_back(Action::DiskRead {
                io,
                offset,
                len: len as u32,
                buf,
            });
        }
        if self.bitmap.count() == 0 && self.resync_in_flight.is_empty() {
            self.sb.gen.clear_bitmap();
            self.sb.set(meta::FLAG_CRASHED_PRIMARY, false);
            self.send(Msg::ResyncDone { gen: self.sb.gen });
            self.conn = Conn::Established;
            self.peer_disk = DiskState::UpToDate;
            self.persist_dirty_pages();
            self.persist_superblock();
            tracing::info!(resource = %self.p.resource, bytes = self.resync_done_bytes, "resync finished as source");
        }
    }

    // ----- helpers -------------------------------------------------------------------

    fn new_io(&mut self, purpose: IoPurpose) -> IoId {
        let io = IoId(self.next_io);
        self.next_io += 1;
        self.ios.insert(io, purpose);
        io
    }

    fn send(&mut self, msg: Msg) {
        self.send_with(msg, None)
    }

    fn send_with(&mut self, msg: Msg, buf: Option<BufId>) {
        let term = self.sb.term;
        self.actions.push_back(Action::Send { msg, buf, term });
    }
}
