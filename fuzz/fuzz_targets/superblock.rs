//! Fuzz target `superblock`: see `tandem::fuzz::superblock`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem::fuzz::superblock(data));
