//! Quorum and timeout arithmetic against small readable tables.

use tandem::core::quorum::{
    check_timeouts, fence_peer_verdict, min_promote_margin_ms, promote_not_before, Votes,
};
use tandem::core::Instant;

fn t(ms: u64) -> Option<Instant> {
    Some(Instant(ms))
}

#[test]
fn quorum_table() {
    // (peer fresh until, lease until, peer counts, now, quorum)
    let rows = [
        (None, None, true, 100, false),
        (t(200), None, true, 100, true),
        (t(200), None, true, 200, false), // expiry is exclusive
        (None, t(150), true, 149, true),
        (None, t(150), true, 150, false),
        (t(300), t(150), true, 250, true),
        // After a total loss only the witness can restore quorum.
        (t(300), None, false, 250, false),
        (t(300), t(400), false, 250, true),
    ];
    for (peer, lease, counts, now, want) in rows {
        let v = Votes {
            peer_fresh_until: peer,
            lease_until: lease,
            peer_counts: counts,
        };
        assert_eq!(
            v.quorum(Instant(now)),
            want,
            "peer {peer:?} lease {lease:?} counts {counts} now {now}"
        );
        assert_eq!(v.quorum_until(Instant(now)).is_some(), want);
    }
}

#[test]
fn self_fencing_comes_before_promotion() {
    // The primary stops counting its peer at ping_sent + timeout; the secondary asks no
    // earlier than last_rx + timeout + margin, and last_rx >= ping_sent.
    for (timeout, margin) in [(800, 200), (2000, 500), (5000, 500)] {
        assert!(check_timeouts(timeout / 4, timeout, margin, 2000).is_ok());
        let ping_sent = 1000;
        let primary_stops = ping_sent + timeout;
        let secondary_asks = promote_not_before(Instant(ping_sent), timeout, margin).0;
        assert!(primary_stops < secondary_asks, "{timeout}/{margin}");
        // Even with both clocks off by the documented bound in opposite directions.
        let worst_primary = primary_stops * 1010 / 1000;
        let worst_secondary = secondary_asks * 990 / 1000;
        assert!(
            (worst_primary - ping_sent) < (worst_secondary - ping_sent * 990 / 1000),
            "{timeout}/{margin}"
        );
    }
}

#[test]
fn timeout_config_table() {
    // (interval, timeout, margin, lease, accepted)
    let rows = [
        (500, 2000, 500, 2000, true),
        (500, 2000, min_promote_margin_ms(2000), 2000, true),
        (500, 2000, min_promote_margin_ms(2000) - 1, 2000, false),
        (0, 2000, 500, 2000, false),
        (2000, 2000, 500, 2000, false),
        (500, 2000, 500, 100, false),
    ];
    for (i, to, m, l, ok) in rows {
        assert_eq!(check_timeouts(i, to, m, l).is_ok(), ok, "{i} {to} {m} {l}");
    }
}

#[test]
fn fence_peer_exit_codes() {
    // (exit code, promotion may proceed) with DRBD's meanings.
    let rows = [
        (Some(3), false), // peer inconsistent: not fenced
        (Some(4), true),  // peer outdated
        (Some(5), false), // peer unreachable: it may still be running
        (Some(6), false), // peer is primary
        (Some(7), true),  // peer fenced (powered off)
        (Some(0), false),
        (Some(1), false),
        (None, false), // killed, timed out, not started
    ];
    for (code, ok) in rows {
        let v = fence_peer_verdict(code);
        assert_eq!(v.is_ok(), ok, "exit {code:?}: {v:?}");
    }
}
