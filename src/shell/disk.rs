//! The backing disk: a [`Ring`] (io_uring, O_DIRECT, many requests in flight) that the
//! resource's driver thread submits to and reaps itself, or, where io_uring is not
//! allowed, a [`Disk`]: one pread/pwrite worker thread fed over a channel, its
//! completions returned through a callback. Either way a request carries the caller's
//! tag. Buffers are 4 KiB aligned so that O_DIRECT accepts them, and shared (`Arc`) so
//! that a write's payload is never copied between the network, the core and the disk.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::mpsc::{channel, Receiver, Sender};
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

/// The pread/pwrite backing disk: one worker thread.
pub struct Disk {
    tx: Option<Sender<(u64, DiskOp)>>,
    pub direct: bool,
    pub size_bytes: u64,
    worker: Option<JoinHandle<()>>,
}

const RING_ENTRIES: u32 = 256;

/// Take the exclusive advisory lock every Tandem process holds on a backing disk it
/// writes: a second daemon, or `tandemctl create-md`, is refused while one serves it.
pub fn lock_exclusive(file: &File, path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor this function borrows for the call; no memory
    // is passed.
    let r = unsafe { nix::libc::flock(file.as_raw_fd(), nix::libc::LOCK_EX | nix::libc::LOCK_NB) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(nix::libc::EWOULDBLOCK) {
        return Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!(
                "{} is in use by another process (a tandemd serving it?)",
                path.display()
            ),
        ));
    }
    Err(e)
}

/// Open a backing device for O_DIRECT (buffered where the file system refuses it) and
/// lock it ([`lock_exclusive`]); returns the file, whether it is direct, and its size.
pub fn open_backing(path: &Path) -> io::Result<(File, bool, u64)> {
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
    lock_exclusive(&file, path)?;
    let size_bytes = {
        let mut f = &file;
        io::Seek::seek(&mut f, io::SeekFrom::End(0))?
    };
    Ok((file, direct, size_bytes))
}

impl Disk {
    /// Open the backing device with a pread/pwrite worker thread (the fallback where
    /// io_uring is refused, or `--no-uring`).
    pub fn open(path: &Path, on_done: Box<dyn Fn(Completion) + Send>) -> io::Result<Disk> {
        let (file, direct, size_bytes) = open_backing(path)?;
        let (tx, rx) = channel();
        let worker = std::thread::Builder::new()
            .name("tandem-disk".into())
            .spawn(move || sync_worker(file, rx, on_done))?;
        Ok(Disk {
            tx: Some(tx),
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
    Wake,
    /// A readiness poll on a socket the caller owns.
    Poll,
}

/// Completions of this id are the wake-up eventfd's, not the caller's.
const WAKE_ID: u64 = u64::MAX;

/// An io_uring on the backing device, driven from the thread that owns it: requests go
/// straight into the submission queue and the owner waits for completions itself, so a
/// request costs no hand-off to another thread.
///
/// Other threads wake the owner through an eventfd that the ring keeps a read posted on
/// ([`Ring::watch_eventfd`]): one place to sleep for disk completions and new work alike.
pub struct Ring {
    file: File,
    ring: io_uring::IoUring,
    in_flight: HashMap<u64, (u64, Held, usize)>,
    next_id: u64,
    pub direct: bool,
    pub size_bytes: u64,
    wake_fd: Option<std::os::fd::RawFd>,
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    unsubmitted: u32,
    /// Flushes asked for since the last fdatasync; one fdatasync serves them all.
    flush_tags: Vec<u64>,
    /// Completions made on this thread (flushes), handed out by the next `reap`.
    ready: Vec<Completion>,
}

impl Ring {
    pub fn open(path: &Path) -> io::Result<Ring> {
        let (file, direct, size_bytes) = open_backing(path)?;
        Ring::with_file(file, direct, size_bytes)
    }

    fn with_file(file: File, direct: bool, size_bytes: u64) -> io::Result<Ring> {
        Ok(Ring {
            file,
            ring: io_uring::IoUring::new(RING_ENTRIES)?,
            in_flight: HashMap::new(),
            next_id: 1,
            direct,
            size_bytes,
            wake_fd: None,
            wake_buf: Box::new([0u8; 8]),
            wake_armed: false,
            unsubmitted: 0,
            flush_tags: Vec::new(),
            ready: Vec::new(),
        })
    }

    /// Requests submitted and not yet completed (the wake-up read not counted).
    pub fn in_flight(&self) -> usize {
        self.in_flight.len() - usize::from(self.wake_armed)
            + self.flush_tags.len()
            + self.ready.len()
    }

    /// Keep a read posted on `fd` (an eventfd) so that a write to it ends [`Ring::wait`].
    /// The fd must outlive the ring.
    pub fn watch_eventfd(&mut self, fd: std::os::fd::RawFd) {
        self.wake_fd = Some(fd);
        self.arm_wake();
    }

    fn arm_wake(&mut self) {
        use io_uring::{opcode, types};
        let Some(fd) = self.wake_fd else { return };
        if self.wake_armed {
            return;
        }
        let e = opcode::Read::new(types::Fd(fd), self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE_ID);
        self.in_flight.insert(WAKE_ID, (0, Held::Wake, 0));
        self.wake_armed = true;
        self.push(e);
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) {
        loop {
            // SAFETY: every buffer an entry points at is kept alive and unmoved in
            // `in_flight` (or, for the wake-up read, in `wake_buf`, a Box owned by the
            // ring) until its completion is reaped.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                self.unsubmitted += 1;
                return;
            }
            if let Err(e) = self.ring.submit() {
                tracing::error!(error = %e, "io_uring submit failed");
            }
            self.unsubmitted = 0;
        }
    }

    /// Queue `op`; it starts at the next [`Ring::flush_submissions`] or [`Ring::wait`].
    ///
    /// A flush is not an io_uring request: the owner's thread calls fdatasync itself,
    /// once for every flush asked for since the last one, after submitting the queued
    /// writes. In io_uring an fsync always runs on an io-wq worker thread, and that
    /// hand-off (and the workers' fdatasyncs of the same file running side by side) cost
    /// pgbench on protocol C about a quarter of its throughput here (docs/performance.md).
    /// The price: the thread is blocked for as long as the disk takes to flush.
    pub fn submit(&mut self, tag: u64, op: DiskOp) {
        use io_uring::{opcode, types};
        let fd = types::Fd(self.file.as_raw_fd());
        if let DiskOp::Flush = op {
            self.flush_tags.push(tag);
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
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
            DiskOp::Flush => return,
        };
        // The buffer lives in `in_flight` (heap memory that does not move) until the
        // completion arrives.
        self.in_flight.insert(id, (tag, held, want));
        self.push(entry.user_data(id));
    }

    /// Ask for one completion tagged `tag` once `fd` is readable, closed or in error.
    /// The caller keeps `fd` open until the completion, or cancels with
    /// [`Ring::cancel_polls`].
    pub fn poll_readable(&mut self, tag: u64, fd: std::os::fd::RawFd) {
        use io_uring::{opcode, types};
        let id = self.next_id;
        self.next_id += 1;
        let mask =
            (nix::libc::POLLIN | nix::libc::POLLRDHUP | nix::libc::POLLERR | nix::libc::POLLHUP)
                as u32;
        let e = opcode::PollAdd::new(types::Fd(fd), mask)
            .build()
            .user_data(id);
        self.in_flight.insert(id, (tag, Held::Poll, 0));
        self.push(e);
    }

    /// Cancel the polls tagged `tag` (their completions then come back as errors), so
    /// that the ring lets go of the socket.
    pub fn cancel_polls(&mut self, tag: u64) {
        self.cancel_polls_where(|t| t == tag);
    }

    /// Cancel every poll whose tag passes `pick`. A cancel's own completion has an id
    /// nobody waits for, so `reap` skips it.
    fn cancel_polls_where(&mut self, pick: impl Fn(u64) -> bool) {
        let ids: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, (t, h, _))| pick(*t) && matches!(h, Held::Poll))
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            let cancel_id = self.next_id;
            self.next_id += 1;
            let e = io_uring::opcode::AsyncCancel::new(id)
                .build()
                .user_data(cancel_id);
            self.push(e);
        }
    }

    /// Submit what is queued, wait up to `timeout` (forever with `None`) for at least one
    /// completion, and return the completions of the caller's requests. A wake-up through
    /// the eventfd returns early, possibly with nothing.
    pub fn wait(&mut self, timeout: Option<std::time::Duration>) -> Vec<Completion> {
        use io_uring::types;
        self.flush_submissions();
        // Flushes done here are completions already: look, do not sleep.
        let timeout = match self.ready.is_empty() {
            true => timeout,
            false => Some(std::time::Duration::ZERO),
        };
        let ts;
        let args;
        let r = match timeout {
            Some(t) => {
                ts = types::Timespec::new()
                    .sec(t.as_secs())
                    .nsec(t.subsec_nanos());
                args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        self.unsubmitted = 0;
        match r {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::ETIME) | Some(nix::libc::EINTR) | Some(nix::libc::EBUSY)
                ) => {}
            Err(e) => tracing::error!(error = %e, "io_uring wait failed"),
        }
        self.reap()
    }

    /// Submit what is queued without waiting for it; run the queued flushes.
    pub fn flush_submissions(&mut self) {
        if self.unsubmitted > 0 {
            if let Err(e) = self.ring.submit() {
                tracing::error!(error = %e, "io_uring submit failed");
            }
            self.unsubmitted = 0;
        }
        if self.flush_tags.is_empty() {
            return;
        }
        // A flush covers the writes completed before it was asked for; those are on the
        // disk already, and writes still in flight need not wait for it.
        let r = nix::unistd::fdatasync(self.file.as_raw_fd());
        for tag in self.flush_tags.drain(..) {
            let result = r.map(|()| None).map_err(io::Error::from);
            self.ready.push(Completion { tag, result });
        }
    }

    /// Completions already there, without waiting.
    ///
    /// (Called by `wait` and by the owner between waits.)
    pub fn reap(&mut self) -> Vec<Completion> {
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let mut out = std::mem::take(&mut self.ready);
        for (id, res) in done {
            let Some((tag, held, want)) = self.in_flight.remove(&id) else {
                continue;
            };
            if let Held::Wake = held {
                self.wake_armed = false;
                continue;
            }
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
            out.push(Completion { tag, result });
        }
        self.arm_wake();
        out
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still be reading or writing buffers held in `in_flight`: cancel
        // the wake-up read and wait for everything before the buffers are freed.
        use io_uring::opcode;
        if self.wake_armed {
            let e = opcode::AsyncCancel::new(WAKE_ID)
                .build()
                .user_data(WAKE_ID - 1);
            self.push(e);
        }
        self.cancel_polls_where(|_| true);
        self.wake_fd = None;
        for _ in 0..1000 {
            if self.in_flight.is_empty() {
                return;
            }
            let _ = self.wait(Some(std::time::Duration::from_millis(10)));
            if self.in_flight.len() == 1 && self.wake_armed {
                // Cancel raced with arming; the kernel drops the read with the ring.
                let e = opcode::AsyncCancel::new(WAKE_ID)
                    .build()
                    .user_data(WAKE_ID - 1);
                self.push(e);
            }
        }
        tracing::error!(
            in_flight = self.in_flight.len(),
            "io_uring requests still in flight at close; leaking their buffers"
        );
        for (_, v) in self.in_flight.drain() {
            std::mem::forget(v);
        }
    }
}
