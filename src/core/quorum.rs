//! Quorum and timeout arithmetic, pure and small enough to check against tables
//! (`tests/core_quorum.rs`).
//!
//! A primary may complete writes only while it has quorum: its peer answered a ping it
//! sent less than `peer-timeout` ago, or it holds an unexpired lease from the witness. A
//! secondary asks to be promoted only after `peer-timeout + promote-margin` of silence, and
//! the witness grants only after the old lease expired at the witness. Both deadlines are
//! counted on the side that must stop from the moment it *sent* something, so the side
//! that must stop always stops first, whatever the network delay, as long as clock rates
//! stay within [`MAX_CLOCK_RATE_PERMILLE`].

use crate::core::Instant;

/// The documented bound: every machine's clock runs within this many permille of true
/// time (NTP-less quartz is ~0.1 permille; this leaves two orders of magnitude).
pub const MAX_CLOCK_RATE_PERMILLE: u64 = 10;

/// How much a node shortens the lease the witness granted: the two clocks may differ in
/// rate by up to twice [`MAX_CLOCK_RATE_PERMILLE`], plus headroom for the time between the
/// node's check and its acknowledgement reaching the application.
pub const LEASE_DRIFT_PERMILLE: u64 = 2 * MAX_CLOCK_RATE_PERMILLE + 5;

/// What to do with application I/O on a primary without quorum (`on-no-quorum`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnNoQuorum {
    /// Hold I/O until quorum returns (or the node learns it is no longer primary).
    SuspendIo,
    /// Fail I/O with EIO at once.
    IoError,
}

impl OnNoQuorum {
    pub fn parse(s: &str) -> Option<OnNoQuorum> {
        match s {
            "suspend-io" => Some(OnNoQuorum::SuspendIo),
            "io-error" => Some(OnNoQuorum::IoError),
            _ => None,
        }
    }
}

/// Resource-level fencing policy (`fencing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fencing {
    None,
    /// Outdate the peer at the witness before completing writes without it.
    Resource,
    /// As `Resource`, and also run the `fence-peer` handler before promotion; promote
    /// only on exit code 7 (fenced) or 4 (peer outdated).
    Stonith,
}

impl Fencing {
    pub fn parse(s: &str) -> Option<Fencing> {
        match s {
            "none" => Some(Fencing::None),
            "resource" => Some(Fencing::Resource),
            "stonith" => Some(Fencing::Stonith),
            _ => None,
        }
    }
}

/// What a `fence-peer` handler's exit status means, with DRBD's codes; `Ok` when a
/// `fencing = "stonith"` promotion may go ahead (7, the peer was fenced, or 4, it is
/// outdated), `Err` with the reason otherwise. `None`: the handler did not exit by
/// itself (it could not be started, was killed, or ran past its timeout).
pub fn fence_peer_verdict(exit_code: Option<i32>) -> Result<&'static str, String> {
    match exit_code {
        Some(7) => Ok("the peer was fenced (exit 7)"),
        Some(4) => Ok("the peer is outdated (exit 4)"),
        Some(3) => Err("the peer is inconsistent (exit 3), not fenced".into()),
        Some(5) => Err("the peer is unreachable (exit 5), not fenced".into()),
        Some(6) => Err("the peer is primary (exit 6)".into()),
        Some(c) => Err(format!("the handler failed (exit {c})")),
        None => Err("the handler did not finish (not started, killed or timed out)".into()),
    }
}

/// A primary's view of its two votes besides its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Votes {
    /// Until when the peer counts as present: `peer-timeout` after the newest answered
    /// ping was sent. `None` when not connected.
    pub peer_fresh_until: Option<Instant>,
    /// Until when the witness's lease holds on this node's clock.
    pub lease_until: Option<Instant>,
    /// Whether the peer counts at all. After quorum was lost entirely it does not, until
    /// the witness renews the lease: meanwhile the witness may have made the peer primary
    /// of a newer term without the peer having heard of it (the reply was lost, or it
    /// crashed), so only the witness can say that this node is still the primary.
    pub peer_counts: bool,
}

impl Votes {
    pub fn peer_fresh(&self, now: Instant) -> bool {
        self.peer_counts && self.peer_fresh_until.is_some_and(|t| now < t)
    }
    pub fn lease_valid(&self, now: Instant) -> bool {
        self.lease_until.is_some_and(|t| now < t)
    }
    /// Quorum: this node plus at least one of the two others.
    pub fn quorum(&self, now: Instant) -> bool {
        self.peer_fresh(now) || self.lease_valid(now)
    }
    /// When quorum will be lost if nothing is heard meanwhile (`None`: already lost).
    pub fn quorum_until(&self, now: Instant) -> Option<Instant> {
        let peer = self.peer_fresh_until.filter(|_| self.peer_counts);
        [peer, self.lease_until]
            .into_iter()
            .flatten()
            .filter(|&t| now < t)
            .max()
    }
    pub fn lease_left_ms(&self, now: Instant) -> u64 {
        self.lease_until.map_or(0, |t| t.ms_since(now))
    }
}

/// The earliest moment a secondary that last heard its primary at `last_rx` may ask the
/// witness to promote it.
pub fn promote_not_before(last_rx: Instant, peer_timeout_ms: u64, margin_ms: u64) -> Instant {
    last_rx.plus_ms(peer_timeout_ms + margin_ms)
}

/// The smallest promote margin that keeps self-fencing strictly ahead of promotion for a
/// given peer timeout: the two clocks may drift apart over the timeout, and the primary
/// needs time to notice.
pub fn min_promote_margin_ms(peer_timeout_ms: u64) -> u64 {
    let drift = peer_timeout_ms
        .saturating_mul(2 * MAX_CLOCK_RATE_PERMILLE)
        .div_ceil(1000);
    drift.saturating_add(50)
}

/// Check a resource's timeouts against the ordering rule. The error says which key to
/// change.
pub fn check_timeouts(
    ping_interval_ms: u64,
    peer_timeout_ms: u64,
    promote_margin_ms: u64,
    lease_ms: u64,
) -> Result<(), String> {
    if ping_interval_ms == 0 || peer_timeout_ms <= ping_interval_ms {
        return Err("ping-timeout-ms must be greater than ping-interval-ms (> 0)".into());
    }
    let min = min_promote_margin_ms(peer_timeout_ms);
    if promote_margin_ms < min {
        return Err(format!(
            "promote-margin-ms {promote_margin_ms} is too small for ping-timeout-ms \
             {peer_timeout_ms}: at least {min}, so the primary stops before the secondary may take over"
        ));
    }
    if lease_ms < 3 * 50 {
        return Err("lease-ms must be at least 150 (renewed every lease/3)".into());
    }
    Ok(())
}
