//! Hand-made hostile images: a good image made by qemu-img (or cryptsetup),
//! then one field poked per case — the open-time errors of QEMU's iotests
//! 080, oversized tables, loops, truncated files, and every LUKS evil_hdr
//! case. `qimg info`, `qimg check` and `qimg convert` must each end with a
//! one-line error naming the file (or, where the damage is only in data the
//! command need not read, succeed), never a panic or a hang, and never grow
//! past [`RSS_BOUND_KIB`] of resident memory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;

use qcow_core::header::field;
use qimg_tests::cryptsetup::{Cryptsetup, LUKS1_FAST};
use qimg_tests::poke::{get64, get_field, l2_table, put16, put32, put64, put_field};
use qimg_tests::qemu::{pattern, write_tmp, Qemu};
use qimg_tests::{testdata, unxz};

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

struct Maker<'a> {
    dir: &'a Path,
    cases: Vec<Case>,
}

impl Maker<'_> {
    fn add(&mut self, name: &str, bytes: &[u8], want: Want, says: &'static str) {
        let path = write_tmp(self.dir, &format!("{name}.img"), bytes);
        self.add_file(name, path, want, says);
    }

    /// An image already at `path`.
    fn add_file(&mut self, name: &str, path: PathBuf, want: Want, says: &'static str) {
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
    q.convert(
        &["-q", "-c", "-O", "qcow2", "-o", "cluster_size=4096"],
        &raw,
        &comp,
    );
    let c = std::fs::read(&comp).unwrap();
    // An image with a snapshot.
    let snap = dir.join("snap.qcow2");
    q.create(&snap, "qcow2", "cluster_size=4096", "1M");
    q.write_file(&snap, "qcow2", 0, &data);
    q.img(&["snapshot", "-c", "s1", snap.to_str().unwrap()]);
    let s = std::fs::read(&snap).unwrap();
    let snap_off = get_field(&s, field::SNAPSHOTS_OFFSET);

    use Want::*;
    // Truncations.
    // An empty file is a valid (empty) raw image, as in qemu-img.
    m.add("empty", &[], Either, "");
    m.add("magic-only", &g[..4], OpenError, "");
    m.add("half-header", &g[..50], OpenError, "");
    m.add("v3-header-cut", &g[..90], OpenError, "");
    // Reads past the end of the file return zeros, as in qemu-img.
    m.poke("truncated-in-l2", &g, Either, "", |b| {
        let l2 = l2_table(b, 0);
        b.truncate(usize::try_from(l2 + 100).unwrap());
    });
    m.poke("truncated-in-data", &g, Either, "", |b| {
        let n = b.len() - 20_000;
        b.truncate(n);
    });
    // One header field set to a bad value (iotests 080 and friends).
    #[rustfmt::skip]
    let one_field: [(&str, Range<usize>, u64, Want, &'static str); 19] = [
        ("version-1", field::VERSION, 1, OpenError, "version"),
        ("version-4", field::VERSION, 4, OpenError, "version"),
        ("cluster-bits-8", field::CLUSTER_BITS, 8, OpenError, "cluster"),
        ("cluster-bits-22", field::CLUSTER_BITS, 22, OpenError, "cluster"),
        ("cluster-bits-63", field::CLUSTER_BITS, 63, OpenError, "cluster"),
        ("header-length-small", field::HEADER_LENGTH, 72, OpenError, "header"),
        ("header-length-huge", field::HEADER_LENGTH, 0x10000, OpenError, "header"),
        ("refcount-order-7", field::REFCOUNT_ORDER, 7, OpenError, "refcount"),
        ("size-2^63", field::SIZE, 1 << 63, OpenError, ""),
        ("l1-size-huge", field::L1_SIZE, 0x1000_0000, OpenError, "l1"),
        ("l1-too-small-for-size", field::SIZE, 1 << 40, OpenError, "l1"),
        ("l1-past-eof", field::L1_TABLE_OFFSET, 1 << 40, Either, ""),
        ("l1-offset-overflow", field::L1_TABLE_OFFSET, u64::MAX - 4095, OpenError, "l1"),
        ("reftable-huge", field::REFCOUNT_TABLE_CLUSTERS, 0x0100_0000, OpenError, "refcount"),
        ("reftable-overflow", field::REFCOUNT_TABLE_OFFSET, u64::MAX - 4095, OpenError, "refcount"),
        ("crypt-method-3", field::CRYPT_METHOD, 3, OpenError, "crypt"),
        ("crypt-luks-no-extension", field::CRYPT_METHOD, 2, OpenError, ""),
        ("unknown-incompatible-bit", field::INCOMPATIBLE_FEATURES, 1 << 40, OpenError, "feature"),
        ("corrupt-bit", field::INCOMPATIBLE_FEATURES, 2, Either, ""),
    ];
    for (name, f, v, want, says) in one_field {
        m.poke(name, &g, want, says, |b| put_field(b, f, v));
    }
    // One header offset moved off its alignment.
    for (name, f, by, says) in [
        ("l1-unaligned", field::L1_TABLE_OFFSET, 8, "l1"),
        (
            "reftable-unaligned",
            field::REFCOUNT_TABLE_OFFSET,
            512,
            "refcount",
        ),
    ] {
        m.poke(name, &g, OpenError, says, |b| {
            let v = get_field(b, f.clone());
            put_field(b, f, v + by);
        });
    }
    m.poke("backing-name-too-long", &g, OpenError, "backing", |b| {
        put_field(b, field::BACKING_FILE_OFFSET, 512);
        put_field(b, field::BACKING_FILE_SIZE, 2000);
    });
    m.poke("backing-name-past-cluster", &g, OpenError, "backing", |b| {
        put_field(b, field::BACKING_FILE_OFFSET, 4090);
        put_field(b, field::BACKING_FILE_SIZE, 100);
    });
    m.poke("extension-length-huge", &g, OpenError, "extension", |b| {
        let start = get_field(b, field::HEADER_LENGTH);
        put32(b, start, 0x1234_5678);
        put32(b, start + 4, 0x00ff_ffff);
    });
    m.poke("extension-flood", &g, Either, "", |b| {
        // Hundreds of tiny unknown extensions filling the header cluster.
        let start = get_field(b, field::HEADER_LENGTH);
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
        let l1 = get_field(b, field::L1_TABLE_OFFSET);
        let v = get64(b, l1);
        put64(b, l1, v + 512);
    });
    m.poke("l1-entry-past-eof", &g, Either, "", |b| {
        let l1 = get_field(b, field::L1_TABLE_OFFSET);
        put64(b, l1, (1 << 63) | (1 << 45));
    });
    m.poke("l2-points-at-l1", &g, Either, "", |b| {
        let l1 = get_field(b, field::L1_TABLE_OFFSET);
        let l2 = l2_table(b, 0);
        put64(b, l2, (1 << 63) | l1);
    });
    m.poke("l1-points-at-header", &g, Either, "", |b| {
        let l1 = get_field(b, field::L1_TABLE_OFFSET);
        put64(b, l1, 1 << 63);
    });
    m.poke("l2-entry-past-eof", &g, Either, "", |b| {
        let l2 = l2_table(b, 0);
        put64(b, l2, (1 << 63) | (1 << 44));
    });
    m.poke("l2-entry-unaligned", &g, ReadError, "", |b| {
        let l2 = l2_table(b, 0);
        let v = get64(b, l2);
        put64(b, l2, v + 512);
    });
    // Compressed clusters.
    m.poke("compressed-garbage", &c, Either, "", |b| {
        let l2 = l2_table(b, 0);
        let desc = get64(b, l2);
        let host = usize::try_from(desc & ((1 << 58) - 1)).unwrap();
        for x in &mut b[host..host + 256] {
            *x = 0xff;
        }
    });
    m.poke("compressed-past-eof", &c, ReadError, "", |b| {
        let l2 = l2_table(b, 0);
        put64(b, l2, (1 << 62) | (1 << 50));
    });
    m.poke("compressed-huge-length", &c, Either, "", |b| {
        let l2 = l2_table(b, 0);
        let desc = get64(b, l2);
        put64(b, l2, desc | (0xff << 52));
    });
    // Refcount structures.
    m.poke("reftable-entry-points-at-itself", &g, Either, "", |b| {
        let rt = get_field(b, field::REFCOUNT_TABLE_OFFSET);
        put64(b, rt, rt);
    });
    m.poke("reftable-entry-past-eof", &g, Either, "", |b| {
        let rt = get_field(b, field::REFCOUNT_TABLE_OFFSET);
        put64(b, rt, 1 << 45);
    });
    // Snapshots.
    m.poke("snapshots-huge-count", &s, OpenError, "snapshot", |b| {
        put_field(b, field::NB_SNAPSHOTS, 0x0100_0000)
    });
    m.poke("snapshots-unaligned", &s, OpenError, "snapshot", |b| {
        let v = get_field(b, field::SNAPSHOTS_OFFSET);
        put_field(b, field::SNAPSHOTS_OFFSET, v + 8);
    });
    m.poke("snapshots-past-eof", &s, Either, "", |b| {
        put_field(b, field::SNAPSHOTS_OFFSET, 1 << 40)
    });
    m.poke("snapshot-l1-huge", &s, Either, "", |b| {
        put32(b, snap_off + 8, 0x1000_0000)
    });
    m.poke("snapshot-extra-huge", &s, OpenError, "snapshot", |b| {
        put32(b, snap_off + 36, 0x00ff_ffff)
    });
    // A 65,535-byte name running past the end of the file: qemu-img 10
    // opens it (reading zeros past the end) and its check reports the table
    // past the end; qimg does the same since names may be any 16-bit length.
    m.poke("snapshot-name-huge", &s, Either, "snapshot", |b| {
        put16(b, snap_off + 14, 0xffff);
    });
    // Backing chains that loop: the image itself opens (qemu-img info
    // shows it too), reading through the chain is refused.
    let rebase_unsafe = |img: &Path, backing: &Path| {
        let (img, backing) = (img.to_str().unwrap(), backing.to_str().unwrap());
        q.img(&["rebase", "-u", "-F", "qcow2", "-b", backing, img]);
    };
    let me = dir.join("loop-self.qcow2");
    q.create(&me, "qcow2", "cluster_size=4096", "1M");
    rebase_unsafe(&me, &me);
    m.add_file("backing-names-itself", me, ReadError, "backing");
    let a = dir.join("loop-a.qcow2");
    let bb = dir.join("loop-b.qcow2");
    q.create(&a, "qcow2", "cluster_size=4096", "1M");
    q.create(&bb, "qcow2", "cluster_size=4096", "1M");
    rebase_unsafe(&a, &bb);
    rebase_unsafe(&bb, &a);
    m.add_file("backing-loop-of-two", a, ReadError, "backing");
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
        m.add_file(f.trim_end_matches(".xz"), p, want, "");
    }
    let Some(cs) = Cryptsetup::find() else {
        return;
    };
    let pass = write_tmp(&dir, "pass", b"hostile");
    let vol = dir.join("good-luks.img");
    std::fs::write(&vol, vec![0u8; 4 << 20]).unwrap();
    cs.format(&vol, None, &pass, LUKS1_FAST);
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
