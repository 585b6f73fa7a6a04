//! Repair: incomplete snapshot entries, unaligned zero clusters,
//! refcounts in place or rebuilt, COPIED flags.

use super::*;

/// Rewrites the snapshot table with every entry's extra data complete
/// (the 64-bit VM state size, the disk size, the instruction count), as
/// qemu-img's repair does: version 3 requires the first two. An entry
/// without them gets the 32-bit VM state size, the image's virtual size
/// and no instruction count (all ones). The new table goes past the end
/// of the file and the header is switched to it in one write, so a crash
/// leaves the old table or the new one; the old table's clusters are then
/// leaks for the refcount repair to free. Returns the entries completed.
pub(super) fn fix_incomplete_snapshots<D: BlockIo>(
    img: &mut Img<'_, D>,
) -> Result<u64, Error<D::Error>> {
    use snapshot::field as f;
    img.hdr.check_snapshot_limit()?;
    let mut table = Vec::new();
    let mut fixed_n = 0u64;
    let mut at = img.hdr.snapshots_offset;
    for _ in 0..img.hdr.nb_snapshots {
        let mut fixed = [0u8; f::FIXED_LEN];
        img.read(at, &mut fixed, Structure::SnapshotTable)?;
        let sn = SnapshotFixed::parse::<D::Error>(&fixed, at)?;
        let mut rest = vec![0u8; usize::try_from(sn.extra_size).unwrap_or(0)];
        img.read(
            at.saturating_add(f::FIXED_LEN as u64),
            &mut rest,
            Structure::SnapshotTable,
        )?;
        let mut text = vec![0u8; usize::from(sn.id_len).saturating_add(usize::from(sn.name_len))];
        img.read(
            at.saturating_add(f::FIXED_LEN as u64)
                .saturating_add(u64::from(sn.extra_size)),
            &mut text,
            Structure::SnapshotTable,
        )?;
        if rest.len() < 16 {
            fixed_n = fixed_n.saturating_add(1);
        }
        let word =
            |i: usize, default: u64| -> u64 { word(&rest, i.saturating_mul(8)).unwrap_or(default) };
        let vm_state = u64::from(crate::header::be32(&fixed, f::VM_STATE_SIZE));
        let mut extra = Vec::with_capacity(rest.len().max(24));
        extra.extend_from_slice(&word(0, vm_state).to_be_bytes());
        extra.extend_from_slice(&word(1, img.hdr.size).to_be_bytes());
        extra.extend_from_slice(&word(2, u64::MAX).to_be_bytes());
        if rest.len() > 24 {
            extra.extend_from_slice(&rest[24..]);
        }
        let extra_len = u32::try_from(extra.len()).unwrap_or(u32::MAX);
        fixed[f::EXTRA_SIZE].copy_from_slice(&extra_len.to_be_bytes());
        let start = table.len();
        table.extend_from_slice(&fixed);
        table.extend_from_slice(&extra);
        table.extend_from_slice(&text);
        while !table.len().saturating_sub(start).is_multiple_of(8) {
            table.push(0);
        }
        at = at.saturating_add(sn.entry_len());
    }
    if fixed_n == 0 {
        return Ok(0);
    }
    let new_off = img
        .file_len
        .checked_next_multiple_of(img.cs)
        .ok_or_else(|| Error::corrupt(Structure::SnapshotTable, img.file_len, Problem::Overflow))?;
    img.dev
        .write_at(new_off, &table)
        .map_err(|x| io(x, Structure::SnapshotTable, new_off))?;
    img.dev
        .flush()
        .map_err(|x| io(x, Structure::SnapshotTable, new_off))?;
    img.dev
        .write_at(field::SNAPSHOTS_OFFSET.start as u64, &new_off.to_be_bytes())
        .map_err(|x| io(x, Structure::Header, 0))?;
    img.dev.flush().map_err(|x| io(x, Structure::Header, 0))?;
    Ok(fixed_n)
}

/// The byte ranges (offset, length) of the metadata other than L2 tables
/// that qemu-img's overlap check protects before it rewrites an L2 table:
/// the header, the active and snapshot L1 tables, the refcount table and
/// blocks, the snapshot table and the LUKS header region.
pub(super) fn metadata_ranges<D: BlockIo>(
    img: &mut Img<'_, D>,
) -> Result<Vec<(u64, u64)>, Error<D::Error>> {
    let cs = img.cs;
    let mut v = vec![
        (0, cs),
        (
            img.hdr.l1_table_offset,
            u64::from(img.hdr.l1_size.min(MAX_L1_ENTRIES)) * 8,
        ),
        (
            img.hdr.refcount_table_offset,
            (img.reftable.len() as u64).saturating_mul(8),
        ),
    ];
    for &e in &img.reftable {
        let off = entry::reftable_block_offset(e);
        if off != 0 {
            v.push((off, cs));
        }
    }
    let mut table_len = 0u64;
    for (sn, len, _) in read_snapshots(img)?.0 {
        table_len = table_len.saturating_add(len);
        v.push((sn.l1_offset, u64::from(sn.l1_size.min(MAX_L1_ENTRIES)) * 8));
    }
    v.push((img.hdr.snapshots_offset, table_len));
    if img.hdr.crypt_method == CryptMethod::Luks {
        if let Some(cr) = img.crypto {
            v.push((cr.offset, cr.length));
        }
    }
    Ok(v)
}

/// Whether `[off, off + len)` overlaps one of `ranges`.
pub(super) fn overlaps(ranges: &[(u64, u64)], off: u64, len: u64) -> bool {
    let end = off.saturating_add(len);
    ranges
        .iter()
        .any(|&(o, l)| l > 0 && o < end && off < o.saturating_add(l))
}

/// Whether the table holding byte `off` is the only user of its cluster
/// (per the repaired refcounts `known`), so fixing a COPIED flag in it
/// cannot write into other metadata (an L2 table "at" the header, say).
pub(super) fn sole_user(known: Option<&[u16]>, off: u64, bits: u32) -> bool {
    known.is_some_and(|k| {
        usize::try_from(off >> bits)
            .ok()
            .and_then(|i| k.get(i))
            .is_some_and(|&v| v == 1)
    })
}

/// Turns every preallocated zero cluster whose host offset is not cluster
/// aligned into a plain zero cluster (it reads as zero either way, so no
/// data is lost), in the active L2 tables and the snapshots'. The entry
/// loses its reference before any refcount is lowered. Returns how many
/// entries changed.
pub(super) fn fix_unaligned_zero<D: BlockIo>(img: &mut Img<'_, D>) -> Result<u64, Error<D::Error>> {
    let cs = img.cs;
    if img.hdr.extended_l2() {
        return Ok(0);
    }
    let mut tables = vec![(img.hdr.l1_table_offset, img.hdr.l1_size)];
    for (sn, _, _) in read_snapshots(img)?.0 {
        if img.aligned(sn.l1_offset) && sn.l1_size <= MAX_L1_ENTRIES {
            tables.push((sn.l1_offset, sn.l1_size));
        }
    }
    let mut seen = alloc::collections::BTreeSet::new();
    let mut l2 = vec![0u8; usize::try_from(cs).unwrap_or(0)];
    let mut l1e = [0u8; 8];
    let mut fixed = 0u64;
    for (l1_off, l1_size) in tables {
        for k in 0..u64::from(l1_size.min(MAX_L1_ENTRIES)) {
            img.read(
                l1_off.saturating_add(k.saturating_mul(8)),
                &mut l1e,
                Structure::L1Table,
            )?;
            let l2_off = entry::l1_l2_offset(u64::from_be_bytes(l1e));
            if l2_off == 0 || !img.aligned(l2_off) || l2_off >= img.file_len || !seen.insert(l2_off)
            {
                continue;
            }
            img.read(l2_off, &mut l2, Structure::L2Table)?;
            let mut dirty = false;
            for ent in l2.chunks_exact_mut(8) {
                let e = word(ent, 0).unwrap_or(0);
                let host = e & OFFSET_MASK;
                if e & COMPRESSED == 0 && e & ZERO != 0 && host != 0 && !img.aligned(host) {
                    ent.copy_from_slice(&ZERO.to_be_bytes());
                    dirty = true;
                    fixed = fixed.saturating_add(1);
                }
            }
            if dirty {
                img.dev
                    .write_at(l2_off, &l2)
                    .map_err(|x| io(x, Structure::L2Table, l2_off))?;
            }
        }
    }
    img.dev.flush().map_err(|x| io(x, Structure::L2Table, 0))?;
    Ok(fixed)
}

/// Repairs what `mode` allows; returns (leaks fixed, corruptions fixed).
pub(super) fn fix<D: BlockIo>(
    img: &mut Img<'_, D>,
    p: &mut Pass,
    mode: Repair,
    dirty: bool,
) -> Result<(u64, u64), Error<D::Error>> {
    let cs = img.cs;
    let max_rc = if img.hdr.refcount_order >= 6 {
        u64::MAX
    } else {
        // order < 6: the width is below 64 bits, so 1 << width >= 2.
        (1u64 << (1u32 << img.hdr.refcount_order)).wrapping_sub(1)
    };
    let mut leaks_fixed = 0u64;
    let mut corruptions_fixed = 0u64;
    // As qemu-img: a refcount that is too low is raised in place; only a
    // referenced cluster whose refcount is 0 makes the structure rebuilt
    // (its refcount block may not exist), so a repair need not grow the
    // file.
    let too_low =
        p.report.findings.iter().any(
            |f| matches!(f, Finding::Refcount { refcount: 0, reference, .. } if *reference > 0),
        );
    let rebuild = (mode == Repair::All || dirty) && (p.rebuild || too_low || p.unreadable);
    // The refcounts the image has once repair is done, for the COPIED fix.
    let mut known: Vec<u16>;
    if rebuild {
        known = rebuild_refcounts(img, &p.base, max_rc)?;
        for f in &mut p.report.findings {
            match f {
                // Worded as found (qemu-img prints them before rebuilding).
                Finding::Refcount {
                    refcount,
                    reference,
                    ..
                } => {
                    if *refcount < *reference {
                        corruptions_fixed = corruptions_fixed.saturating_add(1);
                    } else {
                        leaks_fixed = leaks_fixed.saturating_add(1);
                    }
                }
                Finding::RefblockOutside { .. } => {
                    corruptions_fixed = corruptions_fixed.saturating_add(1);
                }
                Finding::RefblockUnaligned { .. }
                | Finding::RefblockShared { .. }
                | Finding::ReftableReserved { .. } => {
                    corruptions_fixed = corruptions_fixed.saturating_add(1);
                }
                _ => {}
            }
        }
        p.report.findings.push(Finding::Rebuilding);
    } else {
        // In place: each change is to a cluster in an existing, readable
        // refcount block. Raising is safe at any time; lowering is only
        // done for clusters with fewer references than their refcount.
        let rc = img.rc;
        known = p.counts.clone();
        let mut changes: Vec<(u64, u64)> = Vec::new();
        // Ranges referenced past the end of the file were not counted; the
        // part inside the file is still in use, so never free it.
        let past_end: Vec<(u64, u64)> = p
            .report
            .findings
            .iter()
            .filter_map(|f| match *f {
                Finding::PastEnd { offset, size } => Some((offset, size)),
                _ => None,
            })
            .collect();
        // qemu-img reports each mismatch as found, then again as it
        // repairs it; the repaired copies follow the first pass's findings.
        let mut repairs = Vec::new();
        for f in &p.report.findings {
            if let Finding::Refcount {
                cluster,
                refcount,
                reference,
                ..
            } = f
            {
                // Never write into a refcount structure that is itself
                // damaged (a block shared with data, unreadable entries):
                // only a rebuild (-r all) may replace it.
                let usable = !(p.rebuild || p.unreadable);
                let allowed = usable
                    && if *refcount > *reference {
                        mode != Repair::None && !in_past_end(&past_end, *cluster, cs)
                    } else {
                        mode == Repair::All
                    };
                if allowed {
                    changes.push((*cluster, *reference));
                    repairs.push(Finding::Refcount {
                        cluster: *cluster,
                        refcount: *refcount,
                        reference: *reference,
                        repaired: true,
                    });
                    if *refcount > *reference {
                        leaks_fixed = leaks_fixed.saturating_add(1);
                    } else {
                        corruptions_fixed = corruptions_fixed.saturating_add(1);
                    }
                } else if let Some(k) = usize::try_from(*cluster)
                    .ok()
                    .and_then(|i| known.get_mut(i))
                {
                    *k = u16::try_from(*refcount).unwrap_or(u16::MAX);
                }
            }
        }
        p.report.findings.extend(repairs);
        let mut i = 0;
        while i < changes.len() {
            let idx = rc.locate(ClusterIndex::new(changes[i].0)).table_index;
            let e = usize::try_from(idx)
                .ok()
                .and_then(|x| img.reftable.get(x))
                .copied()
                .unwrap_or(0);
            let off = entry::reftable_block_offset(e);
            let mut block = vec![0u8; usize::try_from(cs).unwrap_or(0)];
            img.read(off, &mut block, Structure::RefcountBlock)?;
            while i < changes.len() && rc.locate(ClusterIndex::new(changes[i].0)).table_index == idx
            {
                let (cl, v) = changes[i];
                rc.set(
                    &mut block,
                    rc.locate(ClusterIndex::new(cl)).index,
                    v.min(max_rc),
                );
                i = i.saturating_add(1);
            }
            if off != 0 {
                img.dev
                    .write_at(off, &block)
                    .map_err(|x| io(x, Structure::RefcountBlock, off))?;
            }
        }
        img.rb_cache = None;
        img.dev
            .flush()
            .map_err(|x| io(x, Structure::RefcountBlock, 0))?;
    }
    // COPIED flags, judged again against the refcounts as repaired (the
    // first pass judged them against the stored ones): with -r all every
    // one is fixed; with -r leaks only a missing flag on a cluster whose
    // refcount is now 1, as qemu-img does.
    p.report
        .findings
        .retain(|f| !matches!(f, Finding::CopiedL2 { .. } | Finding::CopiedData { .. }));
    let policy = if mode == Repair::All || rebuild {
        CopiedFix::All(&known)
    } else {
        CopiedFix::Missing(&known)
    };
    corruptions_fixed = corruptions_fixed.saturating_add(check_copied(img, &mut p.report, policy)?);
    // Clear the dirty and corrupt bits.
    if img.hdr.version >= 3
        && img.hdr.incompatible_features & (incompat::DIRTY | incompat::CORRUPT) != 0
        && (mode == Repair::All || dirty)
    {
        let mut h = [0u8; 512];
        img.read(0, &mut h, Structure::Header)?;
        let inc = img.hdr.incompatible_features & !(incompat::DIRTY | incompat::CORRUPT);
        h[field::INCOMPATIBLE_FEATURES].copy_from_slice(&inc.to_be_bytes());
        img.dev
            .write_at(0, &h)
            .map_err(|x| io(x, Structure::Header, 0))?;
        img.dev.flush().map_err(|x| io(x, Structure::Header, 0))?;
    }
    Ok((leaks_fixed, corruptions_fixed))
}

/// Whether cluster `c` lies in one of the `ranges` (offset, size).
pub(super) fn in_past_end(ranges: &[(u64, u64)], c: u64, cs: u64) -> bool {
    let start = c.saturating_mul(cs);
    ranges
        .iter()
        .any(|&(o, n)| start < o.saturating_add(n) && o < start.saturating_add(cs))
}

/// Writes a new refcount table and blocks holding `base` (references
/// without the old refcount structure) plus themselves, past the end of
/// the file; flushes; then switches the header to them. Returns the new
/// refcounts.
pub(super) fn rebuild_refcounts<D: BlockIo>(
    img: &mut Img<'_, D>,
    base: &[u16],
    max_rc: u64,
) -> Result<Vec<u16>, Error<D::Error>> {
    let cs = img.cs;
    let per = img.rc.entries_per_block();
    let start = img.nb_clusters().max(base.len() as u64).max(1);
    let rt_at = img.hdr.refcount_table_offset;
    let overflow = move || Error::corrupt(Structure::RefcountTable, rt_at, Problem::Overflow);
    let sum = |a: u64, b: u64, c: u64| a.checked_add(b).and_then(|x| x.checked_add(c));
    // Blocks and table clusters: a fixed point of "cover everything,
    // including ourselves".
    let mut nblocks = 0u64;
    let mut ntable = 0u64;
    loop {
        let total = sum(start, nblocks, ntable).ok_or_else(overflow)?;
        let nb = total.div_ceil(per);
        let nt = nb.checked_mul(8).ok_or_else(overflow)?.div_ceil(cs);
        if nb == nblocks && nt == ntable {
            break;
        }
        nblocks = nb;
        ntable = nt;
    }
    let total = sum(start, nblocks, ntable).ok_or_else(overflow)?;
    // Every cluster below `total` has a host offset below `end`: the
    // products and sums below stay under it and cannot overflow.
    let end = ClusterIndex::new(total)
        .host_offset(img.l2g.cluster())
        .ok_or_else(overflow)?
        .get();
    Error::check_limit(
        Structure::RefcountTable,
        start.saturating_mul(cs),
        Limit::RefcountTableBytes,
        ntable.saturating_mul(cs),
        MAX_REFCOUNT_TABLE_BYTES,
    )?;
    let mut counts = base.to_vec();
    counts.resize(usize::try_from(total).unwrap_or(0), 0);
    for c in start..total {
        counts[usize::try_from(c).unwrap_or(0)] = 1;
    }
    // At most MAX_REFCOUNT_TABLE_BYTES (checked above).
    let mut table = vec![0u8; usize::try_from(ntable.saturating_mul(cs)).unwrap_or(0)];
    let mut block = vec![0u8; usize::try_from(cs).unwrap_or(0)];
    for b in 0..nblocks {
        block.fill(0);
        for i in 0..per {
            // b < nblocks and i < per: below nblocks * per, which covers
            // `total` clusters and so fits.
            let c = b.saturating_mul(per).saturating_add(i);
            let Some(&v) = usize::try_from(c).ok().and_then(|x| counts.get(x)) else {
                break;
            };
            if v != 0 {
                img.rc.set(&mut block, i, u64::from(v).min(max_rc));
            }
        }
        let off = start.saturating_add(b).saturating_mul(cs);
        img.dev
            .write_at(off, &block)
            .map_err(|x| io(x, Structure::RefcountBlock, off))?;
        // b < nblocks <= ntable * cs / 8: the entry lies inside the table.
        let tb = usize::try_from(b.saturating_mul(8)).unwrap_or(usize::MAX);
        if let Some(slot) = table.get_mut(tb..tb.saturating_add(8)) {
            slot.copy_from_slice(&off.to_be_bytes());
        }
    }
    let table_off = start.saturating_add(nblocks).saturating_mul(cs);
    img.dev
        .write_at(table_off, &table)
        .map_err(|x| io(x, Structure::RefcountTable, table_off))?;
    img.dev
        .flush()
        .map_err(|x| io(x, Structure::RefcountTable, table_off))?;
    // One sector write switches the header to the new structure.
    let mut h = [0u8; 512];
    img.read(0, &mut h, Structure::Header)?;
    h[field::REFCOUNT_TABLE_OFFSET].copy_from_slice(&table_off.to_be_bytes());
    let ntc = u32::try_from(ntable).unwrap_or(u32::MAX);
    h[field::REFCOUNT_TABLE_CLUSTERS].copy_from_slice(&ntc.to_be_bytes());
    img.dev
        .write_at(0, &h)
        .map_err(|x| io(x, Structure::Header, 0))?;
    img.dev.flush().map_err(|x| io(x, Structure::Header, 0))?;
    img.file_len = img.file_len.max(end);
    img.hdr.refcount_table_offset = table_off;
    img.hdr.refcount_table_clusters = ntc;
    img.rb_cache = None;
    img.read_reftable()?;
    Ok(counts)
}
