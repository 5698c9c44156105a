//! Fuzz target `control_request`: see `tandem::fuzz::control_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem::fuzz::control_request(data));
