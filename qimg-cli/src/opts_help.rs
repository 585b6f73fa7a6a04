//! `-o help` (and `-o ?`): the option list qemu-img prints for a format,
//! in its layout, limited to the options qimg implements. The differences
//! from qemu-img 10.0.2's lists are in `docs/qemu-img-dropin.md`.

use crate::format::Format;
use crate::CliError;

/// One documented option: name, value type, description (qemu-img's text).
type Opt = (&'static str, &'static str, &'static str);

const SIZE: Opt = ("size", "size", "Virtual disk size");
const ITER_TIME: &str = "Time to spend in PBKDF in milliseconds";

/// qcow2 creation options, in qemu-img's (alphabetical) order. Left out:
/// `encryption` (legacy AES, never created by qimg).
const QCOW2_CREATE: &[Opt] = &[
    ("backing_file", "str", "File name of a base image"),
    ("backing_fmt", "str", "Image format of the base image"),
    ("cluster_size", "size", "qcow2 cluster size"),
    (
        "compat",
        "str",
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    (
        "compression_type",
        "str",
        "Compression method used for image cluster compression",
    ),
    ("data_file", "str", "File name of an external data file"),
    (
        "data_file_raw",
        "bool (on/off)",
        "The external data file must stay valid as a raw image",
    ),
    (
        "encrypt.cipher-alg",
        "str",
        "Name of encryption cipher algorithm",
    ),
    (
        "encrypt.cipher-mode",
        "str",
        "Name of encryption cipher mode",
    ),
    (
        "encrypt.format",
        "str",
        "Encrypt the image, format choices: 'luks'",
    ),
    (
        "encrypt.hash-alg",
        "str",
        "Name of encryption hash algorithm",
    ),
    ("encrypt.iter-time", "num", ITER_TIME),
    ("encrypt.ivgen-alg", "str", "Name of IV generator algorithm"),
    (
        "encrypt.ivgen-hash-alg",
        "str",
        "Name of IV generator hash algorithm",
    ),
    (
        "encrypt.key-secret",
        "str",
        "ID of secret providing qcow AES key or LUKS passphrase",
    ),
    ("extended_l2", "bool (on/off)", "Extended L2 tables"),
    (
        "lazy_refcounts",
        "bool (on/off)",
        "Postpone refcount updates",
    ),
    (
        "preallocation",
        "str",
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    (
        "refcount_bits",
        "num",
        "Width of a reference count entry in bits",
    ),
    SIZE,
];

/// Raw creation options.
const RAW_CREATE: &[Opt] = &[SIZE];

/// LUKS creation options (qimg's own extras, `luks-version`, `pbkdf`, ...,
/// are in `qimg create --help`, not here).
const LUKS_CREATE: &[Opt] = &[
    ("cipher-alg", "str", "Name of encryption cipher algorithm"),
    ("cipher-mode", "str", "Name of encryption cipher mode"),
    (
        "detached-header",
        "bool (on/off)",
        "Create a detached LUKS header",
    ),
    ("hash-alg", "str", "Name of encryption hash algorithm"),
    ("iter-time", "num", ITER_TIME),
    ("ivgen-alg", "str", "Name of IV generator algorithm"),
    (
        "ivgen-hash-alg",
        "str",
        "Name of IV generator hash algorithm",
    ),
    (
        "key-secret",
        "str",
        "ID of the secret that provides the keyslot passphrase",
    ),
    SIZE,
];

/// Key slot options `amend` takes, without the qcow2 `encrypt.` prefix.
const LUKS_AMEND: &[Opt] = &[
    ("iter-time", "num", ITER_TIME),
    (
        "keyslot",
        "num",
        "Select a single keyslot to modify explicitly",
    ),
    (
        "new-secret",
        "str",
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    (
        "old-secret",
        "str",
        "Select all keyslots that match this password",
    ),
    (
        "state",
        "str",
        "Select new state of affected keyslots (active/inactive)",
    ),
];

/// Whether any `-o` list holds `help` or `?` (`-o cluster_size=4k,help`
/// counts, as in qemu-img).
pub(crate) fn asked<S: AsRef<str>>(options: &[S]) -> bool {
    options.iter().any(|o| {
        crate::opts::split_list(o.as_ref())
            .map(|l| l.iter().any(|(k, _)| k == "help" || k == "?"))
            .unwrap_or(false)
    })
}

fn line(out: &mut String, prefix: &str, (name, ty, desc): Opt) {
    let key = format!("{prefix}{name}=<{ty}>");
    out.push_str(&format!("  {key:<22} - {desc}\n"));
}

fn name(f: Format) -> &'static str {
    match f {
        Format::Qcow2 => "qcow2",
        Format::Raw => "raw",
        Format::Luks => "luks",
    }
}

/// What `create -o help` and `convert -o help` print for `format`. With a
/// target file named, qemu-img says "Supported options:" and leaves off the
/// note about protocol options, as here.
pub(crate) fn create_help(format: Format, with_target: bool) -> String {
    let list = match format {
        Format::Qcow2 => QCOW2_CREATE,
        Format::Raw => RAW_CREATE,
        Format::Luks => LUKS_CREATE,
    };
    let mut out = if with_target {
        "Supported options:\n".to_string()
    } else {
        format!("Supported {} options:\n", name(format))
    };
    for o in list {
        line(&mut out, "", *o);
    }
    if !with_target {
        out.push_str(
            "\nThe protocol level may support further options.\n\
             Specify the target filename to include those options.\n",
        );
    }
    out
}

/// What `amend -o help` prints for `format`; raw has no amendable options,
/// which is qemu-img's error.
pub(crate) fn amend_help(format: Format) -> Result<String, CliError> {
    let prefix = match format {
        Format::Qcow2 => "encrypt.",
        Format::Luks => "",
        Format::Raw => {
            return Err(CliError::usage(
                "Format driver 'raw' does not support option amendment".into(),
            ))
        }
    };
    let mut out = format!("Amend options for '{}':\n", name(format));
    for o in LUKS_AMEND {
        line(&mut out, prefix, *o);
    }
    Ok(out)
}

/// Prints `text` on standard output; `-o help` then exits 0.
pub(crate) fn print(text: &str) -> Result<u8, CliError> {
    use std::io::Write;
    std::io::stdout()
        .write_all(text.as_bytes())
        .map_err(|e| CliError::usage(format!("cannot write the option list: {e}")))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_laid_out_as_qemu_img_lays_them_out() {
        let h = create_help(Format::Raw, false);
        assert_eq!(
            h,
            "Supported raw options:\n  size=<size>            - Virtual disk size\n\n\
             The protocol level may support further options.\n\
             Specify the target filename to include those options.\n"
        );
        let h = create_help(Format::Qcow2, true);
        assert!(h.starts_with("Supported options:\n  backing_file=<str>     - File"));
        assert!(
            h.contains("  data_file_raw=<bool (on/off)> - The external data file must stay valid")
        );
        assert!(!h.contains("protocol level"));
        let a = amend_help(Format::Qcow2).unwrap();
        assert!(a.contains("  encrypt.keyslot=<num>  - Select a single keyslot"));
        assert!(amend_help(Format::Raw).is_err());
        assert!(asked(&["cluster_size=4k,help"]));
        assert!(asked(&["a=1", "?"]));
        assert!(!asked(&["cluster_size=4k", "encrypt.key-secret=help"]));
    }
}
