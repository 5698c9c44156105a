//! The optional watchdog (`[global] watchdog = "/dev/watchdog"`): `tandemd` pets it only
//! while every resource thread answers, so a daemon that hangs resets its node instead of
//! holding a primary role it can no longer serve (and a lease it can no longer honour).
//! A clean stop writes the magic close character, disarming it where the driver allows
//! (`nowayout` drivers keep counting: the node then resets after the timeout).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

nix::ioctl_readwrite!(wdioc_settimeout, b'W', 6, nix::libc::c_int);

pub struct Watchdog {
    f: File,
    path: PathBuf,
}

impl Watchdog {
    /// Open the device and set its timeout. A device without the timeout ioctl (an
    /// old driver, or a plain file in tests) is still petted; that is logged.
    pub fn open(path: &Path, timeout_s: u32) -> std::io::Result<Watchdog> {
        let f = OpenOptions::new().write(true).open(path)?;
        let mut t = timeout_s as nix::libc::c_int;
        // SAFETY: the fd is open for the whole call and `t` is a live c_int, which is
        // what WDIOC_SETTIMEOUT reads and writes back.
        match unsafe { wdioc_settimeout(f.as_raw_fd(), &mut t) } {
            Ok(_) => tracing::info!(device = %path.display(), timeout_s = t, "watchdog armed"),
            Err(e) => {
                tracing::warn!(device = %path.display(), error = %e, "watchdog timeout not set; the device's own applies")
            }
        }
        Ok(Watchdog {
            f,
            path: path.to_path_buf(),
        })
    }

    pub fn pet(&mut self) -> std::io::Result<()> {
        self.f.write_all(b"\0")
    }

    /// Magic close: the daemon stops on purpose.
    pub fn disarm(mut self) {
        if let Err(e) = self.f.write_all(b"V") {
            tracing::warn!(device = %self.path.display(), error = %e, "watchdog magic close failed");
        } else {
            tracing::info!(device = %self.path.display(), "watchdog disarmed");
        }
    }
}
