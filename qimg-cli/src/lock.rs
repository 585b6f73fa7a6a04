//! Guards for the files a verb touches: the self-overwrite check (a
//! destination that is one of the inputs, by device and inode, so another
//! name, `./x`, a hard link or a symlink are all caught).

use std::os::unix::fs::MetadataExt;

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
    for _ in 0..crate::image::MAX_CHAIN_DEPTH {
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
        let Ok(opening) = crate::qcow2::Opening::open(&cur) else {
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
        cur_fmt = match info.backing_format() {
            Some("qcow2") => Some(Format::Qcow2),
            Some("raw" | "file") => Some(Format::Raw),
            _ => None,
        };
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
        assert!(refuse_self_overwrite(&other.to_string_lossy(), &[a_s.clone()], "x").is_ok());
        let missing = dir.path().join("missing");
        assert!(refuse_self_overwrite(&missing.to_string_lossy(), &[a_s], "x").is_ok());
    }
}
