//! A small, bounded JSON reader for LUKS2 metadata: no allocator, values
//! are spans of the caller's text, nesting depth is capped at
//! [`MAX_DEPTH`], and every walk is linear in the text length times the
//! depth.
//!
//! Only what LUKS2 needs is decoded: strings without escapes (escaped
//! strings are still validated and skipped, but a member the metadata
//! model reads must not contain one), unsigned integers, `true`/`false`.

use crate::error::Luks2Problem;

/// The deepest nesting accepted (cryptsetup's metadata is 4 deep; tokens
/// may carry their own objects).
pub(crate) const MAX_DEPTH: u32 = 32;

/// The JSON type of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `{...}`
    Object,
    /// `[...]`
    Array,
    /// `"..."`
    String,
    /// A number.
    Number,
    /// `true`, `false`.
    Bool,
    /// `null`.
    Null,
}

/// A value: its kind and its span `start..end` in the text (strings
/// include their quotes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Val {
    pub(crate) kind: Kind,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// A syntax error at byte `at` of the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JsonError {
    pub(crate) at: usize,
    pub(crate) problem: Luks2Problem,
}

fn err<T>(at: usize, problem: Luks2Problem) -> Result<T, JsonError> {
    Err(JsonError { at, problem })
}

fn skip_ws(t: &[u8], mut i: usize) -> usize {
    while matches!(t.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i = i.saturating_add(1);
    }
    i
}

/// Parses the value starting at or after `i` (whitespace skipped); returns
/// it and the position after it.
pub(crate) fn value(t: &[u8], i: usize, depth: u32) -> Result<(Val, usize), JsonError> {
    if depth > MAX_DEPTH {
        return err(i, Luks2Problem::JsonTooDeep);
    }
    let start = skip_ws(t, i);
    let Some(&c) = t.get(start) else {
        return err(start, Luks2Problem::JsonSyntax);
    };
    let (kind, end) = match c {
        b'{' => (Kind::Object, container(t, start, depth, b'}', true)?),
        b'[' => (Kind::Array, container(t, start, depth, b']', false)?),
        b'"' => (Kind::String, string(t, start)?),
        b'-' | b'0'..=b'9' => (Kind::Number, number(t, start)?),
        b't' => (Kind::Bool, literal(t, start, b"true")?),
        b'f' => (Kind::Bool, literal(t, start, b"false")?),
        b'n' => (Kind::Null, literal(t, start, b"null")?),
        _ => return err(start, Luks2Problem::JsonSyntax),
    };
    Ok((Val { kind, start, end }, end))
}

fn literal(t: &[u8], i: usize, lit: &[u8]) -> Result<usize, JsonError> {
    let end = i.saturating_add(lit.len());
    if t.get(i..end) == Some(lit) {
        Ok(end)
    } else {
        err(i, Luks2Problem::JsonSyntax)
    }
}

fn number(t: &[u8], i: usize) -> Result<usize, JsonError> {
    let mut j = i;
    if t.get(j) == Some(&b'-') {
        j = j.saturating_add(1);
    }
    let digits = |mut j: usize| {
        let s = j;
        while t.get(j).is_some_and(u8::is_ascii_digit) {
            j = j.saturating_add(1);
        }
        (j, j > s)
    };
    let (k, any) = digits(j);
    if !any {
        return err(j, Luks2Problem::JsonSyntax);
    }
    j = k;
    if t.get(j) == Some(&b'.') {
        let (k, any) = digits(j.saturating_add(1));
        if !any {
            return err(j, Luks2Problem::JsonSyntax);
        }
        j = k;
    }
    if matches!(t.get(j), Some(b'e' | b'E')) {
        j = j.saturating_add(1);
        if matches!(t.get(j), Some(b'+' | b'-')) {
            j = j.saturating_add(1);
        }
        let (k, any) = digits(j);
        if !any {
            return err(j, Luks2Problem::JsonSyntax);
        }
        j = k;
    }
    Ok(j)
}

fn string(t: &[u8], i: usize) -> Result<usize, JsonError> {
    let mut j = i.saturating_add(1);
    loop {
        match t.get(j) {
            None => return err(i, Luks2Problem::JsonSyntax),
            Some(b'"') => return Ok(j.saturating_add(1)),
            Some(b'\\') => match t.get(j.saturating_add(1)) {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                    j = j.saturating_add(2);
                }
                Some(b'u') => {
                    let h = t.get(j.saturating_add(2)..j.saturating_add(6));
                    if !h.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                        return err(j, Luks2Problem::JsonSyntax);
                    }
                    j = j.saturating_add(6);
                }
                _ => return err(j, Luks2Problem::JsonSyntax),
            },
            Some(&c) if c < 0x20 => return err(j, Luks2Problem::JsonSyntax),
            Some(_) => j = j.saturating_add(1),
        }
    }
}

fn container(t: &[u8], i: usize, depth: u32, close: u8, object: bool) -> Result<usize, JsonError> {
    let d = depth.saturating_add(1);
    let mut j = skip_ws(t, i.saturating_add(1));
    if t.get(j) == Some(&close) {
        return Ok(j.saturating_add(1));
    }
    loop {
        if object {
            j = skip_ws(t, j);
            if t.get(j) != Some(&b'"') {
                return err(j, Luks2Problem::JsonSyntax);
            }
            j = skip_ws(t, string(t, j)?);
            if t.get(j) != Some(&b':') {
                return err(j, Luks2Problem::JsonSyntax);
            }
            j = j.saturating_add(1);
        }
        let (_, after) = value(t, j, d)?;
        j = skip_ws(t, after);
        match t.get(j) {
            Some(b',') => j = j.saturating_add(1),
            Some(&c) if c == close => return Ok(j.saturating_add(1)),
            _ => return err(j, Luks2Problem::JsonSyntax),
        }
    }
}

/// Parses a whole document: one value, then only whitespace.
pub(crate) fn document(t: &[u8]) -> Result<Val, JsonError> {
    let (v, end) = value(t, 0, 0)?;
    let end = skip_ws(t, end);
    if end != t.len() {
        return err(end, Luks2Problem::JsonSyntax);
    }
    Ok(v)
}

/// The members of an already parsed object, in order, as (raw key bytes
/// without quotes, value).
pub(crate) struct Members<'t> {
    t: &'t [u8],
    at: usize,
    end: usize,
}

impl<'t> Members<'t> {
    /// Members of `obj` (empty if it is not an object).
    pub(crate) fn new(t: &'t [u8], obj: Val) -> Self {
        let at = if obj.kind == Kind::Object {
            obj.start.saturating_add(1)
        } else {
            obj.end
        };
        Self {
            t,
            at,
            end: obj.end,
        }
    }
}

impl<'t> Iterator for Members<'t> {
    type Item = (&'t [u8], Val);

    fn next(&mut self) -> Option<Self::Item> {
        let t = self.t;
        let j = skip_ws(t, self.at);
        if j >= self.end || t.get(j) != Some(&b'"') {
            self.at = self.end;
            return None;
        }
        let kend = string(t, j).ok()?;
        let key = t.get(j.saturating_add(1)..kend.saturating_sub(1))?;
        let c = skip_ws(t, kend);
        let (v, after) = value(t, c.saturating_add(1), 1).ok()?;
        let k = skip_ws(t, after);
        self.at = if t.get(k) == Some(&b',') {
            k.saturating_add(1)
        } else {
            self.end
        };
        Some((key, v))
    }
}

/// The elements of an already parsed array, in order.
pub(crate) struct Elements<'t> {
    t: &'t [u8],
    at: usize,
    end: usize,
}

impl<'t> Elements<'t> {
    /// Elements of `arr` (empty if it is not an array).
    pub(crate) fn new(t: &'t [u8], arr: Val) -> Self {
        let mut at = if arr.kind == Kind::Array {
            arr.start.saturating_add(1)
        } else {
            arr.end
        };
        if t.get(skip_ws(t, at)) == Some(&b']') {
            at = arr.end;
        }
        Self {
            t,
            at,
            end: arr.end,
        }
    }
}

impl Iterator for Elements<'_> {
    type Item = Val;

    fn next(&mut self) -> Option<Val> {
        if self.at >= self.end {
            return None;
        }
        let (v, after) = value(self.t, self.at, 1).ok()?;
        let k = skip_ws(self.t, after);
        self.at = if self.t.get(k) == Some(&b',') {
            k.saturating_add(1)
        } else {
            self.end
        };
        Some(v)
    }
}

/// The first member of `obj` named `key`.
pub(crate) fn get(t: &[u8], obj: Val, key: &str) -> Option<Val> {
    Members::new(t, obj)
        .find(|(k, _)| *k == key.as_bytes())
        .map(|(_, v)| v)
}

/// Short decoded strings (names, numbers, base64): longer ones are refused.
pub(crate) type Text = heapless::String<128>;

/// The decoded text of a string value; `None` for other kinds, for
/// strings longer than [`Text`] holds, and for `\u` escapes outside ASCII.
pub(crate) fn str_of(t: &[u8], v: Val) -> Option<Text> {
    if v.kind != Kind::String {
        return None;
    }
    let raw = t.get(v.start.saturating_add(1)..v.end.saturating_sub(1))?;
    let mut out = Text::new();
    let mut i = 0usize;
    while let Some(&c) = raw.get(i) {
        let (ch, step) = if c == b'\\' {
            match raw.get(i.saturating_add(1))? {
                b'"' => ('"', 2),
                b'\\' => ('\\', 2),
                b'/' => ('/', 2),
                b'b' => ('\u{8}', 2),
                b'f' => ('\u{c}', 2),
                b'n' => ('\n', 2),
                b'r' => ('\r', 2),
                b't' => ('\t', 2),
                b'u' => {
                    let h =
                        core::str::from_utf8(raw.get(i.saturating_add(2)..i.saturating_add(6))?)
                            .ok()?;
                    let n = u8::try_from(u32::from_str_radix(h, 16).ok()?).ok()?;
                    if !n.is_ascii() {
                        return None;
                    }
                    (char::from(n), 6)
                }
                _ => return None,
            }
        } else if c.is_ascii() {
            (char::from(c), 1)
        } else {
            return None;
        };
        out.push(ch).ok()?;
        i = i.saturating_add(step);
    }
    Some(out)
}

/// Parses a decimal `u64` without sign, fraction or exponent.
pub(crate) fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n
            .checked_mul(10)?
            .checked_add(u64::from(c.wrapping_sub(b'0')))?;
    }
    Some(n)
}

/// A JSON number that is a non-negative integer.
pub(crate) fn uint_of(t: &[u8], v: Val) -> Option<u64> {
    if v.kind != Kind::Number {
        return None;
    }
    parse_u64(t.get(v.start..v.end)?)
}

/// A decimal string holding a `u64` (LUKS2 writes 64-bit values so).
pub(crate) fn u64_str_of(t: &[u8], v: Val) -> Option<u64> {
    parse_u64(str_of(t, v)?.as_bytes())
}

/// Decodes standard base64 (with `=` padding) into `out`; returns the
/// length, or `None` if malformed or too long.
pub(crate) fn base64(s: &str, out: &mut [u8]) -> Option<usize> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(4) {
        return None;
    }
    let val = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c.wrapping_sub(b'A'),
            b'a'..=b'z' => c.wrapping_sub(b'a').wrapping_add(26),
            b'0'..=b'9' => c.wrapping_sub(b'0').wrapping_add(52),
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    };
    let mut n = 0usize;
    let quads = b.len() / 4;
    for (qi, q) in b.chunks_exact(4).enumerate() {
        let last = qi.saturating_add(1) == quads;
        let pad = if last {
            q.iter().rev().take_while(|&&c| c == b'=').count()
        } else {
            0
        };
        if pad > 2 {
            return None;
        }
        let mut acc = 0u32;
        for &c in &q[..4usize.saturating_sub(pad)] {
            acc = (acc << 6) | val(c)?;
        }
        acc <<= match pad {
            0 => 0,
            1 => 6,
            _ => 12,
        };
        let bytes = acc.to_be_bytes();
        let take = 3usize.saturating_sub(pad);
        let dst = out.get_mut(n..n.saturating_add(take))?;
        dst.copy_from_slice(&bytes[1..1usize.saturating_add(take)]);
        n = n.saturating_add(take);
    }
    Some(n)
}

/// Encodes `data` as standard base64 with padding into `out`; returns the
/// length, or `None` if `out` is too short.
#[cfg(any(test, feature = "alloc"))]
pub(crate) fn base64_encode(data: &[u8], out: &mut [u8]) -> Option<usize> {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut n = 0usize;
    for c in data.chunks(3) {
        let b0 = u32::from(c[0]);
        let b1 = u32::from(c.get(1).copied().unwrap_or(0));
        let b2 = u32::from(c.get(2).copied().unwrap_or(0));
        let acc = (b0 << 16) | (b1 << 8) | b2;
        let dst = out.get_mut(n..n.saturating_add(4))?;
        for (k, d) in dst.iter_mut().enumerate() {
            let idx = ((acc >> (18usize.saturating_sub(6usize.saturating_mul(k)))) & 63) as usize;
            *d = if k > c.len() { b'=' } else { A[idx] };
        }
        n = n.saturating_add(4);
    }
    Some(n)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_walks() {
        let t = br#" {"a": {"b": ["1", 2, true, null]}, "c": "x\"y", "d": -1.5e3} "#;
        let root = document(t).unwrap();
        let a = get(t, root, "a").unwrap();
        let b = get(t, a, "b").unwrap();
        let els: heapless::Vec<Val, 8> = Elements::new(t, b).collect();
        assert_eq!(els.len(), 4);
        assert_eq!(u64_str_of(t, els[0]), Some(1));
        assert_eq!(uint_of(t, els[1]), Some(2));
        assert_eq!(els[2].kind, Kind::Bool);
        assert_eq!(str_of(t, get(t, root, "c").unwrap()).unwrap(), "x\"y");
        assert_eq!(get(t, root, "d").unwrap().kind, Kind::Number);
        assert_eq!(Members::new(t, root).count(), 3);
        assert_eq!(Elements::new(b"[]", document(b"[]").unwrap()).count(), 0);
    }

    #[test]
    fn rejects_bad_and_deep() {
        for bad in [
            &b"{"[..],
            b"{\"a\"}",
            b"[1,]",
            b"{\"a\":1,}",
            b"\"\x01\"",
            b"01x",
            b"[1] x",
        ] {
            assert!(document(bad).is_err(), "{bad:?}");
        }
        let mut deep = [b'['; 100];
        deep[50..].fill(b']');
        assert_eq!(
            document(&deep).unwrap_err().problem,
            Luks2Problem::JsonTooDeep
        );
    }

    #[test]
    fn base64_round_trip() {
        let mut enc = [0u8; 64];
        let mut dec = [0u8; 48];
        for len in 0..40usize {
            let data: heapless::Vec<u8, 40> = (0..len)
                .map(|i| u8::try_from((i * 37 + 5) % 256).unwrap())
                .collect();
            let n = base64_encode(&data, &mut enc).unwrap();
            let s = core::str::from_utf8(&enc[..n]).unwrap();
            let m = base64(s, &mut dec).unwrap();
            assert_eq!(&dec[..m], &data[..]);
        }
        let esc = br#""Zm9\/Yg==""#;
        let v = document(esc).unwrap();
        assert_eq!(base64(&str_of(esc, v).unwrap(), &mut dec), Some(4));
        assert_eq!(&dec[..4], b"fo\x7fb");
        assert_eq!(base64("Zm9vYg==", &mut dec), Some(4));
        assert_eq!(&dec[..4], b"foob");
        assert!(base64("Zm9v!g==", &mut dec).is_none());
    }
}
