//! FUSE over a loop device, the frontend that works on any Linux: one FUSE file per
//! resource at `RUN_DIR/fuse-RES/data`, attached to a loop device on the primary.
//!
//! Tandem serves the FUSE connection itself ([`crate::shell::fuse`] has the protocol).
//! With io_uring, the resource's driver thread reads `/dev/fuse` when its ring says the
//! device is readable ([`Frontend::read_requests`]), so a request reaches the core without
//! a thread hand-off; without io_uring, a reader thread sends the requests on
//! ([`Frontend::spawn_reader`]). Metadata requests are answered at once.
//!
//! The loop device is attached on promotion and detached on demotion, so on a secondary
//! the device is absent. Its logical block size is 4 KiB, so every request that reaches
//! the daemon is 4 KiB aligned, as O_DIRECT on the backing disk needs.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::shell::disk::AlignedBuf;
use crate::shell::frontend::{
    io_err, AppRequest, BlockDevice, Frontend, FrontendError, RequestState, Submit,
};
use crate::shell::fuse::{self, Request, Shape, DATA_FILE};

/// How long a fresh mount may take to send its INIT request.
const INIT_TIMEOUT_MS: u16 = 5000;

/// The open `/dev/fuse` of one mount; replies go out through it from any thread.
struct Chan {
    fd: OwnedFd,
}

impl Chan {
    fn reply(&self, unique: u64, result: Result<&[u8], i32>) {
        let (error, payload) = match result {
            Ok(p) => (0, p),
            Err(e) => (-e, &[][..]),
        };
        let h = fuse::out_header(unique, error, payload.len());
        match nix::sys::uio::writev(&self.fd, &[IoSlice::new(&h), IoSlice::new(payload)]) {
            Ok(_) => {}
            // The request was interrupted or the mount went away: nobody waits for it.
            Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENODEV) => {
                tracing::debug!(unique, "FUSE reply to a request nobody waits for")
            }
            Err(e) => tracing::warn!(unique, error = %e, "FUSE reply failed"),
        }
    }
}

/// Reads requests from `/dev/fuse` into one buffer big enough for the largest.
struct Reader {
    chan: Arc<Chan>,
    buf: Vec<u8>,
    data_bytes: u64,
    writable: Arc<AtomicBool>,
}

impl Reader {
    /// Read and decode up to `max_requests` requests, answering metadata requests at
    /// once and pushing data requests onto `out`.
    fn read_available(&mut self, max_requests: usize, out: &mut Vec<AppRequest>) -> RequestState {
        for _ in 0..max_requests {
            let n = match nix::unistd::read(self.chan.fd.as_raw_fd(), &mut self.buf) {
                Ok(n) => n,
                Err(nix::errno::Errno::EAGAIN) => return RequestState::WouldBlock,
                // Interrupted, or a request withdrawn before we read it: read on.
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::ENOENT) => continue,
                Err(nix::errno::Errno::ENODEV) => return RequestState::Gone,
                Err(e) => {
                    tracing::error!(error = %e, "reading /dev/fuse failed; the device stops serving");
                    return RequestState::Gone;
                }
            };
            let shape = Shape {
                data_bytes: self.data_bytes,
                writable: self.writable.load(Ordering::Acquire),
            };
            let chan = &self.chan;
            match fuse::parse(&self.buf[..n], shape) {
                Request::None => {}
                Request::Reply { unique, result } => {
                    chan.reply(unique, result.as_deref().map_err(|&e| e))
                }
                Request::Write {
                    unique,
                    offset,
                    data,
                } => {
                    let chan = chan.clone();
                    let mut written = [0u8; 8];
                    crate::core::codec::put_u32(&mut written, 0, data.len() as u32);
                    // The one copy of a write's payload: from the request buffer into an
                    // aligned one that O_DIRECT and the network share from here on.
                    out.push(AppRequest::Write {
                        offset,
                        data: AlignedBuf::from_slice(data),
                        done: Box::new(move |r| chan.reply(unique, r.map(|()| &written[..]))),
                    });
                }
                Request::Read {
                    unique,
                    offset,
                    len,
                } => {
                    let chan = chan.clone();
                    out.push(AppRequest::Read {
                        offset,
                        len,
                        done: Box::new(move |r| chan.reply(unique, r)),
                    });
                }
                Request::Fsync { unique } => {
                    let chan = chan.clone();
                    out.push(AppRequest::Flush {
                        done: Box::new(move |r| chan.reply(unique, r.map(|()| &[][..]))),
                    });
                }
            }
        }
        RequestState::Budget
    }
}

/// A mounted FUSE device file, attached to a loop device while primary. Dropping it
/// unmounts.
pub struct FuseLoop {
    pub mountpoint: PathBuf,
    pub file: PathBuf,
    writable: Arc<AtomicBool>,
    chan: Arc<Chan>,
    /// Here until [`FuseLoop::spawn_reader`] moves it to its thread.
    reader: Option<Reader>,
    /// The reader thread and the eventfd that stops it.
    thread: Option<(std::thread::JoinHandle<()>, OwnedFd)>,
    mounted: bool,
}

impl FuseLoop {
    /// Mount the resource's FUSE file at `mountpoint`, first clearing what a crashed
    /// daemon may have left there (its loop devices and its dead mount), and answer the
    /// kernel's INIT, so that the file is ready when this returns.
    pub fn mount(mountpoint: &Path, data_bytes: u64) -> Result<FuseLoop, FrontendError> {
        let file = mountpoint.join(DATA_FILE);
        for dev in loops_backed_by(&file) {
            tracing::warn!(device = %dev.display(), "detaching a loop device left by an earlier run");
            if let Err(e) = detach_loop(&dev) {
                tracing::warn!(device = %dev.display(), error = %e, "could not detach stale loop device");
            }
        }
        // A stale FUSE mount answers ENOTCONN; a lazy unmount clears it even while old
        // users still hold it.
        let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
        std::fs::create_dir_all(mountpoint)
            .map_err(io_err(format!("create {}", mountpoint.display())))?;
        let raw = nix::fcntl::open(
            "/dev/fuse",
            nix::fcntl::OFlag::O_RDWR
                | nix::fcntl::OFlag::O_CLOEXEC
                | nix::fcntl::OFlag::O_NONBLOCK,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| io_err("open /dev/fuse")(e.into()))?;
        // SAFETY: `open` just returned this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let options = format!(
            "fd={},rootmode=40000,user_id={},group_id={}",
            fd.as_raw_fd(),
            nix::unistd::geteuid(),
            nix::unistd::getegid()
        );
        nix::mount::mount(
            Some("tandem"),
            mountpoint,
            Some("fuse.tandem"),
            nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NOEXEC,
            Some(options.as_str()),
        )
        .map_err(|e| io_err(format!("FUSE mount at {}", mountpoint.display()))(e.into()))?;
        let chan = Arc::new(Chan { fd });
        let writable = Arc::new(AtomicBool::new(false));
        let mut dev = FuseLoop {
            mountpoint: mountpoint.to_path_buf(),
            file,
            writable: writable.clone(),
            chan: chan.clone(),
            reader: Some(Reader {
                chan,
                buf: vec![0u8; fuse::REQUEST_BUF_BYTES],
                data_bytes,
                writable,
            }),
            thread: None,
            mounted: true,
        };
        // On an error, dropping `dev` unmounts again.
        dev.answer_init()?;
        Ok(dev)
    }

    fn answer_init(&mut self) -> Result<(), FrontendError> {
        use nix::poll::{PollFd, PollFlags, PollTimeout};
        let what = format!("FUSE INIT at {}", self.mountpoint.display());
        let fd = self.chan.fd.as_fd();
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, PollTimeout::from(INIT_TIMEOUT_MS)) {
            Ok(0) => {
                return Err(FrontendError::Command(format!(
                    "{what}: no request from the kernel"
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(io_err(what)(e.into())),
        }
        let Some(reader) = self.reader.as_mut() else {
            return Err(FrontendError::Command(format!("{what}: no reader")));
        };
        let n = nix::unistd::read(fd.as_raw_fd(), &mut reader.buf)
            .map_err(|e| io_err(what.clone())(e.into()))?;
        let init = fuse::init_reply(&reader.buf[..n])
            .map_err(|e| FrontendError::Command(format!("{what}: {e}")))?;
        self.chan.reply(init.unique, Ok(&init.reply));
        if !init.async_dio {
            tracing::warn!(
                "kernel without FUSE_ASYNC_DIO: device requests are served one at a time"
            );
        }
        Ok(())
    }
}

impl Frontend for FuseLoop {
    fn name(&self) -> &'static str {
        "fuse"
    }

    /// `/dev/fuse`: readable when requests wait (until a reader thread took over).
    fn poll_fd(&self) -> Option<RawFd> {
        self.reader.as_ref().map(|_| self.chan.fd.as_raw_fd())
    }

    /// Metadata requests are answered here; data requests are pushed onto `out`. After
    /// [`Frontend::spawn_reader`], always `Gone`.
    fn read_requests(&mut self, max_requests: usize, out: &mut Vec<AppRequest>) -> RequestState {
        match self.reader.as_mut() {
            Some(r) => r.read_available(max_requests, out),
            None => RequestState::Gone,
        }
    }

    fn spawn_reader(&mut self, submit: Submit) -> Result<(), FrontendError> {
        let Some(mut reader) = self.reader.take() else {
            return Ok(());
        };
        let stop = nix::sys::eventfd::EventFd::from_value_and_flags(
            0,
            nix::sys::eventfd::EfdFlags::EFD_CLOEXEC,
        )
        .map_err(|e| io_err("eventfd")(e.into()))?;
        let stop = OwnedFd::from(stop);
        let stop_thread = stop.try_clone().map_err(io_err("dup eventfd"))?;
        let thread = std::thread::Builder::new()
            .name("tandem-fuse".into())
            .spawn(move || {
                use nix::poll::{PollFd, PollFlags, PollTimeout};
                let mut out = Vec::new();
                loop {
                    let mut fds = [
                        PollFd::new(reader.chan.fd.as_fd(), PollFlags::POLLIN),
                        PollFd::new(stop_thread.as_fd(), PollFlags::POLLIN),
                    ];
                    match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "poll /dev/fuse failed; the device stops serving");
                            return;
                        }
                    }
                    if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                        return;
                    }
                    let state = reader.read_available(256, &mut out);
                    for r in out.drain(..) {
                        submit(r);
                    }
                    if state == RequestState::Gone {
                        return;
                    }
                }
            })
            .map_err(io_err("spawn the FUSE reader thread"))?;
        self.thread = Some((thread, stop));
        Ok(())
    }

    fn set_writable(&self, on: bool) {
        self.writable.store(on, Ordering::Release);
    }

    fn device(&self) -> Arc<dyn BlockDevice> {
        Arc::new(LoopDevice {
            file: self.file.clone(),
        })
    }

    fn close(&mut self) {
        if !std::mem::take(&mut self.mounted) {
            return;
        }
        if let Err(e) = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty()) {
            tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "FUSE unmount; detaching lazily");
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
        if let Some((thread, stop)) = self.thread.take() {
            if let Err(e) = nix::unistd::write(&stop, &1u64.to_ne_bytes()) {
                tracing::warn!(error = %e, "cannot stop the FUSE reader thread");
            } else if thread.join().is_err() {
                tracing::error!("the FUSE reader thread panicked");
            }
        }
    }
}

impl Drop for FuseLoop {
    fn drop(&mut self) {
        self.close();
    }
}

/// The loop device over the FUSE file.
struct LoopDevice {
    file: PathBuf,
}

impl BlockDevice for LoopDevice {
    fn attach(&self) -> Result<PathBuf, FrontendError> {
        attach_loop(&self.file)
    }
    fn detach(&self, dev: &Path) -> Result<(), FrontendError> {
        detach_loop(dev)
    }
}

fn run(cmd: &mut Command) -> Result<String, FrontendError> {
    let out = cmd
        .output()
        .map_err(io_err(format!("run {:?}", cmd.get_program())))?;
    if !out.status.success() {
        return Err(FrontendError::Command(format!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Attach `file` to a free loop device with 4 KiB sectors and direct I/O (the loop
/// device then submits asynchronously and keeps many requests in flight; buffered, it
/// serves one at a time); returns `/dev/loopN`.
pub fn attach_loop(file: &Path) -> Result<PathBuf, FrontendError> {
    let dev = run(Command::new("losetup")
        .args([
            "--find",
            "--show",
            "--sector-size",
            "4096",
            "--direct-io=on",
        ])
        .arg(file))?;
    Ok(PathBuf::from(dev))
}

/// Detach a loop device. Still open elsewhere, the kernel detaches it at its last close.
pub fn detach_loop(dev: &Path) -> Result<(), FrontendError> {
    run(Command::new("losetup").arg("-d").arg(dev)).map(|_| ())
}

/// Loop devices whose backing file is `file` (also ones left by a crashed daemon).
pub fn loops_backed_by(file: &Path) -> Vec<PathBuf> {
    let want = file.to_string_lossy().to_string();
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        let b = b.trim();
        if b == want || b.strip_suffix(" (deleted)") == Some(want.as_str()) {
            out.push(PathBuf::from(format!("/dev/{name}")));
        }
    }
    out
}
