//! qcow2 images in the CLI: opening with a backing chain and external data
//! file, block status in qemu-img's terms, and `info` fields.

use qcow_core::image::{CompressedSpan, MapKind};
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
    /// The stored streams of one request's compressed clusters
    /// ([`Self::read_decoding_in_parallel`]), kept between requests.
    input: Vec<u8>,
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
            input: Vec::new(),
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
        if !self.encrypted && buf.len() as u64 >= 2 * cs {
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
    /// Reads `buf` at guest `offset` like [`Qcow2::read`], except for the
    /// whole compressed clusters of this image in the range: their stored
    /// bytes are read here, neighbouring clusters' in one read (qemu-img
    /// packs them back to back), then decoded into their places in `buf`
    /// at once, on `workers` threads, with
    /// [`qcow_core::decompress::Decoder`] (zune-inflate, then zlib-rs).
    /// Everything else (data, zeroes, backing, partial clusters) is read as
    /// usual. A cluster that fails to decode is read again the usual way,
    /// so the error is the reader's own.
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
        // (place in `buf`, where its stored bytes lie) of each whole
        // compressed cluster.
        let mut spans: Vec<(usize, CompressedSpan)> = Vec::new();
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
                    let span = self.img.compressed_span(d, cs_usize + 512);
                    spans.push((at, span.map_err(|e| self.err(e))?));
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
        if spans.is_empty() {
            return Ok(());
        }
        // The host runs to read: each span joins the run before it when it
        // starts inside it or at most READ_GAP bytes past its end.
        let (runs, placed) = host_runs(spans.iter().map(|(_, s)| s));
        let mut bases = Vec::with_capacity(runs.len());
        let mut total = 0usize;
        for r in &runs {
            bases.push(total);
            total += r.len;
        }
        let mut input = std::mem::take(&mut self.input);
        input.resize(total, 0);
        for (r, &base) in runs.iter().zip(&bases) {
            if let Err(e) = self.img.read_host(r.at, &mut input[base..base + r.len]) {
                self.input = input;
                return Err(self.err(e));
            }
        }
        let jobs: Vec<(usize, std::ops::Range<usize>)> = spans
            .iter()
            .zip(placed)
            .map(|((at, s), (run, within))| {
                let from = bases[run] + within;
                (*at, from + s.skip..from + s.len)
            })
            .collect();
        let failed = decode_all(ctype, cs_usize, buf, &input, &jobs, workers);
        self.input = input;
        for at in failed {
            let r = self
                .img
                .read(offset + at as u64, &mut buf[at..at + cs_usize]);
            r.map_err(|e| self.err(e))?;
        }
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

/// Bytes between two compressed clusters' stored streams that are read
/// (and thrown away) to read both in one call rather than two.
const READ_GAP: u64 = 4096;

/// One read of the stored bytes of several compressed clusters.
#[derive(Debug, PartialEq, Eq)]
struct HostRun {
    at: u64,
    len: usize,
}

impl HostRun {
    fn end(&self) -> u64 {
        self.at + self.len as u64
    }
}

/// The end of a span's bytes in the file.
trait SpanEnd {
    fn end(&self) -> u64;
}

impl SpanEnd for CompressedSpan {
    fn end(&self) -> u64 {
        self.at + self.len as u64
    }
}

/// Groups `spans`, in order, into host reads: a span joins the read before
/// it when it starts inside it or at most [`READ_GAP`] bytes past its end
/// (and not before its start). Returns the reads and, for each span, its
/// read and where in that read it starts.
fn host_runs<'a>(
    spans: impl Iterator<Item = &'a CompressedSpan>,
) -> (Vec<HostRun>, Vec<(usize, usize)>) {
    let mut runs: Vec<HostRun> = Vec::new();
    let mut placed = Vec::new();
    for s in spans {
        match runs.last_mut() {
            Some(r) if s.at >= r.at && s.at <= r.end().saturating_add(READ_GAP) => {
                let end = r.end().max(s.end());
                r.len = usize::try_from(end - r.at).unwrap_or(usize::MAX);
                let within = usize::try_from(s.at - r.at).unwrap_or(usize::MAX);
                placed.push((runs.len() - 1, within));
            }
            _ => {
                runs.push(HostRun {
                    at: s.at,
                    len: s.len,
                });
                placed.push((runs.len() - 1, 0));
            }
        }
    }
    (runs, placed)
}

/// Clusters per decoding task: a task is about 0.1 ms of work, so the
/// threads share a request's clusters as they free up (a thread held up by
/// the machine's other load does not keep the other waiting) at a cost of
/// microseconds.
const DECODE_TASK: usize = 2;

/// Decodes each `(at, stream)` of `jobs` (in increasing `at`, a cluster of
/// `cs` bytes apart at least; `stream` a range of `input`) into
/// `buf[at..at + cs]`, on up to `workers` threads taking [`DECODE_TASK`]
/// clusters at a time. Returns the places whose stream failed to decode.
fn decode_all(
    ctype: u8,
    cs: usize,
    buf: &mut [u8],
    input: &[u8],
    jobs: &[(usize, std::ops::Range<usize>)],
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
    // A decoder allocates nothing until a stream needs zlib-rs.
    let run = |js: &[(usize, std::ops::Range<usize>)], os: &mut [&mut [u8]]| {
        let mut dec = qcow_core::decompress::Decoder::new();
        let mut failed = Vec::new();
        for (job, out) in js.iter().zip(os.iter_mut()) {
            let stream = input.get(job.1.clone()).unwrap_or_default();
            // A decoder crate's panic on a hostile stream is a failed
            // cluster, read again (and refused) by the reader's own decoder.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                dec.decompress(ctype, stream, out)
            }));
            match r {
                Ok(Ok(())) => {}
                Ok(Err(_)) => failed.push(job.0),
                Err(_) => {
                    dec = qcow_core::decompress::Decoder::new();
                    failed.push(job.0);
                }
            }
        }
        failed
    };
    if jobs.len() <= DECODE_TASK || workers < 2 {
        return run(jobs, &mut outs);
    }
    let tasks: Vec<_> = jobs
        .chunks(DECODE_TASK)
        .zip(outs.chunks_mut(DECODE_TASK))
        .map(|(js, os)| move || run(js, os))
        .collect();
    crate::parallel::run_all(tasks)
        .into_iter()
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(at: u64, len: usize) -> CompressedSpan {
        CompressedSpan { at, len, skip: 0 }
    }

    #[test]
    fn decode_all_fills_each_place_and_names_the_failures() {
        let cs = 4096usize;
        let zlib = qcow_core::header::COMPRESSION_ZLIB;
        let clusters: Vec<Vec<u8>> = (0..7u8)
            .map(|k| {
                (0..cs)
                    .map(|i| b"qcow2 cluster text "[(i * usize::from(k + 1)) % 19])
                    .collect()
            })
            .collect();
        // Streams back to back in one input; the fourth is garbage.
        let mut input = Vec::new();
        let mut jobs = Vec::new();
        for (k, c) in clusters.iter().enumerate() {
            let stream = if k == 3 {
                vec![0xff; 64]
            } else {
                qcow_core::compress::compress(zlib, c).unwrap()
            };
            // Every other cluster place is left alone (a plain cluster).
            jobs.push((2 * k * cs, input.len()..input.len() + stream.len()));
            input.extend_from_slice(&stream);
        }
        for workers in [1, 2, 3] {
            let mut buf = vec![0x5a; 14 * cs];
            let failed = decode_all(zlib, cs, &mut buf, &input, &jobs, workers);
            assert_eq!(failed, [6 * cs], "{workers} workers");
            for (k, c) in clusters.iter().enumerate() {
                if k != 3 {
                    assert!(buf[2 * k * cs..(2 * k + 1) * cs] == c[..], "cluster {k}");
                }
                assert!(buf[(2 * k + 1) * cs..(2 * k + 2) * cs]
                    .iter()
                    .all(|&b| b == 0x5a));
            }
        }
    }

    #[test]
    fn neighbouring_spans_share_one_read() {
        // Back to back and overlapping in a sector (qemu-img's packing),
        // then a gap within READ_GAP, then one too far, then one behind.
        let spans = [
            span(0x10000, 0x4200),
            span(0x14000, 0x3000),
            span(0x17000 + READ_GAP, 0x200),
            span(0x40000, 0x1000),
            span(0x20000, 0x1000),
        ];
        let (runs, placed) = host_runs(spans.iter());
        let gap = usize::try_from(READ_GAP).unwrap();
        assert_eq!(
            placed,
            [(0, 0), (0, 0x4000), (0, 0x7000 + gap), (1, 0), (2, 0)]
        );
        assert_eq!(
            runs,
            [
                HostRun {
                    at: 0x10000,
                    len: 0x7200 + gap
                },
                HostRun {
                    at: 0x40000,
                    len: 0x1000
                },
                HostRun {
                    at: 0x20000,
                    len: 0x1000
                },
            ]
        );
        // Every span lies inside its run.
        for (s, (r, within)) in spans.iter().zip(placed) {
            assert_eq!(runs[r].at + within as u64, s.at);
            assert!(s.end() <= runs[r].end());
        }
    }
}
