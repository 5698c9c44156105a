//! The witness's decisions, pure: per resource, the term (the fencing token), the current
//! primary and its lease, and the up-to-date set.
//!
//! # Driving it
//!
//! Build a [`Witness`] from the state last persisted ([`decode_state`]) and `now`; for
//! each authenticated request call [`Witness::handle`]. When the returned
//! [`Outcome::persist`] is set, write [`Witness::encode_state`] durably (temp file, fsync,
//! rename, fsync the directory) **before** sending the reply: a grant that was answered
//! but not stored could be granted again to someone else after a restart.
//!
//! Leases are not stored. Instead, a witness grants nothing for one lease period after it
//! starts ([`Witness::new`]), so that every lease granted before a restart has expired
//! before any new one is granted.

use std::collections::{BTreeMap, BTreeSet, HashMap};

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
    /// For a granted lease: its length, counted by the witness from receipt.
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

#[must_use = "persist before replying when `persist` is set"]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub reply: Reply,
    pub persist: bool,
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
        if req.seq > 0 {
            let key = (req.resource.clone(), node.to_string());
            let last = self.last_seq.get(&key).copied().unwrap_or(0);
            if req.seq <= last {
                let st = self.state.get(&req.resource).cloned().unwrap_or_default();
                return Outcome {
                    reply: Reply {
                        granted: false,
                        term: st.term,
                        primary: st.primary.unwrap_or_default(),
                        up_to_date: st.up_to_date.into_iter().collect(),
                        reason: format!("stale request {} (already handled {last})", req.seq),
                        ..Reply::default()
                    },
                    persist: false,
                };
            }
            self.last_seq.insert(key, req.seq);
        }
        let in_grace = now < self.grace_until;
        let grace_left = self.grace_until.ms_since(now);
        let live = self.lease_live(&req.resource, now);
        let lease_ms = self.lease_ms;
        let st = self.state.entry(req.resource.clone()).or_default();
        let mut reply = Reply {
            term: st.term,
            ..Reply::default()
        };
        let mut persist = false;
        let refuse = |mut r: Reply, why: String| {
            r.granted = false;
            r.reason = why;
            r
        };
        let is_primary_of_term =
            req.term == st.term && st.primary.as_deref() == Some(node) && st.term > 0;
        let reply = match req.op {
            Op::Query => {
                reply.granted = true;
                reply
            }
            _ if req.term > st.term => refuse(
                reply,
                format!("term {} is newer than the witness's {}", req.term, st.term),
            ),
            Op::Renew | Op::Outdate | Op::UpToDate | Op::Release if req.term < st.term => refuse(
                reply,
                format!("stale term {} (current {})", req.term, st.term),
            ),
            Op::Renew | Op::Outdate | Op::UpToDate | Op::Release if !is_primary_of_term => refuse(
                reply,
                format!("{node} is not the primary of term {}", st.term),
            ),
            Op::Renew if in_grace => refuse(
                reply,
                format!("witness restarted: no leases for another {grace_left} ms"),
            ),
            Op::Renew => {
                self.leases
                    .insert(req.resource.clone(), now.plus_ms(lease_ms));
                reply.granted = true;
                reply.lease_ms = lease_ms;
                reply
            }
            Op::Outdate | Op::UpToDate if req.peer.is_empty() || req.peer == node => {
                refuse(reply, "outdate/up-to-date needs the peer's name".into())
            }
            Op::Outdate => {
                persist = st.up_to_date.remove(&req.peer);
                reply.granted = true;
                reply
            }
            Op::UpToDate => {
                persist = st.up_to_date.insert(req.peer.clone());
                reply.granted = true;
                reply
            }
            Op::Release => {
                st.primary = None;
                self.leases.remove(&req.resource);
                persist = true;
                reply.granted = true;
                reply
            }
            Op::Promote if in_grace => refuse(
                reply,
                format!("witness restarted: no promotion for another {grace_left} ms"),
            ),
            // The primary of record asking again (a repeated or late request, or a
            // restart within its lease): nobody else can hold its term, so it keeps it.
            // Granting a new term here would replace the node by itself.
            Op::Promote if st.primary.as_deref() == Some(node) && st.term > 0 && req.uptodate => {
                self.leases
                    .insert(req.resource.clone(), now.plus_ms(lease_ms));
                reply.granted = true;
                reply.lease_ms = lease_ms;
                reply
            }
            Op::Promote if live && st.primary.as_deref() != Some(node) => refuse(
                reply,
                format!(
                    "{} holds the lease of term {}",
                    st.primary.as_deref().unwrap_or("?"),
                    st.term
                ),
            ),
            Op::Promote if !req.uptodate => {
                refuse(reply, "the node's own disk is not up to date".into())
            }
            Op::Promote if !st.up_to_date.is_empty() && !st.up_to_date.contains(node) => refuse(
                reply,
                format!(
                    "{node} is not in the up-to-date set {:?}",
                    st.up_to_date.iter().collect::<Vec<_>>()
                ),
            ),
            Op::Promote => {
                st.term += 1;
                st.primary = Some(node.to_string());
                if st.up_to_date.is_empty() {
                    st.up_to_date.insert(node.to_string());
                }
                self.leases
                    .insert(req.resource.clone(), now.plus_ms(lease_ms));
                persist = true;
                reply.term = st.term;
                reply.granted = true;
                reply.lease_ms = lease_ms;
                reply
            }
        };
        let mut reply = reply;
        let st = &self.state[&req.resource];
        reply.primary = st.primary.clone().unwrap_or_default();
        reply.up_to_date = st.up_to_date.iter().cloned().collect();
        if !reply.granted && req.op != Op::Query {
            reply.term = st.term;
        }
        Outcome { reply, persist }
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

fn put_str(out: &mut Vec<u8>, s: &str) {
    let n = s.len().min(255);
    out.push(n as u8);
    out.extend_from_slice(&s.as_bytes()[..n]);
}

pub fn encode_state(state: &BTreeMap<String, ResourceState>) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&(state.len() as u32).to_le_bytes());
    for (name, st) in state {
        put_str(&mut p, name);
        p.extend_from_slice(&st.term.to_le_bytes());
        put_str(&mut p, st.primary.as_deref().unwrap_or(""));
        p.extend_from_slice(&(st.up_to_date.len() as u32).to_le_bytes());
        for n in &st.up_to_date {
            put_str(&mut p, n);
        }
    }
    let mut out = Vec::with_capacity(p.len() + 20);
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&(p.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&p).to_le_bytes());
    out.extend_from_slice(&p);
    out
}

struct Rd<'a>(&'a [u8]);
impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        if self.0.len() < n {
            return Err(StateError::Malformed);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, StateError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, StateError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn str(&mut self) -> Result<String, StateError> {
        let n = self.take(1)?[0] as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| StateError::Malformed)
    }
}

pub fn decode_state(b: &[u8]) -> Result<BTreeMap<String, ResourceState>, StateError> {
    if b.len() < 20 || &b[..8] != STATE_MAGIC {
        return Err(StateError::Magic);
    }
    let mut r = Rd(&b[8..]);
    let version = r.u32()?;
    if version != STATE_VERSION {
        return Err(StateError::Version(version));
    }
    let len = r.u32()? as usize;
    let crc = r.u32()?;
    let payload = r.take(len)?;
    if !r.0.is_empty() {
        return Err(StateError::Malformed);
    }
    if crc32fast::hash(payload) != crc {
        return Err(StateError::Crc);
    }
    let mut r = Rd(payload);
    let n = r.u32()? as usize;
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let name = r.str()?;
        let term = r.u64()?;
        let primary = Some(r.str()?).filter(|p| !p.is_empty());
        let k = r.u32()? as usize;
        if k > r.0.len() {
            return Err(StateError::Malformed);
        }
        let mut up_to_date = BTreeSet::new();
        for _ in 0..k {
            up_to_date.insert(r.str()?);
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
    if !r.0.is_empty() {
        return Err(StateError::Malformed);
    }
    Ok(out)
}
