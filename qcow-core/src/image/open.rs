//! Opening an image: the header, its extensions and their checks, and
//! attaching backing and data devices, buffers and a decryptor.

use super::*;

impl<D: BlockIo, S: AsMut<[u8]>> Qcow2<D, S> {
    /// Opens an image read-only. `cache` is the metadata cache: at least
    /// one slice (`min(4096, cluster_size)` bytes); up to 64 slices are used.
    /// The reader owns it (pass `&mut buf[..]` to lend memory instead).
    pub fn open(mut dev: D, mut cache_store: S) -> Result<Self, Error<D::Error>> {
        let cache = cache_store.as_mut();
        let mut bounce = [0u8; 512];
        let file_size = dev.size().map_err(io(Structure::Header, 0))?;
        let mut info = read_header_info(&mut dev, &mut bounce, cache)?;
        let hdr = info.header;
        let cs = hdr.cluster_size();
        if hdr.backing_file_offset != 0 {
            info.backing_file = read_name(
                &mut dev,
                &mut bounce,
                hdr.backing_file_offset,
                hdr.backing_file_size,
                Structure::BackingFileName,
            )?;
        }
        // Feature bits: one SUPPORTED mask, unknown bits named.
        let unknown = hdr.unknown_incompatible();
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            let bit8 = u8::try_from(bit).unwrap_or(u8::MAX);
            let name =
                feature_name_from(&mut dev, &mut bounce, &info, 0, bit8)?.unwrap_or_default();
            return Err(Error::Unsupported(Unsupported::IncompatibleFeature {
                bit: bit8,
                name,
            }));
        }
        if hdr.compression_type > header::COMPRESSION_ZSTD {
            return Err(Error::Unsupported(Unsupported::CompressionType(
                hdr.compression_type,
            )));
        }
        if hdr.extended_l2() && hdr.cluster_bits < 14 {
            return Err(Error::corrupt(
                Structure::Header,
                header::field::INCOMPATIBLE_FEATURES.start as u64,
                Problem::ExtendedL2SmallCluster(hdr.cluster_bits),
            ));
        }
        if !hdr.has_data_file() && hdr.autoclear_features & autoclear::DATA_FILE_RAW != 0 {
            return Err(Error::corrupt(
                Structure::Header,
                header::field::AUTOCLEAR_FEATURES.start as u64,
                Problem::DataFileRawWithoutDataFile,
            ));
        }
        let rt_bytes = u64::from(hdr.refcount_table_clusters).saturating_mul(cs);
        Error::check_limit(
            Structure::Header,
            header::field::REFCOUNT_TABLE_CLUSTERS.start as u64,
            Limit::RefcountTableBytes,
            rt_bytes,
            MAX_REFCOUNT_TABLE_BYTES,
        )?;
        if !table_end_ok(hdr.refcount_table_offset, rt_bytes) {
            return Err(Error::corrupt(
                Structure::Header,
                header::field::REFCOUNT_TABLE_OFFSET.start as u64,
                Problem::Overflow,
            ));
        }
        if hdr.crypt_method != CryptMethod::Luks && info.crypto.is_some() {
            return Err(Error::corrupt(
                Structure::Header,
                header::field::CRYPT_METHOD.start as u64,
                Problem::UnexpectedCryptoExtension(hdr.crypt_method),
            ));
        }
        if hdr.crypt_method == CryptMethod::Luks && info.crypto.is_none() {
            return Err(Error::corrupt(
                Structure::Header,
                header::field::CRYPT_METHOD.start as u64,
                Problem::MissingCryptoExtension,
            ));
        }
        Error::check_limit(
            Structure::Header,
            header::field::NB_SNAPSHOTS.start as u64,
            Limit::Snapshots,
            u64::from(hdr.nb_snapshots),
            u64::from(MAX_SNAPSHOTS),
        )?;
        check_l1(
            &hdr,
            hdr.l1_table_offset,
            hdr.l1_size,
            hdr.size,
            Structure::Header,
            header::field::L1_SIZE.start as u64,
        )?;
        let slice = usize::try_from(cs).unwrap_or(SLICE_BYTES).min(SLICE_BYTES);
        let cache_len = cache.len();
        let slots = cache_len
            .checked_div(slice)
            .unwrap_or(0)
            .min(MAX_CACHE_SLICES);
        if slots == 0 {
            return Err(Error::BufferTooSmall {
                what: Buffer::Cache,
                needed: slice,
                given: cache_len,
            });
        }
        let mut img = Self {
            dev,
            backing: None,
            backing_size: 0,
            data: None,
            st: State {
                l1_offset: hdr.l1_table_offset,
                l1_size: hdr.l1_size,
                size: sector_floor(hdr.size),
                snapshot: None,
                file_size,
                info,
                cache: Cache {
                    mem: cache_store,
                    slice,
                    slots,
                    tags: [EMPTY; MAX_CACHE_SLICES],
                    used: [0; MAX_CACHE_SLICES],
                    tick: 0,
                    last: 0,
                },
                cin: None,
                cout: None,
                cout_tag: None,
                decryptor: None,
                ignore_backing: false,
                bounce,
            },
        };
        // As QEMU, a snapshot table that does not parse refuses the open
        // (each entry is read once, without allocating).
        img.for_each_snapshot(|_| false)?;
        Ok(img)
    }

    /// This allocation-free reader stays read-only: refuses images marked
    /// corrupt with [`Error::MarkedCorrupt`], and everything else with
    /// [`Unsupported::Writing`]. Writing goes through `writer::Qcow2Writer`
    /// (the `alloc` feature), which has its own caches.
    pub fn open_rw(dev: D, cache: S) -> Result<Self, Error<D::Error>> {
        let img = Self::open(dev, cache)?;
        if img.info().corrupt() {
            return Err(Error::MarkedCorrupt);
        }
        Err(Error::Unsupported(Unsupported::Writing))
    }
}

/// Reads the header (a v3 header longer than a sector whole, through
/// `scratch`, which must hold it) and its extensions: what the reader and
/// the checker both start from.
pub(crate) fn read_header_info<D: BlockIo>(
    dev: &mut D,
    bounce: &mut [u8; 512],
    scratch: &mut [u8],
) -> Result<ImageInfo, Error<D::Error>> {
    if scratch.len() < 512 {
        return Err(Error::BufferTooSmall {
            what: Buffer::Cache,
            needed: 512,
            given: scratch.len(),
        });
    }
    read_unaligned(dev, bounce, 0, &mut scratch[..512], Structure::Header)?;
    let mut first = [0u8; 512];
    first.copy_from_slice(&scratch[..512]);
    let view = Header::new_unchecked(&first[..]);
    // A v3 header longer than one sector: read it whole into the scratch.
    let hdr = if view.version() >= 3 && view.header_length() > 512 {
        let hl = view.header_length() as usize;
        if hl > scratch.len() {
            return Err(Error::BufferTooSmall {
                what: Buffer::Cache,
                needed: hl,
                given: scratch.len(),
            });
        }
        read_unaligned(dev, bounce, 0, &mut scratch[..hl], Structure::Header)?;
        HeaderRepr::parse(&Header::new_unchecked(&scratch[..hl]))?
    } else {
        HeaderRepr::parse(&view)?
    };
    let mut info = ImageInfo {
        header: hdr,
        backing_file: Name::new(),
        backing_format: Name::new(),
        data_file: None,
        crypto: None,
        bitmaps: None,
        feature_table: None,
        unknown_extensions: heapless::Vec::new(),
    };
    parse_extensions(dev, bounce, &mut info)?;
    Ok(info)
}

/// Checks an L1 table (offset, entries) against the size it must cover.
pub(super) fn check_l1<E>(
    hdr: &HeaderRepr,
    l1_offset: u64,
    l1_size: u32,
    size: u64,
    structure: Structure,
    at: u64,
) -> Result<(), Error<E>> {
    if l1_size > MAX_L1_ENTRIES {
        return Err(Error::Limit {
            structure,
            offset: at,
            limit: Limit::L1Entries,
            value: u64::from(l1_size),
            max: u64::from(MAX_L1_ENTRIES),
        });
    }
    let needed = L2Geometry::of(hdr).l1_entries_for(size);
    if u64::from(l1_size) < needed {
        return Err(Error::corrupt(
            structure,
            at,
            Problem::L1TooSmall { l1_size, needed },
        ));
    }
    if l1_size > 0 && l1_offset == 0 {
        // Aligned, but cluster 0 is the header: qemu-img opens this and
        // reads the header bytes as L1 entries (its check then reports
        // them); refused here.
        let at = if structure == Structure::Header {
            header::field::L1_TABLE_OFFSET.start as u64
        } else {
            at
        };
        return Err(Error::corrupt(
            structure,
            at,
            Problem::L1AtHeader { l1_size },
        ));
    }
    if l1_size > 0 && l1_offset & (hdr.cluster_size().wrapping_sub(1)) != 0 {
        return Err(Error::corrupt(structure, at, Problem::Unaligned(l1_offset)));
    }
    // As QEMU: a table must end below 2^63 (file offsets are signed there).
    if !table_end_ok(l1_offset, u64::from(l1_size).saturating_mul(8)) {
        return Err(Error::corrupt(structure, at, Problem::Overflow));
    }
    Ok(())
}

/// Whether a table of `bytes` at `offset` ends at or below `i64::MAX`.
pub(super) fn table_end_ok(offset: u64, bytes: u64) -> bool {
    offset
        .checked_add(bytes)
        .is_some_and(|end| end <= i64::MAX as u64)
}

pub(super) fn parse_extensions<D: BlockIo>(
    dev: &mut D,
    bounce: &mut [u8; 512],
    info: &mut ImageInfo,
) -> Result<(), Error<D::Error>> {
    let mut pos = info.header.extensions_start();
    let end = info.header.extensions_end();
    let mut seen = 0u32; // bit per known type, for duplicates
    while pos.checked_add(8).is_some_and(|e| e <= end) {
        let mut h = [0u8; 8];
        read_unaligned(dev, bounce, pos, &mut h, Structure::HeaderExtension)?;
        let (ty, len) = header::extension_header(&h);
        if ty == ext::END {
            break;
        }
        let payload = pos.saturating_add(8);
        if payload.checked_add(u64::from(len)).is_none_or(|e| e > end) {
            return Err(Error::corrupt(
                Structure::HeaderExtension,
                pos,
                Problem::ExtensionOverrun { ext_type: ty, len },
            ));
        }
        let bad_len = || {
            Error::corrupt(
                Structure::HeaderExtension,
                pos,
                Problem::ExtensionLength { ext_type: ty, len },
            )
        };
        let bit = match ty {
            ext::BACKING_FORMAT => 1,
            ext::FEATURE_TABLE => 2,
            ext::BITMAPS => 4,
            ext::CRYPTO => 8,
            ext::DATA_FILE => 16,
            _ => 0,
        };
        if bit != 0 {
            if seen & bit != 0 {
                return Err(Error::corrupt(
                    Structure::HeaderExtension,
                    pos,
                    Problem::DuplicateExtension(ty),
                ));
            }
            seen |= bit;
        }
        match ty {
            ext::BACKING_FORMAT => {
                info.backing_format =
                    read_name(dev, bounce, payload, len, Structure::HeaderExtension)?;
            }
            ext::DATA_FILE => {
                info.data_file = Some(read_name(
                    dev,
                    bounce,
                    payload,
                    len,
                    Structure::HeaderExtension,
                )?);
            }
            ext::FEATURE_TABLE => info.feature_table = Some((payload, len)),
            ext::CRYPTO => {
                if len as usize != CryptoExt::LEN {
                    return Err(bad_len());
                }
                let mut b = [0u8; CryptoExt::LEN];
                read_unaligned(dev, bounce, payload, &mut b, Structure::HeaderExtension)?;
                info.crypto = CryptoExt::parse(&b);
            }
            ext::BITMAPS => {
                if (len as usize) < BitmapsExt::LEN {
                    return Err(bad_len());
                }
                let mut b = [0u8; BitmapsExt::LEN];
                read_unaligned(dev, bounce, payload, &mut b, Structure::HeaderExtension)?;
                info.bitmaps = BitmapsExt::parse(&b);
            }
            _ => {
                // Unknown extensions are skipped; the first few are kept
                // for a writer to preserve.
                let _ = info.unknown_extensions.push(ExtensionLocation {
                    ext_type: ty,
                    offset: payload,
                    len,
                });
            }
        }
        pos = pos.saturating_add(header::extension_span(len));
    }
    Ok(())
}

pub(super) fn feature_name_from<D: BlockIo>(
    dev: &mut D,
    bounce: &mut [u8; 512],
    info: &ImageInfo,
    kind: u8,
    bit: u8,
) -> Result<Option<heapless::String<{ crate::error::FEATURE_NAME_LEN }>>, Error<D::Error>> {
    let Some((off, len)) = info.feature_table else {
        return Ok(None);
    };
    let n = u64::from(len)
        .checked_div(FeatureName::LEN as u64)
        .unwrap_or(0);
    for i in 0..n {
        let at = off.saturating_add(i.saturating_mul(FeatureName::LEN as u64));
        let mut b = [0u8; FeatureName::LEN];
        read_unaligned(dev, bounce, at, &mut b, Structure::HeaderExtension)?;
        if let Some(f) = FeatureName::parse(&b) {
            if f.kind == kind && f.bit == bit {
                return Ok(Some(f.name));
            }
        }
    }
    Ok(None)
}

impl<D, S, B, F, K> Qcow2<D, S, B, F, K>
where
    D: BlockIo,
    S: AsMut<[u8]>,
    K: Decryptor,
    B: BlockIo,
    B::Error: LayerError<D::Error>,
    F: BlockIo,
    F::Error: LayerError<D::Error>,
{
    /// Attaches the backing device (the file named by
    /// [`ImageInfo::backing_file`], opened by the caller in the format of
    /// [`ImageInfo::backing_format`]). Reads past its end return zeros.
    pub fn with_backing<B2>(self, backing: B2) -> Opened<D, S, B2, F, K>
    where
        B2: BlockIo,
        B2::Error: LayerError<D::Error>,
    {
        self.with_backing_opt(Some(backing))
    }

    /// [`Self::with_backing`] for a backing device that may be absent at
    /// run time: `None` gives an image of the same type with no backing
    /// device (reads of unallocated ranges then fail with
    /// [`Error::BackingMissing`] if the image names a backing file, unless
    /// [`Self::ignore_backing`]).
    pub fn with_backing_opt<B2>(self, mut backing: Option<B2>) -> Opened<D, S, B2, F, K>
    where
        B2: BlockIo,
        B2::Error: LayerError<D::Error>,
    {
        let backing_size = match backing.as_mut() {
            Some(b) => b.size().map_err(|e| e.into_layer(Structure::Backing, 0))?,
            None => 0,
        };
        Ok(Qcow2 {
            dev: self.dev,
            backing,
            backing_size,
            data: self.data,
            st: self.st,
        })
    }

    /// Attaches the external data file device (named by
    /// [`ImageInfo::data_file`]).
    pub fn with_data_file<F2>(self, data: F2) -> Qcow2<D, S, B, F2, K>
    where
        F2: BlockIo,
        F2::Error: LayerError<D::Error>,
    {
        self.with_data_file_opt(Some(data))
    }

    /// [`Self::with_data_file`] for a data file that may be absent at run
    /// time: `None` gives an image of the same type with none attached
    /// (an image that needs one then fails reads with
    /// [`Error::DataFileMissing`]).
    pub fn with_data_file_opt<F2>(self, data: Option<F2>) -> Qcow2<D, S, B, F2, K>
    where
        F2: BlockIo,
        F2::Error: LayerError<D::Error>,
    {
        Qcow2 {
            dev: self.dev,
            backing: self.backing,
            backing_size: self.backing_size,
            data,
            st: self.st,
        }
    }

    /// Reads unallocated ranges as zeros even though the image names a
    /// backing file (like `qemu-img` with the backing ignored).
    pub fn ignore_backing(mut self) -> Self {
        self.st.ignore_backing = true;
        self
    }

    /// Gives the buffers compressed clusters are read through: `input` of
    /// at least 512 bytes (`cluster_size + 512` holds any cluster QEMU
    /// writes) and `output` of at least `cluster_size`.
    /// Both are of the cache's storage type and owned by the reader; they
    /// are only touched (`as_mut`) when a compressed cluster is read.
    pub fn with_compression_buffers(mut self, input: S, output: S) -> Self {
        self.st.cin = Some(input);
        self.st.cout = Some(output);
        self.st.cout_tag = None;
        self
    }

    /// Attaches the decryptor that reading an encrypted image needs (an
    /// owned key such as [`crate::crypto::ImageKey`], or `&mut` one).
    pub fn with_decryptor<K2: Decryptor>(self, d: K2) -> Qcow2<D, S, B, F, K2> {
        self.with_decryptor_opt(Some(d))
    }

    /// [`Self::with_decryptor`] for a key that may be absent at run time
    /// (an unencrypted image): `None` names the same type with no
    /// decryptor, and reading encrypted data then fails with
    /// [`Unsupported::Encrypted`].
    pub fn with_decryptor_opt<K2: Decryptor>(self, d: Option<K2>) -> Qcow2<D, S, B, F, K2> {
        let st = self.st;
        Qcow2 {
            dev: self.dev,
            backing: self.backing,
            backing_size: self.backing_size,
            data: self.data,
            st: State {
                info: st.info,
                l1_offset: st.l1_offset,
                l1_size: st.l1_size,
                size: st.size,
                snapshot: st.snapshot,
                file_size: st.file_size,
                cache: st.cache,
                cin: st.cin,
                cout: st.cout,
                cout_tag: st.cout_tag,
                decryptor: d,
                ignore_backing: st.ignore_backing,
                bounce: st.bounce,
            },
        }
    }

    /// Unlocks this opened encrypted image with `passphrase`, reading the
    /// LUKS header it carries through its own device (no second open), and
    /// gives the key, for [`Self::with_decryptor`]: `Ok(None)` for an
    /// unencrypted image. A wrong passphrase leaves the image usable, so a
    /// caller can ask again.
    #[cfg(feature = "encryption")]
    pub fn unlock_key(
        &mut self,
        passphrase: &[u8],
    ) -> Result<Option<crate::crypto::ImageKey>, Error<D::Error>> {
        crate::crypto::ImageKey::unlock(&mut self.dev, &self.st.info, passphrase)
    }

    /// [`Self::unlock_key`] and [`Self::with_decryptor_opt`] in one: the
    /// image, unlocked in place (an unencrypted one passes through with no
    /// decryptor). On error the image is dropped; use
    /// [`Self::unlock_key`] to retry with another passphrase.
    #[cfg(feature = "encryption")]
    pub fn unlock(mut self, passphrase: &[u8]) -> Opened<D, S, B, F, crate::crypto::ImageKey> {
        let key = self.unlock_key(passphrase)?;
        Ok(self.with_decryptor_opt(key))
    }

    /// Header and extension information.
    pub fn info(&self) -> &ImageInfo {
        &self.st.info
    }

    /// The header.
    pub fn header(&self) -> &HeaderRepr {
        &self.st.info.header
    }

    /// Size of the disk being read: the virtual size, or the snapshot's
    /// disk size when a snapshot is selected.
    pub fn virtual_size(&self) -> u64 {
        self.st.size
    }

    /// The selected snapshot's index, if any.
    pub fn selected_snapshot(&self) -> Option<u32> {
        self.st.snapshot
    }

    /// The image device.
    pub fn device(&mut self) -> &mut D {
        &mut self.dev
    }

    /// The attached backing device.
    pub fn backing(&mut self) -> Option<&mut B> {
        self.backing.as_mut()
    }

    /// Gives back the image, backing and data file devices.
    pub fn into_parts(self) -> (D, Option<B>, Option<F>) {
        (self.dev, self.backing, self.data)
    }

    /// Looks a name up in the feature name table (`kind` 0 incompatible,
    /// 1 compatible, 2 autoclear).
    pub fn feature_name(
        &mut self,
        kind: u8,
        bit: u8,
    ) -> Result<Option<heapless::String<{ crate::error::FEATURE_NAME_LEN }>>, Error<D::Error>> {
        feature_name_from(&mut self.dev, &mut self.st.bounce, &self.st.info, kind, bit)
    }
}
