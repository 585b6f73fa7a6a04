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
//! Architecture Invariant: untrusted bytes never panic. Every size and
//! offset read from disk is checked before it is used, and every error
//! names the structure and byte offset at fault.

#![no_std]

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
#[cfg(feature = "alloc")]
pub mod writer;

#[cfg(feature = "alloc")]
pub use create::{create, measure, CreateOptions, Measure, Preallocation};
pub use error::{Error, Structure};
pub use image::{BitmapInfo, Decryptor, ImageInfo, MapKind, Mapping, NoDevice, Qcow2};
/// The sector-I/O trait and its adapters, shared with `luks-core`.
pub use luks_core::io;
pub use luks_core::io::BlockIo;
pub use probe::{probe, Qcow2Version};
#[cfg(feature = "alloc")]
pub use writer::{Qcow2Writer, ResizeError};
