//! Fuzz target `qcow2_compressed`: see `qimg_tests::fuzzing::qcow2_compressed`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qimg_tests::fuzzing::qcow2_compressed(data));
