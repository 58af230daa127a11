//! The host side of a round: owns the enclave and the store, and keeps them in step.
//!
//! One lock covers "the enclave accepts a message" and "the store appends it", so the
//! stored order is the order the enclave saw, and a sealed phase record is always stored
//! after the messages it closed over. A client hears 2xx only after its message is on
//! disk; if the append fails the round is rebuilt from the store, so the enclave never
//! holds a message the store lacks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use serde::Serialize;
use tessera_attestation::dev::DevAttester;
use tessera_attestation::policy::Verdict;
use tessera_attestation::Attester;
use tessera_enclave::{Enclave, EnclaveError, MessageKind, SealingKey};
use tessera_secagg::aggregator::{Outcome, Phase};
use tessera_secagg::dp::{Against, Mechanism};
use tessera_secagg::wire::*;
use tessera_secagg::{ClientId, RoundConfig, Timestamp};
use tokio::sync::Mutex;

use crate::config::{RoundParams, SealingSource, ServerConfig, TeeConfig};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::store::{Commit, Finish, Store, StoreError};
use tessera_enclave::spool::SpooledInput;

pub fn now() -> Timestamp {
    Timestamp(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0))
}

/// Refusals waiting to be written to the denial log.
pub const DENIAL_QUEUE: usize = 1024;
/// Denials kept in the store, of authenticated and of unauthenticated callers each;
/// older ones are pruned.
pub const DENIALS_KEPT: u64 = 100_000;
/// Unauthenticated refusals listed one by one per minute; the rest are counted.
pub const ANONYMOUS_DENIALS_PER_MINUTE: u64 = 100;

fn spawn_denial_writer(store: Store) -> tokio::sync::mpsc::Sender<crate::store::Denial> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<crate::store::Denial>(DENIAL_QUEUE);
    tokio::spawn(async move {
        let mut written = 0u64;
        while let Some(d) = rx.recv().await {
            if let Err(e) = store.record_denial(&d).await {
                tracing::error!(error = %e, "could not record a denial");
            }
            written += 1;
            if written.is_multiple_of(1000) {
                if let Err(e) = store.prune_denials(DENIALS_KEPT).await {
                    tracing::error!(error = %e, "could not prune the denial log");
                }
            }
        }
    });
    tx
}

/// Per-verifier evidence requests served at once (`GET /v1/attestation?nonce=`).
pub const FRESH_EVIDENCE_CONCURRENCY: usize = 4;

/// Pause between one scheduled round ending and the next opening.
const ROUND_GAP: Duration = Duration::from_secs(2);

struct Inner {
    enclave: Enclave,
    current: Option<Current>,
    /// A rebuild from the store failed: the enclave's round was discarded (it may have
    /// held a message the store lacks) and every request that needs it tries the rebuild
    /// again first ([`Service::lock_in_step`]).
    out_of_step: bool,
}

struct Current {
    /// Shared with the requests that check messages before the round's lock, with its
    /// digest computed once.
    cfg: Arc<RoundConfig>,
    digest: [u8; 32],
    opened_at: Timestamp,
    finished_at: Option<Timestamp>,
    /// Refused admissions read back from the log after the round was rebuilt: a replay
    /// feeds only the stored (accepted) messages, so the enclave's verdicts lack them.
    refused: Vec<AdmissionRecord>,
}

impl Current {
    fn new(cfg: RoundConfig, opened_at: Timestamp, finished_at: Option<Timestamp>) -> Self {
        Current { digest: cfg.digest(), cfg: Arc::new(cfg), opened_at, finished_at, refused: Vec::new() }
    }
}

/// The refused admissions among a round's stored log entries, as the round status
/// shows them (the latest refusal of each client).
fn refused_admissions(stored: &[tessera_enclave::StoredLogEntry]) -> Vec<AdmissionRecord> {
    use tessera_attestation::audit::{LogEntry, LogEvent};
    let mut refused = BTreeMap::new();
    for e in stored {
        if let Ok(LogEntry { event: LogEvent::Admission { client, accepted: false, failures, .. }, .. }) = LogEntry::parse(&e.data) {
            refused.insert(client, AdmissionRecord { client: ClientId(client), accepted: false, reasons: failures.join("; ") });
        }
    }
    refused.into_values().collect()
}

pub struct Service {
    inner: Mutex<Inner>,
    store: Store,
    cfg: ServerConfig,
    identity: [u8; 32],
    tls_fingerprint: [u8; 32],
    /// The evidence in the current TLS certificate (refreshed periodically).
    evidence: std::sync::Mutex<Vec<u8>>,
    pub metrics: Arc<Metrics>,
    authenticator: Arc<crate::auth::Authenticator>,
    /// The format of the enclave's evidence.
    format: tessera_attestation::Format,
    evidence_maker: tessera_enclave::EvidenceMaker,
    attest_permits: tokio::sync::Semaphore,
    /// One spooled masked input's signature is checked at a time, on every core: the
    /// check is CPU-bound, so more at once would not finish sooner, and each holds a
    /// batch of digest leaves (a few MiB), which would otherwise grow with the uploads
    /// in flight.
    preverify_permit: Arc<tokio::sync::Semaphore>,
    /// See [`Service::upload_permit`].
    uploads: Arc<tokio::sync::Semaphore>,
    denials: tokio::sync::mpsc::Sender<crate::store::Denial>,
    denials_dropped: std::sync::atomic::AtomicU64,
    /// Unauthenticated refusals in the current minute: (minute, listed, counted only).
    anonymous_denials: std::sync::Mutex<(u64, u64, u64)>,
    last_schedule_error: Mutex<Option<String>>,
    /// See [`Service::result`]: the latest finished round read, its release and mean.
    last_result: Mutex<Option<(u64, bytes::Bytes, bytes::Bytes)>>,
    /// Bumped whenever the round's state changes in a way a waiting reader may care
    /// about (a round opened, a phase closed, a round ended): long-polls park on it.
    changes: tokio::sync::watch::Sender<u64>,
    /// Institution names by lower-case roster key: a lookup per key, not a scan of the
    /// roster (a status read names every participant; at n = 1,000 the scans cost 10 ms).
    names_by_key: std::collections::HashMap<String, String>,
    /// PRV floors of record-level claims, computed once per history for `/v1/privacy`.
    privacy_floors: FloorCache,
}

/// The longest a client may park a request waiting for a phase (`?wait=SECONDS`).
pub const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("identity", &hex::encode(self.identity)).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Enclave(#[from] EnclaveError),
    #[error("{0}")]
    Setup(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::internal(e)
    }
}

/// Where the enclave's evidence and sealing key come from.
pub struct TeeBackend {
    pub attester: Box<dyn Attester>,
    pub sealing: SealingKey,
}

impl std::fmt::Debug for TeeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TeeBackend {{ format: {}, sealing: {:?} }}", self.attester.format(), self.sealing)
    }
}

impl TeeBackend {
    /// Dev mode: simulated evidence and a key file (both INSECURE). Otherwise evidence from
    /// configfs-tsm and the sealing key `[tee]` names; anything missing stops the start
    /// with the reason, never a fallback to dev mode.
    pub fn from_config(cfg: &ServerConfig) -> Result<Self, StartError> {
        let setup = |e: String| StartError::Setup(e);
        if cfg.dev_insecure {
            tracing::warn!("INSECURE DEV MODE: simulated attestation, sealing key stored in a file; not for production");
            let sealing = SealingKey::load_or_create_dev(&cfg.data_dir.join("dev-sealing.key")).map_err(|e| setup(e.to_string()))?;
            let measurement = std::env::current_exe()
                .and_then(|exe| tessera_attestation::dev::measure_file(&exe))
                .map_err(|e| setup(format!("cannot measure own executable: {e}")))?;
            let mut seed = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
            let attester = Box::new(DevAttester::new(seed, measurement, false));
            return Ok(TeeBackend { attester, sealing });
        }
        let tee = cfg.tee.clone().unwrap_or_default();
        let attester = tessera_enclave::tsm::TsmAttester::open(&tee.configfs_tsm).map_err(|e| {
            setup(format!(
                "{e}. The server needs a confidential VM (SEV-SNP or TDX) with configfs-tsm; on a developer machine set \
                 dev_insecure = true for SIMULATED attestation (INSECURE)"
            ))
        })?;
        let attester = attester.with_endorsement_files(tee.endorsements.clone());
        let sealing = Self::sealing_key(&tee, attester.format())?;
        Ok(TeeBackend { attester: Box::new(attester), sealing })
    }

    /// [`TeeBackend::from_config`] on a blocking thread: configfs-tsm and the key
    /// request are kernel calls, kept off the async workers.
    pub async fn from_config_off_workers(cfg: &ServerConfig) -> Result<Self, StartError> {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || TeeBackend::from_config(&cfg)).await.map_err(|e| StartError::Setup(format!("starting the TEE backend: {e}")))?
    }

    /// The sealing key for a guest whose evidence is `format`.
    pub fn sealing_key(tee: &TeeConfig, format: tessera_attestation::Format) -> Result<SealingKey, StartError> {
        use tessera_attestation::Format;
        let setup = |e: String| StartError::Setup(e);
        match (tee.sealing, format) {
            (SealingSource::Provisioned, _) => {
                let path = tee.sealing_key_file.as_deref().ok_or_else(|| setup("tee.sealing = \"provisioned\" needs tee.sealing_key_file".into()))?;
                SealingKey::from_provisioned_file(path).map_err(|e| setup(e.to_string()))
            }
            (SealingSource::Auto | SealingSource::SnpDerivedKey, Format::SevSnp) => {
                let device = tessera_enclave::sev_guest::SevGuestDevice::open(&tee.sev_guest_device).map_err(|e| setup(e.to_string()))?;
                tessera_enclave::sev_guest::derive_sealing_key(&device, tee.snp_vmpl).map_err(|e| setup(e.to_string()))
            }
            (SealingSource::SnpDerivedKey, other) => {
                Err(setup(format!("tee.sealing = \"snp-derived-key\" needs an SEV-SNP guest, but configfs-tsm gives {other} evidence")))
            }
            (SealingSource::Auto, other) => Err(setup(format!(
                "{other} has no firmware sealing key: set tee.sealing = \"provisioned\" and tee.sealing_key_file to the key your key broker \
                 releases into guest memory after verifying this guest's evidence"
            ))),
        }
    }
}

/// What the server tells anyone about its enclave.
#[derive(Clone, Debug, Serialize)]
pub struct AttestationInfo {
    pub format: String,
    pub insecure: bool,
    pub identity_public_key: String,
    pub tls_fingerprint: String,
    pub evidence: String,
    /// With `?nonce=`: the verifier's nonce and evidence made for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fresh_evidence: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RoundStatus {
    pub round: u64,
    pub phase: Phase,
    pub config: RoundConfig,
    /// The enclave's signature over the configuration (hex), for the open round: clients
    /// check it against the attested identity key before they advertise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_signature: Option<String>,
    pub participants: Vec<String>,
    pub waiting_for: Vec<ClientId>,
    pub outcome: Option<String>,
    pub admission: Vec<AdmissionRecord>,
    /// The server's schedule opens no round after this one (`[rounds] count` reached).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub last_scheduled: bool,
}

/// The federation's privacy accounting (GET /v1/privacy).
#[derive(Clone, Debug, Serialize)]
pub struct PrivacyReport {
    /// The DP parameters of the round schedule, if any.
    pub params: Option<tessera_secagg::dp::DpParams>,
    pub rounds_released: u64,
    /// The neighbouring relation every ε here is stated under (`zero-out`), and what it means.
    pub adjacency: &'static str,
    pub adjacency_explained: &'static str,
    /// Cumulative ε over every released DP round, at `delta`, against a coalition of
    /// each round's `colluders` participants (the figure the budget is charged).
    pub epsilon_spent: f64,
    /// The same against an outsider, who knows no institution's noise share.
    pub epsilon_outsider_spent: f64,
    pub delta: Option<f64>,
    /// Further rounds the schedule's budget allows.
    pub rounds_remaining: Option<u64>,
    pub per_round: Vec<RoundPrivacy>,
    /// Per institution on a round's roster: its institution-level ε and the record-level
    /// DP it signed with its masked inputs, as the log records them.
    pub institutions: Vec<InstitutionPrivacy>,
    #[serde(skip)]
    pub groups: Vec<(Mechanism, u64)>,
}

/// One institution's two guarantees (GET /v1/privacy, `institutions`).
#[derive(Clone, Debug, Serialize)]
pub struct InstitutionPrivacy {
    pub institution: String,
    /// Roster key, hex.
    pub identity: String,
    /// Institution-level ε over the released DP rounds it was included in (the noise on
    /// the sum), from the latest such release.
    pub epsilon: Option<f64>,
    /// The record-level DP of its latest masked input that stated one.
    pub record: Option<RecordPrivacyView>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RecordPrivacyView {
    /// ε of any one of its records over every local DP-SGD run so far, at `delta`.
    pub epsilon: f64,
    pub delta: f64,
    pub budget: f64,
    pub round: u64,
    /// `measured` or `claimed` ([`tessera_attestation::audit::RecordPrivacySource`]).
    pub source: tessera_attestation::audit::RecordPrivacySource,
    pub source_explained: &'static str,
    /// Rounds whose masked input carried a record-level claim.
    pub rounds: Vec<u64>,
    /// The claims are consistent across rounds: ε never decreases, and the latest is at
    /// least what the logged runs compose to (a lower bound: runs whose input never
    /// reached the aggregator are not in the log).
    pub consistent: bool,
    pub inconsistency: Option<String>,
    /// ε the logged runs compose to at `delta`, the lower bound above: RDP's, or where the
    /// latest claim is below that (an institution accounting with the PRV, as Opacus does
    /// by default), the PRV's lower bound, below which no sound accountant goes.
    pub epsilon_logged_runs: f64,
}

/// A round and the record-level claim an institution signed in it.
type RoundClaim = (u64, tessera_attestation::audit::RecordPrivacyRecord);

/// How many more rounds at `noise_multiplier` fit in `budget` after the releases in
/// `groups` (capped at [`MAX_ROUNDS_REMAINING`]). ε grows with every round, so the count
/// is found by doubling and bisection: about 35 accountings, not one per round.
fn rounds_within_budget(groups: &[(Mechanism, u64)], next: Mechanism, delta: f64, budget: f64) -> u64 {
    let fits = |extra: u64| {
        let mut g = groups.to_vec();
        g.push((next, extra));
        tessera_secagg::dp::epsilon_of(&g, delta) <= budget
    };
    if !fits(1) {
        return 0;
    }
    // fits(lo) holds, fits(hi) fails (or hi is past the cap).
    let (mut lo, mut hi) = (1u64, 2u64);
    while hi <= MAX_ROUNDS_REMAINING && fits(hi) {
        lo = hi;
        hi *= 2;
    }
    if hi > MAX_ROUNDS_REMAINING {
        if fits(MAX_ROUNDS_REMAINING) {
            return MAX_ROUNDS_REMAINING;
        }
        hi = MAX_ROUNDS_REMAINING;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The most rounds `/v1/privacy` counts as remaining.
const MAX_ROUNDS_REMAINING: u64 = 100_000;

/// PRV floors of record-level runs already computed, by their exact inputs (δ and each
/// run's σ, q and steps, bit for bit). A floor costs tens of milliseconds and
/// `/v1/privacy` needs one for each institution whose claim is below RDP's ε, on every
/// request; the runs of a finished round never change, so each history is computed
/// once. Keyed by the inputs themselves, so an entry can never be stale. Bounded: emptied
/// when it reaches [`FloorCache::CAPACITY`] entries (each 8·(1 + 3·runs) bytes of key: a
/// few megabytes for histories of tens of rounds).
#[derive(Debug, Default)]
pub(crate) struct FloorCache {
    floors: std::sync::Mutex<std::collections::HashMap<Vec<u64>, f64>>,
}

impl FloorCache {
    const CAPACITY: usize = 4096;

    /// `prv::epsilon_floor(runs, delta)`, from the cache where it was computed before;
    /// counts hits and misses in `metrics`.
    fn floor(&self, runs: &[tessera_secagg::rdp::SgmSteps], delta: f64, metrics: &Metrics) -> f64 {
        use std::sync::atomic::Ordering::Relaxed;
        let key: Vec<u64> =
            std::iter::once(delta.to_bits()).chain(runs.iter().flat_map(|r| [r.noise_multiplier.to_bits(), r.sample_rate.to_bits(), r.steps])).collect();
        if let Some(&eps) = self.floors.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            metrics.privacy_floor_hits.fetch_add(1, Relaxed);
            return eps;
        }
        metrics.privacy_floor_misses.fetch_add(1, Relaxed);
        // Computed outside the lock: two requests may both compute a new history once.
        let eps = tessera_secagg::prv::epsilon_floor(runs, delta);
        let mut floors = self.floors.lock().unwrap_or_else(|p| p.into_inner());
        if floors.len() >= Self::CAPACITY {
            floors.clear();
        }
        floors.insert(key, eps);
        eps
    }
}

/// Record-level claims of one institution, in round order: the view of the latest, and
/// whether they are consistent with one another. `floor` is the PRV's lower bound of a
/// history of runs at δ ([`FloorCache::floor`]).
fn record_view(claims: &[RoundClaim], floor: impl FnOnce(&[tessera_secagg::rdp::SgmSteps], f64) -> f64) -> Option<RecordPrivacyView> {
    let (round, last) = *claims.last()?;
    let mut inconsistency = None;
    for w in claims.windows(2) {
        let ((r0, a), (r1, b)) = (&w[0], &w[1]);
        if b.claim.epsilon < a.claim.epsilon * (1.0 - 1e-9) {
            inconsistency.get_or_insert(format!(
                "round {r1} claims ε = {:.4}, less than the {:.4} claimed in round {r0}: a ledger reset or rolled back",
                b.claim.epsilon, a.claim.epsilon
            ));
        }
        if b.claim.delta != a.claim.delta {
            inconsistency
                .get_or_insert(format!("round {r1} states δ = {:e}, round {r0} δ = {:e}: the figures are not comparable", b.claim.delta, a.claim.delta));
        }
    }
    let runs: Vec<tessera_secagg::rdp::SgmSteps> = claims
        .iter()
        .map(|(_, c)| tessera_secagg::rdp::SgmSteps { noise_multiplier: c.claim.noise_multiplier, sample_rate: c.claim.sample_rate, steps: c.claim.steps })
        .collect();
    // RDP first (cheap); a claim below it may still be a PRV account's, held to the
    // PRV's lower bound of the logged runs.
    let mut logged = tessera_secagg::rdp::epsilon(&runs, last.claim.delta);
    if last.claim.epsilon < logged * (1.0 - 1e-6) {
        logged = floor(&runs, last.claim.delta);
    }
    if last.claim.epsilon < logged * (1.0 - 1e-6) {
        inconsistency.get_or_insert(format!(
            "round {round} claims ε = {:.4}, less than the {logged:.4} its {} logged runs compose to",
            last.claim.epsilon,
            runs.len()
        ));
    }
    Some(RecordPrivacyView {
        epsilon: last.claim.epsilon,
        delta: last.claim.delta,
        budget: last.claim.budget,
        round,
        source: last.source,
        source_explained: last.source.explained(),
        rounds: claims.iter().map(|(r, _)| *r).collect(),
        consistent: inconsistency.is_none(),
        inconsistency,
        epsilon_logged_runs: logged,
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct RoundPrivacy {
    pub round: u64,
    pub noise_multiplier: f64,
    /// The colluding participants the round's noise is calibrated against.
    pub colluders: u32,
    /// `gaussian` (continuous shares, rounded) or `skellam` (integer shares, exact).
    pub noise: &'static str,
    pub epsilon_cumulative: f64,
    pub epsilon_outsider_cumulative: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct AdmissionRecord {
    pub client: ClientId,
    pub accepted: bool,
    pub reasons: String,
}

impl Service {
    /// Starts with the attestation and sealing backend the configuration names.
    pub async fn start(cfg: ServerConfig, tls_fingerprint: [u8; 32]) -> Result<Arc<Self>, StartError> {
        let backend = TeeBackend::from_config_off_workers(&cfg).await?;
        Self::start_with(cfg, tls_fingerprint, backend).await
    }

    /// Starts with the given backend (tests pass a fake configfs-tsm kernel here).
    pub async fn start_with(cfg: ServerConfig, tls_fingerprint: [u8; 32], backend: TeeBackend) -> Result<Arc<Self>, StartError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| StartError::Setup(format!("data dir {}: {e}", cfg.data_dir.display())))?;
        let spool = spool_dir(&cfg);
        std::fs::create_dir_all(&spool).map_err(|e| StartError::Setup(format!("spool dir {}: {e}", spool.display())))?;
        let store = match &cfg.store {
            Some(url) => Store::connect(url).await?,
            None => Store::open(&cfg.data_dir.join("tessera.db")).await?,
        };
        tracing::info!(store = %cfg.store.as_deref().map_or_else(|| "SQLite in the data directory".to_string(), crate::store::redact), "state store opened");
        let TeeBackend { attester, sealing } = backend;
        let format = attester.format();
        if format.is_insecure() != cfg.dev_insecure || (sealing.is_insecure() && !cfg.dev_insecure) {
            return Err(StartError::Setup(format!(
                "{format} evidence with a {} sealing key does not match dev_insecure = {}",
                if sealing.is_insecure() { "dev" } else { "hardware" },
                cfg.dev_insecure
            )));
        }
        tracing::info!(%format, sealing = if sealing.is_insecure() { "dev key file (INSECURE)" } else { "hardware or provisioned" }, "enclave backend");
        if let Some(warning) = cfg.node_policy.extra_roots_warning() {
            tracing::warn!("node_policy: {warning}");
        }
        let sealed_identity = store.get_kv("enclave_identity").await?;
        let (mut enclave, sealed) = Enclave::start(sealing, sealed_identity.as_deref(), attester, cfg.node_policy.clone()).map_err(|e| match e {
            EnclaveError::Unseal(what) => StartError::Setup(format!(
                "the stored {what} does not unseal under this enclave's sealing key: sealed by another measurement (an upgraded \
                 aggregator), on another chip, under another key file, or altered. Start this version with a new data_dir, or \
                 restore the key it was sealed under"
            )),
            other => other.into(),
        })?;
        store.put_kv("enclave_identity", &sealed).await?;
        if let Some(threads) = cfg.threads {
            enclave.set_threads(threads);
        }
        let identity = enclave.identity_public_key();
        let evidence = enclave.evidence(&tls_fingerprint, now().0 / 1000)?;
        store.put_evidence(&tessera_attestation::audit::sha256_hex(&evidence), &evidence, &hex::encode(tls_fingerprint), now().0).await?;
        let stored_log = store.log_range(0, u64::MAX).await?;
        enclave.load_log(&stored_log)?;
        tracing::info!(entries = stored_log.len(), root = %hex::encode(enclave.log().root()), "transparency log loaded");
        let sealed_federation = store.get_kv("federation").await?;
        let federation = enclave.establish_federation(sealed_federation.as_deref(), cfg.privacy).map_err(|e| match e {
            EnclaveError::Unseal(what) => {
                StartError::Setup(format!("the stored {what} does not unseal under this enclave's key (altered, or sealed by another build)"))
            }
            other => other.into(),
        })?;
        store.put_kv("federation", &federation.sealed).await?;
        match federation.budget {
            Some(b) => tracing::info!(epsilon = b.epsilon, delta = b.delta, "federation privacy budget (fixed at creation, sealed)"),
            None => tracing::info!("the federation has no privacy budget of its own: each DP round is held to the budget it states"),
        }
        if federation.configuration_ignored {
            tracing::warn!(
                sealed = ?federation.budget,
                configured = ?cfg.privacy,
                "the configured [privacy] budget differs from the one fixed when the federation was created; the sealed one stays in force"
            );
        }

        // Resume the last round if it was still running when the process stopped.
        let mut current = None;
        if let Some(row) = store.latest_round().await? {
            if row.status == "open" {
                let events = store.events(row.round, &spool).await?;
                match enclave.restore_round(row.config.clone(), row.opened_at, &events) {
                    Ok(()) => {
                        // Entries the store lacked (deleted rows) were composed again by
                        // the replay: store them before anything else happens.
                        let log = enclave.take_log_entries();
                        if !log.is_empty() {
                            tracing::warn!(
                                round = row.round,
                                entries = log.len(),
                                "the stored log lacked entries the round's events produce; appended them again"
                            );
                            store.commit(Commit { round: row.round, log: &log, ..Default::default() }).await?;
                        }
                        tracing::info!(round = row.round, events = events.len(), phase = ?enclave.phase(), "resumed round from the store");
                        let mut resumed = Current::new(row.config, row.opened_at, None);
                        resumed.refused = refused_admissions(&store.log_of_round(row.round).await?);
                        current = Some(resumed);
                    }
                    Err(e) => {
                        tracing::error!(round = row.round, error = %e, "cannot resume round; marking it aborted");
                        let reason = format!("not resumable after restart: {e}");
                        if let Err(e) = enclave.log_host_abort(row.round, &reason, now()) {
                            tracing::warn!(round = row.round, error = %e, "the abort is not logged");
                        }
                        enclave.discard_round();
                        let log = enclave.take_log_entries();
                        let finish = Finish { status: "aborted", outcome: reason, release: None, mean: None };
                        store.commit(Commit { round: row.round, log: &log, finish: Some(&finish), ..Default::default() }).await?;
                    }
                }
            } else {
                current = Some(Current::new(row.config.clone(), row.opened_at, Some(row.opened_at)));
            }
        }
        let authenticator = crate::auth::Authenticator::new(&cfg);
        let uploads_in_flight = cfg.limits.uploads_in_flight.max(1);
        let evidence_maker = enclave.evidence_maker();
        let denials = spawn_denial_writer(store.clone());
        let names_by_key = cfg.institutions.iter().map(|i| (i.public_key.to_ascii_lowercase(), i.name.clone())).collect();
        let service = Arc::new(Service {
            inner: Mutex::new(Inner { enclave, current, out_of_step: false }),
            store,
            cfg,
            identity,
            tls_fingerprint,
            evidence: std::sync::Mutex::new(evidence),
            metrics: Arc::new(Metrics::default()),
            privacy_floors: FloorCache::default(),
            authenticator,
            format,
            evidence_maker,
            attest_permits: tokio::sync::Semaphore::new(FRESH_EVIDENCE_CONCURRENCY),
            preverify_permit: Arc::new(tokio::sync::Semaphore::new(1)),
            uploads: Arc::new(tokio::sync::Semaphore::new(uploads_in_flight)),
            denials,
            denials_dropped: std::sync::atomic::AtomicU64::new(0),
            anonymous_denials: std::sync::Mutex::new((0, 0, 0)),
            last_schedule_error: Mutex::new(None),
            last_result: Mutex::new(None),
            changes: tokio::sync::watch::channel(0).0,
            names_by_key,
        });
        // A round that finished just before a crash may not have its result stored yet.
        service.tick().await.map_err(|e| StartError::Setup(e.message))?;
        Ok(service)
    }

    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// Runs `f` on the enclave under the service lock (nothing else moves meanwhile).
    pub async fn with_enclave<T>(&self, f: impl FnOnce(&Enclave) -> T) -> T {
        let inner = self.inner.lock().await;
        f(&inner.enclave)
    }

    /// Institution names by roster key (display labels; not part of the log).
    pub fn institution_name(&self, key: &str) -> Option<&str> {
        self.names_by_key.get(&key.to_ascii_lowercase()).map(String::as_str)
    }

    pub fn authenticator(&self) -> &crate::auth::Authenticator {
        &self.authenticator
    }

    /// Queues a refused request for the denial log. Written by a background task, so a
    /// flood of refusals neither delays answers nor competes with round commits; past
    /// [`DENIAL_QUEUE`] waiting records the excess is counted and dropped.
    pub fn record_denial(&self, d: crate::store::Denial) {
        // Anyone can make unauthenticated requests: past ANONYMOUS_DENIALS_PER_MINUTE
        // they are counted, not listed (one summary row per minute), so a flood neither
        // fills the queue nor pushes refusals of authenticated callers out of the log.
        if d.principal.is_none() {
            let minute = d.at_ms / 60_000;
            let mut summary = None;
            {
                let Ok(mut w) = self.anonymous_denials.lock() else { return };
                if w.0 != minute {
                    if w.2 > 0 {
                        summary = Some(crate::store::Denial {
                            at_ms: (w.0 + 1) * 60_000 - 1,
                            method: "*".into(),
                            path: "*".into(),
                            status: 401,
                            principal: None,
                            reason: format!("{} further unauthenticated refusals in this minute were counted, not listed", w.2),
                        });
                    }
                    *w = (minute, 0, 0);
                }
                if w.1 >= ANONYMOUS_DENIALS_PER_MINUTE {
                    w.2 += 1;
                    return;
                }
                w.1 += 1;
            }
            if let Some(sm) = summary {
                let _ = self.denials.try_send(sm);
            }
        }
        if self.denials.try_send(d).is_err() {
            let n = self.denials_dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(dropped = n, "denial log queue full; refusals not recorded");
            }
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Evidence made now for a verifier's nonce, bound to the identity key, the TLS key
    /// and the nonce: proof that the attested enclave is live behind this connection.
    ///
    /// Made outside the service lock (rounds go on meanwhile), on a blocking thread (a
    /// hardware report is a kernel call), at most [`FRESH_EVIDENCE_CONCURRENCY`] at once:
    /// more get 503 `busy`.
    pub async fn fresh_evidence(&self, nonce: &[u8]) -> Result<Vec<u8>, ApiError> {
        let _permit = self
            .attest_permits
            .try_acquire()
            .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", "too many evidence requests at once; retry shortly"))?;
        let context = tessera_attestation::binding::fresh_context(&self.tls_fingerprint, nonce);
        let maker = self.evidence_maker.clone();
        let made = tokio::task::spawn_blocking(move || maker.evidence_for(&context, now().0 / 1000)).await.map_err(ApiError::internal)?;
        Ok(made?)
    }

    /// Makes new evidence for the TLS certificate (bound to the identity and TLS keys),
    /// stores it, and makes it the one later `round_opened` entries name. Rounds opened
    /// earlier keep naming theirs, which stays in the store for their bundles.
    pub async fn refresh_evidence(&self) -> Result<(), ApiError> {
        let mut inner = self.inner.lock().await;
        let evidence = inner.enclave.evidence(&self.tls_fingerprint, now().0 / 1000)?;
        self.store.put_evidence(&tessera_attestation::audit::sha256_hex(&evidence), &evidence, &hex::encode(self.tls_fingerprint), now().0).await?;
        drop(inner);
        *self.evidence.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = evidence;
        Ok(())
    }

    pub fn attestation(&self) -> AttestationInfo {
        AttestationInfo {
            format: self.format.to_string(),
            insecure: self.format.is_insecure(),
            identity_public_key: hex::encode(self.identity),
            tls_fingerprint: hex::encode(self.tls_fingerprint),
            evidence: hex::encode(&*self.evidence.lock().unwrap_or_else(std::sync::PoisonError::into_inner)),
            nonce: None,
            fresh_evidence: None,
        }
    }

    fn names(&self, cfg: &RoundConfig) -> Vec<String> {
        cfg.roster.iter().map(|k| self.institution_name(k).unwrap_or("(unknown)").to_string()).collect()
    }

    /// Opens the next round with `params`.
    pub async fn open_round(&self, params: &RoundParams) -> Result<RoundConfig, ApiError> {
        let mut inner = self.lock_in_step().await?;
        if let Some(cur) = &inner.current {
            if cur.finished_at.is_none() {
                return Err(ApiError::new(StatusCode::CONFLICT, "round_open", format!("round {} is still running", cur.cfg.round)));
            }
        }
        let round = self.store.latest_round().await?.map(|r| r.round + 1).unwrap_or(1);
        // In a buffered federation the global version is the number of releases so far.
        let version = match params.cohort {
            Some(_) => self.store.rounds().await?.iter().filter(|r| r.outcome.as_deref() == Some("released")).count() as u64,
            None => 0,
        };
        let cfg = self.round_config(round, params, version)?;
        // The privacy budget is the enclave's to enforce: it refuses a round that would
        // spend past it, or whose DP differs from the federation's sealed budget.
        let opened_at = now();
        inner.enclave.open_round(cfg.clone(), opened_at)?;
        let log = inner.enclave.take_log_entries();
        if let Err(e) = self.store.commit(Commit { round, open: Some((&cfg, opened_at)), log: &log, ..Default::default() }).await {
            tracing::error!(error = %e, "could not store the new round; discarding it");
            inner.enclave.discard_round();
            self.reload_log(&mut inner).await?;
            return Err(e.into());
        }
        tracing::info!(round, participants = cfg.participants(), k = cfg.neighbours, t = cfg.min_survivors, m = cfg.vector_len, "round opened");
        inner.current = Some(Current::new(cfg.clone(), opened_at, None));
        self.changed();
        Ok(cfg)
    }

    fn round_config(&self, round: u64, p: &RoundParams, version: u64) -> Result<RoundConfig, ApiError> {
        let bad = |m: String| ApiError::bad_request("invalid_round_params", m);
        let institutions: Vec<_> = if p.participants.is_empty() {
            self.cfg.institutions.iter().collect()
        } else {
            p.participants
                .iter()
                .map(|n| self.cfg.institutions.iter().find(|i| &i.name == n).ok_or_else(|| bad(format!("unknown institution {n}"))))
                .collect::<Result<_, _>>()?
        };
        let vector_len = if p.vector_len == 0 { p.layout.iter().map(|t| t.numel()).sum::<u64>() as u32 } else { p.vector_len };
        let roster = institutions.iter().map(|i| i.public_key.to_ascii_lowercase()).collect();
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        let mut cfg = RoundConfig::with_defaults(round, roster, vector_len, seed);
        cfg.layout = p.layout.clone();
        cfg.clip = p.clip;
        cfg.max_weight = p.max_weight;
        cfg.phase_timeout_ms = p.phase_timeout_ms;
        cfg.advertise_timeout_ms = p.advertise_timeout_ms;
        cfg.dp = p.dp;
        cfg.modulus_bits = p.modulus_bits;
        cfg.compression = p.compression.map(|c| c.for_vector(vector_len)).transpose().map_err(bad)?;
        if p.neighbours != 0 {
            cfg.neighbours = p.neighbours;
            cfg.share_threshold = p.neighbours / 2 + 1;
        }
        if p.min_survivors != 0 {
            cfg.min_survivors = p.min_survivors;
        }
        if let Some(c) = p.cohort {
            // A cohort goes on with its first K institutions: the complete graph among them.
            cfg.neighbours = (cfg.participants() as u32).saturating_sub(1);
            cfg.share_threshold = cfg.neighbours / 2 + 1;
            cfg.cohort =
                Some(tessera_secagg::config::Cohort { version, size: c.size, max_staleness: c.max_staleness, staleness_exponent: c.staleness_exponent });
        }
        // A schedule that leaves the Skellam scale to each round: the largest that fits.
        cfg.settle_skellam_scale().map_err(|e| bad(e.to_string()))?;
        cfg.validate().map_err(|e| bad(e.to_string()))?;
        Ok(cfg)
    }

    fn current<'a>(&self, inner: &'a Inner, round: u64) -> Result<&'a Current, ApiError> {
        let cur = inner.current.as_ref().ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no_round", "no round has been opened"))?;
        if cur.cfg.round != round {
            return Err(ApiError::new(StatusCode::CONFLICT, "wrong_round", format!("round {round} is not the current round ({})", cur.cfg.round)));
        }
        Ok(cur)
    }

    /// The most bytes a masked input of the round `cfg` configures may have.
    pub fn masked_input_limit(cfg: &RoundConfig) -> usize {
        MaskedInput::encoded_len(cfg.masked_len(), cfg.modulus_bits)
    }

    pub async fn current_config(&self) -> Option<Arc<RoundConfig>> {
        self.inner.lock().await.current.as_ref().map(|c| c.cfg.clone())
    }

    /// The current round's configuration and its digest, without copying either.
    async fn current_with_digest(&self) -> Option<(Arc<RoundConfig>, [u8; 32])> {
        self.inner.lock().await.current.as_ref().map(|c| (c.cfg.clone(), c.digest))
    }

    /// Where masked-input uploads are spooled as they arrive, and stored ones read back
    /// for a restore: unnamed files, gone when closed.
    pub fn spool_dir(&self) -> std::path::PathBuf {
        spool_dir(&self.cfg)
    }

    /// A permit to spool one masked-input upload: at most [`crate::config::Limits::uploads_in_flight`] are
    /// spooled, checked or waiting for the round's lock at once, so the disk the spool
    /// takes is bounded (each is at most the round's input size). A client that waits
    /// longer than [`UPLOAD_PERMIT_WAIT`] is answered 503.
    pub async fn upload_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        permit_within(&self.uploads, UPLOAD_PERMIT_WAIT).await
    }

    /// The early check of a masked input for `round` spooled as it arrived: its header
    /// and its sender's signature, the body hashed one batch of leaves at a time, on a
    /// blocking thread and one input at a time, before the round's lock is taken. A body
    /// from no roster member, or not signed by one, is refused here without delaying anyone.
    pub async fn preverify_masked_input(&self, round: u64, input: &SpooledInput) -> Result<(), ApiError> {
        let Some((cfg, digest)) = self.current_with_digest().await.filter(|(c, _)| c.round == round) else { return Ok(()) };
        let threads = self.cfg.threads.unwrap_or_else(tessera_secagg::prg::default_threads);
        let permit = self.preverify_permit.clone().acquire_owned().await.map_err(|_| ApiError::internal("the preverification permits are closed"))?;
        let input = input.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            tessera_enclave::preverify_masked_file(&cfg, &digest, &input, threads)
        })
        .await
        .map_err(ApiError::internal)??;
        Ok(())
    }

    /// Accepts a spooled masked input for `round` (after [`Service::preverify_masked_input`]):
    /// the enclave folds it from the file with the streamed fold, checking everything
    /// again, and the store copies it in parts. The server holds no more of the input than
    /// a batch of digest leaves or one stored part.
    pub async fn accept_masked_input(&self, round: u64, input: SpooledInput) -> Result<(), ApiError> {
        let mut inner = self.lock_in_step().await?;
        self.current(&inner, round)?;
        let t = now();
        let result = inner.enclave.handle_masked_input_file(&input, t).map(|()| None);
        self.settle(&mut inner, result, Commit { round, masked_input_file: Some((t, &input)), ..Default::default() }, t).await.map(|_| ())
    }

    /// Accepts one client message for `round`: enclave first, then the store, then any
    /// phase change that it completes.
    pub async fn submit(&self, round: u64, kind: MessageKind, body: &[u8]) -> Result<Option<Verdict>, ApiError> {
        // Parsing, the sender and its signature are checked before the round's lock is
        // taken: a body from no roster member is refused without delaying anyone.
        let cfg = self.current_with_digest().await.filter(|(c, _)| c.round == round);
        let parsed = match &cfg {
            Some((cfg, digest)) => Some(tessera_enclave::preverify(cfg, digest, kind, body)?),
            None => None,
        };
        let mut inner = self.lock_in_step().await?;
        self.current(&inner, round)?;
        let t = now();
        let result = match parsed {
            Some(msg) => inner.enclave.handle_preverified(msg, t),
            None => match kind {
                MessageKind::Advertise => {
                    let msg: AdvertiseKeys = serde_json::from_slice(body).map_err(|e| ApiError::bad_request("malformed", e.to_string()))?;
                    inner.enclave.handle_advertise(msg, t).map(Some)
                }
                _ => inner.enclave.handle_message(kind, body, t).map(|()| None),
            },
        };
        self.settle(&mut inner, result, Commit { round, message: Some((kind, t, body)), ..Default::default() }, t).await
    }

    /// After the enclave handled a client message (`result`): an accepted one is stored
    /// (`accepted`: the message, with the log entries added here) and any phase change it
    /// completes is made; a refused one leaves only its log entries.
    async fn settle(
        &self,
        inner: &mut Inner,
        result: Result<Option<Verdict>, EnclaveError>,
        accepted: Commit<'_>,
        t: Timestamp,
    ) -> Result<Option<Verdict>, ApiError> {
        let round = accepted.round;
        let log = inner.enclave.take_log_entries();
        let verdict = match result {
            Ok(v) => v,
            // A retransmission of a message already stored (its acknowledgement was lost).
            Err(EnclaveError::Protocol(tessera_secagg::Error::Protocol(tessera_secagg::ProtocolError::AlreadyAccepted(_)))) => return Ok(None),
            Err(e) => {
                // A refused admission is logged, though the message is not stored.
                if !log.is_empty() {
                    if let Err(se) = self.store.commit(Commit { round, log: &log, ..Default::default() }).await {
                        tracing::error!(error = %se, "could not store log entries; rebuilding from the store");
                        self.rebuild(inner).await?;
                    }
                }
                return Err(e.into());
            }
        };
        if let Err(e) = self.store.commit(Commit { log: &log, ..accepted }).await {
            tracing::error!(error = %e, "could not store an accepted message; rebuilding the round from the store");
            self.rebuild(inner).await?;
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage", "the message could not be stored; retry"));
        }
        self.advance_locked(inner, t).await?;
        Ok(verdict)
    }

    /// The service lock, with the enclave in step with the store: if an earlier rebuild
    /// failed, it is tried again now, and until one succeeds the request is answered 503.
    async fn lock_in_step(&self) -> Result<tokio::sync::MutexGuard<'_, Inner>, ApiError> {
        let mut inner = self.inner.lock().await;
        if inner.out_of_step {
            self.rebuild(&mut inner).await?;
        }
        Ok(inner)
    }

    /// Puts the enclave back in step with the store: the stored log, then the current
    /// round replayed from its stored events. If that fails (the store or the spool
    /// directory unreadable), the enclave must not go on with what it holds, which may
    /// include a message the store never got (the failed commit that led here): its round
    /// is discarded and the service is marked out of step until a rebuild succeeds.
    async fn rebuild(&self, inner: &mut Inner) -> Result<(), ApiError> {
        match self.rebuild_from_store(inner).await {
            Ok(()) => {
                inner.out_of_step = false;
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = ?e, "the round could not be rebuilt from the store; held until a rebuild succeeds");
                inner.enclave.discard_round();
                inner.out_of_step = true;
                Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage", "the aggregator's state could not be read back from its store; retry"))
            }
        }
    }

    async fn rebuild_from_store(&self, inner: &mut Inner) -> Result<(), ApiError> {
        self.reload_log(inner).await?;
        let Some(cur) = &inner.current else { return Ok(()) };
        let round = cur.cfg.round;
        let events = self.store.events(round, &spool_dir(&self.cfg)).await?;
        inner.enclave.restore_round((*cur.cfg).clone(), cur.opened_at, &events)?;
        let log = inner.enclave.take_log_entries();
        if !log.is_empty() {
            self.store.commit(Commit { round, log: &log, ..Default::default() }).await?;
        }
        let refused = refused_admissions(&self.store.log_of_round(round).await?);
        if let Some(cur) = inner.current.as_mut() {
            cur.refused = refused;
        }
        Ok(())
    }

    async fn reload_log(&self, inner: &mut Inner) -> Result<(), ApiError> {
        let stored = self.store.log_range(0, u64::MAX).await?;
        inner.enclave.load_log(&stored)?;
        Ok(())
    }

    /// The privacy spent so far: every released round whose configuration carried DP
    /// parameters counts, at its own noise multiplier (RDP composition).
    pub async fn privacy(&self) -> Result<PrivacyReport, ApiError> {
        let schedule_dp = self.cfg.rounds.params.dp;
        let mut groups: Vec<(Mechanism, u64)> = Vec::new();
        let mut outsider: Vec<(Mechanism, u64)> = Vec::new();
        let mut per_round = Vec::new();
        let mut delta = schedule_dp.map(|d| d.delta);
        let rows = self.store.rounds().await?;
        for row in &rows {
            let Some(dp) = row.config.dp else { continue };
            if row.outcome.as_deref() != Some("released") {
                continue;
            }
            delta.get_or_insert(dp.delta);
            // Rounds stored before `colluders` existed are charged at what one
            // participant faced (see `DpParams::coalition_noise_multiplier`).
            let charged = |against| row.config.dp_mechanism(against).unwrap_or(tessera_secagg::dp::NO_NOISE);
            tessera_secagg::dp::add_release(&mut groups, charged(Against::Coalition));
            tessera_secagg::dp::add_release(&mut outsider, charged(Against::Outsider));
            let d = delta.unwrap_or(dp.delta);
            per_round.push(RoundPrivacy {
                round: row.round,
                noise_multiplier: dp.noise_multiplier,
                colluders: dp.colluders,
                noise: if dp.skellam.is_some() { "skellam" } else { "gaussian" },
                epsilon_cumulative: tessera_secagg::dp::epsilon_of(&groups, d),
                epsilon_outsider_cumulative: tessera_secagg::dp::epsilon_of(&outsider, d),
            });
        }
        let institutions = self.institution_privacy(&rows).await?;
        let rounds_released = groups.iter().map(|g| g.1).sum();
        let epsilon_spent = delta.map(|d| tessera_secagg::dp::epsilon_of(&groups, d)).unwrap_or(0.0);
        let epsilon_outsider_spent = delta.map(|d| tessera_secagg::dp::epsilon_of(&outsider, d)).unwrap_or(0.0);
        // The next round's mechanism is the schedule's, as a round opened now would state it.
        // (A Gaussian round's is its z whatever else the schedule says; a Skellam round's
        // needs the round's scale, and a schedule that opens no round has no next round.)
        let next = |dp: tessera_secagg::dp::DpParams| match dp.skellam {
            None => Mechanism::Gaussian { noise_multiplier: dp.noise_multiplier },
            Some(_) => {
                self.round_config(0, &self.cfg.rounds.params, 0).ok().and_then(|c| c.dp_mechanism(Against::Coalition)).unwrap_or(tessera_secagg::dp::NO_NOISE)
            }
        };
        let rounds_remaining = schedule_dp.map(|dp| rounds_within_budget(&groups, next(dp), dp.delta, dp.epsilon_budget));
        Ok(PrivacyReport {
            params: schedule_dp,
            rounds_released,
            adjacency: tessera_secagg::dp::ADJACENCY,
            adjacency_explained: tessera_secagg::dp::ADJACENCY_EXPLAINED,
            epsilon_spent,
            epsilon_outsider_spent,
            delta,
            rounds_remaining,
            per_round,
            institutions,
            groups,
        })
    }

    /// Each rostered institution's institution-level ε and record-level claims, from the
    /// reports derived from the log (rounds that predate the log have none).
    async fn institution_privacy(&self, rows: &[crate::store::RoundRow]) -> Result<Vec<InstitutionPrivacy>, ApiError> {
        let mut by_key: BTreeMap<String, (Option<f64>, Vec<RoundClaim>)> = BTreeMap::new();
        for row in rows {
            let stored = self.store.log_of_round(row.round).await?;
            if stored.is_empty() {
                continue;
            }
            let report = crate::compliance::report_of(&stored)?;
            for p in &report.participants {
                let slot = by_key.entry(p.identity.to_ascii_lowercase()).or_default();
                if p.epsilon_cumulative.is_some() {
                    slot.0 = p.epsilon_cumulative;
                }
                if let Some(rp) = p.record_privacy {
                    slot.1.push((report.round, rp));
                }
            }
        }
        Ok(by_key
            .into_iter()
            .map(|(identity, (epsilon, claims))| InstitutionPrivacy {
                institution: self.institution_name(&identity).unwrap_or("(unknown)").to_string(),
                identity,
                epsilon,
                record: record_view(&claims, |runs, delta| self.privacy_floors.floor(runs, delta, &self.metrics)),
            })
            .collect())
    }

    /// Closes due phases and opens scheduled rounds; the server calls it periodically.
    pub async fn tick(&self) -> Result<(), ApiError> {
        let mut inner = self.lock_in_step().await?;
        let t = now();
        self.advance_locked(&mut inner, t).await?;
        let schedule = &self.cfg.rounds;
        let due = match &inner.current {
            None => true,
            Some(c) => c.finished_at.is_some_and(|f| t.0 >= f.0 + ROUND_GAP.as_millis() as u64),
        };
        if schedule.auto_open && due {
            let done = self.store.latest_round().await?.map(|r| r.round).unwrap_or(0);
            if schedule.count == 0 || done < schedule.count {
                drop(inner);
                if let Err(e) = self.open_round(&schedule.params).await {
                    // Said once per distinct reason, not at every tick.
                    let mut last = self.last_schedule_error.lock().await;
                    if last.as_deref() != Some(e.message.as_str()) {
                        tracing::error!(error = %e.message, "scheduled round could not open");
                        *last = Some(e.message.clone());
                    }
                }
            }
        }
        Ok(())
    }

    async fn advance_locked(&self, inner: &mut Inner, t: Timestamp) -> Result<(), ApiError> {
        let Some(cur) = &inner.current else { return Ok(()) };
        if cur.finished_at.is_some() {
            return Ok(());
        }
        let round = cur.cfg.round;
        let transition = match inner.enclave.advance(t) {
            Ok(Some(tr)) => tr,
            Ok(None) => {
                // Replay can finish a round whose result was not stored before a crash.
                if inner.enclave.phase().is_some_and(Phase::is_terminal) {
                    self.record_end(inner, round, t).await?;
                    self.changed();
                }
                return Ok(());
            }
            Err(EnclaveError::NoRound) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let log = inner.enclave.take_log_entries();
        let change = &transition.change;
        tracing::info!(round, from = ?change.from, to = ?change.to, responded = change.responded.len(), "phase closed");
        let finish = if change.to.is_terminal() { self.end_of(inner, round)? } else { None };
        if let Err(e) = self
            .store
            .commit(Commit { round, sealed: Some((transition.seq, &transition.sealed)), log: &log, finish: finish.as_ref(), ..Default::default() })
            .await
        {
            tracing::error!(error = %e, "could not store a phase change; rebuilding the round from the store");
            self.rebuild(inner).await?;
            return Err(e.into());
        }
        if let Some(finish) = finish {
            if let Some(cur) = inner.current.as_mut() {
                cur.finished_at = Some(t);
            }
            self.remember_result(round, finish).await;
        }
        self.changed();
        Ok(())
    }

    /// Wakes every parked long-poll to look again.
    fn changed(&self) {
        self.changes.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Runs `attempt` until it answers anything but `not_ready`, or `wait` has passed:
    /// between attempts it parks on the state-change signal, so a waiting client costs
    /// a parked request, not a poll.
    pub async fn long_poll<T, F, Fut>(&self, wait: std::time::Duration, attempt: F) -> Result<T, ApiError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        let mut rx = self.changes.subscribe();
        loop {
            // Marked seen before the attempt, so a change during it wakes the wait below.
            rx.borrow_and_update();
            match attempt().await {
                Err(e) if e.code == "not_ready" && tokio::time::Instant::now() < deadline => match tokio::time::timeout_at(deadline, rx.changed()).await {
                    Ok(Ok(())) => continue,
                    _ => return Err(e),
                },
                other => return other,
            }
        }
    }

    /// How the round ended, for the store.
    fn end_of(&self, inner: &Inner, round: u64) -> Result<Option<Finish>, ApiError> {
        Ok(match inner.enclave.outcome() {
            Some(Outcome::Sum(_)) => {
                let release = inner.enclave.release().ok_or_else(|| ApiError::internal("finished without a release"))?;
                let json = serde_json::to_string(release).map_err(ApiError::internal)?;
                // The bytes share the release's mean: stored part by part, then served.
                let mean = bytes::Bytes::from_owner(release.shared_mean_bytes());
                tracing::info!(round, included = release.included.len(), total_weight = release.total_weight, "aggregate released");
                Some(Finish { status: "finished", outcome: "released".into(), release: Some(json), mean: Some(mean) })
            }
            Some(Outcome::Aborted { phase, reason }) => {
                tracing::warn!(round, ?phase, %reason, "round aborted; nothing released");
                Some(Finish { status: "aborted", outcome: reason.clone(), release: None, mean: None })
            }
            None => None,
        })
    }

    /// Stores the end of a round the replay finished (a store written before phase
    /// changes and round ends were committed together).
    async fn record_end(&self, inner: &mut Inner, round: u64, t: Timestamp) -> Result<(), ApiError> {
        let Some(finish) = self.end_of(inner, round)? else { return Ok(()) };
        let log = inner.enclave.take_log_entries();
        self.store.commit(Commit { round, log: &log, finish: Some(&finish), ..Default::default() }).await?;
        if let Some(cur) = inner.current.as_mut() {
            cur.finished_at = Some(t);
        }
        self.remember_result(round, finish).await;
        Ok(())
    }

    /// Keeps a stored release for [`Service::result`], moved, not copied: its readers
    /// are about to ask for it, every institution of the round at once.
    async fn remember_result(&self, round: u64, finish: Finish) {
        if let (Some(release), Some(mean)) = (finish.release, finish.mean) {
            *self.last_result.lock().await = Some((round, bytes::Bytes::from(release), mean));
        }
    }

    /// Reads something the enclave hands out after a phase closed; 425 before, 410 after an abort.
    pub async fn read<T>(&self, round: u64, what: &str, f: impl Fn(&Enclave) -> Option<T>) -> Result<T, ApiError> {
        let inner = self.lock_in_step().await?;
        self.current(&inner, round)?;
        if let Some(v) = f(&inner.enclave) {
            return Ok(v);
        }
        if let Some(Outcome::Aborted { reason, .. }) = inner.enclave.outcome() {
            return Err(ApiError::new(StatusCode::GONE, "round_aborted", format!("round {round} was aborted: {reason}")));
        }
        Err(ApiError::not_yet(what))
    }

    /// Whether the automatic schedule ends with `round`.
    fn last_scheduled(&self, round: u64) -> bool {
        let s = &self.cfg.rounds;
        s.auto_open && s.count > 0 && round >= s.count
    }

    pub async fn status(&self, round: u64) -> Result<RoundStatus, ApiError> {
        let inner = self.inner.lock().await;
        if let Ok(cur) = self.current(&inner, round) {
            let agg = inner.enclave.aggregator()?;
            let outcome = inner.enclave.outcome().map(|o| match o {
                Outcome::Sum(_) => "released".to_string(),
                Outcome::Aborted { reason, .. } => format!("aborted: {reason}"),
            });
            let mut admission: BTreeMap<ClientId, AdmissionRecord> =
                inner.enclave.verdicts()?.iter().map(|(c, v)| (*c, AdmissionRecord { client: *c, accepted: v.accepted, reasons: v.reasons() })).collect();
            for r in &cur.refused {
                admission.entry(r.client).or_insert_with(|| r.clone());
            }
            let admission = admission.into_values().collect();
            return Ok(RoundStatus {
                round,
                phase: agg.phase(),
                participants: self.names(&cur.cfg),
                config: (*cur.cfg).clone(),
                config_signature: Some(hex::encode(agg.config_signature())),
                waiting_for: agg.waiting_for(),
                outcome,
                admission,
                last_scheduled: self.last_scheduled(round),
            });
        }
        drop(inner);
        let row =
            self.store.round(round).await?.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown_round", format!("round {round} does not exist")))?;
        Ok(RoundStatus {
            round,
            phase: if row.status == "finished" { Phase::Finished } else { Phase::Aborted },
            participants: self.names(&row.config),
            config: row.config,
            config_signature: None,
            waiting_for: Vec::new(),
            outcome: row.outcome,
            admission: Vec::new(),
            last_scheduled: self.last_scheduled(round),
        })
    }

    /// The signed release of a finished round (JSON, without the mean) and the mean
    /// (little-endian f32s). The latest round released is kept, shared: when every
    /// institution of a round asks for its result at once, each answer is sent from the
    /// same buffer, not from its own copy of the mean read from the store (measured with
    /// `tessera-load` at m = 6.8M and ten institutions: the server's peak went from 10.3
    /// to 8.1 × m·4). An older round is read from the store and not kept.
    pub async fn result(&self, round: u64) -> Result<(bytes::Bytes, bytes::Bytes), ApiError> {
        let mut cached = self.last_result.lock().await;
        if let Some((r, release, mean)) = &*cached {
            if *r == round {
                return Ok((release.clone(), mean.clone()));
            }
        }
        let row =
            self.store.round(round).await?.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown_round", format!("round {round} does not exist")))?;
        match row.status.as_str() {
            "finished" => {
                let release = bytes::Bytes::from(row.release.ok_or_else(|| ApiError::internal("finished round without a release"))?);
                let mean = bytes::Bytes::from(self.store.mean(round).await?.ok_or_else(|| ApiError::internal("finished round without a mean"))?);
                let (checked_release, checked_mean) = (release.clone(), mean.clone());
                tokio::task::spawn_blocking(move || check_stored_mean(round, &checked_release, &checked_mean)).await.map_err(ApiError::internal)??;
                if cached.as_ref().is_none_or(|(r, _, _)| *r < round) {
                    *cached = Some((round, release.clone(), mean.clone()));
                }
                Ok((release, mean))
            }
            "aborted" => Err(ApiError::new(StatusCode::GONE, "round_aborted", format!("round {round} was aborted: {}", row.outcome.unwrap_or_default()))),
            _ => Err(ApiError::not_yet("the result")),
        }
    }
}

/// A mean read back from the host's store is served only if it is the one its stored
/// release signs the hash of: a part deleted, cut short or changed is named, not served.
fn check_stored_mean(round: u64, release: &[u8], mean: &[u8]) -> Result<(), ApiError> {
    let signed: Release = serde_json::from_slice(release).map_err(|e| ApiError::internal(format!("round {round}'s stored release: {e}")))?;
    if !signed.hashes_to(mean) {
        return Err(ApiError::internal(format!("round {round}'s stored mean is not the one its release signs: the store was altered")));
    }
    Ok(())
}

/// How long an upload waits for a permit before it is answered 503.
pub const UPLOAD_PERMIT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A permit from `permits` within `wait`, or 503 `uploads_busy` (which clients retry).
async fn permit_within(permits: &Arc<tokio::sync::Semaphore>, wait: std::time::Duration) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    match tokio::time::timeout(wait, permits.clone().acquire_owned()).await {
        Ok(Ok(permit)) => Ok(permit),
        Ok(Err(_)) => Err(ApiError::internal("the upload permits are closed")),
        Err(_) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "uploads_busy", "too many masked inputs are being received; retry")),
    }
}

/// See [`Service::spool_dir`].
fn spool_dir(cfg: &ServerConfig) -> std::path::PathBuf {
    cfg.data_dir.join("spool")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored mean is served only as the release signed it: one cut short by a deleted
    /// last part, or with a byte changed, is refused.
    #[test]
    fn a_stored_mean_must_hash_to_its_release() {
        let mean: Vec<u8> = (0..3 * 1024 * 1024 + 8).map(|i| (i % 251) as u8).collect();
        let release = Release {
            round: 4,
            config_digest: [1; 32],
            included: vec![ClientId(0)],
            total_weight: 1,
            mean_sha256: tessera_secagg::crypto::sha256(&mean),
            error_bound: 0.0,
            signature: [0; 64],
            mean: Arc::default(),
        };
        let json = serde_json::to_vec(&release).unwrap();
        check_stored_mean(4, &json, &mean).unwrap();
        let err = check_stored_mean(4, &json, &mean[..3 * 1024 * 1024]).unwrap_err();
        assert_eq!(err.status, StatusCode::INTERNAL_SERVER_ERROR);
        let mut changed = mean.clone();
        changed[17] ^= 1;
        assert!(check_stored_mean(4, &json, &changed).is_err());
        assert!(check_stored_mean(4, b"{", &mean).is_err());
    }

    /// Past the uploads in flight allowed an upload waits, and is answered 503
    /// `uploads_busy` (which clients retry) if none ends in time; one that ends lets the
    /// next in.
    #[tokio::test]
    async fn uploads_past_the_limit_wait_then_get_503() {
        let permits = Arc::new(tokio::sync::Semaphore::new(crate::config::DEFAULT_UPLOADS_IN_FLIGHT));
        let wait = std::time::Duration::from_millis(50);
        let mut held = Vec::new();
        for _ in 0..crate::config::DEFAULT_UPLOADS_IN_FLIGHT {
            held.push(permit_within(&permits, wait).await.unwrap());
        }
        let err = permit_within(&permits, wait).await.unwrap_err();
        assert_eq!((err.status, err.code), (StatusCode::SERVICE_UNAVAILABLE, "uploads_busy"));
        let waiting = tokio::spawn({
            let permits = permits.clone();
            async move { permit_within(&permits, std::time::Duration::from_secs(10)).await.map(|_| ()) }
        });
        drop(held.pop());
        assert!(waiting.await.unwrap().is_ok(), "a freed permit goes to the waiting upload");
    }

    fn g(z: f64) -> Mechanism {
        Mechanism::Gaussian { noise_multiplier: z }
    }

    /// The count the server gave before the bisection: one accounting per round.
    fn linear(groups: &[(Mechanism, u64)], next: Mechanism, delta: f64, budget: f64) -> u64 {
        let mut extra = 0u64;
        loop {
            let mut g = groups.to_vec();
            g.push((next, extra + 1));
            if extra >= MAX_ROUNDS_REMAINING || tessera_secagg::dp::epsilon_of(&g, delta) > budget {
                break extra;
            }
            extra += 1;
        }
    }

    #[test]
    fn rounds_remaining_by_bisection_equal_the_count_round_by_round() {
        let skellam = Mechanism::Skellam(tessera_secagg::skellam::SkellamRelease {
            scale: 1e4,
            central_stddev: 1.0,
            l2_clip: 1.0,
            beta: tessera_secagg::dp::default_beta(),
            dim: 1000,
            sample_rate: 1.0,
            steps: 1,
        });
        for (groups, next, budget) in [
            (vec![], g(1.0), 10.0),
            (vec![(g(1.0), 3)], g(1.0), 10.0),
            (vec![(g(0.8), 2), (g(2.0), 5)], g(1.5), 20.0),
            (vec![(g(1.0), 50)], g(1.0), 1.0),
            (vec![], g(0.3), 0.5),
            (vec![], g(5.0), 8.0),
            (vec![(g(1.0), 3)], skellam, 10.0),
            (vec![], skellam, 8.0),
        ] {
            assert_eq!(rounds_within_budget(&groups, next, 1e-5, budget), linear(&groups, next, 1e-5, budget), "{groups:?}, next {next:?}, budget {budget}");
        }
        // An answer between 2^16 and the cap, where the bisection's upper end is the cap.
        let (z, budget) = (150.0, 10.0);
        let far = rounds_within_budget(&[], g(z), 1e-5, budget);
        assert!((65_536..MAX_ROUNDS_REMAINING).contains(&far), "{far}");
        assert_eq!(far, linear(&[], g(z), 1e-5, budget));
        // Past the cap, the cap.
        assert_eq!(rounds_within_budget(&[], g(1e4), 1e-5, 50.0), MAX_ROUNDS_REMAINING);
    }

    #[test]
    fn floors_are_computed_once_per_history() {
        let cache = FloorCache::default();
        let metrics = Metrics::default();
        let run = |steps| tessera_secagg::rdp::SgmSteps { noise_multiplier: 1.0, sample_rate: 0.05, steps };
        let a = cache.floor(&[run(20)], 1e-5, &metrics);
        assert_eq!(a, tessera_secagg::prv::epsilon_floor(&[run(20)], 1e-5));
        assert_eq!(cache.floor(&[run(20)], 1e-5, &metrics), a);
        let b = cache.floor(&[run(20), run(20)], 1e-5, &metrics);
        assert!(b > a);
        assert_ne!(cache.floor(&[run(20)], 1e-6, &metrics), a, "δ is part of the key");
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!((metrics.privacy_floor_hits.load(Relaxed), metrics.privacy_floor_misses.load(Relaxed)), (1, 3));
    }
}
