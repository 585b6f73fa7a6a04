//! What the LUKS1 and LUKS2 modules share: where a passphrase comes from,
//! the OS random source, qemu-img's creation options, the payload file
//! opener and the CPU clock the PBKDF benchmarks run on.

use luks_core::io::FileDevice;

use crate::opts::OptionMap;
use crate::secret::{Secret, Secrets};
use crate::CliError;

/// Where the passphrase for an image comes from.
#[derive(Debug, Clone, Default)]
pub(crate) struct KeySource {
    /// `--key-file`.
    pub(crate) key_file: Option<String>,
    /// `key-secret=ID` / `--key-secret ID`.
    pub(crate) key_secret: Option<String>,
}

impl KeySource {
    /// The passphrase: key file, named secret, the only secret given, or a
    /// prompt on the terminal.
    pub(crate) fn resolve(
        &self,
        what: &str,
        secrets: &Secrets,
        confirm: bool,
    ) -> Result<Secret, CliError> {
        if let Some(f) = &self.key_file {
            return crate::secret::read_key_file(f);
        }
        if let Some(id) = &self.key_secret {
            return secrets.get(id);
        }
        if let Some(id) = secrets.only_id() {
            return secrets.get(&id);
        }
        crate::secret::prompt(what, confirm)
    }
}

/// Opens the file holding a raw volume's payload, for writing when
/// `writable` (either way a failure says "cannot open").
pub(crate) fn open_payload_file(
    path: &str,
    writable: bool,
    cache: crate::cache::CacheMode,
) -> Result<FileDevice, CliError> {
    let dev = cache.open(path, writable, |e| {
        CliError::io(path, format!("cannot open: {e}"))
    })?;
    let access = if writable {
        crate::lock::Access::Write
    } else {
        crate::lock::Access::Read
    };
    crate::lock::lock_dev(dev, path, access)
}

/// The operating system's random source, for volume keys and salts.
pub(crate) struct OsRng;

impl rand_core::TryRng for OsRng {
    type Error = getrandom::Error;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        getrandom::fill(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        getrandom::fill(dst)
    }
}

impl rand_core::TryCryptoRng for OsRng {}

/// LUKS creation options, with qemu-img's names and defaults.
#[derive(Clone)]
pub(crate) struct CreateOptions {
    /// `cipher-alg` split: cipher name and key bits (`aes`, 256).
    pub(crate) cipher: String,
    /// Key bits of one cipher key.
    pub(crate) bits: u32,
    /// `cipher-mode`.
    pub(crate) mode: String,
    /// `ivgen-alg`.
    pub(crate) ivgen: String,
    /// `ivgen-hash-alg`.
    pub(crate) ivgen_hash: String,
    /// `hash-alg`.
    pub(crate) hash: String,
    /// `iter-time`, milliseconds.
    pub(crate) iter_time_ms: u32,
    /// `key-secret`.
    pub(crate) key_secret: Option<String>,
}

impl CreateOptions {
    /// Reads the options (with `prefix`, e.g. `encrypt.` inside qcow2).
    pub(crate) fn parse(opts: &OptionMap, prefix: &str) -> Result<Self, CliError> {
        let get = |k: &str| opts.get(&format!("{prefix}{k}")).map(str::to_string);
        let alg = get("cipher-alg").unwrap_or_else(|| "aes-256".into());
        let (cipher, bits) = alg
            .rsplit_once('-')
            .and_then(|(c, b)| b.parse::<u32>().ok().map(|b| (c.to_string(), b)))
            .ok_or_else(|| {
                CliError::usage(format!(
                    "cipher-alg '{alg}' is not of the form NAME-BITS (aes-256, serpent-128, ...)"
                ))
            })?;
        let iter_time_ms = opts
            .get_u64(&format!("{prefix}iter-time"))
            .map_err(|e| CliError::usage(e.to_string()))?
            .map_or(Ok(2000), u32::try_from)
            .map_err(|_| CliError::usage("iter-time is too large".into()))?;
        Ok(Self {
            cipher,
            bits,
            mode: get("cipher-mode").unwrap_or_else(|| "xts".into()),
            ivgen: get("ivgen-alg").unwrap_or_else(|| "plain64".into()),
            ivgen_hash: get("ivgen-hash-alg").unwrap_or_else(|| "sha256".into()),
            hash: get("hash-alg").unwrap_or_else(|| "sha256".into()),
            iter_time_ms,
            key_secret: get("key-secret"),
        })
    }

    /// The LUKS1 cipher mode string (`xts-plain64`, `cbc-essiv:sha256`).
    pub(crate) fn mode_spec(&self) -> String {
        if self.ivgen == "essiv" {
            format!("{}-essiv:{}", self.mode, self.ivgen_hash)
        } else {
            format!("{}-{}", self.mode, self.ivgen)
        }
    }

    /// Volume key bytes: XTS takes two keys.
    pub(crate) fn key_bytes(&self) -> u32 {
        let one = self.bits / 8;
        if self.mode == "xts" {
            one * 2
        } else {
            one
        }
    }
}

/// A millisecond clock of this thread's CPU time: cryptsetup and QEMU time
/// their PBKDF2 benchmarks in CPU time, so a busy machine does not shrink
/// the count. Wall time if the CPU clock cannot be read.
pub(crate) fn cpu_clock() -> impl FnMut() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    let start = std::time::Instant::now();
    let cpu = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).is_ok();
    move || {
        let wall = || u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        if !cpu {
            return wall();
        }
        clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or_else(
            |_| wall(),
            |t| {
                let s = u64::try_from(t.tv_sec()).unwrap_or(0);
                let ns = u64::try_from(t.tv_nsec()).unwrap_or(0);
                s.saturating_mul(1000).saturating_add(ns / 1_000_000)
            },
        )
    }
}
