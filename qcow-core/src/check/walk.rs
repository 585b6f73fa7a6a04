//! One pass: walk every structure, count references, compare them with
//! the stored refcounts and judge COPIED flags.

use super::*;

/// One pass: count references, compare with the stored refcounts, check
/// COPIED flags. Changes nothing.
pub(super) fn pass<D: BlockIo>(
    img: &mut Img<'_, D>,
    keep_base: bool,
) -> Result<Pass, Error<D::Error>> {
    let mut r = CheckReport {
        frag: FragInfo {
            total_clusters: img.hdr.size.div_ceil(img.cs),
            ..FragInfo::default()
        },
        ..CheckReport::default()
    };
    let nb = img.nb_clusters();
    let bits = img.hdr.refcount_bits();
    let mut c = Counter {
        counts: vec![0u16; usize::try_from(nb).unwrap_or(0)],
        max: if bits >= 16 {
            u16::MAX
        } else {
            // bits < 16: 1 << bits >= 1.
            u16::try_from((1u32 << bits).saturating_sub(1)).unwrap_or(u16::MAX)
        },
        file_len: img.file_len,
        bits: img.bits,
        cs: img.cs,
    };
    let cs = img.cs;
    // The snapshot table is read and judged first (qemu-img does it when
    // opening the image, so its findings come first).
    let (snaps, incomplete) = read_snapshots(img)?;
    for index in incomplete {
        r.findings.push(Finding::SnapshotIncomplete { index });
        r.corruptions = r.corruptions.saturating_add(1);
    }
    let mut table_len = 0u64;
    let mut snapshot_l1s = Vec::new();
    for (sn, len, snapshot) in snaps {
        table_len = table_len.saturating_add(len);
        if !img.aligned(sn.l1_offset) {
            r.findings.push(Finding::SnapshotL1Unaligned {
                snapshot,
                offset: sn.l1_offset,
            });
            r.corruptions = r.corruptions.saturating_add(1);
        } else if sn.l1_size > MAX_L1_ENTRIES {
            r.findings.push(Finding::SnapshotL1TooLarge {
                snapshot,
                size: sn.l1_size,
            });
            r.corruptions = r.corruptions.saturating_add(1);
        } else {
            snapshot_l1s.push((sn.l1_offset, sn.l1_size));
        }
    }
    c.inc(&mut r, 0, cs);
    let mut next_contig = 0u64;
    let (l1_off, l1_size) = (img.hdr.l1_table_offset, img.hdr.l1_size);
    walk_l1(img, &mut c, &mut r, l1_off, l1_size, Some(&mut next_contig))?;
    for (off, size) in snapshot_l1s {
        walk_l1(img, &mut c, &mut r, off, size, None)?;
    }
    c.inc(&mut r, img.hdr.snapshots_offset, table_len);
    // LUKS header region.
    if img.hdr.crypt_method == CryptMethod::Luks {
        if let Some(cr) = img.crypto {
            c.inc(&mut r, cr.offset, cr.length);
        }
    }
    // Bitmaps.
    walk_bitmaps(img, &mut c, &mut r)?;
    // The counts without the refcount structure, for a rebuild.
    let base = if keep_base {
        c.counts.clone()
    } else {
        Vec::new()
    };
    // Refcount table and blocks.
    let rt_bytes = (img.reftable.len() as u64).saturating_mul(8);
    c.inc(&mut r, img.hdr.refcount_table_offset, rt_bytes);
    let mut rebuild = false;
    for (i, &e) in img.reftable.iter().enumerate() {
        let index = i as u64;
        if e & REFT_RESERVED != 0 {
            r.findings.push(Finding::ReftableReserved { index });
            r.corruptions = r.corruptions.saturating_add(1);
            rebuild = true;
            continue;
        }
        let off = entry::reftable_block_offset(e);
        if !img.aligned(off) {
            r.findings.push(Finding::RefblockUnaligned { index });
            r.corruptions = r.corruptions.saturating_add(1);
            rebuild = true;
            continue;
        }
        if off == 0 {
            continue;
        }
        let cluster = off >> img.bits;
        if cluster >= nb {
            r.findings.push(Finding::RefblockOutside {
                index,
                repaired: false,
            });
            r.corruptions = r.corruptions.saturating_add(1);
            rebuild = true;
            continue;
        }
        c.inc(&mut r, off, cs);
        // Judged as soon as counted, as qemu-img does: a later entry naming
        // the same cluster is reported at its own index.
        let n = c
            .counts
            .get(usize::try_from(cluster).unwrap_or(usize::MAX))
            .copied()
            .unwrap_or(0);
        if n != 1 {
            r.findings.push(Finding::RefblockShared {
                index,
                refcount: u64::from(n),
            });
            r.corruptions = r.corruptions.saturating_add(1);
            rebuild = true;
        }
    }
    // Compare.
    let mut highest = 0u64;
    let mut unreadable = false;
    for i in 0..c.counts.len() {
        let cl = i as u64;
        let Some(stored) = img.stored(cl)? else {
            r.findings.push(Finding::RefcountUnreadable { cluster: cl });
            r.check_errors = r.check_errors.saturating_add(1);
            unreadable = true;
            continue;
        };
        let found = u64::from(c.counts[i]);
        if stored > 0 || found > 0 {
            highest = cl;
        }
        if stored != found {
            r.findings.push(Finding::Refcount {
                cluster: cl,
                refcount: stored,
                reference: found,
                repaired: false,
            });
            if stored < found {
                r.corruptions = r.corruptions.saturating_add(1);
            } else {
                r.leaks = r.leaks.saturating_add(1);
            }
        }
    }
    if !unreadable {
        check_copied(img, &mut r, CopiedFix::None)?;
    }
    r.image_end_offset = highest.saturating_add(1).saturating_mul(cs);
    Ok(Pass {
        report: r,
        base,
        counts: c.counts,
        rebuild,
        unreadable,
    })
}

/// Walks one L1 table and its L2 tables. `frag` is the fragmentation
/// cursor for the active layer (`None` for snapshots).
pub(super) fn walk_l1<D: BlockIo>(
    img: &mut Img<'_, D>,
    c: &mut Counter,
    r: &mut CheckReport,
    l1_off: u64,
    l1_size: u32,
    mut frag: Option<&mut u64>,
) -> Result<(), Error<D::Error>> {
    let cs = img.cs;
    c.inc(r, l1_off, u64::from(l1_size).saturating_mul(8));
    if l1_size > MAX_L1_ENTRIES {
        r.check_errors = r.check_errors.saturating_add(1);
        r.findings.push(Finding::ReadFailed {
            structure: Structure::L1Table,
            offset: l1_off,
        });
        return Ok(());
    }
    let mut chunk = vec![0u8; L1_CHUNK * 8];
    let mut l2 = vec![0u8; usize::try_from(cs).unwrap_or(0)];
    let geo = img.l2g;
    let l1_len = usize::try_from(l1_size).unwrap_or(0);
    let mut start = 0usize;
    while start < l1_len {
        // start < l1_len <= MAX_L1_ENTRIES and n <= L1_CHUNK: the byte
        // offsets below fit (saturating ops only to satisfy the lint).
        let n = l1_len.saturating_sub(start).min(L1_CHUNK);
        let at = l1_off.saturating_add((start as u64).saturating_mul(8));
        img.read(at, &mut chunk[..n.saturating_mul(8)], Structure::L1Table)?;
        for k in 0..n {
            let e = word(&chunk, k.saturating_mul(8)).unwrap_or(0);
            if e & L1_RESERVED != 0 {
                r.findings.push(Finding::L1Reserved { entry: e });
                r.corruptions = r.corruptions.saturating_add(1);
            }
            // Like qemu-img, any non-zero entry names an L2 table, even one
            // whose offset field is 0 (the header cluster).
            if e == 0 {
                continue;
            }
            let l2_off = entry::l1_l2_offset(e);
            c.inc(r, l2_off, cs);
            if !img.aligned(l2_off) {
                r.findings.push(Finding::L2Unaligned { offset: l2_off });
                r.corruptions = r.corruptions.saturating_add(1);
            }
            img.read(l2_off, &mut l2, Structure::L2Table)?;
            // qemu-img measures fragmentation within each L2 table.
            if let Some(f) = frag.as_deref_mut() {
                *f = 0;
            }
            for (index, RawL2 { entry: e2, bitmap }) in geo.entries(&l2).enumerate() {
                if e2 & COMPRESSED != 0 && bitmap.is_some_and(|b| b != 0) {
                    r.findings.push(Finding::CompressedBitmap {
                        index: index as u64,
                        entry: e2,
                    });
                    r.corruptions = r.corruptions.saturating_add(1);
                    continue;
                }
                walk_l2_entry(img, c, r, e2, bitmap, frag.as_deref_mut());
            }
        }
        start = start.saturating_add(n);
    }
    Ok(())
}

pub(super) fn walk_l2_entry<D: BlockIo>(
    img: &Img<'_, D>,
    c: &mut Counter,
    r: &mut CheckReport,
    e: u64,
    bitmap: Option<u64>,
    frag: Option<&mut u64>,
) {
    let cs = img.cs;
    if e & COMPRESSED != 0 {
        let d = CompressedDescriptor::decode(e, img.bits);
        if e & COPIED != 0 {
            r.findings
                .push(Finding::CompressedCopied { offset: d.host });
            r.corruptions = r.corruptions.saturating_add(1);
        }
        if frag.is_some() {
            r.frag.allocated_clusters = r.frag.allocated_clusters.saturating_add(1);
            r.frag.compressed_clusters = r.frag.compressed_clusters.saturating_add(1);
            r.frag.fragmented_clusters = r.frag.fragmented_clusters.saturating_add(1);
        }
        c.inc(r, d.host, d.len());
        return;
    }
    let extended = img.hdr.extended_l2();
    if e & L2_RESERVED != 0 {
        r.findings.push(Finding::L2Reserved { entry: e });
        r.corruptions = r.corruptions.saturating_add(1);
    }
    let zero = !extended && e & ZERO != 0;
    // With an external data file, offset 0 is a real cluster when COPIED
    // is set (qemu-img's rule; see `entry::standard_host`).
    let Some(host) = img.l2g.host(e).map(HostOffset::get) else {
        if bitmap.is_some_and(|b| b & 0xffff_ffff != 0) {
            r.findings.push(Finding::SubclusterUnallocated);
            r.corruptions = r.corruptions.saturating_add(1);
        }
        return;
    };
    if let Some(b) = bitmap {
        if b & (b >> 32) != 0 {
            r.findings.push(Finding::SubclusterBitmap { offset: host });
            r.corruptions = r.corruptions.saturating_add(1);
        }
    }
    if let Some(next) = frag {
        r.frag.allocated_clusters = r.frag.allocated_clusters.saturating_add(1);
        if *next != 0 && host != *next {
            r.frag.fragmented_clusters = r.frag.fragmented_clusters.saturating_add(1);
        }
        *next = host.saturating_add(cs);
    }
    if !img.aligned(host) {
        r.findings.push(Finding::DataUnaligned {
            offset: host,
            zero,
            repaired: false,
        });
        r.corruptions = r.corruptions.saturating_add(1);
    }
    if !img.hdr.has_data_file() {
        c.inc(r, host, cs);
    }
}

/// A snapshot table entry: fixed part, entry length, id and name.
pub(super) type SnapshotEntry = (SnapshotFixed, u64, SnapshotName);
/// The snapshot table entries, and the indexes of those whose extra data
/// is shorter than version 3 requires.
pub(super) type SnapshotTable = (Vec<SnapshotEntry>, Vec<u32>);

/// Reads the snapshot table: each snapshot's fixed part, entry length, id
/// and name.
pub(super) fn read_snapshots<D: BlockIo>(
    img: &mut Img<'_, D>,
) -> Result<SnapshotTable, Error<D::Error>> {
    img.hdr.check_snapshot_limit()?;
    let n = img.hdr.nb_snapshots;
    let mut out = Vec::new();
    let mut incomplete = Vec::new();
    let mut at = img.hdr.snapshots_offset;
    let table = img.hdr.snapshots_offset;
    for index in 0..n {
        let mut dev = ZeroTail {
            dev: &mut *img.dev,
            len: img.file_len,
        };
        let sn =
            crate::image::read_snapshot_entry(&mut dev, &mut [0u8; 512], table, index, at)?.fixed;
        let len = sn.entry_len();
        // Version 3 requires the 64-bit VM state size and the disk size in
        // the extra data; qemu-img calls a shorter entry incomplete (an
        // entry read past the end of the file is all zeros, so it is too).
        if img.hdr.version >= 3 && sn.extra_size < 16 {
            incomplete.push(index);
        }
        // Id and name follow the extra data (each at most 64 KiB).
        let mut text = vec![0u8; usize::from(sn.id_len).saturating_add(usize::from(sn.name_len))];
        let text_at = at
            .saturating_add(snapshot::field::FIXED_LEN as u64)
            .saturating_add(u64::from(sn.extra_size));
        img.read(text_at, &mut text, Structure::SnapshotTable)?;
        let (id, name) = text.split_at(usize::from(sn.id_len));
        let name = SnapshotName {
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
        };
        out.push((sn, len, name));
        at = at.saturating_add(len);
    }
    Ok((out, incomplete))
}

/// Counts the bitmap directory and every bitmap table and data cluster.
pub(super) fn walk_bitmaps<D: BlockIo>(
    img: &mut Img<'_, D>,
    c: &mut Counter,
    r: &mut CheckReport,
) -> Result<(), Error<D::Error>> {
    let Some(bm) = img.bitmaps else {
        return Ok(());
    };
    if img.hdr.autoclear_features & autoclear::BITMAPS == 0 || bm.nb_bitmaps == 0 {
        return Ok(());
    }
    c.inc(r, bm.directory_offset, bm.directory_size);
    if bm.nb_bitmaps > MAX_BITMAPS || bm.directory_size > crate::image::MAX_BITMAP_DIRECTORY_BYTES {
        r.check_errors = r.check_errors.saturating_add(1);
        r.findings.push(Finding::ReadFailed {
            structure: Structure::HeaderExtension,
            offset: bm.directory_offset,
        });
        return Ok(());
    }
    let mut dir = vec![0u8; usize::try_from(bm.directory_size).unwrap_or(0)];
    img.read(bm.directory_offset, &mut dir, Structure::HeaderExtension)?;
    let mut pos = 0usize;
    let mut tables = Vec::new();
    for _ in 0..bm.nb_bitmaps {
        let Some(f) = dir.get(pos..pos.saturating_add(24)) else {
            break;
        };
        let table_offset = word(f, 0).unwrap_or(0);
        let table_size = u32::from_be_bytes([f[8], f[9], f[10], f[11]]);
        let name_size = usize::from(u16::from_be_bytes([f[18], f[19]]));
        let extra = usize::try_from(u32::from_be_bytes([f[20], f[21], f[22], f[23]])).unwrap_or(0);
        tables.push((table_offset, table_size));
        // Past the directory (or saturated) ends the walk at the next get.
        pos = pos
            .saturating_add(24)
            .saturating_add(extra)
            .saturating_add(name_size)
            .checked_next_multiple_of(8)
            .unwrap_or(usize::MAX);
    }
    let cs = img.cs;
    for (off, size) in tables {
        c.inc(r, off, u64::from(size).saturating_mul(8));
        let bytes = u64::from(size)
            .saturating_mul(8)
            .min(MAX_REFCOUNT_TABLE_BYTES);
        let mut t = vec![0u8; usize::try_from(bytes).unwrap_or(0)];
        img.read(off, &mut t, Structure::HeaderExtension)?;
        for e in t.chunks_exact(8).map(|c| word(c, 0).unwrap_or(0)) {
            let data = e & BME_OFFSET_MASK;
            if data != 0 {
                c.inc(r, data, cs);
            }
        }
    }
    Ok(())
}

/// How the COPIED check may change flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CopiedFix<'a> {
    /// Report against the stored refcounts; change nothing.
    None,
    /// Against the repaired refcounts: fix every flag (`-r all`).
    All(&'a [u16]),
    /// Against the repaired refcounts: only set a missing flag on a
    /// cluster whose refcount is now 1 (`-r leaks`, as qemu-img does).
    Missing(&'a [u16]),
}

impl<'a> CopiedFix<'a> {
    pub(super) fn known(self) -> Option<&'a [u16]> {
        match self {
            Self::None => None,
            Self::All(k) | Self::Missing(k) => Some(k),
        }
    }
    /// Whether a flag that disagrees with refcount `rc` is fixed.
    pub(super) fn fixes(self, rc: u64, copied: bool) -> bool {
        match self {
            Self::None => false,
            Self::All(_) => true,
            Self::Missing(_) => rc == 1 && !copied,
        }
    }
}

/// Checks COPIED flags of the active L1 and L2 tables against the
/// refcounts, reporting each disagreement; fixes them on the device as
/// `fix` allows, marking those findings repaired. Returns how many it
/// fixed.
pub(super) fn check_copied<D: BlockIo>(
    img: &mut Img<'_, D>,
    r: &mut CheckReport,
    fix: CopiedFix<'_>,
) -> Result<u64, Error<D::Error>> {
    let cs = img.cs;
    let known = fix.known();
    let mut fixed = 0u64;
    let l1_off = img.hdr.l1_table_offset;
    let l1_len = usize::try_from(img.hdr.l1_size.min(MAX_L1_ENTRIES)).unwrap_or(0);
    let entry_len = img.l2g.entry_len();
    let mut chunk = vec![0u8; L1_CHUNK * 8];
    let mut l2 = vec![0u8; usize::try_from(cs).unwrap_or(0)];
    let mut start = 0usize;
    let refcount = |img: &mut Img<'_, D>, off: u64| -> Result<Option<u64>, Error<D::Error>> {
        let cl = off >> img.bits;
        match known {
            Some(k) => Ok(Some(
                usize::try_from(cl)
                    .ok()
                    .and_then(|i| k.get(i))
                    .map_or(0, |&v| u64::from(v)),
            )),
            None => img.stored(cl),
        }
    };
    let meta = if known.is_some() {
        metadata_ranges(img)?
    } else {
        Vec::new()
    };
    while start < l1_len {
        // start < l1_len <= MAX_L1_ENTRIES and n <= L1_CHUNK: the byte
        // offsets below fit (saturating ops only to satisfy the lint).
        let n = l1_len.saturating_sub(start).min(L1_CHUNK);
        let at = l1_off.saturating_add((start as u64).saturating_mul(8));
        img.read(at, &mut chunk[..n.saturating_mul(8)], Structure::L1Table)?;
        for k in 0..n {
            let e = word(&chunk, k.saturating_mul(8)).unwrap_or(0);
            let l2_off = entry::l1_l2_offset(e);
            if l2_off == 0 {
                continue;
            }
            let Some(rc) = refcount(img, l2_off)? else {
                r.check_errors = r.check_errors.saturating_add(1);
                return Ok(fixed);
            };
            let copied = e & COPIED != 0;
            if (rc == 1) != copied {
                let off = at.saturating_add((k as u64).saturating_mul(8));
                let repaired = fix.fixes(rc, copied) && sole_user(known, off, img.bits);
                r.findings.push(Finding::CopiedL2 {
                    l1_index: start.saturating_add(k) as u64,
                    l1_entry: e,
                    refcount: rc,
                    repaired,
                });
                if repaired {
                    let ne = if rc == 1 { e | COPIED } else { e & !COPIED };
                    img.dev
                        .write_at(off, &ne.to_be_bytes())
                        .map_err(|x| io(x, Structure::L1Table, off))?;
                    fixed = fixed.saturating_add(1);
                } else {
                    r.corruptions = r.corruptions.saturating_add(1);
                }
            }
            // qemu-img reads an unaligned table where it points; repair
            // only writes back aligned ones.
            if l2_off >= img.file_len {
                continue;
            }
            img.read(l2_off, &mut l2, Structure::L2Table)?;
            // A shared L2 table (a snapshot's too) is rewritten as
            // qemu-img does; only one overlapping other metadata is not.
            let writable = img.aligned(l2_off) && known.is_some() && !overlaps(&meta, l2_off, cs);
            let mut dirty = false;
            for ent in l2.chunks_exact_mut(entry_len) {
                let e2 = word(ent, 0).unwrap_or(0);
                if e2 & COMPRESSED != 0 {
                    // Reported by the reference walk; cleared by -r all.
                    if e2 & COPIED != 0 && matches!(fix, CopiedFix::All(_)) && writable {
                        ent[..8].copy_from_slice(&(e2 & !COPIED).to_be_bytes());
                        dirty = true;
                    }
                    continue;
                }
                let host = e2 & OFFSET_MASK;
                if host == 0 || img.hdr.has_data_file() {
                    continue;
                }
                let Some(rc) = refcount(img, host)? else {
                    r.check_errors = r.check_errors.saturating_add(1);
                    return Ok(fixed);
                };
                let copied = e2 & COPIED != 0;
                if (rc == 1) != copied {
                    let repaired = fix.fixes(rc, copied) && writable;
                    r.findings.push(Finding::CopiedData {
                        l2_entry: e2,
                        refcount: rc,
                        repaired,
                    });
                    if repaired {
                        let ne = if rc == 1 { e2 | COPIED } else { e2 & !COPIED };
                        ent[..8].copy_from_slice(&ne.to_be_bytes());
                        dirty = true;
                        fixed = fixed.saturating_add(1);
                    } else {
                        r.corruptions = r.corruptions.saturating_add(1);
                    }
                }
            }
            if dirty {
                img.dev
                    .write_at(l2_off, &l2)
                    .map_err(|x| io(x, Structure::L2Table, l2_off))?;
            }
        }
        start = start.saturating_add(n);
    }
    if fixed > 0 {
        img.dev.flush().map_err(|x| io(x, Structure::L2Table, 0))?;
    }
    Ok(fixed)
}
