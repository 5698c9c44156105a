//! The promoter's ordering and failure rules, one scripted run per row: each step is an
//! input, followed by the actions it must produce.

use tandem::core::promoter::{OnDemoteFailure, Phase, Promoter, PromoterAction, ServiceSpec};
use tandem::core::Instant;
use PromoterAction::*;

#[derive(Debug, Clone, Copy)]
enum In {
    Promoted,
    Stop,
    Ok(usize),
    Fail(usize),
    /// Time passes to this instant.
    At(u64),
}

fn three(policy: OnDemoteFailure) -> Promoter {
    let svc = |name: &str| ServiceSpec {
        name: name.into(),
        start_timeout_ms: 1000,
        stop_timeout_ms: 500,
    };
    Promoter::new(vec![svc("mount"), svc("db"), svc("vip")], policy)
}

/// Feed `steps` and compare the actions after each one.
fn run(p: &mut Promoter, steps: &[(In, Vec<PromoterAction>)]) {
    let mut now = Instant(0);
    for (i, (input, want)) in steps.iter().enumerate() {
        match *input {
            In::Promoted => p.handle_promoted(now),
            In::Stop => p.handle_stop(now),
            In::Ok(idx) => p.handle_done(now, idx, true),
            In::Fail(idx) => p.handle_done(now, idx, false),
            In::At(ms) => {
                now = Instant(ms);
                p.handle_timeout(now);
            }
        }
        let got: Vec<_> = std::iter::from_fn(|| p.poll_action()).collect();
        assert_eq!(&got, want, "step {i}: {input:?}");
    }
}

#[test]
fn starts_in_order_and_stops_in_reverse_before_demoting() {
    let mut p = three(OnDemoteFailure::None);
    run(
        &mut p,
        &[
            (In::Promoted, vec![Start { idx: 0 }]),
            (In::Ok(0), vec![Start { idx: 1 }]),
            (In::Ok(1), vec![Start { idx: 2 }]),
            (In::Ok(2), vec![]),
        ],
    );
    assert_eq!(p.phase(), Phase::Running);
    run(
        &mut p,
        &[
            (In::Stop, vec![Stop { idx: 2 }]),
            (In::Ok(2), vec![Stop { idx: 1 }]),
            (In::Ok(1), vec![Stop { idx: 0 }]),
            (
                In::Ok(0),
                vec![Demote {
                    after_failure: false,
                }],
            ),
        ],
    );
    assert_eq!(p.phase(), Phase::Idle);
}

#[test]
fn failed_start_stops_what_started_then_demotes() {
    let mut p = three(OnDemoteFailure::None);
    run(
        &mut p,
        &[
            (In::Promoted, vec![Start { idx: 0 }]),
            (In::Ok(0), vec![Start { idx: 1 }]),
            // db fails: it is stopped too (it may have half started), then mount.
            (In::Fail(1), vec![Stop { idx: 1 }]),
            (In::Ok(1), vec![Stop { idx: 0 }]),
            (
                In::Ok(0),
                vec![Demote {
                    after_failure: true,
                }],
            ),
        ],
    );
    assert_eq!(p.last_failure(), Some("db failed to start"));
    assert_eq!(p.phase(), Phase::Idle);
}

#[test]
fn a_start_past_its_deadline_counts_as_failed() {
    let mut p = three(OnDemoteFailure::None);
    run(
        &mut p,
        &[
            (In::Promoted, vec![Start { idx: 0 }]),
            (In::At(999), vec![]),
            (In::At(1000), vec![Stop { idx: 0 }]),
            // A late answer to the abandoned start is ignored.
            (
                In::Ok(0),
                vec![Demote {
                    after_failure: true,
                }],
            ),
        ],
    );
    assert_eq!(p.poll_timeout(), None);
    assert!(p
        .last_failure()
        .is_some_and(|f| f.contains("within 1000 ms")));
}

#[test]
fn failed_stop_escalates_and_does_not_demote() {
    for policy in [
        OnDemoteFailure::None,
        OnDemoteFailure::Exit,
        OnDemoteFailure::Reboot,
        OnDemoteFailure::Poweroff,
    ] {
        let mut p = three(policy);
        run(
            &mut p,
            &[
                (In::Promoted, vec![Start { idx: 0 }]),
                (In::Ok(0), vec![Start { idx: 1 }]),
                (In::Ok(1), vec![Start { idx: 2 }]),
                (In::Ok(2), vec![]),
                (In::Stop, vec![Stop { idx: 2 }]),
                (In::Fail(2), vec![Escalate(policy)]),
            ],
        );
        assert_eq!(p.phase(), Phase::StopFailed);
        // Nothing further happens by itself; asked again, it retries the stops.
        run(
            &mut p,
            &[
                (In::At(10_000), vec![]),
                (In::Stop, vec![Stop { idx: 2 }]),
                (In::Ok(2), vec![Stop { idx: 1 }]),
            ],
        );
    }
}

#[test]
fn stop_during_a_start_waits_for_it_then_stops_it() {
    let mut p = three(OnDemoteFailure::None);
    run(
        &mut p,
        &[
            (In::Promoted, vec![Start { idx: 0 }]),
            (In::Ok(0), vec![Start { idx: 1 }]),
            (In::Stop, vec![]),
            (In::Ok(1), vec![Stop { idx: 1 }]),
            (In::Ok(1), vec![Stop { idx: 0 }]),
            (
                In::Ok(0),
                vec![Demote {
                    after_failure: false,
                }],
            ),
        ],
    );
}

#[test]
fn no_services_promote_and_demote_at_once() {
    let mut p = Promoter::new(Vec::new(), OnDemoteFailure::None);
    run(
        &mut p,
        &[
            (In::Promoted, vec![]),
            (
                In::Stop,
                vec![Demote {
                    after_failure: false,
                }],
            ),
        ],
    );
}
