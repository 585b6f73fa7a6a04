//! Allocation: refcount blocks and table (growth included), looked up
//! through the table layer; allocating and freeing clusters.

use super::*;

impl<D: BlockIo, B: BlockIo> Qcow2Writer<D, B>
where
    B::Error: LayerError<D::Error>,
{
    pub(super) fn refblock(&mut self, off: u64) -> Result<&mut Vec<u8>, Error<D::Error>> {
        if !self.rb_cache.contains_key(&off) {
            if self.rb_cache.len() >= MAX_CACHED_TABLES {
                // Write-through blocks are free to drop; blocks with
                // changes not yet written stay.
                let pending = &self.rb_pending;
                self.rb_cache.retain(|off, _| pending.contains_key(off));
            }
            let mut b = vec![0u8; usize::try_from(self.cs()).unwrap_or(0)];
            self.read_dev(off, &mut b, Structure::RefcountBlock)?;
            self.rb_cache.insert(off, b);
        }
        self.rb_cache
            .get_mut(&off)
            .ok_or_else(|| overflow(Structure::RefcountBlock, off))
    }

    /// The refcount of cluster `c` (0 when no block covers it).
    pub fn refcount(&mut self, c: u64) -> Result<u64, Error<D::Error>> {
        let g = self.rcg();
        let slot = g.locate(ClusterIndex::new(c));
        let ti = usize::try_from(slot.table_index).unwrap_or(usize::MAX);
        let Some(&rte) = self.reftable.get(ti) else {
            return Ok(0);
        };
        let off = entry::reftable_block_offset(rte);
        if off == 0 {
            return Ok(0);
        }
        let b = self.refblock(off)?;
        g.get(b, slot.index)
            .ok_or_else(|| overflow(Structure::RefcountBlock, off))
    }

    /// Sets the refcount of `c` (whose block must exist) in the cached
    /// refcount block; returns the block's offset and the entry's index in
    /// it. Nothing is written.
    fn set_in_cached_block(&mut self, c: u64, v: u64) -> Result<(u64, u64), Error<D::Error>> {
        let g = self.rcg();
        let slot = g.locate(ClusterIndex::new(c));
        let ti = usize::try_from(slot.table_index).unwrap_or(usize::MAX);
        let off = self
            .reftable
            .get(ti)
            .map(|&e| entry::reftable_block_offset(e))
            .filter(|&o| o != 0)
            .ok_or_else(|| overflow(Structure::RefcountTable, self.hdr.refcount_table_offset))?;
        let b = self.refblock(off)?;
        if !g.set(b, slot.index, v) {
            return Err(overflow(Structure::RefcountBlock, off));
        }
        Ok((off, slot.index))
    }

    /// Sets the refcount of `c`, whose block must exist. Writes the sector
    /// of the block holding it (not flushed).
    pub(super) fn set_refcount_existing(&mut self, c: u64, v: u64) -> Result<(), Error<D::Error>> {
        let (off, index) = self.set_in_cached_block(c, v)?;
        let g = self.rcg();
        let b = self.refblock(off)?;
        // The sector of the block holding the entry.
        let sec = g.entry_sector(index);
        let s = usize::try_from(sec).unwrap_or(0);
        let e = s.saturating_add(SECTOR_BYTES).min(b.len());
        let chunk: Vec<u8> = b.get(s..e).unwrap_or(&[]).to_vec();
        self.write_dev(off.saturating_add(sec), &chunk, Structure::RefcountBlock)?;
        if v == 0 && c < self.free_hint {
            self.free_hint = c;
        }
        // Never pack compressed data into a cluster that was freed (and
        // may be handed out again).
        if v == 0 && self.ctail != 0 && self.ctail >> self.cb() == c {
            self.ctail = 0;
        }
        Ok(())
    }

    pub(super) fn has_block(&self, c: u64) -> bool {
        let ti = usize::try_from(self.rcg().locate(ClusterIndex::new(c)).table_index)
            .unwrap_or(usize::MAX);
        self.reftable
            .get(ti)
            .is_some_and(|&e| entry::reftable_block_offset(e) != 0)
    }

    /// First run of `n` free clusters at or after the hint.
    pub(super) fn find_free(&mut self, n: u64) -> Result<u64, Error<D::Error>> {
        let mut start = self.free_hint;
        let mut c = start;
        loop {
            if c.saturating_sub(start) >= n {
                return Ok(start);
            }
            if self.refcount(c)? != 0 {
                if start == self.free_hint && n == 1 {
                    self.free_hint = c.saturating_add(1);
                }
                c = c.saturating_add(1);
                start = c;
            } else {
                c = c.saturating_add(1);
            }
        }
    }

    /// Makes sure a refcount block covers cluster `c`, allocating blocks
    /// (and growing the table) as needed. Every new block counts itself.
    pub(super) fn ensure_block(&mut self, c: u64) -> Result<(), Error<D::Error>> {
        let rb_bits = self.rb_bits();
        while !self.has_block(c) {
            let ti = c >> rb_bits;
            if usize::try_from(ti).map_or(true, |t| t >= self.reftable.len()) {
                self.grow_reftable(ti)?;
                continue;
            }
            // The lowest free cluster either has a block (the new block is
            // counted there) or is the first cluster of an uncovered range
            // (the new block for that range goes there and counts itself).
            let b = self.find_free(1)?;
            let bt = b >> rb_bits;
            if self.has_block(b) {
                self.set_refcount_existing(b, 1)?;
                self.barrier()?;
                self.install_block(ti, b, None)?;
            } else {
                if usize::try_from(bt).map_or(true, |t| t >= self.reftable.len()) {
                    self.grow_reftable(bt)?;
                    continue;
                }
                self.install_block(bt, b, Some(b))?;
            }
        }
        Ok(())
    }

    /// Writes a new refcount block for table index `ti` at `at` (counting
    /// `self_count` in it when given), flushes, then points the table at it.
    pub(super) fn install_block(
        &mut self,
        ti: u64,
        at: u64,
        self_count: Option<u64>,
    ) -> Result<(), Error<D::Error>> {
        let cs = self.cs();
        let off = at << self.cb();
        let mut blk = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        if let Some(c) = self_count {
            let g = self.rcg();
            g.set(&mut blk, g.locate(ClusterIndex::new(c)).index, 1);
        }
        self.write_dev(off, &blk, Structure::RefcountBlock)?;
        self.rb_cache.insert(off, blk);
        self.barrier()?;
        let i = usize::try_from(ti).map_err(|_| overflow(Structure::RefcountTable, 0))?;
        if let Some(e) = self.reftable.get_mut(i) {
            *e = off;
        }
        let rt = core::mem::take(&mut self.reftable);
        let r = self.write_words(
            self.hdr.refcount_table_offset,
            &rt,
            i,
            i,
            Structure::RefcountTable,
        );
        self.reftable = rt;
        r?;
        self.barrier()
    }

    /// Grows the refcount table so index `need` exists: new blocks and the
    /// new table go past the range the old table covers, each new block
    /// counting the new structures in its range; then the header switches
    /// to the new table and the old table's clusters are freed.
    pub(super) fn grow_reftable(&mut self, need: u64) -> Result<(), Error<D::Error>> {
        let cb = self.cb();
        let rb_bits = self.rb_bits();
        let per_cluster = self.cs() >> 3;
        let old_len = self.reftable.len() as u64;
        let old_clusters = u64::from(self.hdr.refcount_table_clusters);
        let rpb = 1u64 << rb_bits;
        let start = old_len << rb_bits; // first cluster outside the coverage
        let mut entries = need
            .max(old_len)
            .saturating_add(1)
            .max(old_len.saturating_add(old_len >> 1));
        let (table_clusters, blocks) = loop {
            let t = entries.div_ceil(per_cluster).max(1);
            // Blocks k cover [start, start + k + t): k = ceil((k + t) / rpb).
            let mut k = 1u64;
            while k.saturating_mul(rpb) < k.saturating_add(t) {
                k = k.saturating_add(1);
            }
            if old_len.saturating_add(k) <= t.saturating_mul(per_cluster)
                && need < t.saturating_mul(per_cluster)
            {
                break (t, k);
            }
            entries = entries.saturating_add(per_cluster);
        };
        let bytes = table_clusters << cb;
        self.hdr.check_reftable_limit(bytes)?;
        let used = blocks.saturating_add(table_clusters);
        // 1. The new blocks, each counting the new clusters in its range.
        let g = self.rcg();
        let mut new_table = self.reftable.clone();
        new_table.resize(
            usize::try_from(table_clusters.saturating_mul(per_cluster)).unwrap_or(0),
            0,
        );
        for k in 0..blocks {
            let mut blk = vec![0u8; usize::try_from(self.cs()).unwrap_or(0)];
            let first = start.saturating_add(k.saturating_mul(rpb));
            for c in first..first.saturating_add(rpb).min(start.saturating_add(used)) {
                g.set(&mut blk, g.locate(ClusterIndex::new(c)).index, 1);
            }
            let off = start.saturating_add(k) << cb;
            self.write_dev(off, &blk, Structure::RefcountBlock)?;
            self.rb_cache.insert(off, blk);
            if let Some(e) =
                new_table.get_mut(usize::try_from(old_len.saturating_add(k)).unwrap_or(usize::MAX))
            {
                *e = off;
            }
        }
        // 2. The new table.
        let table_off = start.saturating_add(blocks) << cb;
        let n = new_table.len();
        self.write_words(
            table_off,
            &new_table,
            0,
            n.saturating_sub(1),
            Structure::RefcountTable,
        )?;
        self.barrier()?;
        // 3. Switch the header (offset and cluster count, one 12-byte write).
        let mut h = [0u8; 12];
        h[..8].copy_from_slice(&table_off.to_be_bytes());
        h[8..].copy_from_slice(
            &u32::try_from(table_clusters)
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        self.write_dev(
            field::REFCOUNT_TABLE_OFFSET.start as u64,
            &h,
            Structure::Header,
        )?;
        self.barrier()?;
        let old_off = self.hdr.refcount_table_offset;
        self.hdr.refcount_table_offset = table_off;
        self.hdr.refcount_table_clusters = u32::try_from(table_clusters).unwrap_or(u32::MAX);
        self.reftable = new_table;
        // 4. Free the old table.
        for i in 0..old_clusters {
            let c = (old_off >> cb).saturating_add(i);
            let v = self.refcount(c)?;
            self.set_refcount_existing(c, v.saturating_sub(1))?;
        }
        self.barrier()
    }

    /// Allocates `n` contiguous clusters with refcount 1 (durable on
    /// return); returns the host offset of the first.
    pub(super) fn alloc_clusters(&mut self, n: u64) -> Result<HostOffset, Error<D::Error>> {
        'retry: loop {
            let c = self.find_free(n)?;
            for i in 0..n {
                let ci = c.saturating_add(i);
                if !self.has_block(ci) {
                    self.ensure_block(ci)?;
                    continue 'retry;
                }
            }
            for i in 0..n {
                // A new block may have landed on the run: look again.
                if self.refcount(c.saturating_add(i))? != 0 {
                    continue 'retry;
                }
            }
            for i in 0..n {
                self.set_refcount_existing(c.saturating_add(i), 1)?;
            }
            self.barrier()?;
            return ClusterIndex::new(c)
                .host_offset(self.rcg().cluster_size())
                .ok_or_else(|| overflow(Structure::RefcountBlock, c));
        }
    }

    /// Allocates `k` single clusters with refcount 1, the ones `k` calls
    /// of `alloc_clusters(1)` would hand out, in that order, but with one
    /// write per changed refcount block instead of one write and one flush
    /// per cluster. The refcounts are written, not flushed: the caller
    /// flushes before anything references the clusters (a crash before
    /// that leaks them, never more). Without write barriers they are not
    /// even written: they stay in the cached blocks until
    /// [`settle`](Self::settle) writes them, before the L2 entries that
    /// name the clusters (a fresh image's metadata reaches the file at the
    /// final flush, as qemu-img's caches leave it). A new refcount block
    /// needed on the way is still installed with its own ordering (written
    /// and flushed before the table names it).
    pub(super) fn alloc_each(&mut self, k: usize) -> Result<Vec<u64>, Error<D::Error>> {
        let mut out = Vec::with_capacity(k);
        let r = (|| {
            while out.len() < k {
                let c = self.find_free(1)?;
                if !self.has_block(c) {
                    self.ensure_block(c)?;
                    continue;
                }
                // `ensure_block` may have put a new block on `c`.
                if self.refcount(c)? != 0 {
                    continue;
                }
                self.set_refcount_pending(c, 1)?;
                let h = ClusterIndex::new(c)
                    .host_offset(self.rcg().cluster_size())
                    .ok_or_else(|| overflow(Structure::RefcountBlock, c))?;
                out.push(h.get());
            }
            Ok(())
        })();
        // Written even after an error: the cache already holds them.
        // Without barriers they wait for `settle`.
        let w = if self.barriers {
            self.write_pending_refcounts()
        } else {
            Ok(())
        };
        r?;
        w?;
        Ok(out)
    }

    /// Sets the refcount of `c` (whose block must exist) in the cached
    /// block only, remembering the change for
    /// [`write_pending_refcounts`](Self::write_pending_refcounts).
    fn set_refcount_pending(&mut self, c: u64, v: u64) -> Result<(), Error<D::Error>> {
        let (off, index) = self.set_in_cached_block(c, v)?;
        let byte = usize::try_from(self.rcg().entry_bytes(index).0).unwrap_or(0);
        let r = self.rb_pending.entry(off).or_insert((byte, byte));
        *r = (r.0.min(byte), r.1.max(byte));
        Ok(())
    }

    /// Writes every refcount block change [`set_refcount_pending`] left in
    /// the cache: the sectors from each block's first changed entry to its
    /// last, one write per block (not flushed).
    pub(super) fn write_pending_refcounts(&mut self) -> Result<(), Error<D::Error>> {
        let pending = core::mem::take(&mut self.rb_pending);
        for (off, (lo, hi)) in pending {
            let b = self
                .rb_cache
                .get(&off)
                .ok_or_else(|| overflow(Structure::RefcountBlock, off))?;
            let s = lo & !(SECTOR_BYTES - 1);
            let e = (hi | (SECTOR_BYTES - 1)).saturating_add(1).min(b.len());
            let chunk: Vec<u8> = b.get(s..e).unwrap_or(&[]).to_vec();
            self.write_dev(
                off.saturating_add(s as u64),
                &chunk,
                Structure::RefcountBlock,
            )?;
        }
        Ok(())
    }

    /// Drops one reference to each cluster of `[off, off + len)`.
    pub(super) fn free_range(&mut self, off: u64, len: u64) -> Result<(), Error<D::Error>> {
        if len == 0 {
            return Ok(());
        }
        let cb = self.cb();
        let first = off >> cb;
        let last = off.saturating_add(len).saturating_sub(1) >> cb;
        for c in first..=last {
            let v = self.refcount(c)?;
            if v == 0 {
                return Err(Error::corrupt(
                    Structure::RefcountBlock,
                    c << cb,
                    Problem::OutOfRange(0),
                ));
            }
            self.set_refcount_existing(c, v.saturating_sub(1))?;
        }
        Ok(())
    }

    /// Drops one reference to each cluster (index) in `clusters`, in any
    /// order, repeats allowed: as [`free_range`](Self::free_range) per
    /// cluster, but each refcount block's changed sectors are written
    /// once (one write per block, not one per cluster). Not flushed.
    pub(super) fn free_clusters(&mut self, clusters: &mut [u64]) -> Result<(), Error<D::Error>> {
        clusters.sort_unstable();
        let (cb, g) = (self.cb(), self.rcg());
        let ctail = (self.ctail != 0).then_some(self.ctail >> cb);
        let mut rest: &[u64] = clusters;
        while let Some(&c0) = rest.first() {
            let n = rest
                .iter()
                .take_while(|&&c| {
                    g.locate(ClusterIndex::new(c)).table_index
                        == g.locate(ClusterIndex::new(c0)).table_index
                })
                .count();
            let (group, tail) = rest.split_at(n);
            rest = tail;
            let gone =
                || Error::corrupt(Structure::RefcountBlock, c0 << cb, Problem::OutOfRange(0));
            let ti =
                usize::try_from(g.locate(ClusterIndex::new(c0)).table_index).unwrap_or(usize::MAX);
            let off = self
                .reftable
                .get(ti)
                .map(|&e| entry::reftable_block_offset(e))
                .filter(|&o| o != 0)
                .ok_or_else(gone)?;
            let b = self.refblock(off)?;
            let (mut lo, mut hi) = (u64::MAX, 0u64);
            let (mut first_zero, mut ctail_freed) = (u64::MAX, false);
            for &c in group {
                let idx = g.locate(ClusterIndex::new(c)).index;
                let v = g
                    .get(b, idx)
                    .ok_or_else(|| overflow(Structure::RefcountBlock, off))?;
                if v == 0 {
                    return Err(Error::corrupt(
                        Structure::RefcountBlock,
                        c << cb,
                        Problem::OutOfRange(0),
                    ));
                }
                if !g.set(b, idx, v.saturating_sub(1)) {
                    return Err(overflow(Structure::RefcountBlock, off));
                }
                let byte = g.entry_bytes(idx).0;
                (lo, hi) = (lo.min(byte), hi.max(byte));
                if v == 1 {
                    first_zero = first_zero.min(c);
                    ctail_freed |= ctail == Some(c);
                }
            }
            // The sectors from the first changed entry to the last.
            let s = usize::try_from(lo & !(SECTOR - 1)).unwrap_or(0);
            let e = usize::try_from((hi | (SECTOR - 1)).saturating_add(1))
                .unwrap_or(usize::MAX)
                .min(b.len());
            let chunk: Vec<u8> = b.get(s..e).unwrap_or(&[]).to_vec();
            self.write_dev(
                off.saturating_add(s as u64),
                &chunk,
                Structure::RefcountBlock,
            )?;
            self.free_hint = self.free_hint.min(first_zero);
            if ctail_freed {
                self.ctail = 0;
            }
        }
        Ok(())
    }

    /// Host bytes a compressed descriptor holds references on.
    pub(super) fn compressed_range(d: &CompressedDescriptor) -> (u64, u64) {
        (d.host & !(SECTOR - 1), d.sectors.saturating_mul(SECTOR))
    }

    pub(super) fn highest_used(&mut self) -> Result<u64, Error<D::Error>> {
        let rb_bits = self.rb_bits();
        let mut ti = self.reftable.len();
        while ti > 0 {
            ti = ti.saturating_sub(1);
            if self.reftable.get(ti).is_some_and(|&e| e != 0) {
                let first = (ti as u64) << rb_bits;
                let mut c = first.saturating_add(1u64 << rb_bits);
                while c > first {
                    c = c.saturating_sub(1);
                    if self.refcount(c)? != 0 {
                        return Ok(c);
                    }
                }
            }
        }
        Ok(0)
    }
}
