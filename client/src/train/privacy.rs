//! The institution's side of distributed DP: clip the update to L2 norm `C`, then add
//! its share of the Gaussian noise (see `tessera_secagg::dp`). The noise comes from the
//! operating system's CSPRNG: a predictable noise share could be subtracted again.

use rand::{CryptoRng, RngCore};
use rand_distr::{Distribution, StandardNormal};

/// Scales `v` down to L2 norm `c` when it is longer; returns the norm before clipping.
pub fn clip_l2(v: &mut [f32], c: f64) -> f64 {
    let l2 = |v: &[f32]| v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
    let norm = l2(v);
    if norm > c && norm > 0.0 {
        let original = v.to_vec();
        let mut s = c / norm;
        // Rounding each scaled coordinate to f32 can leave the norm a few ulps above C;
        // shrink the factor until the f32 vector itself is within the bound.
        for _ in 0..64 {
            for (x, o) in v.iter_mut().zip(&original) {
                *x = (f64::from(*o) * s) as f32;
            }
            let got = l2(v);
            if got <= c {
                break;
            }
            s *= (c / got) * (1.0 - 1e-7);
        }
    }
    norm
}

/// Adds independent N(0, std²) noise to every coordinate.
pub fn add_gaussian_noise<R: RngCore + CryptoRng>(v: &mut [f32], std: f64, rng: &mut R) {
    for x in v.iter_mut() {
        let z: f64 = StandardNormal.sample(rng);
        *x = (f64::from(*x) + z * std) as f32;
    }
}

/// Clips `v` in place for a round with these DP parameters and, for Gaussian noise, adds
/// this institution's share; returns the norm before clipping. A round with Skellam noise
/// gets its share later, drawn in the integers as the update is quantized
/// (`tessera_secagg::quantize`), so nothing is added here.
pub fn privatize(v: &mut [f32], dp: &tessera_secagg::dp::DpParams, min_survivors: u32) -> f64 {
    let norm = clip_l2(v, dp.l2_clip);
    if dp.skellam.is_none() {
        add_gaussian_noise(v, dp.client_noise_std(min_survivors), &mut tessera_secagg::crypto::seeded_csprng());
    }
    norm
}

/// One line for an institution's log: what its DP round does to its update.
pub fn describe(dp: &tessera_secagg::dp::DpParams, min_survivors: u32) -> String {
    let noise = match dp.skellam {
        None => format!("Gaussian noise share σ = {:.4} added", dp.client_noise_std(min_survivors)),
        Some(sk) => format!(
            "Skellam noise share σ = {:.4} drawn in the integers as it is quantized (scale {:e}, conditional rounding β = {:.3}; the ε figures include the rounding, a little above the Gaussian's at the same z)",
            dp.client_noise_std(min_survivors),
            sk.scale.unwrap_or(f64::NAN),
            sk.beta
        ),
    };
    format!(
        "clipped to L2 {}; {noise}: z = {} holds against any {} colluding participant(s), z = {:.3} against outsiders; {}",
        dp.l2_clip,
        dp.noise_multiplier,
        dp.colluders,
        dp.outsider_noise_multiplier(min_survivors),
        tessera_secagg::dp::ADJACENCY_EXPLAINED
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn clipping_bounds_the_norm(v in proptest::collection::vec(-100.0f32..100.0, 1..200), c in 0.01f64..50.0) {
            let mut w = v.clone();
            let before = clip_l2(&mut w, c);
            let after = w.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
            prop_assert!(after <= c, "norm {after} > {c}");
            if before <= c {
                prop_assert_eq!(w, v);
            } else {
                // Direction kept.
                let dot: f64 = w.iter().zip(&v).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                prop_assert!(dot > 0.0);
            }
        }
    }

    /// Cases where rounding each scaled coordinate up would leave the norm above C.
    #[test]
    fn clipped_norm_is_within_the_bound_in_f32() {
        for (len, value, c) in [(10_007usize, 1.0f32, 0.3f64), (1 << 16, 0.1, 0.7), (3, 3.4e38, 1e-3), (1000, 1.0000001, 1.1)] {
            let mut v = vec![value; len];
            clip_l2(&mut v, c);
            let after = v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
            assert!(after <= c && after > c * 0.999, "{len} × {value}, C = {c}: norm {after}");
        }
    }

    /// A Skellam round's update is clipped here and left without noise: its share is
    /// drawn in the integers when it is quantized.
    #[test]
    fn skellam_rounds_are_clipped_here_and_noised_when_quantized() {
        let dp = tessera_secagg::dp::DpParams {
            noise_multiplier: 1.1,
            l2_clip: 0.3,
            delta: 1e-5,
            epsilon_budget: 10.0,
            colluders: 1,
            skellam: Some(tessera_secagg::dp::SkellamNoise { scale: Some(1e4), beta: 0.5 }),
        };
        let mut v = vec![0.6f32, 0.8, 0.0];
        let norm = privatize(&mut v, &dp, 4);
        assert!((norm - 1.0).abs() < 1e-6);
        let want = [0.18f32, 0.24, 0.0];
        assert!(v.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{v:?}");
        assert!(describe(&dp, 4).contains("Skellam"));
        let gaussian = tessera_secagg::dp::DpParams { skellam: None, ..dp };
        let mut v = vec![0.6f32, 0.8, 0.0];
        privatize(&mut v, &gaussian, 4);
        assert!(v[2] != 0.0, "a Gaussian round's share is added here");
    }

    /// The noise share's variance is the accountant's assumption, insiders included: over
    /// 400k draws each share's sample variance is within 1.5% (about 7 standard errors)
    /// of σ²; after a coalition of f participants subtracts its own shares from the sum
    /// of t, what is left has at least the variance (zC)² the reported ε assumes; the
    /// whole sum has the outsider's (z_out·C)².
    #[test]
    fn noise_left_after_colluders_subtract_their_shares_is_what_the_accountant_assumes() {
        for (t, f) in [(4u32, 1u32), (5, 2)] {
            let dp = tessera_secagg::dp::DpParams { noise_multiplier: 1.1, l2_clip: 0.3, delta: 1e-5, epsilon_budget: 10.0, colluders: f, skellam: None };
            let n = 400_000;
            let mut total = vec![0f64; n];
            let mut honest = vec![0f64; n];
            for share_index in 0..t {
                let mut share = vec![0f32; n];
                add_gaussian_noise(&mut share, dp.client_noise_std(t), &mut tessera_secagg::crypto::seeded_csprng());
                let var = share.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / n as f64;
                let expected = dp.client_noise_std(t).powi(2);
                assert!((var / expected - 1.0).abs() < 0.015, "share variance {var} vs {expected}");
                for i in 0..n {
                    total[i] += f64::from(share[i]);
                    // The colluders know the first f shares and subtract them.
                    if share_index >= f {
                        honest[i] += f64::from(share[i]);
                    }
                }
            }
            let var = |v: &[f64]| {
                let mean = v.iter().sum::<f64>() / v.len() as f64;
                (mean, v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64)
            };
            let insider = (dp.noise_multiplier * dp.l2_clip).powi(2);
            let (mean, left) = var(&honest);
            assert!(mean.abs() < 5.0 * (insider / n as f64).sqrt(), "mean {mean}");
            // At least (zC)² up to sampling error (7 standard errors of a variance
            // estimate from 400k draws: 7·√(2/n) ≈ 1.6%).
            assert!(left >= insider * (1.0 - 0.016), "t = {t}, f = {f}: {left} left after the coalition, the insider ε assumes {insider}");
            assert!(left / insider - 1.0 < 0.016, "t = {t}, f = {f}: {left} vs {insider}");
            let outsider = (dp.outsider_noise_multiplier(t) * dp.l2_clip).powi(2);
            let (_, all) = var(&total);
            assert!((all / outsider - 1.0).abs() < 0.016, "t = {t}, f = {f}: sum variance {all} vs (z_out·C)² {outsider}");
            // The naive calibration (noise split over all t shares) would leave less
            // than the accountant assumes: the gap this calibration closes.
            assert!(insider * f64::from(t - f) / f64::from(t) < left * (1.0 - 0.1));
        }
    }
}
