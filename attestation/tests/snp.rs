//! SEV-SNP verification against real hardware reports. The samples, their origin and the
//! expected values are described in `vectors/sev-snp/PROVENANCE.md`.

use proptest::prelude::*;
use tessera_attestation::policy::{NodePolicy, PolicyFailure, SnpRules};
use tessera_attestation::snp::{self, AttestationReport, SnpVerifier, REPORT_LEN, SIGNED_LEN};
use tessera_attestation::{Claims, Format, Verifier, VerifyError};

struct Sample {
    name: &'static str,
    report: &'static [u8],
    vcek: &'static [u8],
    chain: &'static [u8],
    measurement: &'static str,
    report_data: String,
    chip_id: &'static str,
    reported_tcb: &'static str,
    debug: bool,
    root: &'static str,
    /// VCEK notBefore and notAfter, seconds since the epoch.
    not_before: u64,
    not_after: u64,
}

macro_rules! files {
    ($dir:literal) => {
        (
            include_bytes!(concat!("vectors/sev-snp/", $dir, "/report.bin")).as_slice(),
            include_bytes!(concat!("vectors/sev-snp/", $dir, "/vcek.der")).as_slice(),
            include_bytes!(concat!("vectors/sev-snp/", $dir, "/cert_chain.pem")).as_slice(),
        )
    };
}

fn samples() -> [Sample; 3] {
    let (report, vcek, chain) = files!("milan-virtee");
    let milan_virtee = Sample {
        name: "milan-virtee",
        report,
        vcek,
        chain,
        measurement: "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f",
        report_data: "d447b55d197491bfe15cf298f9de9986b7a7c4be2468b4f6e2d53b71d7c645810b0f2cdfca0040433be063fc1a8293f0f3f8dae7b79fecb3d1cd82bd6a93ebfd".into(),
        chip_id: "d49554ec717f4e5b0fe6b143bcf0405bd7ae304727edf46603f2a76aef6a3abc15d7af38db757039029f0efacfd08e244324884738c72b082e2f87a44d541eb6",
        reported_tcb: "0300000000000873",
        debug: false, // POLICY 0x30000
        root: "ARK-Milan",
        not_before: 1_680_549_823, // 2023-04-03 19:23:43
        not_after: 1_901_474_623,  // 2030-04-03 19:23:43
    };
    let (report, vcek, chain) = files!("milan-gosev");
    let milan_gosev = Sample {
        name: "milan-gosev",
        report,
        vcek,
        chain,
        measurement: "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01",
        report_data: format!("0102030405{}", "00".repeat(59)),
        chip_id: "3ac3fe21e13fb0990eb28a802e3fb6a29483a6b0753590c951bdd3b8e53786184ca39e359669a2b76a1936776b564ea464cdce40c05f63c9b610c5068b006b5d",
        reported_tcb: "0200000000000544",
        debug: true, // POLICY 0xb0000 has bit 19 set
        root: "ARK-Milan",
        not_before: 1_663_980_928, // 2022-09-24 00:55:28
        not_after: 1_884_905_728,  // 2029-09-24 00:55:28
    };
    let (report, vcek, chain) = files!("genoa-azure");
    let genoa_azure = Sample {
        name: "genoa-azure",
        report,
        vcek,
        chain,
        measurement: "f57dc09a507c6ecd82369bffb600f0003792f4d99bc26e985ec0c266fc34faf3706faf814c9e61065768a6ff917c89ae",
        report_data: format!("b581f12e29a2d7d64e5e0b738d563879a78b51c644d0fa0cce02b48699f6bf5f{}", "00".repeat(32)),
        chip_id: "0506ffba875e939c2729d20c74eb72b4c5ba6bf7ea1faaa640141f12c6d64782fb487f68ce69dcd021e914cc0d9244327bc121f0242d6470903ad1d4aaea4ad1",
        reported_tcb: "0a00000000001754",
        debug: false, // POLICY 0x3001f
        root: "ARK-Genoa",
        not_before: 1_737_685_308, // 2025-01-24 02:21:48
        not_after: 1_958_523_708,  // 2032-01-24 02:21:48
    };
    [milan_virtee, milan_gosev, genoa_azure]
}

const AZURE_HCL: &[u8] = include_bytes!("vectors/sev-snp/genoa-azure/azure_hcl_report.bin");

/// 2026-01-01, inside every sample's window.
const INSIDE: u64 = 1_767_225_600;
/// 2022-01-01, before every VCEK was issued (and before the Genoa ARK and ASK were).
const BEFORE: u64 = 1_640_995_200;
/// 2033-01-01, after every VCEK expired (the ASKs and ARKs are still valid).
const AFTER: u64 = 1_988_150_400;

fn endorsements(s: &Sample) -> Vec<Vec<u8>> {
    vec![s.vcek.to_vec(), s.chain.to_vec()]
}

fn verify(report: &[u8], endorsements: &[Vec<u8>], now: u64) -> Result<Claims, VerifyError> {
    SnpVerifier.verify(report, endorsements, now)
}

/// Splits a PEM bundle into its blocks, each still PEM.
fn pem_blocks(pem: &[u8]) -> Vec<Vec<u8>> {
    let text = std::str::from_utf8(pem).expect("PEM is text");
    text.split_inclusive("-----END CERTIFICATE-----\n").filter(|b| b.contains("BEGIN")).map(|b| b.as_bytes().to_vec()).collect()
}

fn pem_to_der(pem: &[u8]) -> Vec<u8> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem).expect("one PEM block");
    p.contents
}

fn der_to_pem(der: &[u8]) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::new();
    for chunk in der.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            b64.push(if i <= chunk.len() { ALPHABET[(n >> (18 - 6 * i) & 63) as usize] } else { b'=' });
        }
    }
    let mut out = b"-----BEGIN CERTIFICATE-----\n".to_vec();
    for line in b64.chunks(64) {
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.extend_from_slice(b"-----END CERTIFICATE-----\n");
    out
}

fn flipped(bytes: &[u8], at: usize, mask: u8) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v[at] ^= mask;
    v
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).position(|w| w == needle).expect("needle present")
}

#[test]
fn every_sample_verifies_with_its_expected_values() {
    for s in samples() {
        for now in [INSIDE, s.not_before, s.not_after] {
            // Through the registry, as a caller would: the format is detected from the bytes.
            let claims = tessera_attestation::verify(s.report, &endorsements(&s), now).unwrap_or_else(|e| panic!("{} at {now}: {e}", s.name));
            assert_eq!(claims.format, Format::SevSnp, "{}", s.name);
            assert_eq!(claims.measurement, s.measurement, "{}", s.name);
            assert_eq!(claims.report_data, s.report_data, "{}", s.name);
            assert_eq!(claims.debug, s.debug, "{}", s.name);
            assert_eq!(claims.issued_at, None);
            assert!(claims.tcb.as_deref().is_some_and(|t| t.starts_with(s.reported_tcb)), "{}: {:?}", s.name, claims.tcb);
            assert!(claims.signer.as_deref().is_some_and(|t| t.contains("CN=SEV-VCEK")), "{}: {:?}", s.name, claims.signer);
            assert_eq!(claims.fields["chip_id"], s.chip_id, "{}", s.name);
            assert_eq!(claims.fields["root"], s.root, "{}", s.name);
            assert_eq!(claims.fields["vmpl"], "0", "{}", s.name);
            assert_eq!(claims.fields["signing_key"], "vcek", "{}", s.name);
            assert!(claims.fields["reported_tcb"].starts_with(s.reported_tcb));
        }
    }
}

#[test]
fn reports_parse_at_the_documented_offsets() {
    let [virtee, gosev, genoa] = samples();
    let r = AttestationReport::parse(virtee.report).unwrap();
    assert_eq!((r.version, r.guest_svn, r.policy, r.vmpl, r.signature_algo), (2, 0, 0x30000, 0, 1));
    assert_eq!((r.reported_tcb.boot_loader, r.reported_tcb.tee, r.reported_tcb.snp, r.reported_tcb.microcode), (3, 0, 8, 0x73));
    assert_eq!(r.host_data, [0; 32]);
    assert_eq!(hex::encode(r.chip_id), virtee.chip_id);

    let r = AttestationReport::parse(gosev.report).unwrap();
    assert_eq!(r.policy, 0xb0000);
    assert!(r.debug_allowed());
    assert_eq!((r.reported_tcb.boot_loader, r.reported_tcb.snp, r.reported_tcb.microcode), (2, 5, 0x44));

    let r = AttestationReport::parse(genoa.report).unwrap();
    assert_eq!((r.version, r.policy), (3, 0x3001f));
    assert_eq!((r.cpuid_fam_id, r.cpuid_mod_id, r.cpuid_step), (Some(0x19), Some(0x11), Some(0x01)));
    assert_eq!((r.reported_tcb.boot_loader, r.reported_tcb.snp, r.reported_tcb.microcode, r.reported_tcb.fmc), (0x0a, 0x17, 0x54, None));
    assert_eq!(hex::encode(r.id_key_digest), "942fd93ebde6ea7a96efadeafc60f1c6b3d10e703b1dafd7555b92f7f3d32d0e006767648cba5b102af3d65756af4177");
}

#[test]
fn azure_hcl_report_verifies_and_binds_its_runtime_data() {
    let genoa = &samples()[2];
    let claims = tessera_attestation::verify(AZURE_HCL, &endorsements(genoa), INSIDE).unwrap();
    assert_eq!(claims.measurement, genoa.measurement);
    // What the guest bound is the runtime data's user-data; REPORT_DATA holds its hash.
    assert_eq!(claims.report_data, "0".repeat(128));
    assert_eq!(claims.fields["REPORT_DATA"], genoa.report_data);
    assert_eq!(claims.fields["azure_hcl.runtime_data_hash"], &genoa.report_data[..64]);
    assert_eq!(claims.fields["azure_hcl.user_data"], "0".repeat(128));
    // So the binding check compares user-data: a policy expecting those 64 bytes finds
    // them bound, and one expecting the raw REPORT_DATA does not.
    let policy = NodePolicy { snp: Some(SnpRules { measurement: vec![genoa.measurement.into()], ..SnpRules::default() }), ..NodePolicy::default() };
    let verdict = policy.evaluate(&claims, &[0; 64], INSIDE);
    assert!(verdict.accepted, "{}", verdict.reasons());
    let raw: [u8; 64] = hex::decode(&genoa.report_data).unwrap().try_into().unwrap();
    assert_eq!(policy.evaluate(&claims, &raw, INSIDE).failures, vec![PolicyFailure::ReportDataMismatch]);

    // The runtime data is not signed itself, only through its hash in REPORT_DATA.
    let at = find(AZURE_HCL, b"vmUniqueId");
    assert!(matches!(tessera_attestation::verify(&flipped(AZURE_HCL, at, 1), &endorsements(genoa), INSIDE), Err(VerifyError::BadSignature { .. })));
    // The embedded report is checked like a bare one.
    assert!(matches!(tessera_attestation::verify(&flipped(AZURE_HCL, 32 + 0x90, 1), &endorsements(genoa), INSIDE), Err(VerifyError::BadSignature { .. })));
    // A truncated wrapper is still recognised by its magic, and refused as malformed.
    for len in [4, 100, 32 + REPORT_LEN, 32 + REPORT_LEN + 25, AZURE_HCL.len() - 1200] {
        assert!(matches!(tessera_attestation::verify(&AZURE_HCL[..len], &endorsements(genoa), INSIDE), Err(VerifyError::Malformed { .. })), "{len}");
    }
}

#[test]
fn endorsements_are_accepted_in_any_order_and_encoding() {
    for s in samples() {
        let blocks = pem_blocks(s.chain);
        assert_eq!(blocks.len(), 2, "ASK then ARK");
        let (ask_pem, ark_pem) = (blocks[0].clone(), blocks[1].clone());
        let vcek_pem = der_to_pem(s.vcek);
        let variants: Vec<Vec<Vec<u8>>> = vec![
            vec![s.chain.to_vec(), s.vcek.to_vec()],
            vec![ark_pem.clone(), vcek_pem.clone(), ask_pem.clone()],
            vec![pem_to_der(&ask_pem), s.vcek.to_vec(), pem_to_der(&ark_pem)],
            vec![[vcek_pem.as_slice(), s.chain].concat()],
            // The ARK is pinned, so it may be left out.
            vec![s.vcek.to_vec(), ask_pem.clone()],
        ];
        for (i, e) in variants.iter().enumerate() {
            let claims = verify(s.report, e, INSIDE).unwrap_or_else(|err| panic!("{} variant {i}: {err}", s.name));
            assert_eq!(claims.measurement, s.measurement);
        }
        assert!(matches!(verify(s.report, &[], INSIDE), Err(VerifyError::MissingEndorsement { .. })));
        assert!(matches!(verify(s.report, &[s.chain.to_vec()], INSIDE), Err(VerifyError::MissingEndorsement { .. })));
        assert!(matches!(verify(s.report, &[s.vcek.to_vec(), ark_pem.clone()], INSIDE), Err(VerifyError::MissingEndorsement { .. })));
        assert!(matches!(verify(s.report, &[s.vcek.to_vec(), s.chain.to_vec(), b"not a certificate".to_vec()], INSIDE), Err(VerifyError::Malformed { .. })));
    }
}

#[test]
fn a_flipped_byte_in_the_signed_body_is_a_bad_signature() {
    for s in samples() {
        // Byte 21 is upstream's own negative test (virtee/sev); then MEASUREMENT, REPORT_DATA,
        // the DEBUG policy bit, REPORTED_TCB and the last signed byte.
        for (at, mask) in [(21, 0x80), (0x90, 1), (0x50 + 63, 0xff), (0x0A, 0x08), (0x180, 1), (SIGNED_LEN - 1, 1)] {
            let r = verify(&flipped(s.report, at, mask), &endorsements(&s), INSIDE);
            assert!(matches!(r, Err(VerifyError::BadSignature { format: Format::SevSnp, .. })), "{} byte {at:#x}: {r:?}", s.name);
        }
    }
}

#[test]
fn a_flipped_byte_in_the_signature_is_a_bad_signature() {
    for s in samples() {
        // R, S, and the zero padding above each 48-byte scalar.
        for at in [0x2A0, 0x2A0 + 47, 0x2E8, 0x2E8 + 20, 0x2A0 + 60, 0x2E8 + 71] {
            let r = verify(&flipped(s.report, at, 1), &endorsements(&s), INSIDE);
            assert!(matches!(r, Err(VerifyError::BadSignature { format: Format::SevSnp, .. })), "{} byte {at:#x}: {r:?}", s.name);
        }
    }
}

#[test]
fn a_flipped_byte_in_the_vcek_breaks_the_chain() {
    for s in samples() {
        let chip_id = hex::decode(s.chip_id).unwrap();
        // The last byte of the ASK's signature over the VCEK, and a byte of the signed hwid
        // extension: either way the certificate still parses but the ASK's signature fails.
        for at in [s.vcek.len() - 1, find(s.vcek, &chip_id) + 5] {
            let e = vec![flipped(s.vcek, at, 1), s.chain.to_vec()];
            let r = verify(s.report, &e, INSIDE);
            assert!(matches!(r, Err(VerifyError::CertificateChain { format: Format::SevSnp, .. })), "{} byte {at}: {r:?}", s.name);
        }
        // A flip in the outer length makes it unparseable.
        let r = verify(s.report, &[flipped(s.vcek, 3, 0x10), s.chain.to_vec()], INSIDE);
        assert!(matches!(r, Err(VerifyError::Malformed { .. })), "{}: {r:?}", s.name);
    }
}

#[test]
fn every_byte_of_the_report_and_the_vcek_matters() {
    for s in samples() {
        let e = endorsements(&s);
        // The signed body and R and S; the rest of the signature area is reserved and unsigned.
        for at in 0..0x330 {
            assert!(verify(&flipped(s.report, at, 0x01), &e, INSIDE).is_err(), "{} report byte {at:#x}", s.name);
        }
        for at in 0..s.vcek.len() {
            for mask in [0x01, 0xff] {
                let e = vec![flipped(s.vcek, at, mask), s.chain.to_vec()];
                assert!(verify(s.report, &e, INSIDE).is_err(), "{} VCEK byte {at} mask {mask:#x}", s.name);
            }
        }
    }
}

#[test]
fn truncated_or_extended_reports_are_malformed() {
    let s = &samples()[0];
    for len in [0, 1, 4, 0x2A0, REPORT_LEN - 1] {
        assert!(matches!(AttestationReport::parse(&s.report[..len]), Err(VerifyError::Malformed { format: Format::SevSnp, .. })), "{len}");
        assert!(matches!(verify(&s.report[..len], &endorsements(s), INSIDE), Err(VerifyError::Malformed { format: Format::SevSnp, .. })), "{len}");
        // By length alone a truncated report is no known format at all.
        assert_eq!(tessera_attestation::verify(&s.report[..len], &endorsements(s), INSIDE), Err(VerifyError::UnknownFormat));
    }
    let longer = [s.report, &[0]].concat();
    assert!(matches!(verify(&longer, &endorsements(s), INSIDE), Err(VerifyError::Malformed { .. })));
    // Version 1 and unknown future versions are refused rather than guessed at.
    for version in [0u32, 1, 6, u32::MAX] {
        let mut r = s.report.to_vec();
        r[..4].copy_from_slice(&version.to_le_bytes());
        assert!(matches!(verify(&r, &endorsements(s), INSIDE), Err(VerifyError::Malformed { .. })), "{version}");
        assert!(!SnpVerifier.detect(&r));
    }
}

#[test]
fn a_chain_from_another_root_is_refused() {
    let [milan, _, genoa] = samples();
    // Milan report and VCEK with the Genoa ASK and ARK: no supplied ASK issued the VCEK.
    let r = verify(milan.report, &[milan.vcek.to_vec(), genoa.chain.to_vec()], INSIDE);
    assert!(matches!(r, Err(VerifyError::CertificateChain { .. })), "{r:?}");
    // A whole valid Genoa chain does not vouch for a Milan report.
    let r = verify(milan.report, &endorsements(&genoa), INSIDE);
    assert!(matches!(r, Err(VerifyError::BadSignature { .. })), "{r:?}");
    // With only the Genoa root trusted, the Milan ARK is not a trust anchor.
    let genoa_root: &[u8] = snp::PINNED_ARKS[1].1;
    let r = snp::verify_with_roots(milan.report, &endorsements(&milan), &[genoa_root], INSIDE);
    assert_eq!(r, Err(VerifyError::UntrustedRoot { format: Format::SevSnp }));
    // ... nor is it found when the chain leaves the ARK out.
    let ask = pem_blocks(milan.chain)[0].clone();
    let r = snp::verify_with_roots(milan.report, &[milan.vcek.to_vec(), ask], &[genoa_root], INSIDE);
    assert_eq!(r, Err(VerifyError::UntrustedRoot { format: Format::SevSnp }));
    // The pinned set itself does verify the Milan chain.
    let all: Vec<&[u8]> = snp::PINNED_ARKS.iter().map(|(_, pem)| *pem).collect();
    assert!(snp::verify_with_roots(milan.report, &endorsements(&milan), &all, INSIDE).is_ok());
}

#[test]
fn certificates_are_checked_at_the_callers_time() {
    for s in samples() {
        for now in [s.not_before - 1, s.not_after + 1, AFTER] {
            match verify(s.report, &endorsements(&s), now) {
                Err(VerifyError::NotValidAtTime { format: Format::SevSnp, what }) => assert!(what.contains("VCEK"), "{what}"),
                other => panic!("{} at {now}: {other:?}", s.name),
            }
        }
        // Certificates are checked from the root down, so in 2022 the Genoa chain fails at its ARK.
        match verify(s.report, &endorsements(&s), BEFORE) {
            Err(VerifyError::NotValidAtTime { what, .. }) => assert!(what.contains(if s.root == "ARK-Genoa" { "ARK" } else { "VCEK" }), "{what}"),
            other => panic!("{} in 2022: {other:?}", s.name),
        }
        // The ARK is checked too: it is checked first, so it is the one named when even it
        // is out of its window.
        for now in [0, u64::MAX] {
            match verify(s.report, &endorsements(&s), now) {
                Err(VerifyError::NotValidAtTime { what, .. }) => assert!(what.contains("ARK"), "{what}"),
                other => panic!("{other:?}"),
            }
        }
    }
}

#[test]
fn detection_leaves_other_formats_alone() {
    let s = &samples()[0];
    assert!(SnpVerifier.detect(s.report));
    assert!(SnpVerifier.detect(AZURE_HCL));
    assert!(!SnpVerifier.detect(b"{\"format\":\"tessera-dev-evidence-INSECURE\"}"));
    assert!(!SnpVerifier.detect(&[0u8; REPORT_LEN]));
    // An HCL report around a TDX quote (report type 4) is not ours.
    let mut tdx = AZURE_HCL.to_vec();
    tdx[32 + REPORT_LEN + 8] = 4;
    assert!(!SnpVerifier.detect(&tdx));
    assert_eq!(tessera_attestation::verify(b"garbage", &[], INSIDE), Err(VerifyError::UnknownFormat));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1400), which in 0usize..3) {
        let s = &samples()[which];
        let _ = tessera_attestation::verify(&bytes, &endorsements(s), INSIDE);
        let _ = verify(&bytes, &endorsements(s), INSIDE);
        let _ = verify(&[b"HCLA".as_slice(), &bytes].concat(), &endorsements(s), INSIDE);
        // A plausible header on random contents.
        let mut r = bytes.clone();
        r.resize(REPORT_LEN, 0);
        r[..4].copy_from_slice(&2u32.to_le_bytes());
        prop_assert!(verify(&r, &endorsements(s), INSIDE).is_err());
        // Random endorsements too.
        let _ = verify(s.report, std::slice::from_ref(&bytes), INSIDE);
        let _ = verify(s.report, &[s.vcek.to_vec(), bytes], INSIDE);
    }

    #[test]
    fn mutated_real_reports_never_panic_nor_change_claims(
        which in 0usize..3,
        edits in proptest::collection::vec((0usize..REPORT_LEN, 1u8..=255), 1..4),
        cut in proptest::option::of(0usize..REPORT_LEN + 8),
        vcek_edit in proptest::option::of((0usize..2000, 1u8..=255)),
    ) {
        let s = &samples()[which];
        let mut r = s.report.to_vec();
        for (at, mask) in &edits {
            r[*at] ^= mask;
        }
        if let Some(len) = cut {
            r.resize(len, 0);
        }
        let mut e = endorsements(s);
        if let Some((at, mask)) = vcek_edit {
            let n = e[0].len();
            e[0][at % n] ^= mask;
        }
        // The signed part and R and S end at 0x330; the rest of the signature area is reserved.
        let signed_or_sig_touched = r.get(..0x330) != s.report.get(..0x330);
        let length_changed = r.len() != REPORT_LEN;
        match verify(&r, &e, INSIDE) {
            Ok(claims) => {
                // Only the unsigned reserved tail of the signature area may change unnoticed,
                // and then the claims are those of the genuine report.
                prop_assert!(!signed_or_sig_touched && vcek_edit.is_none() && !length_changed);
                prop_assert_eq!(&claims, &verify(s.report, &endorsements(s), INSIDE).expect("sample verifies"));
            }
            Err(_) => prop_assert!(signed_or_sig_touched || vcek_edit.is_some() || length_changed),
        }
    }

    #[test]
    fn mutated_azure_hcl_reports_never_panic_nor_change_claims(edits in proptest::collection::vec((0usize..AZURE_HCL.len(), 1u8..=255), 1..3)) {
        let genoa = &samples()[2];
        let mut h = AZURE_HCL.to_vec();
        for (at, mask) in &edits {
            h[*at] ^= mask;
        }
        // The HCL header and the padding after the runtime data are not bound to anything, so
        // they may change; whatever verifies must then say what the genuine report says.
        if let Ok(claims) = tessera_attestation::verify(&h, &endorsements(genoa), INSIDE) {
            prop_assert_eq!(claims, tessera_attestation::verify(AZURE_HCL, &endorsements(genoa), INSIDE).expect("sample verifies"));
        }
    }
}

/// A chain served from the cache still gets its validity periods checked at the caller's
/// time, and the report's own signature still verifies (or fails) on every call.
#[test]
fn a_cached_chain_still_checks_time_and_the_report() {
    for s in samples() {
        let e = endorsements(&s);
        assert!(verify(s.report, &e, INSIDE).is_ok());
        assert!(verify(s.report, &e, INSIDE).is_ok(), "second, cached verification");
        let late = verify(s.report, &e, s.not_after + 1);
        assert!(matches!(late, Err(VerifyError::NotValidAtTime { .. })), "{late:?}");
        let mut tampered = s.report.to_vec();
        tampered[0x90] ^= 1; // inside the signed REPORT_DATA
        let r = verify(&tampered, &e, INSIDE);
        assert!(matches!(r, Err(VerifyError::BadSignature { .. })), "{r:?}");
    }
}

/// The real Milan report comes from VMPL 0 with MIGRATE_MA clear: accepted. The same
/// claims stating VMPL 3 (a report obtained by code beside an SVSM, outside the measured
/// image) are refused when the policy requires 0, which is the default.
#[test]
fn an_snp_policy_bounds_the_vmpl_and_the_guest_policy() {
    let s = &samples()[0];
    let claims = verify(s.report, &endorsements(s), INSIDE).unwrap();
    let rd: [u8; 64] = hex::decode(&claims.report_data).unwrap().try_into().unwrap();
    let policy = NodePolicy { snp: Some(SnpRules { measurement: vec![s.measurement.into()], ..SnpRules::default() }), ..NodePolicy::default() };
    let verdict = policy.check(s.report, &endorsements(s), &rd, INSIDE);
    assert!(verdict.accepted, "{}", verdict.reasons());
    let mut at_vmpl3 = claims.clone();
    at_vmpl3.fields.insert("vmpl".into(), "3".into());
    assert_eq!(policy.evaluate(&at_vmpl3, &rd, INSIDE).failures, vec![PolicyFailure::VmplTooHigh { vmpl: 3, max_vmpl: 0 }]);
    // Also without an [snp] section: the default bound applies to every SNP report.
    let plain = NodePolicy { allowed_measurements: vec![s.measurement.into()], ..NodePolicy::default() };
    assert_eq!(plain.evaluate(&at_vmpl3, &rd, INSIDE).failures, vec![PolicyFailure::VmplTooHigh { vmpl: 3, max_vmpl: 0 }]);
    let mut migratable = claims.clone();
    migratable.fields.insert("policy".into(), "0x70000".into());
    assert!(
        matches!(plain.evaluate(&migratable, &rd, INSIDE).failures.as_slice(), [PolicyFailure::SnpGuestPolicy { policy: 0x70000, why }] if why.contains("MIGRATE_MA"))
    );
    // A pinned measurement other than the report's is refused by name.
    let other = NodePolicy { snp: Some(SnpRules { measurement: vec!["00".repeat(48)], ..SnpRules::default() }), ..NodePolicy::default() };
    assert_eq!(
        other.evaluate(&claims, &rd, INSIDE).failures,
        vec![PolicyFailure::FieldNotAllowed { field: "measurement".into(), value: s.measurement.into() }]
    );
}
