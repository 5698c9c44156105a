//! Faults: each seed's fault mix (swarm testing), the fault phases, and the healing
//! after which the pair must converge.

use super::*;

/// One seed's mix of the faults added since the first fault phases (swarm testing): each
/// is on in about half the seeds, at a rate drawn per seed, from a random stream of its
/// own, so that a seed that draws none of them runs as it did before they existed.
pub(super) struct Mix {
    pub(super) rng: SplitMix64,
    /// Per 10,000 stored witness changes: the state write fails.
    pub(super) witness_store_fail: u64,
    /// The pair starts with both disks inconsistent and a `promote --force` through the
    /// witness (witness runs).
    pub(super) force_start: bool,
    /// Per 10,000 disk requests (data writes, flushes, metadata writes): the disk fails
    /// it. A failed write leaves the old block or writes the new one, at random.
    pub(super) disk_error: u64,
    /// Per 10,000 service starts, and stops: it fails.
    pub(super) service_start_fail: u64,
    pub(super) service_stop_fail: u64,
    /// The longest a service start or stop takes, ms (past `SERVICE_TIMEOUT_MS` in some
    /// seeds: then it is aborted and counts as failed).
    pub(super) service_max_ms: u64,
    /// Per 10,000 device checks and detaches: something outside the services holds it.
    pub(super) device_held: u64,
    /// Per 10,000 attaches: no device.
    pub(super) attach_fail: u64,
    /// Both nodes' `on-demote-failure`.
    pub(super) on_demote_failure: OnDemoteFailure,
    /// `fencing = "stonith"` and what its handler does.
    pub(super) stonith: Option<Stonith>,
    /// `preferred-node = alpha` with fail-back: beta hands the role back once in sync.
    pub(super) fail_back: bool,
    /// Per 4,000 steps of the fault phase (witness runs): link flips, crashes, faults
    /// among the three (cuts, isolation, pauses, switchovers, witness crashes). A seed
    /// draws each: some seeds are calm, some are storms.
    pub(super) link_rate: u64,
    pub(super) crash_rate: u64,
    pub(super) three_rate: u64,
    /// Weights of the faults among the three: one-way cuts, isolation, pauses,
    /// switchovers, witness crashes, other operator commands (demote, promote).
    pub(super) kinds: [u64; 6],
    /// Per 10,000 disk requests: a slow one (20-420 ms).
    pub(super) slow_disk: u64,
    /// Cleared when everything heals.
    pub(super) on: bool,
}

/// What a simulated `fence-peer` handler does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stonith {
    /// Powers the peer off, then exits with this code (7: fenced, 4: outdated).
    Fence(i32),
    /// Exits with this code without fencing (3: the peer is inconsistent, 5:
    /// unreachable, 6: the peer is primary, 1: failed); the promotion is refused.
    Exit(i32),
    /// Never exits: killed at its timeout.
    Hang,
}

impl Mix {
    pub(super) fn draw(seed: u64) -> Mix {
        let mut rng = SplitMix64(seed ^ 0x005E_ED0F_FA17);
        let mut rate = |max: u64| {
            if rng.below(2) == 0 {
                0
            } else {
                1 + rng.below(max)
            }
        };
        let witness_store_fail = rate(2000);
        let force_start = rate(1) > 0;
        let disk_error = rate(20);
        let service_start_fail = rate(1500);
        let service_stop_fail = rate(800);
        let service_max_ms = 20 + rate(1500);
        let device_held = rate(3000);
        let attach_fail = rate(1000);
        let on_demote_failure = match rate(4) {
            0 | 1 => OnDemoteFailure::None,
            2 => OnDemoteFailure::Exit,
            3 => OnDemoteFailure::Reboot,
            _ => OnDemoteFailure::Poweroff,
        };
        // (The exit code of a failing handler comes from the seed's parity, not from the
        // stream: seeds found before code 3 was added replay as they were found.)
        let stonith = match rate(6) {
            0 => None,
            1 => Some(Stonith::Fence(7)),
            2 => Some(Stonith::Fence(4)),
            3 => Some(Stonith::Exit(5)),
            4 => Some(Stonith::Exit(6)),
            5 => Some(Stonith::Exit(if seed.is_multiple_of(2) { 1 } else { 3 })),
            _ => Some(Stonith::Hang),
        };
        let fail_back = rate(1) > 0;
        let link_rate = rate(8);
        let crash_rate = rate(3);
        let three_rate = rate(10);
        let mut kinds = [0; 6];
        for k in kinds.iter_mut() {
            *k = rate(4);
        }
        if kinds.iter().all(|&k| k == 0) {
            kinds = [4, 2, 2, 2, 2, 0];
        }
        let slow_disk = rate(100);
        Mix {
            rng,
            witness_store_fail,
            force_start,
            disk_error,
            service_start_fail,
            service_stop_fail,
            service_max_ms,
            device_held,
            attach_fail,
            on_demote_failure,
            stonith,
            fail_back,
            link_rate,
            crash_rate,
            three_rate,
            kinds,
            slow_disk,
            on: true,
        }
    }

    /// None of the added faults: how seeds found before they existed replay.
    pub(super) fn none(seed: u64) -> Mix {
        Mix {
            rng: SplitMix64(seed),
            witness_store_fail: 0,
            force_start: false,
            disk_error: 0,
            service_start_fail: 0,
            service_stop_fail: 0,
            service_max_ms: 20,
            device_held: 0,
            attach_fail: 0,
            on_demote_failure: OnDemoteFailure::None,
            stonith: None,
            fail_back: false,
            link_rate: 4,
            crash_rate: 1,
            three_rate: 4,
            kinds: [4, 2, 2, 2, 2, 0],
            slow_disk: 0,
            on: true,
        }
    }

    pub(super) fn hit(&mut self, per_10k: u64) -> bool {
        self.on && per_10k > 0 && self.rng.below(10_000) < per_10k
    }
}

impl Sim {
    pub(super) fn fault_phase(&mut self, steps: u64) {
        if self.witness.is_some() {
            return self.witness_fault_phase(steps);
        }
        for _ in 0..steps {
            match self.rng.below(1000) {
                0..=5 => {
                    self.link_up = !self.link_up;
                    if !self.link_up {
                        self.break_conn("link down");
                    }
                }
                6..=7 => {
                    let i = self.rng.below(2) as usize;
                    self.crash(i);
                }
                8..=400 => self.app_step(),
                _ => {}
            }
            self.advance();
        }
    }

    /// With a witness, faults are rarer: a failover takes a lease and more, and a run
    /// should see several complete, not one long storm.
    pub(super) fn witness_fault_phase(&mut self, steps: u64) {
        for _ in 0..steps {
            let (link, crash, three) =
                (self.mix.link_rate, self.mix.crash_rate, self.mix.three_rate);
            let r = self.rng.below(4000);
            if r < link {
                self.link_up = !self.link_up;
                if !self.link_up {
                    self.break_conn("link down");
                }
            } else if r < link + crash {
                let i = self.rng.below(2) as usize;
                self.crash(i);
            } else if r < link + crash + three {
                self.witness_fault();
            } else if r < 1601 {
                self.app_step();
            }
            self.advance();
            if let Some(v) = &self.violation {
                panic!("{v}");
            }
        }
    }

    /// One fault among the three (witness runs only).
    pub(super) fn witness_fault(&mut self) {
        let total: u64 = self.mix.kinds.iter().sum();
        let mut r = self.rng.below(total);
        let mut kind = 0;
        while r >= self.mix.kinds[kind] {
            r -= self.mix.kinds[kind];
            kind += 1;
        }
        match kind {
            // A one-way cut (or its healing) between any two of the three.
            0 => {
                let a = self.rng.below(3) as usize;
                let b = (a + 1 + self.rng.below(2) as usize) % 3;
                self.cut[a][b] = !self.cut[a][b];
                self.log(|| format!("cut {a}->{b}: {}", self.cut[a][b]));
                self.release_held();
            }
            // Isolate one of the three from both others, or heal all cuts.
            1 => {
                if self.cut.iter().flatten().any(|&c| c) {
                    self.cut = [[false; 3]; 3];
                    self.log(|| "all cuts healed".into());
                    self.release_held();
                } else {
                    let v = self.rng.below(3) as usize;
                    for o in 0..3 {
                        if o != v {
                            self.cut[v][o] = true;
                            self.cut[o][v] = true;
                        }
                    }
                    self.log(|| format!("isolate {v}"));
                }
            }
            // Pause a data node for up to three leases (SIGSTOP).
            2 => {
                let i = self.rng.below(2) as usize;
                if !self.paused(i) && self.nodes[i].node.is_some() {
                    let ms = 50 + self.rng.below(3 * LEASE_MS);
                    self.paused_until[i] = self.now + ms;
                    self.log(|| format!("PAUSE node {i} for {ms} ms"));
                }
            }
            // The operator switches over (the node stops the services first).
            3 => {
                if let Some(p) = self.primary() {
                    self.log(|| format!("switchover asked on node {p}"));
                    let _ = self.admin(p, AdminCmd::Switchover);
                }
            }
            // Other operator commands: demote the primary, or promote a secondary
            // (refused while the other serves).
            5 => {
                let i = self.rng.below(2) as usize;
                let cmd = match self.primary() == Some(i) {
                    true => AdminCmd::Demote,
                    false => AdminCmd::Promote { force: false },
                };
                if self.nodes[i].node.is_some() && !self.paused(i) {
                    let _ = self.admin(i, cmd);
                }
            }
            // Crash the witness; it restarts from its state file.
            _ => {
                if let Some(w) = self.witness.as_mut() {
                    if w.up {
                        w.up = false;
                        w.requests.clear();
                        w.replies.clear();
                        let at = self.now + 10 + self.rng.below(3 * LEASE_MS);
                        self.push(at, Ev::WitnessRestart);
                        self.log(|| "WITNESS crashed".into());
                    }
                }
            }
        }
    }

    /// Heal everything and wait for convergence.
    pub(super) fn heal(&mut self) -> Result<(), String> {
        self.mix.on = false;
        self.link_up = true;
        self.cut = [[false; 3]; 3];
        self.release_held();
        if self.witness.as_ref().is_some_and(|w| !w.up) {
            self.push(self.now, Ev::WitnessRestart);
        }
        let deadline = self.now + 120_000;
        let mut attempt = 0;
        loop {
            for i in 0..2 {
                if self.nodes[i].node.is_none() {
                    self.start(i);
                }
            }
            if let Some(v) = &self.violation {
                return Err(v.clone());
            }
            // A node that stood alone after its disk failed is connected again by the
            // operator once the disk is fixed (a split brain is left for check()).
            for i in 0..2 {
                let alone = self
                    .res(i)
                    .is_some_and(|r| r.conn() == Conn::StandAlone && !r.status().split_brain);
                if alone {
                    let _ = self.admin(
                        i,
                        AdminCmd::Connect {
                            discard_my_data: false,
                        },
                    );
                }
            }
            if self.witness.is_some() {
                let idle = self.app_in_flight == 0
                    && self.admin_waiting.is_empty()
                    && self.held.iter().all(|h| h.is_empty());
                if self.primary().is_none() && idle && !self.paused(0) && !self.paused(1) {
                    // The operator promotes, through the witness; it picks whom. A pair
                    // whose first (forced) promotion never became durable holds no data
                    // yet: the operator forces it again.
                    let i = (self.last_primary + attempt) % 2;
                    attempt += 1;
                    let fresh = self.nodes.iter().all(|n| {
                        n.node.as_ref().map(Node::resource).is_some_and(|r| {
                            r.generation().current == tandem::core::uuid::UUID_JUST_CREATED
                        })
                    });
                    let _ = self.admin(i, AdminCmd::Promote { force: fresh });
                }
                let done = idle
                    && self.primary().is_some()
                    && self.witness.as_ref().is_some_and(|w| w.up)
                    && self.pair_in_sync();
                if done {
                    return Ok(());
                }
                self.give_up_after(deadline)?;
                self.advance();
                continue;
            }
            if self.primary().is_none() {
                let i = self.last_primary;
                if self.admin(i, AdminCmd::Promote { force: false }).is_err() {
                    // A first promotion that crashed before it was persisted leaves a
                    // pair that never held data: the operator forces it again.
                    let fresh = self.res(i).is_some_and(|r| {
                        r.generation().current == tandem::core::uuid::UUID_JUST_CREATED
                    });
                    if fresh {
                        let _ = self.admin(i, AdminCmd::Promote { force: true });
                    }
                }
            }
            if self.app_in_flight == 0 && self.pair_in_sync() && self.queue.is_empty() {
                return Ok(());
            }
            self.give_up_after(deadline)?;
            self.advance();
        }
    }
}
