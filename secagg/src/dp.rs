//! Distributed differential privacy for secure aggregation: each client clips its update
//! to L2 norm `C` and adds Gaussian noise of standard deviation `z·C/√(t − f)`, where `t`
//! is the round's minimum number of survivors and `f` the number of colluding
//! participants the round tolerates. Every participant receives the released sum and
//! knows its own noise share; a coalition of `f` of them can subtract theirs, and what is
//! left, at least `t − f` honest shares, still carries noise of standard deviation `z·C`.
//! So `z` is the guarantee against such a coalition (the aggregator and its host
//! included); against an outsider, who knows no share, the sum of at least `t` shares
//! gives the larger multiplier `z·√(t / (t − f))` ([`DpParams::outsider_noise_multiplier`]).
//!
//! **Adjacency.** The release names who was included, so participation is public. What is
//! protected is the content of one institution's update: two neighbouring datasets differ
//! in one institution's update, replaced by zeros (zero-out adjacency, sensitivity `C`).
//! Under replace-one adjacency the sensitivity would be `2C`; the figures here are not
//! that guarantee. [`ADJACENCY`] names it wherever ε is shown.
//!
//! The accountant is Rényi DP (Mironov 2017): one round costs `α/(2z²)` at order `α`,
//! rounds compose by addition, and the conversion to (ε, δ) is the one of Balle et al.
//! 2020 (Hypothesis Testing Interpretations), with Opacus' default orders, so figures
//! match Opacus' `RDPAccountant` for sampling rate 1.

use serde::{Deserialize, Serialize};

use crate::Error;

/// The neighbouring relation every ε of the institution-level mechanism is stated under.
pub const ADJACENCY: &str = "zero-out";

/// One sentence saying what [`ADJACENCY`] protects, for reports and CLIs.
pub const ADJACENCY_EXPLAINED: &str = "zero-out adjacency: one institution's update replaced by zeros (sensitivity C); who took part is public";

/// The range clip must leave this many standard deviations of a client's noise share
/// above its clipped update: `clip ≥ C + RANGE_SIGMAS·σ`, so a coordinate is clamped
/// with probability below 2·Φ(−6) ≈ 2·10⁻⁹.
pub const RANGE_SIGMAS: f64 = 6.0;

/// The DP parameters of a federation, fixed for all its rounds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpParams {
    /// Noise multiplier `z`: the released sum carries N(0, (z·C)²) per coordinate.
    pub noise_multiplier: f64,
    /// L2 bound `C` on each client's update.
    pub l2_clip: f64,
    /// The δ of (ε, δ).
    pub delta: f64,
    /// Total ε the federation may spend over all its rounds.
    pub epsilon_budget: f64,
    /// Colluding participants `f` the noise is calibrated against (at least 1 for a new
    /// round): any `f` participants who pool their own noise shares still face noise
    /// multiplier `z`. 0 is a round configured before this field existed: its noise was
    /// split over all `t` shares, so `z` held against outsiders only; such rounds are
    /// read and accounted ([`DpParams::coalition_noise_multiplier`]), never opened.
    #[serde(default)]
    pub colluders: u32,
}

impl DpParams {
    pub fn validate(&self) -> Result<(), Error> {
        let ok = |v: f64| v.is_finite() && v > 0.0;
        if !ok(self.noise_multiplier) || !ok(self.l2_clip) || !ok(self.epsilon_budget) {
            return Err(Error::Config("dp: noise_multiplier, l2_clip and epsilon_budget must be positive".into()));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(Error::Config(format!("dp: delta must be in (0, 1), got {}", self.delta)));
        }
        if self.colluders == 0 {
            return Err(Error::Config("dp: colluders must be at least 1: every participant knows its own noise share and can subtract it from the sum".into()));
        }
        Ok(())
    }

    /// The honest shares a coalition of `colluders` participants cannot subtract, in a
    /// sum of at least `min_survivors` inputs.
    fn honest_shares(&self, min_survivors: u32) -> u32 {
        min_survivors.saturating_sub(self.colluders).max(1)
    }

    /// Standard deviation of one client's noise share when at least `min_survivors`
    /// inputs enter the sum: `t − f` of them carry `z·C` together.
    pub fn client_noise_std(&self, min_survivors: u32) -> f64 {
        self.noise_multiplier * self.l2_clip / f64::from(self.honest_shares(min_survivors)).sqrt()
    }

    /// The noise multiplier an outsider faces (someone who knows no noise share): the sum
    /// of at least `min_survivors` shares, `z·√(t / (t − f))`.
    pub fn outsider_noise_multiplier(&self, min_survivors: u32) -> f64 {
        let honest = self.honest_shares(min_survivors);
        self.noise_multiplier * (f64::from(min_survivors.max(honest)) / f64::from(honest)).sqrt()
    }

    /// The multiplier a single participant faces after subtracting its own share: `z`,
    /// except for a round from before `colluders` (0), whose `t` shares each carried
    /// `z·C/√t`, leaving `z·√((t − 1)/t)` to an insider. The privacy ledgers charge this.
    pub fn coalition_noise_multiplier(&self, min_survivors: u32) -> f64 {
        if self.colluders > 0 {
            return self.noise_multiplier;
        }
        let t = f64::from(min_survivors.max(2));
        self.noise_multiplier * ((t - 1.0) / t).sqrt()
    }

    /// The smallest per-coordinate range clip that leaves [`RANGE_SIGMAS`] standard
    /// deviations of a client's noise share above its clipped update.
    pub fn min_range_clip(&self, min_survivors: u32) -> f64 {
        self.l2_clip + RANGE_SIGMAS * self.client_noise_std(min_survivors)
    }

    /// ε spent after `rounds` rounds.
    pub fn epsilon_after(&self, rounds: u64) -> f64 {
        epsilon(self.noise_multiplier, rounds, self.delta)
    }

    /// How many rounds the budget allows.
    pub fn max_rounds(&self) -> u64 {
        let mut n = 0u64;
        while n < 1_000_000 && self.epsilon_after(n + 1) <= self.epsilon_budget {
            n += 1;
        }
        n
    }
}

pub use crate::rdp::default_orders;

/// RDP of `rounds` compositions of the Gaussian mechanism with noise multiplier `z`, at order `alpha`.
pub fn gaussian_rdp(z: f64, rounds: u64, alpha: f64) -> f64 {
    rounds as f64 * alpha / (2.0 * z * z)
}

/// (ε, δ)-DP of `rounds` Gaussian releases with noise multiplier `z`: the best order's
/// conversion. 0 rounds cost nothing.
pub fn epsilon(z: f64, rounds: u64, delta: f64) -> f64 {
    epsilon_of(&[(z, rounds)], delta)
}

/// Records one more release at noise multiplier `z` in RDP groups (multiplier, rounds),
/// the form [`epsilon_of`] composes.
pub fn add_release(groups: &mut Vec<(f64, u64)>, z: f64) {
    match groups.iter_mut().find(|(g, _)| *g == z) {
        Some(g) => g.1 += 1,
        None => groups.push((z, 1)),
    }
}

/// ε of a sequence of Gaussian releases given as (noise multiplier, how many rounds used
/// it): RDP adds up order by order across the groups, then converts once.
pub fn epsilon_of(groups: &[(f64, u64)], delta: f64) -> f64 {
    if groups.iter().all(|&(_, n)| n == 0) {
        return 0.0;
    }
    default_orders()
        .into_iter()
        .map(|a| {
            let rdp: f64 = groups.iter().map(|&(z, n)| gaussian_rdp(z, n, a)).sum();
            (rdp - (delta.ln() + a.ln()) / (a - 1.0) + ((a - 1.0) / a).ln()).max(0.0)
        })
        .fold(f64::INFINITY, f64::min)
}

/// The smallest noise multiplier (to 0.1%) with which `rounds` rounds spend at most `epsilon`.
pub fn noise_multiplier_for(epsilon_target: f64, rounds: u64, delta: f64) -> Result<f64, crate::Error> {
    let (mut lo, mut hi) = (0.01f64, 1.0f64);
    while epsilon(hi, rounds, delta) > epsilon_target && hi < 1e6 {
        hi *= 2.0;
    }
    if epsilon(hi, rounds, delta) > epsilon_target {
        return Err(crate::Error::Config(format!(
            "ε = {epsilon_target} over {rounds} round(s) at δ = {delta:e} is out of reach: this accountant's RDP orders give at least ε = {:.4} at any noise",
            epsilon(hi, rounds, delta)
        )));
    }
    while hi - lo > hi * 1e-3 {
        let mid = (lo + hi) / 2.0;
        if epsilon(mid, rounds, delta) > epsilon_target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by Opacus 1.6.0 for sampling rate 1:
    /// `get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS,
    ///   rdp=compute_rdp(q=1.0, noise_multiplier=z, steps=T, orders=…), delta=d)[0]`.
    #[test]
    fn matches_opacus_within_one_percent() {
        for (z, t, d, opacus) in
            [(1.0, 10, 1e-5, 19.05359753163139), (0.8, 3, 1e-5, 11.819742782514052), (2.0, 100, 1e-6, 37.42921619684438), (5.0, 1, 1e-5, 0.794522032537103)]
        {
            let ours = epsilon(z, t, d);
            assert!((ours - opacus).abs() / opacus < 0.01, "z={z} T={t} δ={d}: {ours} vs Opacus {opacus}");
        }
    }

    #[test]
    fn mixed_noise_composes_by_order() {
        let mixed = epsilon_of(&[(1.0, 2), (2.0, 3)], 1e-5);
        assert!(mixed > epsilon(2.0, 5, 1e-5) && mixed < epsilon(1.0, 5, 1e-5));
        assert_eq!(epsilon_of(&[(1.0, 4)], 1e-5), epsilon(1.0, 4, 1e-5));
        assert_eq!(epsilon_of(&[], 1e-5), 0.0);
    }

    #[test]
    fn epsilon_grows_with_rounds_and_shrinks_with_noise() {
        assert_eq!(epsilon(1.0, 0, 1e-5), 0.0);
        assert!(epsilon(1.0, 2, 1e-5) > epsilon(1.0, 1, 1e-5));
        assert!(epsilon(2.0, 5, 1e-5) < epsilon(1.0, 5, 1e-5));
    }

    #[test]
    fn calibration_inverts_the_accountant() {
        let z = noise_multiplier_for(8.0, 5, 1e-5).unwrap();
        assert!(epsilon(z, 5, 1e-5) <= 8.0);
        assert!(epsilon(z * 0.99, 5, 1e-5) > 8.0);
        let p = DpParams { noise_multiplier: z, l2_clip: 1.0, delta: 1e-5, epsilon_budget: 8.0, colluders: 1 };
        assert_eq!(p.max_rounds(), 5);
        // Reachable targets are met; unreachable ones are an error naming the floor,
        // never a silent 2^20.
        for (target, rounds) in [(0.5, 1), (2.0, 3), (23.5, 1), (50.0, 3)] {
            let z = noise_multiplier_for(target, rounds, 1e-5).unwrap();
            assert!(epsilon(z, rounds, 1e-5) <= target, "{target} over {rounds}");
        }
        let err = noise_multiplier_for(0.05, 1, 1e-5).unwrap_err().to_string();
        assert!(err.contains("out of reach") && err.contains("at least"), "{err}");
    }

    #[test]
    fn noise_shares_add_up_to_the_mechanism() {
        let p = DpParams { noise_multiplier: 1.2, l2_clip: 0.5, delta: 1e-5, epsilon_budget: 10.0, colluders: 2 };
        let t = 7;
        // t − f honest shares carry z·C; all t carry the outsider's multiplier.
        let honest_var = f64::from(t - 2) * p.client_noise_std(t).powi(2);
        assert!((honest_var.sqrt() - 1.2 * 0.5).abs() < 1e-12);
        let total_var = f64::from(t) * p.client_noise_std(t).powi(2);
        assert!((total_var.sqrt() - p.outsider_noise_multiplier(t) * 0.5).abs() < 1e-12);
        assert!((p.outsider_noise_multiplier(t) - 1.2 * (7.0f64 / 5.0).sqrt()).abs() < 1e-12);
        assert!(epsilon(p.outsider_noise_multiplier(t), 3, 1e-5) < epsilon(1.2, 3, 1e-5));
        assert!((p.min_range_clip(t) - (0.5 + RANGE_SIGMAS * p.client_noise_std(t))).abs() < 1e-12);
    }

    #[test]
    fn bad_parameters_are_refused() {
        let good = DpParams { noise_multiplier: 1.0, l2_clip: 1.0, delta: 1e-5, epsilon_budget: 1.0, colluders: 1 };
        assert!(good.validate().is_ok());
        // A configuration that does not name its colluders is refused for a new round
        // (0 reads rounds from before the field), and is accounted as it was run.
        let legacy: DpParams = serde_json::from_str(r#"{"noise_multiplier": 1.0, "l2_clip": 1.0, "delta": 1e-5, "epsilon_budget": 1.0}"#).unwrap();
        assert_eq!(legacy.colluders, 0);
        assert!(legacy.validate().unwrap_err().to_string().contains("colluders"));
        assert!((legacy.coalition_noise_multiplier(3) - (2.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(legacy.outsider_noise_multiplier(3), 1.0);
        assert_eq!(good.coalition_noise_multiplier(3), 1.0);
        assert!(DpParams { colluders: 0, ..good }.validate().unwrap_err().to_string().contains("colluders"));
        assert!(DpParams { delta: 0.0, ..good }.validate().is_err());
        assert!(DpParams { noise_multiplier: f64::NAN, ..good }.validate().is_err());
        assert!(DpParams { l2_clip: -1.0, ..good }.validate().is_err());
    }
}
