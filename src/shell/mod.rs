//! IO shells around the core: the backing-disk driver, metadata I/O, the peer transport.

pub mod disk;
pub mod md;
pub mod net;
