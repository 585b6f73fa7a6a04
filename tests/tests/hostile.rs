//! Hand-made hostile images: a good image made by qemu-img (or cryptsetup),
//! then one field poked per case — the open-time errors of QEMU's iotests
//! 080, oversized tables, loops, truncated files, and every LUKS evil_hdr
//! case. `qimg info`, `qimg check` and `qimg convert` must each end with a
//! one-line error naming the file (or, where the damage is only in data the
//! command need not read, succeed), never a panic or a hang, and never grow
//! past [`RSS_BOUND_KIB`] of resident memory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use qimg_tests::qemu::{pattern, write_tmp, Qemu};
use qimg_tests::{testdata, tool, unxz};

/// Whether `qimg check` exists yet (issue 7 adds it).
const WITH_CHECK: bool = true;

/// The resident-memory bound of every qimg run on a hostile image.
const RSS_BOUND_KIB: i64 = 100 * 1024;

/// What a case must do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Want {
    /// Every command fails to open the image.
    OpenError,
    /// The image opens (info works); reading all of it (convert) fails.
    ReadError,
    /// The image opens; what the commands do beyond that is not fixed, but
    /// they finish cleanly either way.
    Either,
}

struct Case {
    name: String,
    path: PathBuf,
    want: Want,
    /// A word the error must contain (lower case), when one is fixed.
    says: &'static str,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}
fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

// qcow2 header field offsets (docs/interop/qcow2.txt).
const VERSION: usize = 4;
const BACKING_OFFSET: usize = 8;
const BACKING_SIZE: usize = 16;
const CLUSTER_BITS: usize = 20;
const SIZE: usize = 24;
const CRYPT: usize = 32;
const L1_SIZE: usize = 36;
const L1_OFFSET: usize = 40;
const RT_OFFSET: usize = 48;
const RT_CLUSTERS: usize = 56;
const NB_SNAPSHOTS: usize = 60;
const SNAPSHOTS_OFFSET: usize = 64;
const INCOMPAT: usize = 72;
const REFCOUNT_ORDER: usize = 96;
const HEADER_LENGTH: usize = 100;

struct Maker<'a> {
    dir: &'a Path,
    cases: Vec<Case>,
}

impl Maker<'_> {
    fn add(&mut self, name: &str, bytes: &[u8], want: Want, says: &'static str) {
        let path = write_tmp(self.dir, &format!("{name}.img"), bytes);
        self.cases.push(Case {
            name: name.into(),
            path,
            want,
            says,
        });
    }

    /// A copy of `base` with `poke` applied.
    fn poke(
        &mut self,
        name: &str,
        base: &[u8],
        want: Want,
        says: &'static str,
        poke: impl FnOnce(&mut Vec<u8>),
    ) {
        let mut b = base.to_vec();
        poke(&mut b);
        self.add(name, &b, want, says);
    }
}

/// The first L2 table's offset (from the first L1 entry).
fn first_l2(b: &[u8]) -> usize {
    let l1 = usize::try_from(be64(b, L1_OFFSET)).unwrap();
    usize::try_from(be64(b, l1) & 0x00ff_ffff_ffff_fe00).unwrap()
}

fn qcow2_cases(m: &mut Maker<'_>, q: &Qemu) {
    let dir = m.dir.to_path_buf();
    let data = write_tmp(&dir, "data.bin", &pattern(64 * 1024, 3, 0));
    // A v3 image with 4 KiB clusters and data in its first clusters.
    let good = dir.join("good.qcow2");
    q.create(&good, "qcow2", "cluster_size=4096", "1M");
    q.write_file(&good, "qcow2", 0, &data);
    let g = std::fs::read(&good).unwrap();
    // A compressed image.
    let comp = dir.join("comp.qcow2");
    let raw = write_tmp(&dir, "src.raw", &pattern(64 * 1024, 5, 0));
    q.img(&[
        "convert",
        "-q",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        raw.to_str().unwrap(),
        comp.to_str().unwrap(),
    ]);
    let c = std::fs::read(&comp).unwrap();
    // An image with a snapshot.
    let snap = dir.join("snap.qcow2");
    q.create(&snap, "qcow2", "cluster_size=4096", "1M");
    q.write_file(&snap, "qcow2", 0, &data);
    q.img(&["snapshot", "-c", "s1", snap.to_str().unwrap()]);
    let s = std::fs::read(&snap).unwrap();
    let snap_off = usize::try_from(be64(&s, SNAPSHOTS_OFFSET)).unwrap();

    use Want::*;
    // Truncations.
    // An empty file is a valid (empty) raw image, as in qemu-img.
    m.add("empty", &[], Either, "");
    m.add("magic-only", &g[..4], OpenError, "");
    m.add("half-header", &g[..50], OpenError, "");
    m.add("v3-header-cut", &g[..90], OpenError, "");
    // Reads past the end of the file return zeros, as in qemu-img.
    m.poke("truncated-in-l2", &g, Either, "", |b| {
        let l2 = first_l2(b);
        b.truncate(l2 + 100);
    });
    m.poke("truncated-in-data", &g, Either, "", |b| {
        let n = b.len() - 20_000;
        b.truncate(n);
    });
    // iotests 080-style header fields.
    m.poke("version-1", &g, OpenError, "version", |b| {
        put32(b, VERSION, 1)
    });
    m.poke("version-4", &g, OpenError, "version", |b| {
        put32(b, VERSION, 4)
    });
    m.poke("cluster-bits-8", &g, OpenError, "cluster", |b| {
        put32(b, CLUSTER_BITS, 8)
    });
    m.poke("cluster-bits-22", &g, OpenError, "cluster", |b| {
        put32(b, CLUSTER_BITS, 22)
    });
    m.poke("cluster-bits-63", &g, OpenError, "cluster", |b| {
        put32(b, CLUSTER_BITS, 63)
    });
    m.poke("header-length-small", &g, OpenError, "header", |b| {
        put32(b, HEADER_LENGTH, 72)
    });
    m.poke("header-length-huge", &g, OpenError, "header", |b| {
        put32(b, HEADER_LENGTH, 0x10000)
    });
    m.poke("refcount-order-7", &g, OpenError, "refcount", |b| {
        put32(b, REFCOUNT_ORDER, 7)
    });
    m.poke("size-2^63", &g, OpenError, "", |b| put64(b, SIZE, 1 << 63));
    m.poke("l1-size-huge", &g, OpenError, "l1", |b| {
        put32(b, L1_SIZE, 0x1000_0000)
    });
    m.poke("l1-too-small-for-size", &g, OpenError, "l1", |b| {
        put64(b, SIZE, 1 << 40)
    });
    m.poke("l1-unaligned", &g, OpenError, "l1", |b| {
        let v = be64(b, L1_OFFSET);
        put64(b, L1_OFFSET, v + 8);
    });
    m.poke("l1-past-eof", &g, Either, "", |b| {
        put64(b, L1_OFFSET, 1 << 40)
    });
    m.poke("l1-offset-overflow", &g, OpenError, "l1", |b| {
        put64(b, L1_OFFSET, u64::MAX - 4095)
    });
    m.poke("reftable-unaligned", &g, OpenError, "refcount", |b| {
        let v = be64(b, RT_OFFSET);
        put64(b, RT_OFFSET, v + 512);
    });
    m.poke("reftable-huge", &g, OpenError, "refcount", |b| {
        put32(b, RT_CLUSTERS, 0x0100_0000)
    });
    m.poke("reftable-overflow", &g, OpenError, "refcount", |b| {
        put64(b, RT_OFFSET, u64::MAX - 4095)
    });
    m.poke("crypt-method-3", &g, OpenError, "crypt", |b| {
        put32(b, CRYPT, 3)
    });
    m.poke("crypt-luks-no-extension", &g, OpenError, "", |b| {
        put32(b, CRYPT, 2)
    });
    m.poke("unknown-incompatible-bit", &g, OpenError, "feature", |b| {
        put64(b, INCOMPAT, 1 << 40)
    });
    m.poke("corrupt-bit", &g, Either, "", |b| put64(b, INCOMPAT, 2));
    m.poke("backing-name-too-long", &g, OpenError, "backing", |b| {
        put64(b, BACKING_OFFSET, 512);
        put32(b, BACKING_SIZE, 2000);
    });
    m.poke("backing-name-past-cluster", &g, OpenError, "backing", |b| {
        put64(b, BACKING_OFFSET, 4090);
        put32(b, BACKING_SIZE, 100);
    });
    m.poke("extension-length-huge", &g, OpenError, "extension", |b| {
        let start = usize::try_from(be32(b, HEADER_LENGTH)).unwrap();
        put32(b, start, 0x1234_5678);
        put32(b, start + 4, 0x00ff_ffff);
    });
    m.poke("extension-flood", &g, Either, "", |b| {
        // Hundreds of tiny unknown extensions filling the header cluster.
        let start = usize::try_from(be32(b, HEADER_LENGTH)).unwrap();
        let mut p = start;
        while p + 16 <= 4000 {
            put32(b, p, 0x1000_0000 + u32::try_from(p).unwrap());
            put32(b, p + 4, 0);
            p += 8;
        }
        put64(b, p, 0);
    });
    // L1/L2 entries.
    m.poke("l1-entry-unaligned", &g, ReadError, "", |b| {
        let l1 = usize::try_from(be64(b, L1_OFFSET)).unwrap();
        let v = be64(b, l1);
        put64(b, l1, v + 512);
    });
    m.poke("l1-entry-past-eof", &g, Either, "", |b| {
        let l1 = usize::try_from(be64(b, L1_OFFSET)).unwrap();
        put64(b, l1, (1 << 63) | (1 << 45));
    });
    m.poke("l2-points-at-l1", &g, Either, "", |b| {
        let l1 = be64(b, L1_OFFSET);
        let l2 = first_l2(b);
        put64(b, l2, (1 << 63) | l1);
    });
    m.poke("l1-points-at-header", &g, Either, "", |b| {
        let l1 = usize::try_from(be64(b, L1_OFFSET)).unwrap();
        put64(b, l1, 1 << 63);
    });
    m.poke("l2-entry-past-eof", &g, Either, "", |b| {
        let l2 = first_l2(b);
        put64(b, l2, (1 << 63) | (1 << 44));
    });
    m.poke("l2-entry-unaligned", &g, ReadError, "", |b| {
        let l2 = first_l2(b);
        let v = be64(b, l2);
        put64(b, l2, v + 512);
    });
    // Compressed clusters.
    m.poke("compressed-garbage", &c, Either, "", |b| {
        let l2 = first_l2(b);
        let desc = be64(b, l2);
        let host = usize::try_from(desc & ((1 << 58) - 1)).unwrap();
        for x in &mut b[host..host + 256] {
            *x = 0xff;
        }
    });
    m.poke("compressed-past-eof", &c, ReadError, "", |b| {
        let l2 = first_l2(b);
        put64(b, l2, (1 << 62) | (1 << 50));
    });
    m.poke("compressed-huge-length", &c, Either, "", |b| {
        let l2 = first_l2(b);
        let desc = be64(b, l2);
        put64(b, l2, desc | (0xff << 52));
    });
    // Refcount structures.
    m.poke("reftable-entry-points-at-itself", &g, Either, "", |b| {
        let rt = be64(b, RT_OFFSET);
        put64(b, usize::try_from(rt).unwrap(), rt);
    });
    m.poke("reftable-entry-past-eof", &g, Either, "", |b| {
        let rt = usize::try_from(be64(b, RT_OFFSET)).unwrap();
        put64(b, rt, 1 << 45);
    });
    // Snapshots.
    m.poke("snapshots-huge-count", &s, OpenError, "snapshot", |b| {
        put32(b, NB_SNAPSHOTS, 0x0100_0000)
    });
    m.poke("snapshots-unaligned", &s, OpenError, "snapshot", |b| {
        let v = be64(b, SNAPSHOTS_OFFSET);
        put64(b, SNAPSHOTS_OFFSET, v + 8);
    });
    m.poke("snapshots-past-eof", &s, Either, "", |b| {
        put64(b, SNAPSHOTS_OFFSET, 1 << 40)
    });
    m.poke("snapshot-l1-huge", &s, Either, "", |b| {
        put32(b, snap_off + 8, 0x1000_0000)
    });
    m.poke("snapshot-extra-huge", &s, OpenError, "snapshot", |b| {
        put32(b, snap_off + 36, 0x00ff_ffff)
    });
    m.poke("snapshot-name-huge", &s, OpenError, "snapshot", |b| {
        b[snap_off + 14..snap_off + 16].copy_from_slice(&0xffffu16.to_be_bytes());
    });
    // Backing chains that loop: the image itself opens (qemu-img info
    // shows it too), reading through the chain is refused.
    let me = dir.join("loop-self.qcow2");
    q.create(&me, "qcow2", "cluster_size=4096", "1M");
    q.img(&[
        "rebase",
        "-u",
        "-F",
        "qcow2",
        "-b",
        me.to_str().unwrap(),
        me.to_str().unwrap(),
    ]);
    m.cases.push(Case {
        name: "backing-names-itself".into(),
        path: me,
        want: ReadError,
        says: "backing",
    });
    let a = dir.join("loop-a.qcow2");
    let bb = dir.join("loop-b.qcow2");
    q.create(&a, "qcow2", "cluster_size=4096", "1M");
    q.create(&bb, "qcow2", "cluster_size=4096", "1M");
    q.img(&[
        "rebase",
        "-u",
        "-F",
        "qcow2",
        "-b",
        bb.to_str().unwrap(),
        a.to_str().unwrap(),
    ]);
    q.img(&[
        "rebase",
        "-u",
        "-F",
        "qcow2",
        "-b",
        a.to_str().unwrap(),
        bb.to_str().unwrap(),
    ]);
    m.cases.push(Case {
        name: "backing-loop-of-two".into(),
        path: a,
        want: ReadError,
        says: "backing",
    });
}

fn luks_cases(m: &mut Maker<'_>) {
    use Want::*;
    let dir = m.dir.to_path_buf();
    for (f, want) in [
        ("evil_hdr-keyslot_overlap.xz", OpenError),
        ("evil_hdr-luks_hdr_damage.xz", OpenError),
        ("evil_hdr-payload_overwrite.xz", OpenError),
        ("evil_hdr-small_luks_device.xz", OpenError),
        ("evil_hdr-stripes_payload_dmg.xz", OpenError),
    ] {
        let Some(src) = testdata(&format!("cryptsetup/{f}")) else {
            return;
        };
        let p = unxz(&src, &dir);
        m.cases.push(Case {
            name: f.trim_end_matches(".xz").into(),
            path: p,
            want,
            says: "",
        });
    }
    let Some(cs) = tool("cryptsetup") else {
        return;
    };
    let pass = write_tmp(&dir, "pass", b"hostile");
    let vol = dir.join("good-luks.img");
    std::fs::write(&vol, vec![0u8; 4 << 20]).unwrap();
    qimg_tests::run_ok(
        Command::new(cs)
            .args([
                "luksFormat",
                "-q",
                "--type",
                "luks1",
                "--pbkdf-force-iterations",
                "1000",
            ])
            .args(["--key-file"])
            .arg(&pass)
            .arg(&vol),
    );
    let v = std::fs::read(&vol).unwrap();
    // LUKS1 phdr: key_bytes at 108, mk_digest_iter at 164, slot 0 at 208
    // (active 0, iterations 4, salt 8, key material offset 40, stripes 44).
    m.poke("luks-key-bytes-0", &v, OpenError, "", |b| put32(b, 108, 0));
    m.poke("luks-key-bytes-huge", &v, OpenError, "", |b| {
        put32(b, 108, 0x0100_0000)
    });
    m.poke("luks-stripes-huge", &v, OpenError, "", |b| {
        put32(b, 208 + 44, 0x7fff_ffff)
    });
    m.poke("luks-key-material-past-eof", &v, OpenError, "", |b| {
        put32(b, 208 + 40, 0x0100_0000)
    });
    m.poke("luks-payload-offset-huge", &v, OpenError, "", |b| {
        put32(b, 104, 0x7fff_ffff)
    });
    m.poke("luks-truncated", &v, OpenError, "", |b| b.truncate(300));
}

/// Runs qimg on `case` under `rss-of`, returning (success, stderr without
/// the RSS line, peak RSS in KiB). A `check` that finished counts as a
/// success when the image is clean, and otherwise reports with an empty
/// error: its findings (on stderr, as qemu-img prints them) are the
/// answer, exit 2 or 3; exit 1 means it could not check, with an error.
fn run(case: &Case, args: &[&str]) -> (bool, String, i64) {
    let out = Command::new(env!("CARGO_BIN_EXE_rss-of"))
        .arg(qimg_tests::qimg_bin())
        .args(args)
        .arg(&case.path)
        .args(if args[0] == "convert" {
            vec![case.path.with_extension("out")]
        } else {
            vec![]
        })
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let (err, rss) = err
        .trim_end()
        .rsplit_once('\n')
        .map_or(("", err.trim_end()), |(a, b)| (a, b));
    let rss = rss
        .strip_prefix("rss-of: ")
        .and_then(|r| r.strip_suffix(" KiB"))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no RSS line from rss-of: {err}"));
    let code = out.status.code();
    if args[0] == "check" && matches!(code, Some(2 | 3 | 63)) {
        return (false, String::new(), rss);
    }
    (out.status.success(), err.to_string(), rss)
}

fn clean_error(case: &Case, verb: &str, err: &str, bad: &mut Vec<String>) {
    let file = case.path.file_name().unwrap().to_string_lossy().to_string();
    let name = &case.name;
    if err.contains("panicked") || err.contains("RUST_BACKTRACE") {
        bad.push(format!("{name}: qimg {verb} panicked: {err}"));
    }
    if !err.contains(&file) {
        bad.push(format!(
            "{name}: qimg {verb} error does not name the file: {err}"
        ));
    }
    let lines = err.lines().filter(|l| !l.trim().is_empty()).count();
    if !(1..=3).contains(&lines) {
        bad.push(format!(
            "{name}: qimg {verb} should fail in one line (plus at most a hint): {err}"
        ));
    }
    if !case.says.is_empty() && !err.to_lowercase().contains(case.says) {
        bad.push(format!(
            "{name}: qimg {verb} error should mention `{}`: {err}",
            case.says
        ));
    }
}

#[test]
fn hostile_images_get_clear_errors_in_bounded_memory() {
    let Some(q) = Qemu::find() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // QIMG_KEEP_HOSTILE=1 keeps the images for a look with other tools.
    let dir = if std::env::var_os("QIMG_KEEP_HOSTILE").is_some() {
        tmp.keep()
    } else {
        tmp.path().to_path_buf()
    };
    let mut m = Maker {
        dir: &dir,
        cases: Vec::new(),
    };
    qcow2_cases(&mut m, &q);
    luks_cases(&mut m);
    assert!(m.cases.len() >= 40, "only {} hostile images", m.cases.len());
    let mut bad = Vec::new();
    let mut max_rss = 0;
    for case in &m.cases {
        let (info_ok, info_err, info_rss) = run(case, &["info"]);
        let (conv_ok, conv_err, conv_rss) = run(case, &["convert", "-O", "raw"]);
        let (check_ok, check_err, check_rss) = if WITH_CHECK {
            run(case, &["check"])
        } else {
            (info_ok, info_err.clone(), info_rss)
        };
        for (verb, rss) in [
            ("info", info_rss),
            ("convert", conv_rss),
            ("check", check_rss),
        ] {
            if rss >= RSS_BOUND_KIB {
                bad.push(format!(
                    "{}: qimg {verb} reached {rss} KiB resident",
                    case.name
                ));
            }
            max_rss = max_rss.max(rss);
        }
        let name = &case.name;
        match case.want {
            Want::OpenError => {
                if info_ok {
                    bad.push(format!("{name}: qimg info opened a hostile image"));
                }
                if conv_ok {
                    bad.push(format!("{name}: qimg convert read a hostile image"));
                }
                if check_ok {
                    bad.push(format!("{name}: qimg check passed a hostile image"));
                }
            }
            Want::ReadError => {
                if !info_ok {
                    bad.push(format!("{name}: qimg info should open it: {info_err}"));
                }
                if conv_ok {
                    bad.push(format!(
                        "{name}: qimg convert read damaged data without error"
                    ));
                }
            }
            Want::Either => {}
        }
        for (verb, ok, err) in [
            ("info", info_ok, &info_err),
            ("convert", conv_ok, &conv_err),
            ("check", check_ok, &check_err),
        ] {
            // `qimg check` reports what it found on stdout; a non-zero exit
            // with nothing on stderr is a finished check, not an error.
            let finished_check = verb == "check" && err.is_empty();
            if !ok && !finished_check {
                clean_error(case, verb, err, &mut bad);
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} problems:\n{}",
        bad.len(),
        bad.join("\n")
    );
    println!(
        "{} hostile images; largest qimg RSS {max_rss} KiB",
        m.cases.len()
    );
}
