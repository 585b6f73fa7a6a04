//! Fuzz target `qcow2_entries`: see `qimg_tests::fuzzing::qcow2_entries`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qimg_tests::fuzzing::qcow2_entries(data));
