//! `qimg check -r all` against qemu-img's own repair: each damaged image is
//! built at run time, a copy is repaired by qemu-img, the original by qimg;
//! afterwards qemu-img check must be clean on qimg's result and the guest
//! data (active layer and snapshots) must be what qemu-img's repair gives.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Stdio};

use qimg_tests::poke::{get64, l1_pos, put64};
use qimg_tests::qemu::Qemu;
use qimg_tests::{qimg, run_ok, tool};

const COPIED: u64 = 1 << 63;
const OFFSET: u64 = 0x00ff_ffff_ffff_fe00;

/// Repairs `img` with qimg and a copy with qemu-img, then checks both
/// verdicts and compares the guest data of the active layer and of each
/// snapshot in `snaps`.
fn repair_like_qemu(q: &Qemu, dir: &Path, img: &Path, snaps: &[&str], what: &str) {
    let theirs = dir.join("theirs.qcow2");
    std::fs::copy(img, &theirs).unwrap();
    // The damage is real: qemu-img's check sees it.
    let st = Command::new(&q.img)
        .arg("check")
        .arg(img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(2), "{what}: qemu-img check before repair");
    run_ok(
        Command::new(&q.img)
            .args(["check", "-r", "all"])
            .arg(&theirs),
    );
    run_ok(qimg().args(["check", "-r", "all"]).arg(img));
    run_ok(qimg().arg("check").arg(img));
    q.assert_clean(img, what);
    let layers: Vec<Option<&str>> = std::iter::once(None)
        .chain(snaps.iter().map(|s| Some(*s)))
        .collect();
    for layer in layers {
        let extra: Vec<String> = layer.map_or(Vec::new(), |s| vec!["-l".into(), s.into()]);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (a, b) = (dir.join("ours.raw"), dir.join("theirs.raw"));
        q.to_raw(img, &a, &extra);
        q.to_raw(&theirs, &b, &extra);
        assert!(
            std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
            "{what}: guest data of {layer:?} differs from qemu-img's repair"
        );
    }
}

/// The issue's scenario: qemu-nbd exports the image, qimg takes a snapshot
/// under it, a write goes through the export with qemu-nbd's stale view
/// (COPIED flags set on clusters the snapshot now shares). qimg now refuses
/// the snapshot while qemu-nbd holds its locks (tests/tests/cli_locking.rs),
/// so qemu-nbd runs with `file.locking=off` here to make the same damage.
#[test]
fn snapshot_under_qemu_nbd() {
    let (Some(q), Some(nbd)) = (Qemu::find(), tool("qemu-nbd")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    let sock = dir.path().join("s.sock");
    let pid = dir.path().join("pid");
    q.create(&img, "qcow2", "", "16M");
    q.io(&img, "qcow2", &["write -P 0x11 0 2M"]);
    run_ok(
        Command::new(&nbd)
            .args(["--fork", "--persistent", "--image-opts"])
            .arg(format!(
                "driver=qcow2,file.driver=file,file.filename={},file.locking=off",
                img.display()
            ))
            .arg("-k")
            .arg(&sock)
            .arg(format!("--pid-file={}", pid.display())),
    );
    let snap = qimg().args(["snapshot", "-c", "s"]).arg(&img).output();
    let url = format!("nbd+unix:///?socket={}", sock.display());
    let write = Command::new(&q.io)
        .args(["-f", "raw", &url, "-c", "write -P 0x55 0 1M"])
        .output();
    let id = std::fs::read_to_string(&pid).unwrap();
    run_ok(Command::new("kill").arg(id.trim()));
    // qemu-nbd removes its pid file on exit.
    for _ in 0..500 {
        if !pid.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(snap.unwrap().status.success(), "qimg snapshot -c");
    assert!(write.unwrap().status.success(), "qemu-io write over nbd");
    repair_like_qemu(&q, dir.path(), &img, &["s"], "snapshot under qemu-nbd");
}

/// COPIED flags poked wrong in both directions, in L1 and in L2: clear
/// where the refcount is 1, set where it is 2 (shared with a snapshot).
#[test]
fn poked_copied_flags() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.qcow2");
    q.create(&img, "qcow2", "", "1G");
    q.io(
        &img,
        "qcow2",
        &["write -P 0x11 0 256k", "write -P 0x33 600M 128k"],
    );
    q.img(&["snapshot", "-c", "s", img.to_str().unwrap()]);
    // Copies L2 table 0 and cluster 0; L1[1]'s table stays shared.
    q.io(&img, "qcow2", &["write -P 0x22 0 64k"]);
    let mut d = std::fs::read(&img).unwrap();
    let (e0, e1) = (get64(&d, l1_pos(&d, 0)), get64(&d, l1_pos(&d, 1)));
    assert!(e0 & COPIED != 0 && e1 & COPIED == 0, "{e0:#x} {e1:#x}");
    let (p0, p1) = (l1_pos(&d, 0), l1_pos(&d, 1));
    put64(&mut d, p0, e0 & !COPIED);
    put64(&mut d, p1, e1 | COPIED);
    let l2 = e0 & OFFSET;
    let (a, b) = (get64(&d, l2), get64(&d, l2 + 8));
    assert!(a & COPIED != 0 && b & COPIED == 0, "{a:#x} {b:#x}");
    put64(&mut d, l2, a & !COPIED);
    put64(&mut d, l2 + 8, b | COPIED);
    std::fs::write(&img, &d).unwrap();
    repair_like_qemu(&q, dir.path(), &img, &["s"], "poked COPIED flags");
    // With nothing but flags to fix, the repair is byte for byte qemu-img's.
    assert!(
        std::fs::read(&img).unwrap() == std::fs::read(dir.path().join("theirs.qcow2")).unwrap(),
        "poked COPIED flags: image differs from qemu-img's repair"
    );
}

/// An L2 entry naming its own L2 table (issue #22): after `-r all`
/// qemu-img check is clean, and the refcount is raised in place as
/// qemu-img does, so the file does not grow (no refcount rebuild).
#[test]
fn l2_entry_pointing_at_its_own_table() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    q.create(&img, "qcow2", "", "16M");
    q.io(&img, "qcow2", &["write -P 0x11 0 128k"]);
    let mut d = std::fs::read(&img).unwrap();
    let l2 = get64(&d, l1_pos(&d, 0)) & OFFSET;
    put64(&mut d, l2 + 16, COPIED | l2);
    std::fs::write(&img, &d).unwrap();
    let len = d.len();
    repair_like_qemu(&q, dir.path(), &img, &[], "L2 entry at its own table");
    let after = std::fs::read(&img).unwrap();
    assert_eq!(after.len(), len, "the repair grew the file");
    assert!(
        after == std::fs::read(dir.path().join("theirs.qcow2")).unwrap(),
        "image differs from qemu-img's repair"
    );
}

/// `check` exits 1, as qemu-img does, when the backing or data file the
/// image names cannot be opened: missing, a directory, a backing format
/// qimg cannot read on a raw file. A good backing file still checks 0.
#[test]
fn check_fails_when_linked_files_cannot_be_opened() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    q.create(&d.join("base.raw"), "raw", "", "16M");
    std::fs::create_dir(d.join("adir")).unwrap();
    let img = d.join("o.qcow2");
    let code = |tool: &mut Command| tool.arg(&img).output().unwrap().status.code();
    for (backing, fmt, want) in [
        ("missing.raw", "raw", 1),
        ("adir", "raw", 1),
        ("base.raw", "vmdk", 1),
        ("base.raw", "luks", 1),
        ("base.raw", "raw", 0),
    ] {
        let _ = std::fs::remove_file(&img);
        q.img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            backing,
            "-F",
            fmt,
            img.to_str().unwrap(),
            "16M",
        ]);
        let theirs = code(Command::new(&q.img).arg("check"));
        let ours = code(qimg().arg("check"));
        assert_eq!(theirs, Some(want), "qemu-img, backing {backing} ({fmt})");
        assert_eq!(ours, Some(want), "qimg, backing {backing} ({fmt})");
    }
    let _ = std::fs::remove_file(&img);
    let data = d.join("data.raw");
    q.create(
        &img,
        "qcow2",
        &format!("data_file={}", data.display()),
        "16M",
    );
    std::fs::remove_file(&data).unwrap();
    assert_eq!(code(qimg().arg("check")), Some(1), "missing data file");
    std::fs::create_dir(&data).unwrap();
    assert_eq!(
        code(qimg().arg("check")),
        Some(1),
        "data file is a directory"
    );
    assert_eq!(code(Command::new(&q.img).arg("check")), Some(1));
}

/// Extended L2 with a compressed cluster whose subcluster bitmap is not
/// zero (issue #22): check reports the corruption and exits 2, with
/// qemu-img's wording, as qemu-img does.
#[test]
fn compressed_cluster_with_subcluster_bitmap_is_corrupt() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.qcow2");
    q.create(&img, "qcow2", "extended_l2=on", "1M");
    q.io(&img, "qcow2", &["write -c -P 0x11 0 64k"]);
    let mut d = std::fs::read(&img).unwrap();
    let l2 = get64(&d, l1_pos(&d, 0)) & OFFSET;
    assert!(get64(&d, l2) & (1 << 62) != 0, "not compressed");
    put64(&mut d, l2 + 8, 1);
    std::fs::write(&img, &d).unwrap();
    let theirs = Command::new(&q.img)
        .arg("check")
        .arg(&img)
        .output()
        .unwrap();
    let ours = qimg().arg("check").arg(&img).output().unwrap();
    assert_eq!(theirs.status.code(), Some(2));
    assert_eq!(ours.status.code(), Some(2));
    let line = "ERROR compressed cluster 0 with non-zero subcluster allocation bitmap";
    assert!(String::from_utf8_lossy(&theirs.stderr).contains(line));
    assert!(String::from_utf8_lossy(&ours.stderr).contains(line));
}

/// A version 3 snapshot entry with no extra data (the v2-era layout):
/// qemu-img calls it incomplete and its repair rewrites the table; so
/// does qimg's, and qemu-img check is clean afterwards with the snapshot's
/// and the active layer's data unchanged.
#[test]
fn snapshot_entry_without_extra_data() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("v.qcow2");
    q.create(&img, "qcow2", "", "16M");
    q.io(&img, "qcow2", &["write -P 0x11 0 64k"]);
    q.img(&["snapshot", "-c", "s", img.to_str().unwrap()]);
    q.io(&img, "qcow2", &["write -P 0x22 0 64k"]);
    let mut d = std::fs::read(&img).unwrap();
    let so = usize::try_from(get64(&d, 64)).unwrap();
    let ids = u16::from_be_bytes([d[so + 12], d[so + 13]]) as usize;
    let ns = u16::from_be_bytes([d[so + 14], d[so + 15]]) as usize;
    let ex = u32::from_be_bytes(d[so + 36..so + 40].try_into().unwrap()) as usize;
    assert!(ex >= 16);
    let text = d[so + 40 + ex..so + 40 + ex + ids + ns].to_vec();
    let old_len = (40 + ex + ids + ns).next_multiple_of(8);
    let mut entry = d[so..so + 40].to_vec();
    entry[36..40].copy_from_slice(&0u32.to_be_bytes());
    entry.extend_from_slice(&text);
    entry.resize(old_len, 0);
    d[so..so + old_len].copy_from_slice(&entry);
    std::fs::write(&img, &d).unwrap();
    repair_like_qemu(&q, dir.path(), &img, &["s"], "snapshot without extra data");
}
