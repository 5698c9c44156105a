//! Tandem: block-level active-standby replication for databases.
//!
//! `core` is the pure, deterministic replication state machine (no I/O, no clocks, no
//! threads); `shell` drives it with tokio, io_uring and FUSE; `config` parses the one TOML
//! file both data nodes share.

pub mod config;
pub mod core;
pub mod shell;

#[doc(hidden)]
pub mod fuzz;
