//! How the database sees the device, behind one trait: a [`Frontend`] delivers the
//! block requests of `/dev/tandem/RES` as [`AppRequest`]s and answers them through their
//! boxed completions when the core says so; its [`BlockDevice`] makes the device appear on
//! the primary and go again. The resource's driver drives both without knowing which
//! frontend it is. FUSE over a loop device ([`crate::shell::fuse_loop`]) is the one there
//! is; ublk and NBD come next.
//!
//! Also here: what any block device needs (is it in use, by whom, the `/dev/tandem/RES`
//! link).

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::shell::disk::AlignedBuf;

pub use crate::shell::fuse::{DATA_FILE, SECTOR_BYTES};

pub type WriteDone = Box<dyn FnOnce(Result<(), i32>) + Send>;
pub type ReadDone = Box<dyn FnOnce(Result<&[u8], i32>) + Send>;
pub type FlushDone = Box<dyn FnOnce(Result<(), i32>) + Send>;

/// What a frontend hands the driver.
pub enum AppRequest {
    Write {
        offset: u64,
        data: AlignedBuf,
        done: WriteDone,
    },
    Read {
        offset: u64,
        len: u32,
        done: ReadDone,
    },
    Flush {
        done: FlushDone,
    },
}

/// Where the frontend's reader thread sends requests; the driver's event channel.
pub type Submit = Arc<dyn Fn(AppRequest) + Send + Sync>;

/// Whether more requests may be waiting after a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestState {
    /// None left now: wait for readiness.
    WouldBlock,
    /// The budget ran out with requests possibly left.
    Budget,
    /// The mount is gone (unmounted or aborted): stop reading.
    Gone,
}

/// A frontend: where application requests come from, and how they are answered.
pub trait Frontend: Send {
    /// For logs and `status` (`fuse`).
    fn name(&self) -> &'static str;
    /// A descriptor that is readable when requests wait, for the driver's ring to poll;
    /// `None` once the requests come from a thread of the frontend's own.
    fn poll_fd(&self) -> Option<RawFd>;
    /// Take up to `max_requests` waiting requests without blocking.
    fn read_requests(&mut self, max_requests: usize, out: &mut Vec<AppRequest>) -> RequestState;
    /// Deliver requests from a thread of its own to `submit` (a driver without a ring).
    fn spawn_reader(&mut self, submit: Submit) -> Result<(), FrontendError>;
    /// Writes are served only while primary; the rest get EROFS.
    fn set_writable(&self, on: bool);
    /// What makes the device appear and go: called on helper threads, it may block.
    fn device(&self) -> Arc<dyn BlockDevice>;
    /// Stop serving; what is still in flight fails.
    fn close(&mut self);
}

/// The block device a frontend exposes on the primary.
pub trait BlockDevice: Send + Sync {
    /// Make it appear; returns its path (what `/dev/tandem/RES` links to).
    fn attach(&self) -> Result<PathBuf, FrontendError>;
    /// Make it go. Still open elsewhere, it may go at its last close.
    fn detach(&self, dev: &Path) -> Result<(), FrontendError>;
}

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error("{0}")]
    Command(String),
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FrontendError {
    let what = what.into();
    move |err| FrontendError::Io { what, err }
}

/// Whether a block device is mounted or held open exclusively. An exclusive open fails
/// with EBUSY exactly then; a plain `open` by another process is not seen.
pub fn in_use(dev: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_EXCL)
        .open(dev)
    {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(nix::libc::EBUSY),
    }
}

/// [`in_use`], allowing up to two seconds for a holder that is just letting go (a
/// file system unmounted a moment ago by a service, a probe by udev).
pub fn in_use_settled(dev: &Path) -> bool {
    for _ in 0..100 {
        if !in_use(dev) {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
}

/// Who holds `dev`, for an operator told it is in use: the mount points it is mounted
/// on in this mount namespace and the processes that have it open (`pid (command)`).
pub fn holders(dev: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let Ok(rdev) = std::fs::metadata(dev).map(|m| m.rdev()) else {
        return Vec::new();
    };
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let want = format!("{major}:{minor}");
    let mounted_on = |mountinfo: &Path| -> Vec<String> {
        std::fs::read_to_string(mountinfo)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let mount_point = f.get(4).filter(|_| f.get(2) == Some(&want.as_str()))?;
                Some(mount_point.to_string())
            })
            .collect()
    };
    let mut out: Vec<String> = mounted_on(Path::new("/proc/self/mountinfo"))
        .into_iter()
        .map(|m| format!("mounted on {m}"))
        .collect();
    let own_ns = std::fs::read_link("/proc/self/ns/mnt").ok();
    let mut seen_ns = Vec::new();
    let procs = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    for p in procs {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = || std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
        // A mount in another mount namespace holds the device as well, unseen here.
        if let Ok(ns) = std::fs::read_link(p.path().join("ns/mnt")) {
            if Some(&ns) != own_ns.as_ref() && !seen_ns.contains(&ns) {
                for m in mounted_on(&p.path().join("mountinfo")) {
                    out.push(format!(
                        "mounted on {m} in the mount namespace of pid {pid} ({})",
                        comm().trim()
                    ));
                }
                seen_ns.push(ns);
            }
        }
        let opens = std::fs::read_dir(p.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == dev));
        if opens {
            out.push(format!("open by pid {pid} ({})", comm().trim()));
        }
    }
    out
}

/// Point `link` at `target`, replacing an old link.
pub fn make_link(link: &Path, target: &Path) -> Result<(), FrontendError> {
    if let Some(dir) = link.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
    }
    remove_link(link);
    std::os::unix::fs::symlink(target, link).map_err(io_err(format!(
        "link {} -> {}",
        link.display(),
        target.display()
    )))
}

pub fn remove_link(link: &Path) {
    if std::fs::symlink_metadata(link).is_ok_and(|m| m.file_type().is_symlink()) {
        let _ = std::fs::remove_file(link);
    }
}
