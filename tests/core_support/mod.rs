//! A core driven by hand as a shell would, for the core test files: build one, drain
//! its actions, complete its metadata writes, connect it to a simulated peer.
#![allow(dead_code)]

use tandem::core::meta::{self, Layout, Metadata, Superblock};
use tandem::core::quorum::{Fencing, OnNoQuorum};
use tandem::core::resource::{Action, AdminCmd, BufId, IoId, Params, ReqId, Resource};
use tandem::core::wire::{Hello, Msg, PROTOCOL_VERSION};
use tandem::core::{Instant, Protocol};

pub const DEV: u64 = 64 << 20;

pub struct One {
    pub r: Resource,
    pub out: Vec<Action>,
}

impl One {
    pub fn new(protocol: Protocol) -> One {
        One::with(protocol, |_| {})
    }
    pub fn with(protocol: Protocol, tweak: impl FnOnce(&mut Params)) -> One {
        One::with_sb(protocol, tweak, |_| {})
    }
    /// As [`One::with`], with the superblock it starts from changed by `tweak_sb`.
    pub fn with_sb(
        protocol: Protocol,
        tweak: impl FnOnce(&mut Params),
        tweak_sb: impl FnOnce(&mut Superblock),
    ) -> One {
        let layout = Layout::compute(DEV, 4096, 8).expect("layout");
        let uuid = meta::assume_clean_uuid("r0", layout.data_bytes);
        let mut sb = Superblock::fresh(layout, "r0", "alpha", 4 << 20, 16, Some(uuid));
        tweak_sb(&mut sb);
        let md = Metadata {
            sb,
            bitmap_bytes: vec![0; layout.bitmap_bytes as usize],
            al_ring: vec![0; 8 * 4096],
        };
        let p = Params {
            resource: "r0".into(),
            local_node: "alpha".into(),
            peer_node: "beta".into(),
            protocol,
            ping_interval_ms: 1000,
            ping_timeout_ms: 5000,
            resync_window_bytes: 1 << 20,
            resync_chunk_bytes: 128 << 10,
            seed: 1,
            witness: false,
            lease_ms: 2000,
            promote_margin_ms: 500,
            on_no_quorum: OnNoQuorum::SuspendIo,
            fencing: Fencing::None,
            auto_promote: false,
            witness_seq_base: 0,
            fence_peer_timeout_ms: 1000,
            fail_back_to_peer: false,
            fail_back_delay_ms: 10_000,
        };
        let mut p = p;
        tweak(&mut p);
        let mut o = One {
            r: Resource::new(p, md, Instant(0)),
            out: Vec::new(),
        };
        o.drain();
        o
    }
    pub fn drain(&mut self) -> Vec<Action> {
        let mut v = Vec::new();
        while let Some(a) = self.r.poll_action() {
            v.push(a);
        }
        self.out.extend(v.clone());
        v
    }
    /// Complete every metadata write the core asked for.
    pub fn finish_meta(&mut self) {
        loop {
            let metas: Vec<IoId> = self
                .drain()
                .into_iter()
                .filter_map(|a| match a {
                    Action::MetaWrite { io, .. } => Some(io),
                    _ => None,
                })
                .collect();
            if metas.is_empty() {
                return;
            }
            for io in metas {
                self.r.handle_disk_done(Instant(1), io, true);
            }
        }
    }
    pub fn connect_established(&mut self) {
        self.r.handle_peer_connected(Instant(1));
        let gen = self.r.generation();
        self.r
            .handle_peer_message(Instant(1), 0, peer_hello(self.r.data_bytes(), gen, 0), None);
        assert_eq!(
            self.r.status().replication,
            tandem::core::resource::Replication::Established
        );
        self.drain();
    }
}

/// The peer's hello: same resource, the given size, generation and flags.
pub fn peer_hello(data_bytes: u64, gen: tandem::core::uuid::Generation, flags: u32) -> Msg {
    Msg::Hello(Hello {
        version: PROTOCOL_VERSION,
        resource: "r0".into(),
        node: "beta".into(),
        data_bytes,
        block_bytes: 4096,
        gen,
        flags,
        gen_term: 0,
    })
}

pub fn completed(actions: &[Action], req: u64) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::CompleteWrite { req: r, result: Ok(()) } if r.0 == req))
}

/// Returns (io of the local write, seq of the data message) for a 4 KiB write.
pub fn write(o: &mut One, req: u64) -> (IoId, u64) {
    o.r.handle_app_write(Instant(2), ReqId(req), 0, 4096);
    o.finish_meta(); // AL transaction for a new extent
    let acts = o.out.clone();
    let io = acts
        .iter()
        .find_map(|a| match a {
            Action::DiskWrite { io, buf, .. } if *buf == BufId(req) => Some(*io),
            _ => None,
        })
        .expect("local write submitted");
    let seq = acts
        .iter()
        .find_map(|a| match a {
            Action::Send {
                msg: Msg::Data { seq, .. },
                buf: Some(b),
                ..
            } if *b == BufId(req) => Some(*seq),
            _ => None,
        })
        .expect("write sent to the peer");
    (io, seq)
}

pub fn primary(protocol: Protocol) -> One {
    let mut o = One::new(protocol);
    o.finish_meta();
    o.connect_established();
    o.r.handle_admin(Instant(1), AdminCmd::Promote { force: false })
        .expect("promote");
    o.finish_meta();
    o
}

/// The witness requests among `actions`.
pub fn witness_requests(actions: &[Action]) -> Vec<tandem::core::witness::Request> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Witness { req, .. } => Some(req.clone()),
            _ => None,
        })
        .collect()
}

/// A witness reply: granted or not, at `term`, with the up-to-date set.
pub fn reply(granted: bool, term: u64, up_to_date: &[&str]) -> tandem::core::witness::Reply {
    tandem::core::witness::Reply {
        granted,
        term,
        lease_ms: if granted { 2000 } else { 0 },
        primary: "alpha".into(),
        up_to_date: up_to_date.iter().map(|s| s.to_string()).collect(),
        reason: if granted {
            String::new()
        } else {
            "refused".into()
        },
    }
}

/// A primary of term 1 through the witness (lease 2000 ms, resource fencing), connected
/// to its peer.
pub fn witness_primary(protocol: Protocol) -> One {
    let mut o = One::with(protocol, |p| {
        p.witness = true;
        p.fencing = Fencing::Resource;
    });
    o.finish_meta();
    o.connect_established();
    let r =
        o.r.handle_admin(Instant(1), AdminCmd::Promote { force: false })
            .expect("promote");
    assert_eq!(r, tandem::core::resource::AdminReply::Pending);
    let asked = witness_requests(&o.drain());
    assert_eq!(
        asked.last().map(|q| q.op),
        Some(tandem::core::witness::Op::Promote)
    );
    o.r.handle_witness_reply(Instant(2), Some(reply(true, 1, &["alpha", "beta"])));
    o.finish_meta();
    assert_eq!(o.r.role(), tandem::core::resource::Role::Primary);
    o
}

/// The first local disk write among `actions` (optionally of `buf`).
pub fn disk_write(actions: &[Action], buf: Option<BufId>) -> Option<IoId> {
    actions.iter().find_map(|a| match a {
        Action::DiskWrite { io, buf: b, .. } if buf.is_none_or(|x| x == *b) => Some(*io),
        _ => None,
    })
}

/// The first disk flush among `actions`.
pub fn disk_flush(actions: &[Action]) -> Option<IoId> {
    actions.iter().find_map(|a| match a {
        Action::DiskFlush { io } => Some(*io),
        _ => None,
    })
}

impl One {
    /// Connected, with the peer's hello (same generation) for a device of `data_bytes`
    /// and the given flags handled.
    pub fn hello_from_peer(&mut self, data_bytes: u64, flags: u32) {
        self.r.handle_peer_connected(Instant(1));
        let gen = self.r.generation();
        self.r
            .handle_peer_message(Instant(1), 0, peer_hello(data_bytes, gen, flags), None);
    }
}
