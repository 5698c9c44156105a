//! The backing disk on a real file, with io_uring (the ring the driver thread drives) and
//! with the pread/pwrite fallback worker: many writes in flight, a flush, reads back, and
//! errors reported, not panics; and the lock that keeps a second process off a served disk.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::Duration;

use tandem::shell::disk::{AlignedBuf, Completion, Disk, DiskOp, Ring};

struct TempFile(PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp_file(tag: &str, len: u64) -> TempFile {
    // Under target/: a real file system (O_DIRECT works there, unlike tmpfs).
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("disk-{tag}-{}.img", std::process::id()));
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(len))
        .expect("create backing file");
    TempFile(p)
}

/// The two backing disks behind one interface for the test: submit, then collect `n`
/// completions.
trait Backing {
    fn submit(&mut self, tag: u64, op: DiskOp);
    fn wait(&mut self, n: usize) -> Vec<Completion>;
}

impl Backing for Ring {
    fn submit(&mut self, tag: u64, op: DiskOp) {
        Ring::submit(self, tag, op);
    }
    fn wait(&mut self, n: usize) -> Vec<Completion> {
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while out.len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "completions within 10 s"
            );
            out.extend(Ring::wait(self, Some(Duration::from_millis(100))));
        }
        out
    }
}

struct Threaded(Disk, Receiver<Completion>);

impl Backing for Threaded {
    fn submit(&mut self, tag: u64, op: DiskOp) {
        self.0.submit(tag, op);
    }
    fn wait(&mut self, n: usize) -> Vec<Completion> {
        (0..n)
            .map(|_| {
                self.1
                    .recv_timeout(Duration::from_secs(10))
                    .expect("completion within 10 s")
            })
            .collect()
    }
}

fn round_trip(disk: &mut dyn Backing) {
    // 64 writes in flight at once, to distinct 4 KiB blocks.
    for k in 0..64u64 {
        let data: Vec<u8> = (0..4096).map(|i| (i as u64 * 7 + k) as u8).collect();
        disk.submit(
            k,
            DiskOp::Write {
                offset: k * 8192,
                buf: Arc::new(AlignedBuf::from_slice(&data)),
            },
        );
    }
    let mut tags: Vec<u64> = disk
        .wait(64)
        .into_iter()
        .map(|c| {
            assert!(c.result.is_ok());
            c.tag
        })
        .collect();
    tags.sort();
    assert_eq!(tags, (0..64).collect::<Vec<_>>());
    disk.submit(100, DiskOp::Flush);
    assert!(disk.wait(1)[0].result.is_ok(), "flush");
    for k in 0..64u64 {
        disk.submit(
            200 + k,
            DiskOp::Read {
                offset: k * 8192,
                len: 4096,
            },
        );
    }
    for c in disk.wait(64) {
        let k = c.tag - 200;
        let buf = c.result.expect("read ok").expect("data");
        let want: Vec<u8> = (0..4096).map(|i| (i as u64 * 7 + k) as u8).collect();
        assert_eq!(buf.as_slice(), &want[..], "block {k}");
    }
    // Reading past the end is an error the caller sees.
    disk.submit(
        999,
        DiskOp::Read {
            offset: 8 << 20,
            len: 4096,
        },
    );
    assert!(disk.wait(1)[0].result.is_err(), "read past end must fail");
}

#[test]
fn io_uring_ring_round_trips() {
    let f = temp_file("uring", 8 << 20);
    match Ring::open(&f.0) {
        Ok(mut r) => round_trip(&mut r),
        // Where io_uring is forbidden the daemon falls back (next test).
        Err(e) => eprintln!("io_uring not available here: {e}"),
    }
}

#[test]
fn fallback_worker_round_trips() {
    let f = temp_file("sync", 8 << 20);
    let (tx, rx) = channel::<Completion>();
    let disk = Disk::open(
        &f.0,
        Box::new(move |c| {
            let _ = tx.send(c);
        }),
    )
    .expect("open");
    assert_eq!(disk.size_bytes, 8 << 20);
    round_trip(&mut Threaded(disk, rx));
}

#[test]
fn a_disk_served_by_one_process_is_refused_to_another() {
    let f = temp_file("locked", 1 << 20);
    let (file, _, _) = tandem::shell::disk::open_backing(&f.0).expect("first open");
    let e = tandem::shell::disk::open_backing(&f.0).expect_err("second open");
    assert_eq!(e.kind(), std::io::ErrorKind::ResourceBusy, "{e}");
    assert!(e.to_string().contains("in use"), "{e}");
    drop(file);
    assert!(
        tandem::shell::disk::open_backing(&f.0).is_ok(),
        "free again"
    );
}
