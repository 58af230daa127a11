//! Quantization of real-valued updates into `Z_{2^b}` so that masks can be added exactly.
//!
//! Each coordinate is clipped to `[-c, c]`, scaled by the client's FedAvg weight share
//! `w / w_max`, mapped affinely onto `[0, L]` and stochastically rounded (unbiased). `L`
//! is the largest integer with `n * L < 2^b`, so the sum of all `n` inputs never wraps.
//! The weight itself travels as one extra integer element, so the aggregator learns
//! `Σ w_i x_i` and `Σ w_i` and nothing per client. Dequantizing the sum of `s` inputs
//! removes the `s` offsets and divides by the total weight (FedAvg).
//!
//! A round with [`RoundConfig::compression`] quantizes the encoded update
//! ([`crate::compress::Encoding`]) and decodes the mean after dequantizing it.

use rand::Rng;

use crate::compress::Encoding;
use crate::config::RoundConfig;
use crate::error::Error;
use crate::skellam::SkellamPipeline;

/// Coordinates quantized per bulk draw of rounding randomness.
const QUANTIZE_BLOCK: usize = 1024;
const TWO_POW_32: f64 = 4_294_967_296.0;

#[derive(Clone, Debug)]
pub struct Quantizer {
    clip: f64,
    levels: u64,
    max_weight: u32,
    mask: u32,
    encoding: Option<std::sync::Arc<Encoding>>,
    /// Set in a round with Skellam noise: the (encoded) update goes through this pipeline
    /// instead of the affine quantization, and its noise share is drawn here.
    skellam: Option<SkellamPipeline>,
}

/// The released aggregate: the weighted mean of the included clients' updates.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightedMean {
    pub mean: Vec<f32>,
    pub total_weight: u64,
    pub included: usize,
}

impl Quantizer {
    /// The round's quantizer, with its encoding when the round compresses (which fails
    /// only for a configuration that does not validate).
    pub fn new(cfg: &RoundConfig) -> Result<Self, Error> {
        let mask = cfg.modulus_mask();
        let n = cfg.participants() as u64;
        let encoding = Encoding::for_config(cfg)?.map(std::sync::Arc::new);
        let skellam = cfg.dp.and_then(|dp| dp.skellam.map(|_| dp.skellam_pipeline(cfg.min_survivors, cfg.modulus_bits)));
        let skellam = match skellam {
            Some(None) => return Err(Error::Config("a round with Skellam noise must carry its scale (dp.skellam.scale)".into())),
            Some(Some(p)) => Some(p),
            None => None,
        };
        Ok(Quantizer { clip: cfg.clip as f64, levels: mask as u64 / n, max_weight: cfg.max_weight, mask, encoding, skellam })
    }

    /// The round's encoding, when it compresses.
    pub fn encoding(&self) -> Option<&Encoding> {
        self.encoding.as_deref()
    }

    /// Width of one quantization step in the units of the (weight-scaled) update.
    pub fn step(&self) -> f64 {
        match &self.skellam {
            Some(p) => 1.0 / p.scale,
            None => 2.0 * self.clip / self.levels as f64,
        }
    }

    /// Worst-case absolute error of one coordinate of the released mean, given the
    /// number of included clients and their total weight: each client rounds by at most
    /// one step, scaled back by `w_max / Σw`. With a rotation, an inverse block of `B`
    /// coordinates can add up `B` such errors over `√B` ([`Encoding::error_amplification`]);
    /// with random-k, the bound is on the coordinates sent.
    pub fn mean_error_bound(&self, included: usize, total_weight: u64) -> f64 {
        let amplification = self.encoding.as_ref().map_or(1.0, |e| e.error_amplification());
        self.step() * included as f64 * self.max_weight as f64 / total_weight.max(1) as f64 * amplification
    }

    /// Encodes (when the round compresses), clips, weights and stochastically rounds
    /// `update`; appends the weight. NaN coordinates are refused rather than silently
    /// zeroed.
    pub fn quantize<R: Rng + ?Sized>(&self, update: &[f32], weight: u32, rng: &mut R) -> Result<Vec<u32>, Error> {
        self.quantize_counting(update, weight, rng).map(|(q, _)| q)
    }

    /// [`Quantizer::quantize`], also returning how many (encoded) coordinates the range
    /// clip `[-clip, clip]` clamped: the measured rate of the clipping that keeps the sum
    /// of n inputs from wrapping the modulus. Each clamped coordinate is biased toward
    /// zero, so a sender reports it.
    pub fn quantize_counting<R: Rng + ?Sized>(&self, update: &[f32], weight: u32, rng: &mut R) -> Result<(Vec<u32>, usize), Error> {
        if weight == 0 || weight > self.max_weight {
            return Err(Error::Config(format!("weight must be in 1..={}, got {weight}", self.max_weight)));
        }
        if let Some(i) = update.iter().position(|x| x.is_nan()) {
            return Err(Error::malformed(format!("update coordinate {i} is NaN")));
        }
        let encoded;
        let update = match &self.encoding {
            Some(e) => {
                // A rotation would mix an infinity into NaNs across its block.
                if let Some(i) = update.iter().position(|x| x.is_infinite()) {
                    return Err(Error::malformed(format!("update coordinate {i} is infinite, which a compressed round cannot encode")));
                }
                encoded = e.encode(update)?;
                &encoded[..]
            }
            None => update,
        };
        if let Some(p) = &self.skellam {
            // Clipped to C, scaled, rounded conditionally, and this institution's integer
            // noise share added: no range clip, the sum wraps modulo 2^b instead.
            let mut out = p.encode(update, rng)?;
            out.push(weight);
            return Ok((out, 0));
        }
        let scale = weight as f64 / self.max_weight as f64;
        let to_levels = self.levels as f64 / (2.0 * self.clip);
        let (clip, levels) = (self.clip, self.levels);
        let mut out = Vec::with_capacity(update.len() + 1);
        let mut clamped = 0;
        // The rounding draws come 32 bits a coordinate, a block at a time (one bulk fill of
        // the generator's keystream rather than a call per coordinate); the loop over a
        // block has no branch, so it vectorizes.
        let mut draws = [0u32; QUANTIZE_BLOCK];
        for (b, block) in update.chunks(QUANTIZE_BLOCK).enumerate() {
            if let Some(j) = block.iter().position(|x| x.is_nan()) {
                return Err(Error::malformed(format!("update coordinate {} is NaN", b * QUANTIZE_BLOCK + j)));
            }
            let draws = &mut draws[..block.len()];
            rng.fill(&mut draws[..]);
            clamped += block.iter().filter(|&&x| f64::from(x).abs() > clip).count();
            out.extend(block.iter().zip(draws.iter()).map(|(&x, &r)| {
                let pos = ((x as f64).clamp(-clip, clip) * scale + clip) * to_levels; // in [0, L]
                                                                                      // 0 ≤ pos < 2^32, so truncation to i64 is the floor: one instruction on
                                                                                      // x86-64 (a libm call for `floor` without SSE4.1, several for u64).
                let floor = pos as i64;
                // Up with probability pos − floor (to 2^-32): unbiased.
                let up = f64::from(r) < (pos - floor as f64) * TWO_POW_32;
                (floor + i64::from(up)).min(levels as i64) as u32
            }));
        }
        out.push(weight);
        Ok((out, clamped))
    }

    /// Turns the modular sum of `included` quantized inputs into the weighted mean,
    /// consuming the sum: in a round without Skellam noise the mean is written over the
    /// sum's own words (an f32 per u32), so the release never holds two m-word vectors.
    pub fn dequantize_sum(&self, mut sum: Vec<u32>, included: usize) -> Result<WeightedMean, Error> {
        let weight = sum.pop().ok_or_else(|| Error::malformed("empty sum"))?;
        let total_weight = (weight & self.mask) as u64;
        if total_weight == 0 {
            return Err(Error::malformed("total weight of the sum is zero"));
        }
        let rescale = self.max_weight as f64 / total_weight as f64;
        let mean: Vec<f32> = match &self.skellam {
            Some(p) => p.decode_sum(&sum)?.into_iter().map(|v| (v * rescale) as f32).collect(),
            None => {
                let from_levels = 2.0 * self.clip / self.levels as f64;
                let offset = included as f64 * self.clip;
                // Each word is read as the integer it is and replaced by its value's bits,
                // never read as an f32 (which some FPUs would alter on the way).
                for x in &mut sum {
                    *x = (((((*x & self.mask) as f64) * from_levels - offset) * rescale) as f32).to_bits();
                }
                bytemuck::cast_vec(sum)
            }
        };
        let mean = match &self.encoding {
            Some(e) => e.decode(&mean)?,
            None => mean,
        };
        Ok(WeightedMean { mean, total_weight, included })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn cfg(n: usize, bits: u8) -> RoundConfig {
        let mut c = RoundConfig::with_defaults(1, (0..n).map(|i| hex::encode([i as u8; 32])).collect(), 4, [0; 32]);
        c.modulus_bits = bits;
        c.max_weight = 100;
        c.clip = 0.5;
        c
    }

    /// The mean written over the sum's own words is, bit for bit, the affine map of each
    /// word, whatever the word's bits would be read as a float (NaN patterns included).
    #[test]
    fn the_mean_over_the_sum_is_the_affine_map_of_each_word() {
        let mut c = cfg(3, 32);
        c.max_weight = 1000;
        let q = Quantizer::new(&c).unwrap();
        let words = [0u32, 1, 0x7F80_0001, 0x7FC0_0000, 0xFF80_0001, 0xFFFF_FFFF, 0x8000_0000, 12_345_678];
        let weight = 1500u32;
        let mut sum = words.to_vec();
        sum.push(weight);
        let mean = q.dequantize_sum(sum, 3).unwrap();
        let rescale = 1000.0 / f64::from(weight);
        let from_levels = 2.0 * q.clip / q.levels as f64;
        for (got, &w) in mean.mean.iter().zip(&words) {
            let want = ((f64::from(w) * from_levels - 3.0 * q.clip) * rescale) as f32;
            assert_eq!(got.to_bits(), want.to_bits(), "word {w:#x}");
        }
        assert_eq!((mean.mean.len(), mean.total_weight), (words.len(), 1500));
    }

    #[test]
    fn sum_of_n_extremes_does_not_wrap() {
        for bits in [8u8, 16, 32] {
            let mut c = cfg(7, bits);
            c.max_weight = (c.modulus_mask() / 7).min(100);
            c.validate().unwrap();
            let w = c.max_weight;
            let q = Quantizer::new(&c).unwrap();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
            let inputs: Vec<Vec<u32>> = (0..7).map(|_| q.quantize(&[9.0, -9.0, 0.5, -0.5], w, &mut rng).unwrap()).collect();
            let mut sum = vec![0u32; 5];
            for v in &inputs {
                for (s, x) in sum.iter_mut().zip(v) {
                    *s = s.wrapping_add(*x) & c.modulus_mask();
                }
            }
            let mean = q.dequantize_sum(sum, 7).unwrap();
            assert_eq!(mean.total_weight, 7 * w as u64);
            let bound = q.mean_error_bound(7, 7 * w as u64) as f32;
            for (got, want) in mean.mean.iter().zip([0.5f32, -0.5, 0.5, -0.5]) {
                assert!((got - want).abs() <= bound + 1e-6, "bits={bits}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        let c = cfg(2, 8);
        let q = Quantizer::new(&c).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let x = 0.1234f32;
        let trials = 20_000;
        let mut acc = 0.0f64;
        for _ in 0..trials {
            let v = q.quantize(&[x], 100, &mut rng).unwrap();
            acc += v[0] as f64 * q.step() - 0.5;
        }
        let mean = acc / trials as f64;
        // Standard error of the mean is at most step / (2 sqrt(trials)).
        assert!((mean - x as f64).abs() < 4.0 * q.step() / (2.0 * (trials as f64).sqrt()), "{mean}");
    }

    /// At 32 bits the levels reach 2^31: the rounding still goes up with the fraction's
    /// probability, and coordinates past the first block of draws are rounded alike.
    #[test]
    fn stochastic_rounding_is_unbiased_at_32_bits_in_every_block() {
        let c = cfg(2, 32);
        let q = Quantizer::new(&c).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
        // A coordinate whose position has fraction 0.3 exactly.
        let pos = 1_000_000_000.3f64;
        let x = (pos / (q.levels as f64 / (2.0 * q.clip)) - q.clip) as f32;
        let exact = ((x as f64) + q.clip) * (q.levels as f64 / (2.0 * q.clip));
        let update = vec![x; 3 * QUANTIZE_BLOCK + 17];
        let v = q.quantize(&update, 100, &mut rng).unwrap();
        let floor = exact.floor() as u32;
        assert!(v[..update.len()].iter().all(|&e| e == floor || e == floor + 1));
        let ups = v[..update.len()].iter().filter(|&&e| e == floor + 1).count() as f64 / update.len() as f64;
        let frac = exact - exact.floor();
        let se = (frac * (1.0 - frac) / update.len() as f64).sqrt();
        assert!((ups - frac).abs() < 4.0 * se, "went up {ups}, fraction {frac}");
        let (tail_ups, n_tail) = (v[2 * QUANTIZE_BLOCK..update.len()].iter().filter(|&&e| e == floor + 1).count(), update.len() - 2 * QUANTIZE_BLOCK);
        assert!(tail_ups > 0 && tail_ups < n_tail, "the last blocks are rounded too");
        let mut bad = update.clone();
        bad[2 * QUANTIZE_BLOCK + 5] = f32::NAN;
        let e = q.quantize(&bad, 100, &mut rng).unwrap_err().to_string();
        assert!(e.contains(&format!("coordinate {}", 2 * QUANTIZE_BLOCK + 5)), "{e}");
    }

    #[test]
    fn weighted_mean_is_fedavg() {
        let c = cfg(3, 32);
        let q = Quantizer::new(&c).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let a = q.quantize(&[0.4, 0.0, 0.0, 0.0], 10, &mut rng).unwrap();
        let b = q.quantize(&[-0.2, 0.0, 0.0, 0.0], 30, &mut rng).unwrap();
        let sum: Vec<u32> = a.iter().zip(&b).map(|(x, y)| x.wrapping_add(*y)).collect();
        let m = q.dequantize_sum(sum, 2).unwrap();
        let want = (0.4 * 10.0 - 0.2 * 30.0) / 40.0;
        assert!((m.mean[0] - want).abs() < 1e-6, "{} vs {want}", m.mean[0]);
    }

    #[test]
    fn clamped_coordinates_are_counted() {
        let q = Quantizer::new(&cfg(3, 32)).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (v, clamped) = q.quantize_counting(&[0.6, -0.5, 0.49, -7.0], 1, &mut rng).unwrap();
        assert_eq!((v.len(), clamped), (5, 2));
    }

    /// A round of `n` institutions with Skellam noise at z = 0.05, C = 1, t = n − 1, given the
    /// scale that fits.
    fn skellam_round(n: usize, bits: u8, vector_len: u32, compression: Option<crate::compress::Compression>) -> RoundConfig {
        let mut c = cfg(n, bits);
        c.max_weight = 1;
        c.min_survivors = n as u32 - 1;
        c.vector_len = vector_len;
        c.compression = compression;
        let dp = crate::dp::DpParams {
            noise_multiplier: 0.05,
            l2_clip: 1.0,
            delta: 1e-5,
            epsilon_budget: 1e3,
            colluders: 1,
            skellam: Some(crate::dp::SkellamNoise { scale: None, beta: crate::dp::default_beta() }),
        };
        c.dp = Some(dp);
        c.settle_skellam_scale().unwrap();
        c.validate().unwrap();
        c
    }

    /// Updates of norm 0.5 (kept) and 3.0 (clipped to 1), one per institution.
    fn updates(n: usize, len: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|i| {
                let raw: Vec<f32> = (0..len).map(|j| (((i * 31 + j * 7) % 13) as f32 - 6.0) / 6.0).collect();
                let norm = raw.iter().map(|x| x * x).sum::<f32>().sqrt();
                let want = if i % 2 == 0 { 0.5 } else { 3.0 };
                raw.iter().map(|x| x / norm * want).collect()
            })
            .collect()
    }

    /// Quantizes every update, sums the words mod 2^b, dequantizes; returns the mean and
    /// the standard deviation of the noise the accountant assumes on it (n shares over n).
    fn skellam_mean(c: &RoundConfig, updates: &[Vec<f32>]) -> (Vec<f32>, f64) {
        let q = Quantizer::new(c).unwrap();
        let n = updates.len();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut sum = vec![0u32; c.masked_len()];
        for u in updates {
            let (words, clamped) = q.quantize_counting(u, 1, &mut rng).unwrap();
            assert_eq!((words.len(), clamped, words[c.encoded_len()]), (c.masked_len(), 0, 1));
            assert!(words.iter().all(|&w| w <= c.modulus_mask()));
            for (s, w) in sum.iter_mut().zip(&words) {
                *s = s.wrapping_add(*w) & c.modulus_mask();
            }
        }
        let mean = q.dequantize_sum(sum, n).unwrap();
        assert_eq!((mean.total_weight, mean.included), (n as u64, n));
        let sd = c.dp.unwrap().client_noise_std(c.min_survivors) * (n as f64).sqrt() / n as f64;
        (mean.mean, sd)
    }

    /// `errors` are noise of standard deviation `sd` (to 6%, over thousands of
    /// coordinates), within 6σ plus the rounding, and unbiased.
    fn assert_noise(errors: &[f64], sd: f64, rounding: f64) {
        let var = errors.iter().map(|e| e * e).sum::<f64>() / errors.len() as f64;
        assert!((var.sqrt() / sd - 1.0).abs() < 0.06, "noise sd {} vs {sd}", var.sqrt());
        assert!(errors.iter().all(|e| e.abs() < 6.0 * sd + rounding), "within 6σ");
        assert!(errors.iter().sum::<f64>().abs() / (errors.len() as f64) < 4.0 * sd / (errors.len() as f64).sqrt(), "unbiased");
    }

    /// A Skellam round: each input is the pipeline's integers plus a noise share, their
    /// modular sum decodes to the mean of the clipped updates, off by the summed noise
    /// (whose variance is the shares') and at most one rounding step per input.
    #[test]
    fn skellam_rounds_quantize_through_the_pipeline() {
        let (n, len) = (5, 4000);
        let c = skellam_round(n, 24, len as u32, None);
        assert_eq!(Quantizer::new(&c).unwrap().step(), 1.0 / c.dp.unwrap().skellam.unwrap().scale.unwrap());
        let updates = updates(n, len);
        let (mean, sd) = skellam_mean(&c, &updates);
        let clipped = |j: usize| {
            updates.iter().map(|u| f64::from(u[j]) * if u.iter().map(|x| x * x).sum::<f32>().sqrt() > 1.0 { 1.0 / 3.0 } else { 1.0 }).sum::<f64>() / n as f64
        };
        let errors: Vec<f64> = mean.iter().enumerate().map(|(j, &m)| f64::from(m) - clipped(j)).collect();
        assert_noise(&errors, sd, Quantizer::new(&c).unwrap().step());
    }

    /// With random-k and the rotation, the pipeline clips and rounds the encoded update;
    /// the decoded mean is the decoded mean of the clipped encodings plus noise of the
    /// same standard deviation on every kept coordinate (the inverse rotation is
    /// orthonormal), and exactly zero elsewhere.
    #[test]
    fn skellam_rounds_quantize_encoded_updates() {
        let (n, len) = (5, 6000);
        let c = skellam_round(n, 20, len as u32, Some(crate::compress::Compression { keep: Some(4000), rotation_block: Some(256) }));
        let q = Quantizer::new(&c).unwrap();
        let e = q.encoding().unwrap();
        let updates = updates(n, len);
        let (mean, sd) = skellam_mean(&c, &updates);
        let mut encoded_mean = vec![0f32; e.encoded_len()];
        for u in &updates {
            let mut v = e.encode(u).unwrap();
            let norm = v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
            for (m, x) in encoded_mean.iter_mut().zip(v.iter_mut()) {
                *m += (f64::from(*x) * if norm > 1.0 { 1.0 / norm } else { 1.0 } / n as f64) as f32;
            }
        }
        let want = e.decode(&encoded_mean).unwrap();
        let kept: Vec<usize> = e.selected().unwrap().iter().map(|&i| i as usize).collect();
        let errors: Vec<f64> = kept.iter().map(|&j| f64::from(mean[j]) - f64::from(want[j])).collect();
        assert_noise(&errors, sd, q.step() * e.error_amplification());
        let unsent = (0..len).filter(|j| kept.binary_search(j).is_err()).count();
        assert_eq!(unsent, len - 4000);
        assert!((0..len).filter(|j| kept.binary_search(j).is_err()).all(|j| mean[j] == 0.0));
    }

    #[test]
    fn refuses_nan_and_bad_weight() {
        let q = Quantizer::new(&cfg(3, 32)).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        assert!(q.quantize(&[f32::NAN], 1, &mut rng).is_err());
        assert!(q.quantize(&[0.0], 0, &mut rng).is_err());
        assert!(q.quantize(&[0.0], 101, &mut rng).is_err());
    }
}
