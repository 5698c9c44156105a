//! IO shells around the core: the backing-disk driver, metadata I/O, the peer transport,
//! the FUSE + loop frontend, the per-resource driver and the control socket protocol.

pub mod control;
pub mod disk;
pub mod driver;
pub mod frontend;
pub mod fuse;
pub mod fuse_loop;
pub mod http;
pub mod md;
pub mod net;
pub mod process;
pub mod sendq;
pub mod services;
pub mod status;
pub mod watchdog;
