//! The qcow2 writer (needs `alloc`): guest writes, zero writes, discards,
//! compressed cluster writes and growth, with refcounts kept exact.
//!
//! Metadata caches are write-through: every change to an L2 table, a
//! refcount block, the refcount table or the L1 table reaches the device
//! within the operation that makes it (a large write gathers its refcount
//! changes into one write per block, and its L2 entries into one write per
//! table), and the device is flushed between dependent steps, so the image
//! on disk is consistent after every device write (a crash may leak
//! clusters, never corrupt). See "qcow2 write ordering" in ARCHITECTURE.md.
//! The exceptions are opt-in: deferred entries
//! ([`Qcow2Writer::defer_fresh_entries`]) and writing without barriers
//! ([`Qcow2Writer::set_write_barriers`]) keep the metadata of runs of
//! fresh clusters in memory until the next flush, and write it in the
//! same order then (refcounts, then entries).
//!
//! The device must accept byte-granular requests (files, `VecDevice`):
//! table entries are written as whole 512-byte sectors, guest data at its
//! own offset and length.

extern crate alloc;

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;

use crate::crypto::{ImageKey, SectorCrypt};
use crate::entry::{self, CompressedDescriptor, L2Entry, COPIED, OFFSET_MASK, ZERO};
use crate::error::{Error, LayerError, Limit, Problem, Structure, Unsupported};
use crate::header::{autoclear, field, incompat, CryptMethod, HeaderRepr};
use crate::image::NoDevice;
use crate::limits::MAX_L1_ENTRIES;
use crate::table::{L2Geometry, RefcountGeometry};
use crate::units::{ClusterIndex, GuestOffset, HostOffset};
use luks_core::io::BlockIo;

/// Whether an image with `crypt_method` can be written with `key`: no key
/// for plain images, a LUKS key for LUKS images.
fn key_fits(crypt_method: CryptMethod, key: Option<&ImageKey>) -> bool {
    matches!(
        (crypt_method, key),
        (CryptMethod::None, None) | (CryptMethod::Luks, Some(ImageKey::Luks(_)))
    )
}

/// Sector granularity for metadata writes and compressed descriptors.
const SECTOR: u64 = 512;
/// [`SECTOR`] as a `usize`.
const SECTOR_BYTES: usize = 512;
/// L2 tables kept in memory before the cache is dropped (write-through, so
/// dropping is free).
const MAX_CACHED_TABLES: usize = 512;
/// Bytes of L2 tables and refcount blocks holding changes kept back for
/// [`Qcow2Writer::settle`] before it runs early: 128 tables of 64 KiB, each
/// covering 512 MiB of guest, so a sequential copy settles every 64 GiB.
const MAX_KEPT_BACK: usize = 8 << 20;
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
    /// Refcount blocks changed in `rb_cache` but not yet written: block
    /// offset -> (first, last) changed byte. Kept in the cache until
    /// [`write_pending_refcounts`](Self::write_pending_refcounts) writes them.
    rb_pending: BTreeMap<u64, (usize, usize)>,
    /// Keep the L2 entries of runs of fresh clusters in the cache until
    /// the next flush (see [`defer_fresh_entries`](Self::defer_fresh_entries)).
    defer: bool,
    /// L2 tables holding deferred entries: table offset -> (first, last)
    /// changed word. Kept in the cache until [`settle`](Self::settle).
    l2_pending: BTreeMap<u64, (usize, usize)>,
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
        // The header and its extensions as the reader parses them (room for
        // a long `header_length`, as the checker leaves).
        let mut first = vec![0u8; 64 * 1024];
        let hdr = crate::image::read_header_info(&mut dev, &mut [0u8; 512], &mut first)?.header;
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
            rb_pending: BTreeMap::new(),
            defer: false,
            l2_pending: BTreeMap::new(),
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
            rb_pending: self.rb_pending,
            defer: self.defer,
            l2_pending: self.l2_pending,
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
    /// may then leave the image corrupt. Off also keeps the refcounts and
    /// L2 entries of runs of fresh clusters in memory until the next
    /// flush (bounded, see [`defer_fresh_entries`](Self::defer_fresh_entries)),
    /// as qemu-img's metadata caches do: a copy into a new image then
    /// writes its data and, at the end, each changed table once.
    /// [`flush`](Self::flush) and [`close`](Self::close) always flush.
    pub fn set_write_barriers(&mut self, on: bool) {
        self.barriers = on;
    }

    /// Defers the L2 entries of large writes to the next flush (off by
    /// default). A write of whole fresh clusters then writes their
    /// refcounts and data without a flush and keeps their L2 entries in
    /// memory; [`flush`](Self::flush), [`close`](Self::close), any other
    /// operation (zero writes, discards, a write needing a single cluster,
    /// ...) and turning this off first flush the device (refcounts and
    /// data durable), then write the entries (one write per table), so no
    /// entry ever reaches the device before its cluster's refcount and
    /// data. As with any write-back cache, writes not yet flushed are lost
    /// in a crash (their clusters leak); the writer must be flushed or
    /// closed before it is dropped ([`into_device`](Self::into_device)
    /// drops them, as a crash would). For a caller that writes a long run
    /// and flushes once at the end (`commit`, `rebase`): a run then costs
    /// no flush at all. Without write barriers the entries are always
    /// kept back, and their clusters' refcounts with them (written first
    /// when they settle); no flush then comes between the two.
    pub fn defer_fresh_entries(&mut self, on: bool) -> Result<(), Error<D::Error>> {
        if !on {
            self.settle()?;
        }
        self.defer = on;
        Ok(())
    }

    /// Whether the L2 entries of runs of fresh clusters are kept in memory
    /// until [`settle`](Self::settle): with deferred entries, and always
    /// without write barriers (their refcounts then wait too).
    pub(super) fn keep_back(&self) -> bool {
        self.defer || !self.barriers
    }

    /// Settles early once the tables and blocks kept back would hold more
    /// than [`MAX_KEPT_BACK`] bytes, so memory stays bounded whatever the
    /// image size (a long sequential copy settles every few GiB).
    pub(super) fn bound_kept_back(&mut self) -> Result<(), Error<D::Error>> {
        let held = self
            .l2_pending
            .len()
            .saturating_add(self.rb_pending.len())
            .saturating_mul(usize::try_from(self.cs()).unwrap_or(usize::MAX));
        if held > MAX_KEPT_BACK {
            self.settle()?;
        }
        Ok(())
    }

    /// Writes the refcounts and L2 entries kept back (see
    /// [`keep_back`](Self::keep_back)): the refcounts first, then, after a
    /// flush that makes the refcounts and data of their clusters durable
    /// (skipped without barriers), the entries (not flushed).
    pub(super) fn settle(&mut self) -> Result<(), Error<D::Error>> {
        if self.l2_pending.is_empty() && self.rb_pending.is_empty() {
            return Ok(());
        }
        self.write_pending_refcounts()?;
        if self.l2_pending.is_empty() {
            return Ok(());
        }
        self.barrier()?;
        let pending = core::mem::take(&mut self.l2_pending);
        for (off, (first, last)) in pending {
            let t = self.l2_cache.remove(&off).unwrap_or_default();
            let r = self.write_words(off, &t, first, last, Structure::L2Table);
            self.l2_cache.insert(off, t);
            r?;
        }
        Ok(())
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
        self.settle()?;
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

    /// Writes the sector(s) of the active L1 table holding entries
    /// `first..=last` (not flushed).
    fn write_l1(&mut self, first: usize, last: usize) -> Result<(), Error<D::Error>> {
        let l1 = core::mem::take(&mut self.l1);
        let r = self.write_words(
            self.hdr.l1_table_offset,
            &l1,
            first,
            last,
            Structure::L1Table,
        );
        self.l1 = l1;
        r
    }

    /// Flushes the device.
    pub fn flush(&mut self) -> Result<(), Error<D::Error>> {
        self.settle()?;
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
            rb_pending: BTreeMap::new(),
            defer: false,
            l2_pending: BTreeMap::new(),
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
    pub(crate) fn alloc(&mut self, n: u64) -> Result<HostOffset, Error<D::Error>> {
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
    /// A v2 image with internal snapshots cannot change size: its
    /// snapshot table has no field for each snapshot's disk size.
    V2Snapshots,
    /// Shrinking an image with an external data file would drop the
    /// allocated cluster at this guest offset (amend refuses it).
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
            Self::V2Snapshots => f.write_str("Can't resize a v2 image which has snapshots"),
            Self::ShrinkAllocated { offset } => write!(
                f,
                "cannot shrink: the cluster at guest offset {offset:#x} past the new end is \
                 allocated in the external data file"
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
    fn write_at_consuming(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        self.write_consuming(offset, buf)
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Qcow2Writer::flush(self)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        Qcow2Writer::write_zeroes(self, offset, len)
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        Qcow2Writer::discard(self, offset, len)
    }
}

/// The host runs [`Qcow2Writer::stage_fresh`] leaves to its caller, each
/// `(host offset, offset in the caller's buffer, length)`.
pub type StagedRuns = Vec<(u64, usize, usize)>;

pub mod amend;
mod backing;
mod compressed;
mod data;
mod l2;
mod refcounts;
mod resize;
pub mod snapshots;

#[cfg(test)]
mod tests;
