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

pub mod sealing;
pub mod tsm;

use std::collections::BTreeMap;

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

pub use sealing::SealingKey;

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
    #[error("internal error: {0}")]
    Internal(String),
}

/// What the host stores for a round, in order, to replay after a crash. Client messages
/// are signed by their senders and the enclave's records are sealed, so the host can
/// drop or reorder entries (a rollback, detected where a sealed record disagrees) but
/// cannot forge them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum StoredEvent {
    /// A client message the enclave accepted, as received, with the time it arrived.
    Message { kind: MessageKind, received_at: Timestamp, body: Vec<u8> },
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
}

pub struct Enclave {
    sealing: SealingKey,
    identity: ring::signature::Ed25519KeyPair,
    attester: Box<dyn Attester>,
    node_policy: NodePolicy,
    round: Option<RoundState>,
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
        let identity = ring::signature::Ed25519KeyPair::from_seed_unchecked(seed.as_ref()).map_err(|e| EnclaveError::Internal(e.to_string()))?;
        let sealed = sealing.seal(IDENTITY_AAD, seed.as_ref());
        Ok((Enclave { sealing, identity, attester, node_policy, round: None }, sealed))
    }

    pub fn identity_public_key(&self) -> [u8; 32] {
        MessageSigner::public_key(&self.identity)
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
    pub fn evidence(&self, context: &[u8], now_secs: u64) -> Result<Vec<u8>, EnclaveError> {
        Ok(self.attester.attest(&aggregator_report_data(&self.identity_public_key(), context), now_secs)?)
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
        let quantizer = Quantizer::new(&cfg);
        let aggregator = Aggregator::new(cfg, now)?;
        self.round = Some(RoundState { aggregator, quantizer, verdicts: BTreeMap::new(), seq: 0, release: None });
        Ok(())
    }

    fn state(&self) -> Result<&RoundState, EnclaveError> {
        self.round.as_ref().ok_or(EnclaveError::NoRound)
    }

    fn state_mut(&mut self) -> Result<&mut RoundState, EnclaveError> {
        self.round.as_mut().ok_or(EnclaveError::NoRound)
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
        if !verdict.accepted {
            return Err(EnclaveError::NotAdmitted { client: msg.client, reasons: verdict.reasons(), verdict: Box::new(verdict) });
        }
        state.aggregator.handle_advertise(msg)?;
        Ok(verdict)
    }

    pub fn handle_share_keys(&mut self, msg: ShareKeys) -> Result<(), EnclaveError> {
        Ok(self.state_mut()?.aggregator.handle_share_keys(msg)?)
    }

    pub fn handle_masked_input(&mut self, msg: &MaskedInput) -> Result<(), EnclaveError> {
        Ok(self.state_mut()?.aggregator.handle_masked_input(msg)?)
    }

    pub fn handle_consistency(&mut self, msg: ConsistencySignature) -> Result<(), EnclaveError> {
        Ok(self.state_mut()?.aggregator.handle_consistency(msg)?)
    }

    pub fn handle_unmask(&mut self, msg: UnmaskShares) -> Result<(), EnclaveError> {
        Ok(self.state_mut()?.aggregator.handle_unmask(msg)?)
    }

    /// Feeds one stored client message (used live by the host and in replay).
    pub fn handle_message(&mut self, kind: MessageKind, body: &[u8], received_at: Timestamp) -> Result<(), EnclaveError> {
        let bytes = body;
        let parse_err = |e: serde_json::Error| EnclaveError::Protocol(tessera_secagg::Error::Malformed(e.to_string()));
        match kind {
            MessageKind::Advertise => self.handle_advertise(serde_json::from_slice(bytes).map_err(parse_err)?, received_at).map(|_| ()),
            MessageKind::ShareKeys => self.handle_share_keys(serde_json::from_slice(bytes).map_err(parse_err)?),
            MessageKind::MaskedInput => Ok(self.state_mut()?.aggregator.handle_masked_input_encoded(bytes)?),
            MessageKind::Consistency => self.handle_consistency(serde_json::from_slice(bytes).map_err(parse_err)?),
            MessageKind::Unmask => self.handle_unmask(serde_json::from_slice(bytes).map_err(parse_err)?),
        }
    }

    fn seal_change(&self, round: u64, seq: u64, change: &PhaseChange) -> Result<Vec<u8>, EnclaveError> {
        let plain = serde_json::to_vec(change).map_err(|e| EnclaveError::Internal(e.to_string()))?;
        Ok(self.sealing.seal(&record_aad(round, seq), &plain))
    }

    /// Closes the current phase if it is due; see [`Aggregator::advance`].
    pub fn advance(&mut self, now: Timestamp) -> Result<Option<Transition>, EnclaveError> {
        let state = self.state_mut()?;
        let Some(change) = state.aggregator.advance(now) else { return Ok(None) };
        state.seq += 1;
        let seq = state.seq;
        let round = state.aggregator.config().round;
        let release = self.finish_if_done()?;
        let sealed = self.seal_change(round, seq, &change)?;
        Ok(Some(Transition { change, seq, sealed, release }))
    }

    fn finish_if_done(&mut self) -> Result<Option<Release>, EnclaveError> {
        let state = self.state()?;
        let Some(Outcome::Sum(sum)) = state.aggregator.outcome() else { return Ok(None) };
        if state.release.is_some() {
            return Ok(None);
        }
        let mean = state.quantizer.dequantize_sum(&sum.sum, sum.included.len())?;
        let mut release = Release {
            round: sum.round,
            config_digest: state.aggregator.config_digest(),
            included: sum.included.clone(),
            total_weight: mean.total_weight,
            mean_sha256: Sha256::digest(Release::mean_bytes(&mean.mean)).into(),
            error_bound: state.quantizer.mean_error_bound(sum.included.len(), mean.total_weight),
            signature: [0; 64],
            mean: mean.mean,
        };
        release.signature = MessageSigner::sign(&self.identity, release.transcript().as_bytes());
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
    pub fn restore_round(&mut self, cfg: RoundConfig, opened_at: Timestamp, events: &[StoredEvent]) -> Result<(), EnclaveError> {
        let round = cfg.round;
        self.round = None;
        self.open_round(cfg, opened_at)?;
        for event in events {
            match event {
                StoredEvent::Message { kind, received_at, body } => self.handle_message(*kind, body, *received_at)?,
                StoredEvent::Sealed { seq, sealed } => {
                    let plain = self.sealing.unseal(&record_aad(round, *seq), sealed).map_err(|_| EnclaveError::Unseal("phase record"))?;
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

fn record_aad(round: u64, seq: u64) -> Vec<u8> {
    let mut aad = b"tessera/phase-record/v1".to_vec();
    aad.extend_from_slice(&round.to_le_bytes());
    aad.extend_from_slice(&seq.to_le_bytes());
    aad
}
