//! The resync's own state: the scan cursor over the bitmap, the chunks in flight (read
//! from the local disk, then sent and waiting for the peer's acknowledgement), and the
//! progress (bytes done of the total, and the rate). The decisions around it (what to
//! read next, when it is finished) stay with the resource, which owns the bitmap.

use super::overlaps;
use crate::core::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Being read from the local disk.
    Reading,
    /// Sent; waiting for the peer's `ResyncAck`.
    Sent,
}

#[derive(Debug)]
pub(super) struct Resync {
    /// Where the next scan of the bitmap starts.
    cursor: u64,
    /// Chunks in flight: offset, length, stage.
    in_flight: Vec<(u64, u64, Stage)>,
    done_bytes: u64,
    total_bytes: u64,
    started: Instant,
}

impl Resync {
    pub(super) fn new(now: Instant) -> Resync {
        Resync {
            cursor: 0,
            in_flight: Vec::new(),
            done_bytes: 0,
            total_bytes: 0,
            started: now,
        }
    }

    /// A resync of `total_bytes` starts at `now`, scanning from the beginning.
    pub(super) fn start(&mut self, now: Instant, total_bytes: u64) {
        self.total_bytes = total_bytes;
        self.done_bytes = 0;
        self.started = now;
        self.cursor = 0;
    }

    pub(super) fn cursor(&self) -> u64 {
        self.cursor
    }

    pub(super) fn set_cursor(&mut self, bit: u64) {
        self.cursor = bit;
    }

    pub(super) fn bytes_in_flight(&self) -> u64 {
        self.in_flight.iter().map(|e| e.1).sum()
    }

    pub(super) fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// A chunk in flight overlaps the range.
    pub(super) fn overlaps(&self, offset: u64, len: u64) -> bool {
        self.in_flight
            .iter()
            .any(|e| overlaps(e.0, e.1, offset, len))
    }

    /// A chunk being read overlaps the range (a write there must wait: the read would
    /// send old data after the new).
    pub(super) fn reading(&self, offset: u64, len: u64) -> bool {
        self.in_flight
            .iter()
            .any(|e| e.2 == Stage::Reading && overlaps(e.0, e.1, offset, len))
    }

    pub(super) fn start_read(&mut self, offset: u64, len: u64) {
        self.in_flight.push((offset, len, Stage::Reading));
    }

    /// The read of a chunk finished. With `send`, a chunk still in flight becomes sent
    /// (`true`: send it); otherwise it is dropped.
    pub(super) fn read_done(&mut self, offset: u64, len: u64, send: bool) -> bool {
        let reading = |e: &(u64, u64, Stage)| e.0 == offset && e.1 == len && e.2 == Stage::Reading;
        if send {
            if let Some(e) = self.in_flight.iter_mut().find(|e| reading(e)) {
                e.2 = Stage::Sent;
                return true;
            }
        }
        self.in_flight.retain(|e| !reading(e));
        false
    }

    /// The peer acknowledged a chunk: `true` if it was one sent on this connection.
    pub(super) fn acked(&mut self, offset: u64, len: u64) -> bool {
        let before = self.in_flight.len();
        self.in_flight
            .retain(|e| !(e.0 == offset && e.1 == len && e.2 == Stage::Sent));
        self.in_flight.len() < before
    }

    pub(super) fn add_done(&mut self, bytes: u64) {
        self.done_bytes = self.done_bytes.saturating_add(bytes);
    }

    /// Blocks marked out of sync again: chunks over them are forgotten, so that a late
    /// acknowledgement cannot clear them.
    pub(super) fn forget(&mut self, offset: u64, len: u64) {
        self.in_flight.retain(|e| !overlaps(e.0, e.1, offset, len));
    }

    /// The connection is gone: what was sent is never acknowledged; reads in flight
    /// finish (and are dropped then).
    pub(super) fn connection_lost(&mut self) {
        self.in_flight.retain(|e| e.2 == Stage::Reading);
    }

    pub(super) fn done_bytes(&self) -> u64 {
        self.done_bytes
    }

    pub(super) fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    pub(super) fn bytes_per_sec(&self, now: Instant) -> u64 {
        self.done_bytes * 1000 / now.ms_since(self.started).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_read_then_sent_then_acknowledged_once() {
        let mut r = Resync::new(Instant(0));
        r.start(Instant(0), 8192);
        r.start_read(0, 4096);
        assert!(r.reading(0, 1) && r.overlaps(4095, 10) && !r.overlaps(4096, 10));
        assert_eq!(r.bytes_in_flight(), 4096);
        assert!(!r.acked(0, 4096), "not sent yet");
        assert!(r.read_done(0, 4096, true));
        assert!(!r.reading(0, 4096) && r.overlaps(0, 4096));
        assert!(r.acked(0, 4096));
        assert!(!r.acked(0, 4096), "acknowledged once");
        r.add_done(4096);
        assert!(r.is_idle());
        assert_eq!(r.bytes_per_sec(Instant(500)), 8192);
    }

    #[test]
    fn a_read_that_is_not_sent_is_dropped_and_a_lost_connection_drops_what_was_sent() {
        let mut r = Resync::new(Instant(0));
        r.start_read(0, 4096);
        assert!(!r.read_done(0, 4096, false));
        assert!(r.is_idle());
        r.start_read(0, 4096);
        r.start_read(8192, 4096);
        r.read_done(0, 4096, true);
        r.connection_lost();
        assert!(!r.overlaps(0, 4096), "sent: gone with the connection");
        assert!(r.reading(8192, 4096), "still being read");
    }

    #[test]
    fn blocks_written_again_forget_the_chunks_over_them() {
        let mut r = Resync::new(Instant(0));
        r.start_read(0, 16384);
        r.read_done(0, 16384, true);
        r.forget(12288, 4096);
        assert!(!r.acked(0, 16384), "a late ack clears nothing");
    }
}
