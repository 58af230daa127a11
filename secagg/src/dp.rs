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
//!
//! **Exact noise.** With [`DpParams::skellam`] the shares are Skellam, drawn in the
//! integers after quantization ([`crate::skellam`]), with the same σ per share; a release
//! is then the [`Mechanism::Skellam`] of Google's reference accountant, and ledgers
//! compose it with Gaussian releases order by order ([`epsilon_of`]).

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
    /// Exact integer noise: each institution draws its share from the Skellam
    /// distribution after quantizing ([`crate::skellam`]), so the released sum is exactly
    /// the mechanism the accountant analyses. Absent: continuous Gaussian shares, rounded
    /// into the modulus with the update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skellam: Option<SkellamNoise>,
}

/// The quantization of a round with Skellam noise: TFF's distributed-DP pipeline of
/// clipping, scaling, conditional rounding and integer noise ([`crate::skellam`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkellamNoise {
    /// The factor an update is scaled by before rounding to integers. A round's
    /// configuration always carries it; a federation's schedule may leave it out, and each
    /// round is then given [`crate::config::RoundConfig::skellam_scale`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// Conditional rounding's β in [0, 1) (0: unconditional rounding, whose sensitivity
    /// bound is looser).
    #[serde(default = "default_beta")]
    pub beta: f64,
}

/// TFF's default β for conditional rounding, e^(−1/2).
pub fn default_beta() -> f64 {
    (-0.5f64).exp()
}

/// Whom a release's ε is stated against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Against {
    /// A coalition of the round's `colluders` participants, who subtract their own noise
    /// shares: what the budget is charged.
    Coalition,
    /// An outsider, who knows no noise share.
    Outsider,
}

/// One released round as an accountant sees it: the mechanism and the parameters its RDP
/// curve depends on. Releases with equal mechanisms are counted together.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Mechanism {
    /// The Gaussian mechanism with this noise multiplier (sensitivity `C`).
    Gaussian { noise_multiplier: f64 },
    /// One Skellam release (its `steps` and `sample_rate` are 1).
    Skellam(crate::skellam::SkellamRelease),
}

/// What a release whose mechanism cannot be known is charged as: no noise, ε infinite.
pub const NO_NOISE: Mechanism = Mechanism::Gaussian { noise_multiplier: 0.0 };

impl Mechanism {
    /// RDP of one release at integer order `alpha`.
    fn rdp_at(&self, alpha: u32) -> f64 {
        match self {
            Mechanism::Gaussian { noise_multiplier } => gaussian_rdp(*noise_multiplier, 1, f64::from(alpha)),
            Mechanism::Skellam(r) => r.rdp_of_one(alpha),
        }
    }
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
        if let Some(sk) = &self.skellam {
            if !(0.0..1.0).contains(&sk.beta) {
                return Err(Error::Config(format!("dp.skellam.beta must be in [0, 1), got {}", sk.beta)));
            }
            if let Some(scale) = sk.scale {
                if !(scale.is_finite() && scale > 0.0) {
                    return Err(Error::Config(format!("dp.skellam.scale must be positive and finite, got {scale}")));
                }
            }
        }
        Ok(())
    }

    /// The mechanism one release of a round with `min_survivors` and an encoded update of
    /// `dim` coordinates runs, as seen by `against`. For Skellam the central noise is the
    /// sum of the shares that `against` cannot subtract; a schedule without a scale (not
    /// yet a round) cannot be accounted and gives `None`.
    pub fn mechanism(&self, min_survivors: u32, dim: u64, against: Against) -> Option<Mechanism> {
        let z = match against {
            Against::Coalition => self.coalition_noise_multiplier(min_survivors),
            Against::Outsider => self.outsider_noise_multiplier(min_survivors),
        };
        match self.skellam {
            None => Some(Mechanism::Gaussian { noise_multiplier: z }),
            Some(SkellamNoise { scale, beta }) => Some(Mechanism::Skellam(crate::skellam::SkellamRelease {
                scale: scale?,
                central_stddev: z * self.l2_clip,
                l2_clip: self.l2_clip,
                beta,
                dim,
                sample_rate: 1.0,
                steps: 1,
            })),
        }
    }

    /// The Skellam pipeline a client of such a round encodes with (`None` for Gaussian
    /// rounds and for a schedule without a scale).
    pub fn skellam_pipeline(&self, min_survivors: u32, modulus_bits: u8) -> Option<crate::skellam::SkellamPipeline> {
        let sk = self.skellam?;
        Some(crate::skellam::SkellamPipeline {
            l2_clip: self.l2_clip,
            scale: sk.scale?,
            beta: sk.beta,
            local_stddev: self.client_noise_std(min_survivors),
            bits: u32::from(modulus_bits),
        })
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

    /// ε spent after `rounds` rounds of Gaussian noise at z (a Skellam round costs a
    /// little more: see [`crate::config::RoundConfig::dp_mechanism`]).
    pub fn epsilon_after(&self, rounds: u64) -> f64 {
        epsilon(self.noise_multiplier, rounds, self.delta)
    }

    /// How many Gaussian rounds at z the budget allows.
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
    epsilon_of_gaussian(&[(z, rounds)], delta)
}

/// Records one more release of `m` in RDP groups (mechanism, rounds), the form
/// [`epsilon_of`] composes.
pub fn add_release(groups: &mut Vec<(Mechanism, u64)>, m: Mechanism) {
    match groups.iter_mut().find(|(g, _)| *g == m) {
        Some(g) => g.1 += 1,
        None => groups.push((m, 1)),
    }
}

/// ε of a sequence of releases given as (mechanism, how many rounds used it): RDP adds up
/// order by order across the groups, then converts once. Gaussian releases alone are
/// accounted at Opacus' orders ([`epsilon_of_gaussian`]); with a Skellam release the
/// orders are the integers 2..=128 and 256 of Google's reference, where its bound holds.
pub fn epsilon_of(groups: &[(Mechanism, u64)], delta: f64) -> f64 {
    if groups.iter().all(|&(_, n)| n == 0) {
        return 0.0;
    }
    let gaussian: Option<Vec<(f64, u64)>> = groups
        .iter()
        .map(|&(m, n)| match m {
            Mechanism::Gaussian { noise_multiplier } => Some((noise_multiplier, n)),
            Mechanism::Skellam(_) => None,
        })
        .collect();
    if let Some(g) = gaussian {
        return epsilon_of_gaussian(&g, delta);
    }
    let rdp: Vec<(u32, f64)> = crate::skellam::orders().map(|a| (a, groups.iter().map(|&(m, n)| n as f64 * m.rdp_at(a)).sum())).collect();
    crate::skellam::rdp_to_epsilon(&rdp, delta).0
}

/// ε of a sequence of Gaussian releases given as (noise multiplier, how many rounds used
/// it), at Opacus' default orders.
pub fn epsilon_of_gaussian(groups: &[(f64, u64)], delta: f64) -> f64 {
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
    noise_multiplier_for_mechanism(epsilon_target, rounds, delta, |z| Ok(Mechanism::Gaussian { noise_multiplier: z }))
}

/// The smallest noise multiplier (to 0.1%) with which `rounds` releases of `mechanism(z)`
/// spend at most `epsilon_target`, for a mechanism whose ε falls as z grows (a Skellam
/// round's scale may change with z: the closure gives the round's mechanism at z).
pub fn noise_multiplier_for_mechanism(
    epsilon_target: f64,
    rounds: u64,
    delta: f64,
    mechanism: impl Fn(f64) -> Result<Mechanism, crate::Error>,
) -> Result<f64, crate::Error> {
    let epsilon = |z: f64| mechanism(z).map(|m| epsilon_of(&[(m, rounds)], delta));
    let (mut lo, mut hi) = (0.01f64, 1.0f64);
    while epsilon(hi)? > epsilon_target && hi < 1e6 {
        hi *= 2.0;
    }
    if epsilon(hi)? > epsilon_target {
        return Err(crate::Error::Config(format!(
            "ε = {epsilon_target} over {rounds} round(s) at δ = {delta:e} is out of reach: this accountant's RDP orders give at least ε = {:.4} at any noise",
            epsilon(hi)?
        )));
    }
    while hi - lo > hi * 1e-3 {
        let mid = (lo + hi) / 2.0;
        if epsilon(mid)? > epsilon_target {
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
        let g = |z: f64| Mechanism::Gaussian { noise_multiplier: z };
        let mixed = epsilon_of(&[(g(1.0), 2), (g(2.0), 3)], 1e-5);
        assert!(mixed > epsilon(2.0, 5, 1e-5) && mixed < epsilon(1.0, 5, 1e-5));
        assert_eq!(epsilon_of(&[(g(1.0), 4)], 1e-5), epsilon(1.0, 4, 1e-5));
        assert_eq!(epsilon_of(&[], 1e-5), 0.0);
        assert!(epsilon_of(&[(g(1.0), 1), (NO_NOISE, 1)], 1e-5).is_infinite(), "a release of unknown noise is charged as none");
    }

    fn skellam_params(scale: Option<f64>) -> DpParams {
        DpParams {
            noise_multiplier: 1.1,
            l2_clip: 0.5,
            delta: 1e-5,
            epsilon_budget: 10.0,
            colluders: 2,
            skellam: Some(SkellamNoise { scale, beta: default_beta() }),
        }
    }

    /// A Skellam round is the reference accountant's release: z·C of central noise
    /// against the coalition (the t − f shares it cannot subtract), z·C·√(t/(t − f))
    /// against an outsider, and T rounds through the ledger compose to exactly the
    /// reference's T steps.
    #[test]
    fn skellam_rounds_are_the_reference_release() {
        let p = skellam_params(Some(3000.0));
        let (t, dim) = (7, 4096);
        let Some(Mechanism::Skellam(coalition)) = p.mechanism(t, dim, Against::Coalition) else { panic!("a Skellam round") };
        assert!((coalition.central_stddev - 1.1 * 0.5).abs() < 1e-12);
        assert_eq!((coalition.scale, coalition.dim, coalition.steps, coalition.sample_rate), (3000.0, dim, 1, 1.0));
        let Some(Mechanism::Skellam(outsider)) = p.mechanism(t, dim, Against::Outsider) else { panic!("a Skellam round") };
        assert!((outsider.central_stddev - 1.1 * 0.5 * (7.0f64 / 5.0).sqrt()).abs() < 1e-12);
        // The pipeline's share: t − f of them make the coalition's central noise.
        let pipe = p.skellam_pipeline(t, 20).unwrap();
        assert!((pipe.local_stddev * 5.0f64.sqrt() - coalition.central_stddev).abs() < 1e-12);
        for rounds in [1u64, 3, 40] {
            let through_ledger = epsilon_of(&[(Mechanism::Skellam(coalition), rounds)], 1e-5);
            let reference = crate::skellam::SkellamRelease { steps: rounds, ..coalition }.epsilon(1e-5).unwrap().0;
            assert!((through_ledger - reference).abs() <= 1e-12 * reference, "{rounds} rounds: {through_ledger} vs {reference}");
        }
        // A schedule without its scale is not yet a round: nothing to account.
        assert_eq!(skellam_params(None).mechanism(t, dim, Against::Coalition), None);
        assert_eq!(skellam_params(None).skellam_pipeline(t, 20), None);
    }

    /// Mixed releases compose order by order: a Skellam round costs a little more than the
    /// Gaussian at the same noise (its rounding), and at a scale where rounding vanishes
    /// the two agree.
    #[test]
    fn skellam_and_gaussian_rounds_compose() {
        let g = |z: f64| Mechanism::Gaussian { noise_multiplier: z };
        let at = |scale: f64| skellam_params(Some(scale)).mechanism(7, 4096, Against::Coalition).unwrap();
        let fine = epsilon_of(&[(at(1e7), 5)], 1e-5);
        let gaussian = epsilon(1.1, 5, 1e-5);
        assert!((fine / gaussian - 1.0).abs() < 0.01, "Skellam at a fine scale {fine} vs Gaussian {gaussian}");
        let coarse = epsilon_of(&[(at(200.0), 5)], 1e-5);
        assert!(coarse > fine, "coarser rounding costs more: {coarse} vs {fine}");
        let mixed = epsilon_of(&[(g(1.1), 2), (at(200.0), 3)], 1e-5);
        assert!(mixed > epsilon_of(&[(g(1.1), 2)], 1e-5) && mixed > epsilon_of(&[(at(200.0), 3)], 1e-5));
        assert!(mixed < epsilon_of(&[(at(200.0), 5)], 1e-5) * 1.0001);
    }

    #[test]
    fn bad_skellam_parameters_are_refused() {
        assert!(skellam_params(Some(100.0)).validate().is_ok());
        for (scale, beta) in [(Some(0.0), 0.5), (Some(f64::NAN), 0.5), (Some(-3.0), 0.5), (Some(10.0), 1.0), (Some(10.0), -0.1), (None, f64::NAN)] {
            let p = DpParams { skellam: Some(SkellamNoise { scale, beta }), ..skellam_params(None) };
            assert!(p.validate().unwrap_err().to_string().contains("dp.skellam"), "{scale:?}, {beta}");
        }
        // β defaults to TFF's e^(−1/2) when a configuration leaves it out.
        let p: DpParams =
            serde_json::from_str(r#"{"noise_multiplier": 1.0, "l2_clip": 1.0, "delta": 1e-5, "epsilon_budget": 1.0, "colluders": 1, "skellam": {}}"#).unwrap();
        assert_eq!(p.skellam, Some(SkellamNoise { scale: None, beta: default_beta() }));
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
        let p = DpParams { noise_multiplier: z, l2_clip: 1.0, delta: 1e-5, epsilon_budget: 8.0, colluders: 1, skellam: None };
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
        let p = DpParams { noise_multiplier: 1.2, l2_clip: 0.5, delta: 1e-5, epsilon_budget: 10.0, colluders: 2, skellam: None };
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
        let good = DpParams { noise_multiplier: 1.0, l2_clip: 1.0, delta: 1e-5, epsilon_budget: 1.0, colluders: 1, skellam: None };
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
