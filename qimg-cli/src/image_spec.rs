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
            Err(e) => Err(self.error(&format!("Could not open '{path}': {}", strerror(&e)))),
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

/// The C library's text for an I/O error, without Rust's ` (os error N)`.
pub(crate) fn strerror(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// qemu-img's wrapper around every open failure.
fn could_not_open(text: &str, msg: &str) -> CliError {
    CliError::usage(format!("Could not open '{text}': {msg}"))
}

/// Splits QEMU's `key=value,...` syntax: `,,` is a comma inside a value,
/// an empty element is skipped, a later key replaces an earlier one, and
/// a bare `key` is `key=on` (`nokey` is `key=off`), as QEMU reads them;
/// a bare first element names a block node, which qimg (like qemu-img,
/// which has none) cannot find.
fn parse_options(s: &str) -> Result<Vec<(String, Val)>, String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    if let Some(first) = items.first().filter(|i| !i.is_empty() && !i.contains('=')) {
        return Err(format!(
            "Cannot find device='{first}' nor node-name='{first}'"
        ));
    }
    let mut out: Vec<(String, Val)> = Vec::new();
    for item in items.into_iter().filter(|i| !i.is_empty()) {
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match item.strip_prefix("no") {
                Some(k) => (k.to_string(), "off".to_string()),
                None => (item.clone(), "on".to_string()),
            },
        };
        out.retain(|(old, _)| *old != k);
        out.push((k, Val::Str(v)));
    }
    Ok(out)
}

/// Parses the JSON after `json:` into flattened dotted keys, with the
/// messages QEMU's parser gives.
fn parse_json(s: &str) -> Result<Vec<(String, Val)>, String> {
    let mut p = Json {
        s: s.as_bytes(),
        at: 0,
    };
    p.ws();
    if p.at >= p.s.len() {
        return Err("Could not parse the JSON options: Expecting a JSON value".into());
    }
    let v = p
        .value(0)
        .map_err(|e| format!("Could not parse the JSON options: JSON parse error, {e}"))?;
    p.ws();
    if p.at < p.s.len() {
        return Err("Could not parse the JSON options: Expecting at most one JSON value".into());
    }
    let JsonVal::Obj(members) = v else {
        return Err("Invalid JSON object given".into());
    };
    let mut out = Vec::new();
    flatten("", members, &mut out)?;
    Ok(out)
}

/// A parsed JSON value.
enum JsonVal {
    Str(String),
    /// A number, `true` or `false`, in its text form.
    Scalar(String),
    Null,
    Arr,
    Obj(Vec<(String, JsonVal)>),
}

/// Turns nested objects into dotted keys, as QEMU's `qdict_flatten`.
fn flatten(
    prefix: &str,
    members: Vec<(String, JsonVal)>,
    out: &mut Vec<(String, Val)>,
) -> Result<(), String> {
    for (k, v) in members {
        let key = format!("{prefix}{k}");
        match v {
            JsonVal::Str(s) | JsonVal::Scalar(s) => out.push((key, Val::Str(s))),
            JsonVal::Null => out.push((key, Val::Null)),
            JsonVal::Arr => {
                return Err(format!(
                    "Invalid parameter type for '{key}', expected: string"
                ))
            }
            JsonVal::Obj(inner) => flatten(&format!("{key}."), inner, out)?,
        }
    }
    Ok(())
}

/// A small bounded JSON reader (objects, arrays, strings, numbers,
/// keywords), refusing duplicate keys as QEMU does.
struct Json<'a> {
    s: &'a [u8],
    at: usize,
}

impl Json<'_> {
    fn ws(&mut self) {
        while self
            .s
            .get(self.at)
            .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
        {
            self.at += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn value(&mut self, depth: usize) -> Result<JsonVal, String> {
        if depth > MAX_JSON_DEPTH {
            return Err("too deeply nested".into());
        }
        self.ws();
        match self.peek() {
            None => Err("premature EOI".into()),
            Some(b'{') => {
                self.at += 1;
                let mut members: Vec<(String, JsonVal)> = Vec::new();
                self.ws();
                if self.peek() == Some(b'}') {
                    self.at += 1;
                    return Ok(JsonVal::Obj(members));
                }
                loop {
                    self.ws();
                    match self.peek() {
                        None => return Err("premature EOI".into()),
                        Some(b'"') => {}
                        Some(b'}') => return Err("expecting value".into()),
                        Some(_) => return Err("key is not a string in object".into()),
                    }
                    let key = self.string()?;
                    self.ws();
                    match self.peek() {
                        None => return Err("premature EOI".into()),
                        Some(b':') => self.at += 1,
                        Some(_) => return Err("missing : in object pair".into()),
                    }
                    let v = self.value(depth + 1)?;
                    if members.iter().any(|(k, _)| *k == key) {
                        return Err("duplicate key".into());
                    }
                    members.push((key, v));
                    self.ws();
                    match self.peek() {
                        None => return Err("premature EOI".into()),
                        Some(b',') => self.at += 1,
                        Some(b'}') => {
                            self.at += 1;
                            return Ok(JsonVal::Obj(members));
                        }
                        Some(_) => return Err("expected separator in dict".into()),
                    }
                }
            }
            Some(b'[') => {
                self.at += 1;
                self.ws();
                if self.peek() == Some(b']') {
                    self.at += 1;
                    return Ok(JsonVal::Arr);
                }
                loop {
                    self.value(depth + 1)?;
                    self.ws();
                    match self.peek() {
                        None => return Err("premature EOI".into()),
                        Some(b',') => self.at += 1,
                        Some(b']') => {
                            self.at += 1;
                            return Ok(JsonVal::Arr);
                        }
                        Some(_) => return Err("expected separator in list".into()),
                    }
                }
            }
            Some(b'"') => self.string().map(JsonVal::Str),
            Some(b'}' | b']' | b',' | b':') => Err("expecting value".into()),
            Some(c) if c == b'-' || c.is_ascii_digit() => {
                let start = self.at;
                while self.peek().is_some_and(|c| {
                    c.is_ascii_digit() || matches!(c, b'-' | b'+' | b'.' | b'e' | b'E')
                }) {
                    self.at += 1;
                }
                let text = String::from_utf8_lossy(&self.s[start..self.at]).into_owned();
                if text.parse::<f64>().is_err() {
                    return Err(format!("invalid number '{text}'"));
                }
                Ok(JsonVal::Scalar(text))
            }
            Some(_) => {
                let start = self.at;
                while self.peek().is_some_and(|c| c.is_ascii_alphabetic()) {
                    self.at += 1;
                }
                let word = String::from_utf8_lossy(&self.s[start..self.at]).into_owned();
                match word.as_str() {
                    "true" => Ok(JsonVal::Scalar("on".into())),
                    "false" => Ok(JsonVal::Scalar("off".into())),
                    "null" => Ok(JsonVal::Null),
                    "" => Err("stray character".into()),
                    other => Err(format!("invalid keyword '{other}'")),
                }
            }
        }
    }

    /// A string at `"`, escapes decoded.
    fn string(&mut self) -> Result<String, String> {
        self.at += 1;
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err("premature EOI".into());
            };
            self.at += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(e) = self.peek() else {
                        return Err("premature EOI".into());
                    };
                    self.at += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let cp = if (0xd800..0xdc00).contains(&hi)
                                && self.s.get(self.at..self.at + 2) == Some(b"\\u")
                            {
                                self.at += 2;
                                let lo = self.hex4()?;
                                0x10000 + ((hi - 0xd800) << 10) + (lo.wrapping_sub(0xdc00) & 0x3ff)
                            } else {
                                hi
                            };
                            char::from_u32(cp).ok_or("invalid escape sequence in string")?
                        }
                        _ => return Err("invalid escape sequence in string".into()),
                    };
                    let mut b = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut b).as_bytes());
                }
                _ => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| "invalid UTF-8 sequence in string".into())
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let digits = self
            .s
            .get(self.at..self.at + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u32::from_str_radix(d, 16).ok())
            .ok_or("invalid hex escape sequence in string")?;
        self.at += 4;
        Ok(digits)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> Result<ImageSpec, String> {
        ImageSpec::from_arg(s, true, None).map_err(|e| e.msg)
    }

    fn json(s: &str) -> Result<ImageSpec, String> {
        ImageSpec::from_arg(s, false, None).map_err(|e| e.msg)
    }

    #[test]
    fn option_lists_name_file_driver_secret_backing_and_data_file() {
        let s = opts(
            "driver=qcow2,file.driver=file,file.filename=/x/a.qcow2,encrypt.key-secret=s0,\
             encrypt.format=luks,backing.file.filename=b.qcow2,backing.encrypt.key-secret=s1,\
             data-file.filename=d.raw",
        )
        .unwrap();
        assert_eq!(s.path, "/x/a.qcow2");
        assert_eq!(s.format, Some(Format::Qcow2));
        assert_eq!(s.key_secret.as_deref(), Some("s0"));
        assert_eq!(s.encrypt_format.as_deref(), Some("luks"));
        assert_eq!(s.data_file.as_deref(), Some("d.raw"));
        let Backing::Spec(b) = &s.backing else {
            panic!("backing spec expected: {:?}", s.backing)
        };
        assert_eq!(b.path, "b.qcow2");
        assert_eq!(b.format, None, "a backing spec without driver is probed");
        assert_eq!(b.key_secret.as_deref(), Some("s1"));
        let l = opts("driver=luks,key-secret=k,file.filename=v").unwrap();
        assert_eq!(
            (l.format, l.key_secret.as_deref()),
            (Some(Format::Luks), Some("k"))
        );
        assert!(l.check_format(Format::Luks).is_ok());
        let e = s.check_format(Format::Raw).unwrap_err().msg;
        assert!(
            e.contains("Block format 'raw' does not support the option 'encrypt.key-secret'"),
            "{e}"
        );
        let f = opts("driver=file,filename=x.img").unwrap();
        assert_eq!((f.path.as_str(), f.format), ("x.img", Some(Format::Raw)));
        let p = opts("file.filename=probe.img").unwrap();
        assert_eq!((p.path.as_str(), p.format), ("probe.img", None));
        let n = opts("driver=qcow2,file.filename=o,backing=").unwrap();
        assert_eq!(n.backing, Backing::Without);
    }

    #[test]
    fn doubled_commas_are_commas_and_later_keys_win() {
        let s = opts("driver=qcow2,file.filename=a,,b.qcow2,").unwrap();
        assert_eq!(s.path, "a,b.qcow2");
        let s = opts("driver=qcow2,file.filename=a,driver=raw").unwrap();
        assert_eq!(s.format, Some(Format::Raw));
        let s = opts("driver=qcow2,file.filename=x,file.filename=y").unwrap();
        assert_eq!(s.path, "y");
    }

    #[test]
    fn json_nesting_and_dotted_keys_mean_the_same() {
        let a = json(r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"a.qcow2"},"encrypt":{"key-secret":"s0"},"backing":{"driver":"raw","file":{"filename":"b\"c.raw"}}}"#).unwrap();
        let b = json(r#"json:{"driver":"qcow2","file.filename":"a.qcow2","encrypt.key-secret":"s0","backing.driver":"raw","backing.file.filename":"b\u0022c.raw"}"#).unwrap();
        assert_eq!(a.path, "a.qcow2");
        assert_eq!(a.key_secret.as_deref(), Some("s0"));
        let Backing::Spec(bs) = &a.backing else {
            panic!()
        };
        assert_eq!(
            (bs.path.as_str(), bs.format),
            ("b\"c.raw", Some(Format::Raw))
        );
        assert_eq!(
            (a.path.clone(), a.key_secret.clone(), a.backing.clone()),
            (b.path, b.key_secret, b.backing)
        );
        let n = json(r#"json:{"driver":"qcow2","file":{"filename":"o"},"backing":null}"#).unwrap();
        assert_eq!(n.backing, Backing::Without);
        // A plain name is a path, and -f names the driver of a json: spec without one.
        assert_eq!(json("x,y.qcow2").unwrap().path, "x,y.qcow2");
        let f = ImageSpec::from_arg(
            r#"json:{"file":{"filename":"o"}}"#,
            false,
            Some(Format::Raw),
        )
        .unwrap();
        assert_eq!(f.format, Some(Format::Raw));
        let ws = json(" json:{}");
        assert_eq!(
            ws.unwrap().path,
            " json:{}",
            "only a leading json: is a spec"
        );
    }

    #[test]
    fn discard_no_unref_is_a_qcow2_option() {
        for v in ["on", "true", "yes", "off", "false", "no"] {
            let arg = format!("driver=qcow2,discard-no-unref={v},file.filename=o");
            let spec = ImageSpec::from_arg(&arg, true, None).unwrap();
            assert_eq!(spec.path, "o");
            spec.check_format(Format::Qcow2).unwrap();
        }
        let raw = ImageSpec::from_arg("discard-no-unref=on,file.filename=o", true, None).unwrap();
        let e = raw.check_format(Format::Raw).unwrap_err();
        assert!(
            e.msg
                .contains("Block format 'raw' does not support the option 'discard-no-unref'"),
            "{}",
            e.msg
        );
    }

    #[test]
    fn errors_have_qemu_img_wording() {
        let cases: &[(&str, bool, &str)] = &[
            ("driver=qcow2,file.filename=a,bogus=1", true, "Could not open 'driver=qcow2,file.filename=a,bogus=1': Block format 'qcow2' does not support the option 'bogus'"),
            ("driver=qcow2,file.filename=a,file.bogus=1", true, "Block protocol 'file' doesn't support the option 'bogus'"),
            ("driver=foo,file.filename=a", true, "Could not open 'driver=foo,file.filename=a': Unknown driver 'foo'"),
            ("driver=qcow2,file.driver=foo,file.filename=a", true, "Unknown driver 'foo'"),
            ("driver=qcow2", true, "A block device must be specified for \"file\""),
            ("driver=qcow2,filename=a", true, "A block device must be specified for \"file\""),
            ("", true, "Could not open '': Must specify either driver or file"),
            ("a.qcow2", true, "Could not open 'a.qcow2': Cannot find device='a.qcow2' nor node-name='a.qcow2'"),
            ("file.filename=a.qcow2,xyz", true, "Block format 'qcow2' does not support the option 'xyz'"),
            ("driver=qcow2,file=a.qcow2", true, "Cannot find device='a.qcow2' nor node-name='a.qcow2'"),
            ("driver=qcow2,file.filename=a,novalue", true, "does not support the option 'value'"),
            ("driver=qcow2,file.filename=a,=x", true, "does not support the option ''"),
            ("driver=vmdk,file.filename=a", true, "qimg does not implement the driver 'vmdk'"),
            ("driver=qcow2,file.filename=a,l2-cache-size=1M", true, "qimg does not implement the option 'l2-cache-size'"),
            ("driver=qcow2,file.filename=a,discard-no-unref=1", true, "Parameter 'discard-no-unref' expects 'on' or 'off'"),
            ("driver=qcow2,file.filename=a,file.discard-no-unref=on", true, "Block protocol 'file' doesn't support the option 'discard-no-unref'"),
            ("driver=qcow2,file.filename=o,backing.driver=qcow2,backing.file.filename=b,backing.bogus=1", true, "Could not open backing file: Block format 'qcow2' does not support the option 'bogus'"),
            (r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"a.qcow2"}"#, false, "Could not parse the JSON options: JSON parse error, premature EOI"),
            (r#"json:{"driver":"qcow2","file":{"filename":"o"}}x"#, false, "Could not parse the JSON options: Expecting at most one JSON value"),
            (r#"json:{"driver":"qcow2","file":{"filename":"o"},"driver":"raw"}"#, false, "JSON parse error, duplicate key"),
            (r#"json:{"driver":"qcow2" "file":{"filename":"o"}}"#, false, "JSON parse error, expected separator in dict"),
            (r#"json:{"driver":qcow2}"#, false, "JSON parse error, invalid keyword 'qcow'"),
            (r#"json:{"driver":"qcow2","file":{"filename":"o"},}"#, false, "JSON parse error, expecting value"),
            ("json:", false, "Could not open 'json:': Could not parse the JSON options: Expecting a JSON value"),
            ("json:[1]", false, "Could not open 'json:[1]': Invalid JSON object given"),
            (r#"json:{"driver":"qcow2","file":{"filename":"o", "x":1}}"#, false, "Block protocol 'file' doesn't support the option 'x'"),
            (r#"json:{"driver":"qcow2","file":{"filename":"o"},"backing":"b"}"#, false, "Could not open backing file: Cannot find device='b' nor node-name='b'"),
        ];
        for (arg, image_opts, want) in cases {
            let got = ImageSpec::from_arg(arg, *image_opts, None)
                .map(|_| ())
                .unwrap_err();
            assert!(got.msg.contains(want), "{arg}: {} (wanted {want})", got.msg);
            assert_eq!(got.code, 1, "{arg}");
        }
        let e = ImageSpec::from_arg("driver=qcow2,file.filename=a", true, Some(Format::Qcow2))
            .unwrap_err();
        assert_eq!(e.msg, "--image-opts and --format are mutually exclusive");
    }

    #[test]
    fn json_depth_and_odd_bytes_never_panic() {
        let deep = format!("json:{}{}", "{\"a\":".repeat(200), "}".repeat(200));
        assert!(json(&deep).unwrap_err().contains("too deeply nested"));
        for s in [
            "json:{\"a\":\"\\u12\"}",
            "json:{\"a\":\"\\ud800\\u0041\"}",
            "json:{\"\\",
            "json:{\"a\":-}",
            "json:{\"a\":[1,}",
        ] {
            assert!(json(s).is_err(), "{s}");
        }
    }

    #[test]
    fn encryption_format_is_checked_against_the_header() {
        use qcow_core::CryptMethod;
        let s = opts("driver=qcow2,file.filename=e,encrypt.format=aes").unwrap();
        assert!(s
            .check_encryption(CryptMethod::Luks)
            .unwrap_err()
            .msg
            .ends_with("Header reported 'luks' encryption format but options specify 'aes'"));
        assert!(s.check_encryption(CryptMethod::Aes).is_ok());
        assert!(s
            .check_encryption(CryptMethod::None)
            .unwrap_err()
            .msg
            .contains("No encryption in image header, but options specified format 'aes'"));
        assert!(ImageSpec::path("x", None)
            .check_encryption(CryptMethod::Luks)
            .is_ok());
        let u = opts("driver=qcow2,file.filename=e,encrypt.bogus=1").unwrap();
        assert!(
            u.check_encryption(CryptMethod::None).is_ok(),
            "read only when encrypted"
        );
        let e = u.check_encryption(CryptMethod::Luks).unwrap_err().msg;
        assert!(e.ends_with("Parameter 'bogus' is unexpected"), "{e}");
        assert!(u.check_format(Format::Luks).is_err());
    }
}
