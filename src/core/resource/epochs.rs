//! Epochs and the transfer log on the primary: the current epoch (closed by every
//! application flush, after `MAX_EPOCH_WRITES` writes, or `EPOCH_CLOSE_MS` after it
//! opened), the writes still in flight locally per epoch (a flush waits for them), the
//! newest epoch whose barrier the peer acknowledged, and the transfer log: writes the
//! peer has but may not have flushed yet, which keep their activity-log extents and go to
//! the bitmap if the connection drops before their barrier is acknowledged.

use std::collections::BTreeMap;

use super::{EPOCH_CLOSE_MS, MAX_EPOCH_WRITES};
use crate::core::Instant;

#[derive(Debug)]
pub(super) struct Epochs {
    current: u64,
    /// Replicated writes in the current epoch, and when the first one came.
    writes: u64,
    opened_at: Option<Instant>,
    /// Writes not yet done on the local disk, per epoch.
    local_pending: BTreeMap<u64, usize>,
    /// The newest epoch whose barrier the peer acknowledged (on this connection).
    peer_acked: Option<u64>,
    /// `(epoch, offset, len)` of writes the peer has written but maybe not flushed.
    transfer_log: Vec<(u64, u64, u64)>,
}

impl Epochs {
    pub(super) fn new() -> Epochs {
        Epochs {
            current: 1,
            writes: 0,
            opened_at: None,
            local_pending: BTreeMap::new(),
            peer_acked: None,
            transfer_log: Vec::new(),
        }
    }

    /// A write goes to the local disk in the current epoch (and to the peer if
    /// `replicated`); its epoch.
    pub(super) fn write_submitted(&mut self, replicated: bool, now: Instant) -> u64 {
        *self.local_pending.entry(self.current).or_insert(0) += 1;
        if replicated {
            self.writes += 1;
            self.opened_at.get_or_insert(now);
        }
        self.current
    }

    /// A write of `epoch` is done on the local disk.
    pub(super) fn write_local_done(&mut self, epoch: u64) {
        if let Some(c) = self.local_pending.get_mut(&epoch) {
            *c -= 1;
            if *c == 0 {
                self.local_pending.remove(&epoch);
            }
        }
    }

    /// The oldest epoch with a write still in flight locally.
    pub(super) fn oldest_local_pending(&self) -> Option<u64> {
        self.local_pending.keys().next().copied()
    }

    /// The current epoch holds as many replicated writes as one may.
    pub(super) fn full(&self) -> bool {
        self.writes >= MAX_EPOCH_WRITES
    }

    /// The current epoch holds replicated writes.
    pub(super) fn has_writes(&self) -> bool {
        self.writes > 0
    }

    /// When the current epoch closes by itself.
    pub(super) fn close_due(&self) -> Option<Instant> {
        self.opened_at.map(|t| t.plus_ms(EPOCH_CLOSE_MS))
    }

    /// The timer has nothing to close.
    pub(super) fn disarm(&mut self) {
        self.opened_at = None;
    }

    /// Close the current epoch (its barrier goes out with the number returned).
    pub(super) fn close(&mut self) -> u64 {
        let closed = self.current;
        self.current += 1;
        self.writes = 0;
        self.opened_at = None;
        closed
    }

    /// The peer has flushed every write of `epoch`.
    pub(super) fn peer_acked(&self, epoch: u64) -> bool {
        self.peer_acked.is_some_and(|e| e >= epoch)
    }

    /// A write of `epoch` the peer has written: kept in the transfer log until its
    /// barrier is acknowledged; `false` if it already is (nothing kept).
    pub(super) fn keep(&mut self, epoch: u64, offset: u64, len: u64) -> bool {
        if self.peer_acked(epoch) {
            return false;
        }
        self.transfer_log.push((epoch, offset, len));
        true
    }

    /// The peer acknowledged the barrier of `epoch`: the writes it makes durable there,
    /// as `(offset, len)`, leave the transfer log.
    pub(super) fn barrier_acked(&mut self, epoch: u64) -> Vec<(u64, u64)> {
        self.peer_acked = Some(self.peer_acked.map_or(epoch, |e| e.max(epoch)));
        let mut durable = Vec::new();
        self.transfer_log.retain(|&(e, off, len)| {
            let keep = e > epoch;
            if !keep {
                durable.push((off, len));
            }
            keep
        });
        durable
    }

    /// The connection is gone: the transfer log's writes, as `(offset, len)`, may not
    /// be durable on the peer; the open epoch carries nothing replicated any more.
    pub(super) fn connection_lost(&mut self) -> Vec<(u64, u64)> {
        self.writes = 0;
        self.opened_at = None;
        std::mem::take(&mut self.transfer_log)
            .into_iter()
            .map(|(_, off, len)| (off, len))
            .collect()
    }

    /// Barrier acknowledgements of the old connection count for nothing on a new one.
    pub(super) fn forget_peer_acks(&mut self) {
        self.peer_acked = None;
    }

    pub(super) fn transfer_log_is_empty(&self) -> bool {
        self.transfer_log.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_stays_in_the_transfer_log_until_its_barrier_is_acknowledged() {
        let mut e = Epochs::new();
        let first = e.write_submitted(true, Instant(0));
        assert_eq!(e.close(), first);
        let second = e.write_submitted(true, Instant(1));
        assert!(e.keep(first, 0, 4096));
        assert!(e.keep(second, 8192, 4096));
        assert_eq!(e.barrier_acked(first), vec![(0, 4096)]);
        assert!(!e.transfer_log_is_empty());
        assert!(e.peer_acked(first) && !e.peer_acked(second));
        assert!(!e.keep(first, 0, 4096), "already durable on the peer");
        assert_eq!(e.barrier_acked(second), vec![(8192, 4096)]);
        assert!(e.transfer_log_is_empty());
    }

    #[test]
    fn a_lost_connection_hands_back_the_transfer_log_and_forgets_acks_when_told() {
        let mut e = Epochs::new();
        let ep = e.write_submitted(true, Instant(0));
        e.keep(ep, 0, 4096);
        e.barrier_acked(ep - 1);
        assert_eq!(e.connection_lost(), vec![(0, 4096)]);
        assert!(!e.has_writes() && e.close_due().is_none());
        assert!(e.peer_acked(ep - 1));
        e.forget_peer_acks();
        assert!(!e.peer_acked(ep - 1));
    }

    #[test]
    fn an_epoch_closes_when_full_or_after_its_time_and_flushes_wait_for_local_writes() {
        let mut e = Epochs::new();
        assert_eq!(e.close_due(), None);
        let ep = e.write_submitted(true, Instant(5));
        assert_eq!(e.close_due(), Some(Instant(5 + EPOCH_CLOSE_MS)));
        e.write_submitted(false, Instant(6));
        assert_eq!(e.oldest_local_pending(), Some(ep));
        e.write_local_done(ep);
        assert_eq!(e.oldest_local_pending(), Some(ep), "one more in flight");
        e.write_local_done(ep);
        assert_eq!(e.oldest_local_pending(), None);
        for _ in 1..MAX_EPOCH_WRITES {
            e.write_submitted(true, Instant(7));
        }
        assert!(e.full());
    }
}
