//! Where passphrases come from: `--object secret,...` (qemu-img),
//! `--key-file PATH|-` (cryptsetup: the exact bytes), or a no-echo prompt on
//! a terminal. Secrets live in zeroizing buffers and never reach output.
//!
//! Every passphrase or key qimg holds is a [`Secret`]: no `Clone`, a `Debug`
//! that prints `[redacted]`, and its whole allocation wiped on drop. Buffers
//! are sized before they are filled (or grown by copying into a fresh
//! zeroizing buffer), so no reallocation leaves an unwiped copy behind.
//!
//! What qimg cannot wipe: `data=` given on the command line is in the
//! process's argv memory (readable in `/proc/PID/cmdline` by other users for
//! the process's lifetime) and in the short-lived copies the standard
//! library (`std::env::args_os`) and clap make while parsing, which are freed
//! but not wiped. qemu-img has the same property; `file=`, `--key-file` and
//! the interactive prompt exist for this reason.

use std::fmt;
use std::io::{IsTerminal, Read};
use std::sync::Arc;

use zeroize::Zeroizing;

pub(crate) use crate::opts::Secret;
use crate::opts::{parse_object, OptError, SecretObject, SecretSource};
use crate::CliError;

/// The largest key file or secret file qimg reads: cryptsetup's default
/// `--keyfile-size` limit (8 MiB).
pub(crate) const MAX_SECRET_FILE: usize = 8 << 20;

/// One `--object` argument, parsed while clap parses the command line (see
/// [`ObjectArg::parse`]), so no `String` copy of it is kept by qimg.
///
/// clap requires `Clone` for argument values: cloning shares the one parsed
/// object (and its one [`Secret`]) through an [`Arc`]; it copies no secret
/// bytes. A malformed argument is kept as its (redacted) error and reported
/// by [`Secrets::parse`], with qimg's exit code rather than clap's.
#[derive(Clone)]
pub(crate) struct ObjectArg(Arc<Result<SecretObject, OptError>>);

impl ObjectArg {
    /// The clap value parser for `--object`. It never fails, so clap never
    /// echoes the argument (and a `data=` value) in an error of its own.
    ///
    /// clap hands its parsers a borrowed `&str` and keeps its raw copy of
    /// argv until parsing is over; see the module docs for what cannot be
    /// wiped.
    pub(crate) fn parse(s: &str) -> Result<Self, std::convert::Infallible> {
        Ok(Self(Arc::new(parse_object(s))))
    }
}

impl fmt::Debug for ObjectArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.0 {
            Ok(o) => o.fmt(f),
            Err(e) => write!(f, "ObjectArg(Err({e}))"),
        }
    }
}

/// The secrets defined with `--object`, by id.
#[derive(Default)]
pub(crate) struct Secrets {
    objects: Vec<ObjectArg>,
}

impl Secrets {
    /// Collects every `--object` argument, failing on the first malformed
    /// one and warning once per `data=` secret on the command line (when
    /// standard error is a terminal).
    pub(crate) fn parse(objects: &[ObjectArg]) -> Result<Self, CliError> {
        for o in objects {
            match &*o.0 {
                Ok(obj) => {
                    // Only to a person at a terminal: callers that run
                    // qimg as qemu-img (Glance) take any stderr on success
                    // for a failure, and qemu-img prints nothing here.
                    if matches!(obj.source, SecretSource::Data(_))
                        && std::io::stderr().is_terminal()
                    {
                        eprintln!(
                            "qimg: warning: secret '{}' is given with data= on the command line, \
                             where other users can read it; prefer file= or --key-file",
                            obj.id
                        );
                    }
                }
                Err(e) => return Err(CliError::usage(format!("--object: {e}"))),
            }
        }
        Ok(Self {
            objects: objects.to_vec(),
        })
    }

    /// The parsed objects, in command-line order.
    fn iter(&self) -> impl DoubleEndedIterator<Item = &SecretObject> {
        self.objects
            .iter()
            .filter_map(|o| o.0.as_ref().as_ref().ok())
    }

    /// The id of the only secret given, if exactly one was.
    pub(crate) fn only_id(&self) -> Option<String> {
        let mut it = self.iter();
        match (it.next(), it.next()) {
            (Some(one), None) => Some(one.id.clone()),
            _ => None,
        }
    }

    /// The bytes of the secret with `id`.
    pub(crate) fn get(&self, id: &str) -> Result<Secret, CliError> {
        let obj = self.iter().rev().find(|o| o.id == id).ok_or_else(|| {
            CliError::usage(format!(
                "no secret with id '{id}': add --object secret,id={id},file=PATH"
            ))
        })?;
        let raw: Secret = match &obj.source {
            SecretSource::Data(d) => Secret::copy_from(d),
            SecretSource::File(f) => read_file(f)
                .map_err(|e| CliError::io(f, format!("cannot read secret '{id}': {e}")))?,
        };
        if obj.base64 {
            decode_base64(&raw).ok_or_else(|| {
                CliError::usage(format!("secret '{id}' is not valid base64 (format=base64)"))
            })
        } else {
            Ok(raw)
        }
    }
}

/// Decodes standard base64 (padding optional, whitespace ignored) into a
/// zeroizing buffer.
fn decode_base64(text: &[u8]) -> Option<Secret> {
    use base64ct::{Base64, Base64Unpadded, Encoding};
    let mut clean = Zeroizing::new(Vec::with_capacity(text.len()));
    clean.extend(text.iter().copied().filter(|c| !c.is_ascii_whitespace()));
    let s = std::str::from_utf8(&clean).ok()?;
    let mut out = Zeroizing::new(vec![0u8; s.len() / 4 * 3 + 3]);
    let n = match Base64::decode(s, &mut out) {
        Ok(d) => d.len(),
        Err(_) => Base64Unpadded::decode(s, &mut out).ok()?.len(),
    };
    Some(Secret::copy_from(&out[..n]))
}

/// Reads all of `r` into a [`Secret`], at most [`MAX_SECRET_FILE`] bytes,
/// starting with `hint` bytes of room. The buffer grows by copying into a
/// fresh zeroizing buffer, so the old one is wiped, never left behind by a
/// reallocation.
fn read_secret(mut r: impl Read, hint: u64) -> std::io::Result<Secret> {
    let room = usize::try_from(hint)
        .unwrap_or(MAX_SECRET_FILE)
        .min(MAX_SECRET_FILE)
        + 1;
    let mut buf = Zeroizing::new(vec![0u8; room.max(64)]);
    let mut len = 0;
    loop {
        if len == buf.len() {
            if len > MAX_SECRET_FILE {
                return Err(std::io::Error::other(format!(
                    "more than {MAX_SECRET_FILE} bytes (cryptsetup's key file limit)"
                )));
            }
            let mut bigger = Zeroizing::new(vec![0u8; (len * 2).min(MAX_SECRET_FILE + 1)]);
            bigger[..len].copy_from_slice(&buf[..len]);
            buf = bigger;
        }
        match r.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if len > MAX_SECRET_FILE {
        return Err(std::io::Error::other(format!(
            "more than {MAX_SECRET_FILE} bytes (cryptsetup's key file limit)"
        )));
    }
    Ok(Secret::copy_from(&buf[..len]))
}

/// Reads the file at `path` into a [`Secret`].
fn read_file(path: &str) -> std::io::Result<Secret> {
    let f = std::fs::File::open(path)?;
    let hint = f.metadata().map(|m| m.len()).unwrap_or(0);
    read_secret(f, hint)
}

/// Reads a cryptsetup-style key file: the whole file, byte for byte, or all
/// of standard input for `-`; at most [`MAX_SECRET_FILE`] bytes.
pub(crate) fn read_key_file(path: &str) -> Result<Secret, CliError> {
    if path == "-" {
        read_secret(std::io::stdin().lock(), 0)
            .map_err(|e| CliError::io("<stdin>", format!("cannot read the key: {e}")))
    } else {
        read_file(path).map_err(|e| CliError::io(path, format!("cannot read the key file: {e}")))
    }
}

/// Asks for a passphrase on the terminal without echo; `confirm` asks twice
/// and insists the two agree. Fails when standard input is not a terminal.
/// rpassword's `String` is moved into a [`Secret`] at once.
pub(crate) fn prompt(what: &str, confirm: bool) -> Result<Secret, CliError> {
    if !std::io::stdin().is_terminal() {
        return Err(CliError::usage(format!(
            "{what} needs a passphrase: give --key-file PATH, or --object secret,id=ID,file=PATH \
             with key-secret=ID (standard input is not a terminal, so qimg cannot ask)"
        )));
    }
    let ask = |text: String| {
        rpassword::prompt_password(text)
            .map(Secret::from_string)
            .map_err(|e| CliError::usage(format!("{what}: cannot read the passphrase: {e}")))
    };
    let first = ask(format!("Enter passphrase for {what}: "))?;
    if confirm {
        let again = ask("Verify passphrase: ".to_string())?;
        if *first != *again {
            return Err(CliError::usage(format!(
                "{what}: the passphrases do not match; nothing was changed, run the command again"
            )));
        }
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(args: &[&str]) -> Vec<ObjectArg> {
        args.iter().map(|a| ObjectArg::parse(a).unwrap()).collect()
    }

    #[test]
    fn secrets_by_id_from_data_file_and_base64() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::write(&f, b"from-file").unwrap();
        let file_arg = format!("secret,id=b,file={}", f.display());
        let s = Secrets::parse(&objects(&[
            "secret,id=a,data=plain",
            &file_arg,
            "secret,id=c,data=aGVsbG8=,format=base64",
            "secret,id=e,data=aGVsbG8,format=base64",
        ]))
        .unwrap();
        assert_eq!(&s.get("a").unwrap()[..], b"plain");
        assert_eq!(&s.get("b").unwrap()[..], b"from-file");
        assert_eq!(&s.get("c").unwrap()[..], b"hello");
        assert_eq!(&s.get("e").unwrap()[..], b"hello");
        assert!(s.get("zz").is_err());
        assert_eq!(s.only_id(), None);
        let bad = Secrets::parse(&objects(&["secret,id=d,data=!!!,format=base64"])).unwrap();
        assert!(bad.get("d").is_err());
        assert_eq!(bad.only_id().as_deref(), Some("d"));
    }

    #[test]
    fn malformed_objects_fail_in_secrets_parse_without_the_data() {
        let args = objects(&["secret,id=a,data=x", "secret,data=hunter2,,x"]);
        let e = Secrets::parse(&args).err().expect("no id= must fail");
        assert!(e.msg.contains("needs id="), "{}", e.msg);
        assert!(!e.msg.contains("hunter2"), "{}", e.msg);
    }

    #[test]
    fn debug_never_shows_secret_bytes() {
        let s = Secret::copy_from(b"hunter2");
        assert_eq!(format!("{s:?}"), "Secret([redacted])");
        assert_eq!(&s[..], b"hunter2");
        for arg in [
            "secret,id=a,data=hunter2",
            "secret,id=a,data=aHVudGVyMg==,format=base64",
            "secret,id=a,data=hunter2,bogus=1",
            "secret,id=a,data=hunter2,file=x",
            "bogus,data=hunter2",
            "secret,data=hun,,ter2",
        ] {
            let o = ObjectArg::parse(arg).unwrap();
            let d = format!("{o:?} {:?}", o.clone());
            assert!(
                !d.contains("hunter2") && !d.contains("aHVudGVyMg"),
                "{arg}: {d}"
            );
            assert!(!d.contains("ter2"), "{arg}: {d}");
        }
        let ok = format!(
            "{:?}",
            ObjectArg::parse("secret,id=a,data=hunter2").unwrap()
        );
        assert!(
            ok.contains("id: \"a\"") && ok.contains("[redacted]"),
            "{ok}"
        );
    }

    #[test]
    fn clones_share_one_secret_buffer() {
        let a = ObjectArg::parse("secret,id=a,data=pw").unwrap();
        let b = a.clone();
        assert!(Arc::ptr_eq(&a.0, &b.0));
    }

    #[test]
    fn key_files_are_exact_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::write(&f, b"\x00\xffline\n").unwrap();
        assert_eq!(
            &read_key_file(f.to_str().unwrap()).unwrap()[..],
            b"\x00\xffline\n"
        );
        assert!(read_key_file("/nonexistent/key").is_err());
    }

    #[test]
    fn reading_grows_without_a_size_hint_and_stops_at_the_limit() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let s = read_secret(&data[..], 0).unwrap();
        assert_eq!(&s[..], &data[..]);
        let s = read_secret(&data[..], 5).unwrap();
        assert_eq!(&s[..], &data[..]);
        assert_eq!(read_secret(&[][..], 0).unwrap().len(), 0);
        let exact = vec![7u8; MAX_SECRET_FILE];
        assert_eq!(read_secret(&exact[..], 0).unwrap().len(), MAX_SECRET_FILE);
        let over = vec![7u8; MAX_SECRET_FILE + 1];
        let e = read_secret(&over[..], 0).expect_err("over the limit");
        assert!(e.to_string().contains("key file limit"), "{e}");
        let e = read_secret(&over[..], over.len() as u64).expect_err("over, hinted");
        assert!(e.to_string().contains("key file limit"), "{e}");
    }
}
