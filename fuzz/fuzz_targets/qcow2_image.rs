//! Fuzz target `qcow2_image`: see `qimg_tests::fuzzing::qcow2_image`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qimg_tests::fuzzing::qcow2_image(data));
