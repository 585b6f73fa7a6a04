//! qimg-efi's FAT reader (`qimg-efi/src/fat.rs`) on the host: FAT12, FAT16
//! and FAT32 volumes made by mtools, every file read back through
//! `FatFile` and compared with the bytes copied in; damaged volumes give
//! clean errors.

// Test helpers fail loudly; sizes are of test images in memory.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation
)]

extern crate alloc;

// The UEFI program's module, compiled here as it is there (no_std + alloc).
// The program uses a few accessors these tests do not.
#[allow(dead_code, unreachable_pub)]
#[path = "../../qimg-efi/src/fat.rs"]
mod fat;

use std::cell::{Cell, RefCell};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;

use fat::{sibling, FatError, FatFile, FatKind, FatVolume, MAX_EXTENTS};
use luks_core::io::BlockIo;
use qimg_tests::{run_ok, tool};

/// A shared in-memory disk, strict as firmware Block I/O is: requests must
/// be whole sectors inside the disk. Counts the reads it serves.
#[derive(Debug, Clone)]
struct Disk {
    bytes: Rc<RefCell<Vec<u8>>>,
    /// Where the volume starts in `bytes` (a partition's offset).
    base: u64,
    sector: u32,
    reads: Rc<Cell<usize>>,
    /// Reads touching bytes at or past this volume offset fail.
    fail_from: u64,
}

#[derive(Debug)]
struct DiskError {
    offset: u64,
    len: usize,
    why: &'static str,
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "disk read of {} bytes at {}: {}",
            self.len, self.offset, self.why
        )
    }
}

impl Disk {
    fn new(bytes: Vec<u8>) -> Self {
        Self::part(bytes, 0, 512)
    }

    fn part(bytes: Vec<u8>, base: u64, sector: u32) -> Self {
        Self {
            bytes: Rc::new(RefCell::new(bytes)),
            base,
            sector,
            reads: Rc::new(Cell::new(0)),
            fail_from: u64::MAX,
        }
    }

    fn len(&self) -> u64 {
        self.bytes.borrow().len() as u64 - self.base
    }
}

impl BlockIo for Disk {
    type Error = DiskError;

    fn sector_size(&self) -> u32 {
        self.sector
    }

    fn size(&mut self) -> Result<u64, DiskError> {
        Ok(self.len())
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let err = |why| DiskError {
            offset,
            len: buf.len(),
            why,
        };
        let ss = u64::from(self.sector);
        if !offset.is_multiple_of(ss) || !(buf.len() as u64).is_multiple_of(ss) {
            return Err(err("not whole sectors"));
        }
        let end = offset + buf.len() as u64;
        if end > self.len() {
            return Err(err("past the end of the disk"));
        }
        if end > self.fail_from {
            return Err(err("injected media error"));
        }
        self.reads.set(self.reads.get() + 1);
        let start = (self.base + offset) as usize;
        buf.copy_from_slice(&self.bytes.borrow()[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        Err(DiskError {
            offset,
            len: buf.len(),
            why: "read-only test disk",
        })
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
}

/// A small seeded PRNG (xorshift64*), so every run tests the same bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// The mtools this file uses, or `None` (a failure under CI).
fn mtools() -> Option<()> {
    for t in ["mformat", "mmd", "mcopy", "mdel", "mtype"] {
        tool(t)?;
    }
    Some(())
}

/// Runs an mtools command on `img` (`img@@offset` when `offset` is not 0).
fn m(cmd: &str, img: &Path, offset: u64, args: &[&str]) -> Vec<u8> {
    let mut target = img.as_os_str().to_owned();
    if offset != 0 {
        target.push(format!("@@{offset}"));
    }
    run_ok(
        Command::new(cmd)
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(target)
            .args(args),
    )
}

/// A scratch folder with a sparse image file of `len` bytes.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn image(&self, len: u64) -> PathBuf {
        let p = self.path("fat.img");
        qimg_tests::sparse_file(&p, len);
        p
    }

    /// Writes `data` to a host file named `name` and returns its path.
    fn file(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, data).unwrap();
        p
    }
}

/// Copies `data` into the volume as `dest` (a `::/...` path).
fn put(s: &Scratch, img: &Path, offset: u64, dest: &str, data: &[u8]) {
    let src = s.file("src.bin", data);
    m("mcopy", img, offset, &["-o", src.to_str().unwrap(), dest]);
}

/// Reads all of `f` in one request, checks the tail past the end is zero,
/// and returns the file's bytes.
fn read_all(f: &mut FatFile<Disk>) -> Vec<u8> {
    let size = f.size().unwrap();
    assert_eq!(
        size,
        f.len().div_ceil(512) * 512,
        "size is the length rounded up"
    );
    let mut buf = vec![0xA5; size as usize];
    f.read_at(0, &mut buf).unwrap();
    assert!(
        buf[f.len() as usize..].iter().all(|&b| b == 0),
        "the tail past the end of the file reads as zeros"
    );
    buf.truncate(f.len() as usize);
    buf
}

/// Reads `f` at random sector-aligned offsets and lengths and compares with
/// `want`.
fn random_reads(f: &mut FatFile<Disk>, want: &[u8], rng: &mut Rng, rounds: usize) {
    let sectors = f.size().unwrap() / 512;
    for _ in 0..rounds {
        if sectors == 0 {
            break;
        }
        let first = rng.below(sectors);
        let count = 1 + rng.below((sectors - first).min(300));
        let mut buf = vec![0x5A; (count * 512) as usize];
        f.read_at(first * 512, &mut buf).unwrap();
        let from = (first * 512) as usize;
        for (i, &b) in buf.iter().enumerate() {
            let expect = want.get(from + i).copied().unwrap_or(0);
            assert_eq!(b, expect, "byte {} of the file", from + i);
        }
    }
}

/// The files every tree test puts on a volume: (volume path, size).
const TREE: &[(&str, usize)] = &[
    ("::/empty.bin", 0),
    ("::/ONE", 1),
    ("::/s511.dat", 511),
    ("::/S512.DAT", 512),
    ("::/s513.Dat", 513),
    ("::/EFI/BOOT/BOOTX64.EFI", 70_000),
    (
        "::/images/Long File Name With Spaces.qcow2",
        3 * 1024 * 1024 + 123,
    ),
    ("::/Mixed Case Dir/MiXeD.TxT", 4096),
    ("::/Mixed Case Dir/a.b.c.d", 777),
    ("::/images/sub/deeper/x", 1000),
];

/// Builds the tree on a volume of `len` bytes at `offset` of a file (mformat
/// `fmt` arguments) and returns the image bytes and each file's content.
fn build_tree(
    s: &Scratch,
    len: u64,
    offset: u64,
    fmt: &[&str],
    big: bool,
) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let img = s.image(offset + len);
    let mut args = fmt.to_vec();
    args.push("::");
    m("mformat", &img, offset, &args);
    for d in [
        "::/EFI",
        "::/EFI/BOOT",
        "::/images",
        "::/images/sub",
        "::/images/sub/deeper",
        "::/Mixed Case Dir",
    ] {
        m("mmd", &img, offset, &[d]);
    }
    let mut rng = Rng(0x5EED_FA70 ^ len);
    let mut files = Vec::new();
    for &(path, size) in TREE {
        let size = if !big && size > 100_000 {
            150_000
        } else {
            size
        };
        let data = rng.bytes(size);
        put(s, &img, offset, path, &data);
        files.push((path.to_owned(), data));
    }
    (std::fs::read(&img).unwrap(), files)
}

/// Opens every file of the tree under several spellings of its path and
/// compares it with what was copied in.
fn check_tree(vol: &FatVolume<Disk>, files: &[(String, Vec<u8>)], seed: u64) {
    let mut rng = Rng(seed);
    for (path, data) in files {
        let plain = path.trim_start_matches("::");
        let spellings = [
            plain.to_owned(),
            plain.replace('/', "\\"),
            plain.to_uppercase(),
            plain.to_lowercase().replace('/', "\\"),
            format!("/./{}", plain.trim_start_matches('/')),
        ];
        for p in &spellings {
            let mut f = vol.open(p).unwrap_or_else(|e| panic!("open {p}: {e}"));
            assert_eq!(f.len(), data.len() as u64, "{p}");
            assert_eq!(&read_all(&mut f), data, "{p}");
        }
        let mut f = vol.open(plain).unwrap();
        random_reads(&mut f, data, &mut rng, 40);
    }
}

#[test]
fn fat32_tree_reads_back() {
    let Some(()) = mtools() else { return };
    let s = Scratch::new();
    let (img, files) = build_tree(&s, 40 << 20, 0, &["-F"], true);
    let vol = FatVolume::mount(Disk::new(img)).unwrap();
    assert_eq!(vol.kind(), FatKind::Fat32);
    check_tree(&vol, &files, 1);
    // mtype's view of a file agrees with ours.
    let typed = m(
        "mtype",
        &s.path("fat.img"),
        0,
        &["::/Mixed Case Dir/MiXeD.TxT"],
    );
    let mut f = vol.open("\\MIXED CASE DIR\\mixed.txt").unwrap();
    assert_eq!(read_all(&mut f), typed);
}

#[test]
fn fat16_tree_reads_back() {
    let Some(()) = mtools() else { return };
    let s = Scratch::new();
    let (img, files) = build_tree(&s, 16 << 20, 0, &["-c", "1"], true);
    let vol = FatVolume::mount(Disk::new(img)).unwrap();
    assert_eq!(vol.kind(), FatKind::Fat16);
    check_tree(&vol, &files, 2);
}

#[test]
fn fat12_tree_reads_back() {
    let Some(()) = mtools() else { return };
    let s = Scratch::new();
    let (img, files) = build_tree(&s, 1 << 20, 0, &[], false);
    let vol = FatVolume::mount(Disk::new(img)).unwrap();
    assert_eq!(vol.kind(), FatKind::Fat12);
    check_tree(&vol, &files, 3);
}

#[test]
fn volume_inside_a_partition_on_a_4k_disk() {
    let Some(()) = mtools() else { return };
    let s = Scratch::new();
    let (img, files) = build_tree(&s, 40 << 20, 1 << 20, &["-F"], true);
    // The partition starts 1 MiB into the disk, whose sectors are 4 KiB
    // while the volume's are 512 bytes: data reads go through the bounce
    // buffer for their unaligned ends.
    let vol = FatVolume::mount(Disk::part(img, 1 << 20, 4096)).unwrap();
    assert_eq!(vol.kind(), FatKind::Fat32);
    check_tree(&vol, &files, 4);
}

/// A volume of 512-byte clusters (FAT32 or FAT16) on which `big` is
/// fragmented: files copied in turn, every other one deleted, and `big`
/// copied into the holes. mtools allocates FAT32 clusters from FSInfo's
/// next-free hint, so that hint is first reset to "unknown" (0xFFFFFFFF),
/// as after a volume was used elsewhere; FAT16 has no hint and mtools
/// searches from the start.
fn fragmented(fat32: bool) -> Option<(Scratch, Vec<u8>, Vec<u8>)> {
    mtools()?;
    let s = Scratch::new();
    let (len, fmt): (u64, &[&str]) = if fat32 {
        (40 << 20, &["-F", "-c", "1", "::"])
    } else {
        (16 << 20, &["-c", "1", "::"])
    };
    let img = s.image(len);
    m("mformat", &img, 0, fmt);
    m("mmd", &img, 0, &["::/frag"]);
    let mut rng = Rng(77);
    let mut names = Vec::new();
    for i in 0..24 {
        let p = s.file(&format!("P{i:02}"), &rng.bytes(1024 + 512 * (i % 5)));
        names.push(p.to_str().unwrap().to_owned());
    }
    let mut args: Vec<&str> = names.iter().map(String::as_str).collect();
    args.push("::/frag/");
    m("mcopy", &img, 0, &args);
    let odd: Vec<String> = (1..24)
        .step_by(2)
        .map(|i| format!("::/frag/P{i:02}"))
        .collect();
    let odd: Vec<&str> = odd.iter().map(String::as_str).collect();
    m("mdel", &img, 0, &odd);
    if fat32 {
        let mut bytes = std::fs::read(&img).unwrap();
        let fsinfo = u16::from_le_bytes([bytes[48], bytes[49]]) as usize * 512;
        assert_eq!(&bytes[fsinfo + 484..fsinfo + 488], b"rrAa", "FSInfo");
        bytes[fsinfo + 492..fsinfo + 496].fill(0xFF);
        std::fs::write(&img, bytes).unwrap();
    }
    let big = rng.bytes(209_003);
    put(&s, &img, 0, "::/frag/Big Fragmented File.bin", &big);
    let bytes = std::fs::read(&img).unwrap();
    Some((s, bytes, big))
}

fn fragmented_reads(fat32: bool) {
    let Some((_s, img, big)) = fragmented(fat32) else {
        return;
    };
    let disk = Disk::new(img);
    let vol = FatVolume::mount(disk.clone()).unwrap();
    let mut f = vol.open("/FRAG/big fragmented file.BIN").unwrap();
    // 12 holes, then the rest in one run.
    assert_eq!(f.extents(), 13);
    let before = disk.reads.get();
    assert_eq!(read_all(&mut f), big);
    assert_eq!(
        disk.reads.get() - before,
        f.extents(),
        "a whole-file read is one device read per run of clusters"
    );
    random_reads(&mut f, &big, &mut Rng(5), 200);
    // The files left between the holes are intact too.
    let mut p0 = vol.open("frag/p00").unwrap();
    assert_eq!(p0.len(), 1024);
    assert_eq!(p0.extents(), 1);
    read_all(&mut p0);
}

#[test]
fn fragmented_fat32_file_reads_back_one_device_read_per_run() {
    fragmented_reads(true);
}

#[test]
fn fragmented_fat16_file_reads_back_one_device_read_per_run() {
    fragmented_reads(false);
}

#[test]
fn file_bytes_past_the_end_read_as_zero_even_when_the_cluster_holds_junk() {
    let Some(()) = mtools() else { return };
    let s = Scratch::new();
    let img = s.image(1 << 20);
    m("mformat", &img, 0, &["-c", "8", "::"]);
    let data = Rng(9).bytes(513);
    put(&s, &img, 0, "::/tail.bin", &data);
    let mut bytes = std::fs::read(&img).unwrap();
    // Fill the whole cluster's slack with junk.
    let at = find(&bytes, &data).expect("file data in the image");
    bytes[at + 513..at + 4096].fill(0xEE);
    let vol = FatVolume::mount(Disk::new(bytes)).unwrap();
    let mut f = vol.open("tail.bin").unwrap();
    assert_eq!(f.size().unwrap(), 1024);
    let mut sec = [0xAAu8; 512];
    f.read_at(512, &mut sec).unwrap();
    assert_eq!(sec[0], data[512]);
    assert!(sec[1..].iter().all(|&b| b == 0));
}

#[test]
fn block_io_contract() {
    let Some(()) = mtools() else { return };
    let s = Scratch::new();
    let (img, _) = build_tree(&s, 1 << 20, 0, &[], false);
    let vol = FatVolume::mount(Disk::new(img)).unwrap();
    let mut f = vol.open("/s513.dat").unwrap();
    assert_eq!(f.sector_size(), 512);
    let mut buf = [0u8; 512];
    for (offset, len) in [(1u64, 512usize), (0, 100), (512, 1024), (1024, 512)] {
        let e = f.read_at(offset, &mut vec![0; len]).unwrap_err();
        assert!(
            matches!(e, FatError::BadRequest { .. }),
            "{offset}+{len}: {e}"
        );
    }
    assert!(matches!(
        f.write_at(0, &buf),
        Err(FatError::ReadOnly { offset: 0 })
    ));
    assert!(matches!(
        f.write_zeroes(0, 512),
        Err(FatError::ReadOnly { .. })
    ));
    f.read_at(0, &mut buf).unwrap();
    f.read_at(0, &mut []).unwrap();
    let mut empty = vol.open("EMPTY.BIN").unwrap();
    assert!(empty.is_empty());
    assert_eq!(empty.size().unwrap(), 0);
    assert_eq!(empty.extents(), 0);
    empty.read_at(0, &mut []).unwrap();
    assert!(empty.read_at(0, &mut buf).is_err());
}

#[test]
fn lookups_that_find_nothing() {
    let Some(()) = mtools() else { return };
    let s = Scratch::new();
    let img = s.image(1 << 20);
    m("mformat", &img, 0, &["-v", "MYLABEL", "::"]);
    m("mmd", &img, 0, &["::/dir"]);
    put(&s, &img, 0, "::/dir/Keep Me.txt", b"kept");
    put(&s, &img, 0, "::/Gone Away.txt", b"deleted");
    m("mdel", &img, 0, &["::/Gone Away.txt"]);
    let vol = FatVolume::mount(Disk::new(std::fs::read(&img).unwrap())).unwrap();
    for p in [
        "/Gone Away.txt",
        "/MYLABEL",
        "/dir/Keep",
        "/dir/Keep Me.txt/x",
        "/nodir/x",
    ] {
        let e = vol.open(p).unwrap_err();
        assert!(matches!(e, FatError::NotFound { .. }), "{p}: {e}");
        assert!(e.to_string().contains(p), "{e}");
    }
    for p in ["/", "\\dir", "/dir/", "dir/.."] {
        let e = vol.open(p).unwrap_err();
        assert!(matches!(e, FatError::NotAFile { .. }), "{p}: {e}");
    }
    // "." and ".." entries are skipped as names, and ".." in a path goes up.
    assert!(matches!(
        vol.open("/dir/.").unwrap_err(),
        FatError::NotAFile { .. }
    ));
    let mut f = vol.open("/dir/../dir/./KEEPME~1.TXT").unwrap();
    assert_eq!(read_all(&mut f), b"kept");
}

#[test]
fn long_name_with_a_bad_checksum_is_not_used() {
    let Some(()) = mtools() else { return };
    let s = Scratch::new();
    let img = s.image(1 << 20);
    m("mformat", &img, 0, &["::"]);
    put(&s, &img, 0, "::/A Long Name.txt", b"long");
    let mut bytes = std::fs::read(&img).unwrap();
    let vol = FatVolume::mount(Disk::new(bytes.clone())).unwrap();
    assert_eq!(
        read_all(&mut vol.open("/a long name.TXT").unwrap()),
        b"long"
    );
    // The long-name entry sits just before the short one; byte 13 is the
    // checksum of the short name.
    let short = find(&bytes, b"ALONGN~1TXT").expect("short entry");
    assert_eq!(bytes[short - 32 + 11], 0x0F, "a long-name entry");
    bytes[short - 32 + 13] ^= 0x55;
    let vol = FatVolume::mount(Disk::new(bytes)).unwrap();
    assert!(matches!(
        vol.open("/a long name.TXT").unwrap_err(),
        FatError::NotFound { .. }
    ));
    assert_eq!(read_all(&mut vol.open("/alongn~1.txt").unwrap()), b"long");
}

#[test]
fn sibling_joins_names_as_qemu_resolves_backing_files() {
    for (image, name, want) in [
        ("\\images\\top.qcow2", "base.qcow2", "\\images\\base.qcow2"),
        ("/images/top.qcow2", "base.qcow2", "\\images\\base.qcow2"),
        (
            "\\images\\top.qcow2",
            "..\\other\\b.qcow2",
            "\\other\\b.qcow2",
        ),
        (
            "\\images\\top.qcow2",
            "./sub/./b.qcow2",
            "\\images\\sub\\b.qcow2",
        ),
        ("\\images\\top.qcow2", "\\abs\\b.qcow2", "\\abs\\b.qcow2"),
        ("\\images\\top.qcow2", "/abs/b.qcow2", "\\abs\\b.qcow2"),
        ("\\top.qcow2", "b.qcow2", "\\b.qcow2"),
        ("top.qcow2", "b.qcow2", "\\b.qcow2"),
        ("\\top.qcow2", "..\\..\\b.qcow2", "\\b.qcow2"),
        ("\\a\\b\\c.qcow2", "..", "\\a"),
    ] {
        assert_eq!(sibling(image, name), want, "sibling({image:?}, {name:?})");
    }
}

/// The first offset of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Geometry a test needs to poke at a volume made by mformat (`data`:
/// where the root directory starts on FAT12/16, cluster 2 on FAT32).
struct Fat32At {
    fat: usize,
    data: usize,
    cluster: usize,
}

impl Fat32At {
    fn of(img: &[u8]) -> Self {
        let le16 = |at: usize| u16::from_le_bytes([img[at], img[at + 1]]) as usize;
        let le32 = |at: usize| {
            u32::from_le_bytes([img[at], img[at + 1], img[at + 2], img[at + 3]]) as usize
        };
        let bps = le16(11);
        let fat = le16(14) * bps;
        let fat_size = match le16(22) {
            0 => le32(36),
            n => n,
        };
        let data = fat + img[16] as usize * fat_size * bps;
        Self {
            fat,
            data,
            cluster: img[13] as usize * bps,
        }
    }

    fn get(&self, img: &[u8], c: usize) -> u32 {
        let at = self.fat + 4 * c;
        u32::from_le_bytes(img[at..at + 4].try_into().unwrap())
    }

    fn set(&self, img: &mut [u8], c: usize, v: u32) {
        let at = self.fat + 4 * c;
        img[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// First cluster of the file whose short name (11 bytes) is `short`.
    fn first(&self, img: &[u8], short: &[u8; 11]) -> usize {
        let e = find(img, short).expect("short entry");
        let hi = u16::from_le_bytes([img[e + 20], img[e + 21]]) as usize;
        let lo = u16::from_le_bytes([img[e + 26], img[e + 27]]) as usize;
        (hi << 16) | lo
    }
}

/// A FAT32 volume of 512-byte clusters holding `CHAIN.BIN` of `clusters`
/// clusters, with its geometry and first cluster.
fn chain_volume(clusters: usize) -> Option<(Vec<u8>, Fat32At, usize)> {
    mtools()?;
    let s = Scratch::new();
    let img = s.image(40 << 20);
    m("mformat", &img, 0, &["-F", "-c", "1", "::"]);
    put(&s, &img, 0, "::/CHAIN.BIN", &Rng(3).bytes(clusters * 512));
    let bytes = std::fs::read(&img).unwrap();
    let at = Fat32At::of(&bytes);
    let first = at.first(&bytes, b"CHAIN   BIN");
    Some((bytes, at, first))
}

/// The error opening `/CHAIN.BIN` on `img`.
fn open_err(img: Vec<u8>) -> FatError<DiskError> {
    let vol = FatVolume::mount(Disk::new(img)).unwrap();
    match vol.open("/CHAIN.BIN") {
        Ok(_) => panic!("opening CHAIN.BIN should fail"),
        Err(e) => e,
    }
}

fn assert_corrupt(e: &FatError<DiskError>, structure: &str, offset: u64, problem: &str) {
    match e {
        FatError::Corrupt {
            structure: s,
            offset: o,
            problem: p,
        } => {
            assert_eq!((*s, *o), (structure, offset), "{e}");
            assert!(p.contains(problem), "{e}");
            let text = e.to_string();
            assert!(
                text.contains(structure) && text.contains(&offset.to_string()),
                "{text}"
            );
        }
        _ => panic!("expected a corrupt {structure}, got {e}"),
    }
}

#[test]
fn chain_loops_and_bad_links_are_refused() {
    let Some((img, at, first)) = chain_volume(10) else {
        return;
    };
    let entry = |c: usize| (at.fat + 4 * c) as u64;
    assert_eq!(at.get(&img, first + 9) & 0x0FFF_FFFF, 0x0FFF_FFFF, "EOC");

    // The last cluster links back to the first: the chain never ends.
    let mut looped = img.clone();
    at.set(&mut looped, first + 9, first as u32);
    let e = open_err(looped);
    match &e {
        FatError::Corrupt {
            structure, problem, ..
        } => {
            assert_eq!(*structure, "cluster chain");
            assert!(problem.contains("loops"), "{e}");
        }
        _ => panic!("{e}"),
    }

    // A loop inside the clusters the file needs.
    let mut short_loop = img.clone();
    at.set(&mut short_loop, first + 2, first as u32 + 1);
    assert!(open_err(short_loop).to_string().contains("loops"));

    // A link past the last cluster, to a free cluster, to a bad cluster.
    for (v, problem) in [
        (0x0FFF_FF00, "past the last cluster"),
        (0, "free cluster"),
        (1, "reserved value"),
        (0x0FFF_FFF7, "marked bad"),
    ] {
        let mut bad = img.clone();
        at.set(&mut bad, first + 4, v);
        assert_corrupt(&open_err(bad), "cluster chain", entry(first + 4), problem);
    }

    // The chain ends before the file's size says.
    let mut short = img.clone();
    at.set(&mut short, first + 4, 0x0FFF_FFF8);
    assert_corrupt(&open_err(short), "cluster chain", entry(first), "shorter");

    // A chain longer than the file is fine: only the clusters needed are
    // mapped.
    let mut long = img.clone();
    at.set(&mut long, first + 9, first as u32 + 10);
    at.set(&mut long, first + 10, 0x0FFF_FFFF);
    let vol = FatVolume::mount(Disk::new(long)).unwrap();
    let mut f = vol.open("/CHAIN.BIN").unwrap();
    assert_eq!(read_all(&mut f), Rng(3).bytes(10 * 512));

    // A first cluster out of range in the directory entry.
    let mut far = img.clone();
    let e_at = find(&far, b"CHAIN   BIN").unwrap();
    far[e_at + 20..e_at + 22].copy_from_slice(&0x0FFFu16.to_le_bytes());
    assert_corrupt(
        &open_err(far),
        "directory entry",
        e_at as u64 + 26,
        "out of range",
    );
    assert!(at.data > at.fat && at.cluster == 512);
}

#[test]
fn too_fragmented_is_refused_and_the_limit_itself_is_not() {
    // 4,200 clusters; relink them so the first `jumps` links skip a cluster.
    let Some((img, at, first)) = chain_volume(4200) else {
        return;
    };
    let relink = |jumps: usize| {
        let mut img = img.clone();
        let mut c = first;
        for k in 0..4199 {
            let next = if k < jumps { c + 2 } else { c + 1 };
            at.set(&mut img, c, next as u32);
            c = next;
        }
        at.set(&mut img, c, 0x0FFF_FFFF);
        img
    };
    // `jumps` skips make `jumps + 1` runs.
    let at_limit = relink(MAX_EXTENTS - 1);
    // What the relinked file holds: its clusters in chain order.
    let mut want = Vec::new();
    let mut c = first;
    for _ in 0..4200 {
        let from = at.data + (c - 2) * at.cluster;
        want.extend_from_slice(&at_limit[from..from + at.cluster]);
        c = at.get(&at_limit, c) as usize;
    }
    let vol = FatVolume::mount(Disk::new(at_limit)).unwrap();
    let mut f = vol.open("/CHAIN.BIN").unwrap();
    assert_eq!(f.extents(), MAX_EXTENTS);
    assert_eq!(read_all(&mut f), want);
    random_reads(&mut f, &want, &mut Rng(11), 100);
    let vol = FatVolume::mount(Disk::new(relink(4199))).unwrap();
    match vol.open("/chain.bin") {
        Err(FatError::TooFragmented { path, extents, max }) => {
            assert_eq!(
                (path.as_str(), extents, max),
                ("/chain.bin", 4200, MAX_EXTENTS)
            );
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a file in 4,200 runs should be refused"),
    }
}

#[test]
fn damaged_boot_sectors_are_refused_naming_the_field() {
    let Some(()) = mtools() else { return };
    let s = Scratch::new();
    let img = s.image(40 << 20);
    m("mformat", &img, 0, &["-F", "::"]);
    let good = std::fs::read(&img).unwrap();
    type Poke = fn(&mut Vec<u8>);
    let cases: &[(Poke, u64, &str)] = &[
        (|b| b[510] = 0, 510, "0x55AA"),
        (
            |b| b[11..13].copy_from_slice(&1000u16.to_le_bytes()),
            11,
            "bytes per sector",
        ),
        (
            |b| b[11..13].copy_from_slice(&8192u16.to_le_bytes()),
            11,
            "bytes per sector",
        ),
        (
            |b| b[11..13].copy_from_slice(&256u16.to_le_bytes()),
            11,
            "bytes per sector",
        ),
        (|b| b[13] = 3, 13, "sectors per cluster"),
        (|b| b[13] = 0, 13, "sectors per cluster"),
        (|b| b[14..16].fill(0), 14, "reserved"),
        (|b| b[16] = 0, 16, "FAT count"),
        (|b| b[32..36].fill(0), 19, "total sector count is zero"),
        (|b| b[36..40].fill(0), 22, "FAT size is zero"),
        (
            |b| b[36..40].copy_from_slice(&100u32.to_le_bytes()),
            36,
            "too small",
        ),
        (
            |b| b[36..40].copy_from_slice(&90_000u32.to_le_bytes()),
            32,
            "smaller than",
        ),
        (
            |b| b[44..48].copy_from_slice(&0x00FF_FFFFu32.to_le_bytes()),
            44,
            "root directory cluster",
        ),
        (|b| b[44..48].fill(0), 44, "root directory cluster"),
        (|b| b[17] = 16, 17, "fixed root"),
        (
            |b| {
                b[40] = 0x83;
            },
            40,
            "active FAT",
        ),
        (|b| b.truncate(20 << 20), 32, "past the end of the device"),
    ];
    for (i, (poke, offset, problem)) in cases.iter().enumerate() {
        let mut bytes = good.clone();
        poke(&mut bytes);
        match FatVolume::mount(Disk::new(bytes)) {
            Ok(_) => panic!("case {i} mounted"),
            Err(e) => assert_corrupt(&e, "boot sector", *offset, problem),
        }
    }
    // Shorter than a boot sector.
    let e = FatVolume::mount(Disk::new(good[..100].to_vec())).unwrap_err();
    assert_corrupt(&e, "boot sector", 0, "smaller than one");
    // Zero bytes.
    assert!(FatVolume::mount(Disk::new(Vec::new())).is_err());
    // A device sector size no device may have.
    let e = FatVolume::mount(Disk::part(good.clone(), 0, 3)).unwrap_err();
    assert!(matches!(e, FatError::BadDevice { sector_size: 3 }), "{e}");
    // The untouched copy mounts.
    FatVolume::mount(Disk::new(good)).unwrap();
}

#[test]
fn media_errors_name_the_structure_being_read() {
    let Some((img, at, first)) = chain_volume(10) else {
        return;
    };
    let file_at = (at.data + (first - 2) * at.cluster) as u64;
    // Fails only in the file's data: mounting and mapping work, reading not.
    let mut disk = Disk::new(img.clone());
    disk.fail_from = file_at + 512;
    let vol = FatVolume::mount(disk).unwrap();
    let mut f = vol.open("/CHAIN.BIN").unwrap();
    let mut buf = vec![0; 512];
    f.read_at(0, &mut buf).unwrap();
    let mut buf = vec![0; 1024];
    match f.read_at(0, &mut buf) {
        Err(FatError::Io {
            structure, offset, ..
        }) => assert_eq!((structure, offset), ("file data", file_at)),
        other => panic!("{:?}", other.map(|_| ())),
    }
    // Fails in the FAT.
    let mut disk = Disk::new(img);
    disk.fail_from = at.fat as u64 + 1;
    let vol = FatVolume::mount(disk).unwrap();
    match vol.open("/CHAIN.BIN") {
        Err(e @ FatError::Io { .. }) => {
            let t = e.to_string();
            assert!(
                t.contains("FAT") && t.contains("injected media error"),
                "{t}"
            );
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a FAT read error should fail the open"),
    }
}

/// Outcomes of the mutation rounds, to show they reached every layer.
#[derive(Debug, Default)]
struct Outcomes {
    mount_refused: usize,
    open_refused: usize,
    opened: usize,
    read_refused: usize,
    read_ok: usize,
}

/// Mounts, opens and reads `rounds` mutated versions of the volume `img`
/// (mutated in place and restored, so no copies): 1 to 8 bytes changed,
/// mostly in the boot sector, FATs and directories. Nothing may panic or
/// loop, and every error must render.
fn mutate_rounds(img: Vec<u8>, paths: &[&str], rounds: usize, seed: u64) -> Outcomes {
    let disk = Disk::new(img);
    // The bytes that matter: the boot sector's fields and signature, the
    // FAT entries in use, the root directory region (FAT12/16) and the
    // first clusters, where mmd put the directories. A tenth of the
    // changes land anywhere.
    let regions = {
        let vol = FatVolume::mount(disk.clone()).unwrap();
        for p in paths {
            vol.open(p)
                .unwrap_or_else(|e| panic!("{p} on the unmutated volume: {e}"));
        }
        let b = disk.bytes.borrow();
        let at = Fat32At::of(&b);
        let fat_used = b[at.fat..at.data]
            .iter()
            .rposition(|&x| x != 0)
            .unwrap_or(0)
            + 1;
        let root = u16::from_le_bytes([b[17], b[18]]) as usize * 32;
        let dirs = at.data + root;
        vec![
            (0, 90),
            (510, 512),
            (at.fat, at.fat + fat_used),
            (at.data, dirs.max(at.data + 1)),
            (dirs, dirs + 8 * at.cluster),
            (0, b.len()),
        ]
    };
    let mut rng = Rng(seed);
    let mut out = Outcomes::default();
    let interesting = [0x00, 0xFF, 0xE5, 0x0F, 0x10, 0x2E, 0x41, 0x80, 0xF8];
    for _ in 0..rounds {
        let mut saved = Vec::new();
        for _ in 0..1 + rng.below(8) {
            let (lo, hi) = if rng.below(10) == 0 {
                regions[regions.len() - 1]
            } else {
                regions[rng.below(regions.len() as u64 - 1) as usize]
            };
            let at = lo + rng.below((hi - lo) as u64) as usize;
            let mut b = disk.bytes.borrow_mut();
            saved.push((at, b[at]));
            b[at] = match rng.below(3) {
                0 => interesting[rng.below(interesting.len() as u64) as usize],
                1 => b[at] ^ (1 << rng.below(8)),
                _ => rng.next() as u8,
            };
        }
        match FatVolume::mount(disk.clone()) {
            Err(e) => {
                let _ = e.to_string();
                out.mount_refused += 1;
            }
            Ok(vol) => {
                for p in paths {
                    match vol.open(p) {
                        Err(e) => {
                            let _ = e.to_string();
                            out.open_refused += 1;
                        }
                        Ok(mut f) => {
                            out.opened += 1;
                            let size = f.size().unwrap();
                            assert!(size <= disk.len(), "{p}: {size} bytes on a smaller volume");
                            let mut buf = vec![0; 8192];
                            let mut pos = 0;
                            let mut ok = true;
                            while pos < size {
                                let n = (size - pos).min(buf.len() as u64) as usize;
                                if let Err(e) = f.read_at(pos, &mut buf[..n]) {
                                    let _ = e.to_string();
                                    ok = false;
                                    break;
                                }
                                pos += n as u64;
                            }
                            if ok {
                                out.read_ok += 1;
                            } else {
                                out.read_refused += 1;
                            }
                        }
                    }
                }
            }
        }
        let mut b = disk.bytes.borrow_mut();
        for (at, v) in saved.into_iter().rev() {
            b[at] = v;
        }
    }
    out
}

#[test]
fn mutated_volumes_never_panic_or_hang() {
    let Some(()) = mtools() else { return };
    let paths = [
        "/EFI/BOOT/BOOTX64.EFI",
        "/images/Long File Name With Spaces.qcow2",
        "/Mixed Case Dir/MiXeD.TxT",
        "/s513.dat",
        "/images/sub/deeper/x",
    ];
    for (len, fmt, seed) in [
        (1u64 << 20, &[][..], 21u64),
        (16 << 20, &["-c", "1"][..], 22),
        (40 << 20, &["-F", "-c", "1"][..], 23),
    ] {
        let s = Scratch::new();
        let (img, _) = build_tree(&s, len, 0, fmt, false);
        let out = mutate_rounds(img, &paths, 2000, seed);
        eprintln!("{len}-byte volume {fmt:?}: {out:?}");
        // The rounds reached every layer: some mutations were refused at
        // mount, some at open, and files were still read.
        assert!(
            out.mount_refused > 0 && out.open_refused > 0 && out.read_ok > 0,
            "{out:?}"
        );
    }
}
