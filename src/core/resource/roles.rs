//! Roles: operator commands, promotion and demotion, switchover and handing over, and
//! what a failing local disk does to the node's role and disk state.

use super::*;

impl Resource {
    /// The shell's promoter started every service on this node (`started`), or one failed
    /// to start and the node is about to demote. After a failure the demotion asks a
    /// connected, up-to-date peer to take over (as a switchover does), and this node
    /// declines such a request itself until its services start again: two nodes that
    /// both cannot start them hand the role over once, not back and forth.
    pub fn handle_services(&mut self, started: bool) {
        self.services_failed = !started;
        self.hand_over_on_demote = !started && self.role == Role::Primary;
    }

    /// An operator command. `Ok(Pending)` means the answer follows as
    /// [`Action::AdminDone`] (promotion through the witness, a demotion that flushes
    /// first, a switchover).
    pub fn handle_admin(&mut self, now: Instant, cmd: AdminCmd) -> Result<AdminReply, AdminError> {
        self.now = now;
        let out = self.admin(cmd);
        self.check_gate();
        out
    }

    pub(super) fn admin(&mut self, cmd: AdminCmd) -> Result<AdminReply, AdminError> {
        let done = |r: Result<(), AdminError>| r.map(|()| AdminReply::Done);
        match cmd {
            AdminCmd::Promote { force } => {
                if self.role == Role::Primary {
                    return Ok(AdminReply::Done);
                }
                if self.want_promote.is_some_and(|w| w.manual) {
                    return Err(AdminError::PromoteInProgress);
                }
                // `--force` overrides the disk check only: with a witness the node still
                // takes a new term from it (and fencing still runs) like any promotion.
                match self.promote_precheck() {
                    Err(AdminError::NotUpToDate(_)) if force => {}
                    r => r?,
                }
                if !self.p.witness && (force || self.stonith_allows_promotion()) {
                    if force && self.p.fencing == Fencing::Stonith && !self.connected() {
                        tracing::warn!(resource = %self.p.resource, "forced promotion: the fence-peer handler is not run");
                    }
                    return done(self.promote(force));
                }
                let fence_ms = if self.p.fencing == Fencing::Stonith {
                    self.p.fence_peer_timeout_ms
                } else {
                    0
                };
                self.want_promote = Some(PromoteWant {
                    manual: true,
                    force,
                    give_up_at: self
                        .now
                        .plus_ms(2 * self.p.lease_ms + self.p.ping_timeout_ms + fence_ms),
                });
                self.witness_tick(false);
                Ok(AdminReply::Pending)
            }
            AdminCmd::Demote => {
                if self.role != Role::Primary {
                    return Ok(AdminReply::Done);
                }
                self.flush_then_demote(cmd)
            }
            AdminCmd::Switchover => {
                self.switchover_precheck()?;
                self.flush_then_demote(cmd)?;
                Ok(AdminReply::Pending)
            }
            AdminCmd::Connect { discard_my_data } => {
                if discard_my_data && self.role == Role::Primary {
                    return Err(AdminError::IsPrimary);
                }
                self.discard_my_data = discard_my_data;
                self.split_brain = false;
                if self.conn == Conn::StandAlone {
                    self.conn = Conn::Connecting;
                }
                self.actions.push_back(Action::SetConnect(true));
                Ok(AdminReply::Done)
            }
            AdminCmd::Disconnect => {
                if self.connected() {
                    self.forget_peer(Conn::StandAlone);
                    self.actions.push_back(Action::Disconnect {
                        reason: "disconnect requested".into(),
                    });
                }
                self.conn = Conn::StandAlone;
                self.actions.push_back(Action::SetConnect(false));
                Ok(AdminReply::Done)
            }
            AdminCmd::AdoptWitness { force } => {
                if !self.p.witness {
                    return Err(AdminError::NoWitness);
                }
                if self.wl.adopt.is_some() {
                    return Err(AdminError::Busy(1));
                }
                if !force && self.conn != Conn::Established {
                    return Err(AdminError::AdoptNeedsPeer);
                }
                self.wl.adopt = Some(force);
                self.witness_tick(false);
                Ok(AdminReply::Pending)
            }
            AdminCmd::Invalidate => {
                if self.role == Role::Primary {
                    return Err(AdminError::IsPrimary);
                }
                self.sb.gen = Generation::just_created();
                self.sb.set(meta::FLAG_CONSISTENT, false);
                self.sb.set(meta::FLAG_CRASHED_PRIMARY, false);
                self.bitmap.set_all();
                self.persist_dirty_pages();
                self.persist_superblock();
                if self.connected() {
                    self.restart_handshake("invalidate: full resync from the peer");
                }
                Ok(AdminReply::Done)
            }
        }
    }

    /// What refuses a switchover before anything is stopped: the peer must be connected
    /// and hold every write, or handing over would lose data.
    pub fn switchover_precheck(&self) -> Result<(), AdminError> {
        if self.role != Role::Primary {
            return Err(AdminError::NotPrimary);
        }
        if self.conn != Conn::Established
            || self.peer_disk != DiskState::UpToDate
            || self.bitmap.count() > 0
        {
            return Err(AdminError::PeerNotReady(format!(
                "replication {}, peer disk {:?}, {} bytes out of sync",
                self.status().replication.as_str(),
                self.peer_disk,
                self.bitmap.out_of_sync_bytes()
            )));
        }
        Ok(())
    }

    /// A demotion ends the activity log's cover of this node's writes, and a switchover
    /// hands them to the peer: writes completed but not yet flushed, on either disk, could
    /// then be lost in a crash on one side only, and nothing would mark them out of sync.
    /// So they are flushed first (the local disk and, in B and C, the peer's, as an
    /// application flush), and `cmd` finishes when that flush does.
    pub(super) fn flush_then_demote(&mut self, cmd: AdminCmd) -> Result<AdminReply, AdminError> {
        self.no_requests_in_flight()?;
        if self.flush_then.is_some() {
            return Err(AdminError::Busy(1));
        }
        // Without quorum the flush could not complete; the demotion goes ahead as before.
        if self.writes_completed > self.writes_flushed && matches!(self.gate(), Gate::Open) {
            self.flush_then = Some(cmd);
            let now = self.now;
            self.on_app_flush(now, ROLE_CHANGE_FLUSH);
            return Ok(AdminReply::Pending);
        }
        self.demote_now(cmd)
    }

    /// Demote now (nothing unflushed): for a switchover, ask the peer to take over; after
    /// failed services, ask it too if it is ready.
    pub(super) fn demote_now(&mut self, cmd: AdminCmd) -> Result<AdminReply, AdminError> {
        if self.role != Role::Primary {
            return Ok(AdminReply::Done);
        }
        let switchover = cmd == AdminCmd::Switchover;
        if switchover {
            self.switchover_precheck()?;
        }
        let hand_over =
            switchover || (self.hand_over_on_demote && self.switchover_precheck().is_ok());
        self.demote()?;
        self.hand_over_on_demote = false;
        if hand_over {
            // After our State: the peer sees a secondary, then the request.
            self.send(Msg::Handover);
        }
        if !switchover {
            if hand_over {
                tracing::info!(resource = %self.p.resource, "services failed to start here: asked the peer to take over");
            }
            return Ok(AdminReply::Done);
        }
        self.switchover_until = Some(
            self.now
                .plus_ms(2 * self.p.lease_ms + 2 * self.p.ping_timeout_ms),
        );
        Ok(AdminReply::Pending)
    }

    /// A role change waits until no application request is in flight.
    pub(super) fn no_requests_in_flight(&self) -> Result<(), AdminError> {
        match self.writes.len() + self.pending.len() {
            0 => Ok(()),
            n => Err(AdminError::Busy(n)),
        }
    }

    pub(super) fn demote(&mut self) -> Result<(), AdminError> {
        self.no_requests_in_flight()?;
        self.become_secondary();
        self.send_state();
        Ok(())
    }

    /// The role change itself, persisted, shared by a demotion and a step-down.
    ///
    /// Clearing the primary flag ends the activity log's cover of this node's writes. A
    /// write that is not yet durable on both disks (completed since the last flush that
    /// both sides confirmed, or still in the transfer log) could then be lost by a crash
    /// on one side only with no bitmap bit saying so. A demotion normally flushes first
    /// (`flush_then_demote`); when it could not (no quorum, or a step-down), the active
    /// extents go to the bitmap, as a crash would have put them, before the flag clears.
    pub(super) fn become_secondary(&mut self) {
        self.role = Role::Secondary;
        if !self.epochs.transfer_log_is_empty() || self.writes_completed > self.writes_flushed {
            let extents = self.mark_active_extents_out_of_sync();
            self.writes_flushed = self.writes_completed;
            tracing::warn!(
                resource = %self.p.resource,
                extents,
                "leaving the primary role with writes not flushed on both disks: activity log marked out of sync"
            );
        }
        self.sb.set(meta::FLAG_PRIMARY_ACTIVE, false);
        self.persist_dirty_pages();
        self.persist_superblock();
        self.actions.push_back(Action::RoleChanged(Role::Secondary));
        self.leave_primary();
    }

    /// Every extent of the activity log goes to the bitmap, as a crash would put it
    /// there. Returns how many there were.
    pub(super) fn mark_active_extents_out_of_sync(&mut self) -> usize {
        let extents: Vec<u32> = self.al.active_extents().to_vec();
        let eb = self.al.extent_bytes();
        for e in &extents {
            self.mark_out_of_sync(*e as u64 * eb, eb);
        }
        extents.len()
    }

    /// Blocks that may differ between the disks now, outside the normal write path (a
    /// write failed on one side, a demotion could not flush): set in the bitmap, and
    /// any resync chunk over them that was read before is forgotten, so that its late
    /// acknowledgement cannot clear them again; the resync reads them anew.
    pub(super) fn mark_out_of_sync(&mut self, offset: u64, len: u64) {
        self.bitmap.set_range(offset, len);
        self.resync.forget(offset, len);
    }

    /// This node's disk failed a request. A primary goes on (the application saw the
    /// error, the blocks concerned are marked out of sync and resynced from here). A
    /// secondary stands alone, so that its primary fences it and goes on instead of
    /// waiting for it, until the operator has fixed the disk and runs `connect`, which
    /// resyncs it; if the failure lost data the peer sent (`lost_data`), it also marks
    /// itself outdated at once, so it is never promoted on this data.
    pub(super) fn local_disk_failed(&mut self, what: String, lost_data: bool) {
        tracing::error!(resource = %self.p.resource, "{what}");
        self.disk_errors += 1;
        self.last_error = Some(what.clone());
        if self.role == Role::Primary {
            return;
        }
        if lost_data && self.disk_state() == DiskState::UpToDate {
            self.sb.set(meta::FLAG_OUTDATED, true);
            self.persist_superblock();
        }
        if self.conn != Conn::StandAlone {
            let outdated = if lost_data {
                ": this node is outdated until a resync"
            } else {
                ""
            };
            self.go_standalone(format!(
                "{what}{outdated}; fix the disk, then run `tandemctl connect {}`",
                self.p.resource
            ));
        }
    }

    /// The peer asked this node to take over (a switchover): promote it as `promote`
    /// would, through the witness when there is one.
    pub(super) fn on_handover(&mut self) {
        if self.role == Role::Primary || self.want_promote.is_some() {
            return;
        }
        if self.services_failed {
            tracing::error!(resource = %self.p.resource, "the peer asked this node to take over, but the services failed to start here last time; promote by hand once fixed");
            return;
        }
        if let Err(e) = self.promote_precheck() {
            tracing::error!(resource = %self.p.resource, error = %e, "switchover: the peer asked this node to take over, but it cannot");
            return;
        }
        tracing::info!(resource = %self.p.resource, "switchover: taking over from the peer");
        if !self.p.witness {
            if let Err(e) = self.promote(false) {
                tracing::error!(resource = %self.p.resource, error = %e, "switchover promotion failed");
            }
            return;
        }
        self.want_promote = Some(PromoteWant {
            manual: true,
            force: false,
            give_up_at: self
                .now
                .plus_ms(2 * self.p.lease_ms + self.p.ping_timeout_ms),
        });
        self.witness_tick(false);
    }

    /// What stops a promotion through the witness before it is even asked.
    pub(super) fn promote_precheck(&self) -> Result<(), AdminError> {
        if self.connected() && self.peer_role == Role::Primary {
            return Err(AdminError::PeerIsPrimary);
        }
        if matches!(
            self.conn,
            Conn::SyncTarget
                | Conn::SyncStarting { source: false }
                | Conn::WfBitmap { source: false }
        ) {
            return Err(AdminError::SyncTarget);
        }
        match self.disk_state() {
            DiskState::UpToDate => Ok(()),
            d => Err(AdminError::NotUpToDate(d)),
        }
    }

    pub(super) fn promote(&mut self, force: bool) -> Result<(), AdminError> {
        if self.role == Role::Primary {
            return Ok(());
        }
        match self.promote_precheck() {
            Ok(()) => {}
            Err(AdminError::NotUpToDate(_)) if force => {}
            Err(e) => return Err(e),
        }
        let disk = self.disk_state();
        if disk != DiskState::UpToDate {
            tracing::warn!(
                resource = %self.p.resource, ?disk,
                "forced promotion: this node's data now counts as the newest"
            );
            self.sb.set(meta::FLAG_CONSISTENT, true);
            self.sb.set(meta::FLAG_OUTDATED, false);
        }
        self.primary_lost_at = None;
        self.want_promote = None;
        let was_just_created = self.sb.gen.current == uuid::UUID_JUST_CREATED;
        // As DRBD: a primary without its peer starts a new generation, unless it already
        // writes one the peer lacks (a bitmap UUID is set: the bitmap counts from there)
        // and is not forced. Rotating on every such promotion would push the generation
        // the peer holds out of the short history, and turn a plain resync into a split
        // brain (simulator seed 50001642 in C: a node promoted alone five times).
        let diverged = self.sb.gen.bitmap != 0;
        if was_just_created || (!self.replicating() && (force || !diverged)) {
            let fresh = self.rng.next_u64();
            self.sb.gen.new_current(fresh);
            self.sb.gen_term = self.sb.term;
        } else if !self.replicating() {
            // Writing on in this generation, now in this term: what the older-term rule
            // compares after a split brain.
            self.sb.gen_term = self.sb.gen_term.max(self.sb.term);
        }
        self.role = Role::Primary;
        self.sb.set(meta::FLAG_PRIMARY_ACTIVE, true);
        self.persist_superblock();
        self.actions.push_back(Action::RoleChanged(Role::Primary));
        if self.connected() && was_just_created {
            self.restart_handshake("new data generation after forced promotion");
        } else {
            self.send_state();
        }
        Ok(())
    }

    pub(super) fn send_state(&mut self) {
        if self.connected() {
            self.send(Msg::State {
                primary: self.role == Role::Primary,
                disk: self.disk_state().code(),
            });
        }
    }
}
