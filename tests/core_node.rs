//! The node's role steps, driven by hand: each test feeds inputs and checks the actions
//! the node asks for (device, services, answers, escalation, stopping), as a shell or the
//! simulator would see them.

mod core_support;

use core_support::One;
use tandem::core::node::{
    Action, AttachOutcome, DetachOutcome, DeviceState, Node, NodeParams, Origin,
};
use tandem::core::promoter::{OnDemoteFailure, Phase, ServiceSpec};
use tandem::core::resource::{self, AdminCmd, AdminError, ReqId, Role};
use tandem::core::{Instant, Protocol};

const OP: Origin = Origin::Operator(1);

/// A node whose resource is connected and up to date, with services `mount` and `db`.
struct N {
    n: Node,
    now: u64,
}

impl N {
    fn new(policy: OnDemoteFailure) -> N {
        let mut o = One::new(Protocol::C);
        o.finish_meta();
        o.connect_established();
        let svc = |name: &str| ServiceSpec {
            name: name.into(),
            start_timeout_ms: 1000,
            stop_timeout_ms: 500,
        };
        let p = NodeParams {
            services: vec![svc("mount"), svc("db")],
            on_demote_failure: policy,
            device_label: "/dev/tandem/r0".into(),
        };
        let mut n = N {
            n: Node::new(o.r, p, Instant(1)),
            now: 1,
        };
        n.drain();
        n
    }

    fn at(&self) -> Instant {
        Instant(self.now)
    }

    /// The node's actions, with metadata writes and disk flushes completed and other
    /// replication work left out.
    fn drain(&mut self) -> Vec<Action> {
        let mut seen = Vec::new();
        loop {
            let mut io_done = Vec::new();
            while let Some(a) = self.n.poll_action() {
                match a {
                    Action::Resource(
                        resource::Action::MetaWrite { io, .. } | resource::Action::DiskFlush { io },
                    ) => io_done.push(io),
                    Action::Resource(resource::Action::RoleChanged(_)) => seen.push(a),
                    Action::Resource(_) => {}
                    other => seen.push(other),
                }
            }
            if io_done.is_empty() {
                return seen;
            }
            for io in io_done {
                self.n.handle_disk_done(self.at(), io, true);
            }
        }
    }

    fn admin(&mut self, cmd: AdminCmd) -> Vec<Action> {
        self.n.handle_admin(self.at(), OP, cmd);
        self.drain()
    }

    fn service(&mut self, idx: usize, ok: bool) -> Vec<Action> {
        self.n.handle_service_done(self.at(), idx, ok);
        self.drain()
    }

    /// Promoted with the device attached; `mount` is starting.
    fn attached(policy: OnDemoteFailure) -> N {
        let mut n = N::new(policy);
        n.admin(AdminCmd::Promote { force: false });
        n.n.handle_device_attached(n.at(), AttachOutcome::Ready);
        n.drain();
        n
    }

    /// The device check finds it free: the node demotes and detaches it.
    fn device_free_then_detached(&mut self) {
        self.n.handle_device_checked(self.at(), None);
        let a = self.drain();
        assert!(a.contains(&Action::DetachDevice), "{a:?}");
        assert_eq!(self.n.resource().role(), Role::Secondary);
        self.n
            .handle_device_detached(self.at(), DetachOutcome::Detached);
    }

    /// Promote, attach the device and start both services.
    fn running(policy: OnDemoteFailure) -> N {
        let mut n = N::new(policy);
        let a = n.admin(AdminCmd::Promote { force: false });
        assert_eq!(
            a,
            vec![
                Action::Resource(resource::Action::RoleChanged(Role::Primary)),
                Action::SetWritable(true),
                Action::AttachDevice,
            ]
        );
        n.n.handle_device_attached(n.at(), AttachOutcome::Ready);
        assert_eq!(
            n.drain(),
            vec![
                ok("primary; device /dev/tandem/r0"),
                Action::StartService { idx: 0 }
            ]
        );
        assert_eq!(n.service(0, true), vec![Action::StartService { idx: 1 }]);
        assert_eq!(n.service(1, true), vec![]);
        assert_eq!(n.n.promoter().phase(), Phase::Running);
        n
    }
}

fn ok(m: &str) -> Action {
    Action::Reply {
        to: OP,
        result: Ok(m.into()),
    }
}

fn err(e: AdminError) -> Action {
    Action::Reply {
        to: OP,
        result: Err(e),
    }
}

#[test]
fn a_demotion_stops_the_services_in_reverse_checks_the_device_then_lets_it_go() {
    let mut n = N::running(OnDemoteFailure::None);
    assert_eq!(
        n.admin(AdminCmd::Demote),
        vec![Action::StopService { idx: 1 }]
    );
    assert_eq!(n.service(1, true), vec![Action::StopService { idx: 0 }]);
    assert_eq!(n.service(0, true), vec![Action::CheckDeviceFree]);
    n.n.handle_device_checked(n.at(), None);
    assert_eq!(
        n.drain(),
        vec![
            Action::Resource(resource::Action::RoleChanged(Role::Secondary)),
            Action::SetWritable(false),
            Action::DetachDevice,
        ]
    );
    assert_eq!(n.n.device(), DeviceState::Detaching);
    n.n.handle_device_detached(n.at(), DetachOutcome::Detached);
    assert_eq!(n.drain(), vec![ok("secondary")]);
    assert_eq!(n.n.device(), DeviceState::Absent);
}

#[test]
fn a_device_still_held_refuses_the_demotion_and_the_node_stays_primary() {
    let mut n = N::running(OnDemoteFailure::None);
    n.admin(AdminCmd::Demote);
    n.service(1, true);
    n.service(0, true);
    n.n.handle_device_checked(n.at(), Some("held by mount".into()));
    assert_eq!(
        n.drain(),
        vec![err(AdminError::DeviceBusy("held by mount".into()))]
    );
    assert_eq!(n.n.resource().role(), Role::Primary);
    // A second command while a check runs is refused, not queued.
    n.n.handle_admin(n.at(), OP, AdminCmd::Demote);
    assert_eq!(n.drain(), vec![Action::CheckDeviceFree]);
    assert_eq!(
        n.admin(AdminCmd::Demote),
        vec![err(AdminError::RoleChangeInProgress)]
    );
}

#[test]
fn a_service_that_fails_to_start_is_stopped_with_the_others_and_the_node_demotes_itself() {
    let mut n = N::attached(OnDemoteFailure::None);
    assert_eq!(n.service(0, true), vec![Action::StartService { idx: 1 }]);
    assert_eq!(n.service(1, false), vec![Action::StopService { idx: 1 }]);
    assert_eq!(n.service(1, true), vec![Action::StopService { idx: 0 }]);
    // Demoting itself: the device is checked like any demotion's.
    assert_eq!(n.service(0, true), vec![Action::CheckDeviceFree]);
    n.device_free_then_detached();
    let a = n.drain();
    assert!(
        a.iter().any(|x| matches!(
            x,
            Action::Reply {
                to: Origin::Internal,
                result: Ok(_)
            }
        )),
        "{a:?}"
    );
}

#[test]
fn a_service_that_does_not_stop_escalates_and_the_demotion_is_refused() {
    let mut n = N::running(OnDemoteFailure::Reboot);
    n.admin(AdminCmd::Demote);
    let a = n.service(1, false);
    assert_eq!(
        a,
        vec![
            err(AdminError::NotDemoted("db failed to stop".into())),
            Action::Escalate(OnDemoteFailure::Reboot),
        ]
    );
    assert_eq!(n.n.resource().role(), Role::Primary);
    assert_eq!(n.n.promoter().phase(), Phase::StopFailed);
}

#[test]
fn a_start_past_its_deadline_is_aborted_and_counts_as_failed() {
    let mut n = N::attached(OnDemoteFailure::None);
    // `mount` started at 1 ms with 1000 ms to go.
    assert!(n.n.poll_timeout().is_some_and(|t| t <= Instant(1001)));
    n.now = 1001;
    n.n.handle_timeout(Instant(1001));
    assert_eq!(
        n.drain(),
        vec![Action::AbortService, Action::StopService { idx: 0 }]
    );
}

#[test]
fn a_failed_attach_answers_with_the_error_and_starts_no_service() {
    let mut n = N::new(OnDemoteFailure::None);
    n.admin(AdminCmd::Promote { force: false });
    n.n.handle_device_attached(n.at(), AttachOutcome::Failed("no loop device".into()));
    assert_eq!(
        n.drain(),
        vec![err(AdminError::DeviceAttach("no loop device".into()))]
    );
    assert_eq!(n.n.promoter().phase(), Phase::Idle);
}

#[test]
fn a_demotion_while_the_device_is_being_attached_is_refused() {
    let mut n = N::new(OnDemoteFailure::None);
    n.admin(AdminCmd::Promote { force: false });
    assert_eq!(n.n.device(), DeviceState::Attaching);
    n.n.handle_admin(n.at(), Origin::Operator(2), AdminCmd::Demote);
    assert_eq!(
        n.drain(),
        vec![Action::Reply {
            to: Origin::Operator(2),
            result: Err(AdminError::RoleChangeInProgress)
        }]
    );
    assert_eq!(n.n.resource().role(), Role::Primary);
}

#[test]
fn a_stop_stops_the_services_demotes_and_reports_stopped_once_idle() {
    let mut n = N::running(OnDemoteFailure::None);
    n.n.handle_shutdown(n.at(), Instant(10_000));
    assert_eq!(n.drain(), vec![Action::StopService { idx: 1 }]);
    n.service(1, true);
    let a = n.service(0, true);
    assert!(a.contains(&Action::SetWritable(false)), "{a:?}");
    assert!(a.contains(&Action::Stopped { clean: true }), "{a:?}");
    assert_eq!(n.n.resource().role(), Role::Secondary);
    // Commands after the stop are refused.
    assert_eq!(
        n.admin(AdminCmd::Promote { force: false }),
        vec![err(AdminError::Stopping)]
    );
}

#[test]
fn a_stop_with_io_in_flight_gives_up_at_its_deadline() {
    let mut n = N::attached(OnDemoteFailure::None);
    n.service(0, true);
    n.service(1, true);
    // A write whose local completion never comes.
    n.n.handle_app_write(n.at(), ReqId(7), 0, 4096);
    n.drain();
    n.n.handle_shutdown(n.at(), Instant(5_000));
    n.service(1, true);
    let a = n.service(0, true);
    assert!(!a.contains(&Action::Stopped { clean: true }), "{a:?}");
    n.now = 5_000;
    n.n.handle_timeout(Instant(5_000));
    assert!(n.drain().contains(&Action::Stopped { clean: false }));
}

#[test]
fn while_a_switchover_waits_for_the_peer_no_other_role_command_shares_its_answer() {
    let mut n = N::running(OnDemoteFailure::None);
    n.admin(AdminCmd::Switchover);
    n.service(1, true);
    assert_eq!(n.service(0, true), vec![Action::CheckDeviceFree]);
    n.device_free_then_detached();
    assert_eq!(n.drain(), vec![]);
    // The peer has not taken over yet: a promotion here would take the switchover's
    // answer (simulator seed 12649486 A).
    n.n.handle_admin(
        n.at(),
        Origin::Operator(2),
        AdminCmd::Promote { force: false },
    );
    assert_eq!(
        n.drain(),
        vec![Action::Reply {
            to: Origin::Operator(2),
            result: Err(AdminError::RoleChangeInProgress)
        }]
    );
}
