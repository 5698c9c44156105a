//! One node of the pair for one resource: the replicated [`Resource`], its
//! [`Promoter`], and every role step around them (the device, the services, switchover,
//! hand-over, fail-back, escalation and stopping), decided here and carried out by the
//! shell.
//!
//! # Driving it
//!
//! As with [`Resource`]: feed events with the `handle_*` methods, each carrying `now`;
//! drain [`Node::poll_action`] and carry every [`Action`] out; arm a timer for
//! [`Node::poll_timeout`] and call [`Node::handle_timeout`] when it fires. The
//! replication inputs (application requests, disk completions, peer frames, witness
//! replies, the `fence-peer` handler's exit) go straight to the resource; the node adds:
//!
//! - [`Node::handle_admin`]: an operator command, answered later by [`Action::Reply`]
//!   to the [`Origin`] it came from (once the device and the services allow it);
//! - [`Node::handle_device_checked`], [`Node::handle_device_attached`] and
//!   [`Node::handle_device_detached`]: the outcome of [`Action::CheckDeviceFree`],
//!   [`Action::AttachDevice`] and [`Action::DetachDevice`];
//! - [`Node::handle_service_done`]: the outcome of [`Action::StartService`] and
//!   [`Action::StopService`];
//! - [`Node::handle_shutdown`]: stop the resource (services, demotion, I/O in flight);
//!   [`Action::Stopped`] says when the shell may let everything go.
//!
//! Every wait has a deadline in the core (the services' timeouts, the stop's give-up
//! time) and every decision comes out as an action, escalation included
//! ([`Action::Escalate`]): the shell never sleeps, exits or reboots on its own.

use std::collections::VecDeque;

use crate::core::promoter::{OnDemoteFailure, Phase, Promoter, PromoterAction, ServiceSpec};
use crate::core::resource::{
    self, AdminCmd, AdminError, AdminReply, BufId, IoId, ReqId, Resource, Role,
};
use crate::core::wire::Msg;
use crate::core::witness;
use crate::core::Instant;

mod steps;

/// What the node needs beyond the resource's own parameters.
#[derive(Debug, Clone)]
pub struct NodeParams {
    /// The promoter's services, in start order.
    pub services: Vec<ServiceSpec>,
    pub on_demote_failure: OnDemoteFailure,
    /// How the device is named to users (its link, `/dev/tandem/RES`), for replies.
    pub device_label: String,
}

/// Who asked for an admin command, so that its answer finds its way back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// An operator's command; the number is the shell's, for its reply channel.
    Operator(u64),
    /// Fail-back to the preferred node, started by the node itself.
    FailBack,
    /// A step the node takes by itself (a demotion once its services have stopped).
    Internal,
}

/// Everything the shell must do for the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Replication work, as [`Resource`] documents it. The node answers
    /// [`resource::Action::AdminDone`] and [`resource::Action::FailBack`] itself and never
    /// passes them on; [`resource::Action::RoleChanged`] is passed on for logs only (the
    /// steps it causes come as the node's own actions).
    Resource(resource::Action),
    /// Let the frontend accept writes (primary) or refuse them.
    SetWritable(bool),
    /// Make the block device appear; answer with [`Node::handle_device_attached`].
    AttachDevice,
    /// Let the device go unless something still holds it; answer with
    /// [`Node::handle_device_detached`].
    DetachDevice,
    /// Whether something outside the services still holds the device (allowing a
    /// moment for a holder that is letting go); answer with
    /// [`Node::handle_device_checked`].
    CheckDeviceFree,
    /// Start service `idx`; answer with [`Node::handle_service_done`].
    StartService { idx: usize },
    /// Stop service `idx`; answer with [`Node::handle_service_done`].
    StopService { idx: usize },
    /// The start or stop in flight ran past its deadline: kill whatever still runs for it
    /// (no answer is expected any more).
    AbortService,
    /// A service did not stop: apply `on-demote-failure` (exit, reboot, power off, or
    /// nothing).
    Escalate(OnDemoteFailure),
    /// The answer to an admin command (or to a step the node took itself).
    Reply {
        to: Origin,
        result: Result<String, AdminError>,
    },
    /// After [`Node::handle_shutdown`]: nothing more will happen; `clean` unless I/O was
    /// still in flight at the give-up time (it fails; the next start resyncs it).
    Stopped { clean: bool },
}

/// How an [`Action::AttachDevice`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachOutcome {
    Ready,
    /// No device.
    Failed(String),
    /// The device exists but its link could not be made.
    LinkFailed(String),
}

/// How an [`Action::DetachDevice`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetachOutcome {
    Detached,
    /// Detaching failed; the device counts as gone.
    Failed(String),
    /// Still mounted or open: it stays until its users let go.
    InUse,
}

/// Where the block device stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    Absent,
    Attaching,
    Present,
    Detaching,
}

/// Where a stop stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Running,
    /// Stopping the services first; then [`Stop::Draining`].
    ServicesFirst {
        give_up_at: Instant,
    },
    /// Demoted; waiting until nothing is in flight, or `give_up_at`.
    Draining {
        give_up_at: Instant,
    },
    Done,
}

pub struct Node {
    res: Resource,
    promoter: Promoter,
    p: NodeParams,
    now: Instant,
    out: VecDeque<Action>,
    device: DeviceState,
    /// The answer waiting for the device step in progress.
    device_reply: Option<Origin>,
    /// A command waiting for [`Action::CheckDeviceFree`]'s answer.
    checking: Option<(AdminCmd, Origin)>,
    /// The command being handled, for the device steps its role change causes.
    role_reply: Option<Origin>,
    /// A command the resource answers later ([`resource::Action::AdminDone`]), with the
    /// message for success.
    promote_reply: Option<(Origin, &'static str)>,
    /// A demotion or switchover waiting for the services to stop.
    after_services: Option<(AdminCmd, Origin)>,
    /// A switchover waiting for the peer to take over: who asked, when, and after how
    /// many ms this node demoted.
    switchover: Option<(Origin, Instant, u64)>,
    switchover_asked: Option<Instant>,
    stop: Stop,
}

impl Node {
    pub fn new(res: Resource, p: NodeParams, now: Instant) -> Node {
        let promoter = Promoter::new(p.services.clone(), p.on_demote_failure);
        let mut n = Node {
            res,
            promoter,
            p,
            now,
            out: VecDeque::new(),
            device: DeviceState::Absent,
            device_reply: None,
            checking: None,
            role_reply: None,
            promote_reply: None,
            after_services: None,
            switchover: None,
            switchover_asked: None,
            stop: Stop::Running,
        };
        n.pump();
        n
    }

    // ----- queries

    pub fn resource(&self) -> &Resource {
        &self.res
    }

    pub fn promoter(&self) -> &Promoter {
        &self.promoter
    }

    pub fn device(&self) -> DeviceState {
        self.device
    }

    // ----- outputs

    pub fn poll_action(&mut self) -> Option<Action> {
        self.pump();
        self.out.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let give_up = match self.stop {
            Stop::Draining { give_up_at } => Some(give_up_at),
            _ => None,
        };
        [
            self.res.poll_timeout(),
            self.promoter.poll_timeout(),
            give_up,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    // ----- replication inputs, straight to the resource

    pub fn handle_app_write(&mut self, now: Instant, req: ReqId, offset: u64, len: u64) {
        self.now = now;
        self.res.handle_app_write(now, req, offset, len);
    }

    pub fn handle_app_flush(&mut self, now: Instant, req: ReqId) {
        self.now = now;
        self.res.handle_app_flush(now, req);
    }

    pub fn handle_disk_done(&mut self, now: Instant, io: IoId, ok: bool) {
        self.now = now;
        self.res.handle_disk_done(now, io, ok);
    }

    pub fn handle_peer_connected(&mut self, now: Instant) {
        self.now = now;
        self.res.handle_peer_connected(now);
    }

    pub fn handle_peer_disconnected(&mut self, now: Instant, reason: &str) {
        self.now = now;
        self.res.handle_peer_disconnected(now, reason);
    }

    pub fn handle_peer_message(&mut self, now: Instant, term: u64, msg: Msg, buf: Option<BufId>) {
        self.now = now;
        self.res.handle_peer_message(now, term, msg, buf);
    }

    pub fn handle_witness_reply(&mut self, now: Instant, reply: Option<witness::Reply>) {
        self.now = now;
        self.res.handle_witness_reply(now, reply);
    }

    pub fn handle_fence_peer_done(&mut self, now: Instant, exit_code: Option<i32>) {
        self.now = now;
        self.res.handle_fence_peer_done(now, exit_code);
    }

    // ----- the node's own inputs

    /// An operator command from `from`; the answer comes as [`Action::Reply`].
    pub fn handle_admin(&mut self, now: Instant, from: Origin, cmd: AdminCmd) {
        self.now = now;
        self.admin(from, cmd);
    }

    /// The answer to [`Action::CheckDeviceFree`]: `busy` says why the device cannot go.
    pub fn handle_device_checked(&mut self, now: Instant, busy: Option<String>) {
        self.now = now;
        let Some((cmd, from)) = self.checking.take() else {
            return;
        };
        match busy {
            Some(why) => {
                if cmd == AdminCmd::Switchover {
                    self.switchover_asked = None;
                }
                self.reply(from, Err(AdminError::DeviceBusy(why)));
            }
            None => self.device_free(cmd, from),
        }
    }

    /// The answer to [`Action::AttachDevice`].
    pub fn handle_device_attached(&mut self, now: Instant, outcome: AttachOutcome) {
        self.now = now;
        self.device_attached(outcome);
    }

    /// The answer to [`Action::DetachDevice`].
    pub fn handle_device_detached(&mut self, now: Instant, outcome: DetachOutcome) {
        self.now = now;
        self.device_detached(outcome);
    }

    /// The start or stop of service `idx` finished (`ok`: it succeeded).
    pub fn handle_service_done(&mut self, now: Instant, idx: usize, ok: bool) {
        self.now = now;
        self.promoter.handle_done(now, idx, ok);
        if self.promoter.phase() == Phase::Running {
            self.res.handle_services(true);
        }
        self.pump_promoter();
    }

    /// Stop: the services first, then a demotion, then wait until nothing is in flight;
    /// at `give_up_at` the node stops even with I/O in flight.
    pub fn handle_shutdown(&mut self, now: Instant, give_up_at: Instant) {
        self.now = now;
        if self.stop == Stop::Done {
            return;
        }
        if matches!(
            self.promoter.phase(),
            Phase::Starting | Phase::Running | Phase::Stopping
        ) {
            self.stop = Stop::ServicesFirst { give_up_at };
            self.promoter.handle_stop(now);
            self.pump_promoter();
            return;
        }
        self.drain_for_stop(give_up_at);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if self.res.poll_timeout().is_some_and(|t| t <= now) {
            self.res.handle_timeout(now);
        }
        if self.promoter.poll_timeout().is_some_and(|t| t <= now) {
            self.out.push_back(Action::AbortService);
            self.promoter.handle_timeout(now);
            self.pump_promoter();
        }
        if let Stop::Draining { give_up_at } = self.stop {
            if now >= give_up_at {
                tracing::error!(resource = %self.res.name(), "stopping with I/O still in flight: it fails; the next start resyncs what it touched");
                self.stop = Stop::Done;
                self.out.push_back(Action::Stopped { clean: false });
            }
        }
        self.pump();
    }

    // ----- plumbing

    fn reply(&mut self, to: Origin, result: Result<String, AdminError>) {
        self.out.push_back(Action::Reply { to, result });
    }

    /// Move the resource's actions out, taking those the node answers itself.
    fn pump(&mut self) {
        while let Some(a) = self.res.poll_action() {
            match a {
                resource::Action::RoleChanged(role) => {
                    self.out
                        .push_back(Action::Resource(resource::Action::RoleChanged(role)));
                    self.role_changed(role);
                }
                resource::Action::FailBack => self.fail_back(),
                resource::Action::AdminDone(result) => self.admin_done(result),
                other => self.out.push_back(Action::Resource(other)),
            }
        }
        if let Stop::Draining { .. } = self.stop {
            if self.res.is_idle() {
                self.stop = Stop::Done;
                self.out.push_back(Action::Stopped { clean: true });
            }
        }
    }

    fn pump_promoter(&mut self) {
        while let Some(a) = self.promoter.poll_action() {
            match a {
                PromoterAction::Start { idx } => self.out.push_back(Action::StartService { idx }),
                PromoterAction::Stop { idx } => self.out.push_back(Action::StopService { idx }),
                PromoterAction::Demote { after_failure } => self.services_down(after_failure),
                PromoterAction::Escalate(policy) => self.escalate(policy),
            }
        }
        self.pump();
    }

    /// A command the resource answered at once (`Done`) or will answer later.
    fn resource_admin(&mut self, cmd: AdminCmd) -> Result<AdminReply, AdminError> {
        let out = self.res.handle_admin(self.now, cmd);
        self.pump();
        out
    }
}
