//! Messages of the five SecAgg phases. Control messages travel as JSON (byte fields in
//! hex); the masked input, the one large message, has a fixed binary layout parsed with
//! explicit lengths ([`MaskedInput::encode`] / [`MaskedInput::decode`]).
//!
//! Every client message carries an Ed25519 signature over a [`Transcript`] that binds the
//! round-config digest, the round number, the sender and the content, which is what the
//! active-adversary variant of SecAgg requires (Bonawitz et al. 2017, Sec. 6).
//!
//! Every aggregator message (the round's configuration, the key directory, each share
//! bundle, the survivor set, the unmask request) carries an `aggregator_signature` by the
//! enclave's attested identity key over its own transcript, so a host that holds whatever
//! the server keeps on disk, the TLS key included, still cannot speak for the enclave.

use serde::{Deserialize, Serialize};

use crate::config::ClientId;
use crate::crypto::{sha256, Transcript};
use crate::error::Error;
use crate::shamir::Share;

/// Serde helper: fixed-size byte arrays as hex strings.
pub mod hexarr {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(v: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let v = hex::decode(s.as_ref()).map_err(serde::de::Error::custom)?;
        v.try_into().map_err(|v: Vec<u8>| serde::de::Error::custom(format!("expected {N} bytes, got {}", v.len())))
    }
}

/// Serde helper: variable-length bytes as hex strings.
pub mod hexvec {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        hex::decode(s.as_ref()).map_err(serde::de::Error::custom)
    }
}

/// Phase 0: a client's round keys and its attestation evidence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdvertiseKeys {
    pub round: u64,
    pub client: ClientId,
    #[serde(with = "hexarr")]
    pub enc_pk: [u8; 32],
    #[serde(with = "hexarr")]
    pub mask_pk: [u8; 32],
    /// Attestation evidence bound to these keys; opaque to the protocol core.
    #[serde(with = "hexvec", default)]
    pub evidence: Vec<u8>,
    #[serde(with = "hexarr")]
    pub signature: [u8; 64],
}

impl AdvertiseKeys {
    pub fn transcript(&self, digest: &[u8; 32]) -> Transcript {
        let mut t = Transcript::new("advertise-keys", digest, self.round);
        t.id(self.client).bytes(&self.enc_pk).bytes(&self.mask_pk).bytes(&sha256(&self.evidence));
        t
    }
}

/// Server to one client after phase 0: its view of U1. It lists every admitted client's
/// id (U1, sorted) but carries only the advertisements the client needs: its own and
/// those of its neighbours in U1, so a client downloads and verifies O(k) keys, not O(n)
/// (SecAgg+; Bell et al. 2020). The aggregator signs the whole view, `to` included.
///
/// Why the ids of non-neighbours need no advertisement: a client's masks and shares
/// involve only its neighbours, whose advertisements it verifies; the rest of U1 only
/// bounds U2 (U2 ⊆ U1). The guarantee that a release sums at least `t` genuine clients
/// comes from the consistency phase, where each client verifies `t` roster signatures
/// over U3 before it reveals a share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyDirectory {
    pub round: u64,
    /// The client this view is for.
    pub to: ClientId,
    /// U1: the id of every client whose advertisement the aggregator accepted, sorted.
    pub admitted: Vec<ClientId>,
    /// The advertisements of `to` and of each of its neighbours in U1, in id order.
    pub advertised: Vec<AdvertiseKeys>,
    #[serde(with = "hexarr")]
    pub aggregator_signature: [u8; 64],
}

impl KeyDirectory {
    pub fn transcript(&self, digest: &[u8; 32]) -> Transcript {
        let mut t = Transcript::new("key-directory-view", digest, self.round);
        t.id(self.to).ids(&self.admitted).u64(self.advertised.len() as u64);
        for a in &self.advertised {
            t.bytes(a.transcript(digest).as_bytes()).bytes(&a.signature);
        }
        t
    }
}

/// The transcript the aggregator signs over the round's configuration when it opens the
/// round; a client checks it before it advertises anything.
pub fn round_config_transcript(digest: &[u8; 32], round: u64) -> Transcript {
    Transcript::new("round-config", digest, round)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptedShare {
    pub to: ClientId,
    #[serde(with = "hexvec")]
    pub ciphertext: Vec<u8>,
}

/// Phase 1: the shares of a client's mask key and self-mask seed, one AES-GCM
/// ciphertext per neighbour, plus a commitment to the self-mask seed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareKeys {
    pub round: u64,
    pub client: ClientId,
    #[serde(with = "hexarr")]
    pub self_mask_commitment: [u8; 32],
    pub shares: Vec<EncryptedShare>,
    #[serde(with = "hexarr")]
    pub signature: [u8; 64],
}

impl ShareKeys {
    pub fn transcript(&self, digest: &[u8; 32]) -> Transcript {
        let mut t = Transcript::new("share-keys", digest, self.round);
        t.id(self.client).bytes(&self.self_mask_commitment).u64(self.shares.len() as u64);
        for s in &self.shares {
            t.id(s.to).bytes(&s.ciphertext);
        }
        t
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardedShare {
    pub from: ClientId,
    #[serde(with = "hexvec")]
    pub ciphertext: Vec<u8>,
}

/// Server to one client after phase 1: the set U2 of clients that shared keys and the
/// ciphertexts its neighbours in U2 addressed to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareBundle {
    pub round: u64,
    pub to: ClientId,
    pub shared: Vec<ClientId>,
    pub shares: Vec<ForwardedShare>,
    #[serde(with = "hexarr")]
    pub aggregator_signature: [u8; 64],
}

impl ShareBundle {
    pub fn transcript(&self, digest: &[u8; 32]) -> Transcript {
        let mut t = Transcript::new("share-bundle", digest, self.round);
        t.id(self.to).ids(&self.shared).u64(self.shares.len() as u64);
        for s in &self.shares {
            t.id(s.from).bytes(&s.ciphertext);
        }
        t
    }
}

/// An institution's statement of the record-level DP (DP-SGD) its update was trained
/// under, signed with its masked input: the records' ε over every local run so far, this
/// one included (its own ledger's figure), and this run's mechanism, from which anyone
/// can recompute what the run alone spends ([`RecordPrivacyClaim::run_epsilon_floor`]).
///
/// The aggregator checks that it is coherent ([`RecordPrivacyClaim::validate`]) and the
/// log records it; whether the figure comes from measured code or is only the
/// institution's word depends on the evidence the institution was admitted with.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordPrivacyClaim {
    /// ε of each record over every local run so far, this one included, at `delta`.
    pub epsilon: f64,
    pub delta: f64,
    /// The records' ε budget the institution holds itself to.
    pub budget: f64,
    /// σ of this run's DP-SGD.
    pub noise_multiplier: f64,
    /// q, the Poisson sampling rate of this run.
    pub sample_rate: f64,
    /// C, the per-record L2 clip.
    pub max_grad_norm: f64,
    /// Noisy steps of this run.
    pub steps: u64,
}

/// Encoded size of a [`RecordPrivacyClaim`]: six f64 and a u64, little-endian.
pub const RECORD_PRIVACY_LEN: usize = 7 * 8;

/// Relative slack allowed between a claimed ε and what its own run implies (the
/// accountant's floating point on the two sides).
const CLAIM_EPSILON_SLACK: f64 = 1e-6;

impl RecordPrivacyClaim {
    pub fn to_bytes(&self) -> [u8; RECORD_PRIVACY_LEN] {
        let mut out = [0u8; RECORD_PRIVACY_LEN];
        let fields = [self.epsilon, self.delta, self.budget, self.noise_multiplier, self.sample_rate, self.max_grad_norm];
        for (dst, v) in out.chunks_exact_mut(8).zip(fields) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        out[48..].copy_from_slice(&self.steps.to_le_bytes());
        out
    }

    pub fn from_bytes(b: &[u8; RECORD_PRIVACY_LEN]) -> Self {
        let f = |i: usize| f64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        RecordPrivacyClaim {
            epsilon: f(0),
            delta: f(1),
            budget: f(2),
            noise_multiplier: f(3),
            sample_rate: f(4),
            max_grad_norm: f(5),
            steps: u64::from_le_bytes(b[48..56].try_into().unwrap_or([0; 8])),
        }
    }

    /// ε of this run alone at `delta` (RDP of the Poisson-subsampled Gaussian).
    pub fn run_epsilon(&self) -> f64 {
        crate::rdp::epsilon(&[self.run()], self.delta)
    }

    /// This run as the accountants see it.
    pub fn run(&self) -> crate::rdp::SgmSteps {
        crate::rdp::SgmSteps { noise_multiplier: self.noise_multiplier, sample_rate: self.sample_rate, steps: self.steps }
    }

    /// The least ε this run alone can be stated at by a sound accountant: RDP's ε when
    /// the claim reaches it (the cheap check), else the PRV's lower bound
    /// ([`crate::prv::epsilon_floor`]): an institution that accounts with the PRV, as
    /// Opacus does by default, claims less than RDP would.
    pub fn run_epsilon_floor(&self) -> f64 {
        let rdp = self.run_epsilon();
        if self.epsilon >= rdp {
            return rdp;
        }
        crate::prv::epsilon_floor(&[self.run()], self.delta)
    }

    /// A claim must be a possible ledger figure: finite, σ > 0, q in (0, 1], C > 0, at
    /// least one step, δ in (0, 1), within its own budget, and no smaller than what this
    /// run alone spends (a cumulative ε cannot be below one of its parts).
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::malformed(format!("record-level privacy claim: {m}")));
        let all = [self.epsilon, self.delta, self.budget, self.noise_multiplier, self.sample_rate, self.max_grad_norm];
        if all.iter().any(|v| !v.is_finite()) {
            return bad("every figure must be finite".into());
        }
        if !(self.noise_multiplier > 0.0 && self.sample_rate > 0.0 && self.sample_rate <= 1.0 && self.max_grad_norm > 0.0 && self.steps >= 1) {
            return bad(format!(
                "σ = {}, q = {}, C = {}, steps = {} is not a DP-SGD run (σ > 0, 0 < q ≤ 1, C > 0, steps ≥ 1)",
                self.noise_multiplier, self.sample_rate, self.max_grad_norm, self.steps
            ));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return bad(format!("δ = {} is not in (0, 1)", self.delta));
        }
        if !(self.epsilon >= 0.0 && self.budget > 0.0) || self.epsilon > self.budget * (1.0 + CLAIM_EPSILON_SLACK) {
            return bad(format!("ε = {} is not within the budget of {}", self.epsilon, self.budget));
        }
        let run = self.run_epsilon_floor();
        // A run the accountant cannot bound (NaN) is refused too.
        if run.is_nan() || self.epsilon < run * (1.0 - CLAIM_EPSILON_SLACK) {
            return bad(format!(
                "ε = {} is less than this run alone spends ({run:.6} for σ = {}, q = {}, {} steps at δ = {:e})",
                self.epsilon, self.noise_multiplier, self.sample_rate, self.steps, self.delta
            ));
        }
        Ok(())
    }
}

/// Phase 2: the masked, quantized update `y = x + PRG(b) + Σ ±PRG(s_uv) mod 2^b`, and the
/// record-level privacy its sender claims for it, if it trained with DP-SGD.
#[derive(Clone, PartialEq)]
pub struct MaskedInput {
    pub round: u64,
    pub client: ClientId,
    /// The masked elements, each below `2^bits`.
    pub data: Vec<u32>,
    /// Width of each element on the wire: the round's `modulus_bits`. At 32 the body is
    /// little-endian words (versions 2 and 3, or 4 with a base version); below, it is
    /// bit-packed ([`crate::pack`], version 4).
    pub bits: u8,
    pub signature: [u8; 64],
    pub record_privacy: Option<RecordPrivacyClaim>,
    /// In a buffered cohort: the global model version the update was trained from,
    /// covered by the signature (the aggregator derives its staleness from it).
    pub base_version: Option<u64>,
}

impl std::fmt::Debug for MaskedInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskedInput")
            .field("round", &self.round)
            .field("client", &self.client)
            .field("len", &self.data.len())
            .field("bits", &self.bits)
            .field("record_privacy", &self.record_privacy)
            .field("base_version", &self.base_version)
            .finish()
    }
}

const MASKED_MAGIC: &[u8; 4] = b"TSMI";
/// 2: the data digest is the chunked tree hash of [`data_digest_of_bytes`] (1 was the
/// SHA-256 of the whole body). An input without a record-level privacy claim is encoded
/// in version 2, byte for byte as before.
const MASKED_VERSION: u8 = 2;
/// 3: version 2 with a [`RecordPrivacyClaim`] after the signature, which the signature
/// covers.
const MASKED_VERSION_CLAIM: u8 = 3;
/// 4: the version-2 header, then a flags byte ([`FLAG_CLAIM`], [`FLAG_BASE_VERSION`]) and
/// the element width in bits (1 to 32), then the claim and the base version when their
/// flags are set, then the body: bit-packed ([`crate::pack`]) below 32 bits, words at 32.
/// The data digest is the tree hash of the body as sent. Used when the width is below 32
/// or the input names a base version; otherwise versions 2 and 3 stay byte for byte.
const MASKED_VERSION_EXTENDED: u8 = 4;
/// Version 4 flag: a [`RecordPrivacyClaim`] follows the width.
const FLAG_CLAIM: u8 = 1;
/// Version 4 flag: the base version (u64 LE) follows the claim, if any.
const FLAG_BASE_VERSION: u8 = 2;

/// Bytes of the masked body per leaf of the data digest (1 MiB, 262,144 words).
pub const DIGEST_CHUNK_BYTES: usize = 1 << 20;

/// Below this many bytes per thread the digest is computed on one thread.
const DIGEST_MIN_BYTES_PER_THREAD: usize = DIGEST_CHUNK_BYTES;

/// The digest a masked input's signature binds: `SHA-256("tessera/masked-data/v2" ‖
/// u64 LE body length ‖ leaf_0 ‖ leaf_1 ‖ …)`, where `leaf_i` is the SHA-256 of the
/// i-th 1 MiB chunk of the body (the last one shorter). The leaves are independent, so
/// the digest is computed on every core (`threads`), with the same result for any count.
pub fn data_digest_of_bytes(body: &[u8], threads: usize) -> [u8; 32] {
    data_digest_with(body.len(), threads, |range, h| sha2::Digest::update(h, &body[range]))
}

/// The same digest over words, read as little-endian bytes, without a copy of the whole.
pub fn data_digest_of_words(data: &[u32], threads: usize) -> [u8; 32] {
    if cfg!(target_endian = "little") {
        // The words' own bytes are their little-endian encoding: hashed where they lie.
        return data_digest_of_bytes(bytemuck::cast_slice(data), threads);
    }
    data_digest_with(data.len() * 4, threads, |range, h| {
        let mut block = [0u8; 16 * 1024];
        for chunk in data[range.start / 4..range.end / 4].chunks(block.len() / 4) {
            for (dst, w) in block.chunks_exact_mut(4).zip(chunk) {
                dst.copy_from_slice(&w.to_le_bytes());
            }
            sha2::Digest::update(h, &block[..chunk.len() * 4]);
        }
    })
}

fn data_digest_with(len: usize, threads: usize, feed: impl Fn(std::ops::Range<usize>, &mut sha2::Sha256) + Sync) -> [u8; 32] {
    data_digest_root(len, &leaf_hashes_with(len, threads, feed))
}

/// The hash of one [`DIGEST_CHUNK_BYTES`] leaf of a data digest ([`data_digest_of_bytes`]):
/// SHA-256 of its bytes.
pub(crate) fn leaf_hash(leaf: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(leaf).into()
}

fn leaf_hashes_with(len: usize, threads: usize, feed: impl Fn(std::ops::Range<usize>, &mut sha2::Sha256) + Sync) -> Vec<[u8; 32]> {
    use sha2::Digest;
    let leaves = len.div_ceil(DIGEST_CHUNK_BYTES);
    let leaf = |i: usize| -> [u8; 32] {
        let mut h = sha2::Sha256::new();
        feed(i * DIGEST_CHUNK_BYTES..((i + 1) * DIGEST_CHUNK_BYTES).min(len), &mut h);
        h.finalize().into()
    };
    let threads = threads.clamp(1, leaves.max(1)).min(len.div_ceil(DIGEST_MIN_BYTES_PER_THREAD).max(1));
    if threads <= 1 {
        (0..leaves).map(leaf).collect()
    } else {
        let per = leaves.div_ceil(threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads).map(|t| scope.spawn(move || (t * per..((t + 1) * per).min(leaves)).map(leaf).collect::<Vec<_>>())).collect();
            handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|_| unreachable!("a digest thread does not panic"))).collect()
        })
    }
}

/// The data digest of a body of `len` bytes from its leaves' hashes.
pub(crate) fn data_digest_root(len: usize, leaves: &[[u8; 32]]) -> [u8; 32] {
    use sha2::Digest;
    let mut root = sha2::Sha256::new();
    root.update(b"tessera/masked-data/v2");
    root.update((len as u64).to_le_bytes());
    for h in leaves {
        root.update(h);
    }
    root.finalize().into()
}
/// magic, version, round, client, element count, signature.
pub const MASKED_HEADER_LEN: usize = 4 + 1 + 8 + 4 + 4 + 64;
/// The version-3 header: [`MASKED_HEADER_LEN`] and the record-level privacy claim.
pub const MASKED_HEADER_LEN_CLAIM: usize = MASKED_HEADER_LEN + RECORD_PRIVACY_LEN;

impl MaskedInput {
    /// The data digest ([`data_digest_of_bytes`]) of the encoded body: the words as
    /// little-endian bytes at 32 bits (hashed in blocks rather than copied whole), the
    /// packed bytes below; on every core.
    pub fn data_digest(data: &[u32], bits: u8) -> [u8; 32] {
        if bits >= 32 {
            data_digest_of_words(data, crate::prg::default_threads())
        } else {
            data_digest_of_bytes(&crate::pack::pack(data, bits), crate::prg::default_threads())
        }
    }

    /// What the sender signs: the round, the sender, the data digest and, when it makes
    /// one, its record-level privacy claim (so the claim cannot be stripped, added or
    /// changed without the signature failing). Without a claim the transcript is the
    /// one of version 2. The width needs no place of its own: the configuration, whose
    /// digest every transcript binds, fixes it, and the aggregator refuses any other.
    pub fn transcript_for(
        digest: &[u8; 32],
        round: u64,
        client: ClientId,
        data_digest: &[u8; 32],
        claim: Option<&RecordPrivacyClaim>,
        base_version: Option<u64>,
    ) -> Transcript {
        let mut t = Transcript::new("masked-input", digest, round);
        t.id(client).bytes(data_digest);
        if let Some(c) = claim {
            t.bytes(b"record-privacy/v1").bytes(&c.to_bytes());
        }
        if let Some(v) = base_version {
            t.bytes(b"base-version/v1").u64(v);
        }
        t
    }

    pub fn transcript(&self, digest: &[u8; 32]) -> Transcript {
        Self::transcript_for(digest, self.round, self.client, &Self::data_digest(&self.data, self.bits), self.record_privacy.as_ref(), self.base_version)
    }

    /// The largest encoding of an input of `elements` elements of `bits` bits (with a
    /// claim and a base version); servers derive their body limit from it.
    pub fn encoded_len(elements: usize, bits: u8) -> usize {
        MASKED_HEADER_LEN_CLAIM + 2 + 8 + crate::pack::packed_len(elements, bits)
    }

    pub fn encode(&self) -> Vec<u8> {
        let extended = self.bits < 32 || self.base_version.is_some();
        let mut out = Vec::with_capacity(Self::encoded_len(self.data.len(), self.bits));
        out.extend_from_slice(MASKED_MAGIC);
        out.push(match (extended, self.record_privacy.is_some()) {
            (false, false) => MASKED_VERSION,
            (false, true) => MASKED_VERSION_CLAIM,
            (true, _) => MASKED_VERSION_EXTENDED,
        });
        out.extend_from_slice(&self.round.to_le_bytes());
        out.extend_from_slice(&self.client.0.to_le_bytes());
        out.extend_from_slice(&(self.data.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.signature);
        if extended {
            let flags = if self.record_privacy.is_some() { FLAG_CLAIM } else { 0 } | if self.base_version.is_some() { FLAG_BASE_VERSION } else { 0 };
            out.push(flags);
            out.push(self.bits);
        }
        if let Some(c) = &self.record_privacy {
            out.extend_from_slice(&c.to_bytes());
        }
        if let (true, Some(v)) = (extended, self.base_version) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        crate::pack::pack_into(&self.data, self.bits.min(32), &mut out);
        out
    }

    /// Parses the binary layout; every length is checked before it is used.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let view = MaskedInputView::parse(bytes)?;
        let data = view.values().collect();
        Ok(MaskedInput {
            round: view.round,
            client: view.client,
            data,
            bits: view.bits,
            signature: view.signature,
            record_privacy: view.record_privacy,
            base_version: view.base_version,
        })
    }
}

/// A masked input still in its received bytes: the header decoded (its fields read
/// through the view), the body borrowed. The aggregator verifies and folds straight from
/// it, so a submission never exists twice in memory.
#[derive(Clone, Copy, Debug)]
pub struct MaskedInputView<'a> {
    header: MaskedInputHeader,
    /// `count` little-endian u32 words, or `count` packed elements of `bits` bits.
    pub body: &'a [u8],
}

impl std::ops::Deref for MaskedInputView<'_> {
    type Target = MaskedInputHeader;

    fn deref(&self) -> &MaskedInputHeader {
        &self.header
    }
}

/// Little-endian words of a 32-bit body.
pub type Words<'a> = std::iter::Map<std::slice::ChunksExact<'a, u8>, fn(&[u8]) -> u32>;

/// The elements of a [`MaskedInputView`], whatever their width.
#[derive(Clone, Debug)]
pub enum Values<'a> {
    Words(Words<'a>),
    Packed(crate::pack::Unpacked<'a>),
}

impl Iterator for Values<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        match self {
            Values::Words(w) => w.next(),
            Values::Packed(p) => p.next(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            Values::Words(w) => w.size_hint(),
            Values::Packed(p) => p.size_hint(),
        }
    }
}

impl ExactSizeIterator for Values<'_> {}

fn word_le(w: &[u8]) -> u32 {
    u32::from_le_bytes([w[0], w[1], w[2], w[3]])
}

/// The longest header of any masked-input version: the version-3 header, the version-4
/// flags and width, and a base version.
pub const MASKED_HEADER_MAX: usize = MASKED_HEADER_LEN_CLAIM + 2 + 8;

/// A masked input's header: everything before the body.
#[derive(Clone, Copy, Debug)]
pub struct MaskedInputHeader {
    pub round: u64,
    pub client: ClientId,
    pub signature: [u8; 64],
    pub record_privacy: Option<RecordPrivacyClaim>,
    pub base_version: Option<u64>,
    /// Width of each element: 32 (versions 2 and 3) or the width version 4 states.
    pub bits: u8,
    /// Number of elements.
    pub count: usize,
    /// Bytes before the body.
    pub body_at: usize,
}

impl MaskedInputHeader {
    /// Parses the header from `prefix`, the first bytes of an input of `total` bytes (all
    /// of them, or at least [`MASKED_HEADER_MAX`]), and checks that the body's length is
    /// the one the header declares. (The padding bits of a packed body are checked where
    /// its last bytes are read.)
    pub fn parse(prefix: &[u8], total: usize) -> Result<Self, Error> {
        let short = || Error::malformed(format!("masked input of {total} bytes is shorter than its header"));
        if prefix.len() < MASKED_HEADER_LEN || total < prefix.len() {
            return Err(short());
        }
        let bytes = prefix;
        if &bytes[..4] != MASKED_MAGIC {
            return Err(Error::malformed("masked input does not start with TSMI"));
        }
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or([0; 4]));
        let count = u32_at(17) as usize;
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&bytes[21..85]);
        let claim_at = |at: usize| -> Result<RecordPrivacyClaim, Error> {
            let c = bytes.get(at..at + RECORD_PRIVACY_LEN).ok_or_else(short)?;
            Ok(RecordPrivacyClaim::from_bytes(c.try_into().map_err(|_| short())?))
        };
        let (record_privacy, base_version, bits, body_at) = match bytes[4] {
            MASKED_VERSION => (None, None, 32, MASKED_HEADER_LEN),
            MASKED_VERSION_CLAIM => (Some(claim_at(MASKED_HEADER_LEN)?), None, 32, MASKED_HEADER_LEN_CLAIM),
            MASKED_VERSION_EXTENDED => {
                let (&flags, &bits) = (bytes.get(MASKED_HEADER_LEN).ok_or_else(short)?, bytes.get(MASKED_HEADER_LEN + 1).ok_or_else(short)?);
                if flags & !(FLAG_CLAIM | FLAG_BASE_VERSION) != 0 {
                    return Err(Error::malformed(format!("masked input flags {flags:#04x} name unknown fields")));
                }
                // Rounds compute modulo 2^8 to 2^32; below 8 bits one packed body would
                // also read as another element count, which the signature does not bind.
                if !(8..=32).contains(&bits) {
                    return Err(Error::malformed(format!("masked input elements are 8 to 32 bits wide, not {bits}")));
                }
                if bits == 32 && flags & FLAG_BASE_VERSION == 0 {
                    return Err(Error::malformed("a masked input of 32-bit words without a base version is encoded in version 2 or 3"));
                }
                let mut at = MASKED_HEADER_LEN + 2;
                let claim = if flags & FLAG_CLAIM != 0 {
                    at += RECORD_PRIVACY_LEN;
                    Some(claim_at(at - RECORD_PRIVACY_LEN)?)
                } else {
                    None
                };
                let base = if flags & FLAG_BASE_VERSION != 0 {
                    if bytes.len() < at + 8 {
                        return Err(short());
                    }
                    at += 8;
                    Some(u64_at(at - 8))
                } else {
                    None
                };
                (claim, base, bits, at)
            }
            v => return Err(Error::malformed(format!("masked input version {v} is not supported"))),
        };
        let h = MaskedInputHeader { round: u64_at(5), client: ClientId(u32_at(13)), signature, record_privacy, base_version, bits, count, body_at };
        let body_len = total.checked_sub(body_at).ok_or_else(short)?;
        let want = h.body_len();
        if body_len != want {
            return Err(if bits < 32 {
                Error::malformed(format!("{count} elements of {bits} bits take {want} bytes, the body has {body_len}"))
            } else {
                Error::malformed(format!("masked input declares {count} elements but carries {body_len} bytes"))
            });
        }
        Ok(h)
    }

    /// The bytes of the body the header declares: `count` elements of `bits` bits,
    /// packed below 32.
    pub fn body_len(&self) -> usize {
        if self.bits < 32 {
            crate::pack::packed_len(self.count, self.bits)
        } else {
            self.count.saturating_mul(4)
        }
    }

    /// Reads and parses the header of a masked input held in a seekable source (an upload
    /// spooled to a file), and checks a packed body's padding bits in its last byte, as
    /// the parse of a whole input does. Returns the header, the bytes read (at most
    /// [`MASKED_HEADER_MAX`]: nothing is allocated from a length the header declares) and
    /// the input's length; the source is left just after those bytes.
    pub fn read_from<R: std::io::Read + std::io::Seek>(src: &mut R) -> Result<(Self, Vec<u8>, usize), Error> {
        use std::io::SeekFrom;
        let io = |e: std::io::Error| Error::Io(e.to_string());
        let total = src.seek(SeekFrom::End(0)).map_err(io)?;
        let total = usize::try_from(total).map_err(|_| Error::malformed(format!("masked input of {total} bytes")))?;
        src.seek(SeekFrom::Start(0)).map_err(io)?;
        let mut prefix = vec![0u8; total.min(MASKED_HEADER_MAX)];
        src.read_exact(&mut prefix).map_err(io)?;
        let h = MaskedInputHeader::parse(&prefix, total)?;
        if h.bits < 32 && total > h.body_at {
            let mut last = [0u8; 1];
            src.seek(SeekFrom::Start(total as u64 - 1)).and_then(|_| src.read_exact(&mut last)).map_err(io)?;
            crate::pack::check_padding(last[0], h.count, h.bits)?;
            src.seek(SeekFrom::Start(prefix.len() as u64)).map_err(io)?;
        }
        Ok((h, prefix, total))
    }
}

impl<'a> MaskedInputView<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        let h = MaskedInputHeader::parse(bytes, bytes.len())?;
        let body = &bytes[h.body_at..];
        if h.bits < 32 {
            crate::pack::check_packed(body, h.count, h.bits)?;
        }
        Ok(MaskedInputView { header: h, body })
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The elements of a 32-bit body (`None` for a packed one): the aggregator folds
    /// these without the unpacking step.
    pub fn words(&self) -> Option<Words<'a>> {
        (self.bits == 32).then(|| self.body.chunks_exact(4).map(word_le as fn(&[u8]) -> u32))
    }

    /// The elements, whatever their width.
    pub fn values(&self) -> Values<'a> {
        if self.bits == 32 {
            Values::Words(self.body.chunks_exact(4).map(word_le as fn(&[u8]) -> u32))
        } else {
            Values::Packed(crate::pack::Unpacked::new(self.body, self.count, self.bits))
        }
    }

    /// Equal to [`MaskedInput::data_digest`] of the decoded elements.
    pub fn data_digest(&self) -> [u8; 32] {
        data_digest_of_bytes(self.body, crate::prg::default_threads())
    }

    /// The view with its data digest, computed here once from the borrowed body: whoever
    /// checks the signature early and whoever folds later share one hash pass, and the
    /// borrow keeps the body unchanged in between.
    pub fn digested(self) -> DigestedMaskedInput<'a> {
        DigestedMaskedInput { digest: self.data_digest(), view: self }
    }
}

/// A [`MaskedInputView`] and the data digest of its body ([`data_digest_of_bytes`]). Only [`MaskedInputView::digested`]
/// makes one, so the digest is always that of the body it borrows.
#[derive(Clone, Copy, Debug)]
pub struct DigestedMaskedInput<'a> {
    view: MaskedInputView<'a>,
    digest: [u8; 32],
}

impl<'a> DigestedMaskedInput<'a> {
    pub fn view(&self) -> &MaskedInputView<'a> {
        &self.view
    }

    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// The transcript the sender's signature must cover under a configuration `digest`.
    pub fn transcript(&self, config_digest: &[u8; 32]) -> Transcript {
        MaskedInput::transcript_for(config_digest, self.view.round, self.view.client, &self.digest, self.view.record_privacy.as_ref(), self.view.base_version)
    }

    /// Size of the received encoding (header and body).
    pub fn encoded_len(&self) -> usize {
        self.view.body_at + self.view.body.len()
    }
}

/// Server to clients after phase 2: U3, the clients whose masked inputs were summed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SurvivorSet {
    pub round: u64,
    pub survivors: Vec<ClientId>,
    #[serde(with = "hexarr")]
    pub aggregator_signature: [u8; 64],
}

impl SurvivorSet {
    /// What the aggregator signs (distinct from what the clients sign, [`SurvivorSet::transcript`]).
    pub fn aggregator_transcript(digest: &[u8; 32], round: u64, survivors: &[ClientId]) -> Transcript {
        let mut t = Transcript::new("survivor-set", digest, round);
        t.ids(survivors);
        t
    }

    pub fn transcript(digest: &[u8; 32], round: u64, survivors: &[ClientId]) -> Transcript {
        let mut t = Transcript::new("consistency-check", digest, round);
        t.ids(survivors);
        t
    }
}

/// Phase 3: a client's signature over U3. Honest clients sign one survivor set per round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistencySignature {
    pub round: u64,
    pub client: ClientId,
    #[serde(with = "hexarr")]
    pub signature: [u8; 64],
}

/// Server to clients after phase 3: U3 and at least `t` signatures over it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnmaskRequest {
    pub round: u64,
    pub survivors: Vec<ClientId>,
    pub signatures: Vec<ConsistencySignature>,
    #[serde(with = "hexarr")]
    pub aggregator_signature: [u8; 64],
}

impl UnmaskRequest {
    pub fn transcript(&self, digest: &[u8; 32]) -> Transcript {
        let mut t = Transcript::new("unmask-request", digest, self.round);
        t.ids(&self.survivors).u64(self.signatures.len() as u64);
        for s in &self.signatures {
            t.u64(s.round).id(s.client).bytes(&s.signature);
        }
        t
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevealedShare {
    pub of: ClientId,
    pub share: Share,
}

/// Phase 4: self-mask shares of surviving neighbours and mask-key shares of neighbours
/// that dropped after sharing keys; never both for one neighbour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnmaskShares {
    pub round: u64,
    pub client: ClientId,
    pub self_mask_shares: Vec<RevealedShare>,
    pub mask_key_shares: Vec<RevealedShare>,
    #[serde(with = "hexarr")]
    pub signature: [u8; 64],
}

impl UnmaskShares {
    pub fn transcript(&self, digest: &[u8; 32]) -> Transcript {
        let mut t = Transcript::new("unmask-shares", digest, self.round);
        t.id(self.client);
        for (label, list) in [(&b"self"[..], &self.self_mask_shares), (&b"mask-key"[..], &self.mask_key_shares)] {
            t.bytes(label).u64(list.len() as u64);
            for r in list {
                t.id(r.of).bytes(&[r.share.x]).bytes(&r.share.y);
            }
        }
        t
    }
}

/// The released aggregate: the weighted mean and what it covers, signed by the enclave's
/// identity key. The mean travels separately (binary); its hash is signed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Release {
    pub round: u64,
    #[serde(with = "hexarr")]
    pub config_digest: [u8; 32],
    pub included: Vec<ClientId>,
    pub total_weight: u64,
    /// SHA-256 of the mean as little-endian f32 bytes.
    #[serde(with = "hexarr")]
    pub mean_sha256: [u8; 32],
    /// Worst-case quantization error of one coordinate.
    pub error_bound: f64,
    #[serde(with = "hexarr")]
    pub signature: [u8; 64],
    /// Shared, not copied: the enclave, the store's write and every reader of the
    /// release hold this one vector.
    #[serde(skip)]
    pub mean: std::sync::Arc<Vec<f32>>,
}

impl Release {
    pub fn transcript(&self) -> Transcript {
        let mut t = Transcript::new("release", &self.config_digest, self.round);
        t.ids(&self.included).u64(self.total_weight).bytes(&self.mean_sha256);
        t
    }

    /// The mean as it is served and hashed: little-endian f32s. On a little-endian
    /// machine these are the vector's own bytes, borrowed, not copied.
    pub fn mean_bytes(mean: &[f32]) -> std::borrow::Cow<'_, [u8]> {
        if cfg!(target_endian = "little") {
            std::borrow::Cow::Borrowed(bytemuck::cast_slice(mean))
        } else {
            std::borrow::Cow::Owned(mean.iter().flat_map(|x| x.to_le_bytes()).collect())
        }
    }

    /// The mean's bytes ([`Release::mean_bytes`]) as an owner that shares this release's
    /// vector, for a server to store and serve without a copy of its own.
    pub fn shared_mean_bytes(&self) -> MeanBytes {
        match Self::mean_bytes(&self.mean) {
            std::borrow::Cow::Borrowed(_) => MeanBytes::Shared(self.mean.clone()),
            std::borrow::Cow::Owned(bytes) => MeanBytes::Owned(bytes),
        }
    }

    /// The mean from its served bytes: the inverse of [`Release::mean_bytes`].
    pub fn mean_from_bytes(bytes: &[u8]) -> std::sync::Arc<Vec<f32>> {
        std::sync::Arc::new(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    /// Checks the signature against the enclave's identity key and the mean against its hash.
    pub fn verify(&self, identity: &[u8; 32]) -> bool {
        self.hashes_to(&Self::mean_bytes(&self.mean)) && crate::crypto::verify_signature(identity, self.transcript().as_bytes(), &self.signature)
    }

    /// Whether `mean_bytes` (little-endian f32s, as served) are the mean whose hash this
    /// release states.
    pub fn hashes_to(&self, mean_bytes: &[u8]) -> bool {
        sha256(mean_bytes) == self.mean_sha256
    }
}

/// A release's mean as little-endian bytes, owning what it reads: the release's own
/// vector where the machine's f32s are little-endian, a converted copy where not.
#[derive(Clone, Debug)]
pub enum MeanBytes {
    Shared(std::sync::Arc<Vec<f32>>),
    Owned(Vec<u8>),
}

impl AsRef<[u8]> for MeanBytes {
    fn as_ref(&self) -> &[u8] {
        match self {
            // Built only where `mean_bytes` borrows, that is, on a little-endian machine.
            MeanBytes::Shared(mean) => bytemuck::cast_slice(mean.as_slice()),
            MeanBytes::Owned(bytes) => bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MaskedInput {
        MaskedInput { round: 7, client: ClientId(3), data: vec![1, 2, u32::MAX], bits: 32, signature: [5; 64], record_privacy: None, base_version: None }
    }

    /// The served and hashed bytes of a mean are its f32s in little-endian order, whether
    /// borrowed from the vector or shared with it, and read back to the same floats.
    #[test]
    fn mean_bytes_are_little_endian_f32s() {
        let mean = vec![1.5f32, -0.0, f32::MIN_POSITIVE, -3.25e7, f32::INFINITY];
        let want: Vec<u8> = mean.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(&*Release::mean_bytes(&mean), &want[..]);
        let release = Release {
            round: 1,
            config_digest: [0; 32],
            included: vec![],
            total_weight: 1,
            mean_sha256: [0; 32],
            error_bound: 0.0,
            signature: [0; 64],
            mean: std::sync::Arc::new(mean.clone()),
        };
        let shared = release.shared_mean_bytes();
        assert_eq!(shared.as_ref(), &want[..]);
        if cfg!(target_endian = "little") {
            assert!(matches!(&shared, MeanBytes::Shared(m) if std::sync::Arc::ptr_eq(m, &release.mean)), "no copy on a little-endian machine");
        }
        let back = Release::mean_from_bytes(&want);
        assert_eq!(back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), mean.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    }

    fn claim() -> RecordPrivacyClaim {
        RecordPrivacyClaim { epsilon: 3.0, delta: 1e-5, budget: 8.0, noise_multiplier: 1.1, sample_rate: 0.01, max_grad_norm: 1.0, steps: 100 }
    }

    #[test]
    fn a_claim_round_trips_and_is_bound_by_the_transcript() {
        let with = MaskedInput { record_privacy: Some(claim()), ..sample() };
        let bytes = with.encode();
        assert_eq!(bytes[4], MASKED_VERSION_CLAIM);
        assert_eq!(bytes.len() + 2 + 8, MaskedInput::encoded_len(3, 32), "the limit leaves room for the width, flags and a base version");
        assert_eq!(MaskedInput::decode(&bytes).unwrap(), with);
        assert_eq!(MaskedInputView::parse(&bytes).unwrap().digested().encoded_len(), bytes.len());
        // Without a claim: version 2, byte for byte, and the version-2 transcript.
        let without = sample().encode();
        assert_eq!(without[4], MASKED_VERSION);
        assert_eq!(without.len(), MASKED_HEADER_LEN + 12);
        let d = [9u8; 32];
        let t = |c: Option<&RecordPrivacyClaim>| MaskedInput::transcript_for(&d, 7, ClientId(3), &[1; 32], c, None).as_bytes().to_vec();
        assert_ne!(t(None), t(Some(&claim())));
        assert_ne!(t(Some(&claim())), t(Some(&RecordPrivacyClaim { epsilon: 2.9, ..claim() })));
        for cut in 0..bytes.len() {
            assert!(MaskedInput::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    /// A claim accounted with the PRV (Opacus' default) states less than RDP would for
    /// the same run, and is accepted; one below even the PRV's lower bound is not.
    #[test]
    fn claims_accounted_with_the_prv_are_accepted_down_to_its_lower_bound() {
        let c = RecordPrivacyClaim { epsilon: 0.0, delta: 1e-5, budget: 8.0, noise_multiplier: 0.9, sample_rate: 0.05, max_grad_norm: 1.0, steps: 60 };
        let b = crate::prv::bounds(&[c.run()], c.delta).unwrap();
        let rdp = c.run_epsilon();
        assert!(b.upper < rdp, "PRV {} vs RDP {rdp}", b.upper);
        RecordPrivacyClaim { epsilon: b.upper, ..c }.validate().unwrap();
        RecordPrivacyClaim { epsilon: b.lower, ..c }.validate().unwrap();
        RecordPrivacyClaim { epsilon: rdp, ..c }.validate().unwrap();
        let floor = crate::prv::epsilon_floor(&[c.run()], c.delta);
        assert!((floor - b.lower).abs() < 1e-3, "floor {floor}, lower bound {}", b.lower);
        let e = RecordPrivacyClaim { epsilon: floor * 0.99, ..c }.validate().unwrap_err().to_string();
        assert!(e.contains("less than this run alone spends"), "{e}");
        // A run whose grid would be too fine at Opacus' ε error (about 3M points) gets a
        // coarser one: a looser floor, still a PRV bound below RDP's ε, within the limit.
        let long = RecordPrivacyClaim { steps: 20_000, delta: 1e-6, ..c };
        let (floor, rdp) = (crate::prv::epsilon_floor(&[long.run()], long.delta), long.run_epsilon());
        assert!(floor.is_finite() && floor < rdp, "{floor} vs RDP {rdp}");
    }

    #[test]
    fn incoherent_claims_are_refused() {
        let c = claim();
        c.validate().unwrap();
        let run = c.run_epsilon();
        assert!(run > 0.0 && run < c.epsilon, "{run}");
        for (bad, why) in [
            (RecordPrivacyClaim { epsilon: f64::NAN, ..c }, "finite"),
            (RecordPrivacyClaim { budget: f64::INFINITY, ..c }, "finite"),
            (RecordPrivacyClaim { noise_multiplier: 0.0, ..c }, "not a DP-SGD run"),
            (RecordPrivacyClaim { sample_rate: 1.5, ..c }, "not a DP-SGD run"),
            (RecordPrivacyClaim { steps: 0, ..c }, "not a DP-SGD run"),
            (RecordPrivacyClaim { max_grad_norm: -1.0, ..c }, "not a DP-SGD run"),
            (RecordPrivacyClaim { delta: 1.0, ..c }, "not in (0, 1)"),
            (RecordPrivacyClaim { epsilon: 9.0, ..c }, "within the budget"),
            (RecordPrivacyClaim { epsilon: -1.0, ..c }, "within the budget"),
            (RecordPrivacyClaim { epsilon: run / 2.0, ..c }, "less than this run alone spends"),
            // Next to no noise: the run alone spends more than any budget.
            (RecordPrivacyClaim { noise_multiplier: 1e-300, sample_rate: 1.0, ..c }, "less than this run alone spends"),
            (RecordPrivacyClaim { noise_multiplier: 1e-9, steps: u64::MAX, ..c }, "less than this run alone spends"),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    /// A known answer computed apart with Python's hashlib (leaves of 1 MiB, the label,
    /// the length), for 655,363 words (two full leaves and a short one) and for nothing.
    #[test]
    fn the_data_digest_is_the_documented_tree_hash() {
        let words: Vec<u32> = (0..655_363u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        for threads in [1, 2, 3, 8] {
            assert_eq!(hex::encode(data_digest_of_words(&words, threads)), "a905561f5fc9814f2bd8f885901dfe3e5b585cd2a2a4bc320d5c55089f06abc3");
            assert_eq!(hex::encode(data_digest_of_bytes(&bytes, threads)), "a905561f5fc9814f2bd8f885901dfe3e5b585cd2a2a4bc320d5c55089f06abc3");
        }
        assert_eq!(hex::encode(data_digest_of_words(&[], 4)), "80da92438276e1c183c6247195f5dffb8c9fbab37541a824c1af09bd1fcc7117");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]
        /// Lengths around the leaf boundary and thread counts: words and bytes agree, and
        /// the thread count changes nothing.
        #[test]
        fn the_data_digest_does_not_depend_on_threads(extra in 0usize..3, delta in -3i64..4, threads in 1usize..6, seed in proptest::prelude::any::<u32>()) {
            let n = ((extra as i64 * (DIGEST_CHUNK_BYTES as i64 / 4)) + delta).max(0) as usize;
            let words: Vec<u32> = (0..n as u32).map(|i| i.wrapping_mul(seed | 1)).collect();
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            let one = data_digest_of_words(&words, 1);
            proptest::prop_assert_eq!(data_digest_of_words(&words, threads), one);
            proptest::prop_assert_eq!(data_digest_of_bytes(&bytes, threads), one);
        }
    }

    #[test]
    fn masked_input_round_trips() {
        let m = sample();
        assert_eq!(MaskedInput::decode(&m.encode()).unwrap(), m);
        let big = MaskedInput { data: (0..10_000u32).map(|i| i.wrapping_mul(2_654_435_761)).collect(), ..sample() };
        let bytes = big.encode();
        let view = MaskedInputView::parse(&bytes).unwrap();
        assert_eq!(view.data_digest(), MaskedInput::data_digest(&big.data, 32));
        assert_eq!(view.words().unwrap().collect::<Vec<_>>(), big.data);
        assert_eq!(view.values().collect::<Vec<_>>(), big.data);
        assert_eq!(m.encode().len(), MASKED_HEADER_LEN + 12);
    }

    /// Below 32 bits, or with a base version, the input is encoded in version 4: packed
    /// below 32 bits (a quarter of the bytes at 8 bits), the same elements back, the
    /// digest over the bytes as sent, every optional field in every combination.
    #[test]
    fn extended_masked_inputs_round_trip() {
        for bits in [8u8, 12, 16, 20, 31, 32] {
            let mask = if bits == 32 { u32::MAX } else { (1u32 << bits) - 1 };
            for (claim, base_version) in [(None, None), (Some(claim()), None), (None, Some(7)), (Some(claim()), Some(u64::MAX))] {
                let m = MaskedInput {
                    data: (0..1001u32).map(|i| i.wrapping_mul(2_654_435_761) & mask).collect(),
                    bits,
                    record_privacy: claim,
                    base_version,
                    ..sample()
                };
                let bytes = m.encode();
                if bits == 32 && base_version.is_none() {
                    assert_eq!(bytes[4], if claim.is_some() { MASKED_VERSION_CLAIM } else { MASKED_VERSION }, "32-bit words stay in versions 2 and 3");
                    continue;
                }
                let header = MASKED_HEADER_LEN + 2 + if claim.is_some() { RECORD_PRIVACY_LEN } else { 0 } + if base_version.is_some() { 8 } else { 0 };
                assert_eq!(bytes.len(), header + crate::pack::packed_len(1001, bits), "bits {bits}");
                assert!(bytes.len() <= MaskedInput::encoded_len(1001, bits));
                assert_eq!(bytes[4], MASKED_VERSION_EXTENDED);
                assert_eq!(MaskedInput::decode(&bytes).unwrap(), m);
                let view = MaskedInputView::parse(&bytes).unwrap();
                assert_eq!(view.words().is_none(), bits < 32);
                assert_eq!((view.base_version, view.record_privacy), (base_version, claim));
                assert_eq!(view.data_digest(), MaskedInput::data_digest(&m.data, bits));
                assert_eq!(view.digested().encoded_len(), bytes.len());
                for cut in 0..bytes.len() {
                    assert!(MaskedInput::decode(&bytes[..cut]).is_err(), "bits {bits}: cut at {cut}");
                }
            }
        }
        let m = MaskedInput { data: vec![255; 4000], bits: 8, ..sample() };
        assert_eq!(m.encode().len(), MASKED_HEADER_LEN + 2 + 4000);
        // The base version is signed: another one changes the transcript.
        let d = [9u8; 32];
        let t = |v: Option<u64>| MaskedInput::transcript_for(&d, 7, ClientId(3), &[1; 32], None, v).as_bytes().to_vec();
        assert_ne!(t(None), t(Some(0)));
        assert_ne!(t(Some(0)), t(Some(1)));
    }

    #[test]
    fn packed_bodies_are_canonical() {
        let m = MaskedInput { data: vec![1, 2, 3], bits: 12, ..sample() };
        let bytes = m.encode();
        // 36 bits in 5 bytes: the last 4 bits pad and must be zero.
        let mut padded = bytes.clone();
        *padded.last_mut().unwrap() |= 0x80;
        assert!(MaskedInput::decode(&padded).unwrap_err().to_string().contains("padding bits"));
        // The width byte: below 8 and above 32 are not widths; 32 without a base version is version 2's.
        let (f, w) = (MASKED_HEADER_LEN, MASKED_HEADER_LEN + 1);
        for bad in [0u8, 4, 7, 33, 255] {
            let mut b = bytes.clone();
            b[w] = bad;
            assert!(MaskedInput::decode(&b).unwrap_err().to_string().contains("8 to 32 bits"), "{bad}");
        }
        let mut b = bytes.clone();
        b[w] = 32;
        assert!(MaskedInput::decode(&b).unwrap_err().to_string().contains("version 2 or 3"));
        // Another width makes the body length wrong.
        let mut b = bytes.clone();
        b[w] = 16;
        assert!(MaskedInput::decode(&b).unwrap_err().to_string().contains("take 6 bytes"));
        // Unknown flags are refused; a flag without its field is a short input.
        let mut b = bytes.clone();
        b[f] = 4;
        assert!(MaskedInput::decode(&b).unwrap_err().to_string().contains("unknown fields"));
        let mut b = bytes.clone();
        b[f] = FLAG_BASE_VERSION;
        assert!(MaskedInput::decode(&b).is_err());
    }

    #[test]
    fn masked_input_rejects_every_truncation_and_bad_header() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(MaskedInput::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(MaskedInput::decode(&bad).is_err());
        let mut bad = bytes.clone();
        bad[4] = 9;
        assert!(MaskedInput::decode(&bad).is_err());
        let mut long = bytes;
        long.push(0);
        assert!(MaskedInput::decode(&long).is_err());
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = MaskedInput::decode(&bytes);
            let mut framed = MASKED_MAGIC.to_vec();
            framed.push(MASKED_VERSION);
            framed.extend_from_slice(&bytes);
            let _ = MaskedInput::decode(&framed);
            framed[4] = MASKED_VERSION_CLAIM;
            let _ = MaskedInput::decode(&framed);
            framed[4] = MASKED_VERSION_EXTENDED;
            let _ = MaskedInput::decode(&framed);
            let _ = serde_json::from_slice::<AdvertiseKeys>(&bytes);
            let _ = serde_json::from_slice::<ShareKeys>(&bytes);
            let _ = serde_json::from_slice::<UnmaskShares>(&bytes);
        }
    }

    #[test]
    fn json_rejects_wrong_lengths_and_unknown_fields() {
        let ok = r#"{"round":1,"client":0,"signature":"00"}"#;
        assert!(serde_json::from_str::<ConsistencySignature>(ok).is_err());
        let extra = format!(r#"{{"round":1,"client":0,"signature":"{}","x":1}}"#, "00".repeat(64));
        assert!(serde_json::from_str::<ConsistencySignature>(&extra).is_err());
        let good = format!(r#"{{"round":1,"client":0,"signature":"{}"}}"#, "00".repeat(64));
        assert!(serde_json::from_str::<ConsistencySignature>(&good).is_ok());
    }
}
