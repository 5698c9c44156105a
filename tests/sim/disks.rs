//! Simulated disks: a durable image and a volatile cache that a crash loses in part,
//! and the completion of the disk requests a node makes (with the seed's disk errors).

use super::*;

pub(super) struct SimDisk {
    pub(super) durable: Vec<u8>,
    /// Completed but unflushed data writes, in completion order.
    pub(super) cache: Vec<(u64, Vec<u8>)>,
}

impl SimDisk {
    pub(super) fn view(&self) -> Vec<u8> {
        let mut v = self.durable.clone();
        for (off, data) in &self.cache {
            v[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        v
    }
    pub(super) fn read(&self, off: u64, len: usize) -> Vec<u8> {
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
    pub(super) fn flush(&mut self) {
        for (off, data) in std::mem::take(&mut self.cache) {
            self.durable[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
    }
    pub(super) fn crash(&mut self, rng: &mut SplitMix64) {
        for (off, data) in std::mem::take(&mut self.cache) {
            if rng.below(2) == 0 {
                self.durable[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
        }
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord, Clone, Debug)]
pub(super) enum DiskKind {
    Write { offset: u64, buf: u64 },
    Read { offset: u64, len: u32, buf: u64 },
    Flush,
    Meta { offset: u64, bytes: Vec<u8> },
}

impl Sim {
    pub(super) fn on_disk_done(&mut self, node: usize, inc: u64, io: u64, kind: DiskKind) {
        if self.nodes[node].incarnation != inc || self.nodes[node].node.is_none() {
            return;
        }
        let fails = !matches!(kind, DiskKind::Read { .. }) && self.mix.hit(self.mix.disk_error);
        let half = self.mix.rng.below(2) == 0;
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
                if !fails || half {
                    n.disk.cache.push((offset, data));
                }
            }
            DiskKind::Read { offset, len, buf } => {
                let d = n.disk.read(offset, len as usize);
                n.bufs.insert(BufId(buf), d);
            }
            DiskKind::Flush if fails => {}
            DiskKind::Flush => n.disk.flush(),
            DiskKind::Meta { .. } if fails => {}
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
        if fails {
            self.log(|| format!("DISK ERROR on node {node}"));
        }
        let now = self.local(node);
        if let Some(r) = self.nodes[node].node.as_mut() {
            r.handle_disk_done(now, IoId(io), !fails);
        }
        self.drain(node);
    }
}
