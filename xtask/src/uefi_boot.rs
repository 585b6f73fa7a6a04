//! `cargo xtask uefi-test`'s boot scenarios (issue #20): each builds an
//! outer "USB stick" disk holding qimg-efi and a disk image made with the
//! release `qimg`, boots OVMF under TCG, types passphrases at the prompt
//! when the scenario says so, and checks the `QIMG-` lines on the serial
//! port: every `check=` hash, the speed and memory budget, and the marker
//! the booted inner program or Linux prints. Two proof boots come first:
//! OVMF straight from an inner disk (the disk builders and the marker
//! program) and Linux straight from `-kernel`/`-initrd` (the kernel and the
//! initramfs), so a failure there is not blamed on qimg-efi.
//!
//! Serial logs: `target/uefi-test/<scenario>.log`.

mod disk;
pub(crate) mod serial;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::{cargo, root, run};
use disk::Content;
use serial::{BootLog, Until};

/// Firmware code image (Debian `ovmf`).
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// Firmware variable store template.
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// The passphrase the test images are made with.
const PASSPHRASE: &str = "boot-test-passphrase";
/// What the typed scenarios type first (wrong).
const WRONG: &str = "not-the-passphrase";
/// Size of the inner disk (GPT + FAT16 holding the marker or Linux).
const INNER_MIB: u64 = 32;
/// `check=` lines per scenario.
const CHECKS: usize = 16;
/// Most blocks one `check=` reads.
const MAX_CHECK_BLOCKS: u64 = 64;
/// Problems a failed scenario lists in the final summary (the rest are
/// counted; all are printed with the scenario).
const MAX_REPORTED: usize = 6;
/// `speed-mib=` of every qimg-efi scenario.
const SPEED_MIB: u64 = 16;
/// The `qimg` secret object with the passphrase (id `s0`).
fn secret() -> String {
    format!("secret,id=s0,data={PASSPHRASE}")
}

/// An encrypted image format made by `qimg convert -O format -o options`
/// with the secret `s0`; cheap key derivation (the firmware unlocks it
/// under TCG). The reader test in `uefi.rs` makes the same three.
pub(crate) struct Encryption {
    /// Named in progress lines.
    what: &'static str,
    /// `-O`.
    format: &'static str,
    /// `-o`.
    options: &'static str,
}

/// LUKS1 inside a qcow2 image.
pub(crate) const LUKS_QCOW2: Encryption = Encryption {
    what: "LUKS qcow2",
    format: "qcow2",
    options: "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
};
/// A raw LUKS1 volume.
pub(crate) const LUKS1: Encryption = Encryption {
    what: "LUKS1",
    format: "luks",
    options: "key-secret=s0,iter-time=10",
};
/// A raw LUKS2 volume: Argon2id (16 MiB) and 4 KiB sectors.
pub(crate) const LUKS2: Encryption = Encryption {
    what: "LUKS2",
    format: "luks",
    options: "luks-version=2,key-secret=s0,iter-time=10,pbkdf=argon2id,pbkdf-memory=16384,pbkdf-parallel=1,pbkdf-iterations=4,sector-size=4096",
};

impl Encryption {
    /// `qimg` arguments converting the raw file `src` to `dst` in this
    /// format; `secret` is the `--object` that defines `s0`.
    pub(crate) fn convert_args(&self, secret: &str, src: &str, dst: &str) -> Vec<String> {
        [
            "convert",
            "-f",
            "raw",
            "-O",
            self.format,
            "--object",
            secret,
            "-o",
            self.options,
            src,
            dst,
        ]
        .map(str::to_string)
        .to_vec()
    }
}

/// The names of every scenario, in the order they run.
pub(crate) const SCENARIOS: &[&str] = &[
    "inner-disk",
    "linux-direct",
    "luks-qcow2-file",
    "luks2-disk",
    "compressed-backing",
    "luks1-detached",
    "linux",
    "typed-passphrase",
    "wrong-passphrase",
];

/// How a scenario (or the reader test in `uefi.rs`) boots.
pub(crate) enum Machine {
    /// OVMF from the disks (the first is the boot disk).
    Ovmf(Vec<PathBuf>),
    /// OVMF from a host folder QEMU shows as a FAT disk (vvfat, on the
    /// default controller), with `disks` beside it.
    OvmfFolder {
        /// The folder (an EFI system partition's files).
        esp: PathBuf,
        /// Raw disks after it.
        disks: Vec<PathBuf>,
    },
    /// No firmware: `-kernel`/`-initrd`, console on the serial port.
    Kernel { kernel: PathBuf, initrd: PathBuf },
}

/// A line the serial log must, or must not, hold.
enum Expect {
    /// A `QIMG-` line starting with this text.
    Line(String),
    /// At least this many `QIMG-` lines starting with this text.
    Lines(String, usize),
    /// No `QIMG-` line starting with this text.
    NoLine(String),
}

/// One prepared boot.
struct Plan {
    machine: Machine,
    /// Passphrases typed at successive prompts.
    typed: Vec<String>,
    expect: Vec<Expect>,
}

/// What every scenario shares: tools and programs, built once.
struct Ctx {
    qimg: PathBuf,
    marker: PathBuf,
    /// qimg-efi, or why it could not be built.
    qimg_efi: Result<PathBuf, String>,
    /// `target/uefi-test`: logs here, each scenario's files in a subfolder.
    out: PathBuf,
    /// `target/uefi-deps`: the Debian packages and what is taken from them.
    deps: PathBuf,
}

/// Fails unless the OVMF firmware files are installed.
pub(crate) fn require_ovmf() -> Result<(), String> {
    for f in [OVMF_CODE, OVMF_VARS] {
        if !Path::new(f).is_file() {
            return Err(format!(
                "{f} is missing: install Debian's `ovmf` (.ci/run does)"
            ));
        }
    }
    Ok(())
}

/// Builds the release `qimg`; returns its path.
pub(crate) fn build_qimg() -> Result<PathBuf, String> {
    run(
        "build qimg",
        cargo().args(["build", "--release", "-p", "qimg-cli", "--bin", "qimg"]),
    )?;
    Ok(root().join("target").join("release").join("qimg"))
}

/// Runs the boot scenarios named in `only` (all when empty).
pub(crate) fn test(only: &[String]) -> Result<(), String> {
    require_ovmf()?;
    if let Some(bad) = only.iter().find(|n| !SCENARIOS.contains(&n.as_str())) {
        return Err(format!(
            "no boot scenario `{bad}`; there are: {}",
            SCENARIOS.join(", ")
        ));
    }
    let started = Instant::now();
    let qimg = build_qimg()?;
    let out = root().join("target").join("uefi-test");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let ctx = Ctx {
        qimg,
        marker: build_efi("tests/uefi-marker", "uefi-marker")?,
        qimg_efi: build_efi("qimg-efi", "qimg-efi"),
        out,
        deps: root().join("target").join("uefi-deps"),
    };
    let mut failures = Vec::new();
    let mut passed = 0;
    for name in SCENARIOS
        .iter()
        .filter(|n| only.is_empty() || only.iter().any(|o| o == *n))
    {
        println!("uefi-test boot scenario {name}:");
        let t = Instant::now();
        match scenario(&ctx, name) {
            Ok(()) => {
                passed += 1;
                println!("  {name}: ok ({:.1}s)", t.elapsed().as_secs_f64());
            }
            Err(why) => {
                println!(
                    "  {name}: FAILED ({:.1}s):\n      {}",
                    t.elapsed().as_secs_f64(),
                    why.replace('\n', "\n      ")
                );
                // The summary: the first few problems (all are above).
                let lines: Vec<&str> = why.lines().collect();
                let mut short = lines[..lines.len().min(MAX_REPORTED)].join("; ");
                if lines.len() > MAX_REPORTED {
                    short.push_str(&format!("; and {} more", lines.len() - MAX_REPORTED));
                }
                failures.push(format!("{name}: {short}"));
            }
        }
    }
    println!(
        "uefi-test boot scenarios: {passed} passed, {} failed, {:.0}s",
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "uefi-test boot scenarios failed:\n  {}",
            failures.join("\n  ")
        ))
    }
}

/// Prepares, boots and judges one scenario; its files are removed when it
/// passes and kept (beside its log) when it fails.
fn scenario(ctx: &Ctx, name: &str) -> Result<(), String> {
    let work = ctx.out.join(name);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let plan = match name {
        "inner-disk" => inner_disk(ctx, &work),
        "linux-direct" => linux_direct(ctx, &work),
        "luks-qcow2-file" => luks_qcow2_file(ctx, &work, Some(PASSPHRASE), "luks-qcow2"),
        "luks2-disk" => luks2_disk(ctx, &work),
        "compressed-backing" => compressed_backing(ctx, &work),
        "luks1-detached" => luks1_detached(ctx, &work),
        "linux" => linux(ctx, &work),
        "typed-passphrase" => luks_qcow2_file(ctx, &work, None, "typed")
            .map(|p| typed(p, &[WRONG, PASSPHRASE], "typed")),
        "wrong-passphrase" => luks_qcow2_file(ctx, &work, None, "wrong").map(|p| wrong(p, "wrong")),
        other => Err(format!("no boot scenario `{other}`")),
    }?;
    let log = ctx.out.join(format!("{name}.log"));
    let boot = boot(
        &plan.machine,
        &work,
        &plan.typed,
        &log,
        Until::ExitOrFailure,
    )?;
    println!(
        "    (boot took {:.1}s; serial log {})",
        boot.seconds,
        log.display()
    );
    let lines = boot.qimg_lines();
    let mut missing = Vec::new();
    for e in &plan.expect {
        match e {
            Expect::Line(p) if !lines.iter().any(|l| l.starts_with(p.as_str())) => {
                missing.push(format!("missing line `{p}`"));
            }
            Expect::Lines(p, n) => {
                let got = lines.iter().filter(|l| l.starts_with(p.as_str())).count();
                if got < *n {
                    missing.push(format!("{got} of {n} lines `{p}`"));
                }
            }
            Expect::NoLine(p) => {
                if let Some(l) = lines.iter().find(|l| l.starts_with(p.as_str())) {
                    missing.push(format!("unwanted line `{l}`"));
                }
            }
            Expect::Line(_) => {}
        }
    }
    if missing.is_empty() {
        let _ = std::fs::remove_dir_all(&work);
        return Ok(());
    }
    // What went wrong first (unwanted lines such as QIMG-ERROR), then the
    // missing lines, one per line.
    missing.sort_by_key(|m| !m.starts_with("unwanted"));
    Err(missing.join("\n"))
}

/// Boots `machine` (its variable store in `work`), typing `typed` at the
/// passphrase prompts, until `until`; the serial output is kept in `log`.
pub(crate) fn boot(
    machine: &Machine,
    work: &Path,
    typed: &[String],
    log: &Path,
    until: Until,
) -> Result<BootLog, String> {
    serial::boot(qemu(machine, work)?, typed, log, until)
}

/// The QEMU command line for `machine` (without `-serial`).
fn qemu(machine: &Machine, work: &Path) -> Result<Command, String> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "q35", "-accel", "tcg", "-m", "1024"])
        .args(["-nic", "none", "-display", "none", "-monitor", "none"])
        .arg("-no-reboot");
    match machine {
        Machine::Ovmf(disks) | Machine::OvmfFolder { disks, .. } => {
            let vars = work.join("vars.fd");
            std::fs::copy(OVMF_VARS, &vars).map_err(|e| format!("{}: {e}", vars.display()))?;
            cmd.arg("-drive")
                .arg(format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"))
                .arg("-drive")
                .arg(format!("if=pflash,format=raw,file={}", vars.display()));
            if let Machine::OvmfFolder { esp, .. } = machine {
                cmd.arg("-drive")
                    .arg(format!("format=raw,file=fat:rw:{}", esp.display()));
            }
            for (i, d) in disks.iter().enumerate() {
                cmd.arg("-drive")
                    .arg(format!(
                        "if=none,id=d{i},format=raw,readonly=on,file={}",
                        d.display()
                    ))
                    .arg("-device")
                    // No bootindex: with a boot order from QEMU, OVMF
                    // connects only the devices it names, and `image=scan`
                    // must see the others. The first disk is the first
                    // bootable one (the others hold no ESP).
                    .arg(format!("virtio-blk-pci,drive=d{i}"));
            }
        }
        Machine::Kernel { kernel, initrd } => {
            cmd.arg("-kernel")
                .arg(kernel)
                .arg("-initrd")
                .arg(initrd)
                .args(["-append", "console=ttyS0 panic=-1"]);
        }
    }
    Ok(cmd)
}

/// Builds a UEFI program (its own cargo workspace under `dir`, relative to
/// the root); returns the path of `name.efi`.
pub(crate) fn build_efi(dir: &str, name: &str) -> Result<PathBuf, String> {
    let dir = root().join(dir);
    if !dir.join("Cargo.toml").is_file() {
        return Err(format!("{} does not exist", dir.display()));
    }
    run(
        &format!("build {name}"),
        cargo()
            .current_dir(&dir)
            .args(["build", "--release", "--target", "x86_64-unknown-uefi"]),
    )?;
    let efi = dir
        .join("target")
        .join("x86_64-unknown-uefi")
        .join("release")
        .join(format!("{name}.efi"));
    if efi.is_file() {
        Ok(efi)
    } else {
        Err(format!("{} was not built", efi.display()))
    }
}

/// The inner disk: GPT + FAT with the marker program as the default
/// loader, `\marker.txt` holding `marker`, and `extra` files.
fn make_inner(
    ctx: &Ctx,
    path: &Path,
    marker: &str,
    extra: Vec<(&str, Content)>,
) -> Result<(), String> {
    let mut files = vec![
        ("EFI/BOOT/BOOTX64.EFI", Content::File(ctx.marker.clone())),
        (
            "marker.txt",
            Content::Bytes(format!("{marker}\n").into_bytes()),
        ),
    ];
    files.extend(extra);
    disk::gpt_fat_disk(path, INNER_MIB, &files)
}

fn inner_disk(ctx: &Ctx, work: &Path) -> Result<Plan, String> {
    let inner = work.join("inner.raw");
    make_inner(ctx, &inner, "inner-direct", vec![])?;
    Ok(Plan {
        machine: Machine::Ovmf(vec![inner]),
        typed: vec![],
        expect: vec![Expect::Line("QIMG-INNER-MARKER inner-direct".into())],
    })
}

/// The kernel and a fresh initramfs in `work`.
fn kernel_and_initrd(ctx: &Ctx, work: &Path) -> Result<(PathBuf, PathBuf), String> {
    let (vmlinuz, busybox) = disk::linux_parts(&ctx.deps)?;
    let initrd = work.join("initrd.img");
    std::fs::write(&initrd, disk::initramfs(&busybox)?)
        .map_err(|e| format!("{}: {e}", initrd.display()))?;
    Ok((vmlinuz, initrd))
}

fn linux_direct(ctx: &Ctx, work: &Path) -> Result<Plan, String> {
    let (kernel, initrd) = kernel_and_initrd(ctx, work)?;
    Ok(Plan {
        machine: Machine::Kernel { kernel, initrd },
        typed: vec![],
        expect: vec![Expect::Line("QIMG-LINUX-MARKER".into())],
    })
}

/// Runs `qimg` in `work`.
fn qimg<S: AsRef<std::ffi::OsStr>>(
    ctx: &Ctx,
    work: &Path,
    what: &str,
    args: &[S],
) -> Result<(), String> {
    run(what, Command::new(&ctx.qimg).current_dir(work).args(args))
}

/// `qimg convert -O raw` of `image` (in `work`); `secret`: it is encrypted.
fn to_raw(ctx: &Ctx, work: &Path, image: &str, encrypted: bool) -> Result<PathBuf, String> {
    let raw = format!("{image}.expected.raw");
    let s = secret();
    let mut args = vec!["convert", "-O", "raw"];
    if encrypted {
        args.extend(["--object", &s]);
    }
    args.extend([image, &raw]);
    qimg(ctx, work, &format!("qimg convert {image} -O raw"), &args)?;
    Ok(work.join(raw))
}

/// `CHECKS` `(lba, count, sha256)` over the raw guest content `raw`: block
/// 0, the last block, and blocks from a PRNG seeded with `seed`.
fn checks(raw: &Path, seed: &str) -> Result<Vec<(u64, u64, String)>, String> {
    let data = std::fs::read(raw).map_err(|e| format!("{}: {e}", raw.display()))?;
    let blocks = (data.len() / 512) as u64;
    if blocks == 0 {
        return Err(format!("{} is empty", raw.display()));
    }
    let mut x = seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::with_capacity(CHECKS);
    for i in 0..CHECKS {
        let (lba, count) = match i {
            0 => (0, 1 + next() % MAX_CHECK_BLOCKS),
            1 => (blocks - 1, 1),
            _ => {
                let lba = next() % blocks;
                (lba, (1 + next() % MAX_CHECK_BLOCKS).min(blocks - lba))
            }
        };
        let count = count.min(blocks - lba);
        let start = usize::try_from(lba * 512).map_err(|e| e.to_string())?;
        let end = usize::try_from((lba + count) * 512).map_err(|e| e.to_string())?;
        out.push((lba, count, sha256(&data[start..end])?));
    }
    Ok(out)
}

/// SHA-256 of `bytes` in hex (coreutils' `sha256sum`; xtask has no
/// dependencies).
pub(crate) fn sha256(bytes: &[u8]) -> Result<String, String> {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("sha256sum: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("sha256sum has no stdin")?
        .write_all(bytes)
        .map_err(|e| format!("sha256sum: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("sha256sum: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| "sha256sum printed nothing".to_string())
}

/// The qimg-efi config: `image`, the passphrase file when given, the
/// checks over `raw`, the speed test, and `extra` lines.
fn config(
    image: &str,
    passphrase_file: bool,
    checks: &[(u64, u64, String)],
    extra: &[String],
) -> String {
    let mut cfg = format!("# qimg-efi boot scenario (cargo xtask uefi-test)\nimage={image}\n");
    if passphrase_file {
        cfg.push_str("passphrase-file=\\qimg\\passphrase\n");
    }
    for (lba, count, hash) in checks {
        cfg.push_str(&format!("check={lba}+{count}:{hash}\n"));
    }
    cfg.push_str(&format!("speed-mib={SPEED_MIB}\n"));
    for l in extra {
        cfg.push_str(l);
        cfg.push('\n');
    }
    cfg
}

/// What every passing qimg-efi boot prints.
fn efi_expect(checks: &[(u64, u64, String)]) -> Vec<Expect> {
    let mut e = vec![
        Expect::Line("QIMG-START qimg-efi".into()),
        Expect::Line("QIMG-IMAGE ".into()),
        Expect::Line("QIMG-BUDGET bytes=".into()),
        Expect::Line("QIMG-DEVICE blocks=".into()),
        Expect::Line("QIMG-SPEED bytes=".into()),
        Expect::Line("QIMG-BOOT ".into()),
        Expect::NoLine("QIMG-ERROR".into()),
        Expect::NoLine("QIMG-FAIL".into()),
        Expect::NoLine("QIMG-WRONG-PASSPHRASE".into()),
    ];
    for (lba, count, _) in checks {
        e.push(Expect::Line(format!(
            "QIMG-CHECK lba={lba} count={count} ok"
        )));
    }
    e
}

/// The outer "USB stick": GPT + FAT32 with qimg-efi as the default loader,
/// `\qimg\qimg.cfg`, the passphrase file when `passphrase`, and `images`
/// (names in `work`) under `\images\`.
fn make_outer(
    ctx: &Ctx,
    work: &Path,
    cfg: &str,
    passphrase: Option<&str>,
    images: &[&str],
) -> Result<PathBuf, String> {
    let efi = ctx.qimg_efi.clone()?;
    let mut files = vec![
        ("EFI/BOOT/BOOTX64.EFI", Content::File(efi)),
        ("qimg/qimg.cfg", Content::Bytes(cfg.as_bytes().to_vec())),
    ];
    if let Some(p) = passphrase {
        // A trailing newline, as an editor leaves it: qimg-efi strips it.
        files.push((
            "qimg/passphrase",
            Content::Bytes(format!("{p}\n").into_bytes()),
        ));
    }
    let mut bytes = 0;
    let names: Vec<String> = images.iter().map(|i| format!("images/{i}")).collect();
    for (i, n) in images.iter().zip(&names) {
        let p = work.join(i);
        bytes += std::fs::metadata(&p)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .len();
        files.push((n.as_str(), Content::File(p)));
    }
    // FAT32 (at least 64 MiB) with room for the images.
    let mib = (bytes >> 20) + 48;
    let mib = mib.max(64);
    let outer = work.join("outer.raw");
    disk::gpt_fat_disk(&outer, mib, &files)?;
    Ok(outer)
}

/// `inner.raw` (`make_inner` with `marker` and `extra`) converted to `enc`
/// as `image`; returns `qimg convert -O raw` of `image`, the content the
/// firmware must read.
fn encrypted_inner(
    ctx: &Ctx,
    work: &Path,
    marker: &str,
    extra: Vec<(&str, Content)>,
    enc: &Encryption,
    image: &str,
) -> Result<PathBuf, String> {
    make_inner(ctx, &work.join("inner.raw"), marker, extra)?;
    qimg(
        ctx,
        work,
        &format!("qimg convert inner.raw -> {}", enc.what),
        &enc.convert_args(&secret(), "inner.raw", image),
    )?;
    to_raw(ctx, work, image, true)
}

/// Scenario `luks-qcow2-file` (passphrase from the file) and the base of
/// the typed ones (`passphrase` None: prompt).
fn luks_qcow2_file(
    ctx: &Ctx,
    work: &Path,
    passphrase: Option<&str>,
    marker: &str,
) -> Result<Plan, String> {
    let marker = if passphrase.is_some() {
        marker
    } else {
        "typed"
    };
    let raw = encrypted_inner(ctx, work, marker, vec![], &LUKS_QCOW2, "system.qcow2")?;
    let checks = checks(&raw, work.to_string_lossy().as_ref())?;
    let cfg = config("\\images\\system.qcow2", passphrase.is_some(), &checks, &[]);
    let outer = make_outer(ctx, work, &cfg, passphrase, &["system.qcow2"])?;
    let mut expect = efi_expect(&checks);
    expect.push(Expect::Line(format!("QIMG-INNER-MARKER {marker}")));
    Ok(Plan {
        machine: Machine::Ovmf(vec![outer]),
        typed: vec![],
        expect,
    })
}

/// Scenario `typed-passphrase`: `typed` at the prompts (wrong, then right).
fn typed(mut plan: Plan, typed: &[&str], marker: &str) -> Plan {
    plan.typed = typed.iter().map(|s| (*s).to_string()).collect();
    plan.expect
        .retain(|e| !matches!(e, Expect::NoLine(p) if p == "QIMG-WRONG-PASSPHRASE"));
    plan.expect
        .push(Expect::Line("QIMG-WRONG-PASSPHRASE try=1/3".into()));
    plan.expect
        .push(Expect::NoLine("QIMG-WRONG-PASSPHRASE try=2/3".into()));
    plan.expect
        .push(Expect::Line(format!("QIMG-INNER-MARKER {marker}")));
    plan
}

/// Scenario `wrong-passphrase`: three wrong passphrases, then nothing may
/// boot.
fn wrong(mut plan: Plan, marker: &str) -> Plan {
    plan.typed = vec![WRONG.into(), format!("{WRONG}-2"), format!("{WRONG}-3")];
    plan.expect = vec![
        Expect::Line("QIMG-START qimg-efi".into()),
        Expect::Line("QIMG-WRONG-PASSPHRASE try=1/3".into()),
        Expect::Line("QIMG-WRONG-PASSPHRASE try=2/3".into()),
        Expect::Line("QIMG-WRONG-PASSPHRASE try=3/3".into()),
        Expect::Lines("QIMG-WRONG-PASSPHRASE".into(), 3),
        Expect::Line("QIMG-FAIL ".into()),
        Expect::NoLine("QIMG-DEVICE".into()),
        Expect::NoLine("QIMG-BOOT".into()),
        Expect::NoLine(format!("QIMG-INNER-MARKER {marker}")),
        Expect::NoLine("QIMG-INNER-MARKER".into()),
    ];
    plan
}

/// Scenario `luks2-disk`: a raw LUKS2 (Argon2id) volume on its own disk,
/// found by `image=scan`.
fn luks2_disk(ctx: &Ctx, work: &Path) -> Result<Plan, String> {
    let raw = encrypted_inner(ctx, work, "luks2", vec![], &LUKS2, "system.luks")?;
    let checks = checks(&raw, "luks2-disk")?;
    let cfg = config("scan", true, &checks, &[]);
    let outer = make_outer(ctx, work, &cfg, Some(PASSPHRASE), &[])?;
    let mut expect = efi_expect(&checks);
    expect.push(Expect::Line("QIMG-IMAGE source=blockio:".into()));
    expect.push(Expect::Line("QIMG-INNER-MARKER luks2".into()));
    Ok(Plan {
        machine: Machine::Ovmf(vec![outer, work.join("system.luks")]),
        typed: vec![],
        expect,
    })
}

/// Scenario `compressed-backing`: a compressed qcow2 holding only what
/// changed against its backing file `base.qcow2`, both on the stick.
fn compressed_backing(ctx: &Ctx, work: &Path) -> Result<Plan, String> {
    let v1 = work.join("v1.raw");
    make_inner(ctx, &v1, "v1", vec![])?;
    qimg(
        ctx,
        work,
        "qimg convert v1 -> base.qcow2",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "v1.raw",
            "base.qcow2",
        ],
    )?;
    let v2 = work.join("v2.raw");
    std::fs::copy(&v1, &v2).map_err(|e| format!("{}: {e}", v2.display()))?;
    disk::add_files(
        &v2,
        &[("marker.txt", Content::Bytes(b"backing-v2\n".to_vec()))],
    )?;
    qimg(
        ctx,
        work,
        "qimg convert v2 -> v2.qcow2",
        &["convert", "-f", "raw", "-O", "qcow2", "v2.raw", "v2.qcow2"],
    )?;
    // An empty overlay reading as v2, rebased (safe mode) onto base.qcow2:
    // rebase copies in exactly the clusters where v2 and base differ, so
    // the overlay keeps only what changed. (Rebasing the standalone
    // v2.qcow2 would keep every cluster it holds.)
    qimg(
        ctx,
        work,
        "qimg create delta.qcow2 over v2.qcow2",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "v2.qcow2",
            "-F",
            "qcow2",
            "delta.qcow2",
        ],
    )?;
    qimg(
        ctx,
        work,
        "qimg rebase delta.qcow2 onto base.qcow2",
        &["rebase", "-b", "base.qcow2", "-F", "qcow2", "delta.qcow2"],
    )?;
    qimg(
        ctx,
        work,
        "qimg convert -c -B base.qcow2 delta.qcow2 -> system.qcow2",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "delta.qcow2",
            "system.qcow2",
        ],
    )?;
    assert_compressed_with_backing(work)?;
    let raw = to_raw(ctx, work, "system.qcow2", false)?;
    let v2_bytes = std::fs::read(&v2).map_err(|e| format!("{}: {e}", v2.display()))?;
    let raw_bytes = std::fs::read(&raw).map_err(|e| format!("{}: {e}", raw.display()))?;
    if v2_bytes != raw_bytes {
        return Err("system.qcow2 (with base.qcow2) does not read as v2.raw".into());
    }
    let checks = checks(&raw, "compressed-backing")?;
    let cfg = config("\\images\\system.qcow2", false, &checks, &[]);
    let outer = make_outer(ctx, work, &cfg, None, &["system.qcow2", "base.qcow2"])?;
    let mut expect = efi_expect(&checks);
    expect.push(Expect::Line("QIMG-IMAGE source=file:".into()));
    expect.push(Expect::Line("QIMG-INNER-MARKER backing-v2".into()));
    Ok(Plan {
        machine: Machine::Ovmf(vec![outer]),
        typed: vec![],
        expect,
    })
}

/// Scenario `luks1-detached`: a raw LUKS1 volume whose header lives in a
/// file of its own (`hdr.img`, as `cryptsetup --header` keeps it) beside
/// the data file (`data.img`, its header area zeroed), both on the stick.
fn luks1_detached(ctx: &Ctx, work: &Path) -> Result<Plan, String> {
    let raw = encrypted_inner(ctx, work, "luks1-detached", vec![], &LUKS1, "system.luks")?;
    let path = work.join("system.luks");
    let mut volume = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !volume.starts_with(b"LUKS\xba\xbe\x00\x01") || volume.len() < 108 {
        return Err("system.luks is not a LUKS1 volume".into());
    }
    // The LUKS1 header's payload offset: big-endian sectors at byte 104.
    let sectors = u32::from_be_bytes([volume[104], volume[105], volume[106], volume[107]]);
    let payload = usize::try_from(sectors)
        .ok()
        .and_then(|n| n.checked_mul(512))
        .filter(|&n| n > 0 && n < volume.len())
        .ok_or_else(|| format!("system.luks: payload offset of {sectors} sectors"))?;
    let header = volume[..payload].to_vec();
    volume[..payload].fill(0);
    for (name, bytes) in [("hdr.img", &header), ("data.img", &volume)] {
        let p = work.join(name);
        std::fs::write(&p, bytes).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let checks = checks(&raw, "luks1-detached")?;
    let cfg = config(
        "\\images\\data.img",
        true,
        &checks,
        &["header=\\images\\hdr.img".to_string()],
    );
    let outer = make_outer(ctx, work, &cfg, Some(PASSPHRASE), &["data.img", "hdr.img"])?;
    let mut expect = efi_expect(&checks);
    expect.push(Expect::Line("QIMG-IMAGE source=file:".into()));
    expect.push(Expect::Line(
        "QIMG-IMAGE source=file:\\images\\data.img kind=luks1".into(),
    ));
    expect.push(Expect::Line("QIMG-INNER-MARKER luks1-detached".into()));
    Ok(Plan {
        machine: Machine::Ovmf(vec![outer]),
        typed: vec![],
        expect,
    })
}

/// qemu-img's word that `system.qcow2` has a backing file and compressed
/// clusters (so the scenario tests what it says).
fn assert_compressed_with_backing(work: &Path) -> Result<(), String> {
    let out = |args: &[&str]| -> Result<String, String> {
        let o = Command::new("qemu-img")
            .current_dir(work)
            .args(args)
            .output()
            .map_err(|e| format!("qemu-img: {e}"))?;
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(format!(
                "qemu-img {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr)
            ))
        }
    };
    let info = out(&["info", "--output=json", "system.qcow2"])?;
    if !info.contains("\"backing-filename\": \"base.qcow2\"") {
        return Err(format!(
            "system.qcow2 has no backing file base.qcow2:\n{info}"
        ));
    }
    let map = out(&["map", "--output=json", "system.qcow2"])?;
    let own_compressed = map
        .lines()
        .any(|l| l.contains("\"depth\": 0") && l.contains("\"compressed\": true"));
    if !own_compressed {
        return Err(format!(
            "system.qcow2 has no compressed cluster of its own:\n{map}"
        ));
    }
    let from_base = map
        .lines()
        .any(|l| l.contains("\"depth\": 1") && l.contains("\"data\": true"));
    if !from_base {
        return Err(format!(
            "system.qcow2 reads no data from base.qcow2:\n{map}"
        ));
    }
    Ok(())
}

/// Scenario `linux`: qimg-efi boots the kernel (EFI stub) from the image's
/// FAT with an initrd and a command line.
fn linux(ctx: &Ctx, work: &Path) -> Result<Plan, String> {
    let (kernel, initrd) = kernel_and_initrd(ctx, work)?;
    let raw = encrypted_inner(
        ctx,
        work,
        "linux",
        vec![
            ("vmlinuz", Content::File(kernel)),
            ("initrd.img", Content::File(initrd)),
        ],
        &LUKS_QCOW2,
        "system.qcow2",
    )?;
    let checks = checks(&raw, "linux")?;
    let cfg = config(
        "\\images\\system.qcow2",
        true,
        &checks,
        &[
            "boot=\\vmlinuz".into(),
            "options=initrd=\\initrd.img console=ttyS0 panic=-1".into(),
        ],
    );
    let outer = make_outer(ctx, work, &cfg, Some(PASSPHRASE), &["system.qcow2"])?;
    let mut expect = efi_expect(&checks);
    expect.push(Expect::Line("QIMG-LINUX-MARKER".into()));
    expect.push(Expect::NoLine("QIMG-INNER-MARKER".into()));
    Ok(Plan {
        machine: Machine::Ovmf(vec![outer]),
        typed: vec![],
        expect,
    })
}
