//! The institution's own privacy ledger: every DP round its data went into, kept in its
//! identity directory, so the privacy its records have spent is counted by the
//! institution itself and not only by the aggregator. A round that would take it past
//! its own budget (the `max_epsilon` of its DP floor) is refused before anything is
//! computed for it, whatever the aggregator says it has spent: a host that resets the
//! aggregator's state cannot reset this.
//!
//! A contribution is charged before the masked input leaves, and is never refunded (an
//! aborted round may or may not have reached a sum; the ledger assumes it did).
//!
//! Under DP-SGD the ledger also holds the record-level account: every local training run
//! (σ, q, steps) is charged before its first step, and a run that would take the records
//! past the institution's record-level budget is refused before it starts. That guarantee
//! holds against everyone who sees the update, the aggregator included, because the noise
//! was added inside the institution.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tessera_secagg::config::RoundConfig;
use tessera_secagg::dp::{Against, Mechanism};
use tessera_secagg::prv::Accountant;
use tessera_secagg::rdp::SgmSteps;

const VERSION: u32 = 1;

/// One round this institution's data went into.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contribution {
    /// The aggregator's enclave identity key, hex.
    pub aggregator: String,
    pub round: u64,
    /// The round configuration's digest, hex.
    pub config_digest: String,
    /// The round's noise multiplier, the guarantee against a coalition of `colluders`
    /// participants under zero-out adjacency; `None` for a round without DP.
    pub noise_multiplier: Option<f64>,
    pub delta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub colluders: Option<u32>,
    /// The mechanism charged, against a coalition of `colluders` (absent in entries
    /// written before Skellam noise: those are Gaussian at `noise_multiplier`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mechanism: Option<Mechanism>,
    /// When it was charged, ms since the Unix epoch.
    pub charged_at_ms: u64,
}

impl Contribution {
    /// A contribution of this institution's data to `cfg`'s round at `aggregator`.
    fn to(aggregator: &str, cfg: &RoundConfig, charged_at_ms: u64) -> Self {
        Contribution {
            aggregator: aggregator.into(),
            round: cfg.round,
            config_digest: hex::encode(cfg.digest()),
            noise_multiplier: cfg.dp.map(|d| d.noise_multiplier),
            delta: cfg.dp.map(|d| d.delta),
            colluders: cfg.dp.map(|d| d.colluders),
            mechanism: cfg.dp_mechanism(Against::Coalition),
            charged_at_ms,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyLedger {
    pub version: u32,
    pub contributions: Vec<Contribution>,
    /// Local DP-SGD runs over this institution's records (absent in ledgers written
    /// before record-level DP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub record_level: Vec<RecordCharge>,
}

/// One local DP-SGD training run over the institution's records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordCharge {
    /// What the run was for ("round 3").
    pub purpose: String,
    pub noise_multiplier: f64,
    pub sample_rate: f64,
    pub steps: u64,
    /// The number of records sampled from.
    pub records: usize,
    /// When it was charged, ms since the Unix epoch.
    pub charged_at_ms: u64,
}

impl RecordCharge {
    fn steps(&self) -> SgmSteps {
        SgmSteps { noise_multiplier: self.noise_multiplier, sample_rate: self.sample_rate, steps: self.steps }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot read the privacy ledger {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// Never silently replaced: a ledger that cannot be read would otherwise reset the
    /// institution's count to zero.
    #[error("the privacy ledger {path} is corrupt ({why}); restore it from a backup (it is never reset on its own)")]
    Corrupt { path: PathBuf, why: String },
    #[error("cannot write the privacy ledger {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error(
        "{purpose} ({steps} DP-SGD steps at σ = {noise_multiplier:.3}, q = {sample_rate:.4}) would take each record to ε = {projected:.3} (δ = {delta:e}), \
         past the record-level budget of {budget} ({runs} run(s) so far spent ε = {spent:.3}); lower the steps or the sampling rate, or raise the noise"
    )]
    RecordBudgetExhausted {
        purpose: String,
        steps: u64,
        noise_multiplier: f64,
        sample_rate: f64,
        spent: f64,
        projected: f64,
        budget: f64,
        delta: f64,
        runs: usize,
    },
    #[error("invalid DP-SGD run: {0}")]
    InvalidRun(String),
    #[error(
        "round {round} would take this institution's records to ε = {projected:.3} (δ = {delta:e}) by its own ledger, past its budget of {budget} \
         ({rounds} DP round(s) so far spent ε = {spent:.3})"
    )]
    OwnBudgetExhausted { round: u64, spent: f64, projected: f64, budget: f64, delta: f64, rounds: usize },
}

impl PrivacyLedger {
    /// Loads the ledger at `path`; a missing file is an empty ledger.
    pub fn load(path: &Path) -> Result<Self, LedgerError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(PrivacyLedger { version: VERSION, contributions: Vec::new(), record_level: Vec::new() })
            }
            Err(source) => return Err(LedgerError::Read { path: path.to_path_buf(), source }),
        };
        let ledger: PrivacyLedger = serde_json::from_slice(&bytes).map_err(|e| LedgerError::Corrupt { path: path.to_path_buf(), why: e.to_string() })?;
        if ledger.version != VERSION {
            return Err(LedgerError::Corrupt { path: path.to_path_buf(), why: format!("version {} (this build reads {VERSION})", ledger.version) });
        }
        Ok(ledger)
    }

    /// RDP groups (multiplier against a participant, rounds). An entry without
    /// `colluders` was charged by an earlier version for a round whose noise was split
    /// over all t shares, so its z held against outsiders only; not knowing t, it is
    /// charged at the worst case t = 2, z·√(1/2).
    fn groups(&self) -> Vec<(Mechanism, u64)> {
        let mut groups = Vec::new();
        for c in &self.contributions {
            let m = match (c.mechanism, c.noise_multiplier) {
                (Some(m), _) => m,
                (None, Some(z)) => Mechanism::Gaussian { noise_multiplier: if c.colluders.unwrap_or(0) == 0 { z * 0.5f64.sqrt() } else { z } },
                (None, None) => continue,
            };
            tessera_secagg::dp::add_release(&mut groups, m);
        }
        groups
    }

    /// ε (at `delta`) of the DP rounds recorded so far.
    pub fn spent(&self, delta: f64) -> f64 {
        let groups = self.groups();
        if groups.is_empty() {
            0.0
        } else {
            tessera_secagg::dp::epsilon_of(&groups, delta)
        }
    }

    fn holds(&self, aggregator: &str, cfg: &RoundConfig) -> bool {
        let digest = hex::encode(cfg.digest());
        self.contributions.iter().any(|c| c.aggregator == aggregator && c.round == cfg.round && c.config_digest == digest)
    }

    /// Refuses `cfg` if contributing to it would take this institution past `budget`
    /// (ε at the round's δ). A round already charged (a retry) costs nothing more.
    pub fn check(&self, aggregator: &str, cfg: &RoundConfig, budget: f64) -> Result<(), LedgerError> {
        let Some(dp) = cfg.dp else { return Ok(()) };
        if self.holds(aggregator, cfg) {
            return Ok(());
        }
        let mut with = self.clone();
        with.contributions.push(Contribution::to(aggregator, cfg, 0));
        let projected = with.spent(dp.delta);
        if projected > budget {
            return Err(LedgerError::OwnBudgetExhausted {
                round: cfg.round,
                spent: self.spent(dp.delta),
                projected,
                budget,
                delta: dp.delta,
                rounds: self.groups().iter().map(|g| g.1 as usize).sum(),
            });
        }
        Ok(())
    }

    /// Records a contribution to `cfg` at `path` (durably: written to a temporary file,
    /// synced, renamed) unless it is already recorded.
    pub fn charge(path: &Path, aggregator: &str, cfg: &RoundConfig, now_ms: u64) -> Result<(), LedgerError> {
        let mut ledger = Self::load(path)?;
        if ledger.holds(aggregator, cfg) {
            return Ok(());
        }
        ledger.contributions.push(Contribution::to(aggregator, cfg, now_ms));
        ledger.save(path)
    }

    /// The record-level history: every local DP-SGD run so far.
    pub fn record_history(&self) -> Vec<SgmSteps> {
        self.record_level.iter().map(RecordCharge::steps).collect()
    }

    /// ε (at `delta`) that each record has spent in local DP-SGD runs so far, by
    /// `accountant` (NaN where it cannot bound the history).
    pub fn record_spent(&self, delta: f64, accountant: Accountant) -> f64 {
        let h = self.record_history();
        if h.is_empty() {
            0.0
        } else {
            accountant.epsilon(&h, delta).unwrap_or(f64::NAN)
        }
    }

    /// Refuses `run` if it would take the records past `budget` (ε at `delta`); returns
    /// the ε the records will have spent after it.
    pub fn check_record(&self, run: &RecordCharge, budget: f64, delta: f64, accountant: Accountant) -> Result<f64, LedgerError> {
        run.steps().validate().map_err(|e| LedgerError::InvalidRun(e.to_string()))?;
        let mut with = self.record_history();
        with.push(run.steps());
        let projected = accountant.epsilon(&with, delta).map_err(|e| LedgerError::InvalidRun(e.to_string()))?;
        if projected.is_nan() || projected > budget {
            return Err(LedgerError::RecordBudgetExhausted {
                purpose: run.purpose.clone(),
                steps: run.steps,
                noise_multiplier: run.noise_multiplier,
                sample_rate: run.sample_rate,
                spent: self.record_spent(delta, accountant),
                projected,
                budget,
                delta,
                runs: self.record_level.len(),
            });
        }
        Ok(projected)
    }

    /// Checks `run` against `budget` and records it at `path`, durably, before the run
    /// starts; returns the ε spent after it. Every run is charged: each draws fresh noise.
    pub fn charge_record(path: &Path, run: RecordCharge, budget: f64, delta: f64, accountant: Accountant) -> Result<f64, LedgerError> {
        let mut ledger = Self::load(path)?;
        let projected = ledger.check_record(&run, budget, delta, accountant)?;
        ledger.record_level.push(run);
        ledger.save(path)?;
        Ok(projected)
    }

    fn save(&self, path: &Path) -> Result<(), LedgerError> {
        let write = |e: std::io::Error| LedgerError::Write { path: path.to_path_buf(), source: e };
        let text = serde_json::to_vec_pretty(self).map_err(|e| write(std::io::Error::other(e)))?;
        let tmp = path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(write)?;
            f.write_all(&text).map_err(write)?;
            f.sync_all().map_err(write)?;
        }
        std::fs::rename(&tmp, path).map_err(write)?;
        if let Some(dir) = path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tessera_secagg::dp::{epsilon, DpParams};

    fn cfg(round: u64, z: f64) -> RoundConfig {
        let roster = (0..3u8).map(|i| hex::encode([i; 32])).collect();
        let mut c = RoundConfig::with_defaults(round, roster, 4, [1; 32]);
        c.max_weight = 1;
        c.dp = Some(DpParams { noise_multiplier: z, l2_clip: 1.0, delta: 1e-5, epsilon_budget: 100.0, colluders: 1, skellam: None });
        c
    }

    #[test]
    fn charges_accumulate_refuse_past_the_budget_and_retries_are_free() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("privacy-ledger.json");
        let one = epsilon(2.0, 1, 1e-5);
        let budget = one * 1.2;
        let ledger = PrivacyLedger::load(&path).unwrap();
        ledger.check("agg", &cfg(1, 2.0), budget).unwrap();
        PrivacyLedger::charge(&path, "agg", &cfg(1, 2.0), 1).unwrap();
        PrivacyLedger::charge(&path, "agg", &cfg(1, 2.0), 2).unwrap();
        let ledger = PrivacyLedger::load(&path).unwrap();
        assert_eq!(ledger.contributions.len(), 1, "a retry of the same round is charged once");
        assert!((ledger.spent(1e-5) - one).abs() < 1e-12);
        ledger.check("agg", &cfg(1, 2.0), budget).unwrap();
        // A second round, even at another aggregator (a reset one), would pass the budget.
        let err = ledger.check("another-agg", &cfg(2, 2.0), budget).unwrap_err();
        assert!(matches!(err, LedgerError::OwnBudgetExhausted { round: 2, .. }), "{err}");
        // A round without DP costs nothing here (the DP floor refuses those).
        let mut plain = cfg(3, 2.0);
        plain.dp = None;
        ledger.check("agg", &plain, budget).unwrap();
    }

    /// A Skellam round is charged as the Skellam release it ran (not as a Gaussian at its
    /// z), beside Gaussian rounds; a ledger written before the field reads as Gaussian.
    #[test]
    fn skellam_rounds_are_charged_as_skellam() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("privacy-ledger.json");
        let mut sk = cfg(2, 2.0);
        sk.modulus_bits = 16;
        let dp = sk.dp.unwrap();
        sk.dp = Some(DpParams { skellam: Some(tessera_secagg::dp::SkellamNoise { scale: None, beta: 0.5 }), ..dp });
        sk.settle_skellam_scale().unwrap();
        sk.validate().unwrap();
        PrivacyLedger::charge(&path, "agg", &cfg(1, 2.0), 1).unwrap();
        PrivacyLedger::charge(&path, "agg", &sk, 2).unwrap();
        let ledger = PrivacyLedger::load(&path).unwrap();
        let m = sk.dp_mechanism(Against::Coalition).unwrap();
        assert!(matches!(m, Mechanism::Skellam(_)));
        assert_eq!(ledger.contributions[1].mechanism, Some(m));
        let want = tessera_secagg::dp::epsilon_of(&[(Mechanism::Gaussian { noise_multiplier: 2.0 }, 1), (m, 1)], 1e-5);
        assert!((ledger.spent(1e-5) - want).abs() < 1e-12);
        // The rounding (and the reference's integer orders) cost a little: more than two
        // Gaussian rounds at z = 2.
        assert!(ledger.spent(1e-5) > epsilon(2.0, 2, 1e-5));
        let legacy = r#"{"version": 1, "contributions": [{"aggregator": "a", "round": 1, "config_digest": "00", "noise_multiplier": 2.0, "delta": 1e-5, "colluders": 1, "charged_at_ms": 1}]}"#;
        std::fs::write(&path, legacy).unwrap();
        assert!((PrivacyLedger::load(&path).unwrap().spent(1e-5) - epsilon(2.0, 1, 1e-5)).abs() < 1e-12);
    }

    #[test]
    fn a_corrupt_ledger_is_never_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("privacy-ledger.json");
        std::fs::write(&path, b"{\"version\": 1, \"contributions\": [").unwrap();
        assert!(matches!(PrivacyLedger::load(&path), Err(LedgerError::Corrupt { .. })));
        assert!(matches!(PrivacyLedger::charge(&path, "agg", &cfg(1, 2.0), 1), Err(LedgerError::Corrupt { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"version\": 1, \"contributions\": [");
    }

    fn run(purpose: &str, steps: u64) -> RecordCharge {
        RecordCharge { purpose: purpose.into(), noise_multiplier: 1.1, sample_rate: 0.01, steps, records: 1000, charged_at_ms: 1 }
    }

    #[test]
    fn record_level_runs_compose_and_are_refused_past_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("privacy-ledger.json");
        // An institution-level contribution is kept alongside.
        PrivacyLedger::charge(&path, "agg", &cfg(1, 2.0), 1).unwrap();
        let one = tessera_secagg::rdp::epsilon(&[run("a", 500).steps()], 1e-5);
        let two = tessera_secagg::rdp::epsilon(&[run("a", 1000).steps()], 1e-5);
        assert!(two > one && two < 2.0 * one, "RDP composes sublinearly: {one} then {two}");
        let budget = (one + two) / 2.0;
        let after = PrivacyLedger::charge_record(&path, run("round 1", 500), budget, 1e-5, Accountant::Rdp).unwrap();
        assert!((after - one).abs() < 1e-12);
        let err = PrivacyLedger::charge_record(&path, run("round 2", 500), budget, 1e-5, Accountant::Rdp).unwrap_err();
        match &err {
            LedgerError::RecordBudgetExhausted { spent, projected, runs: 1, .. } => {
                assert!((spent - one).abs() < 1e-12 && (projected - two).abs() < 1e-9, "{err}");
            }
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("round 2") && err.to_string().contains("record-level budget"));
        let ledger = PrivacyLedger::load(&path).unwrap();
        assert_eq!((ledger.contributions.len(), ledger.record_level.len()), (1, 1), "the refused run is not recorded");
        assert!((ledger.record_spent(1e-5, Accountant::Rdp) - one).abs() < 1e-12);
        // A shorter run still fits.
        PrivacyLedger::charge_record(&path, run("round 2", 50), budget, 1e-5, Accountant::Rdp).unwrap();
        assert!(matches!(
            PrivacyLedger::charge_record(&path, RecordCharge { sample_rate: 0.0, ..run("bad", 1) }, budget, 1e-5, Accountant::Rdp),
            Err(LedgerError::InvalidRun(_))
        ));
    }

    #[test]
    fn ledgers_written_before_record_level_dp_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("privacy-ledger.json");
        std::fs::write(&path, br#"{"version": 1, "contributions": []}"#).unwrap();
        let ledger = PrivacyLedger::load(&path).unwrap();
        assert!(ledger.record_level.is_empty());
        assert_eq!(ledger.record_spent(1e-5, Accountant::Rdp), 0.0);
    }
}
