//! A read-only FAT12/16/32 reader that maps a file to its clusters.
//!
//! `no_std` + `alloc`; depends only on [`luks_core::io`] and `alloc`.
//!
//! Why it exists: the image qimg-efi opens may be a file on the very FAT
//! volume the program came from. Reading that file through the firmware's
//! `EFI_FILE_PROTOCOL` from inside our Block I/O `ReadBlocks` would re-enter
//! the firmware's FAT driver (which holds its one global lock while the
//! inner file system calls us). So the program maps the file to its
//! clusters once, here, and then reads those clusters straight from the
//! partition's own Block I/O.
//!
//! What it checks: the boot sector (signature, geometry, FAT type from the
//! cluster count as the FAT specification decides it, the volume fitting
//! on the device), every FAT entry a chain passes through (free, bad,
//! reserved and out-of-range values are refused), chain loops (a chain is
//! never followed for more steps than the volume has clusters), long-name
//! checksums. Every error names the structure and a byte offset on the
//! device. Memory is bounded: a mapped file holds at most [`MAX_EXTENTS`]
//! runs of 16 bytes, a directory is read 512 bytes at a time and is at most
//! 65,536 entries long.

use alloc::{string::String, vec, vec::Vec};
use core::fmt;

use luks_core::io::{read_bytes, BlockIo, BytesError, MAX_SECTOR_SIZE};

/// A file in more runs of consecutive clusters than this is refused
/// ([`FatError::TooFragmented`]); at 16 bytes a run, the map of one file
/// stays within 64 KiB.
pub const MAX_EXTENTS: usize = 4096;

/// The sector size a [`FatFile`] reports.
const FILE_SECTOR: u32 = 512;
/// Bytes in one directory entry.
const ENTRY: usize = 32;
/// A directory holds at most 65,536 entries (the FAT specification's limit).
const MAX_DIR_BYTES: u64 = 65_536 * 32;
/// Bytes of the FAT read at a time while following a chain.
const FAT_WINDOW: u64 = 16 * 1024;
/// Longest long name in UCS-2 units; 20 long-name entries of 13 units.
const LFN_UNITS: usize = 20 * 13;
/// The directory attribute bit.
const ATTR_DIRECTORY: u8 = 0x10;
/// The volume-label attribute bit.
const ATTR_VOLUME_ID: u8 = 0x08;
/// The attribute value (in the low six bits) of a long-name entry.
const ATTR_LONG_NAME: u8 = 0x0F;

/// Which FAT variant a volume is, decided by its cluster count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatKind {
    /// Fewer than 4,085 clusters.
    Fat12,
    /// Fewer than 65,525 clusters.
    Fat16,
    /// 65,525 clusters or more.
    Fat32,
}

/// What went wrong mounting a volume, finding a file or reading it.
#[derive(Debug)]
#[non_exhaustive]
pub enum FatError<E> {
    /// The device failed reading `structure` at byte `offset`.
    Io {
        /// The device's error.
        source: E,
        /// What was being read ("boot sector", "FAT", "directory entry", ...).
        structure: &'static str,
        /// Byte offset on the device.
        offset: u64,
    },
    /// An on-disk structure holds a value this reader refuses.
    Corrupt {
        /// The structure ("boot sector", "FAT", "directory entry", "cluster chain").
        structure: &'static str,
        /// Byte offset on the device of the offending field or entry.
        offset: u64,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// No file or directory of that name.
    NotFound {
        /// The path asked for.
        path: String,
    },
    /// The path names a directory (or the root), not a file.
    NotAFile {
        /// The path asked for.
        path: String,
    },
    /// The file is in more runs of consecutive clusters than [`MAX_EXTENTS`].
    TooFragmented {
        /// The path asked for.
        path: String,
        /// How many runs the file is in.
        extents: usize,
        /// The most this reader maps.
        max: usize,
    },
    /// The device reports a sector size that is not a power of two up to
    /// 64 KiB.
    BadDevice {
        /// The sector size it reports.
        sector_size: u32,
    },
    /// A read of a [`FatFile`] that is not whole 512-byte sectors inside
    /// the file's size.
    BadRequest {
        /// Start of the request.
        offset: u64,
        /// Its length.
        len: usize,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A write to a [`FatFile`], which is read-only.
    ReadOnly {
        /// Start of the refused write.
        offset: u64,
    },
}

impl<E: fmt::Display> fmt::Display for FatError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io {
                source,
                structure,
                offset,
            } => write!(
                f,
                "FAT volume: reading the {structure} at byte offset {offset} failed: {source}"
            ),
            Self::Corrupt {
                structure,
                offset,
                problem,
            } => write!(
                f,
                "FAT volume: {structure} at byte offset {offset}: {problem}"
            ),
            Self::NotFound { path } => write!(f, "{path}: no such file on the FAT volume"),
            Self::NotAFile { path } => write!(f, "{path}: is a directory, not a file"),
            Self::TooFragmented { path, extents, max } => write!(
                f,
                "{path}: the file is in {extents} separate cluster runs, more than the {max} this reader maps; defragment it or copy it afresh"
            ),
            Self::BadDevice { sector_size } => write!(
                f,
                "FAT volume: the device reports a sector size of {sector_size}, not a power of two up to 65536"
            ),
            Self::BadRequest {
                offset,
                len,
                problem,
            } => write!(
                f,
                "FAT file: read of {len} bytes at offset {offset} refused: {problem}"
            ),
            Self::ReadOnly { offset } => write!(
                f,
                "FAT file: write at offset {offset} refused: the file is opened read-only"
            ),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for FatError<E> {}

/// Where the root directory is.
#[derive(Debug, Clone, Copy)]
enum Root {
    /// FAT12/16: a fixed region of `len` bytes at byte `offset`.
    Fixed { offset: u64, len: u64 },
    /// FAT32: a cluster chain.
    Cluster(u32),
}

/// The validated geometry of a volume; every offset it yields for a
/// cluster number in `2..clusters + 2` lies inside the volume, and the
/// volume lies inside the device.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    kind: FatKind,
    cluster_size: u32,
    /// Byte offset of the FAT this reader follows (the active one).
    fat_offset: u64,
    /// Bytes of that FAT holding the entries of clusters `0..clusters + 2`.
    fat_bytes: u64,
    /// Byte offset of cluster 2.
    data_offset: u64,
    /// Number of data clusters; valid cluster numbers are `2..clusters + 2`.
    clusters: u32,
    root: Root,
}

/// Byte offsets of the boot-sector fields this reader uses.
mod bpb {
    pub(super) const BYTES_PER_SECTOR: usize = 11;
    pub(super) const SECTORS_PER_CLUSTER: usize = 13;
    pub(super) const RESERVED_SECTORS: usize = 14;
    pub(super) const NUM_FATS: usize = 16;
    pub(super) const ROOT_ENTRIES: usize = 17;
    pub(super) const TOTAL_SECTORS_16: usize = 19;
    pub(super) const FAT_SIZE_16: usize = 22;
    pub(super) const TOTAL_SECTORS_32: usize = 32;
    pub(super) const FAT_SIZE_32: usize = 36;
    pub(super) const EXT_FLAGS: usize = 40;
    pub(super) const ROOT_CLUSTER: usize = 44;
    pub(super) const SIGNATURE: usize = 510;
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Geometry {
    /// Validates the boot sector `bs` of a volume on a device of `dev_size`
    /// bytes; an error is the field's offset and what is wrong.
    fn parse(bs: &[u8; 512], dev_size: u64) -> Result<Self, (usize, &'static str)> {
        if bs[bpb::SIGNATURE] != 0x55 || bs[bpb::SIGNATURE + 1] != 0xAA {
            return Err((bpb::SIGNATURE, "no 0x55AA boot signature"));
        }
        let bps = u32::from(le16(bs, bpb::BYTES_PER_SECTOR));
        if !bps.is_power_of_two() || !(512..=4096).contains(&bps) {
            return Err((
                bpb::BYTES_PER_SECTOR,
                "bytes per sector is not a power of two from 512 to 4096",
            ));
        }
        let spc = u32::from(bs[bpb::SECTORS_PER_CLUSTER]);
        if !spc.is_power_of_two() {
            return Err((
                bpb::SECTORS_PER_CLUSTER,
                "sectors per cluster is not a power of two",
            ));
        }
        let reserved = u64::from(le16(bs, bpb::RESERVED_SECTORS));
        if reserved == 0 {
            return Err((bpb::RESERVED_SECTORS, "reserved sector count is zero"));
        }
        let fats = u64::from(bs[bpb::NUM_FATS]);
        if fats == 0 {
            return Err((bpb::NUM_FATS, "FAT count is zero"));
        }
        let root_entries = u64::from(le16(bs, bpb::ROOT_ENTRIES));
        let (total, total_at) = match le16(bs, bpb::TOTAL_SECTORS_16) {
            0 => (
                u64::from(le32(bs, bpb::TOTAL_SECTORS_32)),
                bpb::TOTAL_SECTORS_32,
            ),
            n => (u64::from(n), bpb::TOTAL_SECTORS_16),
        };
        if total == 0 {
            return Err((bpb::TOTAL_SECTORS_16, "total sector count is zero"));
        }
        let (fat_size, fat_size_at) = match le16(bs, bpb::FAT_SIZE_16) {
            0 => (u64::from(le32(bs, bpb::FAT_SIZE_32)), bpb::FAT_SIZE_32),
            n => (u64::from(n), bpb::FAT_SIZE_16),
        };
        if fat_size == 0 {
            return Err((bpb::FAT_SIZE_16, "FAT size is zero"));
        }
        let bps64 = u64::from(bps);
        // Each value is below 2^32, so none of these products overflow u64.
        let root_sectors = (root_entries * 32).div_ceil(bps64);
        let meta = reserved + fats * fat_size + root_sectors;
        let Some(data_sectors) = total.checked_sub(meta) else {
            return Err((
                total_at,
                "total sector count is smaller than the reserved sectors, FATs and root directory",
            ));
        };
        let clusters = data_sectors / u64::from(spc);
        if clusters == 0 {
            return Err((total_at, "the volume has no data clusters"));
        }
        let kind = if clusters < 4085 {
            FatKind::Fat12
        } else if clusters < 65525 {
            FatKind::Fat16
        } else {
            FatKind::Fat32
        };
        // The largest cluster number must stay below the "bad cluster" value.
        if clusters > 0x0FFF_FFF5 {
            return Err((total_at, "more clusters than FAT32 can address"));
        }
        let clusters32 = u32::try_from(clusters).map_err(|_| (total_at, "too many clusters"))?;
        // Bytes the FAT needs for entries 0..clusters + 2.
        let entries = clusters + 2;
        let fat_need = match kind {
            FatKind::Fat12 => (entries * 3).div_ceil(2),
            FatKind::Fat16 => entries * 2,
            FatKind::Fat32 => entries * 4,
        };
        if fat_need > fat_size * bps64 {
            return Err((fat_size_at, "the FAT is too small for the cluster count"));
        }
        let mut active = 0u64;
        let root = match kind {
            FatKind::Fat32 => {
                if root_entries != 0 {
                    return Err((
                        bpb::ROOT_ENTRIES,
                        "a FAT32 volume has a fixed root directory entry count",
                    ));
                }
                let flags = le16(bs, bpb::EXT_FLAGS);
                if flags & 0x80 != 0 {
                    active = u64::from(flags & 0x0F);
                    if active >= fats {
                        return Err((bpb::EXT_FLAGS, "the active FAT is past the FAT count"));
                    }
                }
                let rc = le32(bs, bpb::ROOT_CLUSTER);
                if rc < 2 || u64::from(rc) >= entries {
                    return Err((bpb::ROOT_CLUSTER, "root directory cluster is out of range"));
                }
                Root::Cluster(rc)
            }
            FatKind::Fat12 | FatKind::Fat16 => {
                if root_entries == 0 {
                    return Err((
                        bpb::ROOT_ENTRIES,
                        "a FAT12/16 volume has no root directory entries",
                    ));
                }
                Root::Fixed {
                    offset: (reserved + fats * fat_size) * bps64,
                    len: root_entries * 32,
                }
            }
        };
        if total * bps64 > dev_size {
            return Err((total_at, "the volume extends past the end of the device"));
        }
        Ok(Self {
            kind,
            cluster_size: spc * bps,
            fat_offset: (reserved + active * fat_size) * bps64,
            fat_bytes: fat_need,
            data_offset: (meta) * bps64,
            clusters: clusters32,
            root,
        })
    }

    /// Whether `c` names a data cluster.
    fn valid_cluster(&self, c: u32) -> bool {
        c >= 2 && u64::from(c) < u64::from(self.clusters) + 2
    }

    /// Byte offset of data cluster `c` (valid).
    fn cluster_offset(&self, c: u32) -> u64 {
        self.data_offset + u64::from(c - 2) * u64::from(self.cluster_size)
    }

    /// Byte offset (from the FAT's start) of the entry of cluster `c`.
    fn entry_offset(&self, c: u32) -> u64 {
        let c = u64::from(c);
        match self.kind {
            FatKind::Fat12 => c + c / 2,
            FatKind::Fat16 => c * 2,
            FatKind::Fat32 => c * 4,
        }
    }
}

/// One run of consecutive clusters: file bytes from `file_start` (up to the
/// next run's start) live at device byte `dev_start` onwards.
#[derive(Debug, Clone, Copy)]
struct Extent {
    file_start: u64,
    dev_start: u64,
}

/// A file's or directory's clusters, in file order.
#[derive(Debug, Clone, Default)]
struct Map {
    extents: Vec<Extent>,
    /// Bytes mapped (whole clusters, or the fixed root region).
    mapped: u64,
}

impl Map {
    /// The device offset of file byte `pos` and how many bytes from there on
    /// are contiguous on the device.
    fn locate(&self, pos: u64) -> Option<(u64, u64)> {
        if pos >= self.mapped {
            return None;
        }
        let i = self.extents.partition_point(|e| e.file_start <= pos);
        let e = self.extents.get(i.checked_sub(1)?)?;
        let end = self.extents.get(i).map_or(self.mapped, |n| n.file_start);
        Some((e.dev_start + (pos - e.file_start), end - pos))
    }
}

/// What following a chain found.
struct Chain {
    map: Map,
    /// Runs of consecutive clusters among the clusters taken (counted even
    /// past [`MAX_EXTENTS`], where the map stops growing).
    runs: usize,
    /// Clusters in the whole chain.
    len: u64,
}

/// Reads `buf.len()` bytes at any byte `offset` of `dev`.
fn read_dev<D: BlockIo>(
    dev: &mut D,
    bounce: &mut [u8],
    offset: u64,
    buf: &mut [u8],
    structure: &'static str,
) -> Result<(), FatError<D::Error>> {
    read_bytes(dev, offset, buf, bounce).map_err(|e| match e {
        BytesError::Device(source) => FatError::Io {
            source,
            structure,
            offset,
        },
        _ => FatError::BadDevice {
            sector_size: dev.sector_size(),
        },
    })
}

/// A bounce buffer of one device sector, or the device's bad sector size.
fn bounce_for<D: BlockIo>(dev: &D) -> Result<Vec<u8>, FatError<D::Error>> {
    let ss = dev.sector_size();
    if !ss.is_power_of_two() || ss > MAX_SECTOR_SIZE {
        return Err(FatError::BadDevice { sector_size: ss });
    }
    Ok(vec![0; ss as usize])
}

/// The device, a bounce buffer and a window of the FAT, for one `open`.
struct Reader<'g, D> {
    dev: D,
    geo: &'g Geometry,
    bounce: Vec<u8>,
    /// FAT bytes from `win_start` (relative to the FAT's start).
    win: Vec<u8>,
    win_start: u64,
}

impl<D: BlockIo> Reader<'_, D> {
    /// The FAT byte at `rel` (from the FAT's start; inside the FAT).
    fn fat_byte(&mut self, rel: u64) -> Result<u8, FatError<D::Error>> {
        let hit = rel
            .checked_sub(self.win_start)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.win.get(i).copied());
        if let Some(b) = hit {
            return Ok(b);
        }
        // The geometry checked that the entries lie in the FAT and the FAT
        // in the volume; the window stops at the last entry's end.
        let start = rel - rel % FAT_WINDOW;
        let len = FAT_WINDOW
            .min(self.geo.fat_bytes.saturating_sub(start))
            .max(1);
        // `len <= FAT_WINDOW`, so it fits.
        let len = usize::try_from(len).unwrap_or(1);
        self.win.resize(len, 0);
        self.win_start = u64::MAX;
        let at = self.geo.fat_offset + start;
        read_dev(&mut self.dev, &mut self.bounce, at, &mut self.win, "FAT")?;
        self.win_start = start;
        let i = usize::try_from(rel - start).unwrap_or(usize::MAX);
        self.win.get(i).copied().ok_or(FatError::Corrupt {
            structure: "FAT",
            offset: at,
            problem: "entry outside the FAT",
        })
    }

    /// The FAT entry of cluster `c`.
    fn fat_entry(&mut self, c: u32) -> Result<u32, FatError<D::Error>> {
        let rel = self.geo.entry_offset(c);
        let b0 = u32::from(self.fat_byte(rel)?);
        let b1 = u32::from(self.fat_byte(rel + 1)?);
        Ok(match self.geo.kind {
            FatKind::Fat12 => {
                let v = b0 | (b1 << 8);
                if c % 2 == 1 {
                    v >> 4
                } else {
                    v & 0x0FFF
                }
            }
            FatKind::Fat16 => b0 | (b1 << 8),
            FatKind::Fat32 => {
                let b2 = u32::from(self.fat_byte(rel + 2)?);
                let b3 = u32::from(self.fat_byte(rel + 3)?);
                (b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)) & 0x0FFF_FFFF
            }
        })
    }

    /// Follows the chain from `first` (valid) to its end, mapping its first
    /// `need` clusters. Never takes more steps than the volume has
    /// clusters, so a loop is an error, not a hang.
    fn chain(&mut self, first: u32, need: u64) -> Result<Chain, FatError<D::Error>> {
        let geo = *self.geo;
        let cs = u64::from(geo.cluster_size);
        let (eoc, bad) = match geo.kind {
            FatKind::Fat12 => (0x0FF8, 0x0FF7),
            FatKind::Fat16 => (0xFFF8, 0xFFF7),
            FatKind::Fat32 => (0x0FFF_FFF8, 0x0FFF_FFF7),
        };
        let mut map = Map::default();
        let mut runs = 0usize;
        let mut run_end = u64::MAX;
        let mut len = 0u64;
        let mut c = first;
        loop {
            if len < need {
                let dev = geo.cluster_offset(c);
                if dev != run_end {
                    runs += 1;
                    if map.extents.len() < MAX_EXTENTS {
                        map.extents.push(Extent {
                            file_start: map.mapped,
                            dev_start: dev,
                        });
                    }
                }
                run_end = dev + cs;
                map.mapped += cs;
            }
            len += 1;
            let at = geo.fat_offset + geo.entry_offset(c);
            if len > u64::from(geo.clusters) {
                return Err(FatError::Corrupt {
                    structure: "cluster chain",
                    offset: at,
                    problem: "the chain is longer than the volume has clusters (it loops)",
                });
            }
            let next = self.fat_entry(c)?;
            let problem = if next >= eoc {
                return Ok(Chain { map, runs, len });
            } else if next == bad {
                "the chain runs into a cluster marked bad"
            } else if next == 0 {
                "the chain runs into a free cluster"
            } else if next == 1 {
                "the chain holds the reserved value 1"
            } else if !geo.valid_cluster(next) {
                "the chain points past the last cluster of the volume"
            } else {
                c = next;
                continue;
            };
            return Err(FatError::Corrupt {
                structure: "cluster chain",
                offset: at,
                problem,
            });
        }
    }

    /// Maps a directory whose first cluster is `first` (0: the root).
    fn dir_map(
        &mut self,
        first: u32,
        entry_at: u64,
        path: &str,
    ) -> Result<Map, FatError<D::Error>> {
        let geo = *self.geo;
        let first = match (first, geo.root) {
            (0, Root::Fixed { offset, len }) => {
                return Ok(Map {
                    extents: vec![Extent {
                        file_start: 0,
                        dev_start: offset,
                    }],
                    mapped: len,
                })
            }
            (0, Root::Cluster(rc)) => rc,
            (c, _) if geo.valid_cluster(c) => c,
            _ => {
                return Err(FatError::Corrupt {
                    structure: "directory entry",
                    offset: entry_at,
                    problem: "the directory's first cluster is out of range",
                })
            }
        };
        let cap = MAX_DIR_BYTES.div_ceil(u64::from(geo.cluster_size));
        let chain = self.chain(first, cap)?;
        if chain.len > cap {
            return Err(FatError::Corrupt {
                structure: "cluster chain",
                offset: geo.fat_offset + geo.entry_offset(first),
                problem: "the directory is longer than 65,536 entries",
            });
        }
        if chain.runs > MAX_EXTENTS {
            return Err(FatError::TooFragmented {
                path: String::from(path),
                extents: chain.runs,
                max: MAX_EXTENTS,
            });
        }
        Ok(chain.map)
    }

    /// Looks `name` up in the directory mapped by `dir`.
    fn find(&mut self, dir: &Map, name: &str) -> Result<Option<Found>, FatError<D::Error>> {
        let want: Vec<u16> = name.encode_utf16().collect();
        let mut lfn = Lfn::new();
        let mut chunk = [0u8; 512];
        let mut pos = 0u64;
        while pos < dir.mapped {
            let Some((dev_at, avail)) = dir.locate(pos) else {
                break;
            };
            // Chunks start at multiples of 512 and every run is whole
            // clusters (or the one root region), so a chunk stays in a run.
            let n = avail.min(dir.mapped - pos).min(512);
            let n = usize::try_from(n).unwrap_or(512);
            let n = n - n % ENTRY;
            if n == 0 {
                break;
            }
            read_dev(
                &mut self.dev,
                &mut self.bounce,
                dev_at,
                &mut chunk[..n],
                "directory entry",
            )?;
            for (i, e) in chunk[..n].chunks_exact(ENTRY).enumerate() {
                let entry_at = dev_at + (i * ENTRY) as u64;
                match e[0] {
                    0x00 => return Ok(None),
                    0xE5 => {
                        lfn.reset();
                        continue;
                    }
                    _ => {}
                }
                let attr = e[11];
                if attr & 0x3F == ATTR_LONG_NAME {
                    lfn.push(e);
                    continue;
                }
                let long = lfn.take(e);
                if attr & ATTR_VOLUME_ID != 0
                    || &e[..11] == b".          "
                    || &e[..11] == b"..         "
                {
                    continue;
                }
                let hit = long.is_some_and(|l| units_match(l, &want)) || short_match(e, name);
                if hit {
                    let hi = match self.geo.kind {
                        FatKind::Fat32 => u32::from(le16(e, 20)),
                        FatKind::Fat12 | FatKind::Fat16 => 0,
                    };
                    return Ok(Some(Found {
                        attr,
                        first: (hi << 16) | u32::from(le16(e, 26)),
                        size: le32(e, 28),
                        at: entry_at,
                    }));
                }
            }
            pos += n as u64;
        }
        Ok(None)
    }
}

/// A directory entry that matched.
struct Found {
    attr: u8,
    first: u32,
    size: u32,
    /// Byte offset of the short entry on the device.
    at: u64,
}

/// The long name being assembled from the entries before a short entry.
struct Lfn {
    units: [u16; LFN_UNITS],
    /// Entries in the name (from the first, flagged, entry).
    total: usize,
    /// The sequence number the next entry must carry (0: complete).
    next: usize,
    checksum: u8,
    active: bool,
}

impl Lfn {
    fn new() -> Self {
        Self {
            units: [0xFFFF; LFN_UNITS],
            total: 0,
            next: 0,
            checksum: 0,
            active: false,
        }
    }

    fn reset(&mut self) {
        self.active = false;
    }

    /// Takes one long-name entry; one out of sequence drops the name.
    fn push(&mut self, e: &[u8]) {
        let ord = e[0];
        let seq = usize::from(ord & 0x1F);
        // Byte 12 (type) is 0 in a name entry; cluster (26) is 0.
        if e[12] != 0 || le16(e, 26) != 0 || seq == 0 || seq * 13 > LFN_UNITS {
            self.reset();
            return;
        }
        if ord & 0x40 != 0 {
            self.units = [0xFFFF; LFN_UNITS];
            self.total = seq;
            self.checksum = e[13];
            self.active = true;
        } else if !self.active || seq != self.next || e[13] != self.checksum {
            self.reset();
            return;
        }
        let base = (seq - 1) * 13;
        let spots = (1..11)
            .step_by(2)
            .chain((14..26).step_by(2))
            .chain((28..32).step_by(2));
        for (k, at) in spots.enumerate() {
            self.units[base + k] = le16(e, at);
        }
        self.next = seq - 1;
    }

    /// The long name belonging to short entry `e`, if a complete one with
    /// the right checksum precedes it; resets either way.
    fn take(&mut self, e: &[u8]) -> Option<&[u16]> {
        let ok = self.active && self.next == 0 && short_checksum(e) == self.checksum;
        self.active = false;
        if !ok {
            return None;
        }
        let all = &self.units[..self.total * 13];
        let end = all.iter().position(|&u| u == 0).unwrap_or(all.len());
        Some(&all[..end])
    }
}

/// The checksum of a short name that its long-name entries carry.
fn short_checksum(e: &[u8]) -> u8 {
    e[..11]
        .iter()
        .fold(0u8, |sum, &b| sum.rotate_right(1).wrapping_add(b))
}

fn fold(u: u16) -> u16 {
    if (u16::from(b'a')..=u16::from(b'z')).contains(&u) {
        u - 32
    } else {
        u
    }
}

/// Long name `have` against `want`, ASCII letters case-insensitively.
fn units_match(have: &[u16], want: &[u16]) -> bool {
    have.len() == want.len() && have.iter().zip(want).all(|(&a, &b)| fold(a) == fold(b))
}

/// The 8.3 name of short entry `e` ("NAME.EXT", "NAME") against `name`.
fn short_match(e: &[u8], name: &str) -> bool {
    let mut base = [0u8; 8];
    base.copy_from_slice(&e[..8]);
    if base[0] == 0x05 {
        base[0] = 0xE5;
    }
    let blen = base.iter().rposition(|&b| b != b' ').map_or(0, |p| p + 1);
    let ext = &e[8..11];
    let elen = ext.iter().rposition(|&b| b != b' ').map_or(0, |p| p + 1);
    let name = name.as_bytes();
    let (nb, ne) = match name.iter().position(|&b| b == b'.') {
        Some(dot) if elen > 0 => (&name[..dot], &name[dot + 1..]),
        _ if elen > 0 => return false,
        _ => (name, &name[name.len()..]),
    };
    nb.eq_ignore_ascii_case(&base[..blen]) && ne.eq_ignore_ascii_case(&ext[..elen])
}

/// The components of `path` after resolving "." and "..".
fn components(path: &str) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for c in path.split(['/', '\\']) {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Joins a backing-file name to the directory of `image_path` (QEMU resolves
/// a relative backing name against the image's directory): handles '\' and
/// '/', "." and "..", and an absolute `name` (leading separator) as
/// volume-absolute. The result is absolute, separated by '\'.
pub fn sibling(image_path: &str, name: &str) -> String {
    let mut joined = String::new();
    if !name.starts_with(['/', '\\']) {
        if let Some(cut) = image_path.rfind(['/', '\\']) {
            joined.push_str(&image_path[..cut]);
        }
        joined.push('\\');
    }
    joined.push_str(name);
    let mut out = String::new();
    for c in components(&joined) {
        out.push('\\');
        out.push_str(c);
    }
    if out.is_empty() {
        out.push('\\');
    }
    out
}

/// A mounted FAT12/16/32 volume: its validated boot sector and the device.
#[derive(Debug)]
pub struct FatVolume<D> {
    dev: D,
    geo: Geometry,
}

impl<D: BlockIo + Clone> FatVolume<D> {
    /// Reads and validates the boot sector of the volume on `dev`.
    pub fn mount(mut dev: D) -> Result<Self, FatError<D::Error>> {
        let mut bounce = bounce_for(&dev)?;
        let dev_size = dev.size().map_err(|source| FatError::Io {
            source,
            structure: "device size",
            offset: 0,
        })?;
        if dev_size < 512 {
            return Err(FatError::Corrupt {
                structure: "boot sector",
                offset: 0,
                problem: "the device is smaller than one 512-byte boot sector",
            });
        }
        let mut bs = [0u8; 512];
        read_dev(&mut dev, &mut bounce, 0, &mut bs, "boot sector")?;
        let geo = Geometry::parse(&bs, dev_size).map_err(|(at, problem)| FatError::Corrupt {
            structure: "boot sector",
            offset: at as u64,
            problem,
        })?;
        Ok(Self { dev, geo })
    }

    /// Which FAT variant the volume is.
    pub fn kind(&self) -> FatKind {
        self.geo.kind
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u32 {
        self.geo.cluster_size
    }

    /// Opens the file at `path`: absolute, components separated by '\' or
    /// '/', case-insensitive; long (VFAT LFN) names and 8.3 names both
    /// match. Maps the file's clusters once; reads then go straight to the
    /// device.
    pub fn open(&self, path: &str) -> Result<FatFile<D>, FatError<D::Error>> {
        let mut r = Reader {
            bounce: bounce_for(&self.dev)?,
            dev: self.dev.clone(),
            geo: &self.geo,
            win: Vec::new(),
            win_start: u64::MAX,
        };
        let parts = components(path);
        let Some((last, dirs)) = parts.split_last() else {
            return Err(FatError::NotAFile {
                path: String::from(path),
            });
        };
        let not_found = || FatError::NotFound {
            path: String::from(path),
        };
        let mut dir = r.dir_map(0, 0, path)?;
        for part in dirs {
            let f = r.find(&dir, part)?.ok_or_else(not_found)?;
            if f.attr & ATTR_DIRECTORY == 0 {
                return Err(not_found());
            }
            dir = r.dir_map(f.first, f.at + 26, path)?;
        }
        let f = r.find(&dir, last)?.ok_or_else(not_found)?;
        if f.attr & ATTR_DIRECTORY != 0 {
            return Err(FatError::NotAFile {
                path: String::from(path),
            });
        }
        let len = u64::from(f.size);
        let need = len.div_ceil(u64::from(self.geo.cluster_size));
        let map = if need == 0 {
            Map::default()
        } else {
            if need > u64::from(self.geo.clusters) {
                return Err(FatError::Corrupt {
                    structure: "directory entry",
                    offset: f.at + 28,
                    problem: "the file size is larger than the volume's data area",
                });
            }
            if !self.geo.valid_cluster(f.first) {
                return Err(FatError::Corrupt {
                    structure: "directory entry",
                    offset: f.at + 26,
                    problem: "the file's first cluster is out of range",
                });
            }
            let chain = r.chain(f.first, need)?;
            if chain.len < need {
                return Err(FatError::Corrupt {
                    structure: "cluster chain",
                    offset: self.geo.fat_offset + self.geo.entry_offset(f.first),
                    problem: "the chain is shorter than the file size says",
                });
            }
            if chain.runs > MAX_EXTENTS {
                return Err(FatError::TooFragmented {
                    path: String::from(path),
                    extents: chain.runs,
                    max: MAX_EXTENTS,
                });
            }
            chain.map
        };
        Ok(FatFile {
            dev: r.dev,
            bounce: r.bounce,
            len,
            size: len.div_ceil(u64::from(FILE_SECTOR)) * u64::from(FILE_SECTOR),
            map,
        })
    }
}

/// One file of a [`FatVolume`], as a read-only [`BlockIo`] of 512-byte
/// sectors: its size is the file length rounded up to 512, and the bytes
/// past the end of the file read as zeros.
#[derive(Debug)]
pub struct FatFile<D> {
    dev: D,
    bounce: Vec<u8>,
    len: u64,
    size: u64,
    map: Map,
}

impl<D: BlockIo> FatFile<D> {
    /// The file length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many runs of consecutive clusters the file's map holds (16 bytes
    /// each).
    pub fn extents(&self) -> usize {
        self.map.extents.len()
    }
}

impl<D: BlockIo> BlockIo for FatFile<D> {
    type Error = FatError<D::Error>;

    fn sector_size(&self) -> u32 {
        FILE_SECTOR
    }

    fn size(&mut self) -> Result<u64, Self::Error> {
        Ok(self.size)
    }

    /// Reads whole 512-byte sectors, one device read for each run of
    /// consecutive clusters the request touches.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        let len = buf.len();
        let bad = |problem| FatError::BadRequest {
            offset,
            len,
            problem,
        };
        let ss = u64::from(FILE_SECTOR);
        if !offset.is_multiple_of(ss) || !(len as u64).is_multiple_of(ss) {
            return Err(bad("not whole 512-byte sectors"));
        }
        let end = match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.size => end,
            _ => return Err(bad("past the end of the file")),
        };
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let Some((dev_at, avail)) = self.map.locate(pos) else {
                return Err(bad("past the file's clusters"));
            };
            let n = usize::try_from(avail).map_or(buf.len() - done, |a| a.min(buf.len() - done));
            read_dev(
                &mut self.dev,
                &mut self.bounce,
                dev_at,
                &mut buf[done..done + n],
                "file data",
            )?;
            done += n;
        }
        if end > self.len {
            let from = usize::try_from(self.len.saturating_sub(offset)).unwrap_or(buf.len());
            buf[from..].fill(0);
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, _buf: &[u8]) -> Result<(), Self::Error> {
        Err(FatError::ReadOnly { offset })
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, _len: u64) -> Result<(), Self::Error> {
        Err(FatError::ReadOnly { offset })
    }
}
