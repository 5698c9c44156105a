//! One core driven by hand through the faults a new user found: a disk that fails a write
//! on either node, a handshake that ends in a refusal with I/O queued, a forced
//! promotion, a witness that refuses or has lost its state, a metadata write that fails.

mod core_support;

use core_support::{
    completed, disk_flush, disk_write, peer_hello, reply, witness_primary, witness_requests, write,
    One,
};
use tandem::core::resource::{
    Action, AdminCmd, AdminError, AdminReply, BufId, IoId, ReqError, ReqId, Role, META_RETRY_MS,
};
use tandem::core::wire::Msg;
use tandem::core::witness::Op;
use tandem::core::{Instant, Protocol};

fn sent(actions: &[Action], pred: impl Fn(&Msg) -> bool) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::Send { msg, .. } if pred(msg)))
}

fn disconnected(actions: &[Action]) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::Disconnect { .. }))
}

fn write_result(actions: &[Action], req: u64) -> Option<Result<(), ReqError>> {
    actions.iter().find_map(|a| match a {
        Action::CompleteWrite { req: r, result } if r.0 == req => Some(*result),
        _ => None,
    })
}

#[test]
fn a_write_the_peers_disk_failed_completes_only_once_the_witness_outdated_the_peer() {
    for protocol in [Protocol::A, Protocol::B, Protocol::C] {
        let mut o = witness_primary(protocol);
        let (io, seq) = write(&mut o, 10);
        if protocol != Protocol::A {
            // Not on the peer yet: not complete in B or C.
            o.r.handle_disk_done(Instant(3), io, true);
            assert!(!completed(&o.drain(), 10), "{protocol:?}");
        }
        o.r.handle_peer_message(Instant(3), 1, Msg::NegAck { seq }, None);
        if protocol == Protocol::A {
            o.r.handle_disk_done(Instant(3), io, true);
        }
        let acts = o.drain();
        if protocol != Protocol::A {
            assert!(
                !completed(&acts, 10),
                "{protocol:?}: a write the peer's disk failed counted as replicated"
            );
        }
        let st = o.r.status();
        assert!(st.out_of_sync_bytes >= 4096, "{protocol:?}: blocks marked");
        assert!(st.suspended, "{protocol:?}: I/O held for the fencing");
        // The peer must be fenced first.
        let asked = witness_requests(&acts);
        assert!(
            asked
                .iter()
                .any(|q| q.op == Op::Outdate && q.peer == "beta"),
            "{protocol:?}: {asked:?}"
        );
        o.r.handle_witness_reply(Instant(4), Some(reply(true, 1, &["alpha"])));
        let acts = o.drain();
        if protocol != Protocol::A {
            assert!(completed(&acts, 10), "{protocol:?}: completes once fenced");
        }
        // A failed peer is never marked up to date again on this connection.
        assert!(
            !witness_requests(&acts).iter().any(|q| q.op == Op::UpToDate),
            "{protocol:?}"
        );
    }
}

/// A secondary connected to a primary peer.
fn secondary() -> One {
    let mut o = One::new(Protocol::C);
    o.finish_meta();
    let size = o.r.data_bytes();
    o.hello_from_peer(size, tandem::core::wire::HELLO_PRIMARY);
    assert_eq!(
        o.r.status().replication,
        tandem::core::resource::Replication::Established
    );
    o.drain();
    o
}

#[test]
fn a_secondary_whose_disk_fails_a_peer_write_is_outdated_at_once_and_stands_alone() {
    let mut o = secondary();
    let buf = BufId(1_000_000);
    let data = Msg::Data {
        seq: 7,
        epoch: 1,
        offset: 8192,
        len: 4096,
    };
    o.r.handle_peer_message(Instant(2), 0, data, Some(buf));
    let io = disk_write(&o.drain(), None).expect("peer write submitted");
    o.r.handle_disk_done(Instant(3), io, false);
    let acts = o.drain();
    assert!(sent(&acts, |m| matches!(m, Msg::NegAck { seq: 7 })));
    assert!(!sent(&acts, |m| matches!(m, Msg::WriteAck { .. })));
    let st = o.r.status();
    assert_eq!(st.disk, tandem::core::resource::DiskState::Outdated);
    assert_eq!(st.connection, tandem::core::resource::Link::Standalone);
    assert_eq!(st.disk_errors, 1);
    assert!(disconnected(&acts));
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("tandemctl connect")),
        "{st:?}"
    );
    // Durably outdated: the superblock says so before anything else is written.
    assert!(acts.iter().any(|a| matches!(a, Action::MetaWrite { .. })));
    assert!(o.r.superblock().has(tandem::core::meta::FLAG_OUTDATED));
    // It is not promoted on this data.
    let e =
        o.r.handle_admin(Instant(4), AdminCmd::Promote { force: false })
            .expect_err("promotion of a failed disk");
    assert!(matches!(e, AdminError::NotUpToDate(_)), "{e}");
}

#[test]
fn a_peer_flush_the_disk_fails_is_never_acknowledged() {
    let mut o = secondary();
    o.r.handle_peer_message(Instant(2), 0, Msg::Barrier { epoch: 1 }, None);
    let io = disk_flush(&o.drain()).expect("peer flush");
    o.r.handle_disk_done(Instant(3), io, false);
    let acts = o.drain();
    assert!(!sent(&acts, |m| matches!(m, Msg::BarrierAck { .. })));
    assert_eq!(
        o.r.status().disk,
        tandem::core::resource::DiskState::Outdated
    );
}

#[test]
fn a_write_the_primarys_disk_fails_gets_eio_is_marked_and_resynced() {
    let mut o = core_support::primary(Protocol::C);
    let (io, seq) = write(&mut o, 10);
    o.r.handle_disk_done(Instant(3), io, false);
    o.r.handle_peer_message(Instant(3), 0, Msg::WriteAck { seq }, None);
    let acts = o.drain();
    assert_eq!(write_result(&acts, 10), Some(Err(ReqError::Io)));
    let st = o.r.status();
    assert!(st.out_of_sync_bytes >= 4096, "{st:?}");
    assert_eq!(st.disk_errors, 1);
    // The replicas may differ there: a new handshake resyncs the blocks from here.
    o.finish_meta();
    assert!(
        disconnected(&o.out),
        "no resync of the failed write's blocks"
    );
    assert!(o.out.iter().any(|a| matches!(a, Action::SetConnect(true))));
}

#[test]
fn io_queued_during_a_handshake_goes_on_when_the_handshake_is_refused() {
    let mut o = core_support::primary(Protocol::C);
    o.r.handle_peer_disconnected(Instant(2), "link down");
    o.finish_meta();
    o.r.handle_peer_connected(Instant(3));
    o.r.handle_app_write(Instant(3), ReqId(20), 0, 4096);
    o.r.handle_app_flush(Instant(3), ReqId(21));
    let st = o.r.status();
    assert_eq!((st.writes_in_flight, st.flushes_in_flight), (1, 1));
    assert!(
        !o.drain()
            .iter()
            .any(|a| matches!(a, Action::DiskWrite { .. })),
        "held while the handshake decides"
    );
    // The peer turns out to be another resource's node: refused.
    let mut hello = peer_hello(o.r.data_bytes(), o.r.generation(), 0);
    if let Msg::Hello(h) = &mut hello {
        h.resource = "other".into();
    }
    o.r.handle_peer_message(Instant(4), 0, hello, None);
    o.finish_meta();
    let io = disk_write(&o.out, Some(BufId(20)))
        .expect("the queued write was submitted after the refusal");
    o.r.handle_disk_done(Instant(5), io, true);
    let flush = disk_flush(&o.drain()).expect("the queued flush went on");
    o.r.handle_disk_done(Instant(6), flush, true);
    let acts = o.drain();
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::CompleteFlush { req, result: Ok(()) } if req.0 == 21)));
}

#[test]
fn a_forced_promotion_takes_a_term_from_the_witness_and_yields_to_a_newer_one() {
    let mut o = One::with(Protocol::C, |p| {
        p.witness = true;
        p.fencing = tandem::core::quorum::Fencing::Resource;
    });
    o.finish_meta();
    // The disk is not up to date: only --force promotes it.
    o.r.handle_admin(Instant(1), AdminCmd::Invalidate)
        .expect("invalidate");
    o.finish_meta();
    let e =
        o.r.handle_admin(Instant(1), AdminCmd::Promote { force: false })
            .expect_err("needs force");
    assert!(matches!(e, AdminError::NotUpToDate(_)));
    let r =
        o.r.handle_admin(Instant(1), AdminCmd::Promote { force: true })
            .expect("forced");
    assert_eq!(
        r,
        AdminReply::Pending,
        "a forced promotion still asks the witness"
    );
    assert_eq!(o.r.role(), Role::Secondary);
    let asked = witness_requests(&o.drain());
    let q = asked.last().expect("asked");
    assert!(q.op == Op::Promote && q.force && !q.uptodate, "{q:?}");
    o.r.handle_witness_reply(Instant(2), Some(reply(true, 1, &["alpha"])));
    o.finish_meta();
    assert_eq!(o.r.role(), Role::Primary);
    assert_eq!(o.r.term(), 1);
    // A write in flight when the node learns of term 2 is failed, not completed.
    o.r.handle_app_write(Instant(3), ReqId(30), 0, 4096);
    o.finish_meta();
    let lease_timer = o.r.poll_timeout().expect("timer");
    o.r.handle_timeout(lease_timer);
    let renew = witness_requests(&o.drain());
    assert!(renew.iter().any(|q| q.op == Op::Renew), "{renew:?}");
    o.r.handle_witness_reply(lease_timer, Some(reply(false, 2, &["beta"])));
    o.finish_meta();
    assert_eq!(o.r.role(), Role::Secondary, "a forced primary yields too");
    assert!(!completed(&o.out, 30));
}

#[test]
fn a_forced_promotion_without_a_witness_answer_promotes_nothing() {
    let mut o = One::with(Protocol::C, |p| {
        p.witness = true;
        p.fencing = tandem::core::quorum::Fencing::Resource;
    });
    o.finish_meta();
    o.r.handle_admin(Instant(1), AdminCmd::Promote { force: true })
        .expect("forced");
    let mut now = Instant(1);
    // The witness never answers; the give-up time passes.
    while !o.out.iter().any(|a| matches!(a, Action::AdminDone(Err(_)))) {
        o.drain();
        o.r.handle_witness_reply(now, None);
        now = now.plus_ms(200);
        if let Some(t) = o.r.poll_timeout() {
            now = now.max(t);
            o.r.handle_timeout(now);
        }
        o.finish_meta();
        assert!(now.0 < 60_000, "never gave up");
    }
    assert_eq!(o.r.role(), Role::Secondary);
}

#[test]
fn witness_refusals_back_off_and_show_in_status() {
    let mut o = witness_primary(Protocol::C);
    o.drain();
    // Renewals refused (say, a restarted witness in its grace period): the next request
    // waits, longer each time, up to a third of the lease.
    let mut now = Instant(10);
    let mut sent_at = Vec::new();
    while sent_at.len() < 6 {
        now = now.max(o.r.poll_timeout().expect("a timer"));
        o.r.handle_timeout(now);
        if witness_requests(&o.drain()).is_empty() {
            continue;
        }
        sent_at.push(now.0);
        o.r.handle_witness_reply(now, Some(reply(false, 1, &["alpha", "beta"])));
        assert!(
            witness_requests(&o.drain()).is_empty(),
            "asked again at once"
        );
    }
    let gaps: Vec<u64> = sent_at.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps, vec![200, 400, 666, 666, 666], "lease 2000 ms");
    let st = o.r.status();
    assert!(st.degraded, "a refusing witness degrades the pair");
    assert!(
        st.witness
            .problem
            .as_deref()
            .is_some_and(|p| p.contains("Renew")),
        "{:?}",
        st.witness
    );
    // Granted again: the problem clears.
    loop {
        now = now.max(o.r.poll_timeout().expect("a timer"));
        o.r.handle_timeout(now);
        if !witness_requests(&o.drain()).is_empty() {
            break;
        }
    }
    o.r.handle_witness_reply(now, Some(reply(true, 1, &["alpha", "beta"])));
    let st = o.r.status();
    assert!(!st.degraded && st.witness.problem.is_none(), "{st:?}");
}

#[test]
fn a_witness_behind_the_pairs_term_is_reported_and_adopted() {
    let mut o = witness_primary(Protocol::C);
    o.drain();
    // A new witness: term 0, knows nothing.
    let due = o.r.poll_timeout().expect("timer");
    o.r.handle_timeout(due);
    o.drain();
    let mut behind = reply(false, 0, &[]);
    behind.primary = String::new();
    o.r.handle_witness_reply(due, Some(behind));
    let st = o.r.status();
    assert!(
        st.witness
            .problem
            .as_deref()
            .is_some_and(|p| p.contains("adopt-witness")),
        "{:?}",
        st.witness
    );
    assert_eq!(o.r.term(), 1, "the pair's term never goes back");
    // Adopt: the request carries the pair's term, this node as primary, the peer.
    let r =
        o.r.handle_admin(due, AdminCmd::AdoptWitness { force: false })
            .expect("adopt");
    assert_eq!(r, AdminReply::Pending);
    let mut now = due;
    let mut adopt = None;
    while adopt.is_none() {
        now = now.max(o.r.poll_timeout().expect("timer"));
        o.r.handle_timeout(now);
        adopt = witness_requests(&o.drain())
            .into_iter()
            .find(|q| q.op == Op::Adopt);
        assert!(now.0 < 10_000, "adopt never asked");
    }
    let q = adopt.expect("adopt");
    assert!(q.term == 1 && q.primary && q.peer == "beta", "{q:?}");
    o.r.handle_witness_reply(now, Some(reply(true, 1, &["alpha", "beta"])));
    assert!(o
        .drain()
        .iter()
        .any(|a| matches!(a, Action::AdminDone(Ok(())))));
    // Without the peer it needs --force.
    o.r.handle_peer_disconnected(now, "gone");
    let e =
        o.r.handle_admin(now, AdminCmd::AdoptWitness { force: false })
            .expect_err("no peer");
    assert_eq!(e, AdminError::AdoptNeedsPeer);
}

#[test]
fn a_failed_metadata_write_holds_io_and_is_written_again() {
    let mut o = core_support::primary(Protocol::C);
    o.drain();
    // A write to a new extent needs an activity-log transaction first.
    o.r.handle_app_write(Instant(10), ReqId(40), 64 << 20 >> 1, 4096);
    let (io, bytes) = o
        .drain()
        .iter()
        .find_map(|a| match a {
            Action::MetaWrite { io, bytes, .. } => Some((*io, bytes.clone())),
            _ => None,
        })
        .expect("AL transaction");
    o.r.handle_disk_done(Instant(11), io, false);
    let acts = o.drain();
    assert!(
        !acts.iter().any(|a| matches!(a, Action::DiskWrite { .. })),
        "the write went on without its activity-log transaction on disk"
    );
    assert!(!acts.iter().any(|a| matches!(a, Action::MetaWrite { .. })));
    o.r.handle_timeout(Instant(11).plus_ms(META_RETRY_MS - 1));
    assert!(
        !o.drain()
            .iter()
            .any(|a| matches!(a, Action::MetaWrite { .. })),
        "retried before its time"
    );
    o.r.handle_timeout(Instant(11).plus_ms(META_RETRY_MS));
    let again = o
        .drain()
        .iter()
        .find_map(|a| match a {
            Action::MetaWrite { io, bytes, .. } => Some((*io, bytes.clone())),
            _ => None,
        })
        .expect("written again");
    assert_eq!(again.1, bytes);
    o.r.handle_disk_done(Instant(1100), again.0, true);
    o.finish_meta();
    assert!(o
        .out
        .iter()
        .any(|a| matches!(a, Action::DiskWrite { buf, .. } if *buf == BufId(40))));
    assert_eq!(o.r.status().last_error, None);
    let _ = IoId(0);
}

/// A node asked to promote at 10 ms, refused by the witness because beta's lease runs
/// 37 ms more.
fn promotion_waiting_for_a_lease() -> One {
    let mut o = One::with(Protocol::C, |p| {
        p.witness = true;
        p.fencing = tandem::core::quorum::Fencing::Resource;
    });
    o.finish_meta();
    o.r.handle_admin(Instant(10), AdminCmd::Promote { force: false })
        .expect("promote");
    o.drain();
    let mut busy = reply(false, 1, &["alpha", "beta"]);
    busy.primary = "beta".into();
    busy.lease_ms = 37;
    o.r.handle_witness_reply(Instant(10), Some(busy));
    o
}

#[test]
fn a_promotion_refused_for_a_running_lease_is_asked_again_when_it_ends() {
    let mut o = promotion_waiting_for_a_lease();
    assert!(
        witness_requests(&o.drain()).is_empty(),
        "asked again at once"
    );
    let mut now = Instant(10);
    loop {
        now = now.max(o.r.poll_timeout().expect("a timer"));
        o.r.handle_timeout(now);
        if witness_requests(&o.drain())
            .iter()
            .any(|q| q.op == Op::Promote)
        {
            break;
        }
        assert!(now.0 < 1000, "never asked again");
    }
    assert_eq!(
        now.ms_since(Instant(10)),
        38,
        "asked again right after the lease"
    );
}

/// Both nodes crashed as primaries of the same generation, but the witness fenced this
/// one (outdated) before the other's promotion: the up-to-date peer is the sync source,
/// whatever the crashed-primary tie-break says (simulator seed 90002467 C resynced an
/// outdated node onto an up-to-date one and left it outdated).
#[test]
fn an_outdated_crashed_primary_becomes_the_sync_target_of_an_up_to_date_peer() {
    use tandem::core::meta::{FLAG_CRASHED_PRIMARY, FLAG_OUTDATED};
    use tandem::core::resource::Conn;
    let mut o = One::with_sb(
        Protocol::C,
        |_| {},
        |sb| {
            sb.set(FLAG_OUTDATED, true);
            sb.set(FLAG_CRASHED_PRIMARY, true);
        },
    );
    o.finish_meta();
    // "alpha" sorts first and would win the tie between two crashed primaries.
    let size = o.r.data_bytes();
    o.hello_from_peer(size, tandem::core::wire::HELLO_CRASHED_PRIMARY);
    o.finish_meta();
    assert!(
        matches!(
            o.r.conn(),
            Conn::WfBitmap { source: false }
                | Conn::SyncStarting { source: false }
                | Conn::SyncTarget
        ),
        "{:?}",
        o.r.conn()
    );
}

/// A promotion waiting for the primary's lease to end is dropped once the node is
/// connected to that primary again: it acknowledges the primary's writes now, and asking
/// the witness for itself too would vote for both (simulator seed 95000841 C).
#[test]
fn a_waiting_promotion_is_dropped_once_the_primary_is_connected_again() {
    let mut o = promotion_waiting_for_a_lease();
    o.drain();
    // The primary is back before its lease ends.
    let size = o.r.data_bytes();
    o.hello_from_peer(size, tandem::core::wire::HELLO_PRIMARY);
    o.finish_meta();
    let mut now = Instant(10);
    let mut asked = Vec::new();
    while now.0 < 1000 {
        now = now.max(o.r.poll_timeout().expect("a timer"));
        o.r.handle_timeout(now);
        asked.extend(witness_requests(&o.drain()));
        now = now.plus_ms(1);
    }
    assert!(
        !asked.iter().any(|q| q.op == Op::Promote),
        "asked for promotion while the primary is connected: {asked:?}"
    );
    assert!(o.out.iter().any(|a| matches!(
        a,
        Action::AdminDone(Err(tandem::core::resource::AdminError::PeerIsPrimary))
    )));
}
