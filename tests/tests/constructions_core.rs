//! Hostile qcow2 constructions built at run time from qemu-img-made images
//! by poking bytes, each judged against qemu-img 10.0.2: `convert -O raw`
//! must succeed or fail in both, and when both succeed the raw outputs are
//! identical. Covers a data-file bit without a data file name, a crypto
//! extension with crypt_method 0 or 1, zstd skippable frames and a frame
//! that inflates past the cluster, and sizes not a multiple of 512.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::cast_possible_truncation)] // test offsets are small

use std::path::Path;
use std::process::Command;

use qimg_tests::qemu::Qemu;
use qimg_tests::{qimg, tmpfs_tempdir};

fn be64(d: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(d[at..at + 8].try_into().unwrap())
}

/// Runs `qemu-img convert -O raw` and `qimg convert -O raw` on `img` and
/// checks they agree; returns whether they succeeded.
fn agree(q: &Qemu, img: &Path, what: &str) -> bool {
    let dir = img.parent().unwrap();
    let qo = dir.join("qemu.raw");
    let mo = dir.join("qimg.raw");
    let _ = std::fs::remove_file(&qo);
    let _ = std::fs::remove_file(&mo);
    let before = std::fs::read(img).unwrap();
    let qs = Command::new(&q.img)
        .args(["convert", "-O", "raw"])
        .arg(img)
        .arg(&qo)
        .output()
        .unwrap();
    let ms = qimg()
        .args(["convert", "-O", "raw"])
        .arg(img)
        .arg(&mo)
        .output()
        .unwrap();
    assert_eq!(
        qs.status.success(),
        ms.status.success(),
        "{what}: qemu-img {} ({}), qimg {} ({})",
        qs.status,
        String::from_utf8_lossy(&qs.stderr),
        ms.status,
        String::from_utf8_lossy(&ms.stderr)
    );
    assert_eq!(std::fs::read(img).unwrap(), before, "{what}: image changed");
    if qs.status.success() {
        let a = std::fs::read(&qo).unwrap();
        let b = std::fs::read(&mo).unwrap();
        assert_eq!(a.len(), b.len(), "{what}: raw sizes differ");
        assert!(a == b, "{what}: raw contents differ");
    } else {
        let err = String::from_utf8_lossy(&ms.stderr).into_owned();
        assert!(err.contains(img.to_str().unwrap()), "{what}: {err}");
    }
    qs.status.success()
}

#[test]
fn data_file_bit_without_a_name_is_refused() {
    let Some(q) = Qemu::find() else { return };
    let t = tmpfs_tempdir();
    let img = t.path().join("a.qcow2");
    let raw = t.path().join("a.raw");
    q.create(&img, "qcow2", &format!("data_file={}", raw.display()), "1M");
    q.io(&img, "qcow2", &["write -P 0x5c 0 64k"]);
    assert!(agree(&q, &img, "intact data file"));
    let mut d = std::fs::read(&img).unwrap();
    let at = d.windows(4).position(|w| w == b"DATA").unwrap();
    d[at..at + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    std::fs::write(&img, &d).unwrap();
    assert!(!agree(&q, &img, "data-file name extension removed"));
    let out = qimg()
        .args(["convert", "-O", "raw"])
        .arg(&img)
        .arg(t.path().join("x"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("'data-file' is required"));
}

#[test]
fn crypto_extension_without_luks_is_refused() {
    let Some(q) = Qemu::find() else { return };
    let t = tmpfs_tempdir();
    let img = t.path().join("e.qcow2");
    run(Command::new(&q.img)
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s,data=x",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s",
        ])
        .arg(&img)
        .arg("1M"));
    let orig = std::fs::read(&img).unwrap();
    for m in [0u32, 1] {
        let mut d = orig.clone();
        d[32..36].copy_from_slice(&m.to_be_bytes());
        std::fs::write(&img, &d).unwrap();
        assert!(!agree(&q, &img, &format!("crypt_method {m}")));
        for verb in [&["info"][..], &["check"][..]] {
            let out = qimg().args(verb).arg(&img).output().unwrap();
            assert!(!out.status.success(), "qimg {verb:?} crypt_method {m}");
            let q = Command::new(&q.img).args(verb).arg(&img).output().unwrap();
            assert!(!q.status.success(), "qemu-img {verb:?} crypt_method {m}");
        }
    }
}

fn run(cmd: &mut Command) {
    qimg_tests::run_ok(cmd);
}

#[test]
fn sizes_not_a_multiple_of_512() {
    let Some(q) = Qemu::find() else { return };
    let t = tmpfs_tempdir();
    let img = t.path().join("s.qcow2");
    q.create(&img, "qcow2", "", "1M");
    q.io(&img, "qcow2", &["write -P 0xab 0 64k"]);
    let orig = std::fs::read(&img).unwrap();
    for size in [1000u64, 511, 513, 512, 1] {
        let mut d = orig.clone();
        d[24..32].copy_from_slice(&size.to_be_bytes());
        std::fs::write(&img, &d).unwrap();
        assert!(agree(&q, &img, &format!("size {size}")));
        let qi = q.info(&img);
        let out = qimg()
            .args(["info", "--output=json"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(out.status.success());
        let mi: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(qi["virtual-size"], mi["virtual-size"], "size {size}");
    }
}

/// The compressed cluster 0 of a zstd image: (L2 entry offset, host
/// offset, bytes, cluster_bits).
fn compressed_cluster0(d: &[u8]) -> (usize, u64, Vec<u8>, u32) {
    let cb = u32::from_be_bytes(d[20..24].try_into().unwrap());
    let l1 = be64(d, 40) as usize;
    let l2 = (be64(d, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let e = be64(d, l2);
    assert!(e & (1 << 62) != 0, "cluster 0 is compressed");
    let x = 62 - (cb - 8);
    let off = e & ((1u64 << x) - 1);
    let sectors = ((e >> x) & ((1u64 << (cb - 8)) - 1)) + 1;
    let end = ((off & !511) + sectors * 512).min(d.len() as u64);
    (l2, off, d[off as usize..end as usize].to_vec(), cb)
}

/// Appends `data` at a sector boundary past the end and points cluster
/// 0's compressed descriptor at it.
fn repoint(d: &mut Vec<u8>, l2: usize, cb: u32, data: &[u8]) {
    let at = (d.len() as u64).div_ceil(512) * 512 + 512;
    d.resize(at as usize, 0);
    d.extend_from_slice(data);
    d.resize(d.len().div_ceil(512) * 512, 0);
    let x = 62 - (cb - 8);
    let sectors = (data.len() as u64).div_ceil(512);
    let e = (1u64 << 62) | ((sectors - 1) << x) | at;
    d[l2..l2 + 8].copy_from_slice(&e.to_be_bytes());
}

#[test]
fn zstd_skippable_frames_and_overlong_frames() {
    let Some(q) = Qemu::find() else { return };
    let t = tmpfs_tempdir();
    let img = t.path().join("z.qcow2");
    let big = t.path().join("z128.qcow2");
    for (p, cs) in [(&img, "64k"), (&big, "128k")] {
        q.create(
            p,
            "qcow2",
            &format!("compression_type=zstd,cluster_size={cs}"),
            "1M",
        );
        q.io(p, "qcow2", &[&format!("write -c -P 0x3d 0 {cs}")]);
    }
    assert!(agree(&q, &img, "plain zstd"));
    let orig = std::fs::read(&img).unwrap();
    let (l2, _, frame, cb) = compressed_cluster0(&orig);
    for skip in [0u32, 7, 1000] {
        let mut data = 0x184d_2a50u32.to_le_bytes().to_vec();
        data.extend_from_slice(&skip.to_le_bytes());
        data.extend(std::iter::repeat_n(0xa5u8, skip as usize));
        data.extend_from_slice(&frame);
        let mut d = orig.clone();
        repoint(&mut d, l2, cb, &data);
        std::fs::write(&img, &d).unwrap();
        assert!(agree(&q, &img, &format!("skippable frame of {skip} bytes")));
    }
    // A frame that inflates to 128 KiB in a 64 KiB cluster.
    let (_, _, frame128, _) = compressed_cluster0(&std::fs::read(&big).unwrap());
    let mut d = orig.clone();
    repoint(&mut d, l2, cb, &frame128);
    std::fs::write(&img, &d).unwrap();
    assert!(!agree(&q, &img, "frame past the cluster"));
}

#[test]
fn luks1_uuid_of_0xff_opens() {
    let Some(q) = Qemu::find() else { return };
    let Some(cs) = qimg_tests::tool("cryptsetup") else {
        return;
    };
    let t = tmpfs_tempdir();
    let vol = t.path().join("l1.img");
    let key = t.path().join("key");
    std::fs::write(&key, b"pw").unwrap();
    qimg_tests::sparse_file(&vol, 4 << 20);
    run(Command::new(cs)
        .args([
            "luksFormat",
            "--type",
            "luks1",
            "-q",
            "--pbkdf-force-iterations",
            "1000",
        ])
        .args(["--key-file"])
        .arg(&key)
        .arg(&vol));
    let mut d = std::fs::read(&vol).unwrap();
    d[168..208].fill(0xff);
    std::fs::write(&vol, &d).unwrap();
    run(Command::new(&q.img).args(["info", "-f", "luks"]).arg(&vol));
    for verb in [&["info"][..], &["luks", "dump"][..]] {
        let out = qimg().args(verb).arg(&vol).output().unwrap();
        assert!(
            out.status.success(),
            "qimg {verb:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains(&"?".repeat(39)), "{text}");
    }
    assert_eq!(
        std::fs::read(&vol).unwrap(),
        d,
        "reading changed the volume"
    );
}
