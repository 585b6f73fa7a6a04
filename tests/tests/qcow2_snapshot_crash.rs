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

use std::path::Path;
use std::process::Command;

use qcow_core::create::{create, CreateOptions};
use qcow_core::io::{FaultyDevice, VecDevice};
use qcow_core::writer::snapshots::NewSnapshot;
use qcow_core::{BlockIo, Qcow2, Qcow2Writer};
use qimg_tests::qemu::{pattern, Qemu};

const SIZE: u64 = 1 << 20;
const CLUSTER: u64 = 512;
const OPS: usize = 60;
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
    let mut cache = vec![0u8; 64 << 10];
    let mut cin = vec![0u8; 1024];
    let mut cout = vec![0u8; 1024];
    let mut r = Qcow2::open(VecDevice::from_vec(img.to_vec()), &mut cache)
        .unwrap()
        .with_compression_buffers(&mut cin, &mut cout);
    if let Some(n) = name {
        let s = r.find_snapshot(n).ok()?;
        r.select_snapshot(&s).unwrap();
    }
    let mut out = vec![0u8; SIZE as usize];
    r.read(0, &mut out).unwrap();
    Some(out)
}

/// `qemu-img check`: no check errors, and no corruption other than
/// COPIED flag mismatches when `copied_ok`. Returns the corruption count.
fn qemu_check(q: &Qemu, dir: &Path, img: &[u8], copied_ok: bool, what: &str) -> u64 {
    let p = dir.join("crash.qcow2");
    std::fs::write(&p, img).unwrap();
    let out = Command::new(&q.img)
        .args(["check", "--output=json"])
        .arg(&p)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 2 || code == 3,
        "{what}: exit {code}: {json}"
    );
    assert_eq!(
        json["check-errors"].as_u64().unwrap_or(0),
        0,
        "{what}: {json}"
    );
    let corruptions = json["corruptions"].as_u64().unwrap_or(0);
    if corruptions > 0 {
        let err = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("ERROR")).collect();
        assert!(
            copied_ok && errors.iter().all(|l| l.starts_with("ERROR OFLAG_COPIED")),
            "{what}: {json}\n{err}"
        );
    }
    corruptions
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Write { off: u64, len: u64, seed: u8 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
    Compressed { cluster: u64, seed: u8 },
}

fn data_of(len: u64, seed: u8) -> Vec<u8> {
    (0..len as usize)
        .map(|i| seed.wrapping_add((i / 37) as u8) ^ (i as u8))
        .collect()
}

fn cdata(seed: u8) -> Vec<u8> {
    (0..CLUSTER as usize)
        .map(|i| seed ^ (i / 100) as u8)
        .collect()
}

fn ops() -> Vec<Op> {
    let mut x = 0x0dd_ba11_cafe_f00du64;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    (0..OPS)
        .map(|_| {
            let k = next(100);
            let off = next(SIZE);
            let len = (1 + next(24 << 10)).min(SIZE - off);
            let seed = next(256) as u8;
            match k {
                0..=69 => Op::Write { off, len, seed },
                70..=79 => Op::Zero { off, len },
                80..=89 => Op::Discard { off, len },
                _ => Op::Compressed {
                    cluster: next(SIZE / CLUSTER),
                    seed,
                },
            }
        })
        .collect()
}

fn apply(model: &mut [u8], op: Op) -> (usize, usize) {
    let r = |a: u64, b: u64| (a as usize, b as usize);
    match op {
        Op::Write { off, len, seed } => {
            model[off as usize..(off + len) as usize].copy_from_slice(&data_of(len, seed));
            r(off, off + len)
        }
        Op::Zero { off, len } => {
            model[off as usize..(off + len) as usize].fill(0);
            r(off, off + len)
        }
        Op::Discard { off, len } => {
            let s = off.div_ceil(CLUSTER) * CLUSTER;
            let e = (off + len) / CLUSTER * CLUSTER;
            if s >= e {
                return (0, 0);
            }
            model[s as usize..e as usize].fill(0);
            r(s, e)
        }
        Op::Compressed { cluster, seed } => {
            let s = cluster * CLUSTER;
            model[s as usize..(s + CLUSTER) as usize].copy_from_slice(&cdata(seed));
            r(s, s + CLUSTER)
        }
    }
}

fn run_op<D: BlockIo>(w: &mut Qcow2Writer<D>, op: Op) -> Result<(), qcow_core::Error<D::Error>> {
    match op {
        Op::Write { off, len, seed } => w.write(off, &data_of(len, seed))?,
        Op::Zero { off, len } => w.write_zeroes(off, len)?,
        Op::Discard { off, len } => w.discard(off, len)?,
        Op::Compressed { cluster, seed } => w.write_compressed(cluster, &cdata(seed))?,
    }
    w.flush()
}

fn run_workload(base: &[u8], ops: &[Op], cut: Option<u64>, drop: bool) -> (Vec<u8>, usize, u64) {
    let mut dev = FaultyDevice::new(VecDevice::from_vec(base.to_vec())).drop_unflushed(drop);
    if let Some(k) = cut {
        dev = dev.cut_power_at(k);
    }
    let mut w = Qcow2Writer::open(dev).unwrap();
    let done = ops
        .iter()
        .take_while(|&&op| run_op(&mut w, op).is_ok())
        .count();
    let dev = w.into_device();
    let n = dev.mutations();
    (dev.into_inner().into_vec(), done, n)
}

#[test]
fn power_cut_while_writing_over_a_snapshot() {
    let q = Qemu::find();
    let (base, data) = base_image();
    let ops = ops();
    let (full, done, n) = run_workload(&base, &ops, None, false);
    assert_eq!(done, ops.len());
    let mut model = data.clone();
    for &op in &ops {
        apply(&mut model, op);
    }
    assert!(read_back(&full, None).unwrap() == model, "uncut run");
    assert!(
        read_back(&full, Some("base")).unwrap() == data,
        "uncut: snapshot"
    );
    let dir = tempfile::tempdir().unwrap();
    if let Some(q) = &q {
        let p = dir.path().join("full.qcow2");
        std::fs::write(&p, &full).unwrap();
        let (code, json) = q.check(&p);
        assert_eq!(code, 0, "uncut run: no errors and no leaks: {json}");
    }
    let stride = (n / CUTS).max(1);
    let mut validated = 0;
    for drop in [false, true] {
        for (i, k) in (0..n).step_by(stride as usize).chain([n - 1]).enumerate() {
            let what = format!("cut at {k}/{n}, drop_unflushed {drop}");
            let (img, done, _) = run_workload(&base, &ops, Some(k), drop);
            let mut before = data.clone();
            for &op in &ops[..done] {
                apply(&mut before, op);
            }
            let mut after = before.clone();
            let (s, e) = apply(&mut after, ops[done]);
            let got = read_back(&img, None).unwrap();
            for (j, (&g, &b)) in got.iter().zip(&before).enumerate() {
                assert!(
                    g == b || ((s..e).contains(&j) && g == after[j]),
                    "{what}: byte {j} (op {done} in flight: {:?})",
                    ops[done]
                );
            }
            assert!(
                read_back(&img, Some("base")).unwrap() == data,
                "{what}: snapshot"
            );
            if let Some(q) = &q {
                if i % 3 == 0 {
                    assert_eq!(qemu_check(q, dir.path(), &img, false, &what), 0);
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
        let mut dev = FaultyDevice::new(VecDevice::from_vec(start.clone())).drop_unflushed(drop);
        if let Some(k) = cut {
            dev = dev.cut_power_at(k);
        }
        let mut w = Qcow2Writer::open(dev).unwrap();
        let done = ops
            .iter()
            .take_while(|&&op| run_snap_op(&mut w, op).is_ok())
            .count();
        let dev = w.into_device();
        let n = dev.mutations();
        (dev.into_inner().into_vec(), done, n)
    };
    let (full, done, n) = run(None, false);
    assert_eq!(done, ops.len());
    assert!(read_back(&full, None).unwrap() == data);
    let dir = tempfile::tempdir().unwrap();
    if let Some(q) = &q {
        let p = dir.path().join("full.qcow2");
        std::fs::write(&p, &full).unwrap();
        let (code, json) = q.check(&p);
        assert_eq!(code, 0, "uncut: no errors and no leaks: {json}");
    }
    let stride = (n / 150).max(1);
    let mut copied_windows = 0;
    for drop in [false, true] {
        for (i, k) in (0..n).step_by(stride as usize).chain([n - 1]).enumerate() {
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
                    copied_windows += qemu_check(q, dir.path(), &img, window, &what).min(1);
                }
            }
        }
    }
    eprintln!("snapshot crash test: {n} mutations, {copied_windows} cut points in a COPIED window");
}
