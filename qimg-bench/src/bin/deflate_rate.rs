//! `deflate-rate`: the zlib cluster encoders `convert -c` could use, side by
//! side in one process, on 64 KiB clusters (qcow2's default) of the
//! `bench-compare` sources (random, text, zeros) and of any files named on
//! the command line (e.g. a real disk image):
//!
//! - `qimg`: [`qcow_core::compress::compress`], what `convert -c` stores
//!   (the project's own 4 KiB-window encoder, giving up once the stream
//!   cannot fit);
//! - `flate2-zlib-rs`: flate2 over zlib-rs, raw deflate, window bits 12,
//!   level 6 (`Z_DEFAULT_COMPRESSION`), flate2's memLevel 8;
//! - `zlib-rs-qemu`: zlib-rs called directly with QEMU's exact parameters
//!   (level -1, window bits -12, memLevel 9).
//!
//! Every encoder gets QEMU's output room, `cluster - 1` bytes, and a cluster
//! that does not fit is stored uncompressed (a whole cluster), as qemu-img
//! does. Every stored stream is inflated back with a window of 4 KiB (window
//! bits 12) and compared with its cluster before anything is timed.
//!
//! Output lines: `deflate source=.. encoder=.. mib_s=.. stored=.. compressed=..
//! of=..` (`stored`: total bytes the clusters take, `compressed`: how many
//! clusters were stored compressed, `of`: clusters). MiB/s is per second
//! of this thread's CPU time (so a loaded machine does not skew the
//! ratios), the best of several rounds, one thread.

use std::hint::black_box;
use std::time::Duration;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// qcow2's default cluster size.
const CLUSTER: usize = 64 * 1024;
/// Bytes of each generated source.
const SOURCE: usize = 16 << 20;
/// Rounds per figure; the best is reported.
const ROUNDS: usize = 3;
/// Shortest round.
const ROUND: Duration = Duration::from_millis(200);

/// One encoder: fills `out` (`cluster - 1` bytes) and returns the stream's
/// length, or `None` when it does not fit (the cluster is stored as is).
type Encoder = fn(&[u8], &mut [u8]) -> Option<usize>;

fn qimg(data: &[u8], out: &mut [u8]) -> Option<usize> {
    let c = qcow_core::compress::compress(qcow_core::header::COMPRESSION_ZLIB, data)?;
    out.get_mut(..c.len())?.copy_from_slice(&c);
    Some(c.len())
}

fn flate2_zlib_rs(data: &[u8], out: &mut [u8]) -> Option<usize> {
    let mut c = Compress::new_with_window_bits(Compression::new(6), false, 12);
    match c.compress(data, out, FlushCompress::Finish) {
        Ok(Status::StreamEnd) => usize::try_from(c.total_out()).ok(),
        _ => None,
    }
}

/// Inflates `stream` with a 4 KiB window; true when it gives `want`.
fn inflates_to(stream: &[u8], want: &[u8]) -> bool {
    let mut d = Decompress::new_with_window_bits(false, 12);
    let mut out = vec![0u8; want.len()];
    let ok = matches!(
        d.decompress(stream, &mut out, FlushDecompress::Finish),
        Ok(Status::StreamEnd)
    );
    ok && d.total_out() == want.len() as u64 && out == want
}

fn main() {
    let mut sources: Vec<(String, Vec<u8>)> = vec![
        ("random".into(), qimg_bench::fixed_bytes(SOURCE, 7)),
        ("text".into(), qimg_bench::word_text(SOURCE)),
        ("zeros".into(), vec![0u8; SOURCE]),
    ];
    for path in std::env::args().skip(1) {
        match std::fs::read(&path) {
            Ok(mut d) => {
                // Whole clusters only, and none that is all zeros: qemu-img
                // convert -c never compresses those (it leaves them unallocated).
                d.truncate(d.len() / CLUSTER * CLUSTER);
                let d: Vec<u8> = d
                    .chunks(CLUSTER)
                    .filter(|c| c.iter().any(|&b| b != 0))
                    .flatten()
                    .copied()
                    .collect();
                let name = std::path::Path::new(&path)
                    .file_name()
                    .map_or(path.clone(), |n| n.to_string_lossy().into_owned());
                sources.push((name, d));
            }
            Err(e) => {
                eprintln!("deflate-rate: {path}: {e}");
                std::process::exit(1);
            }
        }
    }
    let encoders: [(&str, Encoder); 3] = [
        ("qimg", qimg),
        ("flate2-zlib-rs", flate2_zlib_rs),
        ("zlib-rs-qemu", qimg_bench::qemu_deflate),
    ];
    let mut out = vec![0u8; CLUSTER - 1];
    for (name, data) in &sources {
        if data.is_empty() {
            println!("deflate source={name} empty (no non-zero cluster)");
            continue;
        }
        for (enc, f) in encoders {
            // Sizes and a round trip through a 4 KiB-window inflate.
            let (mut stored, mut packed, mut of) = (0usize, 0usize, 0usize);
            for c in data.chunks(CLUSTER) {
                of += 1;
                match f(c, &mut out) {
                    Some(n) => {
                        if !inflates_to(&out[..n], c) {
                            eprintln!("deflate-rate: {enc} on {name}: a stream does not inflate back with a 4 KiB window");
                            std::process::exit(1);
                        }
                        stored += n;
                        packed += 1;
                    }
                    None => stored += c.len(),
                }
            }
            let best = qimg_bench::best_mib_s(ROUNDS, ROUND, || {
                for c in data.chunks(CLUSTER) {
                    black_box(f(black_box(c), &mut out));
                }
                data.len()
            });
            println!(
                "deflate source={name} encoder={enc} mib_s={best:.1} stored={stored} compressed={packed} of={of}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_encoder_keeps_the_window_and_qemus_rule() {
        let encoders: [Encoder; 3] = [qimg, flate2_zlib_rs, qimg_bench::qemu_deflate];
        let random = qimg_bench::fixed_bytes(CLUSTER, 3);
        let text = qimg_bench::word_text(CLUSTER);
        let mut out = vec![0u8; CLUSTER - 1];
        for f in encoders {
            // Nothing fits a random cluster in cluster - 1 bytes.
            assert_eq!(f(&random, &mut out), None);
            for c in [&text, &vec![0u8; CLUSTER]] {
                let n = f(c, &mut out).unwrap();
                assert!(n < CLUSTER / 2);
                assert!(inflates_to(&out[..n], c));
                assert!(!inflates_to(&out[..n], &random));
            }
        }
    }
}
