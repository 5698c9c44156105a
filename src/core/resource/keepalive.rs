//! Keepalive: pings on the meta channel, the last sign of life from the peer, and the
//! pings still unanswered (an answer proves the peer alive from the ping's send time,
//! never from its receipt).

use std::collections::VecDeque;

use crate::core::Instant;

/// Unanswered pings kept at most; older ones are forgotten.
const MAX_PINGS_OUTSTANDING: usize = 64;

#[derive(Debug)]
pub(super) struct Keepalive {
    last_rx: Instant,
    next_ping: Option<Instant>,
    ping_id: u64,
    sent: VecDeque<(u64, Instant)>,
}

impl Keepalive {
    pub(super) fn new(now: Instant) -> Keepalive {
        Keepalive {
            last_rx: now,
            next_ping: None,
            ping_id: 0,
            sent: VecDeque::new(),
        }
    }

    /// Something arrived from the peer.
    pub(super) fn heard(&mut self, now: Instant) {
        self.last_rx = now;
    }

    pub(super) fn last_rx(&self) -> Instant {
        self.last_rx
    }

    /// When the peer counts as gone if nothing arrives first.
    pub(super) fn silent_at(&self, timeout_ms: u64) -> Instant {
        self.last_rx.plus_ms(timeout_ms)
    }

    pub(super) fn next_ping(&self) -> Option<Instant> {
        self.next_ping
    }

    /// A new connection: ping at once (the peer counts toward quorum only once it has
    /// answered one), forget the old connection's pings.
    pub(super) fn connected(&mut self, now: Instant) {
        self.last_rx = now;
        self.next_ping = Some(now);
        self.sent.clear();
    }

    /// The connection is gone: no pings, and no answer to an old one counts.
    pub(super) fn stop(&mut self) {
        self.next_ping = None;
        self.sent.clear();
    }

    /// Time to ping: the id to send; the next ping is due `interval_ms` later.
    pub(super) fn ping(&mut self, now: Instant, interval_ms: u64) -> u64 {
        self.ping_id += 1;
        if self.sent.len() >= MAX_PINGS_OUTSTANDING {
            self.sent.pop_front();
        }
        self.sent.push_back((self.ping_id, now));
        self.next_ping = Some(now.plus_ms(interval_ms));
        self.ping_id
    }

    /// The peer answered ping `id`: when that ping was sent, if it was outstanding.
    /// Older pings are answered by it too.
    pub(super) fn answered(&mut self, id: u64) -> Option<Instant> {
        while let Some(&(pid, sent)) = self.sent.front() {
            if pid > id {
                break;
            }
            self.sent.pop_front();
            if pid == id {
                return Some(sent);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_counts_from_its_ping_and_clears_older_pings() {
        let mut k = Keepalive::new(Instant(0));
        k.connected(Instant(10));
        assert_eq!(k.next_ping(), Some(Instant(10)));
        let a = k.ping(Instant(10), 100);
        let b = k.ping(Instant(110), 100);
        let c = k.ping(Instant(210), 100);
        assert_eq!(k.next_ping(), Some(Instant(310)));
        assert_eq!(k.answered(b), Some(Instant(110)));
        // `a` went with `b`; `c` is still out.
        assert_eq!(k.answered(a), None);
        assert_eq!(k.answered(c), Some(Instant(210)));
        assert_eq!(k.answered(c), None);
    }

    #[test]
    fn a_new_connection_forgets_the_old_pings_and_a_lost_one_stops_pinging() {
        let mut k = Keepalive::new(Instant(0));
        k.connected(Instant(0));
        let old = k.ping(Instant(0), 100);
        k.stop();
        assert_eq!(k.next_ping(), None);
        k.connected(Instant(500));
        assert_eq!(k.answered(old), None);
        assert_eq!(k.silent_at(800), Instant(1300));
        k.heard(Instant(900));
        assert_eq!(k.last_rx(), Instant(900));
        assert_eq!(k.silent_at(800), Instant(1700));
    }

    #[test]
    fn at_most_64_pings_wait_for_an_answer() {
        let mut k = Keepalive::new(Instant(0));
        let first = k.ping(Instant(0), 1);
        for t in 1..MAX_PINGS_OUTSTANDING as u64 + 1 {
            k.ping(Instant(t), 1);
        }
        assert_eq!(k.answered(first), None);
    }
}
