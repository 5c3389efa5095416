//! The coordinator's `--auth` file.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::auth_file(data));
