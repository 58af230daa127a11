//! AES-128-CTR keystream through VAES on 512-bit registers (AVX-512), 64 blocks at a time.
//!
//! The `aes` crate encrypts eight 128-bit blocks at a time with AES-NI; a core with VAES
//! runs one `vaesenc` on four blocks in the same time, which is how OpenSSL reaches its
//! figure on these machines. This kernel is the minimum that closes the gap: the AES-128
//! key schedule (AES-NI `aeskeygenassist`), counter blocks built in vector registers, and
//! ten rounds over sixteen registers, interleaved so the AES unit never waits on a
//! latency. (Eight registers ran at 0.95× OpenSSL's AES-NI code on a Xeon with VAES;
//! sixteen at 1.5×; 24, which spill the round keys, no faster.)
//! It produces the same bytes as `ctr::Ctr128BE<aes::Aes128>` (the counter is the whole
//! 16-byte block, big-endian, wrapping); `super::tests` checks it against that crate
//! at every alignment, across a 64-bit carry and across the 128-bit wrap.
//!
//! It is used only where [`available`] says the CPU has VAES, AVX-512F and AVX-512BW.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// Blocks per iteration: sixteen registers of four blocks (with the eleven round keys
/// and two constants, 29 of the 32 vector registers).
const REGS: usize = 16;
const GROUP: usize = 4 * REGS;

/// Whether this CPU runs the kernel. `is_x86_feature_detected!` caches its answer, so
/// this is a load and a test after the first call.
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("vaes")
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("aes")
}

/// The expanded key. Round keys are secret: zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub(super) struct RoundKeys([[u8; 16]; 11]);

impl RoundKeys {
    /// Expands `key`; `None` where the CPU lacks the kernel's features.
    pub(super) fn new(key: &[u8; 16]) -> Option<Self> {
        if !available() {
            return None;
        }
        // SAFETY: `available()` checked that the CPU has AES-NI.
        Some(unsafe { expand(key) })
    }

    /// Adds (or, with `subtract`, subtracts) the keystream from counter `counter` on into
    /// `out` word by word (word i is bytes 4i..4i+4 of the stream, little-endian), mod
    /// 2^32, without writing the keystream anywhere: each register of four blocks is
    /// added to sixteen words as it leaves the AES unit. Consumes `⌈out.len() / 4⌉`
    /// blocks.
    pub(super) fn apply_words(&self, counter: u128, out: &mut [u32], subtract: bool) {
        // SAFETY: a `RoundKeys` exists only where `available()` held (see `new`).
        unsafe {
            if subtract {
                apply::<true>(self, counter, out)
            } else {
                apply::<false>(self, counter, out)
            }
        }
    }

    /// The XOR of `nblocks` keystream blocks from counter `counter` on, accumulated in a
    /// register and never stored: the keystream bound, all the AES units can do.
    pub(super) fn xor_blocks(&self, counter: u128, nblocks: usize) -> u128 {
        // SAFETY: a `RoundKeys` exists only where `available()` held (see `new`).
        unsafe { xor_fold(self, counter, nblocks) }
    }
}

#[target_feature(enable = "avx512f,avx512bw,vaes,aes")]
fn xor_fold(rk: &RoundKeys, counter: u128, nblocks: usize) -> u128 {
    let (keys, bswap, four) = constants(rk);
    let mut ctr = counter;
    let mut acc = _mm512_setzero_si512();
    for _ in 0..nblocks / GROUP {
        for v in encrypt(&keys, counter_blocks(ctr, bswap, four)) {
            acc = _mm512_xor_si512(acc, v);
        }
        ctr = ctr.wrapping_add(GROUP as u128);
    }
    let mut lanes = [0u128; 4];
    // SAFETY: 64 bytes into a 64-byte array.
    unsafe { _mm512_storeu_si512(lanes.as_mut_ptr().cast(), acc) };
    let mut total = lanes.iter().fold(0u128, |a, l| a ^ l);
    let rest = nblocks % GROUP;
    if rest > 0 {
        let mut buf = [0u128; GROUP];
        for (j, v) in encrypt(&keys, counter_blocks(ctr, bswap, four)).iter().enumerate() {
            // SAFETY: 64 bytes into elements 4j..4j+4 of a GROUP-element buffer.
            unsafe { _mm512_storeu_si512(buf[4 * j..].as_mut_ptr().cast(), *v) };
        }
        total = buf[..rest].iter().fold(total, |a, b| a ^ b);
    }
    total
}

#[target_feature(enable = "avx512f,avx512bw,vaes,aes")]
fn apply<const SUBTRACT: bool>(rk: &RoundKeys, counter: u128, out: &mut [u32]) {
    let (keys, bswap, four) = constants(rk);
    let mut ctr = counter;
    // Four words per block, sixteen per register.
    let mut groups = out.chunks_exact_mut(4 * GROUP);
    for group in &mut groups {
        let x = encrypt(&keys, counter_blocks(ctr, bswap, four));
        for (j, v) in x.iter().enumerate() {
            let p = group[16 * j..].as_mut_ptr();
            // SAFETY: `group` holds 4·GROUP words; register j covers words 16j..16j+16.
            unsafe {
                let o = _mm512_loadu_si512(p.cast());
                let r = if SUBTRACT { _mm512_sub_epi32(o, *v) } else { _mm512_add_epi32(o, *v) };
                _mm512_storeu_si512(p.cast(), r);
            }
        }
        ctr = ctr.wrapping_add(GROUP as u128);
    }
    let tail = groups.into_remainder();
    if !tail.is_empty() {
        let x = encrypt(&keys, counter_blocks(ctr, bswap, four));
        let mut buf = [0u32; 4 * GROUP];
        for (j, v) in x.iter().enumerate() {
            // SAFETY: 64 bytes into words 16j..16j+16 of a 4·GROUP-word buffer.
            unsafe { _mm512_storeu_si512(buf[16 * j..].as_mut_ptr().cast(), *v) };
        }
        for (o, k) in tail.iter_mut().zip(&buf) {
            // The buffer's words are the stream's little-endian words on this
            // (little-endian) architecture.
            *o = if SUBTRACT { o.wrapping_sub(*k) } else { o.wrapping_add(*k) };
        }
        buf.zeroize();
    }
}

/// The AES-128 key schedule (FIPS 197, 5.2) with AES-NI.
#[target_feature(enable = "aes,sse2")]
fn expand(key: &[u8; 16]) -> RoundKeys {
    let mut rk = [[0u8; 16]; 11];
    // SAFETY: unaligned loads and stores of 16 bytes from and to 16-byte arrays.
    let mut k = unsafe { _mm_loadu_si128(key.as_ptr().cast()) };
    let mut keys = [k; 11];
    macro_rules! round {
        ($i:expr, $rcon:expr) => {
            k = next(k, _mm_aeskeygenassist_si128::<$rcon>(k));
            keys[$i] = k;
        };
    }
    round!(1, 0x01);
    round!(2, 0x02);
    round!(3, 0x04);
    round!(4, 0x08);
    round!(5, 0x10);
    round!(6, 0x20);
    round!(7, 0x40);
    round!(8, 0x80);
    round!(9, 0x1b);
    round!(10, 0x36);
    for (dst, src) in rk.iter_mut().zip(&keys) {
        // SAFETY: as above.
        unsafe { _mm_storeu_si128(dst.as_mut_ptr().cast(), *src) };
    }
    let keys = RoundKeys(rk);
    rk.zeroize();
    keys
}

/// One step of the schedule: the previous round key and `aeskeygenassist` of it.
#[target_feature(enable = "sse2")]
fn next(k: __m128i, assist: __m128i) -> __m128i {
    let t = _mm_shuffle_epi32::<0xff>(assist);
    let mut k = k;
    k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    _mm_xor_si128(k, t)
}

/// The round keys, each broadcast to the four lanes of a register; the shuffle that
/// reverses the bytes of each 128-bit lane (a little-endian u128 becomes the big-endian
/// counter block); and the counter step of one register, 4 in each lane.
#[target_feature(enable = "avx512f,avx512bw")]
fn constants(rk: &RoundKeys) -> ([__m512i; 11], __m512i, __m512i) {
    // SAFETY: 16-byte unaligned loads from the round keys.
    let keys: [__m512i; 11] = std::array::from_fn(|i| _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(rk.0[i].as_ptr().cast()) }));
    let bswap = _mm512_broadcast_i32x4(_mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    let four = _mm512_set_epi64(0, 4, 0, 4, 0, 4, 0, 4);
    (keys, bswap, four)
}

/// Encrypts sixteen registers of counter blocks with the expanded keys.
#[target_feature(enable = "avx512f,avx512bw,vaes")]
fn encrypt(keys: &[__m512i; 11], mut x: [__m512i; REGS]) -> [__m512i; REGS] {
    for v in x.iter_mut() {
        *v = _mm512_xor_si512(*v, keys[0]);
    }
    for key in &keys[1..10] {
        for v in x.iter_mut() {
            *v = _mm512_aesenc_epi128(*v, *key);
        }
    }
    for v in x.iter_mut() {
        *v = _mm512_aesenclast_epi128(*v, keys[10]);
    }
    x
}

/// The 64 big-endian counter blocks `ctr`, …, `ctr + 63` (mod 2^128) in sixteen registers.
/// Counters are kept as little-endian u128 lanes and added on the low 64 bits, which is
/// exact unless the low half carries within the group; that case (one group in 2^59 for a
/// random start) is built block by block.
#[target_feature(enable = "avx512f,avx512bw")]
fn counter_blocks(ctr: u128, bswap: __m512i, four: __m512i) -> [__m512i; REGS] {
    let lo = ctr as u64;
    if lo.checked_add(GROUP as u64 - 1).is_some() {
        let hi = (ctr >> 64) as u64 as i64;
        let l = |d: u64| (lo + d) as i64;
        let mut c = _mm512_set_epi64(hi, l(3), hi, l(2), hi, l(1), hi, l(0));
        let mut x = [c; REGS];
        for v in x.iter_mut() {
            *v = _mm512_shuffle_epi8(c, bswap);
            c = _mm512_add_epi64(c, four);
        }
        x
    } else {
        let blocks: [[u8; 16]; GROUP] = std::array::from_fn(|j| ctr.wrapping_add(j as u128).to_be_bytes());
        // SAFETY: each load reads 64 bytes inside the local array of GROUP blocks.
        std::array::from_fn(|j| unsafe { _mm512_loadu_si512(blocks[4 * j..].as_ptr().cast()) })
    }
}
