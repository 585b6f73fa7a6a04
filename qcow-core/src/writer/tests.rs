#![allow(
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation,
    clippy::unwrap_used
)] // test code

use super::*;
use crate::create::{create, CreateOptions};
use luks_core::io::{FaultyDevice, VecDevice};

fn opts(cs: u64, rb: u32, size: u64) -> CreateOptions<'static> {
    CreateOptions {
        size,
        cluster_size: cs,
        refcount_bits: rb,
        ..CreateOptions::default()
    }
}

/// Every cluster referenced by metadata, counted, must equal its refcount.
fn check_refcounts(w: &mut Qcow2Writer<VecDevice>) {
    check_refs(w, false);
}

/// Counts the references of every cluster and compares them with the
/// refcounts: equal, or (`leaks_ok`, what a crash may leave) at least as
/// many refcounts as references.
fn check_refs(w: &mut Qcow2Writer<VecDevice>, leaks_ok: bool) {
    let cb = w.cb();
    let mut refs: BTreeMap<u64, u64> = BTreeMap::new();
    let mut add = |off: u64, n: u64| {
        for i in 0..n {
            *refs.entry((off >> cb) + i).or_default() += 1;
        }
    };
    add(0, 1);
    add(
        w.hdr.refcount_table_offset,
        u64::from(w.hdr.refcount_table_clusters),
    );
    for &e in &w.reftable.clone() {
        if e != 0 {
            add(e, 1);
        }
    }
    let l1n = (u64::from(w.hdr.l1_size) * 8).div_ceil(w.cs()).max(1);
    add(w.hdr.l1_table_offset, l1n);
    for e in w.l1.clone() {
        let l2 = entry::l1_l2_offset(e);
        if l2 == 0 {
            continue;
        }
        add(l2, 1);
        let t = w.l2_table(l2).unwrap().clone();
        for (i, x) in t.iter().enumerate() {
            if w.extended() && i % 2 == 1 {
                continue;
            }
            if x & entry::COMPRESSED != 0 {
                let d = CompressedDescriptor::decode(*x, cb);
                let (o, l) = Qcow2Writer::<VecDevice>::compressed_range(&d);
                let first = o >> cb;
                let last = (o + l - 1) >> cb;
                add(first << cb, last - first + 1);
            } else if x & OFFSET_MASK != 0 {
                add(x & OFFSET_MASK, 1);
            }
        }
    }
    let file_clusters = w.file_len.div_ceil(w.cs());
    for c in 0..file_clusters + 64 {
        let want = refs.get(&c).copied().unwrap_or(0);
        let have = w.refcount(c).unwrap();
        if leaks_ok {
            assert!(
                have >= want,
                "cluster {c}: refcount {have}, {want} references"
            );
        } else {
            assert_eq!(have, want, "cluster {c}");
        }
    }
    let max = refs.keys().max().copied().unwrap_or(0);
    assert!(max < file_clusters + 1, "file must cover cluster {max}");
}

#[test]
fn refcount_blocks_count_themselves_and_table_grows() {
    // 512-byte clusters, 64-bit refcounts: a block covers 64 clusters and
    // the one-cluster table 64 blocks (4096 clusters = 2 MiB).
    let mut w = create(VecDevice::new(), &opts(512, 64, 8 << 20)).unwrap();
    let rt0 = w.hdr.refcount_table_offset;
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    for i in 0..1200u64 {
        w.write(i * 4096 % (8 << 20), &data).unwrap();
    }
    assert_ne!(w.hdr.refcount_table_offset, rt0, "refcount table grew");
    check_refcounts(&mut w);
    // Every refcount block has a refcount of 1 (it counts itself).
    for e in w.reftable.clone() {
        if e != 0 {
            assert_eq!(w.refcount(e >> 9).unwrap(), 1);
        }
    }
    let mut back = vec![0u8; 4096];
    w.read(4096 * 7, &mut back).unwrap();
    assert_eq!(back, data);
    // The header on disk names the new table.
    let dev = w.close().unwrap();
    let hdr = HeaderRepr::parse_bytes::<core::convert::Infallible>(dev.as_slice()).unwrap();
    assert_ne!(hdr.refcount_table_offset, rt0);
}

#[test]
fn overwrite_zero_discard_keep_refcounts_exact() {
    for rb in [1u32, 16] {
        let mut w = create(VecDevice::new(), &opts(4096, rb, 1 << 20)).unwrap();
        w.write(100, &[7u8; 9000]).unwrap();
        w.write(0, &[1u8; 4096]).unwrap();
        w.write_zeroes(4096, 8192).unwrap();
        w.discard(0, 4096).unwrap();
        w.write_compressed(10, &[3u8; 4096]).unwrap();
        w.write(10 * 4096 + 5, &[4u8; 10]).unwrap();
        check_refcounts(&mut w);
        let mut b = vec![0u8; 12];
        w.read(10 * 4096, &mut b).unwrap();
        assert_eq!(b, [3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4]);
    }
}

#[test]
fn without_barriers_content_and_refcounts_are_the_same() {
    let mut w = create(VecDevice::new(), &opts(512, 16, 2 << 20)).unwrap();
    w.set_write_barriers(false);
    let before = w.device().flush_count();
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 13) as u8).collect();
    for i in 0..300u64 {
        w.write(i * 4099 % ((2 << 20) - 3000), &data).unwrap();
    }
    assert_eq!(w.device().flush_count(), before, "no flushes between steps");
    check_refcounts(&mut w);
    let mut back = vec![0u8; 3000];
    let last: u64 = 299 * 4099; // the last write, below 2 MiB - 3000
    w.read(last, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn snapshot_round_trip_leaves_exact_refcounts_and_flags() {
    let mut w = create(VecDevice::new(), &opts(4096, 16, 1 << 20)).unwrap();
    w.write(0, &[1u8; 20000]).unwrap();
    w.write_compressed(10, &[3u8; 4096]).unwrap();
    let s = snapshots::NewSnapshot {
        name: "s",
        date_sec: 0,
        date_nsec: 0,
        vm_clock_nsec: 0,
        icount: 0,
    };
    let e = w.create_snapshot(&s).unwrap();
    assert_eq!(e.id, b"1");
    // Everything is shared now: no COPIED in the active tree.
    assert!(w.l1.iter().all(|e| e & COPIED == 0));
    let l2 = entry::l1_l2_offset(w.l1[0]);
    assert_eq!(w.refcount(l2 >> 12).unwrap(), 2);
    // A write copies the L2 table and the data cluster.
    w.write(4096, &[2u8; 4096]).unwrap();
    assert!(w.l1[0] & COPIED != 0);
    assert_ne!(entry::l1_l2_offset(w.l1[0]), l2);
    assert_eq!(w.refcount(l2 >> 12).unwrap(), 1);
    let mut b = [0u8; 4];
    w.read(4096, &mut b).unwrap();
    assert_eq!(b, [2; 4]);
    w.apply_snapshot("s").unwrap();
    w.read(4096, &mut b).unwrap();
    assert_eq!(b, [1; 4]);
    w.delete_snapshot("1").unwrap();
    assert!(w.snapshots().unwrap().is_empty());
    check_refcounts(&mut w);
    // COPIED is back exactly where the refcount is 1.
    assert!(w.l1[0] & COPIED != 0);
    let l2 = entry::l1_l2_offset(w.l1[0]);
    for x in w.l2_table(l2).unwrap().clone() {
        if x & OFFSET_MASK != 0 && x & entry::COMPRESSED == 0 {
            assert!(x & COPIED != 0, "{x:#x}");
        }
    }
    w.read(10 * 4096, &mut b).unwrap();
    assert_eq!(b, [3; 4]);
}

#[test]
fn large_writes_lay_out_clusters_as_cluster_by_cluster_writes() {
    // 512-byte clusters: L2 tables and refcount blocks get allocated in the
    // middle of the runs; extended L2 too.
    for ext in [false, true] {
        let o = CreateOptions {
            extended_l2: ext,
            ..opts(if ext { 16384 } else { 512 }, 16, 2 << 20)
        };
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 ^ 0x5a).collect();
        let mut whole = create(VecDevice::new(), &o).unwrap();
        let mut bits = create(VecDevice::new(), &o).unwrap();
        let cs = whole.cs() as usize;
        // A small write first, so later runs meet an allocated cluster.
        for w in [&mut whole, &mut bits] {
            w.write(cs as u64 * 40 + 7, &data[..100]).unwrap();
        }
        whole.write(1000, &data).unwrap();
        whole.write(700_000, &data[..5 * cs]).unwrap();
        for (g, d) in [(1000u64, &data[..]), (700_000, &data[..5 * cs])] {
            let mut at = 0usize;
            while at < d.len() {
                let n = (cs - (g as usize + at) % cs).min(d.len() - at);
                bits.write(g + at as u64, &d[at..at + n]).unwrap();
                at += n;
            }
        }
        check_refcounts(&mut whole);
        assert!(
            whole.device().as_slice() == bits.device().as_slice(),
            "extended_l2 {ext}: files differ"
        );
        let mut back = vec![0u8; data.len()];
        whole.read(1000, &mut back).unwrap();
        assert_eq!(back, data);
    }
}

#[test]
fn a_large_write_flushes_twice_not_per_cluster() {
    // 512-byte clusters, 16-bit refcounts: an L2 table maps 64 clusters,
    // a refcount block covers 256. One cluster in each of 4 tables first
    // (the tables exist), then the 4 x 63 clusters around them in one go.
    let mut w = create(VecDevice::new(), &opts(512, 16, 1 << 20)).unwrap();
    for t in 0..4u64 {
        w.write(t * 64 * 512, &[0xa5; 512]).unwrap();
    }
    let data: Vec<u8> = (0..255 * 512u32).map(|i| (i % 251) as u8 | 1).collect();
    let before = w.device().flush_count();
    w.write(512, &data).unwrap();
    let flushes = w.device().flush_count() - before;
    // Two per run of fresh clusters (refcounts and data, then the L2
    // entries): 4 runs, one per table; a new refcount block adds two.
    assert!(flushes <= 4 * 2 + 2, "{flushes} flushes for 252 clusters");
    check_refcounts(&mut w);
    let mut back = vec![0u8; data.len()];
    w.read(512, &mut back).unwrap();
    assert!(back == data, "content");
    // What reached the device is consistent on its own.
    let dev = w.close().unwrap();
    let mut w = Qcow2Writer::open(dev).unwrap();
    check_refcounts(&mut w);
    w.read(512, &mut back).unwrap();
    assert!(back == data, "content after reopening");
}

#[test]
fn deferred_entries_wait_for_the_flush_and_other_writes_settle_them() {
    let mut w = create(VecDevice::new(), &opts(512, 16, 1 << 20)).unwrap();
    for t in 0..4u64 {
        w.write(t * 64 * 512, &[0xa5; 512]).unwrap();
    }
    w.defer_fresh_entries(true).unwrap();
    let data: Vec<u8> = (0..255 * 512u32).map(|i| (i % 251) as u8 | 1).collect();
    let before = w.device().flush_count();
    w.write(512, &data).unwrap();
    // Only the installation of a new refcount block flushes.
    let during = w.device().flush_count() - before;
    assert!(during <= 2, "{during} flushes while deferring");
    // The writer reads its own deferred entries...
    let mut back = vec![0u8; data.len()];
    w.read(512, &mut back).unwrap();
    assert!(back == data, "content through the writer");
    // ...which are not on the device yet (what a crash now leaves: the
    // clusters leak, the image reads as before).
    let img = w.device().as_slice().to_vec();
    let mut r = Qcow2Writer::open(VecDevice::from_vec(img)).unwrap();
    r.read(512, &mut back[..512]).unwrap();
    assert_eq!(back[..512], [0u8; 512], "entry deferred");
    // A zero write elsewhere settles them first (flush, then the entries).
    w.write_zeroes(300 * 512, 512).unwrap();
    let img = w.device().as_slice().to_vec();
    let mut r = Qcow2Writer::open(VecDevice::from_vec(img)).unwrap();
    check_refcounts(&mut r);
    r.read(512, &mut back).unwrap();
    assert!(back == data, "content after settling");
    w.flush().unwrap();
    let mut w = Qcow2Writer::open(w.close().unwrap()).unwrap();
    check_refcounts(&mut w);
    w.read(512, &mut back).unwrap();
    assert!(back == data, "content after reopening");
}

#[test]
fn without_barriers_fresh_metadata_waits_for_the_flush_refcounts_first() {
    // Four L2 tables exist (512-byte clusters: 64 entries each).
    let base = {
        let mut w = create(VecDevice::new(), &opts(512, 16, 1 << 20)).unwrap();
        for t in 0..4u64 {
            w.write(t * 64 * 512, &[0xa5; 512]).unwrap();
        }
        w.close().unwrap().into_vec()
    };
    let data: Vec<u8> = (0..255 * 512u32).map(|i| (i % 251) as u8 | 1).collect();
    let reopen = |dev: VecDevice| Qcow2Writer::open(dev).unwrap();
    // Uncut: the run's refcounts and entries stay in memory until the
    // flush, which writes them without a flush in between.
    let mut w = Qcow2Writer::open(FaultyDevice::new(VecDevice::from_vec(base.clone()))).unwrap();
    w.set_write_barriers(false);
    w.write(512, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    w.read(512, &mut back).unwrap();
    assert!(back == data, "content through the writer");
    let mut r = reopen(w.device().inner().clone());
    // Exact: not even the refcounts of the run's clusters are written.
    check_refcounts(&mut r);
    r.read(512, &mut back[..512]).unwrap();
    assert_eq!(back[..512], [0u8; 512], "entry kept back");
    let before = w.device().mutations();
    w.flush().unwrap();
    let settled = w.device().mutations() - before;
    assert!(
        (2..=8).contains(&settled),
        "{settled} writes for the refcounts and 4 tables"
    );
    let total = w.device().mutations();
    let mut r = reopen(w.into_device().into_inner());
    check_refcounts(&mut r);
    r.read(512, &mut back).unwrap();
    assert!(back == data, "content after the flush");
    // A power cut at any write leaves no entry ahead of its refcount.
    for cut in 0..total {
        let dev = FaultyDevice::new(VecDevice::from_vec(base.clone())).cut_power_at(cut);
        let mut w = Qcow2Writer::open(dev).unwrap();
        w.set_write_barriers(false);
        let r = w.write(512, &data).and_then(|()| w.flush());
        assert!(r.is_err(), "cut {cut} of {total}: no error");
        let mut r = reopen(w.into_device().into_inner());
        check_refs(&mut r, true);
    }
}

#[test]
fn metadata_kept_back_without_barriers_stays_bounded() {
    // 64 KiB clusters: an L2 table maps 512 MiB; 140 tables exist.
    let tables = 140u64;
    let span = 512u64 << 20;
    let mut w = create(VecDevice::new(), &opts(65536, 16, tables * span)).unwrap();
    for t in 0..tables {
        w.write(t * span, &[0x5a; 65536]).unwrap();
    }
    w.set_write_barriers(false);
    let limit = MAX_KEPT_BACK / 65536;
    let data = vec![0xc3u8; 2 * 65536];
    let mut most = 0;
    for t in 0..tables {
        // Two fresh clusters under an existing table: kept back.
        w.write(t * span + 65536, &data).unwrap();
        most = most.max(w.l2_pending.len() + w.rb_pending.len());
    }
    assert!(
        most <= limit,
        "{most} tables and blocks held, limit {limit}"
    );
    assert!(most > limit / 2, "{most}: the limit is what settles");
    w.flush().unwrap();
    check_refcounts(&mut w);
    let mut back = vec![0u8; 2 * 65536];
    for t in [0, tables / 2, tables - 1] {
        w.read(t * span + 65536, &mut back).unwrap();
        assert!(back == data, "table {t}");
    }
    let mut w = Qcow2Writer::open(w.close().unwrap()).unwrap();
    check_refcounts(&mut w);
}

#[test]
fn unmap_flushes_per_l2_table_and_truncate_gives_space_back() {
    // 512-byte clusters: an L2 table maps 64 clusters, so 300 clusters
    // span 5 tables (the last partly).
    let mut w = create(VecDevice::new(), &opts(512, 16, 1 << 20)).unwrap();
    let data: Vec<u8> = (0..300 * 512u32).map(|i| (i % 251) as u8 | 1).collect();
    w.write(0, &data).unwrap();
    w.write_zeroes(64 * 512, 512).unwrap();
    let used = w.device().as_slice().len();
    let before = w.device().flush_count();
    w.unmap(0, 300 * 512).unwrap();
    let flushes = w.device().flush_count() - before;
    assert!(flushes <= 2 * 5, "{flushes} flushes for 5 L2 tables");
    check_refcounts(&mut w);
    for c in 0..300u64 {
        let (_, e, bm) = w.get_entry(c * 512).unwrap();
        assert_eq!((e, bm), (0, 0), "cluster {c} still mapped");
    }
    let mut back = vec![1u8; 300 * 512];
    w.read(0, &mut back).unwrap();
    assert!(
        back.iter().all(|&b| b == 0),
        "reads through (no backing: zero)"
    );
    w.truncate_unused().unwrap();
    check_refcounts(&mut w);
    let end = (w.highest_used().unwrap() + 1) * 512;
    let dev = w.close().unwrap();
    assert_eq!(
        dev.as_slice().len() as u64,
        end,
        "cut after the last used cluster"
    );
    // L2 tables and refcount blocks stay (they may lie past freed data).
    assert!(
        dev.as_slice().len() < used,
        "{used} bytes before, no shrink"
    );
    // Reopened, the image is consistent and still reads zero.
    let mut w = Qcow2Writer::open(dev).unwrap();
    check_refcounts(&mut w);
    w.read(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
}

/// A [`VecDevice`] that counts writes.
struct CountWrites(VecDevice, u64);

impl BlockIo for CountWrites {
    type Error = core::convert::Infallible;
    fn sector_size(&self) -> u32 {
        self.0.sector_size()
    }
    fn size(&mut self) -> Result<u64, Self::Error> {
        self.0.size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Self::Error> {
        self.1 += 1;
        self.0.write_at(offset, buf)
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        self.0.flush()
    }
    fn set_size(&mut self, size: u64) -> Result<bool, Self::Error> {
        self.0.set_size(size)
    }
}

#[test]
fn unmap_writes_each_refcount_block_once_per_table() {
    // 512-byte clusters, 16-bit refcounts: an L2 table maps 64 clusters,
    // a refcount block covers 256; 300 data clusters span 5 tables.
    let mut w = create(VecDevice::new(), &opts(512, 16, 1 << 20)).unwrap();
    let data: Vec<u8> = (0..300 * 512u32).map(|i| (i % 251) as u8 | 1).collect();
    w.write(0, &data).unwrap();
    let mut w = Qcow2Writer::open(CountWrites(w.close().unwrap(), 0)).unwrap();
    w.unmap(0, 300 * 512).unwrap();
    let writes = w.device().1;
    // Per table: its entries, and the refcount blocks its clusters are
    // counted in (at most two): never one write per cluster.
    assert!(writes <= 5 * 3, "{writes} writes to unmap 300 clusters");
    // What reached the device is consistent on its own.
    let dev = w.close().unwrap().0;
    let mut w = Qcow2Writer::open(dev).unwrap();
    check_refcounts(&mut w);
    let mut back = vec![1u8; 300 * 512];
    w.read(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
}

#[test]
fn free_clusters_counts_repeats_and_refuses_a_free_cluster() {
    let mut w = create(VecDevice::new(), &opts(512, 16, 1 << 20)).unwrap();
    w.write(0, &vec![7u8; 600 * 512]).unwrap();
    let c = |w: &mut Qcow2Writer<VecDevice>, g: u64| {
        let (_, e, _) = w.get_entry(g * 512).unwrap();
        (e & OFFSET_MASK) >> 9
    };
    let (a, b, far) = (c(&mut w, 3), c(&mut w, 4), c(&mut w, 590));
    assert_ne!(a >> 8, far >> 8, "two refcount blocks");
    w.set_refcount_existing(a, 3).unwrap();
    w.free_clusters(&mut [far, a, b, a]).unwrap();
    // Read back from the device, not the cache.
    let mut w = Qcow2Writer::open(w.close().unwrap()).unwrap();
    assert_eq!(
        [
            w.refcount(a).unwrap(),
            w.refcount(b).unwrap(),
            w.refcount(far).unwrap()
        ],
        [1, 0, 0]
    );
    let before = w.device().as_slice().to_vec();
    assert!(w.free_clusters(&mut [b]).is_err(), "refcount 0 is corrupt");
    assert_eq!(w.device().as_slice(), &before[..], "nothing written");
}

#[test]
fn drop_empty_tables_frees_only_all_zero_owned_tables() {
    // 512-byte clusters: an L2 table maps 64 clusters; 300 span 5 tables.
    let mut w = create(VecDevice::new(), &opts(512, 16, 1 << 20)).unwrap();
    let data: Vec<u8> = (0..300 * 512u32).map(|i| (i % 251) as u8 | 1).collect();
    w.write(0, &data).unwrap();
    // Everything but the last cluster of the fourth table (cluster 255).
    w.unmap(0, 255 * 512).unwrap();
    w.unmap(256 * 512, 44 * 512).unwrap();
    let tables = |w: &Qcow2Writer<VecDevice>| w.l1.iter().filter(|&&e| e != 0).count();
    assert_eq!(tables(&w), 5);
    let kept = entry::l1_l2_offset(w.l1[3]);
    w.drop_empty_tables().unwrap();
    assert_eq!(tables(&w), 1, "only the table still mapping a cluster");
    assert_eq!(entry::l1_l2_offset(w.l1[3]), kept);
    check_refcounts(&mut w);
    w.truncate_unused().unwrap();
    // From the device: consistent, the kept cluster still reads back.
    let mut w = Qcow2Writer::open(w.close().unwrap()).unwrap();
    check_refcounts(&mut w);
    assert_eq!(tables(&w), 1);
    let mut back = vec![0u8; 300 * 512];
    w.read(0, &mut back).unwrap();
    let mut want = vec![0u8; 300 * 512];
    want[255 * 512..256 * 512].copy_from_slice(&data[255 * 512..256 * 512]);
    assert!(back == want, "content after dropping tables");
    // Nothing left to drop: no write at all.
    let dev = w.close().unwrap();
    let mut w = Qcow2Writer::open(CountWrites(dev, 0)).unwrap();
    w.drop_empty_tables().unwrap();
    assert_eq!(w.device().1, 0);
}

/// A new LUKS-encrypted image of `size` bytes with `cs`-byte clusters,
/// the same volume key every time.
fn encrypted_writer(cs: u64, size: u64) -> Qcow2Writer<VecDevice> {
    let o = CreateOptions {
        luks_region_len: Some(2 << 20),
        ..opts(cs, 16, size)
    };
    crate::test_luks::with_luks1(create(VecDevice::new(), &o).unwrap(), b"pw")
}

/// What the staged copy does with one piece: stage the fresh runs (their
/// bytes written to the device only at the end, as another thread would),
/// write the rest cluster by cluster.
fn stage_piece(w: &mut Qcow2Writer<VecDevice>, g: u64, data: &mut [u8]) -> usize {
    let cs = w.cs();
    let mut runs = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let gg = g + at as u64;
        let (took, rs) = w.stage_fresh(gg, &mut data[at..]).unwrap();
        if took == 0 {
            let n = ((cs - gg % cs) as usize).min(data.len() - at);
            w.write_consuming(gg, &mut data[at..at + n]).unwrap();
            at += n;
        } else {
            runs.extend(rs.into_iter().map(|(h, o, n)| (h, at + o, n)));
            at += took;
        }
    }
    let staged = runs.len();
    for (h, o, n) in runs {
        w.device().write_at(h, &data[o..o + n]).unwrap();
    }
    staged
}

#[test]
fn staged_and_consuming_writes_make_the_image_write_makes() {
    // 512-byte clusters: L2 tables and refcount blocks fall inside the
    // pieces; 4 KiB: long runs.
    for cs in [512u64, 4096] {
        let data: Vec<u8> = (0..400_000u32).map(|i| (i % 253) as u8 ^ 0xa5).collect();
        let pieces = [
            (0u64, 0..200_000usize),
            (200_000, 200_000..230_007),
            (300_000, 230_007..400_000),
        ];
        let mut plain = encrypted_writer(cs, 2 << 20);
        let mut staged = encrypted_writer(cs, 2 << 20);
        let mut consumed = encrypted_writer(cs, 2 << 20);
        let mut runs = 0;
        for w in [&mut plain, &mut staged, &mut consumed] {
            w.set_write_barriers(false);
        }
        for (g, r) in pieces.iter().cloned() {
            plain.write(g, &data[r.clone()]).unwrap();
            let mut buf = data[r.clone()].to_vec();
            runs += stage_piece(&mut staged, g, &mut buf);
            let mut buf = data[r].to_vec();
            consumed.write_consuming(g, &mut buf).unwrap();
        }
        assert!(runs > 2, "cluster size {cs}: only {runs} runs staged");
        // It reads back as written (decrypted).
        for (g, r) in pieces.iter().cloned() {
            let mut back = vec![0u8; r.len()];
            staged.read(g, &mut back).unwrap();
            assert!(
                back == data[r],
                "cluster size {cs}: read back differs at {g}"
            );
        }
        let (plain, staged, consumed) = (
            plain.close().unwrap(),
            staged.close().unwrap(),
            consumed.close().unwrap(),
        );
        assert!(
            plain.as_slice() == staged.as_slice(),
            "cluster size {cs}: staged image differs"
        );
        assert!(
            plain.as_slice() == consumed.as_slice(),
            "cluster size {cs}: consuming write differs"
        );
    }
}

#[test]
fn with_barriers_nothing_is_staged() {
    let mut w = encrypted_writer(4096, 1 << 20);
    // L2 table in place, so the rest would be a fresh run.
    w.write(0, &[1u8; 4096]).unwrap();
    let mut buf = vec![7u8; 64 << 10];
    let before = buf.clone();
    assert_eq!(w.stage_fresh(4096, &mut buf).unwrap(), (0, Vec::new()));
    assert_eq!(buf, before, "the buffer was touched");
    w.set_write_barriers(false);
    let (took, runs) = w.stage_fresh(4096, &mut buf).unwrap();
    assert_eq!(took, 64 << 10);
    assert_eq!(runs.len(), 1);
    assert_ne!(buf, before, "not encrypted in place");
    // Unaligned: nothing.
    assert_eq!(
        w.stage_fresh(4096 * 40 + 512, &mut buf[..8192]).unwrap(),
        (0, Vec::new())
    );
}
