//! Aggregator + 10 institutions over real TLS on loopback, 3 rounds, 30% dropout in the
//! second; every released mean is checked against plaintext FedAvg of the institutions
//! the enclave says it included, within the quantization error bound.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tessera_client::{participate, Api, DropPoint, Options, Participation};
use tessera_server::config::RoundParams;
use tessera_tests::*;

const N: usize = 10;
const M: usize = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_rounds_with_thirty_percent_dropout() {
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), N);
    let params = RoundParams { vector_len: M as u32, clip: 1.0, max_weight: 1000, phase_timeout_ms: 4_000, ..RoundParams::default() };
    let cfg = server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, params, 3);
    let server = tessera_server::spawn(cfg).await.unwrap();
    let url = format!("https://{}", server.addr);

    for round in 1..=3u64 {
        // Round 2: three institutions (30%) drop at different points of the protocol.
        let drops = |i: usize| match (round, i) {
            (2, 1) => Some(DropPoint::AfterAdvertise),
            (2, 4) => Some(DropPoint::AfterShareKeys),
            (2, 7) => Some(DropPoint::AfterMaskedInput),
            _ => None,
        };
        let updates: Vec<(Vec<f32>, u32)> = (0..N).map(|i| (synthetic_update(i, round, M), 10 + 7 * i as u32)).collect();
        let mut tasks = Vec::new();
        for (i, (dir, _)) in ids.iter().enumerate() {
            let identity = tessera_client::Identity::load(dir).unwrap();
            let api = Api::new(&url, server.fingerprint).unwrap();
            let update = updates[i].clone();
            let opts = Options {
                insecure_dev: true,
                drop_after: drops(i),
                wait: Duration::from_secs(120),
                round: Some(round),
                quiet: true,
                aggregator_policy: None,
                attester: None,
                ..Options::default()
            };
            tasks.push(tokio::spawn(async move { participate(&api, &identity, &opts, move |_| Ok(update)).await }));
        }
        let mut releases = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            match t.await.unwrap().unwrap_or_else(|e| panic!("institution {i} round {round}: {e}")) {
                Participation::Completed(report) => releases.push(report.release),
                Participation::Dropped { .. } => assert!(drops(i).is_some()),
            }
        }
        let release = &releases[0];
        assert!(releases.iter().all(|r| r == release), "every institution saw the same release");
        let included: Vec<usize> = release.included.iter().map(|c| c.0 as usize).collect();
        match round {
            // The institution that left after sending its masked input is still in the sum.
            2 => assert_eq!(included, vec![0, 2, 3, 5, 6, 7, 8, 9]),
            _ => assert_eq!(included, (0..N).collect::<Vec<_>>()),
        }
        let want = fedavg(&updates, &included);
        let max_err = release.mean.iter().zip(&want).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
        assert!(max_err <= release.error_bound + 1e-6, "round {round}: error {max_err} > bound {}", release.error_bound);
        assert_eq!(release.total_weight, included.iter().map(|&i| updates[i].1 as u64).sum::<u64>());
    }

    // Latency histograms were recorded for the protocol endpoints.
    let metrics = String::from_utf8(Api::new(&url, server.fingerprint).unwrap().get_bytes("/metrics").await.unwrap().to_vec()).unwrap();
    assert!(metrics.contains("route=\"/v1/rounds/{round}/masked-input\""), "{metrics}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_fingerprint_is_refused_before_anything_is_sent() {
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 2);
    let cfg = server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, RoundParams { vector_len: 4, ..RoundParams::default() }, 0);
    let server = tessera_server::spawn(cfg).await.unwrap();
    let mut wrong = server.fingerprint;
    wrong[0] ^= 0xff;
    let api = Api::new(&format!("https://{}", server.addr), wrong).unwrap();
    let err = api.get_bytes("/v1/health").await.unwrap_err();
    assert!(matches!(err, tessera_client::http::HttpError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("fingerprint"), "{err}");
    assert!(!err.is_transient());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_an_aggregator_whose_measurement_is_not_in_its_policy() {
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 2);
    let cfg = server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, RoundParams { vector_len: 4, ..RoundParams::default() }, 1);
    let server = tessera_server::spawn(cfg).await.unwrap();
    let api = Api::new(&format!("https://{}", server.addr), server.fingerprint).unwrap();
    let identity = tessera_client::Identity::load(&ids[0].0).unwrap();
    let policy =
        tessera_attestation::policy::NodePolicy { allowed_measurements: vec!["00".repeat(48)], ..tessera_attestation::policy::NodePolicy::insecure_dev() };
    let opts = Options { insecure_dev: true, aggregator_policy: Some(policy), quiet: true, wait: Duration::from_secs(20), ..Options::default() };
    let err = participate(&api, &identity, &opts, |_| -> Result<(Vec<f32>, u32), _> { panic!("no update may be prepared for a refused aggregator") })
        .await
        .unwrap_err();
    assert!(matches!(err, tessera_client::ParticipateError::AggregatorAttestation(_)), "{err}");
    assert!(err.to_string().contains("is not in the allowed list"), "{err}");
    // Nothing was sent: the round still waits for both institutions.
    let status: serde_json::Value = api.get_json("/v1/rounds/1").await.unwrap();
    assert_eq!(status["waiting_for"].as_array().unwrap().len(), 2);
    server.stop().await;
}

/// Attested TLS: the aggregator's certificate carries its evidence, bound to the TLS
/// public key; the client's verifier applies its policy inside the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attested_tls_applies_the_client_policy_in_the_handshake() {
    use tessera_attestation::policy::NodePolicy;
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 2);
    let cfg = server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, RoundParams { vector_len: 4, ..RoundParams::default() }, 0);
    let server = tessera_server::spawn(cfg).await.unwrap();
    let url = format!("https://{}", server.addr);
    // The secure default refuses the simulated evidence before any request is sent.
    let strict = Api::attested(&url, server.fingerprint, Some(NodePolicy::default())).unwrap();
    let err = strict.get_bytes("/v1/health").await.unwrap_err();
    assert!(matches!(err, tessera_client::http::HttpError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("simulated (dev) evidence is not allowed"), "{err}");
    // A policy naming another measurement is refused too, naming the measurement.
    let other = NodePolicy { allowed_measurements: vec!["11".repeat(48)], ..NodePolicy::insecure_dev() };
    let err = Api::attested(&url, server.fingerprint, Some(other)).unwrap().get_bytes("/v1/health").await.unwrap_err();
    assert!(err.to_string().contains("is not in the allowed list"), "{err}");
    // The dev policy accepts it: the evidence verifies and is bound to this key.
    Api::attested(&url, server.fingerprint, Some(NodePolicy::insecure_dev())).unwrap().get_bytes("/v1/health").await.unwrap();
    // The certificate the server presents carries the extension and it checks out offline.
    let pem = std::fs::read_to_string(root.path().join("server/tls/cert.pem")).unwrap();
    let der = pem.lines().filter(|l| !l.starts_with("-----")).collect::<String>();
    let der = base64_decode(&der);
    assert_eq!(tessera_attestation::ratls::spki_sha256(&der).unwrap(), server.fingerprint);
    let (verdict, identity) = tessera_attestation::ratls::verify_certificate(&der, &NodePolicy::insecure_dev(), now_secs());
    assert!(verdict.accepted, "{}", verdict.reasons());
    assert_eq!(hex::encode(identity.unwrap()), server.service.attestation().identity_public_key);
    server.stop().await;
}

/// The certificate's evidence is re-made every `certificate_refresh_secs`, so a verifier
/// with a short `max_age_secs` keeps accepting a long-running server; without the refresh
/// the start-up evidence would age out of every policy after an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attested_certificate_is_refreshed_before_verifiers_find_it_old() {
    use tessera_attestation::policy::NodePolicy;
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 2);
    let params = RoundParams { vector_len: 4, ..RoundParams::default() };
    let mut cfg = server_config(&root.path().join("fresh"), "127.0.0.1:0".parse().unwrap(), &ids, params.clone(), 0);
    cfg.certificate_refresh_secs = 1;
    let fresh = tessera_server::spawn(cfg).await.unwrap();
    let mut cfg = server_config(&root.path().join("stale"), "127.0.0.1:0".parse().unwrap(), &ids, params, 0);
    cfg.certificate_refresh_secs = 3600;
    let stale = tessera_server::spawn(cfg).await.unwrap();
    let first = fresh.service.attestation().evidence;
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;

    let short_lived = NodePolicy { max_age_secs: 3, ..NodePolicy::insecure_dev() };
    // Each Api is a new connection, so a new handshake with the current certificate.
    Api::attested(&format!("https://{}", fresh.addr), fresh.fingerprint, Some(short_lived.clone())).unwrap().get_bytes("/v1/health").await.unwrap();
    let err = Api::attested(&format!("https://{}", stale.addr), stale.fingerprint, Some(short_lived)).unwrap().get_bytes("/v1/health").await.unwrap_err();
    assert!(err.to_string().contains("s old, the maximum is 3 s"), "{err}");

    // The refreshed evidence is stored, so a round opened under it has it in its bundle.
    let now = fresh.service.attestation().evidence;
    assert_ne!(now, first);
    let bytes = hex::decode(&now).unwrap();
    let stored = fresh.service.store().evidence(&tessera_attestation::audit::sha256_hex(&bytes)).await.unwrap();
    assert_eq!(stored.map(|(b, _)| b), Some(bytes));
    fresh.stop().await;
    stale.stop().await;
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn base64_decode(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        acc = acc << 6 | A.iter().position(|&a| a == c).unwrap() as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Compression over TLS: 12-bit elements packed on the wire, shared random-k keeping 20%
/// of the coordinates, a Hadamard rotation in blocks of 256, and each institution's
/// error-feedback residual carried into the next round. Each release is the mean of what
/// the institutions sent on the kept coordinates (within its error bound) and zero
/// elsewhere; a masked input is 12 bits per kept element, not 32 per parameter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compressed_rounds_release_the_mean_of_what_was_sent() {
    use tessera_client::feedback::ErrorFeedback;
    use tessera_secagg::compress::Encoding;
    use tessera_server::config::CompressionParams;
    const N: usize = 4;
    const M: usize = 3_000;
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), N);
    let params = RoundParams {
        vector_len: M as u32,
        clip: 0.25,
        max_weight: 1,
        phase_timeout_ms: 4_000,
        modulus_bits: 12,
        compression: Some(CompressionParams { keep_fraction: Some(0.2), rotation_block: Some(256) }),
        ..RoundParams::default()
    };
    let cfg = server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, params, 2);
    let server = tessera_server::spawn(cfg).await.unwrap();
    let url = format!("https://{}", server.addr);
    let feedback: Vec<std::sync::Arc<std::sync::Mutex<ErrorFeedback>>> = (0..N).map(|_| Default::default()).collect();
    let mut kept_before = None;
    for round in 1..=2u64 {
        let updates: Vec<Vec<f32>> = (0..N).map(|i| synthetic_update(i, round, M).iter().map(|x| x * 0.1).collect()).collect();
        let sent: Vec<std::sync::Arc<std::sync::Mutex<Vec<f32>>>> = (0..N).map(|_| Default::default()).collect();
        let mut tasks = Vec::new();
        for (i, (dir, _)) in ids.iter().enumerate() {
            let identity = tessera_client::Identity::load(dir).unwrap();
            let api = Api::new(&url, server.fingerprint).unwrap();
            let (update, fb, out) = (updates[i].clone(), feedback[i].clone(), sent[i].clone());
            let opts = Options { insecure_dev: true, wait: Duration::from_secs(120), round: Some(round), quiet: true, ..Options::default() };
            tasks.push(tokio::spawn(async move {
                participate(&api, &identity, &opts, move |cfg| {
                    let mut delta = update;
                    let done = fb.lock().unwrap().apply(&mut delta, cfg)?.expect("the round uses random-k");
                    assert_eq!((done.kept, done.of), (600, M));
                    *out.lock().unwrap() = delta.clone();
                    Ok((delta, 1))
                })
                .await
            }));
        }
        let mut reports = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            match t.await.unwrap().unwrap_or_else(|e| panic!("institution {i} round {round}: {e}")) {
                Participation::Completed(report) => reports.push(report),
                Participation::Dropped { .. } => panic!("institution {i} dropped"),
            }
        }
        let cfg = &reports[0].config;
        assert_eq!((cfg.modulus_bits, cfg.encoded_len(), cfg.masked_bytes()), (12, 2 * 256 + 128, (641 * 12usize).div_ceil(8)));
        let encoding = Encoding::for_config(cfg).unwrap().unwrap();
        let kept: std::collections::BTreeSet<u32> = encoding.selected().unwrap().iter().copied().collect();
        assert_ne!(Some(&kept), kept_before.as_ref(), "each round draws its own subset");
        kept_before = Some(kept.clone());
        // Everything each institution sent: far less than one uncompressed input (M · 4 bytes).
        for r in &reports {
            assert!(r.bytes_sent < (M * 4) as u64, "{} bytes sent", r.bytes_sent);
        }
        let release = &reports[0].release;
        let sent: Vec<(Vec<f32>, u32)> = sent.iter().map(|s| (s.lock().unwrap().clone(), 1)).collect();
        let want = fedavg(&sent, &(0..N).collect::<Vec<_>>());
        for (j, (got, want)) in release.mean.iter().zip(&want).enumerate() {
            if kept.contains(&(j as u32)) {
                assert!(f64::from((got - want).abs()) <= release.error_bound, "round {round} coordinate {j}: {got} vs {want}");
            } else {
                assert_eq!((*got, *want), (0.0, 0.0), "round {round}: coordinate {j} was not sent");
            }
        }
        // Round 2 carries round 1's residual: what was sent differs from the fresh update.
        if round == 2 {
            let fresh_on_kept = |i: usize| kept.iter().map(|&j| updates[i][j as usize]).collect::<Vec<_>>();
            let sent_on_kept = |i: usize| kept.iter().map(|&j| sent[i].0[j as usize]).collect::<Vec<_>>();
            assert_ne!(fresh_on_kept(0), sent_on_kept(0));
        }
    }
    server.stop().await;
}

/// Buffered asynchronous rounds over TLS: cohorts of K = 3 among 4 institutions. One
/// institution is slow: it trained from version 0 and joins the second cohort (version 1),
/// where its update is weighed by (1 + 1)^-0.5; a cohort goes on with its first three
/// institutions; an update more stale than the cohort accepts is refused with the numbers
/// before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn buffered_cohorts_weigh_a_slow_institution_down() {
    use tessera_server::config::CohortParams;
    const N: usize = 4;
    const M: usize = 500;
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), N);
    let params = RoundParams {
        vector_len: M as u32,
        clip: 1.0,
        max_weight: 1000,
        phase_timeout_ms: 4_000,
        cohort: Some(CohortParams { size: 3, max_staleness: 1, staleness_exponent: 0.5 }),
        ..RoundParams::default()
    };
    let cfg = server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, params, 3);
    let server = tessera_server::spawn(cfg).await.unwrap();
    let url = format!("https://{}", server.addr);
    let dirs: Vec<std::path::PathBuf> = ids.iter().map(|(d, _)| d.clone()).collect();
    let run = |round: u64, who: Vec<(usize, u64)>| {
        let url = url.clone();
        let dirs = dirs.clone();
        let fingerprint = server.fingerprint;
        async move {
            let mut tasks = Vec::new();
            for (i, base) in who {
                let identity = tessera_client::Identity::load(&dirs[i]).unwrap();
                let api = Api::new(&url, fingerprint).unwrap();
                let opts = Options {
                    insecure_dev: true,
                    wait: Duration::from_secs(120),
                    round: Some(round),
                    quiet: true,
                    base_version: Some(base),
                    ..Options::default()
                };
                let update = (synthetic_update(i, base, M), 100 * (i as u32 + 1));
                tasks.push(tokio::spawn(async move { participate(&api, &identity, &opts, move |_| Ok(update)).await }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        }
    };
    // Cohort 1 (version 0): the three fast institutions; the slow one is still training.
    let results = run(1, vec![(0, 0), (1, 0), (2, 0)]).await;
    let reports: Vec<_> = results
        .into_iter()
        .map(|r| match r.unwrap() {
            Participation::Completed(r) => r,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(reports[0].config.cohort.unwrap().version, 0);
    let updates: Vec<(Vec<f32>, u32)> = (0..N).map(|i| (synthetic_update(i, 0, M), 100 * (i as u32 + 1))).collect();
    let release = &reports[0].release;
    let want = fedavg(&updates, &[0, 1, 2]);
    let max_err = release.mean.iter().zip(&want).map(|(a, b)| f64::from((a - b).abs())).fold(0.0, f64::max);
    assert!(max_err <= release.error_bound + 1e-6, "cohort 1: {max_err}");

    // Cohort 2 (version 1): two fast institutions trained from version 1, the slow one from 0.
    let results = run(2, vec![(0, 1), (1, 1), (3, 0)]).await;
    let reports: Vec<_> = results
        .into_iter()
        .map(|r| match r.unwrap() {
            Participation::Completed(r) => r,
            other => panic!("{other:?}"),
        })
        .collect();
    let cohort = reports[0].config.cohort.unwrap();
    assert_eq!((cohort.version, cohort.size), (1, 3));
    let slow_weight = (400.0 * cohort.staleness_weight(1)).round() as u32;
    assert_eq!(slow_weight, 283);
    let weighted = vec![(synthetic_update(0, 1, M), 100), (synthetic_update(1, 1, M), 200), (vec![0.0; M], 0), (synthetic_update(3, 0, M), slow_weight)];
    let release = &reports[0].release;
    assert_eq!(release.total_weight, 100 + 200 + 283);
    let want = fedavg(&weighted, &[0, 1, 3]);
    let max_err = release.mean.iter().zip(&want).map(|(a, b)| f64::from((a - b).abs())).fold(0.0, f64::max);
    assert!(max_err <= release.error_bound + 1e-6, "cohort 2: the staleness-weighted mean, error {max_err}");

    // Catching up: institution 2 was not in cohort 2 and, holding version 1, applies
    // exactly its release; a wrong starting version, or a release that already holds the
    // institution's own update (it would count twice), is refused.
    use tessera_client::participate::{check_aggregator, missed_releases};
    let api = Api::new(&url, server.fingerprint).unwrap();
    let key = check_aggregator(&api, true, None).await.unwrap();
    let me = |i: usize| tessera_client::Identity::load(&dirs[i]).unwrap().public_key_hex();
    let mut seen = Vec::new();
    let n = missed_releases(&api, &key, &me(2), (1, 3), 1, |m| {
        seen.push((m.release.round, m.config.cohort.unwrap().version));
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!((n, seen), (1, vec![(2, 1)]));
    let err = missed_releases(&api, &key, &me(2), (1, 3), 0, |_| Ok(())).await.unwrap_err().to_string();
    assert!(err.contains("started from global version 1, but the releases before it make version 0"), "{err}");
    let err = missed_releases(&api, &key, &me(0), (0, 3), 0, |_| Ok(())).await.unwrap_err().to_string();
    assert!(err.contains("would count twice"), "{err}");

    // Cohort 3 (version 2): the slow institution's update from version 0 is 2 versions
    // stale, past the bound of 1: refused before anything is sent, with the numbers. It
    // asks first and alone: were it to ask with the others, they could complete cohort 3,
    // the schedule's last, before it joins, and it would be told the schedule ended.
    let refused = run(3, vec![(3, 0)]).await;
    let err = refused.into_iter().next().unwrap().unwrap_err().to_string();
    assert!(err.contains("trained from version 0, 2 versions before this cohort's version 2") && err.contains("at most 1"), "{err}");
    for r in run(3, vec![(0, 2), (1, 2), (2, 2)]).await {
        assert!(matches!(r.unwrap(), Participation::Completed(_)));
    }
    // The schedule ends with cohort 3: an institution waiting for another is told so.
    let identity = tessera_client::Identity::load(&dirs[3]).unwrap();
    let opts = Options { insecure_dev: true, wait: Duration::from_secs(30), quiet: true, base_version: Some(3), ..Options::default() };
    let ended = participate(&Api::new(&url, server.fingerprint).unwrap(), &identity, &opts, |_| Ok((vec![0.0; M], 1))).await;
    assert!(matches!(ended, Err(tessera_client::ParticipateError::FederationEnded(3))), "{ended:?}");
    server.stop().await;
}
