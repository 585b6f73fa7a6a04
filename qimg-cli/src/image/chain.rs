//! [`Chain`]: a backing chain read layer by layer in a loop, so the stack
//! a read needs does not grow with the depth.

use luks_core::io::BlockIo;

use crate::dev::Source;
use crate::rawfile::RawFile;
use crate::CliError;

/// One layer of a backing chain.
pub(super) enum Layer {
    /// A qcow2 image, opened without its backing device (5 KiB of state:
    /// boxed, so a raw layer does not take as much).
    Qcow2(Box<crate::qcow2::Qcow2Source>),
    /// A raw file (the bottom of a chain).
    Raw(RawFile),
}

impl Layer {
    fn source(&mut self) -> &mut dyn Source {
        match self {
            Self::Qcow2(q) => &mut **q,
            Self::Raw(r) => r,
        }
    }
}

/// A backing chain read layer by layer in a loop: a range goes to the
/// first layer, from the top, that holds it (data, zeroes or compressed);
/// a layer's backing file is read only where the layer holds nothing, and
/// reads as zeroes past its own end, as qemu-img reads chains. No read
/// recurses through the layers, so the stack a read needs does not grow
/// with the depth (`convert` reads on threads with 2 MiB stacks).
pub(super) struct Chain {
    layers: Vec<Layer>,
    /// Each layer's size as read here (raw files in whole sectors).
    sizes: Vec<u64>,
}

impl Chain {
    pub(super) fn new(mut layers: Vec<Layer>) -> Result<Self, CliError> {
        let mut sizes = Vec::with_capacity(layers.len());
        for l in &mut layers {
            let size = match l {
                Layer::Qcow2(q) => q.size(),
                Layer::Raw(r) => r.size().map(|s| s.next_multiple_of(512)),
            };
            sizes.push(size.map_err(|e| CliError::usage(e.to_string()))?);
        }
        Ok(Self { layers, sizes })
    }

    /// Bytes of layer `k` from `g` on, when it has any there.
    fn left(&self, k: usize, g: u64) -> Option<u64> {
        self.sizes
            .get(k)
            .and_then(|&s| s.checked_sub(g))
            .filter(|&n| n > 0)
    }
}

impl BlockIo for Chain {
    type Error = crate::dev::DevError;
    fn sector_size(&self) -> u32 {
        512
    }
    fn size(&mut self) -> Result<u64, Self::Error> {
        Ok(self.sizes.first().copied().unwrap_or(0))
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        let mut at = 0usize;
        while at < buf.len() {
            let g = offset.saturating_add(at as u64);
            // The run at `g` and the layer that holds it, found top down;
            // `lim` shrinks to what every layer above holds nothing of.
            let mut lim = (buf.len() - at) as u64;
            let mut k = 0usize;
            let holder = loop {
                let Some(left) = self.left(k, g) else {
                    break None;
                };
                lim = lim.min(left);
                match self.layers.get_mut(k) {
                    Some(Layer::Qcow2(q)) => {
                        let (own, n) = q.own_run(g, lim)?;
                        lim = n;
                        if own {
                            break Some(k);
                        }
                    }
                    Some(Layer::Raw(_)) => break Some(k),
                    None => break None,
                }
                k += 1;
            };
            let n = usize::try_from(lim)
                .unwrap_or(usize::MAX)
                .min(buf.len() - at);
            let chunk = &mut buf[at..at + n];
            match holder.and_then(|k| self.layers.get_mut(k)) {
                Some(l) => l.source().read_at(g, chunk)?,
                None => chunk.fill(0),
            }
            at += n;
        }
        Ok(())
    }
    fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> Result<(), Self::Error> {
        Err(crate::dev::DevError("the image is open read-only".into()))
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

impl Source for Chain {
    fn block_status(
        &mut self,
        offset: u64,
        max: u64,
    ) -> Result<crate::dev::BlockStatus, crate::dev::DevError> {
        let mut lim = max;
        let mut k = 0usize;
        loop {
            let Some(left) = self.left(k, offset) else {
                return Err(crate::dev::DevError(format!(
                    "block status asked at {offset}, past the end of the image"
                )));
            };
            lim = lim.min(left).max(1);
            let Some(layer) = self.layers.get_mut(k) else {
                return Err(crate::dev::DevError("no such layer".into()));
            };
            let mut st = layer.source().block_status(offset, lim)?;
            st.depth = u32::try_from(k).unwrap_or(u32::MAX);
            // Held here, or nothing below to fall to (this layer reads as
            // zeroes there, with its own reserved host range if any).
            if st.present || self.left(k + 1, offset).is_none() {
                return Ok(st);
            }
            lim = st.len.clamp(1, lim);
            k += 1;
        }
    }
}
