//! Locks and loop guards over a qcow2 image's backing chain: the chain is
//! walked through qcow2 headers only (no keys needed), with the format
//! layer ([`crate::format`], [`crate::image`], [`crate::qcow2`]); the
//! locking itself is [`crate::lock`]'s.

use std::fs::File;

use crate::lock::{aka, lock, same_file, Access, FileId};
use crate::CliError;

/// Refuses to make `backing` (a file in `fmt`) the backing file of
/// `image` when that backing chain contains `image` itself (`rebase -b`,
/// `create -b`); the chain as [`chain_files`] walks it.
pub(crate) fn refuse_backing_loop(
    image: &str,
    backing: &str,
    fmt: crate::format::Format,
) -> Result<(), CliError> {
    let files = chain_files(backing, Some(fmt));
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

/// Takes read locks on the backing chain of the qcow2 image `image` (its
/// backing files and their data files), as qemu-img does for the verbs
/// that open an image with its backing chain although they only write the
/// top (`snapshot`, `amend`, `resize`). A file that cannot be opened is
/// left to the verb (which does not read it).
pub(crate) fn lock_backing_chain(image: &str) -> Result<(), CliError> {
    let Ok(opening) = crate::qcow2::Opening::open(image) else {
        return Ok(());
    };
    let info = opening.img.info();
    let Some(next) = info.backing_file() else {
        return Ok(());
    };
    let fmt = info.backing_format().and_then(crate::image::backing_format);
    let backing = crate::image::resolve_backing(image, next)
        .to_string_lossy()
        .into_owned();
    for f in chain_files(&backing, fmt) {
        if let Ok(file) = File::open(&f) {
            lock(&file, &f, Access::Read)?;
        }
    }
    Ok(())
}

/// `backing` (a file in `fmt`, probed when `None`) and the files of its
/// chain: backing files and data files, followed through qcow2 headers
/// only (no keys needed), up to [`crate::image::MAX_CHAIN_DEPTH`] images;
/// a file that cannot be opened ends the walk (it is still listed).
fn chain_files(backing: &str, fmt: Option<crate::format::Format>) -> Vec<String> {
    use crate::format::Format;
    let mut files = Vec::new();
    let mut seen = Vec::new();
    let mut cur = backing.to_string();
    let mut cur_fmt = fmt;
    for depth in 0..crate::image::MAX_CHAIN_DEPTH {
        files.push(cur.clone());
        let id = FileId::of(&cur);
        if id.is_some_and(|i| seen.contains(&i)) {
            break;
        }
        seen.extend(id);
        let Ok(f) = crate::format::resolve(&cur, cur_fmt, None) else {
            break;
        };
        if f != Format::Qcow2 {
            break;
        }
        if crate::image::ensure_fds(depth, &cur).is_err() {
            break;
        }
        let cache = crate::image::layer_cache_bytes(depth);
        let Ok(opening) = crate::qcow2::Opening::open_cached(&cur, cache) else {
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
        cur_fmt = info.backing_format().and_then(crate::image::backing_format);
        cur = crate::image::resolve_backing(&cur, next)
            .to_string_lossy()
            .into_owned();
    }
    files
}
