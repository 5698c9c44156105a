//! Metadata persistence: superblock, bitmap pages and activity-log transactions queued
//! as `MetaWrite`, in order and one at a time, so nothing acts on metadata before it is
//! durable; a failed write goes back to the head of the queue and is retried.

use super::*;

/// The metadata writes waiting, the one in flight, and the retry after a failure.
#[derive(Debug, Default)]
pub(super) struct MetaQueue {
    queue: VecDeque<(u64, Vec<u8>)>,
    in_flight: Option<(IoId, u64, Vec<u8>)>,
    retry_at: Option<Instant>,
    /// The last write failed and none has succeeded since.
    failing: bool,
}

/// What a completed metadata write changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MetaDone {
    /// Durable; `recovered` when it ends a run of failures.
    Written { recovered: bool },
    /// Failed: back at the head of the queue, retried at the returned time; `first`
    /// when it starts a run of failures.
    Failed { first: bool },
}

impl MetaQueue {
    pub(super) fn push(&mut self, offset: u64, bytes: Vec<u8>) {
        self.queue.push_back((offset, bytes));
    }

    /// A write may be issued now: none in flight, no retry pending, one waiting.
    pub(super) fn can_issue(&self) -> bool {
        self.in_flight.is_none() && self.retry_at.is_none() && !self.queue.is_empty()
    }

    /// Issue the next write as `io`: its offset and bytes.
    pub(super) fn issue(&mut self, io: IoId) -> Option<(u64, Vec<u8>)> {
        if !self.can_issue() {
            return None;
        }
        let (offset, bytes) = self.queue.pop_front()?;
        self.in_flight = Some((io, offset, bytes.clone()));
        Some((offset, bytes))
    }

    /// The write in flight completed (`ok`) or failed at `now`.
    pub(super) fn done(&mut self, now: Instant, ok: bool) -> MetaDone {
        let done = self.in_flight.take();
        if ok {
            let recovered = std::mem::take(&mut self.failing);
            return MetaDone::Written { recovered };
        }
        if let Some((_, offset, bytes)) = done {
            self.queue.push_front((offset, bytes));
        }
        self.retry_at = Some(now.plus_ms(META_RETRY_MS));
        let first = !self.failing;
        self.failing = true;
        MetaDone::Failed { first }
    }

    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// The retry time has come: the queue may issue again.
    pub(super) fn retry_due(&mut self) {
        self.retry_at = None;
    }

    pub(super) fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Something is written or waits to be.
    pub(super) fn busy(&self) -> bool {
        self.in_flight.is_some() || !self.queue.is_empty()
    }

    #[cfg(test)]
    pub(super) fn failing(&self) -> bool {
        self.failing
    }
}

impl Resource {
    pub(super) fn persist_superblock(&mut self) {
        let bytes = self.sb.encode();
        self.meta.push(self.sb.layout.superblock_offset, bytes);
        self.issue_meta();
    }

    pub(super) fn persist_dirty_pages(&mut self) {
        for page in self.bitmap.dirty_page_indices() {
            self.persist_page(page);
        }
    }

    pub(super) fn persist_page(&mut self, page: usize) {
        let bytes = self.bitmap.take_page(page);
        let off = self.sb.layout.bitmap_offset + (page * PAGE_BYTES) as u64;
        self.meta.push(off, bytes);
        self.issue_meta();
    }

    pub(super) fn issue_meta(&mut self) {
        if !self.meta.can_issue() {
            return;
        }
        let io = self.new_io(IoPurpose::Meta);
        if let Some((offset, bytes)) = self.meta.issue(io) {
            self.actions
                .push_back(Action::MetaWrite { io, offset, bytes });
        }
    }

    pub(super) fn meta_busy(&self) -> bool {
        self.meta.busy()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_go_out_in_order_one_at_a_time() {
        let mut q = MetaQueue::default();
        q.push(0, vec![1]);
        q.push(4096, vec![2]);
        assert_eq!(q.issue(IoId(1)), Some((0, vec![1])));
        assert!(!q.can_issue(), "one in flight at a time");
        assert_eq!(q.issue(IoId(2)), None);
        assert_eq!(
            q.done(Instant(5), true),
            MetaDone::Written { recovered: false }
        );
        assert_eq!(q.issue(IoId(2)), Some((4096, vec![2])));
        q.done(Instant(6), true);
        assert!(!q.busy());
    }

    #[test]
    fn a_failed_write_goes_back_to_the_head_and_waits_for_its_retry() {
        let mut q = MetaQueue::default();
        q.push(0, vec![1]);
        q.push(4096, vec![2]);
        q.issue(IoId(1));
        assert_eq!(q.done(Instant(10), false), MetaDone::Failed { first: true });
        assert!(q.failing() && q.busy());
        assert_eq!(q.retry_at(), Some(Instant(10 + META_RETRY_MS)));
        assert_eq!(q.issue(IoId(2)), None, "nothing before the retry time");
        q.retry_due();
        assert_eq!(q.issue(IoId(2)), Some((0, vec![1])), "the failed one first");
        assert_eq!(
            q.done(Instant(20), false),
            MetaDone::Failed { first: false }
        );
        q.retry_due();
        q.issue(IoId(3));
        assert_eq!(
            q.done(Instant(30), true),
            MetaDone::Written { recovered: true }
        );
        assert!(!q.failing());
        assert_eq!(q.issue(IoId(4)), Some((4096, vec![2])));
    }
}
