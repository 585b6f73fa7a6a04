//! LUKS1 key slots: unlocking, writing, adding, replacing, removing and
//! changing them, and streaming key material through a fixed buffer
//! (decrypt and merge, split and encrypt).

use rand_core::TryCryptoRng;
use zeroize::Zeroizing;

use super::af::AfState;
use super::iterations::check_iterations;
use super::{
    flush_dev, hash_of, header, read, rng_fill, verify_volume_key, write, write_header, HeaderRepr,
    VolumeKey, CHUNK, KEY_SLOTS,
};
use crate::cipher::{SectorCipher, MAX_KEY_BYTES};
use crate::error::{slot_u8, BadParameter, Error, PureError, Structure};
use crate::io::{self, BlockIo};

/// Unlocks key slot `slot` with `passphrase`: `Ok(None)` when the
/// passphrase does not open it.
fn try_slot<D: BlockIo + ?Sized>(
    dev: &mut D,
    hdr: &HeaderRepr,
    slot: usize,
    passphrase: &[u8],
) -> Result<Option<VolumeKey>, Error<D::Error>> {
    let ks = hdr
        .key_slots
        .get(slot)
        .ok_or(Error::BadParameter(BadParameter::KeySlotIndex(slot_u8(
            slot,
        ))))?;
    let hash = hash_of(hdr)?;
    // Field offsets in the phdr: mkDigestIterations at 164; key slot n at
    // 208 + 48 n, its iterations 4 bytes in.
    check_iterations(
        Structure::Luks1Header,
        164,
        "digest iterations",
        hdr.mk_digest_iter,
    )?;
    let slot_off = 208u64.saturating_add(48u64.saturating_mul(slot as u64));
    check_iterations(
        Structure::Luks1KeySlot(slot_u8(slot)),
        slot_off.saturating_add(4),
        "iterations",
        ks.iterations,
    )?;
    let kb = hdr.key_bytes as usize;
    let (cipher, ()) = slot_cipher(&hdr.cipher_name, &hdr.cipher_mode, kb, |sk| {
        hash.pbkdf2(passphrase, &ks.salt, ks.iterations, sk);
        Ok(())
    })?;
    let mut af = AfState::new(hash, kb, ks.stripes);
    let base = u64::from(ks.key_material_offset).saturating_mul(512);
    let st = Structure::KeyMaterial(slot_u8(slot));
    read_material(dev, st, base, &cipher, &mut af)?;
    let Some(candidate) = af.merged() else {
        return Ok(None);
    };
    if verify_volume_key(hdr, candidate) {
        Ok(VolumeKey::from_bytes(candidate))
    } else {
        Ok(None)
    }
}

/// Unlocks the volume with `passphrase` (a key file is just its bytes).
///
/// Tries `slot` only, or every active slot in order. Returns the volume
/// key and the slot that opened.
pub fn unlock<D: BlockIo + ?Sized>(
    dev: &mut D,
    hdr: &HeaderRepr,
    passphrase: &[u8],
    slot: Option<u8>,
) -> Result<(VolumeKey, u8), Error<D::Error>> {
    if let Some(s) = slot {
        let ks = hdr
            .key_slots
            .get(usize::from(s))
            .ok_or(Error::BadParameter(BadParameter::KeySlotIndex(s)))?;
        if !ks.active {
            return Err(Error::KeySlotNotActive(s));
        }
        return match try_slot(dev, hdr, usize::from(s), passphrase)? {
            Some(k) => Ok((k, s)),
            None => Err(Error::WrongPassphrase),
        };
    }
    if !hdr.key_slots.iter().any(|k| k.active) {
        return Err(Error::NoActiveKeySlot);
    }
    for i in 0..KEY_SLOTS {
        if hdr.key_slots[i].active {
            if let Some(k) = try_slot(dev, hdr, i, passphrase)? {
                return Ok((k, slot_u8(i)));
            }
        }
    }
    Err(Error::WrongPassphrase)
}

/// Derives a `len`-byte key slot key with `derive` (into a buffer wiped
/// before this returns) and makes the key material's cipher from it
/// (`cipher_name`/`cipher_mode`, 512-byte sectors); also returns what
/// `derive` returned.
pub(crate) fn slot_cipher<E, T>(
    cipher_name: &str,
    cipher_mode: &str,
    len: usize,
    derive: impl FnOnce(&mut [u8]) -> Result<T, Error<E>>,
) -> Result<(SectorCipher, T), Error<E>> {
    let mut slot_key = Zeroizing::new([0u8; MAX_KEY_BYTES]);
    let sk = slot_key.get_mut(..len).ok_or(Error::Unsupported(
        crate::error::Unsupported::KeyTooLarge(u32::try_from(len).unwrap_or(u32::MAX)),
    ))?;
    let derived = derive(sk)?;
    let cipher = SectorCipher::new(cipher_name, cipher_mode, sk, 512);
    drop(slot_key);
    Ok((cipher.map_err(PureError::widen)?, derived))
}

/// Reads the key material `af` merges (its length rounded up to 512-byte
/// sectors) from `base`, decrypts it with `cipher` (IVs counting from 0)
/// and feeds it to `af`; errors name `st`.
pub(crate) fn read_material<D: BlockIo + ?Sized>(
    dev: &mut D,
    st: Structure,
    base: u64,
    cipher: &SectorCipher,
    af: &mut AfState,
) -> Result<(), Error<D::Error>> {
    let total = af.material_len().div_ceil(512).saturating_mul(512);
    // Decrypted key material: wiped on every exit path.
    let mut buf = Zeroizing::new([0u8; CHUNK]);
    let mut done = 0u64;
    while done < total {
        let n = io::chunk_len(total.saturating_sub(done), CHUNK);
        let chunk = &mut buf[..n];
        read(dev, st, base.saturating_add(done), chunk)?;
        cipher
            .decrypt_sectors(done / 512, chunk)
            .map_err(PureError::widen)?;
        af.feed(chunk);
        done = done.saturating_add(n as u64);
    }
    Ok(())
}

/// Splits `vk` with `af` (random stripes from `rng`), pads the material
/// with zeroes to whole 512-byte sectors, encrypts it with `cipher` (IVs
/// counting from 0) and writes it at `base`; errors name `st`. The caller
/// flushes.
pub(crate) fn write_material<D: BlockIo + ?Sized, R: TryCryptoRng + ?Sized>(
    dev: &mut D,
    st: Structure,
    base: u64,
    cipher: &SectorCipher,
    af: &mut AfState,
    vk: &VolumeKey,
    rng: &mut R,
) -> Result<(), Error<D::Error>> {
    let kb = af.key_len();
    let total = af.material_len().div_ceil(512).saturating_mul(512);
    // Key material in the clear: wiped on every exit path.
    let mut buf = Zeroizing::new([0u8; CHUNK]);
    let mut stripe = Zeroizing::new([0u8; MAX_KEY_BYTES]);
    // Random bytes for the stripes, drawn a chunk at a time: one `rng`
    // call per chunk instead of one per stripe (4,000 stripes made 4,000
    // `getrandom` system calls per key slot). `pool[used..]` is unused.
    let mut pool = Zeroizing::new([0u8; CHUNK]);
    let mut used = CHUNK;
    let mut fill = 0usize;
    let mut pending = 0usize; // bytes of `stripe` not yet copied into buf
    let mut done = 0u64;
    let mut rng_ok = true;
    while done < total {
        let n = io::chunk_len(total.saturating_sub(done), CHUNK);
        // Fill buf[..n] with stripes (zero padding after the last one).
        while fill < n {
            if pending == 0 {
                if af.all_stripes() {
                    buf[fill..n].fill(0);
                    break;
                }
                rng_ok &= af.next_stripe(vk.as_bytes(), &mut stripe[..kb], |b| {
                    if CHUNK.saturating_sub(used) < b.len() {
                        if rng.try_fill_bytes(&mut pool[..]).is_err() {
                            return false;
                        }
                        used = 0;
                    }
                    let end = used.saturating_add(b.len());
                    b.copy_from_slice(&pool[used..end]);
                    used = end;
                    true
                });
                pending = kb;
            }
            let from = kb.saturating_sub(pending);
            let take = pending.min(n.saturating_sub(fill));
            buf[fill..fill.saturating_add(take)]
                .copy_from_slice(&stripe[from..from.saturating_add(take)]);
            fill = fill.saturating_add(take);
            pending = pending.saturating_sub(take);
        }
        if !rng_ok {
            return Err(Error::Rng);
        }
        cipher
            .encrypt_sectors(done / 512, &mut buf[..n])
            .map_err(PureError::widen)?;
        write(dev, st, base.saturating_add(done), &buf[..n])?;
        done = done.saturating_add(n as u64);
        fill = 0;
    }
    Ok(())
}

/// Writes key slot `slot`: derives the slot key from `passphrase`, splits
/// `vk` and writes the encrypted key material, then marks the slot active
/// in `hdr` (the caller writes the header).
pub(super) fn write_slot<D: BlockIo + ?Sized, R: TryCryptoRng + ?Sized>(
    dev: &mut D,
    hdr: &mut HeaderRepr,
    slot: usize,
    vk: &VolumeKey,
    passphrase: &[u8],
    iterations: u32,
    rng: &mut R,
) -> Result<(), Error<D::Error>> {
    if iterations == 0 {
        return Err(Error::BadParameter(BadParameter::ZeroIterations));
    }
    let hash = hash_of(hdr)?;
    let kb = hdr.key_bytes as usize;
    let mut salt = [0u8; header::SALT_LEN];
    rng_fill(rng, &mut salt)?;
    let ks = hdr
        .key_slots
        .get_mut(slot)
        .ok_or(Error::BadParameter(BadParameter::KeySlotIndex(slot_u8(
            slot,
        ))))?;
    let (cipher, ()) = slot_cipher(&hdr.cipher_name, &hdr.cipher_mode, kb, |sk| {
        hash.pbkdf2(passphrase, &salt, iterations, sk);
        Ok(())
    })?;
    let mut af = AfState::new(hash, kb, ks.stripes);
    let base = u64::from(ks.key_material_offset).saturating_mul(512);
    let st = Structure::KeyMaterial(slot_u8(slot));
    write_material(dev, st, base, &cipher, &mut af, vk, rng)?;
    ks.active = true;
    ks.iterations = iterations;
    ks.salt = salt;
    Ok(())
}

/// Adds `new_passphrase` in a free key slot (the lowest, or `slot`),
/// given the volume key. Writes key material and header; returns the slot.
///
/// Write order: the key material, a flush, then the header (a crash
/// before the header write leaves the slot inactive, never half-written).
pub fn add_key<D: BlockIo + ?Sized, R: TryCryptoRng + ?Sized>(
    dev: &mut D,
    hdr: &mut HeaderRepr,
    vk: &VolumeKey,
    new_passphrase: &[u8],
    iterations: u32,
    slot: Option<u8>,
    rng: &mut R,
) -> Result<u8, Error<D::Error>> {
    if !verify_volume_key(hdr, vk.as_bytes()) {
        return Err(Error::WrongPassphrase);
    }
    let s = match slot {
        Some(s) => {
            let ks = hdr
                .key_slots
                .get(usize::from(s))
                .ok_or(Error::BadParameter(BadParameter::KeySlotIndex(s)))?;
            if ks.active {
                return Err(Error::NoFreeKeySlot);
            }
            s
        }
        None => hdr
            .key_slots
            .iter()
            .position(|k| !k.active)
            .map(slot_u8)
            .ok_or(Error::NoFreeKeySlot)?,
    };
    put_key(dev, hdr, vk, new_passphrase, iterations, s, rng)?;
    Ok(s)
}

/// Writes `new_passphrase` into key slot `slot` whether or not it is
/// active (qemu-img's `amend --force` onto an active slot): the slot's old
/// key material is overwritten in place by the new one, then the header
/// is written. A crash between the two leaves the slot unusable (old
/// header, new material), so callers should prefer [`add_key`].
pub fn replace_key<D: BlockIo + ?Sized, R: TryCryptoRng + ?Sized>(
    dev: &mut D,
    hdr: &mut HeaderRepr,
    vk: &VolumeKey,
    new_passphrase: &[u8],
    iterations: u32,
    slot: u8,
    rng: &mut R,
) -> Result<(), Error<D::Error>> {
    if !verify_volume_key(hdr, vk.as_bytes()) {
        return Err(Error::WrongPassphrase);
    }
    if hdr.key_slots.get(usize::from(slot)).is_none() {
        return Err(Error::BadParameter(BadParameter::KeySlotIndex(slot)));
    }
    put_key(dev, hdr, vk, new_passphrase, iterations, slot, rng)
}

/// Key material, flush, header, flush.
fn put_key<D: BlockIo + ?Sized, R: TryCryptoRng + ?Sized>(
    dev: &mut D,
    hdr: &mut HeaderRepr,
    vk: &VolumeKey,
    new_passphrase: &[u8],
    iterations: u32,
    slot: u8,
    rng: &mut R,
) -> Result<(), Error<D::Error>> {
    let mut new = hdr.clone();
    write_slot(
        dev,
        &mut new,
        usize::from(slot),
        vk,
        new_passphrase,
        iterations,
        rng,
    )?;
    flush_dev(dev)?;
    write_header(dev, &new)?;
    flush_dev(dev)?;
    *hdr = new;
    Ok(())
}

/// Disables key slot `slot` and overwrites its key material with zeroes.
/// Refuses to remove the last active slot unless `force`.
pub fn remove_key<D: BlockIo + ?Sized>(
    dev: &mut D,
    hdr: &mut HeaderRepr,
    slot: u8,
    force: bool,
) -> Result<(), Error<D::Error>> {
    let i = usize::from(slot);
    let ks = hdr
        .key_slots
        .get(i)
        .ok_or(Error::BadParameter(BadParameter::KeySlotIndex(slot)))?;
    if !ks.active {
        return Err(Error::KeySlotNotActive(slot));
    }
    let active = hdr.key_slots.iter().filter(|k| k.active).count();
    if active <= 1 && !force {
        return Err(Error::LastKeySlot(slot));
    }
    let (start, end) = hdr.key_material_range(i).ok_or(Error::corrupt(
        Structure::Luks1KeySlot(slot),
        0,
        crate::error::Problem::Overflow,
    ))?;
    let mut new = hdr.clone();
    new.key_slots[i].active = false;
    new.key_slots[i].iterations = 0;
    new.key_slots[i].salt = [0; header::SALT_LEN];
    // The material goes first (with explicit zero writes: write_zeroes
    // could only punch a hole that leaves the old bytes on the medium), so
    // a crash never leaves a disabled slot whose material still opens the
    // volume key.
    let zero = [0u8; CHUNK];
    let mut at = u64::from(start).saturating_mul(512);
    let stop = u64::from(end).saturating_mul(512);
    while at < stop {
        let n = io::chunk_len(stop.saturating_sub(at), CHUNK);
        write(dev, Structure::KeyMaterial(slot), at, &zero[..n])?;
        at = at.saturating_add(n as u64);
    }
    flush_dev(dev)?;
    write_header(dev, &new)?;
    flush_dev(dev)?;
    *hdr = new;
    Ok(())
}

/// Changes a passphrase: the slot `old_passphrase` opens gets
/// `new_passphrase` (written to a free slot first when there is one, then
/// the old slot is removed). Returns the new slot.
pub fn change_key<D: BlockIo + ?Sized, R: TryCryptoRng + ?Sized>(
    dev: &mut D,
    hdr: &mut HeaderRepr,
    old_passphrase: &[u8],
    new_passphrase: &[u8],
    iterations: u32,
    rng: &mut R,
) -> Result<u8, Error<D::Error>> {
    let (vk, old) = unlock(dev, hdr, old_passphrase, None)?;
    if hdr.key_slots.iter().any(|k| !k.active) {
        let new = add_key(dev, hdr, &vk, new_passphrase, iterations, None, rng)?;
        remove_key(dev, hdr, old, true)?;
        Ok(new)
    } else {
        put_key(dev, hdr, &vk, new_passphrase, iterations, old, rng)?;
        Ok(old)
    }
}
