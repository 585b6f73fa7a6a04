//! Where passphrases come from: `--object secret,...` (qemu-img),
//! `--key-file PATH|-` (cryptsetup: the exact bytes), or a no-echo prompt on
//! a terminal. Secrets live in zeroizing buffers and never reach output.

use std::io::{IsTerminal, Read};

use zeroize::Zeroizing;

use crate::opts::{parse_object, SecretObject, SecretSource};
use crate::CliError;

/// A passphrase or key file's bytes, wiped on drop.
pub(crate) type Secret = Zeroizing<Vec<u8>>;

/// The secrets defined with `--object`, by id.
#[derive(Default)]
pub(crate) struct Secrets {
    objects: Vec<SecretObject>,
}

impl Secrets {
    /// Parses every `--object` argument, warning once about `data=` on the
    /// command line.
    pub(crate) fn parse(objects: &[String]) -> Result<Self, CliError> {
        let mut parsed = Vec::new();
        for o in objects {
            let obj = parse_object(o).map_err(|e| CliError::usage(format!("--object: {e}")))?;
            if matches!(obj.source, SecretSource::Data(_)) {
                eprintln!(
                    "qimg: warning: secret '{}' is given with data= on the command line, where \
                     other users can read it; prefer file= or --key-file",
                    obj.id
                );
            }
            parsed.push(obj);
        }
        Ok(Self { objects: parsed })
    }

    /// The id of the only secret given, if exactly one was.
    pub(crate) fn only_id(&self) -> Option<String> {
        match self.objects.as_slice() {
            [one] => Some(one.id.clone()),
            _ => None,
        }
    }

    /// The bytes of the secret with `id`.
    pub(crate) fn get(&self, id: &str) -> Result<Secret, CliError> {
        let obj = self
            .objects
            .iter()
            .rev()
            .find(|o| o.id == id)
            .ok_or_else(|| {
                CliError::usage(format!(
                    "no secret with id '{id}': add --object secret,id={id},file=PATH"
                ))
            })?;
        let raw: Secret = match &obj.source {
            SecretSource::Data(d) => Zeroizing::new(d.as_bytes().to_vec()),
            SecretSource::File(f) => Zeroizing::new(
                std::fs::read(f)
                    .map_err(|e| CliError::io(f, format!("cannot read secret '{id}': {e}")))?,
            ),
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
    let clean: Zeroizing<Vec<u8>> = Zeroizing::new(
        text.iter()
            .copied()
            .filter(|c| !c.is_ascii_whitespace())
            .collect(),
    );
    let s = std::str::from_utf8(&clean).ok()?;
    let out = Base64::decode_vec(s)
        .or_else(|_| Base64Unpadded::decode_vec(s))
        .ok()?;
    Some(Zeroizing::new(out))
}

/// Reads a cryptsetup-style key file: the whole file, byte for byte, or all
/// of standard input for `-`.
pub(crate) fn read_key_file(path: &str) -> Result<Secret, CliError> {
    let mut buf = Zeroizing::new(Vec::new());
    if path == "-" {
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| CliError::io("<stdin>", format!("cannot read the key: {e}")))?;
    } else {
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut buf))
            .map_err(|e| CliError::io(path, format!("cannot read the key file: {e}")))?;
    }
    Ok(buf)
}

/// Asks for a passphrase on the terminal without echo; `confirm` asks twice
/// and insists the two agree. Fails when standard input is not a terminal.
pub(crate) fn prompt(what: &str, confirm: bool) -> Result<Secret, CliError> {
    if !std::io::stdin().is_terminal() {
        return Err(CliError::usage(format!(
            "{what} needs a passphrase: give --key-file PATH, or --object secret,id=ID,file=PATH \
             with key-secret=ID (standard input is not a terminal, so qimg cannot ask)"
        )));
    }
    let first = Zeroizing::new(
        rpassword::prompt_password(format!("Enter passphrase for {what}: "))
            .map_err(|e| CliError::usage(format!("{what}: cannot read the passphrase: {e}")))?,
    );
    if confirm {
        let again = Zeroizing::new(
            rpassword::prompt_password("Verify passphrase: ")
                .map_err(|e| CliError::usage(format!("{what}: cannot read the passphrase: {e}")))?,
        );
        if *first != *again {
            return Err(CliError::usage(format!(
                "{what}: the passphrases do not match; nothing was changed, run the command again"
            )));
        }
    }
    Ok(Zeroizing::new(first.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_by_id_from_data_file_and_base64() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::write(&f, b"from-file").unwrap();
        let s = Secrets::parse(&[
            "secret,id=a,data=plain".into(),
            format!("secret,id=b,file={}", f.display()),
            "secret,id=c,data=aGVsbG8=,format=base64".into(),
        ])
        .unwrap();
        assert_eq!(&s.get("a").unwrap()[..], b"plain");
        assert_eq!(&s.get("b").unwrap()[..], b"from-file");
        assert_eq!(&s.get("c").unwrap()[..], b"hello");
        assert!(s.get("zz").is_err());
        let bad = Secrets::parse(&["secret,id=d,data=!!!,format=base64".into()]).unwrap();
        assert!(bad.get("d").is_err());
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
}
