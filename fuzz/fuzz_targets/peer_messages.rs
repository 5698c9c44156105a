//! Fuzz target `peer_messages`: see `tandem::fuzz::peer_messages`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem::fuzz::peer_messages(data));
