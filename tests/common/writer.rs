//! A writer that stamps 4 KiB blocks on a device, one O_DIRECT write at a time, and logs
//! when each returned and whether it succeeded: what the quorum tests check "no write
//! completed after ..." against.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::DirectWriter;

/// Blocks each writer cycles through; alpha writes from block 0, beta after it.
pub const REGION_BLOCKS: u64 = 2048;

/// One write of the [`StampWriter`]: when it returned, and whether it succeeded.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub done: Instant,
    pub ok: bool,
}

/// Writes block `first + seq % REGION_BLOCKS` with stamp `seq` (counting from `seq0`), one
/// O_DIRECT write at a time, and logs every outcome; stops at the first error.
pub struct StampWriter {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Entry>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StampWriter {
    pub fn start(dev: &Path, first: u64, seq0: u64) -> StampWriter {
        let mut w = DirectWriter::open(dev).expect("open device");
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (s, l) = (stop.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            let mut seq = seq0;
            while !s.load(Ordering::Relaxed) {
                let ok = w.write_block(first + seq % REGION_BLOCKS, seq).is_ok();
                let done = Instant::now();
                l.lock().expect("log").push(Entry { done, ok });
                if !ok {
                    return;
                }
                seq += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        StampWriter {
            stop,
            log,
            thread: Some(thread),
        }
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.log.lock().expect("log").clone()
    }

    pub fn ok_count(&self) -> usize {
        self.entries().iter().filter(|e| e.ok).count()
    }

    /// Wait until `n` more writes succeeded.
    pub fn wait_more_ok(&self, n: usize, secs: u64, what: &str) {
        let start = self.ok_count();
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.ok_count() < start + n {
            assert!(
                Instant::now() < deadline,
                "{what}: fewer than {n} writes succeeded within {secs} s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until a write failed (the writer has stopped).
    pub fn wait_failed(&self, secs: u64, what: &str) -> Entry {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(e) = self.entries().iter().find(|e| !e.ok) {
                return *e;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: writes still succeed after {secs} s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn finish(mut self) -> Vec<Entry> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.entries()
    }
}

impl Drop for StampWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
