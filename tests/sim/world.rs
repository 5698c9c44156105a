//! The simulated world: the two hosts (a node, its disk and its buffers), the event
//! queue and the clocks; starting, crashing and commanding nodes, and the step loop.

use super::*;

pub(super) struct Host {
    pub(super) name: String,
    pub(super) node: Option<Node>,
    /// The frontend accepts writes (the node said so).
    pub(super) writable: bool,
    /// Numbers the service operations; an abort drops the one in flight.
    pub(super) service_op: u64,
    pub(super) incarnation: u64,
    pub(super) disk: SimDisk,
    pub(super) bufs: HashMap<BufId, Vec<u8>>,
    pub(super) want_connect: bool,
    pub(super) restart_at: Option<u64>,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Ev {
    DiskDone {
        node: usize,
        inc: u64,
        io: u64,
        kind: DiskKind,
    },
    /// The oldest message of a channel (`meta` or data) reaches `to`.
    Deliver {
        to: usize,
        conn: u64,
        meta: bool,
    },
    /// A graceful close reaches the peer after the data sent before it (TCP FIN).
    Close {
        to: usize,
        conn: u64,
    },
    /// A request reaches the witness.
    WitnessArrive {
        from: usize,
        id: u64,
    },
    /// The witness's reply reaches the node.
    WitnessAnswer {
        to: usize,
        inc: u64,
        id: u64,
    },
    /// The node's shell gives up waiting for the witness.
    WitnessTimeout {
        to: usize,
        inc: u64,
        id: u64,
    },
    /// An application request that arrived while the node was paused.
    App {
        node: usize,
        inc: u64,
        req: u64,
        /// `(offset, len)` of a write; `None` for a flush.
        write: Option<(u64, u64)>,
    },
    WitnessRestart,
    /// A device step the node asked for ends.
    Device {
        node: usize,
        inc: u64,
        step: DevStep,
    },
    /// A service's start or stop ends (`op`: its number; an abort dropped it meanwhile
    /// if the node's number moved on).
    Service {
        node: usize,
        inc: u64,
        op: u64,
        idx: usize,
        start: bool,
        ok: bool,
    },
    /// The `fence-peer` handler exits with `code` (`None`: killed at its timeout).
    Fenced {
        node: usize,
        inc: u64,
        code: Option<i32>,
    },
}

#[derive(PartialEq, Eq, PartialOrd, Ord, Debug, Clone, Copy)]
pub(super) enum DevStep {
    Checked { busy: bool },
    Attached { ok: bool },
    Detached { in_use: bool },
}

impl Ev {
    /// The data node that handles the event, if any (a paused node handles nothing).
    pub(super) fn node(&self) -> Option<usize> {
        match self {
            Ev::DiskDone { node, .. }
            | Ev::App { node, .. }
            | Ev::Device { node, .. }
            | Ev::Service { node, .. }
            | Ev::Fenced { node, .. } => Some(*node),
            Ev::Deliver { to, .. }
            | Ev::Close { to, .. }
            | Ev::WitnessAnswer { to, .. }
            | Ev::WitnessTimeout { to, .. } => Some(*to),
            Ev::WitnessArrive { .. } | Ev::WitnessRestart => None,
        }
    }
}

pub(super) struct Sim {
    pub(super) rng: SplitMix64,
    pub(super) mix: Mix,
    pub(super) now: u64,
    pub(super) seq: u64,
    pub(super) queue: BinaryHeap<std::cmp::Reverse<(u64, u64, Ev)>>,
    pub(super) msgs: HashMap<u64, (Msg, Option<Vec<u8>>, u64)>,
    pub(super) nodes: Vec<Host>,
    pub(super) protocol: Protocol,
    pub(super) link_up: bool,
    pub(super) conn: Option<u64>,
    pub(super) next_conn: u64,
    pub(super) chan_last: HashMap<(usize, Channel), u64>,
    /// Messages sent and not yet delivered, per direction and channel, oldest first: a
    /// delivery always hands over the oldest (TCP keeps order within a connection, also
    /// when a cut or a pause held some of them back).
    pub(super) chan_fifo: HashMap<(usize, Channel), VecDeque<u64>>,
    pub(super) next_req: u64,
    pub(super) model: Model,
    pub(super) app_in_flight: usize,
    pub(super) req_node: HashMap<u64, usize>,
    pub(super) trace: bool,
    pub(super) layout: Layout,
    /// The node holding the newest data: the only one that may be promoted when no node
    /// is primary (without a witness, nothing else would stop a stale promotion).
    pub(super) last_primary: usize,
    pub(super) witness: Option<WitnessSim>,
    /// `cut[a][b]`: nothing from a reaches b (0, 1 data nodes, `W` the witness).
    pub(super) cut: [[bool; 3]; 3],
    /// Peer messages waiting behind a cut direction, in order (TCP stalls, it does not
    /// drop).
    pub(super) held: [VecDeque<Ev>; 2],
    pub(super) clock: [(u64, i64); 2],
    pub(super) paused_until: [u64; 2],
    /// When each data node last lost what it held of completed, unflushed writes: it
    /// crashed (its disk cache), or was a sync target (the source may be a crashed
    /// primary whose own cache lost them: the resync rolls both back to what it has,
    /// which the contract allows for writes no flush covered).
    pub(super) last_crash: [u64; 2],
    /// Witness requests in flight: id -> (node, incarnation).
    pub(super) wreq: HashMap<u64, (usize, u64)>,
    pub(super) next_wreq: u64,
    /// The newest term the witness granted, and when.
    pub(super) granted: (u64, u64),
    pub(super) violation: Option<String>,
    /// Operator commands not answered yet: id -> node.
    pub(super) admin_waiting: HashMap<u64, usize>,
    pub(super) next_admin: u64,
    /// The answer of the command `admin()` is issuing, if it came at once.
    pub(super) admin_now: Option<(u64, Option<Result<String, AdminError>>)>,
}

impl Sim {
    pub(super) fn new(seed: u64, protocol: Protocol, trace: bool) -> Sim {
        Sim::build(seed, protocol, trace, false, Mix::draw(seed))
    }

    /// Without a witness and without the seed's added faults: for the scripted tests.
    pub(super) fn calm(seed: u64, protocol: Protocol) -> Sim {
        Sim::build(seed, protocol, false, false, Mix::none(seed))
    }

    pub(super) fn with_witness(seed: u64, protocol: Protocol, trace: bool, mix: Mix) -> Sim {
        Sim::build(seed, protocol, trace, true, mix)
    }

    pub(super) fn build(
        seed: u64,
        protocol: Protocol,
        trace: bool,
        with_witness: bool,
        mix: Mix,
    ) -> Sim {
        if trace {
            let _ = tracing_subscriber::fmt()
                .with_test_writer()
                .without_time()
                .try_init();
        }
        let mut rng = SplitMix64(seed);
        let layout = Layout::compute(DEVICE_BYTES, BLOCK, 8).expect("layout");
        // With a witness the pair starts clean unless the mix says otherwise: then the
        // first promotion takes `--force`, through the witness.
        let clean = if with_witness {
            !mix.force_start
        } else {
            rng.below(2) == 0
        };
        let names = ["alpha", "beta"];
        let nodes = names
            .iter()
            .map(|n| {
                let sb = Superblock::fresh(
                    layout,
                    "r0",
                    n,
                    16 * 1024,
                    6,
                    clean.then(|| meta::assume_clean_uuid("r0", layout.data_bytes)),
                );
                let mut durable = vec![0u8; DEVICE_BYTES as usize];
                let o = layout.superblock_offset as usize;
                durable[o..o + 4096].copy_from_slice(&sb.encode());
                Host {
                    name: n.to_string(),
                    node: None,
                    writable: false,
                    service_op: 0,
                    incarnation: 0,
                    disk: SimDisk {
                        durable,
                        cache: Vec::new(),
                    },
                    bufs: HashMap::new(),
                    want_connect: true,
                    restart_at: None,
                }
            })
            .collect();
        let mut sim = Sim {
            rng,
            mix,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            msgs: HashMap::new(),
            nodes,
            protocol,
            link_up: true,
            conn: None,
            next_conn: 1,
            chan_last: HashMap::new(),
            chan_fifo: HashMap::new(),
            next_req: 1,
            model: Model::default(),
            app_in_flight: 0,
            req_node: HashMap::new(),
            trace,
            layout,
            last_primary: 0,
            witness: None,
            cut: [[false; 3]; 3],
            held: [VecDeque::new(), VecDeque::new()],
            clock: [(0, 0), (0, 0)],
            paused_until: [0, 0],
            last_crash: [0, 0],
            wreq: HashMap::new(),
            next_wreq: 1,
            granted: (0, 0),
            violation: None,
            admin_waiting: HashMap::new(),
            next_admin: 1,
            admin_now: None,
        };
        if with_witness {
            let rate = MAX_CLOCK_RATE_PERMILLE as i64;
            for i in 0..2 {
                let off = sim.rng.below(1_000_000);
                let drift = sim.rng.below(2 * rate as u64 + 1) as i64 - rate;
                sim.clock[i] = (off, drift);
            }
            let drift_permille = sim.rng.below(2 * rate as u64 + 1) as i64 - rate;
            sim.witness = Some(WitnessSim {
                core: Witness::new(LEASE_MS, Instant(0), BTreeMap::new()),
                up: true,
                drift_permille,
                requests: HashMap::new(),
                replies: HashMap::new(),
            });
        }
        sim.start(0);
        sim.start(1);
        let force = !clean;
        sim.admin(0, AdminCmd::Promote { force })
            .expect("initial promote");
        if with_witness {
            // The witness grants nothing in its first lease: wait for the first primary.
            while sim.primary().is_none() && sim.now < 10 * LEASE_MS {
                sim.advance();
            }
        }
        sim
    }

    /// Node `i`'s clock: its own origin and rate.
    pub(super) fn local(&self, i: usize) -> Instant {
        let (off, drift) = self.clock[i];
        Instant(off + (self.now as i64 * (1000 + drift) / 1000) as u64)
    }

    pub(super) fn paused(&self, i: usize) -> bool {
        self.paused_until[i] > self.now
    }

    pub(super) fn reachable(&self, a: usize, b: usize) -> bool {
        !self.cut[a][b]
    }

    pub(super) fn log(&self, s: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("[{:>7}] {}", self.now, s());
        }
    }

    pub(super) fn params(&mut self, i: usize) -> Params {
        Params {
            resource: "r0".into(),
            local_node: self.nodes[i].name.clone(),
            peer_node: self.nodes[1 - i].name.clone(),
            protocol: self.protocol,
            ping_interval_ms: if self.witness.is_some() {
                PING_INTERVAL_MS
            } else {
                1000
            },
            ping_timeout_ms: if self.witness.is_some() {
                PING_TIMEOUT_MS
            } else {
                4000
            },
            resync_window_bytes: 64 * 1024,
            resync_chunk_bytes: 16 * 1024,
            seed: self.rng.next_u64(),
            witness: self.witness.is_some(),
            lease_ms: LEASE_MS,
            promote_margin_ms: PROMOTE_MARGIN_MS,
            on_no_quorum: if self.rng.below(2) == 0 {
                OnNoQuorum::SuspendIo
            } else {
                OnNoQuorum::IoError
            },
            fencing: match (self.witness.is_some(), self.mix.stonith) {
                (true, Some(_)) => Fencing::Stonith,
                (true, None) => Fencing::Resource,
                (false, _) => Fencing::None,
            },
            auto_promote: true,
            // Numbers of a new incarnation exceed the old one's, like a wall clock.
            witness_seq_base: (self.now + 1) * 1_000_000,
            fence_peer_timeout_ms: 1000,
            fail_back_to_peer: self.mix.fail_back && self.witness.is_some() && i == 1,
            fail_back_delay_ms: 3_000,
        }
    }

    pub(super) fn node_params(&self) -> NodeParams {
        let svc = |name: &str| ServiceSpec {
            name: name.into(),
            start_timeout_ms: SERVICE_TIMEOUT_MS,
            stop_timeout_ms: SERVICE_TIMEOUT_MS,
        };
        NodeParams {
            services: vec![svc("mount"), svc("db")],
            on_demote_failure: self.mix.on_demote_failure,
            device_label: "/dev/tandem/r0".into(),
        }
    }

    pub(super) fn start(&mut self, i: usize) {
        let p = self.params(i);
        let disk = &self.nodes[i].disk;
        let md = Metadata::read_with(DEVICE_BYTES, |o, l| disk.read(o, l)).expect("metadata");
        let res = Resource::new(p, md, self.local(i));
        let node = Node::new(res, self.node_params(), self.local(i));
        let n = &mut self.nodes[i];
        n.node = Some(node);
        n.writable = false;
        n.incarnation += 1;
        n.want_connect = true;
        n.restart_at = None;
        self.log(|| format!("start node {i}"));
        self.drain(i);
    }

    pub(super) fn crash(&mut self, i: usize) {
        if self.nodes[i].node.is_none() {
            return;
        }
        self.log(|| format!("CRASH node {i}"));
        let mut rng = SplitMix64(self.rng.next_u64());
        let n = &mut self.nodes[i];
        n.node = None;
        n.writable = false;
        n.bufs.clear();
        n.disk.crash(&mut rng);
        self.admin_waiting.retain(|_, n| *n != i);
        self.paused_until[i] = 0;
        // The application's requests on that node are gone with it.
        let lost: Vec<u64> = self
            .req_node
            .iter()
            .filter(|(_, &nd)| nd == i)
            .map(|(&r, _)| r)
            .collect();
        for r in lost {
            self.req_node.remove(&r);
            self.app_in_flight -= 1;
            self.model.flush_covers.remove(&r);
        }
        self.model.completed_unflushed.clear();
        self.last_crash[i] = self.now;
        self.nodes[i].restart_at = Some(self.now + 50 + self.rng.below(3000));
        let other = 1 - i;
        let other_was_established = self.res(other).is_some_and(|r| {
            r.conn() == Conn::Established
                && r.role() == Role::Secondary
                && r.disk_state() == tandem::core::resource::DiskState::UpToDate
        });
        let was_primary_crash = !self.res(other).is_some_and(|r| r.role() == Role::Primary);
        self.break_conn("crash");
        // With a witness the survivor promotes itself.
        if self.witness.is_none()
            && other_was_established
            && was_primary_crash
            && self.rng.below(3) != 0
        {
            self.log(|| format!("failover to node {other}"));
            self.admin(other, AdminCmd::Promote { force: false })
                .expect("failover promote of an up-to-date secondary");
        }
    }

    /// An operator command: `Err` when the node refused it at once; `Ok` when it did it
    /// or will answer later ([`nodecore::Action::Reply`]).
    pub(super) fn admin(&mut self, i: usize, cmd: AdminCmd) -> Result<(), String> {
        let now = self.local(i);
        let id = self.next_admin;
        let r = self.nodes[i].node.as_mut().ok_or("node down")?;
        self.next_admin += 1;
        self.admin_waiting.insert(id, i);
        self.admin_now = Some((id, None));
        r.handle_admin(now, Origin::Operator(id), cmd.clone());
        self.drain(i);
        let out = match self.admin_now.take().and_then(|(_, a)| a) {
            Some(Err(e)) => Err(e.to_string()),
            Some(Ok(_)) | None => Ok(()),
        };
        self.log(|| format!("admin node {i} {cmd:?} -> {out:?}"));
        out
    }

    pub(super) fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(std::cmp::Reverse((at, self.seq, ev)));
    }

    pub(super) fn drain(&mut self, i: usize) {
        loop {
            let Some(node) = self.nodes[i].node.as_mut() else {
                return;
            };
            let Some(a) = node.poll_action() else { return };
            self.act(i, a);
        }
    }

    /// Node `i`'s resource, while it runs.
    pub(super) fn res(&self, i: usize) -> Option<&Resource> {
        self.nodes[i].node.as_ref().map(Node::resource)
    }

    pub(super) fn primary(&self) -> Option<usize> {
        (0..2).find(|&i| self.res(i).is_some_and(|r| r.role() == Role::Primary))
    }

    pub(super) fn run_event(&mut self, ev: Ev) {
        if let Some(n) = ev.node() {
            if self.paused(n) {
                // A stopped process handles nothing; it finds all of it when it resumes.
                let at = self.paused_until[n];
                return self.push(at, ev);
            }
        }
        if let Ev::Deliver { to, .. } | Ev::Close { to, .. } = ev {
            if self.cut[1 - to][to] || !self.held[to].is_empty() {
                self.held[to].push_back(ev);
                return;
            }
        }
        match ev {
            Ev::DiskDone {
                node,
                inc,
                io,
                kind,
            } => self.on_disk_done(node, inc, io, kind),
            Ev::Close { to, conn } => self.on_close(to, conn),
            Ev::Deliver { to, conn, meta } => self.on_deliver(to, conn, meta),
            Ev::WitnessArrive { from, id } => self.on_witness_arrive(from, id),
            Ev::WitnessAnswer { to, inc, id } => self.on_witness_answer(to, inc, id),
            Ev::WitnessTimeout { to, inc, id } => self.on_witness_timeout(to, inc, id),
            Ev::App {
                node,
                inc,
                req,
                write,
            } => self.on_app(node, inc, req, write),
            Ev::Device { node, inc, step } => self.on_device(node, inc, step),
            Ev::Service { .. } => self.on_service(ev),
            Ev::Fenced { node, inc, code } => self.on_fenced(node, inc, code),
            Ev::WitnessRestart => self.on_witness_restart(),
        }
    }

    pub(super) fn timers(&mut self) {
        for i in 0..2 {
            if self.paused(i) {
                continue;
            }
            let now = self.local(i);
            let due = self.nodes[i]
                .node
                .as_ref()
                .and_then(|r| r.poll_timeout())
                .is_some_and(|t| t <= now);
            if due {
                if let Some(r) = self.nodes[i].node.as_mut() {
                    r.handle_timeout(now);
                }
                self.drain(i);
            }
        }
    }

    pub(super) fn advance(&mut self) {
        // Next event or 1 ms, whichever comes first.
        if let Some(std::cmp::Reverse((at, _, _))) = self.queue.peek() {
            if *at <= self.now {
                let std::cmp::Reverse((_, _, ev)) = self.queue.pop().expect("peeked");
                self.run_event(ev);
                return;
            }
        }
        self.now += 1;
        for i in 0..2 {
            if self.nodes[i].restart_at.is_some_and(|t| t <= self.now) {
                self.start(i);
                if self.primary().is_none() && self.last_primary == i && self.rng.below(2) == 0 {
                    let _ = self.admin(i, AdminCmd::Promote { force: false });
                }
            }
        }
        self.timers();
        self.maybe_connect();
        for i in 0..2 {
            if self.res(i).is_some_and(|r| r.conn() == Conn::SyncTarget) {
                self.last_crash[i] = self.now;
            }
        }
    }
}
