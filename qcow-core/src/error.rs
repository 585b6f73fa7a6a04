//! The error model: no allocation, and every variant says what went wrong,
//! where (structure and byte offset), and so what a user can do about it.

use core::fmt;

/// The on-disk structure an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Structure {
    /// The fixed qcow2 header.
    Header,
    /// A header extension.
    HeaderExtension,
    /// The backing file name stored in cluster 0.
    BackingFileName,
    /// The active L1 table.
    L1Table,
    /// An L2 table.
    L2Table,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The snapshot table.
    SnapshotTable,
    /// A snapshot's copy of the L1 table.
    SnapshotL1Table,
    /// A guest data cluster.
    DataCluster,
    /// A compressed cluster.
    CompressedCluster,
    /// The backing device.
    Backing,
    /// The external data file.
    DataFile,
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Header => "qcow2 header",
            Self::HeaderExtension => "qcow2 header extension",
            Self::BackingFileName => "backing file name",
            Self::L1Table => "L1 table",
            Self::L2Table => "L2 table",
            Self::RefcountTable => "refcount table",
            Self::RefcountBlock => "refcount block",
            Self::SnapshotTable => "snapshot table",
            Self::SnapshotL1Table => "snapshot L1 table",
            Self::DataCluster => "data cluster",
            Self::CompressedCluster => "compressed cluster",
            Self::Backing => "backing device",
            Self::DataFile => "external data file",
        })
    }
}

/// What is wrong with a structure that failed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The bytes are shorter than the structure.
    Truncated {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// The magic number is not `QFI\xfb`.
    BadMagic(u32),
    /// `cluster_bits` outside `9..=21`.
    ClusterBits(u32),
    /// `header_length` is below 104, not a multiple of 8, or past cluster 0.
    HeaderLength(u32),
    /// `refcount_order` above 6.
    RefcountOrder(u32),
    /// `crypt_method` other than 0, 1, 2.
    CryptMethod(u32),
    /// An offset that must be cluster aligned is not.
    Unaligned(u64),
    /// A field points outside the region it must lie in.
    OutOfRange(u64),
    /// An offset or size computation overflowed.
    Overflow,
    /// An L1 table with entries at offset 0, over the image header.
    L1AtHeader {
        /// Entries in the table.
        l1_size: u32,
    },
    /// The L1 table has fewer entries than the virtual size needs.
    L1TooSmall {
        /// Entries in the table.
        l1_size: u32,
        /// Entries needed.
        needed: u64,
    },
    /// A header extension runs past the end of its area.
    ExtensionOverrun {
        /// The extension type.
        ext_type: u32,
        /// Its declared length.
        len: u32,
    },
    /// A header extension's length is wrong for its type.
    ExtensionLength {
        /// The extension type.
        ext_type: u32,
        /// Its declared length.
        len: u32,
    },
    /// A header extension type appears twice.
    DuplicateExtension(u32),
    /// `compression_type` is not zlib but incompatible bit 3 is clear.
    CompressionTypeWithoutFeature(u8),
    /// Extended L2 entries need clusters of at least 16 KiB.
    ExtendedL2SmallCluster(u32),
    /// An external data file is flagged raw but the image has no data file.
    DataFileRawWithoutDataFile,
    /// A subcluster is flagged both allocated and reads-as-zero, or
    /// allocated in an unallocated cluster.
    InvalidSubcluster {
        /// The L2 bitmap word.
        bitmap: u64,
    },
    /// A compressed cluster flag in a table or mode where it is not allowed.
    CompressedNotAllowed,
    /// A compressed cluster did not decompress to a full cluster.
    Decompress,
    /// A snapshot entry's extra data is shorter than the version requires.
    SnapshotExtraTooSmall(u32),
    /// crypt_method 2 (LUKS) without the full disk encryption header
    /// extension that locates the LUKS header.
    MissingCryptoExtension,
    /// The full disk encryption header extension is present but
    /// crypt_method is not 2 (LUKS); QEMU refuses the open.
    UnexpectedCryptoExtension(crate::header::CryptMethod),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::UnexpectedCryptoExtension(m) => write!(
                f,
                "encryption header extension (0x0537be77) only expected with LUKS \
                 encryption (crypt_method 2), but crypt_method is {m}"
            ),
            Self::MissingCryptoExtension => {
                f.write_str("LUKS encryption without the encryption header extension (0x0537be77)")
            }
            Self::Truncated { needed, available } => {
                write!(f, "truncated: {needed} bytes needed, {available} available")
            }
            Self::BadMagic(m) => write!(f, "bad magic {m:#010x} (expected 0x514649fb)"),
            Self::ClusterBits(b) => write!(f, "cluster_bits {b} outside 9..=21"),
            Self::HeaderLength(l) => write!(f, "invalid header_length {l}"),
            Self::RefcountOrder(o) => write!(f, "refcount_order {o} above 6"),
            Self::CryptMethod(m) => write!(f, "unknown crypt_method {m}"),
            Self::Unaligned(v) => write!(f, "offset {v:#x} is not cluster aligned"),
            Self::OutOfRange(v) => write!(f, "value {v:#x} out of range"),
            Self::Overflow => f.write_str("offset or size overflows"),
            Self::L1AtHeader { l1_size } => write!(
                f,
                "L1 table of {l1_size} entries at offset 0x0, over the image header \
                 (only an L1 table of 0 entries may have offset 0)"
            ),
            Self::L1TooSmall { l1_size, needed } => write!(
                f,
                "L1 table has {l1_size} entries, the virtual size needs {needed}"
            ),
            Self::ExtensionOverrun { ext_type, len } => write!(
                f,
                "extension {ext_type:#010x} of {len} bytes runs past the end of the extension area"
            ),
            Self::ExtensionLength { ext_type, len } => {
                write!(f, "extension {ext_type:#010x} has invalid length {len}")
            }
            Self::DuplicateExtension(t) => write!(f, "extension {t:#010x} appears twice"),
            Self::CompressionTypeWithoutFeature(t) => write!(
                f,
                "compression_type {t} set but incompatible feature bit 3 is clear"
            ),
            Self::ExtendedL2SmallCluster(b) => write!(
                f,
                "extended L2 entries need clusters of at least 16 KiB (cluster_bits {b})"
            ),
            Self::DataFileRawWithoutDataFile => {
                f.write_str("data_file_raw is set but there is no external data file")
            }
            Self::InvalidSubcluster { bitmap } => {
                write!(f, "invalid subcluster bitmap {bitmap:#018x}")
            }
            Self::CompressedNotAllowed => f.write_str("compressed flag where it is not allowed"),
            Self::Decompress => {
                f.write_str("compressed data does not decompress to a full cluster")
            }
            Self::SnapshotExtraTooSmall(n) => {
                write!(
                    f,
                    "snapshot extra data of {n} bytes is below the 16 v3 needs"
                )
            }
        }
    }
}

/// Maximum bytes of a feature name in the feature name table.
pub const FEATURE_NAME_LEN: usize = 46;

/// A feature the image needs and this code does not provide.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unsupported {
    /// qcow2 version other than 2 or 3.
    Version(u32),
    /// An unknown incompatible feature bit, with its name from the feature
    /// name table when the image has one.
    IncompatibleFeature {
        /// Bit number.
        bit: u8,
        /// Name from the feature name table (empty when unknown).
        name: heapless::String<FEATURE_NAME_LEN>,
    },
    /// A compression type other than zlib (0) and zstd (1).
    CompressionType(u8),
    /// zstd clusters need the `alloc` feature (no allocation-free pure-Rust
    /// zstd decoder exists).
    ZstdWithoutAlloc,
    /// Reading data from an encrypted image needs a decryptor.
    Encrypted {
        /// The crypt method: legacy AES or LUKS.
        method: crate::header::CryptMethod,
    },
    /// Writing is not available for this image (the allocation-free
    /// reader, or an encrypted image without its key).
    Writing,
    /// Internal snapshots share clusters, which 1-bit refcounts cannot
    /// count (use a wider `refcount_bits`).
    SnapshotRefcountWidth,
    /// Reverting to a snapshot taken at another virtual size (resize the
    /// image to the snapshot's size first).
    SnapshotSize {
        /// The snapshot's virtual size.
        snapshot: u64,
        /// The image's current virtual size.
        current: u64,
    },
    /// Internal snapshots of an image with an external data file (QEMU
    /// refuses them too: the data file cannot share clusters).
    SnapshotWithDataFile,
    /// Writing an image whose dirty bit is set (lazy refcounts, not closed
    /// cleanly) whose refcounts could not be rebuilt cleanly on open.
    Dirty,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Version(v) => write!(f, "unsupported qcow2 version {v}"),
            Self::IncompatibleFeature { bit, name } if name.is_empty() => {
                write!(f, "unsupported incompatible feature bit {bit}")
            }
            Self::IncompatibleFeature { bit, name } => {
                write!(f, "unsupported incompatible feature bit {bit} ({name})")
            }
            Self::CompressionType(t) => write!(f, "unsupported compression type {t}"),
            Self::ZstdWithoutAlloc => f.write_str(
                "zstd-compressed clusters need qcow-core's `alloc` feature (no allocation-free zstd decoder)",
            ),
            Self::Encrypted { method } => write!(
                f,
                "reading data of an encrypted image (crypt_method {method}) needs a decryptor"
            ),
            Self::Writing => f.write_str(
                "writing is not supported for this qcow2 image (read-only reader, or encryption without a key)",
            ),
            Self::SnapshotRefcountWidth => f.write_str(
                "internal snapshots need refcounts of at least 2 bits (this image has refcount_bits=1)",
            ),
            Self::SnapshotSize { snapshot, current } => write!(
                f,
                "the snapshot was taken at virtual size {snapshot}, the image is now {current} bytes; resize it back first"
            ),
            Self::SnapshotWithDataFile => f.write_str(
                "internal snapshots are not supported on images with an external data file",
            ),
            Self::Dirty => f.write_str(
                "the image was not closed cleanly (dirty bit set, lazy refcounts) and rebuilding its refcounts did not leave it clean; see `qimg check`, then repair it with `qimg check -r all`",
            ),
        }
    }
}

/// Which named limit a value exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Limit {
    /// [`crate::limits::MAX_L1_ENTRIES`].
    L1Entries,
    /// [`crate::limits::MAX_REFCOUNT_TABLE_BYTES`].
    RefcountTableBytes,
    /// [`crate::limits::MAX_SNAPSHOTS`].
    Snapshots,
    /// [`crate::limits::MAX_SNAPSHOT_EXTRA`].
    SnapshotExtra,
    /// [`crate::limits::MAX_NAME_LEN`].
    NameLength,
    /// [`crate::limits::MAX_SNAPSHOT_ID_LEN`].
    SnapshotIdLength,
    /// [`crate::limits::MAX_SNAPSHOT_NAME_LEN`].
    SnapshotNameLength,
    /// [`crate::image::MAX_BITMAP_DIRECTORY_BYTES`].
    BitmapDirectoryBytes,
    /// [`crate::image::MAX_SNAPSHOT_TABLE_BYTES`].
    SnapshotTableBytes,
    /// A refcount at the most its width can hold (a cluster shared by too
    /// many snapshots).
    RefcountValue,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::L1Entries => "L1 entries",
            Self::RefcountTableBytes => "refcount table bytes",
            Self::Snapshots => "snapshots",
            Self::SnapshotExtra => "snapshot extra data bytes",
            Self::NameLength => "name bytes",
            Self::SnapshotIdLength => "snapshot id bytes",
            Self::SnapshotNameLength => "snapshot name bytes",
            Self::BitmapDirectoryBytes => "bitmap directory bytes",
            Self::SnapshotTableBytes => "snapshot table bytes",
            Self::RefcountValue => "refcount",
        })
    }
}

/// Everything that can go wrong in `qcow-core`, generic over the device's
/// own error `E`.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error<E> {
    /// The device failed while reading or writing `structure` at `offset`.
    Io {
        /// The device's error.
        source: E,
        /// What was being read or written.
        structure: Structure,
        /// Byte offset on the device.
        offset: u64,
    },
    /// An error from the LUKS header inside an encrypted image (read
    /// through a window over the header region).
    Luks(luks_core::Error<luks_core::io::WindowError<E>>),
    /// The image is damaged: `structure` at byte `offset` has `problem`.
    Corrupt {
        /// The structure at fault.
        structure: Structure,
        /// Byte offset of the structure or field in the image file.
        offset: u64,
        /// What is wrong.
        problem: Problem,
    },
    /// The image uses a feature this code does not provide.
    Unsupported(Unsupported),
    /// A field exceeds a named safety limit.
    Limit {
        /// The structure holding the value.
        structure: Structure,
        /// Byte offset of the structure or field.
        offset: u64,
        /// Which limit.
        limit: Limit,
        /// The value found.
        value: u64,
        /// The limit.
        max: u64,
    },
    /// A write to an image opened read-only.
    ReadOnly,
    /// The image's corrupt bit is set: it may only be opened read-only.
    MarkedCorrupt,
    /// A caller-provided buffer is too small.
    BufferTooSmall {
        /// What the buffer is for.
        what: Buffer,
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        given: usize,
    },
    /// A guest request outside the virtual disk or not 512-byte aligned.
    BadRequest {
        /// Start of the request.
        offset: u64,
        /// Its length.
        len: u64,
        /// The virtual size.
        size: u64,
    },
    /// The image names a backing file but no backing device was attached
    /// (attach one, or call `ignore_backing`).
    BackingMissing,
    /// The image keeps its data in an external file, which was not attached.
    DataFileMissing,
    /// No snapshot has the requested index, id or name.
    NoSuchSnapshot,
    /// The decryptor failed on the cluster at `host_offset`.
    Decrypt {
        /// Host offset of the data.
        host_offset: u64,
    },
}

/// Which caller-provided buffer was too small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Buffer {
    /// The L2 slice cache.
    Cache,
    /// The compressed-input buffer.
    CompressedInput,
    /// The decompressed-output buffer.
    CompressedOutput,
    /// A scratch sector for the device.
    Bounce,
}

impl fmt::Display for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cache => "L2 cache",
            Self::CompressedInput => "compressed-input buffer",
            Self::CompressedOutput => "decompressed-output buffer",
            Self::Bounce => "bounce sector",
        })
    }
}

impl<E> Error<E> {
    pub(crate) fn corrupt(structure: Structure, offset: u64, problem: Problem) -> Self {
        Self::Corrupt {
            structure,
            offset,
            problem,
        }
    }

    /// [`Error::Limit`] for `structure` at `offset` when `value` exceeds
    /// `max`, the value of the named `limit`.
    pub(crate) fn check_limit(
        structure: Structure,
        offset: u64,
        limit: Limit,
        value: u64,
        max: u64,
    ) -> Result<(), Self> {
        if value > max {
            return Err(Self::Limit {
                structure,
                offset,
                limit,
                value,
                max,
            });
        }
        Ok(())
    }
}

/// The name of the qcow2 header field at `offset`, for messages about the
/// header itself.
fn header_field_name(structure: Structure, offset: u64) -> Option<&'static str> {
    use crate::header::field;
    if structure != Structure::Header {
        return None;
    }
    let at = usize::try_from(offset).ok()?;
    let names = [
        (field::VERSION.start, "version"),
        (field::BACKING_FILE_OFFSET.start, "backing_file_offset"),
        (field::BACKING_FILE_SIZE.start, "backing_file_size"),
        (field::CLUSTER_BITS.start, "cluster_bits"),
        (field::SIZE.start, "size"),
        (field::CRYPT_METHOD.start, "crypt_method"),
        (field::L1_SIZE.start, "l1_size"),
        (field::L1_TABLE_OFFSET.start, "l1_table_offset"),
        (field::REFCOUNT_TABLE_OFFSET.start, "refcount_table_offset"),
        (
            field::REFCOUNT_TABLE_CLUSTERS.start,
            "refcount_table_clusters",
        ),
        (field::NB_SNAPSHOTS.start, "nb_snapshots"),
        (field::SNAPSHOTS_OFFSET.start, "snapshots_offset"),
        (field::INCOMPATIBLE_FEATURES.start, "incompatible_features"),
    ];
    names.iter().find(|(o, _)| *o == at).map(|(_, n)| *n)
}

impl<E: fmt::Display> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io {
                source,
                structure,
                offset,
            } => write!(
                f,
                "I/O error on the {structure} at offset {offset}: {source}"
            ),
            Self::Luks(e) => e.fmt(f),
            Self::Corrupt {
                structure,
                offset,
                problem,
            } => match header_field_name(*structure, *offset) {
                Some(name) => write!(
                    f,
                    "corrupt {structure} at offset {offset:#x} ({name}): {problem}"
                ),
                None => write!(f, "corrupt {structure} at offset {offset:#x}: {problem}"),
            },
            Self::Unsupported(u) => u.fmt(f),
            Self::Limit {
                structure,
                offset,
                limit,
                value,
                max,
            } => write!(
                f,
                "{structure} at offset {offset:#x}: {value} {limit} exceeds the limit of {max}"
            ),
            Self::ReadOnly => f.write_str("the qcow2 image is open read-only"),
            Self::MarkedCorrupt => f.write_str(
                "the image is marked corrupt; open it read-only or repair it with check -r",
            ),
            Self::BufferTooSmall {
                what,
                needed,
                given,
            } => write!(f, "the {what} holds {given} bytes, {needed} are needed"),
            Self::BadRequest { offset, len, size } => write!(
                f,
                "request of {len} bytes at {offset} is unaligned or outside the {size}-byte disk"
            ),
            Self::BackingMissing => {
                f.write_str("the image has a backing file but no backing device was attached")
            }
            Self::DataFileMissing => f.write_str(
                "the image keeps its data in an external data file that was not attached",
            ),
            Self::NoSuchSnapshot => f.write_str("no such snapshot"),
            Self::Decrypt { host_offset } => {
                write!(
                    f,
                    "decrypting the cluster at host offset {host_offset:#x} failed"
                )
            }
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for Error<E> {}

/// Converts a layered device's error into this image's error: a plain
/// device error is wrapped as [`Error::Io`]; a stacked qcow2 image's
/// [`Error`] passes through unchanged.
pub trait LayerError<E> {
    /// Wraps or passes through `self`.
    fn into_layer(self, structure: Structure, offset: u64) -> Error<E>;
}

impl<E> LayerError<E> for E {
    fn into_layer(self, structure: Structure, offset: u64) -> Error<E> {
        Error::Io {
            source: self,
            structure,
            offset,
        }
    }
}

impl<E> LayerError<E> for Error<E> {
    fn into_layer(self, _structure: Structure, _offset: u64) -> Error<E> {
        self
    }
}
