//! Deterministic simulator: two cores, a simulated network and simulated disks, driven
//! from a seed.
//!
//! Faults: disconnects, crashes (a crash loses the writes the disk had not flushed, a
//! random subset of them), restarts, failover to the secondary, message delay. After the
//! fault phase everything heals and the pair must converge: both disks identical, and in
//! protocols B and C no write covered by a completed flush lost.
//!
//! `TANDEM_SEED=<n>` replays one seed with logging; `TANDEM_SIM_SEEDS=<n>` sets how many
//! seeds each protocol runs.

use std::collections::{BTreeMap, BinaryHeap, HashMap};

use tandem::core::meta::{self, Layout, Metadata, Superblock};
use tandem::core::resource::{Action, AdminCmd, BufId, Conn, IoId, Params, ReqId, Resource, Role};
use tandem::core::wire::{Channel, Msg};
use tandem::core::{Instant, Protocol, SplitMix64};

const BLOCK: u64 = 4096;
const DEVICE_BYTES: u64 = 2 * 1024 * 1024;

struct SimDisk {
    durable: Vec<u8>,
    /// Completed but unflushed data writes, in completion order.
    cache: Vec<(u64, Vec<u8>)>,
}

impl SimDisk {
    fn view(&self) -> Vec<u8> {
        let mut v = self.durable.clone();
        for (off, data) in &self.cache {
            v[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        v
    }
    fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let mut out = self.durable[off as usize..off as usize + len].to_vec();
        for (o, d) in &self.cache {
            let (a, b) = (*o, *o + d.len() as u64);
            let (s, e) = (off.max(a), (off + len as u64).min(b));
            if s < e {
                out[(s - off) as usize..(e - off) as usize]
                    .copy_from_slice(&d[(s - a) as usize..(e - a) as usize]);
            }
        }
        out
    }
    fn flush(&mut self) {
        for (off, data) in std::mem::take(&mut self.cache) {
            self.durable[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
    }
    fn crash(&mut self, rng: &mut SplitMix64) {
        for (off, data) in std::mem::take(&mut self.cache) {
            if rng.below(2) == 0 {
                self.durable[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
        }
    }
}

struct Node {
    name: String,
    res: Option<Resource>,
    incarnation: u64,
    disk: SimDisk,
    bufs: HashMap<BufId, Vec<u8>>,
    want_connect: bool,
    restart_at: Option<u64>,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    DiskDone {
        node: usize,
        inc: u64,
        io: u64,
        kind: DiskKind,
    },
    Deliver {
        to: usize,
        conn: u64,
        msg_idx: u64,
    },
    /// A graceful close reaches the peer after the data sent before it (TCP FIN).
    Close {
        conn: u64,
    },
}

#[derive(PartialEq, Eq, PartialOrd, Ord, Clone)]
enum DiskKind {
    Write { offset: u64, buf: u64 },
    Read { offset: u64, len: u32, buf: u64 },
    Flush,
    Meta { offset: u64, bytes: Vec<u8> },
}

/// The application's view: what was written where, and what a completed flush covers.
#[derive(Default)]
struct Model {
    /// Per block: write ids in issue order.
    history: BTreeMap<u64, Vec<u64>>,
    /// Per block: index into `history` of the newest write covered by a completed flush.
    flushed: BTreeMap<u64, usize>,
    writes: HashMap<u64, (u64, u64)>, // id -> (first block, blocks)
    completed_unflushed: Vec<u64>,
    flush_covers: HashMap<u64, Vec<u64>>,
}

struct Sim {
    rng: SplitMix64,
    now: u64,
    seq: u64,
    queue: BinaryHeap<std::cmp::Reverse<(u64, u64, Ev)>>,
    msgs: HashMap<u64, (Msg, Option<Vec<u8>>)>,
    nodes: Vec<Node>,
    protocol: Protocol,
    link_up: bool,
    conn: Option<u64>,
    next_conn: u64,
    chan_last: HashMap<(usize, Channel), u64>,
    next_req: u64,
    model: Model,
    app_in_flight: usize,
    req_node: HashMap<u64, usize>,
    trace: bool,
    layout: Layout,
    /// The node holding the newest data: the only one that may be promoted when no node
    /// is primary (without a witness, nothing else would stop a stale promotion).
    last_primary: usize,
}

fn stamp(write_id: u64, block: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BLOCK as usize);
    while v.len() < BLOCK as usize {
        v.extend_from_slice(&write_id.to_le_bytes());
        v.extend_from_slice(&block.to_le_bytes());
    }
    v
}

fn read_stamp(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

impl Sim {
    fn new(seed: u64, protocol: Protocol, trace: bool) -> Sim {
        if trace {
            let _ = tracing_subscriber::fmt()
                .with_test_writer()
                .without_time()
                .try_init();
        }
        let mut rng = SplitMix64(seed);
        let layout = Layout::compute(DEVICE_BYTES, BLOCK, 8).expect("layout");
        let clean = rng.below(2) == 0;
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
                Node {
                    name: n.to_string(),
                    res: None,
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
            next_req: 1,
            model: Model::default(),
            app_in_flight: 0,
            req_node: HashMap::new(),
            trace,
            layout,
            last_primary: 0,
        };
        sim.start(0);
        sim.start(1);
        let force = !clean;
        sim.admin(0, AdminCmd::Promote { force })
            .expect("initial promote");
        sim
    }

    fn log(&self, s: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("[{:>7}] {}", self.now, s());
        }
    }

    fn params(&mut self, i: usize) -> Params {
        Params {
            resource: "r0".into(),
            local_node: self.nodes[i].name.clone(),
            peer_node: self.nodes[1 - i].name.clone(),
            protocol: self.protocol,
            ping_interval_ms: 1000,
            ping_timeout_ms: 4000,
            resync_window_bytes: 64 * 1024,
            resync_chunk_bytes: 16 * 1024,
            seed: self.rng.next_u64(),
        }
    }

    fn start(&mut self, i: usize) {
        let p = self.params(i);
        let disk = &self.nodes[i].disk;
        let md = Metadata::read_with(DEVICE_BYTES, |o, l| disk.read(o, l)).expect("metadata");
        let res = Resource::new(p, md, Instant(self.now));
        let n = &mut self.nodes[i];
        n.res = Some(res);
        n.incarnation += 1;
        n.want_connect = true;
        n.restart_at = None;
        self.log(|| format!("start node {i}"));
        self.drain(i);
    }

    fn crash(&mut self, i: usize) {
        if self.nodes[i].res.is_none() {
            return;
        }
        self.log(|| format!("CRASH node {i}"));
        let mut rng = SplitMix64(self.rng.next_u64());
        let n = &mut self.nodes[i];
        n.res = None;
        n.bufs.clear();
        n.disk.crash(&mut rng);
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
        self.nodes[i].restart_at = Some(self.now + 50 + self.rng.below(3000));
        let other = 1 - i;
        let other_was_established = self.nodes[other].res.as_ref().is_some_and(|r| {
            r.conn() == Conn::Established
                && r.role() == Role::Secondary
                && r.disk_state() == tandem::core::resource::DiskState::UpToDate
        });
        let was_primary_crash = !self.nodes[other]
            .res
            .as_ref()
            .is_some_and(|r| r.role() == Role::Primary);
        self.break_conn("crash");
        if other_was_established && was_primary_crash && self.rng.below(3) != 0 {
            self.log(|| format!("failover to node {other}"));
            self.admin(other, AdminCmd::Promote { force: false })
                .expect("failover promote of an up-to-date secondary");
        }
    }

    fn break_conn(&mut self, why: &str) {
        if let Some(c) = self.conn.take() {
            self.log(|| format!("connection {c} broken: {why}"));
            for i in 0..2 {
                if let Some(r) = self.nodes[i].res.as_mut() {
                    r.handle_peer_disconnected(Instant(self.now), why);
                }
                self.drain(i);
            }
        }
    }

    fn admin(&mut self, i: usize, cmd: AdminCmd) -> Result<(), String> {
        let now = Instant(self.now);
        let r = self.nodes[i].res.as_mut().ok_or("node down")?;
        let out = r.handle_admin(now, cmd.clone()).map_err(|e| e.to_string());
        if out.is_ok() && matches!(cmd, AdminCmd::Promote { .. }) {
            self.last_primary = i;
        }
        self.log(|| format!("admin node {i} {cmd:?} -> {out:?}"));
        self.drain(i);
        out
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(std::cmp::Reverse((at, self.seq, ev)));
    }

    fn drain(&mut self, i: usize) {
        loop {
            let Some(res) = self.nodes[i].res.as_mut() else {
                return;
            };
            let Some(a) = res.poll_action() else { return };
            self.act(i, a);
        }
    }

    fn act(&mut self, i: usize, a: Action) {
        let inc = self.nodes[i].incarnation;
        let lat = 1 + self.rng.below(4);
        match a {
            Action::DiskWrite { io, offset, buf } => self.push(
                self.now + lat,
                Ev::DiskDone {
                    node: i,
                    inc,
                    io: io.0,
                    kind: DiskKind::Write { offset, buf: buf.0 },
                },
            ),
            Action::DiskRead {
                io,
                offset,
                len,
                buf,
            } => self.push(
                self.now + lat,
                Ev::DiskDone {
                    node: i,
                    inc,
                    io: io.0,
                    kind: DiskKind::Read {
                        offset,
                        len,
                        buf: buf.0,
                    },
                },
            ),
            Action::DiskFlush { io } => self.push(
                self.now + lat,
                Ev::DiskDone {
                    node: i,
                    inc,
                    io: io.0,
                    kind: DiskKind::Flush,
                },
            ),
            Action::MetaWrite { io, offset, bytes } => self.push(
                self.now + lat,
                Ev::DiskDone {
                    node: i,
                    inc,
                    io: io.0,
                    kind: DiskKind::Meta { offset, bytes },
                },
            ),
            Action::Send { msg, buf } => {
                let Some(conn) = self.conn else { return };
                let data = buf.map(|b| {
                    self.nodes[i]
                        .bufs
                        .get(&b)
                        .cloned()
                        .expect("send of a released buffer")
                });
                assert_eq!(data.as_ref().map_or(0, |d| d.len() as u32), msg.data_len());
                let ch = msg.channel();
                let key = (1 - i, ch);
                let at =
                    (self.now + 1 + self.rng.below(6)).max(*self.chan_last.get(&key).unwrap_or(&0));
                self.chan_last.insert(key, at);
                self.seq += 1;
                let idx = self.seq;
                self.msgs.insert(idx, (msg, data));
                self.push(
                    at,
                    Ev::Deliver {
                        to: 1 - i,
                        conn,
                        msg_idx: idx,
                    },
                );
            }
            Action::ReleaseBuf(b) => {
                self.nodes[i].bufs.remove(&b);
            }
            Action::CompleteWrite { req, result } => {
                if self.req_node.remove(&req.0).is_some() {
                    self.app_in_flight -= 1;
                    if result.is_ok() {
                        self.model.completed_unflushed.push(req.0);
                    }
                }
            }
            Action::CompleteFlush { req, result } => {
                if self.req_node.remove(&req.0).is_some() {
                    self.app_in_flight -= 1;
                    let covers = self.model.flush_covers.remove(&req.0).unwrap_or_default();
                    if result.is_ok() {
                        for w in covers {
                            let (first, n) = self.model.writes[&w];
                            for b in first..first + n {
                                let h = &self.model.history[&b];
                                let idx = h.iter().position(|&x| x == w).expect("write in history");
                                let e = self.model.flushed.entry(b).or_insert(0);
                                *e = (*e).max(idx + 1);
                            }
                        }
                    }
                }
            }
            Action::Disconnect { reason } => {
                // The closing core has already forgotten the peer; the peer still gets
                // what was sent before the close, then sees the connection end.
                if let Some(conn) = self.conn {
                    self.log(|| format!("node {i} closes connection {conn}: {reason}"));
                    let last = [Channel::Data, Channel::Meta]
                        .iter()
                        .filter_map(|c| self.chan_last.get(&(1 - i, *c)).copied())
                        .max()
                        .unwrap_or(self.now);
                    self.push(last.max(self.now) + 1, Ev::Close { conn });
                }
            }
            Action::SetConnect(on) => self.nodes[i].want_connect = on,
            Action::RoleChanged(role) => self.log(|| format!("node {i} is now {role:?}")),
        }
    }

    fn maybe_connect(&mut self) {
        if self.conn.is_some() || !self.link_up {
            return;
        }
        if self.nodes.iter().all(|n| n.res.is_some() && n.want_connect) {
            let c = self.next_conn;
            self.next_conn += 1;
            self.conn = Some(c);
            self.chan_last.clear();
            self.log(|| format!("connection {c} up"));
            for i in 0..2 {
                if let Some(r) = self.nodes[i].res.as_mut() {
                    r.handle_peer_connected(Instant(self.now));
                }
                self.drain(i);
            }
        }
    }

    fn primary(&self) -> Option<usize> {
        (0..2).find(|&i| {
            self.nodes[i]
                .res
                .as_ref()
                .is_some_and(|r| r.role() == Role::Primary)
        })
    }

    fn app_step(&mut self) {
        let Some(p) = self.primary() else { return };
        if self.app_in_flight >= 8 {
            return;
        }
        let req = self.next_req;
        self.next_req += 1;
        let now = Instant(self.now);
        if self.rng.below(6) == 0 {
            let covers = std::mem::take(&mut self.model.completed_unflushed);
            self.model.flush_covers.insert(req, covers);
            self.req_node.insert(req, p);
            self.app_in_flight += 1;
            if let Some(r) = self.nodes[p].res.as_mut() {
                r.handle_app_flush(now, ReqId(req));
            }
        } else {
            let blocks = self.layout.data_bytes / BLOCK;
            let n = 1 + self.rng.below(4);
            let first = self.rng.below(blocks - n);
            let mut data = Vec::with_capacity((n * BLOCK) as usize);
            for b in first..first + n {
                data.extend_from_slice(&stamp(req, b));
                self.model.history.entry(b).or_default().push(req);
            }
            self.model.writes.insert(req, (first, n));
            self.nodes[p].bufs.insert(BufId(req), data);
            self.req_node.insert(req, p);
            self.app_in_flight += 1;
            if let Some(r) = self.nodes[p].res.as_mut() {
                r.handle_app_write(now, ReqId(req), first * BLOCK, n * BLOCK);
            }
        }
        self.drain(p);
    }

    fn run_event(&mut self, ev: Ev) {
        match ev {
            Ev::DiskDone {
                node,
                inc,
                io,
                kind,
            } => {
                if self.nodes[node].incarnation != inc || self.nodes[node].res.is_none() {
                    return;
                }
                let n = &mut self.nodes[node];
                match kind {
                    DiskKind::Write { offset, buf } => {
                        let data = n
                            .bufs
                            .get(&BufId(buf))
                            .cloned()
                            .expect("write of a released buffer");
                        assert!(
                            offset + data.len() as u64 <= self.layout.data_bytes,
                            "data write into metadata"
                        );
                        n.disk.cache.push((offset, data));
                    }
                    DiskKind::Read { offset, len, buf } => {
                        let d = n.disk.read(offset, len as usize);
                        n.bufs.insert(BufId(buf), d);
                    }
                    DiskKind::Flush => n.disk.flush(),
                    DiskKind::Meta { offset, bytes } => {
                        assert!(
                            offset >= self.layout.metadata_start(),
                            "metadata write into data area"
                        );
                        // A metadata write is a write + fdatasync of the device: it also
                        // makes every completed data write durable.
                        n.disk.flush();
                        n.disk.durable[offset as usize..offset as usize + bytes.len()]
                            .copy_from_slice(&bytes);
                    }
                }
                if let Some(r) = n.res.as_mut() {
                    r.handle_disk_done(Instant(self.now), IoId(io), true);
                }
                self.drain(node);
            }
            Ev::Close { conn } => {
                if self.conn == Some(conn) {
                    self.break_conn("closed by peer");
                }
            }
            Ev::Deliver { to, conn, msg_idx } => {
                let Some((msg, data)) = self.msgs.remove(&msg_idx) else {
                    return;
                };
                if self.conn != Some(conn) || self.nodes[to].res.is_none() {
                    return;
                }
                let buf = data.map(|d| {
                    let id = BufId(1_000_000_000 + msg_idx);
                    self.nodes[to].bufs.insert(id, d);
                    id
                });
                if let Some(r) = self.nodes[to].res.as_mut() {
                    r.handle_peer_message(Instant(self.now), msg, buf);
                }
                self.drain(to);
            }
        }
    }

    fn timers(&mut self) {
        for i in 0..2 {
            let due = self.nodes[i]
                .res
                .as_ref()
                .and_then(|r| r.poll_timeout())
                .is_some_and(|t| t.0 <= self.now);
            if due {
                if let Some(r) = self.nodes[i].res.as_mut() {
                    r.handle_timeout(Instant(self.now));
                }
                self.drain(i);
            }
        }
    }

    fn advance(&mut self) {
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
    }

    fn fault_phase(&mut self, steps: u64) {
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

    /// Heal everything and wait for convergence.
    fn heal(&mut self) -> Result<(), String> {
        self.link_up = true;
        let deadline = self.now + 120_000;
        loop {
            for i in 0..2 {
                if self.nodes[i].res.is_none() {
                    self.start(i);
                }
            }
            if self.primary().is_none() {
                let i = self.last_primary;
                if self.admin(i, AdminCmd::Promote { force: false }).is_err() {
                    // A first promotion that crashed before it was persisted leaves a
                    // pair that never held data: the operator forces it again.
                    let fresh = self.nodes[i].res.as_ref().is_some_and(|r| {
                        r.generation().current == tandem::core::uuid::UUID_JUST_CREATED
                    });
                    if fresh {
                        let _ = self.admin(i, AdminCmd::Promote { force: true });
                    }
                }
            }
            let done = self.app_in_flight == 0
                && self.nodes.iter().all(|n| {
                    n.res.as_ref().is_some_and(|r| {
                        r.conn() == Conn::Established && r.is_idle() && r.bitmap().count() == 0
                    })
                });
            if done && self.queue.is_empty() {
                return Ok(());
            }
            if self.now > deadline {
                let st: Vec<_> = self
                    .nodes
                    .iter()
                    .map(|n| n.res.as_ref().map(|r| (r.status(), r.is_idle())))
                    .collect();
                return Err(format!("no convergence after healing: {st:#?}"));
            }
            self.advance();
        }
    }

    fn check(&mut self) -> Result<(), String> {
        for n in &self.nodes {
            let r = n.res.as_ref().ok_or("node down after heal")?;
            let st = r.status();
            if st.split_brain {
                return Err(format!("split brain on {}", n.name));
            }
            if r.disk_state() != tandem::core::resource::DiskState::UpToDate {
                return Err(format!("{} not up to date: {:?}", n.name, r.disk_state()));
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

fn run_seed(seed: u64, protocol: Protocol, trace: bool) -> Result<(), String> {
    let mut sim = Sim::new(seed, protocol, trace);
    sim.fault_phase(20_000);
    sim.heal()?;
    sim.check()
}

fn protocols() -> [Protocol; 3] {
    [Protocol::A, Protocol::B, Protocol::C]
}

#[test]
fn simulator_many_seeds_converge() {
    if let Ok(s) = std::env::var("TANDEM_SEED") {
        let seed: u64 = s.parse().expect("TANDEM_SEED must be a number");
        let only = std::env::var("TANDEM_PROTOCOL")
            .ok()
            .and_then(|s| Protocol::parse(&s));
        for p in protocols()
            .into_iter()
            .filter(|p| only.is_none_or(|o| o == *p))
        {
            if let Err(e) = run_seed(seed, p, true) {
                panic!("TANDEM_SEED={seed} protocol {p:?}: {e}");
            }
        }
        return;
    }
    let n: u64 = std::env::var("TANDEM_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    let base = std::env::var("TANDEM_SIM_BASE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xC0FFEE);
    let mut failures = Vec::new();
    for k in 0..n {
        let seed = base + k;
        for p in protocols() {
            if let Err(e) = run_seed(seed, p, false) {
                failures.push(format!(
                    "TANDEM_SEED={seed} (protocol {p:?}): {}",
                    e.lines().next().unwrap_or("")
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing runs:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn simulator_is_deterministic() {
    // The same seed must take the same path: compare final disk contents of two runs.
    let run = || {
        let mut sim = Sim::new(42, Protocol::C, false);
        sim.fault_phase(5_000);
        sim.heal().expect("converges");
        (sim.now, sim.nodes[0].disk.view())
    };
    assert!(run() == run());
}

/// Run until no event is left or `ms` simulated milliseconds passed.
fn settle(sim: &mut Sim, ms: u64) {
    let until = sim.now + ms;
    while sim.now < until {
        sim.advance();
    }
}

#[test]
fn split_brain_is_detected_on_both_nodes_and_resolved_by_discard_my_data() {
    for protocol in protocols() {
        let mut sim = Sim::new(7, protocol, false);
        settle(&mut sim, 2_000);
        // Partition, then make both nodes primary and write on both.
        sim.link_up = false;
        sim.break_conn("partition");
        sim.admin(1, AdminCmd::Promote { force: false })
            .expect("a disconnected up-to-date secondary may be promoted by the operator");
        for i in 0..2 {
            for k in 0..5u64 {
                let req = 900_000 + i as u64 * 100 + k;
                sim.nodes[i].bufs.insert(BufId(req), stamp(req, k));
                sim.req_node.insert(req, i);
                sim.app_in_flight += 1;
                let now = Instant(sim.now);
                if let Some(r) = sim.nodes[i].res.as_mut() {
                    r.handle_app_write(now, ReqId(req), k * BLOCK * (i as u64 + 1), BLOCK);
                }
                sim.drain(i);
            }
        }
        settle(&mut sim, 1_000);
        sim.link_up = true;
        settle(&mut sim, 2_000);
        for i in 0..2 {
            let st = sim.nodes[i].res.as_ref().expect("up").status();
            assert!(
                st.split_brain,
                "{protocol:?}: node {i} must report split brain: {st:?}"
            );
            assert_eq!(
                st.connection, "standalone",
                "{protocol:?}: never resolved silently"
            );
        }
        // Beta is the victim: demote, reconnect discarding its data; alpha reconnects.
        sim.admin(1, AdminCmd::Demote).expect("demote victim");
        sim.admin(
            1,
            AdminCmd::Connect {
                discard_my_data: true,
            },
        )
        .expect("connect victim");
        sim.admin(
            0,
            AdminCmd::Connect {
                discard_my_data: false,
            },
        )
        .expect("connect survivor");
        sim.last_primary = 0;
        sim.heal().expect("converges after manual resolution");
        sim.check().expect("identical, nothing flushed lost");
        let view = sim.nodes[1].disk.view();
        // The survivor's writes are on the victim now, the victim's own are gone.
        assert_eq!(read_stamp(&view[..]), 900_000, "{protocol:?}");
        assert_ne!(
            read_stamp(&view[(2 * BLOCK) as usize..]),
            900_101,
            "{protocol:?}"
        );
    }
}

#[test]
fn quick_resync_moves_only_what_changed_while_disconnected() {
    for protocol in protocols() {
        let mut sim = Sim::new(11, protocol, false);
        settle(&mut sim, 3_000);
        assert_eq!(
            sim.nodes[0].res.as_ref().map(|r| r.conn()),
            Some(Conn::Established)
        );
        sim.link_up = false;
        sim.break_conn("secondary unreachable");
        let blocks = [3u64, 4, 5, 100, 200, 201, 400];
        for (k, &b) in blocks.iter().enumerate() {
            let req = 800_000 + k as u64;
            sim.nodes[0].bufs.insert(BufId(req), stamp(req, b));
            sim.model.history.entry(b).or_default().push(req);
            sim.model.writes.insert(req, (b, 1));
            sim.req_node.insert(req, 0);
            sim.app_in_flight += 1;
            let now = Instant(sim.now);
            if let Some(r) = sim.nodes[0].res.as_mut() {
                r.handle_app_write(now, ReqId(req), b * BLOCK, BLOCK);
            }
            sim.drain(0);
        }
        settle(&mut sim, 500);
        let written = blocks.len() as u64 * BLOCK;
        let oos = sim.nodes[0]
            .res
            .as_ref()
            .expect("up")
            .status()
            .out_of_sync_bytes;
        assert!(
            oos >= written,
            "{protocol:?}: every block written alone is out of sync"
        );
        sim.link_up = true;
        sim.heal().expect("converges");
        let st = sim.nodes[0].res.as_ref().expect("up").status();
        assert!(
            st.resync.total_bytes >= written && st.resync.total_bytes <= 2 * written,
            "{protocol:?}: resynced {} bytes for {written} bytes written",
            st.resync.total_bytes
        );
        sim.check().expect("identical");
    }
}
