//! How the database sees the device: a FUSE file per resource, attached to a loop device
//! on the primary, with `/dev/tandem/RES` (or the configured path) linking to it.
//!
//! The FUSE handlers never block: each request becomes an [`AppRequest`] for the
//! resource's driver, which answers it through the boxed completion when the core says
//! so. The driver does not know which frontend is in use; only this module knows FUSE.
//!
//! The loop device is attached on promotion and detached on demotion, so on a secondary
//! the device is absent. Its logical block size is 4 KiB, so every request that reaches
//! the daemon is 4 KiB aligned, as O_DIRECT on the backing disk needs.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};

use crate::shell::disk::AlignedBuf;

/// Requests reach the daemon in multiples of this, at offsets that are multiples of it.
pub const SECTOR_BYTES: u64 = 4096;
/// The file inside the FUSE mount that the loop device is attached to.
pub const DATA_FILE: &str = "data";

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

/// Where the frontend sends requests; the driver's event channel wraps this.
pub type Submit = Arc<dyn Fn(AppRequest) + Send + Sync>;

const INO_DATA: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(1);

struct DeviceFs {
    data_bytes: u64,
    writable: Arc<AtomicBool>,
    submit: Submit,
}

impl DeviceFs {
    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = match ino {
            INodeNo::ROOT => (FileType::Directory, 0, 0o700, 2),
            INO_DATA => (FileType::RegularFile, self.data_bytes, 0o600, 1),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size / 512,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: SECTOR_BYTES as u32,
        })
    }
}

impl Filesystem for DeviceFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large writes mean fewer round trips through the daemon; the kernel caps this to
        // what it supports.
        let _ = config.set_max_write(1 << 20);
        // The loop device submits direct I/O asynchronously; with FUSE_ASYNC_DIO the
        // kernel keeps many of those requests in flight instead of one at a time, so a
        // database's fsync does not queue behind page-cache writeback. Measured: pgbench
        // +25% in protocol C (docs/performance.md).
        if config
            .add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO)
            .is_err()
        {
            tracing::warn!(
                "kernel without FUSE_ASYNC_DIO: device requests are served one at a time"
            );
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent, self.attr(INO_DATA)) {
            (INodeNo::ROOT, Some(a)) if name == DATA_FILE => {
                reply.entry(&TTL, &a, fuser::Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != INO_DATA {
            return reply.error(Errno::EISDIR);
        }
        let wants_write = flags.0 & nix::libc::O_ACCMODE != nix::libc::O_RDONLY;
        if wants_write && !self.writable.load(Ordering::Acquire) {
            return reply.error(Errno::EROFS);
        }
        // Direct I/O: no second page cache under the loop device's, and a secondary that
        // becomes primary never serves pages cached before the resync changed them.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        (self.submit)(AppRequest::Read {
            offset,
            len: size,
            done: Box::new(move |r| match r {
                Ok(d) => reply.data(d),
                Err(e) => reply.error(Errno::from_i32(e)),
            }),
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if !self.writable.load(Ordering::Acquire) {
            return reply.error(Errno::EROFS);
        }
        if !offset.is_multiple_of(SECTOR_BYTES) || !(data.len() as u64).is_multiple_of(SECTOR_BYTES)
        {
            tracing::warn!(
                offset,
                len = data.len(),
                "write not 4 KiB aligned refused; use the loop device"
            );
            return reply.error(Errno::EINVAL);
        }
        if offset.saturating_add(data.len() as u64) > self.data_bytes {
            return reply.error(Errno::ENOSPC);
        }
        let n = data.len() as u32;
        // The one copy of a write's payload: FUSE lends the bytes; O_DIRECT and the
        // network share this aligned buffer from here on.
        (self.submit)(AppRequest::Write {
            offset,
            data: AlignedBuf::from_slice(data),
            done: Box::new(move |r| match r {
                Ok(()) => reply.written(n),
                Err(e) => reply.error(Errno::from_i32(e)),
            }),
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): nothing is cached here, so there is nothing to write back.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        (self.submit)(AppRequest::Flush {
            done: Box::new(move |r| match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(Errno::from_i32(e)),
            }),
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (INO_DATA, FileType::RegularFile, DATA_FILE),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error("{0}")]
    Command(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FrontendError {
    let what = what.into();
    move |err| FrontendError::Io { what, err }
}

/// A mounted FUSE device file. Dropping it unmounts.
pub struct FuseDevice {
    pub mountpoint: PathBuf,
    pub file: PathBuf,
    writable: Arc<AtomicBool>,
    session: Option<fuser::BackgroundSession>,
}

impl FuseDevice {
    /// Mount the resource's FUSE file at `mountpoint`, first clearing what a crashed
    /// daemon may have left there (its loop devices and its dead mount).
    pub fn mount(
        mountpoint: &Path,
        data_bytes: u64,
        submit: Submit,
    ) -> Result<FuseDevice, FrontendError> {
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
        let writable = Arc::new(AtomicBool::new(false));
        let fs = DeviceFs {
            data_bytes,
            writable: writable.clone(),
            submit,
        };
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![
            MountOption::FSName("tandem".into()),
            MountOption::Subtype("tandem".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
        ];
        cfg.n_threads = Some(1);
        let session = fuser::spawn_mount(fs, mountpoint, &cfg)
            .map_err(io_err(format!("FUSE mount at {}", mountpoint.display())))?;
        Ok(FuseDevice {
            mountpoint: mountpoint.to_path_buf(),
            file,
            writable,
            session: Some(session),
        })
    }

    pub fn set_writable(&self, on: bool) {
        self.writable.store(on, Ordering::Release);
    }

    pub fn unmount(&mut self) {
        if let Some(s) = self.session.take() {
            if let Err(e) = s.umount_and_join() {
                tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "FUSE unmount");
                let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

impl Drop for FuseDevice {
    fn drop(&mut self) {
        self.unmount();
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

/// [`in_use`], allowing up to half a second for a holder that is just letting go (a
/// file system unmounted a moment ago by a service, a probe by udev).
pub fn in_use_settled(dev: &Path) -> bool {
    for _ in 0..25 {
        if !in_use(dev) {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
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
