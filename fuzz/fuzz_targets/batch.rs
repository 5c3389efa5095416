//! A batch file's bytes: parsed as `kiln submit` reads a file, then validated and expanded.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::batch(data));
