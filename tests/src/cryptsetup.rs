//! Running the real cryptsetup beside qimg: formatting volumes, testing
//! passphrases, adding keys, dumps and header backups, each with the
//! volume's detached header where there is one.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{qimg, qimg_header_backup, run_ok, tool};

/// `luksFormat` arguments for a LUKS1 volume with a fast PBKDF2.
pub const LUKS1_FAST: &[&str] = &["--type", "luks1", "--pbkdf-force-iterations", "1000"];

/// Arguments for a fast PBKDF2 key slot.
pub const PBKDF2_FAST: &[&str] = &["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];

/// The installed cryptsetup.
pub struct Cryptsetup {
    /// Path of cryptsetup.
    pub bin: PathBuf,
}

impl Cryptsetup {
    /// Finds cryptsetup; `None` (a failure under CI) when it is missing.
    pub fn find() -> Option<Self> {
        Some(Self {
            bin: tool("cryptsetup")?,
        })
    }

    /// `cryptsetup ARGS`, to be completed and run by the caller.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args);
        c
    }

    /// `cryptsetup luksFormat -q ARGS [--header HEADER] VOL --key-file KEY`,
    /// checked. `args` name the type, PBKDF and cipher.
    pub fn format(&self, vol: &Path, header: Option<&Path>, key: &Path, args: &[&str]) {
        let mut c = self.command(&["luksFormat", "-q"]);
        c.args(args);
        if let Some(h) = header {
            c.arg("--header").arg(h);
        }
        run_ok(c.arg(vol).arg("--key-file").arg(key));
    }

    /// `cryptsetup open --test-passphrase --key-file KEY [--key-slot SLOT]
    /// [--header HEADER] VOL`, to be run by the caller.
    pub fn test_passphrase(
        &self,
        vol: &Path,
        header: Option<&Path>,
        key: &Path,
        slot: Option<u8>,
    ) -> Command {
        let mut c = self.command(&["open", "--test-passphrase", "--key-file"]);
        c.arg(key);
        if let Some(s) = slot {
            c.arg("--key-slot").arg(s.to_string());
        }
        if let Some(h) = header {
            c.arg("--header").arg(h);
        }
        c.arg(vol);
        c
    }

    /// Whether cryptsetup opens `vol` with `key` (in `slot` only, if given).
    pub fn opens(&self, vol: &Path, header: Option<&Path>, key: &Path, slot: Option<u8>) -> bool {
        self.test_passphrase(vol, header, key, slot)
            .output()
            .unwrap()
            .status
            .success()
    }

    /// Panics with cryptsetup's output unless it opens `vol` with `key`.
    pub fn assert_opens(&self, vol: &Path, header: Option<&Path>, key: &Path) {
        run_ok(&mut self.test_passphrase(vol, header, key, None));
    }

    /// `cryptsetup luksAddKey -q ARGS --key-file KEY [--header HEADER] VOL
    /// NEW_KEY`, checked.
    pub fn add_key(
        &self,
        vol: &Path,
        header: Option<&Path>,
        key: &Path,
        new_key: &Path,
        args: &[&str],
    ) {
        let mut c = self.command(&["luksAddKey", "-q"]);
        c.args(args).arg("--key-file").arg(key);
        if let Some(h) = header {
            c.arg("--header").arg(h);
        }
        run_ok(c.arg(vol).arg(new_key));
    }

    /// `cryptsetup luksDump VOL`.
    pub fn dump(&self, vol: &Path) -> String {
        String::from_utf8(run_ok(self.command(&["luksDump"]).arg(vol))).unwrap()
    }

    /// `cryptsetup luksDump --dump-json-metadata VOL` (LUKS2).
    pub fn dump_json(&self, vol: &Path) -> serde_json::Value {
        let out = run_ok(self.command(&["luksDump", "--dump-json-metadata"]).arg(vol));
        serde_json::from_slice(&out).unwrap()
    }

    /// The key slot numbers of a LUKS2 volume's JSON metadata, sorted.
    pub fn keyslots(&self, vol: &Path) -> Vec<u8> {
        let j = self.dump_json(vol);
        let mut v: Vec<u8> = j["keyslots"]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.parse().unwrap())
            .collect();
        v.sort_unstable();
        v
    }

    /// `cryptsetup luksHeaderBackup --header-backup-file TO VOL`, checked.
    pub fn header_backup(&self, vol: &Path, to: &Path) {
        run_ok(
            self.command(&["luksHeaderBackup", "--header-backup-file"])
                .arg(to)
                .arg(vol),
        );
    }

    /// `cryptsetup luksHeaderRestore -q --header-backup-file FROM VOL`, to
    /// be run by the caller.
    pub fn header_restore(&self, vol: &Path, from: &Path) -> Command {
        let mut c = self.command(&["luksHeaderRestore", "-q", "--header-backup-file"]);
        c.arg(from).arg(vol);
        c
    }

    /// Backs up `vol`'s header with qimg to `ours` and with cryptsetup to
    /// `theirs`, asserts that the two are byte-identical, and returns them.
    pub fn assert_same_backup(&self, vol: &Path, ours: &Path, theirs: &Path) -> Vec<u8> {
        run_ok(&mut qimg_header_backup(vol, ours));
        self.header_backup(vol, theirs);
        let (a, b) = (std::fs::read(ours).unwrap(), std::fs::read(theirs).unwrap());
        assert!(
            a == b,
            "{}: qimg's and cryptsetup's header backups differ",
            vol.display()
        );
        a
    }

    /// Asserts that `qimg luks dump` prints what `cryptsetup luksDump`
    /// prints for `vol`, and returns that text.
    pub fn assert_same_dump(&self, vol: &Path) -> String {
        let theirs = self.dump(vol);
        let ours = String::from_utf8(run_ok(qimg().args(["luks", "dump"]).arg(vol))).unwrap();
        assert_eq!(ours, theirs, "{}: luks dump", vol.display());
        ours
    }

    /// The volume key (lower-case hex) that `cryptsetup luksDump
    /// --dump-volume-key` reads from `vol` (header `header`) with `key`.
    pub fn volume_key(&self, vol: &Path, header: Option<&Path>, key: &Path) -> String {
        let mut cmd = self.command(&["luksDump", "-q", "--dump-volume-key", "--key-file"]);
        cmd.arg(key).arg(header.unwrap_or(vol));
        let out = String::from_utf8(run_ok(&mut cmd)).unwrap();
        // "MK dump:" / "Volume key:" followed by hex bytes over several lines.
        let mut hexs = String::new();
        let mut on = false;
        for line in out.lines() {
            if line.contains("MK dump:") || line.contains("key:") && line.starts_with("Volume") {
                on = true;
                hexs.push_str(line.split(':').nth(1).unwrap_or(""));
                continue;
            }
            if on {
                if line.starts_with(char::is_whitespace) && !line.trim().is_empty() {
                    hexs.push_str(line);
                } else {
                    break;
                }
            }
        }
        hexs.split_whitespace().collect()
    }
}
