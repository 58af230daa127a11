//! The aggregator side of one SecAgg+ round, as a state machine.
//!
//! Messages enter through `handle_*`; each returns a typed error for anything
//! unacceptable (wrong round, wrong phase, unknown or unexpected sender, duplicate, bad
//! signature, bad shape) and leaves the state untouched when it does. Time enters only
//! through [`Aggregator::advance`], which closes the current phase when every expected
//! client has answered or when its deadline has passed, and aborts the round when fewer
//! than `t` clients remain. What the server must send next is read with
//! [`Aggregator::key_directory`], [`Aggregator::share_bundle`],
//! [`Aggregator::survivor_set`] and [`Aggregator::unmask_request`], each signed with the
//! aggregator's identity key (the key its attestation evidence binds), and the round's
//! configuration is vouched for by [`Aggregator::config_signature`].
//!
//! Masked inputs are folded into one running sum as they arrive, so memory is O(m)
//! whatever the number of clients. Because the state only changes in `handle_*` and
//! `advance`, replaying the accepted messages and the recorded phase closings in order
//! rebuilds it exactly, which is how the server recovers from a crash.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::client::{PAIR_MASK_LABEL, SELF_MASK_LABEL, SHARE_CIPHERTEXT_LEN};
use crate::config::{ClientId, RoundConfig};
use crate::crypto::{self, MessageSigner, RoundKey, MASK_ROLE};
use crate::error::{Error, ProtocolError};
use crate::graph::CommunicationGraph;
use crate::prg::{apply_masks, MaskStream, Sign};
use crate::shamir::{self, Share};
use crate::wire::*;
use crate::Timestamp;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    AdvertiseKeys,
    ShareKeys,
    MaskedInput,
    ConsistencyCheck,
    Unmasking,
    Finished,
    Aborted,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Finished | Phase::Aborted)
    }
}

/// The modular sum of the included clients' quantized inputs, weight last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AggregateSum {
    pub round: u64,
    pub included: Vec<ClientId>,
    /// Empty once moved out with [`Aggregator::take_sum`].
    pub sum: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Sum(AggregateSum),
    Aborted { phase: Phase, reason: String },
}

/// A phase closing, returned by [`Aggregator::advance`]; the server records it (with
/// the time it happened) so that a restart can replay it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseChange {
    pub from: Phase,
    pub to: Phase,
    pub at: Timestamp,
    /// Clients that answered in the closed phase.
    pub responded: Vec<ClientId>,
}

/// The signed fields of a masked input besides its body.
struct InputHeader<'a> {
    round: u64,
    client: ClientId,
    signature: &'a [u8; 64],
    claim: Option<&'a crate::wire::RecordPrivacyClaim>,
    base_version: Option<u64>,
}

pub struct Aggregator {
    cfg: RoundConfig,
    signer: std::sync::Arc<dyn MessageSigner>,
    digest: [u8; 32],
    graph: CommunicationGraph,
    roster: Vec<[u8; 32]>,
    phase: Phase,
    deadline: Timestamp,
    u1: BTreeMap<ClientId, AdvertiseKeys>,
    u2: BTreeMap<ClientId, ShareKeys>,
    /// U3 with the signature of each accepted masked input (to recognise retransmissions).
    u3: BTreeMap<ClientId, [u8; 64]>,
    sum: Vec<u32>,
    u4: BTreeMap<ClientId, ConsistencySignature>,
    u5: BTreeMap<ClientId, UnmaskShares>,
    outcome: Option<Outcome>,
    /// Threads the unmasking uses (default: the machine's cores).
    threads: usize,
    /// U3 and the unmask request, signed once: every client is sent the same message,
    /// and U3 and U4 never change after their phases close.
    survivor_set: std::sync::OnceLock<SurvivorSet>,
    unmask_request: std::sync::OnceLock<UnmaskRequest>,
}

impl std::fmt::Debug for Aggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aggregator").field("round", &self.cfg.round).field("phase", &self.phase).finish_non_exhaustive()
    }
}

impl Aggregator {
    /// Opens a round. `signer` is the aggregator's identity key: it signs every message
    /// the aggregator sends to clients.
    pub fn new(cfg: RoundConfig, signer: std::sync::Arc<dyn MessageSigner>, now: Timestamp) -> Result<Self, Error> {
        cfg.validate()?;
        let roster = (0..cfg.participants()).map(|i| cfg.roster_key(ClientId(i as u32))).collect::<Result<_, _>>()?;
        Ok(Aggregator {
            digest: cfg.digest(),
            graph: CommunicationGraph::for_config(&cfg)?,
            roster,
            phase: Phase::AdvertiseKeys,
            deadline: now.saturating_add_ms(cfg.advertise_timeout_ms()),
            sum: vec![0; cfg.masked_len()],
            cfg,
            signer,
            u1: BTreeMap::new(),
            u2: BTreeMap::new(),
            u3: BTreeMap::new(),
            u4: BTreeMap::new(),
            u5: BTreeMap::new(),
            outcome: None,
            threads: crate::prg::default_threads(),
            survivor_set: std::sync::OnceLock::new(),
            unmask_request: std::sync::OnceLock::new(),
        })
    }

    /// Sets the threads unmasking uses (at least 1); the sum is the same for any count.
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    pub fn config(&self) -> &RoundConfig {
        &self.cfg
    }

    pub fn config_digest(&self) -> [u8; 32] {
        self.digest
    }

    /// The aggregator's signature over the configuration (see [`round_config_transcript`]).
    pub fn config_signature(&self) -> [u8; 64] {
        self.signer.sign(round_config_transcript(&self.digest, self.cfg.round).as_bytes())
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// When [`Aggregator::advance`] should next be called, if the round is still running.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        (!self.phase.is_terminal()).then_some(self.deadline)
    }

    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// Moves the unmasked sum out of a finished round's outcome, which keeps the round
    /// and who was included: whoever releases the mean consumes the sum, so the two are
    /// never held side by side. `None` before the round finished or after an abort.
    pub fn take_sum(&mut self) -> Option<Vec<u32>> {
        match self.outcome.as_mut() {
            Some(Outcome::Sum(s)) => Some(std::mem::take(&mut s.sum)),
            _ => None,
        }
    }

    /// Ends a finished round as aborted because its sum cannot be released (a total
    /// weight of zero, which a roster member can force by choosing its weight word, or
    /// a sum the round's decoding refuses): nothing is released, the round does not stay
    /// finished without a release, and nothing of the sum survives. No effect on a round
    /// that is not finished.
    pub fn refuse_release(&mut self, reason: String) {
        if matches!(self.outcome, Some(Outcome::Sum(_))) {
            self.abort(reason);
        }
    }

    /// Checks common to every message, in this order: round, sender, retransmission or
    /// equivocation (`previous` is the signature already accepted from this sender in
    /// this phase), abort, phase. A byte-identical retransmission is recognised even
    /// after its phase closed, so a client whose acknowledgement was lost can tell.
    fn check(&self, round: u64, phase: Phase, client: ClientId, previous: Option<&[u8; 64]>, signature: &[u8; 64]) -> Result<[u8; 32], Error> {
        if round != self.cfg.round {
            return Err(ProtocolError::WrongRound { expected: self.cfg.round, got: round }.into());
        }
        let key = self.roster.get(client.0 as usize).copied().ok_or(ProtocolError::UnknownClient(client))?;
        if let Some(prev) = previous {
            return Err(if bool::from(subtle::ConstantTimeEq::ct_eq(&prev[..], &signature[..])) {
                ProtocolError::AlreadyAccepted(client)
            } else {
                ProtocolError::Duplicate(client)
            }
            .into());
        }
        if let Some(Outcome::Aborted { reason, .. }) = &self.outcome {
            return Err(ProtocolError::Aborted(reason.clone()).into());
        }
        if self.phase != phase {
            return Err(ProtocolError::WrongPhase { current: self.phase, got: phase }.into());
        }
        Ok(key)
    }

    fn verify(&self, key: &[u8; 32], client: ClientId, transcript: &crypto::Transcript, sig: &[u8; 64]) -> Result<(), Error> {
        if crypto::verify_signature(key, transcript.as_bytes(), sig) {
            Ok(())
        } else {
            Err(ProtocolError::BadSignature(client).into())
        }
    }

    /// Phase 0. Attestation of the evidence is the enclave's job and happens before this.
    pub fn handle_advertise(&mut self, msg: AdvertiseKeys) -> Result<(), Error> {
        self.check_advertise(&msg)?;
        self.u1.insert(msg.client, msg);
        Ok(())
    }

    /// Every protocol check of [`Aggregator::handle_advertise`], without accepting the
    /// message; the enclave runs it before spending time on the client's evidence.
    pub fn check_advertise(&self, msg: &AdvertiseKeys) -> Result<(), Error> {
        let key = self.check(msg.round, Phase::AdvertiseKeys, msg.client, self.u1.get(&msg.client).map(|m| &m.signature), &msg.signature)?;
        self.verify(&key, msg.client, &msg.transcript(&self.digest), &msg.signature)
    }

    /// Phase 1: one ciphertext for each neighbour in U1, no more, no less.
    pub fn handle_share_keys(&mut self, msg: ShareKeys) -> Result<(), Error> {
        let key = self.check(msg.round, Phase::ShareKeys, msg.client, self.u2.get(&msg.client).map(|m| &m.signature), &msg.signature)?;
        if !self.u1.contains_key(&msg.client) {
            return Err(ProtocolError::NotInSurvivorSet(msg.client).into());
        }
        self.verify(&key, msg.client, &msg.transcript(&self.digest), &msg.signature)?;
        let expected: BTreeSet<ClientId> = self.graph.neighbours(msg.client).iter().filter(|v| self.u1.contains_key(v)).copied().collect();
        let got: BTreeSet<ClientId> = msg.shares.iter().map(|s| s.to).collect();
        if got.len() != msg.shares.len() {
            return Err(ProtocolError::BadShares { from: msg.client, why: "two shares for one neighbour" }.into());
        }
        if got != expected {
            return Err(ProtocolError::BadShares { from: msg.client, why: "shares do not go to exactly its neighbours in U1" }.into());
        }
        if msg.shares.iter().any(|s| s.ciphertext.len() != SHARE_CIPHERTEXT_LEN) {
            return Err(ProtocolError::BadShares { from: msg.client, why: "ciphertext has the wrong length" }.into());
        }
        if expected.len() < self.cfg.share_threshold as usize {
            return Err(ProtocolError::BadShares { from: msg.client, why: "too few neighbours in U1 to recover its secrets" }.into());
        }
        self.u2.insert(msg.client, msg);
        Ok(())
    }

    /// Phase 2: verifies and folds the masked input into the running sum.
    pub fn handle_masked_input(&mut self, msg: &MaskedInput) -> Result<(), Error> {
        self.check_width(msg.bits)?;
        // Decoded bodies are within the width by construction; a vector built in memory may not be.
        let modulus = self.cfg.modulus_mask();
        if msg.data.iter().any(|x| x & !modulus != 0) {
            return Err(Error::malformed("masked input exceeds the modulus"));
        }
        let digest = MaskedInput::data_digest(&msg.data, msg.bits);
        let header =
            InputHeader { round: msg.round, client: msg.client, signature: &msg.signature, claim: msg.record_privacy.as_ref(), base_version: msg.base_version };
        self.fold_masked(&header, &digest, msg.data.len(), |sum| {
            for (s, x) in sum.iter_mut().zip(&msg.data) {
                *s = s.wrapping_add(*x);
            }
        })
    }

    /// Phase 2 from the received bytes, without decoding them into a second vector:
    /// peak memory for a submission is the received body plus the running sum.
    /// Returns the sender and the data digest of the masked vector (the digest its
    /// signature covers, [`crate::wire::data_digest_of_bytes`]), so callers can record it
    /// without hashing the input again.
    pub fn handle_masked_input_encoded(&mut self, bytes: &[u8]) -> Result<(ClientId, [u8; 32]), Error> {
        self.handle_masked_input_digested(&MaskedInputView::parse(bytes)?.digested())
    }

    /// [`Aggregator::handle_masked_input_encoded`] for an input whose digest was already
    /// computed (by an early signature check): the body is not hashed again.
    pub fn handle_masked_input_digested(&mut self, input: &DigestedMaskedInput<'_>) -> Result<(ClientId, [u8; 32]), Error> {
        let view = input.view();
        self.check_width(view.bits)?;
        let header = InputHeader {
            round: view.round,
            client: view.client,
            signature: &view.signature,
            claim: view.record_privacy.as_ref(),
            base_version: view.base_version,
        };
        // 32-bit bodies are words; packed ones are read eight elements at a time.
        let digest = input.digest();
        if view.bits == 32 {
            self.fold_masked(&header, digest, view.len(), |sum| add_le_words(sum, view.body))?
        } else {
            self.fold_masked(&header, digest, view.len(), |sum| crate::pack::add_packed(sum, view.body, view.bits))?
        }
        Ok((view.client, *input.digest()))
    }

    /// Phase 2 from a source the input streams through (an upload spooled to a file):
    /// the header is read and checked first, then the body is read one batch of 1 MiB
    /// leaves at a time, each leaf hashed (the leaves of a batch on every core) and folded
    /// into the running sum, so the aggregator holds the sum and one batch, never the
    /// whole input. The signature covers the digest of every leaf, so it is checked at the
    /// end; if it (or anything after it) fails, the fold is undone by reading the body
    /// again, each leaf checked against the hash taken when it was folded: a source that
    /// changed in between cannot make the undo subtract other bytes. If the undo cannot
    /// be completed the sum is no longer the sum of accepted inputs, and the round is
    /// aborted rather than released. Same result, same errors as
    /// [`Aggregator::handle_masked_input_encoded`] over the same bytes.
    ///
    /// Returns the header it folded (read once: a source that changes afterwards cannot
    /// change what the caller records) and the data digest.
    pub fn handle_masked_input_stream<R: std::io::Read + std::io::Seek>(&mut self, src: &mut R) -> Result<(MaskedInputHeader, [u8; 32]), Error> {
        // Nothing is allocated from the length before the header's count has been checked
        // against the round (`admit`): the prefix is at most a header long, and a packed
        // body's padding is checked before anything is folded.
        let (h, prefix, total) = MaskedInputHeader::read_from(src)?;
        self.check_width(h.bits)?;
        let header = InputHeader { round: h.round, client: h.client, signature: &h.signature, claim: h.record_privacy.as_ref(), base_version: h.base_version };
        let key = self.admit(&header, h.count)?;
        let mut body = BodyWalk::new(&h, total, self.threads);
        // The fold: leaves hashed and added as they are read.
        let sum = &mut self.sum;
        let folded = body.walk(src, &prefix, None, Some((&mut sum[..], Op::Add)));
        let visited = body.visited;
        let leaves = match folded {
            Ok(leaves) => leaves,
            // Undo what the walk handed on before it stopped.
            Err(e) => return Err(self.undo(src, &prefix, &h, total, body.leaves_folded(), visited, e)),
        };
        let digest = crate::wire::data_digest_root(total - h.body_at, &leaves);
        let accepted = self
            .verify(&key, h.client, &MaskedInput::transcript_for(&self.digest, h.round, h.client, &digest, header.claim, h.base_version), &h.signature)
            .and_then(|()| self.check_signed(&header));
        match accepted {
            Ok(()) => {
                self.u3.insert(h.client, h.signature);
                Ok((h, digest))
            }
            Err(e) => Err(self.undo(src, &prefix, &h, total, Some(leaves), visited, e)),
        }
    }

    /// Subtracts what a streamed input added (its first `visited` elements, in the
    /// leaves whose hashes are `leaves`), reading them again; returns `why`, the reason
    /// the input is refused. A leaf that reads differently aborts the round, and the
    /// error returned is then the abort's.
    #[allow(clippy::too_many_arguments)]
    fn undo<R: std::io::Read + std::io::Seek>(
        &mut self,
        src: &mut R,
        prefix: &[u8],
        h: &MaskedInputHeader,
        total: usize,
        leaves: Option<Vec<[u8; 32]>>,
        visited: usize,
        why: Error,
    ) -> Error {
        let Some(leaves) = leaves else { return why };
        let mut body = BodyWalk::new(h, total, self.threads);
        body.stop_after = leaves.len();
        body.limit = visited;
        let sum = &mut self.sum;
        let undone = src
            .seek(std::io::SeekFrom::Start(prefix.len() as u64))
            .map_err(|e| Error::Io(format!("reading it again to undo its fold: {e}")))
            .and_then(|_| body.walk(src, prefix, Some(&leaves), Some((&mut sum[..], Op::Sub))));
        match undone {
            Ok(_) => why,
            Err(e) => {
                // Not the sender's fault: its input was refused ({why}), and the source it
                // was read from then changed.
                let reason = format!(
                    "the fold of client {}'s refused masked input ({why}) could not be undone ({e}): the running sum no longer is the sum of the accepted inputs",
                    h.client.0
                );
                self.abort(reason.clone());
                ProtocolError::Aborted(reason).into()
            }
        }
    }

    /// Elements travel at the round's width: packed below 32 bits, words at 32. Any
    /// other width is refused, so each masked vector has one encoding.
    fn check_width(&self, bits: u8) -> Result<(), Error> {
        if bits != self.cfg.modulus_bits {
            return Err(Error::malformed(format!("masked input elements are {bits} bits wide, the round's modulus is 2^{}", self.cfg.modulus_bits)));
        }
        Ok(())
    }

    fn fold_masked(
        &mut self,
        h: &InputHeader<'_>,
        digest: &[u8; 32],
        // The number of elements, each of the round's width ([`Aggregator::check_width`]).
        len: usize,
        // Adds the elements into the running sum, once every check has passed.
        add: impl FnOnce(&mut [u32]),
    ) -> Result<(), Error> {
        let key = self.admit(h, len)?;
        self.verify(&key, h.client, &MaskedInput::transcript_for(&self.digest, h.round, h.client, digest, h.claim, h.base_version), h.signature)?;
        self.check_signed(h)?;
        add(&mut self.sum);
        self.u3.insert(h.client, *h.signature);
        Ok(())
    }

    /// The checks a masked input's header must pass before its body matters: round,
    /// phase, sender, retransmission, survivor set, length. Returns the sender's key.
    fn admit(&self, h: &InputHeader<'_>, len: usize) -> Result<[u8; 32], Error> {
        let key = self.check(h.round, Phase::MaskedInput, h.client, self.u3.get(&h.client), h.signature)?;
        if !self.u2.contains_key(&h.client) {
            return Err(ProtocolError::NotInSurvivorSet(h.client).into());
        }
        if len != self.sum.len() {
            return Err(ProtocolError::WrongLength { expected: self.sum.len(), got: len }.into());
        }
        Ok(key)
    }

    /// What the signature makes the sender's own, checked after it: the record-level
    /// claim's coherence and the base version against the round's kind.
    fn check_signed(&self, h: &InputHeader<'_>) -> Result<(), Error> {
        if let Some(c) = h.claim {
            c.validate()?;
        }
        match (&self.cfg.cohort, h.base_version) {
            (Some(cohort), Some(base)) => {
                cohort.staleness(base)?;
            }
            (Some(_), None) => return Err(ProtocolError::BaseVersion("a masked input to a cohort of a buffered federation must name its base version").into()),
            (None, Some(_)) => {
                return Err(ProtocolError::BaseVersion("a base version is for cohorts of a buffered federation; this round is synchronous").into())
            }
            (None, None) => {}
        }
        Ok(())
    }

    pub fn handle_consistency(&mut self, msg: ConsistencySignature) -> Result<(), Error> {
        let key = self.check(msg.round, Phase::ConsistencyCheck, msg.client, self.u4.get(&msg.client).map(|m| &m.signature), &msg.signature)?;
        if !self.u3.contains_key(&msg.client) {
            return Err(ProtocolError::NotInSurvivorSet(msg.client).into());
        }
        let u3: Vec<ClientId> = self.u3.keys().copied().collect();
        self.verify(&key, msg.client, &SurvivorSet::transcript(&self.digest, self.cfg.round, &u3), &msg.signature)?;
        self.u4.insert(msg.client, msg);
        Ok(())
    }

    /// Phase 4: every revealed share must be of a neighbour, of the right kind for that
    /// neighbour's fate, and carry the x-coordinate the dealer gave this holder.
    pub fn handle_unmask(&mut self, msg: UnmaskShares) -> Result<(), Error> {
        let key = self.check(msg.round, Phase::Unmasking, msg.client, self.u5.get(&msg.client).map(|m| &m.signature), &msg.signature)?;
        if !self.u4.contains_key(&msg.client) {
            return Err(ProtocolError::NotInSurvivorSet(msg.client).into());
        }
        self.verify(&key, msg.client, &msg.transcript(&self.digest), &msg.signature)?;
        let bad = |why| Err(ProtocolError::BadShares { from: msg.client, why }.into());
        let mut seen = BTreeSet::new();
        for (list, want_survivor) in [(&msg.self_mask_shares, true), (&msg.mask_key_shares, false)] {
            for r in list {
                if !seen.insert(r.of) {
                    return bad("two shares of one neighbour");
                }
                if !self.u2.contains_key(&r.of) || self.u3.contains_key(&r.of) != want_survivor {
                    return bad("share kind does not match the neighbour's fate");
                }
                if self.graph.share_index(r.of, msg.client) != Some(r.share.x) {
                    return bad("share index does not match the communication graph");
                }
            }
        }
        self.u5.insert(msg.client, msg);
        Ok(())
    }

    fn expected(&self) -> BTreeSet<ClientId> {
        match self.phase {
            Phase::AdvertiseKeys => (0..self.roster.len() as u32).map(ClientId).collect(),
            Phase::ShareKeys => self.u1.keys().copied().collect(),
            Phase::MaskedInput => self.u2.keys().copied().collect(),
            Phase::ConsistencyCheck => self.u3.keys().copied().collect(),
            Phase::Unmasking => self.u4.keys().copied().collect(),
            Phase::Finished | Phase::Aborted => BTreeSet::new(),
        }
    }

    fn responded(&self) -> Vec<ClientId> {
        match self.phase {
            Phase::AdvertiseKeys => self.u1.keys().copied().collect(),
            Phase::ShareKeys => self.u2.keys().copied().collect(),
            Phase::MaskedInput => self.u3.keys().copied().collect(),
            Phase::ConsistencyCheck => self.u4.keys().copied().collect(),
            Phase::Unmasking => self.u5.keys().copied().collect(),
            Phase::Finished | Phase::Aborted => Vec::new(),
        }
    }

    /// Clients still expected to answer in the current phase.
    pub fn waiting_for(&self) -> Vec<ClientId> {
        let responded: BTreeSet<ClientId> = self.responded().into_iter().collect();
        self.expected().difference(&responded).copied().collect()
    }

    /// Closes the current phase if every expected client answered, or if `now` is past
    /// the deadline; returns the change, or `None` if the phase stays open.
    pub fn advance(&mut self, now: Timestamp) -> Option<PhaseChange> {
        if self.phase.is_terminal() {
            return None;
        }
        let responded = self.responded();
        let all_in = responded.len() == self.expected().len();
        let early_unmask = self.phase == Phase::Unmasking && responded.len() >= self.cfg.min_survivors as usize && self.unmask_ready();
        // A buffered cohort goes on with the first K institutions ready, and closes its
        // input phase at the first K masked updates: nobody waits for the slowest.
        let cohort_full =
            matches!(self.phase, Phase::AdvertiseKeys | Phase::MaskedInput) && self.cfg.cohort.as_ref().is_some_and(|c| responded.len() >= c.size as usize);
        if !(all_in || early_unmask || cohort_full || now >= self.deadline) {
            return None;
        }
        let from = self.phase;
        let t = self.cfg.min_survivors as usize;
        let next = if responded.len() < t {
            self.abort(format!("{} clients answered in phase {from:?}, the threshold is {t}", responded.len()));
            Phase::Aborted
        } else {
            match from {
                Phase::AdvertiseKeys => Phase::ShareKeys,
                Phase::ShareKeys => Phase::MaskedInput,
                Phase::MaskedInput => Phase::ConsistencyCheck,
                Phase::ConsistencyCheck => Phase::Unmasking,
                Phase::Unmasking => match self.unmask() {
                    Ok(sum) => {
                        self.outcome = Some(Outcome::Sum(sum));
                        Phase::Finished
                    }
                    Err(e) => {
                        self.abort(format!("unmasking failed: {e}"));
                        Phase::Aborted
                    }
                },
                Phase::Finished | Phase::Aborted => unreachable!("terminal phases return early"),
            }
        };
        if next != Phase::Aborted {
            self.phase = next;
        }
        self.deadline = now.saturating_add_ms(self.cfg.phase_timeout_ms);
        Some(PhaseChange { from, to: self.phase, at: now, responded })
    }

    fn abort(&mut self, reason: String) {
        self.outcome = Some(Outcome::Aborted { phase: self.phase, reason });
        self.phase = Phase::Aborted;
        // Nothing derived from inputs survives an abort.
        self.sum.iter_mut().for_each(|x| *x = 0);
    }

    /// Whether the shares received so far suffice to remove every mask.
    fn unmask_ready(&self) -> bool {
        let ts = self.cfg.share_threshold as usize;
        let mut counts: BTreeMap<ClientId, usize> = BTreeMap::new();
        for msg in self.u5.values() {
            for r in msg.self_mask_shares.iter().chain(&msg.mask_key_shares) {
                *counts.entry(r.of).or_default() += 1;
            }
        }
        self.u2.keys().all(|c| {
            let needed = self.u3.contains_key(c) || self.graph.neighbours(*c).iter().any(|v| self.u3.contains_key(v));
            !needed || counts.get(c).copied().unwrap_or(0) >= ts
        })
    }

    fn collect_shares(&self, of: ClientId, self_mask: bool) -> Vec<Share> {
        self.u5
            .values()
            .flat_map(|m| if self_mask { &m.self_mask_shares } else { &m.mask_key_shares })
            .filter(|r| r.of == of)
            .map(|r| r.share.clone())
            .collect()
    }

    /// Reconstructs the self-mask seeds of U3 and the mask keys of U2 \ U3 and removes
    /// their masks from the sum in one fused pass.
    fn unmask(&mut self) -> Result<AggregateSum, Error> {
        let ts = self.cfg.share_threshold as usize;
        // The reconstructions and key agreements (one per survivor's self mask, one per
        // pair of a dropped client and a surviving neighbour: 418 at n = 100, k = 46, 10%
        // dropout) run on every core. Results keep their order, so within each of the
        // three passes (self masks, dropped clients' keys, pairwise seeds) the error
        // reported is the first a sequential pass would meet; any error aborts the round.
        let survivors: Vec<ClientId> = self.u3.keys().copied().collect();
        let this = &*self;
        let self_masks = crate::prg::par_map(&survivors, self.threads, |&u| -> Result<MaskStream, Error> {
            let shares = this.collect_shares(u, true);
            if shares.len() < ts {
                return Err(ProtocolError::TooFewShares(u).into());
            }
            let seed = Zeroizing::new(shamir::reconstruct(&shares, ts)?);
            let commitment = crypto::self_mask_commitment(&this.digest, u, &seed);
            if commitment != this.u2[&u].self_mask_commitment {
                return Err(ProtocolError::ReconstructionMismatch(u).into());
            }
            Ok(MaskStream::new(&seed, SELF_MASK_LABEL, Sign::Subtract))
        });
        let mut streams = self_masks.into_iter().collect::<Result<Vec<_>, Error>>()?;
        let dropped: Vec<ClientId> = self.u2.keys().filter(|c| !self.u3.contains_key(c)).copied().collect();
        let mut pairs: Vec<(std::sync::Arc<RoundKey>, ClientId, ClientId)> = Vec::new();
        for u in dropped {
            let neighbours: Vec<ClientId> = self.graph.neighbours(u).iter().filter(|v| self.u3.contains_key(v)).copied().collect();
            if neighbours.is_empty() {
                continue;
            }
            let shares = self.collect_shares(u, false);
            if shares.len() < ts {
                return Err(ProtocolError::TooFewShares(u).into());
            }
            let secret = Zeroizing::new(shamir::reconstruct(&shares, ts)?);
            let advertised = self.u1[&u].mask_pk;
            if PublicKey::from(&StaticSecret::from(*secret)).as_bytes() != &advertised {
                return Err(ProtocolError::ReconstructionMismatch(u).into());
            }
            let key = std::sync::Arc::new(RoundKey::from_secret_bytes(*secret));
            pairs.extend(neighbours.into_iter().map(|v| (key.clone(), u, v)));
        }
        let pair_masks = crate::prg::par_map(&pairs, self.threads, |(key, u, v)| -> Result<MaskStream, Error> {
            let seed = key.derive(&this.u1[v].mask_pk, &this.digest, MASK_ROLE, *u, *v)?;
            // v added +PRG when v < u and -PRG otherwise; undo exactly that.
            let sign = if v < u { Sign::Subtract } else { Sign::Add };
            Ok(MaskStream::new(&seed, PAIR_MASK_LABEL, sign))
        });
        drop(pairs);
        for mask in pair_masks {
            streams.push(mask?);
        }
        let mut sum = std::mem::take(&mut self.sum);
        apply_masks(&mut sum, &streams, self.threads);
        let mask = self.cfg.modulus_mask();
        sum.iter_mut().for_each(|x| *x &= mask);
        Ok(AggregateSum { round: self.cfg.round, included: self.u3.keys().copied().collect(), sum })
    }

    /// Whether `phase` closed successfully (an aborted round hands out nothing more).
    fn closed(&self, phase: Phase) -> bool {
        self.phase != Phase::Aborted && self.phase > phase
    }

    /// `to`'s view of U1, once phase 0 has closed: every admitted id, and the
    /// advertisements of `to` and its neighbours in U1 (O(k) keys, whatever n).
    pub fn key_directory(&self, to: ClientId) -> Option<KeyDirectory> {
        if !self.closed(Phase::AdvertiseKeys) || !self.u1.contains_key(&to) {
            return None;
        }
        let mut members: Vec<ClientId> = self.graph.neighbours(to).iter().copied().filter(|v| self.u1.contains_key(v)).collect();
        members.push(to);
        members.sort_unstable();
        let mut dir = KeyDirectory {
            round: self.cfg.round,
            to,
            admitted: self.u1.keys().copied().collect(),
            advertised: members.iter().map(|c| self.u1[c].clone()).collect(),
            aggregator_signature: [0; 64],
        };
        dir.aggregator_signature = self.signer.sign(dir.transcript(&self.digest).as_bytes());
        Some(dir)
    }

    /// The shares addressed to `to`, once phase 1 has closed.
    pub fn share_bundle(&self, to: ClientId) -> Option<ShareBundle> {
        if !self.closed(Phase::ShareKeys) || !self.u2.contains_key(&to) {
            return None;
        }
        // Only neighbours deal shares to `to`: O(k) lookups, not a scan of U2.
        let shares = self
            .graph
            .neighbours(to)
            .iter()
            .filter_map(|v| self.u2.get(v))
            .filter_map(|m| m.shares.iter().find(|s| s.to == to).map(|s| ForwardedShare { from: m.client, ciphertext: s.ciphertext.clone() }))
            .collect();
        let mut bundle = ShareBundle { round: self.cfg.round, to, shared: self.u2.keys().copied().collect(), shares, aggregator_signature: [0; 64] };
        bundle.aggregator_signature = self.signer.sign(bundle.transcript(&self.digest).as_bytes());
        Some(bundle)
    }

    /// U3, once phase 2 has closed.
    pub fn survivor_set(&self) -> Option<SurvivorSet> {
        if !self.closed(Phase::MaskedInput) || self.u3.is_empty() {
            return None;
        }
        let set = self.survivor_set.get_or_init(|| {
            let survivors: Vec<ClientId> = self.u3.keys().copied().collect();
            let aggregator_signature = self.signer.sign(SurvivorSet::aggregator_transcript(&self.digest, self.cfg.round, &survivors).as_bytes());
            SurvivorSet { round: self.cfg.round, survivors, aggregator_signature }
        });
        Some(set.clone())
    }

    /// U3 with the consistency signatures, once phase 3 has closed.
    pub fn unmask_request(&self) -> Option<UnmaskRequest> {
        if !self.closed(Phase::ConsistencyCheck) || self.u4.is_empty() {
            return None;
        }
        let req = self.unmask_request.get_or_init(|| {
            let mut req = UnmaskRequest {
                round: self.cfg.round,
                survivors: self.u3.keys().copied().collect(),
                signatures: self.u4.values().cloned().collect(),
                aggregator_signature: [0; 64],
            };
            req.aggregator_signature = self.signer.sign(req.transcript(&self.digest).as_bytes());
            req
        });
        Some(req.clone())
    }

    /// Admitted clients (U1), for reporting.
    pub fn admitted(&self) -> Vec<ClientId> {
        self.u1.keys().copied().collect()
    }

    /// Evidence a client attached to its advertisement.
    pub fn advertisement(&self, client: ClientId) -> Option<&AdvertiseKeys> {
        self.u1.get(&client)
    }
}

/// Adds `n` elements of `bits` bits (words at 32, packed below) starting at `sum[0]`;
/// `bytes` starts at an element boundary.
fn add_elements(sum: &mut [u32], bytes: &[u8], bits: u8) {
    if bits == 32 {
        add_le_words(sum, bytes);
    } else {
        crate::pack::add_packed(sum, bytes, bits);
    }
}

/// Subtracts what [`add_elements`] adds (rare: the undo of a refused input).
fn sub_elements(sum: &mut [u32], bytes: &[u8], bits: u8) {
    let n = sum.len();
    for (s, v) in sum.iter_mut().zip(crate::pack::Unpacked::new(bytes, n, bits)) {
        *s = s.wrapping_sub(v);
    }
}

/// The data digest of the masked input whose header `h` was read from `src` (with
/// [`MaskedInputHeader::read_from`], which returned `prefix` and `total`): the body is read
/// one batch of digest leaves at a time and each batch hashed on up to `threads` threads,
/// so the caller holds one batch, never the body. This is the digest the sender's
/// signature covers; the early check of a spooled upload's signature uses it.
pub fn masked_body_digest<R: std::io::Read>(src: &mut R, h: &MaskedInputHeader, prefix: &[u8], total: usize, threads: usize) -> Result<[u8; 32], Error> {
    let leaves = BodyWalk::new(h, total, threads).walk(src, prefix, None, None)?;
    Ok(crate::wire::data_digest_root(total - h.body_at, &leaves))
}

/// Reads a masked input's body from a source in batches of digest leaves
/// ([`DIGEST_CHUNK_BYTES`] each), hashes each leaf, and hands the elements on in pieces
/// that start at an element boundary: 8 elements of `bits` bits are `bits` bytes, so the
/// bytes of a leaf past its last whole group wait for the next leaf.
struct BodyWalk {
    bits: u8,
    count: usize,
    body_at: usize,
    body_len: usize,
    threads: usize,
    /// Stop after this many leaves, and hand on no element past `limit` (the undo of a
    /// fold that stopped early repeats exactly the pieces the fold handed on).
    stop_after: usize,
    limit: usize,
    /// Elements handed on so far.
    visited: usize,
    recorded: Vec<[u8; 32]>,
}

impl BodyWalk {
    fn new(h: &MaskedInputHeader, total: usize, threads: usize) -> Self {
        BodyWalk {
            bits: h.bits,
            count: h.count,
            body_at: h.body_at,
            body_len: total - h.body_at,
            threads: threads.max(1),
            stop_after: usize::MAX,
            limit: usize::MAX,
            visited: 0,
            recorded: Vec::new(),
        }
    }

    /// The hashes of the leaves handed on so far, for an undo (`None`: none were).
    fn leaves_folded(&mut self) -> Option<Vec<[u8; 32]>> {
        (!self.recorded.is_empty()).then(|| std::mem::take(&mut self.recorded))
    }

    /// Reads the body (its first bytes from `prefix`, past the header; the rest from
    /// `src`, positioned after the prefix) and, with a `target`, adds its elements to (or
    /// subtracts them from) the sum, none past `limit`. Each leaf of a batch is hashed on
    /// its own thread, which then folds the whole groups of 8 elements that lie in that
    /// leaf while they are still in its cache; the few groups that straddle two leaves (or
    /// two batches: their bytes wait in `carry`) are folded by the caller's thread after.
    /// With `expect`, each leaf must hash to the recorded hash before anything of it is
    /// folded; without, the hashes are recorded and returned.
    fn walk<R: std::io::Read>(
        &mut self,
        src: &mut R,
        prefix: &[u8],
        expect: Option<&[[u8; 32]]>,
        mut target: Option<(&mut [u32], Op)>,
    ) -> Result<Vec<[u8; 32]>, Error> {
        let limit = self.limit.min(self.count);
        let bits = self.bits;
        let leaves = self.body_len.div_ceil(DIGEST_CHUNK_BYTES);
        let group = usize::from(bits);
        let mut from_prefix = prefix.get(self.body_at..).unwrap_or(&[]);
        let mut carry: Vec<u8> = Vec::with_capacity(group);
        let mut element = 0usize;
        let mut batch = vec![0u8; DIGEST_CHUNK_BYTES * self.threads.min(leaves.max(1))];
        let mut leaf = 0usize;
        while leaf < leaves.min(self.stop_after) {
            let in_batch = (leaves.min(self.stop_after) - leaf).min(self.threads);
            let start = leaf * DIGEST_CHUNK_BYTES;
            let len = (start + in_batch * DIGEST_CHUNK_BYTES).min(self.body_len) - start;
            let buf = &mut batch[..len];
            let took = from_prefix.len().min(len);
            buf[..took].copy_from_slice(&from_prefix[..took]);
            from_prefix = &from_prefix[took..];
            src.read_exact(&mut buf[took..]).map_err(|e| Error::Io(format!("it ended early: {e}")))?;
            let buf: &[u8] = buf;
            // The group the previous batch left open, completed from this one's first bytes.
            let mut rest = buf;
            let mut first: Option<(usize, Vec<u8>, usize)> = None;
            if !carry.is_empty() {
                let need = (group - carry.len()).min(rest.len());
                carry.extend_from_slice(&rest[..need]);
                rest = &rest[need..];
                if carry.len() == group {
                    let n = 8.min(self.count - element);
                    first = Some((element, std::mem::take(&mut carry), n));
                    element += n;
                }
            }
            // Then the whole groups, split where the leaves are; bytes past them wait.
            let skipped = len - rest.len();
            let whole = (rest.len() / group).min((self.count - element) / 8);
            let (groups_at, groups_from) = (element, skipped);
            element += whole * 8;
            carry.extend_from_slice(&rest[whole * group..]);
            // Leaf j's share of the whole groups: those that start in it.
            let cut = |j: usize| ((j * DIGEST_CHUNK_BYTES).saturating_sub(groups_from).div_ceil(group)).min(whole);
            let expect = expect.map(|e| &e[leaf..leaf + in_batch]);
            let hashes = {
                let mut parts: Vec<Option<&mut [u32]>> = Vec::with_capacity(in_batch);
                let op = target.as_ref().map(|t| t.1);
                match target.as_mut() {
                    Some((sum, _)) => {
                        let m = sum.len();
                        let mut span = &mut sum[groups_at.min(m)..(groups_at + whole * 8).min(m)];
                        for j in 0..in_batch {
                            let size = ((cut(j + 1) - cut(j)) * 8).min(span.len());
                            let (part, tail) = std::mem::take(&mut span).split_at_mut(size);
                            parts.push(Some(part));
                            span = tail;
                        }
                    }
                    None => parts.resize_with(in_batch, || None),
                }
                let job = |j: usize, part: Option<&mut [u32]>| -> Result<[u8; 32], usize> {
                    let bytes = &buf[j * DIGEST_CHUNK_BYTES..((j + 1) * DIGEST_CHUNK_BYTES).min(len)];
                    let hash = crate::wire::leaf_hash(bytes);
                    if expect.is_some_and(|e| e[j] != hash) {
                        return Err(j);
                    }
                    if let (Some(part), Some(op)) = (part, op) {
                        // Not past the limit: only the undo sets one, to what the fold handed on.
                        let from = groups_at + cut(j) * 8;
                        let n = part.len().min(limit.saturating_sub(from));
                        let at = groups_from + cut(j) * group;
                        op.apply(&mut part[..n], &buf[at..at + n.div_ceil(8) * group], bits);
                    }
                    Ok(hash)
                };
                // One leaf: no thread. Several: every leaf on a thread of its own, while this
                // one waits: were it to take a leaf itself, the scheduler may leave a new
                // thread queued behind it on its core (measured: every other batch
                // serialized, the fold no faster on two cores than on one).
                if in_batch == 1 {
                    vec![job(0, parts.pop().flatten())].into_iter().collect::<Result<Vec<_>, usize>>()
                } else {
                    std::thread::scope(|scope| {
                        let spawned: Vec<_> = parts.into_iter().enumerate().map(|(j, part)| scope.spawn(move || job(j, part))).collect();
                        spawned
                            .into_iter()
                            .map(|h| h.join().unwrap_or_else(|_| unreachable!("a fold thread does not panic")))
                            .collect::<Result<Vec<_>, usize>>()
                    })
                }
                .map_err(|j| Error::malformed(format!("leaf {} of the body read differently the second time", leaf + j + 1)))?
            };
            self.recorded.extend_from_slice(&hashes);
            if let (Some((sum, op)), Some((at, bytes, n))) = (target.as_mut(), first) {
                let n = n.min(limit.saturating_sub(at));
                op.apply(&mut sum[at..at + n], &bytes, bits);
            }
            self.visited = element.min(limit);
            leaf += in_batch;
        }
        if leaf == leaves && element < limit {
            // The last elements: fewer than 8, in the bytes left over.
            let n = self.count - element;
            if self.bits < 32 {
                crate::pack::check_packed(&carry, n, self.bits)?;
            }
            let n = n.min(limit - element);
            if let Some((sum, op)) = target.as_mut() {
                op.apply(&mut sum[element..element + n], &carry, bits);
            }
            self.visited = element + n;
        }
        Ok(std::mem::take(&mut self.recorded))
    }
}

/// What a walk does with the elements it reads: the fold adds them, its undo subtracts.
#[derive(Clone, Copy)]
enum Op {
    Add,
    Sub,
}

impl Op {
    fn apply(self, sum: &mut [u32], bytes: &[u8], bits: u8) {
        match self {
            Op::Add => add_elements(sum, bytes, bits),
            Op::Sub => sub_elements(sum, bytes, bits),
        }
    }
}

/// `sum[i] += word i of body` (little-endian u32s), mod 2^32. The word is read inline, so
/// the loop vectorises (through the `Words` iterator's function pointer it did not: at
/// m = 1M that cost 1.9 ms of a 4.6 ms fold).
fn add_le_words(sum: &mut [u32], body: &[u8]) {
    for (s, b) in sum.iter_mut().zip(body.chunks_exact(4)) {
        *s = s.wrapping_add(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    }
}
