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
    let dp = DpParams { noise_multiplier: 2.0, l2_clip: 1.0, delta: 1e-5, epsilon_budget: one * 1.01 };
    assert_eq!(dp.max_rounds(), 1);
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 3);
    let params = RoundParams { vector_len: 50, clip: 8.0, max_weight: 1, phase_timeout_ms: 20_000, dp: Some(dp), ..RoundParams::default() };
    let server = tessera_server::spawn(server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, params.clone(), 0)).await.unwrap();
    let url = format!("https://{}", server.addr);
    let api = Api::new(&url, server.fingerprint).unwrap();

    let weighted = RoundParams { max_weight: 10, ..params.clone() };
    let err = server.service.open_round(&weighted).await.unwrap_err();
    assert_eq!(err.code, "invalid_round_params", "{}", err.message);

    server.service.open_round(&params).await.unwrap();
    let mut tasks = Vec::new();
    for (i, (dir, _)) in ids.iter().enumerate() {
        let identity = tessera_client::Identity::load(dir).unwrap();
        let api = Api::new(&url, server.fingerprint).unwrap();
        let opts = Options { insecure_dev: true, round: Some(1), quiet: true, wait: Duration::from_secs(60), ..Options::default() };
        tasks.push(tokio::spawn(async move {
            participate(&api, &identity, &opts, move |cfg| {
                let mut v = synthetic_update(i, 1, 50);
                tessera_client::train::federated::prepare_for_round(&mut v, cfg).expect("DP round");
                Ok((v, 1))
            })
            .await
        }));
    }
    for t in tasks {
        assert!(matches!(t.await.unwrap().unwrap(), Participation::Completed(_)));
    }
    let report: serde_json::Value = api.clone().with_bearer(ADMIN_TOKEN).get_json("/v1/privacy").await.unwrap();
    assert_eq!(report["rounds_released"], 1);
    assert_eq!(report["rounds_remaining"], 0);
    assert!((report["epsilon_spent"].as_f64().unwrap() - one).abs() < 1e-9);

    let err = server.service.open_round(&params).await.unwrap_err();
    assert_eq!(err.code, "privacy_budget_exhausted");
    assert!(err.message.contains("past its budget"), "{}", err.message);
    server.stop().await;
}
