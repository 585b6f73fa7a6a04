//! Power cuts at every stage of a qcow2 write workload: whatever prefix of
//! the writer's device writes survives (with or without the unflushed ones
//! rolled back), the image has no corruption (leaks are allowed) and holds
//! every operation that completed, i.e. whose flush returned.
//!
//! The workload runs on 512-byte clusters with 64-bit refcounts over
//! `FaultyDevice<VecDevice>`, so a refcount block covers only 64 clusters:
//! the run allocates dozens of refcount blocks and grows the refcount
//! table. Every cut point is validated by qcow-core's reader against the
//! model; `qemu-img check` runs on every `QEMU_STRIDE`-th one.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::cast_possible_truncation)] // test sizes are small

use qcow_core::create::{create, CreateOptions};
use qcow_core::io::VecDevice;
use qimg_tests::powercut::{cut_points, qemu_check, read_guest, run_workload, Spec, Workload};
use qimg_tests::qemu::Qemu;
use qimg_tests::tmpfs_tempdir;

const SIZE: u64 = 4 << 20;
const CLUSTER: u64 = 512;
/// Cut points validated per mode (spread evenly over the whole run).
const CUTS: u64 = 450;
/// `qemu-img check` on every this-many-th cut point.
const QEMU_STRIDE: u64 = 6;

/// 240 operations: 75% writes of up to 40 KiB, 10% zero writes, 10%
/// discards, 5% compressed clusters.
fn workload() -> Workload {
    Workload::new(&Spec {
        seed: 0x1234_5678_9abc_def1,
        ops: 240,
        size: SIZE,
        cluster: CLUSTER,
        max_len: 40 << 10,
        write: 74,
        zero: 84,
        discard: 94,
        period: 61,
    })
}

fn fresh_image() -> Vec<u8> {
    let o = CreateOptions {
        size: SIZE,
        cluster_size: CLUSTER,
        refcount_bits: 64,
        ..CreateOptions::default()
    };
    create(VecDevice::new(), &o)
        .unwrap()
        .close()
        .unwrap()
        .into_vec()
}

fn validate(img: &[u8], work: &Workload, done: usize, what: &str) {
    let got = read_guest(img, SIZE, None).unwrap();
    work.assert_survivor(&vec![0u8; SIZE as usize], &got, done, what);
}

#[test]
fn power_cut_at_any_mutation_leaves_a_consistent_image() {
    let q = Qemu::find();
    let base = fresh_image();
    let work = workload();
    let ops = &work.ops;
    assert!(ops.len() >= 200);
    let uncut = run_workload(&base, &work, None, false);
    let (full, n, hdr_writes) = (&uncut.image, uncut.mutations, &uncut.header_writes);
    assert!(!hdr_writes.is_empty(), "the run switches refcount tables");
    assert_eq!(uncut.done, ops.len());
    validate(full, &work, uncut.done, "uncut run");
    // The run allocates refcount blocks and grows the refcount table.
    assert_ne!(
        full[48..56],
        base[48..56],
        "the refcount table should have moved"
    );
    if let Some(q) = &q {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("full.qcow2");
        std::fs::write(&p, full).unwrap();
        q.assert_clean(&p, "uncut run");
    }
    eprintln!(
        "crash test: {} ops, {n} device mutations, cut every {}th",
        ops.len(),
        (n / CUTS).max(1)
    );
    let checks = std::sync::atomic::AtomicU64::new(0);
    let cuts = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for drop_unflushed in [false, true] {
            let (base, work, q, checks, cuts) = (&base, &work, &q, &checks, &cuts);
            s.spawn(move || {
                let dir = tmpfs_tempdir();
                let p = dir.path().join("crash.qcow2");
                let mut i = 0u64;
                // Every stride-th mutation, the last one, and every one
                // within 12 of a header write (refcount table growth).
                let mut points = cut_points(n, CUTS);
                for &h in hdr_writes {
                    points.extend(h.saturating_sub(12)..(h + 12).min(n));
                }
                points.sort_unstable();
                points.dedup();
                for k in points {
                    let what = format!("cut at {k}/{n}, drop_unflushed {drop_unflushed}");
                    let cut = run_workload(base, work, Some(k), drop_unflushed);
                    assert!(
                        cut.done < work.ops.len(),
                        "{what}: the cut must stop the run"
                    );
                    validate(&cut.image, work, cut.done, &what);
                    if let Some(q) = q {
                        let near = hdr_writes.iter().any(|&h| k + 12 >= h && k < h + 12);
                        if near || i.is_multiple_of(QEMU_STRIDE) {
                            std::fs::write(&p, &cut.image).unwrap();
                            assert_eq!(qemu_check(q, &p, false, &what), 0);
                            checks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    cuts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    i += 1;
                }
            });
        }
    });
    let (c, k) = (checks.into_inner(), cuts.into_inner());
    eprintln!("crash test: {k} cut points validated, {c} qemu-img checks");
    assert!(k >= 2 * 200);
}
