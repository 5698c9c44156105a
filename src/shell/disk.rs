//! The backing-disk driver: io_uring with O_DIRECT and many requests in flight, or a
//! pread/pwrite fallback where io_uring is not allowed (chosen at open, and logged).
//!
//! Requests go to one worker thread over a channel; completions come back through a
//! callback, tagged with the caller's number. Buffers are 4 KiB aligned so that O_DIRECT
//! accepts them, and shared (`Arc`) so that a write's payload is never copied between the
//! network, the core and the disk.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

pub const ALIGN: usize = 4096;

/// A zeroed, 4 KiB aligned byte buffer.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        let cap = len.div_ceil(ALIGN).max(1) * ALIGN;
        let layout = Layout::from_size_align(cap, ALIGN).expect("aligned layout of a sane size");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, layout }
    }
    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() >= len initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this very layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

pub enum DiskOp {
    Write {
        offset: u64,
        buf: Arc<AlignedBuf>,
    },
    Read {
        offset: u64,
        len: usize,
    },
    /// fdatasync of the whole device.
    Flush,
}

pub struct Completion {
    pub tag: u64,
    /// For reads, the data.
    pub result: io::Result<Option<AlignedBuf>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    IoUring,
    Sync,
}

pub struct Disk {
    tx: Option<Sender<(u64, DiskOp)>>,
    pub backend: Backend,
    pub direct: bool,
    pub size_bytes: u64,
    worker: Option<JoinHandle<()>>,
}

const RING_ENTRIES: u32 = 128;

impl Disk {
    /// Open the backing device. `want_uring = false` forces the fallback.
    pub fn open(
        path: &Path,
        want_uring: bool,
        on_done: Box<dyn Fn(Completion) + Send>,
    ) -> io::Result<Disk> {
        let (file, direct) = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                tracing::warn!(path = %path.display(), "O_DIRECT not supported here; using buffered I/O");
                (OpenOptions::new().read(true).write(true).open(path)?, false)
            }
            Err(e) => return Err(e),
        };
        let size_bytes = {
            let mut f = &file;
            io::Seek::seek(&mut f, io::SeekFrom::End(0))?
        };
        let (tx, rx) = channel();
        let ring = if want_uring {
            match io_uring::IoUring::new(RING_ENTRIES) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring not available; using pread/pwrite");
                    None
                }
            }
        } else {
            tracing::info!("io_uring disabled by configuration; using pread/pwrite");
            None
        };
        let backend = if ring.is_some() {
            Backend::IoUring
        } else {
            Backend::Sync
        };
        let worker = std::thread::Builder::new()
            .name("tandem-disk".into())
            .spawn(move || match ring {
                Some(r) => uring_worker(file, r, rx, on_done),
                None => sync_worker(file, rx, on_done),
            })?;
        Ok(Disk {
            tx: Some(tx),
            backend,
            direct,
            size_bytes,
            worker: Some(worker),
        })
    }

    pub fn submit(&self, tag: u64, op: DiskOp) {
        if let Some(tx) = &self.tx {
            // The worker only goes away when the Disk is dropped.
            let _ = tx.send((tag, op));
        }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn sync_worker(file: File, rx: Receiver<(u64, DiskOp)>, on_done: Box<dyn Fn(Completion) + Send>) {
    for (tag, op) in rx {
        let result = match op {
            DiskOp::Write { offset, buf } => {
                file.write_all_at(buf.as_slice(), offset).map(|_| None)
            }
            DiskOp::Read { offset, len } => {
                let mut b = AlignedBuf::zeroed(len);
                file.read_exact_at(b.as_mut_slice(), offset)
                    .map(|_| Some(b))
            }
            DiskOp::Flush => file.sync_data().map(|_| None),
        };
        on_done(Completion { tag, result });
    }
}

/// What an in-flight io_uring request keeps alive until its completion.
enum Held {
    // Never read: holding the Arc keeps the payload alive while the kernel reads it.
    Write(#[allow(dead_code)] Arc<AlignedBuf>),
    Read(AlignedBuf),
    Flush,
}

fn uring_worker(
    file: File,
    mut ring: io_uring::IoUring,
    rx: Receiver<(u64, DiskOp)>,
    on_done: Box<dyn Fn(Completion) + Send>,
) {
    use io_uring::{opcode, types};
    let fd = types::Fd(file.as_raw_fd());
    let mut in_flight: HashMap<u64, (u64, Held, usize)> = HashMap::new();
    let mut next_id: u64 = 1;
    let mut closed = false;
    // Wait for completions at most this long before looking for new requests, so that a
    // request arriving while others are in flight is not held up.
    let wait = types::Timespec::new().nsec(100_000);
    loop {
        let mut new = Vec::new();
        if in_flight.is_empty() {
            if closed {
                return;
            }
            match rx.recv() {
                Ok(x) => new.push(x),
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(x) => new.push(x),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        for (tag, op) in new {
            let id = next_id;
            next_id += 1;
            let (entry, held, want) = match op {
                DiskOp::Write { offset, buf } => {
                    let e = opcode::Write::new(fd, buf.as_slice().as_ptr(), buf.len() as u32)
                        .offset(offset)
                        .build();
                    let n = buf.len();
                    (e, Held::Write(buf), n)
                }
                DiskOp::Read { offset, len } => {
                    let mut b = AlignedBuf::zeroed(len);
                    let e = opcode::Read::new(fd, b.as_mut_slice().as_mut_ptr(), len as u32)
                        .offset(offset)
                        .build();
                    (e, Held::Read(b), len)
                }
                DiskOp::Flush => (
                    opcode::Fsync::new(fd)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build(),
                    Held::Flush,
                    0,
                ),
            };
            // The buffer lives in `in_flight` (heap memory that does not move) until the
            // completion arrives.
            in_flight.insert(id, (tag, held, want));
            let entry = entry.user_data(id);
            loop {
                // SAFETY: the entry's buffer stays alive and unmoved in `in_flight`
                // until its completion is reaped below.
                let pushed = unsafe { ring.submission().push(&entry) };
                if pushed.is_ok() {
                    break;
                }
                if let Err(e) = ring.submit() {
                    tracing::error!(error = %e, "io_uring submit failed");
                }
            }
        }
        let args = types::SubmitArgs::new().timespec(&wait);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::ETIME) | Some(nix::libc::EINTR) | Some(nix::libc::EBUSY)
                ) => {}
            Err(e) => tracing::error!(error = %e, "io_uring wait failed"),
        }
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (id, res) in done {
            let Some((tag, held, want)) = in_flight.remove(&id) else {
                continue;
            };
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else if (res as usize) < want {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short transfer: {res} of {want} bytes"),
                ))
            } else {
                Ok(match held {
                    Held::Read(b) => Some(b),
                    _ => None,
                })
            };
            on_done(Completion { tag, result });
        }
    }
}
