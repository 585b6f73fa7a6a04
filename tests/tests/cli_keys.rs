//! Key slot management beside qemu-img and cryptsetup: `qimg amend` on
//! encrypted qcow2 images and raw LUKS volumes, and the cryptsetup-style
//! `qimg luks add-key | remove-key | change-key | header-backup |
//! header-restore`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly

use std::path::{Path, PathBuf};
use std::process::Command;

use qimg_tests::cryptsetup::Cryptsetup;
use qimg_tests::qemu::{pattern, write_tmp, Qemu};
use qimg_tests::{
    json_of, qimg, qimg_create_luks, qimg_header_backup, qimg_header_restore, qimg_luks,
    qimg_luks_dump, qimg_on_pty, run_fails as fails, run_ok, sha256_file, sparse_file, tool,
};

/// The passphrases used here; `s{i}` is the secret id of `PASS[i]`.
const PASS: [&str; 4] = ["first pass", "second pass", "third pass", "fourth pass"];

/// `--object` definitions of every passphrase, `s0`..`s3`, from files.
fn objects(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for (i, p) in PASS.iter().enumerate() {
        let f = write_tmp(dir, &format!("pass{i}"), p.as_bytes());
        v.push("--object".into());
        v.push(format!("secret,id=s{i},file={}", f.display()));
    }
    v
}

/// A secret object for qemu.rs's helpers, which unlock with id `s0`.
fn as_s0(i: usize) -> String {
    format!("secret,id=s0,data={}", PASS[i])
}

fn key_file(dir: &Path, i: usize) -> PathBuf {
    write_tmp(dir, &format!("key{i}"), PASS[i].as_bytes())
}

/// qemu-img's view of the image's active key slots.
fn active_slots(q: &Qemu, img: &Path) -> Vec<bool> {
    let info = q.info(img);
    let fs = &info["format-specific"]["data"];
    let slots = fs["encrypt"]["slots"]
        .as_array()
        .or_else(|| fs["slots"].as_array())
        .unwrap_or_else(|| panic!("no key slots in {info}"));
    slots
        .iter()
        .map(|s| s["active"].as_bool().unwrap())
        .collect()
}

/// qimg and qemu-img show the same encryption block.
fn info_agrees(q: &Qemu, img: &Path) {
    let ours = json_of(qimg().args(["info", "--output", "json"]).arg(img));
    assert_eq!(ours["format-specific"], q.info(img)["format-specific"]);
}

/// qemu-img decrypts `img` with passphrase `i` to exactly `want`.
fn qemu_reads(q: &Qemu, driver: &str, img: &Path, i: usize, want: &Path) {
    let out = img.with_extension("qemu.raw");
    q.decrypt_to_raw(&as_s0(i), driver, img, "", &out);
    assert_eq!(sha256_file(&out), sha256_file(want), "{}", img.display());
}

/// `qimg convert -O raw` of `img` unlocked with passphrase `i`, to `out`.
fn qimg_decrypt(img: &Path, i: usize, out: &Path) -> Command {
    let dir = img.parent().unwrap();
    let mut c = qimg();
    c.args(["convert", "-O", "raw", "--key-file"])
        .arg(key_file(dir, i))
        .arg(img)
        .arg(out);
    c
}

/// qimg decrypts `img` with passphrase `i` to exactly `want`.
fn qimg_reads(img: &Path, i: usize, want: &Path) {
    let out = img.with_extension("qimg.raw");
    run_ok(&mut qimg_decrypt(img, i, &out));
    assert_eq!(sha256_file(&out), sha256_file(want), "{}", img.display());
}

/// amend's options adding a key slot for passphrase `i` (fast PBKDF).
fn add_slot(i: usize) -> String {
    format!("encrypt.state=active,encrypt.new-secret=s{i},encrypt.iter-time=10")
}

/// `qemu-img amend --image-opts` unlocking with secret `s{unlock}`.
fn qemu_amend(q: &Qemu, dir: &Path, img: &Path, unlock: usize, opts: &str, force: bool) -> Command {
    let mut cmd = Command::new(&q.img);
    cmd.arg("amend").args(objects(dir));
    if force {
        cmd.arg("--force");
    }
    cmd.args(["--image-opts", "-o", opts]).arg(format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=s{unlock}",
        img.display()
    ));
    cmd
}

/// `qimg amend` unlocking with secret `s{unlock}`.
fn qimg_amend(dir: &Path, img: &Path, unlock: usize, opts: &str, force: bool) -> Command {
    let mut cmd = qimg();
    cmd.arg("amend").args(objects(dir));
    if force {
        cmd.arg("--force");
    }
    cmd.args(["--key-secret", &format!("s{unlock}"), "-o", opts])
        .arg(img);
    cmd
}

/// An encrypted qcow2 image of `data`, made by qemu-img (`by_qemu`) or qimg.
fn encrypted_qcow2(
    q: &Qemu,
    dir: &Path,
    src: &Path,
    name: &str,
    extra: &str,
    by_qemu: bool,
) -> PathBuf {
    let img = dir.join(name);
    let mut o = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10".to_string();
    if !extra.is_empty() {
        o = format!("{o},{extra}");
    }
    let args = ["convert", "-O", "qcow2", "--object", &as_s0(0), "-o", &o];
    if by_qemu {
        q.convert(&args[1..], src, &img);
    } else {
        run_ok(qimg().args(args).arg(src).arg(&img));
    }
    img
}

/// qemu-img check of an encrypted qcow2 image unlocked with passphrase
/// `i`: no errors, no leaks.
fn qemu_check_clean(q: &Qemu, img: &Path, i: usize) {
    q.assert_encrypted_clean(&as_s0(i), "qcow2", img);
}

#[test]
fn qcow2_key_slots_added_and_erased_by_either_tool_work_in_the_other() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = write_tmp(d, "src.raw", &pattern(1 << 20, 11, 3));

    // (a) qemu-img's image, a slot added by qimg, opened by qemu-img.
    let theirs = encrypted_qcow2(&q, d, &src, "theirs.qcow2", "", true);
    run_ok(&mut qimg_amend(d, &theirs, 0, &add_slot(1), false));
    assert_eq!(active_slots(&q, &theirs)[..3], [true, true, false]);
    info_agrees(&q, &theirs);
    qemu_reads(&q, "qcow2", &theirs, 1, &src);
    qemu_check_clean(&q, &theirs, 0);
    // A chosen slot, through qemu-img's --image-opts spelling.
    run_ok(
        qimg()
            .arg("amend")
            .args(objects(d))
            .args([
                "-o",
                "encrypt.state=active,encrypt.new-secret=s2,encrypt.keyslot=5",
            ])
            .args(["-o", "encrypt.iter-time=10", "--image-opts"])
            .arg(format!(
                "driver=qcow2,file.filename={},encrypt.key-secret=s1",
                theirs.display()
            )),
    );
    assert!(active_slots(&q, &theirs)[5]);
    qemu_reads(&q, "qcow2", &theirs, 2, &src);

    // (b) qimg's image, a slot added by qemu-img, opened by qimg.
    let ours = encrypted_qcow2(&q, d, &src, "ours.qcow2", "", false);
    run_ok(&mut qemu_amend(&q, d, &ours, 0, &add_slot(1), false));
    qimg_reads(&ours, 1, &src);
    info_agrees(&q, &ours);

    // (c) Erasing: qimg erases slot 0 of qemu-img's image by its password,
    // qemu-img erases slot 0 of qimg's by number.
    run_ok(&mut qimg_amend(
        d,
        &theirs,
        1,
        "encrypt.state=inactive,encrypt.old-secret=s0",
        false,
    ));
    assert_eq!(active_slots(&q, &theirs)[..2], [false, true]);
    let err = fails(&mut q.decrypt_cmd(&as_s0(0), "qcow2", &theirs, "", &d.join("no.raw")));
    assert!(err.contains("Invalid password"), "{err}");
    qemu_reads(&q, "qcow2", &theirs, 1, &src);
    qemu_check_clean(&q, &theirs, 1);

    run_ok(&mut qemu_amend(
        &q,
        d,
        &ours,
        1,
        "encrypt.state=inactive,encrypt.keyslot=0",
        false,
    ));
    fails(&mut qimg_decrypt(&ours, 0, &d.join("no.raw")));
    qimg_reads(&ours, 1, &src);

    // The last slot: refused without --force by both, then erased by qimg
    // with --force, after which nothing opens the image.
    let last = "encrypt.state=inactive,encrypt.keyslot=1";
    let e1 = fails(&mut qimg_amend(d, &ours, 1, last, false));
    let e2 = fails(&mut qemu_amend(&q, d, &ours, 1, last, false));
    assert!(e2.contains("only active keyslot 1"), "{e2}");
    assert!(
        e1.contains(e2.trim().trim_start_matches("qemu-img: ")),
        "{e1} / {e2}"
    );
    run_ok(&mut qimg_amend(d, &ours, 1, last, true));
    assert!(active_slots(&q, &ours).iter().all(|a| !a));
    fails(&mut qimg_decrypt(&ours, 1, &d.join("no.raw")));
}

/// Every refusal of qemu-img amend, given to qimg amend on the same image:
/// both refuse, with qemu-img's message, and the image is untouched.
#[test]
fn amend_refuses_what_qemu_img_refuses_with_its_messages() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = write_tmp(d, "src.raw", &pattern(64 << 10, 12, 0));
    let img = encrypted_qcow2(&q, d, &src, "r.qcow2", "", true);
    run_ok(&mut qemu_amend(&q, d, &img, 0, &add_slot(1), false));
    let before = std::fs::read(&img).unwrap();
    let cases = [
        "encrypt.state=active,encrypt.new-secret=s2,encrypt.keyslot=0",
        "encrypt.state=active,encrypt.keyslot=3",
        "encrypt.state=active,encrypt.new-secret=s2,encrypt.old-secret=s0",
        "encrypt.state=active,encrypt.new-secret=s2,encrypt.keyslot=8",
        "encrypt.state=inactive",
        "encrypt.state=inactive,encrypt.new-secret=s2",
        "encrypt.state=inactive,encrypt.keyslot=3",
        "encrypt.state=inactive,encrypt.keyslot=1,encrypt.old-secret=s0",
        "encrypt.state=inactive,encrypt.old-secret=s3",
        "encrypt.new-secret=s2",
    ];
    for opts in cases {
        let theirs = fails(&mut qemu_amend(&q, d, &img, 0, opts, false));
        let ours = fails(&mut qimg_amend(d, &img, 0, opts, false));
        let msg = theirs
            .lines()
            .next()
            .unwrap()
            .trim_start_matches("qemu-img: ");
        assert!(
            ours.contains(msg.trim()),
            "{opts}: qimg said {ours}, qemu-img {msg}"
        );
    }
    // Both slots hold passwords that differ, so s1 erasing "all" is a
    // single slot; make both s0 and ask to erase s0's slots.
    run_ok(&mut qemu_amend(
        &q,
        d,
        &img,
        0,
        "encrypt.state=active,encrypt.new-secret=s0,encrypt.keyslot=1,encrypt.iter-time=10",
        true,
    ));
    let all = "encrypt.state=inactive,encrypt.old-secret=s0";
    let theirs = fails(&mut qemu_amend(&q, d, &img, 0, all, false));
    let ours = fails(&mut qimg_amend(d, &img, 0, all, false));
    assert!(theirs.contains("All the active keyslots match"), "{theirs}");
    assert!(ours.contains("All the active keyslots match"), "{ours}");
    // A wrong unlocking secret fails before anything is written.
    let wrong = fails(&mut qimg_amend(
        d,
        &img,
        3,
        "encrypt.state=inactive,encrypt.keyslot=1",
        false,
    ));
    assert!(
        wrong.contains("Invalid password") || wrong.contains("No key available"),
        "{wrong}"
    );
    assert_eq!(std::fs::read(&img).unwrap().len(), before.len());
    // An unencrypted image has no key slots.
    let plain = d.join("plain.qcow2");
    q.create(&plain, "qcow2", "", "1M");
    let e = fails(&mut qimg_amend(
        d,
        &plain,
        0,
        "encrypt.state=inactive,encrypt.keyslot=0",
        false,
    ));
    assert!(e.contains("encryption not present"), "{e}");
    // Legacy AES has no key slots.
    let aes = d.join("aes.qcow2");
    q.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        &as_s0(0),
        "-o",
        "encrypt.format=aes,encrypt.key-secret=s0",
        aes.to_str().unwrap(),
        "1M",
    ]);
    let opts = "encrypt.state=active,encrypt.new-secret=s1";
    let theirs = fails(&mut qemu_amend(&q, d, &aes, 0, opts, false));
    let ours = fails(&mut qimg_amend(d, &aes, 0, opts, false));
    assert!(
        theirs.contains("Only LUKS encryption options can be amended"),
        "{theirs}"
    );
    assert!(
        ours.contains("Only LUKS encryption options can be amended"),
        "{ours}"
    );
}

/// qimg amend with --force overwrites an active slot, and raw LUKS takes
/// the option names without `encrypt.`; qemu-img agrees afterwards.
#[test]
fn amend_raw_luks_and_forced_overwrite() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = write_tmp(d, "src.raw", &pattern(256 << 10, 13, 2));
    let vol = d.join("v.luks");
    q.convert(
        &[
            "-O",
            "luks",
            "--object",
            &as_s0(0),
            "-o",
            "key-secret=s0,iter-time=10",
        ],
        &src,
        &vol,
    );
    run_ok(
        qimg()
            .arg("amend")
            .args(objects(d))
            .args([
                "-o",
                "key-secret=s0,state=active,new-secret=s1,iter-time=10",
            ])
            .arg(&vol),
    );
    qemu_reads(&q, "luks", &vol, 1, &src);
    let e = fails(
        qimg()
            .arg("amend")
            .args(objects(d))
            .args(["-o", "key-secret=s0,encrypt.state=active"])
            .arg(&vol),
    );
    assert!(e.contains("invalid parameter 'encrypt.state'"), "{e}");
    run_ok(
        qimg()
            .arg("amend")
            .args(objects(d))
            .args([
                "--force",
                "-o",
                "key-secret=s1,state=active,new-secret=s2,keyslot=0,iter-time=10",
            ])
            .arg(&vol),
    );
    assert_eq!(active_slots(&q, &vol)[..3], [true, true, false]);
    info_agrees(&q, &vol);
    qemu_reads(&q, "luks", &vol, 2, &src);
    let out = d.join("no.raw");
    let err = fails(&mut q.decrypt_cmd(&as_s0(0), "luks", &vol, "", &out));
    assert!(err.contains("Invalid password"), "{err}");

    // qemu-img's layout (payload right after the key material): the header
    // backup still matches cryptsetup's byte for byte.
    let Some(cs) = Cryptsetup::find() else { return };
    cs.assert_same_backup(&vol, &d.join("v.qimg.hdr"), &d.join("v.cs.hdr"));
}

#[test]
fn luks_key_verbs_agree_with_cryptsetup() {
    let Some(cs) = Cryptsetup::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k: Vec<PathBuf> = (0..4).map(|i| key_file(d, i)).collect();
    let vol = d.join("v.luks");
    sparse_file(&vol, 3 << 20);
    cs.format(&vol, None, &k[0], &["--type", "luks1", "--iter-time", "10"]);
    let opens = |key: &Path| cs.opens(&vol, None, key, None);
    let add_key = |extra: &[&str], key: &Path, new: &Path| {
        qimg_luks(
            "add-key",
            &[&["-i", "10"], extra].concat(),
            Some(key),
            &vol,
            Some(new),
        )
    };

    run_ok(&mut add_key(&[], &k[0], &k[1]));
    assert!(opens(&k[1]));
    let e = fails(&mut add_key(&["--key-slot", "1"], &k[0], &k[2]));
    assert!(e.contains("Key slot 1 is full"), "{e}");
    let e = fails(&mut add_key(&[], &k[3], &k[2]));
    assert!(e.contains("No key available with this passphrase"), "{e}");

    run_ok(&mut qimg_luks(
        "change-key",
        &["-i", "10"],
        Some(&k[1]),
        &vol,
        Some(&k[2]),
    ));
    assert!(!opens(&k[1]) && opens(&k[2]));
    // With --key-slot the new key keeps that slot number, as cryptsetup's
    // luksChangeKey keeps it on LUKS1 too (k2 went to the lowest free
    // slot, 2).
    run_ok(&mut qimg_luks(
        "change-key",
        &["-i", "10", "--key-slot", "2"],
        Some(&k[2]),
        &vol,
        Some(&k[1]),
    ));
    assert!(cs.opens(&vol, None, &k[1], Some(2)) && !opens(&k[2]));
    run_ok(&mut qimg_luks(
        "change-key",
        &["-i", "10"],
        Some(&k[1]),
        &vol,
        Some(&k[2]),
    ));
    assert!(!opens(&k[1]) && opens(&k[2]));
    run_ok(&mut qimg_luks("remove-key", &[], None, &vol, Some(&k[2])));
    assert!(!opens(&k[2]) && opens(&k[0]));

    // cryptsetup adds a key; qimg opens the volume with it.
    cs.add_key(
        &vol,
        None,
        &k[0],
        &k[3],
        &["--iter-time", "10", "--key-slot", "6"],
    );
    assert_eq!(qimg_luks_dump(&vol)["slots"][6]["active"], true);
    run_ok(&mut qimg_luks("remove-key", &[], Some(&k[3]), &vol, None));
    assert!(!opens(&k[3]));

    // header-backup is byte-identical to cryptsetup's.
    let ours = d.join("hdr.qimg");
    cs.assert_same_backup(&vol, &ours, &d.join("hdr.cs"));
    fails(&mut qimg_header_backup(&vol, &ours));

    // The last key: refused without -q off a terminal, erased with it;
    // header-restore brings it back.
    let e = fails(&mut qimg_luks("remove-key", &[], None, &vol, Some(&k[0])));
    assert!(e.contains("last key slot"), "{e}");
    assert!(opens(&k[0]));
    run_ok(&mut qimg_luks(
        "remove-key",
        &["-q"],
        None,
        &vol,
        Some(&k[0]),
    ));
    assert!(!opens(&k[0]));
    run_ok(&mut qimg_header_restore(&vol, &ours));
    assert!(opens(&k[0]));

    // header-restore refuses what cryptsetup refuses.
    let junk = write_tmp(d, "junk", &pattern(8192, 5, 0));
    let e = fails(&mut qimg_header_restore(&vol, &junk));
    assert!(e.contains("does not contain compatible LUKS header"), "{e}");
    let other = d.join("other.luks");
    sparse_file(&other, 2 << 20);
    cs.format(
        &other,
        None,
        &k[0],
        &["--type", "luks1", "--iter-time", "10", "--key-size", "256"],
    );
    let other_hdr = d.join("other.hdr");
    run_ok(&mut qimg_header_backup(&other, &other_hdr));
    let theirs = fails(&mut cs.header_restore(&vol, &other_hdr));
    let ours = fails(&mut qimg_header_restore(&vol, &other_hdr));
    assert!(ours.contains(theirs.trim()), "{ours} / {theirs}");
    assert!(opens(&k[0]));
}

/// serpent and twofish inside qcow2, both directions, with a key slot
/// added by qimg to qemu-img's serpent image.
#[test]
fn serpent_and_twofish_qcow2_interchange() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = write_tmp(d, "src.raw", &pattern(512 << 10, 14, 3));
    let serpent = encrypted_qcow2(
        &q,
        d,
        &src,
        "serpent.qcow2",
        "encrypt.cipher-alg=serpent-256",
        true,
    );
    qimg_reads(&serpent, 0, &src);
    info_agrees(&q, &serpent);
    run_ok(&mut qimg_amend(d, &serpent, 0, &add_slot(1), false));
    qemu_reads(&q, "qcow2", &serpent, 1, &src);

    let twofish = encrypted_qcow2(
        &q,
        d,
        &src,
        "twofish.qcow2",
        "encrypt.cipher-alg=twofish-256,encrypt.hash-alg=sha512",
        false,
    );
    qemu_reads(&q, "qcow2", &twofish, 0, &src);
    qemu_check_clean(&q, &twofish, 0);
    run_ok(&mut qemu_amend(&q, d, &twofish, 0, &add_slot(2), false));
    qimg_reads(&twofish, 2, &src);
    info_agrees(&q, &twofish);
}

/// On a terminal, a new key is asked twice (and must match); a secret
/// given with `data=` on the command line draws a warning.
#[test]
fn new_keys_are_asked_twice_on_a_terminal() {
    let Some(script) = tool("script") else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vol = d.join("t.luks");
    let k0 = key_file(d, 0);
    qimg_create_luks(&vol, &k0, "iter-time=10", "1M");
    // `script` runs qimg on a pseudo-terminal fed from our standard input.
    let under_pty_cmd = |args: &str, input: &str| qimg_on_pty(&script, args, input);
    let add = format!(
        "luks add-key -i 10 --key-file {} {}",
        k0.display(),
        vol.display()
    );
    let under_pty = |input: &str| under_pty_cmd(&add, input);
    let (ok, out) = under_pty("typed one\ntyped two\n");
    assert!(!ok && out.contains("do not match"), "{out}");
    let (ok, out) = under_pty("typed key\ntyped key\n");
    assert!(ok && out.contains("Verify passphrase"), "{out}");
    let typed = write_tmp(d, "typed", b"typed key");
    run_ok(
        qimg()
            .args(["convert", "-O", "raw", "--key-file"])
            .arg(&typed)
            .arg(&vol)
            .arg(d.join("out.raw")),
    );
    let dump = qimg_luks_dump(&vol);
    assert_eq!(dump["slots"][1]["active"], true);
    assert_eq!(dump["slots"][2]["active"], false);

    // Off a terminal with no key given, qimg says how to give one.
    let e = fails(
        qimg_luks("add-key", &["-i", "10"], Some(&k0), &vol, None)
            .stdin(std::process::Stdio::null()),
    );
    assert!(e.contains("not a terminal"), "{e}");

    // Erasing the last key slot asks for YES on a terminal.
    let last = d.join("last.luks");
    qimg_create_luks(&last, &k0, "iter-time=10", "1M");
    let remove = format!("luks remove-key {} {}", last.display(), k0.display());
    let (ok, out) = under_pty_cmd(&remove, "no\n");
    assert!(
        !ok && out.contains("last key slot") && out.contains("aborted"),
        "{out}"
    );
    let dump = qimg_luks_dump(&last);
    assert_eq!(dump["slots"][0]["active"], true);
    let (ok, out) = under_pty_cmd(&remove, "YES\n");
    assert!(ok, "{out}");
    let dump = qimg_luks_dump(&last);
    assert_eq!(dump["slots"][0]["active"], false);

    let out = qimg()
        .arg("amend")
        .args(["--object", &format!("secret,id=s0,data={}", PASS[0])])
        .args(["--object", &format!("secret,id=s1,data={}", PASS[1])])
        .args([
            "-o",
            "key-secret=s0,state=active,new-secret=s1,iter-time=10",
        ])
        .arg(&vol)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // The data= advice is for terminals only (cli_dropin.rs); a piped
    // stderr stays empty on success, as qemu-img's does.
    assert!(err.is_empty(), "{err}");
}

/// The cryptsetup-style verbs also reach the LUKS header inside an
/// encrypted qcow2 image; qemu-img sees the result.
#[test]
fn luks_key_verbs_on_encrypted_qcow2() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = write_tmp(d, "src.raw", &pattern(128 << 10, 15, 0));
    let img = encrypted_qcow2(&q, d, &src, "k.qcow2", "", true);
    let k: Vec<PathBuf> = (0..3).map(|i| key_file(d, i)).collect();
    for (verb, new) in [("add-key", &k[1]), ("change-key", &k[2])] {
        run_ok(&mut qimg_luks(
            verb,
            &["-i", "10"],
            Some(&k[0]),
            &img,
            Some(new),
        ));
    }
    assert_eq!(active_slots(&q, &img)[..3], [false, true, true]);
    qemu_reads(&q, "qcow2", &img, 2, &src);
    run_ok(&mut qimg_luks("remove-key", &[], None, &img, Some(&k[2])));
    qemu_reads(&q, "qcow2", &img, 1, &src);
    qemu_check_clean(&q, &img, 1);
    assert_eq!(active_slots(&q, &img)[..3], [false, true, false]);

    // Header backup and restore of the LUKS region inside the image.
    let bak = d.join("k.hdr");
    run_ok(&mut qimg_header_backup(&img, &bak));
    assert_eq!(qimg_luks_dump(&bak)["slots"][1]["active"], true);
    run_ok(&mut qimg_luks(
        "remove-key",
        &["-q"],
        None,
        &img,
        Some(&k[1]),
    ));
    assert!(active_slots(&q, &img).iter().all(|a| !a));
    run_ok(&mut qimg_header_restore(&img, &bak));
    qemu_reads(&q, "qcow2", &img, 1, &src);
    qemu_check_clean(&q, &img, 1);
}
