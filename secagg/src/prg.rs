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

#[cfg(target_arch = "x86_64")]
mod vaes;

/// The `aes` crate's CTR core: it writes whole 16-byte keystream blocks (eight at a time
/// through AES-NI, or with the ARMv8 instructions, or in constant-time software) and
/// seeks to any block, which is what lets every thread generate every stream for its
/// own chunk of the vector.
type Aes128CtrCore = ctr::CtrCore<aes::Aes128, ctr::flavors::Ctr128BE>;
type AesBlock = aes::Block;

/// Which code generates the keystream. Both give the same bytes; [`Kernel::best`] is
/// what masking uses, and the benchmark compares the two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// VAES on 512-bit registers (x86-64 with VAES, AVX-512F and AVX-512BW): four AES
    /// blocks per instruction, 64 in flight.
    Vaes512,
    /// The `aes` crate: AES-NI eight blocks at a time on x86-64, ARMv8 crypto
    /// extensions on ARM, constant-time software elsewhere.
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn best() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if vaes::available() {
            return Kernel::Vaes512;
        }
        Kernel::Portable
    }

    /// Whether this CPU runs the kernel.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Vaes512 => vaes::available(),
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Vaes512 => false,
            Kernel::Portable => true,
        }
    }
}

/// One AES-128-CTR keystream (the counter is the whole 16-byte block, big-endian), from
/// any block on.
#[derive(Clone)]
struct Ctr {
    portable: Aes128CtrCore,
    #[cfg(target_arch = "x86_64")]
    vaes: Option<vaes::RoundKeys>,
    /// The initial counter block, and the block the next write starts at.
    iv: u128,
    pos: u128,
}

impl Ctr {
    fn new(key: &[u8; 16], iv: &[u8; 16], kernel: Kernel) -> Self {
        #[cfg(not(target_arch = "x86_64"))]
        let _ = kernel;
        Ctr {
            portable: Aes128CtrCore::new(key.into(), iv.into()),
            #[cfg(target_arch = "x86_64")]
            vaes: if kernel == Kernel::Vaes512 { vaes::RoundKeys::new(key) } else { None },
            iv: u128::from_be_bytes(*iv),
            pos: 0,
        }
    }

    fn set_block_pos(&mut self, pos: u128) {
        self.pos = pos;
        self.portable.set_block_pos(pos);
    }

    /// `out[i] ±= word i` of the keystream from the current block on, consuming
    /// `⌈out.len() / 4⌉` blocks; `ks` is scratch space for the portable kernel (at least
    /// that many blocks).
    fn apply_words(&mut self, out: &mut [u32], sign: Sign, ks: &mut [AesBlock]) {
        let nblocks = out.len().div_ceil(4);
        #[cfg(target_arch = "x86_64")]
        if let Some(keys) = &self.vaes {
            keys.apply_words(self.iv.wrapping_add(self.pos), out, sign == Sign::Subtract);
            self.set_block_pos(self.pos.wrapping_add(nblocks as u128));
            return;
        }
        let ks = &mut ks[..nblocks];
        self.write_keystream_blocks(ks);
        match sign {
            Sign::Add => fold(out, ks, u32::wrapping_add),
            Sign::Subtract => fold(out, ks, u32::wrapping_sub),
        }
    }

    /// The XOR of the next `nblocks` keystream blocks, as a little-endian u128; `ks` is
    /// scratch space for the portable kernel.
    fn xor_blocks(&mut self, nblocks: usize, ks: &mut [AesBlock]) -> u128 {
        #[cfg(target_arch = "x86_64")]
        if let Some(keys) = &self.vaes {
            let x = keys.xor_blocks(self.iv.wrapping_add(self.pos), nblocks);
            self.set_block_pos(self.pos.wrapping_add(nblocks as u128));
            return x;
        }
        let mut acc = 0u128;
        let mut left = nblocks;
        while left > 0 {
            let take = left.min(ks.len());
            self.write_keystream_blocks(&mut ks[..take]);
            // XOR as 128-bit words, which vectorises.
            acc = ks[..take].iter().fold(acc, |a, b| a ^ u128::from_le_bytes((*b).into()));
            left -= take;
        }
        acc
    }

    fn write_keystream_blocks(&mut self, out: &mut [AesBlock]) {
        #[cfg(target_arch = "x86_64")]
        if let Some(keys) = &self.vaes {
            keys.write_blocks(self.iv.wrapping_add(self.pos), out);
            self.set_block_pos(self.pos.wrapping_add(out.len() as u128));
            return;
        }
        self.portable.write_keystream_blocks(out);
        self.pos = self.pos.wrapping_add(out.len() as u128);
    }
}

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
    core: Ctr,
    sign: Sign,
}

impl std::fmt::Debug for MaskStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskStream").field("sign", &self.sign).finish_non_exhaustive()
    }
}

/// HKDF-SHA256 of the seed (salt `tessera/prg/v1`, info `label`): the AES key and the
/// initial counter block.
fn key_and_iv(seed: &[u8; 32], label: &[u8]) -> zeroize::Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(b"tessera/prg/v1"), seed);
    let mut okm = zeroize::Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF's limit of 255 * 32, so expand cannot fail.
    hk.expand(label, okm.as_mut()).unwrap_or_else(|_| unreachable!("HKDF output length is valid"));
    okm
}

fn core_for(seed: &[u8; 32], label: &[u8], kernel: Kernel) -> Ctr {
    let okm = key_and_iv(seed, label);
    let (key, iv) = okm.split_at(16);
    let (Ok(key), Ok(iv)) = (<&[u8; 16]>::try_from(key), <&[u8; 16]>::try_from(iv)) else { unreachable!("32 bytes split at 16") };
    Ctr::new(key, iv, kernel)
}

impl MaskStream {
    /// `label` separates the self mask from pairwise masks, so equal seeds in different
    /// roles never give equal streams.
    pub fn new(seed: &[u8; 32], label: &[u8], sign: Sign) -> Self {
        Self::with_kernel(seed, label, sign, Kernel::best())
    }

    /// [`MaskStream::new`] generated by a given kernel (the benchmark compares them;
    /// one the CPU cannot run falls back to [`Kernel::Portable`]).
    pub fn with_kernel(seed: &[u8; 32], label: &[u8], sign: Sign, kernel: Kernel) -> Self {
        MaskStream { core: core_for(seed, label, kernel), sign }
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

/// `items.iter().map(f)` on up to `threads` threads, in order; one thread below eight
/// items, where spawning costs more than it saves.
pub(crate) fn par_map<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = threads.clamp(1, items.len().max(1));
    if threads == 1 || items.len() < 8 {
        return items.iter().map(f).collect();
    }
    let per = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = items.chunks(per).map(|part| scope.spawn(|| part.iter().map(&f).collect::<Vec<R>>())).collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    })
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
    let mut cores: Vec<(Ctr, Sign)> = streams
        .iter()
        .map(|s| {
            let mut core = s.core.clone();
            core.set_block_pos((first / 4) as u128);
            (core, s.sign)
        })
        .collect();
    for block in out.chunks_mut(BLOCK_WORDS) {
        for (core, sign) in cores.iter_mut() {
            core.apply_words(block, *sign, &mut ks);
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

/// The reference stream: fills `out` with the AES-128-CTR keystream of the `ctr` and
/// `aes` crates' stream cipher (what every version of this module has applied), which
/// the kernels are tested against; the benchmark reports its speed beside them.
pub fn keystream(seed: &[u8; 32], out: &mut [u8]) {
    use aes::cipher::StreamCipher;
    let okm = key_and_iv(seed, b"bench");
    let mut c = ctr::Ctr128BE::<aes::Aes128>::new(okm[..16].into(), okm[16..].into());
    c.apply_keystream(out);
}

/// The all-cores bound: `seeds.len()` keystreams of `len` bytes (whole 16-byte blocks),
/// each thread generating every stream for its share of the positions, with no other
/// work. The VAES kernel XORs the blocks together in a register as they leave the AES
/// unit (nothing is stored, so this is what the AES units can do); the portable kernel
/// writes them into a 16 KiB buffer that stays in L1, as `openssl speed` encrypts a
/// buffer. Returns the XOR of every keystream block, so nothing can be optimised away
/// (and a test can check the blocks are the streams').
pub fn keystream_bound(seeds: &[[u8; 32]], len: usize, threads: usize) -> [u8; 16] {
    keystream_bound_with(seeds, len, threads, Kernel::best())
}

/// [`keystream_bound`] with a given kernel.
pub fn keystream_bound_with(seeds: &[[u8; 32]], len: usize, threads: usize, kernel: Kernel) -> [u8; 16] {
    let words = len / 16 * 4;
    let parts = chunks(words, threads);
    let total = std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .iter()
            .map(|&(start, n)| {
                scope.spawn(move || {
                    let mut ks = [AesBlock::default(); BLOCK_WORDS / 4];
                    seeds.iter().fold(0u128, |acc, seed| {
                        let mut core = core_for(seed, b"bench", kernel);
                        core.set_block_pos((start / 4) as u128);
                        acc ^ core.xor_blocks(n / 4, &mut ks)
                    })
                })
            })
            .collect();
        handles.into_iter().fold(0u128, |a, h| a ^ h.join().unwrap_or_default())
    });
    total.to_le_bytes()
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
            let okm = key_and_iv(seed, label);
            ctr::Ctr128BE::<aes::Aes128>::new(okm[..16].into(), okm[16..].into()).apply_keystream(&mut bytes);
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

    /// Both kernels' blocks, from `pos` on, for `n` blocks of the stream with this IV.
    fn kernel_blocks(key: &[u8; 16], iv: &[u8; 16], kernel: Kernel, pos: u128, n: usize) -> Vec<AesBlock> {
        let mut c = Ctr::new(key, iv, kernel);
        c.set_block_pos(pos);
        let mut out = vec![AesBlock::default(); n];
        // In two writes of uneven length, so a write that ends mid-group is followed by one.
        let (a, b) = out.split_at_mut(n / 3);
        c.write_keystream_blocks(a);
        c.write_keystream_blocks(b);
        out
    }

    /// The `ctr` crate's blocks from `pos` on: the reference.
    fn reference_blocks(key: &[u8; 16], iv: &[u8; 16], pos: u128, n: usize) -> Vec<AesBlock> {
        let mut c = Aes128CtrCore::new(key.into(), iv.into());
        c.set_block_pos(pos);
        let mut out = vec![AesBlock::default(); n];
        c.write_keystream_blocks(&mut out);
        out
    }

    /// Every kernel this CPU runs gives the reference's blocks: from every offset within
    /// a 64-block group, for lengths around the group, and where the counter's low 64
    /// bits carry into the high ones or the whole 128-bit counter wraps to zero inside a
    /// write.
    #[test]
    fn every_kernel_gives_the_reference_blocks() {
        let key = [0x2bu8; 16];
        let ivs: [[u8; 16]; 4] = [[7; 16], (u128::from(u64::MAX) - 40).to_be_bytes(), (u128::MAX - 50).to_be_bytes(), (u128::MAX - 3).to_be_bytes()];
        for kernel in [Kernel::Vaes512, Kernel::Portable] {
            if !kernel.available() {
                eprintln!("{kernel:?} does not run on this CPU; not tested");
                continue;
            }
            for iv in &ivs {
                for pos in 0u128..70 {
                    for n in [1usize, 5, 31, 32, 33, 63, 64, 65, 100, 129, 257] {
                        assert_eq!(
                            kernel_blocks(&key, iv, kernel, pos, n),
                            reference_blocks(&key, iv, pos, n),
                            "{kernel:?}, iv {iv:02x?}, pos {pos}, {n} blocks"
                        );
                    }
                    // The fused add and subtract, then a second call that starts where
                    // the first left off (after a partial block, the next whole one).
                    for words in [1usize, 3, 4, 5, 255, 256, 257, 1000] {
                        let blocks = words.div_ceil(4);
                        let reference = reference_blocks(&key, iv, pos, 2 * blocks);
                        let word = |i: usize| u32::from_le_bytes(reference[i / 4][4 * (i % 4)..4 * (i % 4) + 4].try_into().expect("4 bytes"));
                        let mut c = Ctr::new(&key, iv, kernel);
                        c.set_block_pos(pos);
                        let mut ks = [AesBlock::default(); BLOCK_WORDS / 4];
                        let mut first = vec![100u32; words];
                        c.apply_words(&mut first, Sign::Add, &mut ks);
                        let mut second = vec![100u32; words];
                        c.apply_words(&mut second, Sign::Subtract, &mut ks);
                        for i in 0..words {
                            assert_eq!(first[i], 100u32.wrapping_add(word(i)), "{kernel:?}, pos {pos}, {words} words, word {i}");
                            assert_eq!(second[i], 100u32.wrapping_sub(word(4 * blocks + i)), "{kernel:?}, pos {pos}, {words} words, second call, word {i}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn masks_are_the_same_with_either_kernel() {
        let seeds = [[11u8; 32], [12u8; 32], [13u8; 32]];
        let make = |kernel: Kernel| -> Vec<MaskStream> { seeds.iter().map(|s| MaskStream::with_kernel(s, b"k", Sign::Add, kernel)).collect() };
        let mut portable = vec![5u32; 50_003];
        apply_masks(&mut portable, &make(Kernel::Portable), 2);
        let mut best = vec![5u32; 50_003];
        apply_masks(&mut best, &make(Kernel::best()), 3);
        assert_eq!(best, portable);
        for kernel in [Kernel::Vaes512, Kernel::Portable] {
            assert_eq!(keystream_bound_with(&seeds, 80_000, 2, kernel), keystream_bound_with(&seeds, 80_000, 1, Kernel::Portable), "{kernel:?}");
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
