//! The peer connection: handshake, generation comparison and the resync decision,
//! the bitmap exchange, and dropping or leaving the connection.

use super::*;

impl Resource {
    pub(super) fn restart_handshake(&mut self, reason: &str) {
        self.forget_peer(Conn::Connecting);
        self.actions.push_back(Action::Disconnect {
            reason: reason.into(),
        });
        self.actions.push_back(Action::SetConnect(true));
    }

    pub(super) fn drop_connection(&mut self, reason: String) {
        tracing::warn!(resource = %self.p.resource, %reason, "dropping peer connection");
        self.forget_peer(Conn::Connecting);
        self.actions.push_back(Action::Disconnect { reason });
    }

    pub(super) fn protocol_error(&mut self, what: &str, buf: Option<BufId>) {
        if let Some(b) = buf {
            self.actions.push_back(Action::ReleaseBuf(b));
        }
        self.last_error = Some(format!("protocol error: {what}"));
        self.drop_connection(format!("protocol error: {what}"));
    }

    pub(super) fn go_standalone(&mut self, reason: String) {
        tracing::error!(resource = %self.p.resource, %reason, "refusing peer; standing alone");
        self.last_error = Some(reason.clone());
        self.forget_peer(Conn::StandAlone);
        self.actions.push_back(Action::Disconnect { reason });
        self.actions.push_back(Action::SetConnect(false));
    }

    /// Everything the connection carried is gone: writes the peer did not confirm are out
    /// of sync, flushes stop waiting for it, queued peer writes are dropped (the primary
    /// marked them out of sync too).
    pub(super) fn forget_peer(&mut self, next: Conn) {
        // Only losing an up-to-date peer starts a new generation; a sync target was not
        // consistent anyway and the bitmap keeps counting for it.
        let was_replicating = self.conn == Conn::Established;
        if self.peer_role == Role::Primary && self.role == Role::Secondary {
            self.primary_lost_at = Some(self.keepalive.last_rx());
        }
        self.votes.peer_fresh_until = None;
        self.keepalive.stop();
        self.resync_done_early = None;
        self.peer_target_durable = false;
        self.peer_disk_failed = false;
        self.conn = next;
        self.seq_to_req.clear();
        // A write the peer acknowledged is only durable there once the barrier of its
        // epoch has been acknowledged too: until then it counts as out of sync, like
        // the transfer log below. A write left as `Written` would later wait in the
        // transfer log for a barrier ack that no new connection ever sends.
        for w in self.writes.values_mut() {
            let durable_on_peer = w.peer == PeerState::Written && self.epochs.peer_acked(w.epoch);
            if w.peer != PeerState::NotReplicated && !durable_on_peer {
                self.bitmap.set_range(w.offset, w.len);
            }
            w.peer = PeerState::NotReplicated;
        }
        for (off, len) in self.epochs.connection_lost() {
            self.bitmap.set_range(off, len);
            self.al.release(self.al.extents_of(off, len));
        }
        let reqs: Vec<ReqId> = self.writes.keys().copied().collect();
        for req in reqs {
            self.try_complete(req);
        }
        for f in self.flushes.values_mut() {
            f.peer_needed = false;
        }
        self.epochs.forget_peer_acks();
        // Peer writes already on their way to the disk finish; queued ones are dropped.
        for buf in self.peer_writes.connection_lost() {
            self.actions.push_back(Action::ReleaseBuf(buf));
        }
        self.resync.connection_lost();
        self.peer_role = Role::Unknown;
        self.peer_disk = DiskState::Unknown;
        if was_replicating && self.role == Role::Primary {
            // Writing without the peer from now on: a new data generation.
            let fresh = self.rng.next_u64();
            self.sb.gen.new_current(fresh);
            self.sb.gen_term = self.sb.term;
            self.persist_superblock();
        }
        self.check_flushes();
        self.witness_tick(false);
        // Writes and flushes held while the handshake decided go on now, replicated or
        // not: a handshake that ends in a refusal must not leave them queued.
        self.pump();
    }

    pub(super) fn on_hello(&mut self, h: Hello, peer_term: u64) {
        if self.conn != Conn::WfHello {
            return self.protocol_error("unexpected hello", None);
        }
        let my_term = self.sb.gen_term;
        let peer_term_raw = peer_term;
        let peer_term = h.gen_term;
        self.peer_gen_term = h.gen_term;
        if h.version != wire::PROTOCOL_VERSION {
            return self.go_standalone(format!(
                "peer speaks protocol version {}, this node {}",
                h.version,
                wire::PROTOCOL_VERSION
            ));
        }
        if h.resource != self.p.resource || h.node != self.p.peer_node {
            return self.go_standalone(format!(
                "peer is resource {:?} node {:?}, expected {:?} node {:?}",
                h.resource, h.node, self.p.resource, self.p.peer_node
            ));
        }
        if h.data_bytes != self.data_bytes() || h.block_bytes != self.sb.layout.block_bytes {
            let msg = format!(
                "peer's device has {} data bytes (block {}), this node's {} (block {}): sizes must match",
                h.data_bytes,
                h.block_bytes,
                self.data_bytes(),
                self.sb.layout.block_bytes
            );
            self.last_error = Some(msg.clone());
            return self.drop_connection(msg);
        }
        let peer_primary = h.flags & wire::HELLO_PRIMARY != 0;
        if peer_primary && self.keep_away_while_promoting() {
            return;
        }
        self.peer_role = if peer_primary {
            Role::Primary
        } else {
            Role::Secondary
        };
        self.peer_disk = if h.flags & wire::HELLO_INCONSISTENT != 0 {
            DiskState::Inconsistent
        } else if h.flags & wire::HELLO_OUTDATED != 0 {
            DiskState::Outdated
        } else {
            DiskState::UpToDate
        };
        if peer_primary {
            self.primary_lost_at = None;
        }
        // A newer term on the peer: adopt it first. A primary of an older term learns
        // here that it has been replaced and steps down.
        self.adopt_term(peer_term_raw, "the peer's hello");
        let local = UuidView {
            gen: self.sb.gen,
            crashed_primary: self.sb.has(meta::FLAG_CRASHED_PRIMARY),
            inconsistent: self.disk_state() == DiskState::Inconsistent,
            outdated: self.disk_state() == DiskState::Outdated,
            primary: self.hello_flags & wire::HELLO_PRIMARY != 0,
            out_of_sync: self.hello_flags & wire::HELLO_OUT_OF_SYNC != 0,
        };
        let peer = UuidView {
            gen: h.gen,
            crashed_primary: h.flags & wire::HELLO_CRASHED_PRIMARY != 0,
            inconsistent: self.peer_disk == DiskState::Inconsistent,
            outdated: self.peer_disk == DiskState::Outdated,
            primary: peer_primary,
            out_of_sync: h.flags & wire::HELLO_OUT_OF_SYNC != 0,
        };
        let peer_discards = h.flags & wire::HELLO_DISCARD_MY_DATA != 0;
        let (decision, rule) = if self.discard_my_data && peer_discards {
            return self.go_standalone("both nodes asked to discard their data".into());
        } else if self.discard_my_data {
            (SyncDecision::TargetUseBitmap, "discard-my-data-local")
        } else if peer_discards {
            (SyncDecision::SourceUseBitmap, "discard-my-data-peer")
        } else {
            let tie = self.p.local_node < self.p.peer_node;
            let (d, r) = uuid::compare(&local, &peer, tie);
            match d {
                // Both changed the data, but only one held the witness's newer term: the
                // other's changes since the split were never completed under quorum
                // (protocol C fencing) or are the accepted loss of an asynchronous
                // protocol. The older term becomes the sync target.
                SyncDecision::SplitBrain if peer_term > my_term => {
                    (SyncDecision::TargetUseBitmap, "older-term")
                }
                SyncDecision::SplitBrain if peer_term < my_term => {
                    (SyncDecision::SourceUseBitmap, "newer-term")
                }
                d => (d, r.name()),
            }
        };
        tracing::info!(
            resource = %self.p.resource,
            "uuid_compare()={decision:?} by rule={rule} (local {:016X}/{:016X}, peer {:016X}/{:016X})",
            local.gen.current, local.gen.bitmap, peer.gen.current, peer.gen.bitmap
        );
        if self.role == Role::Primary && peer_primary && peer_term_raw < self.sb.term {
            // It steps down when it reads this node's hello; try again then.
            return self.drop_connection(format!(
                "peer is a stale primary of term {peer_term_raw} (this node: term {})",
                self.sb.term
            ));
        }
        if self.role == Role::Primary && peer_primary {
            self.split_brain = true;
            return self
                .go_standalone(format!("both nodes are primary: split brain (rule={rule})"));
        }
        match decision {
            SyncDecision::NoSync => {
                self.discard_my_data = false;
                self.conn = Conn::Established;
                if self.disk_state() == DiskState::Outdated && self.peer_disk == DiskState::UpToDate
                {
                    // Same generation as an up-to-date peer: the same data.
                    self.sb.set(meta::FLAG_OUTDATED, false);
                    self.persist_superblock();
                }
                self.last_error = None;
                self.send_state();
                self.pump();
            }
            SyncDecision::SplitBrain => {
                self.split_brain = true;
                self.go_standalone(format!(
                    "split brain detected (rule={rule}); resolve with `tandemctl connect --discard-my-data` on the node whose changes to drop"
                ));
            }
            SyncDecision::Unrelated => self.go_standalone(format!(
                "unrelated data on the peer (rule={rule}); refusing to connect"
            )),
            d => {
                let source = matches!(
                    d,
                    SyncDecision::SourceUseBitmap | SyncDecision::SourceFullSync
                );
                let full = matches!(
                    d,
                    SyncDecision::SourceFullSync | SyncDecision::TargetFullSync
                );
                if !source && self.role == Role::Primary {
                    return self.go_standalone(format!(
                        "this primary would become sync target (rule={rule}); demote it first"
                    ));
                }
                self.discard_my_data = false;
                if full {
                    self.bitmap.set_all();
                }
                let runs = self.bitmap.runs();
                for chunk in runs.chunks(2048) {
                    self.send(Msg::BitmapRuns {
                        runs: chunk.to_vec(),
                    });
                }
                self.send(Msg::BitmapEnd);
                self.conn = Conn::WfBitmap { source };
            }
        }
    }

    pub(super) fn on_bitmap_end(&mut self) {
        let Conn::WfBitmap { source } = self.conn else {
            return self.protocol_error("unexpected bitmap end", None);
        };
        if !source {
            self.sb.set(meta::FLAG_CONSISTENT, false);
            self.peer_disk = DiskState::UpToDate;
        } else {
            self.peer_disk = DiskState::Inconsistent;
        }
        self.conn = Conn::SyncStarting { source };
        self.resync.start(self.now, self.bitmap.out_of_sync_bytes());
        // The resync set must survive a crash of either side before any block moves.
        self.persist_dirty_pages();
        self.persist_superblock();
    }

    /// The source has sent every block: make them durable, then take its generation.
    pub(super) fn target_resync_done(&mut self, gen: Generation) {
        self.conn = Conn::Established;
        self.resync_done_pending_gen = Some(gen);
        let io = self.new_io(IoPurpose::TargetDoneFlush);
        self.actions.push_back(Action::DiskFlush { io });
        self.peer_disk = DiskState::UpToDate;
    }

    pub(super) fn on_meta_idle(&mut self) {
        if let Conn::SyncStarting { source } = self.conn {
            tracing::info!(
                resource = %self.p.resource,
                bytes = self.resync.total_bytes(),
                "resync starts as {}", if source { "source" } else { "target" }
            );
            self.conn = if source {
                Conn::SyncSource
            } else {
                Conn::SyncTarget
            };
            self.send_state();
            if let Some(gen) = self.resync_done_early.take() {
                self.target_resync_done(gen);
            }
        }
        self.term_persist = false;
        self.pump();
        self.pump_peer();
        self.pump_resync();
    }
}
