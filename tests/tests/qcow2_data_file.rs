//! qcow2 images with an external data file (`data_file`, `data_file_raw`)
//! written by qcow-core and by `qimg`, judged by qemu-img: `qemu-img
//! check` clean (no errors, no leaks), content identical, and a raw data
//! file that reads as the disk itself. Images qemu-img made and wrote stay
//! valid after qimg writes more into them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::cast_possible_truncation)] // test sizes are small and fit every width

use std::path::Path;

use qcow_core::create::{create, CreateOptions};
use qcow_core::io::FileDevice;
use qcow_core::Qcow2Writer;
use qimg_tests::qemu::{pattern, write_tmp, Qemu};
use qimg_tests::{qimg, run_ok, tmpfs_tempdir, XorShift};

/// Random writes, overwrites, zero writes and discards applied to the image
/// and to `model` alike.
fn workload(w: &mut Qcow2Writer<FileDevice>, model: &mut [u8], seed: u64, ops: usize) {
    let size = model.len() as u64;
    let cs = w.header().cluster_size();
    let mut rng = XorShift(seed | 1);
    for _ in 0..ops {
        let kind = rng.below(100);
        let off = if rng.below(3) == 0 {
            rng.below(size / 512) * 512
        } else {
            rng.below(size)
        };
        let len = (1 + rng.below(3 * cs)).min(size - off);
        let (o, l) = (off as usize, len as usize);
        if kind < 65 {
            let b = (rng.next() & 0xff) as u8;
            let data: Vec<u8> = (0..l)
                .map(|i| b.wrapping_add((i / 97) as u8) ^ (i as u8))
                .collect();
            w.write(off, &data).unwrap();
            model[o..o + l].copy_from_slice(&data);
        } else if kind < 82 {
            w.write_zeroes(off, len).unwrap();
            model[o..o + l].fill(0);
        } else {
            w.discard(off, len).unwrap();
            let first = off.div_ceil(cs) * cs;
            let end = (off + len) / cs * cs;
            if first < end {
                model[first as usize..end as usize].fill(0);
            }
        }
    }
}

/// A raw data file reads as the disk does (bytes past its end read zero).
fn assert_raw_data_file(data: &Path, model: &[u8], what: &str) {
    let mut got = std::fs::read(data).unwrap();
    assert!(got.len() >= model.len(), "{what}: data file too short");
    got.truncate(model.len());
    if let Some(i) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!("{what}: raw data file differs first at byte {i}");
    }
}

/// Bytes of the qcow2 file the data-file workload never grows into: the
/// data lives elsewhere, so the image holds metadata only.
fn qcow2_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

#[test]
fn data_file_images_written_by_qcow_core_pass_qemu_img_check() {
    let Some(q) = Qemu::find() else { return };
    let dir = tmpfs_tempdir();
    let size = 3u64 << 20;
    for (cs, raw, ext) in [
        (4096u64, false, false),
        (65536, true, false),
        (65536, false, true),
        (32768, true, true),
    ] {
        let what = format!("cluster {cs} raw {raw} extended_l2 {ext}");
        let path = dir.path().join("t.qcow2");
        let data = dir.path().join("t.data");
        let data_name = data.to_str().unwrap();
        let o = CreateOptions {
            size,
            cluster_size: cs,
            extended_l2: ext,
            data_file: Some(data_name),
            data_file_raw: raw,
            ..CreateOptions::default()
        };
        std::fs::File::create(&data).unwrap().set_len(size).unwrap();
        let w = create(FileDevice::create(&path).unwrap(), &o).unwrap();
        let mut w = w
            .with_data_file(FileDevice::open_rw(&data).unwrap())
            .unwrap();
        let mut model = vec![0u8; size as usize];
        workload(&mut w, &mut model, cs ^ 0x5eed, 120);
        drop(w.close().unwrap());
        q.assert_clean(&path, &what);
        q.assert_content(&path, dir.path(), &model, &what);
        if raw {
            assert_raw_data_file(&data, &model, &what);
        }
        // Guest data went to the data file: the image is metadata only.
        assert!(qcow2_len(&path) < 64 * cs, "{what}: {}", qcow2_len(&path));

        // Reopen, write more and grow.
        let mut w = Qcow2Writer::open(FileDevice::open_rw(&path).unwrap())
            .unwrap()
            .with_data_file(FileDevice::open_rw(&data).unwrap())
            .unwrap();
        w.resize(size + (1 << 20)).unwrap();
        model.resize(model.len() + (1 << 20), 0);
        workload(&mut w, &mut model, cs ^ 0xabc, 40);
        drop(w.close().unwrap());
        q.assert_clean(&path, &what);
        q.assert_content(&path, dir.path(), &model, &what);
        if raw {
            assert_raw_data_file(&data, &model, &what);
        }
    }
}

#[test]
fn writer_without_its_data_file_refuses_guest_writes() {
    let dir = tmpfs_tempdir();
    let path = dir.path().join("t.qcow2");
    let o = CreateOptions {
        size: 1 << 20,
        data_file: Some("t.data"),
        ..CreateOptions::default()
    };
    let mut w = create(FileDevice::create(&path).unwrap(), &o).unwrap();
    let err = w.write(0, &[1; 512]).unwrap_err();
    assert!(err.to_string().contains("data file"), "{err}");
    // A plain image takes no data file.
    let p2 = dir.path().join("p.qcow2");
    let w = create(
        FileDevice::create(&p2).unwrap(),
        &CreateOptions {
            size: 1 << 20,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    assert!(w
        .with_data_file(FileDevice::open_rw(&path).unwrap())
        .is_err());
}

#[test]
fn qemu_made_data_file_images_stay_valid_after_qimg_writes() {
    let Some(q) = Qemu::find() else { return };
    let dir = tmpfs_tempdir();
    for (opts, raw) in [
        ("cluster_size=4096", false),
        ("data_file_raw=on", true),
        ("extended_l2=on,cluster_size=32k", false),
    ] {
        let path = dir.path().join("q.qcow2");
        let data = dir.path().join("q.data");
        let opts = format!("{opts},data_file={}", data.display());
        q.create(&path, "qcow2", &opts, "2M");
        q.io(
            &path,
            "qcow2",
            &[
                "write -P 0x11 0 300k",
                "write -P 0x22 1M 64k",
                "write -z 1100k 8k",
            ],
        );
        let mut model = vec![0u8; 2 << 20];
        model[..300 << 10].fill(0x11);
        model[1 << 20..(1 << 20) + (64 << 10)].fill(0x22);
        model[1100 << 10..1108 << 10].fill(0);
        let mut w = Qcow2Writer::open(FileDevice::open_rw(&path).unwrap())
            .unwrap()
            .with_data_file(FileDevice::open_rw(&data).unwrap())
            .unwrap();
        workload(&mut w, &mut model, 0x77, 60);
        drop(w.close().unwrap());
        q.assert_clean(&path, &opts);
        q.assert_content(&path, dir.path(), &model, &opts);
        if raw {
            assert_raw_data_file(&data, &model, &opts);
        }
    }
}

#[test]
fn qimg_create_convert_and_resize_with_a_data_file() {
    let Some(q) = Qemu::find() else { return };
    let dir = tmpfs_tempdir();
    let d = dir.path();
    let src_data = pattern(1536 << 10, 21, 3);
    write_tmp(d, "src.raw", &src_data);
    let mut model = src_data.clone();
    model.resize(2 << 20, 0);
    // Absolute data file names: qemu-img resolves relative ones against
    // its working directory.
    let run = |args: &[&str]| run_ok(qimg().current_dir(d).args(args));
    let a_opt = format!("data_file={}", d.join("a.data").display());
    let b_opt = format!(
        "data_file={},data_file_raw=on,cluster_size=4k",
        d.join("b.data").display()
    );

    // create, then convert -n into it.
    run(&["create", "-q", "-f", "qcow2", "-o", &a_opt, "a.qcow2", "2M"]);
    run(&["convert", "-n", "-O", "qcow2", "src.raw", "a.qcow2"]);
    q.assert_clean(&d.join("a.qcow2"), "create + convert -n");
    q.assert_content(&d.join("a.qcow2"), d, &model, "create + convert -n");

    // convert into a new image with a raw data file.
    run(&["convert", "-O", "qcow2", "-o", &b_opt, "src.raw", "b.qcow2"]);
    let b = d.join("b.qcow2");
    let src_model = &model[..src_data.len()];
    q.assert_clean(&b, "convert -o data_file_raw");
    q.assert_content(&b, d, src_model, "convert -o data_file_raw");
    assert_raw_data_file(&d.join("b.data"), src_model, "convert -o data_file_raw");
    assert!(qcow2_len(&b) < 64 << 10, "{}", qcow2_len(&b));

    // resize grows the data file; the raw one stays mapped 1:1.
    run(&["resize", "-q", "b.qcow2", "+512k"]);
    run(&["resize", "-q", "a.qcow2", "3M"]);
    q.assert_clean(&b, "resize raw");
    q.assert_clean(&d.join("a.qcow2"), "resize");
    assert_eq!(std::fs::metadata(d.join("b.data")).unwrap().len(), 2 << 20);
    assert_eq!(std::fs::metadata(d.join("a.data")).unwrap().len(), 3 << 20);
    q.assert_content(&b, d, &model, "resize raw");
    let map = q.map(&b);
    assert!(
        map.as_array().unwrap().iter().all(|m| m["data"] == true),
        "raw data file not mapped 1:1 after resize: {map}"
    );
    model.resize(3 << 20, 0);
    q.assert_content(&d.join("a.qcow2"), d, &model, "resize");
    // `map` names the data file, as qemu-img's does.
    for img in ["a.qcow2", "b.qcow2"] {
        let p = d.join(img);
        let ours = run_ok(qimg().arg("map").arg(&p));
        let theirs = q.img(&["map", p.to_str().unwrap()]);
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&theirs),
            "{img}: map"
        );
    }

    // Compressed clusters cannot live in a data file (qemu-img fails too).
    for args in [
        vec![
            "convert", "-c", "-O", "qcow2", "-o", &a_opt, "src.raw", "z.qcow2",
        ],
        vec!["convert", "-c", "-n", "-O", "qcow2", "src.raw", "a.qcow2"],
    ] {
        let out = qimg().current_dir(d).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let msg = String::from_utf8_lossy(&out.stderr);
        assert!(msg.contains("external data file"), "{args:?}: {msg}");
    }
    assert!(!d.join("z.qcow2").exists());

    // qemu-img's own image with a data file, then qimg convert -n into it.
    let c_opt = format!("data_file={}", d.join("c.data").display());
    q.create(&d.join("c.qcow2"), "qcow2", &c_opt, "2M");
    q.io(&d.join("c.qcow2"), "qcow2", &["write -P 0x5a 1792k 256k"]);
    run(&["convert", "-n", "-O", "qcow2", "src.raw", "c.qcow2"]);
    let mut cm = src_data.clone();
    cm.resize(2 << 20, 0);
    cm[1792 << 10..].fill(0x5a);
    q.assert_clean(&d.join("c.qcow2"), "qemu-img made, qimg convert -n");
    q.assert_content(&d.join("c.qcow2"), d, &cm, "qemu-img made, qimg convert -n");
}

#[test]
fn data_file_images_are_byte_identical_to_qemu_img_create() {
    let Some(q) = Qemu::find() else { return };
    let dir = tmpfs_tempdir();
    for (i, opts) in [
        "data_file=x.data,data_file_raw=on,cluster_size=4k",
        "data_file=x.data,data_file_raw=on",
        "data_file=x.data,cluster_size=8k,preallocation=metadata",
    ]
    .iter()
    .enumerate()
    {
        // Relative names resolve against the working directory in both.
        let ours = dir.path().join(format!("o{i}"));
        let theirs = dir.path().join(format!("q{i}"));
        std::fs::create_dir(&ours).unwrap();
        std::fs::create_dir(&theirs).unwrap();
        run_ok(
            qimg()
                .current_dir(&ours)
                .args(["create", "-q", "-f", "qcow2", "-o", opts, "x.qcow2", "1M"]),
        );
        run_ok(
            std::process::Command::new(&q.img)
                .current_dir(&theirs)
                .args(["create", "-q", "-f", "qcow2", "-o", opts, "x.qcow2", "1M"]),
        );
        let a = std::fs::read(theirs.join("x.qcow2")).unwrap();
        let b = std::fs::read(ours.join("x.qcow2")).unwrap();
        assert!(a == b, "{opts}: qcow2 files differ");
        for f in ["x.qcow2", "x.data"] {
            let la = std::fs::metadata(theirs.join(f)).unwrap().len();
            let lb = std::fs::metadata(ours.join(f)).unwrap().len();
            assert_eq!(la, lb, "{opts}: {f} length");
        }
    }
}
