//! The trusted aggregator. Everything in Tessera that touches a round secret or can
//! release an aggregate lives here, meant to run inside a confidential VM or enclave:
//!
//! - it drives `tessera_secagg`'s [`Aggregator`](tessera_secagg::aggregator::Aggregator)
//!   and is the only component that can turn its sum into a released, signed
//!   [`Release`], and only when at least `t` clients survived;
//! - it admits a client only when the client's evidence verifies, is bound to the round
//!   keys it advertises, and meets the [`NodePolicy`];
//! - it seals what it persists (its identity key, its phase records) with AES-256-GCM
//!   under a [`SealingKey`]; in dev mode that key is a file, labelled INSECURE;
//! - it rebuilds a round after a crash from the host's stored events
//!   ([`Enclave::restore_round`]), checking every sealed record on the way.

pub mod log;
pub mod sealing;
pub mod sev_guest;
pub mod spool;
/// configfs-tsm evidence (shared with the client, which attests the same way).
pub use tessera_attestation::tsm;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
pub use tessera_attestation::binding::aggregator_report_data;
use tessera_attestation::policy::{NodePolicy, Verdict};
use tessera_attestation::Attester;
use tessera_secagg::aggregator::{Aggregator, Outcome, Phase, PhaseChange};
use tessera_secagg::client::key_binding;
use tessera_secagg::crypto::MessageSigner;
use tessera_secagg::quantize::Quantizer;
pub use tessera_secagg::wire::Release;
use tessera_secagg::wire::*;
use tessera_secagg::{ClientId, RoundConfig, Timestamp};

pub use log::{LogError, StoredLogEntry, TransparencyLog};
pub use sealing::SealingKey;
use tessera_attestation::audit::{sha256_hex, DpSummary, LogEvent};

#[derive(Debug, thiserror::Error)]
pub enum EnclaveError {
    #[error(transparent)]
    Protocol(#[from] tessera_secagg::Error),
    #[error("client {client} was not admitted: {reasons}")]
    NotAdmitted { client: ClientId, reasons: String, verdict: Box<Verdict> },
    #[error("no round is open")]
    NoRound,
    #[error("round {0} is already open")]
    RoundOpen(u64),
    #[error("sealed data does not authenticate ({0}): wrong key, tampering or rollback")]
    Unseal(&'static str),
    #[error("stored events do not replay to the sealed record at sequence {seq}: {why}")]
    ReplayMismatch { seq: u64, why: String },
    #[error("attestation failed: {0}")]
    Attestation(#[from] tessera_attestation::AttestError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("internal error: {0}")]
    Internal(String),
    /// The round's DP does not meet the federation's privacy budget (missing, other
    /// parameters than the budget fixed at creation, or past it).
    #[error("privacy budget: {0}")]
    Budget(String),
    /// The round would spend past the budget.
    #[error("privacy budget exhausted: {0}")]
    BudgetExhausted(String),
    #[error("the federation's sealed privacy budget is missing while the log holds {entries} entries: restore it (deleting it cannot reset the budget)")]
    FederationMissing { entries: u64 },
}

/// The federation's privacy budget: fixed when the federation is created, sealed under
/// the enclave's key, and charged by every DP round the enclave opens.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationBudget {
    /// Total ε the federation may spend over all its released rounds.
    pub epsilon: f64,
    pub delta: f64,
}

/// What [`Enclave::establish_federation`] settled.
#[derive(Debug)]
pub struct FederationSetup {
    /// The budget in force (None: the federation was created without one).
    pub budget: Option<FederationBudget>,
    /// The sealed record for the host to store.
    pub sealed: Vec<u8>,
    /// The operator's configuration differs from the sealed budget, and was ignored.
    pub configuration_ignored: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FederationRecord {
    budget: Option<FederationBudget>,
}

/// What the host stores for a round, in order, to replay after a crash. Client messages
/// are signed by their senders and the enclave's records are sealed, so the host can
/// drop or reorder entries (a rollback, detected where a sealed record disagrees) but
/// cannot forge them.
#[derive(Clone, Debug)]
pub enum StoredEvent {
    /// A client message the enclave accepted, as received, with the time it arrived.
    Message { kind: MessageKind, received_at: Timestamp, body: Vec<u8> },
    /// A masked input the enclave accepted, as received, read back into a file: it is
    /// replayed through the streamed fold, so a restore holds one batch of it at a time.
    /// The file is outside the enclave like the rest of the store: the fold hashes what
    /// it reads and checks the sender's signature over it.
    MaskedInputFile { received_at: Timestamp, input: spool::SpooledInput },
    /// A sealed [`PhaseChange`].
    Sealed { seq: u64, sealed: Vec<u8> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    Advertise,
    ShareKeys,
    MaskedInput,
    Consistency,
    Unmask,
}

/// A client message that parsed and passed [`preverify`].
#[derive(Debug)]
pub enum Preverified<'a> {
    Advertise(AdvertiseKeys),
    ShareKeys(ShareKeys),
    /// Masked inputs are folded from their received bytes, with the digest the early
    /// signature check computed (the body is hashed once).
    MaskedInput(tessera_secagg::wire::DigestedMaskedInput<'a>),
    Consistency(ConsistencySignature),
    Unmask(UnmaskShares),
}

/// What can be checked of a client message without the round's state: it parses, names
/// `cfg`'s round and a roster member, and, where the signed transcript depends only on
/// the message and the configuration (every message but the consistency signature, whose
/// transcript names the survivor set), carries that member's signature. A masked input's
/// header and length are checked before its body is hashed for the signature. The
/// server runs this before it takes the round's lock, so a body from no roster member
/// costs no one else any time; the enclave checks everything again.
pub fn preverify<'a>(cfg: &RoundConfig, digest: &[u8; 32], kind: MessageKind, body: &'a [u8]) -> Result<Preverified<'a>, EnclaveError> {
    let parse_err = |e: serde_json::Error| EnclaveError::Protocol(tessera_secagg::Error::Malformed(e.to_string()));
    let signed = |round: u64, client: ClientId, transcript: &tessera_secagg::crypto::Transcript, sig: &[u8; 64]| -> Result<(), EnclaveError> {
        check_round(cfg, round)?;
        check_signed(&roster_key(cfg, client)?, client, transcript, sig)
    };
    Ok(match kind {
        MessageKind::Advertise => {
            let m: AdvertiseKeys = serde_json::from_slice(body).map_err(parse_err)?;
            signed(m.round, m.client, &m.transcript(digest), &m.signature)?;
            Preverified::Advertise(m)
        }
        MessageKind::ShareKeys => {
            let m: ShareKeys = serde_json::from_slice(body).map_err(parse_err)?;
            signed(m.round, m.client, &m.transcript(digest), &m.signature)?;
            Preverified::ShareKeys(m)
        }
        MessageKind::MaskedInput => {
            let v = MaskedInputView::parse(body)?;
            let key = check_masked_header(cfg, &v)?;
            let input = v.digested();
            check_signed(&key, v.client, &input.transcript(digest), &v.signature)?;
            Preverified::MaskedInput(input)
        }
        MessageKind::Consistency => {
            let m: ConsistencySignature = serde_json::from_slice(body).map_err(parse_err)?;
            check_round(cfg, m.round)?;
            roster_key(cfg, m.client)?;
            Preverified::Consistency(m)
        }
        MessageKind::Unmask => {
            let m: UnmaskShares = serde_json::from_slice(body).map_err(parse_err)?;
            signed(m.round, m.client, &m.transcript(digest), &m.signature)?;
            Preverified::Unmask(m)
        }
    })
}

/// [`preverify`] for a masked input spooled to a file as it arrived: the header, read
/// first, gets [`preverify`]'s checks; then the body is hashed one batch of digest leaves
/// at a time (on up to `threads` threads) and the sender's signature checked over that
/// digest. Nothing is kept: the enclave's fold ([`Enclave::handle_masked_input_file`])
/// reads and hashes the file again, since the file may change in between.
pub fn preverify_masked_file(cfg: &RoundConfig, digest: &[u8; 32], input: &spool::SpooledInput, threads: usize) -> Result<(), EnclaveError> {
    let mut src = input.reader();
    let (h, prefix, total) = MaskedInputHeader::read_from(&mut src)?;
    let key = check_masked_header(cfg, &h)?;
    let data = tessera_secagg::aggregator::masked_body_digest(&mut src, &h, &prefix, total, threads)?;
    check_signed(&key, h.client, &MaskedInput::transcript_for(digest, h.round, h.client, &data, h.record_privacy.as_ref(), h.base_version), &h.signature)
}

fn protocol_error(e: tessera_secagg::ProtocolError) -> EnclaveError {
    EnclaveError::Protocol(tessera_secagg::Error::Protocol(e))
}

fn check_round(cfg: &RoundConfig, round: u64) -> Result<(), EnclaveError> {
    if round == cfg.round {
        Ok(())
    } else {
        Err(protocol_error(tessera_secagg::ProtocolError::WrongRound { expected: cfg.round, got: round }))
    }
}

/// The signing key of roster member `client`.
fn roster_key(cfg: &RoundConfig, client: ClientId) -> Result<[u8; 32], EnclaveError> {
    cfg.roster
        .get(client.0 as usize)
        .and_then(|h| hex::decode(h).ok())
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| protocol_error(tessera_secagg::ProtocolError::UnknownClient(client)))
}

fn check_signed(key: &[u8; 32], client: ClientId, transcript: &tessera_secagg::crypto::Transcript, sig: &[u8; 64]) -> Result<(), EnclaveError> {
    if tessera_secagg::crypto::verify_signature(key, transcript.as_bytes(), sig) {
        Ok(())
    } else {
        Err(protocol_error(tessera_secagg::ProtocolError::BadSignature(client)))
    }
}

/// What a masked input's header must state before its body is hashed: `cfg`'s round, a
/// roster member, the round's length and width. Returns the sender's key.
fn check_masked_header(cfg: &RoundConfig, h: &MaskedInputHeader) -> Result<[u8; 32], EnclaveError> {
    check_round(cfg, h.round)?;
    let key = roster_key(cfg, h.client)?;
    if h.count != cfg.masked_len() {
        return Err(protocol_error(tessera_secagg::ProtocolError::WrongLength { expected: cfg.masked_len(), got: h.count }));
    }
    if h.bits != cfg.modulus_bits {
        return Err(EnclaveError::Protocol(tessera_secagg::Error::Malformed(format!(
            "masked input elements are {} bits wide, the round's modulus is 2^{}",
            h.bits, cfg.modulus_bits
        ))));
    }
    Ok(key)
}

/// The outcome of [`Enclave::advance`]: the change, its sealed record for the host to
/// store, and the release if the round just finished.
#[derive(Debug)]
pub struct Transition {
    pub change: PhaseChange,
    pub seq: u64,
    pub sealed: Vec<u8>,
    pub release: Option<Release>,
}

struct RoundState {
    aggregator: Aggregator,
    quantizer: Quantizer,
    verdicts: BTreeMap<ClientId, Verdict>,
    seq: u64,
    release: Option<Release>,
    /// Clients still expected to answer (for naming dropouts in the log).
    alive: BTreeSet<u32>,
}

pub struct Enclave {
    sealing: SealingKey,
    identity: std::sync::Arc<ring::signature::Ed25519KeyPair>,
    attester: std::sync::Arc<dyn Attester>,
    node_policy: NodePolicy,
    round: Option<RoundState>,
    log: TransparencyLog,
    /// SHA-256 of the evidence this enclave last presented (named in `round_opened`).
    evidence_sha256: String,
    /// The federation's budget, once [`Enclave::establish_federation`] settled it.
    federation: Option<FederationBudget>,
    /// Threads the unmasking uses (default: the machine's cores).
    threads: usize,
}

impl std::fmt::Debug for Enclave {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enclave").field("identity", &hex::encode(self.identity_public_key())).field("attester", &self.attester.format()).finish_non_exhaustive()
    }
}

const IDENTITY_AAD: &[u8] = b"tessera/enclave-identity/v1";

impl Enclave {
    /// Starts the enclave. `sealed_identity` is the host-stored identity key from an
    /// earlier start; without one a new identity is generated. Returns the enclave and
    /// the sealed identity for the host to store.
    pub fn start(
        sealing: SealingKey,
        sealed_identity: Option<&[u8]>,
        attester: Box<dyn Attester>,
        node_policy: NodePolicy,
    ) -> Result<(Self, Vec<u8>), EnclaveError> {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        match sealed_identity {
            Some(blob) => {
                let plain = sealing.unseal(IDENTITY_AAD, blob).map_err(|_| EnclaveError::Unseal("identity key"))?;
                if plain.len() != 32 {
                    return Err(EnclaveError::Unseal("identity key length"));
                }
                seed.copy_from_slice(&plain);
            }
            None => rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, seed.as_mut()),
        }
        let identity =
            std::sync::Arc::new(ring::signature::Ed25519KeyPair::from_seed_unchecked(seed.as_ref()).map_err(|e| EnclaveError::Internal(e.to_string()))?);
        let sealed = sealing.seal(IDENTITY_AAD, seed.as_ref());
        let attester = std::sync::Arc::from(attester);
        Ok((
            Enclave {
                sealing,
                identity,
                attester,
                node_policy,
                round: None,
                log: TransparencyLog::default(),
                evidence_sha256: String::new(),
                federation: None,
                threads: tessera_secagg::prg::default_threads(),
            },
            sealed,
        ))
    }

    /// Sets the threads each round's unmasking uses (at least 1).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    pub fn identity_public_key(&self) -> [u8; 32] {
        MessageSigner::public_key(self.identity.as_ref())
    }

    /// Signs a tree head of the round log with the enclave's identity key (the key the
    /// aggregator's evidence binds), so an auditor can check heads against the attested key.
    pub fn sign_tree_head(
        &self,
        tree_size: u64,
        root: &tessera_attestation::translog::Hash,
        timestamp_ms: u64,
    ) -> tessera_attestation::translog::SignedTreeHead {
        let bytes = tessera_attestation::translog::SignedTreeHead::signed_bytes(tree_size, root, timestamp_ms);
        tessera_attestation::translog::SignedTreeHead {
            tree_size,
            root_hash: hex::encode(root),
            timestamp_ms,
            signature: hex::encode(self.identity.sign(&bytes).as_ref()),
        }
    }

    pub fn node_policy(&self) -> &NodePolicy {
        &self.node_policy
    }

    /// Evidence of this enclave bound to its identity key and to `context` (the TLS key
    /// and a nonce, in attested TLS): report_data = SHA-512(label ‖ identity ‖ context).
    /// The log records the digest of the evidence last produced here in every
    /// `round_opened` entry.
    pub fn evidence(&mut self, context: &[u8], now_secs: u64) -> Result<Vec<u8>, EnclaveError> {
        let evidence = self.evidence_maker().evidence_for(context, now_secs)?;
        self.evidence_sha256 = sha256_hex(&evidence);
        Ok(evidence)
    }

    /// A handle that makes evidence bound to this enclave's identity without holding the
    /// enclave (the host serves per-verifier evidence without stalling rounds).
    pub fn evidence_maker(&self) -> EvidenceMaker {
        EvidenceMaker { attester: self.attester.clone(), identity: self.identity_public_key() }
    }

    /// Replaces the log with the host's stored entries (at start, or after a failed
    /// store), checking them; see [`TransparencyLog::load`].
    pub fn load_log(&mut self, entries: &[StoredLogEntry]) -> Result<(), EnclaveError> {
        self.log = TransparencyLog::load(entries)?;
        Ok(())
    }

    /// Fixes the federation's privacy budget at its creation, or restores it. Call after
    /// [`Enclave::load_log`]. `sealed` is the host's stored record from an earlier start:
    /// it wins over `configured`, which is used only when the federation is created (the
    /// log is empty), so an operator cannot raise the budget later by editing the
    /// configuration, and a host cannot by deleting the record (the start then fails).
    pub fn establish_federation(&mut self, sealed: Option<&[u8]>, configured: Option<FederationBudget>) -> Result<FederationSetup, EnclaveError> {
        let aad = self.federation_aad();
        let budget = match sealed {
            Some(blob) => {
                let plain = self.sealing.unseal(&aad, blob).map_err(|_| EnclaveError::Unseal("federation budget"))?;
                let record: FederationRecord = serde_json::from_slice(&plain).map_err(|_| EnclaveError::Unseal("federation budget record"))?;
                record.budget
            }
            None if self.log.size() > 0 => return Err(EnclaveError::FederationMissing { entries: self.log.size() }),
            None => {
                if let Some(b) = configured {
                    let ok = |x: f64| x.is_finite() && x > 0.0;
                    if !ok(b.epsilon) || !ok(b.delta) || b.delta >= 1.0 {
                        return Err(EnclaveError::Budget(format!("the federation budget needs ε > 0 and 0 < δ < 1 (got ε = {}, δ = {})", b.epsilon, b.delta)));
                    }
                }
                configured
            }
        };
        let plain = serde_json::to_vec(&FederationRecord { budget }).map_err(|e| EnclaveError::Internal(e.to_string()))?;
        self.federation = budget;
        Ok(FederationSetup { budget, sealed: self.sealing.seal(&aad, &plain), configuration_ignored: budget != configured })
    }

    /// The federation's privacy budget in force.
    pub fn federation_budget(&self) -> Option<FederationBudget> {
        self.federation
    }

    fn federation_aad(&self) -> Vec<u8> {
        let mut aad = b"tessera/federation/v1".to_vec();
        aad.extend_from_slice(&self.identity_public_key());
        aad
    }

    /// Checks a round's DP against the federation's budget and the ε already spent: the
    /// charge is made here, before anything of the round exists, and since one round is
    /// open at a time its release cannot spend more than was checked.
    fn check_budget(&self, cfg: &RoundConfig) -> Result<(), EnclaveError> {
        if let Some(fed) = self.federation {
            let Some(dp) = cfg.dp else {
                return Err(EnclaveError::Budget(format!(
                    "the federation's budget (ε = {}, δ = {:e}) requires differential privacy on every round; round {} has none",
                    fed.epsilon, fed.delta, cfg.round
                )));
            };
            if dp.epsilon_budget != fed.epsilon || dp.delta != fed.delta {
                return Err(EnclaveError::Budget(format!(
                    "round {} states ε = {}, δ = {:e}; the federation's budget, fixed when it was created, is ε = {}, δ = {:e}",
                    cfg.round, dp.epsilon_budget, dp.delta, fed.epsilon, fed.delta
                )));
            }
        }
        if let Some(dp) = cfg.dp {
            let after = self.log.projected_epsilon(cfg.dp_mechanism(tessera_secagg::dp::Against::Coalition), dp.delta);
            if after > dp.epsilon_budget {
                return Err(EnclaveError::BudgetExhausted(format!(
                    "round {} would take the federation to ε = {after:.3} (δ = {:e}), past its budget of {}; the released DP rounds so far spent ε = {:.3}",
                    cfg.round,
                    dp.delta,
                    dp.epsilon_budget,
                    self.log.spent_epsilon(dp.delta)
                )));
            }
        }
        Ok(())
    }

    pub fn log(&self) -> &TransparencyLog {
        &self.log
    }

    /// The entries appended since the last call, for the host to store in the same
    /// transaction as the events that produced them.
    pub fn take_log_entries(&mut self) -> Vec<StoredLogEntry> {
        self.log.take_pending()
    }

    /// The current tree head, signed.
    pub fn tree_head(&self, timestamp_ms: u64) -> tessera_attestation::translog::SignedTreeHead {
        self.sign_tree_head(self.log.size(), &self.log.root(), timestamp_ms)
    }

    /// Records that the host ended `round` without a release (e.g. it could not be
    /// resumed after a restart). The entry says the host reported it.
    pub fn log_host_abort(&mut self, round: u64, reason: &str, now: Timestamp) -> Result<(), EnclaveError> {
        if self.log.open_round() != Some(round) {
            return Err(EnclaveError::Internal(format!("round {round} is not the log's open round; nothing to abort")));
        }
        let phase = match &self.round {
            Some(state) if state.aggregator.config().round == round => phase_name(state.aggregator.phase()),
            _ => "unknown".into(),
        };
        self.log.append(round, now.0, LogEvent::Aborted { phase, reason: format!("reported by the host: {reason}") });
        Ok(())
    }

    pub fn attestation_format(&self) -> tessera_attestation::Format {
        self.attester.format()
    }

    pub fn open_round(&mut self, cfg: RoundConfig, now: Timestamp) -> Result<(), EnclaveError> {
        if let Some(r) = &self.round {
            if !r.aggregator.phase().is_terminal() {
                return Err(EnclaveError::RoundOpen(r.aggregator.config().round));
            }
        }
        self.check_budget(&cfg)?;
        // The host proposes the cohort's version; the log says how many releases there were.
        if let Some(c) = cfg.cohort {
            let releases = self.log.releases();
            if c.version != releases {
                return Err(EnclaveError::Protocol(tessera_secagg::Error::Config(format!(
                    "cohort {} says the global version is {}, but the log holds {releases} releases",
                    cfg.round, c.version
                ))));
            }
        }
        let quantizer = Quantizer::new(&cfg)?;
        let mut aggregator = Aggregator::new(cfg, self.identity.clone(), now)?;
        aggregator.set_threads(self.threads);
        let cfg = aggregator.config();
        let event = LogEvent::RoundOpened {
            config_digest: hex::encode(aggregator.config_digest()),
            roster: cfg.roster.iter().map(|k| k.to_ascii_lowercase()).collect(),
            min_survivors: cfg.min_survivors,
            neighbours: cfg.neighbours,
            vector_len: cfg.vector_len,
            dp: dp_summary(cfg),
            node_policy_sha256: sha256_hex(&serde_json::to_vec(&self.node_policy).map_err(|e| EnclaveError::Internal(e.to_string()))?),
            aggregator_format: self.attester.format().to_string(),
            aggregator_evidence_sha256: self.evidence_sha256.clone(),
        };
        let round = cfg.round;
        let alive = (0..cfg.roster.len() as u32).collect();
        self.log.append(round, now.0, event);
        self.round = Some(RoundState { aggregator, quantizer, verdicts: BTreeMap::new(), seq: 0, release: None, alive });
        Ok(())
    }

    /// Forgets the current round (the host could not store its opening, or could not
    /// resume it); its log entries are whatever the host stored.
    pub fn discard_round(&mut self) {
        self.round = None;
    }

    fn state(&self) -> Result<&RoundState, EnclaveError> {
        self.round.as_ref().ok_or(EnclaveError::NoRound)
    }

    fn state_mut(&mut self) -> Result<&mut RoundState, EnclaveError> {
        self.round.as_mut().ok_or(EnclaveError::NoRound)
    }

    /// The enclave's signature over the open round's configuration: clients check it
    /// against the attested identity key before they advertise.
    pub fn config_signature(&self) -> Result<[u8; 64], EnclaveError> {
        Ok(self.state()?.aggregator.config_signature())
    }

    pub fn aggregator(&self) -> Result<&Aggregator, EnclaveError> {
        Ok(&self.state()?.aggregator)
    }

    pub fn verdicts(&self) -> Result<&BTreeMap<ClientId, Verdict>, EnclaveError> {
        Ok(&self.state()?.verdicts)
    }

    /// Phase 0 with admission: the client's evidence must verify, carry the binding of
    /// its advertised keys, and satisfy the node policy.
    pub fn handle_advertise(&mut self, msg: AdvertiseKeys, now: Timestamp) -> Result<Verdict, EnclaveError> {
        let policy = self.node_policy.clone();
        let state = self.state_mut()?;
        let digest = state.aggregator.config_digest();
        // Protocol checks first (round, phase, roster, signature, duplicate), so that a
        // replayed or forged advertisement cannot overwrite an earlier verdict.
        state.aggregator.check_advertise(&msg)?;
        let binding = key_binding(&digest, msg.client, &msg.enc_pk, &msg.mask_pk);
        let verdict = policy.check(&msg.evidence, &[], &binding, now.0 / 1000);
        state.verdicts.insert(msg.client, verdict.clone());
        let round = state.aggregator.config().round;
        let identity = state.aggregator.config().roster.get(msg.client.0 as usize).map(|k| k.to_ascii_lowercase()).unwrap_or_default();
        self.log.append(
            round,
            now.0,
            LogEvent::Admission {
                client: msg.client.0,
                identity,
                accepted: verdict.accepted,
                evidence_sha256: sha256_hex(&msg.evidence),
                format: verdict.format.map(|f| f.to_string()),
                measurement: verdict.claims.as_ref().map(|c| c.measurement.clone()),
                debug: verdict.claims.as_ref().map(|c| c.debug),
                failures: verdict.failures.iter().map(ToString::to_string).collect(),
            },
        );
        let state = self.state_mut()?;
        if !verdict.accepted {
            return Err(EnclaveError::NotAdmitted { client: msg.client, reasons: verdict.reasons(), verdict: Box::new(verdict) });
        }
        state.aggregator.handle_advertise(msg)?;
        Ok(verdict)
    }

    pub fn handle_share_keys(&mut self, msg: ShareKeys) -> Result<(), EnclaveError> {
        Ok(self.state_mut()?.aggregator.handle_share_keys(msg)?)
    }

    pub fn handle_consistency(&mut self, msg: ConsistencySignature) -> Result<(), EnclaveError> {
        Ok(self.state_mut()?.aggregator.handle_consistency(msg)?)
    }

    pub fn handle_unmask(&mut self, msg: UnmaskShares) -> Result<(), EnclaveError> {
        Ok(self.state_mut()?.aggregator.handle_unmask(msg)?)
    }

    /// Feeds one stored client message (used live by the host and in replay).
    /// Handles a message [`preverify`] parsed (`body` is its received bytes); the
    /// verdict is the admission's, for an advertisement.
    pub fn handle_preverified(&mut self, msg: Preverified<'_>, received_at: Timestamp) -> Result<Option<Verdict>, EnclaveError> {
        match msg {
            Preverified::Advertise(m) => self.handle_advertise(m, received_at).map(Some),
            Preverified::ShareKeys(m) => self.handle_share_keys(m).map(|()| None),
            Preverified::MaskedInput(input) => self.handle_masked_input(&input, received_at).map(|()| None),
            Preverified::Consistency(m) => self.handle_consistency(m).map(|()| None),
            Preverified::Unmask(m) => self.handle_unmask(m).map(|()| None),
        }
    }

    pub fn handle_message(&mut self, kind: MessageKind, body: &[u8], received_at: Timestamp) -> Result<(), EnclaveError> {
        let bytes = body;
        let parse_err = |e: serde_json::Error| EnclaveError::Protocol(tessera_secagg::Error::Malformed(e.to_string()));
        match kind {
            MessageKind::Advertise => self.handle_advertise(serde_json::from_slice(bytes).map_err(parse_err)?, received_at).map(|_| ()),
            MessageKind::ShareKeys => self.handle_share_keys(serde_json::from_slice(bytes).map_err(parse_err)?),
            MessageKind::MaskedInput => {
                let input = tessera_secagg::wire::MaskedInputView::parse(bytes)?.digested();
                self.handle_masked_input(&input, received_at)
            }
            MessageKind::Consistency => self.handle_consistency(serde_json::from_slice(bytes).map_err(parse_err)?),
            MessageKind::Unmask => self.handle_unmask(serde_json::from_slice(bytes).map_err(parse_err)?),
        }
    }

    fn handle_masked_input(&mut self, input: &tessera_secagg::wire::DigestedMaskedInput<'_>, received_at: Timestamp) -> Result<(), EnclaveError> {
        let (client, digest) = self.state_mut()?.aggregator.handle_masked_input_digested(input)?;
        let view = input.view();
        self.log_masked_input(client, digest, input.encoded_len(), view.record_privacy, view.base_version, received_at)
    }

    /// Folds a masked input from a file (an upload spooled as it arrived, or a stored one
    /// read back for a restore) with the streamed fold: the enclave holds the running sum
    /// and one batch of digest leaves, never the input. Every check of
    /// [`Enclave::handle_message`] applies; what is logged is the header the fold read.
    pub fn handle_masked_input_file(&mut self, input: &spool::SpooledInput, received_at: Timestamp) -> Result<(), EnclaveError> {
        let mut src = input.reader();
        let (h, digest) = self.state_mut()?.aggregator.handle_masked_input_stream(&mut src)?;
        self.log_masked_input(h.client, digest, h.body_at + h.body_len(), h.record_privacy, h.base_version, received_at)
    }

    fn log_masked_input(
        &mut self,
        client: ClientId,
        digest: [u8; 32],
        bytes: usize,
        record_privacy: Option<tessera_secagg::wire::RecordPrivacyClaim>,
        base_version: Option<u64>,
        received_at: Timestamp,
    ) -> Result<(), EnclaveError> {
        let state = self.state_mut()?;
        let round = state.aggregator.config().round;
        let record_privacy = record_privacy.map(|c| tessera_attestation::audit::RecordPrivacySummary {
            epsilon: c.epsilon,
            delta: c.delta,
            budget: c.budget,
            noise_multiplier: c.noise_multiplier,
            sample_rate: c.sample_rate,
            max_grad_norm: c.max_grad_norm,
            steps: c.steps,
        });
        // The aggregator accepted it, so the staleness is within the cohort's bound.
        let staleness = state.aggregator.config().cohort.zip(base_version).map(|(c, b)| c.version.saturating_sub(b));
        let event = LogEvent::MaskedInput { client: client.0, sha256: hex::encode(digest), bytes: bytes as u64, record_privacy, base_version, staleness };
        self.log.append(round, received_at.0, event);
        Ok(())
    }

    fn seal_change(&self, round: u64, seq: u64, change: &PhaseChange) -> Result<Vec<u8>, EnclaveError> {
        let plain = serde_json::to_vec(change).map_err(|e| EnclaveError::Internal(e.to_string()))?;
        let digest = self.state()?.aggregator.config_digest();
        Ok(self.sealing.seal(&record_aad(&self.identity_public_key(), &digest, round, seq), &plain))
    }

    /// Closes the current phase if it is due; see [`Aggregator::advance`].
    pub fn advance(&mut self, now: Timestamp) -> Result<Option<Transition>, EnclaveError> {
        let state = self.state_mut()?;
        let Some(change) = state.aggregator.advance(now) else { return Ok(None) };
        state.seq += 1;
        let seq = state.seq;
        let round = state.aggregator.config().round;
        let responded: BTreeSet<u32> = change.responded.iter().map(|c| c.0).collect();
        let missing: Vec<u32> = state.alive.difference(&responded).copied().collect();
        state.alive = responded.clone();
        self.log.append(
            round,
            change.at.0,
            LogEvent::PhaseClosed { from: phase_name(change.from), to: phase_name(change.to), responded: responded.into_iter().collect(), missing },
        );
        let release = self.finish_if_done()?;
        if let Some(r) = &release {
            let dp = dp_summary(self.state()?.aggregator.config());
            let included: Vec<u32> = r.included.iter().map(|c| c.0).collect();
            let figures = dp.as_ref().map(|dp| self.log.release_figures(round, dp, &included));
            let (epsilon_round, epsilon_cumulative, epsilon_outsider_round, epsilon_outsider_cumulative) = match &figures {
                Some(f) => (Some(f.round), Some(f.cumulative), Some(f.outsider_round), Some(f.outsider_cumulative)),
                None => (None, None, None, None),
            };
            let epsilon_by_participant = figures.map(|f| f.by_participant).unwrap_or_default();
            self.log.append(
                round,
                change.at.0,
                LogEvent::Released {
                    included,
                    total_weight: r.total_weight,
                    mean_sha256: hex::encode(r.mean_sha256),
                    error_bound: r.error_bound,
                    release_signature: hex::encode(r.signature),
                    dp,
                    epsilon_round,
                    epsilon_cumulative,
                    epsilon_by_participant,
                    epsilon_outsider_round,
                    epsilon_outsider_cumulative,
                },
            );
        } else if let Some(Outcome::Aborted { phase, reason }) = self.outcome() {
            let event = LogEvent::Aborted { phase: phase_name(*phase), reason: reason.clone() };
            self.log.append(round, change.at.0, event);
        }
        let sealed = self.seal_change(round, seq, &change)?;
        Ok(Some(Transition { change, seq, sealed, release }))
    }

    fn finish_if_done(&mut self) -> Result<Option<Release>, EnclaveError> {
        let state = self.state_mut()?;
        if state.release.is_some() {
            return Ok(None);
        }
        let Some(Outcome::Sum(sum)) = state.aggregator.outcome() else { return Ok(None) };
        let (round, included) = (sum.round, sum.included.clone());
        // The sum is consumed: the mean is written over it, and the release, the store's
        // copy and every reader share that one vector.
        let sum = state.aggregator.take_sum().unwrap_or_default();
        let mean = match state.quantizer.dequantize_sum(sum, included.len()) {
            Ok(mean) => mean,
            Err(e) => {
                // Deterministic in the inputs, so a replay refuses the same way.
                state.aggregator.refuse_release(format!("the sum cannot be released: {e}"));
                return Ok(None);
            }
        };
        let mut release = Release {
            round,
            config_digest: state.aggregator.config_digest(),
            total_weight: mean.total_weight,
            mean_sha256: Sha256::digest(Release::mean_bytes(&mean.mean)).into(),
            error_bound: state.quantizer.mean_error_bound(included.len(), mean.total_weight),
            included,
            signature: [0; 64],
            mean: std::sync::Arc::new(mean.mean),
        };
        release.signature = MessageSigner::sign(self.identity.as_ref(), release.transcript().as_bytes());
        self.state_mut()?.release = Some(release.clone());
        Ok(Some(release))
    }

    pub fn release(&self) -> Option<&Release> {
        self.round.as_ref().and_then(|r| r.release.as_ref())
    }

    pub fn outcome(&self) -> Option<&Outcome> {
        self.round.as_ref().and_then(|r| r.aggregator.outcome())
    }

    pub fn phase(&self) -> Option<Phase> {
        self.round.as_ref().map(|r| r.aggregator.phase())
    }

    /// Rebuilds a round from the host's stored events after a restart. Each sealed record
    /// must unseal and must equal the phase change the replay produces at that point.
    ///
    /// The log is reconciled on the way: entries the replay composes must equal the
    /// stored ones, and entries missing from the store are appended again (take them
    /// with [`Enclave::take_log_entries`] and store them). A disagreement fails the
    /// restore, naming the entry.
    pub fn restore_round(&mut self, cfg: RoundConfig, opened_at: Timestamp, events: &[StoredEvent]) -> Result<(), EnclaveError> {
        self.log.begin_replay(cfg.round);
        let result = self.replay(cfg, opened_at, events);
        let reconciled = self.log.end_replay();
        result?;
        Ok(reconciled?)
    }

    fn replay(&mut self, cfg: RoundConfig, opened_at: Timestamp, events: &[StoredEvent]) -> Result<(), EnclaveError> {
        let round = cfg.round;
        self.round = None;
        self.open_round(cfg, opened_at)?;
        for event in events {
            match event {
                StoredEvent::Message { kind, received_at, body } => self.handle_message(*kind, body, *received_at)?,
                StoredEvent::MaskedInputFile { received_at, input } => self.handle_masked_input_file(input, *received_at)?,
                StoredEvent::Sealed { seq, sealed } => {
                    let digest = self.state()?.aggregator.config_digest();
                    let aad = record_aad(&self.identity_public_key(), &digest, round, *seq);
                    let plain = self.sealing.unseal(&aad, sealed).map_err(|_| EnclaveError::Unseal("phase record"))?;
                    let recorded: PhaseChange = serde_json::from_slice(&plain).map_err(|e| EnclaveError::ReplayMismatch { seq: *seq, why: e.to_string() })?;
                    let transition =
                        self.advance(recorded.at)?.ok_or_else(|| EnclaveError::ReplayMismatch { seq: *seq, why: "the phase did not close".into() })?;
                    if transition.seq != *seq || transition.change != recorded {
                        return Err(EnclaveError::ReplayMismatch { seq: *seq, why: format!("replayed {:?}, recorded {:?}", transition.change, recorded) });
                    }
                }
            }
        }
        Ok(())
    }
}

/// See [`Enclave::evidence_maker`].
#[derive(Clone)]
pub struct EvidenceMaker {
    attester: std::sync::Arc<dyn Attester>,
    identity: [u8; 32],
}

impl std::fmt::Debug for EvidenceMaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EvidenceMaker({})", self.attester.format())
    }
}

impl EvidenceMaker {
    /// Evidence whose report data binds the enclave's identity key and `context`.
    pub fn evidence_for(&self, context: &[u8], now_secs: u64) -> Result<Vec<u8>, EnclaveError> {
        Ok(self.attester.attest(&aggregator_report_data(&self.identity, context), now_secs)?)
    }
}

fn phase_name(p: Phase) -> String {
    serde_json::to_value(p).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_else(|| format!("{p:?}"))
}

/// The DP parameters of `cfg`'s round as the log records them (`None` without DP).
fn dp_summary(cfg: &RoundConfig) -> Option<DpSummary> {
    let dp = cfg.dp?;
    Some(DpSummary {
        noise_multiplier: dp.noise_multiplier,
        l2_clip: dp.l2_clip,
        delta: dp.delta,
        epsilon_budget: dp.epsilon_budget,
        colluders: dp.colluders,
        adjacency: tessera_attestation::audit::Adjacency::ZeroOut,
        skellam: dp.skellam.map(|s| tessera_attestation::audit::SkellamSummary { scale: s.scale.unwrap_or(0.0), beta: s.beta, dim: cfg.encoded_len() as u64 }),
    })
}

/// What a sealed phase record is bound to besides its bytes: the enclave identity that
/// sealed it, the round's configuration digest, the round and the sequence, so a record
/// cannot be moved to another round, configuration or enclave.
fn record_aad(identity: &[u8; 32], config_digest: &[u8; 32], round: u64, seq: u64) -> Vec<u8> {
    let mut aad = b"tessera/phase-record/v2".to_vec();
    aad.extend_from_slice(identity);
    aad.extend_from_slice(config_digest);
    aad.extend_from_slice(&round.to_le_bytes());
    aad.extend_from_slice(&seq.to_le_bytes());
    aad
}
