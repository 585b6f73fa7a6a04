//! Fuzz target `luks1_unlock`: see `qimg_tests::fuzzing::luks1_unlock`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qimg_tests::fuzzing::luks1_unlock(data));
