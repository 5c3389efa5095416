//! A job spec built from the bytes (`arbitrary`), validated and expanded.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::spec(data));
