//! qemu-img's option syntax: `-o key=value,key=value` lists (with `,,` for a
//! literal comma), `--object secret,id=ID,data=..|file=..[,format=base64]`,
//! and sizes with `k`, `M`, `G`, `T`, `P`, `E` suffixes.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;

use zeroize::Zeroizing;

/// A parse error in an option string, with the offending text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OptError(pub String);

impl fmt::Display for OptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OptError {}

/// Splits a qemu-style option list into `(key, value)` pairs, in order.
///
/// `,,` is a literal comma inside a value. A bare word with no `=` is taken
/// as `word=on` (qemu's boolean shorthand), except as the first element of
/// an `--object` string where it names the object type (see
/// [`parse_object`]).
pub(crate) fn split_list(s: &str) -> Result<Vec<(String, String)>, OptError> {
    Ok(split_scrubbed(s)?
        .into_iter()
        .map(|(mut k, mut v)| (std::mem::take(&mut *k), std::mem::take(&mut *v)))
        .collect())
}

/// A `(key, value)` pair that is wiped on drop.
type ScrubbedPair = (Zeroizing<String>, Zeroizing<String>);

/// [`split_list`] whose scratch buffers and results are wiped on drop, for
/// strings that may hold a secret. No buffer is reallocated while it is
/// filled (each is sized for the whole of `s`), so no unwiped copy is left.
/// Error messages quote `s`; callers with secrets redact them.
fn split_scrubbed(s: &str) -> Result<Vec<ScrubbedPair>, OptError> {
    let fresh = || Zeroizing::new(String::with_capacity(s.len()));
    let mut out = Vec::new();
    let mut cur = fresh();
    let mut chars = s.chars().peekable();
    let mut items = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::replace(&mut cur, fresh()));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    for item in items {
        if item.is_empty() {
            if s.is_empty() {
                continue;
            }
            return Err(OptError(format!("empty element in option list '{s}'")));
        }
        match item.split_once('=') {
            Some((k, v)) => {
                if k.is_empty() {
                    return Err(OptError(format!(
                        "missing option name before '=' in '{}'",
                        item.as_str()
                    )));
                }
                out.push((Zeroizing::new(k.to_string()), Zeroizing::new(v.to_string())));
            }
            None => out.push((item, Zeroizing::new("on".to_string()))),
        }
    }
    Ok(out)
}

/// Options given with one or more `-o`; later values win, as in qemu-img.
#[derive(Debug, Default, Clone)]
pub(crate) struct OptionMap {
    map: BTreeMap<String, String>,
    used: std::cell::RefCell<std::collections::BTreeSet<String>>,
}

impl OptionMap {
    /// Parses and merges every `-o` argument.
    pub(crate) fn parse<S: AsRef<str>>(args: &[S]) -> Result<Self, OptError> {
        let mut map = BTreeMap::new();
        for a in args {
            for (k, v) in split_list(a.as_ref())? {
                if k == "help" || k == "?" {
                    return Err(OptError(
                        "use `qimg create --help` for the list of options".into(),
                    ));
                }
                map.insert(k, v);
            }
        }
        Ok(Self {
            map,
            used: Default::default(),
        })
    }

    /// The raw value of `key`, marking it used.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        let v = self.map.get(key).map(String::as_str);
        if v.is_some() {
            self.used.borrow_mut().insert(key.to_string());
        }
        v
    }

    /// A size option.
    pub(crate) fn get_size(&self, key: &str) -> Result<Option<u64>, OptError> {
        self.get(key).map(parse_size).transpose()
    }

    /// An integer option.
    pub(crate) fn get_u64(&self, key: &str) -> Result<Option<u64>, OptError> {
        self.get(key)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| OptError(format!("parameter '{key}' expects a number, got '{v}'")))
            })
            .transpose()
    }

    /// Errors on the first option nobody asked for, as qemu-img does
    /// ("Invalid parameter 'x'").
    pub(crate) fn reject_unused(&self, format: &str) -> Result<(), OptError> {
        let used = self.used.borrow();
        match self.map.keys().find(|k| !used.contains(*k)) {
            Some(k) => Err(OptError(format!(
                "invalid parameter '{k}' for format {format}; see `qimg create --help`"
            ))),
            None => Ok(()),
        }
    }
}

/// Parses a size: a number (possibly with a decimal fraction) and an
/// optional binary suffix `b`, `k`/`K`, `M`, `G`, `T`, `P`, `E` as qemu-img
/// accepts them. Bare numbers are bytes.
pub(crate) fn parse_size(s: &str) -> Result<u64, OptError> {
    let bad = || {
        OptError(format!(
            "invalid size '{s}': expected a number with an optional k, M, G, T, P or E suffix"
        ))
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(bad());
    }
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" | "KiB" => 10,
        "M" | "m" | "MiB" => 20,
        "G" | "g" | "GiB" => 30,
        "T" | "t" | "TiB" => 40,
        "P" | "p" | "PiB" => 50,
        "E" | "e" | "EiB" => 60,
        _ => return Err(bad()),
    };
    let value = if let Some((int, frac)) = num.split_once('.') {
        if frac.contains('.') || (int.is_empty() && frac.is_empty()) {
            return Err(bad());
        }
        // qemu-img takes fractions ("1.5G"); compute exactly in u128.
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| bad())?
        };
        let digits = u32::try_from(frac.len()).map_err(|_| bad())?;
        let frac_v: u128 = if frac.is_empty() {
            0
        } else {
            frac.parse().map_err(|_| bad())?
        };
        let scale = 10u128.checked_pow(digits).ok_or_else(bad)?;
        let whole = (int << shift)
            .checked_add((frac_v << shift) / scale)
            .ok_or_else(bad)?;
        u64::try_from(whole).map_err(|_| bad())?
    } else {
        let n: u64 = num.parse().map_err(|_| bad())?;
        n.checked_mul(1u64 << shift).ok_or_else(bad)?
    };
    Ok(value)
}

/// A passphrase or key file's bytes: no `Clone`, a redacted `Debug`, and
/// the whole allocation wiped on drop. Defined here, beside the `--object`
/// parser that creates the first ones, so the fuzz harness (which compiles
/// this file on its own) gets it too; the CLI uses it as
/// `crate::secret::Secret`.
pub(crate) struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// Takes `bytes` without copying them.
    pub(crate) fn from_vec(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Takes the bytes of `s` without copying them (for a `String` that
    /// `rpassword` or the option parser handed over).
    pub(crate) fn from_string(s: String) -> Self {
        Self::from_vec(s.into_bytes())
    }

    /// Copies `bytes` into a new buffer of exactly their length.
    pub(crate) fn copy_from(bytes: &[u8]) -> Self {
        let mut v = Vec::with_capacity(bytes.len());
        v.extend_from_slice(bytes);
        Self::from_vec(v)
    }
}

impl Deref for Secret {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// How a secret object carries its data.
#[derive(Debug)]
pub(crate) enum SecretSource {
    /// `data=...` on the command line (a [`Secret`]: redacted in `Debug`,
    /// wiped on drop).
    Data(Secret),
    /// `file=PATH`.
    File(String),
}

/// A parsed `--object secret,...`. Not `Clone`: its `data=` bytes exist
/// once; `Debug` shows them as `[redacted]`.
#[derive(Debug)]
pub(crate) struct SecretObject {
    /// `id=`.
    pub(crate) id: String,
    /// Where the bytes come from.
    pub(crate) source: SecretSource,
    /// `format=base64` (the default is `raw`).
    pub(crate) base64: bool,
}

/// Parses an `--object` argument. Only `secret` objects exist in qimg.
///
/// The `data=` value moves from the parser's wiped-on-drop scratch buffers
/// into a [`Secret`] without a further copy; error messages never quote it.
pub(crate) fn parse_object(s: &str) -> Result<SecretObject, OptError> {
    let mut items = split_scrubbed(s)
        .map_err(|_| {
            OptError(format!(
                "--object '{}' has an empty element or an '=' with no name before it",
                redact(s)
            ))
        })?
        .into_iter();
    let (kind, on) = items
        .next()
        .ok_or_else(|| OptError("empty --object".into()))?;
    let kind = if on.as_str() == "on" {
        kind
    } else if kind.as_str() == "qom-type" {
        on
    } else {
        return Err(OptError(format!(
            "--object '{}' must start with the object type, e.g. secret,id=sec0,data=...",
            redact(s)
        )));
    };
    if kind.as_str() != "secret" {
        return Err(OptError(format!(
            "object type '{}' is not supported; qimg knows 'secret'",
            kind.as_str()
        )));
    }
    let (mut id, mut data, mut file, mut base64) = (None, None, None, false);
    for (k, mut v) in items {
        match k.as_str() {
            "id" => id = Some(v.to_string()),
            "data" => data = Some(Secret::from_string(std::mem::take(&mut *v))),
            "file" => file = Some(v.to_string()),
            "format" => {
                base64 = match v.as_str() {
                    "raw" => false,
                    "base64" => true,
                    _ => {
                        return Err(OptError(format!(
                            "secret format '{}' is not 'raw' or 'base64'",
                            v.as_str()
                        )))
                    }
                }
            }
            // Accepted for compatibility; qimg has no key-wrapping secrets.
            "keyid" | "iv" => {
                return Err(OptError(format!(
                    "secret parameter '{}' (encrypted secrets) is not supported",
                    k.as_str()
                )))
            }
            _ => {
                return Err(OptError(format!(
                    "invalid secret parameter '{}'",
                    k.as_str()
                )))
            }
        }
    }
    let id = id.ok_or_else(|| OptError(format!("--object '{}' needs id=", redact(s))))?;
    let source = match (data, file) {
        (Some(d), None) => SecretSource::Data(d),
        (None, Some(f)) => SecretSource::File(f),
        _ => {
            return Err(OptError(format!(
                "secret '{id}' needs exactly one of data= or file="
            )))
        }
    };
    Ok(SecretObject { id, source, base64 })
}

/// An option string with any `data=` value replaced, for error messages.
/// Elements are split as [`split_list`] does (`,,` stays inside a value), so
/// no part of a value with a comma in it is shown.
pub(crate) fn redact(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    loop {
        // The end of this element: the first single comma.
        let b = rest.as_bytes();
        let mut end = 0;
        while end < b.len() {
            if b[end] == b',' {
                if b.get(end + 1) == Some(&b',') {
                    end += 2;
                    continue;
                }
                break;
            }
            end += 1;
        }
        let elem = &rest[..end];
        out.push_str(if elem.starts_with("data=") {
            "data=<hidden>"
        } else {
            elem
        });
        if end == rest.len() {
            return out;
        }
        out.push(',');
        rest = &rest[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_split_on_single_commas() {
        assert_eq!(
            split_list("a=1,b=x,,y,c").unwrap(),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x,y".into()),
                ("c".into(), "on".into())
            ]
        );
        assert!(split_list("a=1,,").is_ok());
        assert!(split_list("a=1,").is_err());
        assert!(split_list("=1").is_err());
        assert_eq!(split_list("").unwrap(), vec![]);
    }

    #[test]
    fn option_map_merges_and_reports_unused() {
        let m = OptionMap::parse(&[
            "cluster_size=4k,lazy_refcounts=on",
            "cluster_size=64k,bogus=1",
        ])
        .unwrap();
        assert_eq!(m.get_size("cluster_size").unwrap(), Some(65536));
        assert_eq!(m.get("lazy_refcounts"), Some("on"));
        let e = m.reject_unused("qcow2").unwrap_err();
        assert!(e.0.contains("'bogus'"), "{e}");
        assert!(m.get_u64("bogus").unwrap().is_some());
        m.reject_unused("qcow2").unwrap();
    }

    #[test]
    fn sizes_like_qemu_img() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("1k").unwrap(), 1024);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("16M").unwrap(), 16 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("4T").unwrap(), 4 << 40);
        assert_eq!(parse_size("0.5k").unwrap(), 512);
        for bad in ["", "k", "1x", "1.2.3", "99999999999999999999", "16E", "-1"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secret_objects() {
        let o = parse_object("secret,id=sec0,data=pa,,ss").unwrap();
        assert_eq!(o.id, "sec0");
        assert!(matches!(&o.source, SecretSource::Data(d) if &d[..] == b"pa,ss"));
        let o = parse_object("qom-type=secret,id=q,data=x").unwrap();
        assert_eq!(o.id, "q");
        let o = parse_object("secret,id=k,file=/tmp/x,format=base64").unwrap();
        assert!(o.base64);
        assert!(matches!(&o.source, SecretSource::File(f) if f == "/tmp/x"));
        assert!(parse_object("secret,data=x").is_err());
        assert!(parse_object("secret,id=a").is_err());
        assert!(parse_object("secret,id=a,data=x,file=y").is_err());
        assert!(parse_object("tls-creds-x509,id=a").is_err());
        assert!(parse_object("secret,id=a,data=x,format=hex").is_err());
        assert!(parse_object("secret,id=a,keyid=b,data=x").is_err());
        assert!(parse_object("").is_err());
    }

    #[test]
    fn object_errors_and_debug_never_show_the_data() {
        for bad in [
            "secret,data=hunter2",
            "secret,data=hun,,ter2",
            "id=a,data=hunter2",
            "secret,id=a,data=hunter2,",
            "secret,id=a,data=hunter2,,,",
            "secret,id=a,data=hunter2,=x",
            "secret,id=a,data=hunter2,file=f",
            "secret,id=a,data=hunter2,bogus=1",
        ] {
            let e = parse_object(bad).unwrap_err();
            assert!(
                !e.0.contains("hunter2") && !e.0.contains("ter2"),
                "{bad}: {e}"
            );
        }
        let o = parse_object("secret,id=a,data=hun,,ter2").unwrap();
        let d = format!("{o:?}");
        assert!(!d.contains("ter2") && d.contains("[redacted]"), "{d}");
    }

    #[test]
    fn redact_hides_whole_data_values() {
        assert_eq!(redact("secret,id=a,data=x"), "secret,id=a,data=<hidden>");
        assert_eq!(
            redact("secret,data=a,,b,,,id=c"),
            "secret,data=<hidden>,id=c"
        );
        assert_eq!(redact("a,,b,data="), "a,,b,data=<hidden>");
        assert_eq!(redact(""), "");
        assert_eq!(redact("x,"), "x,");
    }

    #[test]
    fn scrubbed_split_matches_split_list() {
        for s in ["a=1,b=x,,y,c", "", "secret,id=a,data=p,,w"] {
            let plain = split_list(s).unwrap();
            let scrubbed: Vec<(String, String)> = split_scrubbed(s)
                .unwrap()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(plain, scrubbed, "{s}");
        }
    }
}
