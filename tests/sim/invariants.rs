//! What must hold: the application's model of its writes and flushes, the invariants
//! checked at every step, and the end state after healing.

use super::*;

/// The application's view: what was written where, and what a completed flush covers.
#[derive(Default)]
pub(super) struct Model {
    /// Per block: write ids in issue order.
    pub(super) history: BTreeMap<u64, Vec<u64>>,
    /// Per block: index into `history` of the newest write covered by a completed flush.
    pub(super) flushed: BTreeMap<u64, usize>,
    pub(super) writes: HashMap<u64, (u64, u64)>, // id -> (first block, blocks)
    pub(super) completed_unflushed: Vec<u64>,
    /// Protocol C: per block, the newest completed write (index into `history`, plus 1)
    /// and when it completed. It is on the peer's disk then, if not yet durable.
    pub(super) acked: BTreeMap<u64, (usize, u64)>,
    pub(super) flush_covers: HashMap<u64, Vec<u64>>,
}

impl Sim {
    pub(super) fn check_invariant_1(&mut self, i: usize, what: &str) {
        let term = self.res(i).map_or(0, |r| r.term());
        let (granted, at) = self.granted;
        if self.witness.is_some() && term < granted && self.violation.is_none() {
            self.violation = Some(format!(
                "invariant 1: node {i} completed a {what} in term {term} at {}, after term {granted} was granted at {at}",
                self.now
            ));
        }
    }

    /// Invariant 2, when node `i` completes a flush (B and C, with a witness): every write
    /// it covers is durable on this node's disk, and on the peer's unless the witness no
    /// longer counts the peer as up to date or the peer's disk is durably inconsistent
    /// (either way it can never be promoted to lose it).
    pub(super) fn check_invariant_2(&mut self, i: usize, covers: &[u64]) {
        let Some(w) = self.witness.as_ref() else {
            return;
        };
        if self.protocol == Protocol::A || self.violation.is_some() {
            return;
        }
        let peer = 1 - i;
        let peer_name = self.nodes[peer].name.clone();
        let peer_counts = w
            .core
            .state()
            .get("r0")
            .is_none_or(|st| st.up_to_date.is_empty() || st.up_to_date.contains(&peer_name));
        let sb_at = self.layout.superblock_offset as usize;
        let peer_consistent = Superblock::decode(
            &self.nodes[peer].disk.durable[sb_at..sb_at + 4096],
            self.layout.superblock_offset,
        )
        .is_ok_and(|sb| sb.has(meta::FLAG_CONSISTENT));
        for n in [i, peer] {
            if n == peer && !(peer_counts && peer_consistent) {
                continue;
            }
            for &wr in covers {
                let (first, count) = self.model.writes[&wr];
                for b in first..first + count {
                    let h = &self.model.history[&b];
                    let idx = h.iter().position(|&x| x == wr).expect("write in history");
                    let got = read_stamp(&self.nodes[n].disk.durable[(b * BLOCK) as usize..]);
                    if !h[idx..].contains(&got) {
                        self.violation = Some(format!(
                            "invariant 2: node {i} completed a flush at {} covering write {wr}, but block {b} on node {n}'s disk holds {got}",
                            self.now
                        ));
                        return;
                    }
                }
            }
        }
    }

    /// Invariant 4, at the moment a node takes over: its data is up to date, and in B and
    /// C it holds every write a completed flush covered; in C also every write completed
    /// since it last crashed (a completed C write is on the peer's disk, if only in its
    /// cache: invariant 2 for acknowledged writes).
    pub(super) fn check_invariant_4(&mut self, i: usize) {
        if self.witness.is_none() || self.violation.is_some() {
            return;
        }
        let Some(r) = self.res(i) else {
            return;
        };
        if r.disk_state() != DiskState::UpToDate {
            self.violation = Some(format!(
                "invariant 4: node {i} promoted with disk {:?}",
                r.disk_state()
            ));
            return;
        }
        if self.protocol == Protocol::A {
            return;
        }
        let view = self.nodes[i].disk.view();
        for (&blk, &(acked, at)) in &self.model.acked {
            let h = &self.model.history[&blk];
            let got = read_stamp(&view[(blk * BLOCK) as usize..]);
            if at > self.last_crash[i] && !h[acked - 1..].contains(&got) {
                self.violation = Some(format!(
                    "invariant 2: node {i} promoted at {} without write {} of block {blk}, completed in C at {at} (has {got})",
                    self.now,
                    h[acked - 1]
                ));
                return;
            }
        }
        for (&blk, &flushed) in &self.model.flushed {
            let h = &self.model.history[&blk];
            let got = read_stamp(&view[(blk * BLOCK) as usize..]);
            if !h[flushed - 1..].contains(&got) {
                self.violation = Some(format!(
                    "invariant 4: node {i} promoted at {} without flushed write {} of block {blk} (has {got})",
                    self.now,
                    h[flushed - 1]
                ));
                return;
            }
        }
    }

    /// Both nodes connected, idle, without out-of-sync blocks, and each seeing its peer
    /// up to date.
    pub(super) fn pair_in_sync(&self) -> bool {
        self.nodes.iter().all(|n| {
            n.node.as_ref().map(Node::resource).is_some_and(|r| {
                r.conn() == Conn::Established
                    && r.is_idle()
                    && r.bitmap().count() == 0
                    && r.status().peer.disk == DiskState::UpToDate
            })
        })
    }

    pub(super) fn give_up_after(&self, deadline: u64) -> Result<(), String> {
        if self.now <= deadline {
            return Ok(());
        }
        let st: Vec<_> = self
            .nodes
            .iter()
            .map(|n| {
                n.node
                    .as_ref()
                    .map(Node::resource)
                    .map(|r| (r.status(), r.is_idle()))
            })
            .collect();
        Err(format!("no convergence after healing: {st:#?}"))
    }

    pub(super) fn check(&mut self) -> Result<(), String> {
        for n in &self.nodes {
            let r = n
                .node
                .as_ref()
                .map(Node::resource)
                .ok_or("node down after heal")?;
            let st = r.status();
            if st.split_brain {
                return Err(format!("split brain on {}", n.name));
            }
            if r.disk_state() != tandem::core::resource::DiskState::UpToDate {
                return Err(format!(
                    "{} not up to date: {:?}: {:?}",
                    n.name,
                    r.disk_state(),
                    r.status()
                ));
            }
        }
        let data = self.layout.data_bytes as usize;
        let a = self.nodes[0].disk.view();
        let b = self.nodes[1].disk.view();
        if a[..data] != b[..data] {
            let blk = (0..data / BLOCK as usize)
                .find(|&k| a[k * 4096..(k + 1) * 4096] != b[k * 4096..(k + 1) * 4096])
                .unwrap_or(0);
            return Err(format!(
                "disks differ, first at block {blk}: alpha has write {}, beta has write {}",
                read_stamp(&a[blk * 4096..]),
                read_stamp(&b[blk * 4096..])
            ));
        }
        if self.protocol != Protocol::A {
            for (&blk, &flushed) in &self.model.flushed {
                let h = &self.model.history[&blk];
                let got = read_stamp(&a[(blk * BLOCK) as usize..]);
                let allowed = &h[flushed - 1..];
                if !allowed.contains(&got) {
                    return Err(format!(
                        "block {blk}: flushed write {} lost; disk has write {got} (history {h:?})",
                        h[flushed - 1]
                    ));
                }
            }
        }
        Ok(())
    }
}
