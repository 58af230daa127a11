//! Intel DCAP (TDX quote v4/v5, SGX quote v3) verification against real quotes and Intel PCS
//! collateral (tests/vectors/tdx-sgx-dcap/PROVENANCE.md gives their origin, the time window
//! in which each collateral is valid, and the expected values checked here).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use sha2::{Digest, Sha256};
use tessera_attestation::dcap::{self, DcapVerifier, QuoteBody, INTEL_SGX_ROOT_CA_DER};
use tessera_attestation::policy::{NodePolicy, PolicyFailure, SgxRules, TdxRules};
use tessera_attestation::{Claims, Format, Verifier, VerifyError};

/// 2025-07-01T00:00:00Z: inside the tdx-v4-uptodate and sgx-v3 windows.
const JULY_2025: u64 = 1_751_328_000;
/// 2026-03-01T00:00:00Z: inside the tdx-v5-no-tcb-match window.
const MARCH_2026: u64 = 1_772_323_200;

struct Sample {
    quote: Vec<u8>,
    collateral: Vec<u8>,
}

fn sample(dir: &str) -> Sample {
    let base = format!("{}/tests/vectors/tdx-sgx-dcap/{dir}", env!("CARGO_MANIFEST_DIR"));
    Sample { quote: std::fs::read(format!("{base}/quote.bin")).unwrap(), collateral: std::fs::read(format!("{base}/collateral.json")).unwrap() }
}

fn tdx_v4() -> Sample {
    sample("tdx-v4-uptodate")
}
fn tdx_v5() -> Sample {
    sample("tdx-v5-no-tcb-match")
}
fn sgx_v3() -> Sample {
    sample("sgx-v3")
}

fn verify(quote: &[u8], collateral: &[u8], now: u64) -> Result<Claims, VerifyError> {
    tessera_attestation::verify(quote, &[collateral.to_vec()], now)
}

fn field<'a>(c: &'a Claims, name: &str) -> &'a str {
    c.fields.get(name).unwrap_or_else(|| panic!("no field {name} in {:?}", c.fields.keys()))
}

const ZERO48: &str = "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000";

// ---------------------------------------------------------------- samples

#[test]
fn pinned_root_is_the_intel_sgx_root_ca() {
    assert_eq!(hex::encode(Sha256::digest(INTEL_SGX_ROOT_CA_DER)), "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3");
    // The chain in each quote ends with this very certificate.
    for s in [tdx_v4(), tdx_v5(), sgx_v3()] {
        let q = dcap::parse_quote(&s.quote).unwrap();
        let chain = pem::parse_many(&q.cert_data).unwrap();
        assert_eq!(chain.len(), 3);
        assert_eq!(chain[2].contents(), INTEL_SGX_ROOT_CA_DER);
    }
}

#[test]
fn tdx_v4_up_to_date_passes_with_every_claim() {
    let s = tdx_v4();
    let c = verify(&s.quote, &s.collateral, JULY_2025).unwrap();
    assert_eq!(c.format, Format::Tdx);
    assert_eq!(c.measurement, "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7");
    assert_eq!(
        c.report_data,
        "9a9d48e7f6799642d3d1b34e1e5e1742d4bb02dd6ddd551862c1211d35c304f9eca3efdbb481601c163cf52493d6e44aed55d51ec39b7e518fadb92c2b523f20"
    );
    assert!(!c.debug);
    assert_eq!(c.issued_at, None);
    assert_eq!(c.tcb.as_deref(), Some("UpToDate"));
    let signer = c.signer.as_deref().unwrap();
    assert!(signer.contains("CN=Intel SGX PCK Certificate") && signer.contains("FMSPC B0C06F000000"), "{signer}");
    for (name, value) in [
        ("MRTD", c.measurement.as_str()),
        ("RTMR0", "44c0197b39157fdd7a4dcc44767f9d6b0bb3977c7a8e347b8492f827fe9d9e5c48aca29b220b80b6a540cf994b9bc9c0"),
        ("RTMR1", "0084452c01668329d4bc06acdf58a7205c26743304509973949e5619bf81a6a7aea8c323c173019b3093d54e579e9378"),
        ("RTMR2", "d833feef2cd945148aa38ead2c53e9b7f138190aaaebfc551dccd829fc207aa3ba80b70870d7330733642e01d48c3132"),
        ("RTMR3", ZERO48),
        ("MRCONFIGID", ZERO48),
        ("MROWNER", ZERO48),
        ("TDATTRIBUTES", "0000001000000000"),
        ("TEE_TCB_SVN", "06010300000000000000000000000000"),
        ("MRSEAM", "5b38e33a6487958b72c3c12a938eaa5e3fd4510c51aeeab58c7d5ecee41d7c436489d6c8e4f92f160b7cad34207b00c1"),
        ("QUOTE_VERSION", "4"),
        ("TEE_TYPE", "TDX"),
        ("TCB_STATUS", "UpToDate"),
        ("ADVISORY_IDS", ""),
        ("QE_IDENTITY_STATUS", "UpToDate"),
        ("FMSPC", "B0C06F000000"),
        ("PCE_ID", "0000"),
    ] {
        assert_eq!(field(&c, name), value, "{name}");
    }
    for name in ["MRSIGNERSEAM", "SEAMATTRIBUTES", "XFAM", "MROWNERCONFIG", "PCK_SUBJECT", "QE_MRSIGNER", "QE_ISVSVN", "COLLATERAL_EXPIRES"] {
        field(&c, name);
    }
    assert!(!c.fields.contains_key("TEE_TCB_SVN2"), "a TDX 1.0 body has no TEE_TCB_SVN2");
}

#[test]
fn verified_claims_feed_the_node_policy() {
    let s = tdx_v4();
    let claims = verify(&s.quote, &s.collateral, JULY_2025).unwrap();
    let report_data: [u8; 64] = hex::decode(&claims.report_data).unwrap().try_into().unwrap();
    let policy = NodePolicy { allowed_measurements: vec![claims.measurement.clone()], tdx: Some(pin_tdx(&claims)), ..NodePolicy::default() };
    let verdict = policy.check(&s.quote, std::slice::from_ref(&s.collateral), &report_data, JULY_2025);
    assert!(verdict.accepted, "{}", verdict.reasons());
    assert!(!policy.check(&s.quote, std::slice::from_ref(&s.collateral), &[0; 64], JULY_2025).accepted);
}

/// A `[tdx]` section pinning every measurement register of `claims`.
fn pin_tdx(claims: &Claims) -> TdxRules {
    let one = |name: &str| vec![field(claims, name).to_string()];
    TdxRules {
        mrtd: one("MRTD"),
        rtmr0: one("RTMR0"),
        rtmr1: one("RTMR1"),
        rtmr2: one("RTMR2"),
        rtmr3: one("RTMR3"),
        mrconfigid: one("MRCONFIGID"),
        mrowner: one("MROWNER"),
        mrownerconfig: one("MROWNERCONFIG"),
    }
}

/// One hex digit of `value` changed.
fn altered(value: &str) -> String {
    let first = if value.starts_with('0') { "1" } else { "0" };
    format!("{first}{}", &value[1..])
}

#[test]
fn a_tdx_policy_pins_the_runtime_measurements_not_only_the_firmware() {
    let s = tdx_v4();
    let claims = verify(&s.quote, &s.collateral, JULY_2025).unwrap();
    let report_data: [u8; 64] = hex::decode(&claims.report_data).unwrap().try_into().unwrap();
    let endorsements = std::slice::from_ref(&s.collateral);

    // Pinning every register accepts the real quote, through the whole check.
    let pinned = NodePolicy { tdx: Some(pin_tdx(&claims)), ..NodePolicy::default() };
    let verdict = pinned.check(&s.quote, endorsements, &report_data, JULY_2025);
    assert!(verdict.accepted, "{}", verdict.reasons());
    assert!(pinned.require_pinned_code("the aggregator").is_ok());

    // The same quote with one runtime register changed (a TD on the same firmware
    // booting another kernel, initrd or command line) is refused, naming the register.
    for (name, edit) in [("RTMR0", 0), ("RTMR1", 1), ("RTMR2", 2), ("RTMR3", 3)] {
        let mut other = claims.clone();
        let value = altered(field(&claims, name));
        other.fields.insert(name.into(), value.clone());
        let verdict = pinned.evaluate(&other, &report_data, JULY_2025);
        assert_eq!(verdict.failures, vec![PolicyFailure::FieldNotAllowed { field: name.into(), value }], "RTMR{edit}");
    }
    // And so is the real quote under a policy that expects another value there.
    let mut rules = pin_tdx(&claims);
    rules.rtmr2 = vec![altered(&rules.rtmr2[0])];
    let verdict = NodePolicy { tdx: Some(rules), ..NodePolicy::default() }.check(&s.quote, endorsements, &report_data, JULY_2025);
    assert_eq!(verdict.failures, vec![PolicyFailure::FieldNotAllowed { field: "RTMR2".into(), value: field(&claims, "RTMR2").into() }]);
    // MRCONFIGID and MROWNER are pinned the same way.
    let mut rules = pin_tdx(&claims);
    rules.mrowner = vec![altered(ZERO48)];
    let verdict = NodePolicy { tdx: Some(rules), ..NodePolicy::default() }.check(&s.quote, endorsements, &report_data, JULY_2025);
    assert_eq!(verdict.failures, vec![PolicyFailure::FieldNotAllowed { field: "MROWNER".into(), value: ZERO48.into() }]);

    // MRTD alone (the review's finding: it covers only the public TDVF firmware) no
    // longer passes: the verdict says which runtime registers are unpinned.
    let firmware_only = NodePolicy { allowed_measurements: vec![claims.measurement.clone()], ..NodePolicy::default() };
    let verdict = firmware_only.check(&s.quote, endorsements, &report_data, JULY_2025);
    assert_eq!(verdict.failures, vec![PolicyFailure::TdxRuntimeUnpinned { missing: "RTMR0, RTMR1, RTMR2".into() }]);
    let mrtd_section = NodePolicy {
        tdx: Some(TdxRules { mrtd: vec![claims.measurement.clone()], rtmr0: vec![field(&claims, "RTMR0").into()], ..TdxRules::default() }),
        ..NodePolicy::default()
    };
    assert_eq!(
        mrtd_section.check(&s.quote, endorsements, &report_data, JULY_2025).failures,
        vec![PolicyFailure::TdxRuntimeUnpinned { missing: "RTMR1, RTMR2".into() }]
    );

    // Sections scope the policy: with only [tdx] present, SGX evidence is refused by name
    // even though nothing else about it fails.
    let sgx = sgx_v3();
    let sgx_claims = verify(&sgx.quote, &sgx.collateral, JULY_2025).unwrap();
    let sgx_rd: [u8; 64] = hex::decode(&sgx_claims.report_data).unwrap().try_into().unwrap();
    assert_eq!(pinned.evaluate(&sgx_claims, &sgx_rd, JULY_2025).failures, vec![PolicyFailure::FormatNotAllowed { format: "intel-sgx-dcap".into() }]);
    // A policy pinning TDX code but with an [sgx] section that pins nothing refuses SGX
    // evidence as unpinned rather than letting any enclave through.
    let open_sgx = NodePolicy { tdx: Some(pin_tdx(&claims)), sgx: Some(SgxRules::default()), ..NodePolicy::default() };
    assert_eq!(open_sgx.evaluate(&sgx_claims, &sgx_rd, JULY_2025).failures, vec![PolicyFailure::CodeNotPinned { format: "intel-sgx-dcap".into() }]);
}

#[test]
fn an_sgx_policy_pins_mrenclave_or_mrsigner_with_the_product() {
    let s = sgx_v3();
    let claims = verify(&s.quote, &s.collateral, JULY_2025).unwrap();
    let rd: [u8; 64] = hex::decode(&claims.report_data).unwrap().try_into().unwrap();
    let endorsements = std::slice::from_ref(&s.collateral);
    let signer = field(&claims, "MRSIGNER").to_string();
    // MRSIGNER with ISVPRODID pins every build of the signer's product.
    let by_signer = NodePolicy { sgx: Some(SgxRules { mrsigner: vec![signer.clone()], isvprodid: vec![0], ..SgxRules::default() }), ..NodePolicy::default() };
    assert!(by_signer.pins_code());
    let verdict = by_signer.check(&s.quote, endorsements, &rd, JULY_2025);
    assert!(verdict.accepted, "{}", verdict.reasons());
    // Another signer, another product: refused, naming the field.
    let other_signer =
        NodePolicy { sgx: Some(SgxRules { mrsigner: vec![altered(&signer)], isvprodid: vec![0], ..SgxRules::default() }), ..NodePolicy::default() };
    assert_eq!(
        other_signer.check(&s.quote, endorsements, &rd, JULY_2025).failures,
        vec![PolicyFailure::FieldNotAllowed { field: "MRSIGNER".into(), value: signer.clone() }]
    );
    let other_product =
        NodePolicy { sgx: Some(SgxRules { mrsigner: vec![signer.clone()], isvprodid: vec![7], ..SgxRules::default() }), ..NodePolicy::default() };
    assert_eq!(
        other_product.check(&s.quote, endorsements, &rd, JULY_2025).failures,
        vec![PolicyFailure::FieldNotAllowed { field: "ISVPRODID".into(), value: "0".into() }]
    );
    // MRSIGNER alone does not name code (any product of the signer would pass).
    let signer_only = NodePolicy { sgx: Some(SgxRules { mrsigner: vec![signer], ..SgxRules::default() }), ..NodePolicy::default() };
    assert!(!signer_only.pins_code());
    assert!(signer_only.require_pinned_code("the aggregator").is_err());
    // MRENCLAVE pins one build.
    let by_enclave = NodePolicy { sgx: Some(SgxRules { mrenclave: vec![claims.measurement.clone()], ..SgxRules::default() }), ..NodePolicy::default() };
    assert!(by_enclave.check(&s.quote, endorsements, &rd, JULY_2025).accepted);
}

#[test]
fn sgx_v3_passes_and_reports_its_out_of_date_tcb() {
    let s = sgx_v3();
    let c = verify(&s.quote, &s.collateral, JULY_2025).unwrap();
    assert_eq!(c.format, Format::SgxDcap);
    assert_eq!(c.measurement, "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb");
    let mut report_data = b"Hello, world!".to_vec();
    report_data.resize(64, 0);
    assert_eq!(c.report_data, hex::encode(report_data));
    assert!(!c.debug);
    // Not UpToDate, yet verified: the node policy decides.
    assert_eq!(c.tcb.as_deref(), Some("ConfigurationAndSWHardeningNeeded (INTEL-SA-00289,INTEL-SA-00615)"));
    for (name, value) in [
        ("MRENCLAVE", c.measurement.as_str()),
        ("MRSIGNER", "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"),
        ("ISVPRODID", "0"),
        ("ISVSVN", "0"),
        ("ATTRIBUTES", "0500000000000000e700000000000000"),
        ("TCB_STATUS", "ConfigurationAndSWHardeningNeeded"),
        ("ADVISORY_IDS", "INTEL-SA-00289,INTEL-SA-00615"),
        ("FMSPC", "00A067110000"),
        ("QUOTE_VERSION", "3"),
        ("TEE_TYPE", "SGX"),
    ] {
        assert_eq!(field(&c, name), value, "{name}");
    }
    field(&c, "QE_IDENTITY_STATUS");
    assert!(c.signer.as_deref().unwrap().contains("FMSPC 00A067110000"));
}

#[test]
fn tdx_v5_with_no_matching_tcb_level_fails_the_tcb_check() {
    let s = tdx_v5();
    match verify(&s.quote, &s.collateral, MARCH_2026) {
        Err(VerifyError::Tcb { format: Format::Tdx, status }) => assert!(status.contains("No matching TCB level"), "{status}"),
        other => panic!("expected a TCB failure, got {other:?}"),
    }
    // The body still parses: a v5 quote with a TDX 1.5 body.
    let q = dcap::parse_quote(&s.quote).unwrap();
    assert_eq!((q.version, q.signed_len), (5, 702));
    let QuoteBody::Td(td) = &q.body else { panic!("not a TD body") };
    assert_eq!(td.body_type, 3);
    assert_eq!(hex::encode(td.mr_td), "273828c46252fcbdd8ad2dd907130222b03466d52a2911d70c1a5950895d6bd1ae451d382d5a9b1b4c0ed0e5ae9a3dbd");
    assert_eq!(hex::encode(td.tee_tcb_svn), "07010300000000000000000000000000");
    assert_eq!(hex::encode(&td.report_data[..32]), "d2142b643598eb5fae2bc8529dd79a558b29f868ccbb6531cb28dab9dce47728");
    assert_eq!(td.report_data[32..], [0; 32]);
    assert!(td.tee_tcb_svn2.is_some() && td.mr_service_td.is_some());
}

#[test]
fn parser_reads_the_signed_lengths_of_the_provenance() {
    assert_eq!(dcap::parse_quote(&tdx_v4().quote).unwrap().signed_len, 632);
    assert_eq!(dcap::parse_quote(&sgx_v3().quote).unwrap().signed_len, 432);
}

#[test]
fn detection_is_by_header_version_and_tee_type() {
    let (tdx, sgx) = (DcapVerifier::tdx(), DcapVerifier::sgx());
    assert_eq!((tdx.format(), sgx.format()), (Format::Tdx, Format::SgxDcap));
    for (s, tee) in [(tdx_v4(), dcap::Tee::Tdx), (tdx_v5(), dcap::Tee::Tdx), (sgx_v3(), dcap::Tee::Sgx)] {
        assert_eq!(dcap::detect_tee(&s.quote), Some(tee));
        assert_eq!(tdx.detect(&s.quote), tee == dcap::Tee::Tdx);
        assert_eq!(sgx.detect(&s.quote), tee == dcap::Tee::Sgx);
        // Exactly one registered verifier claims each quote.
        assert_eq!(tessera_attestation::registry().iter().filter(|v| v.detect(&s.quote)).count(), 1);
    }
    // Not a DCAP header: SGX quote v4, TDX quote v3, dev JSON, short input.
    let mut q = sgx_v3().quote;
    q[0] = 4;
    assert_eq!(dcap::detect_tee(&q), None);
    let mut q = tdx_v4().quote;
    q[0] = 3;
    assert_eq!(dcap::detect_tee(&q), None);
    assert_eq!(dcap::detect_tee(br#"{"format":"tessera-dev-evidence-INSECURE"}"#), None);
    assert_eq!(dcap::detect_tee(&[3, 0, 2, 0, 0, 0, 0, 0]), None);
    assert_eq!(verify(b"garbage", &[], JULY_2025).unwrap_err(), VerifyError::UnknownFormat);
    // A quote handed to the other TEE's verifier is refused, not misread.
    let s = sgx_v3();
    assert!(matches!(tdx.verify(&s.quote, &[s.collateral], JULY_2025), Err(VerifyError::Malformed { format: Format::Tdx, .. })));
}

// ---------------------------------------------------------------- tampering with the quote

fn flipped(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at] ^= 0x01;
    b
}

fn expect_bad_signature(result: Result<Claims, VerifyError>, what_contains: &str) {
    match result {
        Err(VerifyError::BadSignature { what, .. }) => assert!(what.contains(what_contains), "{what}"),
        other => panic!("expected BadSignature over {what_contains}, got {other:?}"),
    }
}

#[test]
fn a_flipped_byte_in_the_signed_header_or_body_is_a_bad_signature() {
    let s = tdx_v4();
    // Header QE SVN (8), user data (28), TDATTRIBUTES (48+120), MRTD (48+136), REPORTDATA (48+520), last signed byte.
    for at in [8, 28, 48 + 120, 48 + 136, 48 + 520, 631] {
        expect_bad_signature(verify(&flipped(&s.quote, at), &s.collateral, JULY_2025), "report body");
    }
    let s = sgx_v3();
    for at in [10, 48 + 64, 48 + 320, 431] {
        expect_bad_signature(verify(&flipped(&s.quote, at), &s.collateral, JULY_2025), "report body");
    }
    let s = tdx_v5();
    // v5 body (MRTD at 54+136) verifies as far as the signatures even though its TCB does not match.
    expect_bad_signature(verify(&flipped(&s.quote, 54 + 136), &s.collateral, MARCH_2026), "report body");
}

#[test]
fn the_signature_cache_returns_the_same_verdicts() {
    let s = tdx_v4();
    dcap::clear_signature_cache();
    let cold = verify(&s.quote, &s.collateral, JULY_2025).unwrap();
    assert!(dcap::signature_cache_len() >= 6, "the chain, CRLs, TCB Info, QE Identity, QE report and quote signatures");
    let warm = verify(&s.quote, &s.collateral, JULY_2025).unwrap();
    assert_eq!(cold, warm);
    // Time and the TCB match are still evaluated with every signature cached.
    assert!(matches!(verify(&s.quote, &s.collateral, MARCH_2026 + 365 * 86_400), Err(VerifyError::NotValidAtTime { .. })));
    let other = tdx_v5();
    assert!(matches!(verify(&other.quote, &other.collateral, MARCH_2026), Err(VerifyError::Tcb { .. })));
}

#[test]
fn a_flipped_byte_in_the_signature_data_is_a_bad_signature() {
    for (s, now) in [(tdx_v4(), JULY_2025), (sgx_v3(), JULY_2025)] {
        // Warm: the genuine signatures are remembered, and every flip below still fails.
        verify(&s.quote, &s.collateral, now).unwrap();
        let signed_len = dcap::parse_quote(&s.quote).unwrap().signed_len;
        let sig = signed_len + 4;
        // The quote signature (r, then s).
        expect_bad_signature(verify(&flipped(&s.quote, sig + 5), &s.collateral, now), "report body");
        expect_bad_signature(verify(&flipped(&s.quote, sig + 40), &s.collateral, now), "report body");
        // The attestation key: the QE report's hash over it no longer matches.
        expect_bad_signature(verify(&flipped(&s.quote, sig + 64 + 7), &s.collateral, now), "attestation key");
        // The QE report and its signature by the PCK key (v4/v5 wrap them in 6 bytes of type and size).
        let qe_report = sig + 128 + if s.quote[0] == 3 { 0 } else { 6 };
        expect_bad_signature(verify(&flipped(&s.quote, qe_report + 100), &s.collateral, now), "QE report");
        expect_bad_signature(verify(&flipped(&s.quote, qe_report + 384 + 3), &s.collateral, now), "QE report");
        // The QE authentication data, which the QE report's hash also covers.
        expect_bad_signature(verify(&flipped(&s.quote, qe_report + 384 + 64 + 2 + 1), &s.collateral, now), "attestation key");
    }
}

/// The PEM PCK chain inside a quote, as (start, end) byte ranges of each block.
fn pem_blocks(quote: &[u8]) -> Vec<(usize, usize)> {
    let (begin, end) = (b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----\n");
    let mut blocks = Vec::new();
    let mut from = 0;
    while let Some(b) = quote[from..].windows(begin.len()).position(|w| w == begin) {
        let b = from + b;
        let e = b + quote[b..].windows(end.len()).position(|w| w == end).unwrap() + end.len();
        blocks.push((b, e));
        from = e;
    }
    blocks
}

fn pem_lf(der: &[u8]) -> String {
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der.to_vec()), pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF))
}

/// Replaces certificate `index` of the quote's PCK chain with `edit` applied to its DER,
/// keeping the length (so the quote's size fields stay right).
fn with_edited_cert(quote: &[u8], index: usize, edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let (b, e) = pem_blocks(quote)[index];
    let mut der = pem::parse(&quote[b..e]).unwrap().into_contents();
    assert_eq!(pem_lf(&der).as_bytes(), &quote[b..e], "the quote's PEM layout is the standard one");
    edit(der.as_mut_slice());
    let text = pem_lf(&der);
    assert_eq!(text.len(), e - b);
    let mut out = quote.to_vec();
    out[b..e].copy_from_slice(text.as_bytes());
    out
}

/// Changes one bit of the X coordinate of a certificate's P-256 public key.
fn flip_public_key(der: &mut [u8]) {
    let at = der.windows(4).position(|w| w == [0x03, 0x42, 0x00, 0x04]).unwrap() + 10;
    der[at] ^= 0x01;
}

#[test]
fn a_tampered_pck_certificate_breaks_the_chain() {
    for (s, now) in [(tdx_v4(), JULY_2025), (sgx_v3(), JULY_2025)] {
        // A byte of the leaf's signature (the last bytes of its DER).
        let q = with_edited_cert(&s.quote, 0, |der| {
            let n = der.len();
            der[n - 2] ^= 0x01;
        });
        assert!(matches!(verify(&q, &s.collateral, now), Err(VerifyError::CertificateChain { .. })), "{:?}", verify(&q, &s.collateral, now));
        // A byte of the leaf's public key: the PCK CA's signature over it fails.
        let q = with_edited_cert(&s.quote, 0, flip_public_key);
        assert!(matches!(verify(&q, &s.collateral, now), Err(VerifyError::CertificateChain { .. })), "{:?}", verify(&q, &s.collateral, now));
        // A byte of the PEM text that is not base64 any more.
        let (b, _) = pem_blocks(&s.quote)[0];
        let mut q = s.quote.clone();
        q[b + 100] = b'*';
        assert!(matches!(verify(&q, &s.collateral, now), Err(VerifyError::CertificateChain { .. })));
    }
}

#[test]
fn a_substituted_root_is_untrusted() {
    for (s, now) in [(tdx_v4(), JULY_2025), (sgx_v3(), JULY_2025)] {
        // Intel's root with one bit of its key changed: another key under Intel's name.
        let q = with_edited_cert(&s.quote, 2, flip_public_key);
        assert_eq!(verify(&q, &s.collateral, now).unwrap_err(), VerifyError::UntrustedRoot { format: dcap::detect_tee(&q).unwrap().format() });
        // The same substitution in the collateral's TCB Info issuer chain.
        let mut c: serde_json::Value = serde_json::from_slice(&s.collateral).unwrap();
        let chain = pem::parse_many(c["tcb_info_issuer_chain"].as_str().unwrap()).unwrap();
        assert_eq!(chain[1].contents(), INTEL_SGX_ROOT_CA_DER);
        let mut root = chain[1].contents().to_vec();
        flip_public_key(&mut root);
        c["tcb_info_issuer_chain"] = (pem_lf(chain[0].contents()) + &pem_lf(&root)).into();
        let c = serde_json::to_vec(&c).unwrap();
        assert!(matches!(verify(&s.quote, &c, now), Err(VerifyError::UntrustedRoot { .. })), "{:?}", verify(&s.quote, &c, now));
    }
}

#[test]
fn truncation_and_trailing_garbage_are_malformed() {
    for s in [tdx_v4(), tdx_v5(), sgx_v3()] {
        let verifier = if s.quote[0] == 3 { DcapVerifier::sgx() } else { DcapVerifier::tdx() };
        let signed_len = dcap::parse_quote(&s.quote).unwrap().signed_len;
        let sig_len = u32::from_le_bytes(s.quote[signed_len..signed_len + 4].try_into().unwrap()) as usize;
        let sig_end = signed_len + 4 + sig_len;
        for len in [0, 7, 47, 48, 100, signed_len - 1, signed_len, signed_len + 3, signed_len + 4, signed_len + 100, sig_end - 200, sig_end - 1] {
            let result = verifier.verify(&s.quote[..len], std::slice::from_ref(&s.collateral), JULY_2025);
            assert!(matches!(result, Err(VerifyError::Malformed { .. })), "length {len}: {result:?}");
        }
    }
    // tdx-v4's quote ends with 70 bytes of zero padding: tolerated, but not a non-zero byte.
    let s = tdx_v4();
    assert!(verify(&s.quote[..s.quote.len() - 70], &s.collateral, JULY_2025).is_ok());
    let mut padded = s.quote.clone();
    padded.extend_from_slice(&[0; 100]);
    assert!(verify(&padded, &s.collateral, JULY_2025).is_ok());
    let last = s.quote.len() - 1;
    assert!(matches!(verify(&flipped(&s.quote, last), &s.collateral, JULY_2025), Err(VerifyError::Malformed { .. })));
    let s = sgx_v3();
    let mut q = s.quote.clone();
    q.push(1);
    assert!(matches!(verify(&q, &s.collateral, JULY_2025), Err(VerifyError::Malformed { .. })));
}

// ---------------------------------------------------------------- time

fn expect_stale(result: Result<Claims, VerifyError>, what_contains: &str) {
    match result {
        Err(VerifyError::NotValidAtTime { what, .. }) => assert!(what.contains(what_contains), "{what}"),
        other => panic!("expected NotValidAtTime ({what_contains}), got {other:?}"),
    }
}

#[test]
fn collateral_is_valid_only_in_its_window() {
    let s = tdx_v4();
    // 2026-11-25, the date the vectors were checked: TCB Info expired in July 2025.
    expect_stale(verify(&s.quote, &s.collateral, 1_795_564_800), "TCB Info");
    // 2025-06-19T10:00:00Z: the TCB Info is issued at 10:16:03.
    expect_stale(verify(&s.quote, &s.collateral, 1_750_327_200), "TCB Info");
    // PROVENANCE's window ends at 2025-07-19T10:00:35Z, the PCK CRL's nextUpdate.
    assert!(verify(&s.quote, &s.collateral, 1_752_919_234).is_ok());
    expect_stale(verify(&s.quote, &s.collateral, 1_752_919_235), "CRL");
    let s = sgx_v3();
    expect_stale(verify(&s.quote, &s.collateral, 1_752_969_600), "");
    // Far in the future, past the PCK certificate's notAfter and the root's.
    expect_stale(verify(&s.quote, &s.collateral, u64::MAX), "");
}

// ---------------------------------------------------------------- collateral

fn edit_collateral(collateral: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut c: serde_json::Value = serde_json::from_slice(collateral).unwrap();
    edit(&mut c);
    serde_json::to_vec(&c).unwrap()
}

#[test]
fn tampered_collateral_is_a_bad_signature() {
    let s = tdx_v4();
    // With every genuine signature of this sample already remembered, nothing edited
    // passes: the cache is keyed by the exact key, message and signature.
    verify(&s.quote, &s.collateral, JULY_2025).unwrap();
    let tcb = edit_collateral(&s.collateral, |c| {
        let text = c["tcb_info"].as_str().unwrap().replacen("\"tcbStatus\":\"OutOfDate\"", "\"tcbStatus\":\"UpToDate\"", 1);
        c["tcb_info"] = text.into();
    });
    assert_ne!(tcb, s.collateral);
    expect_bad_signature(verify(&s.quote, &tcb, JULY_2025), "TCB Info");
    let qe = edit_collateral(&s.collateral, |c| {
        let text = c["qe_identity"].as_str().unwrap().replacen("\"isvprodid\":2", "\"isvprodid\":3", 1);
        c["qe_identity"] = text.into();
    });
    assert_ne!(qe, s.collateral);
    expect_bad_signature(verify(&s.quote, &qe, JULY_2025), "QE Identity");
    let sig = edit_collateral(&s.collateral, |c| {
        let mut text = c["tcb_info_signature"].as_str().unwrap().to_string();
        text.replace_range(10..11, if &text[10..11] == "0" { "1" } else { "0" });
        c["tcb_info_signature"] = text.into();
    });
    expect_bad_signature(verify(&s.quote, &sig, JULY_2025), "TCB Info");
}

#[test]
fn collateral_must_be_signed_by_the_tcb_signing_certificate() {
    // The PCK chain, valid and under the pinned root, is not a TCB Info issuer chain.
    let s = tdx_v4();
    let pck_chain = String::from_utf8_lossy(&dcap::parse_quote(&s.quote).unwrap().cert_data).trim_end_matches('\0').to_string();
    for field in ["tcb_info_issuer_chain", "qe_identity_issuer_chain"] {
        let c = edit_collateral(&s.collateral, |c| c[field] = pck_chain.clone().into());
        assert!(matches!(verify(&s.quote, &c, JULY_2025), Err(VerifyError::CertificateChain { why, .. }) if why.contains("TCB Signing")), "{field}");
    }
}

#[test]
fn crls_must_come_from_their_issuers() {
    let s = tdx_v4();
    let c: serde_json::Value = serde_json::from_slice(&s.collateral).unwrap();
    let (root_crl, pck_crl) = (c["root_ca_crl"].clone(), c["pck_crl"].clone());
    // A root CA CRL not signed by the pinned root.
    let swapped = edit_collateral(&s.collateral, |c| c["root_ca_crl"] = pck_crl.clone());
    expect_bad_signature(verify(&s.quote, &swapped, JULY_2025), "root CA CRL");
    // No CRL from the PCK leaf's issuer: its revocation status is unknown.
    let swapped = edit_collateral(&s.collateral, |c| c["pck_crl"] = root_crl.clone());
    assert!(matches!(verify(&s.quote, &swapped, JULY_2025), Err(VerifyError::CertificateChain { why, .. }) if why.contains("revocation")));
}

#[test]
fn missing_or_foreign_collateral_is_named() {
    let s = tdx_v4();
    assert!(matches!(verify(&s.quote, b"", JULY_2025), Err(VerifyError::Malformed { .. })));
    assert!(matches!(tessera_attestation::verify(&s.quote, &[], JULY_2025), Err(VerifyError::MissingEndorsement { format: Format::Tdx, .. })));
    assert!(matches!(verify(&s.quote, b"not json", JULY_2025), Err(VerifyError::Malformed { .. })));
    let empty = edit_collateral(&s.collateral, |c| c["pck_crl"] = "".into());
    assert!(matches!(verify(&s.quote, &empty, JULY_2025), Err(VerifyError::MissingEndorsement { what, .. }) if what.contains("pck_crl")));
    // SGX collateral (valid at the same time) for a TDX quote: not this platform's.
    let sgx = sgx_v3();
    assert!(
        matches!(verify(&s.quote, &sgx.collateral, JULY_2025), Err(VerifyError::MissingEndorsement { .. })),
        "{:?}",
        verify(&s.quote, &sgx.collateral, JULY_2025)
    );
    assert!(
        matches!(verify(&sgx.quote, &s.collateral, JULY_2025), Err(VerifyError::MissingEndorsement { .. })),
        "{:?}",
        verify(&sgx.quote, &s.collateral, JULY_2025)
    );
}

// ---------------------------------------------------------------- never panics

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 128, ..Default::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..6000), header in 0usize..3) {
        let s = tdx_v4();
        let _ = verify(&bytes, &s.collateral, JULY_2025);
        // The same bytes behind each real header, so they reach the body and signature parsers.
        let mut q = [tdx_v4(), tdx_v5(), sgx_v3()][header].quote[..48].to_vec();
        q.extend_from_slice(&bytes);
        let _ = verify(&q, &s.collateral, JULY_2025);
        let _ = dcap::parse_quote(&q);
        let _ = DcapVerifier::tdx().verify(&q, std::slice::from_ref(&bytes), JULY_2025);
    }

    #[test]
    fn mutated_quotes_never_panic_nor_change_claims(which in 0usize..3, edits in proptest::collection::vec((0usize..6000, 1u8..=255), 1..4)) {
        let (s, now) = [(tdx_v4(), JULY_2025), (tdx_v5(), MARCH_2026), (sgx_v3(), JULY_2025)].into_iter().nth(which).unwrap();
        let original = verify(&s.quote, &s.collateral, now);
        let mut q = s.quote.clone();
        for (at, x) in &edits {
            let i = at % q.len();
            q[i] ^= x;
        }
        // A change outside what is signed or checked may leave the quote valid (e.g. a
        // byte after the PEM chain); the claims must then be the original's.
        if let Ok(claims) = verify(&q, &s.collateral, now) {
            let original = original.as_ref().unwrap();
            proptest::prop_assert_eq!(&claims.measurement, &original.measurement);
            proptest::prop_assert_eq!(&claims.report_data, &original.report_data);
            proptest::prop_assert_eq!(&claims.tcb, &original.tcb);
        }
    }

    #[test]
    fn mutated_collateral_never_panics(which in 0usize..3, at in 0usize..20000, x in 1u8..=255) {
        let (s, now) = [(tdx_v4(), JULY_2025), (tdx_v5(), MARCH_2026), (sgx_v3(), JULY_2025)].into_iter().nth(which).unwrap();
        let mut c = s.collateral.clone();
        let i = at % c.len();
        c[i] ^= x;
        if let Ok(claims) = verify(&s.quote, &c, now) {
            // JSON whitespace or key order may change without changing the signed content.
            proptest::prop_assert_eq!(claims, verify(&s.quote, &s.collateral, now).unwrap());
        }
    }
}
