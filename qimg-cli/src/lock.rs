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
pub(crate) fn same_file<'a>(dest: &str, inputs: &'a [String]) -> Option<&'a str> {
    let d = FileId::of(dest)?;
    inputs
        .iter()
        .find(|i| FileId::of(i) == Some(d))
        .map(String::as_str)
}

/// " (other name)" when `same` is spelled differently from `dest`.
pub(crate) fn aka(dest: &str, same: &str) -> String {
    if same == dest {
        String::new()
    } else {
        format!(" ({same})")
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

/// `info`: reads take no "consistent read" permission (byte 100), only
/// refuse to share writing and resizing, as qemu-img info opens an image
/// without I/O.
static NO_IO: AtomicBool = AtomicBool::new(false);

/// Sets `info`'s read mode (see [`NO_IO`]) for the rest of the process.
pub(crate) fn set_reads_without_io(on: bool) {
    NO_IO.store(on, Ordering::Relaxed);
}

/// Test hook: with `QIMG_TEST_PAUSE_BEFORE_EXIT=SECONDS`, prints
/// `qimg: test pause: locks held` to stderr and sleeps that long (at most
/// 600 s) before the process exits, so a test can read `/proc/locks` while
/// every lock of the verb is still held. It only sleeps.
pub(crate) fn test_pause_before_exit() {
    if let Some(secs) = std::env::var("QIMG_TEST_PAUSE_BEFORE_EXIT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        eprintln!("qimg: test pause: locks held");
        std::thread::sleep(std::time::Duration::from_secs(secs.min(600)));
    }
}

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

/// Files the running verb will write (by identity): a read open of one
/// of them takes the write locks at once, as qemu-img opens such an image
/// read-write from the start (and so reports `Failed to get "write"
/// lock`, not the shared one, when another process holds it).
static WILL_WRITE: Mutex<Vec<FileId>> = Mutex::new(Vec::new());

/// What qemu-img puts between the file name and the lock failure when a
/// new file cannot be locked: "" for `create`, "error while converting
/// qcow2: " for `convert`, "error while creating output image: " for `dd`.
static CREATING: Mutex<String> = Mutex::new(String::new());

/// Declares that this verb writes `path` (call it before the first open):
/// every lock taken on it is then a write lock.
pub(crate) fn will_write(path: &str) {
    if let Some(id) = FileId::of(path) {
        WILL_WRITE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(id);
    }
}

/// Sets the words qemu-img puts before a lock failure on a file this verb
/// creates (see [`create_locked`]).
pub(crate) fn creating_for(context: &str) {
    context.clone_into(
        &mut CREATING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
}

/// Why the locks could not be taken.
#[derive(Debug)]
enum LockError {
    /// Another process's locks conflict: qemu-img's reason, followed by
    /// its "Is another process using the image" hint.
    Conflict(String),
    /// The lock call itself failed: qemu-img's `Failed to lock byte N:
    /// reason`, without the hint.
    Failed(String),
    /// Something else (the file cannot be examined or duplicated).
    Other(CliError),
}

impl LockError {
    /// The CLI error, `lead` naming the file the way the verb's qemu-img
    /// counterpart does (`Could not open 'X': ` or `X: `).
    fn into_cli(self, lead: &str, path: &str) -> CliError {
        match self {
            Self::Conflict(m) => CliError {
                code: 1,
                msg: format!("{lead}{m}\nIs another process using the image [{path}]?"),
            },
            Self::Failed(m) => CliError {
                code: 1,
                msg: format!("{lead}{m}"),
            },
            Self::Other(e) => e,
        }
    }
}

/// What to do when `F_OFD_SETLK` on byte `byte` failed with `e` (the seam
/// the unit tests inject errors through): `Ok` means go on unlocked. QEMU's default (`locking=auto`)
/// locks only when the kernel has OFD locks: a kernel without them answers
/// `EINVAL` (unknown command), and QEMU then goes on without locking and
/// without a word. Any other failure (a filesystem that refuses locks,
/// e.g. NFS without a lock manager: `ENOLCK`) fails the open with
/// `Failed to lock byte N: reason`, the reason left out for
/// `EAGAIN`/`EACCES` (a byte someone else holds).
fn on_setlk_error(e: nix::errno::Errno, byte: i64) -> Result<(), LockError> {
    match e {
        nix::errno::Errno::EINVAL => Ok(()),
        nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES => {
            Err(LockError::Failed(format!("Failed to lock byte {byte}")))
        }
        e => Err(LockError::Failed(format!(
            "Failed to lock byte {byte}: {}",
            strerror(e)
        ))),
    }
}

/// The C library's text for `e` (what QEMU prints).
fn strerror(e: nix::errno::Errno) -> String {
    crate::os_text(&std::io::Error::from_raw_os_error(e as i32))
}

/// Takes QEMU's locks on `file` (opened from `path`) for `access`, or
/// fails like qemu-img when another process's locks conflict:
/// `Could not open 'X': Failed to get "write" lock` (or `shared "write"`)
/// and `Is another process using the image [X]?`. A kernel without OFD
/// locks means no locking (as QEMU's default); a filesystem that refuses
/// them fails the open (`Failed to lock byte 100: ...`), as QEMU does.
pub(crate) fn lock(file: &File, path: &str, access: Access) -> Result<(), CliError> {
    lock_inner(file, path, access)
        .map_err(|e| e.into_cli(&format!("Could not open '{path}': "), path))
}

/// [`lock`] without the message.
fn lock_inner(file: &File, path: &str, access: Access) -> Result<(), LockError> {
    let meta = file
        .metadata()
        .map_err(|e| LockError::Other(CliError::io(path, format!("cannot examine: {e}"))))?;
    if !meta.is_file() {
        // Block devices and pipes: QEMU locks those too, but qimg only
        // locks regular files.
        return Ok(());
    }
    let id = FileId {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    let access = if WILL_WRITE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .contains(&id)
    {
        Access::Write
    } else {
        access
    };
    if access == Access::Read && FORCE_SHARE.load(Ordering::Relaxed) {
        return Ok(());
    }
    let (perm, unshare) = match access {
        Access::Read if NO_IO.load(Ordering::Relaxed) => (0, WRITE | RESIZE),
        Access::Read => (CONSISTENT_READ, WRITE | RESIZE),
        Access::Write => (CONSISTENT_READ | WRITE | RESIZE, WRITE | RESIZE),
    };
    lock_bits(file, path, id, perm, unshare)?;
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

/// `amend` of a raw LUKS volume, locked as qemu-img's LUKS driver locks
/// it (straced): opened for consistent read and write (bytes 100, 101),
/// sharing everything, then, for the key slot update, consistent read and
/// write no longer shared (200, 201). A conflict in the second step is
/// reported without "Could not open", as qemu-img does.
pub(crate) fn lock_for_luks_amend(path: &str) -> Result<(), CliError> {
    let file = File::open(path).map_err(|e| CliError::io(path, format!("cannot open: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| CliError::io(path, format!("cannot examine: {e}")))?;
    if !meta.is_file() {
        return Ok(());
    }
    let id = FileId {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    let both = CONSISTENT_READ | WRITE;
    lock_bits(&file, path, id, both, 0)
        .map_err(|e| e.into_cli(&format!("Could not open '{path}': "), path))?;
    lock_bits(&file, path, id, both, both).map_err(|e| e.into_cli("", path))
}

/// Adds `perm` and `unshare` to what this process holds on `file` (whose
/// identity is `id`), or fails as QEMU does, holding what it held before.
fn lock_bits(file: &File, path: &str, id: FileId, perm: u8, unshare: u8) -> Result<(), LockError> {
    let mut held = HELD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let idx = match held.iter().position(|h| h.id == id) {
        Some(i) => i,
        None => {
            let dup = file
                .try_clone()
                .map_err(|e| LockError::Other(CliError::io(path, format!("cannot lock: {e}"))))?;
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
    if let Err((byte, e)) = apply(&h.file, want_perm, want_unshared) {
        let _ = apply(&h.file, h.perm, h.unshared);
        // Ok: no OFD locks in this kernel, go on unlocked.
        return on_setlk_error(e, byte);
    }
    if let Err(e) = check(&h.file, want_perm, want_unshared) {
        // Back to what was held before (best effort: the error stands).
        let _ = apply(&h.file, h.perm, h.unshared);
        return Err(e);
    }
    h.perm = want_perm;
    h.unshared = want_unshared;
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
    let lead = format!(
        "{path}: {}",
        CREATING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    );
    lock_inner(&file, path, Access::Write).map_err(|e| e.into_cli(&lead, path))?;
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
/// `unshared`, releasing the others; on failure, the byte and the error.
fn apply(file: &File, perm: u8, unshared: u8) -> Result<(), (i64, nix::errno::Errno)> {
    for n in 0..NAMES.len() {
        for (base, bits) in [(100i64, perm), (200, unshared)] {
            let kind = if bits & (1 << n) != 0 {
                libc::F_RDLCK
            } else {
                libc::F_UNLCK
            };
            let l = flock(kind, base + n as i64);
            fcntl(file, FcntlArg::F_OFD_SETLK(&l)).map_err(|e| (base + n as i64, e))?;
        }
    }
    Ok(())
}

/// Whether another open file description holds byte `at`.
fn taken(file: &File, at: i64) -> nix::Result<bool> {
    let mut l = flock(libc::F_WRLCK, at);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut l))?;
    Ok(i32::from(l.l_type) != libc::F_UNLCK)
}

/// The outcome of testing byte `at` for the permission `what` (`"write"`
/// or `shared "write"`): QEMU's `Failed to get ... lock`, with the reason
/// when the test itself failed.
fn test_byte(file: &File, at: i64, what: &str) -> Result<(), LockError> {
    match taken(file, at) {
        Ok(false) => Ok(()),
        Ok(true) | Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => {
            Err(LockError::Conflict(format!("Failed to get {what} lock")))
        }
        Err(e) => Err(LockError::Conflict(format!(
            "Failed to get {what} lock: {}",
            strerror(e)
        ))),
    }
}

/// QEMU's conflict test: a held permission another opener does not share,
/// or an unshared one another opener holds.
fn check(file: &File, perm: u8, unshared: u8) -> Result<(), LockError> {
    for (n, name) in NAMES.iter().enumerate() {
        if perm & (1 << n) != 0 {
            test_byte(file, 200 + n as i64, &format!("\"{name}\""))?;
        }
    }
    for (n, name) in NAMES.iter().enumerate() {
        if unshared & (1 << n) != 0 {
            test_byte(file, 100 + n as i64, &format!("shared \"{name}\""))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;

    /// The message a [`LockError`] gives on an open of `x`.
    fn said(e: LockError) -> String {
        e.into_cli("Could not open 'x': ", "x").msg
    }

    #[test]
    fn a_kernel_without_ofd_locks_means_no_locking() {
        // F_OFD_SETLK unknown to the kernel: QEMU's locking=auto goes on
        // without locks and without a word.
        assert!(on_setlk_error(Errno::EINVAL, 100).is_ok());
    }

    #[test]
    fn a_filesystem_refusing_locks_fails_the_open_as_qemu_does() {
        // NFS without a lock manager, FUSE filesystems without locks...
        for (e, text) in [
            (Errno::ENOLCK, "No locks available"),
            (Errno::EOPNOTSUPP, "Operation not supported"),
            (Errno::EIO, "Input/output error"),
        ] {
            let err = on_setlk_error(e, 100).unwrap_err();
            assert!(matches!(err, LockError::Failed(_)), "{e}: {err:?}");
            assert_eq!(
                said(err),
                format!("Could not open 'x': Failed to lock byte 100: {text}")
            );
        }
        // A byte someone holds: no reason, as QEMU elides it.
        for e in [Errno::EAGAIN, Errno::EACCES] {
            assert_eq!(
                said(on_setlk_error(e, 201).unwrap_err()),
                "Could not open 'x': Failed to lock byte 201"
            );
        }
    }

    #[test]
    fn a_conflict_carries_qemus_hint() {
        let e = LockError::Conflict("Failed to get \"write\" lock".into());
        assert_eq!(
            said(e),
            "Could not open 'x': Failed to get \"write\" lock\n\
             Is another process using the image [x]?"
        );
    }

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
