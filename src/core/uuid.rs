//! Generation UUIDs and the rule table that decides who syncs from whom on connect.
//!
//! Follows DRBD's order (see `docs/architecture.md`): both new, one new, equal current,
//! peer's bitmap = my current, my current in the peer's history, equal bitmap UUIDs,
//! shared history, nothing shared.

/// Current UUID of a device that `create-md` just made and nobody ever wrote.
pub const UUID_JUST_CREATED: u64 = 4;

/// Number of history UUIDs kept.
pub const HISTORY_LEN: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Generation {
    pub current: u64,
    /// Current UUID at the moment this node began tracking changes without its peer;
    /// 0 when not tracking.
    pub bitmap: u64,
    pub history: [u64; HISTORY_LEN],
}

impl Generation {
    pub fn just_created() -> Generation {
        Generation {
            current: UUID_JUST_CREATED,
            bitmap: 0,
            history: [0; HISTORY_LEN],
        }
    }

    fn push_history(&mut self, uuid: u64) {
        if uuid == 0 || uuid == UUID_JUST_CREATED {
            return;
        }
        for i in (1..HISTORY_LEN).rev() {
            self.history[i] = self.history[i - 1];
        }
        self.history[0] = uuid;
    }

    /// Start a new data generation (a primary writing without its peer, or promoted alone).
    /// The old current UUID becomes the bitmap UUID, or goes to the history if a bitmap
    /// UUID is already set (the bitmap keeps counting from the older point).
    pub fn new_current(&mut self, fresh: u64) {
        let fresh = fresh & !1 | 0x10; // never 0 or UUID_JUST_CREATED
        if self.current != UUID_JUST_CREATED {
            if self.bitmap == 0 {
                self.bitmap = self.current;
            } else {
                self.push_history(self.current);
            }
        }
        self.current = fresh;
    }

    /// After a completed resync as source: the bitmap is empty again.
    pub fn clear_bitmap(&mut self) {
        if self.bitmap != 0 {
            let b = self.bitmap;
            self.bitmap = 0;
            self.push_history(b);
        }
    }

    fn in_history(&self, uuid: u64) -> bool {
        uuid != 0 && self.history.contains(&uuid)
    }
}

/// What one node knows about itself or its peer when comparing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UuidView {
    pub gen: Generation,
    /// The node was primary and did not demote cleanly: its activity log is out of sync.
    pub crashed_primary: bool,
    /// Its data is not consistent (interrupted sync target, `invalidate`).
    pub inconsistent: bool,
    /// Consistent but outdated: the witness (or a failed write) fenced it.
    pub outdated: bool,
    /// It is primary now.
    pub primary: bool,
    /// Its bitmap marks blocks out of sync.
    pub out_of_sync: bool,
}

/// Outcome of the comparison, from the local node's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDecision {
    NoSync,
    SourceUseBitmap,
    TargetUseBitmap,
    SourceFullSync,
    TargetFullSync,
    SplitBrain,
    Unrelated,
}

impl SyncDecision {
    /// The same decision seen from the peer.
    pub fn mirror(self) -> SyncDecision {
        use SyncDecision::*;
        match self {
            SourceUseBitmap => TargetUseBitmap,
            TargetUseBitmap => SourceUseBitmap,
            SourceFullSync => TargetFullSync,
            TargetFullSync => SourceFullSync,
            d => d,
        }
    }
}

/// The rule that decided, logged as DRBD does (`rule=bitmap-peer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    BothJustCreated,
    LocalJustCreated,
    PeerJustCreated,
    EqualCurrent,
    EqualCurrentLocalCrashed,
    EqualCurrentPeerCrashed,
    EqualCurrentLocalInconsistent,
    EqualCurrentPeerInconsistent,
    EqualCurrentOutOfSync,
    EqualCurrentLocalOutdated,
    EqualCurrentPeerOutdated,
    BitmapPeer,
    BitmapLocal,
    HistoryPeer,
    HistoryLocal,
    EqualBitmap,
    SharedHistory,
    LocalInconsistent,
    PeerInconsistent,
    NothingShared,
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Rule::BothJustCreated => "both-just-created",
            Rule::LocalJustCreated => "local-just-created",
            Rule::PeerJustCreated => "peer-just-created",
            Rule::EqualCurrent => "equal-current",
            Rule::EqualCurrentLocalCrashed => "equal-current-local-crashed-primary",
            Rule::EqualCurrentPeerCrashed => "equal-current-peer-crashed-primary",
            Rule::EqualCurrentLocalInconsistent => "equal-current-local-inconsistent",
            Rule::EqualCurrentPeerInconsistent => "equal-current-peer-inconsistent",
            Rule::EqualCurrentOutOfSync => "equal-current-out-of-sync",
            Rule::EqualCurrentLocalOutdated => "equal-current-local-outdated",
            Rule::EqualCurrentPeerOutdated => "equal-current-peer-outdated",
            Rule::BitmapPeer => "bitmap-peer",
            Rule::BitmapLocal => "bitmap-local",
            Rule::HistoryPeer => "history-peer",
            Rule::HistoryLocal => "history-local",
            Rule::EqualBitmap => "equal-bitmap",
            Rule::SharedHistory => "shared-history",
            Rule::LocalInconsistent => "local-inconsistent",
            Rule::PeerInconsistent => "peer-inconsistent",
            Rule::NothingShared => "nothing-shared",
        }
    }
}

/// Decide who syncs from whom. `tie_local_wins` breaks the symmetric cases (both
/// crashed primaries, or both with out-of-sync bits, with equal UUIDs) so that both
/// sides reach mirrored decisions.
pub fn compare(local: &UuidView, peer: &UuidView, tie_local_wins: bool) -> (SyncDecision, Rule) {
    use SyncDecision::*;
    let (l, p) = (&local.gen, &peer.gen);
    let l_new = l.current == UUID_JUST_CREATED;
    let p_new = p.current == UUID_JUST_CREATED;
    if l_new && p_new {
        return (NoSync, Rule::BothJustCreated);
    }
    if l_new {
        return (TargetFullSync, Rule::LocalJustCreated);
    }
    if p_new {
        return (SourceFullSync, Rule::PeerJustCreated);
    }
    if l.current == p.current {
        // One side outdated (fenced), the other up to date: the up-to-date side is the
        // source, whichever crashed as primary or holds bits. An outdated node holds
        // nothing acknowledged that the other lacks.
        let up_to_date = |x: &UuidView| !x.inconsistent && !x.outdated;
        return match equal_current(local, peer, tie_local_wins) {
            (SourceUseBitmap, _) if local.outdated && up_to_date(peer) => {
                (TargetUseBitmap, Rule::EqualCurrentLocalOutdated)
            }
            (TargetUseBitmap, _) if peer.outdated && up_to_date(local) => {
                (SourceUseBitmap, Rule::EqualCurrentPeerOutdated)
            }
            d => d,
        };
    }
    if p.bitmap != 0 && p.bitmap == l.current {
        return (TargetUseBitmap, Rule::BitmapPeer);
    }
    if l.bitmap != 0 && l.bitmap == p.current {
        return (SourceUseBitmap, Rule::BitmapLocal);
    }
    if p.in_history(l.current) {
        return (TargetFullSync, Rule::HistoryPeer);
    }
    if l.in_history(p.current) {
        return (SourceFullSync, Rule::HistoryLocal);
    }
    // An inconsistent disk has nothing to protect, so it is never a split-brain party:
    // fill it from the consistent one.
    match (local.inconsistent, peer.inconsistent) {
        (true, false) => return (TargetFullSync, Rule::LocalInconsistent),
        (false, true) => return (SourceFullSync, Rule::PeerInconsistent),
        _ => {}
    }
    if l.bitmap != 0 && l.bitmap == p.bitmap {
        return (SplitBrain, Rule::EqualBitmap);
    }
    let shared = [l.bitmap]
        .iter()
        .chain(l.history.iter())
        .any(|&u| u != 0 && (u == p.bitmap || p.in_history(u)));
    if shared {
        return (SplitBrain, Rule::SharedHistory);
    }
    (Unrelated, Rule::NothingShared)
}

/// Equal current UUIDs, before the outdated rule: the crashed primary, the consistent
/// side, or the side with out-of-sync bits is the source.
fn equal_current(local: &UuidView, peer: &UuidView, tie_local_wins: bool) -> (SyncDecision, Rule) {
    use SyncDecision::*;
    match (local.crashed_primary, peer.crashed_primary) {
        (true, false) => (SourceUseBitmap, Rule::EqualCurrentLocalCrashed),
        (false, true) => (TargetUseBitmap, Rule::EqualCurrentPeerCrashed),
        (true, true) if tie_local_wins => (SourceUseBitmap, Rule::EqualCurrentLocalCrashed),
        (true, true) => (TargetUseBitmap, Rule::EqualCurrentPeerCrashed),
        (false, false) => match (local.inconsistent, peer.inconsistent) {
            (true, false) => (TargetUseBitmap, Rule::EqualCurrentLocalInconsistent),
            (false, true) => (SourceUseBitmap, Rule::EqualCurrentPeerInconsistent),
            // The same generation, yet blocks marked out of sync: left over from a
            // handshake that decided a resync and broke before it ran, or a write
            // the peer failed. Resyncing identical blocks costs time; dropping the
            // bits could leave a real difference. The primary, or the side with
            // bits, is the source.
            _ if local.out_of_sync || peer.out_of_sync => {
                let local_source = if local.primary != peer.primary {
                    local.primary
                } else if local.out_of_sync != peer.out_of_sync {
                    local.out_of_sync
                } else {
                    tie_local_wins
                };
                if local_source {
                    (SourceUseBitmap, Rule::EqualCurrentOutOfSync)
                } else {
                    (TargetUseBitmap, Rule::EqualCurrentOutOfSync)
                }
            }
            _ => (NoSync, Rule::EqualCurrent),
        },
    }
}
