//! Public parameters of one round, agreed by everyone before it starts.
//!
//! The configuration is public: every participant receives the same [`RoundConfig`] and
//! every signed message binds its digest, so a message cannot be replayed into another
//! round or another configuration.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Error;

/// Index of a participant in [`RoundConfig::roster`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientId(pub u32);

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A named tensor of the update, in the order the flat vector concatenates them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<u64>,
}

impl TensorSpec {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// The module-path name the tensor is matched by: a name written the way PEFT saves
    /// it (`base_model.model.<module>.lora_A.default.weight`) means the same tensor as
    /// `<module>.lora_A.weight`. Other names are unchanged.
    pub fn module_name(&self) -> String {
        peft_module_name(&self.name)
    }
}

/// [`TensorSpec::module_name`] of a tensor name: without PEFT's `base_model.model.`
/// prefix and its adapter name (`.default.`).
pub fn peft_module_name(name: &str) -> String {
    name.strip_prefix("base_model.model.").unwrap_or(name).replace(".default.", ".")
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundConfig {
    /// Monotonic round number; every message names it.
    pub round: u64,
    /// Ed25519 public keys of the participants, hex; the index is the [`ClientId`].
    pub roster: Vec<String>,
    /// Minimum number of clients whose inputs enter the sum (the `t` of SecAgg). Fewer
    /// survivors abort the round and nothing is released.
    pub min_survivors: u32,
    /// Neighbours per client in the communication graph (`k`). `n - 1` is classic SecAgg.
    pub neighbours: u32,
    /// Shares of a client's neighbourhood needed to reconstruct its secrets.
    pub share_threshold: u32,
    /// Number of model parameters `m` in the update (the weight travels as one more element).
    pub vector_len: u32,
    /// Optional tensor layout; when present its element count equals `vector_len`.
    #[serde(default)]
    pub layout: Vec<TensorSpec>,
    /// Each coordinate is clipped to `[-clip, clip]` before quantization.
    pub clip: f32,
    /// Arithmetic is modulo `2^modulus_bits` (8..=32).
    pub modulus_bits: u8,
    /// Cap on a client's FedAvg weight (its example count).
    pub max_weight: u32,
    /// Milliseconds each phase waits for stragglers before it closes without them.
    pub phase_timeout_ms: u64,
    /// Public seed from which the neighbour graph is drawn, hex (32 bytes).
    pub graph_seed: String,
    /// Milliseconds the key-advertisement phase waits, when institutions train after the
    /// round opens (0: `phase_timeout_ms`, like every other phase).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub advertise_timeout_ms: u64,
    /// Distributed differential privacy for this round's release, when set: clients clip
    /// to `l2_clip` and add their noise share; the aggregator accounts the ε spent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp: Option<crate::dp::DpParams>,
    /// A linear encoding applied before quantization (shared random-k, Hadamard
    /// rotation); see [`crate::compress`]. The masked vectors then have
    /// [`RoundConfig::encoded_len`] elements plus the weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<crate::compress::Compression>,
    /// Set when the round is one cohort of a buffered asynchronous federation: its phases
    /// close as soon as `size` institutions answered, and each masked input names the
    /// global version it was trained from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cohort: Option<Cohort>,
}

/// One cohort of a buffered asynchronous federation (FedBuff; Nguyen et al., AISTATS
/// 2022): a SecAgg+ round among the institutions ready when it opens, which closes when
/// `size` masked updates arrived (or at its deadline). Each update names the global
/// version it was trained from; its staleness τ = `version` − base, and its sender weighs
/// it by (1 + τ)^−a ([`Cohort::staleness_weight`]) before masking.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cohort {
    /// The global model version when the cohort opened (the number of releases before it);
    /// its release makes version + 1.
    pub version: u64,
    /// K: the key-advertisement and masked-input phases close once this many have answered.
    pub size: u32,
    /// Updates more than this many versions stale are refused.
    pub max_staleness: u32,
    /// a in the staleness weight (1 + τ)^−a (0: stale updates count fully).
    pub staleness_exponent: f64,
}

impl Cohort {
    /// τ of an update trained from `base`, or the refusal naming the numbers.
    pub fn staleness(&self, base: u64) -> Result<u64, crate::ProtocolError> {
        if base > self.version {
            return Err(crate::ProtocolError::FutureVersion { base, version: self.version });
        }
        let tau = self.version - base;
        if tau > u64::from(self.max_staleness) {
            return Err(crate::ProtocolError::TooStale { base, version: self.version, staleness: tau, max: self.max_staleness });
        }
        Ok(tau)
    }

    /// The weight (1 + τ)^−a of an update τ versions stale.
    pub fn staleness_weight(&self, tau: u64) -> f64 {
        (1.0 + tau as f64).powf(-self.staleness_exponent)
    }
}

/// Default statistical parameters for choosing `k` (see [`default_neighbours`]).
pub const DEFAULT_DROPOUT_RATE: f64 = 0.1;
pub const DEFAULT_CORRUPTION_RATE: f64 = 0.1;

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl RoundConfig {
    /// How long the key-advertisement phase waits.
    pub fn advertise_timeout_ms(&self) -> u64 {
        if self.advertise_timeout_ms == 0 {
            self.phase_timeout_ms
        } else {
            self.advertise_timeout_ms
        }
    }

    pub fn participants(&self) -> usize {
        self.roster.len()
    }

    /// Elements of an encoded update: `vector_len`, or what [`RoundConfig::compression`] leaves.
    pub fn encoded_len(&self) -> usize {
        crate::compress::encoded_len(self.vector_len, self.compression.as_ref())
    }

    /// Length of the vectors that are masked and summed: the encoded update plus the weight.
    pub fn masked_len(&self) -> usize {
        self.encoded_len() + 1
    }

    /// Bytes the masked vector occupies on the wire: [`RoundConfig::masked_len`] elements
    /// of `modulus_bits` bits each ([`crate::pack`]).
    pub fn masked_bytes(&self) -> usize {
        crate::pack::packed_len(self.masked_len(), self.modulus_bits)
    }

    pub fn modulus_mask(&self) -> u32 {
        if self.modulus_bits >= 32 {
            u32::MAX
        } else {
            (1u32 << self.modulus_bits) - 1
        }
    }

    pub fn graph_seed_bytes(&self) -> Result<[u8; 32], Error> {
        let v = hex::decode(&self.graph_seed).map_err(|_| Error::Config("graph_seed is not hex".into()))?;
        v.try_into().map_err(|_| Error::Config("graph_seed must be 32 bytes".into()))
    }

    pub fn roster_key(&self, id: ClientId) -> Result<[u8; 32], Error> {
        let hex_key = self.roster.get(id.0 as usize).ok_or(Error::Protocol(crate::ProtocolError::UnknownClient(id)))?;
        let v = hex::decode(hex_key).map_err(|_| Error::Config(format!("roster key {id} is not hex")))?;
        v.try_into().map_err(|_| Error::Config(format!("roster key {id} must be 32 bytes")))
    }

    /// A configuration for `n` participants with the defaults documented on
    /// [`default_neighbours`]; `min_survivors` defaults to two thirds of `n`.
    pub fn with_defaults(round: u64, roster: Vec<String>, vector_len: u32, graph_seed: [u8; 32]) -> RoundConfig {
        let n = roster.len() as u32;
        let (k, share_threshold) = default_neighbours(n, DEFAULT_DROPOUT_RATE, DEFAULT_CORRUPTION_RATE);
        let min_survivors = ((2 * n).div_ceil(3)).max(share_threshold).min(n).max(1);
        RoundConfig {
            round,
            roster,
            min_survivors,
            neighbours: k,
            share_threshold,
            vector_len,
            layout: Vec::new(),
            clip: 1.0,
            modulus_bits: 32,
            max_weight: 1 << 16,
            phase_timeout_ms: 30_000,
            graph_seed: hex::encode(graph_seed),
            dp: None,
            advertise_timeout_ms: 0,
            compression: None,
            cohort: None,
        }
    }

    pub fn validate(&self) -> Result<(), Error> {
        let n = self.participants() as u64;
        let bad = |s: String| Err(Error::Config(s));
        if n < 2 {
            return bad(format!("a round needs at least 2 participants, got {n}"));
        }
        if !(8..=32).contains(&self.modulus_bits) {
            return bad(format!("modulus_bits must be in 8..=32, got {}", self.modulus_bits));
        }
        // One key at two ids would let one institution's signature over U3 count twice
        // toward `t` (the consistency transcript names the set, not the signer's slot).
        let mut keys = std::collections::BTreeMap::new();
        for i in 0..self.roster.len() {
            let key = self.roster_key(ClientId(i as u32))?;
            if let Some(first) = keys.insert(key, i) {
                return bad(format!("the roster lists one key at ids {first} and {i}; each participant needs its own"));
            }
        }
        let k = self.neighbours as u64;
        if k == 0 || k > n - 1 {
            return bad(format!("neighbours must be in 1..={}, got {k}", n - 1));
        }
        if k != n - 1 && !k.is_multiple_of(2) {
            return bad(format!("neighbours must be even unless it is n-1 (got {k})"));
        }
        if k > 254 {
            return bad(format!("neighbours must be at most 254 (shares are indexed in GF(2^8)), got {k}"));
        }
        let ts = self.share_threshold as u64;
        if ts < 1 || ts > k {
            return bad(format!("share_threshold must be in 1..={k}, got {ts}"));
        }
        // An adversary holding both kinds of share of one client needs 2*ts shares among k
        // neighbours; ts > k/2 makes that impossible even before the consistency check.
        if 2 * ts <= k {
            return bad(format!("share_threshold must exceed neighbours/2 = {}, got {ts}", k / 2));
        }
        let t = self.min_survivors as u64;
        if t < 1 || t > n {
            return bad(format!("min_survivors must be in 1..={n}, got {t}"));
        }
        if self.vector_len == 0 {
            return bad("vector_len must be positive".into());
        }
        if !self.layout.is_empty() {
            let total: u64 = self.layout.iter().map(TensorSpec::numel).sum();
            if total != self.vector_len as u64 {
                return bad(format!("layout has {total} elements, vector_len is {}", self.vector_len));
            }
            let mut seen = std::collections::BTreeMap::new();
            for t in &self.layout {
                if let Some(first) = seen.insert(t.module_name(), &t.name) {
                    return bad(format!(
                        "layout names tensor {} twice ({first:?} and {:?}; PEFT's base_model.model. prefix and .default. adapter name are ignored)",
                        t.module_name(),
                        t.name
                    ));
                }
            }
        }
        if let Some(c) = &self.compression {
            c.validate(self.vector_len)?;
            if self.encoded_len() >= u32::MAX as usize {
                return bad(format!("the encoded update of {} elements does not fit a round", self.encoded_len()));
            }
        }
        if let Some(c) = &self.cohort {
            // The cohort goes on with its first K institutions, so each of them must find
            // share_threshold neighbours among the others: the complete graph, K > threshold.
            if self.neighbours as usize != self.participants() - 1 {
                return bad(format!("a cohort uses the complete graph (neighbours = n - 1 = {}), got {}", self.participants() - 1, self.neighbours));
            }
            let least = self.min_survivors.max(self.share_threshold + 1);
            if c.size < least || c.size as usize > self.participants() {
                return bad(format!(
                    "cohort.size must be in {least}..={} (at least min_survivors and share_threshold + 1, at most n), got {}",
                    self.participants(),
                    c.size
                ));
            }
            if !(c.staleness_exponent.is_finite() && c.staleness_exponent >= 0.0) || c.staleness_exponent.is_sign_negative() {
                return bad(format!("cohort.staleness_exponent must be a finite number ≥ 0, got {}", c.staleness_exponent));
            }
            // Under DP an unweighted update would carry the weight by being scaled, noise
            // share included, which would leave less noise than the accountant counts.
            if self.dp.is_some() && c.staleness_exponent != 0.0 {
                return bad(format!(
                    "a cohort with DP must have staleness_exponent = 0 (got {}): scaling a noised update down would shrink its noise share below what the ε accounts for",
                    c.staleness_exponent
                ));
            }
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return bad(format!("clip must be a positive finite number, got {}", self.clip));
        }
        if self.max_weight == 0 {
            return bad("max_weight must be positive".into());
        }
        let modulus_max = self.modulus_mask() as u64;
        if n * self.max_weight as u64 > modulus_max {
            return bad(format!("n * max_weight = {} overflows the modulus 2^{}", n * self.max_weight as u64, self.modulus_bits));
        }
        if modulus_max / n < 2 {
            return bad(format!("modulus 2^{} leaves fewer than 2 levels for {n} inputs", self.modulus_bits));
        }
        if let Some(dp) = &self.dp {
            dp.validate()?;
            // A client's weight scales its update and its noise share alike; weighting
            // would change both the sensitivity and the noise in the sum.
            if self.max_weight != 1 {
                return bad(format!("a round with DP must be unweighted (max_weight = 1), got max_weight = {}", self.max_weight));
            }
            if dp.colluders >= self.min_survivors {
                return bad(format!(
                    "dp.colluders = {} must be below min_survivors = {}: the noise of at least one honest input must remain after the colluders subtract theirs",
                    dp.colluders, self.min_survivors
                ));
            }
            if let Some(sk) = dp.skellam {
                let Some(scale) = sk.scale else {
                    return bad("dp.skellam.scale is missing: a round's configuration states the scale its clients quantize with".into());
                };
                let local = dp.client_noise_std(self.min_survivors);
                let lambda = (local * scale).powi(2) / 2.0;
                if lambda.is_nan() || lambda > crate::skellam::MAX_LAMBDA {
                    return bad(format!(
                        "dp.skellam.scale = {scale} gives each noise share λ = {lambda:e}, above the sampler's exact range 2^50: use a scale of at most {:e}",
                        (2.0 * crate::skellam::MAX_LAMBDA).sqrt() / local
                    ));
                }
                let fits = self.skellam_scale()?;
                if scale > fits * (1.0 + 1e-9) {
                    return bad(format!(
                        "dp.skellam.scale = {scale} is above {fits:e}, the largest scale whose sum of {n} inputs (3 standard deviations of signal, rounding and noise) fits in 2^{} without wrapping",
                        self.modulus_bits
                    ));
                }
                // A coarser scale makes the rounding dominate: the accountant charges it,
                // but the noise multiplier an institution's floor checks would no longer
                // say what the round costs. The scale is the configuration's to derive.
                if scale < fits / 2.0 {
                    return bad(format!(
                        "dp.skellam.scale = {scale} is below half of {fits:e}, the scale that fits this round: a coarser grid adds rounding error that the noise multiplier does not show"
                    ));
                }
            }
            // Each noised coordinate is clamped to [-clip, clip] before quantization; a
            // clamp too close to C cuts the noise's tails and biases the mean. (Skellam
            // rounds have no range clip: their sum wraps modulo 2^b.)
            let need = dp.min_range_clip(self.min_survivors);
            if dp.skellam.is_none() && f64::from(self.clip) < need {
                return bad(format!(
                    "clip = {} is below dp.l2_clip + {}σ = {} + {} × {:.6} = {need:.6}, where σ is a client's noise share (z·C/√(t − f)): \
                     set clip to at least {need:.6} so the range clip does not cut the noise",
                    self.clip,
                    crate::dp::RANGE_SIGMAS,
                    dp.l2_clip,
                    crate::dp::RANGE_SIGMAS,
                    dp.client_noise_std(self.min_survivors)
                ));
            }
        }
        self.graph_seed_bytes()?;
        for i in 0..self.roster.len() {
            self.roster_key(ClientId(i as u32))?;
        }
        Ok(())
    }

    /// The mechanism one release of this round runs, as `against` sees it (`None` without
    /// DP).
    pub fn dp_mechanism(&self, against: crate::dp::Against) -> Option<crate::dp::Mechanism> {
        self.dp?.mechanism(self.min_survivors, self.encoded_len() as u64, against)
    }

    /// The smallest noise multiplier (to 0.1%) with which `rounds` rounds like this one
    /// spend at most `epsilon_target` (at the round's δ, against its colluders). A Skellam
    /// round without a stated scale is given, at each z, the scale that fits
    /// ([`RoundConfig::skellam_scale`]), as the server would.
    pub fn calibrate_noise_multiplier(&self, epsilon_target: f64, rounds: u64) -> Result<f64, Error> {
        let dp = self.dp.ok_or_else(|| Error::Config("the round has no DP parameters to calibrate".into()))?;
        crate::dp::noise_multiplier_for_mechanism(epsilon_target, rounds, dp.delta, |z| {
            let mut cfg = self.clone();
            cfg.dp = Some(crate::dp::DpParams { noise_multiplier: z, ..dp });
            cfg.settle_skellam_scale()?;
            cfg.dp_mechanism(crate::dp::Against::Coalition).ok_or_else(|| Error::Config("the round has no accountable mechanism".into()))
        })
    }

    /// Gives a Skellam round that states no scale the one that fits
    /// ([`RoundConfig::skellam_scale`]); any other round is left as it is.
    pub fn settle_skellam_scale(&mut self) -> Result<(), Error> {
        if self.dp.is_some_and(|d| d.skellam.is_some_and(|s| s.scale.is_none())) {
            let scale = self.skellam_scale()?;
            if let Some(sk) = self.dp.as_mut().and_then(|d| d.skellam.as_mut()) {
                sk.scale = Some(scale);
            }
        }
        Ok(())
    }

    /// The scale for Skellam noise in this round: the largest for which three standard
    /// deviations of the sum of all inputs fit in the modulus (TFF's heuristic), capped
    /// where a noise share's λ would leave the sampler's exact range. Past that cap a
    /// larger scale gains nothing: the rounding is already far below the noise. The signal
    /// is taken as spread evenly over the coordinates only when the round rotates them
    /// (the Hadamard rotation flattens it); otherwise as its worst case, every input's
    /// whole norm on one coordinate.
    pub fn skellam_scale(&self) -> Result<f64, Error> {
        let dp = self.dp.ok_or_else(|| Error::Config("the round has no DP parameters".into()))?;
        let local = dp.client_noise_std(self.min_survivors);
        let dim = self.encoded_len() as u64;
        let flat = self.compression.is_some_and(|c| c.rotation_block.is_some());
        let fits = crate::skellam::SkellamPipeline::heuristic_scale(
            local,
            dp.l2_clip,
            u32::from(self.modulus_bits),
            self.participants() as u32,
            dim,
            3.0,
            if flat { 1.0 } else { dim as f64 },
        )?;
        Ok(fits.min((2.0 * crate::skellam::MAX_LAMBDA).sqrt() / local))
    }

    /// SHA-256 over a canonical length-prefixed encoding; every signed message binds it.
    pub fn digest(&self) -> [u8; 32] {
        let bytes = canonical_encoding(self);
        let mut h = Sha256::new();
        h.update(b"tessera/round-config/v1");
        h.update(bytes);
        h.finalize().into()
    }
}

fn canonical_encoding(cfg: &RoundConfig) -> Vec<u8> {
    let mut out = Vec::new();
    let mut put = |label: &str, v: &[u8]| {
        out.extend_from_slice(&(label.len() as u32).to_le_bytes());
        out.extend_from_slice(label.as_bytes());
        out.extend_from_slice(&(v.len() as u64).to_le_bytes());
        out.extend_from_slice(v);
    };
    put("round", &cfg.round.to_le_bytes());
    for k in &cfg.roster {
        put("roster", k.as_bytes());
    }
    put("min_survivors", &cfg.min_survivors.to_le_bytes());
    put("neighbours", &cfg.neighbours.to_le_bytes());
    put("share_threshold", &cfg.share_threshold.to_le_bytes());
    put("vector_len", &cfg.vector_len.to_le_bytes());
    for t in &cfg.layout {
        put("layout.name", t.name.as_bytes());
        let shape: Vec<u8> = t.shape.iter().flat_map(|d| d.to_le_bytes()).collect();
        put("layout.shape", &shape);
    }
    put("clip", &cfg.clip.to_bits().to_le_bytes());
    put("modulus_bits", &[cfg.modulus_bits]);
    put("max_weight", &cfg.max_weight.to_le_bytes());
    put("phase_timeout_ms", &cfg.phase_timeout_ms.to_le_bytes());
    put("graph_seed", cfg.graph_seed.as_bytes());
    // Fields added later enter the digest only when set, so earlier digests are unchanged.
    if cfg.advertise_timeout_ms != 0 {
        put("advertise_timeout_ms", &cfg.advertise_timeout_ms.to_le_bytes());
    }
    if let Some(dp) = &cfg.dp {
        put("dp.noise_multiplier", &dp.noise_multiplier.to_bits().to_le_bytes());
        put("dp.l2_clip", &dp.l2_clip.to_bits().to_le_bytes());
        put("dp.delta", &dp.delta.to_bits().to_le_bytes());
        put("dp.epsilon_budget", &dp.epsilon_budget.to_bits().to_le_bytes());
        if dp.colluders != 0 {
            put("dp.colluders", &dp.colluders.to_le_bytes());
        }
        if let Some(sk) = &dp.skellam {
            put("dp.skellam.scale", &sk.scale.unwrap_or(0.0).to_bits().to_le_bytes());
            put("dp.skellam.beta", &sk.beta.to_bits().to_le_bytes());
        }
    }
    if let Some(c) = &cfg.cohort {
        put("cohort.version", &c.version.to_le_bytes());
        put("cohort.size", &c.size.to_le_bytes());
        put("cohort.max_staleness", &c.max_staleness.to_le_bytes());
        put("cohort.staleness_exponent", &c.staleness_exponent.to_bits().to_le_bytes());
    }
    if let Some(c) = &cfg.compression {
        put("compression", b"v1");
        if let Some(k) = c.keep {
            put("compression.keep", &k.to_le_bytes());
        }
        if let Some(b) = c.rotation_block {
            put("compression.rotation_block", &b.to_le_bytes());
        }
    }
    out
}

/// Chooses the neighbour count `k` and the share threshold for `n` clients, following
/// the analysis of SecAgg+ (Bell et al. 2020, Sec. 4): each client's secrets must stay
/// recoverable when a fraction `dropout` of its neighbours vanish, and must stay secret
/// when a fraction `corruption` of them collude with the server.
///
/// We take the smallest even `k` (up to `n-1`) and threshold `t_k > k/2` such that, with
/// a union bound over all `n` clients, the probability that some neighbourhood has fewer
/// than `t_k` survivors is below 2^-20 (correctness) and the probability that some
/// neighbourhood has `t_k` or more corrupt members is below 2^-40 (security). When no
/// sparse graph meets both bounds the complete graph (`k = n-1`, classic SecAgg) is used
/// with the smallest threshold above `(n-1)/2`.
pub fn default_neighbours(n: u32, dropout: f64, corruption: f64) -> (u32, u32) {
    let n = n.max(2);
    let union = (n as f64).log2();
    let mut k = 2u32;
    while k < n - 1 && k <= 254 {
        for t in (k / 2 + 1)..=k {
            // P[Binomial(k, 1 - dropout) < t]  and  P[Binomial(k, corruption) >= t].
            let fail_correct = binomial_cdf_below(k, 1.0 - dropout, t);
            let fail_secure = 1.0 - binomial_cdf_below(k, corruption, t);
            let ok_correct = fail_correct.log2() + union <= -20.0;
            let ok_secure = fail_secure.max(f64::MIN_POSITIVE).log2() + union <= -40.0;
            if ok_correct && ok_secure {
                return (k, t);
            }
        }
        k += 2;
    }
    let k = (n - 1).min(254);
    (k, k / 2 + 1)
}

/// P[X < t] for X ~ Binomial(k, p), summed in log space for stability.
fn binomial_cdf_below(k: u32, p: f64, t: u32) -> f64 {
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    let mut total = 0.0;
    let mut log_choose = 0.0f64; // ln C(k, 0)
    for i in 0..t.min(k + 1) {
        if i > 0 {
            log_choose += ((k - i + 1) as f64).ln() - (i as f64).ln();
        }
        total += (log_choose + i as f64 * lp + (k - i) as f64 * lq).exp();
    }
    total.min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` distinct keys (a roster may not repeat one).
    fn roster(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let mut key = [i as u8; 32];
                key[..4].copy_from_slice(&(i as u32).to_le_bytes());
                hex::encode(key)
            })
            .collect()
    }

    #[test]
    fn defaults_validate_for_many_sizes() {
        for n in 2..=300u32 {
            let cfg = RoundConfig::with_defaults(1, roster(n as usize), 10, [7; 32]);
            cfg.validate().unwrap_or_else(|e| panic!("n={n}: {e}"));
        }
    }

    #[test]
    fn default_k_is_sparse_for_large_n() {
        let (k, t) = default_neighbours(1000, 0.1, 0.1);
        assert!(k < 200 && k % 2 == 0, "k={k}");
        assert!(2 * t > k);
        let (k_small, _) = default_neighbours(10, 0.1, 0.1);
        assert_eq!(k_small, 9, "small rounds use the complete graph");
    }

    #[test]
    fn binomial_matches_direct_sum() {
        // P[Bin(4, 0.5) < 2] = (1 + 4) / 16
        assert!((binomial_cdf_below(4, 0.5, 2) - 5.0 / 16.0).abs() < 1e-12);
    }

    #[test]
    fn validation_names_the_problem() {
        let mut cfg = RoundConfig::with_defaults(1, roster(5), 10, [7; 32]);
        cfg.share_threshold = 1;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("share_threshold"), "{err}");
        let mut cfg = RoundConfig::with_defaults(1, roster(5), 10, [7; 32]);
        cfg.max_weight = u32::MAX;
        assert!(cfg.validate().unwrap_err().to_string().contains("overflows"));
        // One tensor named twice, once as PEFT saves it.
        let mut cfg = RoundConfig::with_defaults(1, roster(5), 10, [7; 32]);
        cfg.layout = vec![
            TensorSpec { name: "base_model.model.q.lora_B.default.weight".into(), shape: vec![5] },
            TensorSpec { name: "q.lora_B.weight".into(), shape: vec![5] },
        ];
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("names tensor q.lora_B.weight twice"), "{err}");
        cfg.layout[1].name = "v.lora_B.weight".into();
        cfg.validate().unwrap();
        // One key at two ids, in either case of hex.
        let mut cfg = RoundConfig::with_defaults(1, roster(5), 10, [7; 32]);
        cfg.roster[3] = cfg.roster[1].to_uppercase();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("one key at ids 1 and 3"), "{err}");
    }

    #[test]
    fn digest_changes_with_every_field() {
        let base = RoundConfig::with_defaults(1, roster(5), 10, [7; 32]);
        let mut other = base.clone();
        other.round = 2;
        assert_ne!(base.digest(), other.digest());
        let mut other = base.clone();
        other.clip = 2.0;
        assert_ne!(base.digest(), other.digest());
        assert_eq!(base.digest(), base.clone().digest());
        let mut other = base.clone();
        other.advertise_timeout_ms = 1;
        assert_ne!(base.digest(), other.digest());
        let dp = crate::dp::DpParams { noise_multiplier: 1.0, l2_clip: 1.0, delta: 1e-5, epsilon_budget: 8.0, colluders: 1, skellam: None };
        let mut with_dp = base.clone();
        with_dp.dp = Some(dp);
        assert_ne!(base.digest(), with_dp.digest());
        let mut more_noise = with_dp.clone();
        more_noise.dp = Some(crate::dp::DpParams { noise_multiplier: 1.5, ..dp });
        assert_ne!(with_dp.digest(), more_noise.digest());
        let mut compressed = base.clone();
        compressed.compression = Some(crate::compress::Compression { keep: Some(5), rotation_block: None });
        assert_ne!(base.digest(), compressed.digest());
        let mut rotated = compressed.clone();
        rotated.compression = Some(crate::compress::Compression { keep: Some(5), rotation_block: Some(4) });
        assert_ne!(compressed.digest(), rotated.digest());
        let cohort = Cohort { version: 3, size: 3, max_staleness: 2, staleness_exponent: 0.5 };
        let mut buffered = base.clone();
        buffered.cohort = Some(cohort);
        assert_ne!(base.digest(), buffered.digest());
        for other in
            [Cohort { version: 4, ..cohort }, Cohort { size: 4, ..cohort }, Cohort { max_staleness: 3, ..cohort }, Cohort { staleness_exponent: 0.6, ..cohort }]
        {
            let mut b = base.clone();
            b.cohort = Some(other);
            assert_ne!(b.digest(), buffered.digest());
        }
        let mut dp_cohort = with_dp.clone();
        let cohort = Cohort { size: 4, ..cohort };
        dp_cohort.cohort = Some(cohort);
        dp_cohort.min_survivors = 3;
        dp_cohort.neighbours = 4;
        dp_cohort.share_threshold = 3;
        dp_cohort.max_weight = 1;
        dp_cohort.clip = 100.0;
        let err = dp_cohort.validate().unwrap_err().to_string();
        assert!(err.contains("a cohort with DP must have staleness_exponent = 0"), "{err}");
        dp_cohort.cohort = Some(Cohort { staleness_exponent: 0.0, ..cohort });
        dp_cohort.validate().unwrap();
        dp_cohort.cohort = Some(Cohort { staleness_exponent: -0.0, ..cohort });
        assert!(dp_cohort.validate().unwrap_err().to_string().contains("finite number ≥ 0"));
        let mut more_colluders = with_dp.clone();
        more_colluders.dp = Some(crate::dp::DpParams { colluders: 2, ..dp });
        assert_ne!(with_dp.digest(), more_colluders.digest());
        let sk = crate::dp::SkellamNoise { scale: Some(1000.0), beta: 0.5 };
        let mut skellam = with_dp.clone();
        skellam.dp = Some(crate::dp::DpParams { skellam: Some(sk), ..dp });
        assert_ne!(with_dp.digest(), skellam.digest());
        for other in [crate::dp::SkellamNoise { scale: Some(1001.0), ..sk }, crate::dp::SkellamNoise { beta: 0.25, ..sk }] {
            let mut b = with_dp.clone();
            b.dp = Some(crate::dp::DpParams { skellam: Some(other), ..dp });
            assert_ne!(b.digest(), skellam.digest());
        }
    }

    /// A Skellam round states its scale; the scale each round is given fits three standard
    /// deviations of the sum in the modulus and keeps λ in the sampler's exact range; the
    /// range clip plays no part (the sum wraps instead).
    #[test]
    fn a_skellam_round_states_a_scale_that_fits() {
        let mut cfg = dp_round(0.01);
        cfg.modulus_bits = 20;
        cfg.dp = Some(crate::dp::DpParams { skellam: Some(crate::dp::SkellamNoise { scale: None, beta: crate::dp::default_beta() }), ..cfg.dp.unwrap() });
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("dp.skellam.scale is missing"), "{err}");
        let fits = cfg.skellam_scale().unwrap();
        let dp = cfg.dp.unwrap();
        let local = dp.client_noise_std(7);
        // 3σ of the sum of 10 inputs (the signal at its worst, all on one coordinate, and
        // the noise) fills 2^20; with a rotation the signal is spread over the coordinates.
        let spread = 3.0 * (10.0f64 * 10.0 * 0.25 + 10.0 * local * local).sqrt() * fits;
        assert!((2.0 * spread / 2f64.powi(20) - 1.0).abs() < 1e-3, "{spread}");
        let mut rotated = cfg.clone();
        rotated.compression = Some(crate::compress::Compression { keep: None, rotation_block: Some(1024) });
        let flat = rotated.skellam_scale().unwrap();
        let spread = 3.0 * (10.0f64 * 10.0 * 0.25 / rotated.encoded_len() as f64 + 10.0 * local * local).sqrt() * flat;
        assert!((2.0 * spread / 2f64.powi(20) - 1.0).abs() < 1e-3 && flat > fits, "{spread}");
        let with = |scale: f64| {
            let mut c = cfg.clone();
            c.dp = Some(crate::dp::DpParams { skellam: Some(crate::dp::SkellamNoise { scale: Some(scale), beta: 0.5 }), ..dp });
            c
        };
        with(fits).validate().unwrap();
        with(fits / 1.9).validate().unwrap();
        assert!(with(fits / 2.1).validate().unwrap_err().to_string().contains("below half"));
        let err = with(fits * 1.01).validate().unwrap_err().to_string();
        assert!(err.contains("fits in 2^20 without wrapping"), "{err}");
        // At 32 bits, rotated, the cap on λ binds: a share's λ = (σ·scale)²/2 stays within 2^50.
        let mut wide = rotated.clone();
        wide.modulus_bits = 32;
        let capped = wide.skellam_scale().unwrap();
        assert!(((local * capped).powi(2) / 2.0 / crate::skellam::MAX_LAMBDA - 1.0).abs() < 1e-9);
        let mut over = wide.clone();
        over.dp = Some(crate::dp::DpParams { skellam: Some(crate::dp::SkellamNoise { scale: Some(capped * 1.01), beta: 0.5 }), ..dp });
        assert!(over.validate().unwrap_err().to_string().contains("sampler's exact range"));
        // Calibration: z for a target over rounds, each round given the scale that fits at z.
        let z = cfg.calibrate_noise_multiplier(8.0, 10).unwrap();
        let spent = |z: f64| {
            let mut c = cfg.clone();
            c.dp = Some(crate::dp::DpParams { noise_multiplier: z, ..dp });
            let scale = c.skellam_scale().unwrap();
            c.dp = Some(crate::dp::DpParams {
                noise_multiplier: z,
                skellam: Some(crate::dp::SkellamNoise { scale: Some(scale), beta: crate::dp::default_beta() }),
                ..dp
            });
            c.validate().unwrap();
            crate::dp::epsilon_of(&[(c.dp_mechanism(crate::dp::Against::Coalition).unwrap(), 10)], 1e-5)
        };
        assert!(spent(z) <= 8.0 && spent(z * 0.995) > 8.0, "z = {z}: ε {} and {}", spent(z), spent(z * 0.995));
        assert!(z > crate::dp::noise_multiplier_for(8.0, 10, 1e-5).unwrap(), "20 bits of rounding cost a little noise");
        // Too few bits for 3σ of the rounding of ten shares, at any scale.
        let mut narrow = cfg.clone();
        narrow.modulus_bits = 3;
        assert!(narrow.skellam_scale().is_err());
    }

    fn dp_round(clip: f32) -> RoundConfig {
        let mut cfg = RoundConfig::with_defaults(1, roster(10), 1000, [7; 32]);
        cfg.min_survivors = 7;
        cfg.max_weight = 1;
        cfg.clip = clip;
        cfg.dp = Some(crate::dp::DpParams { noise_multiplier: 1.1, l2_clip: 0.5, delta: 1e-5, epsilon_budget: 10.0, colluders: 1, skellam: None });
        cfg
    }

    /// The README's example before this check: z = 1.1, C = 0.5, t = 7 and the default
    /// clip of 1.0, which clamps about one coordinate per client per million.
    #[test]
    fn a_dp_round_needs_a_range_clip_above_the_noise() {
        let dp = dp_round(1.0).dp.unwrap();
        let need = dp.min_range_clip(7);
        // σ = 1.1 · 0.5 / √6 ≈ 0.2245, so C + 6σ ≈ 1.847.
        assert!((need - (0.5 + 6.0 * 0.55 / 6f64.sqrt())).abs() < 1e-12, "{need}");
        let err = dp_round(1.0).validate().unwrap_err().to_string();
        assert!(err.contains("clip = 1") && err.contains("dp.l2_clip + 6σ") && err.contains(&format!("{need:.6}")), "{err}");
        dp_round(need as f32 + 1e-3).validate().unwrap();
        // Without DP any positive clip is the operator's choice.
        let mut plain = dp_round(1.0);
        plain.dp = None;
        plain.validate().unwrap();
    }

    #[test]
    fn colluders_must_leave_an_honest_input() {
        let mut cfg = dp_round(3.0);
        cfg.dp = Some(crate::dp::DpParams { colluders: 7, ..cfg.dp.unwrap() });
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("colluders = 7") && err.contains("min_survivors = 7"), "{err}");
        cfg.dp = Some(crate::dp::DpParams { colluders: 6, ..cfg.dp.unwrap() });
        // With f = 6 one honest share must carry all the noise: σ = z·C, C + 6σ = 3.8.
        assert!(cfg.validate().unwrap_err().to_string().contains("clip = 3"));
        cfg.clip = 3.9;
        cfg.validate().unwrap();
    }
}
