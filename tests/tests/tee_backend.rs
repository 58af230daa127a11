//! The server outside dev mode: evidence from configfs-tsm and a non-file sealing key.
//! The kernel side is [`FakeSnpGuest`], which signs real SEV-SNP report layouts with a
//! TEST-ONLY chain, so everything from the report entry to attested TLS runs as it would
//! in an SNP guest; only the root of trust differs, and the pinned AMD roots refuse it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use tessera_attestation::bundle::EvidenceBundle;
use tessera_attestation::{snp, Format, VerifyError};
use tessera_enclave::tsm::TsmAttester;
use tessera_enclave::SealingKey;
use tessera_server::config::{RoundParams, SealingSource, TeeConfig};
use tessera_server::service::TeeBackend;
use tessera_tests::fake_snp::{FakeSnpGuest, TEST_ARK, TEST_ASK, TEST_VCEK};
use tessera_tests::*;

const MEASUREMENT: [u8; 48] = [0x5e; 48];

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn hardware_config(dir: &Path) -> tessera_server::ServerConfig {
    let mut cfg = server_config(dir, "127.0.0.1:0".parse().unwrap(), &[], RoundParams { vector_len: 4, ..RoundParams::default() }, 0);
    cfg.dev_insecure = false;
    cfg.node_policy = tessera_attestation::policy::NodePolicy::default();
    cfg.tee = Some(TeeConfig::default());
    cfg.validate().unwrap();
    cfg
}

fn backend(key: [u8; 32]) -> TeeBackend {
    let attester = TsmAttester::with_fs(FakeSnpGuest::new(MEASUREMENT, false), Path::new(tessera_enclave::tsm::DEFAULT_ROOT)).unwrap();
    assert_eq!(tessera_attestation::Attester::format(&attester), Format::SevSnp);
    TeeBackend { attester: Box::new(attester), sealing: SealingKey::from_bytes(key) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_attests_with_configfs_tsm_evidence_and_tls_binds_it() {
    let root = tempfile::tempdir().unwrap();
    let cfg = hardware_config(&root.path().join("server"));
    let server = tessera_server::spawn_with(cfg.clone(), backend([0x11; 32])).await.unwrap();
    let url = format!("https://{}", server.addr);
    let api = tessera_client::Api::new(&url, server.fingerprint).unwrap();

    // Fresh evidence for our nonce: an SNP report (with the host's certificate table)
    // over the identity key, the TLS key and the nonce.
    let nonce = [0x42u8; 32];
    let a: serde_json::Value = api.get_json(format!("/v1/attestation?nonce={}", hex::encode(nonce))).await.unwrap();
    assert_eq!(a["format"], "amd-sev-snp");
    assert_eq!(a["insecure"], false);
    let identity: [u8; 32] = hex::decode(a["identity_public_key"].as_str().unwrap()).unwrap().try_into().unwrap();
    let fresh = EvidenceBundle::decode(&hex::decode(a["fresh_evidence"].as_str().unwrap()).unwrap()).unwrap();
    assert_eq!(fresh.endorsements.len(), 3, "VCEK, ASK and ARK from auxblob");
    let claims = snp::verify_with_roots(&fresh.evidence, &fresh.endorsements, &[TEST_ARK], now()).unwrap();
    assert_eq!(claims.measurement, hex::encode(MEASUREMENT));
    assert!(!claims.debug);
    let expected = tessera_attestation::binding::aggregator_report_data(&identity, &tessera_attestation::binding::fresh_context(&server.fingerprint, &nonce));
    assert_eq!(claims.report_data, hex::encode(expected), "bound to identity, TLS key and nonce");

    // A policy over the verified claims: the measurement must be the one allowed.
    let mut policy = tessera_attestation::policy::NodePolicy { allowed_measurements: vec![hex::encode(MEASUREMENT)], ..Default::default() };
    assert!(policy.evaluate(&claims, &expected, now()).accepted);
    policy.allowed_measurements = vec![hex::encode([0u8; 48])];
    let v = policy.evaluate(&claims, &expected, now());
    assert!(!v.accepted && v.reasons().contains("not in the allowed list"), "{}", v.reasons());

    // The TLS certificate carries the start-up evidence, an SNP report too.
    let startup = EvidenceBundle::decode(&hex::decode(a["evidence"].as_str().unwrap()).unwrap()).unwrap();
    let claims = snp::verify_with_roots(&startup.evidence, &startup.endorsements, &[TEST_ARK], now()).unwrap();
    assert_eq!(claims.measurement, hex::encode(MEASUREMENT));

    // The pinned AMD roots do not vouch for the test chain: verifiers refuse, by name.
    assert_eq!(tessera_attestation::verify(&fresh.evidence, &fresh.endorsements, now()), Err(VerifyError::UntrustedRoot { format: Format::SevSnp }));
    let pinned = root.path().join("pinned.toml");
    std::fs::write(&pinned, format!("allowed_measurements = [\"{}\"]\n", hex::encode(MEASUREMENT))).unwrap();
    let out = tokio::process::Command::new(attest_bin()).args(["fetch", &url, "--json", "--policy", pinned.to_str().unwrap()]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verified"], false);
    assert_eq!(v["format"], "sev-snp");
    assert!(v["failures"].to_string().contains("pinned vendor root"), "{v}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_identity_is_sealed_and_another_key_cannot_unseal_it() {
    let root = tempfile::tempdir().unwrap();
    let cfg = hardware_config(&root.path().join("server"));
    let first = tessera_server::spawn_with(cfg.clone(), backend([0x22; 32])).await.unwrap();
    let identity = first.service.attestation().identity_public_key;
    first.stop().await;
    // The same key (same measurement on the same chip) unseals the same identity ...
    let again = tessera_server::spawn_with(cfg.clone(), backend([0x22; 32])).await.unwrap();
    assert_eq!(again.service.attestation().identity_public_key, identity);
    again.stop().await;
    // ... another (another binary, another chip, or the host) cannot: neither the TLS key
    // (unsealed first) nor the identity.
    let err = tessera_server::spawn_with(cfg.clone(), backend([0x33; 32])).await.unwrap_err().to_string();
    assert!(err.contains("TLS key") && err.contains("does not unseal") && err.contains("new data_dir"), "{err}");
    std::fs::remove_file(cfg.data_dir.join("tls/key.sealed")).unwrap();
    let err = tessera_server::spawn_with(cfg, backend([0x33; 32])).await.unwrap_err().to_string();
    assert!(err.contains("identity key") && err.contains("does not unseal") && err.contains("new data_dir"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_tee_the_server_refuses_to_start_and_says_why() {
    let root = tempfile::tempdir().unwrap();
    let mut cfg = hardware_config(&root.path().join("server"));
    cfg.tee = Some(TeeConfig { configfs_tsm: root.path().join("no-configfs"), ..TeeConfig::default() });
    let err = tessera_server::spawn(cfg).await.unwrap_err().to_string();
    assert!(err.contains("configfs-tsm") && err.contains("no-configfs") && err.contains("dev_insecure = true"), "{err}");

    // The sealing key follows the hardware: TDX has none of its own, SNP needs its device.
    let err = TeeBackend::sealing_key(&TeeConfig::default(), Format::Tdx).unwrap_err().to_string();
    assert!(err.contains("provisioned"), "{err}");
    let no_device = TeeConfig { sev_guest_device: root.path().join("sev-guest"), ..TeeConfig::default() };
    let err = TeeBackend::sealing_key(&no_device, Format::SevSnp).unwrap_err().to_string();
    assert!(err.contains("sev-guest") && err.contains("SEV-SNP guest"), "{err}");
    let snp_only = TeeConfig { sealing: SealingSource::SnpDerivedKey, ..TeeConfig::default() };
    assert!(TeeBackend::sealing_key(&snp_only, Format::Tdx).unwrap_err().to_string().contains("needs an SEV-SNP guest"));
    // A key released into the guest by a key broker works for either.
    let key_file = root.path().join("sealing.key");
    std::fs::write(&key_file, hex::encode([9u8; 32])).unwrap();
    #[cfg(unix)]
    std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let provisioned = TeeConfig { sealing: SealingSource::Provisioned, sealing_key_file: Some(key_file), ..TeeConfig::default() };
    assert!(!TeeBackend::sealing_key(&provisioned, Format::Tdx).unwrap().is_insecure());
}

#[test]
fn tee_configuration_is_validated() {
    let root = tempfile::tempdir().unwrap();
    let mut cfg = hardware_config(root.path());
    cfg.tee = Some(TeeConfig { sealing: SealingSource::Provisioned, ..TeeConfig::default() });
    assert!(cfg.validate().unwrap_err().to_string().contains("sealing_key_file"));
    cfg.tee = Some(TeeConfig { snp_vmpl: 4, ..TeeConfig::default() });
    assert!(cfg.validate().unwrap_err().to_string().contains("VMPLs are 0 to 3"));
    cfg.tee = Some(TeeConfig::default());
    // Extra SNP roots must be self-signed certificates in PEM.
    for (bad, why) in [("junk".to_string(), "no PEM block"), (pem(tessera_tests::fake_snp::TEST_ASK), "not a self-signed root")] {
        cfg.node_policy.additional_snp_arks = vec![bad];
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(why), "{err}");
    }
    cfg.node_policy.additional_snp_arks = vec![pem(TEST_ARK)];
    cfg.validate().unwrap();
    assert!(cfg.node_policy.extra_roots_warning().unwrap().contains("TEST chain"));
    cfg.dev_insecure = true;
    assert!(cfg.validate().unwrap_err().to_string().contains("SIMULATED"));
    // As the operator writes it.
    let text = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"d\"\nadmin_token = \"{ADMIN_TOKEN}\"\n[tee]\nsealing = \"provisioned\"\nsealing_key_file = \"/run/tessera/sealing.key\"\n"
    );
    let path = root.path().join("server.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = tessera_server::ServerConfig::load(&path).unwrap();
    assert_eq!(cfg.tee.unwrap().sealing, SealingSource::Provisioned);
    std::fs::write(&path, format!("listen = \"127.0.0.1:0\"\ndata_dir = \"d\"\nadmin_token = \"{ADMIN_TOKEN}\"\n[tee]\nsealing = \"tpm\"\n")).unwrap();
    assert!(tessera_server::ServerConfig::load(&path).is_err());
}

fn pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n"))
}

/// A whole round with SEV-SNP evidence on every side: the aggregator's from its
/// configfs-tsm, each institution's from its own. Policies pin the measurements and
/// trust the test root (`additional_snp_arks`); the machinery is the production one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_round_runs_with_snp_evidence_on_every_side_and_a_debug_guest_is_refused() {
    use std::sync::Arc;
    use std::time::Duration;
    use tessera_attestation::policy::NodePolicy;
    use tessera_client::participate::{participate, AttesterHandle, Options, Participation};

    const CLIENT_MEASUREMENT: [u8; 48] = [0xc1; 48];
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 4);
    let params = RoundParams { vector_len: 16, min_survivors: 3, phase_timeout_ms: 5_000, ..RoundParams::default() };
    let mut cfg = server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, params, 1);
    cfg.dev_insecure = false;
    cfg.tee = Some(TeeConfig::default());
    cfg.node_policy =
        NodePolicy { allowed_measurements: vec![hex::encode(CLIENT_MEASUREMENT)], additional_snp_arks: vec![pem(TEST_ARK)], ..Default::default() };
    cfg.validate().unwrap();
    let server = tessera_server::spawn_with(cfg, backend([0x44; 32])).await.unwrap();
    let url = format!("https://{}", server.addr);
    let aggregator_policy = NodePolicy { allowed_measurements: vec![hex::encode(MEASUREMENT)], additional_snp_arks: vec![pem(TEST_ARK)], ..Default::default() };

    let mut tasks = Vec::new();
    for (i, (dir, _)) in ids.iter().enumerate() {
        let identity = tessera_client::Identity::load(dir).unwrap();
        let api = tessera_client::Api::new(&url, server.fingerprint).unwrap();
        // Institution 3 launched its guest with debugging allowed.
        let guest = FakeSnpGuest::new(CLIENT_MEASUREMENT, i == 3);
        let attester = TsmAttester::with_fs(guest, Path::new(tessera_enclave::tsm::DEFAULT_ROOT)).unwrap();
        let opts = Options {
            round: Some(1),
            quiet: true,
            wait: Duration::from_secs(60),
            aggregator_policy: Some(aggregator_policy.clone()),
            attester: Some(AttesterHandle(Arc::new(attester))),
            ..Options::default()
        };
        let update = (synthetic_update(i, 1, 16), 1);
        tasks.push(tokio::spawn(async move { participate(&api, &identity, &opts, move |_| Ok(update)).await }));
    }
    let mut completed = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(Participation::Completed(report)) => completed.push((i, report)),
            Ok(other) => panic!("institution {i}: {other:?}"),
            Err(e) => {
                assert_eq!(i, 3, "only the debug guest is refused: {e}");
                assert!(e.to_string().contains("debug"), "{e}");
            }
        }
    }
    assert_eq!(completed.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![0, 1, 2]);
    let updates: Vec<_> = (0..4).map(|i| (synthetic_update(i, 1, 16), 1)).collect();
    let expected = fedavg(&updates, &[0, 1, 2]);
    let api = tessera_client::Api::new(&url, server.fingerprint).unwrap();
    let status: serde_json::Value = api.get_json("/v1/rounds/1").await.unwrap();
    assert_eq!(status["phase"], "finished", "{status}");
    let admission = status["admission"].as_array().unwrap();
    let refused: Vec<_> = admission.iter().filter(|a| a["accepted"] == false).collect();
    assert_eq!(refused.len(), 1, "{status}");
    assert!(refused[0]["reasons"].as_str().unwrap().contains("debug"), "{status}");
    let release = &completed[0].1.release;
    assert_eq!(release.included.len(), 3);
    let max_err = release.mean.iter().zip(&expected).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
    assert!(max_err <= release.error_bound + 1e-6, "error {max_err} > bound {}", release.error_bound);
    let fingerprint = server.fingerprint;
    server.stop().await;

    // What the host keeps on disk: no private key in the clear anywhere, and the sealed
    // TLS key opens only under the guest's sealing key.
    let data = root.path().join("server");
    let mut stack = vec![data.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                assert!(!bytes.windows(11).any(|w| w == b"PRIVATE KEY"), "{} holds a private key in the clear", path.display());
            }
        }
    }
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(data.join("tls/key.sealed"), copy.path().join("key.sealed")).unwrap();
    assert!(tessera_server::tls::load_or_create_key(copy.path(), &SealingKey::from_bytes([0x45; 32])).is_err());
    let key = tessera_server::tls::load_or_create_key(copy.path(), &SealingKey::from_bytes([0x44; 32])).unwrap();
    assert_eq!(key.spki_sha256, fingerprint);
}

#[test]
fn the_committed_certificate_table_is_the_fake_hosts() {
    // The fuzz corpus seed (scripts/fuzz) is the table the fake host hands out.
    let committed = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/data/snp-test-pki/cert-table.bin")).unwrap();
    assert_eq!(committed, FakeSnpGuest::cert_table());
    let certs = tessera_attestation::tsm::parse_snp_cert_table(&committed).unwrap();
    assert_eq!(certs, vec![tessera_tests::fake_snp::TEST_VCEK.to_vec(), tessera_tests::fake_snp::TEST_ASK.to_vec(), TEST_ARK.to_vec()]);
}

/// Reports signed by the (test) Secure Processor for a guest at VMPL 3, or with a
/// migration agent allowed, verify: the signature is genuine. The policy refuses them,
/// by name; VMPL 0 without MIGRATE_MA passes, and a policy that raises `max_vmpl` (an
/// SVSM deployment that trusts its VMPL 1–3 code) accepts VMPL 3.
#[test]
fn snp_reports_from_a_higher_vmpl_or_with_a_migration_agent_are_refused() {
    use tessera_attestation::policy::{NodePolicy, PolicyFailure, SnpRules};
    let report_data = [0x5a; 64];
    let policy = NodePolicy { allowed_measurements: vec![hex::encode(MEASUREMENT)], additional_snp_arks: vec![pem(TEST_ARK)], ..Default::default() };
    let endorsements = vec![TEST_VCEK.to_vec(), TEST_ASK.to_vec()];
    let check = |policy: &NodePolicy, guest: FakeSnpGuest| policy.check(&guest.report(&report_data).unwrap(), &endorsements, &report_data, now());

    let verdict = check(&policy, FakeSnpGuest::new(MEASUREMENT, false));
    assert!(verdict.accepted, "{}", verdict.reasons());
    let verdict = check(&policy, FakeSnpGuest::new(MEASUREMENT, false).at_vmpl(3));
    assert_eq!(verdict.failures, vec![PolicyFailure::VmplTooHigh { vmpl: 3, max_vmpl: 0 }]);
    assert_eq!(verdict.claims.unwrap().fields["vmpl"], "3", "the report verified; the policy refused it");
    let svsm = NodePolicy { snp: Some(SnpRules { measurement: vec![hex::encode(MEASUREMENT)], max_vmpl: 3, ..SnpRules::default() }), ..policy.clone() };
    assert!(check(&svsm, FakeSnpGuest::new(MEASUREMENT, false).at_vmpl(3)).accepted);

    let verdict = check(&policy, FakeSnpGuest::new(MEASUREMENT, false).with_policy_bits(1 << 18));
    assert!(matches!(verdict.failures.as_slice(), [PolicyFailure::SnpGuestPolicy { why, .. }] if why.contains("MIGRATE_MA")), "{:?}", verdict.failures);
    // Masks for the remaining bits: SINGLE_SOCKET required, SMT refused.
    let strict = NodePolicy {
        snp: Some(SnpRules { measurement: vec![hex::encode(MEASUREMENT)], allow_smt: false, required_policy_bits: 1 << 20, ..SnpRules::default() }),
        ..policy.clone()
    };
    let verdict = check(&strict, FakeSnpGuest::new(MEASUREMENT, false));
    assert_eq!(verdict.failures.len(), 2, "{:?}", verdict.failures);
    assert!(
        check(
            &NodePolicy { snp: Some(SnpRules { allow_smt: true, ..strict.snp.clone().unwrap() }), ..strict.clone() },
            FakeSnpGuest::new(MEASUREMENT, false).with_policy_bits(1 << 20)
        )
        .accepted
    );
}

/// AMD's CRL (the KDS's, signed by the ARK) among the endorsements: an empty, current one
/// is checked and named in the claims; one revoking the ASK, one past its nextUpdate and
/// one with a flipped signature byte are refused by name; a policy that requires a CRL
/// refuses evidence without one.
#[test]
fn an_ark_signed_crl_revokes_the_ask() {
    use tessera_attestation::policy::{NodePolicy, PolicyFailure, SnpRules};
    use tessera_tests::fake_snp::{TEST_CRL_EMPTY, TEST_CRL_EXPIRED, TEST_CRL_REVOKING_ASK};
    let report_data = [0x5a; 64];
    let report = FakeSnpGuest::new(MEASUREMENT, false).report(&report_data).unwrap();
    let verify = |crl: Option<&[u8]>| {
        let mut e = vec![TEST_VCEK.to_vec(), TEST_ASK.to_vec()];
        e.extend(crl.map(<[u8]>::to_vec));
        snp::verify_with_roots(&report, &e, &[TEST_ARK], now())
    };
    let claims = verify(Some(TEST_CRL_EMPTY)).unwrap();
    assert!(claims.fields["crl"].contains("ARK CRL") && claims.fields["crl"].contains("0 revoked"), "{:?}", claims.fields.get("crl"));
    assert!(!verify(None).unwrap().fields.contains_key("crl"));
    let crl_pem = format!("-----BEGIN X509 CRL-----\n{}\n-----END X509 CRL-----\n", {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(TEST_CRL_EMPTY)
    });
    assert!(verify(Some(crl_pem.as_bytes())).unwrap().fields.contains_key("crl"), "a PEM CRL is read too");

    match verify(Some(TEST_CRL_REVOKING_ASK)) {
        Err(VerifyError::Revoked { what, .. }) => assert!(what.contains("TEST-ASK") && what.contains("02"), "{what}"),
        other => panic!("expected the ASK revoked, got {other:?}"),
    }
    match verify(Some(TEST_CRL_EXPIRED)) {
        Err(VerifyError::NotValidAtTime { what, .. }) => assert!(what.contains("next update"), "{what}"),
        other => panic!("expected a stale CRL, got {other:?}"),
    }
    let mut tampered = TEST_CRL_EMPTY.to_vec();
    *tampered.last_mut().unwrap() ^= 1;
    assert!(matches!(verify(Some(&tampered)), Err(VerifyError::BadSignature { .. })));

    let policy = NodePolicy {
        snp: Some(SnpRules { measurement: vec![hex::encode(MEASUREMENT)], require_crl: true, ..SnpRules::default() }),
        additional_snp_arks: vec![pem(TEST_ARK)],
        ..Default::default()
    };
    let endorse = |crl: Option<&[u8]>| {
        let mut e = vec![TEST_VCEK.to_vec(), TEST_ASK.to_vec()];
        e.extend(crl.map(<[u8]>::to_vec));
        e
    };
    assert_eq!(policy.check(&report, &endorse(None), &report_data, now()).failures, vec![PolicyFailure::SnpCrlMissing]);
    let verdict = policy.check(&report, &endorse(Some(TEST_CRL_EMPTY)), &report_data, now());
    assert!(verdict.accepted, "{}", verdict.reasons());
}
