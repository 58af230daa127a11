//! The compliance side end to end: a round over TLS produces log entries, a report whose
//! every claim the offline audit verifies, and an API where each role reads exactly
//! what it should (bearer tokens and mTLS), every refusal typed and logged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sha2::Digest;
use tessera_attestation::audit::{audit_bundle, AuditCheck, AuditInputs, LogEntry, LogEvent, RoundBundle};
use tessera_attestation::policy::NodePolicy;
use tessera_attestation::translog::SignedTreeHead;
use tessera_client::http::HttpError;
use tessera_client::{participate, Api, DropPoint, Options, Participation};
use tessera_server::auth::{AccessGrant, Role};
use tessera_server::config::RoundParams;
use tessera_tests::*;

const AUDITOR: &str = "auditor-token-0123456789abcdef";
const CLINIC0: &str = "clinic-0-token-0123456789abcdef";
const CLINIC4: &str = "clinic-4-token-0123456789abcdef";

fn grant(name: &str, role: Role, institution: Option<&str>, token: Option<&str>, cert_spki: Option<[u8; 32]>) -> AccessGrant {
    AccessGrant {
        name: name.into(),
        role,
        institution: institution.map(str::to_string),
        token_sha256: token.map(|t| hex::encode(sha2::Sha256::digest(t.as_bytes()))),
        client_cert_spki_sha256: cert_spki.map(hex::encode),
    }
}

fn status_of(e: &HttpError) -> (u16, String) {
    match e {
        HttpError::Status { status, code, .. } => (status.as_u16(), code.clone()),
        other => panic!("expected an HTTP status, got {other}"),
    }
}

async fn refused(api: &Api, path: &str) -> (u16, String) {
    status_of(&api.get_bytes(path).await.expect_err(path))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_report_is_audited_offline_and_roles_read_what_they_should() {
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 5);
    // An auditor's mTLS client certificate, pinned by its public key.
    let cert_key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["auditor.example".to_string()]).unwrap().self_signed(&cert_key).unwrap();
    let cert_spki = tessera_attestation::ratls::spki_sha256(cert.der()).unwrap();

    // Rounds are opened by the admin here; institution-4 is on no roster.
    let params = RoundParams {
        vector_len: 64,
        max_weight: 10,
        phase_timeout_ms: 6_000,
        advertise_timeout_ms: 30_000,
        participants: (0..4).map(|i| format!("institution-{i}")).collect(),
        ..RoundParams::default()
    };
    let mut cfg = server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, params.clone(), 0);
    cfg.access = vec![
        grant("audit-team", Role::Auditor, None, Some(AUDITOR), None),
        grant("audit-robot", Role::Auditor, None, None, Some(cert_spki)),
        grant("clinic-0-compliance", Role::Institution, Some("institution-0"), Some(CLINIC0), None),
        grant("clinic-4-compliance", Role::Institution, Some("institution-4"), Some(CLINIC4), None),
    ];
    let server = tessera_server::spawn(cfg).await.unwrap();
    let url = format!("https://{}", server.addr);
    let api = |token: Option<&str>| {
        let a = Api::new(&url, server.fingerprint).unwrap();
        match token {
            Some(t) => a.with_bearer(t),
            None => a,
        }
    };
    let admin = api(Some(ADMIN_TOKEN));
    let auditor = api(Some(AUDITOR));
    let clinic0 = api(Some(CLINIC0));
    let clinic4 = api(Some(CLINIC4));
    let anonymous = api(None);

    // Round 1: four institutions; institution-2 drops after sharing its keys.
    admin.post_json("/v1/rounds", &params).await.unwrap();
    let mut tasks = Vec::new();
    for (i, (dir, _)) in ids.iter().enumerate().take(4) {
        let identity = tessera_client::Identity::load(dir).unwrap();
        let client = Api::new(&url, server.fingerprint).unwrap();
        let update = (synthetic_update(i, 1, 64), 1 + i as u32);
        let opts = Options {
            insecure_dev: true,
            drop_after: (i == 2).then_some(DropPoint::AfterShareKeys),
            wait: Duration::from_secs(60),
            round: Some(1),
            quiet: true,
            aggregator_policy: None,
            attester: None,
            ..Options::default()
        };
        tasks.push(tokio::spawn(async move { participate(&client, &identity, &opts, move |_| Ok(update)).await }));
    }
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Participation::Completed(_) | Participation::Dropped { .. } => {}
        }
    }
    let head_after_round_1: SignedTreeHead = auditor.get_json("/v1/log/head").await.unwrap();

    // Round 2 opens (and is left to time out): the log grows past the kept head.
    admin.post_json("/v1/rounds", &params).await.unwrap();

    // --- The auditor's offline verification of round 1.
    let bundle: RoundBundle = auditor.get_json(format!("/v1/rounds/1/report?since_size={}", head_after_round_1.tree_size)).await.unwrap();
    let mean = auditor.get_bytes("/v1/rounds/1/result/mean").await.unwrap().to_vec();
    let inputs =
        AuditInputs { policy: NodePolicy::insecure_dev(), now_secs: now_secs(), previous_head: Some(head_after_round_1.clone()), mean: Some(mean.clone()) };
    let outcome = audit_bundle(&bundle, &inputs);
    assert!(outcome.passed(), "{:#?}", outcome.checks);
    // Regenerates the sample bundle committed under attestation/tests/data/.
    if let Some(dir) = std::env::var_os("TESSERA_SAVE_BUNDLE") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::write(dir.join("round-bundle.json"), serde_json::to_vec_pretty(&bundle).unwrap()).unwrap();
        std::fs::write(dir.join("round-mean.bin"), &mean).unwrap();
        std::fs::write(dir.join("earlier-head.json"), serde_json::to_vec_pretty(&head_after_round_1).unwrap()).unwrap();
    }
    let names: Vec<&str> = outcome.checks.iter().map(|c| c.name.as_str()).collect();
    for want in [
        "aggregator evidence",
        "aggregator measurement",
        "tree head signature",
        "inclusion proofs",
        "report matches the log",
        "consistency with the earlier tree head",
        "released mean",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let r = &bundle.report;
    assert_eq!(r.status, "released");
    assert_eq!(r.dropouts, vec![2]);
    assert_eq!(r.participants[2].dropped_in.as_deref(), Some("masked_input"));
    assert!(r.participants[0].included && r.participants[1].included && !r.participants[2].included && r.participants[3].included);
    assert!(r.participants.iter().all(|p| p.admission.as_ref().is_some_and(|a| a.accepted && a.attempts == 1)));
    assert_eq!(r.release.as_ref().unwrap().mean_sha256, hex::encode(sha2::Sha256::digest(&mean)));
    assert_eq!(bundle.names.get(&r.participants[0].identity).map(String::as_str), Some("institution-0"));
    // No entry carries an update, a mask, a share or a key: only these events.
    for e in &bundle.entries {
        let entry = LogEntry::parse(e.data.as_bytes()).unwrap();
        assert_eq!(entry.round, 1);
        // Hashes and verdicts: a few hundred bytes, whatever the update's size.
        assert!(e.data.len() < 2048, "{}", e.data);
        if let LogEvent::MaskedInput { bytes, sha256, .. } = entry.event {
            assert!(bytes > 64 * 4 && sha256.len() == 64);
        }
    }

    // Tampering is caught, each by the named check.
    let mut forged = bundle.clone();
    forged.report.participants[1].included = false;
    let failed: Vec<String> = audit_bundle(&forged, &inputs).failures().map(|c| c.name.clone()).collect();
    assert_eq!(failed, vec!["report matches the log"]);
    let mut rewritten = bundle.clone();
    rewritten.entries[1].data = rewritten.entries[1].data.replace("\"accepted\":true", "\"accepted\":false");
    assert!(audit_bundle(&rewritten, &inputs).failures().any(|c| c.name == "inclusion of entry 1" || c.name.starts_with("inclusion")));
    let mut wrong_mean = inputs.clone();
    wrong_mean.mean.as_mut().unwrap()[0] ^= 1;
    assert_eq!(audit_bundle(&bundle, &wrong_mean).failures().map(|c| c.name.as_str()).collect::<Vec<_>>(), vec!["released mean"]);
    // A head from a forked log (same size, other root) is not consistent.
    let mut forked_head = head_after_round_1.clone();
    forked_head.root_hash = "00".repeat(32);
    let forked = AuditInputs { previous_head: Some(forked_head), ..inputs.clone() };
    assert!(audit_bundle(&bundle, &forked).failures().any(|c| c.name == "consistency with the earlier tree head"));
    // A round whose end was cut off (its report recomputed to match) is caught: it stops
    // before the signed tree does.
    let mut cut = bundle.clone();
    cut.entries.pop();
    let cut_entries: Vec<LogEntry> = cut.entries.iter().map(|e| LogEntry::parse(e.data.as_bytes()).unwrap()).collect();
    cut.report = tessera_attestation::audit::derive_report(&cut_entries).unwrap();
    let outcome = audit_bundle(&cut, &AuditInputs { mean: None, ..inputs.clone() });
    let failed: Vec<&AuditCheck> = outcome.failures().collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].name == "report matches the log" && failed[0].detail.contains("cut off"), "{failed:?}");
    // A bundle that misstates the aggregator's measurement.
    let mut misstated = bundle.clone();
    misstated.aggregator.measurement = Some("00".repeat(48));
    assert_eq!(audit_bundle(&misstated, &inputs).failures().map(|c| c.name.as_str()).collect::<Vec<_>>(), vec!["aggregator measurement"]);
    // A production policy refuses the simulated aggregator evidence.
    let strict = AuditInputs { policy: NodePolicy::default(), ..inputs.clone() };
    assert_eq!(audit_bundle(&bundle, &strict).failures().map(|c| c.name.as_str()).collect::<Vec<_>>(), vec!["aggregator evidence"]);

    // The auditor's command line does the same, with the 0/1/2 exit contract.
    let dir = root.path().join("audit");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let bundle_path = write("round-1.json", &serde_json::to_vec(&bundle).unwrap());
    let forged_path = write("forged.json", &serde_json::to_vec(&forged).unwrap());
    let mean_path = write("mean.bin", &mean);
    let head_path = write("head.json", &serde_json::to_vec(&head_after_round_1).unwrap());
    let policy_path = write("dev.toml", b"allow_insecure_dev = true\n");
    let garbage_path = write("garbage.json", b"{\"round\": 1}");
    let saved_head = dir.join("saved-head.json");
    let cli = |args: &[&std::path::Path], extra: &[&str]| {
        let out = std::process::Command::new(attest_bin()).arg("audit").args(args).args(extra).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let p = |s: &str| std::path::PathBuf::from(s);
    let (code, stdout, stderr) =
        cli(&[&bundle_path, &p("--policy"), &policy_path, &p("--previous-head"), &head_path, &p("--mean"), &mean_path, &p("--save-head"), &saved_head], &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("VERIFIED") && stdout.contains("ok      consistency with the earlier tree head"), "{stdout}");
    let saved: SignedTreeHead = serde_json::from_slice(&std::fs::read(&saved_head).unwrap()).unwrap();
    assert_eq!(saved, bundle.tree_head);
    let (code, _, stderr) = cli(&[&forged_path, &p("--policy"), &policy_path], &[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("FAILED  report matches the log"), "{stderr}");
    assert_eq!(cli(&[&bundle_path], &[]).0, Some(2), "a policy that pins no code is refused");
    let pinned_path = write("pinned.toml", b"allowed_measurements = [\"00\"]\n");
    let (code, stdout, _) = cli(&[&bundle_path, &p("--policy"), &pinned_path], &["--json"]);
    assert_eq!(code, Some(1), "a policy that pins code refuses simulated evidence");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["verified"], false);
    assert!(v["checks"].as_array().unwrap().iter().any(|c| c["name"] == "aggregator evidence" && c["passed"] == false));
    assert_eq!(cli(&[&garbage_path], &[]).0, Some(2));
    assert_eq!(cli(&[&dir.join("missing.json")], &[]).0, Some(2));

    // --- Roles.
    // Anonymous: 401 everywhere but health, attestation and the protocol.
    for path in ["/v1/rounds", "/v1/rounds/1/report", "/v1/log/head", "/v1/log/entries", "/v1/denials", "/v1/privacy"] {
        assert_eq!(refused(&anonymous, path).await, (401, "unauthenticated".into()), "{path}");
    }
    assert_eq!(refused(&api(Some("not-a-valid-token-at-all")), "/v1/rounds").await, (401, "invalid_token".into()));
    // An institution: its own rounds and reports, nothing of the log beyond the head.
    let rounds: serde_json::Value = clinic0.get_json("/v1/rounds").await.unwrap();
    assert_eq!(rounds.as_array().unwrap().len(), 2);
    let own: RoundBundle = clinic0.get_json("/v1/rounds/1/report").await.unwrap();
    assert_eq!(own.report, bundle.report);
    clinic0.get_json::<SignedTreeHead>("/v1/log/head").await.unwrap();
    for path in ["/v1/log/entries", "/v1/log/proof/inclusion?index=0", "/v1/log/proof/consistency?first=1", "/v1/denials"] {
        assert_eq!(refused(&clinic0, path).await, (403, "forbidden".into()), "{path}");
    }
    assert_eq!(status_of(&clinic0.post_json("/v1/rounds", &params).await.unwrap_err()), (403, "forbidden".into()));
    // An institution that took part in nothing sees no round.
    let none: serde_json::Value = clinic4.get_json("/v1/rounds").await.unwrap();
    assert_eq!(none.as_array().unwrap().len(), 0);
    assert_eq!(refused(&clinic4, "/v1/rounds/1/report").await, (403, "forbidden".into()));
    assert_eq!(refused(&clinic4, "/reports/1").await.0, 403);
    // The auditor reads everything and changes nothing.
    let entries: serde_json::Value = auditor.get_json("/v1/log/entries?start=0&end=3").await.unwrap();
    assert_eq!(entries.as_array().unwrap().len(), 3);
    auditor.get_json::<serde_json::Value>("/v1/log/proof/inclusion?index=2").await.unwrap();
    auditor.get_json::<serde_json::Value>(format!("/v1/log/proof/consistency?first={}", head_after_round_1.tree_size)).await.unwrap();
    let filtered: serde_json::Value = auditor.get_json("/v1/rounds?status=finished&participant=institution-1&since=2020-01-01T00:00:00Z").await.unwrap();
    assert_eq!(filtered.as_array().unwrap().iter().map(|r| r["round"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1]);
    assert_eq!(status_of(&auditor.post_json("/v1/rounds", &params).await.unwrap_err()), (403, "forbidden".into()));
    // mTLS: the pinned client certificate is the auditor robot.
    let robot = Api::new(&url, server.fingerprint).unwrap().with_client_certificate(cert.der().to_vec(), cert_key.serialize_der()).unwrap();
    robot.get_json::<SignedTreeHead>("/v1/log/head").await.unwrap();
    let other_key = rcgen::KeyPair::generate().unwrap();
    let other = rcgen::CertificateParams::new(vec!["x".to_string()]).unwrap().self_signed(&other_key).unwrap();
    let stranger = Api::new(&url, server.fingerprint).unwrap().with_client_certificate(other.der().to_vec(), other_key.serialize_der()).unwrap();
    assert_eq!(refused(&stranger, "/v1/log/head").await, (401, "unknown_certificate".into()));

    // Malformed queries and unknown ids are 4xx, never 500.
    for (path, status) in [
        ("/v1/rounds/999/report", 404),
        ("/v1/rounds/abc/report", 400),
        ("/v1/rounds?status=bogus", 400),
        ("/v1/rounds?since=yesterday", 400),
        ("/v1/rounds?participant=nobody", 400),
        ("/v1/rounds?color=red", 400),
        ("/v1/log/entries?start=abc", 400),
        ("/v1/log/entries?start=100000", 400),
        ("/v1/log/proof/inclusion", 400),
        ("/v1/log/proof/inclusion?index=100000", 400),
        ("/v1/log/proof/consistency?first=5&second=2", 400),
        ("/v1/log/proof/consistency?first=1&second=100000", 400),
        ("/v1/rounds/1/report?since_size=100000", 400),
        ("/v1/denials?limit=-1", 400),
    ] {
        assert_eq!(refused(&auditor, path).await.0, status, "{path}");
    }

    // Every denial above was recorded, with who was refused (written in the background).
    let mut denials = Vec::new();
    for _ in 0..100 {
        let v: serde_json::Value = auditor.get_json("/v1/denials?limit=1000").await.unwrap();
        denials = v.as_array().unwrap().clone();
        if denials.iter().any(|d| d["reason"].as_str().unwrap_or("").starts_with("unknown_certificate")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        denials.iter().any(|d| d["path"] == "/v1/rounds/1/report" && d["status"] == 403 && d["principal"].as_str().unwrap().contains("clinic-4")),
        "{denials:?}"
    );
    assert!(denials.iter().any(|d| d["path"] == "/v1/log/entries" && d["status"] == 401));
    assert!(denials.iter().any(|d| d["reason"].as_str().unwrap().starts_with("unknown_certificate")));

    // The OpenAPI document is served and is the one in the repository.
    let doc = anonymous.get_bytes("/v1/openapi.json").await.unwrap();
    assert_eq!(&doc[..], include_str!("../../server/openapi.json").as_bytes());
    server.stop().await;
}
