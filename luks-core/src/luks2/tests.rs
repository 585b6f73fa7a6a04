//! LUKS2 unit tests: binary header round trips and selection over memory.

extern crate std;
