//! The generation-UUID rule table, one row per rule, checked from both sides.

use tandem::core::uuid::{compare, Generation, Rule, SyncDecision, UuidView, UUID_JUST_CREATED};
use SyncDecision::*;

const NEW: u64 = UUID_JUST_CREATED;

fn v(current: u64, bitmap: u64, history: [u64; 2]) -> UuidView {
    UuidView {
        gen: Generation {
            current,
            bitmap,
            history: [history[0], history[1], 0, 0],
        },
        crashed_primary: false,
        inconsistent: false,
        outdated: false,
        primary: false,
        out_of_sync: false,
    }
}

fn crashed(mut x: UuidView) -> UuidView {
    x.crashed_primary = true;
    x
}
fn inconsistent(mut x: UuidView) -> UuidView {
    x.inconsistent = true;
    x
}
fn outdated(mut x: UuidView) -> UuidView {
    x.outdated = true;
    x
}
fn oos(mut x: UuidView) -> UuidView {
    x.out_of_sync = true;
    x
}
fn primary(mut x: UuidView) -> UuidView {
    x.primary = true;
    x
}

#[test]
fn rule_table() {
    // (local, peer, expected decision for local, rule)
    let rows: Vec<(UuidView, UuidView, SyncDecision, Rule)> = vec![
        (
            v(NEW, 0, [0, 0]),
            v(NEW, 0, [0, 0]),
            NoSync,
            Rule::BothJustCreated,
        ),
        (
            v(NEW, 0, [0, 0]),
            v(0xA0, 0, [0, 0]),
            TargetFullSync,
            Rule::LocalJustCreated,
        ),
        (
            v(0xA0, 0, [0, 0]),
            v(NEW, 0, [0, 0]),
            SourceFullSync,
            Rule::PeerJustCreated,
        ),
        (
            v(0xA0, 0, [0, 0]),
            v(0xA0, 0, [0, 0]),
            NoSync,
            Rule::EqualCurrent,
        ),
        (
            crashed(v(0xA0, 0, [0, 0])),
            v(0xA0, 0, [0, 0]),
            SourceUseBitmap,
            Rule::EqualCurrentLocalCrashed,
        ),
        (
            v(0xA0, 0, [0, 0]),
            crashed(v(0xA0, 0, [0, 0])),
            TargetUseBitmap,
            Rule::EqualCurrentPeerCrashed,
        ),
        // Both crashed as primaries, this one fenced (outdated): the up-to-date peer is
        // the source although the tie would make this side it (seed 90002467 C).
        (
            outdated(crashed(v(0xA0, 0, [0, 0]))),
            crashed(v(0xA0, 0, [0, 0])),
            TargetUseBitmap,
            Rule::EqualCurrentLocalOutdated,
        ),
        (
            crashed(v(0xA0, 0, [0, 0])),
            outdated(v(0xA0, 0, [0, 0])),
            SourceUseBitmap,
            Rule::EqualCurrentLocalCrashed,
        ),
        (
            v(0xA0, 0, [0, 0]),
            outdated(crashed(v(0xA0, 0, [0, 0]))),
            SourceUseBitmap,
            Rule::EqualCurrentPeerOutdated,
        ),
        // Outdated with nothing to resync: the handshake just clears the flag.
        (
            outdated(v(0xA0, 0, [0, 0])),
            v(0xA0, 0, [0, 0]),
            NoSync,
            Rule::EqualCurrent,
        ),
        (
            inconsistent(v(0xA0, 0, [0, 0])),
            v(0xA0, 0, [0, 0]),
            TargetUseBitmap,
            Rule::EqualCurrentLocalInconsistent,
        ),
        (
            v(0xA0, 0, [0, 0]),
            inconsistent(v(0xA0, 0, [0, 0])),
            SourceUseBitmap,
            Rule::EqualCurrentPeerInconsistent,
        ),
        (
            oos(v(0xA0, 0, [0, 0])),
            v(0xA0, 0, [0, 0]),
            SourceUseBitmap,
            Rule::EqualCurrentOutOfSync,
        ),
        (
            v(0xA0, 0, [0, 0]),
            oos(v(0xA0, 0, [0, 0])),
            TargetUseBitmap,
            Rule::EqualCurrentOutOfSync,
        ),
        (
            primary(v(0xA0, 0, [0, 0])),
            oos(v(0xA0, 0, [0, 0])),
            SourceUseBitmap,
            Rule::EqualCurrentOutOfSync,
        ),
        (
            oos(v(0xA0, 0, [0, 0])),
            primary(v(0xA0, 0, [0, 0])),
            TargetUseBitmap,
            Rule::EqualCurrentOutOfSync,
        ),
        (
            v(0xA0, 0, [0, 0]),
            v(0xB0, 0xA0, [0, 0]),
            TargetUseBitmap,
            Rule::BitmapPeer,
        ),
        (
            v(0xB0, 0xA0, [0, 0]),
            v(0xA0, 0, [0, 0]),
            SourceUseBitmap,
            Rule::BitmapLocal,
        ),
        (
            v(0xA0, 0, [0, 0]),
            v(0xC0, 0xB0, [0xA0, 0]),
            TargetFullSync,
            Rule::HistoryPeer,
        ),
        (
            v(0xC0, 0xB0, [0xA0, 0]),
            v(0xA0, 0, [0, 0]),
            SourceFullSync,
            Rule::HistoryLocal,
        ),
        (
            v(0xB0, 0xA0, [0, 0]),
            v(0xC0, 0xA0, [0, 0]),
            SplitBrain,
            Rule::EqualBitmap,
        ),
        (
            v(0xB0, 0, [0xA0, 0]),
            v(0xC0, 0, [0xA0, 0]),
            SplitBrain,
            Rule::SharedHistory,
        ),
        (
            inconsistent(v(0xB0, 0, [0, 0])),
            v(0xC0, 0, [0, 0]),
            TargetFullSync,
            Rule::LocalInconsistent,
        ),
        (
            v(0xB0, 0, [0, 0]),
            v(0xC0, 0, [0, 0]),
            Unrelated,
            Rule::NothingShared,
        ),
    ];
    for (i, (local, peer, want, rule)) in rows.iter().enumerate() {
        let got = compare(local, peer, true);
        assert_eq!(
            got,
            (*want, *rule),
            "row {i}: local {local:?} peer {peer:?}"
        );
        // The peer, comparing the other way round, must reach the mirrored decision.
        let back = compare(peer, local, false);
        assert_eq!(
            back.0,
            want.mirror(),
            "row {i} seen from the peer: {back:?}"
        );
    }
}

#[test]
fn both_crashed_primaries_tie_is_broken_consistently() {
    let a = crashed(v(0xA0, 0, [0, 0]));
    let (d1, _) = compare(&a, &a, true);
    let (d2, _) = compare(&a, &a, false);
    assert_eq!(d1, SourceUseBitmap);
    assert_eq!(d2, d1.mirror());
}

#[test]
fn new_current_moves_old_uuid_to_bitmap_then_history() {
    let mut g = Generation {
        current: 0xA0,
        bitmap: 0,
        history: [0; 4],
    };
    g.new_current(0x1000);
    assert_eq!(g.bitmap, 0xA0);
    let c1 = g.current;
    assert_ne!(c1, 0xA0);
    g.new_current(0x2000);
    assert_eq!(g.bitmap, 0xA0, "bitmap keeps counting from the older point");
    assert_eq!(g.history[0], c1);
    g.clear_bitmap();
    assert_eq!(g.bitmap, 0);
    assert_eq!(g.history[0], 0xA0);
    // A just-created device's placeholder never enters the history.
    let mut n = Generation::just_created();
    n.new_current(0x3000);
    assert_eq!(n.bitmap, 0);
    assert_ne!(n.current, UUID_JUST_CREATED);
}
