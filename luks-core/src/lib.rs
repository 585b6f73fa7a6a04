//! LUKS volumes over an abstract sector-I/O trait.
//!
//! `luks-core` is `#![no_std]`. With default features off it needs no
//! allocator: unlocking a key slot and reading or writing sectors use fixed
//! buffers only. The `alloc` feature adds the growable in-memory device and
//! the recording test device; `std` adds the `std::fs::File` adapter.
//!
//! All I/O goes through [`io::BlockIo`], which `qcow-core` re-exports.
//!
//! Features: none gives the sector-I/O trait, its no-alloc adapters, the
//! error types and [`probe`] (no cipher, hash or KDF crate); `luks1` adds
//! ciphers, hashes, PBKDF2 and LUKS1; `luks2` (with `luks1`) adds LUKS2 and
//! Argon2; `alloc` and `std` add the growable and file devices and the
//! writers. The default is `std` + `luks2`.
//!
//! # Quick start
//!
//! Format a LUKS1 volume in memory, unlock it with its passphrase and use
//! the payload as a device. Firmware would use a [`io::MemDevice`] over its
//! own buffer (or its own [`BlockIo`]) and its own random source.
//!
//! ```
//! use luks_core::io::VecDevice;
//! use luks_core::luks1::{self, FormatParams};
//! use luks_core::{probe, BlockIo, LuksVersion, LuksVolume};
//! # struct OsRng; // the caller's `rand_core::TryCryptoRng`
//! # impl rand_core::TryRng for OsRng {
//! #     type Error = getrandom::Error;
//! #     fn try_next_u32(&mut self) -> Result<u32, Self::Error> { getrandom::u32() }
//! #     fn try_next_u64(&mut self) -> Result<u64, Self::Error> { getrandom::u64() }
//! #     fn try_fill_bytes(&mut self, b: &mut [u8]) -> Result<(), Self::Error> { getrandom::fill(b) }
//! # }
//! # impl rand_core::TryCryptoRng for OsRng {}
//!
//! // AES-256-XTS with PBKDF2-SHA256; a tiny iteration count for the example
//! // (real volumes calibrate it: `luks1::calibrate_iterations`).
//! let mut dev = VecDevice::new();
//! let params = FormatParams { iterations: 1000, ..FormatParams::default() };
//! let (hdr, _) = luks1::format(&mut dev, &params, None, b"secret", &mut OsRng)?;
//! let payload = u64::from(hdr.payload_offset) * 512;
//! dev.set_size(payload + 64 * 1024)?; // a 64 KiB payload
//!
//! // What a reader does: name the format, parse the header, try the passphrase.
//! let mut first = [0u8; 512];
//! dev.read_at(0, &mut first)?;
//! assert_eq!(probe(&first), Some(LuksVersion::Luks1));
//! let hdr = luks1::read_header(&mut dev)?;
//! assert!(luks1::unlock(&mut dev, &hdr, b"wrong", None).is_err());
//! let (key, slot) = luks1::unlock(&mut dev, &hdr, b"secret", None)?;
//! assert_eq!(slot, 0);
//!
//! // The payload, decrypted sector by sector.
//! let mut vol = LuksVolume::open_luks1(dev, &hdr, &key)?;
//! vol.write_at(4096, &[0x5a; 512])?;
//! let mut sector = [0u8; 512];
//! vol.read_at(4096, &mut sector)?;
//! assert_eq!(sector, [0x5a; 512]);
//! // On the device, the same sector is ciphertext.
//! let raw = vol.into_inner().into_vec();
//! assert_ne!(raw[(payload + 4096) as usize..][..512], [0x5a; 512]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Code map:
//! - [`luks1`]: the LUKS1 header ([`luks1::Header`] view,
//!   [`luks1::HeaderRepr`] representation), [`luks1::read_header`],
//!   [`luks1::unlock`], [`luks1::format`], key slot management
//!   ([`luks1::add_key`], [`luks1::remove_key`], [`luks1::change_key`]) and
//!   the streaming anti-forensic splitter.
//! - [`luks2`]: the LUKS2 binary header copies ([`luks2::Header`] view,
//!   [`luks2::HeaderRepr`]), [`luks2::read_header`] (checksums, seqid,
//!   secondary found by scanning), the JSON metadata ([`luks2::Metadata`],
//!   fixed capacity, parsed without an allocator), [`luks2::unlock`]
//!   (PBKDF2, Argon2i, Argon2id in caller memory) and, with `alloc`,
//!   [`luks2::write`] (format, add and remove key slots).
//! - [`cipher`]: [`SectorCipher`] (AES, serpent, twofish; XTS, CBC, ECB,
//!   LRW; plain, plain64, plain64be, null and ESSIV IVs) and the insecure
//!   [`LegacyQcowAes`]. XTS lives in one private module behind the
//!   multi-sector API, ready for a SIMD engine.
//! - [`hash`]: hashes by name and PBKDF2-HMAC.
//! - [`LuksVolume`]: an unlocked payload as a [`BlockIo`]; [`io::Window`]: a
//!   sub-range of a device as a device.
//!
//! IV bases differ by container and are always the caller's choice: a raw
//! LUKS volume counts from the start of the payload, LUKS inside qcow2 uses
//! the host offset / 512 (call [`SectorCipher::decrypt_sectors`] with it),
//! legacy qcow AES the guest sector.
//!
//! Architecture Invariant: untrusted bytes never panic. Every size and
//! offset read from disk is checked before it is used, and every parser
//! returns an [`Error`] that names the structure and byte offset at fault.

#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]
// Every value that came from disk or a caller is checked before it is
// used: overflow is an error naming the structure, never a wrap or panic.
#![warn(clippy::arithmetic_side_effects)]

#[cfg(feature = "std")]
extern crate std;

#[cfg(feature = "luks1")]
#[macro_use]
mod view;

#[cfg(feature = "luks1")]
pub mod cipher;
pub mod error;
#[cfg(feature = "luks1")]
pub mod hash;
pub mod io;
#[cfg(feature = "luks1")]
pub mod luks1;
#[cfg(feature = "luks2")]
pub mod luks2;
mod probe;
#[cfg(feature = "luks1")]
pub mod simd;
#[cfg(test)]
mod test_rng;
#[cfg(feature = "luks1")]
mod volume;

#[cfg(feature = "luks1")]
pub use cipher::{LegacyQcowAes, SectorCipher, MAX_KEY_BYTES};
pub use error::{Error, Structure};
#[cfg(feature = "luks1")]
pub use hash::HashAlg;
pub use io::BlockIo;
#[cfg(feature = "luks1")]
pub use luks1::VolumeKey;
pub use probe::{probe, LuksVersion};
#[cfg(feature = "luks1")]
pub use volume::{LuksVolume, PayloadCipher};

/// The longest passphrase accepted anywhere (cryptsetup's key file limit
/// is 8 MiB; the KDF itself takes any length, this only bounds buffers a
/// caller may size from it).
pub const MAX_PASSPHRASE_LEN: usize = 8 * 1024 * 1024;
