//! Compressed cluster encoding (needs `alloc`).
//!
//! qemu-img reads "zlib" clusters with a raw inflate of window bits 12
//! (4 KiB window), so no back-reference may reach further than 4096 bytes.
//! `miniz_oxide` always uses a 32 KiB window (feeding it 4 KiB pieces with
//! a full flush after each keeps the distances short but makes the output
//! about 10% larger than qemu-img's), so zlib clusters go through our own
//! encoder (the private `deflate` module), which searches a 4 KiB window
//! only.

extern crate alloc;

mod deflate;

use alloc::vec::Vec;

use crate::header::{COMPRESSION_ZLIB, COMPRESSION_ZSTD};

/// Compresses one cluster for `compression_type`; `None` for an unknown
/// type or a compressor failure.
pub fn compress(compression_type: u8, data: &[u8]) -> Option<Vec<u8>> {
    match compression_type {
        COMPRESSION_ZLIB => Some(deflate_raw(data)),
        COMPRESSION_ZSTD => Some(ruzstd::encoding::compress_to_vec(
            data,
            ruzstd::encoding::CompressionLevel::Fastest,
        )),
        _ => None,
    }
}

/// Raw deflate (no zlib header) whose distances stay within 4 KiB.
pub fn deflate_raw(data: &[u8]) -> Vec<u8> {
    deflate::deflate(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_deflate_round_trips_with_small_window() {
        let mut data = alloc::vec![0u8; 65536];
        for (i, b) in data.iter_mut().enumerate() {
            *b = u8::try_from((i / 7) % 251).unwrap_or(0);
        }
        let c = deflate_raw(&data);
        assert!(c.len() < data.len());
        let mut out = alloc::vec![0u8; 65536];
        crate::decompress::inflate_raw(&c, &mut out).unwrap();
        assert_eq!(out, data);
    }
}
