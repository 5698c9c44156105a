//! The out-of-sync bitmap: one bit per block (4 KiB by default) of the data area.
//!
//! Bits are set for blocks written while the peer does not get them; the resync set is
//! the union of both nodes' bitmaps. The on-disk form is split into 4 KiB pages so that
//! only the pages that changed are written.

use crate::core::codec::{Reader, Writer};

/// Bytes per on-disk bitmap page.
pub const PAGE_BYTES: usize = 4096;
const BITS_PER_PAGE: u64 = (PAGE_BYTES * 8) as u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    nbits: u64,
    block_bytes: u64,
    set_count: u64,
    /// Pages changed since they were last written out.
    dirty_pages: Vec<bool>,
}

impl Bitmap {
    pub fn new(data_bytes: u64, block_bytes: u64) -> Bitmap {
        let nbits = data_bytes.div_ceil(block_bytes);
        let pages = Self::pages_for_bits(nbits);
        Bitmap {
            words: vec![0; pages * PAGE_BYTES / 8],
            nbits,
            block_bytes,
            set_count: 0,
            dirty_pages: vec![false; pages],
        }
    }

    pub fn pages_for_bits(nbits: u64) -> usize {
        nbits.div_ceil(BITS_PER_PAGE).max(1) as usize
    }

    /// On-disk size of a bitmap for `data_bytes`.
    pub fn disk_bytes(data_bytes: u64, block_bytes: u64) -> u64 {
        (Self::pages_for_bits(data_bytes.div_ceil(block_bytes)) * PAGE_BYTES) as u64
    }

    pub fn nbits(&self) -> u64 {
        self.nbits
    }
    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }
    pub fn count(&self) -> u64 {
        self.set_count
    }
    pub fn out_of_sync_bytes(&self) -> u64 {
        self.set_count * self.block_bytes
    }

    pub fn get(&self, bit: u64) -> bool {
        bit < self.nbits && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    fn set_bit(&mut self, bit: u64, value: bool) {
        let (w, m) = ((bit / 64) as usize, 1u64 << (bit % 64));
        let was = self.words[w] & m != 0;
        if was == value {
            return;
        }
        if value {
            self.words[w] |= m;
            self.set_count += 1;
        } else {
            self.words[w] &= !m;
            self.set_count -= 1;
        }
        self.dirty_pages[(bit / BITS_PER_PAGE) as usize] = true;
    }

    /// Blocks touched by the byte range, as a bit range.
    pub fn bits_touching(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let first = offset / self.block_bytes;
        let last = (offset + len - 1) / self.block_bytes;
        first.min(self.nbits)..(last + 1).min(self.nbits)
    }

    /// Blocks entirely covered by the byte range.
    pub fn bits_covered(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let first = offset.div_ceil(self.block_bytes);
        let end = (offset + len) / self.block_bytes;
        if end <= first {
            return 0..0;
        }
        first.min(self.nbits)..end.min(self.nbits)
    }

    /// Mark every block the byte range touches as out of sync.
    pub fn set_range(&mut self, offset: u64, len: u64) {
        for b in self.bits_touching(offset, len) {
            self.set_bit(b, true);
        }
    }

    /// Mark blocks entirely covered by the byte range as in sync.
    pub fn clear_range(&mut self, offset: u64, len: u64) {
        for b in self.bits_covered(offset, len) {
            self.set_bit(b, false);
        }
    }

    pub fn set_bits(&mut self, bits: std::ops::Range<u64>) {
        for b in bits.start..bits.end.min(self.nbits) {
            self.set_bit(b, true);
        }
    }

    pub fn set_all(&mut self) {
        self.set_bits(0..self.nbits);
    }

    pub fn clear_all(&mut self) {
        for b in 0..self.nbits {
            self.set_bit(b, false);
        }
    }

    /// First set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut bit = from;
        while bit < self.nbits {
            let w = self.words[(bit / 64) as usize] >> (bit % 64);
            if w != 0 {
                let b = bit + w.trailing_zeros() as u64;
                return (b < self.nbits).then_some(b);
            }
            bit = (bit / 64 + 1) * 64;
        }
        None
    }

    /// Runs of set bits as `(start, len)`, for sending to the peer.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut bit = 0;
        while let Some(start) = self.next_set(bit) {
            let mut end = start + 1;
            while end < self.nbits && self.get(end) {
                end += 1;
            }
            out.push((start, end - start));
            bit = end;
        }
        out
    }

    pub fn page_count(&self) -> usize {
        self.dirty_pages.len()
    }

    /// Pages changed since they were last written out.
    pub fn dirty_page_indices(&self) -> Vec<usize> {
        (0..self.dirty_pages.len())
            .filter(|&i| self.dirty_pages[i])
            .collect()
    }

    /// Pages covering the bit range.
    pub fn pages_for_bit_range(&self, bits: std::ops::Range<u64>) -> std::ops::Range<usize> {
        if bits.is_empty() {
            return 0..0;
        }
        (bits.start / BITS_PER_PAGE) as usize..((bits.end - 1) / BITS_PER_PAGE + 1) as usize
    }

    pub fn is_page_dirty(&self, page: usize) -> bool {
        self.dirty_pages.get(page).copied().unwrap_or(false)
    }

    /// Encode one page for the disk and mark it clean.
    pub fn take_page(&mut self, page: usize) -> Vec<u8> {
        let words_per_page = PAGE_BYTES / 8;
        let mut out = Writer::with_capacity(PAGE_BYTES);
        for w in &self.words[page * words_per_page..(page + 1) * words_per_page] {
            out.u64(*w);
        }
        self.dirty_pages[page] = false;
        out.into_inner()
    }

    /// Load the whole on-disk bitmap. Bits past the end of the device are ignored.
    pub fn load(&mut self, bytes: &[u8]) {
        let mut r = Reader::new(bytes);
        for w in self.words.iter_mut() {
            match r.u64() {
                Some(v) => *w = v,
                None => break,
            }
        }
        // Clear bits beyond nbits so that counting is exact.
        let last = self.nbits;
        for b in last..(self.words.len() as u64 * 64) {
            self.words[(b / 64) as usize] &= !(1 << (b % 64));
        }
        self.set_count = self.words.iter().map(|w| w.count_ones() as u64).sum();
        self.dirty_pages.iter_mut().for_each(|d| *d = false);
    }
}
