//! Building test images with the real qemu-img and qemu-io.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{json_of, run_ok, tool};

/// The installed qemu-img and qemu-io.
pub struct Qemu {
    /// Path of qemu-img.
    pub img: PathBuf,
    /// Path of qemu-io.
    pub io: PathBuf,
}

impl Qemu {
    /// Finds both tools; `None` (a failure under CI) when either is missing.
    pub fn find() -> Option<Self> {
        Some(Self {
            img: tool("qemu-img")?,
            io: tool("qemu-io")?,
        })
    }

    /// `qemu-img ARGS`, checked; returns stdout.
    pub fn img(&self, args: &[&str]) -> Vec<u8> {
        run_ok(Command::new(&self.img).args(args))
    }

    /// `qemu-img create -f FMT [-o OPTS] PATH SIZE`.
    pub fn create(&self, path: &Path, fmt: &str, opts: &str, size: &str) {
        let mut cmd = Command::new(&self.img);
        cmd.args(["create", "-q", "-f", fmt]);
        if !opts.is_empty() {
            cmd.args(["-o", opts]);
        }
        run_ok(cmd.arg(path).arg(size));
    }

    /// Runs qemu-io commands (`write -P 0xab 0 64k`, ...) on an image,
    /// with `-f FMT`.
    pub fn io(&self, path: &Path, fmt: &str, cmds: &[&str]) {
        let mut cmd = Command::new(&self.io);
        cmd.args(["-f", fmt]);
        for c in cmds {
            cmd.args(["-c", c]);
        }
        run_ok(cmd.arg(path));
    }

    /// `qemu-img create -q -f qcow2 --object SECRET EXTRA -o OPTS PATH
    /// [SIZE]`: an encrypted qcow2 image (no size: the backing file's,
    /// named in `extra`).
    pub fn create_encrypted(
        &self,
        path: &Path,
        secret: &str,
        opts: &str,
        extra: &[&str],
        size: &str,
    ) {
        let mut cmd = Command::new(&self.img);
        cmd.args(["create", "-q", "-f", "qcow2", "--object", secret])
            .args(extra)
            .args(["-o", opts])
            .arg(path);
        if !size.is_empty() {
            cmd.arg(size);
        }
        run_ok(&mut cmd);
    }

    /// Runs qemu-io commands on an encrypted image (`driver` as in
    /// [`encrypted_image_opts`]) unlocked by `secret`.
    pub fn io_encrypted(&self, secret: &str, driver: &str, img: &Path, cmds: &[&str]) {
        let mut cmd = Command::new(&self.io);
        cmd.args(["--object", secret, "--image-opts"])
            .arg(encrypted_image_opts(driver, img));
        for c in cmds {
            cmd.args(["-c", c]);
        }
        run_ok(&mut cmd);
    }

    /// Writes the file `src` into the image at `offset` with qemu-io.
    pub fn write_file(&self, path: &Path, fmt: &str, offset: u64, src: &Path) {
        let len = std::fs::metadata(src).unwrap().len();
        let c = format!("write -s {} {offset} {len}", src.display());
        self.io(path, fmt, &[&c]);
    }

    /// `qemu-img convert ARGS SRC DST`, checked.
    pub fn convert(&self, args: &[&str], src: &Path, dst: &Path) {
        run_ok(
            Command::new(&self.img)
                .arg("convert")
                .args(args)
                .arg(src)
                .arg(dst),
        );
    }

    /// `qemu-img convert -O raw [extra] SRC DST`.
    pub fn to_raw(&self, src: &Path, dst: &Path, extra: &[&str]) {
        self.convert(&[&["-O", "raw"], extra].concat(), src, dst);
    }

    /// qemu-img's view of an encrypted image's guest content, written raw
    /// to `out`: `driver` is `luks` or `qcow2`, `secret` an `--object`
    /// string defining the secret with id `s0`, and `extra` qemu-img's
    /// `--image-opts` additions (such as `header.filename=...`).
    pub fn decrypt_to_raw(&self, secret: &str, driver: &str, img: &Path, extra: &str, out: &Path) {
        run_ok(&mut self.decrypt_cmd(secret, driver, img, extra, out));
    }

    /// The command [`decrypt_to_raw`](Self::decrypt_to_raw) runs, for a
    /// caller that expects it to fail.
    pub fn decrypt_cmd(
        &self,
        secret: &str,
        driver: &str,
        img: &Path,
        extra: &str,
        out: &Path,
    ) -> Command {
        let mut opts = encrypted_image_opts(driver, img);
        if !extra.is_empty() {
            opts.push(',');
            opts.push_str(extra);
        }
        let mut c = self.encrypted(&["convert", "-O", "raw"], secret, &opts);
        c.arg(out);
        c
    }

    /// `qemu-img ARGS --object SECRET --image-opts OPTS`, to be completed
    /// and run by the caller; `opts` as from [`encrypted_image_opts`].
    pub fn encrypted(&self, args: &[&str], secret: &str, opts: &str) -> Command {
        let mut c = Command::new(&self.img);
        c.args(args)
            .args(["--object", secret, "--image-opts"])
            .arg(opts);
        c
    }

    /// `qemu-img check --output=json EXTRA TARGET` finds nothing: exit 0,
    /// and no corruptions, leaks or check errors. `extra` may open the
    /// target with `--object ... --image-opts`.
    pub fn assert_check_clean(&self, extra: &[&str], target: impl AsRef<OsStr>, what: &str) {
        let target = target.as_ref();
        let out = Command::new(&self.img)
            .args(["check", "--output=json"])
            .args(extra)
            .arg(target)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let code = out.status.code().unwrap_or(-1);
        let what = format!(
            "{what} ({}; {})",
            target.to_string_lossy(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        assert_eq!(code, 0, "{what}: qemu-img check exit {code}: {v}");
        // qemu-img leaves zero counts out of its JSON.
        for key in ["corruptions", "leaks", "check-errors"] {
            assert_eq!(
                v.get(key).map_or(0, |n| n.as_u64().unwrap()),
                0,
                "{what}: {key}: {v}"
            );
        }
    }

    /// [`assert_check_clean`](Self::assert_check_clean) of the image at
    /// `path`.
    pub fn assert_clean(&self, path: &Path, what: &str) {
        self.assert_check_clean(&[], path, what);
    }

    /// [`assert_check_clean`](Self::assert_check_clean) of an encrypted
    /// image (`driver` as in [`encrypted_image_opts`]) unlocked by `secret`.
    pub fn assert_encrypted_clean(&self, secret: &str, driver: &str, img: &Path) {
        self.assert_check_clean(
            &["--object", secret, "--image-opts"],
            encrypted_image_opts(driver, img),
            "encrypted image",
        );
    }

    /// qemu-img's raw conversion of the image at `path` (written into
    /// `dir`) is exactly `model`.
    pub fn assert_content(&self, path: &Path, dir: &Path, model: &[u8], what: &str) {
        let raw = dir.join("out.raw");
        self.to_raw(path, &raw, &[]);
        let got = std::fs::read(&raw).unwrap();
        assert_eq!(got.len(), model.len(), "{what}: size");
        if let Some(i) = got.iter().zip(model).position(|(a, b)| a != b) {
            panic!("{what}: content differs first at byte {i}");
        }
    }

    /// `qemu-img info --output=json`.
    pub fn info(&self, path: &Path) -> serde_json::Value {
        json_of(
            Command::new(&self.img)
                .args(["info", "--output=json"])
                .arg(path),
        )
    }

    /// The guest content of the image at `img`, as `qemu-img convert -O
    /// raw` writes it (beside the image, with the extension `content`).
    pub fn read_raw(&self, img: &Path) -> Vec<u8> {
        let out = img.with_extension("content");
        let _ = std::fs::remove_file(&out);
        self.to_raw(img, &out, &[]);
        std::fs::read(&out).unwrap()
    }

    /// `qemu-img map --output=json`.
    pub fn map(&self, path: &Path) -> serde_json::Value {
        json_of(
            Command::new(&self.img)
                .args(["map", "--output=json"])
                .arg(path),
        )
    }

    /// `qemu-img check --output=json`, with its exit code.
    pub fn check(&self, path: &Path) -> (i32, serde_json::Value) {
        let out = Command::new(&self.img)
            .args(["check", "--output=json"])
            .arg(path)
            .output()
            .unwrap();
        let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (out.status.code().unwrap_or(-1), v)
    }
}

/// qemu-img's `--image-opts` for an encrypted image (`driver` is `luks` or
/// `qcow2`) unlocked by the secret with id `s0`.
pub fn encrypted_image_opts(driver: &str, img: &Path) -> String {
    let key = if driver == "luks" {
        "key-secret"
    } else {
        "encrypt.key-secret"
    };
    format!("driver={driver},{key}=s0,file.filename={}", img.display())
}

/// Deterministic bytes (xorshift64*) where every `zero_every`-th 4 KiB
/// block is zero (0 = none), so images get both data and zero runs.
pub fn pattern(len: usize, seed: u64, zero_every: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    if zero_every > 0 {
        for (i, block) in out.chunks_mut(4096).enumerate() {
            if i % zero_every == 0 {
                block.fill(0);
            }
        }
    }
    out
}

/// Writes `data` to a new file and returns its path.
pub fn write_tmp(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}
