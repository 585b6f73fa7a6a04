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

use std::path::Path;

use qcow_core::create::{create, CreateOptions};
use qcow_core::io::{FaultyDevice, VecDevice, WriteKind};
use qcow_core::{BlockIo, Qcow2, Qcow2Writer};
use qimg_tests::qemu::Qemu;

const SIZE: u64 = 4 << 20;
const CLUSTER: u64 = 512;
const OPS: usize = 240;
/// Cut points validated per mode (spread evenly over the whole run).
const CUTS: u64 = 450;
/// `qemu-img check` on every this-many-th cut point.
const QEMU_STRIDE: u64 = 6;

#[derive(Clone, Copy, Debug)]
enum Op {
    Write { off: u64, len: u64, seed: u8 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
    Compressed { cluster: u64, seed: u8 },
}

fn data_of(len: u64, seed: u8) -> Vec<u8> {
    (0..len as usize)
        .map(|i| seed.wrapping_add((i / 61) as u8) ^ (i as u8))
        .collect()
}

fn ops() -> Vec<Op> {
    let mut x = 0x1234_5678_9abc_def1u64;
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
            let len = (1 + next(40 << 10)).min(SIZE - off);
            let seed = next(256) as u8;
            match k {
                0..=74 => Op::Write { off, len, seed },
                75..=84 => Op::Zero { off, len },
                85..=94 => Op::Discard { off, len },
                _ => Op::Compressed {
                    cluster: next(SIZE / CLUSTER),
                    seed,
                },
            }
        })
        .collect()
}

/// The guest content after `op`; returns the range it may touch.
fn apply(model: &mut [u8], op: Op) -> (usize, usize) {
    match op {
        Op::Write { off, len, seed } => {
            model[off as usize..(off + len) as usize].copy_from_slice(&data_of(len, seed));
            (off as usize, (off + len) as usize)
        }
        Op::Zero { off, len } => {
            model[off as usize..(off + len) as usize].fill(0);
            (off as usize, (off + len) as usize)
        }
        Op::Discard { off, len } => {
            let s = off.div_ceil(CLUSTER) * CLUSTER;
            let e = (off + len) / CLUSTER * CLUSTER;
            if s < e {
                model[s as usize..e as usize].fill(0);
                (s as usize, e as usize)
            } else {
                (0, 0)
            }
        }
        Op::Compressed { cluster, seed } => {
            let s = (cluster * CLUSTER) as usize;
            let d: Vec<u8> = (0..CLUSTER as usize)
                .map(|i| seed ^ (i / 100) as u8)
                .collect();
            model[s..s + CLUSTER as usize].copy_from_slice(&d);
            (s, s + CLUSTER as usize)
        }
    }
}

fn run_op<D: BlockIo>(w: &mut Qcow2Writer<D>, op: Op) -> Result<(), qcow_core::Error<D::Error>> {
    match op {
        Op::Write { off, len, seed } => w.write(off, &data_of(len, seed))?,
        Op::Zero { off, len } => w.write_zeroes(off, len)?,
        Op::Discard { off, len } => w.discard(off, len)?,
        Op::Compressed { cluster, seed } => {
            let d: Vec<u8> = (0..CLUSTER as usize)
                .map(|i| seed ^ (i / 100) as u8)
                .collect();
            w.write_compressed(cluster, &d)?;
        }
    }
    w.flush()
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

/// Runs the workload over a device cut at `cut` (None: never); returns the
/// surviving bytes, the completed operations, and the mutation count.
fn run(
    base: &[u8],
    ops: &[Op],
    cut: Option<u64>,
    drop_unflushed: bool,
) -> (Vec<u8>, usize, u64, Vec<u64>) {
    let mut dev =
        FaultyDevice::new(VecDevice::from_vec(base.to_vec())).drop_unflushed(drop_unflushed);
    if let Some(k) = cut {
        dev = dev.cut_power_at(k);
    }
    let mut w = Qcow2Writer::open(dev).unwrap();
    let mut done = 0;
    for &op in ops {
        if run_op(&mut w, op).is_err() {
            break;
        }
        done += 1;
    }
    let dev = w.into_device();
    let mutations = dev.mutations();
    // Header writes (the refcount table switch).
    let hdr: Vec<u64> = dev
        .log()
        .iter()
        .filter(|r| r.kind == WriteKind::Data && r.offset < 512)
        .map(|r| r.index)
        .collect();
    (dev.into_inner().into_vec(), done, mutations, hdr)
}

fn read_back(img: &[u8]) -> Vec<u8> {
    let mut cache = vec![0u8; 64 << 10];
    let mut cin = vec![0u8; 4096];
    let mut cout = vec![0u8; 4096];
    let mut r = Qcow2::open(VecDevice::from_vec(img.to_vec()), &mut cache)
        .unwrap()
        .with_compression_buffers(&mut cin, &mut cout);
    let mut out = vec![0u8; SIZE as usize];
    r.read(0, &mut out).unwrap();
    out
}

fn validate(img: &[u8], ops: &[Op], done: usize, what: &str) {
    let mut before = vec![0u8; SIZE as usize];
    for &op in &ops[..done] {
        apply(&mut before, op);
    }
    let got = read_back(img);
    if done == ops.len() {
        assert!(got == before, "{what}: content after a complete run");
        return;
    }
    let mut after = before.clone();
    let (s, e) = apply(&mut after, ops[done]);
    for (i, (&g, &b)) in got.iter().zip(&before).enumerate() {
        if g != b && !((s..e).contains(&i) && g == after[i]) {
            panic!(
                "{what}: byte {i} is {g:#x}, expected {b:#x} (op {done} in flight: {:?})",
                ops[done]
            );
        }
    }
}

fn qemu_check(q: &Qemu, dir: &Path, img: &[u8], what: &str) {
    let p = dir.join("crash.qcow2");
    std::fs::write(&p, img).unwrap();
    let (code, json) = q.check(&p);
    assert!(
        code == 0 || code == 3,
        "{what}: qemu-img check exit {code}: {json}"
    );
    assert_eq!(
        json["corruptions"].as_u64().unwrap_or(0),
        0,
        "{what}: {json}"
    );
    assert_eq!(
        json["check-errors"].as_u64().unwrap_or(0),
        0,
        "{what}: {json}"
    );
}

#[test]
fn power_cut_at_any_mutation_leaves_a_consistent_image() {
    let q = Qemu::find();
    let base = fresh_image();
    let ops = ops();
    assert!(ops.len() >= 200);
    let (full, done, n, hdr_writes) = run(&base, &ops, None, false);
    assert!(!hdr_writes.is_empty(), "the run switches refcount tables");
    assert_eq!(done, ops.len());
    validate(&full, &ops, done, "uncut run");
    // The run allocates refcount blocks and grows the refcount table.
    assert_ne!(
        full[48..56],
        base[48..56],
        "the refcount table should have moved"
    );
    if let Some(q) = &q {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("full.qcow2");
        std::fs::write(&p, &full).unwrap();
        let (code, json) = q.check(&p);
        assert_eq!(code, 0, "uncut run: no errors and no leaks: {json}");
    }
    let stride = (n / CUTS).max(1);
    eprintln!(
        "crash test: {} ops, {n} device mutations, cut every {stride}th",
        ops.len()
    );
    let checks = std::sync::atomic::AtomicU64::new(0);
    let cuts = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for drop_unflushed in [false, true] {
            let (base, ops, q, checks, cuts, hdr_writes) =
                (&base, &ops, &q, &checks, &cuts, &hdr_writes);
            s.spawn(move || {
                let dir = tempfile::tempdir_in(if Path::new("/dev/shm").is_dir() {
                    "/dev/shm"
                } else {
                    "/tmp"
                })
                .unwrap();
                let mut i = 0u64;
                // Every stride-th mutation, plus the last one.
                // Every stride-th mutation, the last one, and every one
                // within 12 of a header write (refcount table growth).
                let mut points: Vec<u64> = (0..n).step_by(stride as usize).chain([n - 1]).collect();
                for &h in hdr_writes {
                    points.extend(h.saturating_sub(12)..(h + 12).min(n));
                }
                points.sort_unstable();
                points.dedup();
                for k in points {
                    let what = format!("cut at {k}/{n}, drop_unflushed {drop_unflushed}");
                    let (img, done, _, _) = run(base, ops, Some(k), drop_unflushed);
                    assert!(done < ops.len(), "{what}: the cut must stop the run");
                    validate(&img, ops, done, &what);
                    if let Some(q) = q {
                        let near = hdr_writes.iter().any(|&h| k + 12 >= h && k < h + 12);
                        if near || i.is_multiple_of(QEMU_STRIDE) {
                            qemu_check(q, dir.path(), &img, &what);
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
