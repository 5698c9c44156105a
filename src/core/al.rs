//! The activity log: the set of "hot" extents that may hold writes the peer does not have.
//!
//! A write to an extent outside the set first commits an AL transaction. After a primary
//! crash every extent in the last committed set counts as out of sync. Each transaction is
//! one 4 KiB block in a ring, carrying the whole active set, a number and a CRC, so that
//! recovery takes the newest valid block and a torn write costs nothing.

use std::collections::HashMap;

use crate::core::codec;

pub const TXN_BYTES: usize = 4096;
const TXN_MAGIC: u32 = 0x4C41_4E54; // "TNAL"
const TXN_VERSION: u16 = 1;
const TXN_HEADER: usize = 16;
/// Largest active set one transaction block can carry.
pub const MAX_EXTENTS: usize = (TXN_BYTES - TXN_HEADER - 4) / 4;
/// The highest transaction number accepted from disk: far beyond what a device writes
/// in its life, and far from wrapping.
pub const MAX_TXN_NUMBER: u64 = 1 << 62;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlTxn {
    pub number: u64,
    pub extents: Vec<u32>,
}

impl AlTxn {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; TXN_BYTES];
        codec::put_u32(&mut b, 0, TXN_MAGIC);
        codec::put_u16(&mut b, 4, TXN_VERSION);
        codec::put_u16(&mut b, 6, self.extents.len() as u16);
        codec::put_u64(&mut b, 8, self.number);
        for (i, e) in self.extents.iter().enumerate() {
            codec::put_u32(&mut b, TXN_HEADER + i * 4, *e);
        }
        let crc = crc32fast::hash(&b[..TXN_BYTES - 4]);
        codec::put_u32(&mut b, TXN_BYTES - 4, crc);
        b
    }

    /// `None` for a block that is empty, torn or not a transaction.
    pub fn decode(b: &[u8]) -> Option<AlTxn> {
        if b.len() < TXN_BYTES {
            return None;
        }
        if codec::u32_at(b, 0)? != TXN_MAGIC || codec::u16_at(b, 4)? != TXN_VERSION {
            return None;
        }
        if crc32fast::hash(&b[..TXN_BYTES - 4]) != codec::u32_at(b, TXN_BYTES - 4)? {
            return None;
        }
        let count = codec::u16_at(b, 6)? as usize;
        if count > MAX_EXTENTS {
            return None;
        }
        let extents = (0..count)
            .map(|i| codec::u32_at(b, TXN_HEADER + i * 4))
            .collect::<Option<Vec<u32>>>()?;
        Some(AlTxn {
            number: codec::u64_at(b, 8)?,
            extents,
        })
    }

    /// The newest valid transaction in a ring of `TXN_BYTES` blocks.
    pub fn newest_in_ring(ring: &[u8]) -> Option<AlTxn> {
        ring.chunks(TXN_BYTES)
            .filter_map(AlTxn::decode)
            .max_by_key(|t| t.number)
    }
}

/// In-memory activity log: active extents in LRU order, with reference counts of the
/// writes using them.
#[derive(Debug, Clone)]
pub struct ActivityLog {
    capacity: usize,
    extent_bytes: u64,
    ring_slots: u64,
    /// Front = least recently used.
    active: Vec<u32>,
    refs: HashMap<u32, u32>,
    last_txn: u64,
}

/// Why an extent set cannot be made active now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlBlocked {
    /// Every slot holds an extent with writes in flight; wait for one to finish.
    AllSlotsBusy,
    /// The request touches more extents than the log holds: it can never be served.
    TooManyExtents { needed: usize, capacity: usize },
}

/// The fewest extents an activity log may hold: a request of up to 4 MiB touches at
/// most 2 extents of 4 MiB, and a few more keep concurrent writers from evicting each
/// other's (DRBD 8.4's minimum).
pub const MIN_EXTENTS: usize = 7;

impl ActivityLog {
    pub fn new(capacity: usize, extent_bytes: u64, ring_slots: u64) -> ActivityLog {
        ActivityLog {
            capacity: capacity.clamp(1, MAX_EXTENTS),
            extent_bytes,
            ring_slots: ring_slots.max(1),
            active: Vec::new(),
            refs: HashMap::new(),
            last_txn: 0,
        }
    }

    /// Restore from the newest committed transaction.
    pub fn restore(&mut self, txn: &AlTxn) {
        self.active = txn.extents.iter().copied().take(self.capacity).collect();
        self.last_txn = txn.number;
    }

    pub fn extent_bytes(&self) -> u64 {
        self.extent_bytes
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn active_extents(&self) -> &[u32] {
        &self.active
    }
    pub fn last_txn(&self) -> u64 {
        self.last_txn
    }

    /// The extents a byte range touches (the range is inside the device: the caller
    /// checked it).
    pub fn extents_of(&self, offset: u64, len: u64) -> std::ops::Range<u32> {
        let eb = self.extent_bytes.max(1);
        let first = offset / eb;
        let last = offset.saturating_add(len.max(1) - 1) / eb;
        first as u32..(last as u32).saturating_add(1)
    }

    /// Extents of the range that are not active yet.
    pub fn missing(&self, extents: std::ops::Range<u32>) -> Vec<u32> {
        extents.filter(|e| !self.active.contains(e)).collect()
    }

    /// Make every extent of `needed` active, evicting idle extents but never one of
    /// `needed` itself (which would only have to come back: a livelock of transactions).
    /// Returns the evicted extents and the transaction to commit before any write to the
    /// new extents may start.
    pub fn plan(
        &mut self,
        needed: std::ops::Range<u32>,
    ) -> Result<(Vec<u32>, AlTxn, u64), AlBlocked> {
        if needed.len() > self.capacity {
            return Err(AlBlocked::TooManyExtents {
                needed: needed.len(),
                capacity: self.capacity,
            });
        }
        let missing = self.missing(needed.clone());
        let need = (self.active.len() + missing.len()).saturating_sub(self.capacity);
        let idle: Vec<u32> = self
            .active
            .iter()
            .copied()
            .filter(|e| self.refs.get(e).copied().unwrap_or(0) == 0 && !needed.contains(e))
            .take(need)
            .collect();
        if idle.len() < need {
            return Err(AlBlocked::AllSlotsBusy);
        }
        self.active.retain(|e| !idle.contains(e));
        self.active.extend_from_slice(&missing);
        // Numbers from disk are checked at attach (`MAX_TXN_NUMBER`); never wrap.
        self.last_txn = self.last_txn.saturating_add(1);
        let txn = AlTxn {
            number: self.last_txn,
            extents: self.active.clone(),
        };
        let slot = self.last_txn % self.ring_slots;
        Ok((idle, txn, slot))
    }

    /// A write starts using the extents (they must be active).
    pub fn acquire(&mut self, extents: std::ops::Range<u32>) {
        for e in extents {
            *self.refs.entry(e).or_insert(0) += 1;
            if let Some(pos) = self.active.iter().position(|&x| x == e) {
                let x = self.active.remove(pos);
                self.active.push(x);
            }
        }
    }

    pub fn release(&mut self, extents: std::ops::Range<u32>) {
        for e in extents {
            if let Some(r) = self.refs.get_mut(&e) {
                *r -= 1;
                if *r == 0 {
                    self.refs.remove(&e);
                }
            }
        }
    }

    /// A clean shutdown: nothing is hot any more.
    pub fn clear(&mut self) -> (AlTxn, u64) {
        self.active.retain(|e| self.refs.contains_key(e));
        self.last_txn = self.last_txn.saturating_add(1);
        (
            AlTxn {
                number: self.last_txn,
                extents: self.active.clone(),
            },
            self.last_txn % self.ring_slots,
        )
    }
}
