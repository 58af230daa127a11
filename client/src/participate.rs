//! Drives one round from the institution's side: checks the aggregator's evidence,
//! obtains the update through a caller-supplied provider (a file today, local training
//! tomorrow), then runs the five SecAgg+ phases against the server, retrying through
//! server restarts, and verifies the signed release.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::OsRng;
use serde::Deserialize;
use tessera_attestation::binding::aggregator_report_data;
use tessera_attestation::dev::DevAttester;
use tessera_attestation::policy::NodePolicy;
use tessera_attestation::Attester;
use tessera_secagg::aggregator::Phase;
use tessera_secagg::client::{Client, Trust};
use tessera_secagg::floors::SecurityFloors;
use tessera_secagg::quantize::Quantizer;
use tessera_secagg::wire::*;
use tessera_secagg::{ClientId, RoundConfig};

use crate::http::{Api, HttpError};
use crate::identity::Identity;

/// Where a client deliberately leaves the round (fault injection for tests and demos).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DropPoint {
    /// After advertising keys, before sharing them.
    AfterAdvertise,
    /// After sharing keys, before sending the masked input.
    AfterShareKeys,
    /// After sending the masked input, before the consistency check.
    AfterMaskedInput,
}

#[derive(Clone, Debug)]
pub struct Options {
    /// Accept the aggregator's SIMULATED evidence and present simulated evidence ourselves.
    pub insecure_dev: bool,
    pub drop_after: Option<DropPoint>,
    /// How long to wait in total for the round to progress.
    pub wait: Duration,
    /// Take part in this round number (waiting for it to open) instead of the current one.
    pub round: Option<u64>,
    pub quiet: bool,
    /// Policy for the aggregator's evidence (measurements, debug, age). Default: the
    /// secure default, or the dev policy with `insecure_dev`.
    pub aggregator_policy: Option<NodePolicy>,
    /// Where this institution's own evidence comes from. Default: configfs-tsm at
    /// [`DEFAULT_ROOT`](tessera_attestation::tsm::DEFAULT_ROOT) (an SEV-SNP or TDX
    /// guest), or simulated evidence with `insecure_dev`.
    pub attester: Option<AttesterHandle>,
    /// What this institution requires of any round it joins (roster, thresholds, DP).
    pub floors: SecurityFloors,
    /// This institution's own privacy ledger ([`crate::ledger`]): DP rounds are charged
    /// to it before the masked input leaves, and with a DP floor a round that would take
    /// it past `max_epsilon` is refused. `None`: no ledger is kept.
    pub ledger: Option<std::path::PathBuf>,
    /// Threads the masking uses; `None`: every core.
    pub mask_threads: Option<usize>,
    /// The record-level DP (DP-SGD) the update was trained under, signed with the masked
    /// input so that the log and the compliance report carry it.
    pub record_privacy: Option<tessera_secagg::wire::RecordPrivacyClaim>,
    /// In a buffered federation: the global version the update was trained from (the
    /// number of releases this institution had applied). A cohort round requires it; the
    /// update is then weighed by the cohort's staleness weight before it is masked.
    pub base_version: Option<u64>,
    /// Set once the aggregator has acknowledged this institution's masked input (its
    /// 2xx, which follows the commit): for harnesses that check nothing acknowledged is
    /// lost, even when the institution crashes afterwards.
    pub acknowledged: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// An evidence source shared across rounds.
#[derive(Clone)]
pub struct AttesterHandle(pub std::sync::Arc<dyn Attester>);

impl std::fmt::Debug for AttesterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AttesterHandle({})", self.0.format())
    }
}

impl AttesterHandle {
    /// configfs-tsm at `root`, with `endorsements` (files) sent alongside the evidence.
    pub fn configfs_tsm(root: &std::path::Path, endorsements: Vec<std::path::PathBuf>) -> Result<Self, ParticipateError> {
        let attester = tessera_attestation::tsm::TsmAttester::open(root).map_err(|e| ParticipateError::NoAttester(e.to_string()))?;
        Ok(AttesterHandle(std::sync::Arc::new(attester.with_endorsement_files(endorsements))))
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            insecure_dev: false,
            drop_after: None,
            wait: Duration::from_secs(300),
            round: None,
            quiet: false,
            aggregator_policy: None,
            attester: None,
            floors: SecurityFloors::default(),
            ledger: None,
            mask_threads: None,
            record_privacy: None,
            base_version: None,
            acknowledged: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ParticipateError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("this institution ({0}) is not a participant of round {1}")]
    NotParticipant(String, u64),
    #[error("round {0} has already passed key advertisement; wait for the next round")]
    RoundInProgress(u64),
    #[error("the aggregator's schedule ended with round {0}: no cohort is left to join")]
    FederationEnded(u64),
    #[error("protocol: {0}")]
    Protocol(#[from] tessera_secagg::Error),
    #[error("update: {0}")]
    Update(String),
    #[error("the aggregator's attestation was refused: {0}")]
    AggregatorAttestation(String),
    #[error("the aggregator refused our admission: {0}")]
    NotAdmitted(String),
    #[error("round {round} was aborted: {reason}")]
    Aborted { round: u64, reason: String },
    #[error("gave up after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("the {what} reached the aggregator after that phase of round {round} had closed; this client is out of the round")]
    TooLate { round: u64, what: String },
    #[error("the aggregator holds a different {what} from this institution for round {round}; is another process using the same identity?")]
    Conflict { round: u64, what: String },
    #[error("the aggregator excluded this client from the survivor set of round {0}")]
    Excluded(u64),
    #[error("the released aggregate does not verify against the enclave's identity key")]
    BadRelease,
    #[error("the release of round {round} covers {released:?}, but the survivor set this institution signed is {signed:?}")]
    ReleaseNotSigned { round: u64, released: Vec<ClientId>, signed: Vec<ClientId> },
    #[error("{0}")]
    PolicyNotPinned(String),
    #[error("no attestation backend is available here ({0}); run inside an SEV-SNP or TDX guest, or pass --insecure-dev to use SIMULATED evidence")]
    NoAttester(String),
    #[error("this node's evidence could not be produced: {0}")]
    Attestation(String),
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
}

/// What a finished round gave this institution.
#[derive(Clone, Debug)]
pub struct RoundReport {
    pub round: u64,
    pub client: ClientId,
    pub config: RoundConfig,
    pub release: Release,
    pub bytes_sent: u64,
    pub elapsed: Duration,
    /// Encoded coordinates of this institution's update that the round's range clip
    /// clamped, and how many there were.
    pub range_clamped: (usize, usize),
}

#[derive(Debug)]
pub enum Participation {
    Completed(Box<RoundReport>),
    Dropped { round: u64, after: DropPoint },
}

#[derive(Deserialize)]
struct StatusView {
    round: u64,
    phase: Phase,
    config: RoundConfig,
    #[serde(default)]
    config_signature: Option<String>,
    /// The server's schedule opens no round after this one.
    #[serde(default)]
    last_scheduled: bool,
}

#[derive(Deserialize)]
struct AttestationView {
    identity_public_key: String,
    tls_fingerprint: String,
    #[allow(dead_code)]
    evidence: String,
    nonce: Option<String>,
    fresh_evidence: Option<String>,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

struct Driver<'a> {
    who: &'a str,
    opts: &'a Options,
    start: Instant,
    bytes_sent: u64,
}

/// How long one read may park on the server waiting for a phase.
const LONG_POLL: Duration = Duration::from_secs(20);

impl Driver<'_> {
    fn say(&self, msg: &str) {
        if !self.opts.quiet {
            eprintln!("[{}] {msg}", self.who);
        }
    }

    /// `?wait=…` for a read of a phase's data: the server parks the request until the
    /// phase is ready, for at most 20 s and never past this client's own deadline.
    fn wait_query(&self) -> String {
        let left = self.opts.wait.saturating_sub(self.start.elapsed());
        format!("?wait={}", left.min(LONG_POLL).as_secs())
    }

    fn timed_out(&self, what: &str) -> Option<ParticipateError> {
        (self.start.elapsed() > self.opts.wait).then(|| ParticipateError::Timeout(self.opts.wait, what.to_string()))
    }

    /// Repeats `f` while the answer is "not ready yet" or the server is unreachable.
    async fn poll<T, F, Fut>(&self, round: u64, what: &str, f: F) -> Result<T, ParticipateError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, HttpError>>,
    {
        let mut delay = Duration::from_millis(25);
        let mut warned = false;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if e.code() == Some("round_aborted") => {
                    return Err(ParticipateError::Aborted { round, reason: e.to_string() });
                }
                Err(e) if e.code() == Some("not_ready") => {}
                Err(e) if e.is_transient() => {
                    if !warned {
                        self.say(&format!("server unreachable ({e}); retrying"));
                        warned = true;
                    }
                }
                Err(e) => return Err(e.into()),
            }
            if let Some(e) = self.timed_out(what) {
                return Err(e);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(400));
        }
    }

    /// Sends a message, retrying through restarts; a "duplicate" answer means an earlier
    /// attempt was stored, which is success.
    async fn send<F, Fut>(&mut self, round: u64, what: &str, size: usize, f: F) -> Result<(), ParticipateError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<bytes::Bytes, HttpError>>,
    {
        let result = self.poll(round, what, || async { f().await.map(|_| ()) }).await;
        if let Err(ParticipateError::Http(HttpError::Status { code, message, .. })) = &result {
            if code == "not_admitted" {
                return Err(ParticipateError::NotAdmitted(message.clone()));
            }
            if code == "duplicate" {
                return Err(ParticipateError::Conflict { round, what: what.to_string() });
            }
        }
        if let Err(ParticipateError::Http(e)) = &result {
            if e.code() == Some("wrong_phase") && what != "unmask shares" {
                return Err(ParticipateError::TooLate { round, what: what.to_string() });
            }
        }
        result?;
        self.bytes_sent += size as u64;
        Ok(())
    }
}

/// A release this institution did not apply when it was made: its round's configuration
/// and the release, both checked (see [`missed_releases`]).
#[derive(Debug)]
pub struct MissedRelease {
    pub config: RoundConfig,
    pub release: Release,
}

#[derive(Deserialize)]
struct RoundOutcomeView {
    round: u64,
    config: RoundConfig,
    #[serde(default)]
    outcome: Option<String>,
}

/// Applies, in order, the releases of the rounds after `after` and before `before` that
/// this institution (Ed25519 key `me`, hex) has not applied: in a buffered federation, the
/// cohorts it was not part of. Each release's signature is verified against
/// `enclave_key` (the attested identity) and its configuration digest against its
/// round's configuration; a release that includes `me` is refused (this institution's
/// update would count twice); in a buffered federation each cohort must start from the
/// version the one before made, beginning with `from_version`, the version this
/// institution holds. Aborted rounds released nothing and are skipped. Each release is
/// handed to `apply` as soon as it is checked; returns how many were.
pub async fn missed_releases(
    api: &Api,
    enclave_key: &[u8; 32],
    me: &str,
    (after, before): (u64, u64),
    from_version: u64,
    mut apply: impl FnMut(MissedRelease) -> Result<(), ParticipateError>,
) -> Result<u64, ParticipateError> {
    let mut applied = 0u64;
    for n in after.saturating_add(1)..before {
        let s: RoundOutcomeView = api.get_json(format!("/v1/rounds/{n}")).await?;
        if s.round != n {
            return Err(ParticipateError::Update(format!("asked for round {n}, the aggregator answered with round {}", s.round)));
        }
        if s.outcome.as_deref() != Some("released") {
            continue;
        }
        let release = fetch_release(api, enclave_key, n).await?;
        if release.config_digest != s.config.digest() {
            return Err(ParticipateError::Update(format!("the release of round {n} is for another configuration than the round's")));
        }
        if let Some(i) = s.config.roster.iter().position(|k| k.eq_ignore_ascii_case(me)) {
            if release.included.contains(&ClientId(i as u32)) {
                return Err(ParticipateError::Update(format!(
                    "round {n}'s release includes this institution's update, which this institution never applied: its update would count twice"
                )));
            }
        }
        if let Some(c) = s.config.cohort {
            let expected = from_version + applied;
            if c.version != expected {
                return Err(ParticipateError::Update(format!(
                    "round {n} says it started from global version {}, but the releases before it make version {expected}",
                    c.version
                )));
            }
        }
        apply(MissedRelease { config: s.config, release })?;
        applied += 1;
    }
    Ok(applied)
}

/// The signed release of a finished `round` with its mean, as the aggregator serves them,
/// checked against the attested identity `enclave_key` (signature, mean hash, round).
pub async fn fetch_release(api: &Api, enclave_key: &[u8; 32], round: u64) -> Result<Release, ParticipateError> {
    let mut release: Release = api.get_json(format!("/v1/rounds/{round}/result")).await?;
    release.mean = Release::mean_from_bytes(&api.get_bytes(format!("/v1/rounds/{round}/result/mean")).await?);
    if release.round != round || !release.verify(enclave_key) {
        return Err(ParticipateError::BadRelease);
    }
    Ok(release)
}

/// Verifies the aggregator's evidence against the pinned TLS certificate and returns
/// its identity key (which signs releases).
pub async fn check_aggregator(api: &Api, insecure_dev: bool, policy: Option<&NodePolicy>) -> Result<[u8; 32], ParticipateError> {
    // A fresh nonce per check: the evidence must be made now, for us, not replayed.
    let nonce: [u8; 32] = rand::random();
    let info: AttestationView = api.get_json(format!("/v1/attestation?nonce={}", hex::encode(nonce))).await?;
    let bad = |m: String| ParticipateError::AggregatorAttestation(m);
    let identity: [u8; 32] =
        hex::decode(&info.identity_public_key).ok().and_then(|v| v.try_into().ok()).ok_or_else(|| bad("identity key is not 32 bytes of hex".into()))?;
    if !info.tls_fingerprint.eq_ignore_ascii_case(&hex::encode(api.fingerprint())) {
        return Err(bad("evidence names another TLS certificate".into()));
    }
    if !info.nonce.as_deref().is_some_and(|n| n.eq_ignore_ascii_case(&hex::encode(nonce))) {
        return Err(bad("the aggregator did not answer our nonce".into()));
    }
    let evidence = hex::decode(info.fresh_evidence.as_deref().unwrap_or_default()).map_err(|_| bad("fresh evidence is not hex".into()))?;
    let policy = policy.cloned().unwrap_or_else(|| if insecure_dev { NodePolicy::insecure_dev() } else { NodePolicy::default() });
    policy.require_pinned_code("the aggregator").map_err(ParticipateError::PolicyNotPinned)?;
    let context = tessera_attestation::binding::fresh_context(&api.fingerprint(), &nonce);
    let verdict = policy.check(&evidence, &[], &aggregator_report_data(&identity, &context), now_secs());
    if !verdict.accepted {
        return Err(bad(verdict.reasons()));
    }
    Ok(identity)
}

/// Runs one round. `provide` returns the flat update (in the round's layout) and its
/// FedAvg weight; it is called once the round's configuration is known.
pub async fn participate<F>(api: &Api, identity: &Identity, opts: &Options, provide: F) -> Result<Participation, ParticipateError>
where
    F: FnOnce(&RoundConfig) -> Result<(Vec<f32>, u32), ParticipateError>,
{
    let mut d = Driver { who: &identity.name, opts, start: Instant::now(), bytes_sent: 0 };
    let enclave_key = d
        .poll(0, "the aggregator", || async {
            match check_aggregator(api, opts.insecure_dev, opts.aggregator_policy.as_ref()).await {
                Ok(k) => Ok(Ok(k)),
                Err(ParticipateError::Http(e)) => Err(e),
                Err(other) => Ok(Err(other)),
            }
        })
        .await??;
    if opts.insecure_dev {
        d.say("WARNING: aggregator evidence is SIMULATED (dev mode); no hardware guarantee");
    }

    // Wait for the round to be open for key advertisement.
    let status: StatusView = loop {
        let s: StatusView = d.poll(0, "an open round", || api.get_json("/v1/rounds/current")).await.or_else(|e| match e {
            ParticipateError::Http(HttpError::Status { ref code, .. }) if code == "no_round" => {
                Ok(StatusView { round: 0, phase: Phase::Finished, config: placeholder_config(), config_signature: None, last_scheduled: false })
            }
            e => Err(e),
        })?;
        let wanted = opts.round.unwrap_or(s.round);
        // In a buffered federation any cohort from the wanted one on will do: one that
        // went on without us is followed by the next as soon as it ends.
        let joining_next_cohort = s.config.cohort.is_some() && s.round >= wanted;
        if (s.round == wanted || joining_next_cohort) && s.phase == Phase::AdvertiseKeys {
            break s;
        }
        if joining_next_cohort {
            if s.phase.is_terminal() && s.last_scheduled {
                return Err(ParticipateError::FederationEnded(s.round));
            }
            if let Some(e) = d.timed_out("the next cohort to open") {
                return Err(e);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        if s.round > wanted || (opts.round.is_none() && s.round != 0 && !s.phase.is_terminal()) {
            return Err(ParticipateError::RoundInProgress(s.round));
        }
        if let Some(e) = d.timed_out("the round to open") {
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let cfg = status.config;
    let round = cfg.round;
    let me = cfg
        .roster
        .iter()
        .position(|k| k.eq_ignore_ascii_case(&identity.public_key_hex()))
        .map(|i| ClientId(i as u32))
        .ok_or_else(|| ParticipateError::NotParticipant(identity.name.clone(), round))?;
    d.say(&format!(
        "round {round}: joined as participant {me} of {} (k = {}, t = {}, m = {})",
        cfg.participants(),
        cfg.neighbours,
        cfg.min_survivors,
        cfg.vector_len
    ));

    // The configuration is the aggregator's proposal: it must carry the enclave's
    // signature and meet this institution's floors before anything is computed for it.
    let config_signature: [u8; 64] = status
        .config_signature
        .as_deref()
        .and_then(|h| hex::decode(h).ok())
        .and_then(|v| v.try_into().ok())
        .ok_or(tessera_secagg::ProtocolError::BadAggregatorSignature { message: "round configuration" })
        .map_err(tessera_secagg::Error::from)?;
    let trust = Trust { aggregator_key: enclave_key, config_signature, floors: opts.floors.clone() };
    let mut client = Client::new(cfg.clone(), me, identity.key.clone(), &trust, &mut OsRng)?;
    if let Some(threads) = opts.mask_threads {
        client.set_threads(threads);
    }
    if let Some(claim) = opts.record_privacy {
        client.set_record_privacy(claim)?;
    }
    let staleness = match (cfg.cohort, opts.base_version) {
        (Some(cohort), Some(base)) => {
            let tau = client.set_base_version(base)?;
            Some((tau, cohort.staleness_weight(tau)))
        }
        (Some(_), None) => {
            return Err(ParticipateError::Update(format!(
                "round {round} is a cohort of a buffered federation: the update must name the global version it was trained from"
            )))
        }
        (None, _) => None,
    };
    // By this institution's own count, before anything is computed for the round.
    let aggregator_hex = hex::encode(enclave_key);
    if let Some(path) = &opts.ledger {
        let ledger = crate::ledger::PrivacyLedger::load(path)?;
        if let (Some(floor), Some(dp)) = (&opts.floors.dp, &cfg.dp) {
            ledger.check(&aggregator_hex, &cfg, floor.max_epsilon)?;
            d.say(&format!(
                "own privacy ledger: ε = {:.3} spent of {} (δ = {:e}; {} adjacency, against any {} colluding participant(s)) before this round",
                ledger.spent(dp.delta),
                floor.max_epsilon,
                dp.delta,
                tessera_secagg::dp::ADJACENCY,
                dp.colluders
            ));
        }
    }

    let (mut update, mut weight) = provide(&cfg)?;
    if update.len() != cfg.vector_len as usize {
        return Err(ParticipateError::Update(format!("the update has {} values, round {round} aggregates {}", update.len(), cfg.vector_len)));
    }
    if let Some((tau, s)) = staleness {
        // FedBuff's down-weighting of stale updates. A weighted round carries it in the
        // weight, so the release is the staleness-weighted mean; an unweighted round
        // without DP scales the update itself. (With DP the update is already noised.)
        if cfg.max_weight > 1 {
            weight = ((f64::from(weight.min(cfg.max_weight)) * s).round() as u32).max(1);
        } else if cfg.dp.is_none() {
            update.iter_mut().for_each(|x| *x = (f64::from(*x) * s) as f32);
        } else if s != 1.0 {
            // Validation refuses this (a DP cohort has exponent 0): the noise would shrink.
            return Err(ParticipateError::Update("a DP cohort cannot weigh stale updates".into()));
        }
        d.say(&format!("buffered cohort at version {}: this update is {tau} version(s) stale, weighed by {s:.4}", cfg.cohort.map_or(0, |c| c.version)));
    }
    let (quantized, clamped) = Quantizer::new(&cfg)?.quantize_counting(&update, weight.min(cfg.max_weight), &mut tessera_secagg::crypto::seeded_csprng())?;
    let range_clamped = (clamped, cfg.encoded_len());
    if clamped > 0 {
        d.say(&format!(
            "range clip: {clamped} of {} coordinates ({:.3}%) were outside ±{} and were clamped (biased toward zero)",
            cfg.encoded_len(),
            100.0 * clamped as f64 / cfg.encoded_len().max(1) as f64,
            cfg.clip
        ));
    }
    drop(update);

    let attester = match (&opts.attester, opts.insecure_dev) {
        (Some(handle), _) => handle.clone(),
        (None, true) => {
            let measurement = own_measurement().map_err(|e| ParticipateError::Update(format!("cannot measure own executable: {e}")))?;
            let mut seed = [0u8; 32];
            rand::RngCore::fill_bytes(&mut OsRng, &mut seed);
            AttesterHandle(std::sync::Arc::new(DevAttester::new(seed, measurement, false)))
        }
        (None, false) => AttesterHandle::configfs_tsm(std::path::Path::new(tessera_attestation::tsm::DEFAULT_ROOT), Vec::new())?,
    };
    let binding = client.key_binding();
    let evidence = tokio::task::spawn_blocking(move || attester.0.attest(&binding, now_secs()))
        .await
        .map_err(|e| ParticipateError::Update(format!("attestation task: {e}")))?
        .map_err(|e| ParticipateError::Attestation(e.to_string()))?;
    let adv = client.advertise(evidence);
    let path = |p: &str| format!("/v1/rounds/{round}/{p}");
    let size = serde_json::to_vec(&adv).map(|v| v.len()).unwrap_or(0);
    d.send(round, "key advertisement", size, || api.post_json(path("advertise"), &adv)).await?;
    d.say("phase 1/5: keys advertised, evidence accepted");
    if opts.drop_after == Some(DropPoint::AfterAdvertise) {
        d.say("leaving the round after advertising keys (--drop-after)");
        return Ok(Participation::Dropped { round, after: DropPoint::AfterAdvertise });
    }

    let dir: KeyDirectory = d.poll(round, "the key directory", || api.get_json(path(&format!("key-directory/{}", me.0)) + &d.wait_query())).await?;
    let shares = client.handle_key_directory(&dir, &mut OsRng)?;
    let size = serde_json::to_vec(&shares).map(|v| v.len()).unwrap_or(0);
    d.send(round, "key shares", size, || api.post_json(path("share-keys"), &shares)).await?;
    d.say(&format!("phase 2/5: {} admitted; shares sent to {} neighbours", dir.admitted.len(), shares.shares.len()));
    if opts.drop_after == Some(DropPoint::AfterShareKeys) {
        d.say("leaving the round after sharing keys (--drop-after)");
        return Ok(Participation::Dropped { round, after: DropPoint::AfterShareKeys });
    }

    let bundle: ShareBundle = d.poll(round, "the share bundle", || api.get_json(path(&format!("share-bundle/{}", me.0)) + &d.wait_query())).await?;
    // Shared by every attempt to send it, not copied for each.
    let masked = bytes::Bytes::from(client.handle_share_bundle(&bundle, quantized)?.encode());
    if let Some(path) = &opts.ledger {
        crate::ledger::PrivacyLedger::charge(path, &aggregator_hex, &cfg, now_secs() * 1000)?;
    }
    d.send(round, "masked input", masked.len(), || api.post_bytes(path("masked-input"), masked.clone())).await?;
    if let Some(flag) = &opts.acknowledged {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    d.say(&format!("phase 3/5: masked input sent ({:.1} MB)", masked.len() as f64 / 1e6));
    drop(masked);
    if opts.drop_after == Some(DropPoint::AfterMaskedInput) {
        d.say("leaving the round after sending the masked input (--drop-after)");
        return Ok(Participation::Dropped { round, after: DropPoint::AfterMaskedInput });
    }

    let set: SurvivorSet = d.poll(round, "the survivor set", || api.get_json(path("survivors") + &d.wait_query())).await?;
    if !set.survivors.contains(&me) {
        return Err(ParticipateError::Excluded(round));
    }
    let sig = client.handle_survivor_set(&set)?;
    d.send(round, "consistency signature", 200, || api.post_json(path("consistency"), &sig)).await?;
    d.say(&format!("phase 4/5: signed the survivor set ({} of {})", set.survivors.len(), cfg.participants()));

    let req: UnmaskRequest = d.poll(round, "the unmask request", || api.get_json(path("unmask-request") + &d.wait_query())).await?;
    let reveal = client.handle_unmask_request(&req)?;
    let size = serde_json::to_vec(&reveal).map(|v| v.len()).unwrap_or(0);
    match d.send(round, "unmask shares", size, || api.post_json(path("unmask"), &reveal)).await {
        Ok(()) => d.say(&format!("phase 5/5: revealed {} self-mask and {} mask-key shares", reveal.self_mask_shares.len(), reveal.mask_key_shares.len())),
        // The aggregator closes unmasking as soon as it holds enough shares; ours were not needed.
        Err(ParticipateError::Http(e)) if e.code() == Some("wrong_phase") => d.say("phase 5/5: unmasking had already completed without our shares"),
        Err(e) => return Err(e),
    }

    let mut release: Release = d.poll(round, "the released aggregate", || api.get_json(path("result") + &d.wait_query())).await?;
    let mean = d.poll(round, "the released aggregate", || api.get_bytes(path("result/mean") + &d.wait_query())).await?;
    release.mean = Release::mean_from_bytes(&mean);
    if release.round != round || release.config_digest != cfg.digest() || !release.verify(&enclave_key) {
        return Err(ParticipateError::BadRelease);
    }
    let signed = client.signed_survivors().unwrap_or_default().to_vec();
    if release.included != signed {
        return Err(ParticipateError::ReleaseNotSigned { round, released: release.included.clone(), signed });
    }
    d.say(&format!(
        "round {round} done: aggregate of {} institutions (total weight {}) verified; {:.1} MB sent in {:.1} s",
        release.included.len(),
        release.total_weight,
        d.bytes_sent as f64 / 1e6,
        d.start.elapsed().as_secs_f64()
    ));
    Ok(Participation::Completed(Box::new(RoundReport {
        round,
        client: me,
        config: cfg,
        release,
        bytes_sent: d.bytes_sent,
        elapsed: d.start.elapsed(),
        range_clamped,
    })))
}

/// SHA-384 of this executable, computed once per process (the dev stand-in for a launch
/// measurement).
fn own_measurement() -> std::io::Result<[u8; 48]> {
    static MEASUREMENT: std::sync::OnceLock<[u8; 48]> = std::sync::OnceLock::new();
    if let Some(m) = MEASUREMENT.get() {
        return Ok(*m);
    }
    let m = tessera_attestation::dev::measure_file(&std::env::current_exe()?)?;
    Ok(*MEASUREMENT.get_or_init(|| m))
}

fn placeholder_config() -> RoundConfig {
    RoundConfig::with_defaults(0, Vec::new(), 1, [0; 32])
}
