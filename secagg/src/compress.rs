//! Compression that survives masking: linear encodings applied to every institution's
//! update before quantization, with the same public parameters for all, and undone on the
//! released sum.
//!
//! Top-k sparsification does not work under secure aggregation: each institution's index
//! set would leak, and the masks are dense anyway. What does work is linear and shared:
//!
//! - **Shared random-k** ([`Compression::keep`]): the round's public seed selects the same
//!   `k` of the `m` coordinates for every institution; only those are quantized, masked and
//!   sent. The released mean is zero elsewhere, and each institution keeps what it did not
//!   send as an error-feedback residual ([`Encoding::residual`]) for the next round.
//! - **Randomized Hadamard rotation** ([`Compression::rotation_block`]): the (selected)
//!   vector is cut into blocks of `B` coordinates (the last one padded with zeros to the
//!   next power of two), each coordinate's sign is flipped by a public random bit, and each
//!   block goes through the orthonormal Walsh–Hadamard transform `H/√B`. A rotated update
//!   has its energy spread evenly, so a small clip range and few bits per coordinate
//!   (`modulus_bits`, which sets the packed width on the wire) lose little. The transform
//!   is its own inverse up to the signs, so the aggregate is rotated back exactly up to
//!   quantization. This is the rotation of TFF's distributed-DP pipeline
//!   (`DistributedDpSumFactory`), blockwise so padding costs at most one block.
//!
//! Both are linear, so the sum of encoded inputs is the encoding of their sum and masking
//! is unaffected. The public randomness is AES-128-CTR ([`crate::prg`]) keyed by
//! `SHA-256("tessera/compression/v1" ‖ label ‖ graph_seed ‖ round)`: every party derives it
//! from the signed round configuration, whose digest binds the scheme.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::RoundConfig;
use crate::error::Error;
use crate::prg::{apply_masks, MaskStream, Sign};

/// Largest rotation block: 2^20 coordinates.
pub const MAX_ROTATION_BLOCK: u32 = 1 << 20;

/// The encoding a round applies before quantization. Absent fields are off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compression {
    /// Shared random-k: how many of the `vector_len` coordinates are sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<u32>,
    /// Randomized Hadamard rotation in blocks of this many coordinates (a power of two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_block: Option<u32>,
}

impl Compression {
    pub fn validate(&self, vector_len: u32) -> Result<(), Error> {
        if let Some(k) = self.keep {
            if k == 0 || k > vector_len {
                return Err(Error::Config(format!("compression.keep must be in 1..={vector_len} (vector_len), got {k}")));
            }
        }
        if let Some(b) = self.rotation_block {
            if !(2..=MAX_ROTATION_BLOCK).contains(&b) || !b.is_power_of_two() {
                return Err(Error::Config(format!("compression.rotation_block must be a power of two in 2..={MAX_ROTATION_BLOCK}, got {b}")));
            }
        }
        if self.keep.is_none() && self.rotation_block.is_none() {
            return Err(Error::Config("compression names neither keep nor rotation_block; leave it out for none".into()));
        }
        Ok(())
    }

    /// A short description for logs and reports, e.g. `random-k 10000 of 184320, Hadamard blocks of 4096`.
    pub fn describe(&self, vector_len: u32) -> String {
        let mut parts = Vec::new();
        if let Some(k) = self.keep {
            parts.push(format!("random-k {k} of {vector_len}"));
        }
        if let Some(b) = self.rotation_block {
            parts.push(format!("Hadamard rotation in blocks of {b}"));
        }
        parts.join(", ")
    }
}

/// Lengths of the rotation blocks of `len` coordinates with block size `block`: full blocks,
/// then the remainder padded up to the next power of two.
fn block_sizes(len: usize, block: usize) -> Vec<usize> {
    let mut sizes = vec![block; len / block];
    let rest = len % block;
    if rest > 0 {
        sizes.push(rest.next_power_of_two());
    }
    sizes
}

/// The number of elements a round's encoded update has (before the weight is appended).
pub fn encoded_len(vector_len: u32, compression: Option<&Compression>) -> usize {
    let Some(c) = compression else { return vector_len as usize };
    let selected = c.keep.unwrap_or(vector_len) as usize;
    match c.rotation_block {
        Some(b) => block_sizes(selected, b as usize).iter().sum(),
        None => selected,
    }
}

fn public_seed(cfg: &RoundConfig, label: &[u8]) -> Result<[u8; 32], Error> {
    let mut h = Sha256::new();
    h.update(b"tessera/compression/v1");
    h.update((label.len() as u32).to_le_bytes());
    h.update(label);
    h.update(cfg.graph_seed_bytes()?);
    h.update(cfg.round.to_le_bytes());
    Ok(h.finalize().into())
}

/// `count` public keystream words for `label`.
fn public_words(cfg: &RoundConfig, label: &[u8], count: usize) -> Result<Vec<u32>, Error> {
    let seed = public_seed(cfg, label)?;
    let mut words = vec![0u32; count];
    apply_masks(&mut words, &[MaskStream::new(&seed, b"tessera/compression/stream", Sign::Add)], crate::prg::default_threads());
    Ok(words)
}

/// The coordinates shared random-k keeps: a uniformly random `k`-subset of `0..m` by a
/// partial Fisher–Yates shuffle (draw `i` takes `j = i + ⌊x·(m − i) / 2^64⌋` for the 64-bit
/// word `x` made of keystream words `2i` and `2i + 1`, a bias below 2^-32 that public
/// randomness can afford), returned in increasing order.
pub fn selected_coordinates(cfg: &RoundConfig, k: u32) -> Result<Vec<u32>, Error> {
    let m = cfg.vector_len;
    if k == 0 || k > m {
        return Err(Error::Config(format!("compression.keep must be in 1..={m}, got {k}")));
    }
    let words = public_words(cfg, b"selection", 2 * k as usize)?;
    let mut idx: Vec<u32> = (0..m).collect();
    for i in 0..k as usize {
        let x = u64::from(words[2 * i]) | (u64::from(words[2 * i + 1]) << 32);
        let span = u64::from(m) - i as u64;
        let j = i + ((u128::from(x) * u128::from(span)) >> 64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(k as usize);
    idx.sort_unstable();
    Ok(idx)
}

/// A round's encoding, built once from its configuration: the selected coordinates and
/// the rotation's signs and blocks.
#[derive(Clone, Debug)]
pub struct Encoding {
    vector_len: usize,
    selected: Option<Vec<u32>>,
    /// Per rotation block: its length; signs for every encoded coordinate (true: negate).
    blocks: Vec<usize>,
    negate: Vec<bool>,
    encoded_len: usize,
}

impl Encoding {
    /// The round's encoding, or `None` when it compresses nothing.
    pub fn for_config(cfg: &RoundConfig) -> Result<Option<Encoding>, Error> {
        let Some(c) = cfg.compression.as_ref() else { return Ok(None) };
        c.validate(cfg.vector_len)?;
        let selected = c.keep.map(|k| selected_coordinates(cfg, k)).transpose()?;
        let inner = selected.as_ref().map_or(cfg.vector_len as usize, Vec::len);
        let (blocks, negate) = match c.rotation_block {
            Some(b) => {
                let blocks = block_sizes(inner, b as usize);
                let total: usize = blocks.iter().sum();
                let words = public_words(cfg, b"rotation-signs", total.div_ceil(32))?;
                let negate = (0..total).map(|i| words[i / 32] >> (i % 32) & 1 == 1).collect();
                (blocks, negate)
            }
            None => (Vec::new(), Vec::new()),
        };
        let encoded_len = if blocks.is_empty() { inner } else { blocks.iter().sum() };
        debug_assert_eq!(encoded_len, encoded_len_of(cfg));
        Ok(Some(Encoding { vector_len: cfg.vector_len as usize, selected, blocks, negate, encoded_len }))
    }

    pub fn encoded_len(&self) -> usize {
        self.encoded_len
    }

    pub fn vector_len(&self) -> usize {
        self.vector_len
    }

    /// The coordinates sent, in increasing order, when the round uses random-k.
    pub fn selected(&self) -> Option<&[u32]> {
        self.selected.as_deref()
    }

    /// How much a per-coordinate error in the encoded domain can grow when decoded: an
    /// inverse block of size `B` sums `B` coordinates divided by `√B`, so at most `√B`.
    pub fn error_amplification(&self) -> f64 {
        self.blocks.iter().copied().max().map_or(1.0, |b| (b as f64).sqrt())
    }

    /// Encodes an update of `vector_len` values: select, then rotate.
    pub fn encode(&self, x: &[f32]) -> Result<Vec<f32>, Error> {
        if x.len() != self.vector_len {
            return Err(Error::Config(format!("the update has {} values, the round encodes {}", x.len(), self.vector_len)));
        }
        let mut v: Vec<f64> = match &self.selected {
            Some(idx) => idx.iter().map(|&i| f64::from(x[i as usize])).collect(),
            None => x.iter().map(|&a| f64::from(a)).collect(),
        };
        if !self.blocks.is_empty() {
            v.resize(self.encoded_len, 0.0);
            for (a, &neg) in v.iter_mut().zip(&self.negate) {
                if neg {
                    *a = -*a;
                }
            }
            self.transform(&mut v);
        }
        Ok(v.into_iter().map(|a| a as f32).collect())
    }

    /// Decodes an aggregate of [`Encoding::encoded_len`] values back to `vector_len`:
    /// rotate back, then put the kept coordinates in place (the others are zero).
    pub fn decode(&self, y: &[f32]) -> Result<Vec<f32>, Error> {
        if y.len() != self.encoded_len {
            return Err(Error::malformed(format!("an encoded aggregate has {} values, the round's encoding has {}", y.len(), self.encoded_len)));
        }
        let mut v: Vec<f64> = y.iter().map(|&a| f64::from(a)).collect();
        if !self.blocks.is_empty() {
            self.transform(&mut v);
            for (a, &neg) in v.iter_mut().zip(&self.negate) {
                if neg {
                    *a = -*a;
                }
            }
        }
        Ok(match &self.selected {
            Some(idx) => {
                let mut out = vec![0f32; self.vector_len];
                for (&i, &a) in idx.iter().zip(&v) {
                    out[i as usize] = a as f32;
                }
                out
            }
            None => v.into_iter().take(self.vector_len).map(|a| a as f32).collect(),
        })
    }

    /// What the encoding leaves out of `x`: the coordinates random-k does not send (zero
    /// at the ones it sends). The rotation loses nothing. An institution adds it to its
    /// next update (error feedback), so no coordinate is dropped for good.
    pub fn residual(&self, x: &[f32]) -> Vec<f32> {
        let mut r = x.to_vec();
        if let Some(idx) = &self.selected {
            for &i in idx {
                if let Some(v) = r.get_mut(i as usize) {
                    *v = 0.0;
                }
            }
        } else {
            r.iter_mut().for_each(|v| *v = 0.0);
        }
        r
    }

    /// The orthonormal Walsh–Hadamard transform `H/√B` of every block, in place; it is its
    /// own inverse.
    fn transform(&self, v: &mut [f64]) {
        let mut start = 0;
        for &b in &self.blocks {
            fwht(&mut v[start..start + b]);
            start += b;
        }
    }
}

fn encoded_len_of(cfg: &RoundConfig) -> usize {
    encoded_len(cfg.vector_len, cfg.compression.as_ref())
}

/// In-place fast Walsh–Hadamard transform of a power-of-two block, scaled by `1/√len`.
fn fwht(v: &mut [f64]) {
    let n = v.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (v[j], v[j + h]);
                v[j] = a + b;
                v[j + h] = a - b;
            }
        }
        h *= 2;
    }
    let s = 1.0 / (n as f64).sqrt();
    v.iter_mut().for_each(|x| *x *= s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(m: u32, c: Compression) -> RoundConfig {
        let mut cfg = RoundConfig::with_defaults(3, (0..4).map(|i| hex::encode([i as u8; 32])).collect(), m, [9; 32]);
        cfg.compression = Some(c);
        cfg
    }

    #[test]
    fn hadamard_of_a_unit_vector_is_flat() {
        let mut v = vec![0.0; 8];
        v[3] = 1.0;
        fwht(&mut v);
        for x in &v {
            assert!((x.abs() - 1.0 / 8f64.sqrt()).abs() < 1e-15);
        }
        fwht(&mut v);
        assert!((v[3] - 1.0).abs() < 1e-15 && v.iter().enumerate().all(|(i, x)| i == 3 || x.abs() < 1e-15));
    }

    #[test]
    fn lengths_and_blocks() {
        assert_eq!(block_sizes(10, 4), vec![4, 4, 2]);
        assert_eq!(block_sizes(11, 4), vec![4, 4, 4]);
        assert_eq!(block_sizes(8, 4), vec![4, 4]);
        assert_eq!(encoded_len(184_320, Some(&Compression { keep: None, rotation_block: Some(4096) })), 184_320);
        assert_eq!(encoded_len(1000, Some(&Compression { keep: None, rotation_block: Some(256) })), 3 * 256 + 256);
        assert_eq!(encoded_len(1000, Some(&Compression { keep: Some(100), rotation_block: Some(64) })), 64 + 64);
        assert_eq!(encoded_len(1000, Some(&Compression { keep: Some(100), rotation_block: None })), 100);
        assert_eq!(encoded_len(1000, None), 1000);
    }

    #[test]
    fn the_selection_is_a_fixed_uniform_subset() {
        let c = cfg(1000, Compression { keep: Some(100), rotation_block: None });
        let a = selected_coordinates(&c, 100).unwrap();
        assert_eq!(a.len(), 100);
        assert!(a.windows(2).all(|w| w[0] < w[1]) && *a.last().unwrap() < 1000);
        // Every party derives the same subset; another round or seed another one.
        assert_eq!(a, selected_coordinates(&c, 100).unwrap());
        let mut next = c.clone();
        next.round += 1;
        assert_ne!(a, selected_coordinates(&next, 100).unwrap());
        // Keeping everything keeps everything.
        assert_eq!(selected_coordinates(&c, 1000).unwrap(), (0..1000).collect::<Vec<_>>());
        // Uniform: over 200 rounds each coordinate is kept about 200·k/m = 20 times;
        // chi-square with 999 degrees of freedom stays well below 999 + 6·√1998 ≈ 1267.
        let mut counts = [0u32; 1000];
        for r in 0..200 {
            let mut c = c.clone();
            c.round = r;
            for i in selected_coordinates(&c, 100).unwrap() {
                counts[i as usize] += 1;
            }
        }
        let chi2: f64 = counts.iter().map(|&o| (f64::from(o) - 20.0).powi(2) / 20.0).sum();
        assert!(chi2 < 1267.0, "chi2 = {chi2}");
    }

    #[test]
    fn configurations_are_checked() {
        let bad = |c: Compression, m: u32| c.validate(m).unwrap_err().to_string();
        assert!(bad(Compression { keep: Some(0), rotation_block: None }, 10).contains("keep must be in 1..=10"));
        assert!(bad(Compression { keep: Some(11), rotation_block: None }, 10).contains("got 11"));
        assert!(bad(Compression { keep: None, rotation_block: Some(12) }, 10).contains("power of two"));
        assert!(bad(Compression { keep: None, rotation_block: Some(1) }, 10).contains("power of two"));
        assert!(bad(Compression::default(), 10).contains("neither"));
    }

    #[test]
    fn rotation_spreads_a_spike() {
        let c = cfg(4096, Compression { keep: None, rotation_block: Some(1024) });
        let e = Encoding::for_config(&c).unwrap().unwrap();
        let mut x = vec![0f32; 4096];
        x[77] = 1.0;
        let y = e.encode(&x).unwrap();
        let max = y.iter().fold(0f32, |a, b| a.max(b.abs()));
        assert!((max - 1.0 / 32.0).abs() < 1e-6, "{max}");
        assert!((e.error_amplification() - 32.0).abs() < 1e-12);
    }

    proptest! {
        /// Decoding inverts encoding up to f32 rounding, and random-k's residual is exactly
        /// what it does not send.
        #[test]
        fn the_encoding_is_inverted(m in 1u32..3000, keep_frac in 0.01f64..1.0, block_log2 in 1u32..11, rotate in any::<bool>(), select in any::<bool>(), seed in any::<u64>()) {
            let keep = select.then(|| ((f64::from(m) * keep_frac).ceil() as u32).clamp(1, m));
            let rotation_block = (rotate || keep.is_none()).then_some(1u32 << block_log2);
            let c = cfg(m, Compression { keep, rotation_block });
            let e = Encoding::for_config(&c).unwrap().unwrap();
            let mut s = seed;
            let x: Vec<f32> = (0..m).map(|_| { s = s.wrapping_mul(6364136223846793005).wrapping_add(1); ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5 }).collect();
            let y = e.encode(&x).unwrap();
            prop_assert_eq!(y.len(), e.encoded_len());
            prop_assert_eq!(y.len(), encoded_len(m, c.compression.as_ref()));
            let back = e.decode(&y).unwrap();
            let residual = e.residual(&x);
            for i in 0..m as usize {
                // back + residual = x
                prop_assert!((back[i] + residual[i] - x[i]).abs() < 1e-5, "coordinate {}: {} + {} vs {}", i, back[i], residual[i], x[i]);
            }
            // Orthonormal: the rotation keeps the norm of what is sent.
            let n2 = |v: &[f32]| v.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>();
            prop_assert!((n2(&y) - n2(&back)).abs() < 1e-4 * (1.0 + n2(&back)));
            // Linear: the encoding of a sum is the sum of encodings.
            let x2: Vec<f32> = x.iter().map(|a| a * 0.5 + 0.1).collect();
            let y2 = e.encode(&x2).unwrap();
            let sum: Vec<f32> = x.iter().zip(&x2).map(|(a, b)| a + b).collect();
            let ysum = e.encode(&sum).unwrap();
            for ((a, b), s) in y.iter().zip(&y2).zip(&ysum) {
                prop_assert!((a + b - s).abs() < 1e-5);
            }
        }
    }
}
