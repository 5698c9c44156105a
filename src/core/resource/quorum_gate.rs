//! Quorum and the witness: votes and leases, promotion through the witness, fencing,
//! and the gate that decides what application I/O may do right now.

use super::*;

impl Resource {
    /// The witness's answer to the request of the last [`Action::Witness`]; `None` when
    /// it did not come within the timeout.
    pub fn handle_witness_reply(&mut self, now: Instant, reply: Option<witness::Reply>) {
        self.now = now;
        let Some((op, sent_at)) = self.wl.in_flight.take() else {
            return;
        };
        match reply {
            None => {
                self.wl.reachable = false;
                self.wl.back_off(now, op, self.p.lease_ms, 0);
                self.note_witness_trouble(Some("unreachable".into()));
                if op == WitnessOp::Promote && self.role != Role::Primary {
                    self.set_promote_uncertain(true);
                    self.promote_refused(AdminError::WitnessSilent, false);
                }
                if op == WitnessOp::Adopt {
                    self.adopt_done(Err(AdminError::WitnessSilent));
                }
            }
            Some(r) => {
                self.wl.reachable = true;
                self.wl.last_reply = Some(now);
                self.wl.primary = r.primary.clone();
                self.wl.up_to_date = r.up_to_date.clone();
                // Requests are handled in order, so this reply reflects every earlier one.
                self.wl.peer_maybe_up_to_date =
                    r.up_to_date.is_empty() || r.up_to_date.contains(&self.p.peer_node);
                if r.granted {
                    self.wl.granted();
                } else if op != WitnessOp::Query {
                    self.wl.back_off(now, op, self.p.lease_ms, r.lease_ms);
                }
                self.note_witness_reply(op, &r);
                match op {
                    WitnessOp::Promote if r.granted => {
                        self.promoted_by_witness(r.term, sent_at, r.lease_ms)
                    }
                    WitnessOp::Promote => {
                        let me = &self.p.local_node;
                        let outdated = !r.up_to_date.is_empty() && !r.up_to_date.contains(me);
                        self.promote_refused(
                            AdminError::WitnessRefused(r.reason.clone()),
                            outdated,
                        );
                    }
                    WitnessOp::Renew if r.granted && r.term == self.sb.term => {
                        self.votes.peer_counts = true;
                        let until = witness::lease_deadline(
                            sent_at,
                            r.lease_ms,
                            quorum::LEASE_DRIFT_PERMILLE,
                        );
                        let old = self.votes.lease_until;
                        self.votes.lease_until = Some(old.map_or(until, |t| t.max(until)));
                    }
                    WitnessOp::Outdate if r.granted => {
                        tracing::info!(resource = %self.p.resource, peer = %self.p.peer_node, "the witness recorded the peer as outdated");
                    }
                    WitnessOp::Release => self.wl.release_pending = false,
                    WitnessOp::Adopt => self.adopt_done(if r.granted {
                        Ok(())
                    } else {
                        Err(AdminError::WitnessRefused(r.reason.clone()))
                    }),
                    _ => {}
                }
                self.adopt_term(r.term, "the witness");
                if self.promote_uncertain {
                    // This reply is newer than the unanswered promotion: if that was
                    // granted, the witness says so now; otherwise it never will be.
                    if r.primary == self.p.local_node
                        && self.want_promote.is_none()
                        && self.role != Role::Primary
                    {
                        tracing::warn!(resource = %self.p.resource, term = r.term, "an unanswered promotion was granted after all; handing the term back");
                        self.wl.release_pending = true;
                    }
                    self.set_promote_uncertain(false);
                }
                self.check_outdated_by_witness();
            }
        }
        self.witness_tick(false);
        self.check_gate();
    }

    /// What a reply says about the witness itself: behind the pair's term (new, or it
    /// lost its state), refusing what a primary needs, or working.
    pub(super) fn note_witness_reply(&mut self, op: WitnessOp, r: &witness::Reply) {
        let trouble = if r.term < self.sb.term {
            Some(format!(
                "the witness is at term {}, this node at term {}: it is new, lost its state or was restored from an old copy; run `tandemctl adopt-witness {}` on the primary",
                r.term, self.sb.term, self.p.resource
            ))
        } else {
            match op {
                WitnessOp::Renew
                | WitnessOp::Outdate
                | WitnessOp::UpToDate
                | WitnessOp::Release
                    if !r.granted =>
                {
                    Some(format!("refused {op:?}: {}", r.reason))
                }
                _ => None,
            }
        };
        self.note_witness_trouble(trouble);
    }

    /// Keep what is wrong with the witness for `status`; log it once per change.
    pub(super) fn note_witness_trouble(&mut self, trouble: Option<String>) {
        match self.wl.set_trouble(trouble) {
            Some(Some(t)) => {
                tracing::warn!(resource = %self.p.resource, problem = %t, "witness trouble")
            }
            Some(None) => tracing::info!(resource = %self.p.resource, "the witness works again"),
            None => {}
        }
    }

    /// Send the next request to the witness if none is in flight and no back-off runs.
    /// `periodic`: the renewal or query timer fired.
    pub(super) fn witness_tick(&mut self, periodic: bool) {
        self.drop_promotion_while_peer_primary();
        if !self.p.witness || !self.wl.may_send(self.now) {
            return;
        }
        if self.want_promote.is_some_and(|w| !w.manual) && !self.auto_promote_possible() {
            self.want_promote = None;
        }
        let peer = self.p.peer_node.clone();
        let renew_due = periodic
            || self
                .votes
                .lease_until
                .is_none_or(|t| t.ms_since(self.now) < self.p.lease_ms * 2 / 3);
        let force = self.want_promote.is_some_and(|w| w.force);
        let (op, peer) = if let Some(adopt_force) = self.wl.adopt {
            // The peer joins the up-to-date set if it is connected and up to date.
            let peer_ok = !adopt_force
                && self.conn == Conn::Established
                && self.peer_disk == DiskState::UpToDate;
            (WitnessOp::Adopt, if peer_ok { peer } else { String::new() })
        } else if self.role != Role::Primary
            && self.want_promote.is_some()
            // While the fence-peer handler has not said yes, the node still asks what
            // it must know (an unanswered promotion, the periodic query).
            && self.stonith_allows_promotion()
        {
            (WitnessOp::Promote, String::new())
        } else if self.role != Role::Primary && self.promote_uncertain {
            (WitnessOp::Query, String::new())
        } else if self.role == Role::Primary {
            if self.fence_needed() {
                (WitnessOp::Outdate, peer)
            } else if self.peer_needs_uptodate() {
                (WitnessOp::UpToDate, peer)
            } else if renew_due {
                (WitnessOp::Renew, String::new())
            } else {
                return;
            }
        } else if self.wl.release_pending {
            (WitnessOp::Release, String::new())
        } else if periodic {
            (WitnessOp::Query, String::new())
        } else {
            return;
        };
        if op == WitnessOp::Renew {
            self.wl.next_at = self.now.plus_ms(self.p.lease_ms / 3);
        }
        if op == WitnessOp::UpToDate {
            self.wl.peer_maybe_up_to_date = true;
        }
        self.wl.in_flight = Some((op, self.now));
        self.witness_seq += 1;
        self.actions.push_back(Action::Witness {
            req: witness::Request {
                op,
                resource: self.p.resource.clone(),
                term: self.sb.term,
                peer,
                uptodate: self.disk_state() == DiskState::UpToDate,
                force: op == WitnessOp::Promote && force,
                primary: op == WitnessOp::Adopt && self.role == Role::Primary,
                seq: self.witness_seq,
            },
            timeout_ms: (self.p.lease_ms / 4).max(20),
        });
    }

    /// `tandemctl adopt-witness` has its answer.
    pub(super) fn adopt_done(&mut self, r: Result<(), AdminError>) {
        if self.wl.adopt.take().is_none() {
            return;
        }
        match &r {
            Ok(()) => {
                tracing::info!(resource = %self.p.resource, term = self.sb.term, "the witness adopted this pair's term")
            }
            Err(e) => {
                tracing::error!(resource = %self.p.resource, error = %e, "adopt-witness failed")
            }
        }
        self.actions.push_back(Action::AdminDone(r));
    }

    /// With `fencing = "stonith"`, a node promotes while its peer is not connected only
    /// once the `fence-peer` handler has said the peer is fenced or outdated. Starts the
    /// handler when it has not run yet; `false` until it has answered.
    pub(super) fn stonith_allows_promotion(&mut self) -> bool {
        if self.p.fencing != Fencing::Stonith || self.connected() {
            return true;
        }
        match self.fence {
            FenceRun::Fenced => true,
            FenceRun::Running => false,
            FenceRun::NotRun => {
                tracing::warn!(resource = %self.p.resource, peer = %self.p.peer_node, "running the fence-peer handler before promotion");
                self.fence = FenceRun::Running;
                self.actions.push_back(Action::FencePeer {
                    timeout_ms: self.p.fence_peer_timeout_ms,
                });
                false
            }
        }
    }

    /// The `fence-peer` handler of the last [`Action::FencePeer`] exited with
    /// `exit_code` (`None`: it did not exit by itself in time).
    pub fn handle_fence_peer_done(&mut self, now: Instant, exit_code: Option<i32>) {
        self.now = now;
        if self.fence != FenceRun::Running {
            return; // the peer came back meanwhile: no longer needed
        }
        match quorum::fence_peer_verdict(exit_code) {
            Ok(what) => {
                tracing::info!(resource = %self.p.resource, peer = %self.p.peer_node, "fence-peer: {what}; promotion may proceed");
                self.fence = FenceRun::Fenced;
                if self.p.witness {
                    self.witness_tick(false);
                } else if let Some(w) = self.want_promote.take() {
                    let r = self.promote(false);
                    if w.manual {
                        self.actions.push_back(Action::AdminDone(r));
                    }
                }
            }
            Err(why) => {
                self.fence = FenceRun::NotRun;
                let err = AdminError::FencePeer(why.to_string());
                tracing::error!(resource = %self.p.resource, peer = %self.p.peer_node, "{err}");
                self.last_error = Some(err.to_string());
                // Not retried: whether the peer is really gone is for the operator now.
                if let Some(w) = self.want_promote.take() {
                    if w.manual {
                        self.actions.push_back(Action::AdminDone(Err(err)));
                    }
                }
            }
        }
        self.check_gate();
    }

    pub(super) fn set_promote_uncertain(&mut self, on: bool) {
        if on == self.promote_uncertain {
            return;
        }
        self.promote_uncertain = on;
        if on {
            tracing::warn!(resource = %self.p.resource, "promotion request unanswered: keeping away from the peer until the witness answers");
            if self.connected() {
                self.forget_peer(Conn::Connecting);
                self.actions.push_back(Action::Disconnect {
                    reason: "promotion outcome unknown".into(),
                });
            }
            if self.conn == Conn::Connecting {
                self.actions.push_back(Action::SetConnect(false));
            }
        } else if self.conn == Conn::Connecting {
            self.actions.push_back(Action::SetConnect(true));
        }
    }

    /// Resource-level fencing: a primary whose writes do not all reach the peer
    /// completes nothing until the witness no longer counts the peer as up to date, or
    /// the peer could be promoted without them. Not while the peer is a sync target that
    /// has made its inconsistency durable: it receives every new write, and an
    /// inconsistent disk is never promoted.
    pub(super) fn fence_needed(&self) -> bool {
        let peer_has_every_write = !self.peer_disk_failed
            && (self.conn == Conn::Established
                || (self.conn == Conn::SyncSource && self.peer_target_durable));
        self.role == Role::Primary
            && self.p.witness
            && self.p.fencing != Fencing::None
            && !peer_has_every_write
            && self.wl.peer_maybe_up_to_date
    }

    pub(super) fn peer_needs_uptodate(&self) -> bool {
        self.conn == Conn::Established
            && self.peer_disk == DiskState::UpToDate
            && self.wl.last_reply.is_some()
            && !self.wl.up_to_date.contains(&self.p.peer_node)
    }

    pub(super) fn auto_promote_possible(&self) -> bool {
        self.p.witness
            && self.p.auto_promote
            && self.role == Role::Secondary
            && self.disk_state() == DiskState::UpToDate
            && !self.split_brain
            && (!self.connected()
                || (self.conn == Conn::Established && self.peer_role == Role::Secondary))
    }

    pub(super) fn promoted_by_witness(&mut self, term: u64, sent_at: Instant, lease_ms: u64) {
        let until = witness::lease_deadline(sent_at, lease_ms, quorum::LEASE_DRIFT_PERMILLE);
        if until <= self.now && self.role != Role::Primary {
            // The answer sat unread past its lease (the process was paused): the witness
            // may have granted a newer term since, to a peer with writes this node lacks.
            tracing::warn!(resource = %self.p.resource, term, "the witness's grant arrived after its lease ran out; not promoting on it");
            self.promote_refused(AdminError::GrantExpired, false);
            return;
        }
        let want = self.want_promote.take();
        let manual = want.is_some_and(|w| w.manual);
        if term > self.sb.term {
            self.sb.term = term;
            self.term_persist = true;
        }
        self.votes.lease_until = Some(until);
        self.votes.peer_counts = true;
        let force = want.is_some_and(|w| w.force);
        let out = if self.role == Role::Primary {
            Ok(())
        } else {
            self.promote(force)
        };
        match out {
            Ok(()) => {
                tracing::info!(resource = %self.p.resource, term, manual, "promoted by the witness");
                if manual {
                    self.actions.push_back(Action::AdminDone(Ok(())));
                }
            }
            Err(e) => {
                // Granted, but the node changed meanwhile: hand the term back.
                tracing::warn!(resource = %self.p.resource, term, error = %e, "granted promotion not taken");
                self.wl.release_pending = true;
                self.votes.lease_until = None;
                if manual {
                    self.actions.push_back(Action::AdminDone(Err(e)));
                }
            }
        }
        // The new term reaches the disk before any write of it.
        self.persist_superblock();
    }

    /// A connected peer is primary: a promotion asked for earlier (and waiting, for
    /// instance for the peer's lease to run out) is dropped, as `promote` would be
    /// refused now. This node votes for the peer's writes (it acknowledges them and
    /// answers its pings); asking the witness for itself too would let both primaries
    /// count it (simulator seed 95000841 C).
    pub(super) fn drop_promotion_while_peer_primary(&mut self) {
        if self.role == Role::Primary || !self.connected() || self.peer_role != Role::Primary {
            return;
        }
        let Some(w) = self.want_promote.take() else {
            return;
        };
        tracing::warn!(resource = %self.p.resource, peer = %self.p.peer_node, "the peer is primary: the pending promotion is dropped");
        if w.manual {
            self.actions
                .push_back(Action::AdminDone(Err(AdminError::PeerIsPrimary)));
        }
    }

    /// The peer says it is primary (its hello or its state). While this secondary's own
    /// promotion request is out, acknowledging the peer's writes would vote for two
    /// primaries: it keeps away from the peer until the witness answers (`true`).
    pub(super) fn keep_away_while_promoting(&mut self) -> bool {
        let promoting = self
            .wl
            .in_flight
            .is_some_and(|(op, _)| op == WitnessOp::Promote);
        if self.role == Role::Primary || !promoting {
            return false;
        }
        self.set_promote_uncertain(true);
        true
    }

    pub(super) fn promote_refused(&mut self, why: AdminError, outdated: bool) {
        let Some(w) = self.want_promote else {
            return;
        };
        // A forced promotion does not ask the witness about the disk: being outdated
        // there does not stop it.
        let retry = (!outdated || w.force)
            && self.role != Role::Primary
            && if w.manual {
                self.now < w.give_up_at
            } else {
                self.auto_promote_possible()
            };
        if retry {
            // Asked again when the back-off of the refusal ends.
            return;
        }
        self.want_promote = None;
        if w.manual {
            self.actions.push_back(Action::AdminDone(Err(why)));
        } else {
            tracing::warn!(resource = %self.p.resource, reason = %why, "automatic promotion refused");
        }
    }

    /// A disconnected up-to-date secondary that the witness no longer counts as up to
    /// date was outdated by its primary: it says so and refuses automatic promotion.
    pub(super) fn check_outdated_by_witness(&mut self) {
        let me = &self.p.local_node;
        if self.role == Role::Primary
            || self.connected()
            || self.disk_state() != DiskState::UpToDate
            || self.wl.up_to_date.is_empty()
            || self.wl.up_to_date.contains(me)
        {
            return;
        }
        tracing::warn!(
            resource = %self.p.resource,
            up_to_date = ?self.wl.up_to_date,
            "the witness records this node as outdated: it will not be promoted automatically"
        );
        self.sb.set(meta::FLAG_OUTDATED, true);
        self.persist_superblock();
        self.want_promote = self.want_promote.filter(|w| w.manual);
    }

    /// Adopt a newer term seen on the wire or at the witness; a primary of an older term
    /// has been replaced and steps down.
    pub(super) fn adopt_term(&mut self, term: u64, from: &str) {
        if term <= self.sb.term {
            return;
        }
        tracing::info!(resource = %self.p.resource, old = self.sb.term, new = term, "newer term from {from}");
        self.sb.term = term;
        self.term_persist = true;
        self.persist_superblock();
        if self.role == Role::Primary {
            self.step_down(format!("replaced by the primary of term {term}"));
        }
    }

    /// A newer primary exists: fail what is held and become secondary (DRBD's
    /// `on-suspended-primary-outdated force-secondary`), so that the node can rejoin as
    /// sync target.
    pub(super) fn step_down(&mut self, reason: String) {
        tracing::error!(resource = %self.p.resource, %reason, "stepping down");
        self.last_error = Some(reason);
        self.become_secondary();
        self.wl.release_pending = false;
        self.fail_pending();
        self.retry_completions();
        self.send_state();
    }

    /// Give every write and flush another chance to complete (or fail) under the
    /// current gate.
    pub(super) fn retry_completions(&mut self) {
        let reqs: Vec<ReqId> = self.writes.keys().copied().collect();
        for req in reqs {
            self.try_complete(req);
        }
        self.check_flushes();
    }

    pub(super) fn leave_primary(&mut self) {
        if self.p.witness {
            self.wl.release_pending = true;
        }
        self.votes.lease_until = None;
        self.witness_tick(false);
    }

    pub(super) fn fail_pending(&mut self) {
        for p in std::mem::take(&mut self.pending) {
            match p {
                Pending::Write(req) => {
                    if self.writes.remove(&req).is_some() {
                        self.actions.push_back(Action::CompleteWrite {
                            req,
                            result: Err(ReqError::Io),
                        });
                        self.actions.push_back(Action::ReleaseBuf(BufId(req.0)));
                    }
                }
                Pending::Flush(req) => {
                    if self.flushes.remove(&req).is_some() {
                        self.complete_flush(req, false);
                    }
                }
            }
        }
    }

    /// A primary whose votes have all run out stops counting its peer until the witness
    /// renews its lease (see [`Votes::peer_counts`]).
    pub(super) fn note_quorum_loss(&mut self) {
        if self.role == Role::Primary
            && self.p.witness
            && self.votes.peer_counts
            && !self.votes.quorum(self.now)
        {
            self.votes.peer_counts = false;
        }
    }

    /// React when what application I/O may do has changed: release held I/O, or fail it.
    /// Arm or disarm the fail-back timer.
    pub(super) fn update_fail_back(&mut self) {
        let ready = self.p.fail_back_to_peer
            && self.peer_role == Role::Secondary
            && self.switchover_until.is_none()
            && self.switchover_precheck().is_ok();
        if !ready {
            self.fail_back_ready_since = None;
        } else if self.fail_back_ready_since.is_none() {
            self.fail_back_ready_since = Some(self.now);
        }
    }

    pub(super) fn check_gate(&mut self) {
        self.resync_stray_bits();
        self.update_fail_back();
        self.note_quorum_loss();
        let g = self.gate();
        if g == self.gate_was {
            return;
        }
        let was = std::mem::replace(&mut self.gate_was, g);
        if self.role == Role::Primary {
            match g {
                Gate::Suspend | Gate::Fail => tracing::error!(
                    resource = %self.p.resource,
                    term = self.sb.term,
                    policy = ?self.p.on_no_quorum,
                    "quorum lost: neither an answered ping from the peer nor a lease; I/O {}",
                    if g == Gate::Fail { "fails" } else { "suspended" }
                ),
                Gate::HoldCompletion => tracing::warn!(
                    resource = %self.p.resource,
                    "peer lost: writes wait until the witness records it as outdated"
                ),
                Gate::Open if was != Gate::Open => {
                    tracing::info!(resource = %self.p.resource, term = self.sb.term, "quorum: I/O resumes")
                }
                Gate::Open => {}
            }
        }
        self.pump();
        self.retry_completions();
    }

    /// Blocks marked out of sync while the pair is established (a demotion that could
    /// not flush first, a write that failed on one disk) are resynced only by a
    /// handshake: start one, once the bits are on disk. Established normally holds no
    /// bits; a sync target that has just received the last block still does until its
    /// closing flush clears them.
    pub(super) fn resync_stray_bits(&mut self) {
        if self.conn == Conn::Established
            && self.bitmap.count() > 0
            && self.resync_done_pending_gen.is_none()
            && !self.meta_busy()
        {
            tracing::warn!(
                resource = %self.p.resource,
                bytes = self.bitmap.out_of_sync_bytes(),
                "blocks out of sync while connected: reconnecting to resync them"
            );
            self.restart_handshake("out-of-sync blocks to resync");
        }
    }
}
