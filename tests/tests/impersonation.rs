//! A host that holds a copy of everything the server keeps on disk. In dev mode that is
//! everything (the sealing key is a file), so it can unseal the TLS key and run a proxy
//! that terminates TLS under the pinned key, forwards the nonce check to the real
//! enclave, and rewrites protocol messages. The second wall holds: every aggregator
//! message is signed by the enclave's identity key, so a rewritten round configuration
//! or share bundle is refused before the institution sends anything more. (Outside dev
//! mode the TLS key does not unseal at all; `tee_backend.rs` checks that.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tessera_client::http::HttpError;
use tessera_client::{participate, Api, Options, ParticipateError, Participation};
use tessera_secagg::wire::ShareBundle;
use tessera_secagg::{ClientId, Error, ProtocolError};
use tessera_server::config::RoundParams;
use tessera_tests::*;

/// What the proxy rewrites.
#[derive(Clone, Copy)]
enum Lie {
    /// `min_survivors` lowered to 1 in the round status.
    Threshold,
    /// The victim's U2 padded with ids outside U1 and its shares dropped (the review's attack).
    PaddedU2,
}

struct Proxy {
    upstream: Api,
    lie: Lie,
}

async fn forward(proxy: Arc<Proxy>, method: Method, uri: Uri, body: Bytes) -> Response {
    let path = uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
    // Rewrites match the route; the query (a long-poll's `?wait=`) is forwarded as is.
    let route = uri.path().to_string();
    let payload = (!body.is_empty()).then(|| {
        let ct = if route.ends_with("/masked-input") { "application/octet-stream" } else { "application/json" };
        (ct, body)
    });
    let answer = match proxy.upstream.request(method, path.clone(), payload).await {
        Ok(bytes) => bytes,
        Err(HttpError::Status { status, body, .. }) => return (status, body).into_response(),
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let rewritten = match proxy.lie {
        Lie::Threshold if route == "/v1/rounds/current" => {
            let mut v: serde_json::Value = serde_json::from_slice(&answer).unwrap();
            v["config"]["min_survivors"] = 1.into();
            serde_json::to_vec(&v).unwrap()
        }
        Lie::PaddedU2 if route.ends_with("/share-bundle/0") => {
            let mut b: ShareBundle = serde_json::from_slice(&answer).unwrap();
            b.shared = vec![ClientId(0), ClientId(70), ClientId(71)];
            b.shares.clear();
            serde_json::to_vec(&b).unwrap()
        }
        _ => answer.to_vec(),
    };
    (StatusCode::OK, [("content-type", "application/json")], rewritten).into_response()
}

/// Starts the host's proxy under the server's own TLS key, unsealed from a copy of the
/// data directory.
async fn start_proxy(data_dir: &std::path::Path, upstream: Api, lie: Lie) -> std::net::SocketAddr {
    let stolen = std::env::temp_dir().join(format!("tessera-stolen-{}-{}", std::process::id(), lie as u8));
    let _ = std::fs::remove_dir_all(&stolen);
    std::fs::create_dir_all(&stolen).unwrap();
    for f in ["key.sealed", "cert.pem"] {
        std::fs::copy(data_dir.join("tls").join(f), stolen.join(f)).unwrap();
    }
    let sealing = tessera_enclave::SealingKey::load_or_create_dev(&data_dir.join("dev-sealing.key")).unwrap();
    let key = tessera_server::tls::load_or_create_key(&stolen, &sealing).unwrap();
    assert_eq!(key.spki_sha256, upstream.fingerprint(), "the host holds the pinned key");
    let identity = tessera_server::tls::issue_certificate(&key, None).unwrap();
    let tls = tessera_server::tls::server_config(tessera_server::tls::RotatingCertificate::new(&identity).unwrap()).unwrap();
    let proxy = Arc::new(Proxy { upstream, lie });
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| forward(proxy.clone(), method, uri, body));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tessera_server::tls::serve(listener, tls, app, Default::default(), Default::default(), std::future::pending()));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_with_the_tls_key_cannot_speak_for_the_enclave() {
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 4);
    let params = RoundParams { vector_len: 8, min_survivors: 3, phase_timeout_ms: 2_000, ..RoundParams::default() };
    let data_dir = root.path().join("server");
    let server = tessera_server::spawn(server_config(&data_dir, "127.0.0.1:0".parse().unwrap(), &ids, params, 1)).await.unwrap();
    let url = format!("https://{}", server.addr);

    // Institution 1 joins through a proxy that lowers the threshold, institution 0 through
    // one that pads its U2; institutions 2 and 3 talk to the server directly.
    let threshold_proxy = start_proxy(&data_dir, Api::new(&url, server.fingerprint).unwrap(), Lie::Threshold).await;
    let padding_proxy = start_proxy(&data_dir, Api::new(&url, server.fingerprint).unwrap(), Lie::PaddedU2).await;
    let mut tasks = Vec::new();
    for (i, (dir, _)) in ids.iter().enumerate() {
        let identity = tessera_client::Identity::load(dir).unwrap();
        let addr = match i {
            0 => format!("https://{padding_proxy}"),
            1 => format!("https://{threshold_proxy}"),
            _ => url.clone(),
        };
        let api = Api::new(&addr, server.fingerprint).unwrap();
        let opts = Options { insecure_dev: true, round: Some(1), quiet: true, wait: Duration::from_secs(30), ..Options::default() };
        let update = (synthetic_update(i, 1, 8), 1);
        tasks.push(tokio::spawn(async move { participate(&api, &identity, &opts, move |_| Ok(update)).await }));
    }
    let results: Vec<Result<Participation, ParticipateError>> = futures_join(tasks).await;
    let refused = |r: &Result<Participation, ParticipateError>| match r {
        Err(ParticipateError::Protocol(Error::Protocol(ProtocolError::BadAggregatorSignature { message }))) => Some(*message),
        _ => None,
    };
    assert_eq!(refused(&results[0]), Some("share bundle"), "{:?}", results[0].as_ref().err());
    assert_eq!(refused(&results[1]), Some("round configuration"), "{:?}", results[1].as_ref().err());
    // The others see the round fail for want of survivors, not a release that includes
    // a victim unmasked on its own.
    for r in &results[2..] {
        assert!(matches!(r, Err(ParticipateError::Aborted { .. })), "{:?}", r.as_ref().ok());
    }
    server.stop().await;
}

async fn futures_join<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}
