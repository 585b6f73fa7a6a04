//! The two spellings of an option set read into QEMU's flat dotted keys:
//! `key=value,...` (`--image-opts`) and `json:{...}` (a bounded reader:
//! duplicate keys refused, nesting stopped at [`MAX_JSON_DEPTH`]).

use super::{Val, MAX_JSON_DEPTH};

/// Splits QEMU's `key=value,...` syntax: `,,` is a comma inside a value,
/// an empty element is skipped, a later key replaces an earlier one, and
/// a bare `key` is `key=on` (`nokey` is `key=off`), as QEMU reads them;
/// a bare first element names a block node, which qimg (like qemu-img,
/// which has none) cannot find.
pub(super) fn parse_options(s: &str) -> Result<Vec<(String, Val)>, String> {
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
pub(super) fn parse_json(s: &str) -> Result<Vec<(String, Val)>, String> {
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
