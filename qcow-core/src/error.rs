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
    /// A guest data cluster.
    DataCluster,
    /// A compressed cluster.
    CompressedCluster,
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Header => "qcow2 header",
            Self::HeaderExtension => "qcow2 header extension",
            Self::L1Table => "L1 table",
            Self::L2Table => "L2 table",
            Self::RefcountTable => "refcount table",
            Self::RefcountBlock => "refcount block",
            Self::SnapshotTable => "snapshot table",
            Self::DataCluster => "data cluster",
            Self::CompressedCluster => "compressed cluster",
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
    /// An error from the LUKS layer of an encrypted image.
    Luks(luks_core::Error<E>),
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
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for Error<E> {}
