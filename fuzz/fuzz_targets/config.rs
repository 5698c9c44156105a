//! Fuzz target `config`: see `tandem::fuzz::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem::fuzz::config(data));
