//! Node admission over TLS: the aggregator refuses clients whose evidence is missing,
//! replayed (bound to other keys) or debug-mode, says why, and a round whose admitted
//! clients fall short of t aborts without releasing anything.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::OsRng;
use tessera_attestation::dev::DevAttester;
use tessera_attestation::Attester;
use tessera_client::http::HttpError;
use tessera_client::{participate, Api, Options, ParticipateError};
use tessera_secagg::client::Client;
use tessera_secagg::{ClientId, RoundConfig};
use tessera_server::config::RoundParams;
use tessera_tests::*;

fn refusal(e: HttpError) -> serde_json::Value {
    match e {
        HttpError::Status { status, code, body, .. } => {
            assert_eq!((status.as_u16(), code.as_str()), (403, "not_admitted"));
            serde_json::from_str(&body).unwrap()
        }
        other => panic!("expected a refusal, got {other}"),
    }
}

/// The open round's status, once the server has opened it.
async fn open_round(api: &Api) -> serde_json::Value {
    loop {
        if let Ok(s) = api.get_json::<serde_json::Value>("/v1/rounds/current").await {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unattested_clients_are_refused_and_the_round_cannot_reach_t() {
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 3);
    let params = RoundParams { vector_len: 8, min_survivors: 3, phase_timeout_ms: 3_000, ..RoundParams::default() };
    let cfg = server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, params, 1);
    let server = tessera_server::spawn(cfg).await.unwrap();
    let api = Api::new(&format!("https://{}", server.addr), server.fingerprint).unwrap();
    let status = open_round(&api).await;
    let cfg: RoundConfig = serde_json::from_value(status["config"].clone()).unwrap();
    let trust = dev_trust(&api, &status).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();

    // Institution 2 tries with evidence replayed from another client's keys, then with
    // debug-mode evidence: both refused with the failed check named.
    let id2 = tessera_client::Identity::load(&ids[2].0).unwrap();
    let c2 = Client::new(cfg.clone(), ClientId(2), id2.key.clone() as Arc<_>, &trust, &mut OsRng).unwrap();
    let id1 = tessera_client::Identity::load(&ids[1].0).unwrap();
    let c1 = Client::new(cfg.clone(), ClientId(1), id1.key.clone() as Arc<_>, &trust, &mut OsRng).unwrap();
    let replayed = DevAttester::new([3; 32], [4; 48], false).attest(&c1.key_binding(), now).unwrap();
    let body = refusal(api.post_json("/v1/rounds/1/advertise", &c2.advertise(replayed)).await.unwrap_err());
    assert_eq!(body["verdict"]["failures"][0]["check"], "report_data_mismatch", "{body}");
    let debug = DevAttester::new([3; 32], [4; 48], true).attest(&c2.key_binding(), now).unwrap();
    let body = refusal(api.post_json("/v1/rounds/1/advertise", &c2.advertise(debug)).await.unwrap_err());
    assert_eq!(body["verdict"]["failures"][0]["check"], "debug_mode", "{body}");

    // The two honest institutions join; with t = 3 the round cannot start.
    let mut tasks = Vec::new();
    for (dir, _) in &ids[..2] {
        let identity = tessera_client::Identity::load(dir).unwrap();
        let api = api.clone();
        let opts = Options { insecure_dev: true, round: Some(1), quiet: true, wait: Duration::from_secs(60), ..Options::default() };
        tasks.push(tokio::spawn(async move { participate(&api, &identity, &opts, |_| Ok((vec![0.1; 8], 1))).await }));
    }
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(matches!(err, ParticipateError::Aborted { round: 1, .. }), "{err}");
    }
    let status: serde_json::Value = api.get_json("/v1/rounds/1").await.unwrap();
    assert_eq!(status["phase"], "aborted");
    assert!(status["outcome"].as_str().unwrap().contains("threshold is 3"), "{status}");
    let admission = status["admission"].as_array().unwrap();
    assert_eq!(admission.iter().filter(|a| a["accepted"] == false).count(), 1, "{status}");
    let err = api.get_bytes("/v1/rounds/1/result").await.unwrap_err();
    assert!(matches!(&err, HttpError::Status { status, .. } if status.as_u16() == 410), "{err}");
    server.stop().await;
}

/// A restart rebuilds the round by replaying its stored (accepted) messages; a refused
/// advertisement is not among them, but its verdict stays in the round status, read
/// back from the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_admission_stays_in_the_round_status_after_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 3);
    let params = RoundParams { vector_len: 8, phase_timeout_ms: 60_000, advertise_timeout_ms: 120_000, ..RoundParams::default() };
    let cfg = server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, params, 1);
    let server = tessera_server::spawn(cfg.clone()).await.unwrap();
    let api = Api::new(&format!("https://{}", server.addr), server.fingerprint).unwrap();
    let status = open_round(&api).await;
    let round_cfg: RoundConfig = serde_json::from_value(status["config"].clone()).unwrap();
    let trust = dev_trust(&api, &status).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let client = |i: usize| {
        let id = tessera_client::Identity::load(&ids[i].0).unwrap();
        Client::new(round_cfg.clone(), ClientId(i as u32), id.key.clone() as Arc<_>, &trust, &mut OsRng).unwrap()
    };
    let (c0, c2) = (client(0), client(2));
    let good = DevAttester::new([1; 32], [4; 48], false).attest(&c0.key_binding(), now).unwrap();
    api.post_json("/v1/rounds/1/advertise", &c0.advertise(good)).await.unwrap();
    let debug = DevAttester::new([3; 32], [4; 48], true).attest(&c2.key_binding(), now).unwrap();
    let body = refusal(api.post_json("/v1/rounds/1/advertise", &c2.advertise(debug)).await.unwrap_err());
    assert_eq!(body["verdict"]["failures"][0]["check"], "debug_mode", "{body}");
    let verdicts = |s: &serde_json::Value| -> Vec<(u64, bool)> {
        s["admission"].as_array().unwrap().iter().map(|a| (a["client"].as_u64().unwrap(), a["accepted"].as_bool().unwrap())).collect()
    };
    let before: serde_json::Value = api.get_json("/v1/rounds/1").await.unwrap();
    assert_eq!(verdicts(&before), vec![(0, true), (2, false)], "{before}");

    server.stop().await;
    let server = tessera_server::spawn(cfg).await.unwrap();
    let api = Api::new(&format!("https://{}", server.addr), server.fingerprint).unwrap();
    let after: serde_json::Value = api.get_json("/v1/rounds/1").await.unwrap();
    assert_eq!(after["phase"], "advertise_keys", "{after}");
    assert_eq!(verdicts(&after), vec![(0, true), (2, false)], "the refusal is read back from the log: {after}");
    let reasons = after["admission"][1]["reasons"].as_str().unwrap();
    assert!(reasons.contains("debug"), "{reasons}");
    server.stop().await;
}
