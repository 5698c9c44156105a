//! The node's role steps: admin commands waiting for the services and the device,
//! attach and detach around role changes, switchover and fail-back, the promoter's
//! outcomes (hand-over after a failed start, escalation after a failed stop), stopping.

use super::*;

impl Node {
    pub(super) fn admin(&mut self, from: Origin, cmd: AdminCmd) {
        if self.stop != Stop::Running {
            return self.reply(from, Err(AdminError::Stopping));
        }
        let role_cmd = matches!(
            cmd,
            AdminCmd::Promote { .. } | AdminCmd::Demote | AdminCmd::Switchover
        );
        if role_cmd && self.switchover.is_some() {
            // Its answer is the resource's next `AdminDone`: nothing may share it.
            return self.reply(from, Err(AdminError::RoleChangeInProgress));
        }
        let demoting = matches!(cmd, AdminCmd::Demote | AdminCmd::Switchover);
        if cmd == AdminCmd::Switchover && self.switchover_asked.is_none() {
            if let Err(e) = self.res.switchover_precheck() {
                return self.reply(from, Err(e));
            }
            self.switchover_asked = Some(self.now);
        }
        if demoting && self.promoter.phase() != Phase::Idle {
            if self.after_services.is_some() {
                return self.reply(from, Err(AdminError::ServicesStopping));
            }
            // Stop the services in reverse; the demotion follows when they are down.
            self.after_services = Some((cmd, from));
            self.promoter.handle_stop(self.now);
            return self.pump_promoter();
        }
        if self.checking.is_some() {
            return self.reply(from, Err(AdminError::RoleChangeInProgress));
        }
        if cmd == AdminCmd::Switchover {
            return self.check_device_then(cmd, from);
        }
        if matches!(self.device, DeviceState::Attaching | DeviceState::Detaching) {
            return self.reply(from, Err(AdminError::RoleChangeInProgress));
        }
        if cmd == AdminCmd::Demote && self.res.role() == Role::Primary {
            return self.check_device_then(cmd, from);
        }
        self.run_admin(from, cmd);
    }

    /// Before a demotion or switchover: whether something outside the services (stopped
    /// by then) still holds the device.
    fn check_device_then(&mut self, cmd: AdminCmd, from: Origin) {
        if self.device == DeviceState::Absent {
            return self.device_free(cmd, from);
        }
        self.checking = Some((cmd, from));
        self.out.push_back(Action::CheckDeviceFree);
    }

    /// The device may go: on with the demotion or switchover.
    pub(super) fn device_free(&mut self, cmd: AdminCmd, from: Origin) {
        match cmd {
            AdminCmd::Switchover => self.switchover(from),
            _ => self.run_admin(from, cmd),
        }
    }

    /// A command the device and the services allow now.
    fn run_admin(&mut self, from: Origin, cmd: AdminCmd) {
        let msg = match &cmd {
            AdminCmd::Promote { .. } => "already primary",
            AdminCmd::Demote => "already secondary",
            AdminCmd::Connect { discard_my_data } if *discard_my_data => {
                "connecting; this node's changes will be discarded"
            }
            AdminCmd::Connect { .. } => "connecting",
            AdminCmd::Disconnect => "disconnected",
            AdminCmd::Invalidate => "invalidated: full resync from the peer",
            AdminCmd::Switchover => "switched over",
            AdminCmd::AdoptWitness { .. } => "the witness adopted this pair's term",
        };
        let pending_ok = match cmd {
            AdminCmd::AdoptWitness { .. } => msg,
            _ => "primary",
        };
        // A role change among the resource's actions takes the answer for its device
        // steps.
        self.role_reply = Some(from);
        let out = self.resource_admin(cmd);
        let Some(from) = self.role_reply.take() else {
            return;
        };
        match out {
            Err(e) => self.reply(from, Err(e)),
            Ok(AdminReply::Pending) => self.promote_reply = Some((from, pending_ok)),
            Ok(AdminReply::Done) => self.reply(from, Ok(msg.to_string())),
        }
    }

    /// The services are down and the device free: demote and hand over to the peer.
    fn switchover(&mut self, from: Origin) {
        let asked = self.switchover_asked.take().unwrap_or(self.now);
        match self.resource_admin(AdminCmd::Switchover) {
            Err(e) => self.reply(from, Err(e)),
            Ok(_) => self.switchover = Some((from, asked, self.now.ms_since(asked))),
        }
    }

    /// The resource finished a command it answered `Pending`.
    pub(super) fn admin_done(&mut self, result: Result<(), AdminError>) {
        if let Some((from, asked, demoted_ms)) = self.switchover.take() {
            let peer = self.res.peer_node().to_string();
            let result = result.map(|()| {
                format!(
                    "switched over: {peer} is primary {} ms after the request (this node demoted after {demoted_ms} ms; its services start now)",
                    self.now.ms_since(asked)
                )
            });
            return self.reply(from, result);
        }
        if let Some((from, ok)) = self.promote_reply.take() {
            self.reply(from, result.map(|()| ok.to_string()));
        }
    }

    /// The preferred node (the peer) has been in sync long enough: switch over to it, as
    /// an operator would, unless a role step is under way.
    pub(super) fn fail_back(&mut self) {
        if self.after_services.is_some()
            || self.switchover.is_some()
            || !matches!(self.promoter.phase(), Phase::Running | Phase::Idle)
        {
            return;
        }
        self.admin(Origin::FailBack, AdminCmd::Switchover);
    }

    /// The resource changed role (a command, the witness, or a newer primary): the
    /// device and the services follow.
    pub(super) fn role_changed(&mut self, role: Role) {
        let from = self
            .role_reply
            .take()
            .or_else(|| self.promote_reply.take().map(|(f, _)| f));
        if self.stop != Stop::Running {
            // Stopping: the shell lets the device go once stopped.
            if let Some(f) = from {
                self.reply(f, Err(AdminError::Stopping));
            }
            return;
        }
        if role == Role::Primary {
            self.out.push_back(Action::SetWritable(true));
            match self.device {
                DeviceState::Present => {
                    // Still there after a step-down while it was in use.
                    if let Some(f) = from {
                        let msg = format!("primary; device {}", self.p.device_label);
                        self.reply(f, Ok(msg));
                    }
                }
                DeviceState::Absent => {
                    self.device = DeviceState::Attaching;
                    self.device_reply = from;
                    self.out.push_back(Action::AttachDevice);
                }
                // Attached again once the step in progress ends.
                DeviceState::Attaching | DeviceState::Detaching => {
                    if let Some(f) = from {
                        self.reply(f, Ok("primary".into()));
                    }
                }
            }
            return;
        }
        self.out.push_back(Action::SetWritable(false));
        if self.promoter.phase() != Phase::Idle {
            // Stepped down (a newer term): stop the services, then let the device go.
            if let Some(f) = from {
                self.reply(f, Ok("secondary; stopping the services".into()));
            }
            self.promoter.handle_stop(self.now);
            return self.pump_promoter();
        }
        self.let_device_go(from);
    }

    /// Secondary with the services stopped: detach the device if there is one.
    fn let_device_go(&mut self, from: Option<Origin>) {
        match self.device {
            DeviceState::Present => {
                self.device = DeviceState::Detaching;
                self.device_reply = from;
                self.out.push_back(Action::DetachDevice);
            }
            // Detached once the step in progress ends.
            DeviceState::Absent | DeviceState::Attaching | DeviceState::Detaching => {
                if let Some(f) = from {
                    self.reply(f, Ok("secondary".into()));
                }
            }
        }
    }

    pub(super) fn device_attached(&mut self, outcome: AttachOutcome) {
        if self.device != DeviceState::Attaching {
            return;
        }
        let from = self.device_reply.take();
        let result = match outcome {
            AttachOutcome::Ready => {
                self.device = DeviceState::Present;
                Ok(format!("primary; device {}", self.p.device_label))
            }
            AttachOutcome::LinkFailed(e) => {
                self.device = DeviceState::Present;
                tracing::error!(resource = %self.res.name(), error = %e, "device link");
                Err(AdminError::DeviceLink(e))
            }
            AttachOutcome::Failed(e) => {
                self.device = DeviceState::Absent;
                tracing::error!(resource = %self.res.name(), error = %e, "attach the device");
                Err(AdminError::DeviceAttach(e))
            }
        };
        let ready = result.is_ok();
        if let Some(f) = from {
            self.reply(f, result);
        }
        if self.stop != Stop::Running {
            return;
        }
        if self.res.role() != Role::Primary {
            // Demoted while it was being attached.
            return self.let_device_go(None);
        }
        if ready {
            self.promoter.handle_promoted(self.now);
            self.pump_promoter();
        }
    }

    pub(super) fn device_detached(&mut self, outcome: DetachOutcome) {
        if self.device != DeviceState::Detaching {
            return;
        }
        let from = self.device_reply.take();
        let result = match outcome {
            DetachOutcome::Detached => {
                self.device = DeviceState::Absent;
                "secondary".to_string()
            }
            DetachOutcome::Failed(e) => {
                self.device = DeviceState::Absent;
                format!("secondary; detaching the device: {e}")
            }
            DetachOutcome::InUse => {
                // A step-down forced by a newer primary: the users see I/O errors; the
                // device goes once they let go and the node is demoted or promoted again.
                self.device = DeviceState::Present;
                tracing::error!(resource = %self.res.name(), device = %self.p.device_label, "stepped down while the device is in use: its users get I/O errors; unmount it");
                "secondary; the device is still in use".to_string()
            }
        };
        if let Some(f) = from {
            self.reply(f, Ok(result));
        }
        if self.stop == Stop::Running
            && self.res.role() == Role::Primary
            && self.device == DeviceState::Absent
        {
            // Promoted again while it was being detached.
            self.device = DeviceState::Attaching;
            self.out.push_back(Action::AttachDevice);
        }
    }

    /// Every service is stopped (after a request, a step-down, a failed start or a
    /// stop): on with what waited for it.
    pub(super) fn services_down(&mut self, after_failure: bool) {
        if after_failure {
            tracing::error!(resource = %self.res.name(), failure = self.promoter.last_failure().unwrap_or(""), "a service failed to start: demoting so that the peer may take over");
            self.res.handle_services(false);
        }
        if let Stop::ServicesFirst { give_up_at } = self.stop {
            return self.drain_for_stop(give_up_at);
        }
        let primary = self.res.role() == Role::Primary;
        match self.after_services.take() {
            Some((cmd, from)) if primary => self.admin(from, cmd),
            Some((_, from)) => {
                // Already secondary (a step-down): now the device can go.
                self.let_device_go(None);
                self.reply(from, Err(AdminError::ReplacedMeanwhile));
            }
            None if primary => self.admin(Origin::Internal, AdminCmd::Demote),
            None => self.let_device_go(None),
        }
    }

    /// A service did not stop: no demotion (something may still use the device); the
    /// policy goes to the shell.
    pub(super) fn escalate(&mut self, policy: OnDemoteFailure) {
        let failure = self.promoter.last_failure().unwrap_or("").to_string();
        if let Some((_, from)) = self.after_services.take() {
            self.reply(from, Err(AdminError::NotDemoted(failure.clone())));
        }
        self.switchover_asked = None;
        tracing::error!(resource = %self.res.name(), %failure, ?policy, "a service did not stop");
        self.out.push_back(Action::Escalate(policy));
        if let Stop::ServicesFirst { give_up_at } = self.stop {
            self.drain_for_stop(give_up_at);
        }
    }

    /// The services are down (or were never up): demote and wait for the I/O in flight.
    pub(super) fn drain_for_stop(&mut self, give_up_at: Instant) {
        self.stop = Stop::Draining { give_up_at };
        if self.res.role() == Role::Primary {
            self.out.push_back(Action::SetWritable(false));
            if let Err(e) = self.res.handle_admin(self.now, AdminCmd::Demote) {
                tracing::warn!(resource = %self.res.name(), error = %e, "demote on shutdown; the next start resyncs the activity log");
            }
        }
        self.pump();
    }
}
