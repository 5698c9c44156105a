//! The witness's decisions, pure: per resource, the term (the fencing token), the current
//! primary and its lease, and the up-to-date set.
//!
//! # Driving it
//!
//! Build a [`Witness`] from the state last persisted ([`decode_state`]) and `now`; for
//! each authenticated request call [`Witness::handle`]. A request that changes stored
//! state does not change it yet: the returned [`Outcome::persist`] carries the change
//! ([`Staged`]) and the whole state file with it applied. Write those bytes durably (temp
//! file, fsync, rename, fsync the directory), then [`Witness::commit`] the change and send
//! the reply. If the write fails, send [`Witness::unstored`] instead and drop the change:
//! the state stays as it was, so a grant that was never stored is never made, and cannot
//! be made a second time to another node after a restart.
//!
//! Leases are not stored. Instead, a witness grants nothing for one lease period after it
//! starts ([`Witness::new`]), so that every lease granted before a restart has expired
//! before any new one is granted.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::core::codec::{Reader, Writer};
use crate::core::Instant;

/// What a node asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The primary of `term` extends its lease.
    Renew = 1,
    /// Make the asking node primary in a new term (`uptodate`: its disk says so).
    Promote = 2,
    /// The primary of `term` records `peer` as outdated (resource-level fencing).
    Outdate = 3,
    /// The primary of `term` records `peer` as up to date again (after a resync).
    UpToDate = 4,
    /// The primary of `term` steps down; the peer may be promoted at once.
    Release = 5,
    /// Read the resource's state.
    Query = 6,
    /// Put a new, emptied or restored witness in service for a pair that has run before:
    /// the witness takes the asking node's `term` (the pair's highest), makes it primary
    /// if it says it is, and records the up-to-date set (the node, and `peer` if named).
    /// Granted only when that term is above the witness's, so it never lowers a term.
    Adopt = 7,
}

impl Op {
    pub fn from_code(c: u8) -> Option<Op> {
        Some(match c {
            1 => Op::Renew,
            2 => Op::Promote,
            3 => Op::Outdate,
            4 => Op::UpToDate,
            5 => Op::Release,
            6 => Op::Query,
            7 => Op::Adopt,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub resource: String,
    pub term: u64,
    pub peer: String,
    pub uptodate: bool,
    /// `Promote` only: the operator forced it (`promote --force`). The node's own disk
    /// state and the up-to-date set are not checked; the lease and the term still are,
    /// so a forced promotion never makes a second primary.
    pub force: bool,
    /// `Adopt` only: the asking node is primary now.
    pub primary: bool,
    /// Increases with every request a node process sends (0: unordered, for tools). The
    /// witness refuses a request numbered at or below one it already handled from that
    /// node: a request the node gave up on may still be read after a newer one.
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reply {
    pub granted: bool,
    /// The resource's current term (after the request).
    pub term: u64,
    /// For a granted lease: its length, counted by the witness from receipt. For a
    /// promotion refused because another node's lease runs: how long it still runs.
    pub lease_ms: u64,
    pub primary: String,
    pub up_to_date: Vec<String>,
    /// Why it was refused.
    pub reason: String,
}

/// What the witness stores per resource.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResourceState {
    pub term: u64,
    pub primary: Option<String>,
    pub up_to_date: BTreeSet<String>,
}

#[must_use = "persist and commit before replying when `persist` is set"]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The answer; when `persist` is set, valid only once the change is committed.
    pub reply: Reply,
    pub persist: Option<Staged>,
}

/// A change of stored state, not yet made: write [`Staged::bytes`] durably, then
/// [`Witness::commit`] it.
#[must_use = "a staged change takes effect only through Witness::commit"]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    resource: String,
    state: ResourceState,
    lease: LeaseChange,
    /// The whole state file with the change applied.
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseChange {
    Keep,
    Start(Instant),
    Clear,
}

pub struct Witness {
    lease_ms: u64,
    grace_until: Instant,
    state: BTreeMap<String, ResourceState>,
    /// Lease expiry per resource, on the witness's clock.
    leases: HashMap<String, Instant>,
    /// Highest request number handled per (resource, node). Not stored: a restart ends
    /// every connection, so no request from before it can still arrive.
    last_seq: HashMap<(String, String), u64>,
}

impl Witness {
    pub fn new(lease_ms: u64, now: Instant, state: BTreeMap<String, ResourceState>) -> Witness {
        Witness {
            lease_ms,
            grace_until: now.plus_ms(lease_ms),
            state,
            leases: HashMap::new(),
            last_seq: HashMap::new(),
        }
    }

    pub fn state(&self) -> &BTreeMap<String, ResourceState> {
        &self.state
    }

    /// The lease of `resource` still runs at `now`.
    pub fn lease_live(&self, resource: &str, now: Instant) -> bool {
        self.leases.get(resource).is_some_and(|&t| now < t)
    }

    pub fn handle(&mut self, now: Instant, node: &str, req: &Request) -> Outcome {
        let cur = self.state.get(&req.resource).cloned().unwrap_or_default();
        if req.seq > 0 {
            let key = (req.resource.clone(), node.to_string());
            let last = self.last_seq.get(&key).copied().unwrap_or(0);
            if req.seq <= last {
                let why = format!("stale request {} (already handled {last})", req.seq);
                return Outcome {
                    reply: refusal(&cur, why),
                    persist: None,
                };
            }
            self.last_seq.insert(key, req.seq);
        }
        let in_grace = now < self.grace_until;
        let grace_left = self.grace_until.ms_since(now);
        let live = self.lease_live(&req.resource, now);
        let lease_until = now.plus_ms(self.lease_ms);
        // The decision works on a copy; stored state changes only in `commit`.
        let mut st = cur.clone();
        let mut lease = LeaseChange::Keep;
        let is_primary_of_term =
            req.term == st.term && st.primary.as_deref() == Some(node) && st.term > 0;
        let refused: Option<String> = match req.op {
            Op::Query => None,
            Op::Adopt if req.term == 0 => {
                Some("adopt needs the pair's term (the node has none)".into())
            }
            Op::Adopt if st.term >= req.term => Some(format!(
                "the witness already holds term {} for {} (the node: {}): adopt only raises a witness that is behind the pair",
                st.term, req.resource, req.term
            )),
            Op::Adopt => {
                st.term = req.term;
                st.primary = req.primary.then(|| node.to_string());
                st.up_to_date.clear();
                if req.uptodate {
                    st.up_to_date.insert(node.to_string());
                }
                if !req.peer.is_empty() && req.peer != node {
                    st.up_to_date.insert(req.peer.clone());
                }
                None
            }
            _ if req.term > st.term => Some(format!(
                "term {} is newer than the witness's {}{}",
                req.term,
                st.term,
                ": this witness is new, lost its state or was restored from an old copy; run `tandemctl adopt-witness` on the pair's primary"
            )),
            Op::Renew | Op::Outdate | Op::UpToDate | Op::Release if req.term < st.term => Some(
                format!("stale term {} (current {})", req.term, st.term),
            ),
            Op::Renew | Op::Outdate | Op::UpToDate | Op::Release if !is_primary_of_term => {
                Some(format!("{node} is not the primary of term {}", st.term))
            }
            Op::Renew if in_grace => Some(format!(
                "witness restarted: no leases for another {grace_left} ms"
            )),
            Op::Renew => {
                // Not stored: a restart grants nothing for one lease period instead.
                self.leases.insert(req.resource.clone(), lease_until);
                None
            }
            Op::Outdate | Op::UpToDate if req.peer.is_empty() || req.peer == node => {
                Some("outdate/up-to-date needs the peer's name".into())
            }
            Op::Outdate => {
                st.up_to_date.remove(&req.peer);
                None
            }
            Op::UpToDate => {
                st.up_to_date.insert(req.peer.clone());
                None
            }
            Op::Release => {
                st.primary = None;
                lease = LeaseChange::Clear;
                None
            }
            Op::Promote if in_grace => Some(format!(
                "witness restarted: no promotion for another {grace_left} ms"
            )),
            // The primary of record asking again (a repeated or late request, or a
            // restart within its lease): nobody else can hold its term, so it keeps it.
            // Granting a new term here would replace the node by itself.
            Op::Promote
                if st.primary.as_deref() == Some(node)
                    && st.term > 0
                    && (req.uptodate || req.force) =>
            {
                self.leases.insert(req.resource.clone(), lease_until);
                None
            }
            Op::Promote if live && st.primary.as_deref() != Some(node) => Some(format!(
                "{} holds the lease of term {}",
                st.primary.as_deref().unwrap_or("?"),
                st.term
            )),
            Op::Promote if !req.uptodate && !req.force => {
                Some("the node's own disk is not up to date".into())
            }
            Op::Promote
                if !req.force && !st.up_to_date.is_empty() && !st.up_to_date.contains(node) =>
            {
                Some(format!(
                    "{node} is not in the up-to-date set {:?}",
                    st.up_to_date.iter().collect::<Vec<_>>()
                ))
            }
            Op::Promote => match st.term.checked_add(1) {
                None => Some(format!("term {} cannot grow any further", st.term)),
                Some(t) => {
                    st.term = t;
                    st.primary = Some(node.to_string());
                    if req.force {
                        // The operator chose this node's data: it is the only up-to-date
                        // copy until a resync says otherwise.
                        st.up_to_date.clear();
                    }
                    st.up_to_date.insert(node.to_string());
                    lease = LeaseChange::Start(lease_until);
                    None
                }
            },
        };
        if let Some(why) = refused {
            let mut reply = refusal(&cur, why);
            if req.op == Op::Promote && live && cur.primary.as_deref() != Some(node) {
                // When the lease that blocks it runs out: the node asks again then.
                reply.lease_ms = self
                    .leases
                    .get(&req.resource)
                    .map_or(0, |t| t.ms_since(now));
            }
            return Outcome {
                reply,
                persist: None,
            };
        }
        let mut reply = Reply {
            granted: true,
            term: st.term,
            primary: st.primary.clone().unwrap_or_default(),
            up_to_date: st.up_to_date.iter().cloned().collect(),
            ..Reply::default()
        };
        if matches!(req.op, Op::Renew | Op::Promote) {
            reply.lease_ms = self.lease_ms;
        }
        let persist = (st != cur).then(|| {
            let mut next = self.state.clone();
            next.insert(req.resource.clone(), st.clone());
            Staged {
                resource: req.resource.clone(),
                state: st,
                lease,
                bytes: encode_state(&next),
            }
        });
        Outcome { reply, persist }
    }

    /// Make a staged change the witness's state, once its bytes are durable.
    pub fn commit(&mut self, staged: Staged) {
        match staged.lease {
            LeaseChange::Keep => {}
            LeaseChange::Start(until) => {
                self.leases.insert(staged.resource.clone(), until);
            }
            LeaseChange::Clear => {
                self.leases.remove(&staged.resource);
            }
        }
        self.state.insert(staged.resource, staged.state);
    }

    /// The answer to a request whose change could not be stored: refused, with the
    /// state as it still is.
    pub fn unstored(&self, resource: &str, why: &str) -> Reply {
        let cur = self.state.get(resource).cloned().unwrap_or_default();
        refusal(
            &cur,
            format!("the witness cannot store its state ({why}); nothing was changed"),
        )
    }

    pub fn encode_state(&self) -> Vec<u8> {
        encode_state(&self.state)
    }
}

/// The node side of a lease: until when it may act as primary on its own clock.
///
/// The deadline counts from when the renewal was *sent* (the witness counts from receipt,
/// which is later), shortened by the largest clock rate difference allowed between the two
/// machines, so no synchronised clocks are needed.
pub fn lease_deadline(sent_at: Instant, lease_ms: u64, max_drift_permille: u64) -> Instant {
    let margin = lease_ms * max_drift_permille.min(1000) / 1000;
    sent_at.plus_ms(lease_ms - margin)
}

// ----- state file ----------------------------------------------------------------------

pub const STATE_MAGIC: &[u8; 8] = b"TNDMWIT\0";
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("not a witness state file (bad magic)")]
    Magic,
    #[error("state file version {0} is not supported (this witness reads {STATE_VERSION})")]
    Version(u32),
    #[error("state file checksum mismatch: the file is corrupt")]
    Crc,
    #[error("state file is truncated or malformed")]
    Malformed,
}

fn refusal(st: &ResourceState, reason: String) -> Reply {
    Reply {
        granted: false,
        term: st.term,
        lease_ms: 0,
        primary: st.primary.clone().unwrap_or_default(),
        up_to_date: st.up_to_date.iter().cloned().collect(),
        reason,
    }
}

pub fn encode_state(state: &BTreeMap<String, ResourceState>) -> Vec<u8> {
    let mut p = Writer::default();
    p.u32(state.len() as u32);
    for (name, st) in state {
        p.str8(name);
        p.u64(st.term);
        p.str8(st.primary.as_deref().unwrap_or(""));
        p.u32(st.up_to_date.len() as u32);
        for n in &st.up_to_date {
            p.str8(n);
        }
    }
    let p = p.into_inner();
    let mut out = Writer::with_capacity(p.len() + 20);
    out.bytes(STATE_MAGIC);
    out.u32(STATE_VERSION);
    out.u32(p.len() as u32);
    out.u32(crc32fast::hash(&p));
    out.bytes(&p);
    out.into_inner()
}

pub fn decode_state(b: &[u8]) -> Result<BTreeMap<String, ResourceState>, StateError> {
    if b.len() < 20 || &b[..8] != STATE_MAGIC {
        return Err(StateError::Magic);
    }
    let bad = || StateError::Malformed;
    let mut r = Reader::new(&b[8..]);
    let version = r.u32().ok_or_else(bad)?;
    if version != STATE_VERSION {
        return Err(StateError::Version(version));
    }
    let len = r.u32().ok_or_else(bad)? as usize;
    let crc = r.u32().ok_or_else(bad)?;
    let payload = r.take(len).ok_or_else(bad)?;
    if !r.is_empty() {
        return Err(StateError::Malformed);
    }
    if crc32fast::hash(payload) != crc {
        return Err(StateError::Crc);
    }
    let mut r = Reader::new(payload);
    let n = r.u32().ok_or_else(bad)? as usize;
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let name = r.str8().ok_or_else(bad)?;
        let term = r.u64().ok_or_else(bad)?;
        let primary = Some(r.str8().ok_or_else(bad)?).filter(|p| !p.is_empty());
        let k = r.u32().ok_or_else(bad)? as usize;
        if k > r.rest().len() {
            return Err(StateError::Malformed);
        }
        let mut up_to_date = BTreeSet::new();
        for _ in 0..k {
            up_to_date.insert(r.str8().ok_or_else(bad)?);
        }
        out.insert(
            name,
            ResourceState {
                term,
                primary,
                up_to_date,
            },
        );
    }
    if !r.is_empty() {
        return Err(StateError::Malformed);
    }
    Ok(out)
}
