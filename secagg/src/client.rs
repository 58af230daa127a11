//! The client side of one SecAgg+ round, as a state machine.
//!
//! Call order (each step consumes the server's message of the previous phase and
//! returns the message to send):
//! 1. [`Client::new`] → [`AdvertiseKeys`]
//! 2. [`Client::handle_key_directory`] → [`ShareKeys`]
//! 3. [`Client::handle_share_bundle`] with the quantized input → [`MaskedInput`]
//! 4. [`Client::handle_survivor_set`] → [`ConsistencySignature`]
//! 5. [`Client::handle_unmask_request`] → [`UnmaskShares`]
//!
//! The client protects itself against a malicious server; every server message is
//! hostile until checked:
//! - the round's configuration must meet the institution's [`SecurityFloors`] and carry
//!   the aggregator's signature, and so must every later server message (the
//!   aggregator's identity key is the one its attestation evidence binds);
//! - its view of U1 (SecAgg+: U1's ids, and the advertisements of itself and its
//!   neighbours only) must be addressed to it, and carry every neighbour U1 names,
//!   each advertisement validly signed by that neighbour's roster key; it remembers U1;
//! - U2 must be a subset of that U1 and hold at least `share_threshold` of its own
//!   neighbours, each of which must have sent it a share: otherwise a server could make
//!   it mask with no pairwise mask at all (U2 padded with ids outside U1) and unmask it
//!   with its self-mask shares alone;
//! - U3 must be a subset of its U2, at least `t` strong, and contain at least one
//!   neighbour it masked with (or its input would be unmasked alone by the mask-key
//!   shares of the rest);
//! - it signs exactly one survivor set per round, reveals shares only after `t` peers
//!   signed that same set, and never reveals both the self-mask share and the mask-key
//!   share of one neighbour (which would unmask that neighbour's input).
//!
//! The first refused server message aborts the round for this client: every later call
//! fails with [`ProtocolError::ClientAborted`], so nothing more is sent.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rand::{CryptoRng, RngCore};
use zeroize::Zeroizing;

use crate::config::{ClientId, RoundConfig};
use crate::crypto::{self, MessageSigner, RoundKey, MASK_ROLE, SHARE_ROLE};
use crate::error::{Error, ProtocolError};
use crate::floors::SecurityFloors;
use crate::graph::CommunicationGraph;
use crate::prg::{apply_masks, MaskStream, Sign};
use crate::shamir::{self, Share};
use crate::wire::*;

/// Labels of the two kinds of PRG stream.
pub(crate) const SELF_MASK_LABEL: &[u8] = b"self-mask";
pub(crate) const PAIR_MASK_LABEL: &[u8] = b"pairwise-mask";

/// Plaintext of one encrypted share: x, then the mask-key share, then the self-mask share.
pub(crate) const SHARE_PLAINTEXT_LEN: usize = 1 + 32 + 32;
/// AES-GCM appends a 16-byte tag.
pub const SHARE_CIPHERTEXT_LEN: usize = SHARE_PLAINTEXT_LEN + 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    AwaitingKeys,
    AwaitingShares,
    AwaitingSurvivors,
    AwaitingUnmask,
    Done,
    Aborted,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::AwaitingKeys => "awaiting key directory",
            State::AwaitingShares => "awaiting share bundle",
            State::AwaitingSurvivors => "awaiting survivor set",
            State::AwaitingUnmask => "awaiting unmask request",
            State::Done => "done",
            State::Aborted => "aborted",
        }
    }
}

struct HeldShares {
    mask_key: Share,
    self_mask: Share,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Revealed {
    SelfMask,
    MaskKey,
}

/// What a client trusts before a round starts: the aggregator's identity key (verified
/// through its attestation evidence by the caller), the aggregator's signature over the
/// round's configuration, and the institution's own floors.
#[derive(Clone, Debug)]
pub struct Trust {
    pub aggregator_key: [u8; 32],
    pub config_signature: [u8; 64],
    pub floors: SecurityFloors,
}

pub struct Client {
    cfg: RoundConfig,
    digest: [u8; 32],
    aggregator_key: [u8; 32],
    /// Why the round was aborted for this client, once it was.
    aborted: Option<String>,
    /// Every client whose advertisement this client verified in the key directory.
    u1: BTreeSet<ClientId>,
    id: ClientId,
    graph: CommunicationGraph,
    signer: Arc<dyn MessageSigner>,
    enc_key: RoundKey,
    mask_key: RoundKey,
    self_seed: Zeroizing<[u8; 32]>,
    state: State,
    /// Neighbours in U1 with their (enc, mask) public keys.
    peers: BTreeMap<ClientId, ([u8; 32], [u8; 32])>,
    u2: Vec<ClientId>,
    held: BTreeMap<ClientId, HeldShares>,
    signed_survivors: Option<Vec<ClientId>>,
    revealed: BTreeMap<ClientId, Revealed>,
    /// Threads the mask expansion uses (default: the machine's cores).
    threads: usize,
    /// The record-level privacy claim signed with the masked input, if any.
    record_privacy: Option<crate::wire::RecordPrivacyClaim>,
    /// In a buffered cohort: the global version the input was trained from.
    base_version: Option<u64>,
    /// The positive control of the malicious-aggregator harness: U2 taken as the server
    /// says, as the code before the review did. Test builds only.
    #[cfg(feature = "danger-test-weakened-client")]
    danger_trust_u2: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("round", &self.cfg.round).field("id", &self.id).field("state", &self.state).finish_non_exhaustive()
    }
}

impl Client {
    /// Starts a round: checks the configuration against `trust` (the aggregator's
    /// signature and the institution's floors), checks that `signer` is the roster key of
    /// `id`, generates the round's two X25519 keys and the self-mask seed. The client's
    /// attestation evidence is bound by the caller to the keys through
    /// [`Client::key_binding`].
    pub fn new<R: RngCore + CryptoRng>(cfg: RoundConfig, id: ClientId, signer: Arc<dyn MessageSigner>, trust: &Trust, rng: &mut R) -> Result<Self, Error> {
        cfg.validate()?;
        let digest = cfg.digest();
        if !crypto::verify_signature(&trust.aggregator_key, round_config_transcript(&digest, cfg.round).as_bytes(), &trust.config_signature) {
            return Err(ProtocolError::BadAggregatorSignature { message: "round configuration" }.into());
        }
        trust.floors.check(&cfg)?;
        if cfg.roster_key(id)? != signer.public_key() {
            return Err(Error::Config(format!("the signing key does not match roster entry {id}")));
        }
        let graph = CommunicationGraph::for_config(&cfg)?;
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        Ok(Client {
            digest,
            aggregator_key: trust.aggregator_key,
            aborted: None,
            u1: BTreeSet::new(),
            cfg,
            id,
            graph,
            signer,
            enc_key: RoundKey::generate(rng),
            mask_key: RoundKey::generate(rng),
            self_seed: seed,
            state: State::AwaitingKeys,
            peers: BTreeMap::new(),
            u2: Vec::new(),
            held: BTreeMap::new(),
            signed_survivors: None,
            revealed: BTreeMap::new(),
            threads: crate::prg::default_threads(),
            record_privacy: None,
            base_version: None,
            #[cfg(feature = "danger-test-weakened-client")]
            danger_trust_u2: false,
        })
    }

    /// Sets the threads masking uses (at least 1); the masked vector is the same for any
    /// count.
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// States the record-level DP (DP-SGD) the input of phase 2 was trained under; the
    /// claim is signed with the masked input. Refused if incoherent
    /// ([`crate::wire::RecordPrivacyClaim::validate`]), as the aggregator would refuse it.
    pub fn set_record_privacy(&mut self, claim: crate::wire::RecordPrivacyClaim) -> Result<(), Error> {
        claim.validate()?;
        self.record_privacy = Some(claim);
        Ok(())
    }

    /// In a cohort of a buffered federation: states the global version the input of
    /// phase 2 was trained from (signed with it) and returns its staleness τ, which the
    /// caller weighs by [`crate::config::Cohort::staleness_weight`]. Refused with the
    /// numbers when the aggregator would refuse it: too stale, or later than the cohort.
    pub fn set_base_version(&mut self, base: u64) -> Result<u64, Error> {
        let cohort = self.cfg.cohort.ok_or(ProtocolError::BaseVersion("a base version is for cohorts of a buffered federation; this round is synchronous"))?;
        let tau = cohort.staleness(base)?;
        self.base_version = Some(base);
        Ok(tau)
    }

    pub fn id(&self) -> ClientId {
        self.id
    }

    pub fn config(&self) -> &RoundConfig {
        &self.cfg
    }

    /// 64 bytes that attestation evidence must carry as report data so that it is bound
    /// to this round's keys: SHA-512 would do as well; we use two SHA-256 halves.
    pub fn key_binding(&self) -> [u8; 64] {
        key_binding(&self.digest, self.id, &self.enc_key.public(), &self.mask_key.public())
    }

    /// The signed advertisement of this round's keys with `evidence` attached.
    pub fn advertise(&self, evidence: Vec<u8>) -> AdvertiseKeys {
        let mut msg = AdvertiseKeys {
            round: self.cfg.round,
            client: self.id,
            enc_pk: self.enc_key.public(),
            mask_pk: self.mask_key.public(),
            evidence,
            signature: [0; 64],
        };
        msg.signature = self.signer.sign(msg.transcript(&self.digest).as_bytes());
        msg
    }

    fn expect(&self, state: State, got: &'static str) -> Result<(), Error> {
        if let Some(why) = &self.aborted {
            return Err(ProtocolError::ClientAborted(why.clone()).into());
        }
        if self.state != state {
            return Err(ProtocolError::ClientOutOfOrder { state: self.state.name(), got }.into());
        }
        Ok(())
    }

    fn check_round(&self, round: u64) -> Result<(), Error> {
        if round != self.cfg.round {
            return Err(ProtocolError::WrongRound { expected: self.cfg.round, got: round }.into());
        }
        Ok(())
    }

    fn check_aggregator_signature(&self, message: &'static str, transcript: &[u8], signature: &[u8; 64]) -> Result<(), Error> {
        if !crypto::verify_signature(&self.aggregator_key, transcript, signature) {
            return Err(ProtocolError::BadAggregatorSignature { message }.into());
        }
        Ok(())
    }

    /// A refused server message ends the round for this client: nothing more is sent.
    fn abort_on_error<T>(&mut self, result: Result<T, Error>) -> Result<T, Error> {
        if let Err(e) = &result {
            self.aborted = Some(e.to_string());
            self.state = State::Aborted;
        }
        result
    }

    #[cfg(feature = "danger-test-weakened-client")]
    fn trusts_u2(&self) -> bool {
        self.danger_trust_u2
    }

    #[cfg(not(feature = "danger-test-weakened-client"))]
    fn trusts_u2(&self) -> bool {
        false
    }

    /// DANGER, test builds only: take U2 as the server sends it (no subset or neighbour
    /// checks) and sign any survivor set, as the client did before the review. The
    /// malicious-aggregator harness uses it to show its invariant check catches the attack.
    #[cfg(feature = "danger-test-weakened-client")]
    pub fn danger_trust_u2(&mut self) {
        self.danger_trust_u2 = true;
    }

    /// Why the round was aborted for this client, if it was.
    pub fn aborted(&self) -> Option<&str> {
        self.aborted.as_deref()
    }

    /// The neighbours this client masked its input with (its neighbours in U2), once it
    /// has sent the masked input.
    pub fn masked_with(&self) -> Vec<ClientId> {
        self.held.keys().copied().collect()
    }

    /// The survivor set this client signed, if it signed one.
    pub fn signed_survivors(&self) -> Option<&[ClientId]> {
        self.signed_survivors.as_deref()
    }

    /// Phase 1: verifies U1 and deals Shamir shares of the mask key and the self-mask
    /// seed to every neighbour in U1, encrypted for that neighbour.
    pub fn handle_key_directory<R: RngCore + CryptoRng>(&mut self, dir: &KeyDirectory, rng: &mut R) -> Result<ShareKeys, Error> {
        self.expect(State::AwaitingKeys, "a key directory")?;
        let result = self.key_directory_inner(dir, rng);
        self.abort_on_error(result)
    }

    fn key_directory_inner<R: RngCore + CryptoRng>(&mut self, dir: &KeyDirectory, rng: &mut R) -> Result<ShareKeys, Error> {
        self.check_aggregator_signature("key directory", dir.transcript(&self.digest).as_bytes(), &dir.aggregator_signature)?;
        self.check_round(dir.round)?;
        if dir.to != self.id {
            return Err(Error::malformed(format!("key directory is addressed to {}, not {}", dir.to, self.id)));
        }
        if !dir.admitted.windows(2).all(|w| w[0] < w[1]) {
            return Err(Error::malformed("U1 must be sorted and without repeats"));
        }
        for &c in &dir.admitted {
            self.cfg.roster_key(c)?;
        }
        let seen: BTreeSet<ClientId> = dir.admitted.iter().copied().collect();
        let mut carried = BTreeSet::new();
        let mut saw_self = false;
        for adv in &dir.advertised {
            self.check_round(adv.round)?;
            let key = self.cfg.roster_key(adv.client)?;
            if !carried.insert(adv.client) {
                return Err(ProtocolError::Duplicate(adv.client).into());
            }
            if !seen.contains(&adv.client) {
                return Err(ProtocolError::NotInVerifiedSet { set: "the key directory's advertisements", superset: "U1", client: adv.client }.into());
            }
            let neighbour = self.graph.are_neighbours(self.id, adv.client);
            if adv.client != self.id && !neighbour {
                return Err(Error::malformed(format!("key directory carries the keys of {}, which is not a neighbour", adv.client)));
            }
            if !crypto::verify_signature(&key, adv.transcript(&self.digest).as_bytes(), &adv.signature) {
                return Err(ProtocolError::BadSignature(adv.client).into());
            }
            if adv.client == self.id {
                if adv.enc_pk != self.enc_key.public() || adv.mask_pk != self.mask_key.public() {
                    return Err(Error::Crypto("the key directory carries other keys for this client"));
                }
                saw_self = true;
            } else {
                self.peers.insert(adv.client, (adv.enc_pk, adv.mask_pk));
            }
        }
        // Every neighbour U1 names must come with its keys: a neighbour listed without
        // them could be put in U2 and its (absent) pairwise mask left out.
        if let Some(&v) = self.graph.neighbours(self.id).iter().find(|v| seen.contains(v) && !carried.contains(v)) {
            return Err(Error::malformed(format!("key directory lists neighbour {v} in U1 without its keys")));
        }
        self.u1 = seen.clone();
        if !saw_self {
            return Err(ProtocolError::NotInSurvivorSet(self.id).into());
        }
        let t = self.cfg.min_survivors as usize;
        if seen.len() < t {
            return Err(ProtocolError::BelowThreshold { threshold: t, got: seen.len() }.into());
        }
        let ts = self.cfg.share_threshold as usize;
        if self.peers.len() < ts {
            return Err(ProtocolError::BelowThreshold { threshold: ts, got: self.peers.len() }.into());
        }

        let neighbours = self.graph.neighbours(self.id).to_vec();
        let mask_shares = shamir::split(&self.mask_key.secret_bytes(), ts, neighbours.len(), rng)?;
        let seed_shares = shamir::split(&self.self_seed, ts, neighbours.len(), rng)?;
        let mut shares = Vec::with_capacity(self.peers.len());
        for (j, v) in neighbours.iter().enumerate() {
            let Some((enc_pk, _)) = self.peers.get(v) else { continue };
            let mut plain = Zeroizing::new([0u8; SHARE_PLAINTEXT_LEN]);
            plain[0] = mask_shares[j].x;
            plain[1..33].copy_from_slice(&mask_shares[j].y);
            plain[33..65].copy_from_slice(&seed_shares[j].y);
            let key = self.enc_key.derive(enc_pk, &self.digest, SHARE_ROLE, self.id, *v)?;
            let ciphertext = crypto::encrypt_share(&key, &self.digest, self.cfg.round, self.id, *v, plain.as_ref())?;
            shares.push(EncryptedShare { to: *v, ciphertext });
        }
        let mut msg = ShareKeys {
            round: self.cfg.round,
            client: self.id,
            self_mask_commitment: crypto::self_mask_commitment(&self.digest, self.id, &self.self_seed),
            shares,
            signature: [0; 64],
        };
        msg.signature = self.signer.sign(msg.transcript(&self.digest).as_bytes());
        self.state = State::AwaitingShares;
        Ok(msg)
    }

    /// Phase 2: stores the shares addressed to this client and masks `input` (already
    /// quantized, weight last) with the self mask and one pairwise mask per neighbour in U2.
    /// Given the vector itself (not a borrow), the masks are added in place: the masked
    /// input is that vector, with no copy of it (nor the page faults of a fresh one).
    pub fn handle_share_bundle(&mut self, bundle: &ShareBundle, input: impl Into<Vec<u32>>) -> Result<MaskedInput, Error> {
        self.expect(State::AwaitingShares, "a share bundle")?;
        let input: Vec<u32> = input.into();
        if input.len() != self.cfg.masked_len() {
            return Err(ProtocolError::WrongLength { expected: self.cfg.masked_len(), got: input.len() }.into());
        }
        let outside = !self.cfg.modulus_mask();
        if outside != 0 && input.iter().any(|&x| x & outside != 0) {
            return Err(Error::malformed("quantized input exceeds the modulus"));
        }
        if self.cfg.cohort.is_some() && self.base_version.is_none() {
            return Err(ProtocolError::BaseVersion("a cohort of a buffered federation needs the input's base version (Client::set_base_version)").into());
        }
        let result = self.share_bundle_inner(bundle, input);
        self.abort_on_error(result)
    }

    fn share_bundle_inner(&mut self, bundle: &ShareBundle, input: Vec<u32>) -> Result<MaskedInput, Error> {
        self.check_aggregator_signature("share bundle", bundle.transcript(&self.digest).as_bytes(), &bundle.aggregator_signature)?;
        self.check_round(bundle.round)?;
        if bundle.to != self.id {
            return Err(Error::malformed(format!("share bundle is addressed to {}, not {}", bundle.to, self.id)));
        }
        let modulus = self.cfg.modulus_mask();
        let u2: BTreeSet<ClientId> = bundle.shared.iter().copied().collect();
        if u2.len() != bundle.shared.len() {
            return Err(Error::malformed("U2 lists a client twice"));
        }
        if !u2.contains(&self.id) {
            return Err(ProtocolError::NotInSurvivorSet(self.id).into());
        }
        let t = self.cfg.min_survivors as usize;
        if u2.len() < t {
            return Err(ProtocolError::BelowThreshold { threshold: t, got: u2.len() }.into());
        }
        // The neighbours this client will mask with; every one must have sent it a share.
        let expected: BTreeSet<ClientId> = self.peers.keys().filter(|c| u2.contains(c)).copied().collect();
        if !self.trusts_u2() {
            if let Some(&c) = u2.iter().find(|c| !self.u1.contains(c)) {
                return Err(ProtocolError::NotInVerifiedSet { set: "U2", superset: "U1", client: c }.into());
            }
            let ts = self.cfg.share_threshold as usize;
            if expected.len() < ts {
                return Err(ProtocolError::TooFewNeighbours { set: "U2", threshold: ts, got: expected.len() }.into());
            }
        }
        // The cheap checks first, so a hostile bundle (a stranger's share, a duplicate)
        // is refused before any key agreement: at most one agreement per neighbour.
        let mut senders = BTreeSet::new();
        let mut to_open = Vec::with_capacity(bundle.shares.len());
        for fwd in &bundle.shares {
            let Some((enc_pk, _)) = self.peers.get(&fwd.from) else {
                return Err(ProtocolError::BadShares { from: fwd.from, why: "sender is not a neighbour in U1" }.into());
            };
            if !expected.contains(&fwd.from) {
                return Err(ProtocolError::BadShares { from: fwd.from, why: "sender is not in U2" }.into());
            }
            if !senders.insert(fwd.from) {
                return Err(ProtocolError::Duplicate(fwd.from).into());
            }
            to_open.push((fwd, *enc_pk));
        }
        // The 2k X25519 agreements (one per share, one per mask seed) are this step's
        // fixed cost beside the keystream: they run on every core.
        let (enc_key, digest, me) = (&self.enc_key, &self.digest, self.id);
        let share_keys = crate::prg::par_map(&to_open, self.threads, |(fwd, enc_pk)| enc_key.derive(enc_pk, digest, SHARE_ROLE, me, fwd.from));
        let neighbours: Vec<(ClientId, [u8; 32])> = expected.iter().map(|v| (*v, self.peers[v].1)).collect();
        let mask_key = &self.mask_key;
        let seeds = crate::prg::par_map(&neighbours, self.threads, |(v, mask_pk)| mask_key.derive(mask_pk, digest, MASK_ROLE, me, *v));
        let mut held = BTreeMap::new();
        for ((fwd, _), key) in to_open.iter().zip(share_keys) {
            let key = key?;
            let plain = crypto::decrypt_share(&key, &self.digest, self.cfg.round, fwd.from, self.id, &fwd.ciphertext)?;
            if plain.len() != SHARE_PLAINTEXT_LEN || Some(plain[0]) != self.graph.share_index(fwd.from, self.id) {
                return Err(ProtocolError::BadShares { from: fwd.from, why: "share has the wrong index" }.into());
            }
            let mut mask_key = Share { x: plain[0], y: [0; 32] };
            mask_key.y.copy_from_slice(&plain[1..33]);
            let mut self_mask = Share { x: plain[0], y: [0; 32] };
            self_mask.y.copy_from_slice(&plain[33..65]);
            held.insert(fwd.from, HeldShares { mask_key, self_mask });
        }
        if held.len() != expected.len() {
            return Err(Error::malformed(format!("share bundle carries {} shares, U2 has {} neighbours", held.len(), expected.len())));
        }

        let mut data = input;
        let mut streams = Vec::with_capacity(expected.len() + 1);
        streams.push(MaskStream::new(&self.self_seed, SELF_MASK_LABEL, Sign::Add));
        for ((v, _), seed) in neighbours.iter().zip(seeds) {
            let seed = seed?;
            let sign = if self.id < *v { Sign::Add } else { Sign::Subtract };
            streams.push(MaskStream::new(&seed, PAIR_MASK_LABEL, sign));
        }
        apply_masks(&mut data, &streams, self.threads);
        if modulus != u32::MAX {
            data.iter_mut().for_each(|x| *x &= modulus);
        }
        let bits = self.cfg.modulus_bits.min(32);
        let data_digest = MaskedInput::data_digest(&data, bits);
        let claim = self.record_privacy;
        let base_version = self.base_version;
        let signature =
            self.signer.sign(MaskedInput::transcript_for(&self.digest, self.cfg.round, self.id, &data_digest, claim.as_ref(), base_version).as_bytes());
        self.held = held;
        self.u2 = u2.into_iter().collect();
        self.state = State::AwaitingSurvivors;
        Ok(MaskedInput { round: self.cfg.round, client: self.id, data, bits, signature, record_privacy: claim, base_version })
    }

    /// Phase 3: signs U3. An honest client signs exactly one survivor set per round.
    pub fn handle_survivor_set(&mut self, set: &SurvivorSet) -> Result<ConsistencySignature, Error> {
        if self.aborted.is_none() && self.state == State::AwaitingUnmask && self.signed_survivors.as_deref() == Some(&set.survivors[..]) {
            // A retransmission of the same set: sign again (same bytes), nothing new leaks.
        } else {
            self.expect(State::AwaitingSurvivors, "a survivor set")?;
        }
        let result = self.survivor_set_inner(set);
        self.abort_on_error(result)
    }

    fn survivor_set_inner(&mut self, set: &SurvivorSet) -> Result<ConsistencySignature, Error> {
        self.check_aggregator_signature(
            "survivor set",
            SurvivorSet::aggregator_transcript(&self.digest, set.round, &set.survivors).as_bytes(),
            &set.aggregator_signature,
        )?;
        self.check_round(set.round)?;
        let u3: BTreeSet<ClientId> = set.survivors.iter().copied().collect();
        if u3.len() != set.survivors.len() || !set.survivors.windows(2).all(|w| w[0] < w[1]) {
            return Err(Error::malformed("survivor set must be sorted and without repeats"));
        }
        let t = self.cfg.min_survivors as usize;
        if u3.len() < t {
            return Err(ProtocolError::BelowThreshold { threshold: t, got: u3.len() }.into());
        }
        if !u3.contains(&self.id) {
            return Err(ProtocolError::NotInSurvivorSet(self.id).into());
        }
        if let Some(&c) = u3.iter().find(|c| self.u2.binary_search(c).is_err()) {
            return Err(ProtocolError::NotInVerifiedSet { set: "U3", superset: "U2", client: c }.into());
        }
        // Pairwise masks with neighbours outside U3 are removed with their mask-key
        // shares; with none of them left in U3 this input would be unmasked on its own.
        if !self.trusts_u2() && !self.held.keys().any(|v| u3.contains(v)) {
            return Err(ProtocolError::TooFewNeighbours { set: "U3", threshold: 1, got: 0 }.into());
        }
        let signature = self.signer.sign(SurvivorSet::transcript(&self.digest, self.cfg.round, &set.survivors).as_bytes());
        self.signed_survivors = Some(set.survivors.clone());
        self.state = State::AwaitingUnmask;
        Ok(ConsistencySignature { round: self.cfg.round, client: self.id, signature })
    }

    /// Phase 4: after checking `t` valid signatures over the set this client signed,
    /// reveals self-mask shares of neighbours in U3 and mask-key shares of neighbours in
    /// U2 \ U3.
    pub fn handle_unmask_request(&mut self, req: &UnmaskRequest) -> Result<UnmaskShares, Error> {
        if self.state != State::Done || self.aborted.is_some() {
            self.expect(State::AwaitingUnmask, "an unmask request")?;
        }
        let result = self.unmask_request_inner(req);
        self.abort_on_error(result)
    }

    fn unmask_request_inner(&mut self, req: &UnmaskRequest) -> Result<UnmaskShares, Error> {
        self.check_aggregator_signature("unmask request", req.transcript(&self.digest).as_bytes(), &req.aggregator_signature)?;
        self.check_round(req.round)?;
        let signed = self.signed_survivors.as_ref().ok_or(ProtocolError::ConflictingSurvivorSet)?;
        if &req.survivors != signed {
            return Err(ProtocolError::ConflictingSurvivorSet.into());
        }
        let transcript = SurvivorSet::transcript(&self.digest, self.cfg.round, signed);
        let mut valid = BTreeSet::new();
        for s in &req.signatures {
            if s.round != self.cfg.round || signed.binary_search(&s.client).is_err() {
                continue;
            }
            let key = self.cfg.roster_key(s.client)?;
            if crypto::verify_signature(&key, transcript.as_bytes(), &s.signature) {
                valid.insert(s.client);
            }
            // Any `t` valid signatures suffice: the rest need no verification.
            if valid.len() >= self.cfg.min_survivors as usize {
                break;
            }
        }
        let t = self.cfg.min_survivors as usize;
        if valid.len() < t {
            return Err(ProtocolError::TooFewConsistencySignatures { threshold: t, valid: valid.len() }.into());
        }
        let mut self_mask_shares = Vec::new();
        let mut mask_key_shares = Vec::new();
        for (peer, held) in &self.held {
            let kind = if signed.binary_search(peer).is_ok() { Revealed::SelfMask } else { Revealed::MaskKey };
            match self.revealed.get(peer) {
                Some(prev) if *prev != kind => return Err(ProtocolError::BothSharesRequested(*peer).into()),
                _ => {}
            }
            self.revealed.insert(*peer, kind);
            match kind {
                Revealed::SelfMask => self_mask_shares.push(RevealedShare { of: *peer, share: held.self_mask.clone() }),
                Revealed::MaskKey => mask_key_shares.push(RevealedShare { of: *peer, share: held.mask_key.clone() }),
            }
        }
        let mut msg = UnmaskShares { round: self.cfg.round, client: self.id, self_mask_shares, mask_key_shares, signature: [0; 64] };
        msg.signature = self.signer.sign(msg.transcript(&self.digest).as_bytes());
        self.state = State::Done;
        Ok(msg)
    }
}

/// Report data that binds attestation evidence to a client's round keys:
/// SHA-256(label ‖ digest ‖ id ‖ enc_pk ‖ mask_pk) followed by SHA-256 of the same with
/// a second label, 64 bytes as SNP/TDX report data expect.
pub fn key_binding(digest: &[u8; 32], id: ClientId, enc_pk: &[u8; 32], mask_pk: &[u8; 32]) -> [u8; 64] {
    let mut out = [0u8; 64];
    for (i, label) in [&b"tessera/key-binding/0"[..], b"tessera/key-binding/1"].iter().enumerate() {
        let mut body = Vec::with_capacity(128);
        body.extend_from_slice(label);
        body.extend_from_slice(digest);
        body.extend_from_slice(&id.0.to_le_bytes());
        body.extend_from_slice(enc_pk);
        body.extend_from_slice(mask_pk);
        out[i * 32..(i + 1) * 32].copy_from_slice(&crypto::sha256(&body));
    }
    out
}
