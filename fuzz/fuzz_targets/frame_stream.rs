//! Fuzz target `frame_stream`: see `tandem::fuzz::frame_stream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem::fuzz::frame_stream(data));
