//! The secondary's queue of the peer's writes and resync blocks: each is submitted once
//! no earlier one in the queue overlaps it (so overlapping writes land in the primary's
//! order), and the primary's barriers, each flushed once every write of its epoch and
//! before is on the disk.

use std::collections::{HashMap, VecDeque};

use super::{overlaps, BufId, IoId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PeerOpKind {
    Data { seq: u64, epoch: u64 },
    Resync,
}

#[derive(Debug)]
pub(super) struct PeerOp {
    pub(super) kind: PeerOpKind,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) buf: BufId,
    pub(super) io: Option<IoId>,
}

#[derive(Debug, Default)]
pub(super) struct PeerWrites {
    ops: VecDeque<PeerOp>,
    /// Index into `ops` of each op on its way to the disk.
    by_io: HashMap<IoId, usize>,
    /// Barriers received, oldest first.
    barriers: VecDeque<u64>,
    /// The flush of the oldest barrier is under way.
    barrier_flushing: bool,
}

impl PeerWrites {
    /// A write or resync block from the peer, queued (not yet submitted).
    pub(super) fn push(&mut self, kind: PeerOpKind, offset: u64, len: u64, buf: BufId) {
        self.ops.push_back(PeerOp {
            kind,
            offset,
            len,
            buf,
            io: None,
        });
    }

    /// Queued ops that no earlier op in the queue overlaps: they may go to the disk.
    pub(super) fn ready(&self) -> Vec<usize> {
        (0..self.ops.len())
            .filter(|&i| {
                let op = &self.ops[i];
                op.io.is_none()
                    && !self
                        .ops
                        .iter()
                        .take(i)
                        .any(|e| overlaps(e.offset, e.len, op.offset, op.len))
            })
            .collect()
    }

    /// Op `i` (from [`PeerWrites::ready`]) goes to the disk as `io`: its offset and
    /// buffer.
    pub(super) fn submit(&mut self, i: usize, io: IoId) -> Option<(u64, BufId)> {
        let op = self.ops.get_mut(i)?;
        op.io = Some(io);
        self.by_io.insert(io, i);
        Some((op.offset, op.buf))
    }

    /// The disk finished `io`: its op, out of the queue.
    pub(super) fn done(&mut self, io: IoId) -> Option<PeerOp> {
        let i = self.by_io.get(&io).copied()?;
        let op = self.ops.remove(i)?;
        self.reindex();
        Some(op)
    }

    fn reindex(&mut self) {
        self.by_io.clear();
        for (i, op) in self.ops.iter().enumerate() {
            if let Some(io) = op.io {
                self.by_io.insert(io, i);
            }
        }
    }

    pub(super) fn push_barrier(&mut self, epoch: u64) {
        self.barriers.push_back(epoch);
    }

    /// The oldest barrier may be flushed now (no flush under way, and every write of
    /// its epoch or before is on the disk): its epoch, and the flush counts as started.
    pub(super) fn barrier_ready(&mut self) -> Option<u64> {
        if self.barrier_flushing {
            return None;
        }
        let epoch = *self.barriers.front()?;
        let waiting = self.ops.iter().any(|op| match op.kind {
            PeerOpKind::Data { epoch: e, .. } => e <= epoch,
            PeerOpKind::Resync => false,
        });
        if waiting {
            return None;
        }
        self.barrier_flushing = true;
        Some(epoch)
    }

    /// The flush for `epoch` is done: `true` if it was the oldest barrier's (to be
    /// acknowledged).
    pub(super) fn barrier_flushed(&mut self, epoch: u64) -> bool {
        self.barrier_flushing = false;
        if self.barriers.front() == Some(&epoch) {
            self.barriers.pop_front();
            return true;
        }
        false
    }

    /// The flush failed: no acknowledgement; the next barrier check may try again.
    pub(super) fn barrier_flush_failed(&mut self) {
        self.barrier_flushing = false;
    }

    /// The connection is gone: queued ops are dropped (their buffers returned), those on
    /// their way to the disk finish; the barriers are forgotten.
    pub(super) fn connection_lost(&mut self) -> Vec<BufId> {
        let mut dropped = Vec::new();
        self.ops.retain(|op| {
            let keep = op.io.is_some();
            if !keep {
                dropped.push(op.buf);
            }
            keep
        });
        self.reindex();
        self.barriers.clear();
        dropped
    }

    pub(super) fn is_idle(&self) -> bool {
        self.ops.is_empty() && self.barriers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(epoch: u64) -> PeerOpKind {
        PeerOpKind::Data { seq: 0, epoch }
    }

    #[test]
    fn an_overlapping_write_waits_for_the_earlier_one() {
        let mut q = PeerWrites::default();
        q.push(data(1), 0, 8192, BufId(1));
        q.push(data(1), 4096, 4096, BufId(2));
        q.push(data(1), 16384, 4096, BufId(3));
        assert_eq!(q.ready(), vec![0, 2]);
        q.submit(0, IoId(10));
        q.submit(2, IoId(11));
        assert_eq!(q.ready(), Vec::<usize>::new());
        assert_eq!(q.done(IoId(10)).map(|o| o.buf), Some(BufId(1)));
        assert_eq!(q.ready(), vec![0], "the second write, now first");
        assert_eq!(q.done(IoId(11)).map(|o| o.buf), Some(BufId(3)));
    }

    #[test]
    fn a_barrier_is_flushed_once_its_epochs_writes_are_on_the_disk() {
        let mut q = PeerWrites::default();
        q.push(data(1), 0, 4096, BufId(1));
        q.push(data(2), 8192, 4096, BufId(2));
        q.push_barrier(1);
        assert_eq!(q.barrier_ready(), None, "epoch 1's write is still queued");
        q.submit(0, IoId(5));
        q.done(IoId(5));
        assert_eq!(q.barrier_ready(), Some(1), "epoch 2 does not hold it back");
        assert_eq!(q.barrier_ready(), None, "one flush at a time");
        assert!(q.barrier_flushed(1));
        assert!(!q.barrier_flushed(1));
    }

    #[test]
    fn a_lost_connection_drops_queued_writes_and_barriers_but_not_those_in_flight() {
        let mut q = PeerWrites::default();
        q.push(data(1), 0, 4096, BufId(1));
        q.push(PeerOpKind::Resync, 8192, 4096, BufId(2));
        q.push_barrier(1);
        q.submit(0, IoId(7));
        assert_eq!(q.connection_lost(), vec![BufId(2)]);
        assert!(!q.is_idle());
        assert_eq!(q.done(IoId(7)).map(|o| o.buf), Some(BufId(1)));
        assert!(q.is_idle());
    }
}
