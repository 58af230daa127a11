//! The accountant refuses a round that would take the federation past its ε budget, and
//! reports what was spent. Synthetic updates: the privacy arithmetic does not depend on them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tessera_client::{participate, Api, Options, Participation};
use tessera_secagg::dp::{epsilon, DpParams};
use tessera_server::config::RoundParams;
use tessera_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_round_past_the_budget_is_refused() {
    // A budget that affords exactly one round at z = 2.
    let one = epsilon(2.0, 1, 1e-5);
    let dp = DpParams { noise_multiplier: 2.0, l2_clip: 1.0, delta: 1e-5, epsilon_budget: one * 1.01, colluders: 1, skellam: None };
    assert_eq!(dp.max_rounds(), 1);
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 3);
    let params = RoundParams { vector_len: 50, clip: 16.0, max_weight: 1, phase_timeout_ms: 20_000, dp: Some(dp), ..RoundParams::default() };
    let server = tessera_server::spawn(server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, params.clone(), 0)).await.unwrap();
    let url = format!("https://{}", server.addr);
    let api = Api::new(&url, server.fingerprint).unwrap();

    let weighted = RoundParams { max_weight: 10, ..params.clone() };
    let err = server.service.open_round(&weighted).await.unwrap_err();
    assert_eq!(err.code, "invalid_round_params", "{}", err.message);

    server.service.open_round(&params).await.unwrap();
    one_dp_round(&server, &ids, 1).await;
    let report: serde_json::Value = api.clone().with_bearer(ADMIN_TOKEN).get_json("/v1/privacy").await.unwrap();
    assert_eq!(report["rounds_released"], 1);
    assert_eq!(report["rounds_remaining"], 0);
    assert!((report["epsilon_spent"].as_f64().unwrap() - one).abs() < 1e-9);
    // Both figures, under the adjacency named: z = 2 holds against any one participant;
    // an outsider faces the sum of t = 2 shares of σ = z·C/√(t − f), z·√2.
    let outsider = epsilon(2.0 * 2f64.sqrt(), 1, 1e-5);
    assert_eq!(report["adjacency"], "zero-out");
    assert!(report["adjacency_explained"].as_str().unwrap().contains("replaced by zeros"));
    assert!((report["epsilon_outsider_spent"].as_f64().unwrap() - outsider).abs() < 1e-9, "{report}");
    assert!(outsider < one);
    assert_eq!(report["per_round"][0]["colluders"], 1);
    assert!((report["per_round"][0]["epsilon_outsider_cumulative"].as_f64().unwrap() - outsider).abs() < 1e-9);
    // The round's report, from the signed log, carries the same.
    let auditor = api.clone().with_bearer(ADMIN_TOKEN);
    let bundle: tessera_attestation::audit::RoundBundle = auditor.get_json("/v1/rounds/1/report").await.unwrap();
    let r = &bundle.report;
    let logged = r.dp.unwrap();
    assert_eq!((logged.colluders, logged.adjacency), (1, tessera_attestation::audit::Adjacency::ZeroOut));
    assert!((r.epsilon_round.unwrap() - one).abs() < 1e-9 && (r.epsilon_outsider_round.unwrap() - outsider).abs() < 1e-9, "{r:?}");
    assert!((r.epsilon_outsider_cumulative.unwrap() - outsider).abs() < 1e-9);
    // The report page and the auditor's CLI show the adjacency and both figures.
    let page = String::from_utf8(auditor.get_bytes("/reports/1").await.unwrap().to_vec()).unwrap();
    for needle in ["zero-out adjacency", "against any one participant", "against outsiders", &format!("{one:.3}"), &format!("{outsider:.3}")] {
        assert!(page.contains(needle), "the report page lacks {needle:?}");
    }
    let out = audit_with_cli(&root.path().join("audit"), &bundle, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find(|l| l.starts_with("privacy: ")).expect("the audit prints the privacy line");
    assert!(
        line.contains("zero-out adjacency")
            && line.contains(&format!("{one:.3} against any 1 participant"))
            && line.contains(&format!("{outsider:.3} against outsiders")),
        "{line}"
    );

    let err = server.service.open_round(&params).await.unwrap_err();
    assert_eq!(err.code, "privacy_budget_exhausted");
    assert!(err.message.contains("past its budget"), "{}", err.message);
    server.stop().await;
}

/// Every institution sends its clipped (and, for Gaussian noise, noised) synthetic update
/// of 50 values; returns what each one was given.
async fn one_dp_round(
    server: &tessera_server::Running,
    ids: &[(std::path::PathBuf, tessera_client::Identity)],
    round: u64,
) -> Vec<tessera_client::RoundReport> {
    let url = format!("https://{}", server.addr);
    let mut tasks = Vec::new();
    for (i, (dir, _)) in ids.iter().enumerate() {
        let identity = tessera_client::Identity::load(dir).unwrap();
        let api = Api::new(&url, server.fingerprint).unwrap();
        let opts = Options { insecure_dev: true, round: Some(round), quiet: true, wait: Duration::from_secs(60), ..Options::default() };
        tasks.push(tokio::spawn(async move {
            participate(&api, &identity, &opts, move |cfg| {
                let mut v = synthetic_update(i, round, 50);
                tessera_client::train::federated::prepare_for_round(&mut v, cfg).expect("DP round");
                Ok((v, 1))
            })
            .await
        }));
    }
    let mut reports = Vec::new();
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Participation::Completed(r) => reports.push(*r),
            other => panic!("{other:?}"),
        }
    }
    reports
}

/// The federation's budget lives in the enclave, sealed when the federation is created:
/// the host cannot reset it by opening a round with other DP parameters or none, by
/// raising it in the configuration and restarting, or by deleting the sealed record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_budget_cannot_be_reset_by_the_host() {
    let one = epsilon(2.0, 1, 1e-5);
    let budget = tessera_enclave::FederationBudget { epsilon: one * 1.01, delta: 1e-5 };
    let dp = DpParams { noise_multiplier: 2.0, l2_clip: 1.0, delta: 1e-5, epsilon_budget: budget.epsilon, colluders: 1, skellam: None };
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 3);
    let params = RoundParams { vector_len: 50, clip: 16.0, max_weight: 1, phase_timeout_ms: 20_000, dp: Some(dp), ..RoundParams::default() };
    let data_dir = root.path().join("server");
    let mut cfg = server_config(&data_dir, "127.0.0.1:0".parse().unwrap(), &ids, params.clone(), 0);
    cfg.privacy = Some(budget);
    let server = tessera_server::spawn(cfg.clone()).await.unwrap();

    // Before anything is spent: a round without DP, with a larger ε or another δ is
    // refused by the enclave, naming the federation's budget.
    let refused = |e: tessera_server::error::ApiError, code: &str, says: &str| {
        assert_eq!(e.code, code, "{}", e.message);
        assert!(e.message.contains(says), "{}", e.message);
    };
    refused(
        server.service.open_round(&RoundParams { dp: None, ..params.clone() }).await.unwrap_err(),
        "privacy_budget",
        "requires differential privacy on every round",
    );
    let larger = RoundParams { dp: Some(DpParams { epsilon_budget: 100.0, ..dp }), ..params.clone() };
    refused(server.service.open_round(&larger).await.unwrap_err(), "privacy_budget", "fixed when it was created");
    let other_delta = RoundParams { dp: Some(DpParams { delta: 1e-3, ..dp }), ..params.clone() };
    refused(server.service.open_round(&other_delta).await.unwrap_err(), "privacy_budget", "fixed when it was created");

    // One round spends the budget; the next is refused inside the enclave.
    server.service.open_round(&params).await.unwrap();
    one_dp_round(&server, &ids, 1).await;
    refused(server.service.open_round(&params).await.unwrap_err(), "privacy_budget_exhausted", "past its budget");
    refused(server.service.open_round(&larger).await.unwrap_err(), "privacy_budget", "fixed when it was created");
    server.stop().await;

    // A larger budget in the configuration changes nothing: the sealed one stays.
    let mut raised = cfg.clone();
    raised.privacy = Some(tessera_enclave::FederationBudget { epsilon: 100.0, delta: 1e-5 });
    let server = tessera_server::spawn(raised.clone()).await.unwrap();
    refused(server.service.open_round(&larger).await.unwrap_err(), "privacy_budget", "ε = 100, δ = 1e-5; the federation's budget, fixed when it was created");
    refused(server.service.open_round(&params).await.unwrap_err(), "privacy_budget_exhausted", "past its budget");
    server.stop().await;

    // Deleting the sealed record does not start a new federation: the start fails.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", data_dir.join("tessera.db").display())).await.unwrap();
    sqlx::query("DELETE FROM kv WHERE key = 'federation'").execute(&pool).await.unwrap();
    pool.close().await;
    let err = tessera_server::spawn(raised).await.unwrap_err().to_string();
    assert!(err.contains("sealed privacy budget is missing"), "{err}");
}

/// Each institution counts its own privacy: a DP round is charged to the ledger in its
/// identity directory before its masked input leaves. A host that wipes the aggregator
/// (a fresh data directory: a new federation with nothing spent) still cannot take an
/// institution past the `max_epsilon` of its DP floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_institution_refuses_rounds_past_its_own_budget_after_the_aggregator_is_reset() {
    use tessera_secagg::floors::{DpFloor, SecurityFloors};
    let one = epsilon(2.0, 1, 1e-5);
    let dp = DpParams { noise_multiplier: 2.0, l2_clip: 1.0, delta: 1e-5, epsilon_budget: one * 1.1, colluders: 1, skellam: None };
    let floors = SecurityFloors {
        dp: Some(DpFloor { min_noise_multiplier: 1.0, max_epsilon: one * 1.2, max_delta: 1e-5, min_colluders: 1, require_exact_noise: false }),
        ..SecurityFloors::default()
    };
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 3);
    let params = RoundParams { vector_len: 50, clip: 16.0, max_weight: 1, phase_timeout_ms: 20_000, dp: Some(dp), ..RoundParams::default() };
    let run = |server: &tessera_server::Running| {
        let url = format!("https://{}", server.addr);
        let fingerprint = server.fingerprint;
        let tasks: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, (dir, _))| {
                let identity = tessera_client::Identity::load(dir).unwrap();
                let api = Api::new(&url, fingerprint).unwrap();
                let opts = Options {
                    insecure_dev: true,
                    round: Some(1),
                    quiet: true,
                    wait: Duration::from_secs(60),
                    floors: floors.clone(),
                    ledger: Some(dir.join("privacy-ledger.json")),
                    ..Options::default()
                };
                tokio::spawn(async move {
                    participate(&api, &identity, &opts, move |cfg| {
                        let mut v = synthetic_update(i, 1, 50);
                        tessera_client::train::federated::prepare_for_round(&mut v, cfg).expect("DP round");
                        Ok((v, 1))
                    })
                    .await
                })
            })
            .collect();
        tasks
    };

    let first = tessera_server::spawn(server_config(&root.path().join("server-a"), "127.0.0.1:0".parse().unwrap(), &ids, params.clone(), 1)).await.unwrap();
    for t in run(&first) {
        assert!(matches!(t.await.unwrap().unwrap(), Participation::Completed(_)));
    }
    first.stop().await;
    for (dir, _) in &ids {
        let ledger = tessera_client::ledger::PrivacyLedger::load(&dir.join("privacy-ledger.json")).unwrap();
        assert_eq!(ledger.contributions.len(), 1);
        assert!((ledger.spent(1e-5) - one).abs() < 1e-9);
    }

    // The host starts over with a new data directory: the aggregator's books are empty,
    // the institutions' are not.
    let reset = tessera_server::spawn(server_config(&root.path().join("server-b"), "127.0.0.1:0".parse().unwrap(), &ids, params, 1)).await.unwrap();
    for t in run(&reset) {
        let err = t.await.unwrap().unwrap_err();
        assert!(matches!(err, tessera_client::ParticipateError::Ledger(tessera_client::ledger::LedgerError::OwnBudgetExhausted { round: 1, .. })), "{err}");
        assert!(err.to_string().contains("by its own ledger, past its budget"), "{err}");
    }
    let status: serde_json::Value = Api::new(&format!("https://{}", reset.addr), reset.fingerprint).unwrap().get_json("/v1/rounds/1").await.unwrap();
    assert_eq!(status["phase"], "advertise_keys", "{status}");
    assert_eq!(status["admission"].as_array().map(Vec::len), Some(0), "nothing was sent: {status}");
    reset.stop().await;
}

/// A federation whose schedule asks for Skellam noise: each round states the scale it was
/// given, every institution draws its share in the integers, the release is the mean of
/// the clipped updates plus that noise, and every ledger (the server's report, the signed
/// log, the enclave's budget) charges the Skellam release, not a Gaussian at the same z.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_skellam_round_is_released_and_charged_as_skellam() {
    const M: usize = 50;
    let sk = tessera_secagg::dp::SkellamNoise { scale: None, beta: tessera_secagg::dp::default_beta() };
    let dp = DpParams { noise_multiplier: 0.5, l2_clip: 1.0, delta: 1e-5, epsilon_budget: 1e6, colluders: 1, skellam: Some(sk) };
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 3);
    let params =
        RoundParams { vector_len: M as u32, clip: 1.0, max_weight: 1, modulus_bits: 16, phase_timeout_ms: 20_000, dp: Some(dp), ..RoundParams::default() };
    // The budget affords one such round: computed from the configuration the server gives it.
    let server = tessera_server::spawn(server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, params.clone(), 0)).await.unwrap();
    let cfg = server.service.open_round(&params).await.unwrap();
    let stated = cfg.dp.unwrap().skellam.unwrap();
    assert_eq!(stated.scale, Some(cfg.skellam_scale().unwrap()), "the round states the scale that fits");
    let m = cfg.dp_mechanism(tessera_secagg::dp::Against::Coalition).unwrap();
    let tessera_secagg::dp::Mechanism::Skellam(release) = m else { panic!("{m:?}") };
    let one = release.epsilon(1e-5).unwrap().0;
    assert!(one > epsilon(0.5, 1, 1e-5), "rounding at 16 bits costs something: {one}");
    server.stop().await;

    let params = RoundParams { dp: Some(DpParams { epsilon_budget: one * 1.01, ..dp }), ..params };
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 3);
    let server = tessera_server::spawn(server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, params.clone(), 0)).await.unwrap();
    let url = format!("https://{}", server.addr);
    let cfg = server.service.open_round(&params).await.unwrap();
    let means: Vec<Vec<f32>> = one_dp_round(&server, &ids, 1).await.into_iter().map(|r| std::sync::Arc::unwrap_or_clone(r.release.mean)).collect();
    // Every institution holds the same release: the mean of the clipped updates plus the
    // summed integer noise (3 shares of σ = z·C/√(t − f), over 3).
    assert!(means.iter().all(|m| *m == means[0]));
    let clipped: Vec<Vec<f32>> = (0..3)
        .map(|i| {
            let mut v = synthetic_update(i, 1, M);
            tessera_client::train::privacy::clip_l2(&mut v, 1.0);
            v
        })
        .collect();
    let sd = dp.client_noise_std(cfg.min_survivors) * 3f64.sqrt() / 3.0;
    let errors: Vec<f64> = (0..M).map(|j| f64::from(means[0][j]) - clipped.iter().map(|v| f64::from(v[j])).sum::<f64>() / 3.0).collect();
    assert!(errors.iter().all(|e| e.abs() < 6.0 * sd), "{errors:?} vs σ {sd}");
    let measured = (errors.iter().map(|e| e * e).sum::<f64>() / M as f64).sqrt();
    assert!(measured > 0.6 * sd && measured < 1.5 * sd, "noise sd {measured} vs {sd}");

    let api = Api::new(&url, server.fingerprint).unwrap().with_bearer(ADMIN_TOKEN);
    let report: serde_json::Value = api.get_json("/v1/privacy").await.unwrap();
    assert!((report["epsilon_spent"].as_f64().unwrap() - one).abs() < 1e-9, "{report}");
    assert_eq!(report["per_round"][0]["noise"], "skellam");
    assert_eq!(report["rounds_remaining"], 0);
    let bundle: tessera_attestation::audit::RoundBundle = api.get_json("/v1/rounds/1/report").await.unwrap();
    let r = &bundle.report;
    let logged = r.dp.unwrap().skellam.expect("the log records the Skellam parameters");
    assert_eq!((Some(logged.scale), logged.beta, logged.dim), (stated.scale, stated.beta, M as u64));
    assert!((r.epsilon_round.unwrap() - one).abs() < 1e-9, "{r:?}");
    let page = String::from_utf8(api.get_bytes("/reports/1").await.unwrap().to_vec()).unwrap();
    assert!(page.contains("Skellam shares drawn in the integers"), "the report page names the noise");
    let out = audit_with_cli(&root.path().join("audit"), &bundle, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.lines().any(|l| l.starts_with("privacy: ") && l.contains("Skellam noise")), "{stdout}");
    // The enclave charges the next round as Skellam too: it does not fit.
    let err = server.service.open_round(&params).await.unwrap_err();
    assert_eq!(err.code, "privacy_budget_exhausted", "{}", err.message);
    server.stop().await;
}
