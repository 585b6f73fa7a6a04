//! A matrix of qcow2 images built at test time with the installed qemu-img
//! (and qemu-io), each read back through qcow-core and compared with
//! `qemu-img convert -O raw` of the same image.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // test helpers: failing loudly is right

use std::path::{Path, PathBuf};
use std::process::Command;

use qcow_core::io::FileDevice;
use qcow_core::{BlockIo, MapKind, Qcow2};
use qimg_tests::{run_ok, sha256_file, sha256_hex, tool};
use serde_json::Value;

/// Any device error, as text: the dyn adapter layers of different types
/// are unified through (as the CLI does).
#[derive(Debug)]
struct AnyError(String);
impl std::fmt::Display for AnyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Maps a device's errors to [`AnyError`].
struct Any<T>(T);
impl<T: BlockIo> BlockIo for Any<T> {
    type Error = AnyError;
    fn sector_size(&self) -> u32 {
        self.0.sector_size()
    }
    fn size(&mut self) -> Result<u64, AnyError> {
        self.0.size().map_err(|e| AnyError(e.to_string()))
    }
    fn read_at(&mut self, o: u64, b: &mut [u8]) -> Result<(), AnyError> {
        self.0.read_at(o, b).map_err(|e| AnyError(e.to_string()))
    }
    fn write_at(&mut self, o: u64, b: &[u8]) -> Result<(), AnyError> {
        self.0.write_at(o, b).map_err(|e| AnyError(e.to_string()))
    }
    fn flush(&mut self) -> Result<(), AnyError> {
        self.0.flush().map_err(|e| AnyError(e.to_string()))
    }
}

/// A boxed device of any type.
struct Dyn(Box<dyn BlockIo<Error = AnyError>>);
impl BlockIo for Dyn {
    type Error = AnyError;
    fn sector_size(&self) -> u32 {
        self.0.sector_size()
    }
    fn size(&mut self) -> Result<u64, AnyError> {
        self.0.size()
    }
    fn read_at(&mut self, o: u64, b: &mut [u8]) -> Result<(), AnyError> {
        self.0.read_at(o, b)
    }
    fn write_at(&mut self, o: u64, b: &[u8]) -> Result<(), AnyError> {
        self.0.write_at(o, b)
    }
    fn flush(&mut self) -> Result<(), AnyError> {
        self.0.flush()
    }
}

/// A zeroed buffer for the reader to own.
fn zeroed(n: usize) -> Vec<u8> {
    vec![0u8; n]
}

fn is_qcow2(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.starts_with(b"QFI\xfb"))
}

/// Opens `path` with its whole backing chain and data file, as a device.
fn open_any(path: &Path, snapshot: Option<&str>) -> Dyn {
    if !is_qcow2(path) {
        return Dyn(Box::new(Any(FileDevice::open(path).unwrap())));
    }
    let dir = path.parent().unwrap();
    let img = Qcow2::open(Any(FileDevice::open(path).unwrap()), zeroed(16 * 4096)).unwrap();
    let cs = img.info().cluster_size() as usize;
    let info = img.info().clone();
    let img = img.with_compression_buffers(zeroed(cs + 512), zeroed(cs));
    let img = img.with_data_file_opt(
        info.data_file()
            .map(|name| Any(FileDevice::open(&dir.join(name)).unwrap())),
    );
    let mut img = img
        .with_backing_opt(
            info.backing_file()
                .map(|name| open_any(&dir.join(name), None)),
        )
        .unwrap();
    if let Some(s) = snapshot {
        let snap = img.find_snapshot(s).unwrap();
        img.select_snapshot(&snap).unwrap();
    }
    Dyn(Box::new(Any(img)))
}

/// sha256 of the whole disk read through `dev` in odd-sized chunks.
fn sha_of(dev: &mut impl BlockIo<Error = AnyError>) -> String {
    let size = dev.size().unwrap();
    let mut all = Vec::with_capacity(size as usize);
    let mut buf = vec![0u8; 3 * 512 * 1024 + 512 * 3];
    let mut pos = 0u64;
    while pos < size {
        let n = (buf.len() as u64).min(size - pos) as usize;
        dev.read_at(pos, &mut buf[..n]).unwrap();
        all.extend_from_slice(&buf[..n]);
        pos += n as u64;
    }
    sha256_hex(&all)
}

struct Env {
    qemu_img: PathBuf,
    qemu_io: Option<PathBuf>,
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Option<Self> {
        let qemu_img = tool("qemu-img")?;
        let qemu_io = tool("qemu-io");
        Some(Self {
            qemu_img,
            qemu_io,
            dir: tempfile::tempdir().unwrap(),
        })
    }
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn img(&self, args: &[&str]) {
        run_ok(
            Command::new(&self.qemu_img)
                .current_dir(self.dir.path())
                .args(args),
        );
    }
    /// `qemu-img convert -f raw -O qcow2 EXTRA SRC DST` in the folder.
    fn convert_raw(&self, src: &str, dst: &str, extra: &[&str]) {
        self.img(&[&["convert", "-f", "raw", "-O", "qcow2"], extra, &[src, dst]].concat());
    }
    /// `img` opened read-only by qcow-core, without a backing file.
    fn open(&self, img: &str) -> Qcow2<FileDevice, Vec<u8>> {
        Qcow2::open(FileDevice::open(&self.p(img)).unwrap(), zeroed(4096)).unwrap()
    }
    /// Runs qemu-io commands on an image; false (skip) when qemu-io is absent.
    fn io(&self, fmt: &str, img: &str, cmds: &[&str]) -> bool {
        let Some(q) = &self.qemu_io else { return false };
        let mut c = Command::new(q);
        c.current_dir(self.dir.path()).args(["-f", fmt]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c.arg(img);
        run_ok(&mut c);
        true
    }
    /// Random bytes with a fixed seed, a quarter of them in zero runs.
    fn source(&self, name: &str, len: usize, seed: u64) -> PathBuf {
        let mut x = seed | 1;
        let mut v = vec![0u8; len];
        for (i, chunk) in v.chunks_mut(8).enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if (i / 4096) % 4 != 3 {
                let b = x.to_le_bytes();
                chunk.copy_from_slice(&b[..chunk.len()]);
            }
        }
        let p = self.p(name);
        std::fs::write(&p, v).unwrap();
        p
    }
    /// `qemu-img convert -O raw` of `img` (with extra args), its sha256.
    fn reference(&self, img: &str, extra: &[&str]) -> String {
        let out = self.p(&format!("{img}.ref.raw"));
        let mut args = vec!["convert"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-O", "raw", img, out.to_str().unwrap()]);
        self.img(&args);
        let s = sha256_file(&out);
        std::fs::remove_file(out).unwrap();
        s
    }
    fn info(&self, img: &str) -> Value {
        let out = run_ok(
            Command::new(&self.qemu_img)
                .current_dir(self.dir.path())
                .args(["info", "--output=json", "-U", img]),
        );
        serde_json::from_slice(&out).unwrap()
    }
    /// Reads `img` through qcow-core and checks it against qemu-img.
    fn check(&self, img: &str) {
        let want = self.reference(img, &[]);
        let mut dev = open_any(&self.p(img), None);
        assert_eq!(
            sha_of(&mut dev),
            want,
            "{img}: content differs from qemu-img convert"
        );
        self.check_info(img);
    }
    /// Compares the header fields `qemu-img info` shows.
    fn check_info(&self, img: &str) {
        let j = self.info(img);
        let mut q = self.open(img);
        let i = q.info().clone();
        assert_eq!(j["virtual-size"].as_u64(), Some(i.virtual_size()), "{img}");
        assert_eq!(j["cluster-size"].as_u64(), Some(i.cluster_size()), "{img}");
        assert_eq!(j["dirty-flag"].as_bool(), Some(i.dirty()), "{img}");
        assert_eq!(j["backing-filename"].as_str(), i.backing_file(), "{img}");
        let fs = &j["format-specific"]["data"];
        assert_eq!(fs["compat"].as_str(), Some(i.compat()), "{img}");
        assert_eq!(
            fs["refcount-bits"].as_u64(),
            Some(u64::from(i.refcount_bits())),
            "{img}"
        );
        assert_eq!(
            fs["corrupt"].as_bool().unwrap_or(false),
            i.corrupt(),
            "{img}"
        );
        if i.header.version >= 3 {
            assert_eq!(
                fs["compression-type"].as_str(),
                Some(i.compression_type()),
                "{img}"
            );
            assert_eq!(fs["extended-l2"].as_bool(), Some(i.extended_l2()), "{img}");
            assert_eq!(
                fs["lazy-refcounts"].as_bool(),
                Some(i.lazy_refcounts()),
                "{img}"
            );
        }
        assert_eq!(fs["data-file"].as_str(), i.data_file(), "{img}");
        if i.data_file().is_some() {
            assert_eq!(
                fs["data-file-raw"].as_bool(),
                Some(i.data_file_raw()),
                "{img}"
            );
        }
        let want_bitmaps = fs["bitmaps"].as_array().cloned().unwrap_or_default();
        let mut bitmaps = Vec::new();
        q.for_each_bitmap(|b| {
            let mut flags = Vec::new();
            if b.in_use() {
                flags.push("in-use");
            }
            if b.auto() {
                flags.push("auto");
            }
            bitmaps.push(serde_json::json!({
                "flags": flags, "name": b.name_str().unwrap(), "granularity": b.granularity(),
            }));
            false
        })
        .unwrap();
        assert_eq!(bitmaps, want_bitmaps, "{img}");
        let snaps = j["snapshots"].as_array().cloned().unwrap_or_default();
        assert_eq!(snaps.len() as u32, q.snapshot_count(), "{img}");
        for (k, s) in snaps.iter().enumerate() {
            let ours = q.snapshot(k as u32).unwrap();
            assert_eq!(s["id"].as_str(), ours.id_str(), "{img}");
            assert_eq!(s["name"].as_str(), ours.name_str(), "{img}");
            assert_eq!(s["date-sec"].as_u64(), Some(u64::from(ours.fixed.date_sec)));
            assert_eq!(
                s["date-nsec"].as_u64(),
                Some(u64::from(ours.fixed.date_nsec))
            );
            assert_eq!(s["vm-clock-nsec"].as_u64(), Some(ours.fixed.vm_clock_nsec));
            assert_eq!(s["vm-state-size"].as_u64(), Some(ours.fixed.vm_state_size));
        }
    }
}

const MIB: usize = 1 << 20;

#[test]
fn converted_images_across_versions_cluster_sizes_and_refcount_widths() {
    let Some(env) = Env::new() else { return };
    let src = env.source("src.raw", 3 * MIB + 64 * 1024, 1);
    let src = src.to_str().unwrap();
    let cases: &[(&str, &str)] = &[
        ("v2-64k.qcow2", "compat=0.10,cluster_size=65536"),
        (
            "v3-512-r1.qcow2",
            "compat=1.1,cluster_size=512,refcount_bits=1",
        ),
        (
            "v3-4k-r64.qcow2",
            "compat=1.1,cluster_size=4096,refcount_bits=64",
        ),
        (
            "v3-2m-r16.qcow2",
            "compat=1.1,cluster_size=2097152,refcount_bits=16",
        ),
        (
            "v3-64k-r8.qcow2",
            "cluster_size=65536,refcount_bits=8,lazy_refcounts=on",
        ),
    ];
    for (name, opts) in cases {
        env.convert_raw(src, name, &["-o", opts]);
        env.check(name);
    }
}

#[test]
fn compressed_zlib_and_zstd() {
    let Some(env) = Env::new() else { return };
    let src = env.source("src.raw", 2 * MIB + 4096, 2);
    let src = src.to_str().unwrap();
    // Compressible data too: text-like runs.
    let text: Vec<u8> = (0..MIB).map(|i| b"qcow2 compress "[i % 15]).collect();
    std::fs::write(env.p("text.raw"), text).unwrap();
    for (input, name, opts) in [
        (src, "zlib-64k.qcow2", "cluster_size=65536"),
        ("text.raw", "zlib-text-4k.qcow2", "cluster_size=4096"),
        (
            "text.raw",
            "zstd-text-64k.qcow2",
            "cluster_size=65536,compression_type=zstd",
        ),
        (
            src,
            "zstd-4k.qcow2",
            "cluster_size=4096,compression_type=zstd",
        ),
        (
            "text.raw",
            "zstd-2m.qcow2",
            "cluster_size=2097152,compression_type=zstd",
        ),
    ] {
        env.convert_raw(input, name, &["-c", "-o", opts]);
        env.check(name);
        let mut q = env.open(name);
        // qemu-img keeps incompressible (random) clusters uncompressed.
        if input == "text.raw" {
            let m = q.map(0, 1 << 20).unwrap();
            assert!(matches!(m.kind, MapKind::Compressed(_)), "{name}: {m:?}");
        }
    }
}

#[test]
fn backing_chain_three_deep_with_short_raw_base() {
    let Some(env) = Env::new() else { return };
    // A raw base shorter than the overlays, and not sector aligned.
    env.source("base.raw", 3 * MIB + 1000, 3);
    env.img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "mid.qcow2",
        "6M",
    ]);
    if !env.io(
        "qcow2",
        "mid.qcow2",
        &[
            "write -P 0xab 4096 8192",
            "write -P 0x11 3M 1M",
            "write -z 2M 64k",
        ],
    ) {
        return;
    }
    env.img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "8M",
    ]);
    env.io(
        "qcow2",
        "top.qcow2",
        &[
            "write -P 0xcd 1M 6144",
            "write -P 0xef 7M 512",
            "write -z 0 2048",
        ],
    );
    env.check("mid.qcow2");
    env.check("top.qcow2");
    let i = env.open("top.qcow2").info().clone();
    assert_eq!(i.backing_file(), Some("mid.qcow2"));
    assert_eq!(i.backing_format(), Some("qcow2"));
    // Without the backing device attached, unallocated reads are refused.
    let mut q = env.open("top.qcow2");
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        q.read_at(2 * MIB as u64, &mut buf),
        Err(qcow_core::Error::BackingMissing)
    ));
}

#[test]
fn extended_l2_subclusters() {
    let Some(env) = Env::new() else { return };
    env.source("base.raw", 4 * MIB, 4);
    env.convert_raw("base.raw", "base.qcow2", &[]);
    env.img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=65536",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "ext.qcow2",
        "4M",
    ]);
    if !env.io(
        "qcow2",
        "ext.qcow2",
        &[
            "write -P 0xab 4096 8192",
            "write -z 67584 4096",
            "write -P 0x5a 1M 2048",
            "write -P 0x77 2M 128k",
        ],
    ) {
        return;
    }
    env.check("ext.qcow2");
    // Subcluster granularity: 64 KiB / 32 = 2 KiB.
    let mut q = env.open("ext.qcow2");
    assert!(q.info().extended_l2());
    // Unallocated subclusters of an allocated cluster keep their host range.
    assert!(matches!(
        q.map(0, 4096).unwrap().kind,
        MapKind::UnallocatedAlloc { .. }
    ));
    let m = q.map(4096, 65536).unwrap();
    assert!(
        matches!(m.kind, MapKind::Data { .. }) && m.len == 8192,
        "{m:?}"
    );
    let m = q.map(67584, 8192).unwrap();
    assert!(
        matches!(m.kind, MapKind::Zero { .. }) && m.len == 4096,
        "{m:?}"
    );
    // A standalone extended-L2 image converted from raw.
    env.convert_raw("base.raw", "ext2.qcow2", &["-o", "extended_l2=on"]);
    env.check("ext2.qcow2");
}

#[test]
fn internal_snapshots() {
    let Some(env) = Env::new() else { return };
    env.source("src.raw", 2 * MIB, 5);
    env.convert_raw("src.raw", "snap.qcow2", &[]);
    env.img(&["snapshot", "-c", "s1", "snap.qcow2"]);
    if !env.io(
        "qcow2",
        "snap.qcow2",
        &["write -P 0x99 0 64k", "write -z 1M 128k"],
    ) {
        return;
    }
    env.img(&["snapshot", "-c", "second", "snap.qcow2"]);
    env.io("qcow2", "snap.qcow2", &["write -P 0x42 512k 4k"]);
    env.check("snap.qcow2");
    for s in ["s1", "second"] {
        let want = env.reference("snap.qcow2", &["-l", &format!("snapshot.name={s}")]);
        let mut dev = open_any(&env.p("snap.qcow2"), Some(s));
        assert_eq!(sha_of(&mut dev), want, "snapshot {s}");
    }
    let mut q = env.open("snap.qcow2");
    assert_eq!(q.snapshot_count(), 2);
    let s = q.find_snapshot("1").unwrap();
    assert_eq!(s.name_str(), Some("s1"));
    assert_eq!(s.fixed.disk_size, Some(2 * MIB as u64));
    assert!(q.find_snapshot("nope").is_err());
}

#[test]
fn external_data_file_raw_and_not_raw() {
    let Some(env) = Env::new() else { return };
    for (name, opts) in [
        ("ext-raw.qcow2", "data_file=ext-raw.data,data_file_raw=on"),
        ("ext.qcow2", "data_file=ext.data,data_file_raw=off"),
    ] {
        env.img(&["create", "-f", "qcow2", "-o", opts, name, "4M"]);
        if !env.io(
            "qcow2",
            name,
            &[
                "write -P 0xab 4096 8192",
                "write -P 0x3c 2M 100k",
                "write -z 2M 4096",
            ],
        ) {
            return;
        }
        env.check(name);
        let mut q = env.open(name);
        assert!(q.info().data_file().is_some());
        let m = q.map(4096, 4096).unwrap();
        assert!(matches!(m.kind, MapKind::Data { .. }), "{m:?}");
        let mut buf = vec![0u8; 4096];
        assert!(matches!(
            q.read_at(4096, &mut buf),
            Err(qcow_core::Error::DataFileMissing)
        ));
    }
}

#[test]
fn zero_clusters_and_preallocation() {
    let Some(env) = Env::new() else { return };
    env.source("src.raw", 2 * MIB, 6);
    env.convert_raw("src.raw", "z.qcow2", &[]);
    if !env.io(
        "qcow2",
        "z.qcow2",
        &["write -z 0 192k", "write -z -u 1M 64k"],
    ) {
        return;
    }
    env.check("z.qcow2");
    let mut q = env.open("z.qcow2");
    let m = q.map(0, 1 << 20).unwrap();
    assert!(
        matches!(m.kind, MapKind::Zero { .. }) && m.len == 192 * 1024,
        "{m:?}"
    );
    for prealloc in ["metadata", "falloc", "full"] {
        let name = format!("pre-{prealloc}.qcow2");
        env.img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("preallocation={prealloc}"),
            &name,
            "3M",
        ]);
        env.io(
            "qcow2",
            &name,
            &["write -P 0x61 64k 64k", "write -z 1M 64k"],
        );
        env.check(&name);
    }
}

#[test]
fn four_tib_sparse_image_reads_ranges_and_maps() {
    let Some(env) = Env::new() else { return };
    env.img(&["create", "-f", "qcow2", "big.qcow2", "4T"]);
    let far = (4u64 << 40) - 65536;
    if !env.io(
        "qcow2",
        "big.qcow2",
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 2T 4k",
            &format!("write -P 0x33 {far} 64k"),
        ],
    ) {
        return;
    }
    env.check_info("big.qcow2");
    let mut q = env.open("big.qcow2");
    assert_eq!(q.size().unwrap(), 4 << 40);
    let mut buf = vec![0u8; 65536];
    for (at, pat) in [(0u64, 0x11u8), (far, 0x33)] {
        q.read_at(at, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == pat), "at {at}");
    }
    q.read_at(2 << 40, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0x22) && buf[4096..].iter().all(|&b| b == 0));
    // Mapping: walking all 4 TiB is fast (unallocated L1 ranges are skipped).
    let mut runs = Vec::new();
    let mut g = 0;
    while g < 4 << 40 {
        let m = q.map(g, (4 << 40) - g).unwrap();
        runs.push((
            m.guest_offset,
            m.len,
            matches!(m.kind, MapKind::Data { .. }),
        ));
        g += m.len;
    }
    let data: Vec<_> = runs.iter().filter(|r| r.2).map(|r| (r.0, r.1)).collect();
    assert_eq!(data, vec![(0, 65536), (2 << 40, 65536), (far, 65536)]);
    // Compare with qemu-img map.
    let out = run_ok(
        Command::new(&env.qemu_img)
            .current_dir(env.dir.path())
            .args(["map", "--output=json", "big.qcow2"]),
    );
    let j: Value = serde_json::from_slice(&out).unwrap();
    let qdata: Vec<_> = j
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"].as_bool() == Some(true))
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["offset"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(qdata.len(), 3);
    for (start, len, off) in qdata {
        let m = q.map(start, len).unwrap();
        assert_eq!(
            (m.len, m.kind),
            (
                len,
                MapKind::Data {
                    host: qcow_core::HostOffset::new(off)
                }
            )
        );
    }
}

#[test]
fn corrupted_images_fail_cleanly() {
    let Some(env) = Env::new() else { return };
    env.source("src.raw", MIB, 7);
    env.convert_raw("src.raw", "c.qcow2", &["-o", "cluster_size=4096"]);
    let good = std::fs::read(env.p("c.qcow2")).unwrap();
    // Unknown incompatible bit 7 is refused and named.
    let mut b = good.clone();
    b[79] |= 0x80;
    std::fs::write(env.p("bad.qcow2"), &b).unwrap();
    let e = Qcow2::open(FileDevice::open(&env.p("bad.qcow2")).unwrap(), zeroed(4096))
        .err()
        .unwrap();
    assert!(e.to_string().contains("incompatible feature bit 7"), "{e}");
    // Unknown compatible bits are tolerated; corrupt bit allows read-only.
    let mut b = good.clone();
    b[87] |= 0x80;
    b[79] |= 0x02;
    std::fs::write(env.p("ok.qcow2"), &b).unwrap();
    let q = env.open("ok.qcow2");
    assert!(q.info().corrupt());
    let e = Qcow2::open_rw(FileDevice::open(&env.p("ok.qcow2")).unwrap(), zeroed(4096))
        .err()
        .unwrap();
    assert!(matches!(e, qcow_core::Error::MarkedCorrupt), "{e}");
    // Byte flips all over the metadata: never a panic.
    let mut x = 0x1234_5678_9abc_def1u64;
    for round in 0..300 {
        let mut b = good.clone();
        for _ in 0..4 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Header cluster, refcount table/block, L1, L2 sit in the first clusters.
            let i = (x as usize) % (6 * 4096);
            b[i] ^= (x >> 40) as u8 | 1;
        }
        let p = env.p(&format!("m{}.qcow2", round % 4));
        std::fs::write(&p, &b).unwrap();
        if let Ok(q) = Qcow2::open(FileDevice::open(&p).unwrap(), zeroed(4096)) {
            let mut q = q
                .ignore_backing()
                .with_compression_buffers(zeroed(4608), zeroed(4096));
            let size = q.size().unwrap().min(2 * MIB as u64);
            let mut buf = vec![0u8; 65536];
            let mut g = 0;
            while g + 65536 <= size {
                if q.read_at(g, &mut buf).is_err() {
                    break;
                }
                g += 65536;
            }
            let _ = q.snapshot(0);
            let _ = q.refcount(3);
        }
    }
}

#[test]
fn encrypted_images_are_reported_and_data_reads_refused() {
    let Some(env) = Env::new() else { return };
    env.source("src.raw", MIB, 8);
    env.img(&[
        "convert",
        "--object",
        "secret,id=sec0,data=hunter2",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "src.raw",
        "enc.qcow2",
    ]);
    let j = env.info("enc.qcow2");
    let mut q = env.open("enc.qcow2");
    let i = q.info().clone();
    assert_eq!(i.header.crypt_method, qcow_core::CryptMethod::Luks);
    assert_eq!(i.encryption_format(), Some("luks"));
    assert_eq!(
        j["format-specific"]["data"]["encrypt"]["format"].as_str(),
        Some("luks")
    );
    let fde = i.crypto.expect("full disk encryption extension");
    assert!(fde.offset > 0 && fde.length > 0 && fde.offset.is_multiple_of(i.cluster_size()));
    let mut buf = vec![0u8; 4096];
    let e = q.read_at(0, &mut buf).unwrap_err();
    assert!(
        matches!(
            e,
            qcow_core::Error::Unsupported(qcow_core::error::Unsupported::Encrypted {
                method: qcow_core::CryptMethod::Luks,
            })
        ),
        "{e}"
    );
}

#[test]
fn bitmaps_and_dirty_flag_are_reported() {
    let Some(env) = Env::new() else { return };
    env.source("src.raw", MIB, 9);
    env.convert_raw("src.raw", "bm.qcow2", &[]);
    env.img(&["bitmap", "--add", "bm.qcow2", "b0"]);
    env.img(&[
        "bitmap",
        "--add",
        "-g",
        "128k",
        "--disable",
        "bm.qcow2",
        "second",
    ]);
    env.check("bm.qcow2");
    let mut q = env.open("bm.qcow2");
    let mut n = 0;
    q.for_each_bitmap(|_| {
        n += 1;
        false
    })
    .unwrap();
    assert_eq!(n, 2);
    // Dirty bit (lazy refcounts left unflushed): readable, reported.
    let mut b = std::fs::read(env.p("bm.qcow2")).unwrap();
    b[79] |= 1;
    std::fs::write(env.p("dirty.qcow2"), &b).unwrap();
    env.check_info("dirty.qcow2");
    let q = env.open("dirty.qcow2");
    assert!(q.info().dirty());
}
