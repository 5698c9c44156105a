//! The backing-disk driver on a real file, with io_uring and with the pread/pwrite
//! fallback: many writes in flight, a flush, reads back, and errors reported, not panics.

use std::path::PathBuf;
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::Duration;

use tandem::shell::disk::{AlignedBuf, Backend, Completion, Disk, DiskOp};

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

fn run(want_uring: bool) -> Backend {
    let f = temp_file(if want_uring { "uring" } else { "sync" }, 8 << 20);
    let (tx, rx) = channel::<Completion>();
    let disk = Disk::open(
        &f.0,
        want_uring,
        Box::new(move |c| {
            let _ = tx.send(c);
        }),
    )
    .expect("open");
    assert_eq!(disk.size_bytes, 8 << 20);
    let wait = |n: usize| -> Vec<Completion> {
        (0..n)
            .map(|_| {
                rx.recv_timeout(Duration::from_secs(10))
                    .expect("completion within 10 s")
            })
            .collect()
    };
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
    let mut tags: Vec<u64> = wait(64)
        .into_iter()
        .map(|c| {
            assert!(c.result.is_ok());
            c.tag
        })
        .collect();
    tags.sort();
    assert_eq!(tags, (0..64).collect::<Vec<_>>());
    disk.submit(100, DiskOp::Flush);
    assert!(wait(1)[0].result.is_ok(), "flush");
    for k in 0..64u64 {
        disk.submit(
            200 + k,
            DiskOp::Read {
                offset: k * 8192,
                len: 4096,
            },
        );
    }
    for c in wait(64) {
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
    assert!(wait(1)[0].result.is_err(), "read past end must fail");
    disk.backend
}

#[test]
fn io_uring_backend_round_trips() {
    // Where io_uring is forbidden the driver falls back; the data must round-trip either way.
    let b = run(true);
    eprintln!("backend chosen: {b:?}");
}

#[test]
fn fallback_backend_round_trips() {
    assert_eq!(run(false), Backend::Sync);
}
