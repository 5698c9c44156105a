//! Fuzz target `witness_state`: see `tandem::fuzz::witness_state`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem::fuzz::witness_state(data));
