//! Fuzz target `activity_log`: see `tandem::fuzz::activity_log`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem::fuzz::activity_log(data));
