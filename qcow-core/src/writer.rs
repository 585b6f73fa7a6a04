//! The qcow2 writer (needs `alloc`): guest writes, zero writes, discards,
//! compressed cluster writes and growth, with refcounts kept exact.
//!
//! Metadata caches are write-through: every change to an L2 table, a
//! refcount block, the refcount table or the L1 table reaches the device
//! at once, and the device is flushed between dependent steps, so the image
//! on disk is consistent after every device write (a crash may leak
//! clusters, never corrupt). See "qcow2 write ordering" in ARCHITECTURE.md.
//!
//! The device must accept byte-granular requests (files, `VecDevice`):
//! table entries are written as whole 512-byte sectors, guest data at its
//! own offset and length.

#![warn(clippy::arithmetic_side_effects)]

extern crate alloc;

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;

use crate::crypto::{ImageKey, SectorCrypt};
use crate::entry::{self, CompressedDescriptor, L2Entry, COPIED, OFFSET_MASK, ZERO};
use crate::error::{Error, LayerError, Limit, Problem, Structure, Unsupported};
use crate::header::{autoclear, field, incompat, HeaderRepr};
use crate::image::NoDevice;
use crate::limits::MAX_L1_ENTRIES;
use crate::table::{L2Geometry, RefcountGeometry};
use luks_core::io::BlockIo;

/// Whether an image with `crypt_method` can be written with `key`: no key
/// for plain images, a LUKS key for crypt_method 2.
fn key_fits(crypt_method: u32, key: Option<&ImageKey>) -> bool {
    matches!(
        (crypt_method, key),
        (0, None) | (2, Some(ImageKey::Luks(_)))
    )
}

/// Sector granularity for metadata writes and compressed descriptors.
const SECTOR: u64 = 512;
/// [`SECTOR`] as a `usize`.
const SECTOR_BYTES: usize = 512;
/// L2 tables kept in memory before the cache is dropped (write-through, so
/// dropping is free).
const MAX_CACHED_TABLES: usize = 512;
/// All 32 subclusters allocated (extended L2 bitmap, low half).
const ALL_ALLOCATED: u64 = 0xffff_ffff;
/// All 32 subclusters read as zero (extended L2 bitmap, high half).
const ALL_ZERO: u64 = 0xffff_ffff_0000_0000;

fn overflow<E>(structure: Structure, offset: u64) -> Error<E> {
    Error::corrupt(structure, offset, Problem::Overflow)
}

/// A qcow2 image open for writing, over device `D` with an optional
/// backing device `B` (read for copy-on-write of partial clusters).
///
/// An image with an external data file writes its guest data to a second
/// device of the same type, attached with
/// [`with_data_file`](Self::with_data_file): host offset = guest offset, as
/// QEMU 10 allocates, and data-file clusters are not refcounted.
///
/// Encrypted images without their key are refused
/// ([`Unsupported::Writing`]); so are dirty images ([`Unsupported::Dirty`])
/// and corrupt images (repair them first). Images with internal snapshots
/// are written copy-on-write: a data cluster or L2 table whose refcount is
/// above 1 (no COPIED flag) is copied to a new cluster before it changes,
/// and the shared original loses one reference (see [`snapshots`] for
/// creating, reverting to and deleting snapshots). Snapshots and an
/// external data file together are refused, as QEMU refuses them.
pub struct Qcow2Writer<D: BlockIo, B = NoDevice<<D as BlockIo>::Error>> {
    dev: D,
    backing: Option<B>,
    backing_size: u64,
    hdr: HeaderRepr,
    l1: Vec<u64>,
    reftable: Vec<u64>,
    l2_cache: BTreeMap<u64, Vec<u64>>,
    rb_cache: BTreeMap<u64, Vec<u8>>,
    /// No cluster below this index is free.
    free_hint: u64,
    /// Bytes the device holds (tracked, so reads past the end read zero).
    file_len: u64,
    /// Flush between dependent steps (the crash-consistency ordering).
    barriers: bool,
    /// The data key of a LUKS-encrypted image (crypt_method 2).
    key: Option<ImageKey>,
    /// Runs the encryption of large data writes (else in line).
    crypt: Option<Box<dyn SectorCrypt + Send>>,
    /// Offset and length of the LUKS header region, when known.
    crypto_region: Option<(u64, u64)>,
    /// The external data file, when attached.
    data: Option<D>,
    /// Bytes the data file holds (reads past it read zero).
    data_len: u64,
    /// End of the last compressed cluster written, when more compressed
    /// data may be packed right after it (0: start a new host cluster).
    ctail: u64,
}

impl<D: BlockIo, B> core::fmt::Debug for Qcow2Writer<D, B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Qcow2Writer")
            .field("header", &self.hdr)
            .finish_non_exhaustive()
    }
}

impl<D: BlockIo> Qcow2Writer<D> {
    /// Opens an existing image for writing. Clears the autoclear bits
    /// other than "raw external data" (this writer does not keep bitmaps
    /// up to date), as QEMU does on a read-write open.
    /// Encrypted images are refused: see [`open_with_key`](Self::open_with_key).
    pub fn open(dev: D) -> Result<Self, Error<D::Error>> {
        Self::open_inner(dev, None, false)
    }

    /// Opens a LUKS-encrypted image (crypt_method 2) for writing with its
    /// data key (from [`ImageKey::unlock`]): every data write, including
    /// the copy-on-write fill of a partial cluster, is encrypted with IV
    /// `plain64(host offset / 512)`. Unencrypted and legacy AES images
    /// are refused.
    pub fn open_with_key(dev: D, key: ImageKey) -> Result<Self, Error<D::Error>> {
        Self::open_inner(dev, Some(key), false)
    }

    /// Opens an image, encrypted or not, for metadata-only changes: the
    /// snapshot operations and changing the backing file name (which never
    /// read or write guest data, so an encrypted image needs no key). Guest
    /// reads and writes are refused on an encrypted image opened this way.
    pub fn open_metadata_only(dev: D) -> Result<Self, Error<D::Error>> {
        Self::open_inner(dev, None, true)
    }

    fn open_inner(
        mut dev: D,
        key: Option<ImageKey>,
        metadata_only: bool,
    ) -> Result<Self, Error<D::Error>> {
        let file_len = dev.size().map_err(|e| e.into_layer(Structure::Header, 0))?;
        let mut first = vec![0u8; 4096];
        dev.read_at(0, &mut first)
            .map_err(|e| e.into_layer(Structure::Header, 0))?;
        let hdr = HeaderRepr::parse_bytes::<D::Error>(&first)?;
        hdr.refuse_unknown_incompatible()?;
        if hdr.incompatible_features & incompat::CORRUPT != 0 {
            return Err(Error::MarkedCorrupt);
        }
        // As QEMU on a read-write open: an image whose dirty bit says its
        // lazy refcounts were not written back gets them rebuilt (the
        // checker's crash-safe `-r all`, which clears the bit), then opens.
        if hdr.version >= 3 && hdr.incompatible_features & incompat::DIRTY != 0 {
            let outcome = crate::check::check(&mut dev, crate::check::Repair::All)?;
            let r = outcome.result();
            let mut again = vec![0u8; 512];
            dev.read_at(0, &mut again)
                .map_err(|e| e.into_layer(Structure::Header, 0))?;
            let still = HeaderRepr::parse_bytes::<D::Error>(&again)?;
            if r.corruptions != 0 || still.incompatible_features & incompat::DIRTY != 0 {
                return Err(Error::Unsupported(Unsupported::Dirty));
            }
            return Self::open_inner(dev, key, metadata_only);
        }
        if !(metadata_only || key_fits(hdr.crypt_method, key.as_ref()))
            || (hdr.has_data_file() && hdr.nb_snapshots != 0)
        {
            return Err(Error::Unsupported(Unsupported::Writing));
        }
        hdr.check_l1_limit()?;
        let rt_bytes = u64::from(hdr.refcount_table_clusters)
            .checked_mul(hdr.cluster_size())
            .ok_or_else(|| overflow(Structure::RefcountTable, hdr.refcount_table_offset))?;
        hdr.check_reftable_limit(rt_bytes)?;
        let mut w = Self {
            dev,
            backing: None,
            backing_size: 0,
            hdr,
            l1: Vec::new(),
            reftable: Vec::new(),
            l2_cache: BTreeMap::new(),
            rb_cache: BTreeMap::new(),
            free_hint: 0,
            file_len,
            barriers: true,
            key,
            crypt: None,
            crypto_region: None,
            data: None,
            data_len: 0,
            ctail: 0,
        };
        w.l1 = w.read_u64s(
            hdr.l1_table_offset,
            hdr.l1_size as usize,
            Structure::L1Table,
        )?;
        let rt_entries = usize::try_from(rt_bytes >> 3).unwrap_or(0);
        w.reftable = w.read_u64s(
            hdr.refcount_table_offset,
            rt_entries,
            Structure::RefcountTable,
        )?;
        let keep = hdr.autoclear_features & autoclear::DATA_FILE_RAW;
        if hdr.version >= 3 && hdr.autoclear_features != keep {
            w.hdr.autoclear_features = keep;
            w.write_dev(
                field::AUTOCLEAR_FEATURES.start as u64,
                &keep.to_be_bytes(),
                Structure::Header,
            )?;
            w.flush_dev()?;
        }
        Ok(w)
    }
}

impl<D: BlockIo, B: BlockIo> Qcow2Writer<D, B>
where
    B::Error: LayerError<D::Error>,
{
    /// Attaches the backing device, read when a partial write allocates a
    /// cluster that falls through to the backing file.
    pub fn with_backing<B2>(self, mut backing: B2) -> Result<Qcow2Writer<D, B2>, Error<D::Error>>
    where
        B2: BlockIo,
        B2::Error: LayerError<D::Error>,
    {
        let backing_size = backing
            .size()
            .map_err(|e| e.into_layer(Structure::Backing, 0))?;
        Ok(Qcow2Writer {
            dev: self.dev,
            backing: Some(backing),
            backing_size,
            hdr: self.hdr,
            l1: self.l1,
            reftable: self.reftable,
            l2_cache: self.l2_cache,
            rb_cache: self.rb_cache,
            free_hint: self.free_hint,
            file_len: self.file_len,
            barriers: self.barriers,
            key: self.key,
            crypt: self.crypt,
            crypto_region: self.crypto_region,
            data: self.data,
            data_len: self.data_len,
            ctail: self.ctail,
        })
    }

    /// Attaches the external data file of an image that has one (guest
    /// data is read from and written to it; the caller opens the file the
    /// header names). Refused for images without a data file.
    pub fn with_data_file(mut self, mut data: D) -> Result<Self, Error<D::Error>> {
        if !self.hdr.has_data_file() {
            return Err(Error::Unsupported(Unsupported::Writing));
        }
        self.data_len = data
            .size()
            .map_err(|e| e.into_layer(Structure::DataFile, 0))?;
        self.data = Some(data);
        Ok(self)
    }

    /// The attached external data file.
    pub fn data_file_device(&mut self) -> Option<&mut D> {
        self.data.as_mut()
    }

    /// Turns the flushes between dependent metadata steps on (the default)
    /// or off. Off is for writing a new image that is thrown away on
    /// failure anyway (`convert`): much faster on real disks, but a crash
    /// may then leave the image corrupt. [`flush`](Self::flush) and
    /// [`close`](Self::close) always flush.
    pub fn set_write_barriers(&mut self, on: bool) {
        self.barriers = on;
    }

    /// Attaches the data key of a LUKS-encrypted image (after `create`
    /// made it and the caller formatted the LUKS header region). Refused
    /// for unencrypted images and keys other than LUKS.
    pub fn with_key(mut self, key: ImageKey) -> Result<Self, Error<D::Error>> {
        if !key_fits(self.hdr.crypt_method, Some(&key)) {
            return Err(Error::Unsupported(Unsupported::Writing));
        }
        self.key = Some(key);
        Ok(self)
    }

    /// Has the encryption of data writes run by `crypt` (e.g. on several
    /// threads) instead of in line; the bytes written stay the same.
    pub fn set_sector_crypt(&mut self, crypt: Box<dyn SectorCrypt + Send>) {
        self.crypt = Some(crypt);
    }

    /// Offset and length of the LUKS header region of an image `create`
    /// made with [`CreateOptions::luks_region_len`](crate::CreateOptions).
    pub fn crypto_region(&self) -> Option<(u64, u64)> {
        self.crypto_region
    }

    /// The current header.
    pub fn header(&self) -> &HeaderRepr {
        &self.hdr
    }

    /// Virtual size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.hdr.size
    }

    /// The device.
    pub fn device(&mut self) -> &mut D {
        &mut self.dev
    }

    /// Flushes and gives back the device.
    pub fn close(mut self) -> Result<D, Error<D::Error>> {
        self.barrier()?;
        Ok(self.dev)
    }

    /// Gives back the device without flushing (what a crash leaves).
    pub fn into_device(self) -> D {
        self.dev
    }

    // ---- geometry -------------------------------------------------------

    fn cb(&self) -> u32 {
        self.hdr.cluster_bits
    }
    fn cs(&self) -> u64 {
        self.hdr.cluster_size()
    }
    fn extended(&self) -> bool {
        self.hdr.extended_l2()
    }
    /// Guest data lives in an external data file.
    fn df(&self) -> bool {
        self.hdr.has_data_file()
    }
    /// The external data file is a raw image of the disk (`data_file_raw`):
    /// every cluster is mapped 1:1 and zeroes must reach the file.
    fn df_raw(&self) -> bool {
        self.df() && self.hdr.autoclear_features & autoclear::DATA_FILE_RAW != 0
    }
    /// Whether L2 entry `e` names a host cluster (offset 0 is a valid
    /// data-file offset; COPIED tells it from "unallocated" there).
    fn has_host(&self, e: u64) -> bool {
        if e & entry::COMPRESSED != 0 {
            e & OFFSET_MASK != 0
        } else {
            self.l2g().host(e).is_some()
        }
    }
    fn decode(&self, e: u64) -> L2Entry {
        self.l2g().decode(e)
    }
    /// Where L2 entries live (the table layer).
    fn l2g(&self) -> L2Geometry {
        L2Geometry::of(&self.hdr)
    }
    /// Where refcounts live (the table layer).
    fn rcg(&self) -> RefcountGeometry {
        RefcountGeometry::of(&self.hdr)
    }
    /// u64 words per L2 entry.
    fn l2_words(&self) -> usize {
        self.l2g().entry_len() >> 3
    }
    /// log2 of the refcounts per block.
    fn rb_bits(&self) -> u32 {
        self.rcg().block_bits()
    }

    // ---- device helpers -------------------------------------------------

    fn read_dev(&mut self, off: u64, buf: &mut [u8], st: Structure) -> Result<(), Error<D::Error>> {
        let avail = self.file_len.saturating_sub(off);
        let n = usize::try_from(avail).unwrap_or(usize::MAX).min(buf.len());
        let (head, tail) = buf.split_at_mut(n);
        if !head.is_empty() {
            self.dev
                .read_at(off, head)
                .map_err(|e| e.into_layer(st, off))?;
        }
        tail.fill(0);
        Ok(())
    }

    fn write_dev(&mut self, off: u64, buf: &[u8], st: Structure) -> Result<(), Error<D::Error>> {
        self.dev
            .write_at(off, buf)
            .map_err(|e| e.into_layer(st, off))?;
        let end = off.saturating_add(buf.len() as u64);
        self.file_len = self.file_len.max(end);
        Ok(())
    }

    /// A flush between dependent steps; skipped when barriers are off.
    fn barrier(&mut self) -> Result<(), Error<D::Error>> {
        if self.barriers {
            self.flush_dev()
        } else {
            Ok(())
        }
    }

    /// Flushes the data file (first: its data comes before the metadata
    /// naming it) and the image.
    fn flush_dev(&mut self) -> Result<(), Error<D::Error>> {
        if let Some(d) = self.data.as_mut() {
            d.flush()
                .map_err(|e| e.into_layer(Structure::DataFile, 0))?;
        }
        self.dev
            .flush()
            .map_err(|e| e.into_layer(Structure::Header, 0))
    }

    fn read_u64s(
        &mut self,
        off: u64,
        n: usize,
        st: Structure,
    ) -> Result<Vec<u64>, Error<D::Error>> {
        let mut raw = vec![0u8; n.saturating_mul(8)];
        self.read_dev(off, &mut raw, st)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_be_bytes(a)
            })
            .collect())
    }

    /// Writes the 512-byte sector(s) of table `words` holding words
    /// `first..=last`, the table living at `base`.
    fn write_words(
        &mut self,
        base: u64,
        words: &[u64],
        first: usize,
        last: usize,
        st: Structure,
    ) -> Result<(), Error<D::Error>> {
        let per = SECTOR_BYTES >> 3;
        let s = first.checked_div(per).unwrap_or(0).saturating_mul(per);
        let e = last
            .checked_div(per)
            .unwrap_or(0)
            .saturating_add(1)
            .saturating_mul(per)
            .min(words.len());
        let mut raw = Vec::with_capacity(e.saturating_sub(s).saturating_mul(8));
        for w in words.get(s..e).unwrap_or(&[]) {
            raw.extend_from_slice(&w.to_be_bytes());
        }
        // Pad to a whole sector (tables shorter than a sector: L1, reftable).
        while raw.len().checked_rem(SECTOR_BYTES).unwrap_or(0) != 0 {
            raw.push(0);
        }
        let off = base.saturating_add((s as u64).saturating_mul(8));
        self.write_dev(off, &raw, st)
    }

    // ---- refcounts ------------------------------------------------------

    fn refblock(&mut self, off: u64) -> Result<&mut Vec<u8>, Error<D::Error>> {
        if !self.rb_cache.contains_key(&off) {
            if self.rb_cache.len() >= MAX_CACHED_TABLES {
                self.rb_cache.clear();
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
        let slot = g.locate(c);
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

    /// Sets the refcount of `c`, whose block must exist. Writes the sector
    /// of the block holding it (not flushed).
    fn set_refcount_existing(&mut self, c: u64, v: u64) -> Result<(), Error<D::Error>> {
        let g = self.rcg();
        let slot = g.locate(c);
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
        // The sector of the block holding the entry.
        let sec = g.entry_sector(slot.index);
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

    fn has_block(&self, c: u64) -> bool {
        let ti = usize::try_from(self.rcg().locate(c).table_index).unwrap_or(usize::MAX);
        self.reftable
            .get(ti)
            .is_some_and(|&e| entry::reftable_block_offset(e) != 0)
    }

    /// First run of `n` free clusters at or after the hint.
    fn find_free(&mut self, n: u64) -> Result<u64, Error<D::Error>> {
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
    fn ensure_block(&mut self, c: u64) -> Result<(), Error<D::Error>> {
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
    fn install_block(
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
            g.set(&mut blk, g.locate(c).index, 1);
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
    fn grow_reftable(&mut self, need: u64) -> Result<(), Error<D::Error>> {
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
        let order = self.hdr.refcount_order;
        let mut new_table = self.reftable.clone();
        new_table.resize(
            usize::try_from(table_clusters.saturating_mul(per_cluster)).unwrap_or(0),
            0,
        );
        for k in 0..blocks {
            let mut blk = vec![0u8; usize::try_from(self.cs()).unwrap_or(0)];
            let first = start.saturating_add(k.saturating_mul(rpb));
            for c in first..first.saturating_add(rpb).min(start.saturating_add(used)) {
                entry::refcount_set(&mut blk, c.wrapping_sub(first), order, 1);
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
    fn alloc_clusters(&mut self, n: u64) -> Result<u64, Error<D::Error>> {
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
            return Ok(c << self.cb());
        }
    }

    /// Drops one reference to each cluster of `[off, off + len)`.
    fn free_range(&mut self, off: u64, len: u64) -> Result<(), Error<D::Error>> {
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
    fn free_clusters(&mut self, clusters: &mut [u64]) -> Result<(), Error<D::Error>> {
        clusters.sort_unstable();
        let (cb, rb_bits, order) = (self.cb(), self.rb_bits(), self.hdr.refcount_order);
        let mask = (1u64 << rb_bits).wrapping_sub(1);
        let ctail = (self.ctail != 0).then_some(self.ctail >> cb);
        let mut rest: &[u64] = clusters;
        while let Some(&c0) = rest.first() {
            let n = rest
                .iter()
                .take_while(|&&c| c >> rb_bits == c0 >> rb_bits)
                .count();
            let (group, tail) = rest.split_at(n);
            rest = tail;
            let gone =
                || Error::corrupt(Structure::RefcountBlock, c0 << cb, Problem::OutOfRange(0));
            let ti = usize::try_from(c0 >> rb_bits).unwrap_or(usize::MAX);
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
                let idx = c & mask;
                let v = entry::refcount_get(b, idx, order)
                    .ok_or_else(|| overflow(Structure::RefcountBlock, off))?;
                if v == 0 {
                    return Err(Error::corrupt(
                        Structure::RefcountBlock,
                        c << cb,
                        Problem::OutOfRange(0),
                    ));
                }
                if !entry::refcount_set(b, idx, order, v.saturating_sub(1)) {
                    return Err(overflow(Structure::RefcountBlock, off));
                }
                let byte = (idx << order) >> 3;
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
    fn compressed_range(d: &CompressedDescriptor) -> (u64, u64) {
        (d.host & !(SECTOR - 1), d.sectors.saturating_mul(SECTOR))
    }

    // ---- L1 / L2 ------------------------------------------------------

    fn l2_table(&mut self, off: u64) -> Result<&mut Vec<u64>, Error<D::Error>> {
        if !self.l2_cache.contains_key(&off) {
            if self.l2_cache.len() >= MAX_CACHED_TABLES {
                self.l2_cache.clear();
            }
            let n = usize::try_from(self.cs() >> 3).unwrap_or(0);
            let t = self.read_u64s(off, n, Structure::L2Table)?;
            self.l2_cache.insert(off, t);
        }
        self.l2_cache
            .get_mut(&off)
            .ok_or_else(|| overflow(Structure::L2Table, off))
    }

    fn split(&self, g: u64) -> (usize, usize) {
        let slot = self.l2g().locate(g);
        (
            usize::try_from(slot.l1_index).unwrap_or(usize::MAX),
            usize::try_from(slot.l2_index).unwrap_or(0),
        )
    }

    /// The L2 entry (and bitmap) for guest offset `g`; `None` for the L2
    /// table when the L1 entry is empty.
    fn get_entry(&mut self, g: u64) -> Result<(Option<u64>, u64, u64), Error<D::Error>> {
        let (l1i, l2i) = self.split(g);
        let l1e = *self
            .l1
            .get(l1i)
            .ok_or_else(|| overflow(Structure::L1Table, self.hdr.l1_table_offset))?;
        let l2off = entry::l1_l2_offset(l1e);
        if l2off == 0 {
            return Ok((None, 0, 0));
        }
        let w = self.l2_words();
        let t = self.l2_table(l2off)?;
        let i = l2i.saturating_mul(w);
        let e = t.get(i).copied().unwrap_or(0);
        let bm = if w == 2 {
            t.get(i.saturating_add(1)).copied().unwrap_or(0)
        } else {
            0
        };
        Ok((Some(l2off), e, bm))
    }

    /// The L2 table for `g`, ready to be changed: allocated (zeroed, then
    /// the L1 entry) if the L1 entry is empty, copied first if a snapshot
    /// shares it.
    fn ensure_l2(&mut self, g: u64) -> Result<u64, Error<D::Error>> {
        let (l1i, _) = self.split(g);
        let l1e = *self
            .l1
            .get(l1i)
            .ok_or_else(|| overflow(Structure::L1Table, self.hdr.l1_table_offset))?;
        let cur = entry::l1_l2_offset(l1e);
        if cur != 0 {
            if l1e & COPIED != 0 {
                return Ok(cur);
            }
            return self.unshare_l2(l1i, cur);
        }
        let off = self.alloc_clusters(1)?;
        let n = usize::try_from(self.cs() >> 3).unwrap_or(0);
        let t = vec![0u64; n];
        self.write_words(off, &t, 0, n.saturating_sub(1), Structure::L2Table)?;
        self.l2_cache.insert(off, t);
        self.barrier()?;
        if let Some(e) = self.l1.get_mut(l1i) {
            *e = off | COPIED;
        }
        let l1 = core::mem::take(&mut self.l1);
        let r = self.write_words(self.hdr.l1_table_offset, &l1, l1i, l1i, Structure::L1Table);
        self.l1 = l1;
        r?;
        self.barrier()?;
        Ok(off)
    }

    /// Makes the L2 table at `old` (L1 index `l1i`, no COPIED flag) the
    /// active image's own. With refcount 1 only the flags were missing:
    /// they are set (the entries' too). Otherwise a snapshot shares the table: it is copied to a new
    /// cluster (entries keep their clusters, whose refcounts already count
    /// both paths; COPIED set where a cluster's refcount is 1), flushed,
    /// the L1 entry switched to it (flushed), and only then the old table
    /// loses the active image's reference.
    fn unshare_l2(&mut self, l1i: usize, old: u64) -> Result<u64, Error<D::Error>> {
        let shared = self.refcount(old >> self.cb())? > 1;
        let target = if shared {
            let mut t = self.l2_table(old)?.clone();
            self.recompute_copied(&mut t)?;
            let new = self.alloc_clusters(1)?;
            let n = t.len();
            self.write_words(new, &t, 0, n.saturating_sub(1), Structure::L2Table)?;
            self.l2_cache.insert(new, t);
            self.barrier()?;
            new
        } else {
            // Ours alone, only the flags were stale (another writer, or a
            // crash inside a snapshot deletion): fix the entries' flags too,
            // so owned clusters are written in place again.
            let mut t = self.l2_table(old)?.clone();
            if self.recompute_copied(&mut t)? {
                let n = t.len();
                self.write_words(old, &t, 0, n.saturating_sub(1), Structure::L2Table)?;
                self.l2_cache.insert(old, t);
                self.barrier()?;
            }
            old
        };
        if let Some(e) = self.l1.get_mut(l1i) {
            *e = target | COPIED;
        }
        let l1 = core::mem::take(&mut self.l1);
        let r = self.write_words(self.hdr.l1_table_offset, &l1, l1i, l1i, Structure::L1Table);
        self.l1 = l1;
        r?;
        self.barrier()?;
        if shared {
            self.free_range(old, self.cs())?;
            self.barrier()?;
        }
        Ok(target)
    }

    /// Sets COPIED on exactly the entries of L2 table `t` whose host
    /// cluster has refcount 1 (compressed entries never carry it).
    pub(crate) fn recompute_copied(&mut self, t: &mut [u64]) -> Result<bool, Error<D::Error>> {
        let w = self.l2_words();
        let cb = self.cb();
        let mut changed = false;
        for i in (0..t.len()).step_by(w) {
            let e = t[i];
            let host = e & OFFSET_MASK;
            if e & entry::COMPRESSED != 0 || host == 0 {
                continue;
            }
            let want = if self.refcount(host >> cb)? == 1 {
                e | COPIED
            } else {
                e & !COPIED
            };
            if want != e {
                t[i] = want;
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Writes the L2 entry for `g` (the table must exist). Not flushed.
    fn set_entry(&mut self, g: u64, e: u64, bm: u64) -> Result<(), Error<D::Error>> {
        let l2off = self.ensure_l2(g)?;
        let (_, l2i) = self.split(g);
        let w = self.l2_words();
        let i = l2i.saturating_mul(w);
        let t = self.l2_table(l2off)?;
        if let Some(x) = t.get_mut(i) {
            *x = e;
        }
        if w == 2 {
            if let Some(x) = t.get_mut(i.saturating_add(1)) {
                *x = bm;
            }
        }
        let t = self.l2_cache.remove(&l2off).unwrap_or_default();
        let r = self.write_words(
            l2off,
            &t,
            i,
            i.saturating_add(w).saturating_sub(1),
            Structure::L2Table,
        );
        self.l2_cache.insert(l2off, t);
        r
    }

    // ---- guest content --------------------------------------------------

    fn read_backing(&mut self, g: u64, buf: &mut [u8]) -> Result<(), Error<D::Error>> {
        buf.fill(0);
        let Some(b) = self.backing.as_mut() else {
            return Ok(());
        };
        if g >= self.backing_size {
            return Ok(());
        }
        let n = usize::try_from(self.backing_size.saturating_sub(g))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        b.read_at(g, &mut buf[..n])
            .map_err(|e| e.into_layer(Structure::Backing, g))
    }

    fn read_compressed(
        &mut self,
        d: &CompressedDescriptor,
        out: &mut [u8],
    ) -> Result<(), Error<D::Error>> {
        let mut input = vec![0u8; usize::try_from(d.len()).unwrap_or(0)];
        self.read_dev(d.host, &mut input, Structure::CompressedCluster)?;
        crate::decompress::decompress(self.hdr.compression_type, &input, out)
            .map_err(|_| Error::corrupt(Structure::CompressedCluster, d.host, Problem::Decompress))
    }

    /// The whole guest cluster holding `g` as it reads now.
    fn read_cluster(&mut self, g: u64) -> Result<Vec<u8>, Error<D::Error>> {
        let cs = self.cs();
        let base = g & !(cs.wrapping_sub(1));
        let mut out = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        let (_, e, bm) = self.get_entry(base)?;
        let ext = self.extended();
        let present = self.has_host(e);
        let dec = self.decode(e);
        match dec {
            L2Entry::Compressed(d) => self.read_compressed(&d, &mut out)?,
            L2Entry::Zero { .. } => {}
            L2Entry::Unallocated if !ext => self.read_backing(base, &mut out)?,
            L2Entry::Normal { host } if !ext => {
                self.read_data(host, base, &mut out)?;
            }
            L2Entry::Unallocated | L2Entry::Normal { .. } => {
                let host = e & OFFSET_MASK;
                let sc = usize::try_from(cs >> 5).unwrap_or(0);
                for (i, chunk) in out.chunks_mut(sc).enumerate() {
                    let i32_ = u32::try_from(i).unwrap_or(0);
                    let off = (i as u64).saturating_mul(cs >> 5);
                    match entry::subcluster(bm, i32_, present) {
                        entry::Subcluster::Allocated => self.read_data(
                            host.saturating_add(off),
                            base.saturating_add(off),
                            chunk,
                        )?,
                        entry::Subcluster::Zero => {}
                        entry::Subcluster::Unallocated => {
                            self.read_backing(base.saturating_add(off), chunk)?;
                        }
                        entry::Subcluster::Invalid => {
                            return Err(Error::corrupt(
                                Structure::L2Table,
                                0,
                                Problem::InvalidSubcluster { bitmap: bm },
                            ))
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Reads guest bytes (any offset and length inside the disk).
    pub fn read(&mut self, g: u64, buf: &mut [u8]) -> Result<(), Error<D::Error>> {
        self.check_range(g, buf.len() as u64)?;
        if !key_fits(self.hdr.crypt_method, self.key.as_ref()) {
            return Err(Error::Unsupported(Unsupported::Writing));
        }
        let cs = self.cs();
        let mut done = 0usize;
        while done < buf.len() {
            let at = g.saturating_add(done as u64);
            let o = usize::try_from(at & cs.wrapping_sub(1)).unwrap_or(0);
            let n = usize::try_from(cs)
                .unwrap_or(0)
                .saturating_sub(o)
                .min(buf.len().saturating_sub(done));
            let c = self.read_cluster(at)?;
            buf[done..done.saturating_add(n)].copy_from_slice(&c[o..o.saturating_add(n)]);
            done = done.saturating_add(n);
        }
        Ok(())
    }

    /// Guest writes need the key of an encrypted image and the data file
    /// of an image that has one.
    fn check_writable(&self, g: u64, len: u64) -> Result<(), Error<D::Error>> {
        if !key_fits(self.hdr.crypt_method, self.key.as_ref()) {
            return Err(Error::Unsupported(Unsupported::Writing));
        }
        if self.df() && self.data.is_none() {
            return Err(Error::DataFileMissing);
        }
        self.check_range(g, len)
    }

    fn check_range(&self, g: u64, len: u64) -> Result<(), Error<D::Error>> {
        match g.checked_add(len) {
            Some(end) if end <= self.hdr.size => Ok(()),
            _ => Err(Error::BadRequest {
                offset: g,
                len,
                size: self.hdr.size,
            }),
        }
    }

    // ---- writes ---------------------------------------------------------

    /// Writes `data` at guest offset `g` (any offset and length inside the
    /// disk).
    ///
    /// Runs of whole clusters that are unallocated under existing L2 tables
    /// are written as contiguous host runs (one data write, and one
    /// encryption, per run), with the same clusters allocated as cluster by
    /// cluster.
    pub fn write(&mut self, g: u64, data: &[u8]) -> Result<(), Error<D::Error>> {
        self.check_writable(g, data.len() as u64)?;
        let cs = self.cs();
        let csu = usize::try_from(cs).unwrap_or(usize::MAX);
        let mut done = 0usize;
        while done < data.len() {
            let at = g.saturating_add(done as u64);
            let o = at & cs.wrapping_sub(1);
            let n = usize::try_from(cs.saturating_sub(o))
                .unwrap_or(usize::MAX)
                .min(data.len().saturating_sub(done));
            if o == 0 && n == csu {
                let whole = data
                    .len()
                    .saturating_sub(done)
                    .checked_div(csu)
                    .unwrap_or(0);
                let k = self.fresh_run(at, whole)?;
                if k > 1 {
                    let len = k.saturating_mul(csu);
                    self.write_fresh_run(at, &data[done..done.saturating_add(len)])?;
                    done = done.saturating_add(len);
                    continue;
                }
            }
            self.write_in_cluster(at, &data[done..done.saturating_add(n)])?;
            done = done.saturating_add(n);
        }
        Ok(())
    }

    /// How many of the (at most `max`) whole clusters from `g` on are
    /// unallocated (no host cluster, no flags) under an L2 table this
    /// image owns alone, so writing them changes no other metadata than
    /// their own entries and refcounts.
    fn fresh_run(&mut self, g: u64, max: usize) -> Result<usize, Error<D::Error>> {
        if self.df() {
            return Ok(0);
        }
        let cs = self.cs();
        let mut k = 0usize;
        while k < max {
            let at = g.saturating_add((k as u64).saturating_mul(cs));
            let (l1i, _) = self.split(at);
            let owned = self.l1.get(l1i).is_some_and(|e| e & COPIED != 0);
            if !owned {
                break;
            }
            match self.get_entry(at)? {
                (Some(_), 0, 0) => k = k.saturating_add(1),
                _ => break,
            }
        }
        Ok(k)
    }

    /// Writes whole clusters that [`Self::fresh_run`] found unallocated:
    /// their clusters allocated one by one (as single-cluster writes would,
    /// refcounts durable first), then the data in contiguous host runs,
    /// then the L2 entries.
    fn write_fresh_run(&mut self, g: u64, data: &[u8]) -> Result<(), Error<D::Error>> {
        let cs = self.cs();
        let csu = usize::try_from(cs).unwrap_or(usize::MAX);
        let k = data.len().checked_div(csu).unwrap_or(0);
        let mut targets = Vec::with_capacity(k);
        for _ in 0..k {
            targets.push(self.alloc_clusters(1)?);
        }
        // Data before the L2 entries that point at it.
        let mut i = 0usize;
        while i < k {
            let mut j = i.saturating_add(1);
            while j < k && targets[j] == targets[j.saturating_sub(1)].saturating_add(cs) {
                j = j.saturating_add(1);
            }
            let (a, b) = (i.saturating_mul(csu), j.saturating_mul(csu));
            let gi = g.saturating_add(a as u64);
            self.write_data(targets[i], gi, &data[a..b])?;
            i = j;
        }
        self.barrier()?;
        let bm_new = if self.extended() { ALL_ALLOCATED } else { 0 };
        for (i, t) in targets.iter().enumerate() {
            let gi = g.saturating_add((i as u64).saturating_mul(cs));
            self.set_entry(gi, t | COPIED, bm_new)?;
        }
        self.barrier()
    }

    /// Writes inside one cluster.
    fn write_in_cluster(&mut self, g: u64, data: &[u8]) -> Result<(), Error<D::Error>> {
        let cs = self.cs();
        let base = g & !(cs.wrapping_sub(1));
        let o = g.saturating_sub(base);
        let (_, e, bm) = self.get_entry(base)?;
        let ext = self.extended();
        let dec = self.decode(e);
        let host = e & OFFSET_MASK;
        let present = self.has_host(e);
        // In place: a normal cluster we own alone, fully readable from host.
        if let L2Entry::Normal { host } = dec {
            let full = !ext || bm & ALL_ALLOCATED == ALL_ALLOCATED;
            if full && e & COPIED != 0 {
                return self.write_sectors(host, base, o, data);
            }
        }
        // Otherwise: the whole cluster as it reads now, merged with `data`.
        let mut cluster = if data.len() as u64 == cs {
            data.to_vec()
        } else {
            self.read_cluster(base)?
        };
        let ou = usize::try_from(o).unwrap_or(0);
        cluster[ou..ou.saturating_add(data.len())].copy_from_slice(data);
        let reuse = match dec {
            // Preallocated zero cluster or partly allocated extended
            // cluster that we own alone: fill it in place.
            L2Entry::Zero { host } if present && e & COPIED != 0 => Some(host),
            L2Entry::Normal { host } if e & COPIED != 0 => Some(host),
            L2Entry::Unallocated if ext && present && e & COPIED != 0 => Some(host),
            _ => None,
        };
        let target = match reuse {
            Some(h) => h,
            // External data file: host offset = guest offset, and the data
            // file's clusters are not refcounted.
            None if self.df() => base,
            None => self.alloc_clusters(1)?,
        };
        // Data before the L2 entry that points at it.
        self.write_data(target, base, &cluster)?;
        self.barrier()?;
        let bm_new = if ext { ALL_ALLOCATED } else { 0 };
        self.set_entry(base, target | COPIED, bm_new)?;
        self.barrier()?;
        // The old references go only after the new entry is durable.
        if reuse.is_none() {
            self.release(dec, e)?;
            self.barrier()?;
        }
        Ok(())
    }

    /// Drops the references an old L2 entry held (after it was replaced).
    fn release(&mut self, dec: L2Entry, raw: u64) -> Result<(), Error<D::Error>> {
        if self.df() {
            // Data-file clusters hold no refcounts.
            return Ok(());
        }
        match dec {
            L2Entry::Compressed(d) => {
                let (off, len) = Self::compressed_range(&d);
                self.free_range(off, len)
            }
            L2Entry::Normal { host } | L2Entry::Zero { host } if host != 0 => {
                self.free_range(host, self.cs())
            }
            _ if self.extended() && raw & OFFSET_MASK != 0 => {
                self.free_range(raw & OFFSET_MASK, self.cs())
            }
            _ => Ok(()),
        }
    }

    /// Reads guest data from host offset `host` (guest offset `g`),
    /// decrypting it on encrypted images.
    fn read_data(&mut self, host: u64, g: u64, buf: &mut [u8]) -> Result<(), Error<D::Error>> {
        if self.df() {
            self.read_datafile(host, buf)?;
        } else {
            self.read_dev(host, buf, Structure::DataCluster)?;
        }
        if let Some(k) = self.key.as_mut() {
            if !crate::image::Decryptor::decrypt(k, host, g, buf) {
                return Err(Error::Decrypt { host_offset: host });
            }
        }
        Ok(())
    }

    /// Writes guest data (whole sectors on encrypted images) at host
    /// offset `host` (guest offset `g`), encrypting it on encrypted images.
    fn write_data(&mut self, host: u64, g: u64, data: &[u8]) -> Result<(), Error<D::Error>> {
        let enc;
        let data = match self.key.as_ref() {
            None => data,
            Some(k) => {
                let mut buf = data.to_vec();
                let ok = match self.crypt.as_ref() {
                    Some(c) => c.encrypt(k, host, g, &mut buf),
                    None => k.encrypt(host, g, &mut buf),
                };
                if !ok {
                    return Err(Error::Decrypt { host_offset: host });
                }
                enc = buf;
                &enc
            }
        };
        if self.df() {
            self.write_datafile(host, data)
        } else {
            self.write_dev(host, data, Structure::DataCluster)
        }
    }

    /// Reads the external data file (zeroes past its end).
    fn read_datafile(&mut self, off: u64, buf: &mut [u8]) -> Result<(), Error<D::Error>> {
        let avail = self.data_len.saturating_sub(off);
        let n = usize::try_from(avail).unwrap_or(usize::MAX).min(buf.len());
        let (head, tail) = buf.split_at_mut(n);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        self.data
            .as_mut()
            .ok_or(Error::DataFileMissing)?
            .read_at(off, head)
            .map_err(|e| e.into_layer(Structure::DataFile, off))
    }

    /// Writes the external data file.
    fn write_datafile(&mut self, off: u64, buf: &[u8]) -> Result<(), Error<D::Error>> {
        self.data
            .as_mut()
            .ok_or(Error::DataFileMissing)?
            .write_at(off, buf)
            .map_err(|e| e.into_layer(Structure::DataFile, off))?;
        self.data_len = self.data_len.max(off.saturating_add(buf.len() as u64));
        Ok(())
    }

    /// Writes `data` at `host + o` (guest cluster `base`),
    /// read-modify-writing partial sectors.
    fn write_sectors(
        &mut self,
        host: u64,
        base: u64,
        o: u64,
        data: &[u8],
    ) -> Result<(), Error<D::Error>> {
        let s = o & !(SECTOR - 1);
        let end = o.saturating_add(data.len() as u64);
        let e = end.div_ceil(SECTOR).saturating_mul(SECTOR);
        if s == o && e == end {
            return self.write_data(host.saturating_add(o), base.saturating_add(o), data);
        }
        let mut buf = vec![0u8; usize::try_from(e.saturating_sub(s)).unwrap_or(0)];
        self.read_data(host.saturating_add(s), base.saturating_add(s), &mut buf)?;
        let i = usize::try_from(o.saturating_sub(s)).unwrap_or(0);
        buf[i..i.saturating_add(data.len())].copy_from_slice(data);
        self.write_data(host.saturating_add(s), base.saturating_add(s), &buf)
    }

    /// Makes `[g, g + len)` read as zero: whole clusters through the zero
    /// flag (v3; the host cluster stays allocated, as QEMU does without
    /// unmap), whole subclusters of extended L2 clusters through their zero
    /// bits, and the rest (parts of subclusters, v2) by writing zeroes.
    pub fn write_zeroes(&mut self, g: u64, len: u64) -> Result<(), Error<D::Error>> {
        self.check_writable(g, len)?;
        let cs = self.cs();
        let mut at = g;
        let end = g.saturating_add(len);
        while at < end {
            let base = at & !(cs.wrapping_sub(1));
            let n = base.saturating_add(cs).min(end).saturating_sub(at);
            if n == cs && self.hdr.version >= 3 {
                self.zero_cluster(base)?;
            } else if self.extended() {
                self.zero_subclusters(at, n)?;
            } else {
                self.write_zero_bytes(at, n)?;
            }
            at = at.saturating_add(n);
        }
        Ok(())
    }

    /// Writes `n` zero bytes at guest offset `g` (inside one cluster).
    fn write_zero_bytes(&mut self, g: u64, n: u64) -> Result<(), Error<D::Error>> {
        let z = vec![0u8; usize::try_from(n).unwrap_or(0)];
        self.write(g, &z)
    }

    /// Zeroes `[g, g + n)` inside one extended-L2 cluster: the subclusters
    /// it covers whole get their zero bit (and lose their allocated bit);
    /// the parts of subclusters at either end are written with zeroes.
    fn zero_subclusters(&mut self, g: u64, n: u64) -> Result<(), Error<D::Error>> {
        let cs = self.cs();
        let sc = cs >> 5;
        let base = g & !(cs.wrapping_sub(1));
        let o = g.saturating_sub(base);
        let end = o.saturating_add(n);
        let first = o.div_ceil(sc);
        let last = end.checked_div(sc).unwrap_or(0);
        let (_, e, _) = self.get_entry(base)?;
        if first >= last || matches!(self.decode(e), L2Entry::Compressed(_)) {
            return self.write_zero_bytes(g, n);
        }
        let head_end = first.saturating_mul(sc);
        let tail_start = last.saturating_mul(sc);
        if head_end > o {
            self.write_zero_bytes(g, head_end.saturating_sub(o))?;
        }
        if end > tail_start {
            self.write_zero_bytes(
                base.saturating_add(tail_start),
                end.saturating_sub(tail_start),
            )?;
        }
        // The partial writes above may have allocated the cluster.
        let (_, e, bm) = self.get_entry(base)?;
        if self.df_raw() && self.has_host(e) {
            // The raw data file must read as the disk does.
            let host = (e & OFFSET_MASK).saturating_add(head_end);
            let z = vec![0u8; usize::try_from(tail_start.saturating_sub(head_end)).unwrap_or(0)];
            self.write_datafile(host, &z)?;
            self.barrier()?;
        }
        let bits = last.saturating_sub(first);
        let mask = (1u64 << bits).wrapping_sub(1) << first;
        let nbm = (bm & !mask) | (mask << 32);
        if nbm != bm {
            self.set_entry(base, e, nbm)?;
            self.barrier()?;
        }
        Ok(())
    }

    fn zero_cluster(&mut self, base: u64) -> Result<(), Error<D::Error>> {
        let (_, e, _) = self.get_entry(base)?;
        let ext = self.extended();
        let dec = self.decode(e);
        let mut host = e & OFFSET_MASK;
        let mut owned =
            e & COPIED != 0 && self.has_host(e) && !matches!(dec, L2Entry::Compressed(_));
        if self.df_raw() {
            // The raw data file keeps its 1:1 mapping and must read as the
            // disk does: zero the bytes, then flag the cluster.
            let n = self.hdr.size.saturating_sub(base).min(self.cs());
            let z = vec![0u8; usize::try_from(n).unwrap_or(0)];
            self.write_datafile(base, &z)?;
            self.barrier()?;
            owned = true;
            host = base;
        }
        if ext {
            let keep = if owned { host | COPIED } else { 0 };
            self.set_entry(base, keep, ALL_ZERO)?;
        } else if owned {
            self.set_entry(base, host | COPIED | ZERO, 0)?;
        } else {
            self.set_entry(base, ZERO, 0)?;
        }
        self.barrier()?;
        if !owned {
            self.release(dec, e)?;
            self.barrier()?;
        }
        Ok(())
    }

    /// Discards whole clusters in `[g, g + len)` (partial clusters are left
    /// alone): their host clusters are freed; on v3 they then read as zero
    /// (zero flag), on v2 they fall through to the backing file or zero.
    /// With a raw external data file the mapping stays and the clusters
    /// are zeroed instead.
    pub fn discard(&mut self, g: u64, len: u64) -> Result<(), Error<D::Error>> {
        self.check_writable(g, len)?;
        let cs = self.cs();
        let (mut at, end) = self.whole_clusters(g, len);
        while at < end {
            if self.df_raw() {
                self.zero_cluster(at)?;
            } else if let (Some(_), e, bm) = self.get_entry(at)? {
                let (ne, nbm) = match (self.hdr.version >= 3, self.extended()) {
                    (true, true) => (0, ALL_ZERO),
                    (true, false) => (ZERO, 0),
                    (false, _) => (0, 0),
                };
                if ne != e || nbm != bm {
                    self.switch_entry(at, (ne, nbm), self.decode(e), e)?;
                }
            }
            at = at.saturating_add(cs);
        }
        Ok(())
    }

    /// Takes whole clusters in `[g, g + len)` out of this image, so that
    /// they read from the backing file again (partial clusters are left
    /// alone). This is `qemu-img commit` emptying the committed image.
    ///
    /// Batched per L2 table: the table's cleared entries are written and
    /// flushed once, then the old host clusters' refcounts dropped and
    /// flushed once (rule 3 holds for the batch: no refcount falls while
    /// an entry on disk still names the cluster), then the host clusters
    /// left unreferenced are discarded on the device (holes punched on
    /// files). An L2 table shared with a snapshot is unshared by the
    /// first change, cluster by cluster as before.
    pub fn unmap(&mut self, g: u64, len: u64) -> Result<(), Error<D::Error>> {
        self.check_range(g, len)?;
        let cs = self.cs();
        let (mut at, end) = self.whole_clusters(g, len);
        // Guest bytes one L2 table maps.
        let span = self.l2g().l1_span();
        while at < end {
            let (l1i, _) = self.split(at);
            let owned = self.l1.get(l1i).is_some_and(|e| e & COPIED != 0);
            let stop = (at.saturating_add(span) & !(span.wrapping_sub(1))).min(end);
            if owned && !self.df() {
                self.unmap_in_table(at, stop)?;
                at = stop;
                continue;
            }
            let (l2, e, bm) = self.get_entry(at)?;
            if l2.is_some() && (e != 0 || bm != 0) {
                let dec = L2Entry::decode(e, self.cb(), self.extended(), false);
                self.switch_entry(at, (0, 0), dec, e)?;
            }
            at = at.saturating_add(cs);
        }
        Ok(())
    }

    /// [`unmap`](Self::unmap) of the whole clusters `[at, stop)`, all under
    /// one L2 table this image owns alone.
    fn unmap_in_table(&mut self, at: u64, stop: u64) -> Result<(), Error<D::Error>> {
        let cs = self.cs();
        let (l2, _, _) = self.get_entry(at)?;
        let Some(l2off) = l2 else {
            return Ok(());
        };
        let w = self.l2_words();
        let (_, i0) = self.split(at);
        let n = usize::try_from(stop.saturating_sub(at) >> self.cb()).unwrap_or(0);
        let (cb, ext) = (self.cb(), self.extended());
        let t = self.l2_table(l2off)?;
        let mut old = Vec::new();
        let (mut first, mut last) = (usize::MAX, 0usize);
        for k in 0..n {
            let i = i0.saturating_add(k).saturating_mul(w);
            let e = t.get(i).copied().unwrap_or(0);
            let bm = if w == 2 {
                t.get(i.saturating_add(1)).copied().unwrap_or(0)
            } else {
                0
            };
            if e == 0 && bm == 0 {
                continue;
            }
            if let Some(x) = t.get_mut(i) {
                *x = 0;
            }
            if w == 2 {
                if let Some(x) = t.get_mut(i.saturating_add(1)) {
                    *x = 0;
                }
            }
            first = first.min(i);
            last = last.max(i.saturating_add(w).saturating_sub(1));
            old.push((L2Entry::decode(e, cb, ext, false), e));
        }
        if old.is_empty() {
            return Ok(());
        }
        let t = self.l2_cache.remove(&l2off).unwrap_or_default();
        let r = self.write_words(l2off, &t, first, last, Structure::L2Table);
        self.l2_cache.insert(l2off, t);
        r?;
        // The cleared entries durable before any refcount drops.
        self.barrier()?;
        // Plain clusters lose their references in one batch (a refcount
        // write per block, not per cluster); the rest one by one.
        let mut plain = Vec::with_capacity(old.len());
        for &(dec, e) in &old {
            match dec {
                L2Entry::Normal { host } | L2Entry::Zero { host } if host != 0 => {
                    plain.push(host >> cb);
                }
                _ => self.release(dec, e)?,
            }
        }
        self.free_clusters(&mut plain)?;
        let mut freed: Vec<(u64, u64)> = Vec::new();
        for &(dec, e) in &old {
            let host = match dec {
                L2Entry::Normal { host } | L2Entry::Zero { host } => host,
                L2Entry::Unallocated => e & OFFSET_MASK,
                L2Entry::Compressed(_) => 0,
            };
            if host != 0 && self.refcount(host >> cb)? == 0 {
                match freed.last_mut() {
                    Some((s, l)) if s.saturating_add(*l) == host => *l = l.saturating_add(cs),
                    _ => freed.push((host, cs)),
                }
            }
        }
        self.barrier()?;
        // Unreferenced now (and durably so): give the space back.
        for (off, len) in freed {
            self.dev
                .discard(off, len)
                .map_err(|e| e.into_layer(Structure::DataCluster, off))?;
        }
        Ok(())
    }

    /// Drops the L2 tables this image owns alone (COPIED in L1) whose
    /// every entry is zero, as `qemu-img commit` leaves an emptied image
    /// without them: the L1 entries cleared (flushed), then the tables'
    /// references dropped (flushed) and their clusters punched. Tables a
    /// snapshot shares, and images with an external data file, are left
    /// as they are.
    pub fn drop_empty_tables(&mut self) -> Result<(), Error<D::Error>> {
        if self.df() {
            return Ok(());
        }
        let (mut first, mut last) = (usize::MAX, 0usize);
        let mut tables = Vec::new();
        for l1i in 0..self.l1.len() {
            let e = self.l1.get(l1i).copied().unwrap_or(0);
            let off = entry::l1_l2_offset(e);
            if off == 0 || e & COPIED == 0 || self.l2_table(off)?.iter().any(|&x| x != 0) {
                continue;
            }
            if let Some(x) = self.l1.get_mut(l1i) {
                *x = 0;
            }
            (first, last) = (first.min(l1i), last.max(l1i));
            tables.push(off);
        }
        if tables.is_empty() {
            return Ok(());
        }
        let l1 = core::mem::take(&mut self.l1);
        let r = self.write_words(
            self.hdr.l1_table_offset,
            &l1,
            first,
            last,
            Structure::L1Table,
        );
        self.l1 = l1;
        r?;
        // No L1 entry names the tables (durably) before they are freed.
        self.barrier()?;
        let cb = self.cb();
        let mut clusters: Vec<u64> = tables.iter().map(|&off| off >> cb).collect();
        for off in &tables {
            self.l2_cache.remove(off);
        }
        self.free_clusters(&mut clusters)?;
        self.barrier()?;
        for off in tables {
            if self.refcount(off >> cb)? == 0 {
                self.dev
                    .discard(off, self.cs())
                    .map_err(|e| e.into_layer(Structure::L2Table, off))?;
            }
        }
        Ok(())
    }

    /// Shrinks the file to the end of the last cluster in use (refcount
    /// not 0), as `qemu-img commit` leaves an emptied image. Every
    /// refcount is durable at this point, so nothing referenced is cut.
    pub fn truncate_unused(&mut self) -> Result<(), Error<D::Error>> {
        self.barrier()?;
        let end = self.highest_used()?.saturating_add(1) << self.cb();
        if end < self.file_len {
            let done = self
                .dev
                .set_size(end)
                .map_err(|e| e.into_layer(Structure::DataCluster, end))?;
            if done {
                self.file_len = end;
            }
        }
        Ok(())
    }

    /// The whole clusters inside `[g, g + len)`: the guest offsets of the
    /// first one and of the end of the last one (equal when there are none).
    fn whole_clusters(&self, g: u64, len: u64) -> (u64, u64) {
        let cs = self.cs();
        let start = g.div_ceil(cs).saturating_mul(cs);
        let end = g.saturating_add(len) & !(cs.wrapping_sub(1));
        (start, end)
    }

    /// Points the L2 entry of guest cluster `at` at `(entry, bitmap)`,
    /// flushed, and only then drops the references of the old entry `e`
    /// (decoded as `dec`), flushed.
    fn switch_entry(
        &mut self,
        at: u64,
        (entry, bitmap): (u64, u64),
        dec: L2Entry,
        e: u64,
    ) -> Result<(), Error<D::Error>> {
        self.set_entry(at, entry, bitmap)?;
        self.barrier()?;
        self.release(dec, e)?;
        self.barrier()
    }

    /// Checks that `data` is exactly guest cluster `cluster_index`, a
    /// cluster inside the image (the last one may run past a size that is
    /// not cluster aligned), and returns the cluster's guest offset.
    fn whole_cluster(&self, cluster_index: u64, data: &[u8]) -> Result<u64, Error<D::Error>> {
        let cs = self.cs();
        let g = cluster_index
            .checked_shl(self.cb())
            .filter(|g| g.saturating_add(cs) <= self.hdr.size.div_ceil(cs).saturating_mul(cs))
            .ok_or(Error::BadRequest {
                offset: cluster_index,
                len: data.len() as u64,
                size: self.hdr.size,
            })?;
        if data.len() as u64 != cs {
            return Err(Error::BadRequest {
                offset: g,
                len: data.len() as u64,
                size: self.hdr.size,
            });
        }
        Ok(g)
    }

    /// Writes one whole guest cluster compressed (raw deflate for zlib
    /// images, a zstd frame for zstd images). When compression does not
    /// save space, the cluster is written uncompressed, as qemu-img does.
    /// `data` must be exactly one cluster.
    ///
    /// Consecutive compressed clusters are packed byte by byte into the
    /// same host clusters, as QEMU does: each host cluster's refcount
    /// counts every compressed cluster that touches it.
    pub fn write_compressed(
        &mut self,
        cluster_index: u64,
        data: &[u8],
    ) -> Result<(), Error<D::Error>> {
        self.whole_cluster(cluster_index, data)?;
        let packed = crate::compress::compress(self.hdr.compression_type, data);
        self.write_precompressed(cluster_index, data, packed.as_deref())
    }

    /// Stores one whole guest cluster whose compressed form the caller made
    /// already (with [`crate::compress::compress`] for this image's
    /// `compression_type`, e.g. on other threads): `packed` is stored as
    /// [`Self::write_compressed`] would store it; when it is `None` or does
    /// not save space, `data` (exactly one cluster) is written
    /// uncompressed. The one storing path of compressed clusters.
    pub fn write_precompressed(
        &mut self,
        cluster_index: u64,
        data: &[u8],
        packed: Option<&[u8]>,
    ) -> Result<(), Error<D::Error>> {
        let cs = self.cs();
        let g = self.whole_cluster(cluster_index, data)?;
        // Compressed clusters are never encrypted (QEMU refuses both).
        if self.hdr.has_data_file() || self.hdr.crypt_method != 0 {
            return Err(Error::Unsupported(Unsupported::Writing));
        }
        let Some(packed) = packed.filter(|p| (p.len() as u64) < cs) else {
            let n = usize::try_from(self.hdr.size.saturating_sub(g).min(cs)).unwrap_or(0);
            return self.write(g, &data[..n]);
        };
        // The L2 table first, so it does not land between packed clusters.
        self.ensure_l2(g)?;
        let (_, e, _) = self.get_entry(g)?;
        let dec = self.decode(e);
        let len = packed.len() as u64;
        // Refcounts first (durable on return), then the data, then the L2
        // entry, then the old references go.
        let host = self.alloc_compressed(len)?;
        let end = host.saturating_add(len);
        // Up to the end of the last sector, so readers of whole sectors
        // stay inside the file (the next packed cluster overwrites it).
        let mut buf = packed.to_vec();
        buf.resize(
            usize::try_from(end.next_multiple_of(SECTOR).saturating_sub(host)).unwrap_or(0),
            0,
        );
        self.write_dev(host, &buf, Structure::CompressedCluster)?;
        self.barrier()?;
        let d = CompressedDescriptor {
            host,
            sectors: (host & (SECTOR - 1))
                .saturating_add(len)
                .div_ceil(SECTOR)
                .max(1),
        };
        self.set_entry(g, d.encode(self.cb()), 0)?;
        self.barrier()?;
        self.ctail = if end & cs.wrapping_sub(1) == 0 {
            0
        } else {
            end
        };
        self.release(dec, e)?;
        self.barrier()
    }

    /// Host bytes for `len` compressed bytes: right after the previous
    /// compressed cluster when the clusters it spills into are free (its
    /// last host cluster gains a reference), else at fresh clusters.
    fn alloc_compressed(&mut self, len: u64) -> Result<u64, Error<D::Error>> {
        let cs = self.cs();
        let cb = self.cb();
        let t = self.ctail;
        if t != 0 {
            let c = t >> cb;
            let room = cs.saturating_sub(t & cs.wrapping_sub(1));
            let extra = len.saturating_sub(room).div_ceil(cs);
            let rc = self.refcount(c)?;
            let max = match self.hdr.refcount_order {
                6 => u64::MAX,
                o => (1u64 << (1u32 << o)).wrapping_sub(1),
            };
            if rc != 0 && rc < max && self.alloc_exact(c.saturating_add(1), extra)? {
                self.set_refcount_existing(c, rc.saturating_add(1))?;
                self.barrier()?;
                return Ok(t);
            }
        }
        self.alloc_clusters(len.div_ceil(cs).max(1))
    }

    /// Allocates clusters `c..c + n` with refcount 1 if all are free;
    /// `false` (nothing allocated) otherwise.
    fn alloc_exact(&mut self, c: u64, n: u64) -> Result<bool, Error<D::Error>> {
        for i in 0..n {
            let ci = c.saturating_add(i);
            if !self.has_block(ci) {
                self.ensure_block(ci)?;
            }
        }
        for i in 0..n {
            if self.refcount(c.saturating_add(i))? != 0 {
                return Ok(false);
            }
        }
        for i in 0..n {
            self.set_refcount_existing(c.saturating_add(i), 1)?;
        }
        Ok(true)
    }

    /// Changes the virtual size. Growing enlarges the L1 table when needed
    /// (new table written, header switched, old table freed). Shrinking is
    /// refused while any cluster past the new end is allocated.
    ///
    /// With an external data file (which must be attached) the data file
    /// is resized to the new size first, as QEMU does; with
    /// `data_file_raw` the new clusters are then mapped 1:1.
    pub fn resize(&mut self, new_size: u64) -> Result<(), ResizeError<D::Error>> {
        let cs = self.cs();
        if !new_size.is_multiple_of(512) {
            return Err(ResizeError::Unaligned(new_size));
        }
        if self.df() && self.data.is_none() {
            return Err(ResizeError::Qcow2(Error::DataFileMissing));
        }
        if new_size < self.hdr.size {
            let mut at = new_size.div_ceil(cs).saturating_mul(cs);
            while at < self.hdr.size {
                let (_, e, bm) = self.get_entry(at)?;
                // Zero-flag clusters hold nothing; host clusters, compressed
                // data and allocated subclusters do.
                if e & (OFFSET_MASK | entry::COMPRESSED) != 0 || bm & ALL_ALLOCATED != 0 {
                    return Err(ResizeError::ShrinkAllocated { offset: at });
                }
                at = at.saturating_add(cs);
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
            let off = self.alloc_clusters(clusters)?;
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

    /// Allocates every cluster of the disk (`preallocation=metadata`), and
    /// with `full` writes zeroes into them (`preallocation=full`).
    pub(crate) fn preallocate(&mut self, full: bool) -> Result<(), Error<D::Error>> {
        self.map_clusters(0)?;
        let cs = self.cs();
        // The file covers every cluster (sparse unless `full`).
        let end = self.highest_used()?.saturating_add(1) << self.cb();
        if full {
            let z = vec![0u8; usize::try_from(cs).unwrap_or(0)];
            let mut at = 0u64;
            while at < self.hdr.size {
                let (_, e, _) = self.get_entry(at)?;
                let h = e & OFFSET_MASK;
                self.write_dev(h, &z, Structure::DataCluster)?;
                at = at.saturating_add(cs);
            }
        } else if end > self.file_len {
            let ok = self
                .dev
                .set_size(end)
                .map_err(|e| e.into_layer(Structure::DataCluster, end))?;
            if ok {
                self.file_len = end;
            } else {
                let z = vec![0u8; SECTOR_BYTES];
                self.write_dev(end.saturating_sub(SECTOR), &z, Structure::DataCluster)?;
            }
        }
        self.flush_dev()
    }

    /// Gives every cluster from guest offset `from` to the end of the disk
    /// a host cluster (1:1 in an external data file, which QEMU does for
    /// `data_file_raw`; else fresh clusters).
    fn map_clusters(&mut self, from: u64) -> Result<(), Error<D::Error>> {
        let cs = self.cs();
        let mut at = from & !(cs.wrapping_sub(1));
        while at < self.hdr.size {
            let (_, e, _) = self.get_entry(at)?;
            if !self.has_host(e) {
                let h = if self.df() {
                    at
                } else {
                    self.alloc_clusters(1)?
                };
                let bm = if self.extended() { ALL_ALLOCATED } else { 0 };
                self.set_entry(at, h | COPIED, bm)?;
            }
            at = at.saturating_add(cs);
        }
        self.barrier()
    }

    fn highest_used(&mut self) -> Result<u64, Error<D::Error>> {
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

    /// Flushes the device.
    pub fn flush(&mut self) -> Result<(), Error<D::Error>> {
        self.flush_dev()
    }

    /// Builds a writer over a freshly created image (used by `create`).
    pub(crate) fn from_parts(
        dev: D,
        hdr: HeaderRepr,
        l1: Vec<u64>,
        reftable: Vec<u64>,
        file_len: u64,
    ) -> Qcow2Writer<D> {
        Qcow2Writer {
            dev,
            backing: None,
            backing_size: 0,
            hdr,
            l1,
            reftable,
            l2_cache: BTreeMap::new(),
            rb_cache: BTreeMap::new(),
            free_hint: 0,
            file_len,
            barriers: true,
            key: None,
            crypt: None,
            crypto_region: None,
            data: None,
            data_len: 0,
            ctail: 0,
        }
    }

    /// Replaces the cached header with the one `create` wrote to cluster 0
    /// (with its backing file name, extensions and header length).
    pub(crate) fn set_header(&mut self, hdr: HeaderRepr) {
        self.hdr = hdr;
    }

    /// Records the LUKS header region (for `create`).
    pub(crate) fn set_crypto_region(&mut self, off: u64, len: u64) {
        self.crypto_region = Some((off, len));
    }

    /// Sets the header's L1 fields after `create` allocated the table.
    pub(crate) fn set_l1(&mut self, off: u64, l1: Vec<u64>) {
        self.hdr.l1_table_offset = off;
        self.hdr.l1_size = u32::try_from(l1.len()).unwrap_or(u32::MAX);
        self.l1 = l1;
    }

    /// Allocates `n` clusters (for `create`).
    pub(crate) fn alloc(&mut self, n: u64) -> Result<u64, Error<D::Error>> {
        self.alloc_clusters(n)
    }

    /// Writes raw bytes (for `create`).
    pub(crate) fn raw_write(&mut self, off: u64, b: &[u8]) -> Result<(), Error<D::Error>> {
        self.write_dev(off, b, Structure::Header)
    }
}

/// Why `resize` failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum ResizeError<E> {
    /// The image failed.
    Qcow2(Error<E>),
    /// The new size is not a multiple of 512.
    Unaligned(u64),
    /// Shrinking would drop the allocated cluster at this guest offset.
    ShrinkAllocated {
        /// Guest offset of the first allocated cluster past the new end.
        offset: u64,
    },
}

impl<E> From<Error<E>> for ResizeError<E> {
    fn from(e: Error<E>) -> Self {
        Self::Qcow2(e)
    }
}

impl<E: core::fmt::Display> core::fmt::Display for ResizeError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Qcow2(e) => e.fmt(f),
            Self::Unaligned(s) => write!(f, "new size {s} is not a multiple of 512"),
            Self::ShrinkAllocated { offset } => write!(
                f,
                "cannot shrink: the cluster at guest offset {offset:#x} past the new end is allocated (discard it first)"
            ),
        }
    }
}

impl<E: core::fmt::Debug + core::fmt::Display> core::error::Error for ResizeError<E> {}

impl<D: BlockIo, B: BlockIo> BlockIo for Qcow2Writer<D, B>
where
    B::Error: LayerError<D::Error>,
{
    type Error = Error<D::Error>;
    fn sector_size(&self) -> u32 {
        512
    }
    fn size(&mut self) -> Result<u64, Self::Error> {
        Ok(self.hdr.size)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        self.read(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Self::Error> {
        self.write(offset, buf)
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        self.flush_dev()
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        Qcow2Writer::write_zeroes(self, offset, len)
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        Qcow2Writer::discard(self, offset, len)
    }
}

mod backing;
pub mod snapshots;

#[cfg(test)]
mod tests;
