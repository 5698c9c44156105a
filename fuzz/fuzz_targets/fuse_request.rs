//! Fuzz target `fuse_request`: see `tandem::fuzz::fuse_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem::fuzz::fuse_request(data));
