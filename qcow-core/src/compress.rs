//! Compressed cluster encoding (needs `alloc`).
//!
//! qemu-img reads "zlib" clusters with a raw inflate of window bits 12
//! (4 KiB window), so no back-reference may reach further than 4096 bytes.
//! `miniz_oxide` always uses a 32 KiB window; the input is therefore fed in
//! 4 KiB pieces with a full flush after each (a full flush resets the
//! dictionary), which keeps every distance below 4096.

#![warn(clippy::arithmetic_side_effects)]

extern crate alloc;

use alloc::vec::Vec;

use crate::header::{COMPRESSION_ZLIB, COMPRESSION_ZSTD};

/// Largest back-reference distance qemu-img's inflate accepts (window bits 12).
const WINDOW: usize = 4096;

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
    use miniz_oxide::deflate::core::{
        compress_to_output, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush,
    };
    // Level 6 as zlib's default; negative window bits = raw deflate.
    let flags = create_comp_flags_from_zip_params(6, -15, 0);
    let mut c = CompressorOxide::new(flags);
    let mut out = Vec::new();
    let n = data.len().div_ceil(WINDOW).max(1);
    for (i, piece) in data
        .chunks(WINDOW)
        .chain(data.is_empty().then_some(&[][..]))
        .enumerate()
    {
        let flush = if i.saturating_add(1) >= n {
            TDEFLFlush::Finish
        } else {
            TDEFLFlush::Full
        };
        let _ = compress_to_output(&mut c, piece, flush, |b| {
            out.extend_from_slice(b);
            true
        });
    }
    out
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
