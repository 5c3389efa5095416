//! Init-image or mask bytes, checked and decoded.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::image(data));
