//! The witness's rules as readable tables, its lease arithmetic, and its state file.

use std::collections::{BTreeMap, BTreeSet};

use tandem::core::witness::{
    decode_state, encode_state, lease_deadline, Op, Reply, Request, ResourceState, StateError,
    Witness,
};
use tandem::core::Instant;

const LEASE: u64 = 2000;

fn req(op: Op, term: u64, peer: &str, uptodate: bool) -> Request {
    Request {
        op,
        resource: "pg".into(),
        term,
        peer: peer.into(),
        uptodate,
        force: false,
        primary: false,
        seq: 0,
    }
}

/// `promote --force`: the node's disk state is not vouched for.
fn forced(term: u64) -> Request {
    Request {
        force: true,
        ..req(Op::Promote, term, "", false)
    }
}

/// `adopt-witness` from a node at `term`; `primary`: it is primary; `peer`: named when
/// it is up to date.
fn adopt(term: u64, primary: bool, peer: &str) -> Request {
    Request {
        primary,
        ..req(Op::Adopt, term, peer, true)
    }
}

/// Handle a request and, as the shell does once the change is on disk, commit it.
fn apply(w: &mut Witness, now: Instant, node: &str, r: &Request) -> Reply {
    let o = w.handle(now, node, r);
    if let Some(staged) = o.persist {
        w.commit(staged);
    }
    o.reply
}

fn state(term: u64, primary: Option<&str>, utd: &[&str]) -> BTreeMap<String, ResourceState> {
    let mut m = BTreeMap::new();
    m.insert(
        "pg".to_string(),
        ResourceState {
            term,
            primary: primary.map(String::from),
            up_to_date: utd.iter().map(|s| s.to_string()).collect(),
        },
    );
    m
}

/// A witness past its start-up grace period, with `pg` in the given state and, if
/// `leased`, the primary's lease running.
fn witness(term: u64, primary: Option<&str>, utd: &[&str], leased: bool) -> (Witness, Instant) {
    let mut w = Witness::new(LEASE, Instant(0), state(term, primary, utd));
    let now = Instant(LEASE + 1);
    if leased {
        let p = primary.expect("a lease needs a primary");
        let r = apply(&mut w, now, p, &req(Op::Renew, term, "", true));
        assert!(r.granted, "setup renew: {r:?}");
    }
    (w, now)
}

#[test]
fn rule_table() {
    // (what, term, primary, up-to-date set, lease running, asking node, request,
    //  granted, term after, persisted)
    #[allow(clippy::type_complexity)]
    let rows: &[(
        &str,
        u64,
        Option<&str>,
        &[&str],
        bool,
        &str,
        Request,
        bool,
        u64,
        bool,
    )] = &[
        (
            "first promotion of a fresh resource",
            0,
            None,
            &[],
            false,
            "alpha",
            req(Op::Promote, 0, "", true),
            true,
            1,
            true,
        ),
        (
            "first promotion needs an up-to-date disk",
            0,
            None,
            &[],
            false,
            "alpha",
            req(Op::Promote, 0, "", false),
            false,
            0,
            false,
        ),
        (
            "promotion refused while the primary's lease runs",
            1,
            Some("alpha"),
            &["alpha", "beta"],
            true,
            "beta",
            req(Op::Promote, 1, "", true),
            false,
            1,
            false,
        ),
        (
            "promotion after the lease expired",
            1,
            Some("alpha"),
            &["alpha", "beta"],
            false,
            "beta",
            req(Op::Promote, 1, "", true),
            true,
            2,
            true,
        ),
        (
            "the primary of record asking again keeps its term",
            4,
            Some("alpha"),
            &["alpha", "beta"],
            true,
            "alpha",
            req(Op::Promote, 3, "", true),
            true,
            4,
            false,
        ),
        (
            "the primary of record after its lease expired keeps its term too",
            4,
            Some("alpha"),
            &["alpha"],
            false,
            "alpha",
            req(Op::Promote, 4, "", true),
            true,
            4,
            false,
        ),
        (
            "an outdated node is never promoted",
            1,
            Some("alpha"),
            &["alpha"],
            false,
            "beta",
            req(Op::Promote, 1, "", true),
            false,
            1,
            false,
        ),
        (
            "a term the witness never granted is refused",
            1,
            Some("alpha"),
            &["alpha"],
            false,
            "beta",
            req(Op::Promote, 7, "", true),
            false,
            1,
            false,
        ),
        (
            "the primary renews its lease",
            3,
            Some("alpha"),
            &["alpha"],
            false,
            "alpha",
            req(Op::Renew, 3, "", true),
            true,
            3,
            false,
        ),
        (
            "a replayed old term is refused",
            3,
            Some("alpha"),
            &["alpha"],
            false,
            "alpha",
            req(Op::Renew, 2, "", true),
            false,
            3,
            false,
        ),
        (
            "a non-primary cannot renew",
            3,
            Some("alpha"),
            &["alpha", "beta"],
            false,
            "beta",
            req(Op::Renew, 3, "", true),
            false,
            3,
            false,
        ),
        (
            "the primary outdates its peer",
            3,
            Some("alpha"),
            &["alpha", "beta"],
            true,
            "alpha",
            req(Op::Outdate, 3, "beta", true),
            true,
            3,
            true,
        ),
        (
            "outdating an already outdated peer changes nothing",
            3,
            Some("alpha"),
            &["alpha"],
            true,
            "alpha",
            req(Op::Outdate, 3, "beta", true),
            true,
            3,
            false,
        ),
        (
            "only the primary may outdate",
            3,
            Some("alpha"),
            &["alpha", "beta"],
            false,
            "beta",
            req(Op::Outdate, 3, "alpha", true),
            false,
            3,
            false,
        ),
        (
            "the primary marks its resynced peer up to date",
            3,
            Some("alpha"),
            &["alpha"],
            true,
            "alpha",
            req(Op::UpToDate, 3, "beta", true),
            true,
            3,
            true,
        ),
        (
            "release clears the primary",
            3,
            Some("alpha"),
            &["alpha", "beta"],
            true,
            "alpha",
            req(Op::Release, 3, "", true),
            true,
            3,
            true,
        ),
        (
            "a forced promotion skips the disk check",
            0,
            None,
            &[],
            false,
            "alpha",
            forced(0),
            true,
            1,
            true,
        ),
        (
            "a forced promotion skips the up-to-date set",
            2,
            None,
            &["beta"],
            false,
            "alpha",
            forced(2),
            true,
            3,
            true,
        ),
        (
            "a forced promotion still waits for the other node's lease",
            2,
            Some("beta"),
            &["beta"],
            true,
            "alpha",
            forced(2),
            false,
            2,
            false,
        ),
        (
            "a forced promotion still needs the current term",
            2,
            None,
            &["beta"],
            false,
            "alpha",
            forced(5),
            false,
            2,
            false,
        ),
        (
            "a new witness adopts the pair's term",
            0,
            None,
            &[],
            false,
            "alpha",
            adopt(7, true, "beta"),
            true,
            7,
            true,
        ),
        (
            "a witness restored from an old copy is raised to the pair's term",
            3,
            Some("beta"),
            &["beta"],
            false,
            "alpha",
            adopt(7, true, ""),
            true,
            7,
            true,
        ),
        (
            "adopt never lowers a term the witness holds",
            9,
            Some("beta"),
            &["beta"],
            false,
            "alpha",
            adopt(7, true, ""),
            false,
            9,
            false,
        ),
        (
            "adopt from a node that never had a term",
            0,
            None,
            &[],
            false,
            "alpha",
            adopt(0, false, ""),
            false,
            0,
            false,
        ),
        (
            "the last term is never granted past",
            u64::MAX,
            None,
            &["alpha"],
            false,
            "alpha",
            req(Op::Promote, u64::MAX, "", true),
            false,
            u64::MAX,
            false,
        ),
        (
            "query always answers",
            3,
            Some("alpha"),
            &["alpha"],
            true,
            "beta",
            req(Op::Query, 0, "", false),
            true,
            3,
            false,
        ),
    ];
    for (what, term, primary, utd, leased, node, r, granted, term_after, persisted) in rows {
        let (mut w, now) = witness(*term, *primary, utd, *leased);
        let o = w.handle(now, node, r);
        assert_eq!(o.reply.granted, *granted, "{what}: {:?}", o.reply);
        assert_eq!(o.reply.term, *term_after, "{what}: term");
        assert_eq!(o.persist.is_some(), *persisted, "{what}: persist");
        // Nothing stored changes before the commit.
        assert_eq!(
            w.state(),
            &state(*term, *primary, utd),
            "{what}: changed early"
        );
        if !*granted {
            assert!(!o.reply.reason.is_empty(), "{what}: a refusal says why");
        }
    }
}

#[test]
fn promotion_after_release_needs_no_lease_wait() {
    let (mut w, now) = witness(1, Some("alpha"), &["alpha", "beta"], true);
    assert!(apply(&mut w, now, "alpha", &req(Op::Release, 1, "", true)).granted);
    let r = apply(&mut w, now, "beta", &req(Op::Promote, 1, "", true));
    assert!(r.granted);
    assert_eq!((r.term, r.primary.as_str()), (2, "beta"));
}

#[test]
fn lease_expires_lease_ms_after_the_witness_received_the_renewal() {
    let (mut w, now) = witness(1, Some("alpha"), &["alpha", "beta"], true);
    let just_before = now.plus_ms(LEASE - 1);
    assert!(!apply(&mut w, just_before, "beta", &req(Op::Promote, 1, "", true)).granted);
    let at = now.plus_ms(LEASE);
    assert!(apply(&mut w, at, "beta", &req(Op::Promote, 1, "", true)).granted);
    // The old primary's term is over: it can neither renew nor fence.
    let r = apply(&mut w, at, "alpha", &req(Op::Renew, 1, "", true));
    assert!(!r.granted && r.term == 2, "{r:?}");
    assert!(!apply(&mut w, at, "alpha", &req(Op::Outdate, 1, "beta", true)).granted);
}

#[test]
fn a_restarted_witness_grants_nothing_for_one_lease() {
    let st = state(4, Some("alpha"), &["alpha", "beta"]);
    let start = Instant(50_000);
    let mut w = Witness::new(LEASE, start, st);
    // rows: (ms after start, op, node, granted)
    let rows = [
        (0, Op::Renew, "alpha", false),
        (LEASE - 1, Op::Promote, "beta", false),
        (LEASE - 1, Op::Renew, "alpha", false),
        (LEASE, Op::Renew, "alpha", true),
    ];
    for (dt, op, node, granted) in rows {
        let r = apply(&mut w, start.plus_ms(dt), node, &req(op, 4, "", true));
        assert_eq!(r.granted, granted, "{op:?} by {node} at +{dt} ms: {r:?}");
    }
}

#[test]
fn node_side_lease_deadline_table() {
    // (sent at, lease ms, max drift per mille, deadline)
    let rows = [
        (0, 2000, 0, 2000),
        (1000, 2000, 0, 3000),
        (1000, 2000, 50, 2900),
        (0, 3000, 100, 2700),
        (0, 2000, 5000, 0),
    ];
    for (sent, lease, drift, want) in rows {
        assert_eq!(
            lease_deadline(Instant(sent), lease, drift),
            Instant(want),
            "sent {sent} lease {lease} drift {drift}"
        );
    }
}

#[test]
fn state_file_round_trips_and_refuses_corruption() {
    let mut st = state(9, Some("alpha"), &["alpha", "beta"]);
    st.insert(
        "mysql".into(),
        ResourceState {
            term: 2,
            primary: None,
            up_to_date: BTreeSet::new(),
        },
    );
    let b = encode_state(&st);
    assert_eq!(decode_state(&b), Ok(st));
    let mut flipped = b.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    assert_eq!(decode_state(&flipped), Err(StateError::Crc));
    assert_eq!(decode_state(&b[..b.len() - 3]), Err(StateError::Malformed));
    assert_eq!(
        decode_state(b"garbage garbage garbage"),
        Err(StateError::Magic)
    );
    let mut v2 = b.clone();
    v2[8] = 2;
    assert_eq!(decode_state(&v2), Err(StateError::Version(2)));
}

#[test]
fn a_change_takes_effect_only_once_committed() {
    let (mut w, now) = witness(0, None, &[], false);
    let o = w.handle(now, "alpha", &req(Op::Promote, 0, "", true));
    assert!(o.reply.granted && o.reply.term == 1, "{:?}", o.reply);
    let staged = o.persist.expect("a promotion is stored");
    // The bytes to write hold the change; the witness does not yet.
    let on_disk = decode_state(&staged.bytes).expect("staged bytes decode");
    assert_eq!(on_disk["pg"].term, 1);
    assert_eq!(w.state()["pg"].term, 0, "changed before the commit");
    // The write failed: the answer is a refusal that names the cause, nothing changed,
    // and no lease runs, so another node is granted the same term 1 (never 2 on top of
    // an unstored 1).
    let r = w.unstored("pg", "state: Read-only file system (os error 30)");
    assert!(
        !r.granted && r.term == 0 && r.reason.contains("Read-only"),
        "{r:?}"
    );
    let o = w.handle(now, "beta", &req(Op::Promote, 0, "", true));
    assert!(o.reply.granted && o.reply.term == 1, "{:?}", o.reply);
    w.commit(o.persist.expect("stored"));
    assert_eq!(w.state()["pg"].term, 1);
    assert_eq!(w.state()["pg"].primary.as_deref(), Some("beta"));
    // Its lease runs only from the commit: alpha is refused now.
    let r = apply(&mut w, now, "alpha", &req(Op::Promote, 1, "", true));
    assert!(!r.granted && r.reason.contains("lease"), "{r:?}");
}

#[test]
fn a_forced_promotion_makes_the_node_the_only_up_to_date_copy() {
    let (mut w, now) = witness(2, None, &["beta"], false);
    let r = apply(&mut w, now, "alpha", &forced(2));
    assert!(r.granted && r.term == 3, "{r:?}");
    assert_eq!(r.up_to_date, vec!["alpha".to_string()]);
    // beta, no longer counted, is not promoted while alpha's lease runs or after.
    let later = now.plus_ms(LEASE + 1);
    let r = apply(&mut w, later, "beta", &req(Op::Promote, 3, "", true));
    assert!(!r.granted && r.reason.contains("up-to-date set"), "{r:?}");
}

#[test]
fn an_adopted_term_lets_the_primary_renew() {
    let (mut w, now) = witness(0, None, &[], false);
    let r = apply(&mut w, now, "alpha", &adopt(5, true, "beta"));
    assert!(r.granted && r.term == 5 && r.primary == "alpha", "{r:?}");
    assert_eq!(r.up_to_date, vec!["alpha".to_string(), "beta".to_string()]);
    assert!(apply(&mut w, now, "alpha", &req(Op::Renew, 5, "", true)).granted);
    // Adopting the same term again is refused: it is the witness's now.
    assert!(!apply(&mut w, now, "beta", &adopt(5, false, "")).granted);
}

#[test]
fn a_promotion_refused_for_a_running_lease_says_how_long_it_runs() {
    let (mut w, now) = witness(1, Some("alpha"), &["alpha", "beta"], true);
    let later = now.plus_ms(1500);
    let r = apply(&mut w, later, "beta", &req(Op::Promote, 1, "", true));
    assert!(!r.granted && r.reason.contains("lease"), "{r:?}");
    assert_eq!(r.lease_ms, LEASE - 1500, "the time left of alpha's lease");
    // Other refusals carry no such time.
    let r = apply(&mut w, later, "beta", &req(Op::Renew, 1, "", true));
    assert!(!r.granted && r.lease_ms == 0, "{r:?}");
}
