//! `tessera-attest fetch` against a running aggregator over TLS: the evidence must be
//! bound to the certificate the server presented, and the policy decides on dev evidence.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tessera_server::config::RoundParams;
use tessera_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_verifies_the_live_aggregator_and_its_tls_binding() {
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 2);
    let cfg = server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, RoundParams { vector_len: 4, ..RoundParams::default() }, 0);
    let server = tessera_server::spawn(cfg).await.unwrap();
    let url = format!("https://{}", server.addr);
    let dev_policy = root.path().join("dev.toml");
    std::fs::write(&dev_policy, "allow_insecure_dev = true\n").unwrap();

    let run = |args: Vec<String>| {
        let bin = attest_bin();
        async move { tokio::process::Command::new(bin).args(args).output().await.unwrap() }
    };
    // Without a policy that pins the aggregator's code, fetch refuses to run: exit 2.
    let out = run(vec!["fetch".into(), url.clone()]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("accepts any measurement"));
    // A policy that pins code refuses simulated evidence: exit 1, the reason named.
    let pinned = root.path().join("pinned.toml");
    std::fs::write(&pinned, "allowed_measurements = [\"00\"]\n").unwrap();
    let out = run(vec!["fetch".into(), url.clone(), "--policy".into(), pinned.display().to_string()]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("simulated (dev) evidence is not allowed"));
    // A dev policy accepts it, and the binding to this TLS certificate was checked.
    let out = run(vec!["fetch".into(), url.clone(), "--policy".into(), dev_policy.display().to_string(), "--json".into()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verified"], true);
    assert_eq!(v["binding_checked"], true);
    assert_eq!(v["format"], "dev-insecure");
    // Per-connection freshness: evidence made for one nonce does not verify for another,
    // and a malformed nonce is a typed 400.
    let api = tessera_client::Api::new(&url, server.fingerprint).unwrap();
    let a: serde_json::Value = api.get_json(format!("/v1/attestation?nonce={}", "aa".repeat(32))).await.unwrap();
    let identity: [u8; 32] = hex::decode(a["identity_public_key"].as_str().unwrap()).unwrap().try_into().unwrap();
    let fresh = hex::decode(a["fresh_evidence"].as_str().unwrap()).unwrap();
    let policy = tessera_attestation::policy::NodePolicy::insecure_dev();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let bound = |nonce: &[u8]| {
        let ctx = tessera_attestation::binding::fresh_context(&server.fingerprint, nonce);
        tessera_attestation::binding::aggregator_report_data(&identity, &ctx)
    };
    assert!(policy.check(&fresh, &[], &bound(&[0xaa; 32]), now).accepted);
    let replayed = policy.check(&fresh, &[], &bound(&[0xbb; 32]), now);
    assert!(!replayed.accepted && replayed.reasons().contains("report_data"), "{}", replayed.reasons());
    for bad in ["zz", "aa", &"aa".repeat(65)] {
        let err = api.get_bytes(format!("/v1/attestation?nonce={bad}")).await.unwrap_err();
        assert!(matches!(err, tessera_client::http::HttpError::Status { status, ref code, .. } if status == 400 && code == "bad_query"), "{err}");
    }
    // Nothing listens here: unusable input, exit 2.
    let out = run(vec!["fetch".into(), format!("https://127.0.0.1:{}", free_port()), "--policy".into(), dev_policy.display().to_string()]).await;
    assert_eq!(out.status.code(), Some(2));
    server.stop().await;
}
