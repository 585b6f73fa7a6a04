//! Power cuts in images with internal snapshots.
//!
//! 1. A write workload (writes, zero writes, discards, compressed writes)
//!    over an image whose every cluster a snapshot shares: cut after any
//!    device mutation (unflushed writes kept or dropped), the image has no
//!    corruption (leaks allowed), the active content holds every completed
//!    operation, and the snapshot's content never changes.
//! 2. The snapshot operations themselves (create, apply, delete): cut at
//!    every mutation, the only errors `qemu-img check` may report are
//!    COPIED flags missing while refcounts are being adjusted in create or
//!    delete (the documented windows, repaired by `check -r all`; none in
//!    apply), the active
//!    content is the state before or after the operation in flight, and a
//!    snapshot that still exists reads as it was taken.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::cast_possible_truncation)] // test sizes are small

use qcow_core::create::{create, CreateOptions};
use qcow_core::io::VecDevice;
use qcow_core::writer::snapshots::NewSnapshot;
use qcow_core::{BlockIo, Qcow2Writer};
use qimg_tests::powercut::{
    cut_points, qemu_check, read_guest, run_cut, run_workload, Spec, Workload,
};
use qimg_tests::qemu::{pattern, Qemu};

const SIZE: u64 = 1 << 20;
const CLUSTER: u64 = 512;
/// Cut points per mode for the workload.
const CUTS: u64 = 120;

fn snap(name: &str) -> NewSnapshot<'_> {
    NewSnapshot {
        name,
        date_sec: 1_700_000_000,
        date_nsec: 0,
        vm_clock_nsec: 0,
        icount: 0,
    }
}

/// A 1 MiB image, 512-byte clusters, filled with data (one cluster in
/// eight compressed, some zero), with snapshot "base" of it.
fn base_image() -> (Vec<u8>, Vec<u8>) {
    let o = CreateOptions {
        size: SIZE,
        cluster_size: CLUSTER,
        ..CreateOptions::default()
    };
    let mut w = create(VecDevice::new(), &o).unwrap();
    w.set_write_barriers(false);
    let data = pattern(SIZE as usize, 11, 5);
    w.write(0, &data).unwrap();
    for c in (0..SIZE / CLUSTER).step_by(8) {
        let s = (c * CLUSTER) as usize;
        w.write_compressed(c, &data[s..s + CLUSTER as usize])
            .unwrap();
    }
    w.create_snapshot(&snap("base")).unwrap();
    (w.close().unwrap().into_vec(), data)
}

/// Guest content, of the active image or of snapshot `name`.
fn read_back(img: &[u8], name: Option<&str>) -> Option<Vec<u8>> {
    read_guest(img, SIZE, name)
}

/// 60 operations: 70% writes of up to 24 KiB, 10% zero writes, 10%
/// discards, 10% compressed clusters.
fn workload() -> Workload {
    Workload::new(&Spec {
        seed: 0x0dd_ba11_cafe_f00d,
        ops: 60,
        size: SIZE,
        cluster: CLUSTER,
        max_len: 24 << 10,
        write: 69,
        zero: 79,
        discard: 89,
        period: 37,
    })
}

#[test]
fn power_cut_while_writing_over_a_snapshot() {
    let q = Qemu::find();
    let (base, data) = base_image();
    let work = workload();
    let ops = &work.ops;
    let uncut = run_workload(&base, &work, None, false);
    let (full, n) = (&uncut.image, uncut.mutations);
    assert_eq!(uncut.done, ops.len());
    assert!(
        read_back(full, None).unwrap() == work.model(&data, ops.len()),
        "uncut run"
    );
    assert!(
        read_back(full, Some("base")).unwrap() == data,
        "uncut: snapshot"
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("crash.qcow2");
    if let Some(q) = &q {
        let p = dir.path().join("full.qcow2");
        std::fs::write(&p, full).unwrap();
        q.assert_clean(&p, "uncut run");
    }
    let mut validated = 0;
    for drop in [false, true] {
        for (i, k) in cut_points(n, CUTS).into_iter().enumerate() {
            let what = format!("cut at {k}/{n}, drop_unflushed {drop}");
            let cut = run_workload(&base, &work, Some(k), drop);
            assert!(cut.done < ops.len(), "{what}: the cut must stop the run");
            let got = read_back(&cut.image, None).unwrap();
            work.assert_survivor(&data, &got, cut.done, &what);
            assert!(
                read_back(&cut.image, Some("base")).unwrap() == data,
                "{what}: snapshot"
            );
            if let Some(q) = &q {
                if i % 3 == 0 {
                    std::fs::write(&p, &cut.image).unwrap();
                    assert_eq!(qemu_check(q, &p, false, &what), 0);
                }
            }
            validated += 1;
        }
    }
    assert!(validated >= 2 * CUTS as usize / 2, "{validated}");
}

/// The snapshot operations of the second test, in order.
#[derive(Clone, Copy, Debug)]
enum SnapOp {
    Create(&'static str),
    Apply(&'static str),
    Delete(&'static str),
}

fn run_snap_op<D: BlockIo>(
    w: &mut Qcow2Writer<D>,
    op: SnapOp,
) -> Result<(), qcow_core::Error<D::Error>> {
    match op {
        SnapOp::Create(n) => w.create_snapshot(&snap(n)).map(|_| ()),
        SnapOp::Apply(n) => w.apply_snapshot(n),
        SnapOp::Delete(n) => w.delete_snapshot(n),
    }?;
    w.flush()
}

#[test]
fn power_cut_during_snapshot_operations() {
    let q = Qemu::find();
    let (base, data) = base_image();
    // The active image diverges from "base" first: state B.
    let mut w = Qcow2Writer::open(VecDevice::from_vec(base)).unwrap();
    w.set_write_barriers(false);
    let b = pattern(SIZE as usize / 2, 21, 3);
    w.write(SIZE / 4, &b).unwrap();
    let mut state_b = data.clone();
    state_b[SIZE as usize / 4..SIZE as usize / 4 + b.len()].copy_from_slice(&b);
    let start = w.close().unwrap().into_vec();
    let ops = [
        SnapOp::Create("b"),
        SnapOp::Apply("base"),
        SnapOp::Delete("b"),
        SnapOp::Create("again"),
        SnapOp::Delete("base"),
        SnapOp::Delete("again"),
    ];
    // Active content after each prefix of `ops`.
    let states = [&state_b, &state_b, &data, &data, &data, &data, &data];
    let run = |cut: Option<u64>, drop: bool| {
        let r = run_cut(&start, &ops, cut, drop, run_snap_op);
        (r.image, r.done, r.mutations)
    };
    let (full, done, n) = run(None, false);
    assert_eq!(done, ops.len());
    assert!(read_back(&full, None).unwrap() == data);
    let dir = tempfile::tempdir().unwrap();
    if let Some(q) = &q {
        let p = dir.path().join("full.qcow2");
        std::fs::write(&p, &full).unwrap();
        q.assert_clean(&p, "uncut");
    }
    let p = dir.path().join("crash.qcow2");
    let mut copied_windows = 0;
    for drop in [false, true] {
        for (i, k) in cut_points(n, 150).into_iter().enumerate() {
            let what = format!("cut at {k}/{n}, drop_unflushed {drop}");
            let (img, done, _) = run(Some(k), drop);
            let got = read_back(&img, None).unwrap();
            assert!(
                got == *states[done] || got == *states[done + 1],
                "{what}: active content (op {done} in flight: {:?})",
                ops[done]
            );
            // Snapshots that exist read as taken.
            if let Some(s) = read_back(&img, Some("base")) {
                assert!(s == data, "{what}: base");
            }
            if let Some(s) = read_back(&img, Some("b")) {
                assert!(s == state_b, "{what}: b");
            }
            if let Some(q) = &q {
                if i % 2 == 0 {
                    // Only create and delete have a COPIED window.
                    let window = !matches!(ops[done], SnapOp::Apply(_));
                    std::fs::write(&p, &img).unwrap();
                    copied_windows += qemu_check(q, &p, window, &what).min(1);
                }
            }
        }
    }
    eprintln!("snapshot crash test: {n} mutations, {copied_windows} cut points in a COPIED window");
}
