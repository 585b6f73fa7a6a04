//! Shared helpers for the integration and interop tests: finding external
//! tools (a missing tool fails the test when `CI=true`, and skips it with a
//! message otherwise), the shared test data, the built `qimg` binary, and
//! hashing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub mod cryptsetup;
pub mod fuzzing;
pub mod hold;
pub mod luks2;
pub mod poke;
pub mod powercut;
pub mod qemu;

use sha2::{Digest, Sha256};

/// Whether we run under CI, where a missing tool is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The project's `shared/` folder: `$QIMG_SHARED`, or `../shared` beside the
/// workspace.
pub fn shared_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("QIMG_SHARED") {
        return PathBuf::from(p);
    }
    workspace_root().join("..").join("shared")
}

/// A file under `shared/testdata/`, or `None` (a failure under CI) when the
/// shared folder is missing.
pub fn testdata(rel: &str) -> Option<PathBuf> {
    let p = shared_dir().join("testdata").join(rel);
    if p.exists() {
        return Some(p);
    }
    missing(&format!("test data {}", p.display()))
}

/// Reports something missing: panics under CI, prints a skip otherwise.
fn missing<T>(what: &str) -> Option<T> {
    if in_ci() {
        panic!("{what} is missing, and CI=true makes that a failure (.ci/run installs it)");
    }
    eprintln!("SKIPPED: {what} is missing (set CI=true to make this a failure)");
    None
}

/// Finds `name` on `PATH`. Returns `None` and prints a skip when absent;
/// panics under CI.
pub fn tool(name: &str) -> Option<PathBuf> {
    find_on_path(name).or_else(|| missing(&format!("tool `{name}`")))
}

/// Finds `name` on `PATH` without any skip or failure.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A file that must exist (firmware images and the like); `None` and a skip
/// when it does not, a panic under CI.
pub fn required_file(path: &str) -> Option<PathBuf> {
    let p = PathBuf::from(path);
    if p.is_file() {
        Some(p)
    } else {
        missing(&format!("file {path}"))
    }
}

/// Runs `cmd`, panicking with its output when it fails; returns stdout.
pub fn run_ok(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert_ok(cmd, &out);
    out.stdout
}

/// Panics with the command's output unless it exited 0.
pub fn assert_ok(cmd: &Command, out: &Output) {
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `cmd` expecting it to fail; returns its standard error.
pub fn run_fails(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{cmd:?} should fail\n{err}");
    err
}

/// Creates (or truncates) `path` as a sparse file of `len` bytes.
pub fn sparse_file(path: &Path, len: u64) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// The `qimg` binary of this workspace, built on first use.
pub fn qimg_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let root = workspace_root();
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&root)
            .args(["build", "--quiet", "-p", "qimg-cli", "--bin", "qimg"]);
        run_ok(&mut cmd);
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let bin = target.join("debug").join("qimg");
        assert!(bin.is_file(), "built qimg not found at {}", bin.display());
        bin
    })
    .clone()
}

/// Runs the built `qimg` with the (shell-quoted) arguments `args` on a
/// pseudo-terminal, through `script` (util-linux), fed `input`; returns
/// whether it succeeded and what it printed (the terminal's echo included).
pub fn qimg_on_pty(script: &Path, args: &str, input: &str) -> (bool, String) {
    use std::io::Write;
    use std::process::Stdio;
    let cmd = format!("{} {args}", qimg_bin().display());
    let mut child = Command::new(script)
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A `Command` for the built `qimg`.
pub fn qimg() -> Command {
    Command::new(qimg_bin())
}

/// `qimg luks VERB EXTRA [--key-file KEY] VOL [ARG]`: the cryptsetup-style
/// key verbs (`add-key`, `change-key`, `remove-key`), to be run by the
/// caller.
pub fn qimg_luks(
    verb: &str,
    extra: &[&str],
    key: Option<&Path>,
    vol: &Path,
    arg: Option<&Path>,
) -> Command {
    let mut c = qimg();
    c.args(["luks", verb]).args(extra);
    if let Some(k) = key {
        c.arg("--key-file").arg(k);
    }
    c.arg(vol);
    if let Some(a) = arg {
        c.arg(a);
    }
    c
}

/// `qimg luks header-backup --header-backup-file TO VOL`, to be run by the
/// caller.
pub fn qimg_header_backup(vol: &Path, to: &Path) -> Command {
    let mut c = qimg();
    c.args(["luks", "header-backup", "--header-backup-file"])
        .arg(to)
        .arg(vol);
    c
}

/// `qimg luks header-restore -q --header-backup-file FROM VOL`, to be run
/// by the caller.
pub fn qimg_header_restore(vol: &Path, from: &Path) -> Command {
    let mut c = qimg();
    c.args(["luks", "header-restore", "-q", "--header-backup-file"])
        .arg(from)
        .arg(vol);
    c
}

/// `qimg create -q -f luks --key-file KEY -o OPTS VOL SIZE`, checked.
pub fn qimg_create_luks(vol: &Path, key: &Path, opts: &str, size: &str) {
    run_ok(
        qimg()
            .args(["create", "-q", "-f", "luks", "--key-file"])
            .arg(key)
            .args(["-o", opts])
            .arg(vol)
            .arg(size),
    );
}

/// `qimg convert -f luks -O raw --key-file KEY [--header HEADER] VOL OUT`,
/// to be run by the caller.
pub fn qimg_luks_to_raw(vol: &Path, header: Option<&Path>, key: &Path, out: &Path) -> Command {
    let mut c = qimg();
    c.args(["convert", "-f", "luks", "-O", "raw", "--key-file"])
        .arg(key);
    if let Some(h) = header {
        c.arg("--header").arg(h);
    }
    c.arg(vol).arg(out);
    c
}

/// `qimg luks dump --output json VOL`.
pub fn qimg_luks_dump(vol: &Path) -> serde_json::Value {
    json_of(qimg().args(["luks", "dump", "--output", "json"]).arg(vol))
}

/// A temporary folder on tmpfs (`/dev/shm`) when there is one, else in
/// the default place: the writers flush often, and fsync on a real disk
/// makes the write and crash tests slow.
pub fn tmpfs_tempdir() -> tempfile::TempDir {
    if Path::new("/dev/shm").is_dir() {
        if let Ok(d) = tempfile::tempdir_in("/dev/shm") {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

/// The xorshift64 generator the write workloads draw from (seed non-zero).
pub struct XorShift(pub u64);

impl XorShift {
    /// The next value.
    #[allow(clippy::should_implement_trait)] // not an iterator: it never ends
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// The next value below `n` (0 for `n` = 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Lower-case hex SHA-256 of a file's content, streamed.
pub fn sha256_file(path: &Path) -> String {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Decompresses an `.xz` test file into `dir`, returning the new path.
pub fn unxz(src: &Path, dir: &Path) -> PathBuf {
    let name = src
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_end_matches(".xz")
        .to_string();
    let dst = dir.join(name);
    let data = run_ok(Command::new("xz").arg("-dc").arg(src));
    std::fs::write(&dst, data).unwrap();
    dst
}

/// Unpacks a `.tar.xz` test archive into `dir`.
pub fn untar_xz(src: &Path, dir: &Path) {
    run_ok(Command::new("tar").arg("-xJf").arg(src).arg("-C").arg(dir));
}

/// Asserts that every key present in both JSON values has equal values,
/// recursively (arrays element by element, lengths equal). Returns how many
/// leaf values were compared, so a caller can insist that something was.
pub fn assert_json_agrees(
    ours: &serde_json::Value,
    theirs: &serde_json::Value,
    path: &str,
) -> usize {
    use serde_json::Value;
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => a
            .iter()
            .filter_map(|(k, v)| b.get(k).map(|w| (k, v, w)))
            .map(|(k, v, w)| assert_json_agrees(v, w, &format!("{path}.{k}")))
            .sum(),
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "array length differs at {path}");
            a.iter()
                .zip(b)
                .enumerate()
                .map(|(i, (v, w))| assert_json_agrees(v, w, &format!("{path}[{i}]")))
                .sum()
        }
        (a, b) => {
            assert_eq!(a, b, "value differs at {path}");
            1
        }
    }
}

/// Runs a command and parses its standard output as JSON.
pub fn json_of(cmd: &mut Command) -> serde_json::Value {
    let out = run_ok(cmd);
    serde_json::from_slice(&out).unwrap_or_else(|e| {
        panic!(
            "{cmd:?} printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out)
        )
    })
}

/// A cryptographic RNG over `/dev/urandom`, for tests that format volumes.
pub struct OsRng(std::fs::File);

impl OsRng {
    /// Opens `/dev/urandom`.
    pub fn new() -> Self {
        Self(std::fs::File::open("/dev/urandom").expect("/dev/urandom"))
    }
}

impl Default for OsRng {
    fn default() -> Self {
        Self::new()
    }
}

impl rand_core::TryRng for OsRng {
    type Error = std::io::Error;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        use std::io::Read;
        self.0.read_exact(dst)
    }
}

impl rand_core::TryCryptoRng for OsRng {}
