//! What a peer can hold of the server before it has proved anything: a connection slot
//! (capped: further connections are closed before the handshake), a request whose
//! headers never finish (closed after `header_read_timeout_ms`) and a body that never
//! finishes (408 after `body_read_timeout_ms`), and an upload slot (at most
//! `uploads_in_flight` masked inputs are received at once).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tessera_client::Api;
use tessera_server::config::{Limits, RoundParams};
use tessera_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn server_with(limits: Limits) -> (tessera_server::Running, tempfile::TempDir) {
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 3);
    let mut cfg = server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, RoundParams { vector_len: 8, ..RoundParams::default() }, 0);
    cfg.limits = limits;
    (tessera_server::spawn(cfg).await.unwrap(), root)
}

/// Reads until the server closes the connection (or 5 s pass); returns what it sent.
async fn until_closed(tls: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut got)).await.expect("the server closes the connection");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_headers_and_slow_bodies_are_cut_off() {
    let (server, _root) = server_with(Limits { header_read_timeout_ms: 300, body_read_timeout_ms: 300, ..Limits::default() }).await;
    let api = Api::new(&format!("https://{}", server.addr), server.fingerprint).unwrap();

    // Headers that never finish (slowloris): the connection is closed.
    let mut tls = api.connect_tls().await.unwrap();
    tls.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let start = Instant::now();
    until_closed(&mut tls).await;
    assert!(start.elapsed() >= Duration::from_millis(250), "closed after {:?}", start.elapsed());

    // A body that never finishes: 408 with a typed error, then the connection ends.
    let mut tls = api.connect_tls().await.unwrap();
    tls.write_all(b"POST /v1/rounds/1/advertise HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"a").await.unwrap();
    let start = Instant::now();
    let got = String::from_utf8_lossy(&until_closed(&mut tls).await).into_owned();
    assert!(got.starts_with("HTTP/1.1 408") && got.contains("body_timeout"), "{got}");
    assert!(start.elapsed() >= Duration::from_millis(250));

    // A request that arrives in time is served as usual.
    let health: serde_json::Value = api.get_json("/v1/health").await.unwrap();
    assert_eq!(health["status"], "ok");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_past_the_cap_are_closed_before_the_handshake() {
    let (server, _root) = server_with(Limits { max_connections: 3, ..Limits::default() }).await;
    let api = Api::new(&format!("https://{}", server.addr), server.fingerprint).unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(api.connect_tls().await.unwrap());
    }
    // The fourth is refused: the server closes it without a handshake.
    let err = api.connect_tls().await.unwrap_err();
    assert!(matches!(err, tessera_client::http::HttpError::Connect { .. }), "{err}");
    // A slot freed is a slot available again.
    drop(held.pop());
    let mut served = false;
    for _ in 0..50 {
        if let Ok(v) = api.get_json::<serde_json::Value>("/v1/health").await {
            served = v["status"] == "ok";
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "a connection is served once a slot is free");
    server.stop().await;
}

/// A flood of unauthenticated requests is counted, not listed one by one, so it neither
/// fills the denial queue nor pushes an authenticated caller's refusal out of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_anonymous_refusals_does_not_hide_real_ones() {
    use sha2::Digest;
    use tessera_server::auth::{AccessGrant, Role};
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 3);
    let mut cfg = server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, RoundParams { vector_len: 8, ..RoundParams::default() }, 0);
    let grant = |name: &str, role, institution: Option<&str>, token: &str| AccessGrant {
        name: name.into(),
        role,
        institution: institution.map(str::to_string),
        token_sha256: Some(hex::encode(sha2::Sha256::digest(token.as_bytes()))),
        client_cert_spki_sha256: None,
    };
    cfg.access = vec![
        grant("auditor", Role::Auditor, None, "auditor-token-0123456789"),
        grant("clinic", Role::Institution, Some(&ids[0].1.name), "clinic-token-0123456789"),
    ];
    let server = tessera_server::spawn(cfg).await.unwrap();
    let api = Api::new(&format!("https://{}", server.addr), server.fingerprint).unwrap();
    let flood = tessera_server::service::ANONYMOUS_DENIALS_PER_MINUTE as usize * 3;
    let mut tasks = Vec::new();
    for _ in 0..flood {
        let api = api.clone();
        tasks.push(tokio::spawn(async move { api.get_json::<serde_json::Value>("/v1/rounds").await.is_err() }));
    }
    for t in tasks {
        assert!(t.await.unwrap(), "anonymous reads are refused");
    }
    // The institution asks for the denial log, which it may not read: a real refusal.
    assert!(api.clone().with_bearer("clinic-token-0123456789").get_json::<serde_json::Value>("/v1/denials").await.is_err());
    let auditor = api.clone().with_bearer("auditor-token-0123456789");
    let mut listed = serde_json::Value::Null;
    for _ in 0..50 {
        listed = auditor.get_json("/v1/denials?limit=1000").await.unwrap();
        if listed.as_array().unwrap().iter().any(|d| d["principal"].is_string()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = listed.as_array().unwrap();
    assert!(rows.iter().any(|d| d["status"] == 403 && d["path"] == "/v1/denials" && d["principal"].is_string()), "{listed}");
    let anonymous = rows.iter().filter(|d| d["principal"].is_null()).count();
    // Two minutes can be touched by the flood: at most the allowance of each, plus a summary.
    let cap = 2 * tessera_server::service::ANONYMOUS_DENIALS_PER_MINUTE as usize + 1;
    assert!(anonymous <= cap && anonymous < flood, "{anonymous} anonymous rows for a flood of {flood}");
    server.stop().await;
}

/// Masked inputs received at once are capped at `uploads_in_flight`: past it an upload
/// waits for a permit (and is answered 503 `uploads_busy` after 30 s, which
/// `service.rs::uploads_past_the_limit_wait_then_get_503` shows), and one that ends,
/// even by its sender leaving, lets the next in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_past_the_cap_wait_for_one_to_end() {
    let (server, _root) = server_with(Limits { uploads_in_flight: 1, ..Limits::default() }).await;
    let api = Api::new(&format!("https://{}", server.addr), server.fingerprint).unwrap();
    api.clone().with_bearer(ADMIN_TOKEN).post_json("/v1/rounds", &RoundParams { vector_len: 8, ..RoundParams::default() }).await.unwrap();
    // A slow upload holds the only permit: its headers and the first bytes of its body.
    let mut slow = api.connect_tls().await.unwrap();
    slow.write_all(b"POST /v1/rounds/1/masked-input HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 100\r\n\r\nTSR")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = tokio::spawn({
        let api = api.clone();
        async move { api.post_bytes("/v1/rounds/1/masked-input", vec![0u8; 100]).await }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!second.is_finished(), "the second upload waits while the first holds the permit");
    drop(slow);
    let answer = tokio::time::timeout(Duration::from_secs(10), second).await.expect("answered once the permit is free").unwrap();
    // Read and refused on its merits (not a masked input), not as busy.
    let err = answer.unwrap_err();
    assert_eq!(err.code(), Some("malformed"), "{err}");
    server.stop().await;
}
