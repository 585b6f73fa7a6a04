//! The JSON text of LUKS2 metadata, and what an update keeps verbatim from
//! the text it replaces (the `tokens` object and config flags).

extern crate alloc;

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write as _;

use super::super::json::{self, base64_encode};
use super::super::meta::{Kdf, Keyslot, Metadata};
use crate::hash::HashAlg;

fn b64(data: &[u8]) -> String {
    let mut out = vec![0u8; data.len().div_ceil(3).saturating_mul(4)];
    let n = base64_encode(data, &mut out).unwrap_or(0);
    out.truncate(n);
    String::from_utf8(out).unwrap_or_default()
}

fn ids(mask: u32) -> String {
    let mut s = String::from("[");
    let mut first = true;
    for i in 0..32u32 {
        if mask & (1u32 << i) != 0 {
            if !first {
                s.push(',');
            }
            first = false;
            let _ = write!(s, "\"{i}\"");
        }
    }
    s.push(']');
    s
}

/// Raw JSON kept from an existing header: the `tokens` object and config
/// members other than the sizes.
#[derive(Debug, Clone, Default)]
pub(super) struct Kept {
    pub(super) tokens: String,
    pub(super) config_extra: String,
}

/// What to keep from `text`; `removed` is a key slot being removed, whose
/// id is taken out of every token's `keyslots` (as cryptsetup does).
pub(super) fn kept(text: &[u8], removed: Option<u8>) -> Kept {
    let mut k = Kept {
        tokens: String::from("{}"),
        config_extra: String::new(),
    };
    let Ok(root) = json::document(text) else {
        return k;
    };
    let raw = |v: json::Val| {
        text.get(v.start..v.end)
            .and_then(|b| core::str::from_utf8(b).ok())
            .unwrap_or("")
    };
    if let Some(t) = json::get(text, root, "tokens") {
        k.tokens = match removed {
            None => String::from(raw(t)),
            Some(slot) => {
                // Each token as it was, but its key slot list without `slot`.
                let mut out = String::from("{");
                for (i, (id, tok)) in json::Members::new(text, t).enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let id = core::str::from_utf8(id).unwrap_or("");
                    let _ = write!(out, "\"{id}\":{{");
                    for (j, (name, v)) in json::Members::new(text, tok).enumerate() {
                        if j > 0 {
                            out.push(',');
                        }
                        let name_s = core::str::from_utf8(name).unwrap_or("");
                        if name == b"keyslots" {
                            let mask = json::Elements::new(text, v)
                                .filter_map(|e| json::u64_str_of(text, e))
                                .filter(|&n| n < 32 && n != u64::from(slot))
                                .fold(0u32, |m, n| m | (1u32 << n));
                            let _ = write!(out, "\"keyslots\":{}", ids(mask));
                        } else {
                            let _ = write!(out, "\"{name_s}\":{}", raw(v));
                        }
                    }
                    out.push('}');
                }
                out.push('}');
                out
            }
        };
    }
    if let Some(c) = json::get(text, root, "config") {
        for (name, v) in json::Members::new(text, c) {
            if name == b"json_size" || name == b"keyslots_size" {
                continue;
            }
            let name = core::str::from_utf8(name).unwrap_or("");
            let _ = write!(k.config_extra, ",\"{name}\":{}", raw(v));
        }
    }
    k
}

/// The JSON text of `meta`.
pub(super) fn emit_json(meta: &Metadata, kept: &Kept) -> String {
    let mut s = String::from("{\"keyslots\":{");
    let mut slots: Vec<&Keyslot> = meta.keyslots.iter().collect();
    slots.sort_by_key(|k| k.id);
    for (i, k) in slots.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let af_hash = k.af_hash.map_or("sha256", HashAlg::name);
        let _ = write!(
            s,
            "\"{}\":{{\"type\":\"luks2\",\"key_size\":{},\"af\":{{\"type\":\"luks1\",\"stripes\":{},\"hash\":\"{af_hash}\"}},\"area\":{{\"type\":\"raw\",\"offset\":\"{}\",\"size\":\"{}\",\"encryption\":\"{}\",\"key_size\":{}}},\"kdf\":",
            k.id, k.key_size, k.stripes, k.area_offset, k.area_size, k.area_encryption, k.area_key_size
        );
        match &k.kdf {
            Some(Kdf::Pbkdf2 {
                hash,
                iterations,
                salt,
            }) => {
                let _ = write!(
                    s,
                    "{{\"type\":\"pbkdf2\",\"hash\":\"{}\",\"iterations\":{iterations},\"salt\":\"{}\"}}",
                    hash.name(),
                    b64(salt.as_bytes())
                );
            }
            Some(Kdf::Argon2 {
                id,
                time,
                memory_kib,
                cpus,
                salt,
            }) => {
                let t = if *id { "argon2id" } else { "argon2i" };
                let _ = write!(
                    s,
                    "{{\"type\":\"{t}\",\"time\":{time},\"memory\":{memory_kib},\"cpus\":{cpus},\"salt\":\"{}\"}}",
                    b64(salt.as_bytes())
                );
            }
            _ => s.push_str("{}"),
        }
        if k.priority != 1 {
            let _ = write!(s, ",\"priority\":{}", k.priority);
        }
        s.push('}');
    }
    let _ = write!(s, "}},\"tokens\":{},\"segments\":{{", kept.tokens);
    for (i, g) in meta.segments.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let size = g.size.map_or(String::from("dynamic"), |n| {
            let mut t = String::new();
            let _ = write!(t, "{n}");
            t
        });
        let _ = write!(
            s,
            "\"{}\":{{\"type\":\"crypt\",\"offset\":\"{}\",\"size\":\"{size}\",\"iv_tweak\":\"{}\",\"encryption\":\"{}\",\"sector_size\":{}}}",
            g.id, g.offset, g.iv_tweak, g.encryption, g.sector_size
        );
    }
    s.push_str("},\"digests\":{");
    for (i, d) in meta.digests.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(
            s,
            "\"{}\":{{\"type\":\"pbkdf2\",\"keyslots\":{},\"segments\":{},\"hash\":\"{}\",\"iterations\":{},\"salt\":\"{}\",\"digest\":\"{}\"}}",
            d.id,
            ids(d.keyslots),
            ids(d.segments),
            d.hash.name(),
            d.iterations,
            b64(d.salt.as_bytes()),
            b64(d.digest.as_bytes())
        );
    }
    let _ = write!(
        s,
        "}},\"config\":{{\"json_size\":\"{}\",\"keyslots_size\":\"{}\"{}}}}}",
        meta.json_size, meta.keyslots_size, kept.config_extra
    );
    s
}
