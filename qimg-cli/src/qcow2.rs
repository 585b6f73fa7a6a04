//! qcow2 images in the CLI: opening with a backing chain and external data
//! file, block status in qemu-img's terms, and `info` fields.

use qcow_core::image::MapKind;
use qcow_core::{HostOffset, Qcow2};
use serde_json::{json, Map, Value};

use luks_core::io::BlockIo;

use crate::dev::{AnyDev, BlockStatus, DevError, Source};
use crate::image_info::SnapshotInfo;
use crate::rawfile::RawFile;
use crate::CliError;

/// Metadata cache handed to each image: 64 slices of 4 KiB.
pub(crate) const CACHE_BYTES: usize = 64 * 4096;

/// A reader buffer of `len` zero bytes, owned by the reader and allocated
/// on first use: the compression buffers of a layer that holds no
/// compressed cluster (most layers of a deep backing chain) never are.
/// Large ones are fresh zeroed mappings whose pages cost no memory until
/// touched, so a cache costs only the slices it really uses.
pub(crate) struct LazyBuf {
    len: usize,
    mem: Vec<u8>,
}

impl LazyBuf {
    /// A buffer of `len` bytes, not yet allocated.
    pub(crate) fn new(len: usize) -> Self {
        Self {
            len,
            mem: Vec::new(),
        }
    }
}

impl AsMut<[u8]> for LazyBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        if self.mem.len() != self.len {
            self.mem = vec![0u8; self.len];
        }
        &mut self.mem
    }
}

/// The reader as the CLI holds it before a backing file and data file are
/// attached; the decryptor is there when the image is encrypted and
/// unlocked.
pub(crate) type Reader = Qcow2<
    AnyDev,
    LazyBuf,
    qcow_core::NoDevice<DevError>,
    qcow_core::NoDevice<DevError>,
    crate::parallel::ParallelKey,
>;

/// One layer of a chain: its backing file is never attached here
/// (`image::Chain` walks the layers), so unallocated ranges read as zero.
type Image =
    Qcow2<AnyDev, LazyBuf, qcow_core::NoDevice<DevError>, AnyDev, crate::parallel::ParallelKey>;

/// A qcow2 image opened for reading, as a [`Source`].
pub(crate) struct Qcow2Source {
    path: String,
    img: Image,
    /// The image file (or the external data file, when there is one) for
    /// asking which host ranges are holes: opened on first use, so a layer
    /// of a deep backing chain that `map` never lands on holds one
    /// descriptor less.
    holes: Option<RawFile>,
    /// qemu-img hides host offsets of encrypted images.
    encrypted: bool,
    /// Whether the image looks metadata-preallocated (decided on first
    /// use), in which case qemu-img asks the file which data clusters are
    /// holes and reports them as zero.
    metadata_prealloc: Option<bool>,
    /// Input buffers of [`Self::read_decoding_in_parallel`], kept between
    /// requests (at most one request's worth).
    spare_inputs: Vec<Vec<u8>>,
}

/// What the CLI needs to know to finish opening an image.
pub(crate) struct Opening {
    /// The reader, without backing or data file yet.
    pub(crate) img: Reader,
}

/// Bytes of a version 3 qcow2 header without extensions (a version 2
/// header is 72); every real image is longer.
const V3_HEADER_LEN: u64 = 104;

impl Opening {
    /// Opens the image file read-only.
    pub(crate) fn open(path: &str) -> Result<Self, CliError> {
        Self::open_cached(path, CACHE_BYTES)
    }

    /// Opens the image file read-only with a metadata cache of
    /// `cache_bytes` (at least 4 KiB; layers deep in a backing chain get a
    /// small one).
    pub(crate) fn open_cached(path: &str, cache_bytes: usize) -> Result<Self, CliError> {
        Self::open_in_mode(path, cache_bytes, crate::cache::CacheMode::Writeback)
    }

    /// [`Opening::open_cached`] with the file in cache mode `mode` (`-T`).
    pub(crate) fn open_in_mode(
        path: &str,
        cache_bytes: usize,
        mode: crate::cache::CacheMode,
    ) -> Result<Self, CliError> {
        let file = mode.open(path, false, |e| {
            CliError::io(path, format!("cannot open: {e}"))
        })?;
        crate::lock::lock(file.file(), path, crate::lock::Access::Read)?;
        let dev: AnyDev = crate::dev::erased(file);
        let img = Qcow2::open(dev, LazyBuf::new(cache_bytes)).map_err(|e| {
            // A file cut inside the header reads as zeroes past its end,
            // which the parser reports as a bad field: say what happened.
            match std::fs::metadata(path).map(|m| m.len()) {
                Ok(len) if len < V3_HEADER_LEN => CliError::io(
                    path,
                    format!(
                        "the file ends at byte {len}, inside the qcow2 header: it was \
                         truncated; restore it from a copy"
                    ),
                ),
                _ => CliError::io(path, e.to_string()),
            }
        })?;
        let cs = usize::try_from(img.info().cluster_size()).unwrap_or(usize::MAX);
        let img = img
            .with_compression_buffers(LazyBuf::new(cs.saturating_add(512)), LazyBuf::new(cs))
            .with_decryptor_opt(None);
        Ok(Self { img })
    }
}

impl Qcow2Source {
    /// Finishes opening one layer: attaches the data file; the backing
    /// file is the chain's business (`image::Chain`), not this layer's.
    pub(crate) fn new(
        path: &str,
        opening: Opening,
        data_file: Option<(AnyDev, std::fs::File)>,
    ) -> Result<Self, CliError> {
        let img = opening.img;
        let encrypted = img.info().header.crypt_method.is_encrypted();
        let img = img.ignore_backing();
        let (data_dev, hole_file) = data_file.unzip();
        let img = img.with_data_file_opt(data_dev);
        Ok(Self {
            path: path.to_string(),
            img,
            holes: hole_file.map(RawFile::new),
            encrypted,
            metadata_prealloc: None,
            spare_inputs: Vec::new(),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> DevError {
        DevError(format!("{}: {e}", self.path))
    }

    /// The file asked about holes, opened on first use.
    fn holes(&mut self) -> Result<&mut RawFile, DevError> {
        if self.holes.is_none() {
            let f = std::fs::File::open(&self.path)
                .map_err(|e| DevError(format!("{}: cannot open: {e}", self.path)))?;
            self.holes = Some(RawFile::new(f));
        }
        self.holes
            .as_mut()
            .ok_or_else(|| DevError(format!("{}: cannot open", self.path)))
    }

    /// Whether this image itself (not its backing file) holds the run
    /// starting at `offset` (data, zeroes or compressed), and how long the
    /// run is (at least 1, at most `max`): what a backing chain walk asks
    /// each layer in turn.
    pub(crate) fn own_run(&mut self, offset: u64, max: u64) -> Result<(bool, u64), DevError> {
        let m = self.img.map(offset, max).map_err(|e| self.err(e))?;
        let own = !matches!(
            m.kind,
            MapKind::Unallocated | MapKind::UnallocatedAlloc { .. }
        );
        Ok((own, m.len.clamp(1, max)))
    }

    /// Whether `len` bytes of the host file at `host` read as zero without
    /// being stored (a hole, or past the end of the file), and for how long
    /// that holds.
    fn host_zero(&mut self, host: u64, len: u64) -> Result<(bool, u64), DevError> {
        let holes = self.holes()?;
        let file_len = holes.size()?;
        if host >= file_len {
            return Ok((true, len));
        }
        let st = holes.block_status(host, len.min(file_len - host))?;
        Ok((st.zero, st.len.min(len)))
    }

    /// qemu's test for metadata preallocation: far more clusters carry a
    /// refcount than the filesystem has allocated for the image file. Only
    /// then does qemu-img map consult the file holding the data (the image
    /// file, or the external data file when there is one) for zeroes in
    /// data clusters: a data file's holes are then reported as zero.
    fn is_metadata_prealloc(&mut self) -> Result<bool, DevError> {
        if let Some(v) = self.metadata_prealloc {
            return Ok(v);
        }
        let cs = self.img.info().cluster_size();
        let file_len = crate::file::file_length(&self.path).map_err(|e| DevError(e.to_string()))?;
        let real =
            crate::file::allocated_bytes(&self.path).map_err(|e| DevError(e.to_string()))? / cs;
        let threshold = (real * 10 / 9).max(real + 2);
        let clusters = file_len.div_ceil(cs);
        let mut counted = 0u64;
        let mut v = false;
        for c in 0..clusters {
            if self.img.refcount(c).map_err(|e| self.err(e))? > 0 {
                counted += 1;
                if counted > threshold {
                    v = true;
                    break;
                }
            }
        }
        self.metadata_prealloc = Some(v);
        Ok(v)
    }
}

impl BlockIo for Qcow2Source {
    type Error = DevError;
    fn sector_size(&self) -> u32 {
        512
    }
    fn size(&mut self) -> Result<u64, DevError> {
        Ok(self.img.virtual_size())
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        let workers = crate::parallel::workers();
        let cs = self.img.info().cluster_size();
        // Encrypted images hold no compressed clusters (qemu-img refuses to
        // make them): their reads skip the walk.
        if workers > 1 && !self.encrypted && buf.len() as u64 >= 2 * cs {
            return self.read_decoding_in_parallel(offset, buf, workers);
        }
        let r = self.img.read(offset, buf);
        r.map_err(|e| self.err(e))
    }
    fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> Result<(), DevError> {
        Err(self.err("the image is open read-only"))
    }
    fn flush(&mut self) -> Result<(), DevError> {
        Ok(())
    }
}

impl Qcow2Source {
    /// Reads `buf` at guest `offset` like [`Qcow2::read`], except that the
    /// whole compressed clusters of this image in the range are decoded on
    /// `workers` threads: their stored bytes are read here, in guest order,
    /// then decoded into their places in `buf` at once. Everything else
    /// (data, zeroes, backing, partial clusters) is read as usual. A
    /// cluster that fails to decode is read again the usual way, so the
    /// error is the reader's own.
    fn read_decoding_in_parallel(
        &mut self,
        offset: u64,
        buf: &mut [u8],
        workers: usize,
    ) -> Result<(), DevError> {
        let cs = self.img.info().cluster_size();
        let ctype = self.img.info().header.compression_type;
        let cs_usize = usize::try_from(cs).map_err(|e| self.err(e))?;
        let end = offset.saturating_add(buf.len() as u64);
        // (place in `buf`, stored stream) of each whole compressed cluster.
        let mut jobs: Vec<(usize, Vec<u8>)> = Vec::new();
        // Where the range read the usual way (in one call) starts.
        let mut plain_from = 0usize;
        let mut g = offset;
        while g < end {
            let m = self.img.map(g, end - g).map_err(|e| self.err(e))?;
            let len = m.len.clamp(1, end - g);
            let at = usize::try_from(g - offset).map_err(|e| self.err(e))?;
            match m.kind {
                MapKind::Compressed(d) if g.is_multiple_of(cs) && len == cs => {
                    if plain_from < at {
                        let from = offset + plain_from as u64;
                        let r = self.img.read(from, &mut buf[plain_from..at]);
                        r.map_err(|e| self.err(e))?;
                    }
                    plain_from = at + cs_usize;
                    let mut input = self.spare_inputs.pop().unwrap_or_default();
                    input.resize(cs_usize + 512, 0);
                    let r = self.img.compressed_input(d, &mut input);
                    let stream = r.map_err(|e| self.err(e))?;
                    // Keep just the stream, at the front of the buffer.
                    input.copy_within(stream.clone(), 0);
                    input.truncate(stream.len());
                    jobs.push((at, input));
                }
                _ => {}
            }
            g += len;
        }
        if plain_from < buf.len() {
            let from = offset + plain_from as u64;
            let r = self.img.read(from, &mut buf[plain_from..]);
            r.map_err(|e| self.err(e))?;
        }
        let failed = decode_all(ctype, cs_usize, buf, &jobs, workers);
        for at in failed {
            let r = self
                .img
                .read(offset + at as u64, &mut buf[at..at + cs_usize]);
            r.map_err(|e| self.err(e))?;
        }
        self.spare_inputs.extend(jobs.into_iter().map(|(_, b)| b));
        Ok(())
    }

    /// Status of a range this layer does not allocate: zero here (the
    /// chain asks the layers below). `reserved` is a host range kept for it
    /// (an unallocated subcluster of an allocated cluster).
    fn fall_through(len: u64, reserved: Option<u64>) -> BlockStatus {
        BlockStatus {
            len,
            depth: 0,
            present: false,
            zero: true,
            data: false,
            compressed: false,
            offset: reserved,
        }
    }
}

impl Source for Qcow2Source {
    fn block_status(&mut self, offset: u64, max: u64) -> Result<BlockStatus, DevError> {
        let size = self.img.virtual_size();
        let max = max.min(size.saturating_sub(offset)).max(1);
        let m = self.img.map(offset, max).map_err(|e| self.err(e))?;
        let len = m.len.max(1);
        let mut st = self.status_of(m.kind, len)?;
        // Only this layer's offsets are hidden; a backing file's stay.
        let fell_through = matches!(
            m.kind,
            MapKind::Unallocated | MapKind::UnallocatedAlloc { .. }
        ) && st.depth > 0;
        if self.encrypted && !fell_through {
            st.offset = None;
        }
        Ok(st)
    }
}

impl Qcow2Source {
    /// The qemu-img status of one mapping run.
    fn status_of(&mut self, kind: MapKind, len: u64) -> Result<BlockStatus, DevError> {
        Ok(match kind {
            MapKind::Data { host } => {
                let host = host.get();
                let (zero, zlen) = if self.is_metadata_prealloc()? {
                    self.host_zero(host, len)?
                } else {
                    (false, len)
                };
                BlockStatus {
                    len: zlen.max(1),
                    depth: 0,
                    present: true,
                    zero,
                    data: true,
                    compressed: false,
                    offset: Some(host),
                }
            }
            MapKind::Compressed(_) => BlockStatus {
                len,
                depth: 0,
                present: true,
                zero: false,
                data: true,
                compressed: true,
                offset: None,
            },
            MapKind::Zero { host } => BlockStatus {
                len,
                depth: 0,
                present: true,
                zero: true,
                data: false,
                compressed: false,
                offset: host.map(HostOffset::get),
            },
            MapKind::Unallocated => Self::fall_through(len, None),
            MapKind::UnallocatedAlloc { host } => Self::fall_through(len, Some(host.get())),
        })
    }
}

/// Reads the LUKS header stored inside a LUKS-encrypted image.
pub(crate) fn luks_header(
    path: &str,
    info: &qcow_core::ImageInfo,
) -> Result<Option<luks_core::luks1::HeaderRepr>, CliError> {
    let Some(c) = info
        .crypto
        .filter(|_| info.header.crypt_method == qcow_core::CryptMethod::Luks)
    else {
        return Ok(None);
    };
    let file = luks_core::io::FileDevice::open(std::path::Path::new(path))
        .map_err(|e| CliError::io(path, format!("cannot open: {e}")))?;
    let mut region = luks_core::io::Window::new(file, c.offset, c.length);
    luks_core::luks1::read_header(&mut region)
        .map(Some)
        .map_err(|e| CliError::io(path, format!("LUKS header in the image: {e}")))
}

/// Unlocks an encrypted image and gives back the reader with its
/// decryptor attached; unencrypted images pass through.
pub(crate) fn unlock(
    path: &str,
    opening: Opening,
    keys: &crate::luks_common::KeySource,
    secrets: &crate::secret::Secrets,
) -> Result<Opening, CliError> {
    if !opening.img.info().header.crypt_method.is_encrypted() {
        return Ok(opening);
    }
    let pass = keys.resolve(path, secrets, false)?;
    let mut img = opening.img;
    // Through the opened image's own device: no second open.
    let key = img
        .unlock_key(&pass)
        .map_err(|e| CliError::io(path, e.to_string()))?
        .ok_or_else(|| CliError::io(path, "the image is not encrypted".into()))?;
    // Owned by the reader; large runs are decrypted by the `-m` workers.
    let key = crate::parallel::ParallelKey::new(key, crate::parallel::cipher_workers());
    Ok(Opening {
        img: img.with_decryptor(key),
    })
}

/// The `format-specific` data qemu-img shows for a qcow2 image.
pub(crate) fn format_specific(
    info: &qcow_core::ImageInfo,
    luks: Option<&luks_core::luks1::HeaderRepr>,
) -> Value {
    let mut m = Map::new();
    m.insert("compat".into(), json!(info.compat()));
    m.insert("compression-type".into(), json!(info.compression_type()));
    let v3 = info.header.version >= 3;
    if v3 {
        m.insert("lazy-refcounts".into(), json!(info.lazy_refcounts()));
    }
    m.insert("refcount-bits".into(), json!(info.refcount_bits()));
    match (info.header.crypt_method, luks) {
        (qcow_core::CryptMethod::Luks, Some(hdr)) => {
            let mut e = Map::new();
            if let Value::Object(l) = crate::luks::format_specific(hdr, false) {
                for (k, v) in l {
                    let after_uuid = k == "uuid";
                    e.insert(k, v);
                    if after_uuid {
                        e.insert("format".into(), json!("luks"));
                    }
                }
            }
            m.insert("encrypt".into(), Value::Object(e));
        }
        (qcow_core::CryptMethod::Aes, _) => {
            m.insert("encrypt".into(), json!({"format": "aes"}));
        }
        _ => {}
    }
    if let Some(df) = info.data_file() {
        m.insert("data-file".into(), json!(df));
        m.insert("data-file-raw".into(), json!(info.data_file_raw()));
    }
    if v3 {
        m.insert("corrupt".into(), json!(info.corrupt()));
        m.insert("extended-l2".into(), json!(info.extended_l2()));
    }
    Value::Object(m)
}

/// The snapshot list as `qemu-img info` shows it.
pub(crate) fn snapshots(img: &mut Reader, path: &str) -> Result<Vec<SnapshotInfo>, CliError> {
    let mut out = Vec::new();
    img.for_each_snapshot(|s| {
        out.push(SnapshotInfo {
            // qemu-img shows at most 127 bytes of an id and 255 of a name.
            id: String::from_utf8_lossy(s.shown_id()).into_owned(),
            name: String::from_utf8_lossy(s.shown_name()).into_owned(),
            vm_state_size: s.fixed.vm_state_size,
            date_sec: u64::from(s.fixed.date_sec),
            date_nsec: u64::from(s.fixed.date_nsec),
            vm_clock_nsec: s.fixed.vm_clock_nsec,
            icount: s.fixed.icount,
        });
        false
    })
    .map_err(|e| CliError::io(path, e.to_string()))?;
    Ok(out)
}

/// Decodes each `(at, stream)` of `jobs` (in increasing `at`, a cluster of
/// `cs` bytes apart at least) into `buf[at..at + cs]`, on up to `workers`
/// threads, each a consecutive run of the jobs. Returns the places whose
/// stream failed to decode.
fn decode_all(
    ctype: u8,
    cs: usize,
    buf: &mut [u8],
    jobs: &[(usize, Vec<u8>)],
    workers: usize,
) -> Vec<usize> {
    // The output slices, disjoint, in job order.
    let mut outs: Vec<&mut [u8]> = Vec::with_capacity(jobs.len());
    let mut rest = buf;
    let mut base = 0usize;
    for (at, _) in jobs {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(at - base);
        let (out, tail) = tail.split_at_mut(cs);
        outs.push(out);
        rest = tail;
        base = at + cs;
    }
    let decode = |job: &(usize, Vec<u8>), out: &mut [u8]| {
        qcow_core::decompress::decompress(ctype, &job.1, out)
            .err()
            .map(|_| job.0)
    };
    let per = jobs.len().div_ceil(workers.max(1)).max(1);
    if jobs.len() < 2 || workers < 2 {
        return jobs
            .iter()
            .zip(outs)
            .filter_map(|(j, o)| decode(j, o))
            .collect();
    }
    let tasks: Vec<_> = jobs
        .chunks(per)
        .zip(outs.chunks_mut(per))
        .map(|(js, os)| {
            move || {
                js.iter()
                    .zip(os.iter_mut())
                    .filter_map(|(j, o)| decode(j, o))
                    .collect::<Vec<_>>()
            }
        })
        .collect();
    crate::parallel::run_all(tasks)
        .into_iter()
        .flatten()
        .collect()
}
