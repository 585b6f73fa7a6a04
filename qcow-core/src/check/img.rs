//! The image being checked: header, geometry, refcount table and stored
//! refcounts, read through a zero-past-EOF view; reference counting.

use super::*;

/// The image being checked: its header and geometry.
pub(super) struct Img<'d, D: BlockIo> {
    pub(super) dev: &'d mut D,
    pub(super) hdr: HeaderRepr,
    pub(super) file_len: u64,
    pub(super) bits: u32,
    pub(super) cs: u64,
    pub(super) reftable: Vec<u64>,
    pub(super) crypto: Option<CryptoExt>,
    pub(super) bitmaps: Option<BitmapsExt>,
    /// Cached refcount block: (reftable index, bytes).
    pub(super) rb_cache: Option<(u64, Vec<u8>)>,
    /// Where refcounts live.
    pub(super) rc: RefcountGeometry,
    /// Where L2 entries live.
    pub(super) l2g: L2Geometry,
}

/// The checked device as qemu-img reads a file: bytes past its end read
/// as zero. The reader's parsing reads through it.
pub(super) struct ZeroTail<'a, D> {
    pub(super) dev: &'a mut D,
    pub(super) len: u64,
}

impl<D: BlockIo> BlockIo for ZeroTail<'_, D> {
    type Error = D::Error;
    fn sector_size(&self) -> u32 {
        self.dev.sector_size()
    }
    fn size(&mut self) -> Result<u64, D::Error> {
        Ok(self.len)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), D::Error> {
        let avail = self.len.saturating_sub(offset);
        let n = usize::try_from(avail.min(buf.len() as u64)).unwrap_or(buf.len());
        let (head, tail) = buf.split_at_mut(n);
        if !head.is_empty() {
            self.dev.read_at(offset, head)?;
        }
        tail.fill(0);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), D::Error> {
        self.dev.write_at(offset, buf)
    }
    fn flush(&mut self) -> Result<(), D::Error> {
        self.dev.flush()
    }
}

pub(super) fn io<E>(e: E, structure: Structure, offset: u64) -> Error<E> {
    e.into_layer(structure, offset)
}

impl<'d, D: BlockIo> Img<'d, D> {
    /// Whether host offset `off` is at the start of a cluster.
    pub(super) fn aligned(&self, off: u64) -> bool {
        HostOffset::new(off).is_cluster_aligned(self.l2g.cluster())
    }

    pub(super) fn open(dev: &'d mut D) -> Result<Self, Error<D::Error>> {
        let file_len = dev.size().map_err(|e| io(e, Structure::Header, 0))?;
        // The header and its extensions as the reader parses them, with
        // room for a long `header_length` (at most a cluster; 64 KiB
        // covers every header qemu-img writes).
        let mut scratch = vec![0u8; 64 * 1024];
        let info = crate::image::read_header_info(
            &mut ZeroTail { dev, len: file_len },
            &mut [0u8; 512],
            &mut scratch,
        )?;
        let hdr = info.header;
        // Unknown incompatible features: the image cannot be interpreted
        // (qemu-img refuses to open it too).
        hdr.refuse_unknown_incompatible()?;
        // "Raw external data" without an external data file: qemu-img
        // refuses to open the image.
        if hdr.autoclear_features & autoclear::DATA_FILE_RAW != 0 && !hdr.has_data_file() {
            return Err(Error::corrupt(
                Structure::Header,
                field::AUTOCLEAR_FEATURES.start as u64,
                Problem::DataFileRawWithoutDataFile,
            ));
        }
        hdr.check_l1_limit()?;
        let cs = hdr.cluster_size();
        // The L1 table must cover the virtual size; qemu-img refuses to
        // open (and so to check) an image whose table is too small.
        let needed = L2Geometry::of(&hdr).l1_entries_for(hdr.size);
        if u64::from(hdr.l1_size) < needed {
            return Err(Error::corrupt(
                Structure::Header,
                field::L1_SIZE.start as u64,
                Problem::L1TooSmall {
                    l1_size: hdr.l1_size,
                    needed,
                },
            ));
        }
        let mut img = Self {
            dev,
            hdr,
            file_len,
            bits: hdr.cluster_bits,
            cs,
            reftable: Vec::new(),
            crypto: info.crypto,
            bitmaps: info.bitmaps,
            rb_cache: None,
            rc: RefcountGeometry::of(&hdr),
            l2g: L2Geometry::of(&hdr),
        };
        img.read_reftable()?;
        Ok(img)
    }

    /// Reads `buf.len()` bytes at `off`; bytes past the end of the file
    /// read as zero (as a file does for qemu-img).
    pub(super) fn read(
        &mut self,
        off: u64,
        buf: &mut [u8],
        s: Structure,
    ) -> Result<(), Error<D::Error>> {
        let avail = self.file_len.saturating_sub(off);
        let n = usize::try_from(avail.min(buf.len() as u64)).unwrap_or(buf.len());
        let (head, tail) = buf.split_at_mut(n);
        if !head.is_empty() {
            self.dev.read_at(off, head).map_err(|e| io(e, s, off))?;
        }
        tail.fill(0);
        Ok(())
    }

    pub(super) fn read_reftable(&mut self) -> Result<(), Error<D::Error>> {
        let bytes = u64::from(self.hdr.refcount_table_clusters).saturating_mul(self.cs);
        self.hdr.check_reftable_limit(bytes)?;
        let mut raw = vec![0u8; usize::try_from(bytes).unwrap_or(0)];
        let at = self.hdr.refcount_table_offset;
        self.read(at, &mut raw, Structure::RefcountTable)?;
        self.reftable = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        Ok(())
    }

    /// The stored refcount of `cluster`; `None` when its refcount block's
    /// table entry is not cluster aligned.
    pub(super) fn stored(&mut self, cluster: u64) -> Result<Option<u64>, Error<D::Error>> {
        let slot = self.rc.locate(ClusterIndex::new(cluster));
        let idx = slot.table_index;
        let Some(&e) = usize::try_from(idx).ok().and_then(|i| self.reftable.get(i)) else {
            return Ok(Some(0));
        };
        let off = match self.rc.block_at(e) {
            RefblockAt::Absent => return Ok(Some(0)),
            // qemu-img cannot read an unaligned block either.
            RefblockAt::Unaligned(_) => return Ok(None),
            RefblockAt::At(off) => off.get(),
        };
        // Beyond the largest offset a file can have: unreadable too.
        if off > MAX_FILE_OFFSET.saturating_sub(self.cs) {
            return Ok(None);
        }
        if self.rb_cache.as_ref().map(|c| c.0) != Some(idx) {
            let mut b = vec![0u8; usize::try_from(self.cs).unwrap_or(0)];
            self.read(off, &mut b, Structure::RefcountBlock)?;
            self.rb_cache = Some((idx, b));
        }
        Ok(self
            .rb_cache
            .as_ref()
            .and_then(|c| self.rc.get(&c.1, slot.index)))
    }

    pub(super) fn nb_clusters(&self) -> u64 {
        self.file_len.div_ceil(self.cs)
    }
}

/// Reference counting for one pass.
pub(super) struct Counter {
    pub(super) counts: Vec<u16>,
    /// Most references one cluster may have: the image's refcount maximum
    /// (as qemu-img counts), capped by the `u16` cells.
    pub(super) max: u16,
    pub(super) file_len: u64,
    pub(super) bits: u32,
    pub(super) cs: u64,
}

impl Counter {
    pub(super) fn inc(&mut self, r: &mut CheckReport, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        let end = offset.checked_add(size);
        let past = match end {
            Some(end) => end.checked_sub(self.file_len).is_some_and(|d| d >= self.cs),
            None => true,
        };
        if past {
            r.findings.push(Finding::PastEnd { offset, size });
            r.corruptions = r.corruptions.saturating_add(1);
            return;
        }
        // size > 0, so the last byte is end - 1 (end did not overflow).
        let last_byte = end.unwrap_or(offset).saturating_sub(1);
        let first = offset >> self.bits;
        let last = last_byte >> self.bits;
        for c in first..=last {
            let Ok(i) = usize::try_from(c) else { return };
            if i >= self.counts.len() {
                self.counts.resize(i.saturating_add(1), 0);
            }
            if self.counts[i] >= self.max {
                r.findings.push(Finding::Overflow {
                    offset: c << self.bits,
                });
                r.corruptions = r.corruptions.saturating_add(1);
            } else {
                self.counts[i] = self.counts[i].saturating_add(1);
            }
        }
    }
}
