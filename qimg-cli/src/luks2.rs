//! LUKS2 volumes in the CLI: unlocking (with an optional detached
//! header), `info`, `luks dump` (cryptsetup's luksDump
//! layout, or the JSON metadata itself) and `create -o luks-version=2`.

use std::fmt::Write as _;

use luks_core::io::BlockIo;
use luks_core::luks2::write::{self, FormatParams, KdfParams};
use luks_core::luks2::{self, Argon2Block, Kdf, Luks2Header};
use luks_core::{HashAlg, LuksVolume};
use serde_json::{json, Map, Value};

use crate::luks_common::{CreateOptions, KeySource, OsRng};
use crate::opts::OptionMap;
use crate::secret::Secrets;
use crate::CliError;

/// Reads the LUKS2 header of `path` and its JSON text.
pub(crate) fn read_header(path: &str) -> Result<(Luks2Header, Vec<u8>), CliError> {
    let mut dev = crate::file::open_file(path, false)?;
    let mut json = vec![0u8; luks2::MAX_JSON_LEN];
    let h =
        luks2::read_header(&mut dev, &mut json).map_err(|e| CliError::io(path, e.to_string()))?;
    json.truncate(h.json_len);
    Ok((h, json))
}

/// The most Argon2 memory qimg hands a key slot: cryptsetup's own maximum
/// (4 GiB), so a forged header cannot make qimg allocate without bound.
const MAX_ARGON2_KIB: usize = 4 << 20;

/// Argon2 memory for the most demanding key slot that asks for at most
/// [`MAX_ARGON2_KIB`] (a slot asking for more fails with the core's clear
/// "needs N KiB" error); an allocation the system refuses is an error too.
pub(crate) fn memory(path: &str, h: &Luks2Header) -> Result<Vec<Argon2Block>, CliError> {
    let n = h
        .meta
        .keyslots
        .iter()
        .filter_map(luks2::argon2_blocks)
        .filter(|&n| n <= MAX_ARGON2_KIB)
        .max()
        .unwrap_or(0);
    let mut mem = Vec::new();
    mem.try_reserve_exact(n).map_err(|_| {
        CliError::io(
            path,
            format!("cannot allocate the {n} KiB of Argon2 memory a key slot needs"),
        )
    })?;
    mem.resize(n, Argon2Block::new());
    Ok(mem)
}

/// Unlocks a raw LUKS2 volume (`header` names a detached header) over its
/// own handle to `path`, for [`crate::luks::open_payload`] and
/// [`crate::luks::open_volume`].
pub(crate) fn open_volume(
    path: &str,
    header: Option<&str>,
    keys: &KeySource,
    secrets: &Secrets,
    writable: bool,
    cache: crate::cache::CacheMode,
) -> Result<LuksVolume<luks_core::io::FileDevice>, CliError> {
    let hdr_path = header.unwrap_or(path);
    let (h, _) = read_header(hdr_path)?;
    luks2::check_requirements::<std::convert::Infallible>(&h.meta)
        .map_err(|e| CliError::io(hdr_path, e.to_string()))?;
    if header.is_none() {
        check_length(path, &h)?;
    }
    let mut hdr_dev = crate::file::open_file(hdr_path, false)?;
    let pass = keys.resolve(path, secrets, false)?;
    let mut mem = memory(hdr_path, &h)?;
    let (key, _slot) = luks2::unlock(&mut hdr_dev, &h, &pass, None, &mut mem)
        .map_err(|e| CliError::io(hdr_path, e.to_string()))?;
    drop(mem);
    let data = crate::luks_common::open_payload_file(path, writable, cache)?;
    LuksVolume::open_luks2(data, &h, &key).map_err(|e| CliError::io(path, e.to_string()))
}

fn kdf_json(k: Option<&Kdf>) -> Value {
    match k {
        Some(Kdf::Pbkdf2 {
            hash, iterations, ..
        }) => json!({"type": "pbkdf2", "hash": hash.name(), "iterations": iterations}),
        Some(Kdf::Argon2 {
            id,
            time,
            memory_kib,
            cpus,
            ..
        }) => json!({
            "type": if *id { "argon2id" } else { "argon2i" },
            "time": time, "memory": memory_kib, "cpus": cpus
        }),
        Some(Kdf::Other(n)) => json!({"type": n.as_str()}),
        None => Value::Null,
    }
}

/// The `format-specific` data of `qimg info` for a LUKS2 volume (qemu-img
/// has none: it cannot read LUKS2).
pub(crate) fn format_specific(h: &Luks2Header, detached: bool) -> Value {
    let mut m = Map::new();
    m.insert("version".into(), json!(2));
    m.insert("uuid".into(), json!(h.hdr.uuid.as_str()));
    if !h.hdr.label.is_empty() {
        m.insert("label".into(), json!(h.hdr.label.as_str()));
    }
    m.insert("detached-header".into(), json!(detached));
    m.insert("metadata-size".into(), json!(h.hdr.hdr_size));
    m.insert("keyslots-size".into(), json!(h.meta.keyslots_size));
    m.insert("seqid".into(), json!(h.hdr.seqid));
    if let Some(s) = h.meta.data_segment() {
        m.insert("cipher".into(), json!(s.encryption.as_str()));
        m.insert("sector-size".into(), json!(s.sector_size));
        m.insert("payload-offset".into(), json!(s.offset));
    }
    let slots: Vec<Value> = h
        .meta
        .keyslots
        .iter()
        .map(|k| {
            json!({
                "id": k.id,
                "type": k.kind.as_str(),
                "key-size": k.key_size,
                "priority": k.priority,
                "bound": luks2::is_bound(&h.meta, k.id),
                "area-offset": k.area_offset,
                "area-size": k.area_size,
                "kdf": kdf_json(k.kdf.as_ref()),
            })
        })
        .collect();
    m.insert("keyslots".into(), Value::Array(slots));
    let reqs: Vec<&str> = h.meta.requirements.iter().map(|r| r.as_str()).collect();
    if !reqs.is_empty() {
        m.insert("requirements".into(), json!(reqs));
    }
    Value::Object(m)
}

/// Refuses a volume (header and payload in one file, or a detached header
/// whose data segment starts at 0) that ends before its header area or its
/// data segment begins: a truncated copy, whose key material may be
/// missing too, so unlocking would fail misleadingly.
pub(crate) fn check_length(path: &str, h: &Luks2Header) -> Result<(), CliError> {
    let file_len = crate::file::file_length(path)?;
    let area = h.meta.header_area_len(h.hdr.hdr_size);
    let payload = h.meta.data_segment().map_or(0, |s| s.offset);
    let need = area.max(payload);
    if need > file_len {
        return Err(CliError::io(
            path,
            format!(
                "device too small: the LUKS2 header area and payload offset need {need} bytes \
                 but the file has {file_len} (truncated copy or damaged header; \
                 `qimg luks dump` shows the header)"
            ),
        ));
    }
    Ok(())
}

/// `qimg info` for a raw LUKS2 volume (no passphrase needed).
pub(crate) fn info(
    path: &str,
    header: Option<&str>,
) -> Result<crate::image_info::ImageInfo, CliError> {
    let (h, _) = read_header(header.unwrap_or(path))?;
    if header.is_none() {
        check_length(path, &h)?;
    }
    let file_len = crate::file::file_length(path)?;
    let (offset, fixed, ss) = h.meta.data_segment().map_or((0, None, 512), |s| {
        (s.offset, s.size, u64::from(s.sector_size))
    });
    let mut size = file_len.saturating_sub(offset);
    if let Some(f) = fixed {
        size = size.min(f);
    }
    let mut out =
        crate::image_info::ImageInfo::basic(path, crate::format::Format::Luks, size - size % ss)?;
    out.encrypted = true;
    out.format_specific = Some(("luks".into(), format_specific(&h, header.is_some())));
    Ok(out)
}

fn hex_lines(out: &mut String, bytes: &[u8], indent: &str) {
    for (i, chunk) in bytes.chunks(16).enumerate() {
        out.push_str(if i == 0 { "" } else { indent });
        for b in chunk {
            let _ = write!(out, "{b:02x} ");
        }
        out.push('\n');
    }
}

/// Standard base64 to bytes (salts in the JSON metadata).
fn decode_b64(s: &str) -> Option<Vec<u8>> {
    use base64ct::{Base64, Encoding};
    Base64::decode_vec(s).ok()
}

/// `qimg luks dump` for LUKS2: cryptsetup's luksDump layout, or with
/// `json_out` the JSON metadata itself.
pub(crate) fn dump(path: &str, json_out: bool) -> Result<u8, CliError> {
    let (h, text) = read_header(path)?;
    let v: Value = serde_json::from_slice(&text)
        .map_err(|e| CliError::io(path, format!("JSON metadata: {e}")))?;
    if json_out {
        println!("{}", crate::pretty_json(&v));
        return Ok(0);
    }
    let m = &h.meta;
    let or = |s: &str, none: &str| {
        if s.is_empty() {
            none.to_string()
        } else {
            s.to_string()
        }
    };
    let mut o = String::new();
    // cryptsetup's LUKS2 dump does not name the file.
    let _ = writeln!(o, "LUKS header information");
    let _ = writeln!(o, "Version:       \t2");
    let _ = writeln!(o, "Epoch:         \t{}", h.hdr.seqid);
    let _ = writeln!(o, "Metadata area: \t{} [bytes]", h.hdr.hdr_size);
    let _ = writeln!(o, "Keyslots area: \t{} [bytes]", m.keyslots_size);
    let _ = writeln!(o, "UUID:          \t{}", h.hdr.uuid);
    let _ = writeln!(o, "Label:         \t{}", or(&h.hdr.label, "(no label)"));
    let _ = writeln!(
        o,
        "Subsystem:     \t{}",
        or(&h.hdr.subsystem, "(no subsystem)")
    );
    let flags: Vec<&str> = v["config"]["flags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if flags.is_empty() {
        let _ = writeln!(o, "Flags:       \t(no flags)");
    } else {
        let _ = writeln!(o, "Flags:       \t{} ", flags.join(" "));
    }
    if !m.requirements.is_empty() {
        let reqs: Vec<&str> = m.requirements.iter().map(|r| r.as_str()).collect();
        let _ = writeln!(o, "Requirements:\t{} ", reqs.join(" "));
    }
    let _ = writeln!(o, "\nData segments:");
    for s in &m.segments {
        let _ = writeln!(o, "  {}: {}", s.id, s.kind);
        let _ = writeln!(o, "\toffset: {} [bytes]", s.offset);
        match s.size {
            Some(n) => {
                let _ = writeln!(o, "\tlength: {n} [bytes]");
            }
            None => {
                let _ = writeln!(o, "\tlength: (whole device)");
            }
        }
        let _ = writeln!(o, "\tcipher: {}", s.encryption);
        let _ = writeln!(o, "\tsector: {} [bytes]", s.sector_size);
        if let Some(t) = v["segments"][s.id.to_string()]["integrity"]["type"].as_str() {
            let _ = writeln!(o, "\tintegrity: {t}");
        }
    }
    let _ = writeln!(o, "\nKeyslots:");
    let mut slots: Vec<_> = m.keyslots.iter().collect();
    slots.sort_by_key(|k| k.id);
    for k in slots {
        let unbound = if k.kind == "luks2" && !luks2::is_bound(m, k.id) {
            " (unbound)"
        } else {
            ""
        };
        let _ = writeln!(o, "  {}: {}{unbound}", k.id, k.kind);
        let _ = writeln!(o, "\tKey:        {} bits", k.key_size * 8);
        let prio = match k.priority {
            0 => "ignored",
            2 => "high",
            _ => "normal",
        };
        let _ = writeln!(o, "\tPriority:   {prio}");
        let _ = writeln!(o, "\tCipher:     {}", k.area_encryption);
        let _ = writeln!(o, "\tCipher key: {} bits", k.area_key_size * 8);
        match &k.kdf {
            Some(Kdf::Pbkdf2 {
                hash,
                iterations,
                salt,
            }) => {
                let _ = writeln!(o, "\tPBKDF:      pbkdf2");
                let _ = writeln!(o, "\tHash:       {}", hash.name());
                let _ = writeln!(o, "\tIterations: {iterations}");
                o.push_str("\tSalt:       ");
                hex_lines(&mut o, salt.as_bytes(), "\t            ");
            }
            Some(Kdf::Argon2 {
                id,
                time,
                memory_kib,
                cpus,
                salt,
            }) => {
                let _ = writeln!(
                    o,
                    "\tPBKDF:      {}",
                    if *id { "argon2id" } else { "argon2i" }
                );
                let _ = writeln!(o, "\tTime cost:  {time}");
                let _ = writeln!(o, "\tMemory:     {memory_kib}");
                let _ = writeln!(o, "\tThreads:    {cpus}");
                o.push_str("\tSalt:       ");
                hex_lines(&mut o, salt.as_bytes(), "\t            ");
            }
            Some(Kdf::Other(n)) => {
                // A KDF the core cannot run: show what the JSON says.
                let _ = writeln!(o, "\tPBKDF:      {n}");
                let kdf = &v["keyslots"][k.id.to_string()]["kdf"];
                for (key, label) in [
                    ("time", "Time cost:  "),
                    ("memory", "Memory:     "),
                    ("cpus", "Threads:    "),
                ] {
                    if let Some(n) = kdf[key].as_u64() {
                        let _ = writeln!(o, "\t{label}{n}");
                    }
                }
                if let Some(salt) = kdf["salt"].as_str().and_then(decode_b64) {
                    o.push_str("\tSalt:       ");
                    hex_lines(&mut o, &salt, "\t            ");
                }
            }
            None => {}
        }
        let _ = writeln!(o, "\tAF stripes: {}", k.stripes);
        if let Some(hh) = k.af_hash {
            let _ = writeln!(o, "\tAF hash:    {}", hh.name());
        }
        let _ = writeln!(o, "\tArea offset:{} [bytes]", k.area_offset);
        let _ = writeln!(o, "\tArea length:{} [bytes]", k.area_size);
        if let Some(d) = m.digest_for_keyslot(k.id) {
            let _ = writeln!(o, "\tDigest ID:  {}", d.id);
        }
    }
    let _ = writeln!(o, "Tokens:");
    if let Some(tokens) = v["tokens"].as_object() {
        let mut ids: Vec<(u64, &Value)> = tokens
            .iter()
            .filter_map(|(k, t)| k.parse::<u64>().ok().map(|n| (n, t)))
            .collect();
        ids.sort_by_key(|(n, _)| *n);
        for (id, t) in ids {
            let _ = writeln!(o, "  {id}: {}", t["type"].as_str().unwrap_or("?"));
            if let Some(d) = t["key_description"].as_str() {
                let _ = writeln!(o, "\tKey description: {d}");
            }
            for ks in t["keyslots"].as_array().into_iter().flatten() {
                let _ = writeln!(o, "\tKeyslot:    {}", ks.as_str().unwrap_or("?"));
            }
        }
    }
    let _ = writeln!(o, "Digests:");
    for d in &m.digests {
        let _ = writeln!(o, "  {}: pbkdf2", d.id);
        let _ = writeln!(o, "\tHash:       {}", d.hash.name());
        let _ = writeln!(o, "\tIterations: {}", d.iterations);
        o.push_str("\tSalt:       ");
        hex_lines(&mut o, d.salt.as_bytes(), "\t            ");
        o.push_str("\tDigest:     ");
        hex_lines(&mut o, d.digest.as_bytes(), "\t            ");
    }
    print!("{o}");
    Ok(0)
}

/// LUKS2-only creation options (beyond qemu-img's LUKS options).
struct Luks2Options {
    /// `pbkdf`: argon2id (default), argon2i or pbkdf2.
    pbkdf: String,
    /// `pbkdf-memory`: Argon2 memory in KiB.
    memory_kib: u32,
    /// `pbkdf-parallel`: Argon2 lanes.
    parallel: u32,
    /// `pbkdf-iterations`: fixed PBKDF2 iterations / Argon2 passes instead
    /// of calibrating to `iter-time`.
    iterations: Option<u32>,
    /// `sector-size`.
    sector_size: u32,
    /// `metadata-size`: bytes of each header copy.
    hdr_size: u64,
    /// `label`.
    label: String,
    /// `detached-header`: the file holds only the header (qemu-img's
    /// option name); the payload is another file, opened with `--header`.
    detached: bool,
}

/// cryptsetup's default Argon2 memory ceiling: 1 GiB, but at most half the
/// physical memory (MemTotal in /proc/meminfo; 1 GiB when unreadable).
pub(crate) fn default_argon2_memory_kib() -> u32 {
    const MAX: u32 = 1 << 20;
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    total_kib.map_or(MAX, |t| {
        u32::try_from((t / 2).min(u64::from(MAX))).unwrap_or(MAX)
    })
}

/// cryptsetup's default Argon2 lanes: 4, but at most the online CPUs.
pub(crate) fn default_argon2_lanes() -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    u32::try_from(cpus).unwrap_or(4).clamp(1, 4)
}

fn u32_opt(opts: &OptionMap, key: &str, default: u32) -> Result<u32, CliError> {
    opts.get_u64(key)
        .map_err(|e| CliError::usage(e.to_string()))?
        .map_or(Ok(default), u32::try_from)
        .map_err(|_| CliError::usage(format!("{key} is too large")))
}

impl Luks2Options {
    fn parse(opts: &OptionMap) -> Result<Self, CliError> {
        let pbkdf = opts.get("pbkdf").unwrap_or("argon2id").to_string();
        if !matches!(pbkdf.as_str(), "argon2id" | "argon2i" | "pbkdf2") {
            return Err(CliError::usage(format!(
                "pbkdf '{pbkdf}' is not one of argon2id, argon2i, pbkdf2"
            )));
        }
        let iterations = opts
            .get_u64("pbkdf-iterations")
            .map_err(|e| CliError::usage(e.to_string()))?
            .map(u32::try_from)
            .transpose()
            .map_err(|_| CliError::usage("pbkdf-iterations is too large".into()))?;
        let hdr_size = opts
            .get_size("metadata-size")
            .map_err(|e| CliError::usage(e.to_string()))?
            .map_or(16 << 10, |v| v);
        if !luks2::HDR_SIZES.contains(&hdr_size) {
            return Err(CliError::usage(format!(
                "metadata-size {hdr_size} is not one of 16k, 32k, 64k, ... 4M"
            )));
        }
        Ok(Self {
            pbkdf,
            memory_kib: u32_opt(opts, "pbkdf-memory", default_argon2_memory_kib())?,
            parallel: u32_opt(opts, "pbkdf-parallel", default_argon2_lanes())?,
            iterations,
            sector_size: u32_opt(opts, "sector-size", 512)?,
            hdr_size,
            label: opts.get("label").unwrap_or("").to_string(),
            detached: match opts.get("detached-header").unwrap_or("off") {
                "on" | "true" | "yes" => true,
                "off" | "false" | "no" => false,
                v => {
                    return Err(CliError::usage(format!(
                        "detached-header '{v}' is not on or off"
                    )))
                }
            },
        })
    }
}

/// `qimg create -f luks -o luks-version=2,...`: a new LUKS2 volume with a
/// `size`-byte payload.
pub(crate) fn create(
    path: &str,
    opts: &OptionMap,
    secrets: &Secrets,
    key_file: Option<&str>,
    size: u64,
) -> Result<(), CliError> {
    let o = CreateOptions::parse(opts, "")?;
    let l = Luks2Options::parse(opts)?;
    opts.reject_unused("luks")
        .map_err(|e| CliError::usage(e.to_string()))?;
    let keys = KeySource {
        key_file: key_file.map(str::to_string),
        key_secret: o.key_secret.clone(),
    };
    let pass = keys.resolve(path, secrets, true)?;
    let hash = HashAlg::from_name(&o.hash)
        .map_err(|e| CliError::usage(format!("hash-alg '{}': {e}", o.hash)))?;
    let elapsed_since =
        |t: std::time::Instant| move || u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
    // One PBKDF2 benchmark (cryptsetup's PBKDF2 speed) for the slot and the
    // digest, run when first needed, its sample sized to the longer of the
    // two derivations.
    let longest = o.iter_time_ms.max(luks_core::luks1::DIGEST_MS);
    let mut measured = None;
    let mut speed = || {
        *measured.get_or_insert_with(|| {
            luks_core::luks1::Pbkdf2Speed::measure_for(
                hash,
                luks_core::luks1::Pbkdf2Reader::Cryptsetup,
                longest,
                crate::luks_common::cpu_clock(),
            )
        })
    };
    let kdf = match l.pbkdf.as_str() {
        "pbkdf2" => KdfParams::Pbkdf2 {
            hash,
            iterations: match l.iterations {
                Some(n) => n,
                None => speed().iterations(
                    usize::try_from(o.key_bytes()).unwrap_or(usize::MAX),
                    o.iter_time_ms,
                ),
            },
        },
        name => {
            let id = name == "argon2id";
            // pbkdf-memory is a ceiling, as in cryptsetup: calibration may
            // use less to meet iter-time at the minimum time cost.
            let (time, memory_kib) = match l.iterations {
                Some(n) => (n, l.memory_kib),
                None => write::calibrate_argon2_params::<std::convert::Infallible>(
                    id,
                    l.memory_kib,
                    l.parallel,
                    o.iter_time_ms,
                    elapsed_since(std::time::Instant::now()),
                )
                .map_err(|e| CliError::usage(e.to_string()))?,
            };
            KdfParams::Argon2 {
                id,
                time,
                memory_kib,
                cpus: l.parallel,
            }
        }
    };
    // cryptsetup's digest: 125 ms of its PBKDF2 for the key's length.
    let digest_iterations = speed().iterations(
        usize::try_from(o.key_bytes()).unwrap_or(usize::MAX),
        luks_core::luks1::DIGEST_MS,
    );
    let cipher = format!("{}-{}", o.cipher, o.mode_spec());
    let params = FormatParams {
        cipher: &cipher,
        key_bytes: o.key_bytes(),
        sector_size: l.sector_size,
        kdf,
        hash,
        digest_iterations,
        hdr_size: l.hdr_size,
        data_offset: l.detached.then_some(0),
        keyslots_size: None,
        label: &l.label,
    };
    let mut dev = crate::lock::create_locked(path)?;
    let (h, _, _key) = write::format(&mut dev, &params, None, &pass, &mut OsRng)
        .map_err(|e| CliError::io(path, e.to_string()))?;
    if !l.detached {
        let offset = h.meta.data_segment().map_or(0, |s| s.offset);
        let ss = u64::from(l.sector_size);
        dev.set_size(offset + size.div_ceil(ss) * ss)
            .map_err(|e| CliError::io(path, e.to_string()))?;
    }
    dev.flush().map_err(|e| CliError::io(path, e.to_string()))?;
    Ok(())
}
