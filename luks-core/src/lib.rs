//! LUKS volumes over an abstract sector-I/O trait.
//!
//! `luks-core` is `#![no_std]`. With default features off it needs no
//! allocator: unlocking a key slot and reading or writing sectors use fixed
//! buffers only. The `alloc` feature adds the growable in-memory device and
//! the recording test device; `std` adds the `std::fs::File` adapter.
//!
//! All I/O goes through [`io::BlockIo`], which `qcow-core` re-exports.
//!
//! Architecture Invariant: untrusted bytes never panic. Every size and
//! offset read from disk is checked before it is used, and every parser
//! returns an [`Error`] that names the structure and byte offset at fault.

#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "std")]
extern crate std;

pub mod error;
pub mod io;
pub mod simd;

pub use error::{Error, Structure};
pub use io::BlockIo;
