//! The FUSE kernel protocol, as far as the device file needs it: decoding requests read
//! from `/dev/fuse` and encoding the replies.
//!
//! Tandem speaks the protocol itself instead of through a library's session thread, so
//! that the driver thread can read requests straight from `/dev/fuse` (a readiness poll
//! in its io_uring): a database write then reaches the core without any thread
//! hand-off. The file system is tiny and fixed: a root directory holding one regular
//! file, [`DATA_FILE`], of the resource's size. Everything here is pure (bytes in, bytes
//! out) and tested without a mount; `frontend` does the I/O.
//!
//! Layouts follow `include/uapi/linux/fuse.h`, little-endian as on every host Tandem
//! runs on. Protocol 7.31 is spoken (the kernel adapts to it); 7.28 is the oldest kernel
//! side accepted, for `max_pages` (1 MiB writes).

/// Requests reach the daemon in multiples of this, at offsets that are multiples of it.
pub const SECTOR_BYTES: u64 = 4096;
/// The file inside the FUSE mount that the loop device is attached to.
pub const DATA_FILE: &str = "data";
/// Largest write the kernel is told to send, and so the largest request.
pub const MAX_WRITE_BYTES: u32 = 1 << 20;
/// A read of `/dev/fuse` must offer room for the largest request: its headers and data.
pub const REQUEST_BUF_BYTES: usize = MAX_WRITE_BYTES as usize + 4096;

pub const IN_HEADER_BYTES: usize = 40;
pub const OUT_HEADER_BYTES: usize = 16;
const WRITE_IN_BYTES: usize = 40;
const READ_IN_BYTES: usize = 40;
const INIT_IN_BYTES: usize = 16;

const KERNEL_MAJOR: u32 = 7;
const OUR_MINOR: u32 = 31;
const OLDEST_KERNEL_MINOR: u32 = 28;

pub const ROOT_INO: u64 = 1;
pub const DATA_INO: u64 = 2;
/// How long the kernel may cache entries and attributes, in seconds. Nothing changes.
const TTL_SECS: u64 = 1;

pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
}

const FUSE_ASYNC_READ: u32 = 1 << 0;
const FUSE_BIG_WRITES: u32 = 1 << 5;
pub const FUSE_ASYNC_DIO: u32 = 1 << 15;
const FUSE_MAX_PAGES: u32 = 1 << 22;
const FOPEN_DIRECT_IO: u32 = 1 << 0;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const DT_DIR: u32 = 4;
const DT_REG: u32 = 8;

use crate::core::codec::{self, u32_at, u64_at, Writer};

/// `fuse_in_header`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

impl InHeader {
    pub fn parse(b: &[u8]) -> Option<InHeader> {
        Some(InHeader {
            len: u32_at(b, 0)?,
            opcode: u32_at(b, 4)?,
            unique: u64_at(b, 8)?,
            nodeid: u64_at(b, 16)?,
        })
    }
}

/// A reply's header: `fuse_out_header` for `unique`, `error` a negative errno or 0.
pub fn out_header(unique: u64, error: i32, payload_bytes: usize) -> [u8; OUT_HEADER_BYTES] {
    let mut h = [0u8; OUT_HEADER_BYTES];
    codec::put_u32(&mut h, 0, (OUT_HEADER_BYTES + payload_bytes) as u32);
    codec::put_u32(&mut h, 4, error as u32);
    codec::put_u64(&mut h, 8, unique);
    h
}

/// What one request asks of the device file.
#[derive(Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// Answered at once with this payload or errno (metadata, or a refused request).
    Reply {
        unique: u64,
        result: Result<Vec<u8>, i32>,
    },
    Write {
        unique: u64,
        offset: u64,
        data: &'a [u8],
    },
    Read {
        unique: u64,
        offset: u64,
        len: u32,
    },
    Fsync {
        unique: u64,
    },
    /// Nothing to answer: forgets, interrupts (the interrupted request is answered when
    /// it completes), or bytes too short to carry a request number.
    None,
}

/// The file system's fixed shape and the state a request may depend on.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub data_bytes: u64,
    pub writable: bool,
}

fn attr(shape: Shape, ino: u64) -> Option<[u8; 88]> {
    let (mode, size, nlink) = match ino {
        ROOT_INO => (S_IFDIR | 0o700, 0, 2),
        DATA_INO => (S_IFREG | 0o600, shape.data_bytes, 1),
        _ => return None,
    };
    let mut a = [0u8; 88];
    codec::put_u64(&mut a, 0, ino);
    codec::put_u64(&mut a, 8, size);
    codec::put_u64(&mut a, 16, size / 512);
    // times (24..60) stay at the epoch
    codec::put_u32(&mut a, 60, mode);
    codec::put_u32(&mut a, 64, nlink as u32);
    // uid, gid, rdev: 0
    codec::put_u32(&mut a, 80, SECTOR_BYTES as u32);
    Some(a)
}

fn entry_out(shape: Shape, ino: u64) -> Option<Vec<u8>> {
    let a = attr(shape, ino)?;
    let mut e = Writer::with_capacity(128);
    e.u64(ino);
    e.u64(0); // generation
    e.u64(TTL_SECS); // entry_valid
    e.u64(TTL_SECS); // attr_valid
    e.bytes(&[0u8; 8]); // their nanoseconds
    e.bytes(&a);
    Some(e.into_inner())
}

fn attr_out(shape: Shape, ino: u64) -> Option<Vec<u8>> {
    let a = attr(shape, ino)?;
    let mut e = Writer::with_capacity(104);
    e.u64(TTL_SECS);
    e.bytes(&[0u8; 8]); // nanoseconds, padding
    e.bytes(&a);
    Some(e.into_inner())
}

fn open_out(open_flags: u32) -> Vec<u8> {
    let mut o = vec![0u8; 16];
    codec::put_u32(&mut o, 8, open_flags);
    o
}

fn statfs_out(shape: Shape) -> Vec<u8> {
    let mut s = vec![0u8; 80];
    codec::put_u64(&mut s, 0, shape.data_bytes / SECTOR_BYTES); // blocks
    codec::put_u64(&mut s, 24, 2u64); // files
    codec::put_u32(&mut s, 40, SECTOR_BYTES as u32); // bsize
    codec::put_u32(&mut s, 44, 255u32); // namelen
    codec::put_u32(&mut s, 48, SECTOR_BYTES as u32); // frsize
    s
}

/// `fuse_dirent`s from entry `offset` on, as many as fit in `max_bytes`.
fn readdir_out(offset: u64, max_bytes: usize) -> Vec<u8> {
    let entries = [
        (ROOT_INO, DT_DIR, "."),
        (ROOT_INO, DT_DIR, ".."),
        (DATA_INO, DT_REG, DATA_FILE),
    ];
    let mut out = Writer::default();
    for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
        let rec = (24 + name.len()).div_ceil(8) * 8;
        if out.0.len() + rec > max_bytes {
            break;
        }
        out.u64(*ino);
        out.u64((i + 1) as u64); // offset of the next
        out.u32(name.len() as u32);
        out.u32(*kind);
        out.bytes(name.as_bytes());
        out.0.resize(out.0.len().div_ceil(8) * 8, 0);
    }
    out.into_inner()
}

/// Decode one request as read from `/dev/fuse` (exactly the bytes one read returned).
pub fn parse(b: &[u8], shape: Shape) -> Request<'_> {
    let Some(h) = InHeader::parse(b) else {
        return Request::None;
    };
    let unique = h.unique;
    let reply = |result| Request::Reply { unique, result };
    if h.len as usize != b.len() {
        return reply(Err(nix::libc::EINVAL));
    }
    // The header's first fields parse from 24 bytes; the whole header is 40.
    let Some(arg) = b.get(IN_HEADER_BYTES..) else {
        return reply(Err(nix::libc::EINVAL));
    };
    match h.opcode {
        op::FORGET | op::BATCH_FORGET | op::INTERRUPT => Request::None,
        op::LOOKUP => {
            let name = arg.split(|&c| c == 0).next().unwrap_or(&[]);
            match (h.nodeid, entry_out(shape, DATA_INO)) {
                (ROOT_INO, Some(e)) if name == DATA_FILE.as_bytes() => reply(Ok(e)),
                _ => reply(Err(nix::libc::ENOENT)),
            }
        }
        op::GETATTR => reply(attr_out(shape, h.nodeid).ok_or(nix::libc::ENOENT)),
        // The size is the resource's; nothing else about the file can change.
        op::SETATTR => reply(Err(nix::libc::EPERM)),
        op::OPEN => {
            if h.nodeid != DATA_INO {
                return reply(Err(nix::libc::EISDIR));
            }
            let Some(flags) = u32_at(arg, 0) else {
                return reply(Err(nix::libc::EINVAL));
            };
            let wants_write = flags as i32 & nix::libc::O_ACCMODE != nix::libc::O_RDONLY;
            if wants_write && !shape.writable {
                return reply(Err(nix::libc::EROFS));
            }
            // Direct I/O: no second page cache under the loop device's, and a
            // secondary that becomes primary never serves pages cached before the
            // resync changed them.
            reply(Ok(open_out(FOPEN_DIRECT_IO)))
        }
        op::READ => match (u64_at(arg, 8), u32_at(arg, 16)) {
            _ if h.nodeid != DATA_INO => reply(Err(nix::libc::EISDIR)),
            (Some(offset), Some(len)) if arg.len() >= READ_IN_BYTES => Request::Read {
                unique,
                offset,
                len,
            },
            _ => reply(Err(nix::libc::EINVAL)),
        },
        op::WRITE => {
            let (Some(offset), Some(size)) = (u64_at(arg, 8), u32_at(arg, 16)) else {
                return reply(Err(nix::libc::EINVAL));
            };
            let Some(data) = arg.get(WRITE_IN_BYTES..) else {
                return reply(Err(nix::libc::EINVAL));
            };
            if data.len() != size as usize || h.nodeid != DATA_INO {
                return reply(Err(nix::libc::EINVAL));
            }
            if !shape.writable {
                return reply(Err(nix::libc::EROFS));
            }
            if !offset.is_multiple_of(SECTOR_BYTES)
                || !(data.len() as u64).is_multiple_of(SECTOR_BYTES)
            {
                tracing::warn!(
                    offset,
                    len = data.len(),
                    "write not 4 KiB aligned refused; use the loop device"
                );
                return reply(Err(nix::libc::EINVAL));
            }
            if offset.saturating_add(data.len() as u64) > shape.data_bytes {
                return reply(Err(nix::libc::ENOSPC));
            }
            Request::Write {
                unique,
                offset,
                data,
            }
        }
        op::FSYNC if h.nodeid == DATA_INO => Request::Fsync { unique },
        // close(2): nothing is cached here, so there is nothing to write back.
        op::FLUSH | op::RELEASE | op::RELEASEDIR | op::DESTROY => reply(Ok(Vec::new())),
        op::STATFS => reply(Ok(statfs_out(shape))),
        op::OPENDIR if h.nodeid == ROOT_INO => reply(Ok(open_out(0))),
        op::OPENDIR => reply(Err(nix::libc::ENOTDIR)),
        op::READDIR => match (u64_at(arg, 8), u32_at(arg, 16)) {
            _ if h.nodeid != ROOT_INO => reply(Err(nix::libc::ENOTDIR)),
            (Some(offset), Some(size)) => reply(Ok(readdir_out(offset, size as usize))),
            _ => reply(Err(nix::libc::EINVAL)),
        },
        // Only at mount; a second one is a kernel we do not understand.
        op::INIT => reply(Err(nix::libc::EIO)),
        // Access checks, xattrs, locks, fallocate and the rest: the kernel takes ENOSYS
        // as "not supported" and, for most, stops asking.
        _ => reply(Err(nix::libc::ENOSYS)),
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InitError {
    #[error("the first FUSE request was not INIT (opcode {0})")]
    NotInit(u32),
    #[error("malformed FUSE INIT request")]
    Malformed,
    #[error("kernel FUSE protocol {major}.{minor}; Tandem needs 7.{OLDEST_KERNEL_MINOR} or newer (Linux 4.20)")]
    TooOld { major: u32, minor: u32 },
}

/// What the INIT exchange settled.
#[derive(Debug, PartialEq, Eq)]
pub struct Init {
    pub unique: u64,
    /// The `fuse_init_out` payload to send back.
    pub reply: Vec<u8>,
    /// Whether the kernel keeps many direct I/O requests in flight.
    pub async_dio: bool,
}

/// Answer the kernel's INIT: protocol 7.31, 1 MiB writes, and asynchronous direct I/O
/// with 64 requests in the background. The loop device submits direct I/O
/// asynchronously; with `FUSE_ASYNC_DIO` the kernel keeps many of those requests in
/// flight instead of one at a time, so a database's fsync does not queue behind
/// writeback (pgbench +25% in protocol C, docs/performance.md).
pub fn init_reply(b: &[u8]) -> Result<Init, InitError> {
    let h = InHeader::parse(b).ok_or(InitError::Malformed)?;
    if h.opcode != op::INIT {
        return Err(InitError::NotInit(h.opcode));
    }
    let arg = b.get(IN_HEADER_BYTES..).ok_or(InitError::Malformed)?;
    if h.len as usize != b.len() || arg.len() < INIT_IN_BYTES {
        return Err(InitError::Malformed);
    }
    let (major, minor) = (
        u32_at(arg, 0).ok_or(InitError::Malformed)?,
        u32_at(arg, 4).ok_or(InitError::Malformed)?,
    );
    let max_readahead = u32_at(arg, 8).ok_or(InitError::Malformed)?;
    let offered = u32_at(arg, 12).ok_or(InitError::Malformed)?;
    if major != KERNEL_MAJOR || minor < OLDEST_KERNEL_MINOR {
        return Err(InitError::TooOld { major, minor });
    }
    let flags = offered & (FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES);
    let mut out = vec![0u8; 64];
    codec::put_u32(&mut out, 0, KERNEL_MAJOR);
    codec::put_u32(&mut out, 4, OUR_MINOR.min(minor));
    codec::put_u32(&mut out, 8, max_readahead);
    codec::put_u32(&mut out, 12, flags);
    codec::put_u16(&mut out, 16, 64u16); // max_background
    codec::put_u16(&mut out, 18, 48u16); // congestion_threshold
    codec::put_u32(&mut out, 20, MAX_WRITE_BYTES);
    codec::put_u32(&mut out, 24, 1u32); // time_gran, ns
    codec::put_u16(&mut out, 28, (MAX_WRITE_BYTES as u64 / SECTOR_BYTES) as u16);
    Ok(Init {
        unique: h.unique,
        reply: out,
        async_dio: flags & FUSE_ASYNC_DIO != 0,
    })
}

/// Build a request as the kernel would (for tests).
pub fn encode_request(opcode: u32, unique: u64, nodeid: u64, arg: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; IN_HEADER_BYTES];
    codec::put_u32(&mut b, 0, (IN_HEADER_BYTES + arg.len()) as u32);
    codec::put_u32(&mut b, 4, opcode);
    codec::put_u64(&mut b, 8, unique);
    codec::put_u64(&mut b, 16, nodeid);
    b.extend_from_slice(arg);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::core::codec::u16_at;

    const SHAPE: Shape = Shape {
        data_bytes: 1 << 30,
        writable: true,
    };

    fn rw_in(offset: u64, size: u32) -> Vec<u8> {
        let mut a = vec![0u8; 40];
        codec::put_u64(&mut a, 8, offset);
        codec::put_u32(&mut a, 16, size);
        a
    }

    fn write_req(offset: u64, data: &[u8]) -> Vec<u8> {
        let mut a = rw_in(offset, data.len() as u32);
        a.extend_from_slice(data);
        encode_request(op::WRITE, 7, DATA_INO, &a)
    }

    fn errno(r: Request) -> i32 {
        match r {
            Request::Reply { result: Err(e), .. } => e,
            other => panic!("expected an error reply, got {other:?}"),
        }
    }

    #[test]
    fn an_aligned_write_is_passed_on_with_its_bytes() {
        let data = vec![0xab; 8192];
        let b = write_req(4096, &data);
        assert_eq!(
            parse(&b, SHAPE),
            Request::Write {
                unique: 7,
                offset: 4096,
                data: &data
            }
        );
    }

    #[test]
    fn bad_writes_are_refused_with_their_errno() {
        let table: [(Vec<u8>, Shape, i32); 5] = [
            (write_req(100, &[0; 4096]), SHAPE, nix::libc::EINVAL),
            (write_req(0, &[0; 100]), SHAPE, nix::libc::EINVAL),
            (write_req(1 << 30, &[0; 4096]), SHAPE, nix::libc::ENOSPC),
            (
                write_req(0, &[0; 4096]),
                Shape {
                    writable: false,
                    ..SHAPE
                },
                nix::libc::EROFS,
            ),
            // The header claims 4096 bytes of data; 8 are there.
            (
                {
                    let mut a = rw_in(0, 4096);
                    a.extend_from_slice(&[0; 8]);
                    encode_request(op::WRITE, 7, DATA_INO, &a)
                },
                SHAPE,
                nix::libc::EINVAL,
            ),
        ];
        for (b, shape, want) in table {
            assert_eq!(errno(parse(&b, shape)), want);
        }
    }

    #[test]
    fn truncated_and_short_requests_are_refused_not_trusted() {
        let mut b = write_req(0, &[1; 4096]);
        b.truncate(100); // the header's length no longer matches
        assert_eq!(errno(parse(&b, SHAPE)), nix::libc::EINVAL);
        // Too short for a header: nothing to answer.
        assert_eq!(parse(&b[..20], SHAPE), Request::None);
        // A read whose arguments are cut short.
        let r = encode_request(op::READ, 3, DATA_INO, &[0; 12]);
        assert_eq!(errno(parse(&r, SHAPE)), nix::libc::EINVAL);
        let o = encode_request(op::OPEN, 3, DATA_INO, &[0; 2]);
        assert_eq!(errno(parse(&o, SHAPE)), nix::libc::EINVAL);
    }

    #[test]
    fn reads_and_fsyncs_are_passed_on() {
        let b = encode_request(op::READ, 9, DATA_INO, &rw_in(8192, 65536));
        assert_eq!(
            parse(&b, SHAPE),
            Request::Read {
                unique: 9,
                offset: 8192,
                len: 65536
            }
        );
        let f = encode_request(op::FSYNC, 10, DATA_INO, &[0; 16]);
        assert_eq!(parse(&f, SHAPE), Request::Fsync { unique: 10 });
    }

    #[test]
    fn lookup_finds_the_data_file_only() {
        let ok = encode_request(op::LOOKUP, 1, ROOT_INO, b"data\0");
        let Request::Reply {
            result: Ok(e),
            unique: 1,
        } = parse(&ok, SHAPE)
        else {
            panic!("lookup of data failed");
        };
        assert_eq!(e.len(), 128);
        assert_eq!(u64_at(&e, 0), Some(DATA_INO));
        assert_eq!(u64_at(&e, 40 + 8), Some(1 << 30), "size");
        assert_eq!(u32_at(&e, 40 + 60), Some(S_IFREG | 0o600), "mode");
        let missing = encode_request(op::LOOKUP, 2, ROOT_INO, b"other\0");
        assert_eq!(errno(parse(&missing, SHAPE)), nix::libc::ENOENT);
    }

    #[test]
    fn open_for_writing_needs_a_writable_device_and_gets_direct_io() {
        let rw = encode_request(
            op::OPEN,
            1,
            DATA_INO,
            &(nix::libc::O_RDWR as u64).to_le_bytes(),
        );
        let ro = encode_request(op::OPEN, 1, DATA_INO, &0u64.to_le_bytes());
        let locked = Shape {
            writable: false,
            ..SHAPE
        };
        assert_eq!(errno(parse(&rw, locked)), nix::libc::EROFS);
        for (b, shape) in [(&rw, SHAPE), (&ro, locked)] {
            let Request::Reply { result: Ok(o), .. } = parse(b, shape) else {
                panic!("open refused");
            };
            assert_eq!(u32_at(&o, 8), Some(FOPEN_DIRECT_IO));
        }
    }

    #[test]
    fn readdir_lists_three_entries_and_resumes_at_an_offset() {
        let all = readdir_out(0, 4096);
        assert_eq!(all.len(), 3 * 32);
        let names: Vec<&[u8]> = (0..3)
            .map(|i| {
                let at = i * 32;
                let n = u32_at(&all, at + 16).unwrap_or(0) as usize;
                &all[at + 24..at + 24 + n]
            })
            .collect();
        assert_eq!(names, [&b"."[..], b"..", b"data"]);
        assert_eq!(readdir_out(2, 4096).len(), 32);
        assert_eq!(readdir_out(3, 4096).len(), 0);
        assert_eq!(readdir_out(0, 40).len(), 32, "only what fits");
    }

    #[test]
    fn unknown_requests_get_enosys_and_forgets_get_nothing() {
        let x = encode_request(22, 5, DATA_INO, b"user.x\0"); // GETXATTR
        assert_eq!(errno(parse(&x, SHAPE)), nix::libc::ENOSYS);
        let f = encode_request(op::FORGET, 6, DATA_INO, &1u64.to_le_bytes());
        assert_eq!(parse(&f, SHAPE), Request::None);
    }

    fn init_req(minor: u32, flags: u32) -> Vec<u8> {
        let mut a = vec![0u8; 64];
        codec::put_u32(&mut a, 0, 7u32);
        codec::put_u32(&mut a, 4, minor);
        codec::put_u32(&mut a, 8, 131072u32);
        codec::put_u32(&mut a, 12, flags);
        encode_request(op::INIT, 1, 0, &a)
    }

    #[test]
    fn init_takes_only_offered_flags_and_asks_for_1_mib_writes() {
        let all = u32::MAX;
        let i = init_reply(&init_req(45, all)).expect("init");
        assert!(i.async_dio);
        assert_eq!(u32_at(&i.reply, 4), Some(OUR_MINOR));
        assert_eq!(
            u32_at(&i.reply, 12),
            Some(FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES)
        );
        assert_eq!(u32_at(&i.reply, 20), Some(MAX_WRITE_BYTES));
        assert_eq!(u16_at(&i.reply, 28), Some(256));
        let bare = init_reply(&init_req(30, FUSE_MAX_PAGES)).expect("init");
        assert!(!bare.async_dio);
        assert_eq!(u32_at(&bare.reply, 4), Some(30), "the kernel's older minor");
        assert_eq!(u32_at(&bare.reply, 12), Some(FUSE_MAX_PAGES));
    }

    #[test]
    fn init_refuses_old_kernels_and_other_requests() {
        assert_eq!(
            init_reply(&init_req(27, 0)),
            Err(InitError::TooOld {
                major: 7,
                minor: 27
            })
        );
        let r = encode_request(op::READ, 1, DATA_INO, &rw_in(0, 4096));
        assert_eq!(init_reply(&r), Err(InitError::NotInit(op::READ)));
        assert_eq!(init_reply(&[0; 10]), Err(InitError::Malformed));
    }
}
