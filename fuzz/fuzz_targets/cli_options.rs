//! Fuzz target `cli_options`: see `qimg_tests::fuzzing::cli_options`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qimg_tests::fuzzing::cli_options(data));
