//! The round transparency log's entries, the compliance report derived from them, and
//! the offline audit of an exported round bundle.
//!
//! The enclave writes one [`LogEntry`] per round event into an RFC 6962 Merkle tree
//! ([`crate::translog`]) and signs its tree heads with its attested identity key. A
//! [`RoundReport`] is a pure function of a round's entries ([`derive_report`]), so an
//! auditor who holds the entries, their inclusion proofs and a signed tree head can
//! recompute every claim of the report ([`audit_bundle`]) without trusting the host
//! that served them.
//!
//! No entry holds a plaintext update, a mask, a share or a key: only hashes, client
//! indices, roster public keys, verdicts and parameters.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::policy::NodePolicy;
use crate::translog::{self, Hash, SignedTreeHead};

/// The neighbouring relation a round's ε is stated under.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Adjacency {
    /// One institution's update replaced by zeros (sensitivity C). The release names who
    /// was included, so participation itself is public.
    #[default]
    #[serde(rename = "zero-out")]
    ZeroOut,
}

impl Adjacency {
    pub fn explained(self) -> &'static str {
        match self {
            Adjacency::ZeroOut => "zero-out adjacency: one institution's update replaced by zeros (sensitivity C); who took part is public",
        }
    }
}

impl std::fmt::Display for Adjacency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Adjacency::ZeroOut => "zero-out",
        })
    }
}

/// The DP parameters a round ran under (mirrors `tessera_secagg::dp::DpParams`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpSummary {
    /// The multiplier a coalition of `colluders` participants faces after subtracting
    /// its own noise shares; the ε figures named plainly are against that coalition.
    pub noise_multiplier: f64,
    pub l2_clip: f64,
    pub delta: f64,
    pub epsilon_budget: f64,
    /// Colluding participants the noise is calibrated against (0 in entries written
    /// before the calibration: their noise was calibrated to outsiders only).
    #[serde(default)]
    pub colluders: u32,
    #[serde(default)]
    pub adjacency: Adjacency,
    /// Set when the round's noise was Skellam, drawn in the integers (mirrors
    /// `tessera_secagg::dp::SkellamNoise`, with the dimension its accountant needs);
    /// absent: continuous Gaussian shares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skellam: Option<SkellamSummary>,
}

/// A Skellam round's quantization, as its ε is computed from it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkellamSummary {
    pub scale: f64,
    /// Conditional rounding's β.
    pub beta: f64,
    /// Coordinates of the (encoded) update the noise is added to.
    pub dim: u64,
}

/// The record-level DP an institution signed with its masked input (mirrors
/// `tessera_secagg::wire::RecordPrivacyClaim`): the ε of each of its records over every
/// local DP-SGD run so far, at `delta`, and this round's run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordPrivacySummary {
    pub epsilon: f64,
    pub delta: f64,
    pub budget: f64,
    pub noise_multiplier: f64,
    pub sample_rate: f64,
    pub max_grad_norm: f64,
    pub steps: u64,
}

/// What stands behind an institution's record-level ε.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordPrivacySource {
    /// The institution was admitted on hardware evidence (not dev mode, not a debug
    /// guest) whose measurement the node policy accepted: the figure was computed by
    /// measured code.
    Measured,
    /// The institution was admitted without hardware attestation: the figure is its own
    /// claim, signed but not backed by any measurement.
    Claimed,
}

impl RecordPrivacySource {
    /// Measured only for an accepted admission on hardware evidence of a non-debug node.
    pub fn of(admission: Option<&AdmissionRecord>) -> Self {
        match admission {
            Some(a) if a.accepted && a.debug == Some(false) && a.format.as_deref().is_some_and(|f| !f.starts_with("dev")) => RecordPrivacySource::Measured,
            _ => RecordPrivacySource::Claimed,
        }
    }

    pub fn explained(self) -> &'static str {
        match self {
            RecordPrivacySource::Measured => "from measured code: the institution was admitted on hardware evidence that met the node policy",
            RecordPrivacySource::Claimed => {
                "the institution's own claim: it was admitted without hardware attestation (dev mode), so no measurement stands behind it"
            }
        }
    }
}

impl std::fmt::Display for RecordPrivacySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecordPrivacySource::Measured => "measured",
            RecordPrivacySource::Claimed => "claimed",
        })
    }
}

/// A participant's record-level privacy in a round's report.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordPrivacyRecord {
    pub claim: RecordPrivacySummary,
    pub source: RecordPrivacySource,
}

impl RecordPrivacyRecord {
    /// One line for people: the figure, this round's mechanism and what stands behind it.
    pub fn describe(&self) -> String {
        let c = &self.claim;
        format!(
            "ε = {:.3} of {} per record (δ = {:e}; DP-SGD σ = {:.3}, q = {:.4}, C = {}, {} steps this round); {}: {}",
            c.epsilon,
            c.budget,
            c.delta,
            c.noise_multiplier,
            c.sample_rate,
            c.max_grad_norm,
            c.steps,
            self.source,
            self.source.explained()
        )
    }
}

/// One entry of the log. Its leaf is `SHA-256(0x00 ‖ the entry's JSON bytes)`, over the
/// exact bytes the log stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogEntry {
    /// Position in the log, from 0.
    pub index: u64,
    /// Enclave time of the event, ms since the Unix epoch.
    pub timestamp_ms: u64,
    pub round: u64,
    pub event: LogEvent,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LogEvent {
    /// A round opened: its configuration digest, roster and parameters, the node policy
    /// admission runs under, and the evidence the aggregator presents.
    RoundOpened {
        config_digest: String,
        /// Ed25519 public keys of the roster, hex; the index is the client id.
        roster: Vec<String>,
        min_survivors: u32,
        neighbours: u32,
        vector_len: u32,
        dp: Option<DpSummary>,
        node_policy_sha256: String,
        aggregator_format: String,
        aggregator_evidence_sha256: String,
    },
    /// The verdict on a client's evidence when it advertised its round keys.
    Admission {
        client: u32,
        identity: String,
        accepted: bool,
        evidence_sha256: String,
        format: Option<String>,
        measurement: Option<String>,
        debug: Option<bool>,
        failures: Vec<String>,
    },
    /// A masked input was accepted: the data digest of its masked vector (the digest the
    /// client's signature covers: since protocol version 2 the SHA-256 tree of
    /// `tessera_secagg::wire::data_digest_of_bytes`, 1 MiB leaves; the vector is uniformly
    /// random to everyone but the sum) and the size of the message received.
    /// `record_privacy` is the record-level DP the sender signed with the input, if it
    /// trained with DP-SGD (absent from entries without one, so older entries hash as
    /// they did).
    MaskedInput {
        client: u32,
        sha256: String,
        bytes: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        record_privacy: Option<RecordPrivacySummary>,
        /// In a cohort of a buffered federation: the global version the update was
        /// trained from, and its staleness (the cohort's version minus that).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        base_version: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        staleness: Option<u64>,
    },
    /// A protocol phase closed: who answered and who went missing in it (dropouts).
    PhaseClosed { from: String, to: String, responded: Vec<u32>, missing: Vec<u32> },
    /// The aggregate was released: its hash, who is in it, and the privacy it spent.
    Released {
        included: Vec<u32>,
        total_weight: u64,
        mean_sha256: String,
        error_bound: f64,
        release_signature: String,
        dp: Option<DpSummary>,
        /// ε of this round alone, at the round's δ.
        epsilon_round: Option<f64>,
        /// ε of the federation over every released DP round so far, this one included.
        epsilon_cumulative: Option<f64>,
        /// ε per participant (roster key) over the released DP rounds it was included in.
        epsilon_by_participant: BTreeMap<String, f64>,
        /// The same two figures against an outsider, who knows no noise share: the
        /// sum of at least `min_survivors` shares.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epsilon_outsider_round: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epsilon_outsider_cumulative: Option<f64>,
    },
    /// The round ended without a release.
    Aborted { phase: String, reason: String },
}

impl LogEvent {
    pub fn name(&self) -> &'static str {
        match self {
            LogEvent::RoundOpened { .. } => "round_opened",
            LogEvent::Admission { .. } => "admission",
            LogEvent::MaskedInput { .. } => "masked_input",
            LogEvent::PhaseClosed { .. } => "phase_closed",
            LogEvent::Released { .. } => "released",
            LogEvent::Aborted { .. } => "aborted",
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self, LogEvent::Released { .. } | LogEvent::Aborted { .. })
    }
}

impl LogEntry {
    pub fn parse(data: &[u8]) -> Result<LogEntry, ReportError> {
        serde_json::from_slice(data).map_err(|e| ReportError::Malformed(e.to_string()))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("log entries serialize")
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("a log entry is malformed: {0}")]
    Malformed(String),
    #[error("the round's entries are not a complete record: {0}")]
    Incomplete(String),
}

/// A participant's part in one round, as the log records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParticipantRecord {
    pub client: u32,
    /// Roster public key, hex.
    pub identity: String,
    /// The admission verdict, if the client advertised keys.
    pub admission: Option<AdmissionRecord>,
    pub masked_input_sha256: Option<String>,
    /// In the released sum.
    pub included: bool,
    /// The phase in which it stopped answering, if it did.
    pub dropped_in: Option<String>,
    /// ε over the released DP rounds this participant was included in, up to this one.
    pub epsilon_cumulative: Option<f64>,
    /// The record-level DP it signed with its masked input, and what stands behind it.
    #[serde(default)]
    pub record_privacy: Option<RecordPrivacyRecord>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdmissionRecord {
    pub accepted: bool,
    pub evidence_sha256: String,
    pub format: Option<String>,
    pub measurement: Option<String>,
    pub debug: Option<bool>,
    pub failures: Vec<String>,
    /// Admission attempts recorded (a rejected client may try again).
    pub attempts: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhaseRecord {
    pub from: String,
    pub to: String,
    pub at_ms: u64,
    pub responded: Vec<u32>,
    pub missing: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub included: Vec<u32>,
    pub total_weight: u64,
    pub mean_sha256: String,
    pub error_bound: f64,
    pub release_signature: String,
}

/// The compliance report of one round: every field follows from the round's log entries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    pub round: u64,
    /// `released`, `aborted` or `running`.
    pub status: String,
    pub opened_at_ms: u64,
    pub closed_at_ms: Option<u64>,
    pub config_digest: String,
    pub min_survivors: u32,
    pub neighbours: u32,
    pub vector_len: u32,
    pub node_policy_sha256: String,
    pub aggregator_format: String,
    pub aggregator_evidence_sha256: String,
    pub participants: Vec<ParticipantRecord>,
    pub phases: Vec<PhaseRecord>,
    /// Clients that went missing in any phase.
    pub dropouts: Vec<u32>,
    pub dp: Option<DpSummary>,
    /// ε of this round and of the federation so far against a coalition of
    /// `dp.colluders` participants (the conservative figures the budget is charged).
    pub epsilon_round: Option<f64>,
    pub epsilon_cumulative: Option<f64>,
    /// The same against an outsider.
    #[serde(default)]
    pub epsilon_outsider_round: Option<f64>,
    #[serde(default)]
    pub epsilon_outsider_cumulative: Option<f64>,
    pub release: Option<ReleaseRecord>,
    pub abort_reason: Option<String>,
    /// Log indices of the round's entries, in order.
    pub entries: Vec<u64>,
}

impl RoundReport {
    /// One line saying what the round's DP protects and what it spent, against a
    /// coalition of participants and against outsiders; `None` without DP.
    pub fn privacy_summary(&self) -> Option<String> {
        let dp = self.dp?;
        let f = |v: Option<f64>| v.map(|e| format!("{e:.3}")).unwrap_or_else(|| "-".into());
        let against = match dp.colluders {
            0 => "participants: not calibrated (insiders see less noise)".to_string(),
            1 => "any 1 participant".to_string(),
            n => format!("any {n} colluding participants"),
        };
        let noise = match dp.skellam {
            None => "Gaussian noise".to_string(),
            Some(s) => format!("Skellam noise in the integers (scale {:e}, β = {:.3}, {} coordinates)", s.scale, s.beta, s.dim),
        };
        Some(format!(
            "{}; {noise}; δ = {:e}, z = {} against {against}; ε this round {} against {against}, {} against outsiders; federation cumulative {} against {against}, {} against outsiders (budget {})",
            dp.adjacency.explained(),
            dp.delta,
            dp.noise_multiplier,
            f(self.epsilon_round),
            f(self.epsilon_outsider_round),
            f(self.epsilon_cumulative),
            f(self.epsilon_outsider_cumulative),
            dp.epsilon_budget
        ))
    }
}

/// Derives a round's report from its log entries, which must be the round's whole,
/// contiguous record: a `round_opened` entry first, then the round's events in order.
pub fn derive_report(entries: &[LogEntry]) -> Result<RoundReport, ReportError> {
    let first = entries.first().ok_or_else(|| ReportError::Incomplete("no entries".into()))?;
    let LogEvent::RoundOpened {
        config_digest,
        roster,
        min_survivors,
        neighbours,
        vector_len,
        dp,
        node_policy_sha256,
        aggregator_format,
        aggregator_evidence_sha256,
    } = &first.event
    else {
        return Err(ReportError::Incomplete(format!("entry {} is {}, not round_opened", first.index, first.event.name())));
    };
    let round = first.round;
    let mut report = RoundReport {
        round,
        status: "running".into(),
        opened_at_ms: first.timestamp_ms,
        closed_at_ms: None,
        config_digest: config_digest.clone(),
        min_survivors: *min_survivors,
        neighbours: *neighbours,
        vector_len: *vector_len,
        node_policy_sha256: node_policy_sha256.clone(),
        aggregator_format: aggregator_format.clone(),
        aggregator_evidence_sha256: aggregator_evidence_sha256.clone(),
        participants: roster
            .iter()
            .enumerate()
            .map(|(i, id)| ParticipantRecord {
                client: i as u32,
                identity: id.clone(),
                admission: None,
                masked_input_sha256: None,
                included: false,
                dropped_in: None,
                epsilon_cumulative: None,
                record_privacy: None,
            })
            .collect(),
        phases: Vec::new(),
        dropouts: Vec::new(),
        dp: *dp,
        epsilon_round: None,
        epsilon_cumulative: None,
        epsilon_outsider_round: None,
        epsilon_outsider_cumulative: None,
        release: None,
        abort_reason: None,
        entries: vec![first.index],
    };
    let mut ended = false;
    let mut previous = first.index;
    for e in &entries[1..] {
        let expected_index = previous.checked_add(1).ok_or_else(|| ReportError::Malformed("entry indices overflow".into()))?;
        if e.index != expected_index {
            return Err(ReportError::Incomplete(format!("entry {expected_index} is missing (next given is {})", e.index)));
        }
        previous = e.index;
        if e.round != round {
            return Err(ReportError::Incomplete(format!("entry {} belongs to round {}, not {round}", e.index, e.round)));
        }
        if ended {
            return Err(ReportError::Incomplete(format!("entry {} follows the end of the round", e.index)));
        }
        report.entries.push(e.index);
        let participant = |report: &mut RoundReport, client: u32| -> Result<usize, ReportError> {
            let i = client as usize;
            if i >= report.participants.len() {
                return Err(ReportError::Malformed(format!("entry {}: client {client} is not in the roster", e.index)));
            }
            Ok(i)
        };
        match &e.event {
            LogEvent::RoundOpened { .. } => return Err(ReportError::Incomplete(format!("entry {} opens the round a second time", e.index))),
            LogEvent::Admission { client, identity, accepted, evidence_sha256, format, measurement, debug, failures } => {
                let i = participant(&mut report, *client)?;
                let p = &mut report.participants[i];
                if &p.identity != identity {
                    return Err(ReportError::Malformed(format!("entry {}: client {client} has identity {identity}, roster says {}", e.index, p.identity)));
                }
                let attempts = p.admission.as_ref().map_or(0, |a| a.attempts) + 1;
                p.admission = Some(AdmissionRecord {
                    accepted: *accepted,
                    evidence_sha256: evidence_sha256.clone(),
                    format: format.clone(),
                    measurement: measurement.clone(),
                    debug: *debug,
                    failures: failures.clone(),
                    attempts,
                });
            }
            LogEvent::MaskedInput { client, sha256, record_privacy, .. } => {
                let i = participant(&mut report, *client)?;
                let p = &mut report.participants[i];
                if !p.admission.as_ref().is_some_and(|a| a.accepted) {
                    return Err(ReportError::Malformed(format!("entry {}: client {client} sent a masked input but was never admitted", e.index)));
                }
                if p.masked_input_sha256.is_some() {
                    return Err(ReportError::Malformed(format!("entry {}: a second masked input of client {client}", e.index)));
                }
                p.masked_input_sha256 = Some(sha256.clone());
                p.record_privacy = record_privacy.map(|claim| RecordPrivacyRecord { claim, source: RecordPrivacySource::of(p.admission.as_ref()) });
            }
            LogEvent::PhaseClosed { from, to, responded, missing } => {
                // Responders are roster members that were admitted, each named once and
                // never also as missing, and each answered the phase before too: a
                // phase cannot gain participants.
                let mut seen = std::collections::BTreeSet::new();
                for c in responded.iter().chain(missing) {
                    participant(&mut report, *c)?;
                    if !seen.insert(*c) {
                        return Err(ReportError::Malformed(format!("entry {}: client {c} is named twice in the {from} phase", e.index)));
                    }
                }
                for c in responded {
                    if !report.participants[*c as usize].admission.as_ref().is_some_and(|a| a.accepted) {
                        return Err(ReportError::Malformed(format!("entry {}: client {c} answered the {from} phase but was never admitted", e.index)));
                    }
                    if let Some(previous) = report.phases.last() {
                        if !previous.responded.contains(c) {
                            return Err(ReportError::Malformed(format!(
                                "entry {}: client {c} answered the {from} phase but not the {} phase before it",
                                e.index, previous.from
                            )));
                        }
                    }
                }
                for c in missing {
                    let i = participant(&mut report, *c)?;
                    let p = &mut report.participants[i];
                    if p.dropped_in.is_none() {
                        p.dropped_in = Some(from.clone());
                    }
                    if !report.dropouts.contains(c) {
                        report.dropouts.push(*c);
                    }
                }
                report.phases.push(PhaseRecord {
                    from: from.clone(),
                    to: to.clone(),
                    at_ms: e.timestamp_ms,
                    responded: responded.clone(),
                    missing: missing.clone(),
                });
            }
            LogEvent::Released {
                included,
                total_weight,
                mean_sha256,
                error_bound,
                release_signature,
                dp: rdp,
                epsilon_round,
                epsilon_cumulative,
                epsilon_by_participant,
                epsilon_outsider_round,
                epsilon_outsider_cumulative,
            } => {
                if rdp != dp {
                    return Err(ReportError::Malformed(format!("entry {}: released under other DP parameters than the round opened with", e.index)));
                }
                // The released set is the clients whose masked inputs were accepted:
                // each included one sent one (so was admitted), and none is left out.
                for c in included {
                    let i = participant(&mut report, *c)?;
                    let p = &mut report.participants[i];
                    if p.masked_input_sha256.is_none() {
                        return Err(ReportError::Malformed(format!("entry {}: client {c} is in the release but sent no masked input", e.index)));
                    }
                    if p.included {
                        return Err(ReportError::Malformed(format!("entry {}: client {c} is in the release twice", e.index)));
                    }
                    p.included = true;
                }
                if let Some(left_out) = report.participants.iter().find(|p| p.masked_input_sha256.is_some() && !p.included) {
                    return Err(ReportError::Malformed(format!(
                        "entry {}: client {} sent a masked input that the release leaves out",
                        e.index, left_out.client
                    )));
                }
                for p in &mut report.participants {
                    p.epsilon_cumulative = epsilon_by_participant.get(&p.identity).copied();
                }
                report.epsilon_round = *epsilon_round;
                report.epsilon_cumulative = *epsilon_cumulative;
                report.epsilon_outsider_round = *epsilon_outsider_round;
                report.epsilon_outsider_cumulative = *epsilon_outsider_cumulative;
                report.release = Some(ReleaseRecord {
                    included: included.clone(),
                    total_weight: *total_weight,
                    mean_sha256: mean_sha256.clone(),
                    error_bound: *error_bound,
                    release_signature: release_signature.clone(),
                });
                report.status = "released".into();
                report.closed_at_ms = Some(e.timestamp_ms);
                ended = true;
            }
            LogEvent::Aborted { phase, reason } => {
                report.status = "aborted".into();
                report.abort_reason = Some(format!("{reason} (in phase {phase})"));
                report.closed_at_ms = Some(e.timestamp_ms);
                ended = true;
            }
        }
    }
    report.dropouts.sort_unstable();
    Ok(report)
}

/// The aggregator's evidence as the server presents it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AggregatorEvidence {
    pub format: String,
    /// The enclave's Ed25519 identity key, hex: it signs tree heads and releases.
    pub identity_public_key: String,
    /// SHA-256 of the TLS certificate's SubjectPublicKeyInfo, hex.
    pub tls_fingerprint: String,
    /// The evidence, hex; its report data binds the identity key and the TLS key.
    pub evidence: String,
    /// The measurement the server read from the evidence (the audit checks it against
    /// the verified claims), when the evidence verifies without further endorsements.
    #[serde(default)]
    pub measurement: Option<String>,
}

/// One log entry in a bundle: the exact stored bytes and the audit path to the head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BundleEntry {
    pub index: u64,
    /// The entry's JSON, exactly as hashed into the log.
    pub data: String,
    /// Audit path to the bundle's tree head, hex hashes.
    pub inclusion_proof: Vec<String>,
}

/// A consistency proof from an earlier tree size to the bundle's tree head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConsistencyProof {
    pub from_size: u64,
    pub proof: Vec<String>,
}

/// Everything an auditor needs to check one round offline (`tessera-attest audit`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundBundle {
    pub version: u32,
    pub round: u64,
    pub report: RoundReport,
    /// Display names of roster keys from the operator's configuration (not in the log).
    pub names: BTreeMap<String, String>,
    pub aggregator: AggregatorEvidence,
    pub tree_head: SignedTreeHead,
    pub entries: Vec<BundleEntry>,
    pub consistency: Option<ConsistencyProof>,
}

pub const BUNDLE_VERSION: u32 = 1;

/// One named check of an audit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditCheck {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditOutcome {
    pub checks: Vec<AuditCheck>,
    /// The aggregator's evidence format, as verified (None when it did not verify; the
    /// bundle's own `aggregator.format` is the host's word).
    pub verified_format: Option<crate::Format>,
}

impl AuditOutcome {
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.passed)
    }

    pub fn failures(&self) -> impl Iterator<Item = &AuditCheck> {
        self.checks.iter().filter(|c| !c.passed)
    }

    fn record(&mut self, name: impl Into<String>, result: Result<String, String>) {
        let (passed, detail) = match result {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        self.checks.push(AuditCheck { name: name.into(), passed, detail });
    }
}

/// What the auditor brings besides the bundle.
#[derive(Clone, Debug, Default)]
pub struct AuditInputs {
    /// Policy for the aggregator's evidence.
    pub policy: NodePolicy,
    /// Verification time, seconds since the Unix epoch.
    pub now_secs: u64,
    /// A tree head the auditor kept from earlier; the bundle must extend it.
    pub previous_head: Option<SignedTreeHead>,
    /// The released mean (little-endian f32 bytes), to check against the logged hash.
    pub mean: Option<Vec<u8>>,
}

fn hash_from_hex(s: &str) -> Result<Hash, String> {
    hex::decode(s).ok().and_then(|v| v.try_into().ok()).ok_or_else(|| format!("{s:?} is not a 32-byte hex hash"))
}

fn hashes_from_hex(v: &[String]) -> Result<Vec<Hash>, String> {
    v.iter().map(|s| hash_from_hex(s)).collect()
}

/// Verifies a round bundle offline: the aggregator's evidence and its binding to the
/// identity key, the tree head's signature by that key, the inclusion of every entry,
/// that the entries are the round's complete record, that the report is exactly what
/// the entries say, consistency with an earlier head, and the released mean's hash.
pub fn audit_bundle(bundle: &RoundBundle, inputs: &AuditInputs) -> AuditOutcome {
    let mut out = AuditOutcome::default();
    if bundle.version != BUNDLE_VERSION {
        out.record("bundle version", Err(format!("version {} is not supported (expected {BUNDLE_VERSION})", bundle.version)));
        return out;
    }

    // 1. The aggregator's evidence, bound to its identity key and TLS key.
    let identity: Option<[u8; 32]> = hex::decode(&bundle.aggregator.identity_public_key).ok().and_then(|v| v.try_into().ok());
    let fingerprint = hex::decode(&bundle.aggregator.tls_fingerprint).ok().filter(|v| v.len() == 32);
    let evidence = hex::decode(&bundle.aggregator.evidence).ok();
    match (identity, &fingerprint, &evidence) {
        (Some(identity), Some(fingerprint), Some(evidence)) => {
            let expected = crate::binding::aggregator_report_data(&identity, fingerprint);
            // Signatures, certificates, CRLs and collateral are judged at the audit's
            // time (the present, unless the auditor reproduces a past verdict); the age
            // limit asks whether the evidence was fresh when the round opened.
            let opened_secs = bundle.report.opened_at_ms / 1000;
            let verdict = if evidence.is_empty() {
                inputs.policy.check(evidence, &[], &expected, inputs.now_secs)
            } else {
                match inputs.policy.verify(evidence, &[], inputs.now_secs) {
                    Ok(claims) => inputs.policy.evaluate(&claims, &expected, opened_secs),
                    Err(e) => crate::policy::Verdict {
                        accepted: false,
                        format: e.format(),
                        claims: None,
                        failures: vec![crate::policy::PolicyFailure::Unverified { reason: e.to_string() }],
                    },
                }
            };
            out.verified_format = verdict.claims.as_ref().map(|c| c.format);
            let detail = match &verdict.claims {
                Some(c) => format!("{} evidence, measurement {}{}", c.format, c.measurement, if c.debug { ", DEBUG" } else { "" }),
                None => "evidence did not verify".into(),
            };
            out.record("aggregator evidence", if verdict.accepted { Ok(detail) } else { Err(format!("{detail}: {}", verdict.reasons())) });
            if let (Some(stated), Some(claims)) = (&bundle.aggregator.measurement, &verdict.claims) {
                out.record(
                    "aggregator measurement",
                    if stated.eq_ignore_ascii_case(&claims.measurement) {
                        Ok(stated.clone())
                    } else {
                        Err(format!("the bundle states {stated}, the evidence says {}", claims.measurement))
                    },
                );
            }
            let digest = sha256_hex(evidence);
            out.record(
                "report names this evidence",
                if digest == bundle.report.aggregator_evidence_sha256 {
                    Ok(format!("SHA-256 {digest}"))
                } else {
                    Err(format!("the log's round_opened names evidence {}, the bundle carries {digest}", bundle.report.aggregator_evidence_sha256))
                },
            );
        }
        _ => out.record("aggregator evidence", Err("identity_public_key, tls_fingerprint or evidence is not well-formed hex".into())),
    }

    // 2. The tree head, signed by the attested identity key.
    let root = match (identity, bundle.tree_head.root()) {
        (Some(key), Ok(root)) => match bundle.tree_head.verify(&key) {
            Ok(()) => {
                out.record("tree head signature", Ok(format!("size {}, root {}", bundle.tree_head.tree_size, bundle.tree_head.root_hash)));
                Some(root)
            }
            Err(e) => {
                out.record("tree head signature", Err(e.to_string()));
                None
            }
        },
        (_, Err(e)) => {
            out.record("tree head signature", Err(e.to_string()));
            None
        }
        (None, _) => {
            out.record("tree head signature", Err("no usable identity key".into()));
            None
        }
    };

    // 3. Inclusion of every entry, and the entries parse.
    let mut parsed = Vec::new();
    let mut included_all = root.is_some();
    for be in &bundle.entries {
        let leaf = translog::leaf_hash(be.data.as_bytes());
        let check = match (root, hashes_from_hex(&be.inclusion_proof)) {
            (Some(root), Ok(proof)) => translog::verify_inclusion(&leaf, be.index, bundle.tree_head.tree_size, &proof, &root).map_err(|e| e.to_string()),
            (None, _) => Err("no verified tree head".into()),
            (_, Err(e)) => Err(e),
        };
        if let Err(e) = check {
            included_all = false;
            out.record(format!("inclusion of entry {}", be.index), Err(e));
        }
        match LogEntry::parse(be.data.as_bytes()) {
            Ok(entry) if entry.index == be.index => parsed.push(entry),
            Ok(entry) => out.record(format!("entry {}", be.index), Err(format!("the entry says it is number {}", entry.index))),
            Err(e) => out.record(format!("entry {}", be.index), Err(e.to_string())),
        }
    }
    if included_all {
        out.record("inclusion proofs", Ok(format!("{} entries in the tree of size {}", bundle.entries.len(), bundle.tree_head.tree_size)));
    }

    // 4. The report is what the entries say, and nothing of the round was left out: a
    //    round that has not ended must run to the end of the signed tree, or its last
    //    entries could have been cut off.
    match derive_report(&parsed) {
        Ok(derived) if derived.status == "running" && derived.entries.last().map(|i| i + 1) != Some(bundle.tree_head.tree_size) => out.record(
            "report matches the log",
            Err(format!(
                "the round has no end entry, and its entries stop at {} while the signed log has {}: its record may be cut off",
                derived.entries.last().copied().unwrap_or(0),
                bundle.tree_head.tree_size
            )),
        ),
        Ok(derived) => {
            let round_ok = derived.round == bundle.round;
            if derived == bundle.report && round_ok {
                out.record(
                    "report matches the log",
                    Ok(format!("round {}: {}, {} participants, {} entries", derived.round, derived.status, derived.participants.len(), derived.entries.len())),
                );
            } else {
                out.record("report matches the log", Err(report_diff(&bundle.report, &derived)));
            }
        }
        Err(e) => out.record("report matches the log", Err(e.to_string())),
    }

    // 5. Consistency with an earlier head the auditor kept.
    if let Some(prev) = &inputs.previous_head {
        out.record("consistency with the earlier tree head", consistency(bundle, prev, identity, root));
    }

    // 6. The released mean, if the auditor has it.
    if let Some(mean) = &inputs.mean {
        let digest = sha256_hex(mean);
        let check = match &bundle.report.release {
            Some(r) if r.mean_sha256 == digest => Ok(format!("SHA-256 {digest}")),
            Some(r) => Err(format!("the mean's SHA-256 is {digest}, the log says {}", r.mean_sha256)),
            None => Err("the round released nothing".into()),
        };
        out.record("released mean", check);
    }
    out
}

fn consistency(bundle: &RoundBundle, prev: &SignedTreeHead, identity: Option<[u8; 32]>, root: Option<Hash>) -> Result<String, String> {
    let key = identity.ok_or("no usable identity key")?;
    prev.verify(&key).map_err(|e| format!("the earlier head: {e}"))?;
    let root = root.ok_or("no verified tree head")?;
    let old_root = prev.root().map_err(|e| e.to_string())?;
    let new = &bundle.tree_head;
    if prev.tree_size > new.tree_size {
        return Err(format!("the earlier head (size {}) is larger than the bundle's (size {}): the log shrank", prev.tree_size, new.tree_size));
    }
    if prev.tree_size == new.tree_size {
        return if old_root == root { Ok(format!("same tree (size {})", new.tree_size)) } else { Err("same size, different root: the log forked".into()) };
    }
    let c = bundle.consistency.as_ref().ok_or_else(|| format!("the bundle has no consistency proof (ask for it with since_size={})", prev.tree_size))?;
    if c.from_size != prev.tree_size {
        return Err(format!("the bundle's consistency proof starts at size {}, the earlier head has size {}", c.from_size, prev.tree_size));
    }
    let proof = hashes_from_hex(&c.proof)?;
    translog::verify_consistency(prev.tree_size, new.tree_size, &proof, &old_root, &root)
        .map(|()| format!("size {} → {} is an extension", prev.tree_size, new.tree_size))
        .map_err(|e| format!("{e}: the log was rewritten or forked"))
}

/// Names the report fields that differ from the derived report.
fn report_diff(given: &RoundReport, derived: &RoundReport) -> String {
    let a = serde_json::to_value(given).unwrap_or_default();
    let b = serde_json::to_value(derived).unwrap_or_default();
    let mut fields = Vec::new();
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for k in keys {
            if a.get(k) != b.get(k) {
                fields.push(k.as_str());
            }
        }
    }
    if given.round != derived.round {
        fields.push("round");
    }
    format!("the report differs from what the log says in: {}", fields.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened(index: u64, round: u64) -> LogEntry {
        LogEntry {
            index,
            timestamp_ms: 1000,
            round,
            event: LogEvent::RoundOpened {
                config_digest: "00".repeat(32),
                roster: vec!["aa".repeat(32), "bb".repeat(32), "cc".repeat(32)],
                min_survivors: 2,
                neighbours: 2,
                vector_len: 4,
                dp: None,
                node_policy_sha256: "11".repeat(32),
                aggregator_format: "dev-insecure".into(),
                aggregator_evidence_sha256: "22".repeat(32),
            },
        }
    }

    fn round_entries() -> Vec<LogEntry> {
        let mut v = vec![opened(5, 2)];
        let mut push = |event| {
            let index = 5 + v.len() as u64;
            v.push(LogEntry { index, timestamp_ms: 1000 + index, round: 2, event });
        };
        for c in 0..3u32 {
            let id = ["aa", "bb", "cc"][c as usize].repeat(32);
            push(LogEvent::Admission {
                client: c,
                identity: id,
                accepted: true,
                evidence_sha256: "33".repeat(32),
                format: Some("dev-insecure".into()),
                measurement: Some("44".repeat(48)),
                debug: Some(false),
                failures: vec![],
            });
        }
        push(LogEvent::PhaseClosed { from: "advertise_keys".into(), to: "share_keys".into(), responded: vec![0, 1, 2], missing: vec![] });
        push(LogEvent::MaskedInput { client: 0, sha256: "55".repeat(32), bytes: 100, record_privacy: None, base_version: None, staleness: None });
        push(LogEvent::MaskedInput { client: 2, sha256: "66".repeat(32), bytes: 100, record_privacy: None, base_version: None, staleness: None });
        push(LogEvent::PhaseClosed { from: "masked_input".into(), to: "consistency_check".into(), responded: vec![0, 2], missing: vec![1] });
        push(LogEvent::Released {
            included: vec![0, 2],
            total_weight: 2,
            mean_sha256: "77".repeat(32),
            error_bound: 1e-6,
            release_signature: "88".repeat(64),
            dp: None,
            epsilon_round: None,
            epsilon_cumulative: None,
            epsilon_by_participant: BTreeMap::new(),
            epsilon_outsider_round: None,
            epsilon_outsider_cumulative: None,
        });
        v
    }

    #[test]
    fn report_follows_the_entries() {
        let r = derive_report(&round_entries()).unwrap();
        assert_eq!(r.round, 2);
        assert_eq!(r.status, "released");
        assert_eq!(r.dropouts, vec![1]);
        assert_eq!(r.participants[1].dropped_in.as_deref(), Some("masked_input"));
        assert!(r.participants[0].included && !r.participants[1].included && r.participants[2].included);
        assert_eq!(r.participants[2].masked_input_sha256.as_deref(), Some("66".repeat(32).as_str()));
        assert_eq!(r.entries, (5..=13).collect::<Vec<_>>());
        assert_eq!(r.release.unwrap().mean_sha256, "77".repeat(32));
    }

    /// The signed claim reaches the report, labelled by what the sender was admitted on:
    /// dev evidence makes it a claim, hardware evidence of a non-debug node a measured
    /// figure. An entry without a claim keeps its old bytes (the field is left out).
    #[test]
    fn record_privacy_is_reported_with_its_source() {
        let claim = RecordPrivacySummary { epsilon: 6.5, delta: 1e-5, budget: 8.0, noise_multiplier: 0.8, sample_rate: 0.05, max_grad_norm: 1.0, steps: 16 };
        let mut e = round_entries();
        assert!(!String::from_utf8(e[5].to_bytes()).unwrap().contains("record_privacy"));
        for i in [5, 6] {
            if let LogEvent::MaskedInput { record_privacy, .. } = &mut e[i].event {
                *record_privacy = Some(claim);
            }
        }
        if let LogEvent::Admission { format, .. } = &mut e[3].event {
            *format = Some("amd-sev-snp".into());
        }
        let r = derive_report(&e).unwrap();
        assert_eq!(r.participants[0].record_privacy, Some(RecordPrivacyRecord { claim, source: RecordPrivacySource::Claimed }));
        assert_eq!(r.participants[2].record_privacy, Some(RecordPrivacyRecord { claim, source: RecordPrivacySource::Measured }));
        assert_eq!(r.participants[1].record_privacy, None);
        // A debug guest's figure is not measured either.
        if let LogEvent::Admission { debug, .. } = &mut e[3].event {
            *debug = Some(true);
        }
        assert_eq!(derive_report(&e).unwrap().participants[2].record_privacy.unwrap().source, RecordPrivacySource::Claimed);
        let parsed = LogEntry::parse(&e[5].to_bytes()).unwrap();
        assert_eq!(parsed, e[5]);
    }

    #[test]
    fn incomplete_records_are_refused() {
        let e = round_entries();
        // A gap.
        let mut gap = e.clone();
        gap.remove(4);
        assert!(matches!(derive_report(&gap), Err(ReportError::Incomplete(_))));
        // Not starting at round_opened.
        assert!(matches!(derive_report(&e[1..]), Err(ReportError::Incomplete(_))));
        // An entry of another round inside.
        let mut other = e.clone();
        other[3].round = 3;
        assert!(matches!(derive_report(&other), Err(ReportError::Incomplete(_))));
        // A client outside the roster.
        let mut bad = e.clone();
        bad[5].event = LogEvent::MaskedInput { client: 9, sha256: String::new(), bytes: 0, record_privacy: None, base_version: None, staleness: None };
        assert!(matches!(derive_report(&bad), Err(ReportError::Malformed(_))));
        // Entries after the end.
        let mut after = e.clone();
        after.push(LogEntry { index: 14, timestamp_ms: 0, round: 2, event: LogEvent::Aborted { phase: "x".into(), reason: "y".into() } });
        assert!(matches!(derive_report(&after), Err(ReportError::Incomplete(_))));
    }

    /// A bundle of `entries` as an honest-looking host would export it: dev evidence
    /// bound to the log key, five earlier leaves, a signed head, inclusion proofs, and
    /// the report of `report_from` (the entries before the tampering).
    fn bundle_of(entries: &[LogEntry], report_from: &[LogEntry]) -> (RoundBundle, AuditInputs) {
        use crate::Attester;
        let key = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[7; 32]).unwrap();
        let identity: [u8; 32] = ring::signature::KeyPair::public_key(&key).as_ref().try_into().unwrap();
        let fingerprint = [9u8; 32];
        let evidence =
            crate::dev::DevAttester::new([1; 32], [2; 48], false).attest(&crate::binding::aggregator_report_data(&identity, &fingerprint), 1).unwrap();
        let with_evidence = |list: &[LogEntry]| -> Vec<LogEntry> {
            let mut list = list.to_vec();
            if let LogEvent::RoundOpened { aggregator_evidence_sha256, .. } = &mut list[0].event {
                *aggregator_evidence_sha256 = sha256_hex(&evidence);
            }
            list
        };
        let (entries, report_from) = (with_evidence(entries), with_evidence(report_from));
        let mut log = translog::MerkleLog::new();
        for i in 0..5u8 {
            log.append(&[i]);
        }
        for e in &entries {
            log.append(&e.to_bytes());
        }
        let size = log.size();
        let root = log.root();
        let signature = ring::signature::Ed25519KeyPair::sign(&key, &translog::SignedTreeHead::signed_bytes(size, &root, 5_000));
        let tree_head =
            translog::SignedTreeHead { tree_size: size, root_hash: hex::encode(root), timestamp_ms: 5_000, signature: hex::encode(signature.as_ref()) };
        let bundle = RoundBundle {
            version: BUNDLE_VERSION,
            round: 2,
            report: derive_report(&report_from).unwrap(),
            names: BTreeMap::new(),
            aggregator: AggregatorEvidence {
                format: "dev-insecure".into(),
                identity_public_key: hex::encode(identity),
                tls_fingerprint: hex::encode(fingerprint),
                evidence: hex::encode(&evidence),
                measurement: None,
            },
            tree_head,
            entries: entries
                .iter()
                .map(|e| BundleEntry {
                    index: e.index,
                    data: String::from_utf8(e.to_bytes()).unwrap(),
                    inclusion_proof: log.inclusion(e.index, size).unwrap().iter().map(hex::encode).collect(),
                })
                .collect(),
            consistency: None,
        };
        (bundle, AuditInputs { policy: NodePolicy::insecure_dev(), now_secs: 10, previous_head: None, mean: None })
    }

    #[test]
    fn audit_cross_checks_catch_tampered_bundles() {
        let honest = round_entries();
        let (bundle, inputs) = bundle_of(&honest, &honest);
        let outcome = audit_bundle(&bundle, &inputs);
        assert!(outcome.passed(), "{:?}", outcome.checks);
        assert_eq!(outcome.verified_format, Some(crate::Format::DevInsecure));

        type Tamper = fn(&mut Vec<LogEntry>);
        let cases: Vec<(&str, Tamper, &str)> = vec![
            ("a responder outside the roster", |v| set_phase(&mut v[7], vec![0, 2, 7], vec![1]), "client 7 is not in the roster"),
            ("a responder never admitted", |v| set_admission(&mut v[2], false), "client 1 answered the advertise_keys phase but was never admitted"),
            (
                "a phase gaining a participant",
                |v| {
                    set_phase(&mut v[4], vec![0, 2], vec![1]);
                    set_phase(&mut v[7], vec![0, 1, 2], vec![]);
                },
                "client 1 answered the masked_input phase but not the advertise_keys phase before it",
            ),
            ("a client named twice", |v| set_phase(&mut v[7], vec![0, 2], vec![2]), "client 2 is named twice"),
            (
                "a masked input from a client never admitted",
                |v| {
                    set_admission(&mut v[3], false);
                    set_phase(&mut v[4], vec![0, 1], vec![2]);
                },
                "client 2 sent a masked input but was never admitted",
            ),
            (
                "a release including a client without a masked input",
                |v| set_included(&mut v[8], vec![0, 1, 2]),
                "client 1 is in the release but sent no masked input",
            ),
            ("a release leaving a masked input out", |v| set_included(&mut v[8], vec![0]), "client 2 sent a masked input that the release leaves out"),
        ];
        for (what, tamper, expected) in cases {
            let mut entries = honest.clone();
            tamper(&mut entries);
            let (bundle, inputs) = bundle_of(&entries, &honest);
            let outcome = audit_bundle(&bundle, &inputs);
            let failed: Vec<&AuditCheck> = outcome.failures().collect();
            assert_eq!(failed.len(), 1, "{what}: {failed:?}");
            assert_eq!(failed[0].name, "report matches the log", "{what}");
            assert!(failed[0].detail.contains(expected), "{what}: {}", failed[0].detail);
        }
    }

    fn set_phase(e: &mut LogEntry, r: Vec<u32>, m: Vec<u32>) {
        let LogEvent::PhaseClosed { responded, missing, .. } = &mut e.event else { panic!("not a phase entry") };
        *responded = r;
        *missing = m;
    }

    fn set_admission(e: &mut LogEntry, ok: bool) {
        let LogEvent::Admission { accepted, .. } = &mut e.event else { panic!("not an admission") };
        *accepted = ok;
    }

    fn set_included(e: &mut LogEntry, clients: Vec<u32>) {
        let LogEvent::Released { included, .. } = &mut e.event else { panic!("not a release") };
        *included = clients;
    }

    #[test]
    fn huge_indices_do_not_overflow() {
        let mut e = round_entries();
        e[0].index = u64::MAX;
        assert!(derive_report(&e).is_err());
    }

    #[test]
    fn entries_round_trip_through_their_bytes() {
        for e in round_entries() {
            assert_eq!(LogEntry::parse(&e.to_bytes()).unwrap(), e);
        }
        assert!(LogEntry::parse(b"{\"index\":1}").is_err());
        assert!(LogEntry::parse(b"\xff").is_err());
    }
}
