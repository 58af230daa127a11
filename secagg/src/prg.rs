//! Mask expansion: a 32-byte seed is stretched into `m` words of `Z_{2^32}` with
//! AES-128-CTR, keyed by HKDF-SHA256 of the *whole* seed.
//!
//! Flower's SecAgg+ folds seeds to 32 bits and expands them with a Mersenne Twister
//! (flwrlabs/flower#7522), so a server can enumerate the 2^32 seeds. Here every mask
//! carries the full 256 bits of the agreed secret into a 128-bit AES key.
//!
//! Speed comes from the loop order in [`apply_masks`]: the output is walked once, in
//! L1-sized blocks, and every stream adds (or subtracts) its keystream into the block
//! while it is hot, so `k + 1` masks cost `k + 1` keystreams plus one pass over memory
//! rather than `k + 1` passes.

use aes::cipher::{KeyIvInit, StreamCipher};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroize;

type Aes128Ctr = ctr::Ctr128BE<aes::Aes128>;

/// Whether a stream is added to or subtracted from the vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sign {
    Add,
    Subtract,
}

/// One keystream, ready to be applied.
pub struct MaskStream {
    cipher: Aes128Ctr,
    sign: Sign,
}

impl std::fmt::Debug for MaskStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskStream").field("sign", &self.sign).finish_non_exhaustive()
    }
}

impl MaskStream {
    /// `label` separates the self mask from pairwise masks, so equal seeds in different
    /// roles never give equal streams.
    pub fn new(seed: &[u8; 32], label: &[u8], sign: Sign) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(b"tessera/prg/v1"), seed);
        let mut okm = [0u8; 32];
        // 32 bytes is far below HKDF's limit of 255 * 32, so expand cannot fail.
        hk.expand(label, &mut okm).unwrap_or_else(|_| unreachable!("HKDF output length is valid"));
        let cipher = Aes128Ctr::new((&okm[..16]).into(), (&okm[16..]).into());
        okm.zeroize();
        MaskStream { cipher, sign }
    }
}

/// Words per block: 16 KiB of output plus 16 KiB of keystream stay within L1/L2.
const BLOCK_WORDS: usize = 4096;

/// Adds or subtracts every stream's keystream into `out` (mod 2^32), reading the words
/// of each keystream as little-endian `u32`. Streams continue where they left off, so
/// calling this twice on two halves equals calling it once on the whole.
pub fn apply_masks(out: &mut [u32], streams: &mut [MaskStream]) {
    let mut ks = [0u8; BLOCK_WORDS * 4];
    for block in out.chunks_mut(BLOCK_WORDS) {
        let bytes = &mut ks[..block.len() * 4];
        for stream in streams.iter_mut() {
            bytes.fill(0);
            stream.cipher.apply_keystream(bytes);
            match stream.sign {
                Sign::Add => {
                    for (o, w) in block.iter_mut().zip(bytes.chunks_exact(4)) {
                        *o = o.wrapping_add(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
                    }
                }
                Sign::Subtract => {
                    for (o, w) in block.iter_mut().zip(bytes.chunks_exact(4)) {
                        *o = o.wrapping_sub(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
                    }
                }
            }
        }
    }
    ks.zeroize();
}

/// Raw keystream throughput reference: fills `out` with AES-128-CTR keystream. Used by
/// the benchmark to state masking time as a multiple of the keystream bound.
pub fn keystream(seed: &[u8; 32], out: &mut [u8]) {
    let hk = Hkdf::<Sha256>::new(Some(b"tessera/prg/v1"), seed);
    let mut okm = [0u8; 32];
    hk.expand(b"bench", &mut okm).unwrap_or_else(|_| unreachable!("HKDF output length is valid"));
    let mut c = Aes128Ctr::new((&okm[..16]).into(), (&okm[16..]).into());
    c.apply_keystream(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_then_subtract_cancels() {
        let mut v: Vec<u32> = (0..10_000).collect();
        let orig = v.clone();
        apply_masks(&mut v, &mut [MaskStream::new(&[1; 32], b"x", Sign::Add), MaskStream::new(&[2; 32], b"x", Sign::Add)]);
        assert_ne!(v, orig);
        apply_masks(&mut v, &mut [MaskStream::new(&[2; 32], b"x", Sign::Subtract)]);
        apply_masks(&mut v, &mut [MaskStream::new(&[1; 32], b"x", Sign::Subtract)]);
        assert_eq!(v, orig);
    }

    #[test]
    fn blocking_does_not_change_the_stream() {
        let n = BLOCK_WORDS * 2 + 17;
        let mut whole = vec![0u32; n];
        apply_masks(&mut whole, &mut [MaskStream::new(&[9; 32], b"l", Sign::Add)]);
        let mut bytes = vec![0u8; n * 4];
        let hk = Hkdf::<Sha256>::new(Some(b"tessera/prg/v1"), &[9; 32]);
        let mut okm = [0u8; 32];
        hk.expand(b"l", &mut okm).unwrap();
        Aes128Ctr::new((&okm[..16]).into(), (&okm[16..]).into()).apply_keystream(&mut bytes);
        let direct: Vec<u32> = bytes.chunks_exact(4).map(|w| u32::from_le_bytes(w.try_into().unwrap())).collect();
        assert_eq!(whole, direct);
        // Streams resume where they stopped.
        let mut s = [MaskStream::new(&[9; 32], b"l", Sign::Add)];
        let mut split = vec![0u32; n];
        let (a, b) = split.split_at_mut(1000);
        apply_masks(a, &mut s);
        apply_masks(b, &mut s);
        assert_eq!(split, direct);
    }

    #[test]
    fn labels_separate_streams() {
        let mut a = vec![0u32; 8];
        let mut b = vec![0u32; 8];
        apply_masks(&mut a, &mut [MaskStream::new(&[5; 32], b"self", Sign::Add)]);
        apply_masks(&mut b, &mut [MaskStream::new(&[5; 32], b"pair", Sign::Add)]);
        assert_ne!(a, b);
    }
}
