//! A prompt: parsed, weighted, flattened and laid out in encoder chunks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::prompt(data));
