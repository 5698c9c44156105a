//! Operator commands and role changes: admin requests (waiting for the device to be
//! free before a demotion), switchover, and the promoter's actions on services.

use super::*;

impl Driver {
    pub(super) fn on_admin(&mut self, now: Instant, cmd: AdminCmd, reply: oneshot::Sender<Reply>) {
        let demoting = matches!(cmd, AdminCmd::Demote | AdminCmd::Switchover);
        if cmd == AdminCmd::Switchover && self.switchover_asked.is_none() {
            if let Err(e) = self.core.switchover_precheck() {
                let _ = reply.send(Reply::err(e.to_string()));
                return;
            }
            self.switchover_asked = Some(std::time::Instant::now());
        }
        if demoting && self.promoter.phase() != Phase::Idle {
            if self.after_services.is_some() || self.shutdown_after_services.is_some() {
                let _ = reply.send(Reply::err("services are already being stopped"));
                return;
            }
            // Stop the services in reverse; the demotion follows when they are down.
            self.after_services = Some((cmd, reply));
            self.promoter.handle_stop(now);
            self.drain_promoter();
            return;
        }
        if self.device_checking {
            let _ = reply.send(Reply::err("a role change is still in progress; try again"));
            return;
        }
        if cmd == AdminCmd::Switchover {
            return self.check_device_then(now, cmd, reply);
        }
        if self.device_busy {
            let _ = reply.send(Reply::err("a role change is still in progress; try again"));
            return;
        }
        if cmd == AdminCmd::Demote && self.core.role() == Role::Primary {
            return self.check_device_then(now, cmd, reply);
        }
        self.run_admin(now, cmd, reply);
    }

    /// Before a demotion or switchover: whether something outside the services (stopped
    /// by then) still has the device mounted or open. A holder that is just letting go
    /// (a file system unmounted a moment ago) may need this thread to serve its last
    /// I/O, so the check, which allows it time to settle, runs on a thread of its own
    /// and `cmd` goes on when its answer comes back.
    pub(super) fn check_device_then(
        &mut self,
        now: Instant,
        cmd: AdminCmd,
        reply: oneshot::Sender<Reply>,
    ) {
        let Some(dev) = self.loop_dev.clone() else {
            return self.device_free(now, cmd, reply);
        };
        self.device_checking = true;
        let link = self.link.clone();
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            let busy = device_busy_error(&link, &dev);
            let _ = tx.send(Event::DeviceChecked { cmd, reply, busy });
        });
    }

    /// The device may go: on with the demotion or switchover.
    pub(super) fn device_free(
        &mut self,
        now: Instant,
        cmd: AdminCmd,
        reply: oneshot::Sender<Reply>,
    ) {
        match cmd {
            AdminCmd::Switchover => self.switchover(now, reply),
            _ => self.run_admin(now, cmd, reply),
        }
    }

    /// An admin command the device allows now.
    pub(super) fn run_admin(&mut self, now: Instant, cmd: AdminCmd, reply: oneshot::Sender<Reply>) {
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
        self.admin_reply = Some(reply);
        let cmd_kind = cmd.clone();
        let out = self.core.handle_admin(now, cmd);
        // A role change among the actions takes `admin_reply` for its device steps.
        self.drain();
        let reply = self.admin_reply.take();
        match out {
            Err(e) => {
                if let Some(r) = reply {
                    let _ = r.send(Reply::err(e.to_string()));
                }
            }
            Ok(AdminReply::Pending) => {
                if let Some(r) = reply {
                    let ok = match cmd_kind {
                        AdminCmd::AdoptWitness { .. } => msg,
                        _ => "primary",
                    };
                    self.promote_reply = Some((r, ok));
                }
            }
            Ok(AdminReply::Done) => {
                if let Some(r) = reply {
                    let _ = r.send(Reply::ok(msg));
                }
            }
        }
    }

    /// The core changed role (an admin command, the witness, or a newer primary): attach
    /// or detach the device, answering the admin command that caused it, if any.
    pub(super) fn on_role_changed(&mut self, role: Role) {
        tracing::info!(resource = %self.name, ?role, "role changed");
        let reply = self
            .admin_reply
            .take()
            .or_else(|| self.promote_reply.take().map(|(r, _)| r));
        if self.shutdown.is_some() {
            // Stopping: the run loop detaches the device itself once the core is idle.
            return;
        }
        if role == Role::Primary {
            self.frontend.set_writable(true);
            if self.loop_dev.is_some() {
                // Still attached from a step-down whose device was in use.
                if let Some(r) = reply {
                    let _ = r.send(Reply::ok(format!(
                        "primary; device {}",
                        self.link.display()
                    )));
                }
                return;
            }
            self.device_busy = true;
            let device = self.device.clone();
            let tx = self.tx.clone();
            let link = self.link.clone();
            std::thread::spawn(move || {
                let attached = device.attach().map_err(|e| e.to_string());
                let message = format!("primary; device {}", link.display());
                let _ = tx.send(Event::DeviceDone {
                    attached: Some(attached),
                    reply,
                    message,
                });
            });
            return;
        }
        self.frontend.set_writable(false);
        if self.promoter.phase() != Phase::Idle {
            // Stepped down (a newer term): stop the services, then let the device go.
            if let Some(r) = reply {
                let _ = r.send(Reply::ok("secondary; stopping the services"));
            }
            let now = self.now();
            self.promoter.handle_stop(now);
            self.drain_promoter();
            return;
        }
        if let Some(dev) = &self.loop_dev {
            if frontend::in_use(dev) {
                // A step-down forced by a newer primary: the users see I/O errors; the
                // device goes once they let go and the node is demoted or promoted again.
                tracing::error!(resource = %self.name, device = %dev.display(), "stepped down while the device is in use: its users get I/O errors; unmount it");
                if let Some(r) = reply {
                    let _ = r.send(Reply::ok("secondary; the device is still in use"));
                }
                return;
            }
        }
        frontend::remove_link(&self.link);
        match self.loop_dev.take() {
            Some(dev) => {
                self.device_busy = true;
                let tx = self.tx.clone();
                let device = self.device.clone();
                std::thread::spawn(move || {
                    let message = match device.detach(&dev) {
                        Ok(()) => "secondary".to_string(),
                        Err(e) => format!("secondary; detaching {}: {e}", dev.display()),
                    };
                    let _ = tx.send(Event::DeviceDone {
                        attached: None,
                        reply,
                        message,
                    });
                });
            }
            None => {
                if let Some(r) = reply {
                    let _ = r.send(Reply::ok("secondary"));
                }
            }
        }
    }

    pub(super) fn drain(&mut self) {
        while let Some(a) = self.core.poll_action() {
            self.act(a);
        }
    }

    /// The services are down and the device free: demote and hand over to the peer.
    pub(super) fn switchover(&mut self, now: Instant, reply: oneshot::Sender<Reply>) {
        let asked = self
            .switchover_asked
            .take()
            .unwrap_or_else(std::time::Instant::now);
        match self.core.handle_admin(now, AdminCmd::Switchover) {
            Err(e) => {
                let _ = reply.send(Reply::err(e.to_string()));
            }
            Ok(_) => {
                self.switchover = Some((reply, asked, asked.elapsed().as_millis() as u64));
            }
        }
        self.drain();
    }

    pub(super) fn drain_promoter(&mut self) {
        while let Some(a) = self.promoter.poll_action() {
            self.act_promoter(a);
        }
    }

    pub(super) fn act_promoter(&mut self, a: PromoterAction) {
        let now = self.now();
        match a {
            PromoterAction::Start { idx } | PromoterAction::Stop { idx } => {
                let start = matches!(a, PromoterAction::Start { .. });
                let services = self.services.clone();
                let ctx = services::Context {
                    resource: self.name.clone(),
                    node: self.peer.local_node.clone(),
                    device: self.link.clone(),
                };
                tracing::info!(resource = %self.name, service = %services[idx].name(), "{} service", if start { "starting" } else { "stopping" });
                let tx = self.tx.clone();
                let task = self.rt.spawn(async move {
                    let svc = &services[idx];
                    let result = if start {
                        svc.start(&ctx).await
                    } else {
                        svc.stop(&ctx).await
                    };
                    let _ = tx.send(Event::ServiceDone { idx, result });
                });
                self.service_task = Some(task.abort_handle());
            }
            PromoterAction::Demote { after_failure } => {
                if after_failure {
                    tracing::error!(resource = %self.name, failure = self.promoter.last_failure().unwrap_or(""), "a service failed to start: demoting so that the peer may take over");
                    self.core.handle_services(false);
                }
                if let Some(r) = self.shutdown_after_services.take() {
                    let give_up_at = self.stop_by.unwrap_or_else(std::time::Instant::now);
                    self.handle(Event::Shutdown {
                        reply: r,
                        give_up_at,
                    });
                    return;
                }
                match self.after_services.take() {
                    Some((cmd, reply)) if self.core.role() == Role::Primary => {
                        self.on_admin(now, cmd, reply)
                    }
                    Some((_, reply)) => {
                        // Already secondary (a step-down): now the device can go.
                        self.on_role_changed(Role::Secondary);
                        let _ = reply.send(Reply::err(
                            "this node was made secondary meanwhile (a newer term)",
                        ));
                    }
                    None if self.core.role() == Role::Primary => {
                        let (tx, _) = oneshot::channel();
                        self.on_admin(now, AdminCmd::Demote, tx);
                    }
                    None => self.on_role_changed(Role::Secondary),
                }
            }
            PromoterAction::Escalate(policy) => {
                let failure = self.promoter.last_failure().unwrap_or("").to_string();
                if let Some((_, r)) = self.after_services.take() {
                    let _ = r.send(Reply::err(format!("not demoted: {failure}")));
                }
                self.switchover_asked = None;
                tracing::error!(resource = %self.name, %failure, ?policy, "a service did not stop");
                match policy {
                    OnDemoteFailure::None => {}
                    OnDemoteFailure::Exit => std::process::exit(1),
                    OnDemoteFailure::Reboot | OnDemoteFailure::Poweroff => {
                        let cmd = if policy == OnDemoteFailure::Reboot {
                            "reboot"
                        } else {
                            "poweroff"
                        };
                        if let Err(e) = std::process::Command::new(cmd).arg("-f").status() {
                            tracing::error!(resource = %self.name, error = %e, "{cmd} -f");
                        }
                    }
                }
                if let Some(r) = self.shutdown_after_services.take() {
                    let give_up_at = self.stop_by.unwrap_or_else(std::time::Instant::now);
                    self.handle(Event::Shutdown {
                        reply: r,
                        give_up_at,
                    });
                }
            }
        }
    }
}

/// Why `dev` (linked as `link`) cannot go now: something still has it mounted or open.
/// Blocks for up to the settling time of [`frontend::in_use_settled`].
pub(super) fn device_busy_error(link: &Path, dev: &Path) -> Option<String> {
    frontend::in_use_settled(dev).then(|| {
        let holders = frontend::holders(dev);
        let who = match holders.is_empty() {
            true => "mounted or held open".to_string(),
            false => holders.join(", "),
        };
        format!(
            "{} ({}) is in use ({who}); unmount it first",
            link.display(),
            dev.display()
        )
    })
}
