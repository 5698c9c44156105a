//! IO shells around the core. For now: metadata I/O on a backing device or file.

pub mod md;
