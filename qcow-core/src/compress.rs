//! Compressed cluster encoding (needs `alloc`).
//!
//! qemu-img reads "zlib" clusters with a raw inflate of window bits 12
//! (4 KiB window), so no back-reference may reach further than 4096 bytes.
//! `miniz_oxide` always uses a 32 KiB window (feeding it 4 KiB pieces with
//! a full flush after each keeps the distances short but makes the output
//! about 10% larger than qemu-img's), so zlib clusters go through our own
//! encoder (the private `deflate` module), which searches a 4 KiB window
//! only. zlib-rs (raw, window bits 12, QEMU's level 6 and memLevel 9) was
//! measured against it on 64 KiB clusters (`deflate-rate` in qimg-bench,
//! thread CPU time): 1.3x to 2x as fast, but its output is 1.3% larger on
//! text and 4.8% larger on executables, where ours is 0.8% and 0.3%
//! smaller than qemu-img's zlib, so ours stays.
//!
//! As in QEMU, a cluster is stored compressed only when the compressed
//! form fits in the cluster size minus one byte; [`compress`] gives up
//! (`None`) as soon as it cannot, and the caller writes the cluster
//! uncompressed.

extern crate alloc;

mod deflate;

use alloc::vec::Vec;

use crate::header::{COMPRESSION_ZLIB, COMPRESSION_ZSTD};

/// Compresses one cluster for `compression_type`, keeping QEMU's rule:
/// `None` when the compressed form would not be smaller than `data` (it
/// must fit in `data.len() - 1` bytes; the cluster is then stored
/// uncompressed), for an unknown type, or a compressor failure.
pub fn compress(compression_type: u8, data: &[u8]) -> Option<Vec<u8>> {
    let room = data.len().checked_sub(1)?;
    match compression_type {
        COMPRESSION_ZLIB => deflate_raw_within(data, room),
        COMPRESSION_ZSTD => Some(ruzstd::encoding::compress_to_vec(
            data,
            ruzstd::encoding::CompressionLevel::Fastest,
        ))
        .filter(|c| c.len() <= room),
        _ => None,
    }
}

/// Raw deflate (no zlib header) whose distances stay within 4 KiB.
pub fn deflate_raw(data: &[u8]) -> Vec<u8> {
    deflate::deflate(data, usize::MAX).unwrap_or_default()
}

/// [`deflate_raw`], giving up (`None`) as soon as the stream is known to
/// need more than `limit` bytes: checked before each Huffman block is
/// written (its exact size is known by then) and after it.
pub fn deflate_raw_within(data: &[u8], limit: usize) -> Option<Vec<u8>> {
    deflate::deflate(data, limit)
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

    #[test]
    fn clusters_that_cannot_shrink_by_a_byte_are_refused() {
        // Random bytes: deflate's output is never a byte smaller.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect();
        for ty in [COMPRESSION_ZLIB, COMPRESSION_ZSTD] {
            assert_eq!(compress(ty, &random), None, "type {ty}");
            let zeros = compress(ty, &[0u8; 65536]).unwrap();
            assert!(zeros.len() < 65535, "type {ty}");
        }
        // The room is exactly one byte less than the cluster.
        let text: Vec<u8> = b"qcow2 cluster "
            .iter()
            .copied()
            .cycle()
            .take(4096)
            .collect();
        let c = deflate_raw(&text);
        assert_eq!(deflate_raw_within(&text, c.len()), Some(c.clone()));
        assert_eq!(deflate_raw_within(&text, c.len() - 1), None);
        assert_eq!(compress(COMPRESSION_ZLIB, &[]), None);
        assert_eq!(compress(9, &text), None);
    }
}
