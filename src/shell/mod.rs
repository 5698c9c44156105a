//! IO shells around the core: the backing-disk driver and metadata I/O.

pub mod disk;
pub mod md;
