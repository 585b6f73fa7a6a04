//! LUKS volumes in the CLI: unlocking raw volumes (with an optional
//! detached header), `info` and `luks dump` fields, and formatting.

use std::sync::Arc;

use luks_core::io::{BlockIo, FileDevice};
use luks_core::luks1::{self, HeaderRepr};
use luks_core::{LuksVolume, PayloadCipher};
use serde_json::{json, Map, Value};

use crate::cache::CacheMode;
use crate::dev::{erased, AnyDev, Flat, Source};
use crate::luks_common::{cpu_clock, open_payload_file, CreateOptions, KeySource, OsRng};
use crate::opts::OptionMap;
use crate::secret::Secrets;
use crate::CliError;

/// Reads and validates the LUKS1 header of `path`.
pub(crate) fn read_header(path: &str) -> Result<HeaderRepr, CliError> {
    crate::file::refuse_dir(path)?;
    let mut dev = crate::file::open_file(path, false)?;
    luks1::read_header(&mut dev).map_err(|e| CliError::io(path, e.to_string()))
}

/// Unlocks a raw LUKS volume (`header` names a detached header) and
/// returns its payload. `writable` opens the data file for writing, in
/// cache mode `cache`.
pub(crate) fn open(
    path: &str,
    header: Option<&str>,
    keys: &KeySource,
    secrets: &Secrets,
    writable: bool,
    cache: CacheMode,
) -> Result<Box<dyn Source>, CliError> {
    let dev = open_payload(path, header, keys, secrets, writable, cache)?;
    Ok(Box::new(Flat::hidden(dev)))
}

/// [`open`]'s payload as a plain device (one that can move to a writer
/// thread).
pub(crate) fn open_payload(
    path: &str,
    header: Option<&str>,
    keys: &KeySource,
    secrets: &Secrets,
    writable: bool,
    cache: CacheMode,
) -> Result<AnyDev, CliError> {
    let hdr_path = header.unwrap_or(path);
    if crate::format::luks_version(hdr_path)? == Some(2) {
        return crate::luks2::open_volume(path, header, keys, secrets, writable, cache).map(erased);
    }
    let (hdr, key) = unlock1(path, header, keys, secrets)?;
    // One volume (own file handle, own cipher) per `-m` worker.
    let mut vols = Vec::new();
    for _ in 0..crate::parallel::cipher_workers() {
        vols.push(open_volume1(path, &hdr, &key, writable, cache)?);
    }
    Ok(if vols.len() == 1 {
        erased(vols.remove(0))
    } else {
        erased(crate::parallel::Striped::new(vols))
    })
}

/// One unlocked volume (LUKS1 or LUKS2) over its own handle to `path`:
/// [`open_payload`] before it is erased, for `convert -n` to split a
/// destination into its file and its cipher ([`sealed`]).
pub(crate) fn open_volume(
    path: &str,
    header: Option<&str>,
    keys: &KeySource,
    secrets: &Secrets,
    writable: bool,
    cache: CacheMode,
) -> Result<LuksVolume<FileDevice>, CliError> {
    if crate::format::luks_version(header.unwrap_or(path))? == Some(2) {
        return crate::luks2::open_volume(path, header, keys, secrets, writable, cache);
    }
    let (hdr, key) = unlock1(path, header, keys, secrets)?;
    open_volume1(path, &hdr, &key, writable, cache)
}

/// Reads the LUKS1 header of `path` (or the detached `header`) and
/// unlocks it.
fn unlock1(
    path: &str,
    header: Option<&str>,
    keys: &KeySource,
    secrets: &Secrets,
) -> Result<(HeaderRepr, luks1::VolumeKey), CliError> {
    let hdr_path = header.unwrap_or(path);
    let mut hdr_dev = crate::file::open_file(hdr_path, false)?;
    let hdr =
        luks1::read_header(&mut hdr_dev).map_err(|e| CliError::io(hdr_path, e.to_string()))?;
    let pass = keys.resolve(path, secrets, false)?;
    let (key, _slot) = luks1::unlock(&mut hdr_dev, &hdr, &pass, None)
        .map_err(|e| CliError::io(hdr_path, format!("{e}")))?;
    Ok((hdr, key))
}

/// The payload of `path` under an unlocked LUKS1 header, over a handle of
/// its own.
fn open_volume1(
    path: &str,
    hdr: &HeaderRepr,
    key: &luks1::VolumeKey,
    writable: bool,
    cache: CacheMode,
) -> Result<LuksVolume<FileDevice>, CliError> {
    let data = open_payload_file(path, writable, cache)?;
    LuksVolume::open_luks1(data, hdr, key).map_err(|e| CliError::io(path, e.to_string()))
}

/// A raw LUKS destination of `convert`, split in two: the ciphertext
/// device the copy's writing thread writes (already encrypted sectors, at
/// payload offsets) and the cipher its reading thread encrypts each chunk
/// with first ([`crate::parallel::ParallelSeal`], on the `-m` cipher
/// workers), so encryption overlaps the writes. The file gets exactly the
/// bytes writing through the volume would give.
pub(crate) fn sealed<D>(vol: LuksVolume<D>) -> (AnyDev, crate::parallel::ParallelSeal)
where
    D: BlockIo + Send + 'static,
    D::Error: std::fmt::Display,
{
    let (dev, payload) = vol.into_parts();
    let payload = Arc::new(payload);
    let seal =
        crate::parallel::ParallelSeal::new(Arc::clone(&payload), crate::parallel::cipher_workers());
    (erased(Ciphertext { dev, payload }), seal)
}

/// The ciphertext of a raw LUKS volume's payload: payload offsets and
/// sizes (whole sectors, checked as the volume checks them), bytes as they
/// lie in the file. Writes take sectors already encrypted (by [`sealed`]'s
/// cipher); reads give them back as stored.
struct Ciphertext<D> {
    dev: D,
    payload: Arc<PayloadCipher>,
}

impl<D: BlockIo> Ciphertext<D> {
    /// The device offset of a request, or the volume's error for it.
    fn at(&self, offset: u64, len: usize) -> Result<u64, luks_core::Error<D::Error>> {
        self.payload
            .device_offset(offset, len)
            .map_err(luks_core::error::PureError::widen)
    }
}

fn payload_io<E>(source: E, offset: u64) -> luks_core::Error<E> {
    luks_core::Error::Io {
        source,
        structure: luks_core::Structure::Payload,
        offset,
    }
}

impl<D: BlockIo> BlockIo for Ciphertext<D> {
    type Error = luks_core::Error<D::Error>;

    fn sector_size(&self) -> u32 {
        self.payload.sector_size()
    }

    fn size(&mut self) -> Result<u64, Self::Error> {
        Ok(self.payload.size())
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        let at = self.at(offset, buf.len())?;
        self.dev.read_at(at, buf).map_err(|e| payload_io(e, at))
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Self::Error> {
        let at = self.at(offset, buf.len())?;
        self.dev.write_at(at, buf).map_err(|e| payload_io(e, at))
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        self.dev.flush().map_err(|source| luks_core::Error::Io {
            source,
            structure: luks_core::Structure::Device,
            offset: 0,
        })
    }
}

/// Splits a LUKS1 cipher mode (`xts-plain64`, `cbc-essiv:sha256`) into
/// qemu's mode, ivgen and ivgen hash.
fn split_mode(mode: &str) -> (&str, &str, Option<&str>) {
    let (m, iv) = mode.split_once('-').unwrap_or((mode, ""));
    match iv.split_once(':') {
        Some((alg, hash)) => (m, alg, Some(hash)),
        None => (m, iv, None),
    }
}

/// qemu's cipher-alg name: algorithm and AES/serpent/twofish key size.
fn cipher_alg(hdr: &HeaderRepr) -> String {
    let (mode, _, _) = split_mode(&hdr.cipher_mode);
    let bits = if mode == "xts" {
        hdr.key_bytes * 4
    } else {
        hdr.key_bytes * 8
    };
    format!("{}-{bits}", hdr.cipher_name)
}

/// The `format-specific` data `qemu-img info` shows for a LUKS volume.
pub(crate) fn format_specific(hdr: &HeaderRepr, detached: bool) -> Value {
    let (mode, ivgen, ivhash) = split_mode(&hdr.cipher_mode);
    let mut m = Map::new();
    m.insert("ivgen-alg".into(), json!(ivgen));
    m.insert("detached-header".into(), json!(detached));
    m.insert("hash-alg".into(), json!(hdr.hash_spec.as_str()));
    m.insert("cipher-alg".into(), json!(cipher_alg(hdr)));
    m.insert("uuid".into(), json!(hdr.uuid.as_str()));
    if let Some(h) = ivhash {
        m.insert("ivgen-hash-alg".into(), json!(h));
    }
    m.insert("cipher-mode".into(), json!(mode));
    let slots: Vec<Value> = hdr
        .key_slots
        .iter()
        .map(|k| {
            let off = u64::from(k.key_material_offset) * 512;
            if k.active {
                json!({"active": true, "iters": k.iterations, "key-offset": off, "stripes": k.stripes})
            } else {
                json!({"active": false, "key-offset": off})
            }
        })
        .collect();
    m.insert("slots".into(), Value::Array(slots));
    m.insert(
        "payload-offset".into(),
        json!(u64::from(hdr.payload_offset) * 512),
    );
    m.insert("master-key-iters".into(), json!(hdr.mk_digest_iter));
    Value::Object(m)
}

/// `qimg info` for a raw LUKS volume (no passphrase needed).
pub(crate) fn info(
    path: &str,
    header: Option<&str>,
) -> Result<crate::image_info::ImageInfo, CliError> {
    if crate::format::luks_version(header.unwrap_or(path))? == Some(2) {
        return crate::luks2::info(path, header);
    }
    let hdr = read_header(header.unwrap_or(path))?;
    let file_len = crate::file::file_length(path)?;
    let payload = u64::from(hdr.payload_offset) * 512;
    if header.is_none() && payload > file_len {
        return Err(CliError::io(
            path,
            format!(
                "LUKS header: the payload offset {payload} lies past the end of the \
                 {file_len}-byte file (truncated copy or damaged header; \
                 `qimg luks dump` shows the header)"
            ),
        ));
    }
    let size = file_len.saturating_sub(payload);
    let mut out =
        crate::image_info::ImageInfo::basic(path, crate::format::Format::Luks, size - size % 512)?;
    out.encrypted = true;
    out.format_specific = Some(("luks".into(), format_specific(&hdr, header.is_some())));
    Ok(out)
}

/// `qimg luks dump`, laid out like `cryptsetup luksDump`.
pub(crate) fn dump(path: &str, json_out: bool) -> Result<u8, CliError> {
    if crate::format::luks_version(path)? == Some(2) {
        return crate::luks2::dump(path, json_out);
    }
    let hdr = read_header(path)?;
    if json_out {
        let mut v = format_specific(&hdr, false);
        if let Value::Object(m) = &mut v {
            m.insert("version".into(), json!(1));
            m.insert("cipher-name".into(), json!(hdr.cipher_name.as_str()));
            m.insert("cipher-mode-spec".into(), json!(hdr.cipher_mode.as_str()));
            m.insert("key-bytes".into(), json!(hdr.key_bytes));
        }
        println!("{}", crate::pretty_json(&v));
        return Ok(0);
    }
    // cryptsetup names the file in its first line; the core's dump does not
    // know it.
    let text = hdr.dump().to_string();
    let text = text.replacen(
        "LUKS header information",
        &format!("LUKS header information for {path}"),
        1,
    );
    print!("{text}");
    Ok(0)
}

/// Formats `dev` (a file or a qcow2 LUKS region) as LUKS1 with qemu-img's
/// layout: the payload right after the key material (or `payload_sectors`).
pub(crate) fn format_volume<D: BlockIo + ?Sized>(
    dev: &mut D,
    o: &CreateOptions,
    passphrase: &[u8],
    payload_sectors: Option<u32>,
    what: &str,
    reader: luks1::Pbkdf2Reader,
    volume_key: Option<&[u8]>,
) -> Result<(HeaderRepr, luks1::VolumeKey), CliError> {
    let hash = luks_core::hash::HashAlg::from_name(&o.hash)
        .map_err(|e| CliError::usage(format!("hash-alg '{}': {e}", o.hash)))?;
    let key_bytes = o.key_bytes();
    let (_, end) = luks1::key_slot_layout(key_bytes)
        .ok_or_else(|| CliError::usage(format!("a {key_bytes}-byte key is too large for LUKS1")))?;
    // cryptsetup: 125 ms whatever iter-time is, counted (as its slot) for
    // a derivation of the key's length. QEMU: an eighth of iter-time,
    // counted for the 20-byte digest.
    let digest_ms = match reader {
        luks1::Pbkdf2Reader::Cryptsetup => luks1::DIGEST_MS,
        luks1::Pbkdf2Reader::Qemu => o.iter_time_ms / 8,
    };
    // One benchmark of the PBKDF2 of whoever will open the volume, as
    // cryptsetup and QEMU run, sized to the longest derivation it is for;
    // then each count is scaled from it.
    let longest = o.iter_time_ms.max(digest_ms);
    let speed = luks1::Pbkdf2Speed::measure_for(hash, reader, longest, cpu_clock());
    let kb = usize::try_from(key_bytes).unwrap_or(usize::MAX);
    let iterations = speed.iterations(kb, o.iter_time_ms);
    let digest_iterations = match reader {
        luks1::Pbkdf2Reader::Cryptsetup => speed.iterations(kb, digest_ms),
        luks1::Pbkdf2Reader::Qemu => {
            speed.iterations(luks_core::luks1::header::field::MK_DIGEST.len(), digest_ms)
        }
    };
    let mode = o.mode_spec();
    let params = luks1::FormatParams {
        cipher_name: &o.cipher,
        cipher_mode: &mode,
        key_bytes,
        hash,
        iterations,
        digest_iterations,
        // qemu sizes each slot's area in whole 4 KiB units and refuses a
        // payload that starts inside the last one: round up to 8 sectors.
        payload_offset: Some(payload_sectors.unwrap_or(end.next_multiple_of(8))),
    };
    luks1::format(dev, &params, volume_key, passphrase, &mut OsRng)
        .map_err(|e| CliError::io(what, e.to_string()))
}

/// `qimg create -f luks`: a new volume with a `size`-byte payload.
pub(crate) fn create(
    path: &str,
    opts: &OptionMap,
    secrets: &Secrets,
    key_file: Option<&str>,
    size: u64,
) -> Result<(), CliError> {
    match opts.get("luks-version").unwrap_or("1") {
        "1" => {}
        "2" => return crate::luks2::create(path, opts, secrets, key_file, size),
        v => return Err(CliError::usage(format!("luks-version '{v}' is not 1 or 2"))),
    }
    let o = CreateOptions::parse(opts, "")?;
    opts.reject_unused("luks")
        .map_err(|e| CliError::usage(e.to_string()))?;
    let keys = KeySource {
        key_file: key_file.map(str::to_string),
        key_secret: o.key_secret.clone(),
    };
    let pass = keys.resolve(path, secrets, true)?;
    let mut dev = crate::lock::create_locked(path)?;
    let (hdr, _key) = format_volume(
        &mut dev,
        &o,
        &pass,
        None,
        path,
        luks1::Pbkdf2Reader::Cryptsetup,
        None,
    )?;
    let total = u64::from(hdr.payload_offset) * 512 + size;
    dev.set_size(total)
        .map_err(|e| CliError::io(path, e.to_string()))?;
    dev.flush().map_err(|e| CliError::io(path, e.to_string()))?;
    Ok(())
}

/// Creates a LUKS volume for `convert -O luks` and opens it for writing
/// (one volume: `convert` splits it with [`sealed`]).
pub(crate) fn create_for_convert(
    path: &str,
    opts: &OptionMap,
    secrets: &Secrets,
    size: u64,
    cache: CacheMode,
) -> Result<
    (
        LuksVolume<FileDevice>,
        Option<crate::header_job::PendingHeader>,
    ),
    CliError,
> {
    if opts.get("detached-header").is_some() {
        return Err(CliError::usage(
            "detached-header is for `qimg create` only: convert writes the payload into the volume"
                .into(),
        ));
    }
    if opts.get("luks-version").unwrap_or("1") != "1" {
        create(path, opts, secrets, None, size)?;
        let o = CreateOptions::parse(opts, "")?;
        let keys = KeySource {
            key_file: None,
            key_secret: o.key_secret,
        };
        return Ok((open_volume(path, None, &keys, secrets, true, cache)?, None));
    }
    // LUKS1: the volume key is drawn first and the payload written with it
    // at once, while the header (the PBKDF2 benchmark, 50-500 ms of CPU by
    // iter-time, then key slot 0 sealing that key) is
    // formatted on a thread of its own, through a second handle, into the
    // area before the payload; the payload is not opened by unlocking the
    // new header again.
    let o = CreateOptions::parse(opts, "")?;
    opts.reject_unused("luks")
        .map_err(|e| CliError::usage(e.to_string()))?;
    let keys = KeySource {
        key_file: None,
        key_secret: o.key_secret.clone(),
    };
    let pass = keys.resolve(path, secrets, true)?;
    let io = |m: String| CliError::io(path, m);
    let key_bytes = o.key_bytes();
    let (_, end) = luks1::key_slot_layout(key_bytes)
        .ok_or_else(|| CliError::usage(format!("a {key_bytes}-byte key is too large for LUKS1")))?;
    // Where format_volume puts the payload when not told.
    let payload_sectors = end.next_multiple_of(8);
    let payload = u64::from(payload_sectors) * 512;
    let mut vk = zeroize::Zeroizing::new(vec![0u8; usize::try_from(key_bytes).unwrap_or(0)]);
    getrandom::fill(&mut vk).map_err(|e| io(format!("no random volume key: {e}")))?;
    let mode = o.mode_spec();
    let cipher = || {
        luks_core::cipher::SectorCipher::new(&o.cipher, &mode, &vk, 512)
            .map_err(|e| CliError::usage(format!("cipher {}-{mode}: {e}", o.cipher)))
    };
    // Refuse a cipher the header could not name before creating the file.
    cipher()?;
    let mut dev = crate::lock::create_locked(path)?;
    dev.set_size(payload + size)
        .map_err(|e| io(e.to_string()))?;
    // The header's handle takes no lock: the payload's handles below hold
    // them (as the created file's handle did until here).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io(crate::os_text(&e)))?;
    drop(dev);
    let (hpath, ho, hmode, hvk) = (path.to_string(), o.clone(), mode.clone(), vk.clone());
    let pending =
        crate::header_job::PendingHeader::spawn(path, move || -> Result<(), CliError> {
            let mut dev = luks_core::io::FileDevice::new(file);
            let (hdr, _) = format_volume(
                &mut dev,
                &ho,
                &pass,
                None,
                &hpath,
                luks1::Pbkdf2Reader::Cryptsetup,
                Some(&hvk),
            )?;
            // The payload was written where, and with the cipher, the options
            // say; the header must say the same.
            if hdr.payload_offset != payload_sectors
                || hdr.cipher_name.as_str() != ho.cipher
                || hdr.cipher_mode.as_str() != hmode
            {
                return Err(CliError::io(
                    &hpath,
                    format!(
                        "the LUKS header names {}-{} at sector {}, the payload was written with \
                     {}-{hmode} at sector {payload_sectors}",
                        hdr.cipher_name, hdr.cipher_mode, hdr.payload_offset, ho.cipher
                    ),
                ));
            }
            dev.flush().map_err(|e| CliError::io(&hpath, e.to_string()))
        })?;
    let data = open_payload_file(path, true, cache)?;
    let vol = LuksVolume::new(data, cipher()?, payload, 0).map_err(|e| io(e.to_string()))?;
    Ok((vol, Some(pending)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::{copy, copy_sealed, CopyOptions, CHUNK};
    use crate::dev::{BlockStatus, DevError, Flat};
    use luks_core::cipher::SectorCipher;
    use luks_core::io::VecDevice;

    /// A source of `data` that reports `holes` (start, len) as reading
    /// as zero, so the copy does not read them.
    struct Holey(Flat<AnyDev>, Vec<(u64, u64)>);

    impl BlockIo for Holey {
        type Error = DevError;
        fn sector_size(&self) -> u32 {
            512
        }
        fn size(&mut self) -> Result<u64, DevError> {
            self.0.size()
        }
        fn read_at(&mut self, o: u64, b: &mut [u8]) -> Result<(), DevError> {
            let end = o + b.len() as u64;
            if self.1.iter().any(|&(s, l)| o < s + l && s < end) {
                return Err(DevError(format!("read of a hole at {o}")));
            }
            self.0.read_at(o, b)
        }
        fn write_at(&mut self, _: u64, _: &[u8]) -> Result<(), DevError> {
            Err(DevError("read-only".into()))
        }
        fn flush(&mut self) -> Result<(), DevError> {
            Ok(())
        }
    }

    impl Source for Holey {
        fn block_status(&mut self, o: u64, m: u64) -> Result<BlockStatus, DevError> {
            let mut st = self.0.block_status(o, m)?;
            for &(s, l) in &self.1 {
                if o >= s && o < s + l {
                    st.len = (s + l - o).min(m);
                    st.data = false;
                    st.zero = true;
                    return Ok(st);
                }
                if o < s {
                    st.len = st.len.min(s - o);
                }
            }
            Ok(st)
        }
    }

    /// A volume over `noise` bytes with its payload at 4096, sector size
    /// `ss`.
    fn volume(noise: &[u8], ss: u32) -> LuksVolume<VecDevice> {
        let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37)).collect();
        let c = SectorCipher::new("aes", "xts-plain64", &key, ss).unwrap();
        LuksVolume::new(VecDevice::from_vec(noise.to_vec()), c, 4096, 0).unwrap()
    }

    /// The sealed copy (encrypting on the reading side, writing
    /// ciphertext) leaves the file byte for byte as writing the plaintext
    /// through the volume does: zero ranges encrypted without a read,
    /// data with its zero runs, whatever the pipelining and workers.
    #[test]
    fn sealed_copy_writes_what_the_volume_writes() {
        let len = 5 * CHUNK + 3 * 4096;
        let mut data = vec![0u8; len];
        for (i, b) in data.iter_mut().enumerate() {
            if (i / 4096) % 3 != 0 {
                *b = u8::try_from(i % 253).unwrap() | 1;
            }
        }
        // A hole of 2 chunks and a bit, and one small one.
        let holes = vec![
            (CHUNK as u64, 2 * CHUNK as u64 + 8192),
            (4 * CHUNK as u64, 4096),
        ];
        for &(s, l) in &holes {
            let (s, e) = (usize::try_from(s).unwrap(), usize::try_from(s + l).unwrap());
            data[s..e].fill(0);
        }
        let noise = vec![0xa5u8; 4096 + len];
        for ss in [512u32, 4096] {
            let mut want = volume(&noise, ss);
            want.write_at(0, &data).unwrap();
            let want = want.into_inner().into_vec();
            for pipelined in [false, true] {
                for workers in [1usize, 2, 3] {
                    let (dev, payload) = volume(&noise, ss).into_parts();
                    let payload = Arc::new(payload);
                    let seal = crate::parallel::ParallelSeal::new(Arc::clone(&payload), workers);
                    let mut dst: AnyDev = erased(Ciphertext { dev, payload });
                    let mut src = Holey(
                        Flat::at_offsets(erased(VecDevice::from_vec(data.clone()))),
                        holes.clone(),
                    );
                    let opts = CopyOptions {
                        target_is_zero: false,
                        pipelined,
                        ..CopyOptions::default()
                    };
                    let written =
                        copy_sealed(&mut src, &mut dst, &seal, len as u64, opts, &mut |_| {})
                            .unwrap();
                    assert_eq!(written, len as u64, "every byte is written");
                    let mut got = vec![0u8; noise.len()];
                    let mut whole = dst;
                    // Read the ciphertext back through the device (payload
                    // offsets) and compare with the volume's file.
                    whole.read_at(0, &mut got[4096..]).unwrap();
                    assert!(
                        got[4096..] == want[4096..],
                        "ss {ss} pipelined {pipelined} workers {workers}"
                    );
                }
            }
            // The plain copy into the volume agrees with both.
            let mut vol: AnyDev = erased(volume(&noise, ss));
            let mut src = Flat::at_offsets(erased(VecDevice::from_vec(data.clone())));
            let opts = CopyOptions {
                target_is_zero: false,
                ..CopyOptions::default()
            };
            copy(&mut src, &mut vol, len as u64, opts, &mut |_| {}).unwrap();
            let mut plain = vec![0u8; len];
            vol.read_at(0, &mut plain).unwrap();
            assert!(plain == data);
        }
    }

    /// Requests the volume would refuse are refused by the ciphertext
    /// device and its cipher alike, naming the same problem.
    #[test]
    fn sealed_parts_check_as_the_volume_does() {
        let noise = vec![0u8; 4096 + 65536];
        let (dev, payload) = volume(&noise, 4096).into_parts();
        assert_eq!(payload.size(), 65536);
        assert_eq!(payload.payload_offset(), 4096);
        let payload = Arc::new(payload);
        let seal = crate::parallel::ParallelSeal::new(Arc::clone(&payload), 2);
        let mut dst: AnyDev = erased(Ciphertext { dev, payload });
        let mut vol = volume(&noise, 4096);
        for (off, n) in [(512u64, 4096usize), (0, 512), (61440, 8192)] {
            let want = vol.write_at(off, &vec![1u8; n]).unwrap_err().to_string();
            let got = dst.write_at(off, &vec![1u8; n]).unwrap_err().to_string();
            assert_eq!(got, want, "{off} {n}");
            let mut buf = vec![1u8; n];
            let sealed = crate::convert::Seal::seal(&seal, off, &mut buf).unwrap_err();
            assert_eq!(sealed.to_string(), want, "{off} {n}");
        }
    }

    #[test]
    fn modes_split_like_qemu() {
        assert_eq!(split_mode("xts-plain64"), ("xts", "plain64", None));
        assert_eq!(
            split_mode("cbc-essiv:sha256"),
            ("cbc", "essiv", Some("sha256"))
        );
        assert_eq!(split_mode("ecb"), ("ecb", "", None));
    }
}
