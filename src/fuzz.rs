//! Entry points for the fuzzer (`fuzz/`, cargo-fuzz) and for replaying what it found
//! (`tests/fuzz_regressions.rs`, on stable): each feeds bytes to one decoder of
//! untrusted input (from the network, a disk, a config file or the control socket).
//! None may panic, allocate without bound or loop; where a decoder accepts the input,
//! what it decoded must encode back to something it decodes the same way.
//!
//! Where a CRC guards the input, the target first writes the right CRC into the bytes,
//! so that the fuzzer spends its time on what the CRC protects, not on guessing it.

use std::collections::BTreeMap;

use crate::core::al::{ActivityLog, AlTxn, TXN_BYTES};
use crate::core::codec;
use crate::core::meta::{Layout, Metadata, Superblock, SUPERBLOCK_BYTES};
use crate::core::wire::{self, Msg, HEADER_BYTES};
use crate::core::witness::{self, Witness};
use crate::core::Instant;

/// A fuzz target: bytes in, a panic on a defect.
pub type Target = fn(&[u8]);

/// Every target by name: the fuzz crate's binaries and the regression test use these.
pub const TARGETS: &[(&str, Target)] = &[
    ("wire_frame", wire_frame),
    ("frame_stream", frame_stream),
    ("superblock", superblock),
    ("metadata", metadata),
    ("activity_log", activity_log),
    ("witness_state", witness_state),
    ("witness_request", witness_request),
    ("fuse_request", fuse_request),
    ("config", config),
    ("control_request", control_request),
    ("peer_messages", peer_messages),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

fn u32_at(b: &[u8], o: usize) -> usize {
    codec::u32_at(b, o).unwrap_or(0) as usize
}

/// Give the frame at the start of `b` its magic and a correct CRC (as far as its
/// lengths reach inside `b`); returns how many bytes it claims.
fn fix_frame(b: &mut [u8]) -> usize {
    if b.len() < HEADER_BYTES {
        return b.len();
    }
    codec::put_u32(b, 0, wire::FRAME_MAGIC);
    // Keep the claimed lengths within what is there, so that most frames are whole.
    let room = b.len() - HEADER_BYTES;
    let fields = u32_at(b, 8) % (room + 1);
    let data = u32_at(b, 12) % (room - fields + 1);
    codec::put_u32(b, 8, fields as u32);
    codec::put_u32(b, 12, data as u32);
    let total = HEADER_BYTES + fields + data;
    let mut h = crc32fast::Hasher::new();
    h.update(&b[0..24]);
    h.update(&b[HEADER_BYTES..total]);
    let crc = h.finalize();
    codec::put_u32(b, 24, crc);
    total
}

/// One frame: header, CRC, every message kind's fields. A decoded message encodes back
/// to a frame that decodes to the same message.
pub fn wire_frame(data: &[u8]) {
    let mut b = data.to_vec();
    fix_frame(&mut b);
    if let Ok(Some((msg, payload, _))) = wire::decode_frame(&b) {
        let term = wire::frame_term(&b).unwrap_or(0);
        let again = msg.encode(term, payload);
        let mut whole = again.clone();
        whole.extend_from_slice(payload);
        match wire::decode_frame(&whole) {
            Ok(Some((m2, p2, _))) => {
                assert_eq!(m2, msg, "a decoded message re-encodes differently");
                assert_eq!(p2, payload);
            }
            other => panic!("a re-encoded frame does not decode: {other:?}"),
        }
    }
}

/// A byte stream of frames, as the driver reads a peer socket: the first byte picks the
/// size of the reads. Frames are given correct CRCs; the reader must return the frames
/// before any bad one, then the error, and never panic or over-allocate.
pub fn frame_stream(data: &[u8]) {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let mut b = rest.to_vec();
    let mut at = 0;
    while at < b.len() {
        let n = fix_frame(&mut b[at..]);
        at += n.max(1);
    }
    struct Chunked<'a> {
        b: &'a [u8],
        step: usize,
    }
    impl std::io::Read for Chunked<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            if self.b.is_empty() {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let n = self.step.min(out.len()).min(self.b.len());
            out[..n].copy_from_slice(&self.b[..n]);
            self.b = &self.b[n..];
            Ok(n)
        }
    }
    let mut r = Chunked {
        b: &b,
        step: chunk as usize + 1,
    };
    let mut reader = crate::shell::net::FrameReader::default();
    for _ in 0..=b.len() {
        let mut out = Vec::new();
        match reader.read_available(&mut r, &mut out, 1 << 16) {
            Ok(crate::shell::net::ReadState::Budget) => {}
            _ => return,
        }
    }
}

/// One superblock block as read from disk: CRC made right, then decoded at an offset
/// taken from the input. Whatever decodes must keep its areas inside the device.
pub fn superblock(data: &[u8]) {
    let mut b = vec![0u8; SUPERBLOCK_BYTES as usize];
    let n = data.len().min(b.len());
    b[..n].copy_from_slice(&data[..n]);
    let crc = crc32fast::hash(&b[..4092]);
    codec::put_u32(&mut b, 4092, crc);
    let offset = codec::u64_at(&b, 64).unwrap_or(0);
    if let Ok(sb) = Superblock::decode(&b, offset) {
        let l = sb.layout;
        assert!(l.data_bytes <= l.bitmap_offset && l.al_offset < l.superblock_offset);
        assert_eq!(Superblock::decode(&sb.encode(), offset).as_ref(), Ok(&sb));
    }
}

/// A small device image whose end holds a superblock (CRC made right) over a bitmap and
/// an activity log from the input: read as `tandemd` reads it at start, then attached
/// to a core.
pub fn metadata(data: &[u8]) {
    let Some((&size_pages, rest)) = data.split_first() else {
        return;
    };
    let dev_bytes = (u64::from(size_pages) + 4) * 4096;
    let mut dev = vec![0u8; dev_bytes as usize];
    let n = rest.len().min(dev.len());
    // The input fills the device from its end: the metadata is there.
    let start = dev.len() - n;
    dev[start..].copy_from_slice(&rest[..n]);
    let sb_at = dev.len() - SUPERBLOCK_BYTES as usize;
    codec::put_u64(&mut dev, sb_at, crate::core::meta::MAGIC);
    let crc = crc32fast::hash(&dev[sb_at..sb_at + 4092]);
    codec::put_u32(&mut dev, sb_at + 4092, crc);
    let md = Metadata::read_with(dev_bytes, |off, len| {
        let s = (off as usize).min(dev.len());
        let e = s.saturating_add(len).min(dev.len());
        let mut v = dev[s..e].to_vec();
        v.resize(len, 0);
        v
    });
    if let Ok(md) = md {
        let params = fuzz_params(md.sb.resource.clone());
        let _ = crate::core::resource::Resource::new(params, md, Instant(0));
    }
}

/// Activity-log transaction blocks as a ring (each block's CRC made right): the newest
/// is restored, and extents are planned on it.
pub fn activity_log(data: &[u8]) {
    let mut ring = data.to_vec();
    ring.resize(ring.len().div_ceil(TXN_BYTES).max(1) * TXN_BYTES, 0);
    for block in ring.chunks_mut(TXN_BYTES) {
        codec::put_u32(block, 0, 0x4C41_4E54u32);
        codec::put_u16(block, 4, 1u16);
        let crc = crc32fast::hash(&block[..TXN_BYTES - 4]);
        codec::put_u32(block, TXN_BYTES - 4, crc);
    }
    if let Some(t) = AlTxn::newest_in_ring(&ring) {
        assert_eq!(AlTxn::decode(&t.encode()).as_ref(), Some(&t));
        let mut al = ActivityLog::new(7, 4 << 20, 16);
        al.restore(&t);
        let first = t.extents.first().copied().unwrap_or(0);
        let _ = al.plan(first..first.saturating_add(2));
        let _ = al.clear();
    }
}

/// The witness's state file (CRC made right): decoded state encodes back to the same
/// bytes, and a witness built on it answers a promotion without panicking, whatever
/// term it holds.
pub fn witness_state(data: &[u8]) {
    let mut b = data.to_vec();
    if b.len() >= 20 {
        b[..8].copy_from_slice(witness::STATE_MAGIC);
        codec::put_u32(&mut b, 8, witness::STATE_VERSION);
        let len = b.len() - 20;
        codec::put_u32(&mut b, 12, len as u32);
        let crc = crc32fast::hash(&b[20..]);
        codec::put_u32(&mut b, 16, crc);
    }
    if let Ok(state) = witness::decode_state(&b) {
        assert_eq!(
            witness::decode_state(&witness::encode_state(&state)),
            Ok(state.clone())
        );
        let names: Vec<String> = state.keys().cloned().collect();
        let mut w = Witness::new(100, Instant(0), state);
        for name in names {
            let term = w.state()[&name].term;
            let req = witness::Request {
                op: witness::Op::Promote,
                resource: name,
                term,
                peer: String::new(),
                uptodate: true,
                force: false,
                primary: false,
                seq: 0,
            };
            let out = w.handle(Instant(1000), "alpha", &req);
            assert!(
                !out.reply.granted || out.reply.term > term,
                "a term went backwards"
            );
        }
    }
}

/// Witness requests as they arrive (frames, CRC made right), handled in order by one
/// witness; every staged change is committed as if stored. Terms never go backwards.
pub fn witness_request(data: &[u8]) {
    let mut w = Witness::new(10, Instant(0), BTreeMap::new());
    let mut b = data.to_vec();
    let mut at = 0;
    let mut now = 0u64;
    let mut terms: BTreeMap<String, u64> = BTreeMap::new();
    while at + HEADER_BYTES <= b.len() {
        b[at + 4] = 30; // a WitnessRequest
        let n = fix_frame(&mut b[at..]);
        if let Ok(Some((Msg::WitnessRequest(req), _, _))) = wire::decode_frame(&b[at..]) {
            now += 7;
            let node = if at % 2 == 0 { "alpha" } else { "beta" };
            let out = w.handle(Instant(now), node, &req);
            if let Some(staged) = out.persist {
                w.commit(staged);
            }
            let t = w.state().get(&req.resource).map_or(0, |s| s.term);
            let old = terms.insert(req.resource.clone(), t).unwrap_or(0);
            assert!(t >= old, "term went from {old} to {t}");
        }
        at += n.max(1);
    }
}

/// One FUSE request as `/dev/fuse` returns it (the header's length made to match), for
/// a writable and a read-only device; and the INIT exchange.
pub fn fuse_request(data: &[u8]) {
    use crate::shell::fuse;
    let mut b = data.to_vec();
    if b.len() >= 4 {
        let len = b.len() as u32;
        codec::put_u32(&mut b, 0, len);
    }
    for writable in [true, false] {
        let _ = fuse::parse(
            &b,
            fuse::Shape {
                data_bytes: 64 << 20,
                writable,
            },
        );
    }
    let _ = fuse::init_reply(&b);
}

/// A config file and a witness config.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::config::Config::parse(&text, "fuzz.toml");
    let _ = crate::config::WitnessConfig::parse(&text, "fuzz.toml");
}

/// A line on the control socket.
pub fn control_request(data: &[u8]) {
    if let Ok(req) = serde_json::from_slice::<crate::shell::control::Request>(data) {
        let back = serde_json::to_vec(&req).unwrap_or_default();
        let again: Result<crate::shell::control::Request, _> = serde_json::from_slice(&back);
        assert_eq!(again.ok(), Some(req));
    }
}

/// What an authenticated peer may send: a stream of frames (CRC made right) handled by
/// a core that is secondary and connected, whatever their order or values. The core
/// must never panic, nor ask to write outside its data area.
pub fn peer_messages(data: &[u8]) {
    use crate::core::resource::{Action, BufId, Resource};
    let layout = match Layout::compute(8 << 20, 4096, 8) {
        Ok(l) => l,
        Err(_) => return,
    };
    let uuid = crate::core::meta::assume_clean_uuid("r0", layout.data_bytes);
    let sb = Superblock::fresh(layout, "r0", "alpha", 1 << 20, 7, Some(uuid));
    let md = Metadata {
        sb,
        bitmap_bytes: vec![0; layout.bitmap_bytes as usize],
        al_ring: vec![0; 8 * 4096],
    };
    let mut r = Resource::new(fuzz_params("r0".into()), md, Instant(0));
    r.handle_peer_connected(Instant(1));
    let mut b = data.to_vec();
    let mut at = 0;
    let mut now = 1u64;
    let mut next_buf = 1u64;
    while at + HEADER_BYTES <= b.len() {
        let n = fix_frame(&mut b[at..]);
        if let Ok(Some((msg, payload, _))) = wire::decode_frame(&b[at..]) {
            now += 3;
            let term = wire::frame_term(&b[at..]).unwrap_or(0);
            let buf = (!payload.is_empty()).then(|| {
                next_buf += 1;
                BufId(next_buf)
            });
            r.handle_peer_message(Instant(now), term, msg, buf);
            r.handle_timeout(Instant(now));
        }
        while let Some(a) = r.poll_action() {
            match a {
                Action::DiskWrite { io, offset, .. } => {
                    assert!(offset < layout.data_bytes, "a data write at {offset}");
                    r.handle_disk_done(Instant(now), io, true);
                }
                Action::DiskRead {
                    io, offset, len, ..
                } => {
                    assert!(offset + u64::from(len) <= layout.data_bytes);
                    r.handle_disk_done(Instant(now), io, true);
                }
                Action::DiskFlush { io } | Action::MetaWrite { io, .. } => {
                    r.handle_disk_done(Instant(now), io, true)
                }
                Action::Witness { .. } => r.handle_witness_reply(Instant(now), None),
                _ => {}
            }
        }
        at += n.max(1);
    }
}

fn fuzz_params(resource: String) -> crate::core::resource::Params {
    crate::core::resource::Params {
        resource,
        local_node: "alpha".into(),
        peer_node: "beta".into(),
        protocol: crate::core::Protocol::C,
        ping_interval_ms: 100,
        ping_timeout_ms: 1000,
        resync_window_bytes: 1 << 20,
        resync_chunk_bytes: 64 << 10,
        seed: 1,
        witness: true,
        lease_ms: 1000,
        promote_margin_ms: 200,
        on_no_quorum: crate::core::quorum::OnNoQuorum::SuspendIo,
        fencing: crate::core::quorum::Fencing::Resource,
        auto_promote: true,
        witness_seq_base: 1,
        fence_peer_timeout_ms: 1000,
        fail_back_to_peer: false,
        fail_back_delay_ms: 1000,
    }
}
