//! SIGKILL the aggregator process in the middle of a round, twice, and restart it: the
//! round resumes from the store with every accepted submission and completes correctly,
//! and its report audits offline. Once with SQLite, once with a real PostgreSQL server
//! (`TESSERA_TEST_POSTGRES`, started by `scripts/test`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use tessera_attestation::audit::{audit_bundle, AuditInputs, RoundBundle};
use tessera_attestation::policy::NodePolicy;
use tessera_attestation::translog::SignedTreeHead;
use tessera_client::{participate, Api, Options, Participation};
use tessera_server::config::RoundParams;
use tessera_tests::*;

const N: usize = 5;
const M: usize = 512;

fn start(config: &Path) -> (ServerProcess, [u8; 32]) {
    let server = ServerProcess::start(Path::new(env!("CARGO_BIN_EXE_tessera-test-aggregator")), config, "info").expect("start aggregator");
    let fp = server.fingerprint;
    (server, fp)
}

async fn phase(api: &Api) -> Option<(String, usize)> {
    let s: serde_json::Value = api.get_json("/v1/rounds/1").await.ok()?;
    Some((s["phase"].as_str()?.to_string(), s["waiting_for"].as_array()?.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_round_then_restart_completes_the_round() {
    sigkill_mid_round(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_round_then_restart_completes_the_round_on_postgres() {
    if let Some(url) = tessera_server::store::test_postgres_database("crash").await.unwrap() {
        sigkill_mid_round(Some(url)).await;
    }
}

async fn sigkill_mid_round(store: Option<String>) {
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), N);
    let port = free_port();
    let params = RoundParams { vector_len: M as u32, max_weight: 100, phase_timeout_ms: 60_000, ..RoundParams::default() };
    let mut cfg = server_config(&root.path().join("server"), format!("127.0.0.1:{port}").parse().unwrap(), &ids, params, 1);
    let on_postgres = store.is_some();
    cfg.store = store;
    let config_path = root.path().join("server.toml");
    std::fs::write(&config_path, toml::to_string(&cfg).unwrap()).unwrap();

    let (server, fp) = start(&config_path);
    let url = format!("https://127.0.0.1:{port}");
    let api = Api::new(&url, fp).unwrap();
    let updates: Vec<(Vec<f32>, u32)> = (0..N).map(|i| (synthetic_update(i, 1, M), 5 + i as u32)).collect();
    let spawn_client = |i: usize| {
        let identity = tessera_client::Identity::load(&ids[i].0).unwrap();
        let api = Api::new(&url, fp).unwrap();
        let update = updates[i].clone();
        let opts = Options { insecure_dev: true, wait: Duration::from_secs(180), round: Some(1), ..Options::default() };
        tokio::spawn(async move { participate(&api, &identity, &opts, move |_| Ok(update)).await })
    };
    // Four institutions advertise; the fifth is late, so the round waits in phase 0.
    let mut tasks: Vec<_> = (0..N - 1).map(spawn_client).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while phase(&api).await != Some(("advertise_keys".into(), 1)) {
        assert!(Instant::now() < deadline, "four advertisements never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Crash 1: with four accepted advertisements on disk.
    server.kill();
    let (server, fp2) = start(&config_path);
    assert_eq!(fp, fp2, "the certificate survives a restart");
    let auditor = Api::new(&url, fp).unwrap().with_bearer(ADMIN_TOKEN);
    let head_after_crash_1: SignedTreeHead = auditor.get_json("/v1/log/head").await.unwrap();
    assert_eq!(head_after_crash_1.tree_size, 5, "round_opened and four admissions, none replayed twice");
    assert_eq!(phase(&api).await, Some(("advertise_keys".into(), 1)), "accepted advertisements survived the crash");

    // The last institution joins; crash 2 somewhere later in the round.
    tasks.push(spawn_client(N - 1));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((p, _)) = phase(&api).await {
            if p != "advertise_keys" && p != "share_keys" {
                break;
            }
        }
        assert!(Instant::now() < deadline, "round never reached the masked-input phase");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill();
    let (server, _) = start(&config_path);

    let mut release = None;
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap().unwrap_or_else(|e| panic!("institution {i}: {e}")) {
            Participation::Completed(r) => release = Some(r.release),
            Participation::Dropped { .. } => unreachable!(),
        }
    }
    let release = release.unwrap();
    let included: Vec<usize> = release.included.iter().map(|c| c.0 as usize).collect();
    assert_eq!(included, (0..N).collect::<Vec<_>>(), "no accepted submission was lost");
    let want = fedavg(&updates, &included);
    let max_err = release.mean.iter().zip(&want).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
    assert!(max_err <= release.error_bound + 1e-6, "error {max_err} > bound {}", release.error_bound);

    // The log survived both crashes without a gap or a fork: the round's report verifies
    // offline, extends the head seen after the first crash, and lists each admission once.
    let bundle: RoundBundle = auditor.get_json(format!("/v1/rounds/1/report?since_size={}", head_after_crash_1.tree_size)).await.unwrap();
    let mean = auditor.get_bytes("/v1/rounds/1/result/mean").await.unwrap().to_vec();
    let now_secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let inputs = AuditInputs { policy: NodePolicy::insecure_dev(), now_secs, previous_head: Some(head_after_crash_1), mean: Some(mean) };
    let outcome = audit_bundle(&bundle, &inputs);
    assert!(outcome.passed(), "{:#?}", outcome.checks);
    assert_eq!(bundle.report.status, "released");
    assert!(bundle.report.participants.iter().all(|p| p.admission.as_ref().is_some_and(|a| a.attempts == 1) && p.masked_input_sha256.is_some()));
    let kinds: Vec<String> =
        bundle.entries.iter().map(|e| serde_json::from_str::<serde_json::Value>(&e.data).unwrap()["event"]["type"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "masked_input").count(), N, "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| *k == "phase_closed").count(), 5, "{kinds:?}");
    assert_eq!(kinds.last().map(String::as_str), Some("released"));
    server.kill();
    // With PostgreSQL the round state is in the database server, not the data directory.
    assert_eq!(root.path().join("server/tessera.db").exists(), !on_postgres);
}
