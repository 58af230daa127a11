//! Chaos soak: R rounds of N institutions against a real `tessera-server` process that is
//! killed with SIGKILL at random moments and restarted, while institutions crash at
//! random moments of a round (their task is cancelled, losing the round's secrets, as a
//! killed process would) and come back for the next round. Afterwards, for every round:
//!
//! * every masked input the server acknowledged (logged) is in the released sum, or the
//!   round aborted with a reason;
//! * every release is the FedAvg of its included inputs, within the release's error bound;
//! * the round's report audits offline against the first tree head seen, and every
//!   signed tree head an auditor saw (polled every 100 ms throughout, so heads a crash
//!   could roll back are seen too) is consistent with the last (no fork);
//! * no file in the server's data directory, nor any row of its PostgreSQL database,
//!   contains an institution's plaintext update (its f32 bytes);
//! * no institution saw an error that a crash does not explain (a refused aggregator
//!   message, a conflict, an acknowledged input excluded): each one fails the soak.
//!
//! ```text
//! cargo build --release -p tessera-server -p tessera-tests --bins
//! target/release/tessera-soak --rounds 100 --n 8
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tessera_attestation::audit::{audit_bundle, AuditInputs, RoundBundle};
use tessera_attestation::policy::NodePolicy;
use tessera_attestation::translog::{verify_consistency, SignedTreeHead};
use tessera_client::{participate, Api, Options, ParticipateError, Participation};
use tessera_server::config::RoundParams;
use tessera_tests::{fedavg, institutions, server_config, synthetic_update, ServerProcess, ADMIN_TOKEN};
use tokio::sync::Mutex;

#[derive(Parser, Clone)]
#[command(about = "Rounds under SIGKILLs of the server and crashes of institutions, with the invariants checked after")]
struct Args {
    /// Rounds to run.
    #[arg(long, default_value_t = 10)]
    rounds: u64,
    /// Institutions.
    #[arg(long, default_value_t = 6)]
    n: usize,
    /// Parameters per update.
    #[arg(long, default_value_t = 4096)]
    m: usize,
    /// Seed of every random choice (kill times, crashes).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The server is killed after a random pause of up to this many milliseconds.
    #[arg(long, default_value_t = 4000)]
    max_kill_interval_ms: u64,
    /// Chance that an institution crashes at a random moment of a round.
    #[arg(long, default_value_t = 0.15)]
    crash_probability: f64,
    /// Phase timeout of the rounds (ms).
    #[arg(long, default_value_t = 2000)]
    phase_timeout_ms: u64,
    /// Keep the server's state in a fresh database on this PostgreSQL server (admin URL).
    #[arg(long)]
    postgres: Option<String>,
    /// The aggregator binary (default: `tessera-server` beside this one).
    #[arg(long)]
    server_bin: Option<PathBuf>,
}

/// What happened to the institutions, counted.
#[derive(Default, Debug)]
struct Outcomes {
    completed: u64,
    crashed: u64,
    missed: u64,
    aborted: u64,
    /// Errors a crash or restart explains (a message arriving after its phase closed,
    /// a round gone after a restart), by message.
    expected_errors: BTreeMap<String, u64>,
    /// Errors no crash explains: a client refusing an aggregator message, a conflict, a
    /// release that does not verify. Any of these fails the soak.
    unexpected_errors: Vec<String>,
    /// (round, institution) whose masked input the server acknowledged (a 2xx).
    acknowledged: BTreeSet<(u64, u32)>,
    /// (round, institution) that completed: they saw the release.
    completed_in: BTreeSet<(u64, u32)>,
}

struct Shared {
    server: Mutex<Option<ServerProcess>>,
    /// Every distinct signed tree head an auditor saw, polled throughout (so heads that
    /// a crash could roll back are seen too).
    heads: Mutex<Vec<SignedTreeHead>>,
    kills: AtomicU64,
    done: AtomicBool,
}

/// Polls the log head every 100 ms, as an auditor would, until the soak ends.
async fn head_watcher(shared: Arc<Shared>, auditor: Api) {
    while !shared.done.load(Ordering::SeqCst) {
        if let Ok(h) = auditor.get_json::<SignedTreeHead>("/v1/log/head").await {
            let mut heads = shared.heads.lock().await;
            if heads.last().is_none_or(|l| l.tree_size != h.tree_size || l.root_hash != h.root_hash) {
                heads.push(h);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn weight(i: usize) -> u32 {
    5 + i as u32
}

/// The latest signed tree head, read as an auditor (retried while the server restarts).
async fn head(api: &Api) -> anyhow::Result<SignedTreeHead> {
    for _ in 0..200 {
        if let Ok(h) = api.get_json::<SignedTreeHead>("/v1/log/head").await {
            return Ok(h);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the server never answered /v1/log/head")
}

/// Kills and restarts the server at random moments until the institutions are done.
async fn killer(shared: Arc<Shared>, args: Args, bin: PathBuf, config: PathBuf, auditor: Api) -> anyhow::Result<()> {
    let mut rng = ChaCha20Rng::seed_from_u64(args.seed ^ 0x6b11);
    while !shared.done.load(Ordering::SeqCst) {
        let pause = rng.gen_range(args.max_kill_interval_ms / 4..=args.max_kill_interval_ms);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if shared.done.load(Ordering::SeqCst) {
            break;
        }
        let mut slot = shared.server.lock().await;
        if let Some(old) = slot.take() {
            old.kill();
        }
        shared.kills.fetch_add(1, Ordering::SeqCst);
        let restarted = tokio::task::block_in_place(|| ServerProcess::start(&bin, &config, "error"))?;
        *slot = Some(restarted);
        drop(slot);
        let h = head(&auditor).await?;
        shared.heads.lock().await.push(h);
    }
    Ok(())
}

/// One institution's life: a round at a time; it may crash at a random moment (the task
/// is cancelled: its keys and shares for the round are gone) and rejoins the next round.
async fn institution(i: usize, dir: PathBuf, url: String, fingerprint: [u8; 32], args: Args) -> anyhow::Result<Outcomes> {
    let mut rng = ChaCha20Rng::seed_from_u64(args.seed.wrapping_mul(1000) + i as u64);
    let mut out = Outcomes::default();
    for round in 1..=args.rounds {
        let identity = tessera_client::Identity::load(&dir)?;
        // A fresh client, as after a process restart: new connection, nothing kept.
        let api = Api::new(&url, fingerprint)?;
        let acknowledged = Arc::new(AtomicBool::new(false));
        let opts = Options {
            insecure_dev: true,
            round: Some(round),
            quiet: true,
            wait: Duration::from_secs(120),
            mask_threads: Some(1),
            acknowledged: Some(acknowledged.clone()),
            ..Options::default()
        };
        let m = args.m;
        let run = participate(&api, &identity, &opts, move |_| Ok((synthetic_update(i, round, m), weight(i))));
        let result = if rng.gen_bool(args.crash_probability) {
            let at = Duration::from_millis(rng.gen_range(0..3 * args.phase_timeout_ms));
            tokio::time::timeout(at, run).await.ok()
        } else {
            Some(run.await)
        };
        if acknowledged.load(Ordering::SeqCst) {
            out.acknowledged.insert((round, i as u32));
        }
        let Some(result) = result else {
            out.crashed += 1;
            continue;
        };
        let mut expected = |why: String| *out.expected_errors.entry(why.chars().take(90).collect()).or_default() += 1;
        match result {
            Ok(Participation::Completed(r)) => {
                out.completed += 1;
                out.completed_in.insert((round, i as u32));
                if !r.release.included.contains(&tessera_secagg::ClientId(i as u32)) {
                    out.unexpected_errors.push(format!("institution {i} completed round {round} but is not in its release"));
                }
            }
            Ok(Participation::Dropped { .. }) => out.unexpected_errors.push(format!("institution {i} dropped round {round} without being asked to")),
            Err(ParticipateError::Aborted { .. }) => out.aborted += 1,
            // It came too late for the round (the round went on without it, or it ended).
            Err(ParticipateError::RoundInProgress(_)) => out.missed += 1,
            // What a crash or a restart explains.
            Err(e @ (ParticipateError::TooLate { .. } | ParticipateError::Timeout(..))) => expected(e.to_string()),
            Err(ParticipateError::Http(e)) if e.code() == Some("no_round") || e.is_transient() => expected(e.to_string()),
            // A refused aggregator message, a conflict, a release that does not verify,
            // or the aggregator excluding an input it acknowledged: none of these is a
            // crash's doing.
            Err(e) => out.unexpected_errors.push(format!("institution {i}, round {round}: {e}")),
        }
    }
    Ok(out)
}

/// Whether `haystack` contains `needle`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                files(&p, out);
            } else {
                out.push(p);
            }
        }
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.n >= 3, "--n must be at least 3");
    let started = Instant::now();
    let root = tempfile::tempdir()?;
    let ids = institutions(root.path(), args.n);
    let port = tessera_tests::free_port();
    let params = RoundParams {
        vector_len: args.m as u32,
        clip: 1.0,
        max_weight: 100,
        phase_timeout_ms: args.phase_timeout_ms,
        advertise_timeout_ms: args.phase_timeout_ms * 2,
        ..RoundParams::default()
    };
    let data_dir = root.path().join("server");
    let mut cfg = server_config(&data_dir, format!("127.0.0.1:{port}").parse()?, &ids, params, args.rounds);
    if let Some(admin) = &args.postgres {
        cfg.store = Some(tessera_server::store::create_database(admin, "soak").await.map_err(anyhow::Error::msg)?);
    }
    let config_path = root.path().join("server.toml");
    std::fs::write(&config_path, toml::to_string(&cfg)?)?;
    let server_bin = match &args.server_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("tessera-server"),
    };
    ensure!(server_bin.exists(), "{} is missing: cargo build --release -p tessera-server", server_bin.display());
    println!(
        "tessera-soak: {} rounds, {} institutions, m = {}, store {}, seed {}; the server is killed every {}–{} ms, an institution crashes in a round with p = {}",
        args.rounds,
        args.n,
        args.m,
        if args.postgres.is_some() { "PostgreSQL" } else { "SQLite" },
        args.seed,
        args.max_kill_interval_ms / 4,
        args.max_kill_interval_ms,
        args.crash_probability
    );

    let server = ServerProcess::start(&server_bin, &config_path, "error")?;
    let fingerprint = server.fingerprint;
    let url = format!("https://127.0.0.1:{port}");
    let auditor = Api::new(&url, fingerprint)?.with_bearer(ADMIN_TOKEN);
    let shared = Arc::new(Shared { server: Mutex::new(Some(server)), heads: Mutex::new(Vec::new()), kills: AtomicU64::new(0), done: AtomicBool::new(false) });
    let first_head = head(&auditor).await?;
    shared.heads.lock().await.push(first_head.clone());

    let kill_task = tokio::spawn(killer(shared.clone(), args.clone(), server_bin.clone(), config_path.clone(), auditor.clone()));
    let watch_task = tokio::spawn(head_watcher(shared.clone(), auditor.clone()));
    let tasks: Vec<_> = ids.iter().enumerate().map(|(i, (dir, _))| tokio::spawn(institution(i, dir.clone(), url.clone(), fingerprint, args.clone()))).collect();
    let mut total = Outcomes::default();
    for t in tasks {
        let o = t.await??;
        total.completed += o.completed;
        total.crashed += o.crashed;
        total.missed += o.missed;
        total.aborted += o.aborted;
        for (k, v) in o.expected_errors {
            *total.expected_errors.entry(k).or_default() += v;
        }
        total.unexpected_errors.extend(o.unexpected_errors);
        total.acknowledged.extend(o.acknowledged);
        total.completed_in.extend(o.completed_in);
    }
    shared.done.store(true, Ordering::SeqCst);
    kill_task.await??;
    watch_task.await?;
    let kills = shared.kills.load(Ordering::SeqCst);

    // The last round may still be closing (its last phase waits for a crashed
    // institution): wait until every round has ended.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s: serde_json::Value = auditor.get_json(format!("/v1/rounds/{}", args.rounds)).await.unwrap_or_default();
        let phase = s["phase"].as_str().unwrap_or("");
        if phase == "finished" || phase == "aborted" {
            break;
        }
        ensure!(Instant::now() < deadline, "round {} never ended (phase {phase:?})", args.rounds);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The invariants, round by round.
    let identity: serde_json::Value = auditor.get_json("/v1/attestation").await?;
    let identity_key: [u8; 32] =
        hex::decode(identity["identity_public_key"].as_str().context("identity_public_key")?)?.try_into().map_err(|_| anyhow::anyhow!("identity key"))?;
    let now_secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let (mut released, mut aborted, mut accepted, mut lost, mut acknowledged_by_clients) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for round in 1..=args.rounds {
        let bundle: RoundBundle = auditor
            .get_json(format!("/v1/rounds/{round}/report?since_size={}", first_head.tree_size))
            .await
            .with_context(|| format!("round {round}'s report"))?;
        let mean = if bundle.report.status == "released" { Some(auditor.get_bytes(format!("/v1/rounds/{round}/result/mean")).await?.to_vec()) } else { None };
        let inputs = AuditInputs { policy: NodePolicy::insecure_dev(), now_secs, previous_head: Some(first_head.clone()), mean };
        let outcome = audit_bundle(&bundle, &inputs);
        ensure!(outcome.passed(), "round {round}'s report does not audit: {:#?}", outcome.checks);
        // Acknowledged = logged: a 2xx follows the commit of the input and its log entry.
        let logged: BTreeSet<u32> =
            bundle.report.participants.iter().enumerate().filter(|(_, p)| p.masked_input_sha256.is_some()).map(|(i, _)| i as u32).collect();
        accepted += logged.len() as u64;
        // What the institutions themselves saw acknowledged (a 2xx) must be logged.
        let acked: BTreeSet<u32> = total.acknowledged.iter().filter(|(r, _)| *r == round).map(|(_, i)| *i).collect();
        acknowledged_by_clients += acked.len() as u64;
        ensure!(
            acked.is_subset(&logged),
            "round {round}: institutions {:?} were acknowledged but their inputs are not in the log",
            acked.difference(&logged).collect::<Vec<_>>()
        );
        if bundle.report.status == "released" {
            released += 1;
            let release: serde_json::Value = auditor.get_json(format!("/v1/rounds/{round}/result")).await?;
            let included: BTreeSet<u32> = release["included"].as_array().context("included")?.iter().filter_map(|c| c.as_u64().map(|c| c as u32)).collect();
            let missing: Vec<&u32> = logged.difference(&included).collect();
            lost += missing.len() as u64;
            ensure!(missing.is_empty(), "round {round}: acknowledged masked inputs of {missing:?} are not in the release (included {included:?})");
            ensure!(included.is_subset(&logged), "round {round}: the release includes {included:?}, only {logged:?} were logged");
            let completed: BTreeSet<u32> = total.completed_in.iter().filter(|(r, _)| *r == round).map(|(_, i)| *i).collect();
            ensure!(completed.is_subset(&included), "round {round}: institutions {completed:?} completed, the release includes {included:?}");
            let updates: Vec<(Vec<f32>, u32)> = (0..args.n).map(|i| (synthetic_update(i, round, args.m), weight(i))).collect();
            let idx: Vec<usize> = included.iter().map(|&c| c as usize).collect();
            let want = fedavg(&updates, &idx);
            let got = tessera_secagg::wire::Release::mean_from_bytes(&auditor.get_bytes(format!("/v1/rounds/{round}/result/mean")).await?);
            let bound = release["error_bound"].as_f64().context("error_bound")?;
            // The bound is the server's word: it must also be small on its own terms (at
            // 32 bits the quantization step is about 1e-9 of the clip).
            ensure!(bound < 1e-3, "round {round}: the release claims an error bound of {bound}");
            let err = got.iter().zip(&want).map(|(a, b)| f64::from((a - b).abs())).fold(0.0, f64::max);
            ensure!(got.len() == want.len() && err <= bound + 1e-6, "round {round}: the release is {err} from the FedAvg of its inputs (bound {bound})");
        } else {
            aborted += 1;
            let s: serde_json::Value = auditor.get_json(format!("/v1/rounds/{round}")).await?;
            // The current round says "aborted: REASON", a stored one the reason alone.
            let why = s["outcome"].as_str().unwrap_or("").trim_start_matches("aborted: ").to_string();
            ensure!(s["phase"] == "aborted" && !why.is_empty(), "round {round} ended {:?} without a reason", bundle.report.status);
            // Counted by kind: numbers masked, so "3 clients answered …" and "2 clients …" group.
            let mut short = String::new();
            for c in why.chars().take(80) {
                let c = if c.is_ascii_digit() { '#' } else { c };
                if !(c == '#' && short.ends_with('#')) {
                    short.push(c);
                }
            }
            *reasons.entry(short).or_default() += 1;
        }
    }

    // No fork: every head seen, across every restart, is signed by the enclave and is a
    // prefix of the last.
    let last = head(&auditor).await?;
    last.verify(&identity_key).map_err(|e| anyhow::anyhow!("the last head: {e}"))?;
    let heads = shared.heads.lock().await.clone();
    for h in &heads {
        h.verify(&identity_key).map_err(|e| anyhow::anyhow!("head of size {}: {e}", h.tree_size))?;
        let view: serde_json::Value = auditor.get_json(format!("/v1/log/proof/consistency?first={}&second={}", h.tree_size, last.tree_size)).await?;
        let proof: Vec<[u8; 32]> = view["proof"]
            .as_array()
            .context("proof")?
            .iter()
            .map(|p| p.as_str().and_then(|s| hex::decode(s).ok()).and_then(|v| v.try_into().ok()).context("proof hash"))
            .collect::<anyhow::Result<_>>()?;
        let (r1, r2) = (h.root().map_err(|e| anyhow::anyhow!("{e}"))?, last.root().map_err(|e| anyhow::anyhow!("{e}"))?);
        verify_consistency(h.tree_size, last.tree_size, &proof, &r1, &r2)
            .map_err(|e| anyhow::anyhow!("head {} forks from head {}: {e}", h.tree_size, last.tree_size))?;
    }

    // No plaintext update in the data directory: a 64-byte run of any update's f32s at
    // its start, middle and end, in every file the server wrote.
    let mut paths = Vec::new();
    files(&data_dir, &mut paths);
    // The needles, made once: 64-byte runs of each update's f32s at its start, middle
    // and end.
    let mut needles: Vec<(usize, u64, Vec<u8>)> = Vec::new();
    for round in 1..=args.rounds {
        for i in 0..args.n {
            let raw: Vec<u8> = synthetic_update(i, round, args.m).iter().flat_map(|x| x.to_le_bytes()).collect();
            for at in [0, raw.len() / 2 / 4 * 4, raw.len().saturating_sub(64) / 4 * 4] {
                needles.push((i, round, raw[at..(at + 64).min(raw.len())].to_vec()));
            }
        }
    }
    let mut scanned = 0u64;
    let mut scan = |what: &dyn std::fmt::Display, bytes: &[u8]| -> anyhow::Result<()> {
        scanned += bytes.len() as u64;
        if let Some((i, round, _)) = needles.iter().find(|(_, _, n)| contains(bytes, n)) {
            bail!("{what} holds institution {i}'s round-{round} update in plaintext");
        }
        Ok(())
    };
    for p in &paths {
        scan(&p.display(), &std::fs::read(p).unwrap_or_default())?;
    }
    // With PostgreSQL the round data lives in the database: scan what it holds too.
    let mut db_bytes: Vec<Vec<u8>> = Vec::new();
    if let Some(url) = &cfg.store {
        use sqlx::{Connection, Row};
        let mut conn = sqlx::PgConnection::connect(url).await?;
        for q in [
            "SELECT body FROM events",
            "SELECT data FROM event_parts",
            "SELECT data FROM log",
            "SELECT mean FROM rounds WHERE mean IS NOT NULL",
            "SELECT data FROM mean_parts",
            "SELECT convert_to(release, 'UTF8') FROM rounds WHERE release IS NOT NULL",
            "SELECT value FROM kv",
        ] {
            for row in sqlx::query(q).fetch_all(&mut conn).await? {
                db_bytes.push(row.try_get::<Vec<u8>, _>(0)?);
            }
        }
    }
    for bytes in &db_bytes {
        scan(&"the database", bytes)?;
    }
    drop(shared.server.lock().await.take());

    println!(
        "\n{} rounds in {:.0} s: {released} released, {aborted} aborted; {kills} server kills (SIGKILL); institutions: {} rounds completed, {} crashes, {} late for a round, {} saw the round abort",
        args.rounds,
        started.elapsed().as_secs_f64(),
        total.completed,
        total.crashed,
        total.missed,
        total.aborted
    );
    println!(
        "masked inputs acknowledged {accepted} (the log; {acknowledged_by_clients} seen acknowledged by their institutions), lost 0 (every acknowledged input is in its round's release or the round aborted with its reason)"
    );
    println!("{} signed tree heads across the restarts, all consistent with the last (size {}); every round's report audits", heads.len(), last.tree_size);
    println!(
        "data directory{}: {} files and {} rows, {:.1} MB scanned, no plaintext update",
        if cfg.store.is_some() { " and database" } else { "" },
        paths.len(),
        db_bytes.len(),
        scanned as f64 / 1e6
    );
    for (why, count) in &reasons {
        println!("aborted {count}×: {why}");
    }
    for (e, count) in &total.expected_errors {
        println!("institution error a crash explains, {count}×: {e}");
    }
    for e in &total.unexpected_errors {
        println!("UNEXPECTED institution error: {e}");
    }
    ensure!(lost == 0, "{lost} acknowledged inputs lost");
    ensure!(total.unexpected_errors.is_empty(), "{} institution errors that no crash explains", total.unexpected_errors.len());
    ensure!(released > 0, "no round released anything: the soak shows nothing");
    Ok(())
}
