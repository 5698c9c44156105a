//! Fuzz target `witness_request`: see `tandem::fuzz::witness_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem::fuzz::witness_request(data));
