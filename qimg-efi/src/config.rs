//! `\qimg\qimg.cfg`: `key=value` lines, `#` comments.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// Where the config file lives on the volume qimg.efi was loaded from.
pub const PATH: &str = "\\qimg\\qimg.cfg";
/// The image used when the config names none (if it exists).
pub const DEFAULT_IMAGE: &str = "\\images\\system.qcow2";
/// The loader booted when the config names none.
pub const DEFAULT_BOOT: &str = "\\EFI\\BOOT\\BOOTX64.EFI";

/// Where the image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    /// `\images\system.qcow2` if it exists, else scan.
    Default,
    /// The first Block I/O device holding a qcow2 or LUKS header.
    Scan,
    /// A file on the volume qimg.efi came from.
    File(String),
}

/// One `check=LBA+COUNT:SHA256HEX` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// First block.
    pub lba: u64,
    /// Number of 512-byte blocks.
    pub count: u64,
    /// Expected SHA-256, lower-case hex.
    pub sha256: String,
}

/// The parsed config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `image=`.
    pub image: Image,
    /// `header=`: a detached LUKS header file.
    pub header: Option<String>,
    /// `passphrase-file=`.
    pub passphrase_file: Option<String>,
    /// `boot=`.
    pub boot: String,
    /// `options=`.
    pub options: Option<String>,
    /// `check=` lines in order.
    pub checks: Vec<Check>,
    /// `speed-mib=`.
    pub speed_mib: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            image: Image::Default,
            header: None,
            passphrase_file: None,
            boot: DEFAULT_BOOT.to_string(),
            options: None,
            checks: Vec::new(),
            speed_mib: None,
        }
    }
}

fn path_value(key: &str, v: &str) -> Result<String, String> {
    if v.starts_with('\\') || v.starts_with('/') {
        Ok(v.replace('/', "\\"))
    } else {
        Err(format!(
            "{key}= needs an absolute path starting with '\\', got `{v}`"
        ))
    }
}

fn parse_check(v: &str) -> Result<Check, String> {
    let bad = || format!("check= wants LBA+COUNT:SHA256HEX, got `{v}`");
    let (range, hex) = v.split_once(':').ok_or_else(bad)?;
    let (lba, count) = range.split_once('+').ok_or_else(bad)?;
    let lba = lba.trim().parse::<u64>().map_err(|_| bad())?;
    let count = count.trim().parse::<u64>().map_err(|_| bad())?;
    let hex = hex.trim().to_ascii_lowercase();
    if count == 0 || hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    Ok(Check {
        lba,
        count,
        sha256: hex,
    })
}

impl Config {
    /// Parses the config text; an error names the line (1-based) and why.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut c = Self::default();
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.trim_start_matches('\u{feff}').trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |e: String| format!("{PATH} line {n}: {e}");
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| at(format!("`{line}` is not key=value")))?;
            let (key, value) = (key.trim(), value.trim());
            match key {
                "image" if value.eq_ignore_ascii_case("scan") => c.image = Image::Scan,
                "image" => c.image = Image::File(path_value(key, value).map_err(at)?),
                "header" => c.header = Some(path_value(key, value).map_err(at)?),
                "passphrase-file" => c.passphrase_file = Some(path_value(key, value).map_err(at)?),
                "boot" => c.boot = path_value(key, value).map_err(at)?,
                "options" => c.options = Some(value.to_string()),
                "check" => c.checks.push(parse_check(value).map_err(at)?),
                "speed-mib" => {
                    let mib = value
                        .parse::<u64>()
                        .ok()
                        .filter(|m| *m > 0 && *m <= 1 << 20)
                        .ok_or_else(|| at(format!("speed-mib= wants a whole number of MiB (1..1048576), got `{value}`")))?;
                    c.speed_mib = Some(mib);
                }
                _ => return Err(at(format!("unknown key `{key}`"))),
            }
        }
        if c.header.is_some() && c.image == Image::Scan {
            return Err(format!(
                "{PATH}: header= needs image=\\path (a file), not image=scan"
            ));
        }
        Ok(c)
    }

    /// The one-line summary printed as QIMG-CONFIG.
    pub fn summary(&self) -> String {
        let image = match &self.image {
            Image::Default => format!("default({DEFAULT_IMAGE} or scan)"),
            Image::Scan => "scan".to_string(),
            Image::File(p) => p.clone(),
        };
        format!(
            "image={} header={} passphrase={} boot={} options=\"{}\" checks={} speed-mib={}",
            image,
            self.header.as_deref().unwrap_or("none"),
            self.passphrase_file.as_deref().unwrap_or("prompt"),
            self.boot,
            self.options.as_deref().unwrap_or(""),
            self.checks.len(),
            self.speed_mib.map_or("off".to_string(), |m| m.to_string()),
        )
    }
}
