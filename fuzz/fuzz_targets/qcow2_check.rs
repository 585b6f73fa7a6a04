//! Fuzz target `qcow2_check`: see `qimg_tests::fuzzing::qcow2_check`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qimg_tests::fuzzing::qcow2_check(data));
