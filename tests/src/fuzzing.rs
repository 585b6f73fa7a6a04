//! Fuzz harnesses: one function per target, shared by the cargo-fuzz
//! targets in `fuzz/` (nightly, libFuzzer) and by the corpus replay test
//! `tests/tests/fuzz_replay.rs` (stable, in CI), so a crash found by the
//! fuzzer and saved under `fuzz/regressions/TARGET/` fails the ordinary test
//! suite until it is fixed.
//!
//! Every harness takes arbitrary bytes and must return without panicking,
//! hanging or allocating without bound; it asserts nothing about the answer
//! except properties that hold for every input (a header that parses emits
//! and parses again to the same value, an entry that decodes encodes back).

use luks_core::io::MemDevice;
use qcow_core::entry::{self, CompressedDescriptor, L2Entry};
use qcow_core::header::HeaderRepr;
use qcow_core::Qcow2;

/// The command line's option parser, compiled here from the CLI's own source
/// file so the fuzzer exercises exactly what `qimg` runs.
#[allow(dead_code, unreachable_pub)]
#[path = "../../qimg-cli/src/opts.rs"]
mod opts;

/// A harness: arbitrary bytes in, nothing out.
pub type Harness = fn(&[u8]);

/// Every target, by the name of its `fuzz/fuzz_targets/NAME.rs` file and of
/// its corpus folder.
pub const TARGETS: &[(&str, Harness)] = &[
    ("qcow2_header", qcow2_header),
    ("qcow2_entries", qcow2_entries),
    ("qcow2_image", qcow2_image),
    ("qcow2_compressed", qcow2_compressed),
    ("luks1_unlock", luks1_unlock),
    ("luks2_unlock", luks2_unlock),
    ("qcow2_check", qcow2_check),
    ("cli_options", cli_options),
];

/// The passphrase the LUKS harness tries (the seed volumes use it).
pub const FUZZ_PASSPHRASE: &[u8] = b"fuzz";

/// PBKDF2 iterations above which the LUKS harness only parses: a header may
/// legitimately ask for billions of iterations (cryptsetup honours them,
/// and so does qimg), which is slow, not wrong; the fuzzer looks for
/// crashes, so it skips the wait.
pub const FUZZ_MAX_ITERATIONS: u32 = 2000;

/// Argon2 memory the LUKS2 harness hands over at most (blocks of 1 KiB);
/// key slots asking for more only get the "not enough memory" error.
pub const FUZZ_ARGON2_BLOCKS: usize = 64;

/// Guest bytes the image harness reads at most.
pub const FUZZ_MAX_GUEST_READ: u64 = 1 << 20;

/// qcow2 header and extension parsing, and emit/parse round trip.
pub fn qcow2_header(data: &[u8]) {
    let Ok(h) = HeaderRepr::parse_bytes::<()>(data) else {
        return;
    };
    let _ = (h.cluster_size(), h.refcount_bits(), h.extended_l2());
    let (start, end) = (h.extensions_start(), h.extensions_end());
    // Walk the extension area as the reader does: (type, length) headers,
    // payloads padded to 8 bytes, stopping at type 0 or the area's end.
    let mut pos = start;
    let mut steps = 0;
    while pos < end && steps < 64 {
        let Some(hdr) = usize::try_from(pos)
            .ok()
            .and_then(|p| data.get(p..p.checked_add(8)?))
            .and_then(|b| <&[u8; 8]>::try_from(b).ok())
        else {
            break;
        };
        let (ty, len) = qcow_core::header::extension_header(hdr);
        if ty == 0 {
            break;
        }
        pos = pos
            .saturating_add(8)
            .saturating_add(qcow_core::header::extension_span(len));
        steps += 1;
    }
    let mut buf = vec![0u8; h.buffer_len()];
    let Ok(mut view) = qcow_core::header::Header::new_checked::<()>(&mut buf[..]) else {
        return;
    };
    h.emit(&mut view);
    if let Ok(again) = HeaderRepr::parse_bytes::<()>(&buf) {
        assert_eq!(
            (again.size, again.cluster_bits, again.l1_table_offset),
            (h.size, h.cluster_bits, h.l1_table_offset),
            "a parsed header must emit to bytes that parse to the same geometry"
        );
    }
}

/// L1/L2/refcount entry decoding for every cluster size and entry width.
pub fn qcow2_entries(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let cluster_bits = 9 + u32::from(sel % 13);
    let extended = sel & 0x10 != 0;
    let data_file = sel & 0x20 != 0;
    let order = u32::from(sel >> 6) + u32::from(sel % 3) + u32::from(sel % 2);
    for chunk in rest.chunks_exact(8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        let raw = u64::from_be_bytes(b);
        let _ = entry::l1_l2_offset(raw);
        let _ = entry::reftable_block_offset(raw);
        let e = L2Entry::decode(raw, cluster_bits, extended, data_file);
        if let L2Entry::Compressed(d) = e {
            let _ = (d.len(), d.is_empty());
            let back = CompressedDescriptor::decode(d.encode(cluster_bits), cluster_bits);
            assert_eq!(back, d, "compressed descriptors round-trip");
        }
        let _ = e.encode(cluster_bits, raw & entry::COPIED != 0);
        for i in 0..entry::SUBCLUSTERS {
            let _ = entry::subcluster(raw, i, true);
        }
    }
    let mut block = rest.to_vec();
    let bits = 1u64 << order.min(6);
    let count = u64::try_from(block.len()).unwrap_or(0).saturating_mul(8) / bits;
    for i in 0..count.min(4096) {
        if let Some(v) = entry::refcount_get(&block, i, order) {
            let v2 = v.wrapping_add(1)
                & (if bits == 64 {
                    u64::MAX
                } else {
                    (1 << bits) - 1
                });
            assert!(
                entry::refcount_set(&mut block, i, order, v2),
                "index in range"
            );
            assert_eq!(entry::refcount_get(&block, i, order), Some(v2));
        }
    }
    let _ = entry::refcount_get(&block, count, order);
}

/// The whole read path over an in-memory image: open, map and read the
/// first MiB of the guest, every snapshot's view of it, refcounts and
/// bitmaps.
pub fn qcow2_image(data: &[u8]) {
    let mut cache = vec![0u8; 16 * 1024];
    let mut cin = vec![0u8; 64 * 1024 + 512];
    let mut cout = vec![0u8; 64 * 1024];
    let Ok(q) = Qcow2::open(MemDevice::read_only(data), &mut cache) else {
        return;
    };
    let mut q = q
        .ignore_backing()
        .with_compression_buffers(&mut cin, &mut cout);
    let _ = q.info().clone();
    read_some(&mut q);
    let _ = q.for_each_bitmap(|_| false);
    let n = q.snapshot_count().min(4);
    for i in 0..n {
        if let Ok(s) = q.snapshot(i) {
            if q.select_snapshot(&s).is_ok() {
                read_some(&mut q);
            }
            q.select_current();
        }
    }
    let _ = q.for_each_snapshot(|_| false);
    for c in 0..16 {
        let _ = q.refcount(c);
    }
}

fn read_some<D: luks_core::io::BlockIo, S: AsMut<[u8]>>(q: &mut Qcow2<D, S>) {
    let size = q.virtual_size().min(FUZZ_MAX_GUEST_READ);
    let mut buf = [0u8; 4096];
    let mut g = 0;
    while g < size {
        let n = (size - g).min(4096);
        let Ok(n_usize) = usize::try_from(n) else {
            return;
        };
        let _ = q.map(g, n);
        let _ = q.read(g, &mut buf[..n_usize]);
        g += n;
    }
}

/// Compressed cluster decoding: the first byte picks the compression type
/// and the cluster size, the rest is the compressed stream; the reader's
/// decoder and the CLI's must give the same bytes where both succeed.
pub fn qcow2_compressed(data: &[u8]) {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let ty = sel & 1;
    let cluster = 512usize << (sel >> 1 & 7);
    let mut out = vec![0u8; cluster];
    let miniz = qcow_core::decompress::decompress(ty, input, &mut out);
    // The CLI's decoder (zlib-rs): where both succeed, the same bytes.
    let mut again = vec![0u8; cluster];
    let zlib = qcow_core::decompress::Decoder::new().decompress(ty, input, &mut again);
    if miniz.is_ok() && zlib.is_ok() {
        assert!(out == again, "the two zlib decoders disagree");
    }
}

/// LUKS1 header parsing, the luksDump rendering, and an unlock attempt with
/// [`FUZZ_PASSPHRASE`] (AF merge, digest check) when the iteration counts
/// are modest.
pub fn luks1_unlock(data: &[u8]) {
    let _ = luks_core::luks1::probe(data);
    let mut dev = MemDevice::read_only(data);
    let Ok(hdr) = luks_core::luks1::read_header(&mut dev) else {
        return;
    };
    let _ = format!("{}", hdr.dump());
    let _ = luks_core::luks1::key_slot_layout(hdr.key_bytes);
    let cheap = hdr.mk_digest_iter <= FUZZ_MAX_ITERATIONS
        && hdr
            .key_slots
            .iter()
            .all(|k| !k.active || k.iterations <= FUZZ_MAX_ITERATIONS);
    if cheap {
        if let Ok((key, _)) = luks_core::luks1::unlock(&mut dev, &hdr, FUZZ_PASSPHRASE, None) {
            let _ = luks_core::luks1::data_cipher::<()>(&hdr, &key);
        }
    }
}

/// LUKS2: both header copies (checksums, seqid, the secondary found by
/// scanning), the bounded JSON metadata, and an unlock attempt with
/// [`FUZZ_PASSPHRASE`] when the key slots' KDFs are cheap: PBKDF2 up to
/// [`FUZZ_MAX_ITERATIONS`], Argon2 within [`FUZZ_ARGON2_BLOCKS`] of
/// memory and 4 passes (a larger request exercises the memory error).
pub fn luks2_unlock(data: &[u8]) {
    use luks_core::luks2::{self, meta::Kdf};
    let _ = luks2::probe(data);
    let _ = luks2::version(data);
    let mut dev = MemDevice::read_only(data);
    let mut json = vec![0u8; 64 * 1024];
    let Ok(h) = luks2::read_header(&mut dev, &mut json) else {
        return;
    };
    let cheap = h.meta.keyslots.iter().all(|k| match &k.kdf {
        Some(Kdf::Pbkdf2 { iterations, .. }) => *iterations <= FUZZ_MAX_ITERATIONS,
        Some(Kdf::Argon2 { time, .. }) => *time <= 4,
        _ => true,
    });
    if cheap {
        let mut mem = vec![luks2::Argon2Block::default(); FUZZ_ARGON2_BLOCKS];
        let _ = luks2::unlock(&mut dev, &h, FUZZ_PASSPHRASE, None, &mut mem);
    }
}

/// The checker over an in-memory image: a read-only check, then `-r all`
/// on a copy and a second check of the repaired image.
pub fn qcow2_check(data: &[u8]) {
    use qcow_core::check::{check, Repair};
    let mut ro = MemDevice::read_only(data);
    let _ = check(&mut ro, Repair::None);
    let mut copy = luks_core::io::VecDevice::from_vec(data.to_vec());
    if check(&mut copy, Repair::All).is_ok() {
        let _ = check(&mut copy, Repair::None);
    }
}

/// The command line's `-o` lists, `--object` strings and sizes.
pub fn cli_options(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = opts::split_list(s);
    let _ = opts::parse_size(s);
    let _ = opts::redact(s);
    let _ = opts::parse_object(s);
    if let Ok(m) = opts::OptionMap::parse(&[s]) {
        for k in ["size", "cluster_size", "refcount_bits", "encrypt.iter-time"] {
            let _ = m.get_size(k);
            let _ = m.get_u64(k);
        }
        let _ = m.reject_unused("qcow2");
    }
}
