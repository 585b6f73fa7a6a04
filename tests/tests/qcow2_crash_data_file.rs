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
use qimg_tests::powercut::{cut_points, qemu_check, Spec, Workload};
use qimg_tests::qemu::Qemu;
use qimg_tests::tmpfs_tempdir;

const SIZE: u64 = 2 << 20;
const CLUSTER: u64 = 512;
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

/// 200 operations: 75% writes of up to 24 KiB, 13% zero writes, 12%
/// discards.
fn workload() -> Workload {
    Workload::new(&Spec {
        seed: 0x0bad_cafe_1234_5677,
        ops: 200,
        size: SIZE,
        cluster: CLUSTER,
        max_len: 24 << 10,
        write: 74,
        zero: 87,
        discard: 99,
        period: 61,
    })
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
    work: &Workload,
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
    let done = work.run(&mut w);
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

fn validate(img: &[u8], data: &[u8], work: &Workload, done: usize, what: &str) {
    let got = read_back(img, data);
    work.assert_survivor(&vec![0u8; SIZE as usize], &got, done, what);
}

/// Writes both files where the image names them, then checks the image.
fn check_files(q: &Qemu, img_path: &Path, data_path: &Path, img: &[u8], data: &[u8], what: &str) {
    std::fs::write(img_path, img).unwrap();
    std::fs::write(data_path, data).unwrap();
    assert_eq!(qemu_check(q, img_path, false, what), 0);
}

#[test]
fn power_cut_with_an_external_data_file_leaves_a_consistent_image() {
    let q = Qemu::find();
    let work = workload();
    let mut total = 0u64;
    for raw in [false, true] {
        let dir = tmpfs_tempdir();
        let img_path = dir.path().join("crash.qcow2");
        let data_path = dir.path().join("crash.data");
        let base = fresh(data_path.to_str().unwrap(), raw);
        let (img, data, done, n) = run(&base, &work, None, false);
        assert_eq!(done, work.ops.len());
        validate(&img, &data, &work, done, "uncut run");
        if raw {
            // The raw data file is the disk.
            assert!(data == read_back(&img, &data), "raw data file");
        }
        if let Some(q) = &q {
            std::fs::write(&img_path, &img).unwrap();
            std::fs::write(&data_path, &data).unwrap();
            q.assert_clean(&img_path, "uncut run");
        }
        for drop_unflushed in [false, true] {
            for (i, k) in cut_points(n, CUTS).into_iter().enumerate() {
                let what = format!("raw {raw}: cut at {k}/{n}, drop_unflushed {drop_unflushed}");
                let (img, data, done, _) = run(&base, &work, Some(k), drop_unflushed);
                assert!(done < work.ops.len(), "{what}: the cut must stop the run");
                validate(&img, &data, &work, done, &what);
                if let Some(q) = &q {
                    if (i as u64).is_multiple_of(QEMU_STRIDE) {
                        check_files(q, &img_path, &data_path, &img, &data, &what);
                    }
                }
                total += 1;
            }
        }
    }
    assert!(total >= 4 * CUTS);
}
