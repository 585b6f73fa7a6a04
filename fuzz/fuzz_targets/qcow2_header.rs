//! Fuzz target `qcow2_header`: see `qimg_tests::fuzzing::qcow2_header`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qimg_tests::fuzzing::qcow2_header(data));
