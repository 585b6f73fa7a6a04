//! Fuzz target `luks2_unlock`: see `qimg_tests::fuzzing::luks2_unlock`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qimg_tests::fuzzing::luks2_unlock(data));
