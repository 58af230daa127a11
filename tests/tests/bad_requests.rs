//! Malformed, replayed, forged, oversized and wrong-round requests get a 4xx with a
//! typed JSON error body, and the round they were thrown at completes unaffected.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use rand::rngs::OsRng;
use tessera_client::http::HttpError;
use tessera_client::{participate, Api, Options, Participation};
use tessera_secagg::client::Client;
use tessera_secagg::wire::MaskedInput;
use tessera_secagg::{ClientId, RoundConfig};
use tessera_server::config::RoundParams;
use tessera_tests::*;

const N: usize = 4;
const M: usize = 64;

fn status_code(e: &HttpError) -> (u16, &str) {
    match e {
        HttpError::Status { status, code, body, .. } => {
            let parsed: serde_json::Value = serde_json::from_str(body).expect("error bodies are JSON");
            assert_eq!(parsed["error"].as_str(), Some(code.as_str()));
            assert!(parsed["message"].as_str().is_some_and(|m| !m.is_empty()));
            (status.as_u16(), code)
        }
        other => panic!("expected an HTTP status, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_are_refused_and_the_round_is_unaffected() {
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), N);
    let params = RoundParams { vector_len: M as u32, max_weight: 100, phase_timeout_ms: 20_000, ..RoundParams::default() };
    let cfg = server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, params, 1);
    let server = tessera_server::spawn(cfg).await.unwrap();
    let url = format!("https://{}", server.addr);
    let api = Api::new(&url, server.fingerprint).unwrap();
    let post = |path: &str, ct: &'static str, body: Vec<u8>| {
        let api = api.clone();
        let path = path.to_string();
        async move { api.request(Method::POST, path, Some((ct, body.into()))).await.unwrap_err() }
    };

    // Wait for the scheduled round.
    let status: serde_json::Value = loop {
        if let Ok(s) = api.get_json::<serde_json::Value>("/v1/rounds/current").await {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let cfg: RoundConfig = serde_json::from_value(status["config"].clone()).unwrap();

    assert_eq!(status_code(&post("/v1/rounds/1/advertise", "application/json", b"{not json".to_vec()).await), (400, "malformed"));
    assert_eq!(status_code(&post("/v1/rounds/1/advertise", "application/json", b"{\"round\":1}".to_vec()).await), (400, "malformed"));
    assert_eq!(status_code(&post("/v1/rounds/7/advertise", "application/json", b"{}".to_vec()).await), (409, "wrong_round"));
    assert_eq!(status_code(&api.get_bytes("/v1/rounds/1/key-directory/0").await.unwrap_err()), (425, "not_ready"));
    assert_eq!(status_code(&api.get_bytes("/v1/nowhere").await.unwrap_err()), (404, "not_found"));
    assert_eq!(status_code(&api.get_bytes("/v1/rounds/99").await.unwrap_err()), (404, "unknown_round"));
    assert_eq!(status_code(&api.get_bytes("/v1/rounds/notanumber").await.unwrap_err()).0, 400);
    assert_eq!(status_code(&post("/v1/rounds", "application/json", b"{}".to_vec()).await), (401, "unauthenticated"));

    // Oversized bodies are refused before they are buffered.
    let limit = MaskedInput::encoded_len(cfg.masked_len(), cfg.modulus_bits);
    assert_eq!(status_code(&post("/v1/rounds/1/masked-input", "application/octet-stream", vec![0u8; limit + 1]).await), (413, "body_too_large"));
    // A body far over the limit is answered 413 from its Content-Length before it is read;
    // a client still writing it may see the connection close instead of the status.
    match post("/v1/rounds/1/share-keys", "application/json", vec![b' '; 5 << 20]).await {
        e @ HttpError::Status { .. } => assert_eq!(status_code(&e), (413, "body_too_large")),
        HttpError::Exchange(_) => {}
        other => panic!("unexpected {other}"),
    }
    assert!(api.get_bytes("/v1/health").await.is_ok(), "the server is unaffected");
    assert_eq!(status_code(&post("/v1/rounds/1/masked-input", "application/octet-stream", b"TSMI garbage".to_vec()).await), (400, "malformed"));

    // A forged advertisement (bad signature), then a genuine one replayed.
    let identity0 = tessera_client::Identity::load(&ids[0].0).unwrap();
    let c0 = Client::new(cfg.clone(), ClientId(0), identity0.key.clone() as Arc<_>, &dev_trust(&api, &status).await, &mut OsRng).unwrap();
    let mut forged = c0.advertise(vec![]);
    forged.signature[3] ^= 1;
    assert_eq!(status_code(&api.post_json("/v1/rounds/1/advertise", &forged).await.unwrap_err()), (401, "bad_signature"));
    // Evidence missing: refused by admission, with the verdict in the body.
    let err = api.post_json("/v1/rounds/1/advertise", &c0.advertise(vec![])).await.unwrap_err();
    assert_eq!(status_code(&err), (403, "not_admitted"));
    assert!(matches!(&err, HttpError::Status { body, .. } if body.contains("missing_evidence")), "{err}");
    // A message for another round inside the right path.
    let mut other_round_cfg = cfg.clone();
    other_round_cfg.round = 5;
    let mut stale = c0.advertise(vec![]);
    stale.round = other_round_cfg.round;
    stale.signature = tessera_secagg::crypto::MessageSigner::sign(&*identity0.key, stale.transcript(&other_round_cfg.digest()).as_bytes());
    assert_eq!(status_code(&api.post_json("/v1/rounds/1/advertise", &stale).await.unwrap_err()), (409, "wrong_round"));

    // The honest round still completes with everyone.
    let updates: Vec<(Vec<f32>, u32)> = (0..N).map(|i| (synthetic_update(i, 1, M), 3 + i as u32)).collect();
    let mut tasks = Vec::new();
    for (i, (dir, _)) in ids.iter().enumerate() {
        let identity = tessera_client::Identity::load(dir).unwrap();
        let api = api.clone();
        let update = updates[i].clone();
        let opts = Options { insecure_dev: true, wait: Duration::from_secs(120), round: Some(1), quiet: true, ..Options::default() };
        tasks.push(tokio::spawn(async move { participate(&api, &identity, &opts, move |_| Ok(update)).await }));
    }
    let mut release = None;
    for t in tasks {
        if let Participation::Completed(r) = t.await.unwrap().unwrap() {
            release = Some(r.release);
        }
    }
    let release = release.unwrap();
    assert_eq!(release.included.len(), N);
    let want = fedavg(&updates, &(0..N).collect::<Vec<_>>());
    let max_err = release.mean.iter().zip(&want).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
    assert!(max_err <= release.error_bound + 1e-6);
    // After the round: a forged advertisement for an admitted client is refused for its
    // signature before the round's state is consulted (checked outside the round's
    // lock); a genuinely signed conflicting one is refused as equivocation.
    assert_eq!(status_code(&api.post_json("/v1/rounds/1/advertise", &forged).await.unwrap_err()), (401, "bad_signature"));
    assert_eq!(status_code(&api.post_json("/v1/rounds/1/advertise", &c0.advertise(vec![])).await.unwrap_err()), (409, "duplicate"));
    // An unsigned masked input for an included client, sent to the finished round, is
    // refused for its signature before anything else, and changes nothing.
    assert_eq!(
        status_code(
            &post(
                "/v1/rounds/1/masked-input",
                "application/octet-stream",
                MaskedInput {
                    round: 1,
                    client: ClientId(2),
                    data: vec![0; cfg.masked_len()],
                    bits: cfg.modulus_bits,
                    signature: [0; 64],
                    record_privacy: None,
                    base_version: None
                }
                .encode()
            )
            .await
        ),
        (401, "bad_signature")
    );
    server.stop().await;
}
