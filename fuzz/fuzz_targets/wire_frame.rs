//! Fuzz target `wire_frame`: see `tandem::fuzz::wire_frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem::fuzz::wire_frame(data));
