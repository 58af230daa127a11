//! Waiting without polling storms: a read of a phase's data parks on the server until
//! the phase is ready (`?wait=SECONDS`), and each institution keeps one TLS connection
//! for the whole round, so the server's certificate and evidence are verified once per
//! connection rather than once per request.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tessera_client::http::HttpError;
use tessera_client::{participate, Api, Options, Participation};
use tessera_server::config::RoundParams;
use tessera_tests::*;

const N: usize = 3;
const M: usize = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_park_until_the_phase_is_ready_over_one_connection_per_institution() {
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), N);
    let params = RoundParams { vector_len: M as u32, clip: 1.0, max_weight: 100, phase_timeout_ms: 20_000, ..RoundParams::default() };
    let server = tessera_server::spawn(server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, params.clone(), 0)).await.unwrap();
    let url = format!("https://{}", server.addr);
    server.service.open_round(&params).await.unwrap();
    let observer = Api::new(&url, server.fingerprint).unwrap();

    // Nothing is ready yet: without a wait the answer is immediate, with one it is
    // `not_ready` only once the wait has passed.
    let err = observer.get_bytes("/v1/rounds/1/key-directory/0").await.unwrap_err();
    assert_eq!(err.code(), Some("not_ready"), "{err}");
    let t = Instant::now();
    let err = observer.get_bytes("/v1/rounds/1/key-directory/0?wait=1").await.unwrap_err();
    assert_eq!(err.code(), Some("not_ready"), "{err}");
    assert!(t.elapsed() >= Duration::from_millis(900), "answered after {:?}, before its wait", t.elapsed());
    for bad in ["?wait=abc", "?wait=31", "?wait=-1", "?poll=1"] {
        match observer.get_bytes(format!("/v1/rounds/1/key-directory/0{bad}")).await.unwrap_err() {
            HttpError::Status { status, code, .. } => assert_eq!((status.as_u16(), code.as_str()), (400, "bad_query"), "{bad}"),
            other => panic!("{bad}: {other}"),
        }
    }

    // A parked read, issued before any institution has advertised, is answered with the
    // key directory as soon as the phase closes, long before its wait runs out.
    let parked = {
        let observer = observer.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let dir: serde_json::Value = observer.get_json("/v1/rounds/1/key-directory/0?wait=30").await.unwrap();
            (dir, t.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!parked.is_finished(), "the read did not park");

    let mut tasks = Vec::new();
    for (i, (dir, _)) in ids.iter().enumerate() {
        let identity = tessera_client::Identity::load(dir).unwrap();
        let api = Api::new(&url, server.fingerprint).unwrap();
        let opts = Options { insecure_dev: true, round: Some(1), quiet: true, wait: Duration::from_secs(60), ..Options::default() };
        tasks.push(tokio::spawn(async move {
            let out = participate(&api, &identity, &opts, move |_| Ok((synthetic_update(i, 1, M), 10))).await;
            (out, api.connection_counts())
        }));
    }
    for t in tasks {
        let (out, (handshakes, requests)) = t.await.unwrap();
        assert!(matches!(out.unwrap(), Participation::Completed(_)));
        eprintln!("institution: {requests} requests over {handshakes} TLS handshake(s)");
        // Every request of the round (status, evidence, five phases, their reads and the
        // release) over one kept-alive connection; a second handshake is allowed for a
        // connection the server closed while it idled.
        assert!(requests >= 10, "{requests} requests");
        assert!(handshakes <= 2, "{handshakes} TLS handshakes for {requests} requests");
    }
    // The server's own count: one handshake per institution and one for this observer
    // (plus at most one more per connection the server closed while it idled), against
    // more than ten requests per institution.
    let metrics = String::from_utf8(observer.get_bytes("/metrics").await.unwrap().to_vec()).unwrap();
    let handshakes = metric(&metrics, "tessera_tls_handshakes_total").unwrap();
    assert!((N as u64 + 1..=2 * (N as u64 + 1)).contains(&handshakes), "the server counted {handshakes} TLS handshakes for {N} institutions and one observer");
    // A client outside U1 asking for its view after phase 0 hears so at once, even
    // with a long wait, instead of being parked until the round ends.
    let t = Instant::now();
    let err = observer.get_bytes("/v1/rounds/1/key-directory/7?wait=30").await.unwrap_err();
    assert_eq!(err.code(), Some("not_in_survivor_set"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "answered after {:?}", t.elapsed());
    let (dir, waited) = parked.await.unwrap();
    // Institution 0's view: every admitted id; the keys of itself and its neighbours.
    assert_eq!(dir["to"], 0, "{dir}");
    assert_eq!(dir["admitted"].as_array().map(Vec::len), Some(N), "{dir}");
    // With 3 institutions the graph is complete: everyone is a neighbour.
    assert_eq!(dir["advertised"].as_array().map(Vec::len), Some(N), "{dir}");
    assert!(waited < Duration::from_secs(25), "the parked read waited {waited:?}");
    server.stop().await;
}
