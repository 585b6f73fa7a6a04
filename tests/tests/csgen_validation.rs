//! cryptsetup's LUKS2 validation corpus (csgen.tar.xz: the 85 images its
//! `tests/generators` write): `qimg info` and `qimg luks dump` must accept
//! exactly the images cryptsetup 2.6.1 accepts, the verdict derived at run
//! time with `cryptsetup luksDump` on a copy (luksDump may rewrite images).
//!
//! Documented stricter refusal: the `*-secondary` images have no primary
//! binary header; cryptsetup recovers from the secondary copy, qimg reads
//! the primary only (and `info` then sees a raw file).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use qimg_tests::{qimg, testdata, tmpfs_tempdir, tool, untar_xz};

#[test]
fn qimg_accepts_exactly_what_cryptsetup_accepts() {
    let Some(cs) = tool("cryptsetup") else { return };
    let Some(tar) = testdata("external/csgen.tar.xz") else {
        return;
    };
    let t = tmpfs_tempdir();
    untar_xz(&tar, t.path());
    let dir = t.path().join("csgen");
    let copy = t.path().join("copy.img");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    assert_eq!(names.len(), 85, "csgen corpus size");
    let mut wrong = Vec::new();
    let (mut accepted, mut refused) = (0, 0);
    for img in &names {
        let name = img.file_name().unwrap().to_string_lossy().into_owned();
        std::fs::copy(img, &copy).unwrap();
        let cs_ok = Command::new(&cs)
            .arg("luksDump")
            .arg(&copy)
            .output()
            .unwrap()
            .status
            .success();
        let before = std::fs::read(img).unwrap();
        let info = qimg().arg("info").arg(img).output().unwrap();
        let info_ok = info.status.success()
            && String::from_utf8_lossy(&info.stdout).contains("file format: luks");
        let dump_ok = qimg()
            .args(["luks", "dump"])
            .arg(img)
            .output()
            .unwrap()
            .status
            .success();
        assert_eq!(std::fs::read(img).unwrap(), before, "{name}: changed");
        let stricter = name.ends_with("-secondary.img") && !info_ok && !dump_ok;
        if (info_ok != cs_ok || dump_ok != cs_ok) && !stricter {
            wrong.push(format!(
                "{name}: cryptsetup {cs_ok}, qimg info {info_ok}, luks dump {dump_ok}"
            ));
        }
        if cs_ok {
            accepted += 1;
        } else {
            refused += 1;
        }
    }
    println!("cryptsetup accepts {accepted}, refuses {refused}");
    assert!(accepted > 0 && refused > 0);
    assert!(wrong.is_empty(), "disagreements:\n{}", wrong.join("\n"));
}
