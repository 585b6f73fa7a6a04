//! Power cuts during a write workload on a qcow2 image with an external
//! data file: the image and the data file share one power supply, so a
//! cut after the k-th mutation of either stops both (with or without their
//! unflushed writes rolled back). Every cut leaves an image that qcow-core
//! reads back with every completed operation, and `qemu-img check` (on
//! every `QEMU_STRIDE`-th cut) finds no corruption.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::cast_possible_truncation)] // test sizes are small

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

use qcow_core::create::{create, CreateOptions};
use qcow_core::io::VecDevice;
use qcow_core::{BlockIo, Qcow2, Qcow2Writer};
use qimg_tests::qemu::Qemu;

const SIZE: u64 = 2 << 20;
const CLUSTER: u64 = 512;
const OPS: usize = 200;
/// Cut points validated per mode.
const CUTS: u64 = 120;
const QEMU_STRIDE: u64 = 8;

/// The shared power supply: mutations counted across both files.
#[derive(Default)]
struct Power {
    mutations: u64,
    cut_at: Option<u64>,
    off: bool,
}

#[derive(Debug)]
struct PowerCut;

impl std::fmt::Display for PowerCut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("power cut")
    }
}

/// One file on the shared supply, with an undo log of unflushed writes.
struct File {
    bytes: Vec<u8>,
    undo: Vec<(u64, Vec<u8>)>,
    power: Rc<RefCell<Power>>,
}

impl File {
    fn new(bytes: Vec<u8>, power: &Rc<RefCell<Power>>) -> Self {
        Self {
            bytes,
            undo: Vec::new(),
            power: Rc::clone(power),
        }
    }
    /// What the medium holds after the cut.
    fn survivor(mut self, drop_unflushed: bool) -> Vec<u8> {
        if drop_unflushed {
            while let Some((off, old)) = self.undo.pop() {
                let o = off as usize;
                self.bytes[o..o + old.len()].copy_from_slice(&old);
            }
        }
        self.bytes
    }
}

impl BlockIo for File {
    type Error = PowerCut;
    fn sector_size(&self) -> u32 {
        512
    }
    fn size(&mut self) -> Result<u64, PowerCut> {
        Ok(self.bytes.len() as u64)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), PowerCut> {
        let o = offset as usize;
        buf.fill(0);
        let end = (o + buf.len()).min(self.bytes.len());
        if o < end {
            buf[..end - o].copy_from_slice(&self.bytes[o..end]);
        }
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), PowerCut> {
        let mut p = self.power.borrow_mut();
        if p.off || p.cut_at == Some(p.mutations) {
            p.off = true;
            return Err(PowerCut);
        }
        p.mutations += 1;
        let o = offset as usize;
        if self.bytes.len() < o + buf.len() {
            self.bytes.resize(o + buf.len(), 0);
        }
        // Rolling back a write that grew the file leaves zeroes there,
        // which is what a lost extension reads as.
        self.undo
            .push((offset, self.bytes[o..o + buf.len()].to_vec()));
        self.bytes[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), PowerCut> {
        if self.power.borrow().off {
            return Err(PowerCut);
        }
        self.undo.clear();
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Write { off: u64, len: u64, seed: u8 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
}

fn data_of(len: u64, seed: u8) -> Vec<u8> {
    (0..len as usize)
        .map(|i| seed.wrapping_add((i / 61) as u8) ^ (i as u8))
        .collect()
}

fn ops() -> Vec<Op> {
    let mut x = 0x0bad_cafe_1234_5677u64;
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
                0..=74 => Op::Write { off, len, seed },
                75..=87 => Op::Zero { off, len },
                _ => Op::Discard { off, len },
            }
        })
        .collect()
}

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
    }
}

fn run_op(w: &mut Qcow2Writer<File>, op: Op) -> Result<(), qcow_core::Error<PowerCut>> {
    match op {
        Op::Write { off, len, seed } => w.write(off, &data_of(len, seed))?,
        Op::Zero { off, len } => w.write_zeroes(off, len)?,
        Op::Discard { off, len } => w.discard(off, len)?,
    }
    w.flush()
}

/// A new image naming `data_path` as its data file, and the data file.
fn fresh(data_path: &str, raw: bool) -> (Vec<u8>, Vec<u8>) {
    let o = CreateOptions {
        size: SIZE,
        cluster_size: CLUSTER,
        data_file: Some(data_path),
        data_file_raw: raw,
        ..CreateOptions::default()
    };
    let img = create(VecDevice::new(), &o)
        .unwrap()
        .close()
        .unwrap()
        .into_vec();
    (img, vec![0u8; SIZE as usize])
}

/// Runs the workload, cut at mutation `cut` (None: never); returns what
/// survives of both files, the completed operations and the mutations.
fn run(
    base: &(Vec<u8>, Vec<u8>),
    ops: &[Op],
    cut: Option<u64>,
    drop_unflushed: bool,
) -> (Vec<u8>, Vec<u8>, usize, u64) {
    let power = Rc::new(RefCell::new(Power {
        cut_at: cut,
        ..Power::default()
    }));
    let img = File::new(base.0.clone(), &power);
    let data = File::new(base.1.clone(), &power);
    let mut w = Qcow2Writer::open(img)
        .unwrap()
        .with_data_file(data)
        .unwrap();
    let mut done = 0;
    for &op in ops {
        if run_op(&mut w, op).is_err() {
            break;
        }
        done += 1;
    }
    let data = w.data_file_device().map(|d| {
        let bytes = std::mem::take(&mut d.bytes);
        let undo = std::mem::take(&mut d.undo);
        (bytes, undo)
    });
    let img = w.into_device();
    let (bytes, undo) = data.unwrap();
    let data = File {
        bytes,
        undo,
        power: Rc::clone(&power),
    };
    let n = power.borrow().mutations;
    (
        img.survivor(drop_unflushed),
        data.survivor(drop_unflushed),
        done,
        n,
    )
}

fn read_back(img: &[u8], data: &[u8]) -> Vec<u8> {
    let mut cache = vec![0u8; 64 << 10];
    let mut r = Qcow2::open(VecDevice::from_vec(img.to_vec()), &mut cache)
        .unwrap()
        .with_data_file(VecDevice::from_vec(data.to_vec()));
    let mut out = vec![0u8; SIZE as usize];
    r.read(0, &mut out).unwrap();
    out
}

fn validate(img: &[u8], data: &[u8], ops: &[Op], done: usize, what: &str) {
    let mut before = vec![0u8; SIZE as usize];
    for &op in &ops[..done] {
        apply(&mut before, op);
    }
    let got = read_back(img, data);
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

fn qemu_check(q: &Qemu, img_path: &Path, data_path: &Path, img: &[u8], data: &[u8], what: &str) {
    std::fs::write(img_path, img).unwrap();
    std::fs::write(data_path, data).unwrap();
    let (code, json) = q.check(img_path);
    assert!(
        code == 0 || code == 3,
        "{what}: qemu-img check exit {code}: {json}"
    );
    for key in ["corruptions", "check-errors"] {
        assert_eq!(json[key].as_u64().unwrap_or(0), 0, "{what}: {json}");
    }
}

#[test]
fn power_cut_with_an_external_data_file_leaves_a_consistent_image() {
    let q = Qemu::find();
    let ops = ops();
    let mut total = 0u64;
    for raw in [false, true] {
        let dir = tempfile::tempdir_in(if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        })
        .unwrap();
        let img_path = dir.path().join("crash.qcow2");
        let data_path = dir.path().join("crash.data");
        let base = fresh(data_path.to_str().unwrap(), raw);
        let (img, data, done, n) = run(&base, &ops, None, false);
        assert_eq!(done, ops.len());
        validate(&img, &data, &ops, done, "uncut run");
        if raw {
            // The raw data file is the disk.
            assert!(data == read_back(&img, &data), "raw data file");
        }
        if let Some(q) = &q {
            std::fs::write(&img_path, &img).unwrap();
            std::fs::write(&data_path, &data).unwrap();
            let (code, json) = q.check(&img_path);
            assert_eq!(code, 0, "uncut run: no errors and no leaks: {json}");
        }
        let stride = (n / CUTS).max(1);
        for drop_unflushed in [false, true] {
            for (i, k) in (0..n).step_by(stride as usize).chain([n - 1]).enumerate() {
                let what = format!("raw {raw}: cut at {k}/{n}, drop_unflushed {drop_unflushed}");
                let (img, data, done, _) = run(&base, &ops, Some(k), drop_unflushed);
                assert!(done < ops.len(), "{what}: the cut must stop the run");
                validate(&img, &data, &ops, done, &what);
                if let Some(q) = &q {
                    if (i as u64).is_multiple_of(QEMU_STRIDE) {
                        qemu_check(q, &img_path, &data_path, &img, &data, &what);
                    }
                }
                total += 1;
            }
        }
    }
    assert!(total >= 4 * CUTS);
}
