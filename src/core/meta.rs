//! On-disk metadata: layout of the internal metadata area and the superblock format.
//!
//! The metadata lives at the end of the backing device:
//! `[ data | bitmap | activity-log ring | superblock ]`, every part 4 KiB aligned. The
//! superblock carries a magic, a version, the sizes, the node, the generation UUIDs, the
//! flags and a CRC over all of it. Pure encode/decode; the shells do the I/O.

use crate::core::bitmap::Bitmap;
use crate::core::codec;
use crate::core::uuid::{Generation, HISTORY_LEN};

pub const SUPERBLOCK_BYTES: u64 = 4096;
pub const MAGIC: u64 = u64::from_le_bytes(*b"TANDEMSB");
pub const VERSION: u32 = 1;
pub const ALIGN: u64 = 4096;
const NAME_BYTES: usize = 64;

pub const FLAG_CONSISTENT: u32 = 1;
pub const FLAG_OUTDATED: u32 = 2;
/// Set while primary; found set at attach means the node crashed as primary.
pub const FLAG_PRIMARY_ACTIVE: u32 = 4;
/// The activity log of a crashed primary was folded into the bitmap and must be resynced
/// with this node as source.
pub const FLAG_CRASHED_PRIMARY: u32 = 8;

/// Where each part of the metadata lives on the backing device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub device_bytes: u64,
    pub data_bytes: u64,
    pub block_bytes: u64,
    pub bitmap_offset: u64,
    pub bitmap_bytes: u64,
    pub al_offset: u64,
    pub al_slots: u64,
    pub superblock_offset: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetaError {
    #[error("backing device of {0} bytes is too small for the metadata")]
    TooSmall(u64),
    #[error("no Tandem metadata at the end of the disk (no superblock at byte {0}). A new disk: run `tandemctl create-md`. A disk that held Tandem metadata and was shrunk: restore its size first (metadata lives at the end; create-md would drop the generation history and force a full sync)")]
    NoMagic(u64),
    #[error("the disk is {now} bytes, but its metadata was written for {was} bytes: it was resized. Restore its size to {was} bytes; Tandem cannot resize yet (create-md --force would drop the generation history and force a full sync)")]
    SizeChanged { was: u64, now: u64 },
    #[error(
        "superblock at byte {offset} is corrupt: CRC {found:#010x}, expected {expected:#010x}"
    )]
    BadCrc {
        offset: u64,
        found: u32,
        expected: u32,
    },
    #[error("superblock version {0} is not supported (this build knows version {VERSION})")]
    Version(u32),
    #[error("superblock is inconsistent: {0}")]
    Invalid(String),
}

impl Layout {
    /// Compute the layout for a backing device of `device_bytes`.
    pub fn compute(
        device_bytes: u64,
        block_bytes: u64,
        al_slots: u64,
    ) -> Result<Layout, MetaError> {
        let dev = device_bytes / ALIGN * ALIGN;
        let al_bytes = al_slots * crate::core::al::TXN_BYTES as u64;
        let fixed = SUPERBLOCK_BYTES + al_bytes;
        if dev <= fixed + 2 * ALIGN {
            return Err(MetaError::TooSmall(device_bytes));
        }
        let rough = dev - fixed - Bitmap::disk_bytes(dev, block_bytes);
        let data_bytes = rough / block_bytes * block_bytes;
        if data_bytes == 0 {
            return Err(MetaError::TooSmall(device_bytes));
        }
        let bitmap_bytes = Bitmap::disk_bytes(data_bytes, block_bytes);
        let superblock_offset = dev - SUPERBLOCK_BYTES;
        let al_offset = superblock_offset - al_bytes;
        let bitmap_offset = al_offset - bitmap_bytes;
        Ok(Layout {
            device_bytes,
            data_bytes,
            block_bytes,
            bitmap_offset,
            bitmap_bytes,
            al_offset,
            al_slots,
            superblock_offset,
        })
    }

    /// First byte of the metadata area.
    pub fn metadata_start(&self) -> u64 {
        self.bitmap_offset
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub flags: u32,
    pub layout: Layout,
    pub al_extent_bytes: u64,
    pub al_extents: u32,
    pub gen: Generation,
    pub resource: String,
    pub node: String,
    /// The highest term this node has seen (the witness's fencing token); it never
    /// accepts a replication message from an older one.
    pub term: u64,
    /// The term in which the current generation began (when a primary started it).
    pub gen_term: u64,
}

fn put_name(b: &mut [u8], s: &str) {
    let n = s.len().min(NAME_BYTES - 1);
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// A name as `put_name` wrote it: NUL-terminated within its field, and made of what the
/// config allows in resource and node names.
fn get_name(b: &[u8], what: &str) -> Result<String, MetaError> {
    let bad = || MetaError::Invalid(format!("the {what} name is not a valid name"));
    let end = b.iter().position(|&c| c == 0).ok_or_else(bad)?;
    let name = &b[..end];
    if name.is_empty()
        || !name
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Err(bad());
    }
    Ok(String::from_utf8_lossy(name).into_owned())
}

impl Superblock {
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
    pub fn set(&mut self, flag: u32, on: bool) {
        if on {
            self.flags |= flag
        } else {
            self.flags &= !flag
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SUPERBLOCK_BYTES as usize];
        let l = &self.layout;
        codec::put_u64(&mut b, 0, MAGIC);
        codec::put_u32(&mut b, 8, VERSION);
        codec::put_u32(&mut b, 12, self.flags);
        codec::put_u64(&mut b, 16, l.device_bytes);
        codec::put_u64(&mut b, 24, l.data_bytes);
        codec::put_u32(&mut b, 32, l.block_bytes as u32);
        codec::put_u32(&mut b, 36, self.al_extent_bytes as u32);
        codec::put_u32(&mut b, 40, self.al_extents);
        codec::put_u32(&mut b, 44, l.al_slots as u32);
        codec::put_u64(&mut b, 48, l.bitmap_offset);
        codec::put_u64(&mut b, 56, l.al_offset);
        codec::put_u64(&mut b, 64, l.superblock_offset);
        codec::put_u64(&mut b, 72, self.gen.current);
        codec::put_u64(&mut b, 80, self.gen.bitmap);
        for i in 0..HISTORY_LEN {
            codec::put_u64(&mut b, 88 + 8 * i, self.gen.history[i]);
        }
        put_name(&mut b[128..128 + NAME_BYTES], &self.resource);
        put_name(&mut b[192..192 + NAME_BYTES], &self.node);
        codec::put_u64(&mut b, 256, self.term);
        codec::put_u64(&mut b, 264, self.gen_term);
        let crc = crc32fast::hash(&b[..4092]);
        codec::put_u32(&mut b, 4092, crc);
        b
    }

    /// Decode and check a superblock read from `offset`.
    pub fn decode(b: &[u8], offset: u64) -> Result<Superblock, MetaError> {
        if b.len() < SUPERBLOCK_BYTES as usize {
            return Err(MetaError::Invalid(format!(
                "short superblock: {} bytes",
                b.len()
            )));
        }
        // The block is whole (checked above): every field is there.
        let u64_at = |o| codec::u64_at(b, o).unwrap_or(0);
        let u32_at = |o| codec::u32_at(b, o).unwrap_or(0);
        if u64_at(0) != MAGIC {
            return Err(MetaError::NoMagic(offset));
        }
        let expected = crc32fast::hash(&b[..4092]);
        let found = u32_at(4092);
        if found != expected {
            return Err(MetaError::BadCrc {
                offset,
                found,
                expected,
            });
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(MetaError::Version(version));
        }
        let layout = Layout {
            device_bytes: u64_at(16),
            data_bytes: u64_at(24),
            block_bytes: u32_at(32) as u64,
            bitmap_offset: u64_at(48),
            bitmap_bytes: 0,
            al_offset: u64_at(56),
            al_slots: u32_at(44) as u64,
            superblock_offset: u64_at(64),
        };
        let mut layout = layout;
        if layout.block_bytes == 0 || !layout.block_bytes.is_multiple_of(512) {
            return Err(MetaError::Invalid(format!(
                "block size {}",
                layout.block_bytes
            )));
        }
        layout.bitmap_bytes = Bitmap::disk_bytes(layout.data_bytes, layout.block_bytes);
        // Every value here was read from disk: the areas must fit, in order, below the
        // superblock, which is where it was read from (no sum may overflow on the way).
        let fits = (|| {
            let bitmap_end = layout.bitmap_offset.checked_add(layout.bitmap_bytes)?;
            let al_bytes = layout
                .al_slots
                .checked_mul(crate::core::al::TXN_BYTES as u64)?;
            let al_end = layout.al_offset.checked_add(al_bytes)?;
            Some(
                layout.data_bytes > 0
                    && layout.data_bytes.is_multiple_of(layout.block_bytes)
                    && layout.al_slots > 0
                    && layout.data_bytes <= layout.bitmap_offset
                    && bitmap_end <= layout.al_offset
                    && al_end <= layout.superblock_offset
                    && layout.superblock_offset == offset,
            )
        })();
        if fits != Some(true) {
            return Err(MetaError::Invalid(
                "area offsets do not fit together".into(),
            ));
        }
        let mut history = [0u64; HISTORY_LEN];
        for (i, h) in history.iter_mut().enumerate() {
            *h = u64_at(88 + 8 * i);
        }
        let al_extent_bytes = u32_at(36) as u64;
        if al_extent_bytes == 0 || !al_extent_bytes.is_multiple_of(layout.block_bytes) {
            return Err(MetaError::Invalid(format!(
                "AL extent size {al_extent_bytes}"
            )));
        }
        Ok(Superblock {
            flags: u32_at(12),
            layout,
            al_extent_bytes,
            al_extents: u32_at(40),
            gen: Generation {
                current: u64_at(72),
                bitmap: u64_at(80),
                history,
            },
            resource: get_name(&b[128..128 + NAME_BYTES], "resource")?,
            node: get_name(&b[192..192 + NAME_BYTES], "node")?,
            term: u64_at(256),
            gen_term: u64_at(264),
        })
    }
}

/// Everything `attach` reads from the metadata area.
#[derive(Debug, Clone)]
pub struct Metadata {
    pub sb: Superblock,
    pub bitmap_bytes: Vec<u8>,
    pub al_ring: Vec<u8>,
}

impl Superblock {
    /// A fresh superblock as `create-md` writes it. With `clean_uuid` the node starts
    /// consistent with that current UUID (both nodes of a new, empty pair given the same
    /// UUID skip the initial full sync); without it, it starts inconsistent and just
    /// created.
    pub fn fresh(
        layout: Layout,
        resource: &str,
        node: &str,
        al_extent_bytes: u64,
        al_extents: u32,
        clean_uuid: Option<u64>,
    ) -> Superblock {
        let mut gen = Generation::just_created();
        let mut flags = 0;
        if let Some(u) = clean_uuid {
            gen.current = u & !1 | 0x10;
            flags |= FLAG_CONSISTENT;
        }
        Superblock {
            flags,
            layout,
            al_extent_bytes,
            al_extents,
            gen,
            resource: resource.to_string(),
            node: node.to_string(),
            term: 0,
            gen_term: 0,
        }
    }
}

/// The UUID both nodes of a new pair get from `create-md --assume-clean`: derived from
/// what they share, so that no coordination is needed.
pub fn assume_clean_uuid(resource: &str, data_bytes: u64) -> u64 {
    let mut h = crc32fast::Hasher::new();
    h.update(resource.as_bytes());
    h.update(&data_bytes.to_le_bytes());
    let a = h.finalize() as u64;
    let mut h = crc32fast::Hasher::new();
    h.update(&data_bytes.to_le_bytes());
    h.update(resource.as_bytes());
    (a << 32) | h.finalize() as u64
}

impl Metadata {
    /// Read and check all metadata through `read(offset, len)`, given the size of the
    /// backing device. Without a superblock at the end, the last [`RESIZE_SCAN_BYTES`]
    /// are searched for one written when the disk was smaller: a grown disk is reported
    /// as such, not as a disk without metadata.
    pub fn read_with(
        device_bytes: u64,
        mut read: impl FnMut(u64, usize) -> Vec<u8>,
    ) -> Result<Metadata, MetaError> {
        let dev = device_bytes / ALIGN * ALIGN;
        if dev < SUPERBLOCK_BYTES {
            return Err(MetaError::TooSmall(device_bytes));
        }
        let off = dev - SUPERBLOCK_BYTES;
        let sb = match Superblock::decode(&read(off, SUPERBLOCK_BYTES as usize), off) {
            Err(MetaError::NoMagic(at)) => {
                return Err(match find_older_superblock(off, &mut read) {
                    Some(was) => MetaError::SizeChanged {
                        was,
                        now: device_bytes,
                    },
                    None => MetaError::NoMagic(at),
                })
            }
            r => r?,
        };
        let l = sb.layout;
        let bitmap_bytes = read(l.bitmap_offset, l.bitmap_bytes as usize);
        // `decode` checked that the ring fits below the superblock.
        let al_ring = read(l.al_offset, (l.al_slots * 4096) as usize);
        if let Some(t) = crate::core::al::AlTxn::newest_in_ring(&al_ring) {
            if t.number > crate::core::al::MAX_TXN_NUMBER {
                return Err(MetaError::Invalid(format!(
                    "activity-log transaction number {} is out of range",
                    t.number
                )));
            }
        }
        Ok(Metadata {
            sb,
            bitmap_bytes,
            al_ring,
        })
    }
}

/// How far back from the end a superblock of a smaller (since grown) disk is looked for.
pub const RESIZE_SCAN_BYTES: u64 = 1 << 30;

/// A valid superblock below `end` (the offset where it should be), within
/// [`RESIZE_SCAN_BYTES`]: the device size it was written for.
fn find_older_superblock(end: u64, read: &mut impl FnMut(u64, usize) -> Vec<u8>) -> Option<u64> {
    const CHUNK: u64 = 1 << 20;
    let floor = end.saturating_sub(RESIZE_SCAN_BYTES);
    let mut hi = end;
    while hi > floor {
        let lo = hi.saturating_sub(CHUNK).max(floor);
        let buf = read(lo, (hi - lo) as usize);
        for k in (0..buf.len() / ALIGN as usize).rev() {
            let at = k * ALIGN as usize;
            let Some(block) = buf.get(at..at + SUPERBLOCK_BYTES as usize) else {
                continue;
            };
            if codec::u64_at(block, 0) != Some(MAGIC) {
                continue;
            }
            let offset = lo + at as u64;
            if let Ok(sb) = Superblock::decode(block, offset) {
                return Some(sb.layout.device_bytes);
            }
        }
        hi = lo;
    }
    None
}
