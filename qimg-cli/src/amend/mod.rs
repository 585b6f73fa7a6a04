//! `qimg amend` with qemu-img's key slot options (`encrypt.state`,
//! `encrypt.keyslot`, `encrypt.new-secret`, `encrypt.old-secret`,
//! `encrypt.iter-time` for qcow2; the same names without `encrypt.` for a
//! raw LUKS volume), over any [`KeySlots`]: LUKS1 (raw, detached or inside
//! qcow2) and LUKS2 (qemu-img itself has no LUKS2; its semantics and
//! messages are kept, over slots 0..=31). The qcow2 options (`compat`,
//! `lazy_refcounts`, `refcount_bits`, `data_file`, ...) are in [`qcow2`].

mod qcow2;

use crate::args::SecretArgs;
use crate::cache::CacheMode;
use crate::format::Format;
use crate::keyslots::{KdfChoice, KeySlots};
use crate::luks_common::KeySource;
use crate::opts::OptionMap;
use crate::secret::{Secret, Secrets};
use crate::CliError;

/// The command line of `qimg amend`.
#[derive(Debug, clap::Args)]
pub(crate) struct AmendCmd {
    /// Image format; detected from the file when absent.
    #[arg(short = 'f', long = "format", value_enum)]
    pub(crate) format: Option<crate::format::Format>,
    /// Key slot options (`-o key=value,...`).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub(crate) options: Vec<String>,
    /// Overwrite an active key slot, or erase the last active one.
    #[arg(long)]
    pub(crate) force: bool,
    /// FILENAME is qemu-img's option list
    /// (`driver=qcow2,file.filename=PATH,encrypt.key-secret=ID`).
    #[arg(long = "image-opts")]
    pub(crate) image_opts: bool,
    /// Show progress: qemu-img's `    (NN.NN/100%)` lines on standard
    /// output when it is not a terminal, else a bar (`-q` wins).
    #[arg(short = 'p')]
    pub(crate) progress: bool,
    /// Quiet: no progress.
    #[arg(short = 'q')]
    pub(crate) quiet: bool,
    /// Cache mode of the image (none, directsync, writethrough,
    /// writeback: the default, unsafe).
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    pub(crate) cache: Option<String>,
    #[command(flatten)]
    pub(crate) secrets: SecretArgs,
    /// The image (absent with `-f FMT -o help`).
    #[arg(required_unless_present = "options")]
    pub(crate) filename: Option<String>,
}

impl AmendCmd {
    /// Runs `qimg amend`.
    pub(crate) fn run(self) -> Result<u8, CliError> {
        let missing = || CliError::usage("Expecting one image file name".into());
        if crate::opts_help::asked(&self.options) {
            let format = match (self.format, &self.filename) {
                (Some(f), _) => f,
                (None, Some(p)) if !self.image_opts => crate::format::resolve(p, None, None)?,
                _ => return Err(missing()),
            };
            return crate::opts_help::print(&crate::opts_help::amend_help(format)?);
        }
        let filename = self.filename.as_deref().ok_or_else(missing)?;
        self.cache_mode()?;
        // qemu-img prints 0% before the driver amends and 100% after it,
        // whether it succeeded or not, then ends the line.
        let bar = crate::progress::Bar::new(self.progress && !self.quiet, 0);
        let done = encryption(&self, filename, &self.options);
        bar.finish();
        done
    }
}

impl AmendCmd {
    /// `-t`: the cache mode the image is written in (qemu-img's message for
    /// an unknown one).
    pub(crate) fn cache_mode(&self) -> Result<CacheMode, CliError> {
        CacheMode::target(self.cache.as_deref(), CacheMode::Writeback)
    }
}

/// What `state`, `keyslot`, `new-secret`, `old-secret` and `iter-time`
/// ask of the key slots.
struct Request {
    /// `state=active` (else `inactive`).
    activate: bool,
    /// `keyslot`.
    keyslot: Option<u8>,
    /// `new-secret`: the secret's id.
    new_secret: Option<String>,
    /// `old-secret`: the secret's id.
    old_secret: Option<String>,
    /// `iter-time` in milliseconds.
    iter_ms: u32,
    /// `--force`.
    pub(crate) force: bool,
}

/// `qimg amend` of the encryption options: adds or erases key slots as
/// qemu-img amend does.
pub(crate) fn encryption(a: &AmendCmd, filename: &str, options: &[String]) -> Result<u8, CliError> {
    let secrets = Secrets::parse(&a.secrets.object)?;
    let spec = crate::image_spec::ImageSpec::from_arg(filename, a.image_opts, a.format)?;
    spec.refuse_backing_keys()?;
    let (mut path, mut format, mut key_secret) = (
        spec.path.clone(),
        Some(spec.resolve(a.secrets.header.as_deref())?),
        spec.key_secret.clone(),
    );
    // A raw LUKS volume with a detached header: the key slots are there.
    if let Some(h) = &a.secrets.header {
        path.clone_from(h);
        format = Some(Format::Luks);
    }
    crate::lock::will_write(&path);
    if options.is_empty() {
        return Err(CliError::usage(
            "Must specify options (-o); see `qimg amend --help`".into(),
        ));
    }
    let opts = OptionMap::parse(options).map_err(|e| CliError::usage(format!("-o: {e}")))?;
    let format = crate::format::resolve(&path, format, None)?;
    if format == Format::Qcow2 {
        crate::chain_lock::lock_backing_chain(&path)?;
    }
    if format == Format::Qcow2 && qcow2::wants(options) {
        return qcow2::run(a, filename, &path, key_secret.as_deref());
    }
    if format == Format::Luks {
        crate::lock::lock_for_luks_amend(&path)?;
    }
    let mut t = crate::keyslots::open_cached(&path, Some(format), true, a.cache_mode()?)?;
    let p = if t.in_qcow2() { "encrypt." } else { "" };
    let get = |k: &str| opts.get(&format!("{p}{k}")).map(str::to_string);
    if opts.get(&format!("{p}format")).is_some() {
        return Err(CliError::usage(format!(
            "Invalid parameter '{p}format': this option is only supported for image creation"
        )));
    }
    let state = get("state");
    let keyslot = get("keyslot");
    let new_secret = get("new-secret");
    let old_secret = get("old-secret");
    let iter_time = get("iter-time");
    if let Some(k) = get("key-secret") {
        key_secret = Some(k);
    }
    opts.reject_unused(if t.in_qcow2() { "qcow2" } else { "luks" })
        .map_err(|e| CliError::io(&path, format!("{e} (amend changes key slots only)")))?;
    let activate = match state.as_deref() {
        None => return Err(CliError::usage("Parameter 'state' is missing".into())),
        Some("active") => true,
        Some("inactive") => false,
        Some(v) => {
            return Err(CliError::usage(format!(
                "Parameter 'state' does not accept value '{v}' (active or inactive)"
            )))
        }
    };
    let keyslot = keyslot
        .map(|s| parse_slot(&s, t.slot_count()))
        .transpose()?;
    let iter_ms = match iter_time {
        None => 2000,
        Some(v) => v
            .parse::<u32>()
            .map_err(|_| CliError::usage(format!("Parameter 'iter-time' expects a number: {v}")))?,
    };
    // Like qemu-img, the image is opened (unlocked) first.
    let keys = KeySource {
        key_file: a.secrets.key_file.clone(),
        key_secret: key_secret.or_else(|| a.secrets.key_secret.clone()),
    };
    let pass = keys.resolve(&path, &secrets, false)?;
    let req = Request {
        activate,
        keyslot,
        new_secret,
        old_secret,
        iter_ms,
        force: a.force,
    };
    change_slots(t.as_mut(), &req, &pass, |id| secrets.get(id))
}

/// Unlocks `t` with `pass`, then activates or erases key slots as `r`
/// asks, with qemu-img's checks and messages. `secret` looks up a
/// `new-secret` / `old-secret` id.
fn change_slots(
    t: &mut dyn KeySlots,
    r: &Request,
    pass: &[u8],
    secret: impl Fn(&str) -> Result<Secret, CliError>,
) -> Result<u8, CliError> {
    // qemu-img exits 1 for a wrong passphrase (cryptsetup: 2).
    let (vk, opened) = t
        .unlock(pass, None)
        .map_err(|e| CliError { code: 1, ..e })?;
    if r.activate {
        let Some(new_id) = &r.new_secret else {
            return Err(t.err("'new-secret' is required to activate a keyslot"));
        };
        if r.old_secret.is_some() {
            return Err(t.err("'old-secret' must not be given when activating keyslots"));
        }
        let new_pass = secret(new_id)?;
        let slot = match r.keyslot {
            Some(s) if t.is_active(s) && !r.force => {
                return Err(t.err(&format!(
                    "Refusing to overwrite active keyslot {s} - please erase it first \
                     (or use --force)"
                )))
            }
            Some(s) => s,
            None => t
                .free_slot()
                .ok_or_else(|| t.err("Can't add a keyslot - all keyslots are in use"))?,
        };
        let kdf = t.kdf(
            &KdfChoice {
                iter_time: r.iter_ms,
                ..KdfChoice::default()
            },
            opened,
        )?;
        if t.is_active(slot) {
            t.replace(&vk, &new_pass, kdf, slot)?;
        } else {
            t.add(&vk, &new_pass, kdf, Some(slot))?;
        }
        return Ok(0);
    }
    if r.new_secret.is_some() {
        return Err(t.err("'new-secret' must not be given when erasing keyslots"));
    }
    let old = r.old_secret.as_deref().map(&secret).transpose()?;
    let doomed = match (r.keyslot, old) {
        (None, None) => {
            return Err(t.err(
                "To erase keyslot(s), either explicit keyslot index or the password \
                 currently contained in them must be given",
            ))
        }
        (Some(s), old) => {
            if let Some(old) = &old {
                if !t.opens(old, s)? {
                    return Err(t.err(&format!(
                        "Given keyslot {s} doesn't contain the given old password for erase \
                         operation"
                    )));
                }
            }
            if !t.is_active(s) {
                return Err(t.err(&format!("Given keyslot {s} is already erased (inactive)")));
            }
            vec![s]
        }
        (None, Some(old)) => {
            let mut matching = Vec::new();
            for s in (0..t.slot_count())
                .filter(|&s| t.is_active(s))
                .collect::<Vec<_>>()
            {
                if t.opens(&old, s)? {
                    matching.push(s);
                }
            }
            if matching.is_empty() {
                return Err(t.err("No keyslots match given (old) password for erase operation"));
            }
            matching
        }
    };
    let left = t
        .unlocking_slots()
        .into_iter()
        .filter(|s| !doomed.contains(s))
        .count();
    if left == 0 && !r.force {
        return Err(match (r.keyslot, doomed.as_slice()) {
            (Some(_), [s]) => t.err(&format!(
                "Attempt to erase the only active keyslot {s} which will erase all the data in \
                 the image irreversibly - refusing operation (--force erases it)"
            )),
            _ => t.err(
                "All the active keyslots match the (old) password that was given and erasing \
                 them will erase all the data in the image irreversibly - refusing operation \
                 (--force erases them)",
            ),
        });
    }
    for s in doomed {
        t.erase(s)?;
    }
    Ok(0)
}

/// A key slot number below `count` (8 for LUKS1, 32 for LUKS2), with
/// qemu-img's messages.
fn parse_slot(s: &str, count: u8) -> Result<u8, CliError> {
    let n: i64 = s
        .parse()
        .map_err(|_| CliError::usage(format!("Parameter 'keyslot' expects a number: '{s}'")))?;
    u8::try_from(n).ok().filter(|&n| n < count).ok_or_else(|| {
        CliError::usage(format!(
            "Invalid keyslot {n} specified, must be between 0 and {}",
            count.saturating_sub(1)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_are_numbered_as_qemu_img_says() {
        assert_eq!(parse_slot("0", 8).unwrap(), 0);
        assert_eq!(parse_slot("7", 8).unwrap(), 7);
        assert_eq!(parse_slot("31", 32).unwrap(), 31);
        assert!(parse_slot("32", 32).is_err());
        for bad in ["8", "-1", "300"] {
            let e = parse_slot(bad, 8).unwrap_err().msg;
            assert!(e.contains("must be between 0 and 7"), "{e}");
        }
        assert!(parse_slot("abc", 8)
            .unwrap_err()
            .msg
            .contains("expects a number"));
    }
}
