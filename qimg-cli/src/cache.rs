//! Cache modes (`-t`, `-T`): how an image file is opened and when its
//! writes reach stable storage, under qemu-img's names.
//!
//! | mode | open | `fdatasync` |
//! |---|---|---|
//! | `none` (`off`) | `O_DIRECT` | on flush |
//! | `directsync` | `O_DIRECT` | after every write, and on flush |
//! | `writethrough` | page cache | after every write, and on flush |
//! | `writeback` | page cache | on flush |
//! | `unsafe` | page cache | never |
//!
//! This is what qemu-img 10.0.2 does on Linux (seen with strace): it sets
//! no `O_DSYNC`; `writethrough` and `directsync` flush after each write.
//! A filesystem without `O_DIRECT` fails the open, with qemu-img's words.
//! This module is a leaf: it uses nothing of the crate but [`CliError`].

use std::path::Path;

use luks_core::io::{FileDevice, SyncPolicy};

use crate::CliError;

/// The alignment of every transfer on a file opened with `O_DIRECT`: 4096
/// covers disks of 512- and 4096-byte logical blocks alike.
pub(crate) const DIRECT_ALIGN: u32 = 4096;

/// One of qemu-img's cache modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum CacheMode {
    /// `O_DIRECT`, flushed at the end.
    None,
    /// `O_DIRECT`, every write flushed.
    Directsync,
    /// Page cache, every write flushed.
    Writethrough,
    /// Page cache, flushed at the end (qemu-img's default for most verbs).
    #[default]
    Writeback,
    /// Page cache, never flushed (qemu-img's default for `convert -t`).
    Unsafe,
}

impl CacheMode {
    /// The mode a name stands for (qemu-img's names, `off` for `none`;
    /// case matters, as in qemu-img).
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "none" | "off" => Self::None,
            "directsync" => Self::Directsync,
            "writethrough" => Self::Writethrough,
            "writeback" => Self::Writeback,
            "unsafe" => Self::Unsafe,
            _ => return None,
        })
    }

    /// `-t NAME` (`Invalid cache option: NAME`), or `default` without one.
    pub(crate) fn target(name: Option<&str>, default: Self) -> Result<Self, CliError> {
        Self::parse(name, default, "cache")
    }

    /// `-T NAME` (`Invalid source cache option: NAME`), or writeback.
    pub(crate) fn source(name: Option<&str>) -> Result<Self, CliError> {
        Self::parse(name, Self::Writeback, "source cache")
    }

    fn parse(name: Option<&str>, default: Self, what: &str) -> Result<Self, CliError> {
        match name {
            None => Ok(default),
            Some(n) => Self::from_name(n)
                .ok_or_else(|| CliError::usage(format!("Invalid {what} option: {n}"))),
        }
    }

    /// Whether the file is opened with `O_DIRECT`.
    pub(crate) fn direct(self) -> bool {
        matches!(self, Self::None | Self::Directsync)
    }

    /// When writes are made durable.
    pub(crate) fn sync(self) -> SyncPolicy {
        match self {
            Self::None | Self::Writeback => SyncPolicy::OnFlush,
            Self::Directsync | Self::Writethrough => SyncPolicy::EachWrite,
            Self::Unsafe => SyncPolicy::Never,
        }
    }

    /// Opens the existing file `path` (for writing when `writable`) in this
    /// mode, without locks. A filesystem that refuses `O_DIRECT` gets
    /// qemu-img's error; any other failure goes through `other`.
    pub(crate) fn open(
        self,
        path: &str,
        writable: bool,
        other: impl FnOnce(std::io::Error) -> CliError,
    ) -> Result<FileDevice, CliError> {
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(writable);
        #[cfg(target_os = "linux")]
        if self.direct() {
            use std::os::unix::fs::OpenOptionsExt as _;
            o.custom_flags(nix::fcntl::OFlag::O_DIRECT.bits());
        }
        let file = o.open(Path::new(path)).map_err(|e| {
            if self.direct() && e.raw_os_error() == Some(nix::libc::EINVAL) {
                no_direct(path)
            } else {
                other(e)
            }
        })?;
        let mut dev = FileDevice::new(file);
        if self.direct() {
            dev.set_direct(DIRECT_ALIGN);
        }
        dev.set_sync(self.sync());
        Ok(dev)
    }

    /// Puts a device opened (or created) in the default mode into this one:
    /// `O_DIRECT` turned on through `fcntl` where the mode wants it, and the
    /// sync policy. Fails as [`CacheMode::open`] does on a filesystem
    /// without `O_DIRECT`.
    pub(crate) fn apply(self, dev: &mut FileDevice, path: &str) -> Result<(), CliError> {
        if self.direct() && !dev.is_direct() {
            #[cfg(target_os = "linux")]
            dev.enable_direct(DIRECT_ALIGN).map_err(|e| {
                if e.raw_os_error() == Some(nix::libc::EINVAL) {
                    no_direct(path)
                } else {
                    CliError::io(path, format!("cannot turn on O_DIRECT: {e}"))
                }
            })?;
            #[cfg(not(target_os = "linux"))]
            return Err(no_direct(path));
        }
        dev.set_sync(self.sync());
        Ok(())
    }
}

/// Before a verb creates (or empties) `path` to write it in `mode`: on a
/// filesystem without `O_DIRECT`, fails with qemu-img's error and leaves
/// every file as it was. (qemu-img creates or empties the file first and
/// then fails to open it; qimg asks first.) An existing file is asked by
/// opening it read-only; a new one by creating and removing a probe file
/// beside it, since creating with `O_DIRECT` leaves the file behind even
/// where the open fails.
pub(crate) fn refuse_before_create(path: &str, mode: CacheMode) -> Result<(), CliError> {
    if !mode.direct() {
        return Ok(());
    }
    let p = Path::new(path);
    if p.is_file() {
        // Errors other than O_DIRECT's are the creation's to report.
        return match mode.open(path, false, |e| CliError::io(path, e.to_string())) {
            Err(e) if e.msg == no_direct(path).msg => Err(e),
            _ => Ok(()),
        };
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let probe = dir.join(format!(".qimg-odirect-probe-{}", std::process::id()));
        let r = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
            .open(&probe);
        let refused = match &r {
            Err(e) => e.raw_os_error() == Some(nix::libc::EINVAL),
            Ok(_) => false,
        };
        if !matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists) {
            drop(r);
            let _ = std::fs::remove_file(&probe);
        }
        if refused {
            return Err(no_direct(path));
        }
    }
    Ok(())
}

/// qemu-img's error for a filesystem that refuses `O_DIRECT` (tmpfs before
/// Linux 6.6, ramfs): it fails the open, before any I/O.
pub(crate) fn no_direct(path: &str) -> CliError {
    CliError::usage(format!(
        "Could not open '{path}': Could not open '{path}': filesystem does not support O_DIRECT"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_meanings() {
        use CacheMode as C;
        for (n, m, d, s) in [
            ("none", C::None, true, SyncPolicy::OnFlush),
            ("off", C::None, true, SyncPolicy::OnFlush),
            ("directsync", C::Directsync, true, SyncPolicy::EachWrite),
            (
                "writethrough",
                C::Writethrough,
                false,
                SyncPolicy::EachWrite,
            ),
            ("writeback", C::Writeback, false, SyncPolicy::OnFlush),
            ("unsafe", C::Unsafe, false, SyncPolicy::Never),
        ] {
            assert_eq!(C::from_name(n), Some(m), "{n}");
            assert_eq!((m.direct(), m.sync()), (d, s), "{n}");
        }
        for bad in ["NONE", "", "write-back", "none "] {
            assert_eq!(C::from_name(bad), None, "{bad:?}");
        }
        let e = C::target(Some("bogus"), C::Unsafe).unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (1, "Invalid cache option: bogus"));
        let e = C::source(Some("x")).unwrap_err();
        assert_eq!(e.msg, "Invalid source cache option: x");
        assert_eq!(C::target(None, C::Unsafe).unwrap(), C::Unsafe);
        assert_eq!(C::source(None).unwrap(), C::Writeback);
    }

    #[test]
    fn open_direct_on_tmp() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"hello").unwrap();
        let p = p.to_string_lossy().into_owned();
        let fail = |e: std::io::Error| CliError::io("f", e.to_string());
        match CacheMode::None.open(&p, true, fail) {
            Ok(mut d) => {
                assert!(d.is_direct());
                use luks_core::io::BlockIo as _;
                d.write_at(1, b"EL").unwrap();
                let mut b = [0u8; 5];
                d.read_at(0, &mut b).unwrap();
                assert_eq!(&b, b"hELlo");
                assert_eq!(d.size().unwrap(), 5);
            }
            // A temporary directory without O_DIRECT: qemu-img's words.
            Err(e) => assert!(e.msg.ends_with("filesystem does not support O_DIRECT")),
        }
        let d = CacheMode::Unsafe.open(&p, false, fail).unwrap();
        assert!(!d.is_direct());
        assert_eq!(d.sync_policy(), SyncPolicy::Never);
        let e = CacheMode::None
            .open(&format!("{p}.missing"), false, fail)
            .unwrap_err();
        assert!(e.msg.starts_with("f: "), "{}", e.msg);
    }
}
