//! One core driven by hand as a shell would: acknowledgement accounting per protocol,
//! refusals, the `fence-peer` step before a `fencing = "stonith"` promotion, and the
//! handover after services failed to start, and the flush a demotion runs first.

use tandem::core::quorum::Fencing;
use tandem::core::resource::{Action, AdminCmd, AdminError, AdminReply, IoId, ReqId, Role};
use tandem::core::wire::{Msg, HELLO_PRIMARY};
use tandem::core::{Instant, Protocol};

mod core_support;

use core_support::{completed, peer_hello, primary, write, One};

#[test]
fn protocol_a_completes_after_local_disk_only() {
    let mut o = primary(Protocol::A);
    let (io, _) = write(&mut o, 10);
    o.r.handle_disk_done(Instant(3), io, true);
    assert!(completed(&o.drain(), 10));
}

#[test]
fn protocol_b_waits_for_receipt() {
    let mut o = primary(Protocol::B);
    let (io, seq) = write(&mut o, 10);
    o.r.handle_disk_done(Instant(3), io, true);
    assert!(
        !completed(&o.drain(), 10),
        "B must wait for the peer's receipt"
    );
    o.r.handle_peer_message(Instant(4), 0, Msg::RecvAck { seq }, None);
    assert!(completed(&o.drain(), 10));
}

#[test]
fn protocol_c_waits_for_peer_disk_and_local_disk() {
    let mut o = primary(Protocol::C);
    let (io, seq) = write(&mut o, 10);
    o.r.handle_peer_message(Instant(3), 0, Msg::RecvAck { seq }, None);
    o.r.handle_peer_message(Instant(3), 0, Msg::WriteAck { seq }, None);
    assert!(
        !completed(&o.drain(), 10),
        "C must wait for the local disk too"
    );
    o.r.handle_disk_done(Instant(4), io, true);
    assert!(completed(&o.drain(), 10));
}

#[test]
fn protocol_c_completes_locally_when_peer_is_lost_and_marks_out_of_sync() {
    let mut o = primary(Protocol::C);
    let (io, _) = write(&mut o, 10);
    o.r.handle_disk_done(Instant(3), io, true);
    assert!(!completed(&o.drain(), 10));
    o.r.handle_peer_disconnected(Instant(4), "test");
    assert!(completed(&o.drain(), 10));
    assert_eq!(o.r.status().out_of_sync_bytes, 4096);
}

/// The epoch of the barrier sent to the peer and the local flush a flush issued.
fn barrier_and_flush(acts: &[Action]) -> (u64, IoId) {
    let epoch = acts
        .iter()
        .find_map(|a| match a {
            Action::Send {
                msg: Msg::Barrier { epoch },
                ..
            } => Some(*epoch),
            _ => None,
        })
        .expect("barrier sent");
    let flush_io = acts
        .iter()
        .find_map(|a| match a {
            Action::DiskFlush { io } => Some(*io),
            _ => None,
        })
        .expect("local flush issued");
    (epoch, flush_io)
}

#[test]
fn flush_waits_for_barrier_ack_in_c_but_not_in_a() {
    for (protocol, needs_peer) in [(Protocol::A, false), (Protocol::C, true)] {
        let mut o = primary(protocol);
        let (io, seq) = write(&mut o, 10);
        o.r.handle_disk_done(Instant(3), io, true);
        o.r.handle_peer_message(Instant(3), 0, Msg::WriteAck { seq }, None);
        o.drain();
        o.r.handle_app_flush(Instant(4), ReqId(11));
        let (epoch, flush_io) = barrier_and_flush(&o.drain());
        o.r.handle_disk_done(Instant(5), flush_io, true);
        let done = |acts: &[Action]| {
            acts.iter()
                .any(|a| matches!(a, Action::CompleteFlush { req, .. } if req.0 == 11))
        };
        assert_eq!(done(&o.drain()), !needs_peer, "{protocol:?}");
        if needs_peer {
            o.r.handle_peer_message(Instant(6), 0, Msg::BarrierAck { epoch }, None);
            assert!(done(&o.drain()), "C flush completes on the barrier ack");
        }
    }
}

#[test]
fn secondary_refuses_writes_and_promote_refused_while_peer_primary() {
    let mut o = One::new(Protocol::C);
    o.finish_meta();
    o.r.handle_app_write(Instant(1), ReqId(5), 0, 4096);
    assert!(o
        .drain()
        .iter()
        .any(|a| matches!(a, Action::CompleteWrite { result: Err(_), .. })));
    o.r.handle_peer_connected(Instant(1));
    let gen = o.r.generation();
    o.r.handle_peer_message(
        Instant(1),
        0,
        peer_hello(o.r.data_bytes(), gen, HELLO_PRIMARY),
        None,
    );
    let err =
        o.r.handle_admin(Instant(2), AdminCmd::Promote { force: false })
            .unwrap_err();
    assert!(err.to_string().contains("peer is primary"), "{err}");
}

#[test]
fn size_mismatch_is_refused_with_a_clear_error() {
    let mut o = One::new(Protocol::C);
    o.finish_meta();
    let size = o.r.data_bytes() + 4096;
    o.hello_from_peer(size, 0);
    let acts = o.drain();
    assert!(acts.iter().any(
        |a| matches!(a, Action::Disconnect { reason } if reason.contains("sizes must match"))
    ));
    assert_ne!(
        o.r.status().replication,
        tandem::core::resource::Replication::Established
    );
}

/// The fence-peer runs the core asked for, and the admin outcomes it reported.
fn fence_runs_and_outcomes(acts: &[Action]) -> (usize, Vec<Result<(), AdminError>>) {
    let runs = acts
        .iter()
        .filter(|a| matches!(a, Action::FencePeer { .. }))
        .count();
    let done = acts
        .iter()
        .filter_map(|a| match a {
            Action::AdminDone(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    (runs, done)
}

#[test]
fn stonith_promotion_waits_for_the_fence_peer_handler() {
    let mut o = One::with(Protocol::C, |p| p.fencing = Fencing::Stonith);
    o.finish_meta();
    // Peer not connected: the handler runs first, and exit 5 (unreachable) refuses.
    let r =
        o.r.handle_admin(Instant(1), AdminCmd::Promote { force: false });
    assert!(matches!(r, Ok(AdminReply::Pending)), "{r:?}");
    assert_eq!(fence_runs_and_outcomes(&o.drain()), (1, vec![]));
    assert_eq!(o.r.role(), Role::Secondary);
    o.r.handle_fence_peer_done(Instant(2), Some(5));
    let (runs, done) = fence_runs_and_outcomes(&o.drain());
    assert_eq!(runs, 0);
    assert!(
        matches!(&done[..], [Err(AdminError::FencePeer(e))] if e.contains("unreachable")),
        "{done:?}"
    );
    assert_eq!(o.r.role(), Role::Secondary);
    assert!(o
        .r
        .status()
        .last_error
        .is_some_and(|e| e.contains("fence-peer")));

    // Asked again, it runs again; 7 (fenced) promotes.
    let r =
        o.r.handle_admin(Instant(3), AdminCmd::Promote { force: false });
    assert!(matches!(r, Ok(AdminReply::Pending)), "{r:?}");
    assert_eq!(fence_runs_and_outcomes(&o.drain()), (1, vec![]));
    o.r.handle_fence_peer_done(Instant(4), Some(7));
    assert_eq!(fence_runs_and_outcomes(&o.drain()), (0, vec![Ok(())]));
    assert_eq!(o.r.role(), Role::Primary);
}

#[test]
fn stonith_fences_nothing_while_the_peer_is_connected() {
    let mut o = One::with(Protocol::C, |p| p.fencing = Fencing::Stonith);
    o.finish_meta();
    o.connect_established();
    let r =
        o.r.handle_admin(Instant(2), AdminCmd::Promote { force: false });
    assert!(matches!(r, Ok(AdminReply::Done)), "{r:?}");
    assert_eq!(fence_runs_and_outcomes(&o.drain()).0, 0);
    assert_eq!(o.r.role(), Role::Primary);
}

fn sends_handover(actions: &[Action]) -> bool {
    actions.iter().any(|a| {
        matches!(
            a,
            Action::Send {
                msg: Msg::Handover,
                ..
            }
        )
    })
}

#[test]
fn a_demotion_after_failed_services_asks_a_ready_peer_to_take_over() {
    // Services failed: the demotion hands over. A plain demote does not.
    for (failed, want) in [(true, true), (false, false)] {
        let mut o = primary(Protocol::C);
        o.drain();
        if failed {
            o.r.handle_services(false);
        }
        o.r.handle_admin(Instant(3), AdminCmd::Demote)
            .expect("demote");
        assert_eq!(o.r.role(), Role::Secondary);
        assert_eq!(
            sends_handover(&o.drain()),
            want,
            "services failed: {failed}"
        );
    }
    // Not connected: nobody to ask.
    let mut o = One::new(Protocol::C);
    o.finish_meta();
    o.r.handle_admin(Instant(1), AdminCmd::Promote { force: false })
        .expect("promote");
    o.finish_meta();
    o.drain();
    o.r.handle_services(false);
    o.r.handle_admin(Instant(3), AdminCmd::Demote)
        .expect("demote");
    assert!(!sends_handover(&o.drain()));
}

#[test]
fn a_node_whose_services_failed_declines_a_handover_until_they_start() {
    for (failed, started_since, promoted) in [
        (false, false, true),
        (true, false, false),
        (true, true, true),
    ] {
        let mut o = One::new(Protocol::C);
        o.finish_meta();
        o.connect_established();
        if failed {
            // Primary once, failed, demoted; now secondary again.
            o.r.handle_admin(Instant(1), AdminCmd::Promote { force: false })
                .expect("promote");
            o.finish_meta();
            o.r.handle_services(false);
            o.r.handle_admin(Instant(2), AdminCmd::Demote)
                .expect("demote");
            if started_since {
                o.r.handle_services(true);
            }
        }
        let term = o.r.status().term;
        o.r.handle_peer_message(Instant(3), term, Msg::Handover, None);
        o.finish_meta();
        assert_eq!(
            o.r.role() == Role::Primary,
            promoted,
            "failed {failed}, started since {started_since}"
        );
    }
}

#[test]
fn a_demotion_flushes_completed_writes_first_on_both_disks() {
    let mut o = primary(Protocol::C);
    let (io, seq) = write(&mut o, 10);
    o.r.handle_disk_done(Instant(3), io, true);
    o.r.handle_peer_message(Instant(3), 0, Msg::WriteAck { seq }, None);
    assert!(completed(&o.drain(), 10));

    // Write 10 is complete but on neither disk for sure: the demotion waits for a flush.
    let r =
        o.r.handle_admin(Instant(4), AdminCmd::Demote)
            .expect("demote");
    assert_eq!(r, AdminReply::Pending);
    assert_eq!(o.r.role(), Role::Primary);
    let (epoch, flush_io) = barrier_and_flush(&o.drain());
    o.r.handle_disk_done(Instant(5), flush_io, true);
    o.drain();
    assert_eq!(o.r.role(), Role::Primary, "the peer's flush is still out");
    o.r.handle_peer_message(Instant(6), 0, Msg::BarrierAck { epoch }, None);
    o.finish_meta();
    assert_eq!(o.r.role(), Role::Secondary);
    assert!(
        o.out.iter().any(|a| matches!(a, Action::AdminDone(Ok(())))),
        "demotion answered"
    );
    assert!(
        !o.out
            .iter()
            .any(|a| matches!(a, Action::CompleteFlush { .. })),
        "the demotion's own flush is not the application's"
    );

    // Nothing unflushed: at once.
    let mut o = primary(Protocol::C);
    o.drain();
    let r =
        o.r.handle_admin(Instant(4), AdminCmd::Demote)
            .expect("demote");
    assert_eq!(r, AdminReply::Done);
    assert_eq!(o.r.role(), Role::Secondary);
}
