//! Inputs from the application, the disk and the peer: requests in, I/O completions, and
//! the peer's messages dispatched to the paths that handle them.

use super::*;

impl Resource {
    pub fn handle_app_write(&mut self, now: Instant, req: ReqId, offset: u64, len: u64) {
        self.on_app_write(now, req, offset, len);
        self.check_gate();
    }

    pub(super) fn on_app_write(&mut self, now: Instant, req: ReqId, offset: u64, len: u64) {
        self.now = now;
        let err = if self.role != Role::Primary {
            Some(ReqError::ReadOnly)
        } else if len == 0
            || offset
                .checked_add(len)
                .is_none_or(|e| e > self.data_bytes())
        {
            Some(ReqError::OutOfRange)
        } else {
            None
        };
        if let Some(e) = err {
            self.actions.push_back(Action::CompleteWrite {
                req,
                result: Err(e),
            });
            self.actions.push_back(Action::ReleaseBuf(BufId(req.0)));
            return;
        }
        self.writes.insert(
            req,
            WriteReq {
                offset,
                len,
                epoch: 0,
                submitted: false,
                local_done: false,
                local_failed: false,
                peer: PeerState::NotReplicated,
                completed: false,
            },
        );
        self.pending.push_back(Pending::Write(req));
        self.pump();
    }

    pub fn handle_app_flush(&mut self, now: Instant, req: ReqId) {
        self.on_app_flush(now, req);
        self.check_gate();
    }

    pub(super) fn on_app_flush(&mut self, now: Instant, req: ReqId) {
        self.now = now;
        self.flushes.insert(
            req,
            FlushReq {
                epoch: 0,
                peer_needed: false,
                covers_writes: 0,
                local_io: None,
                local_done: false,
                local_failed: false,
            },
        );
        self.pending.push_back(Pending::Flush(req));
        self.pump();
    }

    pub fn handle_disk_done(&mut self, now: Instant, io: IoId, ok: bool) {
        self.on_disk_done(now, io, ok);
        self.check_gate();
    }

    pub(super) fn on_disk_done(&mut self, now: Instant, io: IoId, ok: bool) {
        self.now = now;
        let Some(purpose) = self.ios.remove(&io) else {
            return;
        };
        match purpose {
            IoPurpose::AppWrite(req) => self.app_write_done(req, ok),
            IoPurpose::AppFlush(req) => {
                if let Some(f) = self.flushes.get_mut(&req) {
                    f.local_done = true;
                    f.local_failed = !ok;
                }
                if !ok {
                    // Which completed writes did not reach the platter is unknown: every
                    // recent one counts as out of sync (the activity log covers them).
                    // This node's own writes: its data is no older than the peer's, so it
                    // is not outdated for it (a demotion may have made it secondary
                    // meanwhile); the resync settles the blocks.
                    self.mark_active_extents_out_of_sync();
                    self.local_disk_failed("the disk failed a flush".into(), false);
                }
                self.check_flushes();
            }
            IoPurpose::PeerWrite => self.peer_write_done(io, ok),
            IoPurpose::PeerFlush(_) if !ok => {
                // No barrier ack: the primary must not count the epoch as durable here.
                self.peer_writes.barrier_flush_failed();
                self.local_disk_failed("the disk failed a flush for the peer".into(), true);
            }
            IoPurpose::TargetDoneFlush if !ok => {
                self.resync_done_pending_gen = None;
                self.local_disk_failed("the disk failed the flush ending the resync".into(), true);
            }
            IoPurpose::PeerFlush(epoch) => {
                if self.peer_writes.barrier_flushed(epoch) && self.connected() {
                    self.send(Msg::BarrierAck { epoch });
                }
                self.check_peer_barriers();
            }
            IoPurpose::TargetDoneFlush => {
                if let Some(gen) = self.resync_done_pending_gen.take() {
                    self.sb.gen = gen;
                    self.sb.gen_term = self.peer_gen_term;
                    self.sb.set(meta::FLAG_CONSISTENT, true);
                    self.sb.set(meta::FLAG_OUTDATED, false);
                    self.sb.set(meta::FLAG_CRASHED_PRIMARY, false);
                    self.bitmap.clear_all();
                    self.persist_dirty_pages();
                    self.persist_superblock();
                    tracing::info!(resource = %self.p.resource, "resync finished: up to date");
                    // The peer may have heard "inconsistent" from this side after it
                    // finished sending (a resync with nothing to send): correct it.
                    self.send_state();
                    // The connection that delivered the end of the resync may be gone
                    // and a new handshake under way with a hello that still says
                    // inconsistent: the peer would decide on stale facts.
                    if !matches!(
                        self.conn,
                        Conn::Established | Conn::Connecting | Conn::StandAlone
                    ) {
                        self.restart_handshake("resync finished during the handshake");
                    }
                }
            }
            IoPurpose::ResyncRead { offset, len, buf } => {
                let send = ok && self.conn == Conn::SyncSource;
                if self.resync.read_done(offset, len, send) {
                    self.send_with(
                        Msg::ResyncData {
                            offset,
                            len: len as u32,
                        },
                        Some(buf),
                    );
                } else if !ok {
                    self.last_error = Some(format!("read error at byte {offset} during resync"));
                }
                self.actions.push_back(Action::ReleaseBuf(buf));
                self.pump();
                self.pump_resync();
            }
            IoPurpose::Meta => {
                match self.meta.done(now, ok) {
                    // Nothing may act on metadata that is not on disk: the write goes back
                    // to the head of the queue and is tried again in a second; what
                    // waits for it (writes, acknowledgements) waits on.
                    persist::MetaDone::Failed { first } => {
                        if first {
                            self.local_disk_failed(META_HELD.into(), false);
                        }
                        return;
                    }
                    persist::MetaDone::Written { recovered } => {
                        if recovered && self.last_error.as_deref() == Some(META_HELD) {
                            self.last_error = None;
                        }
                    }
                }
                self.issue_meta();
                if !self.meta.in_flight() {
                    self.al_txn_queued = false;
                    self.on_meta_idle();
                }
            }
        }
    }

    /// The transport connected and authenticated the peer.
    pub fn handle_peer_connected(&mut self, now: Instant) {
        self.on_peer_connected(now);
        self.check_gate();
    }

    pub(super) fn on_peer_connected(&mut self, now: Instant) {
        self.now = now;
        if self.conn != Conn::Connecting {
            return;
        }
        self.conn = Conn::WfHello;
        // A peer that can connect is not fenced (any more): fence it again next time.
        self.fence = FenceRun::NotRun;
        self.peer_role = Role::Unknown;
        self.peer_disk = DiskState::Unknown;
        self.keepalive.connected(now);
        self.votes.peer_fresh_until = None;
        let mut flags = 0;
        if self.sb.has(meta::FLAG_CRASHED_PRIMARY) {
            flags |= wire::HELLO_CRASHED_PRIMARY;
        }
        match self.disk_state() {
            DiskState::Inconsistent => flags |= wire::HELLO_INCONSISTENT,
            DiskState::Outdated => flags |= wire::HELLO_OUTDATED,
            _ => {}
        }
        if self.role == Role::Primary {
            flags |= wire::HELLO_PRIMARY;
        }
        if self.discard_my_data {
            flags |= wire::HELLO_DISCARD_MY_DATA;
        }
        if self.bitmap.count() > 0 {
            flags |= wire::HELLO_OUT_OF_SYNC;
        }
        self.hello_flags = flags;
        self.send(Msg::Hello(Hello {
            version: wire::PROTOCOL_VERSION,
            resource: self.p.resource.clone(),
            node: self.p.local_node.clone(),
            data_bytes: self.data_bytes(),
            block_bytes: self.sb.layout.block_bytes,
            gen: self.sb.gen,
            flags,
            gen_term: self.sb.gen_term,
        }));
    }

    /// The transport lost the peer (EOF, error, reset).
    pub fn handle_peer_disconnected(&mut self, now: Instant, reason: &str) {
        self.on_peer_disconnected(now, reason);
        self.check_gate();
    }

    pub(super) fn on_peer_disconnected(&mut self, now: Instant, reason: &str) {
        self.now = now;
        if !self.connected() {
            return;
        }
        tracing::warn!(resource = %self.p.resource, %reason, "peer connection lost");
        self.forget_peer(Conn::Connecting);
    }

    /// A message from the peer, with the term its frame header carried.
    pub fn handle_peer_message(&mut self, now: Instant, term: u64, msg: Msg, buf: Option<BufId>) {
        self.now = now;
        self.keepalive.heard(now);
        if !self.connected() {
            if let Some(b) = buf {
                self.actions.push_back(Action::ReleaseBuf(b));
            }
            return;
        }
        if self.peer_role == Role::Primary {
            self.primary_lost_at = None;
        }
        match msg {
            // The handshake is how a node that was away learns the newer term.
            Msg::Hello(h) => self.on_hello(h, term),
            msg if term < self.sb.term && Self::needs_current_term(&msg) => {
                let what = format!(
                    "{} from term {term}, this node is at term {}",
                    Self::msg_name(&msg),
                    self.sb.term
                );
                self.protocol_error(&what, buf);
            }
            msg => {
                self.adopt_term(term, "the peer");
                self.dispatch_peer_message(msg, buf);
            }
        }
        self.check_gate();
    }

    /// Messages that carry authority (writes, resync data, bitmaps, a primary's claim)
    /// are refused from an older term. Acknowledgements and pings are not: a secondary
    /// that has not yet seen the newer term sends them in good faith.
    pub(super) fn needs_current_term(msg: &Msg) -> bool {
        matches!(
            msg,
            Msg::Data { .. }
                | Msg::ResyncData { .. }
                | Msg::BitmapRuns { .. }
                | Msg::BitmapEnd
                | Msg::ResyncDone { .. }
                | Msg::Barrier { .. }
                | Msg::State { primary: true, .. }
                | Msg::Handover
        )
    }

    pub(super) fn msg_name(msg: &Msg) -> &'static str {
        match msg {
            Msg::Data { .. } => "a write",
            Msg::ResyncData { .. } => "resync data",
            Msg::BitmapRuns { .. } | Msg::BitmapEnd => "a bitmap",
            Msg::ResyncDone { .. } => "resync-done",
            Msg::Barrier { .. } => "a barrier",
            Msg::State { .. } => "a primary's state",
            _ => "a message",
        }
    }

    pub(super) fn dispatch_peer_message(&mut self, msg: Msg, buf: Option<BufId>) {
        match msg {
            Msg::Hello(_) => self.protocol_error("unexpected hello", buf),
            Msg::BitmapRuns { runs } => {
                let n = self.bitmap.nbits();
                for (s, l) in runs {
                    if s < n {
                        self.bitmap.set_bits(s..s.saturating_add(l).min(n));
                    }
                }
            }
            Msg::BitmapEnd => self.on_bitmap_end(),
            Msg::Handover => self.on_handover(),
            Msg::Data {
                seq,
                epoch,
                offset,
                len,
            } => match buf {
                Some(b) if self.role != Role::Primary && self.in_range(offset, len as u64) => {
                    if self.p.protocol == Protocol::B {
                        self.send(Msg::RecvAck { seq });
                    }
                    let kind = PeerOpKind::Data { seq, epoch };
                    self.peer_writes.push(kind, offset, len as u64, b);
                    self.pump_peer();
                }
                _ => self.protocol_error("data write not acceptable here", buf),
            },
            Msg::ResyncData { offset, len } => match buf {
                Some(b)
                    if matches!(
                        self.conn,
                        Conn::SyncTarget | Conn::SyncStarting { source: false }
                    ) && self.in_range(offset, len as u64) =>
                {
                    self.peer_writes
                        .push(PeerOpKind::Resync, offset, len as u64, b);
                    self.pump_peer();
                }
                _ => self.protocol_error("resync data while not sync target", buf),
            },
            Msg::Barrier { epoch } => {
                self.peer_writes.push_barrier(epoch);
                self.check_peer_barriers();
            }
            Msg::RecvAck { seq } => self.peer_ack(seq, PeerState::Received),
            Msg::WriteAck { seq } => self.peer_ack(seq, PeerState::Written),
            Msg::NegAck { seq } => {
                // The peer's disk failed this write: it is no longer a full copy. Its
                // blocks are out of sync, and the peer must be fenced (recorded as
                // outdated at the witness) before this or any later write completes,
                // as if it had been lost: in C the write does not count as replicated.
                if !self.peer_disk_failed {
                    tracing::error!(resource = %self.p.resource, peer = %self.p.peer_node, "the peer's disk failed a write: it is outdated until a resync");
                }
                self.peer_disk_failed = true;
                self.peer_disk = DiskState::Outdated;
                if let Some(req) = self.seq_to_req.remove(&seq) {
                    if let Some(w) = self.writes.get_mut(&req) {
                        w.peer = PeerState::NotReplicated;
                        let (offset, len) = (w.offset, w.len);
                        self.mark_out_of_sync(offset, len);
                    }
                    self.try_complete(req);
                }
            }
            Msg::BarrierAck { epoch } => {
                for (off, len) in self.epochs.barrier_acked(epoch) {
                    self.al.release(self.al.extents_of(off, len));
                }
                self.check_flushes();
                self.pump();
            }
            Msg::ResyncAck { offset, len, ok } => {
                if self.resync.acked(offset, len as u64) {
                    if ok {
                        self.bitmap.clear_range(offset, len as u64);
                        self.resync.add_done(len as u64);
                    }
                    self.pump_resync();
                }
            }
            Msg::ResyncDone { gen } => match self.conn {
                Conn::SyncTarget => self.target_resync_done(gen),
                // A source with nothing to send finishes before this side has made its
                // resync set durable; finish once it has.
                Conn::SyncStarting { source: false } => self.resync_done_early = Some(gen),
                _ => self.protocol_error("resync-done while not sync target", None),
            },
            Msg::State { primary, disk } => {
                if primary && self.keep_away_while_promoting() {
                    return;
                }
                self.peer_role = if primary {
                    Role::Primary
                } else {
                    Role::Secondary
                };
                self.peer_disk = DiskState::from_code(disk);
                if primary && self.switchover_until.take().is_some() {
                    tracing::info!(resource = %self.p.resource, peer = %self.p.peer_node, "switchover: the peer is primary");
                    self.actions.push_back(Action::AdminDone(Ok(())));
                }
                // A sync target says so only once its inconsistency is on disk: from
                // then on a crash of it cannot bring back an older, up-to-date-looking
                // disk, and writes it misses need no fencing.
                if self.peer_disk == DiskState::Inconsistent
                    && matches!(
                        self.conn,
                        Conn::SyncSource | Conn::SyncStarting { source: true }
                    )
                {
                    self.peer_target_durable = true;
                }
            }
            Msg::Ping { id } => self.send(Msg::PingAck { id }),
            Msg::PingAck { id } => {
                // The peer was alive when it answered, which is after the ping was sent:
                // count it as present from the send time, never from the receipt.
                if let Some(sent) = self.keepalive.answered(id) {
                    self.note_quorum_loss();
                    let until = sent.plus_ms(self.p.ping_timeout_ms);
                    self.votes.peer_fresh_until =
                        Some(self.votes.peer_fresh_until.map_or(until, |t| t.max(until)));
                }
            }
            Msg::AuthChallenge { .. }
            | Msg::AuthResponse { .. }
            | Msg::AuthProof { .. }
            | Msg::Attach { .. } => self.protocol_error("handshake message after handshake", buf),
            Msg::WitnessRequest(_) | Msg::WitnessReply(_) => {
                self.protocol_error("witness message on a peer connection", buf)
            }
        }
    }
}
