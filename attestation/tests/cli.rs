//! The `tessera-attest` contract auditors script against: exit 0 only when every check
//! passes, 1 when verification or policy fails (each failure named), 2 for unusable input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tessera-attest");
const V: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors");

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).current_dir(V).output().unwrap();
    (out.status.code().unwrap(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

const SNP: [&str; 3] = ["sev-snp/milan-virtee/report.bin", "sev-snp/milan-virtee/vcek.der", "sev-snp/milan-virtee/cert_chain.pem"];

#[test]
fn verify_exit_codes_follow_the_contract() {
    let (code, out, _) = run(&["verify", SNP[0], SNP[1], SNP[2], "--at", "2026-01-01T00:00:00Z"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("VERIFIED") && out.contains("7a1e5c266c0108db"), "{out}");
    // Expired at the given time: a named failure, exit 1.
    let (code, _, err) = run(&["verify", SNP[0], SNP[1], SNP[2], "--at", "2040-01-01T00:00:00Z"]);
    assert_eq!(code, 1);
    assert!(err.contains("not valid at the verification time"), "{err}");
    // Wrong binding: exit 1 naming the binding.
    let (code, _, err) = run(&["verify", SNP[0], SNP[1], SNP[2], "--at", "2026-01-01T00:00:00Z", "--report-data", &"00".repeat(64)]);
    assert_eq!(code, 1);
    assert!(err.contains("report_data mismatch"), "{err}");
    // Unusable input: exit 2.
    assert_eq!(run(&["verify", "PROVENANCE.md"]).0, 2, "not evidence");
    assert_eq!(run(&["verify", "does-not-exist"]).0, 2);
    assert_eq!(run(&["verify", SNP[0], "--at", "yesterday"]).0, 2);
}

#[test]
fn json_output_has_verified_format_claims_failures() {
    let (code, out, _) =
        run(&["verify", "tdx-sgx-dcap/tdx-v4-uptodate/quote.bin", "tdx-sgx-dcap/tdx-v4-uptodate/collateral.json", "--at", "2025-07-01T00:00:00Z", "--json"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verified"], true);
    assert_eq!(v["format"], "tdx");
    assert!(v["claims"]["measurement"].as_str().unwrap().len() == 96);
    assert_eq!(v["failures"].as_array().unwrap().len(), 0);
}

#[test]
fn policy_file_decides_debug_and_measurements() {
    let dir = tempfile::tempdir().unwrap();
    let doc = "aws-nitro/beta-2022-10-12-debug/attestation_doc.cbor";
    let (_, inspect, _) = run(&["inspect", doc]);
    assert!(inspect.contains("aws-nitro"), "{inspect}");
    let strict = dir.path().join("strict.toml");
    std::fs::write(&strict, "allowed_measurements = [\"00\"]\nmax_age_secs = 999999999999\n").unwrap();
    let policy = strict.to_str().unwrap();
    // Inside the sample's window (PROVENANCE.md): verifies, but the policy names both failures.
    let (code, out, _) = run(&["verify", doc, "--json", "--at", "2022-10-12T14:00:00Z", "--policy", policy]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["claims"]["debug"], true);
    let checks: Vec<&str> = v["failures"].as_array().unwrap().iter().filter_map(|f| f["check"]["check"].as_str()).collect();
    assert_eq!(checks, vec!["measurement_not_allowed", "debug_mode"]);
    std::fs::write(&strict, "allow_everything = true\n").unwrap();
    assert_eq!(run(&["verify", SNP[0], SNP[1], SNP[2], "--policy", policy]).0, 2, "a bad policy file is unusable input");
}

#[test]
fn inspect_prints_fields_without_verifying() {
    let (code, out, _) = run(&["inspect", "tdx-sgx-dcap/sgx-v3/quote.bin"]);
    assert_eq!(code, 0);
    assert!(out.contains("intel-sgx-dcap") && out.contains("version: 3"), "{out}");
    let (code, out, _) = run(&["inspect", SNP[0]]);
    assert_eq!(code, 0);
    assert!(out.contains("measurement"), "{out}");
    assert_eq!(run(&["inspect", "PROVENANCE.md"]).0, 2);
}

#[test]
fn tcb_rules_apply_to_real_evidence() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("tcb.toml");
    let quote =
        ["verify", "tdx-sgx-dcap/tdx-v4-uptodate/quote.bin", "tdx-sgx-dcap/tdx-v4-uptodate/collateral.json", "--at", "2025-07-01T00:00:00Z", "--policy"];
    std::fs::write(&policy, "allowed_tcb_status = [\"UpToDate\"]\n[min_svn]\nQE_ISVSVN = 6\n").unwrap();
    let args: Vec<&str> = quote.iter().copied().chain([policy.to_str().unwrap()]).collect();
    assert_eq!(run(&args).0, 0, "UpToDate with QE ISVSVN 6 meets the policy");
    std::fs::write(&policy, "allowed_tcb_status = [\"UpToDate\"]\n[min_svn]\nQE_ISVSVN = 7\n").unwrap();
    let (code, _, err) = run(&args);
    assert_eq!(code, 1);
    assert!(err.contains("QE_ISVSVN is 6, the policy requires at least 7"), "{err}");
    // SNP: TCB components of the reported TCB.
    std::fs::write(&policy, "[min_svn]\n\"reported_tcb.snp\" = 8\n\"reported_tcb.microcode\" = 116\n").unwrap();
    let (code, _, err) = run(&["verify", SNP[0], SNP[1], SNP[2], "--at", "2026-01-01T00:00:00Z", "--policy", policy.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("reported_tcb.microcode is 115") && !err.contains("reported_tcb.snp"), "{err}");
}

/// A round bundle exported from a test round (`TESSERA_SAVE_BUNDLE`, see
/// `tests/tests/compliance.rs`), audited offline months later, as an auditor would.
#[test]
fn audit_of_a_committed_round_bundle() {
    let d = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/audit");
    let bundle = format!("{d}/round-bundle.json");
    let dev = std::env::temp_dir().join(format!("tessera-dev-policy-{}.toml", std::process::id()));
    std::fs::write(&dev, "allow_insecure_dev = true\n").unwrap();
    let dev = dev.to_str().unwrap();
    let head = format!("{d}/earlier-head.json");
    let mean = format!("{d}/round-mean.bin");
    // Judged now (the default, printed as such): passes, with every check named.
    let (code, out, err) = run(&["audit", &bundle, "--policy", dev, "--previous-head", &head, "--mean", &mean]);
    assert_eq!(code, 0, "{out}{err}");
    for check in
        ["aggregator evidence", "tree head signature", "inclusion proofs", "report matches the log", "consistency with the earlier tree head", "released mean"]
    {
        assert!(out.contains(&format!("ok      {check}")), "{check}: {out}");
    }
    assert!(out.contains("evidence judged at ") && out.contains(" (now)"), "{out}");
    assert!(out.contains("(aggregator dev-insecure (SIMULATED"), "the header names the verified format: {out}");
    // --at reproduces a verdict as of another time, and says so; before the evidence was
    // made, the evidence does not verify.
    let (code, out, _) = run(&["audit", &bundle, "--policy", dev, "--at", "2030-01-01T00:00:00Z"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("evidence judged at 2030-01-01T00:00:00Z (--at: reproducing a verdict"), "{out}");
    let (code, out, err) = run(&["audit", &bundle, "--policy", dev, "--at", "2000-01-01T00:00:00Z"]);
    assert_eq!(code, 1);
    assert!(err.contains("FAILED  aggregator evidence") && err.contains("issued in the future"), "{err}");
    assert!(out.contains("evidence unverified; the bundle says \"dev-insecure"), "an unverified format is not printed as fact: {out}");
    // An auditor's policy must pin the aggregator's code: the default one does not, so
    // the audit refuses to run and says why.
    let (code, _, err) = run(&["audit", &bundle]);
    assert_eq!(code, 2);
    assert!(err.contains("accepts any measurement"), "{err}");
    // A policy that pins code refuses simulated evidence; nothing else fails.
    let pinned = std::env::temp_dir().join(format!("tessera-pinned-policy-{}.toml", std::process::id()));
    std::fs::write(&pinned, "allowed_measurements = [\"00\"]\n").unwrap();
    let (code, out, _) = run(&["audit", &bundle, "--policy", pinned.to_str().unwrap(), "--json"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let failed: Vec<&str> = v["checks"].as_array().unwrap().iter().filter(|c| c["passed"] == false).map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(failed, vec!["aggregator evidence"]);
    assert_eq!(v["reproduction"], false);
    let _ = std::fs::remove_file(&pinned);
    // Tampering with any entry breaks its inclusion; with the report, the recomputation.
    let text = std::fs::read_to_string(&bundle).unwrap();
    let mut b: serde_json::Value = serde_json::from_str(&text).unwrap();
    b["entries"][3]["data"] = serde_json::Value::String(b["entries"][3]["data"].as_str().unwrap().replace("\"accepted\":true", "\"accepted\":false"));
    let tampered = std::env::temp_dir().join(format!("tessera-tampered-{}.json", std::process::id()));
    std::fs::write(&tampered, b.to_string()).unwrap();
    let (code, _, err) = run(&["audit", tampered.to_str().unwrap(), "--policy", dev]);
    assert_eq!(code, 1);
    assert!(err.contains("FAILED  inclusion of entry") && err.contains("FAILED  report matches the log"), "{err}");
    // A truncated file is unusable input.
    std::fs::write(&tampered, &text[..text.len() / 2]).unwrap();
    assert_eq!(run(&["audit", tampered.to_str().unwrap()]).0, 2);
    let _ = std::fs::remove_file(&tampered);
}

/// The host ships the collateral and chose the round's clock; the audit judges the
/// evidence now. A bundle whose aggregator evidence is a real TDX quote with collateral
/// that has since expired fails without `--at`, naming the window; as of a time inside
/// the window only the binding (this quote was not made for this log key) fails.
#[test]
fn an_audit_judges_collateral_at_the_present_time() {
    let d = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/audit");
    let text = std::fs::read_to_string(format!("{d}/round-bundle.json")).unwrap();
    let mut b: serde_json::Value = serde_json::from_str(&text).unwrap();
    let quote = std::fs::read(format!("{V}/tdx-sgx-dcap/tdx-v4-uptodate/quote.bin")).unwrap();
    let collateral = std::fs::read(format!("{V}/tdx-sgx-dcap/tdx-v4-uptodate/collateral.json")).unwrap();
    let evidence = tessera_attestation::bundle::EvidenceBundle { evidence: quote, endorsements: vec![collateral] }.encode();
    b["aggregator"]["evidence"] = serde_json::Value::String(hex::encode(evidence));
    b["aggregator"]["format"] = serde_json::Value::String("intel-tdx".into());
    let path = std::env::temp_dir().join(format!("tessera-tdx-bundle-{}.json", std::process::id()));
    std::fs::write(&path, b.to_string()).unwrap();
    let policy = std::env::temp_dir().join(format!("tessera-tdx-policy-{}.toml", std::process::id()));
    std::fs::write(
        &policy,
        "[tdx]\n\
         mrtd = [\"91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7\"]\n\
         rtmr0 = [\"44c0197b39157fdd7a4dcc44767f9d6b0bb3977c7a8e347b8492f827fe9d9e5c48aca29b220b80b6a540cf994b9bc9c0\"]\n\
         rtmr1 = [\"0084452c01668329d4bc06acdf58a7205c26743304509973949e5619bf81a6a7aea8c323c173019b3093d54e579e9378\"]\n\
         rtmr2 = [\"d833feef2cd945148aa38ead2c53e9b7f138190aaaebfc551dccd829fc207aa3ba80b70870d7330733642e01d48c3132\"]\n",
    )
    .unwrap();
    let (p, pol) = (path.to_str().unwrap(), policy.to_str().unwrap());

    let (code, _, err) = run(&["audit", p, "--policy", pol]);
    assert_eq!(code, 1);
    let line = err.lines().find(|l| l.starts_with("FAILED  aggregator evidence")).unwrap_or_else(|| panic!("{err}"));
    assert!(
        line.contains("not valid at the verification time") && (line.contains("not after") || line.contains("next update") || line.contains("expired")),
        "{line}"
    );
    assert!(!line.contains("report_data"), "verification stops at the expired collateral: {line}");

    let (code, out, err) = run(&["audit", p, "--policy", pol, "--at", "2025-07-01T00:00:00Z"]);
    assert_eq!(code, 1);
    let line = err.lines().find(|l| l.starts_with("FAILED  aggregator evidence")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("intel-tdx evidence") && line.contains("report_data mismatch") && !line.contains("not valid"), "{line}");
    assert!(out.contains("(aggregator intel-tdx,"), "{out}");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&policy);
}
