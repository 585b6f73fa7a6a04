//! Guards for the files a verb touches.
//!
//! Image locking interoperable with QEMU's file-posix driver: Linux OFD
//! locks (`F_OFD_SETLK` / `F_OFD_GETLK`, through `nix`'s safe `fcntl`) on
//! single bytes: 100+n held for each permission the opener takes, 200+n for
//! each it does not share (n: 0 consistent read, 1 write, 2 write
//! unchanged, 3 resize), all read-type locks. A conflict is a lock another
//! open file description holds on the opposite byte, found with
//! `F_OFD_GETLK` and a write-type probe. The locks of this process live on
//! one duplicated descriptor per file (by st_dev/st_ino), kept until exit,
//! so a verb that opens a file twice never conflicts with itself.
//!
//! And the self-overwrite check: a destination that is one of the inputs,
//! by device and inode, so another name, `./x`, a hard link or a symlink
//! are all caught.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;

use crate::CliError;

/// A file's identity: (st_dev, st_ino) of what the name resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The identity of `path` (symlinks followed), or `None` when it does
    /// not exist or cannot be examined.
    pub(crate) fn of(path: &str) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// Refuses to write `dest` when it is the same file as one of `inputs`.
/// `role` says what the inputs are (for the message), e.g. "the source
/// image or a file of its backing chain". Call it before `dest` is created,
/// truncated or opened for writing.
pub(crate) fn refuse_self_overwrite(
    dest: &str,
    inputs: &[String],
    role: &str,
) -> Result<(), CliError> {
    match same_file(dest, inputs) {
        Some(same) => Err(CliError::io(
            dest,
            format!(
                "is the same file as {role}{}; refusing to overwrite it (write to another file)",
                aka(dest, same)
            ),
        )),
        None => Ok(()),
    }
}

/// The first of `inputs` that is the same file as `dest`.
fn same_file<'a>(dest: &str, inputs: &'a [String]) -> Option<&'a str> {
    let d = FileId::of(dest)?;
    inputs
        .iter()
        .find(|i| FileId::of(i) == Some(d))
        .map(String::as_str)
}

/// " (other name)" when `same` is spelled differently from `dest`.
fn aka(dest: &str, same: &str) -> String {
    if same == dest {
        String::new()
    } else {
        format!(" ({same})")
    }
}

/// Refuses to make `backing` (a file in `fmt`) the backing file of
/// `image` when that backing chain contains `image` itself (`rebase -b`,
/// `create -b`). The chain is followed through qcow2 headers only (no
/// keys needed): backing files and data files, up to
/// [`crate::image::MAX_CHAIN_DEPTH`] images; a file that cannot be opened
/// ends the walk (it is still compared).
pub(crate) fn refuse_backing_loop(
    image: &str,
    backing: &str,
    fmt: crate::image::Format,
) -> Result<(), CliError> {
    use crate::image::Format;
    let mut files = Vec::new();
    let mut seen = Vec::new();
    let mut cur = backing.to_string();
    let mut cur_fmt = Some(fmt);
    for depth in 0..crate::image::MAX_CHAIN_DEPTH {
        files.push(cur.clone());
        let id = FileId::of(&cur);
        if id.is_some_and(|i| seen.contains(&i)) {
            break;
        }
        seen.extend(id);
        let f = match cur_fmt {
            Some(f) => f,
            None => match crate::image::detect(&cur) {
                Ok(f) => f,
                Err(_) => break,
            },
        };
        if f != Format::Qcow2 {
            break;
        }
        if crate::image::ensure_fds(depth, &cur).is_err() {
            break;
        }
        let cache = crate::image::layer_cache_bytes(depth);
        let Ok(opening) = crate::qcow2::Opening::open_cached(&cur, cache) else {
            break;
        };
        let info = opening.img.info();
        if let Some(d) = info.data_file() {
            files.push(
                crate::image::resolve_backing(&cur, d)
                    .to_string_lossy()
                    .into_owned(),
            );
        }
        let Some(next) = info.backing_file() else {
            break;
        };
        cur_fmt = info.backing_format().and_then(crate::image::backing_format);
        cur = crate::image::resolve_backing(&cur, next)
            .to_string_lossy()
            .into_owned();
    }
    match same_file(image, &files) {
        Some(same) => Err(CliError::io(
            image,
            format!(
                "the new backing chain would contain this image itself{}; \
                 refusing (choose a backing file that does not lead back to it)",
                aka(image, same)
            ),
        )),
        None => Ok(()),
    }
}

/// Permission bits, as QEMU numbers them.
const CONSISTENT_READ: u8 = 1 << 0;
/// Writing.
const WRITE: u8 = 1 << 1;
/// Resizing.
const RESIZE: u8 = 1 << 3;
/// QEMU's names for the permission bits, by bit number.
const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// How a verb uses a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Reads it; others must not write or resize it meanwhile (skipped
    /// with `-U`).
    Read,
    /// Writes (and may resize) it; nobody else may write or resize it.
    Write,
}

/// `-U` / `--force-share`: read opens take no locks.
static FORCE_SHARE: AtomicBool = AtomicBool::new(false);
/// Whether the "no OFD locks here" warning was printed.
static WARNED: AtomicBool = AtomicBool::new(false);

/// Sets `-U` for the rest of the process.
pub(crate) fn set_force_share(on: bool) {
    FORCE_SHARE.store(on, Ordering::Relaxed);
}

/// One file this process locks: a duplicate of the first descriptor
/// opened on it, and what it holds.
struct Held {
    id: FileId,
    file: File,
    perm: u8,
    unshared: u8,
}

/// Every file this process holds locks on.
static HELD: Mutex<Vec<Held>> = Mutex::new(Vec::new());

/// Takes QEMU's locks on `file` (opened from `path`) for `access`, or
/// fails like qemu-img when another process's locks conflict:
/// `Could not open 'X': Failed to get "write" lock` (or `shared "write"`)
/// and `Is another process using the image [X]?`. A filesystem without
/// OFD locks gets one warning and no locking.
pub(crate) fn lock(file: &File, path: &str, access: Access) -> Result<(), CliError> {
    if access == Access::Read && FORCE_SHARE.load(Ordering::Relaxed) {
        return Ok(());
    }
    let (perm, unshare) = match access {
        Access::Read => (CONSISTENT_READ, WRITE | RESIZE),
        Access::Write => (CONSISTENT_READ | WRITE | RESIZE, WRITE | RESIZE),
    };
    let meta = file
        .metadata()
        .map_err(|e| CliError::io(path, format!("cannot examine: {e}")))?;
    if !meta.is_file() {
        // Block devices and pipes: QEMU locks those too, but qimg only
        // locks regular files.
        return Ok(());
    }
    let id = FileId {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    let mut held = HELD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let idx = match held.iter().position(|h| h.id == id) {
        Some(i) => i,
        None => {
            let dup = file
                .try_clone()
                .map_err(|e| CliError::io(path, format!("cannot lock: {e}")))?;
            held.push(Held {
                id,
                file: dup,
                perm: 0,
                unshared: 0,
            });
            held.len() - 1
        }
    };
    let Some(h) = held.get_mut(idx) else {
        return Ok(());
    };
    let (want_perm, want_unshared) = (h.perm | perm, h.unshared | unshare);
    if let Err(e) = apply(&h.file, want_perm, want_unshared) {
        if matches!(
            e,
            nix::Error::EINVAL | nix::Error::ENOTSUP | nix::Error::ENOLCK
        ) {
            if !WARNED.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "qimg: warning: {path}: the filesystem refuses OFD locks ({e}); \
                     going on without image locking"
                );
            }
            return Ok(());
        }
        return Err(CliError::io(path, format!("cannot lock: {e}")));
    }
    if let Err(msg) = check(&h.file, want_perm, want_unshared) {
        // Back to what was held before (best effort: the error stands).
        let _ = apply(&h.file, h.perm, h.unshared);
        return Err(CliError {
            code: 1,
            msg: format!(
                "Could not open '{path}': {msg}\nIs another process using the image [{path}]?"
            ),
        });
    }
    h.perm = want_perm;
    h.unshared = want_unshared;
    if access == Access::Write {
        // Test hook: `QIMG_TEST_PAUSE_AFTER_LOCK=SECONDS` holds the write
        // lock that long before going on (so a test can watch QEMU being
        // refused); it only sleeps.
        if let Some(secs) = std::env::var("QIMG_TEST_PAUSE_AFTER_LOCK")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            std::thread::sleep(std::time::Duration::from_secs(secs.min(600)));
        }
    }
    Ok(())
}

/// Creates `path` (or empties an existing file) for writing, with the
/// write locks taken before any byte changes: a file another process holds
/// is refused untouched.
pub(crate) fn create_locked(path: &str) -> Result<luks_core::io::FileDevice, CliError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| CliError::io(path, format!("cannot create: {e}")))?;
    lock(&file, path, Access::Write)?;
    file.set_len(0)
        .map_err(|e| CliError::io(path, format!("cannot create: {e}")))?;
    Ok(luks_core::io::FileDevice::new(file))
}

/// Takes the locks for `access` on an opened device.
pub(crate) fn lock_dev(
    dev: luks_core::io::FileDevice,
    path: &str,
    access: Access,
) -> Result<luks_core::io::FileDevice, CliError> {
    lock(dev.file(), path, access)?;
    Ok(dev)
}

/// A one-byte lock request of `kind` at `start`.
// F_RDLCK / F_WRLCK / F_UNLCK and SEEK_SET are 0..=2: they fit a c_short.
#[allow(clippy::cast_possible_truncation)]
fn flock(kind: libc::c_int, start: i64) -> libc::flock {
    let mut l: libc::flock = empty_flock();
    l.l_type = kind as libc::c_short;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l.l_start = start;
    l.l_len = 1;
    l
}

/// A `flock` with every field zero.
fn empty_flock() -> libc::flock {
    libc::flock {
        l_type: 0,
        l_whence: 0,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

/// Holds byte 100+n for each bit of `perm` and 200+n for each bit of
/// `unshared`, releasing the others.
fn apply(file: &File, perm: u8, unshared: u8) -> nix::Result<()> {
    for n in 0..NAMES.len() {
        for (base, bits) in [(100i64, perm), (200, unshared)] {
            let kind = if bits & (1 << n) != 0 {
                libc::F_RDLCK
            } else {
                libc::F_UNLCK
            };
            let l = flock(kind, base + n as i64);
            fcntl(file, FcntlArg::F_OFD_SETLK(&l))?;
        }
    }
    Ok(())
}

/// Whether another open file description holds byte `at`.
fn taken(file: &File, at: i64) -> bool {
    let mut l = flock(libc::F_WRLCK, at);
    match fcntl(file, FcntlArg::F_OFD_GETLK(&mut l)) {
        Ok(_) => i32::from(l.l_type) != libc::F_UNLCK,
        Err(_) => false,
    }
}

/// QEMU's conflict test: a held permission another opener does not share,
/// or an unshared one another opener holds.
fn check(file: &File, perm: u8, unshared: u8) -> Result<(), String> {
    for (n, name) in NAMES.iter().enumerate() {
        if perm & (1 << n) != 0 && taken(file, 200 + n as i64) {
            return Err(format!("Failed to get \"{name}\" lock"));
        }
    }
    for (n, name) in NAMES.iter().enumerate() {
        if unshared & (1 << n) != 0 && taken(file, 100 + n as i64) {
            return Err(format!("Failed to get shared \"{name}\" lock"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_file_by_any_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, b"x").unwrap();
        let link = dir.path().join("hard");
        std::fs::hard_link(&a, &link).unwrap();
        let sym = dir.path().join("sym");
        std::os::unix::fs::symlink(&a, &sym).unwrap();
        let a_s = a.to_string_lossy().into_owned();
        for name in [&a, &link, &sym] {
            let n = name.to_string_lossy();
            assert!(refuse_self_overwrite(&n, std::slice::from_ref(&a_s), "the input").is_err());
        }
        let other = dir.path().join("other");
        std::fs::write(&other, b"y").unwrap();
        assert!(
            refuse_self_overwrite(&other.to_string_lossy(), std::slice::from_ref(&a_s), "x")
                .is_ok()
        );
        let missing = dir.path().join("missing");
        assert!(refuse_self_overwrite(&missing.to_string_lossy(), &[a_s], "x").is_ok());
    }
}
