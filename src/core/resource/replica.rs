//! The secondary's side of replication (peer writes in epoch order, barriers) and the
//! resync source (reading out-of-sync blocks and sending them).

use super::*;

impl Resource {
    /// Submit received writes that do not overlap an earlier one still in flight, so that
    /// overlapping writes land in the primary's order.
    pub(super) fn pump_peer(&mut self) {
        if self.meta_busy()
            || matches!(self.conn, Conn::WfBitmap { .. } | Conn::SyncStarting { .. })
        {
            return;
        }
        // A primary that just stepped down may still have its own writes on the way to
        // the disk; the peer's blocks must land after them.
        if self.writes.values().any(|w| w.submitted && !w.local_done) {
            return;
        }
        for i in self.peer_writes.ready() {
            let io = self.new_io(IoPurpose::PeerWrite);
            if let Some((offset, buf)) = self.peer_writes.submit(i, io) {
                self.actions
                    .push_back(Action::DiskWrite { io, offset, buf });
            }
        }
    }

    pub(super) fn peer_write_done(&mut self, io: IoId, ok: bool) {
        let Some(op) = self.peer_writes.done(io) else {
            return;
        };
        self.actions.push_back(Action::ReleaseBuf(op.buf));
        if self.connected() {
            match op.kind {
                PeerOpKind::Data { seq, .. } => {
                    self.send(if ok {
                        Msg::WriteAck { seq }
                    } else {
                        Msg::NegAck { seq }
                    });
                    if ok && self.conn == Conn::SyncTarget {
                        self.bitmap.clear_range(op.offset, op.len);
                    }
                }
                PeerOpKind::Resync => {
                    if ok {
                        self.bitmap.clear_range(op.offset, op.len);
                        self.resync.add_done(op.len);
                    }
                    self.send(Msg::ResyncAck {
                        offset: op.offset,
                        len: op.len as u32,
                        ok,
                    });
                }
            }
        }
        if !ok {
            self.local_disk_failed(
                format!("the disk failed a write at byte {} for the peer", op.offset),
                true,
            );
        }
        self.check_peer_barriers();
        self.pump_peer();
    }

    pub(super) fn check_peer_barriers(&mut self) {
        if let Some(epoch) = self.peer_writes.barrier_ready() {
            let io = self.new_io(IoPurpose::PeerFlush(epoch));
            self.actions.push_back(Action::DiskFlush { io });
        }
    }

    // ----- resync source -------------------------------------------------------------

    pub(super) fn pump_resync(&mut self) {
        if self.conn != Conn::SyncSource {
            return;
        }
        let block = self.bitmap.block_bytes();
        let chunk_blocks = (self.p.resync_chunk_bytes / block).max(1);
        let mut scanned_from_start = self.resync.cursor() == 0;
        while self.resync.bytes_in_flight() < self.p.resync_window_bytes {
            let Some(start) = self.bitmap.next_set(self.resync.cursor()) else {
                if scanned_from_start {
                    break;
                }
                self.resync.set_cursor(0);
                scanned_from_start = true;
                continue;
            };
            let mut end = start + 1;
            while end < self.bitmap.nbits() && end - start < chunk_blocks && self.bitmap.get(end) {
                end += 1;
            }
            self.resync.set_cursor(end);
            let offset = start * block;
            let len = ((end - start) * block).min(self.data_bytes() - offset);
            if self.resync.overlaps(offset, len) || self.conflicts(offset, len) {
                continue;
            }
            self.resync.start_read(offset, len);
            let buf = BufId(CORE_BUF_BIT | self.next_buf);
            self.next_buf += 1;
            let io = self.new_io(IoPurpose::ResyncRead { offset, len, buf });
            self.actions.push_back(Action::DiskRead {
                io,
                offset,
                len: len as u32,
                buf,
            });
        }
        if self.bitmap.count() == 0 && self.resync.is_idle() {
            self.sb.gen.clear_bitmap();
            self.sb.set(meta::FLAG_CRASHED_PRIMARY, false);
            self.send(Msg::ResyncDone { gen: self.sb.gen });
            self.conn = Conn::Established;
            self.peer_disk = DiskState::UpToDate;
            self.persist_dirty_pages();
            self.persist_superblock();
            tracing::info!(resource = %self.p.resource, bytes = self.resync.done_bytes(), "resync finished as source");
        }
    }
}
