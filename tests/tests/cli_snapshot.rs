//! `qimg snapshot` and writes into images with snapshots, judged by
//! qemu-img: snapshots created by either tool are listed (same table, same
//! JSON as `qemu-img info`), applied and deleted by the other; `qemu-img
//! check` finds no error and no leak after every operation; guest content
//! and each snapshot's content read back as written.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly

use std::path::Path;
use std::process::Command;

use qimg_tests::qemu::{encrypted_image_opts, pattern, write_tmp, Qemu};
use qimg_tests::{json_of, qimg, run_ok};

/// Guest content as qemu-img reads it, optionally as of a snapshot.
fn content(q: &Qemu, img: &Path, snapshot: Option<&str>, dir: &Path) -> Vec<u8> {
    let out = dir.join("content.raw");
    let _ = std::fs::remove_file(&out);
    let extra: Vec<String> = snapshot
        .map(|s| vec!["-l".to_string(), s.to_string()])
        .unwrap_or_default();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    q.to_raw(img, &out, &extra);
    std::fs::read(&out).unwrap()
}

fn qimg_snap(args: &[&str], img: &Path) {
    run_ok(qimg().arg("snapshot").args(args).arg(img));
}

fn qemu_snap(q: &Qemu, args: &[&str], img: &Path) {
    run_ok(Command::new(&q.img).arg("snapshot").args(args).arg(img));
}

/// Writes `data` over the whole image with qimg (`convert -n`).
fn qimg_write(img: &Path, data_file: &Path) {
    run_ok(
        qimg()
            .args(["convert", "-n", "-O", "qcow2"])
            .arg(data_file)
            .arg(img),
    );
}

/// Both tools list the same snapshots: the table line for line, and
/// `qimg snapshot -l --output json` equal to `qemu-img info`'s list.
fn lists_agree(q: &Qemu, img: &Path, what: &str) -> usize {
    let theirs = run_ok(Command::new(&q.img).args(["snapshot", "-l"]).arg(img));
    let ours = run_ok(qimg().args(["snapshot", "-l"]).arg(img));
    assert_eq!(
        String::from_utf8_lossy(&ours),
        String::from_utf8_lossy(&theirs),
        "{what}"
    );
    let ours = json_of(qimg().args(["snapshot", "-l", "--output", "json"]).arg(img));
    let info = q.info(img);
    let theirs = info
        .get("snapshots")
        .cloned()
        .unwrap_or(serde_json::json!([]));
    assert_eq!(ours, theirs, "{what}");
    ours.as_array().unwrap().len()
}

#[test]
fn snapshots_interoperate_with_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    let cases = [
        ("", "2M"),
        ("cluster_size=512", "256k"),
        ("compat=0.10", "2M"),
        ("extended_l2=on,cluster_size=16k", "1M"),
        ("refcount_bits=8,cluster_size=4k", "1M"),
    ];
    for (opts, size) in cases {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let img = d.join("s.qcow2");
        q.create(&img, "qcow2", opts, size);
        let len = usize::try_from(q.info(&img)["virtual-size"].as_u64().unwrap()).unwrap();
        // State A: qemu-io data, a compressed cluster, a zero range.
        q.io(
            &img,
            "qcow2",
            &[
                "write -P 0x11 0 24k",
                "write -c -P 0x22 64k 64k",
                "write -z 160k 16k",
            ],
        );
        let a = content(&q, &img, None, d);
        // qimg takes snapshot 1, then overwrites everything (B).
        qimg_snap(&["-c", "one"], &img);
        q.assert_check_clean(&[], img.to_str().unwrap(), &format!("{opts}: -c one"));
        assert_eq!(lists_agree(&q, &img, opts), 1);
        let b = pattern(len, 7, 3);
        let b_file = write_tmp(d, "b.raw", &b);
        qimg_write(&img, &b_file);
        q.assert_check_clean(&[], img.to_str().unwrap(), &format!("{opts}: write B"));
        assert!(content(&q, &img, None, d) == b, "{opts}: B");
        assert!(content(&q, &img, Some("one"), d) == a, "{opts}: one kept A");
        // qemu-img takes snapshot 2 of B; qimg writes C over part of it.
        qemu_snap(&q, &["-c", "two"], &img);
        assert_eq!(lists_agree(&q, &img, opts), 2);
        let mut c = b.clone();
        c[..len / 2].copy_from_slice(&pattern(len / 2, 9, 0));
        let c_file = write_tmp(d, "c.raw", &c);
        qimg_write(&img, &c_file);
        q.assert_check_clean(&[], img.to_str().unwrap(), &format!("{opts}: write C"));
        assert!(content(&q, &img, Some("two"), d) == b, "{opts}: two kept B");
        // qemu-img applies qimg's snapshot, qimg applies qemu-img's.
        qemu_snap(&q, &["-a", "one"], &img);
        assert!(
            content(&q, &img, None, d) == a,
            "{opts}: -a one by qemu-img"
        );
        qimg_snap(&["-a", "two"], &img);
        q.assert_check_clean(&[], img.to_str().unwrap(), &format!("{opts}: -a two"));
        assert!(content(&q, &img, None, d) == b, "{opts}: -a two by qimg");
        qimg_snap(&["-a", "1"], &img);
        q.assert_check_clean(&[], img.to_str().unwrap(), &format!("{opts}: -a 1"));
        assert!(content(&q, &img, None, d) == a, "{opts}: -a by id");
        // qemu-img deletes qimg's, qimg deletes qemu-img's.
        qemu_snap(&q, &["-d", "one"], &img);
        q.assert_check_clean(&[], img.to_str().unwrap(), &format!("{opts}: -d one"));
        qimg_snap(&["-d", "two"], &img);
        q.assert_check_clean(&[], img.to_str().unwrap(), &format!("{opts}: -d two"));
        assert_eq!(lists_agree(&q, &img, opts), 0);
        assert!(content(&q, &img, None, d) == a, "{opts}: A after deletes");
        // And the image is still writable alone.
        qimg_write(&img, &b_file);
        q.assert_check_clean(&[], img.to_str().unwrap(), &format!("{opts}: last write"));
        assert!(content(&q, &img, None, d) == b, "{opts}: B again");
    }
}

#[test]
fn snapshot_errors() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r1.qcow2");
    q.create(&img, "qcow2", "refcount_bits=1", "1M");
    q.io(&img, "qcow2", &["write -P 1 0 64k"]);
    // 1-bit refcounts cannot count a shared cluster: refused, untouched.
    let out = qimg()
        .args(["snapshot", "-c", "x"])
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Could not create snapshot 'x'"));
    q.assert_check_clean(&[], img.to_str().unwrap(), "refused");
    // 2-bit refcounts: a host cluster packed with three compressed
    // clusters is at the limit already; refused before anything changes.
    let img2 = dir.path().join("r2.qcow2");
    q.create(&img2, "qcow2", "refcount_bits=2,cluster_size=4k", "1M");
    q.io(&img2, "qcow2", &["write -c -P 0x22 64k 64k"]);
    let out = qimg()
        .args(["snapshot", "-c", "y"])
        .arg(&img2)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    q.assert_check_clean(&[], img2.to_str().unwrap(), "refcount limit");
    assert!(run_ok(qimg().args(["snapshot", "-l"]).arg(&img2)).is_empty());
    for verb in ["-a", "-d"] {
        let out = qimg()
            .args(["snapshot", verb, "nope"])
            .arg(&img)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{verb}");
    }
    // Listing an image without snapshots prints nothing, as qemu-img.
    let out = run_ok(qimg().args(["snapshot", "-l"]).arg(&img));
    assert!(out.is_empty());
}

#[test]
fn snapshots_of_encrypted_images() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let secret = "secret,id=s0,data=hunter2";
    let data = pattern(300 << 10, 5, 4);
    let src = write_tmp(d, "d.raw", &data);
    let img = d.join("e.qcow2");
    run_ok(
        qimg()
            .args(["convert", "-O", "qcow2", "--object", secret])
            .args([
                "-o",
                "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            ])
            .arg(&src)
            .arg(&img),
    );
    let opts = encrypted_image_opts("qcow2", &img);
    let check = |what: &str| {
        q.assert_check_clean(&["--object", secret, "--image-opts"], &opts, what);
    };
    let plain = |what: &str| {
        let out = d.join("plain.raw");
        q.decrypt_to_raw(secret, "qcow2", &img, "", &out);
        let back = std::fs::read(&out).unwrap();
        assert!(back[..data.len()] == data[..], "{what}");
    };
    // No key needed: snapshots never touch guest data.
    qimg_snap(&["-c", "s1"], &img);
    check("-c s1");
    run_ok(
        Command::new(&q.img)
            .args(["snapshot", "--object", secret, "--image-opts", "-c", "s2"])
            .arg(&opts),
    );
    check("qemu -c s2");
    qimg_snap(&["-a", "s2"], &img);
    check("-a s2");
    plain("-a s2");
    qimg_snap(&["-d", "s1"], &img);
    check("-d s1");
    qimg_snap(&["-d", "s2"], &img);
    check("-d s2");
    plain("after deletes");
    let out = run_ok(qimg().args(["snapshot", "-l"]).arg(&img));
    assert!(out.is_empty());
}

#[test]
fn apply_restores_the_snapshot_size() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("s.qcow2");
    // 512-byte clusters: an L2 table covers 32 KiB, so growing to 1 MiB
    // grows the L1 table too.
    q.create(&img, "qcow2", "cluster_size=512", "64k");
    q.io(&img, "qcow2", &["write -P 1 0 8k"]);
    let small = content(&q, &img, None, d);
    qemu_snap(&q, &["-c", "small"], &img);
    run_ok(
        Command::new(&q.img)
            .args(["resize", "-q"])
            .arg(&img)
            .arg("1M"),
    );
    q.io(&img, "qcow2", &["write -P 2 900k 8k"]);
    let big = content(&q, &img, None, d);
    qimg_snap(&["-c", "big"], &img);
    let size = |img: &Path| q.info(img)["virtual-size"].as_u64().unwrap();
    for (name, want, len) in [("small", &small, 64 << 10), ("big", &big, 1 << 20)] {
        qimg_snap(&["-a", name], &img);
        q.assert_check_clean(&[], img.to_str().unwrap(), name);
        assert_eq!(size(&img), len, "{name}");
        assert!(content(&q, &img, None, d) == *want, "{name}");
    }
    // From the small state, qemu-img reverts to qimg's big snapshot.
    qimg_snap(&["-a", "small"], &img);
    qemu_snap(&q, &["-a", "big"], &img);
    q.assert_check_clean(&[], img.to_str().unwrap(), "qemu -a big");
    assert!(content(&q, &img, None, d) == big);
}

#[test]
fn snapshot_layout_is_qemu_img_s() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ours, theirs) = (d.join("ours.qcow2"), d.join("theirs.qcow2"));
    q.create(&theirs, "qcow2", "", "1M");
    q.io(
        &theirs,
        "qcow2",
        &["write -P 1 0 64k", "write -P 2 512k 4k"],
    );
    std::fs::copy(&theirs, &ours).unwrap();
    qemu_snap(&q, &["-c", "sn"], &theirs);
    qimg_snap(&["-c", "sn"], &ours);
    let (mut a, mut b) = (
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap(),
    );
    // The creation time differs: blank the entry's date fields.
    let table = usize::try_from(u64::from_be_bytes(b[64..72].try_into().unwrap())).unwrap();
    assert_eq!(&a[64..72], &b[64..72], "snapshot table offset");
    for img in [&mut a, &mut b] {
        img[table + 16..table + 24].fill(0);
    }
    // qemu-img leaves the table's zero padding unwritten; qimg writes
    // whole sectors. Past the shorter file, only zeroes.
    let n = a.len().min(b.len());
    assert!(a[..n] == b[..n], "same bytes as qemu-img");
    assert!(a[n..].iter().chain(&b[n..]).all(|&x| x == 0));
}
