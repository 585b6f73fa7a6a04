//! Power cuts during a batched commit into a qcow2 base: the writer's
//! large writes allocate a whole run of clusters with one flush for their
//! refcounts and data and one for their L2 entries. Cut at every device
//! mutation of a commit-like run (cluster-aligned batches of data runs and
//! zero runs, as `qimg commit` writes them, then one flush), with or
//! without the unflushed mutations rolled back, the base must pass
//! `qemu-img check` (leaks allowed, no corruption), and read back every
//! batch whose write returned before the cut, the batch in flight old or
//! new byte by byte, and the rest as before the commit. The same run with
//! the L2 entries deferred to the next flush (`defer_fresh_entries`, as
//! `qimg commit` writes), flushed every few batches: every batch before
//! the last flush that returned reads back, the later ones old or new.
//!
//! 512-byte clusters with 64-bit refcounts: an L2 table maps 64 clusters
//! and a refcount block covers 64, so batches cross L2 tables, install
//! refcount blocks and grow the refcount table in the middle of a run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::cast_possible_truncation)] // test sizes are small

use std::sync::atomic::{AtomicU64, Ordering};

use qcow_core::create::{create, CreateOptions};
use qcow_core::io::VecDevice;
use qimg_tests::powercut::{qemu_check, read_guest, run_cut};
use qimg_tests::qemu::Qemu;
use qimg_tests::tmpfs_tempdir;

const SIZE: u64 = 4 << 20;
const CLUSTER: u64 = 512;

/// One step of the commit: a run of data clusters, a run of zero
/// clusters, a flush, or turning on deferred L2 entries.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Step {
    Data { off: u64, len: u64, seed: u8 },
    Zero { off: u64, len: u64 },
    Flush,
    Defer,
}

fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed.wrapping_mul(97) | 1)
        .collect()
}

/// The commit's writes: batches of 48 clusters from 96 KiB to 608 KiB, each
/// split as `write_runs` splits them (data runs, and a zero run in every
/// third batch), over a base that already holds data in some clusters.
/// `deferred`: with the L2 entries deferred, and a flush every 4 batches.
fn steps(deferred: bool) -> Vec<Step> {
    let mut v = Vec::new();
    if deferred {
        v.push(Step::Defer);
    }
    let batch = 48 * CLUSTER;
    let mut off = 96 << 10;
    let mut seed = 1u8;
    while off < 608 << 10 {
        if seed.is_multiple_of(3) {
            v.push(Step::Data {
                off,
                len: 20 * CLUSTER,
                seed,
            });
            v.push(Step::Zero {
                off: off + 20 * CLUSTER,
                len: 8 * CLUSTER,
            });
            v.push(Step::Data {
                off: off + 28 * CLUSTER,
                len: batch - 28 * CLUSTER,
                seed: seed.wrapping_add(100),
            });
        } else {
            v.push(Step::Data {
                off,
                len: batch,
                seed,
            });
        }
        off += batch;
        if deferred && seed.is_multiple_of(4) {
            v.push(Step::Flush);
        }
        seed += 1;
    }
    v.push(Step::Flush);
    v
}

fn apply(model: &mut [u8], s: Step) -> std::ops::Range<usize> {
    match s {
        Step::Data { off, len, seed } => {
            let r = off as usize..(off + len) as usize;
            model[r.clone()].copy_from_slice(&pattern(len, seed));
            r
        }
        Step::Zero { off, len } => {
            let r = off as usize..(off + len) as usize;
            model[r.clone()].fill(0);
            r
        }
        Step::Flush | Step::Defer => 0..0,
    }
}

/// The base before the commit: data in a cluster of some of the L2
/// tables the commit writes into (so part of it is rewritten in place and
/// the rest allocated around it) and in its upper half, and its guest
/// content.
fn base_image() -> (Vec<u8>, Vec<u8>) {
    let o = CreateOptions {
        size: SIZE,
        cluster_size: CLUSTER,
        refcount_bits: 64,
        ..CreateOptions::default()
    };
    let mut w = create(VecDevice::new(), &o).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    for (i, c) in [0u64, 200, 250, 640, 900, 1100, 2000]
        .into_iter()
        .enumerate()
    {
        let d = pattern(CLUSTER, 200 + i as u8);
        w.write(c * CLUSTER, &d).unwrap();
        model[(c * CLUSTER) as usize..((c + 1) * CLUSTER) as usize].copy_from_slice(&d);
    }
    // 3584 more clusters, so that the commit's allocations pass the 4096
    // clusters the first refcount table cluster covers.
    let d = pattern(3584 * CLUSTER, 77);
    w.write(2 << 20, &d).unwrap();
    model[2 << 20..(2 << 20) + d.len()].copy_from_slice(&d);
    (w.close().unwrap().into_vec(), model)
}

/// Checks the guest content `img` holds after a run that completed `done`
/// of `steps`: every step up to the last completed flush (every completed
/// step when `deferred` is off: each write flushes) is there; the bytes
/// of the later steps and of the one in flight are old or new (the steps
/// touch disjoint ranges).
fn validate(img: &[u8], start: &[u8], steps: &[Step], done: usize, what: &str) {
    let got = read_guest(img, SIZE, None).unwrap();
    let deferred = steps.first() == Some(&Step::Defer);
    let durable = if deferred {
        steps[..done]
            .iter()
            .rposition(|&s| s == Step::Flush)
            .map_or(0, |i| i + 1)
    } else {
        done
    };
    let mut before = start.to_vec();
    for &s in &steps[..durable] {
        apply(&mut before, s);
    }
    if done == steps.len() {
        assert!(got == before, "{what}: content after the whole commit");
        return;
    }
    let mut after = before.clone();
    let mut touched = vec![false; before.len()];
    for &s in &steps[durable..=done] {
        for i in apply(&mut after, s) {
            touched[i] = true;
        }
    }
    for (i, (&g, &b)) in got.iter().zip(&before).enumerate() {
        if g != b && !(touched[i] && g == after[i]) {
            panic!(
                "{what}: byte {i} is {g:#x}, expected {b:#x} (steps {durable}..={done} \
                 may be partly there)"
            );
        }
    }
}

fn run(
    base: &[u8],
    steps: &[Step],
    cut: Option<u64>,
    drop_unflushed: bool,
) -> qimg_tests::powercut::CutRun {
    run_cut(base, steps, cut, drop_unflushed, |w, s| match s {
        Step::Data { off, len, seed } => w.write(off, &pattern(len, seed)),
        Step::Zero { off, len } => w.write_zeroes(off, len),
        Step::Flush => w.flush(),
        Step::Defer => w.defer_fresh_entries(true),
    })
}

#[test]
fn power_cut_at_any_write_of_a_batched_commit_leaves_a_consistent_base() {
    cut_everywhere(false);
}

#[test]
fn power_cut_at_any_write_of_a_deferred_commit_leaves_a_consistent_base() {
    cut_everywhere(true);
}

fn cut_everywhere(deferred: bool) {
    let q = Qemu::find();
    let (base, start) = base_image();
    let steps = steps(deferred);
    let uncut = run(&base, &steps, None, false);
    let n = uncut.mutations;
    assert_eq!(uncut.done, steps.len());
    validate(&uncut.image, &start, &steps, uncut.done, "uncut run");
    assert!(
        !uncut.header_writes.is_empty(),
        "the commit grows the refcount table"
    );
    // Batched: far fewer mutations than two flushes per cluster would give
    // (the 1024 clusters written would alone be 2048 flushes).
    assert!(n < 1024, "{n} device mutations for the commit");
    if let Some(q) = &q {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("full.qcow2");
        std::fs::write(&p, &uncut.image).unwrap();
        q.assert_clean(&p, "uncut run");
    }
    eprintln!(
        "commit crash test (deferred {deferred}): {} steps, {n} device mutations",
        steps.len()
    );
    let checks = AtomicU64::new(0);
    std::thread::scope(|s| {
        for drop_unflushed in [false, true] {
            let (base, start, steps, q, checks) = (&base, &start, &steps, &q, &checks);
            s.spawn(move || {
                let dir = tmpfs_tempdir();
                let p = dir.path().join("crash.qcow2");
                for k in 0..n {
                    let what = format!(
                        "deferred {deferred}, cut at {k}/{n}, drop_unflushed {drop_unflushed}"
                    );
                    let cut = run(base, steps, Some(k), drop_unflushed);
                    assert!(cut.done < steps.len(), "{what}: the cut must stop the run");
                    validate(&cut.image, start, steps, cut.done, &what);
                    if let Some(q) = q {
                        std::fs::write(&p, &cut.image).unwrap();
                        assert_eq!(qemu_check(q, &p, false, &what), 0);
                        checks.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    eprintln!(
        "commit crash test (deferred {deferred}): {} cut points, {} qemu-img checks",
        2 * n,
        checks.into_inner()
    );
}
