//! Operator commands and the node's role steps, carried out: answers to commands, the
//! device (check, attach, detach, on helper threads), the services (on the runtime) and
//! escalation. The node decides each step; this file only does it and reports back.

use super::*;

impl Driver {
    pub(super) fn on_admin(&mut self, now: Instant, cmd: AdminCmd, reply: oneshot::Sender<Reply>) {
        let id = self.next_reply;
        self.next_reply += 1;
        self.replies.insert(id, reply);
        self.node.handle_admin(now, Origin::Operator(id), cmd);
    }

    /// Carry out everything the node asks for.
    pub(super) fn drain(&mut self) {
        while let Some(a) = self.node.poll_action() {
            self.act_node(a);
        }
    }

    fn act_node(&mut self, a: node::Action) {
        match a {
            node::Action::Resource(a) => self.act(a),
            node::Action::SetWritable(on) => self.frontend.set_writable(on),
            node::Action::CheckDeviceFree => {
                let Some(dev) = self.loop_dev.clone() else {
                    let now = self.now();
                    return self.node.handle_device_checked(now, None);
                };
                let link = self.link.clone();
                let tx = self.tx.clone();
                std::thread::spawn(move || {
                    let busy = device_busy_error(&link, &dev);
                    let _ = tx.send(Event::DeviceChecked { busy });
                });
            }
            node::Action::AttachDevice => {
                let device = self.device.clone();
                let tx = self.tx.clone();
                let link = self.link.clone();
                std::thread::spawn(move || {
                    let (dev, outcome) = match device.attach() {
                        Ok(dev) => match frontend::make_link(&link, &dev) {
                            Ok(()) => (Some(dev), AttachOutcome::Ready),
                            Err(e) => (Some(dev), AttachOutcome::LinkFailed(e.to_string())),
                        },
                        Err(e) => (None, AttachOutcome::Failed(e.to_string())),
                    };
                    let _ = tx.send(Event::DeviceAttached { dev, outcome });
                });
            }
            node::Action::DetachDevice => {
                let Some(dev) = self.loop_dev.clone() else {
                    let now = self.now();
                    return self
                        .node
                        .handle_device_detached(now, DetachOutcome::Detached);
                };
                if frontend::in_use(&dev) {
                    let now = self.now();
                    return self.node.handle_device_detached(now, DetachOutcome::InUse);
                }
                frontend::remove_link(&self.link);
                let tx = self.tx.clone();
                let device = self.device.clone();
                std::thread::spawn(move || {
                    let outcome = match device.detach(&dev) {
                        Ok(()) => DetachOutcome::Detached,
                        Err(e) => DetachOutcome::Failed(format!("{}: {e}", dev.display())),
                    };
                    let _ = tx.send(Event::DeviceDetached(outcome));
                });
            }
            node::Action::StartService { idx } => self.run_service(idx, true),
            node::Action::StopService { idx } => self.run_service(idx, false),
            node::Action::AbortService => {
                if let Some(t) = self.service_task.take() {
                    t.abort();
                }
            }
            node::Action::Escalate(policy) => escalate(&self.name, policy),
            node::Action::Reply { to, result } => self.answer(to, result),
            node::Action::Stopped { .. } => self.stopped = true,
        }
    }

    fn answer(&mut self, to: Origin, result: Result<String, crate::core::resource::AdminError>) {
        match to {
            Origin::Operator(id) => {
                if let Some(r) = self.replies.remove(&id) {
                    let _ = r.send(match result {
                        Ok(m) => Reply::ok(m),
                        Err(e) => Reply::err(e.to_string()),
                    });
                }
            }
            Origin::FailBack => match result {
                Ok(m) => tracing::info!(resource = %self.name, message = %m, "fail-back done"),
                Err(e) => tracing::error!(resource = %self.name, error = %e, "fail-back failed"),
            },
            Origin::Internal => {
                if let Err(e) = result {
                    tracing::warn!(resource = %self.name, error = %e, "demotion after the services stopped");
                }
            }
        }
    }

    fn run_service(&mut self, idx: usize, start: bool) {
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
}

/// Apply `on-demote-failure`, as the node decided.
fn escalate(name: &str, policy: OnDemoteFailure) {
    match policy {
        OnDemoteFailure::None => {}
        OnDemoteFailure::Exit => {
            tracing::error!(resource = %name, "on-demote-failure = exit: exiting");
            std::process::exit(1)
        }
        OnDemoteFailure::Reboot | OnDemoteFailure::Poweroff => {
            let cmd = if policy == OnDemoteFailure::Reboot {
                "reboot"
            } else {
                "poweroff"
            };
            tracing::error!(resource = %name, "on-demote-failure: {cmd} -f");
            if let Err(e) = std::process::Command::new(cmd).arg("-f").status() {
                tracing::error!(resource = %name, error = %e, "{cmd} -f");
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
