//! The qcow2 writer against the real qemu-img: images created and written
//! by qcow-core pass `qemu-img check` (no errors, no leaks) and convert to
//! exactly the guest content an in-memory model predicts, across cluster
//! sizes, refcount widths and both compat levels; images made by qemu-img
//! stay valid after qcow-core writes into them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::cast_possible_truncation)] // test sizes are small and fit every width

use qcow_core::create::{create, CreateOptions, Preallocation};
use qcow_core::io::FileDevice;
use qcow_core::Qcow2Writer;
use qimg_tests::qemu::Qemu;
use qimg_tests::{tmpfs_tempdir, XorShift};

/// A random workload applied both to the image and to `model`. Returns the
/// number of operations.
fn workload(
    w: &mut Qcow2Writer<FileDevice>,
    model: &mut [u8],
    cs: u64,
    v3: bool,
    seed: u64,
    bytes_target: u64,
) -> usize {
    let size = model.len() as u64;
    let mut rng = XorShift(seed | 1);
    let max_len = (3 * cs).clamp(16 << 10, 256 << 10);
    let mut written = 0u64;
    let mut ops = 0;
    while written < bytes_target || ops < 60 {
        ops += 1;
        let kind = rng.below(100);
        let off = if rng.below(3) == 0 {
            rng.below(size / 512) * 512
        } else {
            rng.below(size)
        };
        let len = (1 + rng.below(max_len)).min(size - off);
        let (o, l) = (off as usize, len as usize);
        if kind < 62 {
            let b = (rng.next() & 0xff) as u8;
            let data: Vec<u8> = (0..l)
                .map(|i| b.wrapping_add((i / 97) as u8) ^ (i as u8))
                .collect();
            w.write(off, &data).unwrap();
            model[o..o + l].copy_from_slice(&data);
            written += len;
        } else if kind < 77 {
            w.write_zeroes(off, len).unwrap();
            model[o..o + l].fill(0);
        } else if kind < 90 {
            w.discard(off, len).unwrap();
            // Whole clusters read as zero afterwards (v3: zero flag; v2:
            // unallocated without a backing file); partial ones are kept.
            let first = off.div_ceil(cs) * cs;
            let end = (off + len) / cs * cs;
            if first < end {
                model[first as usize..end as usize].fill(0);
            }
            let _ = v3;
        } else if kind < 96 {
            let ci = rng.below(size / cs);
            let b = (rng.next() & 0xff) as u8;
            let data: Vec<u8> = (0..cs as usize).map(|i| b ^ ((i / 300) as u8)).collect();
            w.write_compressed(ci, &data).unwrap();
            let s = (ci * cs) as usize;
            model[s..s + cs as usize].copy_from_slice(&data);
            written += cs;
        } else {
            w.flush().unwrap();
        }
    }
    ops
}

fn run_cell(q: &Qemu, cs: u64, rb: u32, v3: bool) {
    let dir = tmpfs_tempdir();
    let path = dir.path().join("t.qcow2");
    let size: u64 = if cs >= 2 << 20 { 16 << 20 } else { 4 << 20 };
    let opts = CreateOptions {
        size,
        v3,
        cluster_size: cs,
        refcount_bits: rb,
        ..CreateOptions::default()
    };
    let what = format!("cluster {cs} refcount_bits {rb} v3 {v3}");
    let mut w = create(FileDevice::create(&path).unwrap(), &opts).unwrap();
    let mut model = vec![0u8; size as usize];
    // Small clusters: enough data to cross many refcount blocks and grow
    // the refcount table (512 B clusters, 64-bit refcounts: a block covers
    // 64 clusters, the first table 4096 clusters = 2 MiB).
    let target = if cs <= 4096 { 6 << 20 } else { 8 << 20 };
    let rt0 = w.header().refcount_table_offset;
    let ops = workload(
        &mut w,
        &mut model,
        cs,
        v3,
        cs ^ u64::from(rb) ^ u64::from(v3),
        target,
    );
    let grew = w.header().refcount_table_offset != rt0;
    if cs == 512 && rb == 64 {
        assert!(grew, "{what}: the workload should grow the refcount table");
    }
    drop(w.close().unwrap());
    q.assert_clean(&path, &what);
    q.assert_content(&path, dir.path(), &model, &what);
    eprintln!("{what}: {ops} ops, refcount table grew: {grew}: ok");
}

#[test]
fn matrix_of_cluster_sizes_refcount_widths_and_compat_passes_qemu_img_check() {
    let Some(q) = Qemu::find() else { return };
    let mut cells = Vec::new();
    for cs in [512u64, 4096, 65536, 2 << 20] {
        for rb in [1u32, 16, 64] {
            cells.push((cs, rb, true));
        }
        // v2 only knows 16-bit refcounts (qemu-img refuses the others).
        cells.push((cs, 16, false));
    }
    std::thread::scope(|s| {
        let (a, b): (Vec<_>, Vec<_>) = cells.iter().enumerate().partition(|(i, _)| i % 2 == 0);
        for half in [a, b] {
            let q = &q;
            s.spawn(move || {
                for (_, &(cs, rb, v3)) in half {
                    run_cell(q, cs, rb, v3);
                }
            });
        }
    });
}

#[test]
fn extended_l2_zstd_and_lazy_refcount_images_pass_qemu_img_check() {
    let Some(q) = Qemu::find() else { return };
    for (cs, ext, ztype, lazy) in [
        (65536u64, true, 1u8, false),
        (16384, true, 0, true),
        (4096, false, 1, true),
    ] {
        let dir = tmpfs_tempdir();
        let path = dir.path().join("x.qcow2");
        let size = 8u64 << 20;
        let opts = CreateOptions {
            size,
            cluster_size: cs,
            extended_l2: ext,
            compression_type: ztype,
            lazy_refcounts: lazy,
            ..CreateOptions::default()
        };
        let what = format!("cluster {cs} extended_l2 {ext} compression {ztype} lazy {lazy}");
        let mut w = create(FileDevice::create(&path).unwrap(), &opts).unwrap();
        let mut model = vec![0u8; size as usize];
        workload(&mut w, &mut model, cs, true, cs ^ 0x55, 4 << 20);
        drop(w.close().unwrap());
        q.assert_clean(&path, &what);
        q.assert_content(&path, dir.path(), &model, &what);
        // And back: qemu-io writes into the image, qcow-core writes more.
        q.io(
            &path,
            "qcow2",
            &["write -P 0x5a 1000 70000", "write -z 3M 200k"],
        );
        model[1000..71000].fill(0x5a);
        model[3 << 20..(3 << 20) + (200 << 10)].fill(0);
        let mut w = Qcow2Writer::open(FileDevice::open_rw(&path).unwrap()).unwrap();
        workload(&mut w, &mut model, cs, true, cs ^ 0x66, 1 << 20);
        drop(w.close().unwrap());
        q.assert_clean(&path, &what);
        q.assert_content(&path, dir.path(), &model, &what);
    }
}

#[test]
fn create_matches_qemu_img_layout_and_options() {
    let Some(q) = Qemu::find() else { return };
    let dir = tmpfs_tempdir();
    for (v3, opts_s) in [(true, "compat=1.1"), (false, "compat=0.10")] {
        let theirs = dir.path().join("q.qcow2");
        let ours = dir.path().join("o.qcow2");
        q.create(&theirs, "qcow2", opts_s, "16M");
        let o = CreateOptions {
            size: 16 << 20,
            v3,
            ..CreateOptions::default()
        };
        drop(
            create(FileDevice::create(&ours).unwrap(), &o)
                .unwrap()
                .close()
                .unwrap(),
        );
        let a = std::fs::read(&theirs).unwrap();
        let b = std::fs::read(&ours).unwrap();
        // Header, extensions, refcount table and first block: identical.
        assert_eq!(a[..3 * 65536], b[..3 * 65536], "{opts_s}: clusters 0-2");
        assert_eq!(a[3 * 65536..], b[3 * 65536..a.len()], "{opts_s}: L1");
        assert!(b.len() - a.len() < 512);
        q.assert_clean(&ours, opts_s);
    }
    // Options show up in qemu-img info as qemu-img's own would.
    let ours = dir.path().join("o2.qcow2");
    let o = CreateOptions {
        size: 3 << 20,
        cluster_size: 32768,
        refcount_bits: 8,
        lazy_refcounts: true,
        compression_type: 1,
        extended_l2: true,
        backing_file: Some("base.raw"),
        backing_fmt: Some("raw"),
        ..CreateOptions::default()
    };
    drop(
        create(FileDevice::create(&ours).unwrap(), &o)
            .unwrap()
            .close()
            .unwrap(),
    );
    let info = q.info(&ours);
    let spec = &info["format-specific"]["data"];
    assert_eq!(info["cluster-size"], 32768, "{info}");
    assert_eq!(info["virtual-size"], 3 << 20);
    assert_eq!(info["backing-filename"], "base.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    assert_eq!(spec["refcount-bits"], 8, "{info}");
    assert_eq!(spec["lazy-refcounts"], true);
    assert_eq!(spec["compression-type"], "zstd");
    assert_eq!(spec["extended-l2"], true);
    // Validation messages are qemu-img's.
    let bad = CreateOptions {
        size: 1 << 20,
        cluster_size: 1000,
        ..CreateOptions::default()
    };
    let e = create(qcow_core::io::VecDevice::new(), &bad).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Cluster size must be a power of two between 512 and 2048k"
    );
    let bad = CreateOptions {
        size: 1 << 20,
        v3: false,
        refcount_bits: 8,
        ..CreateOptions::default()
    };
    let e = create(qcow_core::io::VecDevice::new(), &bad).unwrap_err();
    assert!(e
        .to_string()
        .starts_with("Different refcount widths than 16 bits"));
    // Preallocation: metadata and full both check clean and read zero.
    for p in [Preallocation::Metadata, Preallocation::Full] {
        let path = dir.path().join("p.qcow2");
        let o = CreateOptions {
            size: 1 << 20,
            cluster_size: 4096,
            preallocation: p,
            ..CreateOptions::default()
        };
        drop(
            create(FileDevice::create(&path).unwrap(), &o)
                .unwrap()
                .close()
                .unwrap(),
        );
        q.assert_clean(&path, "preallocation");
        q.assert_content(&path, dir.path(), &vec![0u8; 1 << 20], "preallocation");
        let map = q.map(&path);
        assert!(
            map.as_array().unwrap().iter().all(|m| m["data"] == true),
            "{map}"
        );
    }
}

#[test]
fn qemu_written_image_stays_valid_after_qcow_core_writes() {
    let Some(q) = Qemu::find() else { return };
    let dir = tmpfs_tempdir();
    for opts in [
        "compat=1.1",
        "compat=0.10",
        "cluster_size=4096,refcount_bits=2",
    ] {
        let path = dir.path().join("q.qcow2");
        q.create(&path, "qcow2", opts, "8M");
        q.io(
            &path,
            "qcow2",
            &[
                "write -P 0x11 0 1M",
                "write -P 0x22 3M 512k",
                "write -c -P 0x33 6M 64k",
            ],
        );
        let mut model = vec![0u8; 8 << 20];
        model[..1 << 20].fill(0x11);
        model[3 << 20..(3 << 20) + (512 << 10)].fill(0x22);
        model[6 << 20..(6 << 20) + (64 << 10)].fill(0x33);
        let mut w = Qcow2Writer::open(FileDevice::open_rw(&path).unwrap()).unwrap();
        let cs = w.header().cluster_size();
        let v3 = w.header().version == 3;
        workload(&mut w, &mut model, cs, v3, 77, 2 << 20);
        // Overwrite part of the compressed run and resize up.
        w.write(6 << 20 | 100, &[0x44; 5000]).unwrap();
        model[(6 << 20) + 100..(6 << 20) + 5100].fill(0x44);
        drop(w.close().unwrap());
        q.assert_clean(&path, opts);
        q.assert_content(&path, dir.path(), &model, opts);
    }
}

#[test]
fn backing_file_cow_and_resize() {
    let Some(q) = Qemu::find() else { return };
    let dir = tmpfs_tempdir();
    let base = dir.path().join("base.raw");
    let base_data = qimg_tests::qemu::pattern(2 << 20, 9, 3);
    std::fs::write(&base, &base_data).unwrap();
    let path = dir.path().join("top.qcow2");
    let o = CreateOptions {
        size: 2 << 20,
        cluster_size: 65536,
        backing_file: Some("base.raw"),
        backing_fmt: Some("raw"),
        ..CreateOptions::default()
    };
    let w = create(FileDevice::create(&path).unwrap(), &o).unwrap();
    let mut w = w.with_backing(FileDevice::open(&base).unwrap()).unwrap();
    let mut model = base_data.clone();
    for (i, off) in [5u64, 70_000, 300_001, 1_000_000].iter().enumerate() {
        let d = vec![i as u8 + 1; 3000];
        w.write(*off, &d).unwrap();
        model[*off as usize..*off as usize + 3000].copy_from_slice(&d);
    }
    w.write_zeroes(131072, 65536).unwrap();
    model[131072..196608].fill(0);
    drop(w.close().unwrap());
    q.assert_clean(&path, "backing");
    q.assert_content(&path, dir.path(), &model, "backing");

    // Grow past what one L1 entry... and one L1 cluster covers; then shrink.
    let p2 = dir.path().join("r.qcow2");
    let o = CreateOptions {
        size: 1 << 20,
        cluster_size: 512,
        ..CreateOptions::default()
    };
    let mut w = create(FileDevice::create(&p2).unwrap(), &o).unwrap();
    w.write(1000, &[9; 700]).unwrap();
    w.resize(64 << 20).unwrap();
    w.write((40 << 20) + 3, &[8; 1000]).unwrap();
    // Shrinking drops the data past the new end, as qemu-img does.
    w.resize(2 << 20).unwrap();
    drop(w.close().unwrap());
    q.assert_clean(&p2, "resize");
    let mut m = vec![0u8; 2 << 20];
    m[1000..1700].fill(9);
    q.assert_content(&p2, dir.path(), &m, "resize");
}
