//! Security floors: what an institution requires of any round it joins, whatever the
//! server proposes. The round configuration comes from the aggregator, so a client that
//! took it as given would accept `min_survivors = 1`, a two-member roster padded with the
//! operator's own nodes, or no DP at all. [`SecurityFloors::check`] refuses such a round
//! before the client advertises anything.
//!
//! The consistency check of SecAgg (Bonawitz et al. 2017, Sec. 4; Bell et al. 2020,
//! Sec. 3) forces a single survivor set U3 only while two groups of honest signers, each
//! at least `min_survivors` strong, cannot both exist: with `n` participants of which a
//! fraction γ may collude with the server, that needs `min_survivors > n·(1 + γ)/2`. The
//! default floor is `min_survivors > n/2` (γ = 0); an institution that assumes colluders
//! raises `min_survivor_fraction` to `(1 + γ)/2`.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::RoundConfig;

/// Below-floor round parameters, each naming the number it refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum FloorViolation {
    #[error("the round has {got} participants, this institution requires at least {min}")]
    TooFewParticipants { min: u32, got: u32 },
    #[error("min_survivors = {got} of {n} participants; this institution requires at least {required} (more than {fraction}·n)")]
    ThresholdTooLow { got: u32, n: u32, required: u32, fraction: f64 },
    #[error("the roster's SHA-256 is {got}, this institution expects {expected}")]
    RosterMismatch { expected: String, got: String },
    #[error("roster entry #{index} ({key}) is not in this institution's allowlist of peers")]
    PeerNotAllowed { index: u32, key: String },
    #[error("this institution requires differential privacy on every round it joins; the round has none")]
    NoDp,
    #[error("the round's noise multiplier is {got}, this institution requires at least {min}")]
    NoiseTooLow { min: f64, got: f64 },
    #[error("the round's ε budget is {got}, this institution allows at most {max}")]
    EpsilonTooHigh { max: f64, got: f64 },
    #[error("the round's δ is {got}, this institution allows at most {max}")]
    DeltaTooHigh { max: f64, got: f64 },
    #[error("the round's noise holds against {got} colluding participant(s), this institution requires at least {min}")]
    TooFewColluders { min: u32, got: u32 },
    #[error(
        "the round's noise is continuous Gaussian, rounded into the modulus with the update; this institution requires exact integer noise (a round with dp.skellam)"
    )]
    InexactNoise,
}

/// The DP an institution requires of every round it joins.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpFloor {
    /// Smallest noise multiplier z accepted.
    pub min_noise_multiplier: f64,
    /// Largest federation ε budget accepted.
    pub max_epsilon: f64,
    /// Largest δ accepted.
    pub max_delta: f64,
    /// Fewest colluding participants the round's noise must be calibrated against.
    #[serde(default = "one")]
    pub min_colluders: u32,
    /// Require the noise to be drawn in the integers (Skellam), so that the released sum
    /// is the mechanism the accountant analyses, not Gaussian noise rounded with the
    /// update.
    #[serde(default)]
    pub require_exact_noise: bool,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityFloors {
    /// Smallest roster accepted (the sum of fewer inputs says too much about each).
    pub min_participants: u32,
    /// `min_survivors` must exceed this fraction of the roster: 0.5 (the default) forces a
    /// single survivor set against a server alone; `(1 + γ)/2` with a fraction γ of
    /// participants colluding with it. Below 0.5 the consistency check proves nothing.
    pub min_survivor_fraction: f64,
    /// SHA-256 (hex) of the roster this institution expects, as [`roster_sha256`] computes it.
    pub roster_sha256: Option<String>,
    /// Roster keys (Ed25519, hex) this institution accepts as peers; empty: any.
    pub allowed_peers: Vec<String>,
    /// DP required on every round; `None`: rounds without DP are accepted.
    pub dp: Option<DpFloor>,
}

impl Default for SecurityFloors {
    fn default() -> Self {
        SecurityFloors { min_participants: 3, min_survivor_fraction: 0.5, roster_sha256: None, allowed_peers: Vec::new(), dp: None }
    }
}

/// SHA-256 over the roster keys (lower-case hex, in roster order, length-prefixed), hex.
pub fn roster_sha256(roster: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(b"tessera/roster/v1");
    for key in roster {
        let key = key.to_ascii_lowercase();
        h.update((key.len() as u64).to_le_bytes());
        h.update(key.as_bytes());
    }
    hex::encode(h.finalize())
}

impl SecurityFloors {
    /// The smallest `min_survivors` these floors accept for `n` participants.
    pub fn required_min_survivors(&self, n: u32) -> u32 {
        ((n as f64 * self.min_survivor_fraction.clamp(0.0, 1.0)).floor() as u32 + 1).min(n.max(1))
    }

    /// Checks `cfg` against every floor; the first violation is returned.
    pub fn check(&self, cfg: &RoundConfig) -> Result<(), FloorViolation> {
        let n = cfg.participants() as u32;
        if n < self.min_participants {
            return Err(FloorViolation::TooFewParticipants { min: self.min_participants, got: n });
        }
        let required = self.required_min_survivors(n);
        if cfg.min_survivors < required {
            return Err(FloorViolation::ThresholdTooLow { got: cfg.min_survivors, n, required, fraction: self.min_survivor_fraction });
        }
        if let Some(expected) = &self.roster_sha256 {
            let got = roster_sha256(&cfg.roster);
            if !expected.eq_ignore_ascii_case(&got) {
                return Err(FloorViolation::RosterMismatch { expected: expected.clone(), got });
            }
        }
        if !self.allowed_peers.is_empty() {
            for (i, key) in cfg.roster.iter().enumerate() {
                if !self.allowed_peers.iter().any(|a| a.eq_ignore_ascii_case(key)) {
                    return Err(FloorViolation::PeerNotAllowed { index: i as u32, key: key.clone() });
                }
            }
        }
        if let Some(floor) = &self.dp {
            let dp = cfg.dp.ok_or(FloorViolation::NoDp)?;
            if dp.noise_multiplier < floor.min_noise_multiplier {
                return Err(FloorViolation::NoiseTooLow { min: floor.min_noise_multiplier, got: dp.noise_multiplier });
            }
            if dp.epsilon_budget > floor.max_epsilon {
                return Err(FloorViolation::EpsilonTooHigh { max: floor.max_epsilon, got: dp.epsilon_budget });
            }
            if dp.delta > floor.max_delta {
                return Err(FloorViolation::DeltaTooHigh { max: floor.max_delta, got: dp.delta });
            }
            if dp.colluders < floor.min_colluders {
                return Err(FloorViolation::TooFewColluders { min: floor.min_colluders, got: dp.colluders });
            }
            if floor.require_exact_noise && dp.skellam.is_none() {
                return Err(FloorViolation::InexactNoise);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roster(n: usize) -> Vec<String> {
        (0..n).map(|i| hex::encode([i as u8; 32])).collect()
    }

    #[test]
    fn the_default_floor_is_a_strict_majority() {
        let f = SecurityFloors::default();
        assert_eq!([f.required_min_survivors(3), f.required_min_survivors(4), f.required_min_survivors(10)], [2, 3, 6]);
        // With 20% colluders: more than (1 + 0.2)/2 of the roster.
        let f = SecurityFloors { min_survivor_fraction: 0.6, ..Default::default() };
        assert_eq!(f.required_min_survivors(10), 7);
        // The defaults of a round configuration meet the default floors.
        for n in 3..200 {
            let cfg = RoundConfig::with_defaults(1, roster(n), 4, [1; 32]);
            SecurityFloors::default().check(&cfg).unwrap_or_else(|e| panic!("n={n}: {e}"));
        }
    }

    #[test]
    fn each_floor_names_what_it_refused() {
        let cfg = RoundConfig::with_defaults(1, roster(4), 4, [1; 32]);
        let low = RoundConfig { min_survivors: 2, ..cfg.clone() };
        assert_eq!(SecurityFloors::default().check(&low).unwrap_err(), FloorViolation::ThresholdTooLow { got: 2, n: 4, required: 3, fraction: 0.5 });
        let two = RoundConfig { roster: roster(2), min_survivors: 2, neighbours: 1, share_threshold: 1, ..cfg.clone() };
        assert_eq!(SecurityFloors::default().check(&two).unwrap_err(), FloorViolation::TooFewParticipants { min: 3, got: 2 });
        let pinned = SecurityFloors { roster_sha256: Some(roster_sha256(&roster(4))), ..Default::default() };
        pinned.check(&cfg).unwrap();
        let mut swapped = cfg.clone();
        swapped.roster[3] = hex::encode([9u8; 32]);
        assert!(matches!(pinned.check(&swapped), Err(FloorViolation::RosterMismatch { .. })));
        let allow = SecurityFloors { allowed_peers: roster(4)[..3].to_vec(), ..Default::default() };
        assert!(matches!(allow.check(&cfg), Err(FloorViolation::PeerNotAllowed { index: 3, .. })));
        let dp_floor = SecurityFloors {
            dp: Some(DpFloor { min_noise_multiplier: 1.0, max_epsilon: 8.0, max_delta: 1e-5, min_colluders: 2, require_exact_noise: false }),
            ..Default::default()
        };
        assert_eq!(dp_floor.check(&cfg).unwrap_err(), FloorViolation::NoDp);
        let dp = crate::dp::DpParams { noise_multiplier: 0.5, l2_clip: 1.0, delta: 1e-5, epsilon_budget: 8.0, colluders: 1, skellam: None };
        let weak = RoundConfig { dp: Some(dp), ..cfg.clone() };
        assert_eq!(dp_floor.check(&weak).unwrap_err(), FloorViolation::NoiseTooLow { min: 1.0, got: 0.5 });
        let loose = RoundConfig { dp: Some(crate::dp::DpParams { noise_multiplier: 1.0, epsilon_budget: 50.0, ..dp }), ..cfg.clone() };
        assert_eq!(dp_floor.check(&loose).unwrap_err(), FloorViolation::EpsilonTooHigh { max: 8.0, got: 50.0 });
        let one_colluder = RoundConfig { dp: Some(crate::dp::DpParams { noise_multiplier: 1.0, ..dp }), ..cfg.clone() };
        assert_eq!(dp_floor.check(&one_colluder).unwrap_err(), FloorViolation::TooFewColluders { min: 2, got: 1 });
        let ok = RoundConfig { dp: Some(crate::dp::DpParams { noise_multiplier: 1.0, colluders: 2, ..dp }), ..cfg };
        dp_floor.check(&ok).unwrap();
        // An institution that requires exact integer noise refuses a Gaussian round.
        let exact = SecurityFloors { dp: dp_floor.dp.map(|d| DpFloor { require_exact_noise: true, ..d }), ..dp_floor.clone() };
        assert_eq!(exact.check(&ok).unwrap_err(), FloorViolation::InexactNoise);
        let sk = crate::dp::SkellamNoise { scale: Some(100.0), beta: 0.5 };
        let skellam = RoundConfig { dp: Some(crate::dp::DpParams { skellam: Some(sk), ..ok.dp.unwrap() }), ..ok.clone() };
        exact.check(&skellam).unwrap();
        let old: DpFloor = serde_json::from_str(r#"{"min_noise_multiplier": 1.0, "max_epsilon": 8.0, "max_delta": 1e-5}"#).unwrap();
        assert!(!old.require_exact_noise, "floors written before the field require nothing more");
    }
}
