//! `qimg check` against `qemu-img check` on a corpus of corrupted images.
//!
//! Every image starts as a good one made by qemu-img; the test then pokes
//! bytes at offsets read from that image's own header and tables (never
//! offsets assumed from qemu-img's layout), reproducing the scenarios of
//! QEMU's iotests 060 (overlaps, COPIED, zero refcounts), 080 (header
//! fields qemu-img check reports), 108 (broken refcount tables and
//! blocks), 138 (compressed clusters), 044 (multi-cluster refcount
//! tables) and two real bugs: a refcount block that does not count itself
//! (OpenBSD vmd) and a LUKS header region that ends past the end of the
//! file (images written by QEMU < 5.0).
//!
//! For each image: the same exit code, corruption, leak and check-error
//! counts (the whole JSON but the file name) from both tools; then
//! `qimg check -r all` on a copy, after which both tools call the image
//! clean and qemu-img reads the same guest data as from the good image.
//! Where qemu-img cannot recover the data either, the test says so and only
//! requires both tools to agree about the repaired image.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly

use std::path::{Path, PathBuf};
use std::process::Command;

use qcow_core::entry::{self, COMPRESSED, COPIED, OFFSET_MASK};
use qcow_core::header::field;
use qimg_tests::poke::{get32, get64, header as hdr, l1_pos, l2_table, put32, put64, put_field};
use qimg_tests::qemu::{pattern, write_tmp, Qemu};
use qimg_tests::{qimg, run_ok};

const SECRET: &str = "secret,id=s0,data=check-corpus";

/// The good images the corpus starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    /// 64 KiB clusters, 4 MiB, three written clusters.
    Plain,
    /// 512-byte clusters, 1 MiB, a few written clusters.
    Small,
    /// 64 KiB clusters with an internal snapshot: shared clusters.
    Snap,
    /// Compressed clusters (64 KiB clusters, several per host cluster).
    Compressed,
    /// 512-byte clusters, 64-bit refcounts, 3 MiB written: a refcount
    /// table of several clusters (iotest 044's territory).
    BigTable,
    /// LUKS-encrypted qcow2.
    Encrypted,
    /// Extended L2 entries (subclusters), 64 KiB clusters.
    Extended,
    /// A persistent dirty bitmap with a bitmap table and a data cluster.
    Bitmap,
    /// 1-bit refcounts: a second reference overflows.
    Narrow,
    /// A preallocated zero cluster (zero flag with a host cluster).
    ZeroAlloc,
}

/// Whether qemu-img itself can get the guest data back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recover {
    /// Repair yields a clean image with the good image's guest data.
    Full,
    /// The pointer to the data is what is broken: no tool can know the old
    /// value, so qemu-img's own `-r all` leaves errors or other data too.
    /// Both tools must then agree about the image qimg repaired.
    QemuCannot,
}

/// Damage done to an image's bytes.
type Poke = fn(&mut Vec<u8>);

struct Case {
    name: &'static str,
    base: Base,
    poke: Poke,
    recover: Recover,
}

// ---- reading the image the test is about to damage ----

fn cs(d: &[u8]) -> u64 {
    hdr(d).cluster_size()
}

/// Byte offset of the L2 entry for guest cluster `g` (its table must exist).
fn l2_pos(d: &[u8], g: u64) -> u64 {
    let per = cs(d) / 8;
    let t = l2_table(d, g / per);
    assert_ne!(t, 0, "guest cluster {g} has no L2 table");
    t + (g % per) * 8
}

/// Byte offset of the extended (16-byte) L2 entry of guest cluster `g`.
fn l2_pos_ext(d: &[u8], g: u64) -> u64 {
    let per = cs(d) / 16;
    let t = l2_table(d, g / per);
    assert_ne!(t, 0, "guest cluster {g} has no L2 table");
    t + (g % per) * 16
}

/// Every standard L2 entry of the active layer, in guest order, that
/// `keep` keeps: (position, entry).
fn l2_entries(d: &[u8], keep: impl Fn(u64) -> bool) -> Vec<(u64, u64)> {
    let per = cs(d) / 8;
    let mut out = Vec::new();
    for i in 0..u64::from(hdr(d).l1_size) {
        let t = l2_table(d, i);
        if t == 0 {
            continue;
        }
        for j in 0..per {
            let e = get64(d, t + j * 8);
            if keep(e) {
                out.push((t + j * 8, e));
            }
        }
    }
    out
}

/// Every allocated (non-compressed) guest cluster of the active layer: (L2
/// entry position, host offset).
fn data_entries(d: &[u8]) -> Vec<(u64, u64)> {
    l2_entries(d, |e| e & COMPRESSED == 0 && e & OFFSET_MASK != 0)
        .into_iter()
        .map(|(pos, e)| (pos, e & OFFSET_MASK))
        .collect()
}

/// Every compressed entry of the active layer: (position, entry).
fn compressed_entries(d: &[u8]) -> Vec<(u64, u64)> {
    l2_entries(d, |e| e & COMPRESSED != 0)
}

fn reftable_pos(d: &[u8], i: u64) -> u64 {
    hdr(d).refcount_table_offset + i * 8
}

/// (refcount block offset, index in it) of a cluster.
fn refcount_slot(d: &[u8], cluster: u64) -> (u64, u64) {
    let h = hdr(d);
    let per = cs(d) * 8 / u64::from(h.refcount_bits());
    let rb = entry::reftable_block_offset(get64(d, reftable_pos(d, cluster / per)));
    assert_ne!(rb, 0, "cluster {cluster} has no refcount block");
    (rb, cluster % per)
}

fn refcount(d: &[u8], cluster: u64) -> u64 {
    let (rb, i) = refcount_slot(d, cluster);
    let o = usize::try_from(rb).unwrap();
    let n = usize::try_from(cs(d)).unwrap();
    entry::refcount_get(&d[o..o + n], i, hdr(d).refcount_order).unwrap()
}

fn set_refcount(d: &mut [u8], cluster: u64, v: u64) {
    let (rb, i) = refcount_slot(d, cluster);
    let order = hdr(d).refcount_order;
    let o = usize::try_from(rb).unwrap();
    let n = usize::try_from(cs(d)).unwrap();
    assert!(entry::refcount_set(&mut d[o..o + n], i, order, v));
}

fn cluster_of(d: &[u8], off: u64) -> u64 {
    off / cs(d)
}

/// Appends `n` zero clusters to the file (room for leaked clusters).
fn grow(d: &mut Vec<u8>, n: u64) -> u64 {
    let c = cs(d);
    let first = (d.len() as u64).div_ceil(c);
    d.resize(usize::try_from((first + n) * c).unwrap(), 0);
    first
}

// ---- the corpus ----

fn corpus() -> Vec<Case> {
    use Base::*;
    use Recover::*;
    vec![
        // 060: a refcount block at the refcount table's own cluster.
        Case {
            name: "060-refblock-is-reftable",
            base: Plain,
            recover: Full,
            poke: |d| {
                let rt = hdr(d).refcount_table_offset;
                let at = reftable_pos(d, 0);
                put64(d, at, rt);
            },
        },
        // 060: the active L1 table overlapping the refcount table (the L1
        // table offset moved onto it: the real L1 is lost).
        Case {
            name: "060-active-l1-at-reftable",
            base: Plain,
            recover: QemuCannot,
            poke: |d| {
                let rt = hdr(d).refcount_table_offset;
                put_field(d, field::L1_TABLE_OFFSET, rt);
            },
        },
        // 060: the refcount table overlapping the active L1 table (its
        // entries then name refcount blocks nobody can read).
        Case {
            name: "060-reftable-at-active-l1",
            base: Plain,
            recover: Full,
            poke: |d| {
                let l1 = hdr(d).l1_table_offset;
                put_field(d, field::REFCOUNT_TABLE_OFFSET, l1);
            },
        },
        // 060: an L2 table at the refcount block's cluster.
        Case {
            name: "060-l2-overlaps-refblock",
            base: Plain,
            recover: QemuCannot,
            poke: |d| {
                let rb = entry::reftable_block_offset(get64(d, reftable_pos(d, 0)));
                let at = l1_pos(d, 0);
                put64(d, at, rb | COPIED);
            },
        },
        // 060: an L2 entry pointing at the active L1 table.
        Case {
            name: "060-l2-entry-at-l1",
            base: Plain,
            recover: QemuCannot,
            poke: |d| {
                let l1 = hdr(d).l1_table_offset;
                let at = l2_pos(d, 0);
                put64(d, at, l1 | COPIED);
            },
        },
        // 060: an L1 entry naming the header cluster as its L2 table.
        Case {
            name: "060-l1-entry-at-header",
            base: Plain,
            recover: QemuCannot,
            poke: |d| {
                let at = l1_pos(d, 0);
                put64(d, at, COPIED);
            },
        },
        // 060: a data cluster's refcount is 0 while it is in use.
        Case {
            name: "060-zero-refcount-data",
            base: Plain,
            recover: Full,
            poke: |d| {
                let (_, host) = data_entries(d)[0];
                let at = cluster_of(d, host);
                set_refcount(d, at, 0);
            },
        },
        // 060: an L2 table's refcount is 0.
        Case {
            name: "060-zero-refcount-l2",
            base: Plain,
            recover: Full,
            poke: |d| {
                let t = l2_table(d, 0);
                let at = cluster_of(d, t);
                set_refcount(d, at, 0);
            },
        },
        // 060: the L1 table's refcount is 0.
        Case {
            name: "060-zero-refcount-l1",
            base: Plain,
            recover: Full,
            poke: |d| {
                let l1 = hdr(d).l1_table_offset;
                let at = cluster_of(d, l1);
                set_refcount(d, at, 0);
            },
        },
        // 060: the header cluster's refcount is 0.
        Case {
            name: "060-zero-refcount-header",
            base: Plain,
            recover: Full,
            poke: |d| {
                set_refcount(d, 0, 0);
            },
        },
        // 060: COPIED missing on a data cluster with refcount 1.
        Case {
            name: "060-copied-missing-data",
            base: Plain,
            recover: Full,
            poke: |d| {
                let (p, _) = data_entries(d)[1];
                let e = get64(d, p);
                put64(d, p, e & !COPIED);
            },
        },
        // 060: COPIED missing on an L1 entry.
        Case {
            name: "060-copied-missing-l1",
            base: Plain,
            recover: Full,
            poke: |d| {
                let p = l1_pos(d, 0);
                let e = get64(d, p);
                put64(d, p, e & !COPIED);
            },
        },
        // 060: COPIED set on a cluster shared with a snapshot.
        Case {
            name: "060-copied-on-shared",
            base: Snap,
            recover: Full,
            poke: |d| {
                let (p, host) = data_entries(d)
                    .into_iter()
                    .find(|&(_, h)| refcount(d, cluster_of(d, h)) == 2)
                    .expect("a shared cluster");
                let _ = host;
                let e = get64(d, p);
                put64(d, p, e | COPIED);
            },
        },
        // 060: a refcount too high (leak) on a data cluster, with COPIED
        // then wrong too.
        Case {
            name: "060-refcount-too-high",
            base: Plain,
            recover: Full,
            poke: |d| {
                let (_, host) = data_entries(d)[0];
                let at = cluster_of(d, host);
                set_refcount(d, at, 2);
            },
        },
        // Leaked clusters past the last used one.
        Case {
            name: "leaks-at-end",
            base: Plain,
            recover: Full,
            poke: |d| {
                let first = grow(d, 3);
                for c in first..first + 3 {
                    set_refcount(d, c, 1);
                }
            },
        },
        Case {
            name: "leaks-small-clusters",
            base: Small,
            recover: Full,
            poke: |d| {
                let first = grow(d, 5);
                for c in [first, first + 2, first + 4] {
                    set_refcount(d, c, 1);
                }
            },
        },
        Case {
            name: "zero-refcount-small-clusters",
            base: Small,
            recover: Full,
            poke: |d| {
                for (_, host) in data_entries(d).into_iter().take(3) {
                    let at = cluster_of(d, host);
                    set_refcount(d, at, 0);
                }
            },
        },
        // Data cluster past the end of the file.
        Case {
            name: "data-past-eof",
            base: Plain,
            recover: QemuCannot,
            poke: |d| {
                let (p, _) = data_entries(d)[0];
                let far = (d.len() as u64 / cs(d) + 100) * cs(d);
                put64(d, p, far | COPIED);
            },
        },
        // An L2 table past the end of the file.
        Case {
            name: "l2-past-eof",
            base: Plain,
            recover: QemuCannot,
            poke: |d| {
                let far = (d.len() as u64 / cs(d) + 100) * cs(d);
                let at = l1_pos(d, 0);
                put64(d, at, far | COPIED);
            },
        },
        // Unaligned data cluster and L2 table offsets.
        Case {
            name: "data-unaligned",
            base: Plain,
            recover: QemuCannot,
            poke: |d| {
                let (p, _) = data_entries(d)[0];
                let e = get64(d, p);
                put64(d, p, e + 512);
            },
        },
        Case {
            name: "l2-unaligned",
            base: Plain,
            recover: QemuCannot,
            poke: |d| {
                let p = l1_pos(d, 0);
                let e = get64(d, p);
                put64(d, p, e + 512);
            },
        },
        // Reserved bits in an L2 entry.
        Case {
            name: "l2-reserved-bits",
            base: Plain,
            recover: QemuCannot,
            poke: |d| {
                let (p, _) = data_entries(d)[0];
                let e = get64(d, p);
                put64(d, p, e | 1 << 57);
            },
        },
        // 108: the refcount table entry of the only block is 0.
        Case {
            name: "108-refblock-entry-zero",
            base: Plain,
            recover: Full,
            poke: |d| {
                let at = reftable_pos(d, 0);
                put64(d, at, 0);
            },
        },
        // 108: the refcount block is past the end of the file.
        Case {
            name: "108-refblock-past-eof",
            base: Plain,
            recover: Full,
            poke: |d| {
                let at = reftable_pos(d, 0);
                put64(d, at, 1 << 32);
            },
        },
        // 108: the refcount block offset is not cluster aligned.
        Case {
            name: "108-refblock-unaligned",
            base: Plain,
            recover: Full,
            poke: |d| {
                let e = get64(d, reftable_pos(d, 0));
                let at = reftable_pos(d, 0);
                put64(d, at, e + 512);
            },
        },
        // 108: a refcount block at a data cluster.
        Case {
            name: "108-refblock-at-data",
            base: Plain,
            recover: Full,
            poke: |d| {
                let (_, host) = data_entries(d)[0];
                let at = reftable_pos(d, 0);
                put64(d, at, host);
            },
        },
        // 108: the refcount table's own cluster counted 0.
        Case {
            name: "108-reftable-uncounted",
            base: Plain,
            recover: Full,
            poke: |d| {
                let rt = hdr(d).refcount_table_offset;
                let at = cluster_of(d, rt);
                set_refcount(d, at, 0);
            },
        },
        // Real bug (OpenBSD vmd): a refcount block that does not count
        // itself.
        Case {
            name: "vmd-refblock-not-self-counted",
            base: Plain,
            recover: Full,
            poke: |d| {
                let rb = entry::reftable_block_offset(get64(d, reftable_pos(d, 0)));
                let at = cluster_of(d, rb);
                set_refcount(d, at, 0);
            },
        },
        Case {
            name: "vmd-refblock-not-self-counted-small",
            base: Small,
            recover: Full,
            poke: |d| {
                let rb = entry::reftable_block_offset(get64(d, reftable_pos(d, 0)));
                let at = cluster_of(d, rb);
                set_refcount(d, at, 0);
            },
        },
        // 138: a compressed cluster's host cluster with refcount 0.
        Case {
            name: "138-compressed-refcount-zero",
            base: Compressed,
            recover: Full,
            poke: |d| {
                let (_, e) = compressed_entries(d)[0];
                let host = entry::CompressedDescriptor::decode(e, hdr(d).cluster_bits).host;
                let at = cluster_of(d, host);
                set_refcount(d, at, 0);
            },
        },
        // 138: a compressed host cluster's refcount one too high.
        Case {
            name: "138-compressed-refcount-high",
            base: Compressed,
            recover: Full,
            poke: |d| {
                let (_, e) = compressed_entries(d)[0];
                let host = entry::CompressedDescriptor::decode(e, hdr(d).cluster_bits).host;
                let c = cluster_of(d, host);
                let r = refcount(d, c);
                set_refcount(d, c, r + 1);
            },
        },
        // 138: COPIED on a compressed entry.
        Case {
            name: "138-compressed-copied",
            base: Compressed,
            recover: Full,
            poke: |d| {
                let (p, e) = compressed_entries(d)[0];
                put64(d, p, e | COPIED);
            },
        },
        // 138: a compressed cluster whose descriptor spans into the next
        // host cluster, which nobody else counts.
        Case {
            name: "138-compressed-spanning",
            base: Compressed,
            recover: Full,
            poke: |d| {
                let cb = hdr(d).cluster_bits;
                let (p, e) = *compressed_entries(d).last().unwrap();
                let mut desc = entry::CompressedDescriptor::decode(e, cb);
                let next = (desc.host / cs(d) + 1) * cs(d);
                desc.sectors = (next - desc.host / 512 * 512) / 512 + 1;
                put64(d, p, desc.encode(cb));
            },
        },
        // 044: a leak and a corruption in refcount blocks named by the
        // later clusters of a multi-cluster refcount table.
        Case {
            name: "044-large-reftable-leak",
            base: BigTable,
            recover: Full,
            poke: |d| {
                let first = grow(d, 2);
                set_refcount(d, first + 1, 1);
            },
        },
        Case {
            name: "044-large-reftable-zero",
            base: BigTable,
            recover: Full,
            poke: |d| {
                let (_, host) = *data_entries(d).last().unwrap();
                let at = cluster_of(d, host);
                set_refcount(d, at, 0);
            },
        },
        Case {
            name: "044-large-reftable-entry-zero",
            base: BigTable,
            recover: Full,
            poke: |d| {
                let h = hdr(d);
                let n = u64::from(h.refcount_table_clusters) * cs(d) / 8;
                let last = (0..n)
                    .rev()
                    .find(|&i| get64(d, reftable_pos(d, i)) != 0)
                    .unwrap();
                assert!(last * 8 >= cs(d), "the refcount table should span clusters");
                let at = reftable_pos(d, last);
                put64(d, at, 0);
            },
        },
        // Snapshots: a shared cluster counted once.
        Case {
            name: "snapshot-shared-refcount-low",
            base: Snap,
            recover: Full,
            poke: |d| {
                let (_, host) = data_entries(d)
                    .into_iter()
                    .find(|&(_, h)| refcount(d, cluster_of(d, h)) == 2)
                    .expect("a shared cluster");
                let at = cluster_of(d, host);
                set_refcount(d, at, 1);
            },
        },
        // Extended L2: a subcluster both allocated and zero, and allocation
        // bits on an unallocated cluster (qemu-img reports, cannot fix).
        Case {
            name: "extended-l2-alloc-and-zero",
            base: Extended,
            recover: QemuCannot,
            poke: |d| {
                let p = l2_pos_ext(d, 0) + 8;
                let b = get64(d, p);
                put64(d, p, b | 1 << 32);
            },
        },
        Case {
            name: "extended-l2-unallocated-alloc-bits",
            base: Extended,
            recover: QemuCannot,
            poke: |d| {
                let p = l2_pos_ext(d, 5) + 8;
                assert_eq!(get64(d, p - 8), 0, "guest cluster 5 should be unallocated");
                put64(d, p, 1);
            },
        },
        Case {
            name: "extended-l2-zero-refcount",
            base: Extended,
            recover: Full,
            poke: |d| {
                let host = get64(d, l2_pos_ext(d, 1)) & OFFSET_MASK;
                let at = cluster_of(d, host);
                set_refcount(d, at, 0);
            },
        },
        // Persistent bitmaps: the directory, a bitmap table and a bitmap
        // data cluster are counted like any other cluster.
        Case {
            name: "bitmap-directory-refcount-zero",
            base: Bitmap,
            recover: Full,
            poke: |d| {
                let (dir, _) = bitmap_table(d);
                let at = cluster_of(d, dir);
                set_refcount(d, at, 0);
            },
        },
        Case {
            name: "bitmap-table-refcount-high",
            base: Bitmap,
            recover: Full,
            poke: |d| {
                let (_, table) = bitmap_table(d);
                let at = cluster_of(d, table);
                set_refcount(d, at, 2);
            },
        },
        Case {
            name: "bitmap-data-refcount-zero",
            base: Bitmap,
            recover: Full,
            poke: |d| {
                let (_, table) = bitmap_table(d);
                let data = get64(d, table) & OFFSET_MASK;
                assert_ne!(data, 0, "the bitmap should have a data cluster");
                let at = cluster_of(d, data);
                set_refcount(d, at, 0);
            },
        },
        // 080: header fields qemu-img opens and check reports: the refcount
        // table past the end of the file, of zero clusters, one cluster too
        // long (running over the refcount block), and the L1 table past
        // the end of the file.
        Case {
            name: "080-reftable-past-eof",
            base: Plain,
            recover: Full,
            poke: |d| {
                let far = (d.len() as u64 / cs(d) + 1000) * cs(d);
                put_field(d, field::REFCOUNT_TABLE_OFFSET, far);
            },
        },
        Case {
            name: "080-reftable-zero-clusters",
            base: Plain,
            recover: Full,
            poke: |d| {
                put_field(d, field::REFCOUNT_TABLE_CLUSTERS, 0);
            },
        },
        Case {
            name: "080-reftable-too-long",
            base: Plain,
            recover: Full,
            poke: |d| {
                let n = hdr(d).refcount_table_clusters + 1;
                put_field(d, field::REFCOUNT_TABLE_CLUSTERS, u64::from(n));
            },
        },
        Case {
            name: "080-l1-past-eof",
            base: Plain,
            recover: QemuCannot,
            poke: |d| {
                let far = (d.len() as u64 / cs(d) + 1000) * cs(d);
                put_field(d, field::L1_TABLE_OFFSET, far);
            },
        },
        // A preallocated zero cluster at an unaligned offset: it holds no
        // data, so repair makes it a plain zero cluster (as qemu-img does).
        Case {
            name: "zero-alloc-unaligned",
            base: ZeroAlloc,
            recover: Full,
            poke: |d| {
                let (p, _) = data_entries(d)
                    .into_iter()
                    .find(|&(p, _)| get64(d, p) & 1 != 0)
                    .expect("a preallocated zero cluster");
                let e = get64(d, p);
                put64(d, p, e + 512);
            },
        },
        // Refcount overflow: with 1-bit refcounts, two L2 entries naming
        // one cluster are one reference too many (qemu-img cannot fix it).
        Case {
            name: "overflow-refcount-bits-1",
            base: Narrow,
            recover: QemuCannot,
            poke: |d| {
                let (_, host) = data_entries(d)[0];
                let at = l2_pos(d, 1);
                put64(d, at, host | COPIED);
            },
        },
        // 080: snapshot table entries qemu-img check reports (it opens the
        // image and cannot delete the entry, so its -r all leaves them).
        Case {
            name: "080-snapshot-l1-unaligned",
            base: Snap,
            recover: QemuCannot,
            poke: |d| {
                let at = hdr(d).snapshots_offset;
                let l1 = get64(d, at);
                put64(d, at, l1 + 512);
            },
        },
        Case {
            name: "080-snapshot-l1-too-large",
            base: Snap,
            recover: QemuCannot,
            poke: |d| {
                let at = hdr(d).snapshots_offset + 8;
                put32(d, at, 0x1000_0000);
            },
        },
        Case {
            name: "080-snapshot-l1-past-eof",
            base: Snap,
            recover: QemuCannot,
            poke: |d| {
                let at = hdr(d).snapshots_offset;
                put64(d, at, 1 << 32);
            },
        },
        // 080: the dirty bit with leaked clusters (lazy refcounts left
        // behind by a crash).
        Case {
            name: "080-dirty-with-leaks",
            base: Plain,
            recover: Full,
            poke: |d| {
                let first = grow(d, 2);
                set_refcount(d, first, 1);
                let inc = hdr(d).incompatible_features | 1;
                put_field(d, field::INCOMPATIBLE_FEATURES, inc);
            },
        },
        // 060: the corrupt bit, left by a prevented overlapping write,
        // with leaked clusters; repair clears it.
        Case {
            name: "060-corrupt-bit-with-leaks",
            base: Plain,
            recover: Full,
            poke: |d| {
                let first = grow(d, 2);
                set_refcount(d, first + 1, 1);
                let inc = hdr(d).incompatible_features | 2;
                put_field(d, field::INCOMPATIBLE_FEATURES, inc);
            },
        },
        // Real bug (QEMU < 5.0): the LUKS header region of an encrypted
        // image ends past the end of the file. The key slot in use stays
        // inside, so the image still opens.
        Case {
            name: "luks-region-past-eof",
            base: Encrypted,
            recover: Full,
            poke: |d| {
                let (off, len) = crypto_region(d);
                let key_bytes = u64::from(get32(d, off + 108));
                let slot = off + 208;
                let kmo = u64::from(get32(d, slot + 40));
                let stripes = u64::from(get32(d, slot + 44));
                let used = kmo * 512 + key_bytes * stripes;
                let end = off + used.next_multiple_of(cs(d));
                assert!(off + len - end >= cs(d), "region too small to cut");
                assert!(
                    d.len() as u64 <= off + len.next_multiple_of(cs(d)),
                    "region is not last"
                );
                d.truncate(usize::try_from(end).unwrap());
            },
        },
    ]
}

/// The bitmap directory's offset and the first bitmap's table offset.
fn bitmap_table(d: &[u8]) -> (u64, u64) {
    let p = extension_payload(d, qcow_core::header::ext::BITMAPS);
    let dir = get64(d, p + 16);
    (dir, get64(d, dir))
}

/// The LUKS header region (offset, length) from the crypto extension.
fn crypto_region(d: &[u8]) -> (u64, u64) {
    let p = extension_payload(d, qcow_core::header::ext::CRYPTO);
    (get64(d, p), get64(d, p + 8))
}

/// Where header extension `ty`'s payload starts.
fn extension_payload(d: &[u8], ty: u32) -> u64 {
    let mut o = hdr(d).extensions_start();
    loop {
        let t = get32(d, o);
        let l = u64::from(get32(d, o + 4));
        assert_ne!(t, 0, "no header extension {ty:#x}");
        if t == ty {
            return o + 8;
        }
        o += 8 + l.next_multiple_of(8);
    }
}

// ---- running the tools ----

fn make_base(q: &Qemu, dir: &Path, base: Base) -> PathBuf {
    let p = dir.join(format!("{base:?}.qcow2"));
    let io = |cmds: &[&str]| q.io(&p, "qcow2", cmds);
    match base {
        Base::Plain => {
            q.create(&p, "qcow2", "", "4M");
            io(&["write -P 0x11 0 128k", "write -P 0x22 1M 64k"]);
        }
        Base::Small => {
            q.create(&p, "qcow2", "cluster_size=512", "1M");
            io(&[
                "write -P 0x33 0 2k",
                "write -P 0x44 300k 1k",
                "write -P 0x55 900k 512",
            ]);
        }
        Base::Snap => {
            q.create(&p, "qcow2", "", "4M");
            io(&["write -P 0x11 0 192k"]);
            run_ok(Command::new(&q.img).args(["snapshot", "-c", "s1"]).arg(&p));
            io(&["write -P 0x66 64k 64k", "write -P 0x77 2M 64k"]);
        }
        Base::Compressed => {
            let raw = write_tmp(dir, "compressed-src.raw", &pattern(1 << 20, 7, 3));
            // Compressible: runs of one byte per 4 KiB.
            let mut data = std::fs::read(&raw).unwrap();
            for (i, c) in data.chunks_mut(4096).enumerate() {
                if i % 2 == 1 {
                    c.fill(u8::try_from(i % 251).unwrap());
                }
            }
            std::fs::write(&raw, &data).unwrap();
            run_ok(
                Command::new(&q.img)
                    .args(["convert", "-c", "-O", "qcow2", "-o", "cluster_size=64k"])
                    .arg(&raw)
                    .arg(&p),
            );
        }
        Base::Bitmap => {
            q.create(&p, "qcow2", "", "4M");
            run_ok(
                Command::new(&q.img)
                    .args(["bitmap", "--add"])
                    .arg(&p)
                    .arg("b0"),
            );
            io(&["write -P 0x41 0 1M"]);
        }
        Base::ZeroAlloc => {
            q.create(&p, "qcow2", "", "4M");
            io(&["write -P 0x61 0 128k", "write -z 0 64k"]);
        }
        Base::Narrow => {
            q.create(&p, "qcow2", "refcount_bits=1", "4M");
            io(&["write -P 0x51 0 128k"]);
        }
        Base::Extended => {
            q.create(&p, "qcow2", "extended_l2=on", "4M");
            io(&["write -P 0x21 0 100k", "write -P 0x31 1M 8k"]);
        }
        Base::BigTable => {
            q.create(&p, "qcow2", "cluster_size=512,refcount_bits=64", "4M");
            io(&["write -P 0x5a 0 3M"]);
        }
        Base::Encrypted => {
            run_ok(
                Command::new(&q.img)
                    .args(["create", "-q", "-f", "qcow2", "--object", SECRET, "-o"])
                    .arg("encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10")
                    .arg(&p)
                    .arg("1M"),
            );
            // No data: QEMU puts data clusters after the LUKS region, and
            // the region must be the end of the file to be cut short.
        }
    }
    p
}

fn is_encrypted(base: Base) -> bool {
    base == Base::Encrypted
}

/// `qemu-img check [-r MODE] --output=json`: exit code and JSON without
/// the file name.
fn qemu_check(q: &Qemu, p: &Path, base: Base, repair: Option<&str>) -> (i32, serde_json::Value) {
    let mut cmd = Command::new(&q.img);
    cmd.arg("check").arg("--output=json");
    if let Some(r) = repair {
        cmd.args(["-r", r]);
    }
    if is_encrypted(base) {
        cmd.args(["--object", SECRET, "--image-opts"])
            .arg(qimg_tests::qemu::encrypted_image_opts("qcow2", p));
    } else {
        cmd.arg(p);
    }
    parse(&cmd.output().unwrap())
}

fn qimg_check(p: &Path, repair: Option<&str>) -> (i32, serde_json::Value) {
    let mut cmd = qimg();
    cmd.args(["check", "--output", "json"]);
    if let Some(r) = repair {
        cmd.args(["-r", r]);
    }
    parse(&cmd.arg(p).output().unwrap())
}

fn parse(out: &std::process::Output) -> (i32, serde_json::Value) {
    let mut v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    if let Some(m) = v.as_object_mut() {
        m.remove("filename");
    }
    (out.status.code().unwrap_or(-1), v)
}

fn to_raw(q: &Qemu, p: &Path, base: Base, out: &Path) {
    let mut cmd = Command::new(&q.img);
    cmd.args(["convert", "-O", "raw"]);
    if is_encrypted(base) {
        cmd.args(["--object", SECRET, "--image-opts"])
            .arg(qimg_tests::qemu::encrypted_image_opts("qcow2", p));
    } else {
        cmd.arg(p);
    }
    run_ok(cmd.arg(out));
}

/// qemu-img's stderr as qimg words it: its own name, and without the
/// corruption event QEMU's block layer logs when it first sees damage
/// (qimg has no such event).
fn qemu_stderr(b: &[u8]) -> std::borrow::Cow<'static, str> {
    let s: String = String::from_utf8_lossy(b)
        .lines()
        .filter(|l| {
            !l.starts_with("qcow2: Image is corrupt") && !l.starts_with("Use qemu-img amend")
        })
        .map(|l| format!("{}\n", l.replacen("qemu-img: ", "qimg: ", 1)))
        .collect();
    s.into()
}

/// qimg's stderr without its own advice lines (qemu-img has its own).
fn qimg_stderr(b: &[u8]) -> std::borrow::Cow<'static, str> {
    let s: String = String::from_utf8_lossy(b)
        .lines()
        .filter(|l| !l.starts_with("More references than the refcount width holds"))
        .map(|l| format!("{l}\n"))
        .collect();
    s.into()
}

fn count(v: &serde_json::Value, k: &str) -> u64 {
    v.get(k).map_or(0, |n| n.as_u64().unwrap())
}

#[test]
fn corpus_agrees_with_qemu_img_and_repairs() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cases = corpus();
    assert!(cases.len() >= 30);
    let mut bases: Vec<(Base, Vec<u8>, Vec<u8>)> = Vec::new();
    let mut failures = Vec::new();
    for case in &cases {
        if !bases.iter().any(|b| b.0 == case.base) {
            let p = make_base(&q, dir.path(), case.base);
            let raw = dir.path().join("base.raw");
            to_raw(&q, &p, case.base, &raw);
            bases.push((
                case.base,
                std::fs::read(&p).unwrap(),
                std::fs::read(&raw).unwrap(),
            ));
        }
        let (_, good, good_raw) = bases.iter().find(|b| b.0 == case.base).unwrap();
        let mut img = good.clone();
        (case.poke)(&mut img);
        let path = dir.path().join(format!("{}.qcow2", case.name));
        std::fs::write(&path, &img).unwrap();

        let theirs = qemu_check(&q, &path, case.base, None);
        let ours = qimg_check(&path, None);
        if theirs.0 == 0 {
            failures.push(format!(
                "{}: qemu-img finds nothing wrong ({})",
                case.name, theirs.1
            ));
        }
        if ours != theirs {
            failures.push(format!(
                "{}: qemu-img check exit {} {}\n    qimg check exit {} {}",
                case.name, theirs.0, theirs.1, ours.0, ours.1
            ));
            continue;
        }

        // The human report, problem lines included, word for word.
        if !is_encrypted(case.base) {
            let theirs = Command::new(&q.img)
                .arg("check")
                .arg(&path)
                .output()
                .unwrap();
            let ours = qimg().arg("check").arg(&path).output().unwrap();
            if (ours.stdout.as_slice(), qimg_stderr(&ours.stderr))
                != (theirs.stdout.as_slice(), qemu_stderr(&theirs.stderr))
            {
                failures.push(format!(
                    "{}: human output differs\n--- qemu-img\n{}{}\n--- qimg\n{}{}",
                    case.name,
                    String::from_utf8_lossy(&theirs.stderr),
                    String::from_utf8_lossy(&theirs.stdout),
                    String::from_utf8_lossy(&ours.stderr),
                    String::from_utf8_lossy(&ours.stdout)
                ));
            }
        }

        // Repair a copy with qimg.
        let fixed = dir.path().join(format!("{}-fixed.qcow2", case.name));
        std::fs::write(&fixed, &img).unwrap();
        let rep = qimg_check(&fixed, Some("all"));
        let after_qemu = qemu_check(&q, &fixed, case.base, None);
        let after_ours = qimg_check(&fixed, None);
        match case.recover {
            Recover::Full => {
                if rep.0 != 0 || after_qemu.0 != 0 || after_ours.0 != 0 {
                    failures.push(format!(
                        "{}: after qimg check -r all ({} {}): qemu-img {} {}, qimg {} {}",
                        case.name,
                        rep.0,
                        rep.1,
                        after_qemu.0,
                        after_qemu.1,
                        after_ours.0,
                        after_ours.1
                    ));
                    continue;
                }
                let raw = dir.path().join("fixed.raw");
                to_raw(&q, &fixed, case.base, &raw);
                if std::fs::read(&raw).unwrap() != *good_raw {
                    failures.push(format!("{}: guest data changed by the repair", case.name));
                }
            }
            Recover::QemuCannot => {
                // qemu-img's own repair does not get a clean image with the
                // old data back either; the tools must agree on ours.
                if after_qemu.0 != after_ours.0
                    || count(&after_qemu.1, "corruptions") != count(&after_ours.1, "corruptions")
                    || count(&after_qemu.1, "leaks") != count(&after_ours.1, "leaks")
                {
                    failures.push(format!(
                        "{}: after qimg -r all the tools disagree: qemu-img {} {}, qimg {} {}",
                        case.name, after_qemu.0, after_qemu.1, after_ours.0, after_ours.1
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn repair_leaks_fixes_leaks_only() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let p = make_base(&q, dir.path(), Base::Plain);
    let mut d = std::fs::read(&p).unwrap();
    let first = grow(&mut d, 2);
    set_refcount(&mut d, first, 1);
    // A corruption -r leaks must leave alone: an in-use cluster with
    // refcount 0 (and so a COPIED flag that disagrees).
    let (_, host) = data_entries(&d)[0];
    let at = cluster_of(&d, host);
    set_refcount(&mut d, at, 0);
    std::fs::write(&p, &d).unwrap();
    let before = qemu_check(&q, &p, Base::Plain, None);
    assert_eq!(
        (count(&before.1, "leaks"), count(&before.1, "corruptions")),
        (1, 2)
    );
    let (code, v) = qimg_check(&p, Some("leaks"));
    assert_eq!(code, 2, "{v}");
    assert_eq!(count(&v, "leaks-fixed"), 1, "{v}");
    assert_eq!(count(&v, "corruptions-fixed"), 0, "{v}");
    let (code, v) = qemu_check(&q, &p, Base::Plain, None);
    assert_eq!(code, 2, "{v}");
    assert_eq!(
        (count(&v, "leaks"), count(&v, "corruptions")),
        (0, 2),
        "{v}"
    );
}

#[test]
fn human_output_names_clusters_like_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let p = make_base(&q, dir.path(), Base::Plain);
    let mut d = std::fs::read(&p).unwrap();
    let (_, host) = data_entries(&d)[0];
    let at = cluster_of(&d, host);
    set_refcount(&mut d, at, 0);
    let first = grow(&mut d, 1);
    set_refcount(&mut d, first, 1);
    std::fs::write(&p, &d).unwrap();
    let theirs = Command::new(&q.img).arg("check").arg(&p).output().unwrap();
    let ours = qimg().arg("check").arg(&p).output().unwrap();
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(
        String::from_utf8_lossy(&ours.stdout),
        String::from_utf8_lossy(&theirs.stdout)
    );
    assert_eq!(
        String::from_utf8_lossy(&ours.stderr),
        String::from_utf8_lossy(&theirs.stderr)
    );
}

#[test]
fn raw_has_no_checks() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_tmp(dir.path(), "r.raw", &[0u8; 4096]);
    let out = qimg()
        .args(["check", "-f", "raw"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(63));
}

#[test]
fn luks_volume_header_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let key = write_tmp(dir.path(), "key", b"check-corpus");
    let vol = dir.path().join("v.luks");
    run_ok(
        qimg()
            .args(["create", "-q", "-f", "luks", "--key-file"])
            .arg(&key)
            .args(["-o", "iter-time=10"])
            .arg(&vol)
            .arg("1M"),
    );
    let out = qimg().arg("check").arg(&vol).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "No errors were found on the image.\n"
    );
    let (code, v) = qimg_check(&vol, None);
    assert_eq!((code, v["format"].as_str()), (0, Some("luks")));
    let good = std::fs::read(&vol).unwrap();
    let payload = u64::from(get32(&good, 104)) * 512;

    // Cut short before the payload: the payload offset is past the end.
    std::fs::write(&vol, &good[..usize::try_from(payload - 512).unwrap()]).unwrap();
    let out = qimg().arg("check").arg(&vol).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("payload offset"));

    // Key slot 1's key material moved onto key slot 0's.
    let mut bad = good.clone();
    let s0 = 208 + 40;
    let s1 = 208 + 48 + 40;
    let kmo0: [u8; 4] = bad[s0..s0 + 4].try_into().unwrap();
    bad[s1..s1 + 4].copy_from_slice(&kmo0);
    std::fs::write(&vol, &bad).unwrap();
    let (code, v) = qimg_check(&vol, None);
    assert_eq!(code, 2, "{v}");
    assert!(count(&v, "corruptions") >= 1, "{v}");
}

#[test]
fn repair_report_matches_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(make_base(&q, dir.path(), Base::Plain)).unwrap();
    let pokes: [(&str, Poke); 3] = [
        ("leak", |d| {
            let first = grow(d, 2);
            set_refcount(d, first, 1);
        }),
        ("refcount-too-high", |d| {
            let (_, host) = data_entries(d)[0];
            let at = cluster_of(d, host);
            set_refcount(d, at, 2);
        }),
        ("copied-missing", |d| {
            let (p, _) = data_entries(d)[1];
            let e = get64(d, p);
            put64(d, p, e & !COPIED);
        }),
    ];
    for (name, poke) in pokes {
        let mut img = good.clone();
        poke(&mut img);
        for mode in ["leaks", "all"] {
            let theirs = dir.path().join(format!("{name}-{mode}-q.qcow2"));
            let ours = dir.path().join(format!("{name}-{mode}-m.qcow2"));
            std::fs::write(&theirs, &img).unwrap();
            std::fs::write(&ours, &img).unwrap();
            let t = Command::new(&q.img)
                .args(["check", "-r", mode])
                .arg(&theirs)
                .output()
                .unwrap();
            let o = qimg()
                .args(["check", "-r", mode])
                .arg(&ours)
                .output()
                .unwrap();
            assert_eq!(o.status.code(), t.status.code(), "{name} -r {mode}");
            assert_eq!(
                (
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
                (
                    String::from_utf8_lossy(&t.stdout),
                    String::from_utf8_lossy(&t.stderr)
                ),
                "{name} -r {mode}"
            );
        }
    }
}

/// Seeded random damage to the metadata of an image with a snapshot, a
/// compressed cluster and 4 KiB clusters: a flipped bit, a random word, a
/// word naming another cluster, or an offset moved by 512 bytes, in the L1
/// table, the refcount table and block, the snapshot table or an L2 table.
/// Both tools must report the same (exit code and JSON), and after
/// `qimg check -r all` they must agree about the result.
#[test]
fn random_metadata_damage_agrees_with_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    q.create(&base, "qcow2", "cluster_size=4k", "4M");
    q.io(
        &base,
        "qcow2",
        &[
            "write -P 1 0 64k",
            "write -P 2 1M 16k",
            "write -c -P 3 2M 4k",
        ],
    );
    run_ok(
        Command::new(&q.img)
            .args(["snapshot", "-c", "s1"])
            .arg(&base),
    );
    q.io(&base, "qcow2", &["write -P 4 8k 8k"]);
    let good = std::fs::read(&base).unwrap();
    let h = hdr(&good);
    let mut regions = vec![
        (h.l1_table_offset, 64),
        (h.refcount_table_offset, 64),
        (
            entry::reftable_block_offset(get64(&good, h.refcount_table_offset)),
            256,
        ),
        (h.snapshots_offset, 64),
    ];
    for i in 0..u64::from(h.l1_size) {
        let t = l2_table(&good, i);
        if t != 0 {
            regions.push((t, 2048));
        }
    }
    let mut x = 0x0ddc_0ffe_e15b_ad5eu64;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let clusters = good.len() as u64 / 4096;
    let mut failures = Vec::new();
    for round in 0..60 {
        let mut d = good.clone();
        let (start, len) = regions[usize::try_from(next(regions.len() as u64)).unwrap()];
        let at = start + next(len) / 8 * 8;
        let old = get64(&d, at);
        let new = match next(4) {
            0 => old ^ 1 << next(64),
            1 => next(u64::MAX) ^ next(u64::MAX) << 32,
            2 => (next(clusters + 4) * 4096) | (old & COPIED),
            _ => old.wrapping_add(512),
        };
        put64(&mut d, at, new);
        let p = dir.path().join(format!("r{round}.qcow2"));
        std::fs::write(&p, &d).unwrap();
        let theirs = qemu_check(&q, &p, Base::Plain, None);
        let ours = qimg_check(&p, None);
        if theirs != ours {
            failures.push(format!(
                "round {round}: {new:#x} at {at:#x}: qemu-img {} {}, qimg {} {}",
                theirs.0, theirs.1, ours.0, ours.1
            ));
            continue;
        }
        if theirs.0 == 1 {
            continue; // neither tool can check it
        }
        let rep = qimg_check(&p, Some("all"));
        let (a, b) = (qemu_check(&q, &p, Base::Plain, None), qimg_check(&p, None));
        if a.0 != b.0 || count(&a.1, "corruptions") != count(&b.1, "corruptions") {
            failures.push(format!(
                "round {round}: after qimg -r all ({}): qemu-img {} {}, qimg {} {}",
                rep.0, a.0, a.1, b.0, b.1
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
