//! CLI behaviours checked on images built at run time (issue #22): sparse
//! converts that skip unallocated ranges, and non-regular files named as an
//! image, a backing file or a data file, and compare's exit codes on open,
//! block-status and read errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly
#![allow(clippy::cast_possible_truncation)] // test patterns

use std::path::Path;
use std::process::{Command, Stdio};

use qimg_tests::{json_of, qimg, run_fails, run_ok, tool};

/// Runs `cmd` expecting a failure, killing it if it is still running after
/// a generous grace period: a hang (a FIFO open blocking for a writer) is
/// the bug, so it is reported as a failure instead of stalling the suite.
fn fails_without_hanging(cmd: &mut Command) -> String {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut waited = 0;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(!status.success(), "{cmd:?} should fail\n{err}");
            return err;
        }
        if waited >= 600 {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("{cmd:?} blocked on a non-regular file");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        waited += 1;
    }
}

fn mkfifo(path: &Path) {
    run_ok(Command::new("mkfifo").arg(path));
}

#[test]
fn a_fifo_as_image_backing_or_data_file_is_refused() {
    let Some(qemu_img) = tool("qemu-img") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe");
    mkfifo(&fifo);
    for verb in [&["info"][..], &["check"], &["map"], &["compare", "--", "x"]] {
        let mut c = qimg();
        let args: Vec<_> = verb.iter().filter(|a| **a != "--" && **a != "x").collect();
        c.args(args).arg(&fifo);
        if verb.contains(&"x") {
            c.arg(&fifo);
        }
        let err = fails_without_hanging(&mut c);
        assert!(err.contains("FIFO"), "{verb:?}: {err}");
    }
    // A backing file that is a FIFO, named with and without its format.
    for fmt in ["raw", "qcow2"] {
        let top = dir.path().join(format!("top-{fmt}.qcow2"));
        run_ok(
            Command::new(&qemu_img)
                .args(["create", "-q", "-f", "qcow2", "-u", "-F", fmt, "-b"])
                .arg(&fifo)
                .arg(&top)
                .arg("1M"),
        );
        let out = dir.path().join("out.raw");
        let err = fails_without_hanging(qimg().args(["convert", "-O", "raw"]).arg(&top).arg(&out));
        assert!(err.contains("FIFO") && err.contains("pipe"), "{err}");
    }
    // An external data file that is a FIFO.
    let img = dir.path().join("ext.qcow2");
    let data = dir.path().join("ext.data");
    run_ok(
        Command::new(&qemu_img)
            .args(["create", "-q", "-f", "qcow2", "-o"])
            .arg(format!("data_file={}", data.display()))
            .arg(&img)
            .arg("1M"),
    );
    std::fs::remove_file(&data).unwrap();
    mkfifo(&data);
    let before = std::fs::read(&img).unwrap();
    let err = fails_without_hanging(qimg().args(["map"]).arg(&img));
    assert!(err.contains("FIFO") && err.contains("ext.data"), "{err}");
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

#[test]
fn sparse_qcow2_converts_by_allocated_data_and_a_too_large_raw_fails_at_once() {
    let (Some(qemu_img), Some(qemu_io)) = (tool("qemu-img"), tool("qemu-io")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sparse.qcow2");
    run_ok(
        Command::new(&qemu_img)
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("4T"),
    );
    run_ok(
        Command::new(&qemu_io)
            .args(["-c", "write -P 0x5a 0 64k", "-c", "write -P 0xa5 2T 64k"])
            .arg(&img),
    );
    for m in ["1", "2"] {
        let out = dir.path().join(format!("out-{m}.raw"));
        run_ok(
            qimg()
                .args(["convert", "-O", "raw", "-m", m])
                .arg(&img)
                .arg(&out),
        );
        assert_eq!(std::fs::metadata(&out).unwrap().len(), 4 << 40);
        run_ok(
            Command::new(&qemu_img)
                .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
                .arg(&out)
                .arg(&img),
        );
        // Only the written clusters occupy space.
        let used = qimg_tests_used_bytes(&out);
        assert!(used < 16 << 20, "-m {m}: {used} bytes allocated");
        std::fs::remove_file(&out).unwrap();
    }
    // 1 PiB does not fit a file on ext4/tmpfs: sized first, it fails at
    // once with the system's reason, as qemu-img does.
    let huge = dir.path().join("huge.qcow2");
    run_ok(
        Command::new(&qemu_img)
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&huge)
            .arg("1P"),
    );
    let out = dir.path().join("huge.raw");
    let theirs = Command::new(&qemu_img)
        .args(["convert", "-O", "raw"])
        .arg(&huge)
        .arg(&out)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&out);
    if !theirs.status.success() {
        let err = run_fails(qimg().args(["convert", "-O", "raw"]).arg(&huge).arg(&out));
        assert!(err.contains("too large"), "{err}");
    }
}

/// Bytes a file occupies on disk.
fn qimg_tests_used_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn a_snapshot_without_icount_lists_as_qemu_img_lists_it() {
    let Some(qemu_img) = tool("qemu-img") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("snap.qcow2");
    run_ok(
        Command::new(&qemu_img)
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("1M"),
    );
    run_ok(
        Command::new(&qemu_img)
            .args(["snapshot", "-c", "s1"])
            .arg(&img),
    );
    // Set the first entry's icount (extra data bytes 16..24) to all ones,
    // qemu's "not recorded".
    let mut bytes = std::fs::read(&img).unwrap();
    let table = usize::try_from(u64::from_be_bytes(bytes[64..72].try_into().unwrap())).unwrap();
    let extra = u32::from_be_bytes(bytes[table + 36..table + 40].try_into().unwrap());
    assert!(extra >= 24, "qemu-img wrote {extra} bytes of extra data");
    bytes[table + 40 + 16..table + 40 + 24].fill(0xff);
    std::fs::write(&img, &bytes).unwrap();
    let ours = run_ok(qimg().args(["snapshot", "-l"]).arg(&img));
    let theirs = run_ok(Command::new(&qemu_img).args(["snapshot", "-l"]).arg(&img));
    assert_eq!(
        String::from_utf8_lossy(&ours),
        String::from_utf8_lossy(&theirs)
    );
    assert!(String::from_utf8_lossy(&ours).contains("--"));
    let ours: serde_json::Value =
        serde_json::from_slice(&run_ok(qimg().args(["info", "--output", "json"]).arg(&img)))
            .unwrap();
    let theirs: serde_json::Value = serde_json::from_slice(&run_ok(
        Command::new(&qemu_img)
            .args(["info", "--output=json"])
            .arg(&img),
    ))
    .unwrap();
    assert_eq!(ours["snapshots"], theirs["snapshots"]);
    assert!(ours["snapshots"][0].get("icount").is_none());
}

#[test]
fn an_odd_sized_raw_file_is_whole_sectors_as_in_qemu_img() {
    let Some(qemu_img) = tool("qemu-img") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("odd.raw");
    let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&odd, &data).unwrap();
    let ours = json_of(
        qimg()
            .args(["info", "--output", "json", "-f", "raw"])
            .arg(&odd),
    );
    let theirs = json_of(
        Command::new(&qemu_img)
            .args(["info", "--output=json", "-f", "raw"])
            .arg(&odd),
    );
    assert_eq!(ours["virtual-size"], theirs["virtual-size"]);
    assert_eq!(ours["virtual-size"], 1024);
    let ours = json_of(
        qimg()
            .args(["map", "--output", "json", "-f", "raw"])
            .arg(&odd),
    );
    let theirs = json_of(
        Command::new(&qemu_img)
            .args(["map", "--output=json", "-f", "raw"])
            .arg(&odd),
    );
    assert_eq!(ours, theirs);
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    run_ok(
        qimg()
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&odd)
            .arg(&a),
    );
    run_ok(
        Command::new(&qemu_img)
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&odd)
            .arg(&b),
    );
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    // The padded copy compares identical to the odd original.
    run_ok(
        qimg()
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&odd)
            .arg(&b),
    );
}

#[test]
fn snapshot_list_of_a_raw_image_prints_nothing_and_succeeds_like_qemu_img() {
    let Some(qemu_img) = tool("qemu-img") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("plain.raw");
    std::fs::write(&raw, vec![7u8; 4096]).unwrap();
    let theirs = run_ok(
        Command::new(&qemu_img)
            .args(["snapshot", "-l", "-f", "raw"])
            .arg(&raw),
    );
    let ours = run_ok(qimg().args(["snapshot", "-l", "-f", "raw"]).arg(&raw));
    assert_eq!(ours, theirs);
    let ours = run_ok(qimg().args(["snapshot", "-l"]).arg(&raw));
    assert!(ours.is_empty());
    // Creating one still fails, as in qemu-img.
    run_fails(qimg().args(["snapshot", "-c", "x", "-f", "raw"]).arg(&raw));
    run_fails(
        Command::new(&qemu_img)
            .args(["snapshot", "-c", "x", "-f", "raw"])
            .arg(&raw),
    );
}

/// Reads the big-endian u64 at `off` of `bytes`.
fn be64(bytes: &[u8], off: u64) -> u64 {
    let o = off as usize;
    u64::from_be_bytes(bytes[o..o + 8].try_into().unwrap())
}

/// Exit code of `cmd`, which must not have been killed by a signal.
fn exit_code(cmd: &mut Command) -> i32 {
    let out = cmd.output().unwrap();
    out.status
        .code()
        .unwrap_or_else(|| panic!("{cmd:?} killed"))
}

#[test]
fn compare_exits_as_qemu_img_on_open_status_and_read_errors() {
    let Some(qemu_img) = tool("qemu-img") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("r.raw");
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&raw, &data).unwrap();
    let compressed = |name: &str| {
        let img = dir.path().join(name);
        run_ok(
            Command::new(&qemu_img)
                .args(["convert", "-q", "-c", "-O", "qcow2"])
                .arg(&raw)
                .arg(&img),
        );
        let bytes = std::fs::read(&img).unwrap();
        (img, bytes)
    };
    // Read error: the compressed cluster's deflate stream is garbage (0xff
    // starts a block of the reserved type), so decompressing it fails.
    let (bad_data, mut bytes) = compressed("bad-data.qcow2");
    let cluster_bits = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    let l1 = be64(&bytes, 40);
    let l2 = be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00;
    let entry = be64(&bytes, l2);
    assert_eq!(entry >> 62 & 1, 1, "cluster 0 should be compressed");
    let host = (entry & ((1u64 << (62 - (cluster_bits - 8))) - 1)) as usize;
    bytes[host..host + 64].fill(0xff);
    std::fs::write(&bad_data, &bytes).unwrap();
    // Block status error: the L1 entry points at an unaligned L2 table.
    let (bad_l2, mut bytes) = compressed("bad-l2.qcow2");
    let e = be64(&bytes, l1) + 0x200;
    bytes[l1 as usize..l1 as usize + 8].copy_from_slice(&e.to_be_bytes());
    std::fs::write(&bad_l2, &bytes).unwrap();
    let missing = dir.path().join("missing.qcow2");
    let (good, _) = compressed("good.qcow2");
    for (img, want) in [(&good, 0), (&missing, 2), (&bad_l2, 3), (&bad_data, 4)] {
        let before = std::fs::read(img).ok();
        for pair in [[img, &raw], [&raw, img]] {
            let q = exit_code(Command::new(&qemu_img).arg("compare").args(pair));
            let ours = exit_code(qimg().arg("compare").args(pair));
            assert_eq!(q, want, "qemu-img compare {pair:?}");
            assert_eq!(ours, q, "qimg compare {pair:?} should exit as qemu-img");
        }
        assert_eq!(std::fs::read(img).ok(), before, "{img:?} changed");
    }
    // A differing image still exits 1 on both.
    let mut other = data.clone();
    other[4096] ^= 1;
    let raw2 = dir.path().join("r2.raw");
    std::fs::write(&raw2, &other).unwrap();
    let q = exit_code(Command::new(&qemu_img).arg("compare").arg(&good).arg(&raw2));
    assert_eq!(q, 1);
    assert_eq!(exit_code(qimg().arg("compare").arg(&good).arg(&raw2)), 1);
}
