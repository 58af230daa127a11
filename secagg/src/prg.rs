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

use aes::cipher::{KeyIvInit, StreamCipherCore, StreamCipherSeekCore};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroize;

/// The raw CTR core: it writes whole 16-byte keystream blocks (eight at a time through
/// AES-NI) and seeks to any block, which is what lets every thread generate every stream
/// for its own chunk of the vector.
type Aes128CtrCore = ctr::CtrCore<aes::Aes128, ctr::flavors::Ctr128BE>;
type AesBlock = aes::cipher::Block<Aes128CtrCore>;

/// Whether a stream is added to or subtracted from the vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sign {
    Add,
    Subtract,
}

/// One keystream, from its first word: word `i` of the stream is bytes `4i..4i+4` of
/// AES-128-CTR (128-bit big-endian counter) read as a little-endian `u32`.
#[derive(Clone)]
pub struct MaskStream {
    core: Aes128CtrCore,
    sign: Sign,
}

impl std::fmt::Debug for MaskStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskStream").field("sign", &self.sign).finish_non_exhaustive()
    }
}

fn core_for(seed: &[u8; 32], label: &[u8]) -> Aes128CtrCore {
    let hk = Hkdf::<Sha256>::new(Some(b"tessera/prg/v1"), seed);
    let mut okm = [0u8; 32];
    // 32 bytes is far below HKDF's limit of 255 * 32, so expand cannot fail.
    hk.expand(label, &mut okm).unwrap_or_else(|_| unreachable!("HKDF output length is valid"));
    let core = Aes128CtrCore::new((&okm[..16]).into(), (&okm[16..]).into());
    okm.zeroize();
    core
}

impl MaskStream {
    /// `label` separates the self mask from pairwise masks, so equal seeds in different
    /// roles never give equal streams.
    pub fn new(seed: &[u8; 32], label: &[u8], sign: Sign) -> Self {
        MaskStream { core: core_for(seed, label), sign }
    }
}

/// Words per block: 16 KiB of output plus 16 KiB of keystream stay within L1/L2. Chunk
/// boundaries between threads are multiples of it (so of the 4-word AES block).
const BLOCK_WORDS: usize = 4096;

/// Below this many words per thread, spawning a thread costs more than it saves.
const MIN_WORDS_PER_THREAD: usize = 4 * BLOCK_WORDS;

/// The machine's cores: the default for every parallel mask loop.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(std::num::NonZeroUsize::get).unwrap_or(1)
}

/// Contiguous chunks of `len` words for up to `threads` threads, each boundary a
/// multiple of [`BLOCK_WORDS`]: (first word, length).
fn chunks(len: usize, threads: usize) -> Vec<(usize, usize)> {
    let blocks = len.div_ceil(BLOCK_WORDS);
    let threads = threads.max(1).min(len.div_ceil(MIN_WORDS_PER_THREAD)).clamp(1, blocks.max(1));
    let per = blocks.div_ceil(threads);
    (0..threads)
        .map(|t| {
            let start = (t * per * BLOCK_WORDS).min(len);
            let end = ((t + 1) * per * BLOCK_WORDS).min(len);
            (start, end - start)
        })
        .filter(|&(_, n)| n > 0)
        .collect()
}

/// Adds or subtracts every stream's keystream into `out` (mod 2^32): `out[i] ±= word i`
/// of each stream. The vector is split into `threads` chunks (boundaries on whole AES
/// blocks), and each thread generates every stream for its own chunk after seeking to
/// it, so the result is the same for any thread count.
pub fn apply_masks(out: &mut [u32], streams: &[MaskStream], threads: usize) {
    let parts = chunks(out.len(), threads);
    if parts.len() <= 1 {
        apply_chunk(out, 0, streams);
        return;
    }
    std::thread::scope(|scope| {
        let mut rest = out;
        for &(start, len) in &parts {
            let (mine, tail) = rest.split_at_mut(len);
            rest = tail;
            scope.spawn(move || apply_chunk(mine, start, streams));
        }
    });
}

/// [`apply_masks`] on the words `first..first + out.len()` of the streams.
fn apply_chunk(out: &mut [u32], first: usize, streams: &[MaskStream]) {
    debug_assert!(first.is_multiple_of(4), "chunks start on an AES block");
    let mut ks = [AesBlock::default(); BLOCK_WORDS / 4];
    let mut cores: Vec<(Aes128CtrCore, Sign)> = streams
        .iter()
        .map(|s| {
            let mut core = s.core.clone();
            core.set_block_pos((first / 4) as u128);
            (core, s.sign)
        })
        .collect();
    for block in out.chunks_mut(BLOCK_WORDS) {
        let nblocks = block.len().div_ceil(4);
        for (core, sign) in cores.iter_mut() {
            core.write_keystream_blocks(&mut ks[..nblocks]);
            match sign {
                Sign::Add => fold(block, &ks, u32::wrapping_add),
                Sign::Subtract => fold(block, &ks, u32::wrapping_sub),
            }
        }
    }
    for b in ks.iter_mut() {
        b.as_mut_slice().zeroize();
    }
}

/// `block[i] = op(block[i], keystream word i)`, one AES block (four words) at a time so
/// the loop vectorises; a last partial block uses its first words.
#[inline(always)]
fn fold(block: &mut [u32], ks: &[AesBlock], op: impl Fn(u32, u32) -> u32) {
    let word = |b: &AesBlock, j: usize| u32::from_le_bytes([b[4 * j], b[4 * j + 1], b[4 * j + 2], b[4 * j + 3]]);
    let (full, tail) = block.split_at_mut(block.len() / 4 * 4);
    for (o4, b) in full.chunks_exact_mut(4).zip(ks) {
        for (j, o) in o4.iter_mut().enumerate() {
            *o = op(*o, word(b, j));
        }
    }
    if let Some(b) = ks.get(full.len() / 4) {
        for (j, o) in tail.iter_mut().enumerate() {
            *o = op(*o, word(b, j));
        }
    }
}

/// Raw keystream throughput reference: fills `out` with AES-128-CTR keystream. Used by
/// the benchmark to state masking time as a multiple of the keystream bound.
pub fn keystream(seed: &[u8; 32], out: &mut [u8]) {
    use aes::cipher::StreamCipher;
    let mut c = aes::cipher::StreamCipherCoreWrapper::from_core(core_for(seed, b"bench"));
    c.apply_keystream(out);
}

/// The all-cores bound, as `openssl speed` measures AES: `seeds.len()` keystreams of
/// `len` bytes (whole 16-byte blocks), each thread generating every stream for its share
/// of the positions into a 16 KiB buffer that stays in L1, with no other work. Returns
/// the XOR of every keystream block, so nothing can be optimised away (and a test can
/// check the blocks are the streams').
pub fn keystream_bound(seeds: &[[u8; 32]], len: usize, threads: usize) -> [u8; 16] {
    let words = len / 16 * 4;
    let parts = chunks(words, threads);
    let xor = |a: [u8; 16], b: &[u8]| -> [u8; 16] { std::array::from_fn(|i| a[i] ^ b[i]) };
    std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .iter()
            .map(|&(start, n)| {
                scope.spawn(move || {
                    let mut acc = [0u8; 16];
                    let mut ks = [AesBlock::default(); BLOCK_WORDS / 4];
                    for seed in seeds {
                        let mut core = core_for(seed, b"bench");
                        core.set_block_pos((start / 4) as u128);
                        let mut left = n / 4;
                        while left > 0 {
                            let take = left.min(ks.len());
                            core.write_keystream_blocks(&mut ks[..take]);
                            acc = ks[..take].iter().fold(acc, |a, b| xor(a, b));
                            left -= take;
                        }
                    }
                    acc
                })
            })
            .collect();
        handles.into_iter().fold([0u8; 16], |a, h| xor(a, &h.join().unwrap_or_default()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::StreamCipher;
    use proptest::prelude::*;

    /// The reference: the stream as the CTR wrapper produces it over the whole vector,
    /// which is what every earlier version of this module applied.
    fn reference(out: &mut [u32], seeds: &[([u8; 32], Sign)], label: &[u8]) {
        for (seed, sign) in seeds {
            let mut bytes = vec![0u8; out.len() * 4];
            aes::cipher::StreamCipherCoreWrapper::from_core(core_for(seed, label)).apply_keystream(&mut bytes);
            for (o, w) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                let w = u32::from_le_bytes(w.try_into().unwrap());
                *o = match sign {
                    Sign::Add => o.wrapping_add(w),
                    Sign::Subtract => o.wrapping_sub(w),
                };
            }
        }
    }

    fn streams(seeds: &[([u8; 32], Sign)], label: &[u8]) -> Vec<MaskStream> {
        seeds.iter().map(|(s, sign)| MaskStream::new(s, label, *sign)).collect()
    }

    #[test]
    fn add_then_subtract_cancels() {
        let mut v: Vec<u32> = (0..10_000).collect();
        let orig = v.clone();
        apply_masks(&mut v, &[MaskStream::new(&[1; 32], b"x", Sign::Add), MaskStream::new(&[2; 32], b"x", Sign::Add)], 2);
        assert_ne!(v, orig);
        apply_masks(&mut v, &[MaskStream::new(&[2; 32], b"x", Sign::Subtract)], 1);
        apply_masks(&mut v, &[MaskStream::new(&[1; 32], b"x", Sign::Subtract)], 3);
        assert_eq!(v, orig);
    }

    /// The mask words are bit for bit what they were: a known answer for the SHA-256 of
    /// the first 10,007 words of one stream.
    #[test]
    fn the_stream_is_unchanged() {
        let mut v = vec![0u32; 10_007];
        apply_masks(&mut v, &[MaskStream::new(&[9; 32], b"l", Sign::Add)], 4);
        let mut h = <sha2::Sha256 as sha2::Digest>::new();
        for w in &v {
            sha2::Digest::update(&mut h, w.to_le_bytes());
        }
        assert_eq!(hex::encode(sha2::Digest::finalize(h)), KNOWN_ANSWER);
    }

    /// Computed apart from this crate, with Python's `cryptography`: HKDF-SHA256 (salt
    /// `tessera/prg/v1`, info `l`) of the seed, then AES-128-CTR keyed by its first 16
    /// bytes with its last 16 as the initial counter block, over 10,007 · 4 zero bytes.
    const KNOWN_ANSWER: &str = "0261ec0fd583ffb02be844b6883e7b65ef9adde1c931d60e8057095a34ebaf9a";

    #[test]
    fn chunks_cover_the_vector_on_block_boundaries() {
        for len in [0usize, 1, 4095, 4096, 4097, 16_384, 100_001, 1 << 20] {
            for threads in 1..=9 {
                let parts = chunks(len, threads);
                assert!(parts.len() <= threads.max(1));
                let mut next = 0;
                for (start, n) in parts {
                    assert_eq!(start, next);
                    assert!(start.is_multiple_of(BLOCK_WORDS) && n > 0);
                    next += n;
                }
                assert_eq!(next, len, "len {len}, {threads} threads");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        /// Any length (not a multiple of the AES block, the 16 KiB block or the chunk),
        /// any thread count, any mix of signs: the reference's words exactly.
        #[test]
        fn parallel_masks_equal_the_reference(len in 0usize..70_000, threads in 1usize..9, signs in proptest::collection::vec(any::<bool>(), 1..6), base in any::<u32>()) {
            let seeds: Vec<([u8; 32], Sign)> = signs.iter().enumerate().map(|(i, &add)| ([i as u8 + 1; 32], if add { Sign::Add } else { Sign::Subtract })).collect();
            let start: Vec<u32> = (0..len as u32).map(|i| i.wrapping_mul(base)).collect();
            let mut want = start.clone();
            reference(&mut want, &seeds, b"p");
            let mut got = start;
            apply_masks(&mut got, &streams(&seeds, b"p"), threads);
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn labels_separate_streams() {
        let mut a = vec![0u32; 8];
        let mut b = vec![0u32; 8];
        apply_masks(&mut a, &[MaskStream::new(&[5; 32], b"self", Sign::Add)], 1);
        apply_masks(&mut b, &[MaskStream::new(&[5; 32], b"pair", Sign::Add)], 1);
        assert_ne!(a, b);
    }

    #[test]
    fn the_bound_generates_the_keystream() {
        let seeds = [[3u8; 32], [4u8; 32]];
        let mut want = [0u8; 16];
        for seed in &seeds {
            let mut one = vec![0u8; 200_000];
            keystream(seed, &mut one);
            for b in one.chunks_exact(16) {
                for (w, x) in want.iter_mut().zip(b) {
                    *w ^= x;
                }
            }
        }
        for threads in 1..=3 {
            assert_eq!(keystream_bound(&seeds, 200_000, threads), want, "{threads} threads");
        }
    }
}
