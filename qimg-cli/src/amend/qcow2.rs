//! `qimg amend -f qcow2` with qemu-img's qcow2 options: `compat`,
//! `lazy_refcounts`, `refcount_bits`, `data_file`, `data_file_raw`,
//! `size`, and `backing_file`/`backing_fmt` (only repeated, never
//! changed). The work is `Qcow2Writer::amend`; this module reads the
//! options and words the refusals as qemu-img 10.0.2 does.
//!
//! Stricter than qemu-img: every refusal comes before the first write
//! (qemu-img may have upgraded the image before refusing a later option),
//! and a shrinking `size` of an image with an external data file is
//! refused while data lies past the new end.
//! Mixed with key slot options (`encrypt.state`, ...), the qcow2 options
//! are applied first, then the key slots.

use super::AmendCmd;
use crate::luks_common::KeySource;
use crate::opts::{split_list, OptionMap};
use crate::secret::Secrets;
use crate::CliError;
use qcow_core::writer::amend::{AmendError, AmendOptions};

/// The options qemu-img's qcow2 driver amends (besides `encrypt.*`).
const AMENDABLE: [&str; 8] = [
    "compat",
    "lazy_refcounts",
    "refcount_bits",
    "data_file",
    "data_file_raw",
    "size",
    "backing_file",
    "backing_fmt",
];

/// qcow2 creation options qemu-img refuses to amend.
const CREATE_ONLY: [&str; 11] = [
    "cluster_size",
    "preallocation",
    "encryption",
    "compression_type",
    "extended_l2",
    "encrypt.format",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
];

/// Whether the `-o` lists hold options for this module (anything but the
/// key slot options `keys` handles).
pub(crate) fn wants(options: &[String]) -> bool {
    options
        .iter()
        .any(|o| split_list(o).is_ok_and(|kv| kv.iter().any(|(k, _)| !k.starts_with("encrypt."))))
}

/// `on`/`off` as QEMU's boolean options read them.
fn parse_bool(key: &str, v: &str) -> Result<bool, CliError> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(CliError::usage(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

/// The options read from the `-o` lists.
struct Parsed {
    version: Option<u32>,
    lazy: Option<bool>,
    order: Option<u32>,
    data_file: Option<String>,
    data_file_raw: Option<bool>,
    size: Option<u64>,
    backing: Option<(Option<String>, Option<String>)>,
    /// `encrypt.*` key slot options, for `keys` afterwards.
    encrypt: Vec<String>,
}

fn parse(options: &[String]) -> Result<Parsed, CliError> {
    let opts = OptionMap::parse(options).map_err(|e| CliError::usage(format!("-o: {e}")))?;
    let mut keys: Vec<String> = Vec::new();
    for o in options {
        for (k, _) in split_list(o).map_err(|e| CliError::usage(format!("-o: {e}")))? {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    for k in &keys {
        if CREATE_ONLY.contains(&k.as_str()) {
            return Err(CliError::usage(format!(
                "Invalid parameter '{k}'\nThis option is only supported for image creation"
            )));
        }
        if !AMENDABLE.contains(&k.as_str()) && !k.starts_with("encrypt.") {
            return Err(CliError::usage(format!("Invalid parameter '{k}'")));
        }
    }
    let version = opts
        .get("compat")
        .map(|v| match v {
            "0.10" | "v2" => Ok(2),
            "1.1" | "v3" => Ok(3),
            _ => Err(CliError::usage(format!("Unknown compatibility level {v}"))),
        })
        .transpose()?;
    let lazy = opts
        .get("lazy_refcounts")
        .map(|v| parse_bool("lazy_refcounts", v))
        .transpose()?;
    let data_file_raw = opts
        .get("data_file_raw")
        .map(|v| parse_bool("data_file_raw", v))
        .transpose()?;
    let order = opts
        .get("refcount_bits")
        .map(|v| {
            let bits: u64 = v.parse().map_err(|_| {
                CliError::usage("Parameter 'refcount_bits' expects a number".into())
            })?;
            if bits == 0 || bits > 64 || !bits.is_power_of_two() {
                return Err(CliError::usage(
                    "Refcount width must be a power of two and may not exceed 64 bits".into(),
                ));
            }
            Ok(bits.trailing_zeros())
        })
        .transpose()?;
    let size = opts
        .get_size("size")
        .map_err(|e| CliError::usage(e.to_string()))?
        .filter(|&s| s != 0);
    let bf = opts.get("backing_file").map(str::to_string);
    let bfmt = opts.get("backing_fmt").map(str::to_string);
    let backing = (bf.is_some() || bfmt.is_some()).then_some((bf, bfmt));
    let mut encrypt = Vec::new();
    for k in keys.iter().filter(|k| k.starts_with("encrypt.")) {
        if let Some(v) = opts.get(k) {
            encrypt.push(format!("{k}={}", v.replace(',', ",,")));
        }
    }
    Ok(Parsed {
        version,
        lazy,
        order,
        data_file: opts.get("data_file").map(str::to_string),
        data_file_raw,
        size,
        backing,
        encrypt,
    })
}

/// Runs `qimg amend` on the qcow2 image `path` (locked by the caller);
/// `key_secret` came with `--image-opts`.
pub(crate) fn run(
    a: &AmendCmd,
    filename: &str,
    path: &str,
    key_secret: Option<&str>,
) -> Result<u8, CliError> {
    let p = parse(&a.options)?;
    // Key slot options other than the secret that opens the image go to
    // `keys` afterwards.
    let slot_opts: Vec<String> = p
        .encrypt
        .iter()
        .filter(|o| !o.starts_with("encrypt.key-secret="))
        .cloned()
        .collect();
    let info = crate::qcow2::Opening::open(path)?.img.info().clone();
    // qemu-img looks at the key slot options first.
    match info.header.crypt_method {
        _ if slot_opts.is_empty() => {}
        qcow_core::CryptMethod::None => {
            return Err(CliError::io(
                path,
                "Can't amend encryption options - encryption not present".into(),
            ))
        }
        qcow_core::CryptMethod::Aes => {
            return Err(CliError::io(
                path,
                "Only LUKS encryption options can be amended".into(),
            ))
        }
        qcow_core::CryptMethod::Luks => {}
    }
    if let Some((bf, bfmt)) = &p.backing {
        if bf.as_deref() != info.backing_file() || bfmt.as_deref() != info.backing_format() {
            return Err(CliError::usage(
                "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.".into(),
            ));
        }
    }
    let secrets = Secrets::parse(&a.secrets.object)?;
    let key_secret = p
        .encrypt
        .iter()
        .find_map(|o| o.strip_prefix("encrypt.key-secret="))
        .map(|s| s.replace(",,", ","))
        .or_else(|| key_secret.map(str::to_string))
        .or_else(|| a.secrets.key_secret.clone());
    let keys = KeySource {
        key_file: a.secrets.key_file.clone(),
        key_secret,
    };
    let encrypted = info.header.crypt_method.is_encrypted();
    let mut w = crate::create::open_qcow2_writer_cached(
        path,
        encrypted.then_some((&keys, &secrets)),
        a.cache_mode()?,
    )?;
    let o = AmendOptions {
        version: p.version,
        lazy_refcounts: p.lazy,
        refcount_order: p.order,
        data_file: p.data_file.as_deref(),
        data_file_raw: p.data_file_raw,
        size: p.size,
    };
    w.amend(&o).map_err(|e| match e {
        AmendError::Refused(r) => CliError::io(path, r.to_string()),
        AmendError::Resize(qcow_core::ResizeError::Unaligned(_)) => {
            CliError::usage("The new size must be a multiple of 512".into())
        }
        e => CliError::io(path, e.to_string()),
    })?;
    w.close().map_err(|e| CliError::io(path, e.to_string()))?;
    if slot_opts.is_empty() {
        return Ok(0);
    }
    let mut rest = slot_opts;
    if let Some(k) = p
        .encrypt
        .iter()
        .find(|o| o.starts_with("encrypt.key-secret="))
    {
        rest.push(k.clone());
    }
    super::encryption(a, filename, &rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn options_read_as_qemu_img_reads_them() {
        let p = parse(&s(&["compat=v2,lazy_refcounts=off", "refcount_bits=64"])).unwrap();
        assert_eq!(p.version, Some(2));
        assert_eq!(p.lazy, Some(false));
        assert_eq!(p.order, Some(6));
        let e = |o: &str| parse(&s(&[o])).err().map(|e| e.msg).unwrap_or_default();
        assert_eq!(e("compat=0.9"), "Unknown compatibility level 0.9");
        assert_eq!(
            e("refcount_bits=3"),
            "Refcount width must be a power of two and may not exceed 64 bits"
        );
        assert_eq!(
            e("refcount_bits=abc"),
            "Parameter 'refcount_bits' expects a number"
        );
        assert_eq!(
            e("lazy_refcounts=maybe"),
            "Parameter 'lazy_refcounts' expects 'on' or 'off'"
        );
        assert!(e("cluster_size=4096").starts_with("Invalid parameter 'cluster_size'\n"));
        assert_eq!(e("bogus=1"), "Invalid parameter 'bogus'");
    }

    #[test]
    fn only_non_encryption_options_come_here() {
        assert!(wants(&s(&["compat=1.1"])));
        assert!(wants(&s(&["encrypt.state=active", "size=1M"])));
        assert!(!wants(&s(&["encrypt.state=active,encrypt.new-secret=s"])));
    }
}
