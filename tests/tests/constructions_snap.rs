//! Snapshot-table and header constructions from issue #22, built at run
//! time and compared with qemu-img 10.0.2: snapshot names and ids longer
//! than the 255 / 127 bytes qemu-img shows (names of 1,024, 1,025, 1,100
//! and 65,535 bytes; ids of 127, 128, 129 and 200 bytes) in an otherwise
//! consistent table, `snapshot -l` on raw LUKS1 and LUKS2 volumes, and an
//! L1 table at offset 0.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly
#![allow(clippy::cast_possible_truncation)] // test patterns

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qimg_tests::qemu::Qemu;
use qimg_tests::{assert_json_agrees, json_of, qimg, run_ok, tool};

/// Runs `cmd`, returning (exit code, stdout, stderr).
fn outcome(cmd: &mut Command) -> (Option<i32>, Vec<u8>, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().unwrap();
    (
        status.code(),
        stdout,
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

fn be32(b: &[u8], at: usize) -> usize {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize
}

/// Rewrites the first snapshot table entry of `img` with `id` and `name`,
/// in place (the table's clusters must hold it; the rest of the old entry
/// is zeroed), so the image stays consistent for `qemu-img check`.
fn rewrite_first_entry(img: &Path, id: &[u8], name: &[u8]) {
    let mut f = fs::read(img).unwrap();
    let cluster_bits = be32(&f, 20);
    let nb = be32(&f, 60);
    assert_eq!(nb, 1, "one snapshot expected");
    let so = u64::from_be_bytes(f[64..72].try_into().unwrap()) as usize;
    let (old_id, old_name, extra) = (be16(&f, so + 12), be16(&f, so + 14), be32(&f, so + 36));
    let old_len = (40 + extra + old_id + old_name).next_multiple_of(8);
    let mut e = f[so..so + 40 + extra].to_vec();
    e[12..14].copy_from_slice(&(id.len() as u16).to_be_bytes());
    e[14..16].copy_from_slice(&(name.len() as u16).to_be_bytes());
    e.extend_from_slice(id);
    e.extend_from_slice(name);
    e.resize(e.len().next_multiple_of(8).max(old_len), 0);
    let cluster = 1usize << cluster_bits;
    assert!(
        so % cluster + e.len() <= cluster,
        "entry of {} bytes does not fit the table's cluster",
        e.len()
    );
    f[so..so + e.len()].copy_from_slice(&e);
    fs::write(img, f).unwrap();
}

/// A 1 MiB image holding 0x11 in its first 64 KiB when snapshot 1 was
/// taken and 0x22 now, with the snapshot's id and name replaced.
fn build(q: &Qemu, dir: &Path, tag: &str, cluster: &str, id: &[u8], name: &[u8]) -> PathBuf {
    let img = dir.join(format!("{tag}.qcow2"));
    q.create(&img, "qcow2", &format!("cluster_size={cluster}"), "1M");
    q.io(&img, "qcow2", &["write -P 0x11 0 64k"]);
    q.img(&["snapshot", "-c", "s", img.to_str().unwrap()]);
    q.io(&img, "qcow2", &["write -P 0x22 0 64k"]);
    rewrite_first_entry(&img, id, name);
    img
}

/// The same verb on copies of `img` with qemu-img and qimg: equal exit
/// codes; when both succeed, the results read the same (as raw, through
/// qemu-img); a failure leaves qimg's copy byte-identical.
fn same_edit(q: &Qemu, img: &Path, dir: &Path, verb: &str, key: &[u8], what: &str) {
    let key = os(key);
    let (theirs, ours) = (dir.join("theirs.qcow2"), dir.join("ours.qcow2"));
    fs::copy(img, &theirs).unwrap();
    fs::copy(img, &ours).unwrap();
    let t = outcome(
        Command::new(&q.img)
            .args(["snapshot", verb])
            .arg(key)
            .arg(&theirs),
    );
    let o = outcome(qimg().args(["snapshot", verb]).arg(key).arg(&ours));
    assert_eq!(
        o.0, t.0,
        "{what}: snapshot {verb}: qemu-img {} / qimg {}",
        t.2, o.2
    );
    if o.0 == Some(0) {
        let (tr, or) = (dir.join("theirs.raw"), dir.join("ours.raw"));
        q.to_raw(&theirs, &tr, &[]);
        q.to_raw(&ours, &or, &[]);
        assert!(
            fs::read(&tr).unwrap() == fs::read(&or).unwrap(),
            "{what}: {verb} content"
        );
        let c = outcome(Command::new(&q.img).arg("check").arg(&ours));
        assert_eq!(
            c.0,
            Some(0),
            "{what}: qemu-img check after qimg {verb}: {:?}",
            c
        );
        let (tl, ol) = (
            json_of(
                Command::new(&q.img)
                    .args(["info", "--output", "json"])
                    .arg(&theirs),
            ),
            json_of(qimg().args(["info", "--output", "json"]).arg(&ours)),
        );
        assert_json_agrees(&ol["snapshots"], &tl["snapshots"], what);
        assert_eq!(
            ol.get("snapshots").is_some(),
            tl.get("snapshots").is_some(),
            "{what}"
        );
    } else {
        assert!(
            fs::read(img).unwrap() == fs::read(&ours).unwrap(),
            "{what}: failed {verb} wrote"
        );
    }
}

/// `convert -l SPEC` with both tools: equal exit codes and, on success,
/// equal raw output.
fn same_convert(q: &Qemu, img: &Path, dir: &Path, spec: &[u8], what: &str) {
    let spec = os(spec);
    let (tr, or) = (dir.join("c-theirs.raw"), dir.join("c-ours.raw"));
    let _ = fs::remove_file(&tr);
    let _ = fs::remove_file(&or);
    let t = outcome(
        Command::new(&q.img)
            .args(["convert", "-O", "raw", "-l"])
            .arg(spec)
            .arg(img)
            .arg(&tr),
    );
    let o = outcome(
        qimg()
            .args(["convert", "-O", "raw", "-l"])
            .arg(spec)
            .arg(img)
            .arg(&or),
    );
    assert_eq!(
        o.0, t.0,
        "{what}: convert -l: qemu-img {} / qimg {}",
        t.2, o.2
    );
    if o.0 == Some(0) {
        let data = fs::read(&or).unwrap();
        assert!(data == fs::read(&tr).unwrap(), "{what}: convert -l content");
        assert!(
            data[..65536].iter().all(|&b| b == 0x11),
            "{what}: not the snapshot"
        );
    }
}

/// Byte slices as an `OsStr` (the test's names and ids are ASCII).
fn os(b: &[u8]) -> &OsStr {
    OsStr::new(std::str::from_utf8(b).unwrap())
}

/// Everything qemu-img shows or does with the image agrees.
fn compare_everything(q: &Qemu, img: &Path, dir: &Path, id: &[u8], name: &[u8], what: &str) {
    // Listing: byte for byte, and the JSON of info and snapshot -l.
    for args in [&["snapshot", "-l"][..], &["info"]] {
        let t = run_ok(Command::new(&q.img).args(args).arg(img));
        let o = run_ok(qimg().args(args).arg(img));
        let keep = |b: &[u8]| -> String {
            String::from_utf8_lossy(b)
                .lines()
                .filter(|l| !l.starts_with("image:") && !l.starts_with("disk size:"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(keep(&o), keep(&t), "{what}: {args:?}");
    }
    let t = json_of(
        Command::new(&q.img)
            .args(["info", "--output", "json"])
            .arg(img),
    );
    let o = json_of(qimg().args(["info", "--output", "json"]).arg(img));
    assert!(
        assert_json_agrees(&o["snapshots"], &t["snapshots"], what) >= 6,
        "{what}"
    );
    let shown_name = &name[..name.len().min(255)];
    let shown_id = &id[..id.len().min(127)];
    assert_eq!(
        o["snapshots"][0]["name"].as_str().unwrap().as_bytes(),
        shown_name,
        "{what}"
    );
    assert_eq!(
        o["snapshots"][0]["id"].as_str().unwrap().as_bytes(),
        shown_id,
        "{what}"
    );
    // check: exit code and report.
    let t = outcome(Command::new(&q.img).arg("check").arg(img));
    let o = outcome(qimg().arg("check").arg(img));
    assert_eq!((o.0, &o.1), (t.0, &t.1), "{what}: check: {}", o.2);
    assert_eq!(o.0, Some(0), "{what}: check");
    // convert -l by whole name, id, snapshot.name=, snapshot.id=, and by the
    // shown (cut) name and id.
    let mut specs: Vec<Vec<u8>> = vec![name.to_vec(), id.to_vec()];
    specs.push([b"snapshot.name=".as_slice(), name].concat());
    specs.push([b"snapshot.id=".as_slice(), id].concat());
    specs.push(shown_name.to_vec());
    specs.push(shown_id.to_vec());
    for s in &specs {
        same_convert(q, img, dir, s, what);
    }
    // apply and delete by whole and shown names and ids.
    for key in [name, shown_name, id, shown_id] {
        same_edit(q, img, dir, "-a", key, what);
        same_edit(q, img, dir, "-d", key, what);
    }
}

/// The no-alloc reader: a bounded prefix inline, the whole strings on
/// demand into a caller's buffer, lookups by whole id and name.
fn reader_api(img: &Path, id: &[u8], name: &[u8], what: &str) {
    use luks_core::io::FileDevice;
    use qcow_core::Qcow2;
    let mut cache = vec![0u8; 4096];
    let mut q = Qcow2::open(FileDevice::open(img).unwrap(), &mut cache).unwrap();
    let s = q.snapshot(0).unwrap();
    assert_eq!(s.id_complete(), id.len() <= s.id.capacity(), "{what}");
    assert_eq!(s.name_complete(), name.len() <= s.name.capacity(), "{what}");
    assert_eq!(s.name_str().is_some(), s.name_complete(), "{what}");
    let mut buf = vec![0u8; 65535];
    let n = q.read_snapshot_text(&s, true, &mut buf).unwrap();
    assert!(&buf[..n] == name, "{what}: whole name");
    let n = q.read_snapshot_text(&s, false, &mut buf).unwrap();
    assert!(&buf[..n] == id, "{what}: whole id");
    // A short buffer gets the start and the whole length.
    let mut short = [0u8; 3];
    assert_eq!(
        q.read_snapshot_text(&s, true, &mut short).unwrap(),
        name.len()
    );
    assert_eq!(&short[..name.len().min(3)], &name[..name.len().min(3)]);
    assert!(q.find_snapshot_by(name, true).unwrap().is_some(), "{what}");
    assert!(q.find_snapshot_by(id, false).unwrap().is_some(), "{what}");
    let mut other = name.to_vec();
    *other.last_mut().unwrap() ^= 1;
    assert!(
        q.find_snapshot_by(&other, true).unwrap().is_none(),
        "{what}"
    );
    assert!(q
        .find_snapshot_by(&name[..name.len() - 1], true)
        .unwrap()
        .is_none());
}

#[test]
fn long_snapshot_names_and_ids_agree_with_qemu_img() {
    let Some(q) = Qemu::find() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // (cluster size, id length, name length): names around qemu-img's
    // 255-byte cut and qimg's former 1,024-byte limit, up to the 16-bit
    // maximum (a 128 KiB cluster holds that entry); ids around 127/128.
    let cases: &[(&str, usize, usize)] = &[
        ("64k", 1, 255),
        ("64k", 1, 256),
        ("64k", 1, 1024),
        ("64k", 1, 1025),
        ("64k", 1, 1100),
        ("128k", 1, 65535),
        ("64k", 127, 1),
        ("64k", 128, 1),
        ("64k", 129, 1),
        ("64k", 200, 1),
        ("64k", 200, 1100),
    ];
    for &(cluster, id_len, name_len) in cases {
        let what = format!("id {id_len} bytes, name {name_len} bytes");
        // Ids of digits (as QEMU writes them), names of letters.
        let id: Vec<u8> = (0..id_len).map(|i| b'1' + (i % 9) as u8).collect();
        let name: Vec<u8> = (0..name_len).map(|i| b'a' + (i % 26) as u8).collect();
        let img = build(&q, d, "long", cluster, &id, &name);
        reader_api(&img, &id, &name, &what);
        compare_everything(&q, &img, d, &id, &name, &what);
    }
}

#[test]
fn snapshot_create_keeps_qemu_imgs_255_bytes_and_next_id() {
    let Some(q) = Qemu::find() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let long: String = "x".repeat(1100);
    for (tag, id) in [("digits", "9".repeat(200)), ("small", "41".to_string())] {
        let img = build(&q, d, tag, "64k", id.as_bytes(), b"s");
        let (theirs, ours) = (d.join("t.qcow2"), d.join("o.qcow2"));
        fs::copy(&img, &theirs).unwrap();
        fs::copy(&img, &ours).unwrap();
        q.img(&["snapshot", "-c", &long, theirs.to_str().unwrap()]);
        run_ok(qimg().args(["snapshot", "-c", &long]).arg(&ours));
        let t = json_of(
            Command::new(&q.img)
                .args(["info", "--output", "json"])
                .arg(&theirs),
        );
        let o = json_of(qimg().args(["info", "--output", "json"]).arg(&ours));
        for k in ["id", "name"] {
            assert_eq!(o["snapshots"][1][k], t["snapshots"][1][k], "{tag}: {k}");
        }
        assert_eq!(o["snapshots"][1]["name"].as_str().unwrap().len(), 255);
        let c = outcome(Command::new(&q.img).arg("check").arg(&ours));
        assert_eq!(c.0, Some(0), "{tag}: qemu-img check after qimg -c: {c:?}");
    }
}

#[test]
fn snapshot_list_on_raw_luks_exits_as_qemu_img() {
    let (Some(q), Some(cs)) = (Qemu::find(), tool("cryptsetup")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    fs::write(&key, "pw").unwrap();
    for (ty, size) in [("luks1", 4u64 << 20), ("luks2", 20 << 20)] {
        let vol = dir.path().join(format!("{ty}.img"));
        fs::File::create(&vol).unwrap().set_len(size).unwrap();
        run_ok(
            Command::new(&cs)
                .args(["luksFormat", "-q", "--type", ty, "--pbkdf", "pbkdf2"])
                .args(["--pbkdf-force-iterations", "1000", "--key-file"])
                .arg(&key)
                .arg(&vol),
        );
        let mut codes = Vec::new();
        for fmt in [&[][..], &["-f", "luks"], &["-f", "raw"]] {
            let t = outcome(
                Command::new(&q.img)
                    .args(["snapshot", "-l"])
                    .args(fmt)
                    .arg(&vol),
            );
            let o = outcome(qimg().args(["snapshot", "-l"]).args(fmt).arg(&vol));
            assert_eq!(o.0, t.0, "{ty} {fmt:?}: qemu-img {} / qimg {}", t.2, o.2);
            assert_eq!(o.1, t.1, "{ty} {fmt:?}: stdout");
            codes.push(o.0);
        }
        // qemu-img 10 needs a key-secret to open LUKS1; it probes LUKS2 as
        // raw. Both list nothing as raw.
        let want = if ty == "luks1" { 1 } else { 0 };
        assert_eq!(codes, [Some(want), Some(1), Some(0)], "{ty}");
        // Given the secret (qemu-img: `key-secret` in --image-opts; qimg:
        // --key-file or --object), the volume opens and lists nothing; a
        // wrong passphrase fails. qemu-img 10 has no LUKS2 driver, so only
        // LUKS1 is compared; qimg opens LUKS2 alike.
        let wrong = dir.path().join("wrong");
        fs::write(&wrong, "nope").unwrap();
        for (k, want) in [(&key, 0), (&wrong, 1)] {
            let o = outcome(
                qimg()
                    .args(["snapshot", "-l", "-f", "luks", "--key-file"])
                    .arg(k)
                    .arg(&vol),
            );
            assert_eq!(o.0, Some(want), "{ty} {k:?}: {}", o.2);
            assert!(o.1.is_empty(), "{ty}: nothing listed");
            if ty == "luks1" {
                let opts = format!("driver=luks,key-secret=s,file.filename={}", vol.display());
                let t = outcome(
                    Command::new(&q.img)
                        .args(["snapshot", "-l", "--object"])
                        .arg(format!("secret,id=s,file={}", k.display()))
                        .args(["--image-opts", &opts]),
                );
                assert_eq!(o.0, t.0, "{ty} {k:?}: qemu-img {}", t.2);
                assert_eq!(o.1, t.1, "{ty} {k:?}: stdout");
            }
        }
    }
}

/// Writes `l1_size` and `l1_table_offset` into a qcow2 header.
fn set_l1(img: &Path, l1_size: u32, l1_offset: u64) {
    let mut f = fs::read(img).unwrap();
    f[36..40].copy_from_slice(&l1_size.to_be_bytes());
    f[40..48].copy_from_slice(&l1_offset.to_be_bytes());
    fs::write(img, f).unwrap();
}

#[test]
fn l1_table_at_offset_zero() {
    let Some(q) = Qemu::find() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out.raw");
    // Entries at offset 0 (over the header): qemu-img opens it and reads
    // the header as L1 entries; qimg refuses with a message naming the
    // field and the offset (a documented stricter refusal). check agrees.
    let img = d.join("l1zero.qcow2");
    q.create(&img, "qcow2", "", "1M");
    set_l1(&img, 1, 0);
    let before = fs::read(&img).unwrap();
    for verb in [&["info"][..], &["convert", "-O", "raw"]] {
        let mut c = qimg();
        c.args(verb).arg(&img);
        if verb[0] == "convert" {
            c.arg(&out);
        }
        let o = outcome(&mut c);
        assert_eq!(o.0, Some(1), "{verb:?}");
        assert!(
            o.2.contains("l1_table_offset")
                && o.2.contains("0x28")
                && o.2.contains("offset 0x0")
                && o.2.contains("header")
                && !o.2.contains("not cluster aligned")
                && o.2.contains("l1zero.qcow2"),
            "{verb:?}: {}",
            o.2
        );
    }
    let t = outcome(Command::new(&q.img).arg("check").arg(&img));
    let o = outcome(qimg().arg("check").arg(&img));
    assert_eq!((o.0, &o.1), (t.0, &t.1), "check: {}", o.2);
    assert!(fs::read(&img).unwrap() == before, "refused reads wrote");
    // No entries at offset 0 while the size needs one: both refuse.
    set_l1(&img, 0, 0);
    for verb in ["info", "check"] {
        let t = outcome(Command::new(&q.img).arg(verb).arg(&img));
        let o = outcome(qimg().arg(verb).arg(&img));
        assert_eq!(o.0, t.0, "{verb}: qemu-img {} / qimg {}", t.2, o.2);
        assert!(o.2.contains("L1 table has 0 entries"), "{}", o.2);
    }
    // An empty image: no entries at offset 0 is legal.
    let empty = d.join("empty.qcow2");
    q.create(&empty, "qcow2", "", "0");
    let f = fs::read(&empty).unwrap();
    assert_eq!(
        &f[36..48],
        &[0u8; 12],
        "qemu-img writes l1_size 0 at offset 0"
    );
    for verb in [&["info"][..], &["check"], &["convert", "-O", "raw"]] {
        let mut c = qimg();
        c.args(verb).arg(&empty);
        if verb[0] == "convert" {
            c.arg(&out);
        }
        let o = outcome(&mut c);
        assert_eq!(o.0, Some(0), "{verb:?}: {}", o.2);
    }
}

/// A table of `n` entries with 65,535-byte names (holes in a sparse file)
/// placed at 1 MiB: 1,023 of them end 64 bytes inside QEMU's 64 MiB
/// snapshot table limit, 1,024 end past it.
fn huge_table(q: &Qemu, img: &Path, n: u32) {
    use std::io::{Seek, SeekFrom, Write};
    q.create(img, "qcow2", "", "1M");
    let mut f = fs::OpenOptions::new().write(true).open(img).unwrap();
    let table = 1u64 << 20;
    let entry_len = (40 + 24 + 1 + 65535u64).next_multiple_of(8);
    for i in 0..u64::from(n) {
        let mut e = Vec::new();
        e.extend_from_slice(&0u64.to_be_bytes()); // L1 offset: no table
        e.extend_from_slice(&0u32.to_be_bytes()); // L1 entries
        e.extend_from_slice(&1u16.to_be_bytes()); // id bytes
        e.extend_from_slice(&u16::MAX.to_be_bytes()); // name bytes
        e.extend_from_slice(&[0u8; 20]); // date, clock, 32-bit VM state
        e.extend_from_slice(&24u32.to_be_bytes()); // extra bytes
        e.extend_from_slice(&0u64.to_be_bytes());
        e.extend_from_slice(&(1u64 << 20).to_be_bytes());
        e.extend_from_slice(&u64::MAX.to_be_bytes());
        e.push(b'1' + (i % 9) as u8);
        f.seek(SeekFrom::Start(table + i * entry_len)).unwrap();
        f.write_all(&e).unwrap();
    }
    f.set_len(table + u64::from(n) * entry_len).unwrap();
    f.seek(SeekFrom::Start(60)).unwrap();
    f.write_all(&n.to_be_bytes()).unwrap();
    f.write_all(&table.to_be_bytes()).unwrap();
}

#[test]
fn the_snapshot_table_is_bounded_as_in_qemu_img() {
    let Some(q) = Qemu::find() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (n, opens) in [(1023, true), (1024, false)] {
        let img = dir.path().join(format!("t{n}.qcow2"));
        huge_table(&q, &img, n);
        for verb in ["info", "snapshot"] {
            let args: &[&str] = if verb == "info" {
                &["info", "--output", "json"]
            } else {
                &["snapshot", "-l"]
            };
            let t = outcome(Command::new(&q.img).args(args).arg(&img));
            let o = outcome(qimg().args(args).arg(&img));
            assert_eq!(o.0, t.0, "{n} {verb}: qemu-img {} / qimg {}", t.2, o.2);
            assert_eq!(o.0 == Some(0), opens, "{n} {verb}: {}", o.2);
            if !opens {
                assert!(o.2.contains("snapshot table bytes"), "{}", o.2);
            } else if verb == "info" {
                let (ov, tv): (serde_json::Value, serde_json::Value) = (
                    serde_json::from_slice(&o.1).unwrap(),
                    serde_json::from_slice(&t.1).unwrap(),
                );
                assert_eq!(ov["snapshots"].as_array().unwrap().len(), n as usize);
                assert_json_agrees(&ov["snapshots"], &tv["snapshots"], "huge");
            } else {
                assert!(o.1 == t.1, "{n}: snapshot -l differs");
            }
        }
    }
}
