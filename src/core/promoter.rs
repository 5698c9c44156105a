//! The promoter: a resource's ordered services (mount, database, virtual IP, ...),
//! started in order after promotion and stopped in reverse before demotion, as
//! drbd-reactor's promoter does. Sans-IO like the rest of the core: it never runs
//! anything and never sleeps; it asks the shell to start or stop one service at a time,
//! each with a deadline, and hears back.
//!
//! Driving it: call [`Promoter::handle_promoted`] when the resource became primary,
//! [`Promoter::handle_stop`] to stop everything (a requested demotion, or a step-down
//! forced on the node), [`Promoter::handle_done`] with the outcome of each
//! [`PromoterAction::Start`] / [`PromoterAction::Stop`], and [`Promoter::handle_timeout`]
//! once [`Promoter::poll_timeout`] has passed. Drain [`Promoter::poll_action`] after
//! each call.
//!
//! Failure rules: a start that fails (or runs past its deadline) stops what was started
//! and then asks for [`PromoterAction::Demote`], so the peer may try; a stop that fails
//! ends with [`PromoterAction::Escalate`] carrying the `on-demote-failure` policy and no
//! demotion, because something may still use the device.

use std::collections::VecDeque;

use crate::core::Instant;

/// What to do when a service does not stop (`on-demote-failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnDemoteFailure {
    /// Log it and stay primary with the rest stopped; the operator decides.
    None,
    /// Exit the daemon (its systemd unit may restart it, or a watchdog reset the node).
    Exit,
    Reboot,
    Poweroff,
}

impl OnDemoteFailure {
    pub fn parse(s: &str) -> Option<OnDemoteFailure> {
        match s {
            "none" => Some(OnDemoteFailure::None),
            "exit" => Some(OnDemoteFailure::Exit),
            "reboot" => Some(OnDemoteFailure::Reboot),
            "poweroff" => Some(OnDemoteFailure::Poweroff),
            _ => None,
        }
    }
}

/// One service as the promoter sees it: a name for logs and status, and how long its
/// start and stop may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub start_timeout_ms: u64,
    pub stop_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceState {
    Stopped,
    Starting,
    Started,
    Stopping,
    /// A start or stop failed; for a start, the service counts as stopped again once
    /// the promoter has asked to stop it.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromoterAction {
    /// Start service `idx`; answer with `handle_done(idx, ok)`.
    Start { idx: usize },
    /// Stop service `idx`; answer with `handle_done(idx, ok)`.
    Stop { idx: usize },
    /// Everything is stopped after a failed start (or a requested stop): demote now.
    Demote { after_failure: bool },
    /// A service did not stop: apply this policy.
    Escalate(OnDemoteFailure),
}

/// Where the promoter is as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Nothing runs.
    Idle,
    Starting,
    /// Every service started: the node serves.
    Running,
    Stopping,
    /// A stop failed and was escalated; services may still hold the device.
    StopFailed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Start,
    Stop,
}

pub struct Promoter {
    services: Vec<ServiceSpec>,
    state: Vec<ServiceState>,
    on_demote_failure: OnDemoteFailure,
    phase: Phase,
    /// The operation in flight: which service, what, and until when.
    in_flight: Option<(usize, Op, Instant)>,
    /// Stopping because a start failed (then demote) or because asked to.
    stop_after_failure: bool,
    /// A stop was requested while starting: stop once the start in flight answers.
    stop_requested: bool,
    /// The reason of the last failure, for status.
    last_failure: Option<String>,
    actions: VecDeque<PromoterAction>,
}

impl Promoter {
    pub fn new(services: Vec<ServiceSpec>, on_demote_failure: OnDemoteFailure) -> Promoter {
        let n = services.len();
        Promoter {
            services,
            state: vec![ServiceState::Stopped; n],
            on_demote_failure,
            phase: Phase::Idle,
            in_flight: None,
            stop_after_failure: false,
            stop_requested: false,
            last_failure: None,
            actions: VecDeque::new(),
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn services(&self) -> impl Iterator<Item = (&ServiceSpec, ServiceState)> {
        self.services.iter().zip(self.state.iter().copied())
    }

    pub fn last_failure(&self) -> Option<&str> {
        self.last_failure.as_deref()
    }

    pub fn poll_action(&mut self) -> Option<PromoterAction> {
        self.actions.pop_front()
    }

    /// The deadline of the operation in flight.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.in_flight.map(|(_, _, t)| t)
    }

    /// The resource became primary: start the services in order.
    pub fn handle_promoted(&mut self, now: Instant) {
        if self.phase != Phase::Idle {
            return;
        }
        self.last_failure = None;
        self.stop_after_failure = false;
        self.stop_requested = false;
        self.phase = Phase::Starting;
        self.next(now);
    }

    /// Stop every service in reverse order, then ask for [`PromoterAction::Demote`]. A
    /// start in flight finishes first (a half-started service is then stopped too).
    /// After a failed stop, this tries the remaining stops again.
    pub fn handle_stop(&mut self, now: Instant) {
        match self.phase {
            Phase::Idle => self.actions.push_back(PromoterAction::Demote {
                after_failure: false,
            }),
            Phase::Starting if self.in_flight.is_some() => self.stop_requested = true,
            // After a failed stop: the operator asks again once it is fixed.
            Phase::Starting | Phase::Running | Phase::StopFailed => {
                self.phase = Phase::Stopping;
                self.next(now);
            }
            Phase::Stopping => {}
        }
    }

    /// The outcome of the start or stop of service `idx`.
    pub fn handle_done(&mut self, now: Instant, idx: usize, ok: bool) {
        let Some((i, op, _)) = self.in_flight else {
            return;
        };
        if i != idx {
            return;
        }
        self.in_flight = None;
        self.finish(now, idx, op, ok, None);
    }

    /// The operation in flight ran past its deadline: it counts as failed (the shell
    /// should kill whatever still runs for it).
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some((idx, op, deadline)) = self.in_flight else {
            return;
        };
        if now < deadline {
            return;
        }
        self.in_flight = None;
        let what = if op == Op::Start { "start" } else { "stop" };
        let why = format!(
            "{} did not {what} within {} ms",
            self.services[idx].name,
            if op == Op::Start {
                self.services[idx].start_timeout_ms
            } else {
                self.services[idx].stop_timeout_ms
            }
        );
        self.finish(now, idx, op, false, Some(why));
    }

    fn finish(&mut self, now: Instant, idx: usize, op: Op, ok: bool, why: Option<String>) {
        match (op, ok) {
            (Op::Start, true) => self.state[idx] = ServiceState::Started,
            (Op::Start, false) => {
                // It may have half started: it is stopped with the others.
                self.state[idx] = ServiceState::Failed;
                self.last_failure = Some(
                    why.unwrap_or_else(|| format!("{} failed to start", self.services[idx].name)),
                );
                self.stop_after_failure = true;
                self.phase = Phase::Stopping;
            }
            (Op::Stop, true) => self.state[idx] = ServiceState::Stopped,
            (Op::Stop, false) => {
                self.state[idx] = ServiceState::Failed;
                self.last_failure = Some(
                    why.unwrap_or_else(|| format!("{} failed to stop", self.services[idx].name)),
                );
                self.phase = Phase::StopFailed;
                self.actions
                    .push_back(PromoterAction::Escalate(self.on_demote_failure));
                return;
            }
        }
        if self.phase == Phase::Starting && self.stop_requested {
            self.stop_requested = false;
            self.phase = Phase::Stopping;
        }
        self.next(now);
    }

    /// Issue the next start or stop, or finish the phase.
    fn next(&mut self, now: Instant) {
        if self.in_flight.is_some() {
            return;
        }
        match self.phase {
            Phase::Starting => match self.state.iter().position(|&s| s == ServiceState::Stopped) {
                Some(idx) => {
                    self.state[idx] = ServiceState::Starting;
                    let t = now.plus_ms(self.services[idx].start_timeout_ms);
                    self.in_flight = Some((idx, Op::Start, t));
                    self.actions.push_back(PromoterAction::Start { idx });
                }
                None => self.phase = Phase::Running,
            },
            Phase::Stopping => {
                // Reverse order; a failed start is stopped too (it may have half run).
                let last = self
                    .state
                    .iter()
                    .rposition(|&s| matches!(s, ServiceState::Started | ServiceState::Failed));
                match last {
                    Some(idx) => {
                        self.state[idx] = ServiceState::Stopping;
                        let t = now.plus_ms(self.services[idx].stop_timeout_ms);
                        self.in_flight = Some((idx, Op::Stop, t));
                        self.actions.push_back(PromoterAction::Stop { idx });
                    }
                    None => {
                        self.phase = Phase::Idle;
                        self.actions.push_back(PromoterAction::Demote {
                            after_failure: self.stop_after_failure,
                        });
                    }
                }
            }
            Phase::Idle | Phase::Running | Phase::StopFailed => {}
        }
    }
}
