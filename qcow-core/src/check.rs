//! Consistency check and repair of qcow2 images (needs `alloc`).
//!
//! [`check`] walks every structure an image references: cluster 0 (header
//! and extensions), the active L1 table and those of every snapshot, their
//! L2 tables, data and compressed clusters, the snapshot table, the
//! refcount table and blocks, the bitmap directory and bitmap tables and
//! the LUKS header region of encrypted images. It rebuilds the reference
//! count of every cluster of the file and compares it with the stored
//! refcounts, reporting each difference as qemu-img does (a *leak* when the
//! stored refcount is higher, a *corruption* when it is lower), together
//! with misaligned tables and clusters, references past the end of the file,
//! reserved bits, wrong COPIED flags and broken refcount tables.
//!
//! Memory: the rebuilt counts are one saturating `u16` per cluster that
//! exists in the file (file length / cluster size), not per guest cluster,
//! so a sparse 4 TiB image with a small file needs a small table. Tables
//! are read a cluster at a time.
//!
//! Repair ([`Repair::Leaks`], [`Repair::All`]) follows the writer's
//! ordering (ARCHITECTURE.md, "qcow2 write ordering"): refcounts are only
//! lowered for clusters nothing references; when a refcount is too low or
//! the refcount structure is unusable, a complete new refcount table and
//! new blocks are written past the end of the file and flushed before one
//! header write switches to them, so a crash leaves either the old or the
//! new structure in place, never a mix. COPIED flags are fixed last, once
//! the refcounts they describe are right.

extern crate alloc;

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use crate::entry::{self, CompressedDescriptor, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::error::{Error, LayerError, Limit, Problem, Structure};
use crate::header::{autoclear, field, incompat, BitmapsExt, CryptMethod, CryptoExt, HeaderRepr};
use crate::limits::{MAX_L1_ENTRIES, MAX_REFCOUNT_TABLE_BYTES};
use crate::snapshot::{self, SnapshotFixed};
use crate::table::{word, L2Geometry, RawL2, RefblockAt, RefcountGeometry};
use crate::units::{ClusterIndex, HostOffset};
use luks_core::io::BlockIo;

mod img;
mod repair;
mod report;
mod walk;

use img::*;
use repair::*;
pub use report::{CheckOutcome, CheckReport, Finding, FragInfo, Repair, SnapshotName};
use walk::*;

/// Reserved bits of an L1 entry (bits 0..=8 and 56..=62).
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry that is not compressed (bits 1..=8
/// and 56..=61).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Reserved bits of a refcount table entry (bits 0..=8).
const REFT_RESERVED: u64 = 0x1ff;
/// Bitmap table entries: the offset field.
const BME_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Most bitmaps a directory may list (QEMU's limit).
const MAX_BITMAPS: u32 = 65535;
/// The largest byte offset a file can have (`i64::MAX`).
const MAX_FILE_OFFSET: u64 = i64::MAX as u64;
/// L1 entries read per device request.
const L1_CHUNK: usize = 4096;

/// Everything a pass learns that repair needs.
struct Pass {
    pub(super) report: CheckReport,
    /// References found per cluster (without the refcount structure).
    pub(super) base: Vec<u16>,
    /// References found per cluster, the refcount structure included.
    pub(super) counts: Vec<u16>,
    /// The refcount structure must be rebuilt.
    pub(super) rebuild: bool,
    /// Stored refcounts are unreadable for some cluster.
    pub(super) unreadable: bool,
}

/// Checks the qcow2 image on `dev` and, with `repair`, repairs it, then
/// checks it again. Errors are returned only when the image cannot be
/// checked at all (no qcow2 header, a device failure); everything else is
/// a [`Finding`].
pub fn check<D: BlockIo>(dev: &mut D, repair: Repair) -> Result<CheckOutcome, Error<D::Error>> {
    let mut img = Img::open(dev)?;
    if img.crypto.is_some() && img.hdr.crypt_method != CryptMethod::Luks {
        return Err(Error::corrupt(
            Structure::Header,
            field::CRYPT_METHOD.start as u64,
            Problem::UnexpectedCryptoExtension(img.hdr.crypt_method),
        ));
    }
    let dirty = img.hdr.incompatible_features & incompat::DIRTY != 0;
    let mut first = pass(&mut img, repair != Repair::None)?;
    if repair == Repair::None {
        return Ok(CheckOutcome {
            first: first.report,
            after: None,
            leaks_fixed: 0,
            corruptions_fixed: 0,
        });
    }
    // Fixes that change what is referenced come first (-r all); the
    // references are then counted again before refcounts are repaired.
    let mut pre_fixed = 0u64;
    if repair == Repair::All {
        if let Some(end) = crypto_past_end(&img, &first) {
            // The LUKS header region ends past the end of the file (images
            // from QEMU < 5.0). Freeing its clusters as leaks, as qemu-img
            // does, would let new data overwrite the key slots: extend the
            // file to cover the region instead, then count it like any
            // other.
            let at = end.saturating_sub(img.cs);
            let zero = vec![0u8; usize::try_from(img.cs).unwrap_or(0)];
            img.dev
                .write_at(at, &zero)
                .map_err(|x| io(x, Structure::HeaderExtension, at))?;
            img.dev
                .flush()
                .map_err(|x| io(x, Structure::HeaderExtension, at))?;
            pre_fixed = pre_fixed.saturating_add(1);
        }
        let has_bad_zero = first
            .report
            .findings
            .iter()
            .any(|f| matches!(f, Finding::DataUnaligned { zero: true, .. }));
        if has_bad_zero {
            let n = fix_unaligned_zero(&mut img)?;
            for f in &mut first.report.findings {
                if let Finding::DataUnaligned {
                    zero: true,
                    repaired,
                    ..
                } = f
                {
                    *repaired = true;
                }
            }
            pre_fixed = pre_fixed.saturating_add(n);
        }
    }
    if repair == Repair::All
        && first
            .report
            .findings
            .iter()
            .any(|f| matches!(f, Finding::SnapshotIncomplete { .. }))
    {
        pre_fixed = pre_fixed.saturating_add(fix_incomplete_snapshots(&mut img)?);
    }
    let (leaks_fixed, corruptions_fixed) = if pre_fixed > 0 {
        drop(img);
        img = Img::open(dev)?;
        let mut again = pass(&mut img, true)?;
        let fixed = fix(&mut img, &mut again, repair, dirty)?;
        // What the recount found and repaired, after the first report. A
        // set of the report's lines keeps this linear: a crafted table of
        // 65,535 snapshots gives as many findings, and comparing each with
        // every other took a minute.
        let seen: alloc::collections::BTreeSet<String> = first
            .report
            .findings
            .iter()
            .map(alloc::string::ToString::to_string)
            .collect();
        for f in again.report.findings {
            if !seen.contains(&alloc::string::ToString::to_string(&f)) {
                first.report.findings.push(f);
            }
        }
        fixed
    } else {
        fix(&mut img, &mut first, repair, dirty)?
    };
    let corruptions_fixed = corruptions_fixed.saturating_add(pre_fixed);
    drop(img);
    let mut img = Img::open(dev)?;
    let second = pass(&mut img, false)?;
    let mut after = second.report;
    after.leaks_fixed = leaks_fixed;
    after.corruptions_fixed = corruptions_fixed;
    Ok(CheckOutcome {
        first: first.report,
        after: Some(after),
        leaks_fixed,
        corruptions_fixed,
    })
}

/// The cluster-aligned end of the LUKS header region when a pass found it
/// past the end of the file.
fn crypto_past_end<D: BlockIo>(img: &Img<'_, D>, p: &Pass) -> Option<u64> {
    let cr = img
        .crypto
        .filter(|_| img.hdr.crypt_method == CryptMethod::Luks)?;
    let hit = p.report.findings.iter().any(|f| {
        matches!(f, Finding::PastEnd { offset, size } if *offset == cr.offset && *size == cr.length)
    });
    let end = cr
        .offset
        .checked_add(cr.length)?
        .checked_next_multiple_of(img.cs)?;
    // Only a modest extension: the region is the LUKS header and key
    // material, a few MiB at most.
    (hit && end.checked_sub(img.file_len).is_some_and(|d| d <= 64 << 20)).then_some(end)
}

#[cfg(test)]
mod tests;
