//! `inflate-rate`: the zlib cluster decoders `convert` could use on
//! compressed qcow2 clusters, side by side in one process, on 64 KiB
//! clusters of `bench-compare`'s text and of any files named on the command
//! line. The streams are made as qemu-img makes them (zlib-rs with QEMU's
//! exact parameters: level -1, raw deflate, window bits 12, memLevel 9);
//! a cluster that does not fit in `cluster - 1` bytes is left out (qemu-img
//! stores it uncompressed, no decoder sees it).
//!
//! - `qimg`: [`qcow_core::decompress::decompress`] (miniz_oxide's
//!   allocation-free core), what the reader decodes with;
//! - `qimg-decoder`: [`qcow_core::decompress::Decoder`], what the CLI
//!   decodes whole clusters with (zune-inflate, zlib-rs when that fails);
//! - `zune`: zune-inflate alone, a fresh `Vec` per cluster copied out;
//! - `flate2-zlib-rs`: one flate2 `Decompress` over zlib-rs (window bits
//!   12), reset between clusters;
//! - `zlib-rs-slice`: `zlib_rs::decompress_slice`, a fresh state
//!   per cluster.
//!
//! Every decoder's output is compared with the cluster before anything is
//! timed. Output lines: `inflate source=.. decoder=.. mib_s=.. clusters=..
//! stream_bytes=..`: MiB/s of decoded output per second of this thread's
//! CPU time (so a loaded machine does not skew the ratios), the best of
//! several rounds, one thread.

use std::hint::black_box;
use std::time::Duration;

use flate2::{Decompress, FlushDecompress, Status};

/// qcow2's default cluster size.
const CLUSTER: usize = 64 * 1024;
/// Bytes of the generated text.
const SOURCE: usize = 16 << 20;
/// Rounds per figure; the best is reported.
const ROUNDS: usize = 5;
/// Shortest round.
const ROUND: Duration = Duration::from_millis(300);

/// A stream as qemu-img writes it, or `None` when it does not fit.
fn qemu_stream(data: &[u8]) -> Option<Vec<u8>> {
    let mut out = vec![0u8; data.len() - 1];
    let n = qimg_bench::qemu_deflate(data, &mut out)?;
    out.truncate(n);
    Some(out)
}

/// One decoder: fills `out` from `stream`; false on failure.
trait Decoder {
    fn decode(&mut self, stream: &[u8], out: &mut [u8]) -> bool;
}

struct Qimg;
impl Decoder for Qimg {
    fn decode(&mut self, stream: &[u8], out: &mut [u8]) -> bool {
        qcow_core::decompress::decompress(qcow_core::header::COMPRESSION_ZLIB, stream, out).is_ok()
    }
}

#[derive(Default)]
struct QimgDecoder(qcow_core::decompress::Decoder);
impl Decoder for QimgDecoder {
    fn decode(&mut self, stream: &[u8], out: &mut [u8]) -> bool {
        self.0
            .decompress(qcow_core::header::COMPRESSION_ZLIB, stream, out)
            .is_ok()
    }
}

struct Zune;
impl Decoder for Zune {
    fn decode(&mut self, stream: &[u8], out: &mut [u8]) -> bool {
        let o = zune_inflate::DeflateOptions::default()
            .set_limit(out.len())
            .set_size_hint(out.len());
        match zune_inflate::DeflateDecoder::new_with_options(stream, o).decode_deflate() {
            Ok(v) if v.len() == out.len() => {
                out.copy_from_slice(&v);
                true
            }
            _ => false,
        }
    }
}

struct Flate2(Decompress);
impl Decoder for Flate2 {
    fn decode(&mut self, stream: &[u8], out: &mut [u8]) -> bool {
        self.0.reset(false);
        let r = self.0.decompress(stream, out, FlushDecompress::Finish);
        matches!(r, Ok(Status::StreamEnd | Status::BufError | Status::Ok))
            && self.0.total_out() == out.len() as u64
    }
}

struct ZlibRsSlice(i32);
impl Decoder for ZlibRsSlice {
    fn decode(&mut self, stream: &[u8], out: &mut [u8]) -> bool {
        let config = zlib_rs::InflateConfig {
            window_bits: -self.0,
        };
        let (d, rc) = zlib_rs::decompress_slice(out, stream, config);
        d.len() == CLUSTER && matches!(rc, zlib_rs::ReturnCode::Ok | zlib_rs::ReturnCode::BufError)
    }
}

fn main() {
    let mut sources: Vec<(String, Vec<u8>)> = vec![("text".into(), qimg_bench::word_text(SOURCE))];
    for path in std::env::args().skip(1) {
        match std::fs::read(&path) {
            Ok(mut d) => {
                d.truncate(d.len() / CLUSTER * CLUSTER);
                let name = std::path::Path::new(&path)
                    .file_name()
                    .map_or(path.clone(), |n| n.to_string_lossy().into_owned());
                sources.push((name, d));
            }
            Err(e) => {
                eprintln!("inflate-rate: {path}: {e}");
                std::process::exit(1);
            }
        }
    }
    let mut out = vec![0u8; CLUSTER];
    for (name, data) in &sources {
        // (cluster, stream) of every cluster qemu-img would store compressed.
        let pairs: Vec<(&[u8], Vec<u8>)> = data
            .chunks(CLUSTER)
            .filter(|c| c.iter().any(|&b| b != 0))
            .filter_map(|c| qemu_stream(c).map(|s| (c, s)))
            .collect();
        if pairs.is_empty() {
            println!("inflate source={name} empty (no compressible cluster)");
            continue;
        }
        let stream_bytes: usize = pairs.iter().map(|p| p.1.len()).sum();
        let decoders: Vec<(&str, Box<dyn Decoder>)> = vec![
            ("qimg", Box::new(Qimg)),
            (
                "flate2-zlib-rs",
                Box::new(Flate2(Decompress::new_with_window_bits(false, 12))),
            ),
            ("zlib-rs-slice-w12", Box::new(ZlibRsSlice(12))),
            ("zlib-rs-slice-w9", Box::new(ZlibRsSlice(9))),
            ("qimg-decoder", Box::new(QimgDecoder::default())),
            ("zune", Box::new(Zune)),
        ];
        for (dec, mut d) in decoders {
            for (c, s) in &pairs {
                out.fill(0xa5);
                if !d.decode(s, &mut out) || out[..] != c[..] {
                    eprintln!("inflate-rate: {dec} on {name}: a cluster does not decode back");
                    std::process::exit(1);
                }
            }
            let best = qimg_bench::best_mib_s(ROUNDS, ROUND, || {
                for (_, s) in &pairs {
                    black_box(d.decode(black_box(s), &mut out));
                }
                pairs.len() * CLUSTER
            });
            println!(
                "inflate source={name} decoder={dec} mib_s={best:.1} clusters={} stream_bytes={stream_bytes}",
                pairs.len()
            );
        }
    }
}
