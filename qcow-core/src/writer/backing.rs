//! Changing the backing file name and format recorded in cluster 0 (what
//! `qemu-img rebase` ends with).

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;

use super::{Qcow2Writer, SECTOR_BYTES};
use crate::error::{Error, LayerError, Limit, Problem, Structure};
use crate::header::{emit_extension, ext, extension_header, extension_span, field};
use crate::limits::MAX_NAME_LEN;
use luks_core::io::BlockIo;

impl<D: BlockIo, B: BlockIo> Qcow2Writer<D, B>
where
    B::Error: LayerError<D::Error>,
{
    /// Records `file` as the backing file (none when `None`) with format
    /// `fmt` (the backing format extension; dropped when `None`). The
    /// other header extensions are kept in their order after the backing
    /// format; the name follows the end marker, as QEMU lays it out. Only
    /// cluster 0 is rewritten (one write, then a flush); guest data is not
    /// touched, so the caller decides whether content must be preserved.
    pub fn set_backing(
        &mut self,
        file: Option<&str>,
        fmt: Option<&str>,
    ) -> Result<(), Error<D::Error>> {
        self.settle()?;
        let cs = usize::try_from(self.cs()).unwrap_or(0);
        let too_long = |value: usize, max: usize| Error::Limit {
            structure: Structure::BackingFileName,
            offset: 0,
            limit: Limit::NameLength,
            value: value as u64,
            max: max as u64,
        };
        for n in [file, fmt].into_iter().flatten() {
            if n.len() > MAX_NAME_LEN {
                return Err(too_long(n.len(), MAX_NAME_LEN));
            }
        }
        let mut c0 = vec![0u8; cs];
        self.read_dev(0, &mut c0, Structure::Header)?;
        let start = usize::try_from(self.hdr.extensions_start()).unwrap_or(cs);
        let end = usize::try_from(self.hdr.extensions_end())
            .unwrap_or(cs)
            .min(cs);
        // The extensions to keep: all but the backing format and the end.
        let mut kept: Vec<(u32, Vec<u8>)> = Vec::new();
        let mut at = start;
        while let Some(h) = c0.get(at..at.saturating_add(8)) {
            if at.saturating_add(8) > end {
                break;
            }
            let mut hb = [0u8; 8];
            hb.copy_from_slice(h);
            let (t, len) = extension_header(&hb);
            if t == ext::END {
                break;
            }
            let span = usize::try_from(extension_span(len)).unwrap_or(usize::MAX);
            let body = at
                .checked_add(8)
                .and_then(|s| Some(s..s.checked_add(usize::try_from(len).ok()?)?))
                .and_then(|r| c0.get(r))
                .ok_or_else(|| {
                    Error::corrupt(Structure::HeaderExtension, at as u64, Problem::Overflow)
                })?;
            if t != ext::BACKING_FORMAT {
                kept.push((t, body.to_vec()));
            }
            at = at.saturating_add(span);
        }
        // Rebuild the extension area and the name after it.
        let mut area = vec![0u8; cs.saturating_sub(start)];
        let mut pos = 0usize;
        let full = || Error::Limit {
            structure: Structure::HeaderExtension,
            offset: start as u64,
            limit: Limit::NameLength,
            value: cs as u64,
            max: cs as u64,
        };
        let fmt_ext = fmt
            .filter(|_| file.is_some())
            .map(|f| (ext::BACKING_FORMAT, f.as_bytes().to_vec()));
        for (t, body) in fmt_ext.iter().chain(kept.iter()) {
            let n = area
                .get_mut(pos..)
                .and_then(|b| emit_extension(b, *t, body))
                .ok_or_else(full)?;
            pos = pos.saturating_add(n);
        }
        pos = pos.saturating_add(8); // the end marker (zeroes)
        let (name_off, name_len) = match file {
            Some(name) => {
                let dst = area
                    .get_mut(pos..pos.saturating_add(name.len()))
                    .ok_or_else(|| {
                        too_long(name.len(), cs.saturating_sub(start.saturating_add(pos)))
                    })?;
                dst.copy_from_slice(name.as_bytes());
                let off = start.saturating_add(pos);
                pos = pos.saturating_add(name.len());
                (off as u64, u32::try_from(name.len()).unwrap_or(0))
            }
            None => (0, 0),
        };
        let used = pos.max(end.saturating_sub(start)).min(area.len());
        let mut out = c0.get(..start).unwrap_or(&[]).to_vec();
        out.extend_from_slice(area.get(..used).unwrap_or(&[]));
        out.resize(out.len().next_multiple_of(SECTOR_BYTES).min(cs), 0);
        let f = field::BACKING_FILE_OFFSET.start;
        out[f..f.saturating_add(8)].copy_from_slice(&name_off.to_be_bytes());
        let f = field::BACKING_FILE_SIZE.start;
        out[f..f.saturating_add(4)].copy_from_slice(&name_len.to_be_bytes());
        self.write_dev(0, &out, Structure::Header)?;
        self.flush_dev()?;
        self.hdr.backing_file_offset = name_off;
        self.hdr.backing_file_size = name_len;
        Ok(())
    }
}
