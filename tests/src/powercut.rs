//! The power-cut harness of the qcow2 crash tests: a seeded workload of
//! writes, zero writes, discards and compressed writes with its model of the
//! guest content, replay of a step list over a `FaultyDevice` cut at any
//! mutation, the cut points to try, and the `qemu-img check` verdicts on
//! what survives.
//!
//! A test builds a [`Workload`], runs it once uncut to count the device
//! mutations, then replays it cut at each of [`cut_points`] and checks the
//! survivor with [`Workload::assert_survivor`] (every completed operation
//! is there; the one in flight is either absent or present, byte by byte)
//! and [`qemu_check`].

#![allow(clippy::cast_possible_truncation)] // test sizes are small

use std::ops::Range;
use std::path::Path;
use std::process::Command;

use qcow_core::io::{FaultyDevice, VecDevice, WriteKind};
use qcow_core::{BlockIo, Qcow2, Qcow2Writer};

use crate::qemu::Qemu;

/// One operation of a workload, each followed by a flush.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// `write` of `len` bytes of [`Workload::data`] with `seed` at `off`.
    Write {
        /// Guest offset.
        off: u64,
        /// Length in bytes.
        len: u64,
        /// Pattern seed.
        seed: u8,
    },
    /// `write_zeroes` of `len` bytes at `off`.
    Zero {
        /// Guest offset.
        off: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `discard` of `len` bytes at `off` (whole clusters read as zero).
    Discard {
        /// Guest offset.
        off: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `write_compressed` of [`Workload::compressed_data`] into `cluster`.
    Compressed {
        /// Guest cluster index.
        cluster: u64,
        /// Pattern seed.
        seed: u8,
    },
}

/// How to generate a workload: a xorshift seed, and for each operation a
/// draw `k` in 0..100 that picks a write (`k <= write`), a zero write
/// (`k <= zero`), a discard (`k <= discard`) or else a compressed write.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    /// The generator's seed (non-zero).
    pub seed: u64,
    /// Number of operations.
    pub ops: usize,
    /// Guest size in bytes.
    pub size: u64,
    /// Cluster size in bytes.
    pub cluster: u64,
    /// Longest write, zero write or discard, in bytes.
    pub max_len: u64,
    /// Highest draw that makes a write.
    pub write: u64,
    /// Highest draw that makes a zero write.
    pub zero: u64,
    /// Highest draw that makes a discard (99: no compressed writes).
    pub discard: u64,
    /// Every this-many bytes of a write's pattern step its base value.
    pub period: usize,
}

/// A generated list of operations with the rules of its guest content.
#[derive(Clone, Debug)]
pub struct Workload {
    /// The operations, in order.
    pub ops: Vec<Op>,
    size: u64,
    cluster: u64,
    period: usize,
}

impl Workload {
    /// Generates the operations `spec` describes (the same ones every time).
    pub fn new(spec: &Spec) -> Self {
        let mut x = spec.seed;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let ops = (0..spec.ops)
            .map(|_| {
                let k = next(100);
                let off = next(spec.size);
                let len = (1 + next(spec.max_len)).min(spec.size - off);
                let seed = next(256) as u8;
                if k <= spec.write {
                    Op::Write { off, len, seed }
                } else if k <= spec.zero {
                    Op::Zero { off, len }
                } else if k <= spec.discard {
                    Op::Discard { off, len }
                } else {
                    Op::Compressed {
                        cluster: next(spec.size / spec.cluster),
                        seed,
                    }
                }
            })
            .collect();
        Self {
            ops,
            size: spec.size,
            cluster: spec.cluster,
            period: spec.period,
        }
    }

    /// The guest size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The bytes an [`Op::Write`] of `len` with `seed` writes.
    pub fn data(&self, len: u64, seed: u8) -> Vec<u8> {
        (0..len as usize)
            .map(|i| seed.wrapping_add((i / self.period) as u8) ^ (i as u8))
            .collect()
    }

    /// The cluster an [`Op::Compressed`] with `seed` writes.
    pub fn compressed_data(&self, seed: u8) -> Vec<u8> {
        (0..self.cluster as usize)
            .map(|i| seed ^ (i / 100) as u8)
            .collect()
    }

    /// Applies `op` to the guest content `model`; returns the byte range
    /// it may touch.
    pub fn apply(&self, model: &mut [u8], op: Op) -> Range<usize> {
        let r = |a: u64, b: u64| a as usize..b as usize;
        match op {
            Op::Write { off, len, seed } => {
                model[r(off, off + len)].copy_from_slice(&self.data(len, seed));
                r(off, off + len)
            }
            Op::Zero { off, len } => {
                model[r(off, off + len)].fill(0);
                r(off, off + len)
            }
            Op::Discard { off, len } => {
                let s = off.div_ceil(self.cluster) * self.cluster;
                let e = (off + len) / self.cluster * self.cluster;
                if s >= e {
                    return 0..0;
                }
                model[r(s, e)].fill(0);
                r(s, e)
            }
            Op::Compressed { cluster, seed } => {
                let s = cluster * self.cluster;
                model[r(s, s + self.cluster)].copy_from_slice(&self.compressed_data(seed));
                r(s, s + self.cluster)
            }
        }
    }

    /// Runs `op` on the writer, then flushes.
    pub fn run_op<D: BlockIo>(
        &self,
        w: &mut Qcow2Writer<D>,
        op: Op,
    ) -> Result<(), qcow_core::Error<D::Error>> {
        match op {
            Op::Write { off, len, seed } => w.write(off, &self.data(len, seed))?,
            Op::Zero { off, len } => w.write_zeroes(off, len)?,
            Op::Discard { off, len } => w.discard(off, len)?,
            Op::Compressed { cluster, seed } => {
                w.write_compressed(cluster, &self.compressed_data(seed))?;
            }
        }
        w.flush()
    }

    /// Runs the operations until one fails; returns how many completed.
    pub fn run<D: BlockIo>(&self, w: &mut Qcow2Writer<D>) -> usize {
        self.ops
            .iter()
            .take_while(|&&op| self.run_op(w, op).is_ok())
            .count()
    }

    /// The guest content `start` after the first `done` operations.
    pub fn model(&self, start: &[u8], done: usize) -> Vec<u8> {
        let mut m = start.to_vec();
        for &op in &self.ops[..done] {
            self.apply(&mut m, op);
        }
        m
    }

    /// Asserts that `got`, the guest content read back after a run that
    /// completed `done` operations from the content `start`, holds all of
    /// them, and where it differs, only bytes the operation in flight may
    /// have written with what it writes. After a complete run, `got` must
    /// be the model exactly.
    pub fn assert_survivor(&self, start: &[u8], got: &[u8], done: usize, what: &str) {
        let before = self.model(start, done);
        assert_eq!(got.len(), before.len(), "{what}: guest size");
        if done == self.ops.len() {
            assert!(got == before, "{what}: content after a complete run");
            return;
        }
        let mut after = before.clone();
        let touched = self.apply(&mut after, self.ops[done]);
        for (i, (&g, &b)) in got.iter().zip(&before).enumerate() {
            if g != b && !(touched.contains(&i) && g == after[i]) {
                panic!(
                    "{what}: byte {i} is {g:#x}, expected {b:#x} (op {done} in flight: {:?})",
                    self.ops[done]
                );
            }
        }
    }
}

/// What survives a run over a [`FaultyDevice`].
#[derive(Debug)]
pub struct CutRun {
    /// The image bytes the cut left.
    pub image: Vec<u8>,
    /// How many steps completed.
    pub done: usize,
    /// How many device mutations were applied.
    pub mutations: u64,
    /// The numbers of the data writes into the first 512 bytes (the
    /// header: a refcount table switch, a snapshot table update, ...).
    pub header_writes: Vec<u64>,
}

/// Opens a `Qcow2Writer` on a copy of `base` over a [`FaultyDevice`] that
/// loses power at mutation `cut` (never: `None`), rolling back unflushed
/// mutations when `drop_unflushed`, and runs `steps` through `step` until
/// one fails.
pub fn run_cut<T: Copy>(
    base: &[u8],
    steps: &[T],
    cut: Option<u64>,
    drop_unflushed: bool,
    mut step: impl FnMut(
        &mut Qcow2Writer<FaultyDevice<VecDevice>>,
        T,
    )
        -> Result<(), qcow_core::Error<<FaultyDevice<VecDevice> as BlockIo>::Error>>,
) -> CutRun {
    let mut dev =
        FaultyDevice::new(VecDevice::from_vec(base.to_vec())).drop_unflushed(drop_unflushed);
    if let Some(k) = cut {
        dev = dev.cut_power_at(k);
    }
    let mut w = Qcow2Writer::open(dev).unwrap();
    let done = steps
        .iter()
        .take_while(|&&s| step(&mut w, s).is_ok())
        .count();
    let dev = w.into_device();
    let mutations = dev.mutations();
    let header_writes = dev
        .log()
        .iter()
        .filter(|r| r.kind == WriteKind::Data && r.offset < 512)
        .map(|r| r.index)
        .collect();
    CutRun {
        image: dev.into_inner().into_vec(),
        done,
        mutations,
        header_writes,
    }
}

/// [`run_cut`] of a workload's operations.
pub fn run_workload(
    base: &[u8],
    work: &Workload,
    cut: Option<u64>,
    drop_unflushed: bool,
) -> CutRun {
    run_cut(base, &work.ops, cut, drop_unflushed, |w, op| {
        work.run_op(w, op)
    })
}

/// Cut points for a run of `mutations` mutations: about `cuts` of them,
/// every `mutations / cuts`-th from 0, then the last one (which may repeat
/// the final stride point).
pub fn cut_points(mutations: u64, cuts: u64) -> Vec<u64> {
    let stride = (mutations / cuts).max(1);
    (0..mutations)
        .step_by(stride as usize)
        .chain([mutations - 1])
        .collect()
}

/// The guest content of qcow2 image `img` (of snapshot `snapshot` when
/// given, `None` when no snapshot has that name), read by qcow-core.
pub fn read_guest(img: &[u8], size: u64, snapshot: Option<&str>) -> Option<Vec<u8>> {
    let mut cache = vec![0u8; 64 << 10];
    let mut cin = vec![0u8; 4096];
    let mut cout = vec![0u8; 4096];
    let mut r = Qcow2::open(VecDevice::from_vec(img.to_vec()), &mut cache)
        .unwrap()
        .with_compression_buffers(&mut cin, &mut cout);
    if let Some(n) = snapshot {
        let s = r.find_snapshot(n).ok()?;
        r.select_snapshot(&s).unwrap();
    }
    let mut out = vec![0u8; size as usize];
    r.read(0, &mut out).unwrap();
    Some(out)
}

/// `qemu-img check` of the image at `path` after a cut: no check errors,
/// leaks allowed, and no corruption other than missing COPIED flags when
/// `copied_ok` (then exit 2 is allowed too). Returns the corruption count.
pub fn qemu_check(q: &Qemu, path: &Path, copied_ok: bool, what: &str) -> u64 {
    let out = Command::new(&q.img)
        .args(["check", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3 || (copied_ok && code == 2),
        "{what}: qemu-img check exit {code}: {json}"
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
            "{what}: {corruptions} corruptions: {json}\n{err}"
        );
    }
    corruptions
}
