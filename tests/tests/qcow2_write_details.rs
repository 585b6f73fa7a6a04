//! Writer details judged by qemu-img: compressed clusters packed into
//! shared host clusters (`convert -c` about as small as qemu-img's),
//! extended L2 zero writes that cover part of a subcluster, and dirty
//! (lazy refcounts, not closed cleanly) images repaired on a writing open,
//! as QEMU repairs them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::cast_possible_truncation)] // test sizes are small and fit every width

use std::path::Path;
use std::process::Command;

use qcow_core::create::{create, CreateOptions};
use qcow_core::io::FileDevice;
use qcow_core::Qcow2Writer;
use qimg_tests::qemu::{write_tmp, Qemu};
use qimg_tests::{qimg, run_ok, tmpfs_tempdir};

/// Text-like, compressible data: numbered lines of words.
fn text(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "cluster", "refcount", "table", "guest", "host", "offset", "image", "write", "zero",
        "backing", "sector", "header",
    ];
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 64);
    let mut line = 0u64;
    while out.len() < len {
        line += 1;
        out.extend_from_slice(format!("{line:07} ").as_bytes());
        for _ in 0..6 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(WORDS[(x % 12) as usize].as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(format!("{}\n", x % 1000).as_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn convert_c_packs_compressed_clusters_like_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    let dir = tmpfs_tempdir();
    let d = dir.path();
    let data = text(8 << 20, 5);
    let src = write_tmp(d, "src.raw", &data);
    for opts in ["cluster_size=64k", "cluster_size=4k,refcount_bits=4"] {
        let ours = d.join("ours.qcow2");
        let theirs = d.join("theirs.qcow2");
        let _ = std::fs::remove_file(&ours);
        run_ok(
            qimg()
                .args(["convert", "-c", "-O", "qcow2", "-o", opts])
                .arg(&src)
                .arg(&ours),
        );
        q.convert(&["-c", "-O", "qcow2", "-o", opts], &src, &theirs);
        q.assert_clean(&ours, opts);
        q.assert_content(&ours, d, &data, opts);
        let a = std::fs::metadata(&ours).unwrap().len();
        let b = std::fs::metadata(&theirs).unwrap().len();
        assert!(
            a * 10 <= b * 11,
            "{opts}: qimg convert -c made {a} bytes, qemu-img {b}"
        );
        // Packed: far fewer host bytes than one host cluster per cluster.
        assert!(a < (8 << 20) / 3, "{opts}: {a}");
    }
}

#[test]
fn overwriting_and_discarding_packed_compressed_clusters_keeps_refcounts_exact() {
    let Some(q) = Qemu::find() else { return };
    let dir = tmpfs_tempdir();
    for (cs, rb, ztype) in [(4096u64, 16u32, 0u8), (65536, 2, 0), (16384, 16, 1)] {
        let what = format!("cluster {cs} refcount_bits {rb} compression {ztype}");
        let path = dir.path().join("p.qcow2");
        let size = 64 * cs;
        let o = CreateOptions {
            size,
            cluster_size: cs,
            refcount_bits: rb,
            compression_type: ztype,
            ..CreateOptions::default()
        };
        let mut w = create(FileDevice::create(&path).unwrap(), &o).unwrap();
        let mut model = text(size as usize, cs);
        for ci in 0..size / cs {
            let s = (ci * cs) as usize;
            w.write_compressed(ci, &model[s..s + cs as usize]).unwrap();
        }
        drop(w.close().unwrap());
        q.assert_clean(&path, &what);
        q.assert_content(&path, dir.path(), &model, &what);
        // Several compressed clusters share each host cluster.
        let map = q.map(&path);
        let offsets: std::collections::BTreeSet<u64> = map
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["offset"].as_u64())
            .map(|o| o / cs)
            .collect();
        if rb > 2 {
            assert!(
                (offsets.len() as u64) < size / cs / 2,
                "{what}: {} host clusters for {} compressed clusters",
                offsets.len(),
                size / cs
            );
        }

        // Reopen (a new packing run), overwrite, discard, zero, and
        // compress again over the old ones.
        let mut w = Qcow2Writer::open(FileDevice::open_rw(&path).unwrap()).unwrap();
        for ci in (0..size / cs).step_by(3) {
            let s = (ci * cs) as usize;
            model[s + 10..s + 500].fill(0x5c);
            w.write(ci * cs + 10, &[0x5c; 490]).unwrap();
        }
        for ci in (1..size / cs).step_by(5) {
            w.discard(ci * cs, cs).unwrap();
            let s = (ci * cs) as usize;
            model[s..s + cs as usize].fill(0);
        }
        w.write_zeroes(7 * cs, 2 * cs).unwrap();
        model[(7 * cs) as usize..(9 * cs) as usize].fill(0);
        for ci in (2..size / cs).step_by(4) {
            let s = (ci * cs) as usize;
            let fresh = text(cs as usize, ci + 99);
            model[s..s + cs as usize].copy_from_slice(&fresh);
            w.write_compressed(ci, &fresh).unwrap();
        }
        drop(w.close().unwrap());
        q.assert_clean(&path, &what);
        q.assert_content(&path, dir.path(), &model, &what);
    }
}

/// The L2 entry and subcluster bitmap of guest cluster `ci` (first L2
/// table only).
fn ext_entry(path: &Path, ci: usize) -> (u64, u64) {
    let f = std::fs::read(path).unwrap();
    let be = |o: usize| u64::from_be_bytes(f[o..o + 8].try_into().unwrap());
    let l1 = be(40) as usize;
    let l2 = (be(l1) & 0x00ff_ffff_ffff_fe00) as usize;
    (be(l2 + 16 * ci), be(l2 + 16 * ci + 8))
}

#[test]
fn extended_l2_zero_writes_zero_partial_subclusters_and_flag_whole_ones() {
    let Some(q) = Qemu::find() else { return };
    let dir = tmpfs_tempdir();
    let path = dir.path().join("x.qcow2");
    let cs = 65536u64; // subclusters of 2 KiB
    let o = CreateOptions {
        size: 1 << 20,
        cluster_size: cs,
        extended_l2: true,
        ..CreateOptions::default()
    };
    let mut w = create(FileDevice::create(&path).unwrap(), &o).unwrap();
    let mut model = vec![0u8; 1 << 20];
    w.write(0, &vec![0xaa; 2 * cs as usize]).unwrap();
    model[..2 * cs as usize].fill(0xaa);
    // Cluster 0: subcluster 1 whole, parts of subclusters 0 and 2.
    w.write_zeroes(100, 5000).unwrap();
    model[100..5100].fill(0);
    // Cluster 1: a zero write inside one subcluster only.
    w.write_zeroes(cs + 2048 + 10, 1000).unwrap();
    model[(cs + 2058) as usize..(cs + 3058) as usize].fill(0);
    // Cluster 3 (unallocated): subclusters 1..=4 whole, parts of 0 and 5.
    w.write_zeroes(3 * cs + 1000, 10_000).unwrap();
    // Cluster 5 (unallocated): whole subclusters 2 and 3 only.
    w.write_zeroes(5 * cs + 4096, 4096).unwrap();
    drop(w.close().unwrap());
    q.assert_clean(&path, "extended L2 zero writes");
    q.assert_content(&path, dir.path(), &model, "extended L2 zero writes");

    let all = 0xffff_ffffu64;
    let (e0, b0) = ext_entry(&path, 0);
    assert_ne!(e0 & 0x00ff_ffff_ffff_fe00, 0, "cluster 0 keeps its host");
    assert_eq!(b0, (1 << 33) | (all & !(1 << 1)), "cluster 0 {b0:#x}");
    let (_, b1) = ext_entry(&path, 1);
    assert_eq!(
        b1, all,
        "cluster 1: no whole subcluster, no zero bit {b1:#x}"
    );
    let (e3, b3) = ext_entry(&path, 3);
    assert_ne!(e3 & 0x00ff_ffff_ffff_fe00, 0, "cluster 3 got a host");
    assert_eq!(b3, (0b11110 << 32) | (all & !0b11110), "cluster 3 {b3:#x}");
    let (e5, b5) = ext_entry(&path, 5);
    assert_eq!(e5, 0, "cluster 5 stays without a host");
    assert_eq!(b5, 0b1100 << 32, "cluster 5 {b5:#x}");
}

#[test]
fn dirty_lazy_refcount_image_is_repaired_on_open_as_qemu_does() {
    let Some(q) = Qemu::find() else { return };
    let dir = tmpfs_tempdir();
    let path = dir.path().join("dirty.qcow2");
    q.create(&path, "qcow2", "lazy_refcounts=on", "1M");
    // qemu-io aborts with the write done and the dirty bit still set.
    let _ = Command::new(&q.io)
        .args(["-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "abort"])
        .arg(&path)
        .output()
        .unwrap();
    let before = std::fs::read(&path).unwrap();
    let incompat = u64::from_be_bytes(before[72..80].try_into().unwrap());
    assert_ne!(incompat & 1, 0, "qemu-io left no dirty bit");
    // The stale refcounts are a finding before the open.
    let (code, _) = q.check(&path);
    assert_ne!(code, 0, "qemu-img check should see the stale refcounts");

    // Opening for writing rebuilds the refcounts and clears the bit; the
    // write then lands and the image checks clean with the old data kept.
    let src = write_tmp(dir.path(), "src.raw", &[7u8; 4096]);
    let out = qimg()
        .args(["convert", "-n", "-O", "qcow2"])
        .arg(&src)
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = std::fs::read(&path).unwrap();
    let incompat = u64::from_be_bytes(after[72..80].try_into().unwrap());
    assert_eq!(incompat & 1, 0, "the dirty bit stayed set");
    q.assert_clean(&path, "after the repairing open");
    let raw = dir.path().join("back.raw");
    q.to_raw(&path, &raw, &[]);
    let back = std::fs::read(&raw).unwrap();
    assert!(
        back[..4096].iter().all(|&b| b == 7),
        "the new write is missing"
    );
    assert!(
        back[4096..65536].iter().all(|&b| b == 1),
        "qemu-io's write was lost"
    );
    assert!(back[65536..].iter().all(|&b| b == 0));
}

#[test]
fn a_freed_packing_cluster_is_never_packed_into_again() {
    let Some(q) = Qemu::find() else { return };
    let dir = tmpfs_tempdir();
    let path = dir.path().join("f.qcow2");
    let cs = 4096u64;
    let o = CreateOptions {
        size: 16 * cs,
        cluster_size: cs,
        ..CreateOptions::default()
    };
    let mut w = create(FileDevice::create(&path).unwrap(), &o).unwrap();
    let mut model = vec![0u8; 16 * cs as usize];
    // One small compressed cluster: its host cluster is the packing tail.
    let a = vec![0x41u8; cs as usize];
    w.write_compressed(0, &a).unwrap();
    // Overwriting it frees that host cluster; a plain write takes it.
    let b: Vec<u8> = (0..cs as usize).map(|i| (i * 7 % 251) as u8).collect();
    w.write(0, &b).unwrap();
    model[..cs as usize].copy_from_slice(&b);
    let c = vec![0x43u8; cs as usize];
    w.write(cs, &c).unwrap();
    model[cs as usize..2 * cs as usize].copy_from_slice(&c);
    // The next compressed cluster must not land in the plain data.
    for ci in 2..6u64 {
        let d = vec![ci as u8; cs as usize];
        w.write_compressed(ci, &d).unwrap();
        model[(ci * cs) as usize..((ci + 1) * cs) as usize].copy_from_slice(&d);
    }
    drop(w.close().unwrap());
    q.assert_clean(&path, "freed tail");
    q.assert_content(&path, dir.path(), &model, "freed tail");
}

#[test]
fn convert_onto_a_backing_file_keeps_the_source_zeroes() {
    let Some(q) = Qemu::find() else { return };
    let dir = tmpfs_tempdir();
    let d = dir.path();
    let base = write_tmp(d, "base.raw", &vec![0xbb; 1 << 20]);
    let mut data = vec![0u8; 1 << 20];
    data[..5000].fill(0x11);
    data[300_000..400_000].fill(0x22);
    let src = write_tmp(d, "src.raw", &data);
    let base_s = base.to_str().unwrap();
    for (i, extra) in [vec![], vec!["-c"], vec!["-o", "compat=0.10"]]
        .into_iter()
        .enumerate()
    {
        // A new image with -B, then an existing overlay with -n.
        let out = d.join(format!("b{i}.qcow2"));
        run_ok(
            qimg()
                .args([
                    "convert",
                    "-O",
                    "qcow2",
                    "-B",
                    base_s,
                    "-o",
                    "backing_fmt=raw",
                ])
                .args(&extra)
                .arg(&src)
                .arg(&out),
        );
        let ovl = d.join(format!("n{i}.qcow2"));
        q.img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base_s,
            "-F",
            "raw",
            ovl.to_str().unwrap(),
        ]);
        let n_extra: Vec<&str> = extra.iter().filter(|a| **a == "-c").copied().collect();
        run_ok(
            qimg()
                .args(["convert", "-n", "-O", "qcow2"])
                .args(&n_extra)
                .arg(&src)
                .arg(&ovl),
        );
        for img in [&out, &ovl] {
            let what = format!("{extra:?} {}", img.display());
            q.assert_clean(img, &what);
            q.assert_content(img, d, &data, &what);
        }
    }
}
