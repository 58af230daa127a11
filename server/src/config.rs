//! The server's configuration file (TOML), edited by the operator. Institutions are
//! admitted by listing their Ed25519 public keys here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tessera_attestation::policy::NodePolicy;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Where the TLS certificate, sealed blobs and (by default) the database live.
    pub data_dir: PathBuf,
    /// Where the rounds, events and log are kept: unset for SQLite in `data_dir`
    /// (`tessera.db`), or a PostgreSQL URL (`postgres://USER:PASSWORD@HOST:5432/DB`; the
    /// database must exist, the tables are created). Either way a client hears 2xx only
    /// after its message and the log entries it caused are committed together.
    #[serde(default)]
    pub store: Option<String>,
    /// Bearer token for the admin endpoints (opening rounds).
    pub admin_token: String,
    /// INSECURE developer mode: simulated attestation and a sealing key in a file.
    #[serde(default)]
    pub dev_insecure: bool,
    /// The confidential VM's attestation and sealing (used whenever `dev_insecure` is
    /// false; the defaults suit an SEV-SNP guest).
    #[serde(default)]
    pub tee: Option<TeeConfig>,
    #[serde(default)]
    pub node_policy: NodePolicy,
    #[serde(default)]
    pub rounds: RoundSchedule,
    #[serde(default)]
    pub institutions: Vec<Institution>,
    /// Who may read reports and the log, and with which role (bearer tokens or mTLS).
    #[serde(default)]
    pub access: Vec<crate::auth::AccessGrant>,
    /// How often the TLS certificate is re-issued with fresh evidence (seconds). Keep it
    /// well below the `max_age_secs` of the institutions' policies (default 3600), and
    /// below the lifetime of any collateral sent with the evidence.
    #[serde(default = "default_certificate_refresh_secs")]
    pub certificate_refresh_secs: u64,
    /// The federation's privacy budget (`[privacy] epsilon = 8.0, delta = 1e-5`). Fixed
    /// inside the enclave when the federation is created (the first start with an empty
    /// log) and sealed: every round must then carry DP with exactly this ε and δ, and
    /// the enclave refuses to open one that would spend past it. Changing it here later
    /// has no effect (the server warns).
    #[serde(default)]
    pub privacy: Option<tessera_enclave::FederationBudget>,
    /// Connection and request limits against slow or abundant unauthenticated peers.
    #[serde(default)]
    pub limits: Limits,
    /// Threads the unmasking uses (default: every core of the machine).
    #[serde(default)]
    pub threads: Option<usize>,
}

/// What one peer can hold of the server before it has proved anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open connections at most; further ones are closed at once, before the handshake.
    pub max_connections: usize,
    /// A request's headers must arrive within this (ms), or the connection is closed.
    pub header_read_timeout_ms: u64,
    /// A request body must arrive within this (ms) plus 1 s per 64 KiB of its declared
    /// length (or of its size limit, without a Content-Length), or it is refused with 408.
    pub body_read_timeout_ms: u64,
    /// Masked-input uploads received at once (spooled, checked, or waiting for the
    /// round's lock); further ones wait up to 30 s, then get 503 `uploads_busy`, which
    /// clients retry. Each holds about 0.4 MB of buffers while it arrives, and a spool
    /// file up to the round's input size. A peer sending at the slowest rate the body
    /// timeout allows holds one for minutes: raise this where many institutions upload
    /// over slow links.
    pub uploads_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_connections: 1024, header_read_timeout_ms: 10_000, body_read_timeout_ms: 30_000, uploads_in_flight: DEFAULT_UPLOADS_IN_FLIGHT }
    }
}

/// See [`Limits::uploads_in_flight`].
pub const DEFAULT_UPLOADS_IN_FLIGHT: usize = 16;

impl Limits {
    /// The time allowed for a body of `len` bytes.
    pub fn body_timeout(&self, len: usize) -> std::time::Duration {
        std::time::Duration::from_millis(self.body_read_timeout_ms) + std::time::Duration::from_secs((len / (64 * 1024)) as u64)
    }
}

pub const DEFAULT_CERTIFICATE_REFRESH_SECS: u64 = 600;

fn default_certificate_refresh_secs() -> u64 {
    DEFAULT_CERTIFICATE_REFRESH_SECS
}

/// Where the aggregator's evidence and sealing key come from inside a confidential VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TeeConfig {
    /// The kernel's configfs-tsm report directory (SEV-SNP and TDX guests).
    pub configfs_tsm: PathBuf,
    pub sealing: SealingSource,
    /// The SEV-SNP guest device, for `sealing = "snp-derived-key"`.
    pub sev_guest_device: PathBuf,
    /// The VMPL mixed into the SNP derived key: the guest's own VMPL or higher (0 for a
    /// guest without an SVSM).
    pub snp_vmpl: u32,
    /// For `sealing = "provisioned"`: the key file (32 bytes, or 64 hex digits, mode
    /// 0600) that the operator's key broker writes into guest memory (a tmpfs) after it
    /// has verified this guest's evidence.
    pub sealing_key_file: Option<PathBuf>,
    /// Files sent with the evidence for verifiers: on SEV-SNP when the host gives no
    /// certificate table, the VCEK (DER) and ASK/ARK (PEM) from AMD's KDS; on TDX, the
    /// DCAP collateral JSON from Intel's PCS (refresh it before it expires; it is read
    /// at each attestation).
    pub endorsements: Vec<PathBuf>,
}

impl Default for TeeConfig {
    fn default() -> Self {
        TeeConfig {
            configfs_tsm: PathBuf::from(tessera_enclave::tsm::DEFAULT_ROOT),
            sealing: SealingSource::Auto,
            sev_guest_device: PathBuf::from(tessera_enclave::sev_guest::DEFAULT_DEVICE),
            snp_vmpl: 0,
            sealing_key_file: None,
            endorsements: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SealingSource {
    /// The SNP derived key on an SEV-SNP guest; a TDX guest must name `provisioned`.
    #[default]
    Auto,
    /// `SNP_GET_DERIVED_KEY`, bound to the launch measurement, guest policy and chip.
    SnpDerivedKey,
    /// A key released into the guest by the operator's key broker.
    Provisioned,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Institution {
    pub name: String,
    /// Ed25519 public key, hex (printed by `tessera-client init`).
    pub public_key: String,
}

/// Parameters of rounds the server opens by itself, one after the other.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoundSchedule {
    /// Open rounds automatically (otherwise an admin opens them with POST /v1/rounds).
    pub auto_open: bool,
    /// How many rounds to run; 0 means no limit.
    pub count: u64,
    /// `synchronous` (default): every round waits for its roster. `buffered`: each round
    /// is a cohort of `[rounds.params.cohort]`, which must then be given.
    pub mode: RoundMode,
    pub params: RoundParams,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoundMode {
    #[default]
    Synchronous,
    /// Buffered asynchronous cohorts (FedBuff under secure aggregation).
    Buffered,
}

/// What an admin chooses when opening a round; the rest is derived (round number,
/// roster, graph seed, defaults for k and thresholds).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoundParams {
    pub vector_len: u32,
    pub layout: Vec<tessera_secagg::config::TensorSpec>,
    pub clip: f32,
    pub max_weight: u32,
    pub phase_timeout_ms: u64,
    /// How long key advertisement waits (institutions that train after a round opens
    /// need longer than the other phases); 0: phase_timeout_ms.
    pub advertise_timeout_ms: u64,
    /// 0 picks the default (two thirds of the participants).
    pub min_survivors: u32,
    /// 0 picks the default from the SecAgg+ analysis.
    pub neighbours: u32,
    /// Institution names; empty means all configured institutions.
    pub participants: Vec<String>,
    /// Distributed DP for every round opened with these parameters (needs max_weight = 1).
    /// The server refuses to open a round that would take the federation's ε past the budget.
    pub dp: Option<tessera_secagg::dp::DpParams>,
    /// Arithmetic modulo 2^modulus_bits (8 to 32, default 32); below 32 each element of a
    /// masked update travels as modulus_bits bits (packed), so this sets the bytes per
    /// parameter on the wire. Each institution's levels are 2^modulus_bits / n.
    pub modulus_bits: u8,
    /// Compression that survives masking (shared random-k, Hadamard rotation); none by default.
    pub compression: Option<CompressionParams>,
    /// Buffered asynchronous rounds: each round is a cohort that goes on with the first
    /// `size` institutions ready and weighs stale updates down; none (synchronous) by default.
    pub cohort: Option<CohortParams>,
}

/// `[rounds.params.cohort]`: buffered asynchronous rounds (FedBuff). Each round is a
/// cohort among the first `size` institutions that advertise; an update names the global
/// version it was trained from and is weighed by (1 + τ)^-staleness_exponent.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CohortParams {
    /// K: the cohort goes on once this many institutions advertised, and closes its input
    /// phase at K masked updates.
    pub size: u32,
    /// Updates trained more than this many releases ago are refused.
    #[serde(default = "default_max_staleness")]
    pub max_staleness: u32,
    /// a in the staleness weight (1 + τ)^-a; FedBuff's polynomial weighting uses 0.5.
    #[serde(default = "default_staleness_exponent")]
    pub staleness_exponent: f64,
}

fn default_max_staleness() -> u32 {
    4
}

fn default_staleness_exponent() -> f64 {
    0.5
}

/// `[rounds.params.compression]`: the encoding every institution applies before masking.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionParams {
    /// Shared random-k: the fraction of coordinates sent each round (0 < f ≤ 1), the same
    /// public random subset for every institution; the rest stays in each institution's
    /// error-feedback residual.
    #[serde(default)]
    pub keep_fraction: Option<f64>,
    /// Randomized Hadamard rotation before quantization, in blocks of this many
    /// coordinates (a power of two, e.g. 4096); lets fewer modulus_bits lose little.
    #[serde(default)]
    pub rotation_block: Option<u32>,
}

impl CompressionParams {
    /// The round's [`tessera_secagg::compress::Compression`] for an update of `vector_len` values.
    pub fn for_vector(&self, vector_len: u32) -> Result<tessera_secagg::compress::Compression, String> {
        let keep = match self.keep_fraction {
            None => None,
            Some(f) if f.is_finite() && f > 0.0 && f <= 1.0 => Some(((f * f64::from(vector_len)).ceil() as u32).clamp(1, vector_len.max(1))),
            Some(f) => return Err(format!("compression.keep_fraction must be in (0, 1], got {f}")),
        };
        Ok(tessera_secagg::compress::Compression { keep, rotation_block: self.rotation_block })
    }
}

impl Default for RoundParams {
    fn default() -> Self {
        RoundParams {
            vector_len: 0,
            layout: Vec::new(),
            clip: 1.0,
            max_weight: 1 << 16,
            phase_timeout_ms: 30_000,
            advertise_timeout_ms: 0,
            min_survivors: 0,
            neighbours: 0,
            participants: Vec::new(),
            dp: None,
            modulus_bits: 32,
            compression: None,
            cohort: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid configuration in {path}: {source}")]
    Parse { path: String, source: toml::de::Error },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let mut cfg: ServerConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.display().to_string(), source })?;
        if cfg.data_dir.is_relative() {
            if let Some(dir) = path.parent() {
                cfg.data_dir = dir.join(&cfg.data_dir);
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.admin_token.len() < 16 {
            return Err(ConfigError::Invalid("admin_token must be at least 16 characters".into()));
        }
        if let Some(url) = &self.store {
            if crate::store::Backend::of(url).is_none() {
                return Err(ConfigError::Invalid(format!("store must be a postgres://… URL or sqlite://PATH, got {}", crate::store::redact(url))));
            }
            let lower = url.to_ascii_lowercase();
            if ["sslmode=require", "sslmode=verify-ca", "sslmode=verify-full"].iter().any(|m| lower.contains(m)) {
                return Err(ConfigError::Invalid(
                    "store: this build speaks to PostgreSQL without TLS, so an sslmode that requires it cannot be met; reach the database over loopback, a private network or a tunnel, and remove sslmode".into(),
                ));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        let mut keys = std::collections::BTreeMap::new();
        for inst in &self.institutions {
            if !names.insert(&inst.name) {
                return Err(ConfigError::Invalid(format!("institution {} is listed twice", inst.name)));
            }
            if let Some(other) = keys.insert(inst.public_key.to_ascii_lowercase(), &inst.name) {
                return Err(ConfigError::Invalid(format!("institutions {other} and {} have the same public_key; each needs its own identity", inst.name)));
            }
            let ok = hex::decode(&inst.public_key).map(|k| k.len() == 32).unwrap_or(false);
            if !ok {
                return Err(ConfigError::Invalid(format!("institution {}: public_key must be 32 bytes of hex", inst.name)));
            }
        }
        crate::auth::validate(self).map_err(ConfigError::Invalid)?;
        if self.dev_insecure && self.tee.is_some() {
            return Err(ConfigError::Invalid("dev_insecure = true uses SIMULATED attestation; a [tee] section would be ignored, so remove one of them".into()));
        }
        if let Some(tee) = &self.tee {
            if (tee.sealing == SealingSource::Provisioned) != tee.sealing_key_file.is_some() {
                return Err(ConfigError::Invalid("tee.sealing_key_file is needed with tee.sealing = \"provisioned\", and only then".into()));
            }
            if tee.snp_vmpl > 3 {
                return Err(ConfigError::Invalid(format!("tee.snp_vmpl is {}; VMPLs are 0 to 3", tee.snp_vmpl)));
            }
        }
        self.node_policy.validate().map_err(|e| ConfigError::Invalid(format!("node_policy: {e}")))?;
        match (self.rounds.mode, &self.rounds.params.cohort) {
            (RoundMode::Buffered, None) => {
                return Err(ConfigError::Invalid(
                    "rounds.mode = \"buffered\" needs [rounds.params.cohort] with its size K (the institutions a cohort goes on with)".into(),
                ))
            }
            (RoundMode::Synchronous, Some(_)) => {
                return Err(ConfigError::Invalid("[rounds.params.cohort] is for buffered rounds: set rounds.mode = \"buffered\", or remove it".into()))
            }
            _ => {}
        }
        if self.certificate_refresh_secs == 0 {
            return Err(ConfigError::Invalid("certificate_refresh_secs must be at least 1".into()));
        }
        if self.node_policy.allow_insecure_dev && !self.dev_insecure {
            return Err(ConfigError::Invalid("node_policy.allow_insecure_dev requires dev_insecure = true".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(rounds: &str) -> Result<ServerConfig, String> {
        let text = format!("listen = \"127.0.0.1:0\"\ndata_dir = \"d\"\nadmin_token = \"0123456789abcdef0123\"\ndev_insecure = true\n{rounds}");
        let cfg: ServerConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    #[test]
    fn the_round_mode_and_the_cohort_go_together() {
        let err = parse("[rounds]\nmode = \"buffered\"\n[rounds.params]\nvector_len = 4\n").unwrap_err();
        assert!(err.contains("needs [rounds.params.cohort]"), "{err}");
        let err = parse("[rounds.params]\nvector_len = 4\n[rounds.params.cohort]\nsize = 3\n").unwrap_err();
        assert!(err.contains("set rounds.mode = \"buffered\""), "{err}");
        let cfg = parse("[rounds]\nmode = \"buffered\"\n[rounds.params]\nvector_len = 4\n[rounds.params.cohort]\nsize = 3\n").unwrap();
        assert_eq!(cfg.rounds.mode, RoundMode::Buffered);
        let c = cfg.rounds.params.cohort.unwrap();
        assert_eq!((c.size, c.max_staleness, c.staleness_exponent), (3, 4, 0.5), "defaults: staleness at most 4, FedBuff's exponent 0.5");
        assert!(parse("[rounds]\nmode = \"eventually\"\n").unwrap_err().contains("unknown variant"));
        assert_eq!(parse("").unwrap().rounds.mode, RoundMode::Synchronous);
    }

    #[test]
    fn compression_fractions_are_checked() {
        let c = CompressionParams { keep_fraction: Some(0.1), rotation_block: Some(64) }.for_vector(1000).unwrap();
        assert_eq!((c.keep, c.rotation_block), (Some(100), Some(64)));
        assert_eq!(CompressionParams { keep_fraction: Some(1e-9), rotation_block: None }.for_vector(1000).unwrap().keep, Some(1));
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            let err = CompressionParams { keep_fraction: Some(bad), rotation_block: None }.for_vector(1000).unwrap_err();
            assert!(err.contains("keep_fraction must be in (0, 1]"), "{err}");
        }
    }

    #[test]
    fn store_urls_are_checked() {
        let err = parse("store = \"mysql://u@h/db\"\n").unwrap_err();
        assert!(err.contains("store must be a postgres://"), "{err}");
        let err = parse("store = \"postgres://u:secret@h/db?sslmode=require\"\n").unwrap_err();
        assert!(err.contains("without TLS") && !err.contains("secret"), "{err}");
        parse("store = \"postgres://u@127.0.0.1:5432/db\"\n").unwrap();
    }

    #[test]
    fn two_institutions_with_one_key_are_refused() {
        let key = "ab".repeat(32);
        let roster =
            format!("[[institutions]]\nname = \"a\"\npublic_key = \"{key}\"\n[[institutions]]\nname = \"b\"\npublic_key = \"{}\"\n", key.to_uppercase());
        let err = parse(&roster).unwrap_err();
        assert!(err.contains("institutions a and b have the same public_key"), "{err}");
    }
}
