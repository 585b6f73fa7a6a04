//! What to open, parsed before anything is opened: a plain file name,
//! QEMU's option syntax (`--image-opts driver=qcow2,file.filename=X,...`)
//! or a `json:{...}` pseudo-filename all become one [`ImageSpec`] (path,
//! format, key secret, backing and data file), which the format layer
//! ([`crate::image`]) opens the same way whatever syntax it came from.
//!
//! Both syntaxes are flattened into QEMU's dotted keys first
//! (`{"file": {"filename": "x"}}` is `file.filename=x`), then read by one
//! function. Errors carry qemu-img's wording: `Could not open 'SPEC': ...`
//! with the same inner message qemu-img gives for an unknown key, an
//! unknown driver, a missing `file`, and JSON it cannot parse. Options
//! QEMU knows but qimg does not implement are refused with a message
//! that says so, never ignored.

use crate::format::Format;
use crate::CliError;

/// The prefix that makes a file name a JSON option set.
pub(crate) const JSON_PREFIX: &str = "json:";

/// The deepest JSON nesting read (QEMU's own parser stops at 1024; no
/// option set is deeper than a handful of `backing` levels).
const MAX_JSON_DEPTH: usize = 64;

/// Every block driver qemu-img 10.0.2 lists (`qemu-img --help`): a driver
/// outside this list is QEMU's "Unknown driver"; one inside it that qimg
/// does not read is refused in qimg's words.
const QEMU_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "iser",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "snapshot-access",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Options every QEMU block node takes, and those of the qcow2 format
/// and the `file` protocol, that qimg does not implement (cache tuning,
/// discard policy, locking and AIO modes). They are refused by name as
/// unimplemented rather than as unknown.
const QEMU_UNIMPLEMENTED: &[&str] = &[
    "node-name",
    "discard",
    "cache.writeback",
    "cache.direct",
    "cache.no-flush",
    "read-only",
    "auto-read-only",
    "detect-zeroes",
    "force-share",
    "lazy-refcounts",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "overlap-check",
    "cache-size",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
    "cache-clean-interval",
    "aio",
    "aio-max-batch",
    "locking",
    "pr-manager",
    "drop-cache",
    "x-check-cache-dropped",
];

/// One value of a flattened option set: QEMU's options are strings once
/// flattened; JSON `null` is kept apart (`"backing": null`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Val {
    /// A string (numbers and booleans from JSON in their text form).
    Str(String),
    /// JSON `null`.
    Null,
}

/// What to do about an image's backing file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum Backing {
    /// Open the backing file the image names, as it names it.
    #[default]
    AsWritten,
    /// Open no backing file (`backing=` or `"backing": null`): the image
    /// reads as zeroes where it holds nothing.
    Without,
    /// Open this instead of the named backing file (`backing.*` keys).
    Spec(Box<ImageSpec>),
}

/// A key that only some formats take, checked once the format is known
/// (a spec without `driver` is probed when opened).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Only {
    /// `encrypt.*`, `backing*`, `data-file*`.
    Qcow2,
    /// `key-secret`.
    Luks,
}

/// One image to open, from a path, an option list or `json:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageSpec {
    /// What the user wrote, for messages (`None` for a plain path).
    pub(crate) text: Option<String>,
    /// The image file (`file.filename`).
    pub(crate) path: String,
    /// `driver`; probed from the file when `None`.
    pub(crate) format: Option<Format>,
    /// `encrypt.key-secret` (qcow2) or `key-secret` (LUKS).
    pub(crate) key_secret: Option<String>,
    /// `encrypt.format`: the encryption the header must report.
    pub(crate) encrypt_format: Option<String>,
    /// The backing file to open.
    pub(crate) backing: Backing,
    /// `data-file.*`: the external data file to open instead of the one
    /// the image names.
    pub(crate) data_file: Option<String>,
    /// Keys that only some formats accept: checked by [`Self::check_format`].
    only: Vec<(String, Only)>,
    /// `encrypt.*` keys the encryption layer does not take: refused only
    /// when the image is encrypted (qemu-img reads them only then).
    encrypt_unknown: Vec<String>,
}

impl ImageSpec {
    /// A plain file name: the same image a path has always opened.
    pub(crate) fn path(path: &str, format: Option<Format>) -> Self {
        Self {
            text: None,
            path: path.to_string(),
            format,
            key_secret: None,
            encrypt_format: None,
            backing: Backing::AsWritten,
            data_file: None,
            only: Vec::new(),
            encrypt_unknown: Vec::new(),
        }
    }

    /// This spec, named in messages as `other` is (a light copy for
    /// wording errors about a file `other` names).
    pub(crate) fn named(mut self, other: &Self) -> Self {
        self.text.clone_from(&other.text);
        self
    }

    /// What a verb's image argument means: with `--image-opts` an option
    /// list (`-f` is then refused, as qemu-img refuses it), else a
    /// `json:{...}` pseudo-filename, else a path in format `format`.
    pub(crate) fn from_arg(
        arg: &str,
        image_opts: bool,
        format: Option<Format>,
    ) -> Result<Self, CliError> {
        if image_opts {
            if format.is_some() {
                return Err(CliError::usage(
                    "--image-opts and --format are mutually exclusive".into(),
                ));
            }
            let flat = parse_options(arg).map_err(|m| could_not_open(arg, &m))?;
            return build(&flat, Some(arg)).map_err(|m| could_not_open(arg, &m));
        }
        if let Some(spec) = Self::json(arg)? {
            // qemu-img lets -f name the driver of a json: spec that names
            // none; a spec's own driver wins.
            return Ok(Self {
                format: spec.format.or(format),
                ..spec
            });
        }
        Ok(Self::path(arg, format))
    }

    /// `name` as a `json:{...}` pseudo-filename, or `None` when it is
    /// not one (also for a backing file name written in an image).
    pub(crate) fn json(name: &str) -> Result<Option<Self>, CliError> {
        let Some(body) = name.strip_prefix(JSON_PREFIX) else {
            return Ok(None);
        };
        let flat = parse_json(body).map_err(|m| could_not_open(name, &m))?;
        build(&flat, Some(name))
            .map(Some)
            .map_err(|m| could_not_open(name, &m))
    }

    /// Before `path` (this spec's file) is opened: a missing or
    /// unreadable file named in an option set gets qemu-img's message.
    pub(crate) fn check_exists(&self, path: &str) -> Result<(), CliError> {
        if self.text.is_none() {
            return Ok(());
        }
        match std::fs::metadata(path) {
            Ok(_) => Ok(()),
            Err(e) => Err(self.error(&format!("Could not open '{path}': {}", crate::os_text(&e)))),
        }
    }

    /// For a verb that opens the file itself: the format (given, else
    /// probed as [`crate::format::resolve`] does), after the checks
    /// [`crate::image::open`] makes on a spec.
    pub(crate) fn resolve(&self, header: Option<&str>) -> Result<Format, CliError> {
        self.check_exists(&self.path)?;
        let format = crate::format::resolve(&self.path, self.format, header)?;
        self.check_format(format)?;
        Ok(format)
    }

    /// For a verb that reads or writes the guest data: [`Self::resolve`]
    /// plus the checks qemu-img's open of the format makes first (see
    /// [`Self::check_opened`]).
    pub(crate) fn resolve_for_io(&self, header: Option<&str>) -> Result<Format, CliError> {
        self.check_exists(&self.path)?;
        let format = crate::format::resolve(&self.path, self.format, header)?;
        self.check_opened(format, &self.path)?;
        Ok(format)
    }

    /// The checks on the file `path` in `format` that qemu-img makes when
    /// it opens an image for its data, in its order: an encrypted image
    /// without its own key option fails before unknown options are
    /// reported; then unknown options; then `encrypt.format` against the
    /// header.
    pub(crate) fn check_opened(&self, format: Format, path: &str) -> Result<(), CliError> {
        if self.text.is_none() {
            return Ok(());
        }
        let crypt = match format {
            Format::Qcow2 => qcow2_crypt_method(path),
            Format::Luks => Some(qcow_core::CryptMethod::Luks),
            Format::Raw => None,
        };
        if let Err(e) = self.check_format(format) {
            let own = match format {
                Format::Qcow2 => "encrypt.key-secret",
                _ => "key-secret",
            };
            let has_own = self.only.iter().any(|(k, _)| k == own);
            if crypt.is_some_and(qcow_core::CryptMethod::is_encrypted) && !has_own {
                return Err(self.error(&format!("Parameter '{own}' is required for cipher")));
            }
            return Err(e);
        }
        if format == Format::Qcow2 {
            if let Some(c) = crypt {
                self.check_encryption(c)?;
            }
        }
        Ok(())
    }

    /// Refuses what the spec says that `format` does not take, with
    /// qemu-img's message (`format` is the driver given or probed).
    pub(crate) fn check_format(&self, format: Format) -> Result<(), CliError> {
        for (key, only) in &self.only {
            let ok = match only {
                Only::Qcow2 => format == Format::Qcow2,
                Only::Luks => format == Format::Luks,
            };
            if !ok {
                return Err(self.error(&format!(
                    "Block format '{}' does not support the option '{key}'",
                    format.name()
                )));
            }
        }
        Ok(())
    }

    /// Refuses `backing.*` keys where qemu-img opens the image without
    /// its backing file (`info`, `snapshot`, ...), in its words.
    pub(crate) fn refuse_backing_keys(&self) -> Result<(), CliError> {
        if let Backing::Spec(_) = &self.backing {
            let key = self
                .only
                .iter()
                .map(|(k, _)| k)
                .find(|k| k.starts_with("backing."))
                .cloned()
                .unwrap_or_else(|| "backing".into());
            return Err(self.error(&format!(
                "Block format 'qcow2' does not support the option '{key}'"
            )));
        }
        Ok(())
    }

    /// An error about this spec: qemu-img's `Could not open 'SPEC': MSG`
    /// for an option set, `PATH: MSG` for a plain path.
    pub(crate) fn error(&self, msg: &str) -> CliError {
        match &self.text {
            Some(t) => could_not_open(t, msg),
            None => CliError::io(&self.path, msg.to_string()),
        }
    }

    /// The encryption a qcow2 header reports, checked against the `encrypt.*` keys as qemu-img
    /// checks them: unknown ones when it is encrypted, then
    /// `encrypt.format`.
    pub(crate) fn check_encryption(
        &self,
        crypt_method: qcow_core::CryptMethod,
    ) -> Result<(), CliError> {
        if crypt_method.is_encrypted() {
            if let Some(k) = self.encrypt_unknown.first() {
                return Err(self.error(&format!("Parameter '{k}' is unexpected")));
            }
        }
        let Some(want) = self.encrypt_format.as_deref() else {
            return Ok(());
        };
        let have = match crypt_method {
            qcow_core::CryptMethod::None => None,
            qcow_core::CryptMethod::Aes => Some("aes"),
            qcow_core::CryptMethod::Luks => Some("luks"),
        };
        match have {
            None => Err(self.error(&format!(
                "No encryption in image header, but options specified format '{want}'"
            ))),
            Some(h) if want != "auto" && h != want => Err(self.error(&format!(
                "Header reported '{h}' encryption format but options specify '{want}'"
            ))),
            Some(_) => Ok(()),
        }
    }
}

/// The `crypt_method` field of the qcow2 header of `path` (big-endian
/// at byte 32), `None` when it cannot be read (the open reports that).
fn qcow2_crypt_method(path: &str) -> Option<qcow_core::CryptMethod> {
    use std::io::Read;
    let mut head = [0u8; 36];
    std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    qcow_core::CryptMethod::from_raw(u32::from_be_bytes([head[32], head[33], head[34], head[35]]))
}

/// qemu-img's wrapper around every open failure.
fn could_not_open(text: &str, msg: &str) -> CliError {
    CliError::usage(format!("Could not open '{text}': {msg}"))
}

/// What a driver name stands for.
enum Driver {
    /// A format qimg reads.
    Format(Format),
    /// QEMU's `file` protocol: the file itself, read as raw bytes.
    File,
}

/// Reads a driver name: one qimg opens, QEMU's "Unknown driver", or
/// one QEMU has that qimg does not read.
fn driver(name: &str) -> Result<Driver, String> {
    if name == "file" {
        return Ok(Driver::File);
    }
    if let Some(f) = Format::parse(name) {
        return Ok(Driver::Format(f));
    }
    if QEMU_DRIVERS.contains(&name) {
        return Err(format!(
            "qimg does not implement the driver '{name}' (qcow2, luks, raw and file only)"
        ));
    }
    Err(format!("Unknown driver '{name}'"))
}

/// The string value of `key`, or QEMU's type error for `null`.
fn string(key: &str, v: &Val) -> Result<String, String> {
    match v {
        Val::Str(s) => Ok(s.clone()),
        Val::Null => Err(format!(
            "Invalid parameter type for '{key}', expected: string"
        )),
    }
}

/// A known QEMU option qimg does not implement, or QEMU's unknown-option
/// message for `kind` (`format` or `protocol`) `driver`.
fn unsupported(kind: &str, driver: &str, key: &str) -> String {
    let last = key.rsplit('.').next().unwrap_or(key);
    if QEMU_UNIMPLEMENTED.contains(&key) || QEMU_UNIMPLEMENTED.contains(&last) {
        return format!("qimg does not implement the option '{key}' of block {kind} '{driver}'");
    }
    if kind == "protocol" {
        format!("Block protocol '{driver}' doesn't support the option '{key}'")
    } else {
        format!("Block format '{driver}' does not support the option '{key}'")
    }
}

/// The keys of `flat` under `prefix` (`"backing."`), with it removed.
fn under(flat: &[(String, Val)], prefix: &str) -> Vec<(String, Val)> {
    flat.iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
        .collect()
}

/// Builds a spec from flattened keys (`text` names it in messages; `None`
/// for a nested `backing.` spec, whose messages the caller wraps, and
/// whose file may be left to the name the image holds).
fn build(flat: &[(String, Val)], text: Option<&str>) -> Result<ImageSpec, String> {
    let nested = text.is_none();
    let get = |k: &str| flat.iter().rev().find(|(key, _)| key == k).map(|(_, v)| v);
    if flat.is_empty() && !nested {
        return Err("Must specify either driver or file".into());
    }
    let drv = match get("driver") {
        Some(v) => Some(driver(&string("driver", v)?)?),
        None => None,
    };
    let mut spec = ImageSpec::path("", None);
    spec.text = text.map(str::to_string);
    let fmt_name = |d: &Option<Driver>| match d {
        Some(Driver::Format(f)) => f.name(),
        Some(Driver::File) => "file",
        None => "qcow2",
    };
    match drv {
        Some(Driver::File) => {
            // The protocol node itself: `driver=file,filename=X`.
            spec.format = Some(Format::Raw);
            for (k, v) in flat {
                match k.as_str() {
                    "driver" => {}
                    "filename" => spec.path = string(k, v)?,
                    _ => return Err(unsupported("protocol", "file", k)),
                }
            }
            if spec.path.is_empty() {
                return Err("The 'file' block driver requires a file name".into());
            }
            return Ok(spec);
        }
        Some(Driver::Format(f)) => spec.format = Some(f),
        None => {}
    }
    let mut file_given = false;
    let mut backing_keys = false;
    let mut bare_filename = false;
    for (k, v) in flat {
        let key = k.as_str();
        match key {
            "driver" => {}
            "file" => {
                let name = string(key, v)?;
                return Err(format!(
                    "Cannot find device='{name}' nor node-name='{name}'"
                ));
            }
            "file.driver" => match driver(&string(key, v)?)? {
                Driver::File => {}
                Driver::Format(f) => {
                    return Err(format!(
                    "qimg does not implement '{}' as the protocol layer (file.driver=file only)",
                    f.name()
                ))
                }
            },
            "file.filename" => {
                spec.path = string(key, v)?;
                file_given = true;
            }
            // Without a driver the file is probed, and `filename` names
            // it; a format driver takes its file from `file`.
            "filename" => {
                if drv.is_some() {
                    bare_filename = true;
                } else if !file_given {
                    spec.path = string(key, v)?;
                }
            }
            "encrypt.format" => {
                let f = string(key, v)?;
                spec.encrypt_format = Some(f);
                spec.only.push((k.clone(), Only::Qcow2));
            }
            "encrypt.key-secret" => {
                spec.key_secret = Some(string(key, v)?);
                spec.only.push((k.clone(), Only::Qcow2));
            }
            "key-secret" => {
                spec.key_secret = Some(string(key, v)?);
                spec.only.push((k.clone(), Only::Luks));
            }
            // qcow2's `discard-no-unref` (Proxmox's convert target): on a
            // discard, keep the host cluster allocated. qimg's writers
            // never discard through an option set's image: zero writes
            // (convert -n) already keep this image's own clusters
            // allocated, so the option is accepted, checked, and changes
            // nothing.
            "discard-no-unref" => {
                let b = string(key, v)?;
                if !matches!(
                    b.as_str(),
                    "on" | "yes" | "true" | "y" | "off" | "no" | "false" | "n"
                ) {
                    return Err(format!("Parameter '{key}' expects 'on' or 'off'"));
                }
                spec.only.push((k.clone(), Only::Qcow2));
            }
            "backing" => match v {
                Val::Null => spec.backing = Backing::Without,
                Val::Str(s) if s.is_empty() => spec.backing = Backing::Without,
                Val::Str(s) => {
                    return Err(format!(
                        "Could not open backing file: Cannot find device='{s}' nor node-name='{s}'"
                    ))
                }
            },
            _ if key.starts_with("backing.") => {
                spec.only.push((k.clone(), Only::Qcow2));
                backing_keys = true;
            }
            _ if key.starts_with("data-file") => {
                spec.only.push((k.clone(), Only::Qcow2));
            }
            _ if key.starts_with("file.") => {
                let inner = &key["file.".len()..];
                return Err(unsupported("protocol", "file", inner));
            }
            _ if key.starts_with("encrypt.") => {
                spec.encrypt_unknown
                    .push(key["encrypt.".len()..].to_string());
                spec.only.push((k.clone(), Only::Qcow2));
            }
            _ => return Err(unsupported("format", fmt_name(&drv), key)),
        }
    }
    if backing_keys {
        let sub = under(flat, "backing.");
        let b = build(&sub, None).map_err(|m| format!("Could not open backing file: {m}"))?;
        spec.backing = Backing::Spec(Box::new(b));
    }
    let data = under(flat, "data-file.");
    if !data.is_empty() {
        spec.data_file = Some(data_file(&data)?);
    }
    if let Some(Val::Str(s)) = get("data-file") {
        return Err(format!("Cannot find device='{s}' nor node-name='{s}'"));
    }
    if bare_filename || (!file_given && spec.path.is_empty() && !nested) {
        return Err(if drv.is_none() {
            "Must specify either driver or file".into()
        } else {
            "A block device must be specified for \"file\"".into()
        });
    }
    Ok(spec)
}

/// The external data file a `data-file.` key set names: its own `file`
/// node (`data-file.filename`, `data-file.driver=file`) or a raw node over
/// one (`data-file.driver=raw,data-file.file.filename=X`).
fn data_file(flat: &[(String, Val)]) -> Result<String, String> {
    let mut path = None;
    for (k, v) in flat {
        match k.as_str() {
            // The driver only has to be one that reads the file as it is.
            "driver" => match driver(&string(k, v)?)? {
                Driver::File | Driver::Format(Format::Raw) => {}
                Driver::Format(f) => {
                    return Err(format!(
                        "qimg does not implement a {} external data file (raw only)",
                        f.name()
                    ))
                }
            },
            "filename" | "file.filename" => path = Some(string(k, v)?),
            "file.driver" if string(k, v)? == "file" => {}
            other => {
                return Err(unsupported(
                    "protocol",
                    "file",
                    other.trim_start_matches("file."),
                ))
            }
        }
    }
    path.ok_or_else(|| "A block device must be specified for \"data-file\"".into())
}

mod syntax;
use syntax::{parse_json, parse_options};

#[cfg(test)]
mod tests;
