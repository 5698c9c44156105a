//! Fuzz target `metadata`: see `tandem::fuzz::metadata`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem::fuzz::metadata(data));
