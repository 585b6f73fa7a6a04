//! Compressed cluster decoding into caller-provided buffers.
//!
//! "zlib" clusters are raw deflate (no zlib header), decoded by
//! `miniz_oxide`'s allocation-free core. zstd clusters are ordinary zstd
//! frames; no allocation-free pure-Rust zstd decoder exists (ruzstd, the
//! pure-Rust one, keeps its window in a `Vec`), so zstd needs the `alloc`
//! feature. Success, as in qemu-img, means the output cluster is filled:
//! trailing bytes after the compressed stream are ignored.

#![warn(clippy::arithmetic_side_effects)]

use crate::header::{COMPRESSION_ZLIB, COMPRESSION_ZSTD};

/// Why a cluster failed to decompress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecompressError {
    /// The stream is malformed or too short for a whole cluster.
    Corrupt,
    /// zstd without the `alloc` feature.
    ZstdWithoutAlloc,
    /// An unknown compression type.
    UnknownType(u8),
}

/// Decompresses `input` of `compression_type` to fill all of `out`.
pub fn decompress(
    compression_type: u8,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), DecompressError> {
    match compression_type {
        COMPRESSION_ZLIB => inflate_raw(input, out),
        COMPRESSION_ZSTD => zstd(input, out),
        t => Err(DecompressError::UnknownType(t)),
    }
}

/// Raw deflate into `out`, which must be filled exactly.
pub fn inflate_raw(input: &[u8], out: &mut [u8]) -> Result<(), DecompressError> {
    use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
    use miniz_oxide::inflate::TINFLStatus;
    let mut state = DecompressorOxide::new();
    let (status, _read, written) = decompress(
        &mut state,
        input,
        out,
        0,
        inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
    );
    let ok = matches!(
        status,
        TINFLStatus::Done | TINFLStatus::HasMoreOutput | TINFLStatus::NeedsMoreInput
    );
    if ok && written == out.len() {
        Ok(())
    } else {
        Err(DecompressError::Corrupt)
    }
}

#[cfg(feature = "alloc")]
fn zstd(input: &[u8], out: &mut [u8]) -> Result<(), DecompressError> {
    use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
    use ruzstd::io::Read;
    let mut src = input;
    let mut dec = FrameDecoder::new();
    dec.init(&mut src).map_err(|_| DecompressError::Corrupt)?;
    let mut pos = 0usize;
    while pos < out.len() {
        let want = out.len().saturating_sub(pos);
        if !dec.is_finished() {
            dec.decode_blocks(&mut src, BlockDecodingStrategy::UptoBytes(want))
                .map_err(|_| DecompressError::Corrupt)?;
        }
        let n = dec
            .read(out.get_mut(pos..).unwrap_or_default())
            .map_err(|_| DecompressError::Corrupt)?;
        if n == 0 && dec.is_finished() {
            return Err(DecompressError::Corrupt);
        }
        pos = pos.saturating_add(n);
    }
    Ok(())
}

#[cfg(not(feature = "alloc"))]
fn zstd(_input: &[u8], _out: &mut [u8]) -> Result<(), DecompressError> {
    Err(DecompressError::ZstdWithoutAlloc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_deflate_fills_the_cluster_and_rejects_garbage() {
        // A stored (uncompressed) raw deflate block of 512 bytes of 0x5a.
        let mut input = [0u8; 5 + 512 + 16];
        input[0] = 1; // BFINAL, stored
        input[1..3].copy_from_slice(&512u16.to_le_bytes());
        input[3..5].copy_from_slice(&(!512u16).to_le_bytes());
        input[5..517].fill(0x5a);
        let mut out = [0u8; 512];
        inflate_raw(&input, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0x5a));
        // Too short a stream for the cluster.
        let mut big = [0u8; 1024];
        assert_eq!(inflate_raw(&input, &mut big), Err(DecompressError::Corrupt));
        // Garbage.
        assert!(inflate_raw(&[0xff; 64], &mut out).is_err());
        assert_eq!(
            decompress(7, &input, &mut out),
            Err(DecompressError::UnknownType(7))
        );
    }
}
