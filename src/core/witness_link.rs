//! A data node's view of its witness: what it last said, the request in flight, when to
//! ask next (with back-off after a refusal or a silence), and what is wrong with it.
//!
//! Pure bookkeeping for [`crate::core::resource::Resource`], which decides what to ask.

use crate::core::witness::Op;
use crate::core::Instant;

#[derive(Debug, Default)]
pub struct WitnessLink {
    /// The request sent and not answered yet, with when it was sent.
    pub in_flight: Option<(Op, Instant)>,
    pub reachable: bool,
    pub last_reply: Option<Instant>,
    /// The next periodic request (renewal or query).
    pub next_at: Instant,
    /// The witness's view as of its last reply.
    pub primary: String,
    pub up_to_date: Vec<String>,
    pub release_pending: bool,
    /// The witness may count the peer as up to date: what its last reply said, but also
    /// while a request to add it has gone unanswered (it may have been carried out).
    pub peer_maybe_up_to_date: bool,
    /// `tandemctl adopt-witness` waits for its request (`force`: the peer is not
    /// connected, the operator vouches that this node's term is the pair's highest).
    pub adopt: Option<bool>,
    /// No request before this: set after a refusal or a silence.
    pub not_before: Instant,
    backoff_ms: u64,
    /// What is wrong with the witness, for `status` and `/metrics`; `None` while it
    /// answers and grants what this node needs.
    pub trouble: Option<String>,
}

impl WitnessLink {
    pub fn new(now: Instant) -> WitnessLink {
        WitnessLink {
            next_at: now,
            not_before: now,
            peer_maybe_up_to_date: true,
            ..WitnessLink::default()
        }
    }

    /// When the witness timer fires: the periodic request, but never inside a back-off.
    pub fn due(&self) -> Option<Instant> {
        self.in_flight
            .is_none()
            .then(|| self.next_at.max(self.not_before))
    }

    /// May a request go out at `now`?
    pub fn may_send(&self, now: Instant) -> bool {
        self.in_flight.is_none() && now >= self.not_before
    }

    /// The witness refused `op` or did not answer: wait before asking again, longer each
    /// time from `lease_ms / 10` up to `lease_ms / 3`. A promotion refused because the
    /// old primary's lease still runs (`lease_left_ms`, from the witness) is asked again
    /// the moment that lease ends, so a failover is not delayed by the back-off. The
    /// retry happens at the back-off's end.
    pub fn back_off(&mut self, now: Instant, op: Op, lease_ms: u64, lease_left_ms: u64) {
        let first = (lease_ms / 10).max(10);
        let cap = (lease_ms / 3).max(first);
        let wait = match op {
            Op::Promote if lease_left_ms > 0 => lease_left_ms.min(lease_ms).saturating_add(1),
            _ if self.backoff_ms == 0 => first,
            _ => self.backoff_ms.saturating_mul(2).min(cap),
        };
        if !(op == Op::Promote && lease_left_ms > 0) {
            self.backoff_ms = wait;
        }
        self.not_before = now.plus_ms(wait);
        self.next_at = self.next_at.min(self.not_before);
    }

    /// A granted answer: no back-off for the next request.
    pub fn granted(&mut self) {
        self.backoff_ms = 0;
    }

    /// Record what is wrong (`None`: nothing). Returns the change when it differs from
    /// the last one in more than its numbers, for the caller to log once per change.
    pub fn set_trouble(&mut self, trouble: Option<String>) -> Option<Option<String>> {
        let key = |t: &Option<String>| {
            t.as_ref().map(|s| {
                s.chars()
                    .filter(|c| !c.is_ascii_digit())
                    .collect::<String>()
            })
        };
        let changed = key(&self.trouble) != key(&trouble);
        self.trouble = trouble;
        changed.then(|| self.trouble.clone())
    }
}
