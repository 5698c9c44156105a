//! The peer wire protocol: frames and messages (see `docs/wire-protocol.md`).
//!
//! A frame is a 28-byte header (magic, kind, fields length, data length, the sender's
//! term, CRC32 over header, fields and data), the message's fields, then any block data.
//! The term is the fencing token: every replication message carries it, so a receiver
//! can refuse anything from an older term. Block data is
//! carried apart from the fields so that a receiver can read it straight into an aligned
//! buffer and hand it to the disk without a copy.

use crate::core::codec::{self, Reader, Writer};
use crate::core::uuid::{Generation, HISTORY_LEN};
use crate::core::witness;

pub const FRAME_MAGIC: u32 = 0x4D44_4E54; // "TNDM"
pub const PROTOCOL_VERSION: u32 = 2;
pub const HEADER_BYTES: usize = 28;
pub const MAX_FIELDS_BYTES: u32 = 64 * 1024;
/// Flag bits of a witness request.
pub const WITNESS_UPTODATE: u8 = 1;
pub const WITNESS_FORCE: u8 = 2;
pub const WITNESS_PRIMARY: u8 = 4;
pub const MAX_DATA_BYTES: u32 = 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("bad frame magic {0:#010x}")]
    Magic(u32),
    #[error("frame too large: {0} field bytes, {1} data bytes")]
    TooLarge(u32, u32),
    #[error("frame CRC mismatch")]
    Crc,
    #[error("unknown message kind {0}")]
    Kind(u8),
    #[error("malformed {0} message")]
    Malformed(&'static str),
}

/// Which TCP connection a message travels on: acknowledgements never queue behind data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Data,
    Meta,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub resource: String,
    pub node: String,
    pub data_bytes: u64,
    pub block_bytes: u64,
    pub gen: Generation,
    pub flags: u32,
    /// The term in which the sender's current data generation began: after a split,
    /// the generation of the older term yields.
    pub gen_term: u64,
}

pub const HELLO_CRASHED_PRIMARY: u32 = 1;
pub const HELLO_INCONSISTENT: u32 = 2;
pub const HELLO_OUTDATED: u32 = 4;
pub const HELLO_PRIMARY: u32 = 8;
pub const HELLO_DISCARD_MY_DATA: u32 = 16;
/// The sender's bitmap marks blocks out of sync.
pub const HELLO_OUT_OF_SYNC: u32 = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    // Authentication, before anything else on a connection (shell-level handshake).
    AuthChallenge {
        nonce: [u8; 32],
    },
    AuthResponse {
        nonce: [u8; 32],
        mac: [u8; 32],
    },
    AuthProof {
        mac: [u8; 32],
    },
    /// First message after authentication: which resource and channel this socket is.
    Attach {
        resource: String,
        node: String,
        channel: u8,
    },
    // Replication, between the cores.
    Hello(Hello),
    BitmapRuns {
        runs: Vec<(u64, u64)>,
    },
    BitmapEnd,
    Data {
        seq: u64,
        epoch: u64,
        offset: u64,
        len: u32,
    },
    Barrier {
        epoch: u64,
    },
    RecvAck {
        seq: u64,
    },
    WriteAck {
        seq: u64,
    },
    NegAck {
        seq: u64,
    },
    BarrierAck {
        epoch: u64,
    },
    ResyncData {
        offset: u64,
        len: u32,
    },
    ResyncAck {
        offset: u64,
        len: u32,
        ok: bool,
    },
    ResyncDone {
        gen: Generation,
    },
    State {
        primary: bool,
        disk: u8,
    },
    Ping {
        id: u64,
    },
    PingAck {
        id: u64,
    },
    /// A primary that has just demoted for a switchover asks its peer to take over.
    Handover,
    // Between a data node and the witness.
    WitnessRequest(witness::Request),
    WitnessReply(witness::Reply),
}

impl Msg {
    pub fn kind(&self) -> u8 {
        match self {
            Msg::AuthChallenge { .. } => 1,
            Msg::AuthResponse { .. } => 2,
            Msg::AuthProof { .. } => 3,
            Msg::Attach { .. } => 4,
            Msg::Hello(_) => 10,
            Msg::BitmapRuns { .. } => 11,
            Msg::BitmapEnd => 12,
            Msg::Data { .. } => 13,
            Msg::Barrier { .. } => 14,
            Msg::RecvAck { .. } => 15,
            Msg::WriteAck { .. } => 16,
            Msg::NegAck { .. } => 17,
            Msg::BarrierAck { .. } => 18,
            Msg::ResyncData { .. } => 19,
            Msg::ResyncAck { .. } => 20,
            Msg::ResyncDone { .. } => 21,
            Msg::State { .. } => 22,
            Msg::Ping { .. } => 23,
            Msg::PingAck { .. } => 24,
            Msg::Handover => 25,
            Msg::WitnessRequest(_) => 30,
            Msg::WitnessReply(_) => 31,
        }
    }

    pub fn channel(&self) -> Channel {
        match self {
            Msg::RecvAck { .. }
            | Msg::WriteAck { .. }
            | Msg::NegAck { .. }
            | Msg::BarrierAck { .. }
            | Msg::ResyncAck { .. }
            | Msg::Ping { .. }
            | Msg::PingAck { .. } => Channel::Meta,
            _ => Channel::Data,
        }
    }

    /// Bytes of block data that follow the fields.
    pub fn data_len(&self) -> u32 {
        match self {
            Msg::Data { len, .. } | Msg::ResyncData { len, .. } => *len,
            _ => 0,
        }
    }

    fn encode_fields(&self, e: &mut Enc) {
        match self {
            Msg::AuthChallenge { nonce } => e.bytes(nonce),
            Msg::AuthResponse { nonce, mac } => {
                e.bytes(nonce);
                e.bytes(mac);
            }
            Msg::AuthProof { mac } => e.bytes(mac),
            Msg::Attach {
                resource,
                node,
                channel,
            } => {
                e.str(resource);
                e.str(node);
                e.u8(*channel);
            }
            Msg::Hello(h) => {
                e.u32(h.version);
                e.str(&h.resource);
                e.str(&h.node);
                e.u64(h.data_bytes);
                e.u64(h.block_bytes);
                e.gen(&h.gen);
                e.u32(h.flags);
                e.u64(h.gen_term);
            }
            Msg::BitmapRuns { runs } => {
                e.u32(runs.len() as u32);
                for (s, l) in runs {
                    e.u64(*s);
                    e.u64(*l);
                }
            }
            Msg::BitmapEnd | Msg::Handover => {}
            Msg::Data {
                seq,
                epoch,
                offset,
                len,
            } => {
                e.u64(*seq);
                e.u64(*epoch);
                e.u64(*offset);
                e.u32(*len);
            }
            Msg::Barrier { epoch } | Msg::BarrierAck { epoch } => e.u64(*epoch),
            Msg::RecvAck { seq } | Msg::WriteAck { seq } | Msg::NegAck { seq } => e.u64(*seq),
            Msg::ResyncData { offset, len } => {
                e.u64(*offset);
                e.u32(*len);
            }
            Msg::ResyncAck { offset, len, ok } => {
                e.u64(*offset);
                e.u32(*len);
                e.u8(*ok as u8);
            }
            Msg::ResyncDone { gen } => e.gen(gen),
            Msg::State { primary, disk } => {
                e.u8(*primary as u8);
                e.u8(*disk);
            }
            Msg::Ping { id } | Msg::PingAck { id } => e.u64(*id),
            Msg::WitnessRequest(r) => {
                e.u8(r.op as u8);
                e.str(&r.resource);
                e.u64(r.term);
                e.str(&r.peer);
                let flag = |on: bool, bit: u8| if on { bit } else { 0 };
                e.u8(flag(r.uptodate, WITNESS_UPTODATE)
                    | flag(r.force, WITNESS_FORCE)
                    | flag(r.primary, WITNESS_PRIMARY));
                e.u64(r.seq);
            }
            Msg::WitnessReply(r) => {
                e.u8(r.granted as u8);
                e.u64(r.term);
                e.u64(r.lease_ms);
                e.str(&r.primary);
                let n = r.up_to_date.len().min(255);
                e.u8(n as u8);
                for u in &r.up_to_date[..n] {
                    e.str(u);
                }
                e.str(&r.reason);
            }
        }
    }

    /// Encode header and fields, stamped with the sender's `term`; the caller sends
    /// `data_len()` bytes of data after them.
    pub fn encode(&self, term: u64, data: &[u8]) -> Vec<u8> {
        let mut e = Enc(Writer::with_capacity(64));
        e.0 .0.resize(HEADER_BYTES, 0);
        self.encode_fields(&mut e);
        let mut b = e.0.into_inner();
        let fields_len = (b.len() - HEADER_BYTES) as u32;
        codec::put_u32(&mut b, 0, FRAME_MAGIC);
        b[4] = self.kind();
        codec::put_u32(&mut b, 8, fields_len);
        codec::put_u32(&mut b, 12, data.len() as u32);
        codec::put_u64(&mut b, 16, term);
        let mut h = crc32fast::Hasher::new();
        h.update(&b[0..24]);
        h.update(&b[HEADER_BYTES..]);
        h.update(data);
        let crc = h.finalize();
        codec::put_u32(&mut b, 24, crc);
        b
    }

    pub fn decode(hdr: &FrameHeader, fields: &[u8]) -> Result<Msg, WireError> {
        let mut d = Dec(Reader::new(fields));
        let m = match hdr.kind {
            1 => Msg::AuthChallenge {
                nonce: d.arr("auth")?,
            },
            2 => Msg::AuthResponse {
                nonce: d.arr("auth")?,
                mac: d.arr("auth")?,
            },
            3 => Msg::AuthProof {
                mac: d.arr("auth")?,
            },
            4 => Msg::Attach {
                resource: d.str("attach")?,
                node: d.str("attach")?,
                channel: d.u8("attach")?,
            },
            10 => Msg::Hello(Hello {
                version: d.u32("hello")?,
                resource: d.str("hello")?,
                node: d.str("hello")?,
                data_bytes: d.u64("hello")?,
                block_bytes: d.u64("hello")?,
                gen: d.gen("hello")?,
                flags: d.u32("hello")?,
                gen_term: d.u64("hello")?,
            }),
            11 => {
                let n = d.u32("bitmap")? as usize;
                if n > fields.len() / 16 {
                    return Err(WireError::Malformed("bitmap"));
                }
                let mut runs = Vec::with_capacity(n);
                for _ in 0..n {
                    runs.push((d.u64("bitmap")?, d.u64("bitmap")?));
                }
                Msg::BitmapRuns { runs }
            }
            12 => Msg::BitmapEnd,
            13 => Msg::Data {
                seq: d.u64("data")?,
                epoch: d.u64("data")?,
                offset: d.u64("data")?,
                len: d.u32("data")?,
            },
            14 => Msg::Barrier {
                epoch: d.u64("barrier")?,
            },
            15 => Msg::RecvAck { seq: d.u64("ack")? },
            16 => Msg::WriteAck { seq: d.u64("ack")? },
            17 => Msg::NegAck { seq: d.u64("ack")? },
            18 => Msg::BarrierAck {
                epoch: d.u64("barrier-ack")?,
            },
            19 => Msg::ResyncData {
                offset: d.u64("resync-data")?,
                len: d.u32("resync-data")?,
            },
            20 => Msg::ResyncAck {
                offset: d.u64("resync-ack")?,
                len: d.u32("resync-ack")?,
                ok: d.u8("resync-ack")? != 0,
            },
            21 => Msg::ResyncDone {
                gen: d.gen("resync-done")?,
            },
            22 => Msg::State {
                primary: d.u8("state")? != 0,
                disk: d.u8("state")?,
            },
            23 => Msg::Ping { id: d.u64("ping")? },
            24 => Msg::PingAck { id: d.u64("ping")? },
            25 => Msg::Handover,
            30 => {
                let what = "witness request";
                let op = witness::Op::from_code(d.u8(what)?).ok_or(WireError::Malformed(what))?;
                let resource = d.str(what)?;
                let term = d.u64(what)?;
                let peer = d.str(what)?;
                let flags = d.u8(what)?;
                if flags & !(WITNESS_UPTODATE | WITNESS_FORCE | WITNESS_PRIMARY) != 0 {
                    return Err(WireError::Malformed(what));
                }
                Msg::WitnessRequest(witness::Request {
                    op,
                    resource,
                    term,
                    peer,
                    uptodate: flags & WITNESS_UPTODATE != 0,
                    force: flags & WITNESS_FORCE != 0,
                    primary: flags & WITNESS_PRIMARY != 0,
                    seq: d.u64(what)?,
                })
            }
            31 => {
                let granted = d.u8("witness reply")? != 0;
                let term = d.u64("witness reply")?;
                let lease_ms = d.u64("witness reply")?;
                let primary = d.str("witness reply")?;
                let n = d.u8("witness reply")? as usize;
                let mut up_to_date = Vec::with_capacity(n);
                for _ in 0..n {
                    up_to_date.push(d.str("witness reply")?);
                }
                Msg::WitnessReply(witness::Reply {
                    granted,
                    term,
                    lease_ms,
                    primary,
                    up_to_date,
                    reason: d.str("witness reply")?,
                })
            }
            k => return Err(WireError::Kind(k)),
        };
        if !d.0.is_empty() {
            return Err(WireError::Malformed("trailing bytes in"));
        }
        if m.data_len() != hdr.data_len {
            return Err(WireError::Malformed("data length of"));
        }
        Ok(m)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u8,
    pub fields_len: u32,
    pub data_len: u32,
    /// The sender's term when it sent the frame.
    pub term: u64,
    pub crc: u32,
    raw: [u8; 24],
}

impl FrameHeader {
    pub fn decode(b: &[u8; HEADER_BYTES]) -> Result<FrameHeader, WireError> {
        // `b` is a whole header: every field is there.
        let u32_at = |o| codec::u32_at(b, o).unwrap_or(0);
        let magic = u32_at(0);
        if magic != FRAME_MAGIC {
            return Err(WireError::Magic(magic));
        }
        let (fields_len, data_len) = (u32_at(8), u32_at(12));
        if fields_len > MAX_FIELDS_BYTES || data_len > MAX_DATA_BYTES {
            return Err(WireError::TooLarge(fields_len, data_len));
        }
        let mut raw = [0u8; 24];
        raw.copy_from_slice(&b[..24]);
        Ok(FrameHeader {
            kind: b[4],
            fields_len,
            data_len,
            term: codec::u64_at(b, 16).unwrap_or(0),
            crc: u32_at(24),
            raw,
        })
    }

    pub fn check_crc(&self, fields: &[u8], data: &[u8]) -> Result<(), WireError> {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.raw);
        h.update(fields);
        h.update(data);
        if h.finalize() == self.crc {
            Ok(())
        } else {
            Err(WireError::Crc)
        }
    }
}

/// A decoded frame: message, its block data, bytes used.
pub type DecodedFrame<'a> = (Msg, &'a [u8], usize);

/// The term a decoded frame's header carries (tests, fuzzing).
pub fn frame_term(b: &[u8]) -> Option<u64> {
    codec::u64_at(b, 16)
}

/// Decode one whole frame from a byte slice (tests, fuzzing). Returns the message, its
/// data and the number of bytes used.
pub fn decode_frame(b: &[u8]) -> Result<Option<DecodedFrame<'_>>, WireError> {
    if b.len() < HEADER_BYTES {
        return Ok(None);
    }
    let mut h = [0u8; HEADER_BYTES];
    h.copy_from_slice(&b[..HEADER_BYTES]);
    let hdr = FrameHeader::decode(&h)?;
    let total = HEADER_BYTES + hdr.fields_len as usize + hdr.data_len as usize;
    if b.len() < total {
        return Ok(None);
    }
    let fields = &b[HEADER_BYTES..HEADER_BYTES + hdr.fields_len as usize];
    let data = &b[HEADER_BYTES + hdr.fields_len as usize..total];
    hdr.check_crc(fields, data)?;
    Ok(Some((Msg::decode(&hdr, fields)?, data, total)))
}

/// The wire's writer: the shared codec, plus generations.
struct Enc(Writer);
impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.u8(v)
    }
    fn u32(&mut self, v: u32) {
        self.0.u32(v)
    }
    fn u64(&mut self, v: u64) {
        self.0.u64(v)
    }
    fn bytes(&mut self, v: &[u8]) {
        self.0.bytes(v)
    }
    fn str(&mut self, s: &str) {
        self.0.str8(s)
    }
    fn gen(&mut self, g: &Generation) {
        self.u64(g.current);
        self.u64(g.bitmap);
        for h in g.history {
            self.u64(h);
        }
    }
}

/// The wire's reader: the shared codec, each field naming the message it belongs to
/// when the input runs short or is malformed.
struct Dec<'a>(Reader<'a>);
impl Dec<'_> {
    fn u8(&mut self, w: &'static str) -> Result<u8, WireError> {
        self.0.u8().ok_or(WireError::Malformed(w))
    }
    fn u32(&mut self, w: &'static str) -> Result<u32, WireError> {
        self.0.u32().ok_or(WireError::Malformed(w))
    }
    fn u64(&mut self, w: &'static str) -> Result<u64, WireError> {
        self.0.u64().ok_or(WireError::Malformed(w))
    }
    fn arr(&mut self, w: &'static str) -> Result<[u8; 32], WireError> {
        self.0.array().ok_or(WireError::Malformed(w))
    }
    fn str(&mut self, w: &'static str) -> Result<String, WireError> {
        self.0.str8().ok_or(WireError::Malformed(w))
    }
    fn gen(&mut self, w: &'static str) -> Result<Generation, WireError> {
        let current = self.u64(w)?;
        let bitmap = self.u64(w)?;
        let mut history = [0u64; HISTORY_LEN];
        for h in history.iter_mut() {
            *h = self.u64(w)?;
        }
        Ok(Generation {
            current,
            bitmap,
            history,
        })
    }
}
