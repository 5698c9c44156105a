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

mod connection;
mod epochs;
mod inputs;
mod keepalive;
mod peer_writes;
mod persist;
mod quorum_gate;
mod replica;
mod resync;
mod roles;
mod types;
mod write_path;

use epochs::Epochs;
use keepalive::Keepalive;
use peer_writes::{PeerOpKind, PeerWrites};
use persist::MetaQueue;
use resync::Resync;

pub use types::*;

/// The byte ranges `[a_off, a_off + a_len)` and `[b_off, b_off + b_len)` share a byte.
fn overlaps(a_off: u64, a_len: u64, b_off: u64, b_len: u64) -> bool {
    a_off < b_off.saturating_add(b_len) && b_off < a_off.saturating_add(a_len)
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
enum IoPurpose {
    AppWrite(ReqId),
    AppFlush(ReqId),
    PeerWrite,
    PeerFlush(u64),
    TargetDoneFlush,
    ResyncRead { offset: u64, len: u64, buf: BufId },
    Meta,
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
const META_HELD: &str =
    "the metadata write failed; I/O that depends on it is held and the write retried every second";

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
    /// Metadata writes, one at a time so that they land in order.
    meta: MetaQueue,
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
    /// Epochs, their barriers, and the transfer log.
    epochs: Epochs,
    next_seq: u64,
    seq_to_req: HashMap<u64, ReqId>,
    // Peer (secondary) side.
    /// The peer's writes and barriers, in order.
    peer_writes: PeerWrites,
    /// The flags of the last hello sent: the comparison on this side must use what
    /// the peer was told, even if the bitmap or role changed since.
    hello_flags: u32,
    // Resync.
    resync: Resync,
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
    keepalive: Keepalive,
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
            meta: MetaQueue::default(),
            peer_disk_failed: false,
            disk_errors: 0,
            al_txn_queued: false,
            pending: VecDeque::new(),
            writes: BTreeMap::new(),
            flushes: BTreeMap::new(),
            epochs: Epochs::new(),
            next_seq: 1,
            seq_to_req: HashMap::new(),
            peer_writes: PeerWrites::default(),
            hello_flags: 0,
            resync: Resync::new(now),
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
            keepalive: Keepalive::new(now),
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

    /// The resource's name.
    pub fn name(&self) -> &str {
        &self.p.resource
    }

    /// The peer's node name.
    pub fn peer_node(&self) -> &str {
        &self.p.peer_node
    }

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
            && self.peer_writes.is_idle()
            && !self.meta.busy()
            && self.resync.is_idle()
            && self.resync_done_pending_gen.is_none()
            && self.epochs.transfer_log_is_empty()
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
                done_bytes: self.resync.done_bytes(),
                total_bytes: self.resync.total_bytes(),
                bytes_per_sec: if syncing {
                    self.resync.bytes_per_sec(self.now)
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
            (Timer::MetaRetry, self.meta.retry_at()),
            (
                Timer::FailBack,
                self.fail_back_ready_since
                    .map(|t| t.plus_ms(self.p.fail_back_delay_ms)),
            ),
            (Timer::Switchover, self.switchover_until),
            (Timer::Witness, witness_due),
            (Timer::QuorumLost, quorum_lost),
            (Timer::AutoPromote, auto_promote),
            (Timer::EpochClose, self.epochs.close_due()),
            (
                Timer::Ping,
                connected.then(|| self.keepalive.next_ping()).flatten(),
            ),
            (
                Timer::PeerTimeout,
                connected.then(|| self.keepalive.silent_at(self.p.ping_timeout_ms)),
            ),
        ]
    }

    // ----- timers --------------------------------------------------------------------

    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        for (timer, deadline) in self.timer_deadlines() {
            let Some(d) = deadline else { continue };
            if d > now {
                continue;
            }
            match timer {
                Timer::Ping => {
                    let id = self.keepalive.ping(now, self.p.ping_interval_ms);
                    self.send(Msg::Ping { id });
                }
                Timer::EpochClose => self.close_epoch(),
                Timer::PeerTimeout => {
                    if self.connected() {
                        self.drop_connection(format!(
                            "peer silent for {} ms",
                            now.ms_since(self.keepalive.last_rx())
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
                    self.meta.retry_due();
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
