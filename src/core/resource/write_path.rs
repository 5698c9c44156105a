//! The primary's write path: requests through the activity log and epochs to the local
//! disk and the peer, completions by protocol, and flushes.

use super::*;

impl Resource {
    pub(super) fn in_range(&self, offset: u64, len: u64) -> bool {
        len > 0
            && offset
                .checked_add(len)
                .is_some_and(|e| e <= self.data_bytes())
    }

    pub(super) fn conflicts(&self, offset: u64, len: u64) -> bool {
        self.writes
            .values()
            .any(|w| w.submitted && !w.local_done && overlaps(w.offset, w.len, offset, len))
            || self.resync.reading(offset, len)
    }

    /// Move queued writes and flushes forward, in order.
    pub(super) fn pump(&mut self) {
        if self.pending.is_empty() || (self.term_persist && self.meta_busy()) {
            return;
        }
        match self.gate() {
            Gate::Open | Gate::HoldCompletion => {}
            Gate::Suspend => return,
            Gate::Fail => return self.fail_pending(),
        }
        while let Some(&front) = self.pending.front() {
            if self.meta_busy() {
                return;
            }
            // While the handshake decides, writes wait: they must either all reach the
            // peer or all be in the bitmap that is exchanged.
            if matches!(
                self.conn,
                Conn::WfHello | Conn::WfBitmap { .. } | Conn::SyncStarting { .. }
            ) {
                return;
            }
            match front {
                Pending::Write(req) => {
                    let Some(w) = self.writes.get(&req) else {
                        self.pending.pop_front();
                        continue;
                    };
                    let (offset, len) = (w.offset, w.len);
                    if self.conflicts(offset, len) {
                        return;
                    }
                    let extents = self.al.extents_of(offset, len);
                    let missing = self.al.missing(extents.clone());
                    if !missing.is_empty() {
                        if self.al_txn_queued {
                            return;
                        }
                        match self.al.plan(extents.clone()) {
                            Err(AlBlocked::AllSlotsBusy) => return,
                            Err(AlBlocked::TooManyExtents { needed, capacity }) => {
                                // It could never be served: fail it rather than wait.
                                tracing::error!(resource = %self.p.resource, offset, len, needed, capacity, "a write spans more activity-log extents than al-extents holds; refused");
                                self.pending.pop_front();
                                self.writes.remove(&req);
                                self.actions.push_back(Action::CompleteWrite {
                                    req,
                                    result: Err(ReqError::TooLarge),
                                });
                                self.actions.push_back(Action::ReleaseBuf(BufId(req.0)));
                                continue;
                            }
                            Ok((evicted, txn, slot)) => {
                                // Bits of an evicted extent must be on disk before the AL
                                // stops covering it.
                                let eb = self.al.extent_bytes();
                                for e in evicted {
                                    let bits = self.bitmap.bits_touching(e as u64 * eb, eb);
                                    for page in self.bitmap.pages_for_bit_range(bits) {
                                        if self.bitmap.is_page_dirty(page) {
                                            self.persist_page(page);
                                        }
                                    }
                                }
                                let off = self.sb.layout.al_offset + slot * 4096;
                                self.meta.push(off, txn.encode());
                                self.al_txn_queued = true;
                                self.issue_meta();
                                return;
                            }
                        }
                    }
                    self.pending.pop_front();
                    self.al.acquire(extents);
                    let replicate = self.replicating();
                    let epoch = self.epochs.write_submitted(replicate, self.now);
                    let seq = self.next_seq;
                    if let Some(w) = self.writes.get_mut(&req) {
                        w.submitted = true;
                        w.epoch = epoch;
                        w.peer = if replicate {
                            PeerState::Sent
                        } else {
                            PeerState::NotReplicated
                        };
                    }
                    let io = self.new_io(IoPurpose::AppWrite(req));
                    self.actions.push_back(Action::DiskWrite {
                        io,
                        offset,
                        buf: BufId(req.0),
                    });
                    if replicate {
                        self.next_seq += 1;
                        self.seq_to_req.insert(seq, req);
                        self.send_with(
                            Msg::Data {
                                seq,
                                epoch,
                                offset,
                                len: len as u32,
                            },
                            Some(BufId(req.0)),
                        );
                    } else {
                        self.bitmap.set_range(offset, len);
                    }
                    if self.epochs.full() {
                        self.close_epoch();
                    }
                }
                Pending::Flush(req) => {
                    self.pending.pop_front();
                    let replicate = self.replicating();
                    let epoch = self.close_epoch_now(replicate);
                    let covers = self.writes_completed;
                    if let Some(f) = self.flushes.get_mut(&req) {
                        f.epoch = epoch;
                        // The flush before a demotion waits for the peer in every
                        // protocol: it drains the transfer log, so the peer holds every
                        // write durably before this node stops being primary.
                        f.peer_needed = replicate
                            && (self.p.protocol != Protocol::A || req == ROLE_CHANGE_FLUSH);
                        f.covers_writes = covers;
                    }
                    self.check_flushes();
                }
            }
        }
    }

    /// Answer a flush: to the application, or, for the flush a demotion asked for, go on
    /// with the demotion.
    pub(super) fn complete_flush(&mut self, req: ReqId, ok: bool) {
        if req != ROLE_CHANGE_FLUSH {
            let result = if ok { Ok(()) } else { Err(ReqError::Io) };
            self.actions
                .push_back(Action::CompleteFlush { req, result });
            return;
        }
        let Some(cmd) = self.flush_then.take() else {
            return;
        };
        let switchover = cmd == AdminCmd::Switchover;
        let r = if self.role != Role::Primary {
            match switchover {
                true => Err(AdminError::ReplacedMeanwhile),
                false => Ok(()),
            }
        } else if !ok {
            Err(AdminError::FlushFailed)
        } else {
            self.demote_now(cmd).map(|_| ())
        };
        // A switchover goes on until the peer reports itself primary.
        if r.is_err() || !switchover {
            self.actions.push_back(Action::AdminDone(r));
        }
    }

    pub(super) fn close_epoch(&mut self) {
        if self.epochs.has_writes() {
            let replicate = self.replicating();
            self.close_epoch_now(replicate);
        }
        self.epochs.disarm();
    }

    /// Close the current epoch (with its barrier to the peer if `send_barrier`): its
    /// number.
    pub(super) fn close_epoch_now(&mut self, send_barrier: bool) -> u64 {
        let epoch = self.epochs.close();
        if send_barrier {
            self.send(Msg::Barrier { epoch });
        }
        epoch
    }

    pub(super) fn app_write_done(&mut self, req: ReqId, ok: bool) {
        if let (false, Some(w)) = (ok, self.writes.get(&req)) {
            // The peer may hold the new data and this disk the old (or a torn block):
            // the blocks are out of sync, and the application gets EIO.
            let (offset, len) = (w.offset, w.len);
            self.mark_out_of_sync(offset, len);
            self.local_disk_failed(
                format!("the disk failed a write at byte {offset} (the application got EIO); its blocks are marked out of sync"),
                false,
            );
        }
        if let Some(w) = self.writes.get_mut(&req) {
            w.local_done = true;
            w.local_failed = !ok;
            let epoch = w.epoch;
            self.epochs.write_local_done(epoch);
        }
        self.try_complete(req);
        self.check_flushes();
        self.pump();
        self.pump_resync();
        if self.role != Role::Primary {
            self.pump_peer();
        }
    }

    pub(super) fn peer_ack(&mut self, seq: u64, state: PeerState) {
        let Some(&req) = self.seq_to_req.get(&seq) else {
            return;
        };
        if state == PeerState::Written {
            self.seq_to_req.remove(&seq);
        }
        if let Some(w) = self.writes.get_mut(&req) {
            if w.peer != PeerState::Written {
                w.peer = state;
            }
        }
        self.try_complete(req);
    }

    pub(super) fn try_complete(&mut self, req: ReqId) {
        let protocol = self.p.protocol;
        let gate = self.gate();
        let Some(w) = self.writes.get_mut(&req) else {
            return;
        };
        if !w.completed && w.local_done {
            let peer_ok = match w.peer {
                PeerState::NotReplicated | PeerState::Written => true,
                PeerState::Received => protocol != Protocol::C,
                PeerState::Sent => protocol == Protocol::A,
            };
            let (complete, fail) = match gate {
                Gate::Open => (peer_ok, false),
                Gate::HoldCompletion | Gate::Suspend => (false, false),
                Gate::Fail => (true, true),
            };
            if complete || w.local_failed {
                w.completed = true;
                let result = if w.local_failed || fail {
                    Err(ReqError::Io)
                } else {
                    Ok(())
                };
                if result.is_ok() {
                    self.writes_completed += 1;
                }
                self.actions
                    .push_back(Action::CompleteWrite { req, result });
            }
        }
        let w = &self.writes[&req];
        let finished =
            w.completed && matches!(w.peer, PeerState::NotReplicated | PeerState::Written);
        if finished {
            // On the peer but maybe not flushed there: kept in the transfer log, with its
            // AL extents.
            let kept = w.peer == PeerState::Written && self.epochs.keep(w.epoch, w.offset, w.len);
            if !kept {
                let extents = self.al.extents_of(w.offset, w.len);
                self.al.release(extents);
            }
            self.writes.remove(&req);
            self.actions.push_back(Action::ReleaseBuf(BufId(req.0)));
            // A freed AL slot may unblock a queued write.
            if self.pending.front().is_some() {
                self.pump();
            }
        }
    }

    pub(super) fn check_flushes(&mut self) {
        let gate = self.gate();
        let oldest_pending_epoch = self.epochs.oldest_local_pending();
        let mut done = Vec::new();
        let mut to_issue = Vec::new();
        for (&req, f) in self.flushes.iter_mut() {
            if f.epoch == 0 {
                continue; // still queued behind earlier writes
            }
            if f.local_io.is_none() && oldest_pending_epoch.is_none_or(|e| e > f.epoch) {
                to_issue.push(req);
            }
            let peer_ok = !f.peer_needed || self.epochs.peer_acked(f.epoch);
            match gate {
                Gate::Open if f.local_done && peer_ok => done.push((req, f.local_failed)),
                Gate::Fail if f.local_done => done.push((req, true)),
                _ => {}
            }
        }
        for req in to_issue {
            let io = self.new_io(IoPurpose::AppFlush(req));
            if let Some(f) = self.flushes.get_mut(&req) {
                f.local_io = Some(io);
            }
            self.actions.push_back(Action::DiskFlush { io });
        }
        for (req, failed) in done {
            let covers = self.flushes.remove(&req).map_or(0, |f| f.covers_writes);
            if !failed {
                self.writes_flushed = self.writes_flushed.max(covers);
            }
            self.complete_flush(req, !failed);
        }
    }
}
