//! Growing and shrinking the virtual disk.

use super::*;

impl<D: BlockIo, B: BlockIo> Qcow2Writer<D, B>
where
    B::Error: LayerError<D::Error>,
{
    /// Changes the virtual size. Growing enlarges the L1 table when needed
    /// (new table written, header switched, old table freed). Shrinking
    /// drops the data past the new end, as `qemu-img resize --shrink` does:
    /// the whole clusters past it are unmapped (their host clusters freed),
    /// the L2 tables left empty are dropped, and the file is cut after its
    /// last cluster in use; a partial last cluster keeps its host cluster.
    /// A v2 image with internal snapshots is refused either way (its
    /// snapshots record no disk size), as QEMU refuses it.
    ///
    /// With an external data file (which must be attached) the data file
    /// is resized to the new size first, as QEMU does; with
    /// `data_file_raw` the new clusters are then mapped 1:1.
    pub fn resize(&mut self, new_size: u64) -> Result<(), ResizeError<D::Error>> {
        self.settle()?;
        let cs = self.cs();
        if !new_size.is_multiple_of(512) {
            return Err(ResizeError::Unaligned(new_size));
        }
        if self.df() && self.data.is_none() {
            return Err(ResizeError::Qcow2(Error::DataFileMissing));
        }
        if self.hdr.version < 3 && self.hdr.nb_snapshots > 0 && new_size != self.hdr.size {
            return Err(ResizeError::V2Snapshots);
        }
        if new_size < self.hdr.size {
            // Every cluster that starts at or past the new end, the old
            // disk's partial last cluster included.
            let from = new_size.div_ceil(cs).saturating_mul(cs);
            if from < self.hdr.size {
                let end = self.hdr.size.div_ceil(cs).saturating_mul(cs);
                self.unmap_clusters(from, end)?;
                self.drop_empty_tables()?;
                self.truncate_unused()?;
            }
        }
        let span = self.l2g().l1_span();
        let need = new_size.div_ceil(span);
        if need > u64::from(MAX_L1_ENTRIES) {
            return Err(ResizeError::Qcow2(Error::Limit {
                structure: Structure::L1Table,
                offset: self.hdr.l1_table_offset,
                limit: Limit::L1Entries,
                value: need,
                max: u64::from(MAX_L1_ENTRIES),
            }));
        }
        if need > self.l1.len() as u64 {
            let old_off = self.hdr.l1_table_offset;
            let old_bytes = (self.l1.len() as u64).saturating_mul(8);
            let bytes = need.saturating_mul(8);
            let clusters = bytes.div_ceil(cs).max(1);
            let off = self.alloc_clusters(clusters)?.get();
            let mut l1 = self.l1.clone();
            l1.resize(usize::try_from(need).unwrap_or(0), 0);
            let mut raw = vec![0u8; usize::try_from(clusters << self.cb()).unwrap_or(0)];
            for (i, w) in l1.iter().enumerate() {
                let s = i.saturating_mul(8);
                raw[s..s.saturating_add(8)].copy_from_slice(&w.to_be_bytes());
            }
            self.write_dev(off, &raw, Structure::L1Table)?;
            self.barrier()?;
            let mut h = [0u8; 12];
            h[..4].copy_from_slice(&u32::try_from(need).unwrap_or(u32::MAX).to_be_bytes());
            h[4..].copy_from_slice(&off.to_be_bytes());
            self.write_dev(field::L1_SIZE.start as u64, &h, Structure::Header)?;
            self.barrier()?;
            self.l1 = l1;
            self.hdr.l1_table_offset = off;
            self.hdr.l1_size = u32::try_from(need).unwrap_or(u32::MAX);
            if old_bytes > 0 {
                self.free_range(old_off, old_bytes.div_ceil(cs).saturating_mul(cs))?;
                self.barrier()?;
            }
        }
        if let Some(d) = self.data.as_mut() {
            if d.set_size(new_size)
                .map_err(|e| e.into_layer(Structure::DataFile, new_size))?
            {
                self.data_len = new_size;
            } else if new_size > self.data_len {
                // The device cannot be sized: write its last sector.
                let z = [0u8; SECTOR_BYTES];
                self.write_datafile(new_size.saturating_sub(SECTOR), &z)?;
            }
            self.barrier()?;
        }
        let old_size = self.hdr.size;
        self.write_dev(
            field::SIZE.start as u64,
            &new_size.to_be_bytes(),
            Structure::Header,
        )?;
        self.barrier()?;
        self.hdr.size = new_size;
        if self.df_raw() && new_size > old_size {
            self.map_clusters(old_size)?;
        }
        Ok(())
    }

    /// Gives every cluster from guest offset `from` to the end of the disk
    /// a host cluster (1:1 in an external data file, which QEMU does for
    /// `data_file_raw`; else fresh clusters).
    pub(super) fn map_clusters(&mut self, from: u64) -> Result<(), Error<D::Error>> {
        let cs = self.cs();
        let mut at = from & !(cs.wrapping_sub(1));
        while at < self.hdr.size {
            let (_, e, _) = self.get_entry(at)?;
            if !self.has_host(e) {
                let h = if self.df() {
                    at
                } else {
                    self.alloc_clusters(1)?.get()
                };
                let bm = if self.extended() { ALL_ALLOCATED } else { 0 };
                self.set_entry(at, h | COPIED, bm)?;
            }
            at = at.saturating_add(cs);
        }
        self.barrier()
    }
}
