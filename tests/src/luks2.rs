//! LUKS2 volumes read through luks-core in the tests: the header and the
//! Argon2 memory its key slots need.

use luks_core::io::FileDevice;
use luks_core::luks2::{self, Argon2Block, Luks2Header};

/// The LUKS2 header of `dev` (with up to 4 MiB of JSON metadata).
pub fn header(dev: &mut FileDevice) -> Luks2Header {
    let mut json = vec![0u8; 4 << 20];
    luks2::read_header(dev, &mut json).unwrap()
}

/// Argon2 memory enough for every key slot of `h`.
pub fn memory(h: &Luks2Header) -> Vec<Argon2Block> {
    let n = h
        .meta
        .keyslots
        .iter()
        .filter_map(luks2::argon2_blocks)
        .max()
        .unwrap_or(0);
    vec![Argon2Block::new(); n]
}
