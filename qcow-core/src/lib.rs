//! qcow2 images over an abstract sector-I/O trait.
//!
//! `qcow-core` is `#![no_std]`. With default features off the read path
//! needs no allocator: the caller provides the L2 cache and bounce buffers.
//! The `alloc` feature adds the writer, check and repair; `std` adds the
//! `std::fs::File` adapter (re-exported from `luks-core`).
//!
//! The core never opens files: it reports a backing file's or external data
//! file's name, and the caller hands it the device.
//!
//! Features: none is the plaintext, allocation-free reader, linking no
//! cipher, hash or KDF; `encryption` adds encrypted images ([`crypto`]:
//! LUKS1 inside qcow2, legacy AES) through `luks-core/luks1`; `alloc`
//! (which implies `encryption`) and `std` add the writer, check and repair.
//! The default is `std` + `encryption`.
//!
//! # Quick start
//!
//! Create a small image in memory, write to it, and read it back with the
//! allocation-free reader; then the same with a LUKS-encrypted image.
//! Firmware only needs the reading half, over its own [`BlockIo`].
//!
//! ```
//! use luks_core::luks1::{self, FormatParams};
//! use qcow_core::crypto::ImageKey;
//! use qcow_core::io::{VecDevice, Window};
//! use qcow_core::{create, probe, CreateOptions, Qcow2, Qcow2Version};
//! # struct OsRng; // the caller's `rand_core::TryCryptoRng`
//! # impl rand_core::TryRng for OsRng {
//! #     type Error = getrandom::Error;
//! #     fn try_next_u32(&mut self) -> Result<u32, Self::Error> { getrandom::u32() }
//! #     fn try_next_u64(&mut self) -> Result<u64, Self::Error> { getrandom::u64() }
//! #     fn try_fill_bytes(&mut self, b: &mut [u8]) -> Result<(), Self::Error> { getrandom::fill(b) }
//! # }
//! # impl rand_core::TryCryptoRng for OsRng {}
//!
//! // A 1 MiB image (qemu-img's defaults: v3, 64 KiB clusters), one sector written.
//! let opts = CreateOptions { size: 1 << 20, ..CreateOptions::default() };
//! let mut w = create(VecDevice::new(), &opts)?;
//! w.write(65536, &[0xab; 512])?;
//! let dev = w.close()?;
//! assert_eq!(probe(dev.as_slice()), Some(Qcow2Version::V3));
//!
//! // The reader's metadata cache: any `AsMut<[u8]>` storage it then owns;
//! // here memory lent from the caller (firmware's way, no allocator).
//! let mut cache = [0u8; 4096];
//! let mut img = Qcow2::open(dev, &mut cache[..])?;
//! let mut sector = [0u8; 512];
//! img.read(65536, &mut sector)?;
//! assert_eq!(sector, [0xab; 512]);
//! img.read(0, &mut sector)?; // never written: zeroes
//! assert_eq!(sector, [0; 512]);
//! drop(img);
//!
//! // Encrypted (`qemu-img create -o encrypt.format=luks`): `create` reserves
//! // the LUKS header region, the caller formats LUKS1 into it (a tiny
//! // iteration count for the example) and hands the writer the data key.
//! let opts = CreateOptions { size: 1 << 20, luks_region_len: Some(2 << 20), ..opts };
//! let mut w = create(VecDevice::new(), &opts)?;
//! let (off, len) = w.crypto_region().ok_or("no LUKS region")?;
//! let params = FormatParams {
//!     iterations: 1000,
//!     payload_offset: Some((len / 512) as u32),
//!     ..FormatParams::default()
//! };
//! let mut region = Window::new(w.device(), off, len);
//! let (hdr, key) = luks1::format(&mut region, &params, None, b"secret", &mut OsRng)?;
//! let cipher = luks1::data_cipher::<core::convert::Infallible>(&hdr, &key)?;
//! let mut w = w.with_key(ImageKey::Luks(cipher))?;
//! w.write(0, &[0xcd; 512])?;
//! let dev = w.close()?;
//!
//! // Open (this time with a cache the reader owns), unlock in place with
//! // the passphrase, read.
//! let img = Qcow2::open(dev, vec![0u8; 4096])?;
//! let mut img = img.unlock(b"secret")?;
//! img.read(0, &mut sector)?;
//! assert_eq!(sector, [0xcd; 512]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Architecture Invariant: untrusted bytes never panic. Every size and
//! offset read from disk is checked before it is used, and every error
//! names the structure and byte offset at fault.

#![no_std]
// Values read from disk feed offsets and sizes: every sum, product and shift
// is checked, saturating, or allowed at its narrowest scope with the bound
// that makes it safe written next to it.
#![warn(clippy::arithmetic_side_effects)]

#[cfg(feature = "alloc")]
pub mod check;
#[cfg(feature = "alloc")]
pub mod compress;
#[cfg(feature = "alloc")]
pub mod create;
#[cfg(feature = "encryption")]
pub mod crypto;
pub mod decompress;
pub mod entry;
pub mod error;
pub mod header;
pub mod image;
pub mod limits;
mod probe;
pub mod snapshot;
pub mod table;
#[cfg(all(test, feature = "alloc"))]
mod test_luks;
pub mod units;
#[cfg(feature = "alloc")]
pub mod writer;

#[cfg(feature = "alloc")]
pub use create::{create, measure, CreateOptions, Measure, Preallocation};
pub use error::{Error, Structure};
pub use header::CryptMethod;
pub use image::{BitmapInfo, Decryptor, ImageInfo, MapKind, Mapping, NoDecryptor, NoDevice, Qcow2};
/// The sector-I/O trait and its adapters, shared with `luks-core`.
pub use luks_core::io;
pub use luks_core::io::BlockIo;
pub use probe::{probe, Qcow2Version};
pub use units::{ClusterIndex, ClusterSize, GuestOffset, HostOffset};
#[cfg(feature = "alloc")]
pub use writer::{Qcow2Writer, ResizeError, StagedRuns};
