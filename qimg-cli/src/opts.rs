//! qemu-img's option syntax: `-o key=value,key=value` lists (with `,,` for a
//! literal comma), `--object secret,id=ID,data=..|file=..[,format=base64]`,
//! and sizes with `k`, `M`, `G`, `T`, `P`, `E` suffixes.

use std::collections::BTreeMap;
use std::fmt;

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
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut items = Vec::new();
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
                        "missing option name before '=' in '{item}'"
                    )));
                }
                out.push((k.to_string(), v.to_string()));
            }
            None => out.push((item, "on".to_string())),
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

/// How a secret object carries its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SecretSource {
    /// `data=...` on the command line.
    Data(String),
    /// `file=PATH`.
    File(String),
}

/// A parsed `--object secret,...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SecretObject {
    /// `id=`.
    pub(crate) id: String,
    /// Where the bytes come from.
    pub(crate) source: SecretSource,
    /// `format=base64` (the default is `raw`).
    pub(crate) base64: bool,
}

/// Parses an `--object` argument. Only `secret` objects exist in qimg.
pub(crate) fn parse_object(s: &str) -> Result<SecretObject, OptError> {
    let mut items = split_list(s)?.into_iter();
    let (kind, on) = items
        .next()
        .ok_or_else(|| OptError("empty --object".into()))?;
    let kind = if on == "on" {
        kind
    } else if kind == "qom-type" {
        on
    } else {
        return Err(OptError(format!(
            "--object '{s}' must start with the object type, e.g. secret,id=sec0,data=..."
        )));
    };
    if kind != "secret" {
        return Err(OptError(format!(
            "object type '{kind}' is not supported; qimg knows 'secret'"
        )));
    }
    let (mut id, mut data, mut file, mut base64) = (None, None, None, false);
    for (k, v) in items {
        match k.as_str() {
            "id" => id = Some(v),
            "data" => data = Some(v),
            "file" => file = Some(v),
            "format" => {
                base64 = match v.as_str() {
                    "raw" => false,
                    "base64" => true,
                    _ => {
                        return Err(OptError(format!(
                            "secret format '{v}' is not 'raw' or 'base64'"
                        )))
                    }
                }
            }
            // Accepted for compatibility; qimg has no key-wrapping secrets.
            "keyid" | "iv" => {
                return Err(OptError(format!(
                    "secret parameter '{k}' (encrypted secrets) is not supported"
                )))
            }
            _ => return Err(OptError(format!("invalid secret parameter '{k}'"))),
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
pub(crate) fn redact(s: &str) -> String {
    s.split(',')
        .map(|p| {
            if p.starts_with("data=") {
                "data=<hidden>"
            } else {
                p
            }
        })
        .collect::<Vec<_>>()
        .join(",")
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
        assert_eq!(o.source, SecretSource::Data("pa,ss".into()));
        let o = parse_object("secret,id=k,file=/tmp/x,format=base64").unwrap();
        assert!(o.base64);
        assert_eq!(o.source, SecretSource::File("/tmp/x".into()));
        assert!(parse_object("secret,data=x").is_err());
        assert!(parse_object("secret,id=a").is_err());
        assert!(parse_object("secret,id=a,data=x,file=y").is_err());
        assert!(parse_object("tls-creds-x509,id=a").is_err());
        assert!(parse_object("secret,id=a,data=x,format=hex").is_err());
        let e = parse_object("secret,data=hunter2").unwrap_err();
        assert!(!e.0.contains("hunter2"), "{e}");
    }
}
