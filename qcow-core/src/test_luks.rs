//! Unit-test helpers: LUKS1 inside a new qcow2 image.

// Test code: a failed step is a failed test. The payload offset is a
// sector count of a 2 MiB region.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use luks_core::io::VecDevice;
use luks_core::luks1;

use crate::Qcow2Writer;

/// A deterministic "random" source (xorshift64; tests only, the seed must
/// not be 0).
pub(crate) struct TestRng(pub(crate) u64);

impl rand_core::TryRng for TestRng {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(self.try_next_u64()? as u32)
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Ok(self.0)
    }
    fn try_fill_bytes(&mut self, b: &mut [u8]) -> Result<(), Self::Error> {
        for x in b {
            *x = self.try_next_u64()? as u8;
        }
        Ok(())
    }
}

impl rand_core::TryCryptoRng for TestRng {}

/// Formats LUKS1 (1000 PBKDF2 iterations, `passphrase`) in the crypto
/// region of `w`, a new image created with a `luks_region_len`, and
/// returns the writer with the volume key: the same key every time.
pub(crate) fn with_luks1(
    mut w: Qcow2Writer<VecDevice>,
    passphrase: &[u8],
) -> Qcow2Writer<VecDevice> {
    let (off, len) = w.crypto_region().unwrap();
    let params = luks1::FormatParams {
        iterations: 1000,
        payload_offset: Some((len / 512) as u32),
        ..luks1::FormatParams::default()
    };
    let mut region = luks_core::io::Window::new(w.device(), off, len);
    let (hdr, key) = luks1::format(
        &mut region,
        &params,
        None,
        passphrase,
        &mut TestRng(0x9e37_79b9),
    )
    .unwrap();
    let cipher = luks1::data_cipher::<core::convert::Infallible>(&hdr, &key).unwrap();
    w.with_key(crate::crypto::ImageKey::Luks(cipher)).unwrap()
}
