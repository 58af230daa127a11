//! The distributed Skellam mechanism (Agarwal, Kairouz and Liu, NeurIPS 2021): noise drawn
//! in the integers, after quantization, so the released sum is exactly the mechanism the
//! accountant analyses.
//!
//! Today's distributed Gaussian adds real-valued noise and then rounds it into `Z_{2^b}`;
//! the accountant assumes Gaussian noise, the release carries rounded Gaussian noise. With
//! Skellam noise, each institution scales its clipped update by `scale`, rounds it to
//! integers, and adds a draw of `Sk(λ, λ) = Poisson(λ) − Poisson(λ)` (variance 2λ) to
//! every coordinate before masking. Skellam variables are closed under summation, so
//! the sum of n shares of variance `σ²·scale²` is Skellam of variance `n·σ²·scale²`,
//! and the masked sum (exact arithmetic mod 2^b) releases exactly that.
//!
//! The accountant follows Google's reference implementation,
//! `distributed_dp/accounting_utils.py` of google-research/federated (the code behind
//! TFF's distributed DP aggregators):
//! * RDP of order α of the Skellam mechanism with L1 and L2 sensitivities Δ₁, Δ₂ and
//!   central variance μ (Agarwal et al., Theorem 3.5):
//!   `α Δ₂² / (2μ) + min(((2α − 1) s Δ₂² + 6 Δ₁) / (4 s³ μ²), 3 Δ₁ / (2 s μ))`, with `s` the
//!   scale;
//! * the sensitivities after conditional stochastic rounding (Kairouz et al., ICML 2021,
//!   Theorem 1): `min(c + √d, √(c² + d/4 + √(2 ln(1/β)) (c + √d / 2)))` for L2 and
//!   `Δ₂ · min(√d, Δ₂)` for L1, in the scaled domain;
//! * Poisson subsampling at rate q by Zhu and Wang (ICML 2019), Theorem 5, taking the
//!   minimum with the unsampled RDP order by order;
//! * composition over steps, and conversion to (ε, δ) at the orders 2, …, 128, 256 as
//!   `dp_accounting` does.
//!
//! `secagg/tests/data/tff_skellam.json` holds ε computed by that Python module over a grid
//! (`scripts/reference/tff_skellam.py`); the test below matches it within 1%.

use rand::Rng;

use crate::Error;

/// The RDP orders of the reference implementation: 2, 3, …, 128, and 256.
pub fn orders() -> impl Iterator<Item = u32> {
    (2..=128).chain(std::iter::once(256))
}

/// The L2 sensitivity of a vector of L2 norm at most `l2` (already scaled) after
/// stochastic rounding to integers, conditioned on the rounded norm staying within the
/// bound that holds with probability 1 − `beta` (`beta` = 0: unconditional rounding).
pub fn rounded_l2_norm_bound(l2: f64, beta: f64, dim: u64) -> f64 {
    let d = dim as f64;
    let unconditional = l2 + d.sqrt();
    if beta == 0.0 {
        return unconditional;
    }
    let conditional = (l2 * l2 + 0.25 * d + (2.0 * (1.0 / beta).ln()).sqrt() * (l2 + 0.5 * d.sqrt())).sqrt();
    unconditional.min(conditional)
}

/// The L1 sensitivity of an integer vector of L2 norm at most `l2`: at most √d · L2, and
/// at most L2² because every non-zero coordinate is at least 1 in magnitude.
pub fn rounded_l1_norm_bound(l2: f64, dim: u64) -> f64 {
    l2 * (dim as f64).sqrt().min(l2)
}

/// RDP of order `alpha` of one Skellam release: sensitivities in the unscaled domain,
/// `central_var` the variance of the summed noise in the unscaled domain, `scale` the
/// factor applied before rounding.
pub fn rdp(l1: f64, l2: f64, central_var: f64, scale: f64, alpha: u32) -> f64 {
    let (a, s, mu) = (f64::from(alpha), scale, central_var);
    a / (2.0 * mu) * l2 * l2 + (((2.0 * a - 1.0) * s * l2 * l2 + 6.0 * l1) / (4.0 * s.powi(3) * mu * mu)).min(3.0 * l1 / (2.0 * s * mu))
}

/// ln C(n, k) through lgamma.
fn log_comb(n: u32, k: u32) -> f64 {
    let lg = |x: u32| libm::lgamma(f64::from(x) + 1.0);
    lg(n) - lg(k) - lg(n - k)
}

/// RDP of order `alpha` (an integer ≥ 2) of a mechanism with RDP `eps` after Poisson
/// subsampling at rate `q` in (0, 1): Zhu and Wang (ICML 2019), Theorem 5, as the
/// reference computes it.
pub fn subsampled_rdp(alpha: u32, q: f64, eps: impl Fn(u32) -> f64) -> f64 {
    let a = f64::from(alpha);
    let log_1mq = (-q).ln_1p();
    // ln of each term of the bound's sum.
    let mut terms = vec![(a - 1.0) * log_1mq + (a * q - q + 1.0).ln(), eps(2) + log_comb(alpha, 2) + 2.0 * q.ln() + (a - 2.0) * log_1mq];
    for l in 3..=alpha {
        let lf = f64::from(l);
        terms.push((lf - 1.0) * eps(l) + log_comb(alpha, l) + (a - lf) * log_1mq + lf * q.ln() + 3f64.ln());
    }
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::INFINITY {
        return f64::INFINITY;
    }
    let sum: f64 = terms.iter().map(|t| (t - max).exp()).sum();
    (max + sum.ln()) / (a - 1.0)
}

/// (ε, the order that gave it) from RDP at each of [`orders`], as `dp_accounting`
/// converts (Balle et al. 2020; ε = 0 where the KL bound already gives δ).
pub fn rdp_to_epsilon(rdp: &[(u32, f64)], delta: f64) -> (f64, u32) {
    let mut best = (f64::INFINITY, rdp.first().map_or(0, |r| r.0));
    for &(alpha, r) in rdp {
        let a = f64::from(alpha);
        let eps = if delta * delta + (-r).exp_m1() > 0.0 { 0.0 } else { r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0) };
        if eps < best.0 {
            best = (eps, alpha);
        }
    }
    (best.0.max(0.0), best.1)
}

/// One use of the distributed Skellam mechanism, repeated over `steps` rounds.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkellamRelease {
    /// The factor applied to the clipped update before rounding to integers.
    pub scale: f64,
    /// The standard deviation of the summed noise, in the unscaled domain (one
    /// institution's share is `central_stddev / √n` for n institutions).
    pub central_stddev: f64,
    /// The L2 clipping norm of an update, before scaling.
    pub l2_clip: f64,
    /// Conditional rounding's β in [0, 1): 0 rounds unconditionally.
    pub beta: f64,
    /// The dimension of the (rotated, padded) vector.
    pub dim: u64,
    /// The rate at which institutions are sampled into a round (1: every round has all).
    pub sample_rate: f64,
    pub steps: u64,
}

impl SkellamRelease {
    pub fn validate(&self) -> Result<(), Error> {
        let ok = self.scale.is_finite()
            && self.scale > 0.0
            && self.central_stddev.is_finite()
            && self.central_stddev > 0.0
            && self.l2_clip.is_finite()
            && self.l2_clip > 0.0
            && (0.0..1.0).contains(&self.beta)
            && self.dim > 0
            && self.sample_rate > 0.0
            && self.sample_rate <= 1.0
            && self.steps > 0;
        if ok {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "Skellam parameters out of range: {self:?} (scale, stddev and clip positive and finite, β in [0, 1), dimension ≥ 1, sampling rate in (0, 1], steps ≥ 1)"
            )))
        }
    }

    /// RDP of the whole run at each of [`orders`].
    pub fn rdp(&self) -> Result<Vec<(u32, f64)>, Error> {
        self.validate()?;
        let eps = |alpha: u32| self.rdp_of_one(alpha);
        let q = self.sample_rate;
        Ok(orders()
            .map(|alpha| {
                let one = if q >= 1.0 { eps(alpha) } else { subsampled_rdp(alpha, q, eps).min(eps(alpha)) };
                (alpha, one * self.steps as f64)
            })
            .collect())
    }

    /// RDP of order `alpha` of one release of every institution (no sampling, one step).
    pub fn rdp_of_one(&self, alpha: u32) -> f64 {
        let s = self.scale;
        let l2 = rounded_l2_norm_bound(self.l2_clip * s, self.beta, self.dim) / s;
        let l1 = rounded_l1_norm_bound(l2 * s, self.dim) / s;
        rdp(l1, l2, self.central_stddev * self.central_stddev, s, alpha)
    }

    /// (ε, the RDP order that gave it) at `delta`.
    pub fn epsilon(&self, delta: f64) -> Result<(f64, u32), Error> {
        if !(delta > 0.0 && delta < 1.0) {
            return Err(Error::Config(format!("δ = {delta} is not in (0, 1)")));
        }
        Ok(rdp_to_epsilon(&self.rdp()?, delta))
    }

    /// The least central standard deviation (unscaled) for which the run spends at most
    /// `target_epsilon` at `delta`, to a relative precision of 1e-9; `self.central_stddev`
    /// is ignored.
    pub fn central_stddev_for(&self, target_epsilon: f64, delta: f64) -> Result<f64, Error> {
        if !(target_epsilon.is_finite() && target_epsilon > 0.0) {
            return Err(Error::Config(format!("target ε = {target_epsilon} must be positive and finite")));
        }
        let eps_at = |sd: f64| SkellamRelease { central_stddev: sd, ..*self }.epsilon(delta).map(|e| e.0);
        // ε falls as the noise grows: bracket, then bisect on a log scale.
        let (mut lo, mut hi) = (self.l2_clip * 1e-6, self.l2_clip);
        while eps_at(hi)? > target_epsilon {
            lo = hi;
            hi *= 2.0;
            if hi > self.l2_clip * 1e12 {
                return Err(Error::Config(format!("no noise reaches ε = {target_epsilon} at δ = {delta} for {self:?}")));
            }
        }
        while eps_at(lo)? <= target_epsilon && lo > f64::MIN_POSITIVE {
            hi = lo;
            lo /= 2.0;
        }
        while hi / lo > 1.0 + 1e-9 {
            let mid = (lo * hi).sqrt();
            if eps_at(mid)? > target_epsilon {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(hi)
    }
}

/// The largest λ a draw accepts: 2^50, so every Poisson draw (within a few thousand
/// standard deviations of λ) is an integer an f64 holds exactly. A share variance that
/// large is far past any modulus anyway.
pub const MAX_LAMBDA: f64 = 1_125_899_906_842_624.0;

/// A draw of Sk(λ, λ) = Poisson(λ) − Poisson(λ): symmetric, integer, variance 2λ.
/// Refuses a λ that is negative, not finite or above [`MAX_LAMBDA`] (0 draws 0), so a
/// bad parameter can never mean silently less noise.
pub fn sample<R: Rng + ?Sized>(rng: &mut R, lambda: f64) -> Result<i64, Error> {
    if !(0.0..=MAX_LAMBDA).contains(&lambda) {
        return Err(Error::Config(format!("Skellam λ = {lambda} is not in [0, 2^50]")));
    }
    Ok(poisson(rng, lambda) - poisson(rng, lambda))
}

/// Poisson(λ) for 0 ≤ λ ≤ [`MAX_LAMBDA`]: for λ < 10, the multiplication method
/// (Knuth: count uniforms until their product falls below e^−λ); above, Hörmann's
/// transformed rejection with squeeze, PTRS ("The transformed rejection method for
/// generating Poisson random variables", Insurance: Mathematics and Economics 12, 1993),
/// which is exact: its acceptance test compares against the Poisson probability itself
/// (through ln k! by lgamma).
fn poisson<R: Rng + ?Sized>(rng: &mut R, lambda: f64) -> i64 {
    if lambda == 0.0 {
        return 0;
    }
    if lambda < 10.0 {
        let limit = (-lambda).exp();
        let mut k = 0i64;
        let mut product = rng.gen::<f64>();
        while product > limit {
            k += 1;
            product *= rng.gen::<f64>();
        }
        return k;
    }
    let sq = lambda.sqrt();
    let log_lambda = lambda.ln();
    let b = 0.931 + 2.53 * sq;
    let a = -0.059 + 0.02483 * b;
    let inv_alpha = 1.1239 + 1.1328 / (b - 3.4);
    let v_r = 0.9277 - 3.6224 / (b - 2.0);
    loop {
        let u = rng.gen::<f64>() - 0.5;
        let v = rng.gen::<f64>();
        let us = 0.5 - u.abs();
        let k = ((2.0 * a / us + b) * u + lambda + 0.43).floor();
        if us >= 0.07 && v <= v_r {
            return k as i64;
        }
        if k < 0.0 || (us < 0.013 && v > us) {
            continue;
        }
        if v.ln() + inv_alpha.ln() - (a / (us * us) + b).ln() <= -lambda + k * log_lambda - libm::lgamma(k + 1.0) {
            return k as i64;
        }
    }
}

/// Adds one institution's share of Skellam noise, variance `share_variance` in the scaled
/// integer domain (`(central_stddev · scale)² / n`), to every word, mod 2^32 (the masked
/// domain; a smaller modulus 2^b takes the low b bits of the same sum). Refuses a
/// variance [`sample`] refuses, before changing any word.
pub fn add_noise<R: Rng + ?Sized>(words: &mut [u32], share_variance: f64, rng: &mut R) -> Result<(), Error> {
    let lambda = share_variance / 2.0;
    if !(0.0..=MAX_LAMBDA).contains(&lambda) {
        return Err(Error::Config(format!("Skellam share variance {share_variance} is not in [0, 2^51]")));
    }
    for w in words.iter_mut() {
        *w = w.wrapping_add(sample(rng, lambda)? as u32);
    }
    Ok(())
}

/// The client and server halves of TFF's distributed-DP pipeline with Skellam noise, for
/// an update already rotated ([`crate::compress`]'s randomized Hadamard rotation, whose
/// padded length is the accountant's dimension):
///
/// 1. clip to L2 norm `l2_clip`;
/// 2. scale by `scale`;
/// 3. round stochastically to integers, again until the rounded vector's L2 norm is
///    within [`rounded_l2_norm_bound`] (conditional rounding, Kairouz et al. 2021, with
///    probability β of a retry; β = 0 rounds once);
/// 4. add a Skellam share of variance `(local_stddev · scale)²` to every coordinate;
/// 5. reduce mod 2^`bits` (modular clipping: the sum wraps instead of saturating).
///
/// The masked sum of these words is exact arithmetic mod 2^`bits`;
/// [`SkellamPipeline::decode_sum`] reads it as centred integers and divides by `scale`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkellamPipeline {
    pub l2_clip: f64,
    pub scale: f64,
    pub beta: f64,
    /// One share's noise standard deviation, in the unscaled domain.
    pub local_stddev: f64,
    /// The modulus is 2^bits (1 to 32).
    pub bits: u32,
}

/// Conditional rounding gives up after this many draws (each succeeds with probability
/// at least 1 − β, so 10⁴ failures in a row mean the input is not what it claims).
const MAX_ROUNDING_DRAWS: u32 = 10_000;

impl SkellamPipeline {
    /// TFF's heuristic scale: the largest for which `k` standard deviations of the
    /// aggregate of `n` shares (signal of norm up to `n·c` spread flat over `dim`
    /// coordinates by the rotation, `rho` its flatness, plus rounding and noise) fit in
    /// the modulus: `2^b = 2k·√(ρ/d·c²n² + (γ²/4 + σ²)·n) / γ` solved for `1/γ`.
    pub fn heuristic_scale(local_stddev: f64, l2_clip: f64, bits: u32, n: u32, dim: u64, k: f64, rho: f64) -> Result<f64, Error> {
        let (n, d) = (f64::from(n), dim as f64);
        let room = 2f64.powi(2 * bits as i32) - n * k * k;
        if room.is_nan() || room <= 0.0 {
            return Err(Error::Config(format!(
                "{bits} bits cannot hold {k} standard deviations of the rounding of {n} shares: use more bits, fewer shares or a smaller k"
            )));
        }
        let scale = room.sqrt() / (2.0 * k * (rho / d * l2_clip * l2_clip * n * n + n * local_stddev * local_stddev).sqrt());
        if scale.is_finite() && scale > 0.0 {
            Ok(scale)
        } else {
            Err(Error::Config(format!("no scale fits: clip {l2_clip}, σ {local_stddev}, {bits} bits, {n} shares, dimension {dim}")))
        }
    }

    /// The pipeline for a target ε at `delta` over `steps` releases at sampling rate `q`:
    /// the scale and the noise are chosen together (TFF's `skellam_params`, by fixed-point
    /// iteration here), the noise for `honest_shares` shares (a round's `t − f`: the
    /// shares no coalition can subtract), the scale for `n` shares in the sum, `k = 3`
    /// standard deviations and flatness ρ = 1.
    #[allow(clippy::too_many_arguments)]
    pub fn for_target(
        target_epsilon: f64,
        delta: f64,
        l2_clip: f64,
        bits: u32,
        n: u32,
        honest_shares: u32,
        dim: u64,
        q: f64,
        steps: u64,
        beta: f64,
    ) -> Result<Self, Error> {
        if honest_shares == 0 || honest_shares > n {
            return Err(Error::Config(format!("honest shares {honest_shares} must be in 1..={n}")));
        }
        let shares = f64::from(honest_shares).sqrt();
        let mut local = l2_clip;
        let mut scale = Self::heuristic_scale(local, l2_clip, bits, n, dim, 3.0, 1.0)?;
        for _ in 0..50 {
            let release = SkellamRelease { scale, central_stddev: 1.0, l2_clip, beta, dim, sample_rate: q, steps };
            let next_local = release.central_stddev_for(target_epsilon, delta)? / shares;
            let next_scale = Self::heuristic_scale(next_local, l2_clip, bits, n, dim, 3.0, 1.0)?;
            let settled = (next_scale / scale - 1.0).abs() < 1e-9 && (next_local / local - 1.0).abs() < 1e-9;
            (local, scale) = (next_local, next_scale);
            if settled {
                break;
            }
        }
        // The last step moved the scale a little after σ was calibrated: calibrate σ at
        // the final scale, so the stated ε holds for exactly these parameters.
        let release = SkellamRelease { scale, central_stddev: 1.0, l2_clip, beta, dim, sample_rate: q, steps };
        let local_stddev = release.central_stddev_for(target_epsilon, delta)? / shares;
        let p = SkellamPipeline { l2_clip, scale, beta, local_stddev, bits };
        p.validate()?;
        Ok(p)
    }

    pub fn validate(&self) -> Result<(), Error> {
        let pos = |v: f64| v.is_finite() && v > 0.0;
        if pos(self.l2_clip) && pos(self.scale) && pos(self.local_stddev) && (0.0..1.0).contains(&self.beta) && (1..=32).contains(&self.bits) {
            Ok(())
        } else {
            Err(Error::Config(format!("Skellam pipeline out of range: {self:?}")))
        }
    }

    /// What the accountant analyses when `honest_shares` shares are summed, over `steps`
    /// releases at sampling rate `q`, for vectors of dimension `dim`.
    pub fn release(&self, honest_shares: u32, dim: u64, q: f64, steps: u64) -> SkellamRelease {
        SkellamRelease {
            scale: self.scale,
            central_stddev: self.local_stddev * f64::from(honest_shares).sqrt(),
            l2_clip: self.l2_clip,
            beta: self.beta,
            dim,
            sample_rate: q,
            steps,
        }
    }

    /// 2^bits − 1 (`bits` clamped to 1..=32; [`SkellamPipeline::validate`] refuses
    /// other values).
    fn mask(&self) -> u32 {
        u32::MAX >> (32 - self.bits.clamp(1, 32))
    }

    /// Steps 1–3: the clipped, scaled, conditionally rounded integer vector.
    pub fn round<R: Rng + ?Sized>(&self, x: &[f32], rng: &mut R) -> Result<Vec<i64>, Error> {
        self.validate()?;
        if x.iter().any(|v| !v.is_finite()) {
            return Err(Error::Config("the update has a NaN or infinite coordinate".into()));
        }
        let norm = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
        let factor = self.scale * if norm > self.l2_clip { self.l2_clip / norm } else { 1.0 };
        let scaled: Vec<f64> = x.iter().map(|&v| f64::from(v) * factor).collect();
        let bound = rounded_l2_norm_bound(self.l2_clip * self.scale, self.beta, x.len() as u64);
        for _ in 0..MAX_ROUNDING_DRAWS {
            let rounded: Vec<i64> = scaled
                .iter()
                .map(|&v| {
                    let floor = v.floor();
                    let up = rng.gen::<f64>() < v - floor;
                    floor as i64 + i64::from(up)
                })
                .collect();
            let norm2: f64 = rounded.iter().map(|&v| (v as f64) * (v as f64)).sum();
            if self.beta == 0.0 || norm2.sqrt() <= bound {
                return Ok(rounded);
            }
        }
        Err(Error::Config(format!("conditional rounding found no draw within the norm bound {bound} in {MAX_ROUNDING_DRAWS} tries")))
    }

    /// Steps 1–5: one institution's words, ready to mask.
    pub fn encode<R: Rng + ?Sized>(&self, x: &[f32], rng: &mut R) -> Result<Vec<u32>, Error> {
        let rounded = self.round(x, rng)?;
        let lambda = (self.local_stddev * self.scale).powi(2) / 2.0;
        let mask = self.mask();
        rounded.into_iter().map(|v| Ok((v + sample(rng, lambda)?) as u32 & mask)).collect()
    }

    /// The released sum (of the words mod 2^bits) as reals: each word read as a centred
    /// integer in [−2^(bits−1), 2^(bits−1)), divided by the scale.
    pub fn decode_sum(&self, sum: &[u32]) -> Result<Vec<f64>, Error> {
        self.validate()?;
        let mask = self.mask();
        let half = 1i64 << (self.bits - 1);
        Ok(sum
            .iter()
            .map(|&w| {
                let v = i64::from(w & mask);
                let centred = if v >= half { v - 2 * half } else { v };
                centred as f64 / self.scale
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[derive(serde::Deserialize)]
    struct Reference {
        release: SkellamRelease,
        delta: f64,
        epsilon: f64,
        order: u32,
    }

    #[derive(serde::Deserialize)]
    struct Calibration {
        release: SkellamRelease,
        delta: f64,
        target_epsilon: f64,
        /// The reference's `skellam_local_stddev` times √n.
        central_stddev: f64,
    }

    #[derive(serde::Deserialize)]
    struct References {
        epsilon: Vec<Reference>,
        calibration: Vec<Calibration>,
    }

    fn references() -> References {
        serde_json::from_str(include_str!("../tests/data/tff_skellam.json")).expect("tests/data/tff_skellam.json parses")
    }

    /// ε over a grid of scales, noise, clips, β, dimensions, sampling rates, steps and δ,
    /// against google-research's `skellam_epsilon`.
    #[test]
    fn epsilon_matches_the_reference_implementation() {
        let refs = references();
        assert!(refs.epsilon.len() >= 50, "a grid, not a point");
        let mut worst = 0f64;
        for r in &refs.epsilon {
            let (eps, order) = r.release.epsilon(r.delta).expect("valid");
            let rel = (eps - r.epsilon).abs() / r.epsilon.max(1e-12);
            worst = worst.max(rel);
            // The issue asks for 1%; the port is the same arithmetic, so hold it to 1e-9.
            assert!(rel < 1e-9, "{:?} δ = {}: ε = {eps} (order {order}), reference {} (order {})", r.release, r.delta, r.epsilon, r.order);
        }
        eprintln!("{} cases, largest relative difference {worst:.2e}", refs.epsilon.len());
    }

    /// The noise calibrated for a target ε reaches it within 1%, and agrees with the
    /// reference's calibration (a scalar minimisation there, a bisection here).
    #[test]
    fn calibrated_noise_reaches_the_target() {
        for c in references().calibration {
            let sd = c.release.central_stddev_for(c.target_epsilon, c.delta).expect("calibrates");
            let reached = SkellamRelease { central_stddev: sd, ..c.release }.epsilon(c.delta).expect("valid").0;
            assert!((reached - c.target_epsilon).abs() / c.target_epsilon < 0.01, "target {}, reached {reached}", c.target_epsilon);
            assert!((sd - c.central_stddev).abs() / c.central_stddev < 0.01, "σ = {sd}, reference {}", c.central_stddev);
        }
    }

    /// Sk(λ, λ) has mean 0 and variance 2λ, small λ and large.
    #[test]
    fn the_noise_has_the_stated_variance() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        for lambda in [0.3, 4.0, 9.9, 10.0, 50.0, 2.0e4, 3.0e9] {
            let n = 200_000;
            let draws: Vec<f64> = (0..n).map(|_| sample(&mut rng, lambda).expect("valid λ") as f64).collect();
            let mean = draws.iter().sum::<f64>() / n as f64;
            let var = draws.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64;
            // Standard errors: √(2λ/n) for the mean, about 2λ·√(2/n) for the variance.
            assert!(mean.abs() < 5.0 * (2.0 * lambda / n as f64).sqrt(), "λ = {lambda}: mean {mean}");
            assert!((var / (2.0 * lambda) - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt() + 0.002, "λ = {lambda}: variance {var}, want {}", 2.0 * lambda);
        }
    }

    /// The released sum is exact modular arithmetic: the sum of the clients' integer
    /// inputs plus the sum of their noise draws (drawn again from the same generator
    /// state), whatever wraps on the way.
    #[test]
    fn the_sum_of_noisy_shares_is_exact() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
        let inputs: Vec<Vec<u32>> = (0..5u32).map(|c| (0..1000u32).map(|i| (i * 7919 + c * 104_729).wrapping_mul(2_654_435_761)).collect()).collect();
        let mut noisy_sum = vec![0u32; 1000];
        let mut noise_sum = vec![0i64; 1000];
        for input in &inputs {
            let mut again = rng.clone();
            for n in noise_sum.iter_mut() {
                *n += sample(&mut again, 15.0).expect("valid λ");
            }
            let mut x = input.clone();
            add_noise(&mut x, 30.0, &mut rng).expect("valid variance");
            for (s, v) in noisy_sum.iter_mut().zip(&x) {
                *s = s.wrapping_add(*v);
            }
        }
        for i in 0..1000 {
            let clean = inputs.iter().fold(0u32, |s, x| s.wrapping_add(x[i]));
            assert_eq!(noisy_sum[i], clean.wrapping_add(noise_sum[i] as u32));
        }
        let var = noise_sum.iter().map(|&n| (n * n) as f64).sum::<f64>() / 1000.0;
        assert!((var / 150.0 - 1.0).abs() < 0.2, "five shares of variance 30 sum to variance 150, measured {var}");
    }

    /// The Poisson draws follow the Poisson distribution point by point, on both
    /// sides of the switch from the multiplication method to PTRS: every probability
    /// above 1e-3 within five standard errors of its count in 200,000 draws.
    #[test]
    fn poisson_draws_have_the_poisson_distribution() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        for lambda in [3.0f64, 9.5, 10.0, 20.0, 150.0] {
            let n = 200_000usize;
            let mut counts = std::collections::HashMap::<i64, usize>::new();
            for _ in 0..n {
                *counts.entry(poisson(&mut rng, lambda)).or_default() += 1;
            }
            let mut checked = 0;
            for k in 0..(lambda * 3.0) as i64 + 10 {
                let p = (-lambda + k as f64 * lambda.ln() - libm::lgamma(k as f64 + 1.0)).exp();
                if p < 1e-3 {
                    continue;
                }
                let expected = p * n as f64;
                let got = counts.get(&k).copied().unwrap_or(0) as f64;
                assert!((got - expected).abs() < 5.0 * expected.sqrt(), "λ = {lambda}, k = {k}: {got} draws, expected {expected:.0}");
                checked += 1;
            }
            assert!(checked >= 5, "λ = {lambda}: only {checked} points checked");
        }
    }

    #[test]
    fn bad_noise_parameters_are_refused_not_ignored() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        for lambda in [f64::NAN, f64::INFINITY, -1.0, 1e300] {
            assert!(sample(&mut rng, lambda).is_err(), "λ = {lambda}");
            let mut words = vec![7u32; 4];
            assert!(add_noise(&mut words, 2.0 * lambda, &mut rng).is_err());
            assert_eq!(words, vec![7u32; 4], "no word changed");
        }
        assert_eq!(sample(&mut rng, 0.0).expect("λ = 0"), 0);
    }

    #[test]
    fn the_pipeline_releases_the_sum_with_the_stated_noise() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(11);
        let (n, dim) = (5u32, 4096usize);
        let p = SkellamPipeline::for_target(8.0, 1e-5, 1.0, 20, n, n - 1, dim as u64, 1.0, 10, (-0.5f64).exp()).expect("parameters");
        let eps = p.release(n - 1, dim as u64, 1.0, 10).epsilon(1e-5).expect("valid").0;
        assert!((eps - 8.0).abs() < 0.08, "ε = {eps}");
        let inputs: Vec<Vec<f32>> = (0..n).map(|c| (0..dim).map(|i| (((i * 31 + c as usize * 7) % 17) as f32 - 8.0) * 0.004).collect()).collect();
        let clipped: Vec<Vec<f64>> = inputs
            .iter()
            .map(|x| {
                let norm = x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
                x.iter().map(|&v| f64::from(v) * (1.0f64).min(1.0 / norm)).collect()
            })
            .collect();
        let bound = rounded_l2_norm_bound(p.scale, p.beta, dim as u64);
        for x in &inputs {
            let r = p.round(x, &mut rng).expect("rounds");
            assert!((r.iter().map(|&v| (v * v) as f64).sum::<f64>()).sqrt() <= bound);
        }
        let mut sum = vec![0u32; dim];
        for x in &inputs {
            for (s, w) in sum.iter_mut().zip(p.encode(x, &mut rng).expect("encodes")) {
                *s = s.wrapping_add(w) & p.mask();
            }
        }
        let decoded = p.decode_sum(&sum).expect("valid");
        let errors: Vec<f64> = (0..dim).map(|i| decoded[i] - clipped.iter().map(|x| x[i]).sum::<f64>()).collect();
        let mean = errors.iter().sum::<f64>() / dim as f64;
        let var = errors.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / (dim - 1) as f64;
        // Noise n·σ², plus the rounding's at most n/4 in scaled units.
        let noise = f64::from(n) * p.local_stddev.powi(2);
        let rounding_max = f64::from(n) / 4.0 / p.scale.powi(2);
        assert!(mean.abs() < 5.0 * ((noise + rounding_max) / dim as f64).sqrt(), "bias {mean}");
        assert!(var > noise * 0.9 && var < (noise + rounding_max) * 1.1, "variance {var}, noise {noise}, rounding ≤ {rounding_max}");
    }

    #[test]
    fn modular_clipping_wraps_and_decodes_exactly() {
        let p = SkellamPipeline { l2_clip: 1.0, scale: 10.0, beta: 0.0, local_stddev: 1e-9, bits: 8 };
        // Integers in [-128, 128) survive the wrap; their sum does too while it stays there.
        let words: Vec<u32> = [-100i64, -1, 0, 1, 127].iter().map(|&v| v as u32 & p.mask()).collect();
        let sums: Vec<u32> = words.iter().map(|&w| w.wrapping_add(words[1]) & p.mask()).collect();
        assert_eq!(p.decode_sum(&sums).expect("valid"), vec![-10.1, -0.2, -0.1, 0.0, 12.6]);
        let wide = SkellamPipeline { bits: 32, ..p };
        assert_eq!(wide.decode_sum(&[u32::MAX, 1 << 31, (1 << 31) - 1]).expect("valid"), vec![-0.1, -214_748_364.8, 214_748_364.7]);
        assert!(SkellamPipeline { bits: 0, ..p }.decode_sum(&[1]).is_err());
        assert!(SkellamPipeline { bits: 33, ..p }.decode_sum(&[1]).is_err());
    }

    #[test]
    fn the_scale_leaves_k_deviations_of_room() {
        let (bits, n, dim, sd) = (16u32, 10u32, 1024u64, 0.5f64);
        let s = SkellamPipeline::heuristic_scale(sd, 1.0, bits, n, dim, 3.0, 1.0).expect("fits");
        let (nf, d) = (f64::from(n), dim as f64);
        let spread = 3.0 * (1.0 / d * nf * nf + (1.0 / (4.0 * s * s) + sd * sd) * nf).sqrt() * s;
        assert!((2.0 * spread / 2f64.powi(16) - 1.0).abs() < 1e-9, "{spread}");
        assert!(SkellamPipeline::heuristic_scale(sd, 1.0, 2, 100, dim, 3.0, 1.0).is_err(), "2 bits cannot hold 100 shares");
    }

    #[test]
    fn out_of_range_parameters_are_refused() {
        let ok = SkellamRelease { scale: 100.0, central_stddev: 1.0, l2_clip: 1.0, beta: 0.0, dim: 1000, sample_rate: 1.0, steps: 10 };
        assert!(ok.epsilon(1e-5).is_ok());
        for bad in [
            SkellamRelease { scale: 0.0, ..ok },
            SkellamRelease { central_stddev: f64::NAN, ..ok },
            SkellamRelease { beta: 1.0, ..ok },
            SkellamRelease { dim: 0, ..ok },
            SkellamRelease { sample_rate: 0.0, ..ok },
        ] {
            assert!(bad.epsilon(1e-5).is_err(), "{bad:?}");
        }
        assert!(SkellamRelease { steps: 0, ..ok }.epsilon(1e-5).is_err());
        assert!(ok.epsilon(0.0).is_err());
        assert!(ok.central_stddev_for(-1.0, 1e-5).is_err());
    }
}
