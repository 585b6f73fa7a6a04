//! Disk images for the boot scenarios, built without root or loop devices:
//! a GPT on a plain file (`sfdisk`), a FAT file system inside its one
//! partition (`mformat`/`mmd`/`mcopy -i file@@OFFSET`), the Linux kernel
//! and busybox from Debian packages, and a newc cpio initramfs written here.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::run;

/// Sector size of every disk built here.
const SECTOR: u64 = 512;
/// First sector of the one partition (1 MiB, as partitioning tools align).
const PART_START: u64 = 2048;
/// Sectors the backup GPT (header + 128 entries) takes at the disk's end.
const GPT_BACKUP: u64 = 33;
/// The EFI system partition type GUID.
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// Smallest partition (in sectors) that gets FAT32: with one-sector
/// clusters FAT32 needs at least 65525 clusters, so below this FAT16.
const FAT32_MIN_SECTORS: u64 = 70_000;

/// A file to put on a FAT volume: its path there (`/`-separated, from the
/// root) and its content.
pub(super) enum Content {
    /// Copied from a host file.
    File(PathBuf),
    /// These bytes.
    Bytes(Vec<u8>),
}

/// Builds `path`: a `mib` MiB disk with a GPT holding one EFI system
/// partition formatted FAT32 (FAT16 when small), holding `files`.
pub(super) fn gpt_fat_disk(path: &Path, mib: u64, files: &[(&str, Content)]) -> Result<(), String> {
    let sectors = mib * 1024 * 1024 / SECTOR;
    let part = (sectors - PART_START - GPT_BACKUP) / PART_START * PART_START;
    let _ = std::fs::remove_file(path);
    std::fs::File::create(path)
        .and_then(|f| f.set_len(sectors * SECTOR))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let script =
        format!("label: gpt\nstart={PART_START}, size={part}, type={ESP_TYPE}, name=\"ESP\"\n");
    pipe_in(
        &format!("sfdisk {}", path.display()),
        Command::new(sfdisk()).arg("--quiet").arg(path),
        script.as_bytes(),
    )?;
    let target = format!("{}@@{}", path.display(), PART_START * SECTOR);
    let mut fmt = Command::new("mformat");
    fmt.args(["-i", &target, "-T", &part.to_string()]).args([
        "-h",
        "64",
        "-s",
        "32",
        "-H",
        &PART_START.to_string(),
    ]);
    if part >= FAT32_MIN_SECTORS {
        fmt.arg("-F");
    }
    run(&format!("mformat {}", path.display()), fmt.arg("::"))?;
    add_files(path, files)
}

/// Adds (or replaces) `files` on the FAT volume of a disk made by
/// [`gpt_fat_disk`], creating the folders they need.
pub(super) fn add_files(disk: &Path, files: &[(&str, Content)]) -> Result<(), String> {
    let target = format!("{}@@{}", disk.display(), PART_START * SECTOR);
    let mut made: Vec<String> = Vec::new();
    for (name, content) in files {
        let parts: Vec<&str> = name.split('/').filter(|p| !p.is_empty()).collect();
        for depth in 1..parts.len() {
            let dir = format!("::/{}", parts[..depth].join("/"));
            if !made.contains(&dir) {
                // An existing folder is fine (mmd then fails; its error is
                // not ours to judge: mcopy below fails if it is missing).
                let _ = Command::new("mmd")
                    .args(["-i", &target, &dir])
                    .stderr(Stdio::null())
                    .status();
                made.push(dir);
            }
        }
        let dest = format!("::/{}", parts.join("/"));
        let mut cmd = Command::new("mcopy");
        cmd.args(["-o", "-i", &target]);
        match content {
            Content::File(src) => {
                run(&format!("mcopy {dest}"), cmd.arg(src).arg(&dest))?;
            }
            Content::Bytes(bytes) => {
                pipe_in(&format!("mcopy {dest}"), cmd.arg("-").arg(&dest), bytes)?;
            }
        }
    }
    Ok(())
}

/// `sfdisk`, which Debian keeps in /usr/sbin (not on a user's PATH).
fn sfdisk() -> PathBuf {
    ["/usr/sbin/sfdisk", "/sbin/sfdisk"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("sfdisk"))
}

/// Runs `cmd` with `input` on its stdin.
fn pipe_in(what: &str, cmd: &mut Command, input: &[u8]) -> Result<(), String> {
    use std::io::Write;
    eprintln!("xtask: == {what}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: cannot start {cmd:?}: {e} (install fdisk and mtools)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input)
            .map_err(|e| format!("{what}: writing its input: {e}"))?;
    }
    let status = child.wait().map_err(|e| format!("{what}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

/// The Debian packages the Linux scenario boots from, in `cache`
/// (downloaded with `apt-get download` when missing); returns the kernel
/// (`vmlinuz`) and the static busybox, extracted once into `cache`.
pub(super) fn linux_parts(cache: &Path) -> Result<(PathBuf, PathBuf), String> {
    std::fs::create_dir_all(cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let vmlinuz = cache.join("vmlinuz");
    if !vmlinuz.is_file() {
        let deb = deb(cache, "linux-image-", resolve_kernel_package)?;
        extract(&deb, "./boot/vmlinuz-*", &vmlinuz)?;
    }
    let busybox = cache.join("busybox");
    if !busybox.is_file() {
        let deb = deb(
            cache,
            "busybox-static_",
            || Ok("busybox-static".to_string()),
        )?;
        extract(&deb, "./bin/busybox", &busybox)?;
    }
    Ok((vmlinuz, busybox))
}

/// The kernel package `linux-image-amd64` depends on (e.g.
/// `linux-image-6.1.0-57-amd64`).
fn resolve_kernel_package() -> Result<String, String> {
    let out = Command::new("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .output()
        .map_err(|e| format!("apt-cache depends linux-image-amd64: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .map(str::to_string)
        .ok_or_else(|| {
            format!(
                "apt-cache depends linux-image-amd64 names no kernel package (run apt-get update); it printed:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// A `.deb` in `cache` whose name starts with `prefix` (a kernel image,
/// not the metapackage), downloaded when there is none.
fn deb(
    cache: &Path,
    prefix: &str,
    package: impl Fn() -> Result<String, String>,
) -> Result<PathBuf, String> {
    let find = || -> Result<Option<PathBuf>, String> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(cache)
            .map_err(|e| format!("{}: {e}", cache.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with(prefix)
                        && n.ends_with("_amd64.deb")
                        && !n.starts_with("linux-image-amd64_")
                })
            })
            .collect();
        found.sort();
        Ok(found.pop())
    };
    if let Some(p) = find()? {
        return Ok(p);
    }
    let name = package()?;
    run(
        &format!("apt-get download {name} (into {})", cache.display()),
        Command::new("apt-get")
            .current_dir(cache)
            .args(["download", &name]),
    )?;
    find()?.ok_or_else(|| {
        format!(
            "apt-get download {name} left no {prefix}*.deb in {}",
            cache.display()
        )
    })
}

/// Extracts the one member matching `pattern` from `deb`'s data into `dest`.
fn extract(deb: &Path, pattern: &str, dest: &Path) -> Result<(), String> {
    let what = format!("extract {pattern} from {}", deb.display());
    eprintln!("xtask: == {what}");
    let tmp = dest.with_extension("extract");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: cannot start dpkg-deb: {e}"))?;
    let tar_in = dpkg.stdout.take().ok_or("dpkg-deb has no stdout")?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&tmp)
        .args(["--wildcards", pattern])
        .stdin(tar_in)
        .status()
        .map_err(|e| format!("{what}: cannot start tar: {e}"))?;
    let dpkg = dpkg.wait().map_err(|e| format!("{what}: {e}"))?;
    if !tar.success() || !dpkg.success() {
        return Err(format!("{what} failed (dpkg-deb {dpkg}, tar {tar})"));
    }
    let found = find_file(&tmp).ok_or_else(|| format!("{what}: no such member"))?;
    std::fs::rename(&found, dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

/// The first regular file under `dir`.
fn find_file(dir: &Path) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.filter_map(Result::ok) {
        let p = entry.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p) {
                return Some(f);
            }
        } else if p.is_file() {
            return Some(p);
        }
    }
    None
}

/// The initramfs's `/init`: mount devtmpfs, print the marker on the serial
/// port, power off at once.
const INIT: &str = "#!/bin/busybox sh\n\
/bin/busybox mount -t devtmpfs devtmpfs /dev\n\
/bin/busybox echo QIMG-LINUX-MARKER > /dev/ttyS0\n\
/bin/busybox poweroff -f\n";

/// An uncompressed newc cpio initramfs with `/bin/busybox` (from
/// `busybox`), `/init`, the folders `/bin /dev /proc /sys` and the
/// character device `/dev/console` (5, 1): device nodes are just archive
/// entries, so no root is needed.
pub(super) fn initramfs(busybox: &Path) -> Result<Vec<u8>, String> {
    let bb = std::fs::read(busybox).map_err(|e| format!("{}: {e}", busybox.display()))?;
    let mut out = Vec::with_capacity(bb.len() + 4096);
    let mut ino = 1;
    let mut add = |name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| -> Result<(), String> {
        cpio_entry(&mut out, ino, name, mode, rdev, data)?;
        ino += 1;
        Ok(())
    };
    for dir in ["bin", "dev", "proc", "sys"] {
        add(dir, 0o040_755, (0, 0), &[])?;
    }
    add("dev/console", 0o020_600, (5, 1), &[])?;
    add("bin/busybox", 0o100_755, (0, 0), &bb)?;
    add("init", 0o100_755, (0, 0), INIT.as_bytes())?;
    cpio_entry(&mut out, 0, "TRAILER!!!", 0, (0, 0), &[])?;
    Ok(out)
}

/// Appends one newc ("070701") entry: the 110-byte ASCII header, the name
/// with its NUL padded to 4 bytes, the data padded to 4 bytes.
fn cpio_entry(
    out: &mut Vec<u8>,
    ino: u32,
    name: &str,
    mode: u32,
    rdev: (u32, u32),
    data: &[u8],
) -> Result<(), String> {
    let size = u32::try_from(data.len()).map_err(|_| format!("{name}: too big for cpio"))?;
    let namesize = u32::try_from(name.len() + 1).map_err(|_| format!("{name}: name too long"))?;
    let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
    let fields = [
        ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
    Ok(())
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::cpio_entry;

    #[test]
    fn cpio_header_layout() {
        let mut out = Vec::new();
        cpio_entry(&mut out, 7, "dev/console", 0o020_600, (5, 1), &[]).unwrap_or_default();
        // 110-byte header + "dev/console\0" (12) = 122, padded to 124.
        assert_eq!(out.len(), 124);
        let h = std::str::from_utf8(&out[..110]).unwrap_or("");
        assert!(h.starts_with("070701"));
        assert_eq!(&h[6..14], "00000007");
        assert_eq!(&h[14..22], "00002180");
        assert_eq!(&h[78..86], "00000005");
        assert_eq!(&h[86..94], "00000001");
        assert_eq!(&h[94..102], "0000000C");
        assert_eq!(&out[110..122], b"dev/console\0");
    }
}
