//! AWS Nitro attestation documents: the four real documents in `vectors/aws-nitro/` (see its
//! PROVENANCE.md for their origin, validity windows and expected values), tampering, times,
//! custom roots, policy, and documents built here under a private test root.

use coset::{iana, CborSerializable, CoseSign1Builder, HeaderBuilder, TaggedCborSerializable};
use proptest::prelude::*;
use tessera_attestation::nitro::{NitroVerifier, SignedAttestationDocument};
use tessera_attestation::policy::{NodePolicy, PolicyFailure};
use tessera_attestation::{Claims, Format, Verifier, VerifyError};

const ZERO_PCR: &str = "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000";

struct Sample {
    dir: &'static str,
    /// The document's timestamp, in seconds.
    issued_at: u64,
    /// The validity window (the leaf's notBefore and notAfter; the rest of the chain is valid longer), in seconds.
    not_before: u64,
    not_after: u64,
    module_id: &'static str,
    debug: bool,
    pcrs: &'static [(u8, &'static str)],
    user_data: Option<&'static str>,
    nonce_prefix: Option<&'static str>,
    public_key: Option<&'static str>,
}

const SAMPLES: [Sample; 4] = [
    Sample {
        dir: "ga-2023-09-18",
        issued_at: 1_695_049_410,
        not_before: 1_695_047_829, // 2023-09-18 14:37:09
        not_after: 1_695_058_632, // 2023-09-18 17:37:12
        module_id: "i-0918f6c55e3b61d89-enc018aa8b8e2285d13",
        debug: true,
        pcrs: &[
            (0, ZERO_PCR),
            (1, ZERO_PCR),
            (2, ZERO_PCR),
            (8, ZERO_PCR),
            (3, "4a9329d69c836267b18abbf9f4a38889124490453419e426818626348d21f989dc930b1562682a9082887454e53425aa"),
            (4, "d0531b1400dd43288c82c226c16bf647c637dd5e4d9b4f7a8aaadc6d6760b854a06c7008cca0d15ca80094dd33a65065"),
        ],
        user_data: Some(
            "3059301306072a8648ce3d020106082a8648ce3d030107034200042afc52fe36bd5f190b5c90a7ef3349716dcbc4aa003dde71114b11d2faa6648e0713c527439746a8d23dab9e1b999e847762ef385bb5cf27295323b9908b2acb",
        ),
        nonce_prefix: Some("bba6bfd51866d2e4"),
        public_key: None,
    },
    Sample {
        dir: "beta-2022-10-13-nondebug",
        issued_at: 1_665_651_482,
        not_before: 1_665_651_479, // 2022-10-13 08:57:59
        not_after: 1_665_662_282, // 2022-10-13 11:58:02
        module_id: "i-020b6af9246d90e92-enc0183d09086c24190",
        debug: false,
        pcrs: &[
            (0, "f4d48b81a460c9916d1e685119074bf24660afd3e34fae9fca0a0d28d9d5599936332687e6f66fc890ac8cf150142d8b"),
            (1, "bcdf05fefccaa8e55bf2c8d6dee9e79bbff31e34bf28a99aa19e6b29c37ee80b214a414b7607236edf26fcb78654e63f"),
            (2, "d8f114da658de5481f8d9ec73907feb553560787522f705c92d7d96beed8e15e2aa611984e098c576832c292e8dc469a"),
            (8, "8790eb3cce6c83d07e84b126dc61ca923333d6f66615c4a79157de48c5ab2418bdc60746ea7b7afbff03a1c6210201cb"),
        ],
        user_data: None,
        nonce_prefix: Some("cb3dc2eb76c0c134"),
        public_key: None,
    },
    Sample {
        dir: "beta-2022-10-12-debug",
        issued_at: 1_665_582_606,
        not_before: 1_665_582_591, // 2022-10-12 13:49:51
        not_after: 1_665_593_394, // 2022-10-12 16:49:54
        module_id: "i-03ad7cdb817437eeb-enc0183cc7569b3f6e1",
        debug: true,
        pcrs: &[(0, ZERO_PCR), (1, ZERO_PCR), (2, ZERO_PCR), (8, ZERO_PCR)],
        user_data: Some("68656c6c6f2c20776f726c6421"),
        nonce_prefix: None,
        public_key: Some("6d7920737570657220736563726574206b6579"),
    },
    Sample {
        dir: "cert-embedded-2023-01-18-debug",
        issued_at: 1_674_054_632,
        not_before: 1_674_054_627, // 2023-01-18 15:10:27
        not_after: 1_674_065_430, // 2023-01-18 18:10:30
        module_id: "i-06e1ffc9a8410edb1-enc0185c56e099c2d54",
        debug: true,
        pcrs: &[
            (0, ZERO_PCR),
            (1, ZERO_PCR),
            (2, ZERO_PCR),
            (8, ZERO_PCR),
            (3, "ae9d5fad927d895b8d926d676617262fce1bf8bc659770179121ad62ad35046f2631701be548c57426521f2fbe63fcb0"),
        ],
        user_data: Some("3076301006072a8648ce3d020106052b81040022036200045b0bc45e"), // a prefix: the full value is 120 bytes
        nonce_prefix: Some("226e9a4b84952d30"),
        public_key: None,
    },
];

fn vector(path: &str) -> Vec<u8> {
    let full = format!("{}/tests/vectors/aws-nitro/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&full).unwrap_or_else(|e| panic!("{full}: {e}"))
}

fn doc(s: &Sample) -> Vec<u8> {
    vector(&format!("{}/attestation_doc.cbor", s.dir))
}

/// A verification time inside the sample's window: a minute after the document was made.
fn inside(s: &Sample) -> u64 {
    s.issued_at + 60
}

/// Verifies with `roots` (PEM or DER) configured by the verifier besides the pinned AWS
/// root; with none, through the registry's verifier.
fn nitro(evidence: &[u8], roots: &[Vec<u8>], now: u64) -> Result<Claims, VerifyError> {
    if roots.is_empty() {
        return NitroVerifier.verify(evidence, &[], now);
    }
    let roots: Vec<&[u8]> = roots.iter().map(Vec::as_slice).collect();
    tessera_attestation::nitro::verify_with_roots(evidence, &[], &roots, now)
}

fn flip(mut bytes: Vec<u8>, at: usize) -> Vec<u8> {
    bytes[at] ^= 0x01;
    bytes
}

fn position(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).position(|w| w == needle).expect("needle present")
}

#[test]
fn every_sample_verifies_inside_its_window_with_the_expected_claims() {
    for s in &SAMPLES {
        let ev = doc(s);
        assert_eq!(ev[..2], [0x84, 0x44], "{}: untagged COSE_Sign1", s.dir);
        // Through the registry: detection picks the Nitro verifier.
        for now in [inside(s), s.not_after] {
            let c = tessera_attestation::verify(&ev, &[], now).unwrap_or_else(|e| panic!("{} at {now}: {e}", s.dir));
            assert_eq!(c.format, Format::AwsNitro);
            assert_eq!(c.debug, s.debug, "{}", s.dir);
            assert_eq!(c.issued_at, Some(s.issued_at), "{}", s.dir);
            assert_eq!(c.measurement, s.pcrs[0].1, "{}: measurement is PCR0", s.dir);
            assert_eq!(c.fields["module_id"], s.module_id);
            assert_eq!(c.fields["digest"], "SHA384");
            for (i, value) in s.pcrs {
                assert_eq!(c.fields[&format!("PCR{i}")], *value, "{} PCR{i}", s.dir);
            }
            assert_eq!((0..16).filter(|i| c.fields.contains_key(&format!("PCR{i}"))).count(), 16, "{}: 16 PCRs", s.dir);
            match s.user_data {
                Some(ud) => {
                    assert!(c.report_data.starts_with(ud), "{}", s.dir);
                    assert_eq!(c.fields["user_data"], c.report_data);
                }
                None => {
                    assert_eq!(c.report_data, "", "{}: absent user_data is an empty report_data", s.dir);
                    assert!(!c.fields.contains_key("user_data"));
                }
            }
            match s.nonce_prefix {
                Some(n) => assert!(c.fields["nonce"].starts_with(n) && c.fields["nonce"].len() == 512, "{}", s.dir),
                None => assert!(!c.fields.contains_key("nonce"), "{}", s.dir),
            }
            assert_eq!(c.fields.get("public_key").map(String::as_str), s.public_key, "{}", s.dir);
            let signer = c.signer.clone().unwrap_or_default();
            assert!(signer.contains(&format!("CN={}.us-east-1.aws", s.module_id)) && signer.contains(s.module_id), "{signer}");
            assert!(c.fields["trust_anchor"].starts_with("pinned AWS Nitro root"), "{}", c.fields["trust_anchor"]);
        }
    }
    // Expected values not in the table above.
    let c = nitro(&doc(&SAMPLES[3]), &[], inside(&SAMPLES[3])).unwrap();
    assert_eq!(c.report_data.len(), 240, "120 bytes of user_data");
    assert!(nitro(&doc(&SAMPLES[0]), &[], inside(&SAMPLES[0])).unwrap().fields["nonce"].len() == 512);
}

#[test]
fn parse_exposes_the_typed_document() {
    let s = &SAMPLES[1];
    let parsed = SignedAttestationDocument::parse(&doc(s)).unwrap();
    let d = parsed.document();
    assert_eq!(d.module_id, s.module_id);
    assert_eq!(d.timestamp_ms, 1_665_651_482_136);
    assert_eq!(d.pcrs.len(), 16);
    assert_eq!(d.cabundle.len(), 4);
    assert_eq!(d.cabundle[0], tessera_attestation::nitro::pinned_root_der().unwrap(), "cabundle[0] is the AWS root");
    assert!(d.user_data.is_none() && d.public_key.is_none(), "null optional fields are absent");
    assert_eq!(d.nonce.as_ref().map(Vec::len), Some(256));
}

#[test]
fn times_outside_the_window_are_refused() {
    for s in &SAMPLES {
        let ev = doc(s);
        let expired = nitro(&ev, &[], s.not_after + 1).unwrap_err();
        assert!(matches!(&expired, VerifyError::NotValidAtTime { format: Format::AwsNitro, what } if what.contains("leaf")), "{}: {expired}", s.dir);
        // Today (all samples expired long ago).
        assert!(matches!(nitro(&ev, &[], 1_790_000_000), Err(VerifyError::NotValidAtTime { .. })), "{}", s.dir);
        // Long before the chain existed.
        assert!(matches!(nitro(&ev, &[], 1_500_000_000), Err(VerifyError::NotValidAtTime { .. })), "{}", s.dir);
        // Just before the leaf's notBefore.
        let early = nitro(&ev, &[], s.not_before - 1).unwrap_err();
        assert!(matches!(&early, VerifyError::NotValidAtTime { what, .. } if what.contains("leaf")), "{}: {early}", s.dir);
        // At notBefore the chain is valid; the document itself may still be from the verifier's future:
        // up to a minute of clock skew is tolerated, more is refused.
        match nitro(&ev, &[], s.not_before) {
            Ok(_) => assert!(s.issued_at - s.not_before <= 60, "{}", s.dir),
            Err(e) => {
                assert!(s.issued_at - s.not_before > 60, "{}: {e}", s.dir);
                assert!(matches!(&e, VerifyError::NotValidAtTime { what, .. } if what.contains("future")), "{}: {e}", s.dir);
            }
        }
    }
    // The GA document was made 26 minutes after its leaf certificate: show both sides of the skew allowance.
    let ga = &SAMPLES[0];
    assert!(matches!(nitro(&doc(ga), &[], ga.issued_at - 61), Err(VerifyError::NotValidAtTime { what, .. }) if what.contains("future")));
    assert!(nitro(&doc(ga), &[], ga.issued_at - 59).is_ok());
}

#[test]
fn a_flipped_payload_byte_breaks_the_cose_signature() {
    let s = &SAMPLES[1];
    let ev = doc(s);
    // A byte inside PCR0's value, a byte of the module_id text, a byte of the nonce: the CBOR stays well formed.
    for needle in [&hex::decode(s.pcrs[0].1).unwrap()[..], s.module_id.as_bytes(), &hex::decode(s.nonce_prefix.unwrap()).unwrap()[..]] {
        let at = position(&ev, needle) + 5;
        let e = nitro(&flip(ev.clone(), at), &[], inside(s)).unwrap_err();
        assert!(matches!(e, VerifyError::BadSignature { format: Format::AwsNitro, .. }), "{e}");
    }
    // The timestamp: 1665651482136 ms, encoded as a CBOR uint64; flip its lowest bit.
    let ts = position(&ev, &1_665_651_482_136u64.to_be_bytes()) + 7;
    assert!(matches!(nitro(&flip(ev, ts), &[], inside(s)), Err(VerifyError::BadSignature { .. })));
}

#[test]
fn a_flipped_signature_byte_is_a_bad_signature() {
    for s in &SAMPLES {
        let ev = doc(s);
        for at in [ev.len() - 1, ev.len() - 48, ev.len() - 96] {
            let e = nitro(&flip(ev.clone(), at), &[], inside(s)).unwrap_err();
            assert!(matches!(e, VerifyError::BadSignature { format: Format::AwsNitro, .. }), "{}: {e}", s.dir);
        }
    }
}

#[test]
fn a_tampered_leaf_certificate_is_refused_with_a_named_cause() {
    for s in &SAMPLES {
        let ev = doc(s);
        let leaf = SignedAttestationDocument::parse(&ev).unwrap().document().certificate.clone();
        let start = position(&ev, &leaf);
        // Inside the signed part (the subject's CN): the issuer's signature no longer verifies.
        let cn = start + position(&leaf, format!("{}.us-east-1.aws", s.module_id).as_bytes());
        let e = nitro(&flip(ev.clone(), cn), &[], inside(s)).unwrap_err();
        assert!(matches!(&e, VerifyError::CertificateChain { why, .. } if why.contains("leaf certificate's signature")), "{}: {e}", s.dir);
        // The certificate's outer SEQUENCE tag: it is no longer DER.
        let e = nitro(&flip(ev.clone(), start), &[], inside(s)).unwrap_err();
        assert!(matches!(&e, VerifyError::Malformed { why, .. } if why.contains("leaf certificate")), "{}: {e}", s.dir);
        // The leaf's own signature value (its last byte).
        let e = nitro(&flip(ev.clone(), start + leaf.len() - 1), &[], inside(s)).unwrap_err();
        assert!(matches!(e, VerifyError::CertificateChain { .. }), "{}: {e}", s.dir);
        // An intermediate's tbs: the chain breaks there.
        let bundle_1 = SignedAttestationDocument::parse(&ev).unwrap().document().cabundle[1].clone();
        let at = position(&ev, &bundle_1) + bundle_1.len() / 2;
        assert!(matches!(nitro(&flip(ev, at), &[], inside(s)), Err(VerifyError::CertificateChain { .. } | VerifyError::Malformed { .. })));
    }
}

#[test]
fn truncation_is_malformed() {
    let s = &SAMPLES[0];
    let ev = doc(s);
    for len in 0..ev.len() {
        let e = nitro(&ev[..len], &[], inside(s)).unwrap_err();
        assert!(matches!(e, VerifyError::Malformed { format: Format::AwsNitro, .. }), "length {len}: {e}");
    }
    // Through the registry, a prefix too short to recognise is simply unknown.
    assert_eq!(tessera_attestation::verify(&ev[..1], &[], inside(s)).unwrap_err(), VerifyError::UnknownFormat);
    assert!(matches!(tessera_attestation::verify(&ev[..100], &[], inside(s)), Err(VerifyError::Malformed { .. })));
    // Trailing bytes are refused too.
    let mut longer = ev.clone();
    longer.push(0);
    assert!(matches!(nitro(&longer, &[], inside(s)), Err(VerifyError::Malformed { .. })));
}

#[test]
fn configured_roots_add_to_the_pinned_one_and_must_be_certificates() {
    let s = &SAMPLES[2];
    let ev = doc(s);
    let parsed = SignedAttestationDocument::parse(&ev).unwrap();
    // The real root configured explicitly, as PEM (the file in roots/) and as DER, verifies;
    // so does any other configured root, since the chain starts at the pinned one.
    let root_pem = tessera_attestation::nitro::AWS_NITRO_ROOT_PEM.to_vec();
    assert!(nitro(&ev, &[root_pem], inside(s)).is_ok());
    assert!(nitro(&ev, &[parsed.document().cabundle[0].clone()], inside(s)).is_ok());
    let private = TestPki::new();
    let c = nitro(&ev, &[private.root_der()], inside(s)).unwrap();
    assert!(c.fields["trust_anchor"].starts_with("pinned AWS Nitro root"), "{}", c.fields["trust_anchor"]);
    // A document under a private root verifies only while that root is configured.
    let own = build(&private, &Payload::production(&[1; 64]), iana::Algorithm::ES384, false);
    assert_eq!(nitro(&own, &[], NOW).unwrap_err(), VerifyError::UntrustedRoot { format: Format::AwsNitro });
    assert_eq!(nitro(&own, &[TestPki::new().root_der()], NOW).unwrap_err(), VerifyError::UntrustedRoot { format: Format::AwsNitro });
    assert!(nitro(&own, &[private.root.pem().into_bytes()], NOW).is_ok());
    // Configured roots that are not one certificate.
    let two_certs = vector("cert-embedded-2023-01-18-debug/evervault_cage_cert.pem");
    assert!(matches!(nitro(&own, &[two_certs], NOW), Err(VerifyError::CertificateChain { .. })));
    assert!(matches!(
        nitro(&own, &[b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_vec()], NOW),
        Err(VerifyError::CertificateChain { .. })
    ));
    assert!(matches!(nitro(&own, &[vec![0x30, 0x03, 0x02, 0x01, 0x01]], NOW), Err(VerifyError::CertificateChain { .. })));
}

/// The attack of the review: a peer signs a document under its own CA (any PCR0 it
/// likes, the right binding) and ships that CA in the evidence bundle's endorsements.
/// Refused on every path that verifies evidence (admission, attested TLS, offline audit),
/// with the cause named; trusted only when the verifier itself configures the root.
#[test]
fn a_root_shipped_by_the_peer_is_refused_on_every_path() {
    use tessera_attestation::bundle::EvidenceBundle;
    let attacker = TestPki::new();
    let pcr0 = hex::encode([0xA0u8; 48]);
    let policy = NodePolicy { allowed_measurements: vec![pcr0.clone()], ..NodePolicy::default() };
    let trusting = NodePolicy { additional_nitro_roots: vec![attacker.root.pem()], ..policy.clone() };
    trusting.validate().unwrap();
    assert!(trusting.extra_roots_warning().unwrap().contains("additional_nitro_roots"));
    let forged = |binding: &[u8; 64]| {
        let ev = build(&attacker, &Payload::production(binding), iana::Algorithm::ES384, false);
        EvidenceBundle { evidence: ev, endorsements: vec![attacker.root_der()] }.encode()
    };
    let peer_supplied = |v: &tessera_attestation::policy::Verdict| {
        !v.accepted && matches!(&v.failures[..], [PolicyFailure::Unverified { reason }] if reason.contains("supplies 1 endorsement"))
    };

    // Admission (the enclave's check of a client) and the client's check of the aggregator.
    let binding = [7u8; 64];
    let v = policy.check(&forged(&binding), &[], &binding, NOW);
    assert!(peer_supplied(&v), "{}", v.reasons());
    // The same document without the bundle's root: untrusted; with the verifier's own root: accepted.
    let bare = build(&attacker, &Payload::production(&binding), iana::Algorithm::ES384, false);
    assert!(policy.check(&bare, &[], &binding, NOW).reasons().contains("pinned vendor root"));
    let ok = trusting.check(&bare, &[], &binding, NOW);
    assert!(ok.accepted, "{}", ok.reasons());
    assert!(ok.claims.unwrap().fields["trust_anchor"].starts_with("CONFIGURED root"));
    // Even a trusting verifier refuses endorsements that come with Nitro evidence.
    assert!(peer_supplied(&trusting.check(&forged(&binding), &[], &binding, NOW)));

    // Attested TLS: a certificate carrying the forged bundle, bound to its own key.
    let identity = [5u8; 32];
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let spki: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, &key.public_key_der()).as_ref().try_into().unwrap();
    let report_data = tessera_attestation::binding::aggregator_report_data(&identity, &spki);
    let ext = tessera_attestation::ratls::encode_extension(&tessera_attestation::ratls::CertEvidence {
        identity_public_key: hex::encode(identity),
        evidence: hex::encode(forged(&report_data)),
    });
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.custom_extensions.push(rcgen::CustomExtension::from_oid_content(tessera_attestation::ratls::EVIDENCE_OID, ext));
    let cert = params.self_signed(&key).unwrap();
    assert_eq!(tessera_attestation::ratls::spki_sha256(cert.der()).unwrap(), spki);
    let (v, named) = tessera_attestation::ratls::verify_certificate(cert.der(), &policy, NOW);
    assert_eq!(named, Some(identity));
    assert!(peer_supplied(&v), "{}", v.reasons());

    // Offline audit: the committed round bundle with its evidence replaced by the forgery,
    // bound to the bundle's own identity key and TLS fingerprint.
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/audit/round-bundle.json")).unwrap();
    let mut bundle: tessera_attestation::audit::RoundBundle = serde_json::from_str(&text).unwrap();
    let identity: [u8; 32] = hex::decode(&bundle.aggregator.identity_public_key).unwrap().try_into().unwrap();
    let fingerprint = hex::decode(&bundle.aggregator.tls_fingerprint).unwrap();
    let report_data = tessera_attestation::binding::aggregator_report_data(&identity, &fingerprint);
    bundle.aggregator.evidence = hex::encode(forged(&report_data));
    bundle.aggregator.measurement = None;
    let audit = |policy: &NodePolicy, bundle: &tessera_attestation::audit::RoundBundle| {
        let inputs = tessera_attestation::audit::AuditInputs { policy: policy.clone(), now_secs: NOW, previous_head: None, mean: None };
        let out = tessera_attestation::audit::audit_bundle(bundle, &inputs);
        out.checks.into_iter().find(|c| c.name == "aggregator evidence").expect("the evidence check ran")
    };
    let check = audit(&policy, &bundle);
    assert!(!check.passed && check.detail.contains("supplies 1 endorsement"), "{check:?}");
    // Positive control: the bare forgery passes the audit's evidence check only under a
    // policy that configures the attacker's root.
    bundle.aggregator.evidence = hex::encode(build(&attacker, &Payload::production(&report_data), iana::Algorithm::ES384, false));
    assert!(!audit(&policy, &bundle).passed);
    assert!(audit(&trusting, &bundle).passed);
}

#[test]
fn default_policy_rejects_debug_mode_documents() {
    for s in &SAMPLES {
        let ev = doc(s);
        let now = inside(s);
        let binding = [7u8; 64];
        let v = NodePolicy::default().check(&ev, &[], &binding, now);
        assert!(!v.accepted, "{}", s.dir);
        assert_eq!(v.format, Some(Format::AwsNitro));
        assert_eq!(v.failures.contains(&PolicyFailure::DebugMode), s.debug, "{}: {}", s.dir, v.reasons());
        // None of the samples carries Tessera's 64-byte binding, so the binding check fails on each.
        assert!(v.failures.contains(&PolicyFailure::ReportDataMismatch), "{}", s.dir);
        if !s.debug {
            assert_eq!(v.failures, vec![PolicyFailure::ReportDataMismatch], "{}", s.dir);
        }
        // Allowing debug removes exactly that failure.
        let lenient = NodePolicy { allow_debug: true, ..NodePolicy::default() }.check(&ev, &[], &binding, now);
        assert!(!lenient.failures.contains(&PolicyFailure::DebugMode));
    }
    // Expired evidence is reported as unverified, naming the time check.
    let v = NodePolicy::default().check(&doc(&SAMPLES[0]), &[], &[0; 64], 1_790_000_000);
    assert!(matches!(&v.failures[..], [PolicyFailure::Unverified { reason }] if reason.contains("not valid at the verification time")), "{}", v.reasons());
}

// ---------------------------------------------------------------------------------------------
// Documents built here, under a private root: what the real samples cannot show (a 64-byte
// binding accepted end to end, the tagged form, broken CA constraints, wrong header fields).

/// 2030-01-01 00:00:00 UTC; the test chain is valid for that day.
const DAY: u64 = 1_893_456_000;
const NOW: u64 = DAY + 12 * 3600;

struct TestPki {
    root: rcgen::Certificate,
    intermediate: rcgen::Certificate,
    leaf: rcgen::Certificate,
    leaf_key: rcgen::KeyPair,
}

#[derive(Default)]
struct Tweaks {
    leaf_is_ca: bool,
    intermediate_without_cert_sign: bool,
    root_path_len_zero: bool,
}

fn params(cn: &str, ca: Option<rcgen::BasicConstraints>, usages: Vec<rcgen::KeyUsagePurpose>) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("no SANs");
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.not_before = rcgen::date_time_ymd(2030, 1, 1);
    p.not_after = rcgen::date_time_ymd(2030, 1, 2);
    p.is_ca = match ca {
        Some(bc) => rcgen::IsCa::Ca(bc),
        None => rcgen::IsCa::ExplicitNoCa,
    };
    p.key_usages = usages;
    p
}

impl TestPki {
    fn new() -> Self {
        Self::with(Tweaks::default())
    }

    fn with(t: Tweaks) -> Self {
        use rcgen::{BasicConstraints::Constrained, KeyUsagePurpose::*};
        let key = || rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("P-384 key");
        let (root_key, intermediate_key, leaf_key) = (key(), key(), key());
        let root = params("tessera test root", Some(Constrained(if t.root_path_len_zero { 0 } else { 2 })), vec![KeyCertSign, CrlSign])
            .self_signed(&root_key)
            .expect("test root");
        let intermediate_usages = if t.intermediate_without_cert_sign { vec![DigitalSignature] } else { vec![KeyCertSign] };
        let intermediate = params("tessera test intermediate", Some(Constrained(0)), intermediate_usages)
            .signed_by(&intermediate_key, &root, &root_key)
            .expect("test intermediate");
        let leaf_ca = if t.leaf_is_ca { Some(Constrained(0)) } else { None };
        let leaf = params("i-0123456789abcdef0-enc0123456789abcdef.test", leaf_ca, vec![DigitalSignature])
            .signed_by(&leaf_key, &intermediate, &intermediate_key)
            .expect("test leaf");
        TestPki { root, intermediate, leaf, leaf_key }
    }

    fn root_der(&self) -> Vec<u8> {
        self.root.der().to_vec()
    }

    fn sign(&self, tbs: &[u8]) -> Vec<u8> {
        let rng = ring::rand::SystemRandom::new();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(&ring::signature::ECDSA_P384_SHA384_FIXED_SIGNING, &self.leaf_key.serialize_der(), &rng)
            .expect("PKCS#8 from rcgen");
        key.sign(&rng, tbs).expect("ECDSA signing").as_ref().to_vec()
    }
}

/// The payload fields of a test document; `extra` entries are appended as they are.
struct Payload {
    digest: &'static str,
    timestamp_ms: u64,
    pcrs: Vec<(u8, Vec<u8>)>,
    user_data: Option<Vec<u8>>,
    extra: Vec<(&'static str, ciborium::Value)>,
}

impl Payload {
    fn production(user_data: &[u8]) -> Self {
        Payload {
            digest: "SHA384",
            timestamp_ms: NOW * 1000 - 5_000,
            pcrs: (0..16u8).map(|i| (i, if i < 3 { vec![0xA0 + i; 48] } else { vec![0; 48] })).collect(),
            user_data: Some(user_data.to_vec()),
            extra: Vec::new(),
        }
    }
}

fn build(pki: &TestPki, p: &Payload, alg: iana::Algorithm, tagged: bool) -> Vec<u8> {
    use ciborium::Value;
    let bytes = |b: &[u8]| Value::Bytes(b.to_vec());
    let mut map = vec![
        (Value::Text("module_id".into()), Value::Text("i-0123456789abcdef0-enc0123456789abcdef".into())),
        (Value::Text("digest".into()), Value::Text(p.digest.into())),
        (Value::Text("timestamp".into()), Value::Integer(p.timestamp_ms.into())),
        (Value::Text("pcrs".into()), Value::Map(p.pcrs.iter().map(|(i, v)| (Value::Integer((*i).into()), bytes(v))).collect())),
        (Value::Text("certificate".into()), bytes(pki.leaf.der())),
        (Value::Text("cabundle".into()), Value::Array(vec![bytes(pki.root.der()), bytes(pki.intermediate.der())])),
        (Value::Text("public_key".into()), Value::Null),
        (Value::Text("user_data".into()), p.user_data.as_deref().map_or(Value::Null, bytes)),
        (Value::Text("nonce".into()), Value::Null),
    ];
    map.extend(p.extra.iter().map(|(k, v)| (Value::Text((*k).into()), v.clone())));
    let mut payload = Vec::new();
    ciborium::into_writer(&Value::Map(map), &mut payload).expect("CBOR payload");
    let sign1 =
        CoseSign1Builder::new().protected(HeaderBuilder::new().algorithm(alg).build()).payload(payload).create_signature(b"", |tbs| pki.sign(tbs)).build();
    if tagged {
        sign1.to_tagged_vec().expect("tagged COSE_Sign1")
    } else {
        sign1.to_vec().expect("COSE_Sign1")
    }
}

#[test]
fn a_bound_production_document_under_a_private_root_is_accepted_end_to_end() {
    let pki = TestPki::new();
    let binding = tessera_attestation::binding::aggregator_report_data(&[5; 32], b"tls-fingerprint");
    let pcr0 = hex::encode([0xA0u8; 48]);
    let policy = NodePolicy { allowed_measurements: vec![pcr0.clone()], ..NodePolicy::default() };
    for tagged in [false, true] {
        let ev = build(&pki, &Payload::production(&binding), iana::Algorithm::ES384, tagged);
        assert_eq!(ev[0], if tagged { 0xD2 } else { 0x84 });
        for root in [pki.root_der(), pki.root.pem().into_bytes()] {
            let c = nitro(&ev, std::slice::from_ref(&root), NOW).unwrap();
            assert_eq!((c.format, c.debug, c.measurement.as_str()), (Format::AwsNitro, false, pcr0.as_str()));
            assert_eq!(c.report_data, hex::encode(binding));
            assert!(c.fields["trust_anchor"].starts_with("CONFIGURED root"), "{}", c.fields["trust_anchor"]);
        }
        let trusting = NodePolicy { additional_nitro_roots: vec![pki.root.pem()], ..policy.clone() };
        let v = trusting.check(&ev, &[], &binding, NOW);
        assert!(v.accepted, "{}", v.reasons());
        // Under the pinned AWS root it is refused, and so is any other binding.
        assert_eq!(nitro(&ev, &[], NOW).unwrap_err(), VerifyError::UntrustedRoot { format: Format::AwsNitro });
        let v = trusting.check(&ev, &[], &[0; 64], NOW);
        assert_eq!(v.failures, vec![PolicyFailure::ReportDataMismatch]);
    }
}

#[test]
fn a_debug_document_verifies_but_the_default_policy_refuses_it() {
    let pki = TestPki::new();
    let binding = [9u8; 64];
    let mut p = Payload::production(&binding);
    p.pcrs.iter_mut().filter(|(i, _)| *i < 3).for_each(|(_, v)| v.fill(0));
    let ev = build(&pki, &p, iana::Algorithm::ES384, false);
    let root = [pki.root_der()];
    assert!(nitro(&ev, &root, NOW).unwrap().debug);
    let trusting = NodePolicy { additional_nitro_roots: vec![pki.root.pem()], ..NodePolicy::default() };
    let v = trusting.check(&ev, &[], &binding, NOW);
    assert_eq!(v.failures, vec![PolicyFailure::DebugMode]);
    assert!(NodePolicy { allow_debug: true, ..trusting }.check(&ev, &[], &binding, NOW).accepted);
    // Any one of PCR0..2 at zero counts as debug: no production measurement is all zero.
    let mut p = Payload::production(&binding);
    p.pcrs[1].1.fill(0);
    assert!(nitro(&build(&pki, &p, iana::Algorithm::ES384, false), &root, NOW).unwrap().debug);
}

#[test]
fn broken_ca_constraints_are_refused() {
    let cases = [
        (Tweaks { leaf_is_ca: true, ..Tweaks::default() }, "leaf certificate is a CA"),
        (Tweaks { intermediate_without_cert_sign: true, ..Tweaks::default() }, "keyCertSign"),
        (Tweaks { root_path_len_zero: true, ..Tweaks::default() }, "allows 0 CA certificates below it"),
    ];
    for (tweaks, expected) in cases {
        let pki = TestPki::with(tweaks);
        let ev = build(&pki, &Payload::production(&[1; 64]), iana::Algorithm::ES384, false);
        let e = nitro(&ev, &[pki.root_der()], NOW).unwrap_err();
        assert!(matches!(&e, VerifyError::CertificateChain { why, .. } if why.contains(expected)), "{expected}: {e}");
    }
    // A chain whose leaf was issued under another intermediate of the same name.
    let (a, b) = (TestPki::new(), TestPki::new());
    let mixed = TestPki { root: a.root, intermediate: b.intermediate, leaf: a.leaf, leaf_key: a.leaf_key };
    let ev = build(&mixed, &Payload::production(&[1; 64]), iana::Algorithm::ES384, false);
    let root = SignedAttestationDocument::parse(&ev).unwrap().document().cabundle[0].clone();
    assert!(matches!(nitro(&ev, &[root], NOW), Err(VerifyError::CertificateChain { .. })));
}

#[test]
fn test_documents_are_checked_at_the_verification_time() {
    let pki = TestPki::new();
    let root = [pki.root_der()];
    let ev = build(&pki, &Payload::production(&[1; 64]), iana::Algorithm::ES384, false);
    assert!(matches!(nitro(&ev, &root, DAY + 2 * 86_400), Err(VerifyError::NotValidAtTime { .. })));
    assert!(matches!(nitro(&ev, &root, DAY - 1), Err(VerifyError::NotValidAtTime { .. })));
    let mut later = Payload::production(&[1; 64]);
    later.timestamp_ms = (NOW + 3600) * 1000;
    let e = nitro(&build(&pki, &later, iana::Algorithm::ES384, false), &root, NOW).unwrap_err();
    assert!(matches!(&e, VerifyError::NotValidAtTime { what, .. } if what.contains("future")), "{e}");
}

#[test]
fn malformed_fields_are_named() {
    use ciborium::Value;
    let pki = TestPki::new();
    let root = [pki.root_der()];
    let malformed = |p: Payload, alg: iana::Algorithm| match nitro(&build(&pki, &p, alg, false), &root, NOW) {
        Err(VerifyError::Malformed { why, .. }) => why,
        other => panic!("expected Malformed, got {other:?}"),
    };
    assert!(malformed(Payload::production(&[1; 64]), iana::Algorithm::ES256).contains("ES384"));
    assert!(malformed(Payload { digest: "SHA256", ..Payload::production(&[1; 64]) }, iana::Algorithm::ES384).contains("digest"));
    assert!(malformed(Payload { timestamp_ms: 0, ..Payload::production(&[1; 64]) }, iana::Algorithm::ES384).contains("timestamp"));
    let mut p = Payload::production(&[1; 64]);
    p.pcrs.retain(|(i, _)| *i != 1);
    assert!(malformed(p, iana::Algorithm::ES384).contains("PCR0, PCR1 and PCR2"));
    let mut p = Payload::production(&[1; 64]);
    p.pcrs[4].1.truncate(32);
    assert!(malformed(p, iana::Algorithm::ES384).contains("PCR4"));
    let mut p = Payload::production(&[1; 64]);
    p.pcrs.push((40, vec![0; 48]));
    assert!(malformed(p, iana::Algorithm::ES384).contains("PCR index"));
    assert!(malformed(Payload { user_data: Some(vec![0; 513]), ..Payload::production(&[]) }, iana::Algorithm::ES384).contains("user_data"));
    let mut p = Payload::production(&[1; 64]);
    p.extra.push(("debug_mode", Value::Bool(false)));
    assert!(malformed(p, iana::Algorithm::ES384).contains("unknown payload field"));
    let mut p = Payload::production(&[1; 64]);
    p.extra.push(("user_data", Value::Bytes(vec![2; 64])));
    assert!(malformed(p, iana::Algorithm::ES384).contains("twice"));
    // Absent user_data verifies, with an empty report_data that no binding matches.
    let c = nitro(&build(&pki, &Payload { user_data: None, ..Payload::production(&[]) }, iana::Algorithm::ES384, false), &root, NOW).unwrap();
    assert_eq!(c.report_data, "");
}

fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(at, kind, value) in edits {
        if bytes.is_empty() {
            break;
        }
        let i = at % bytes.len();
        match kind % 4 {
            0 => bytes[i] ^= value.max(1),
            1 => bytes[i] = value,
            2 => bytes.insert(i, value),
            _ => {
                bytes.remove(i);
            }
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(prefix in prop::sample::select(vec![vec![], vec![0x84], vec![0x84, 0x44], vec![0xD2, 0x84, 0x44, 0xA1, 0x01, 0x38, 0x22]]),
                                bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let mut ev = prefix;
        ev.extend_from_slice(&bytes);
        let _ = tessera_attestation::verify(&ev, &[], 1_695_049_470);
        prop_assert!(nitro(&ev, &[], 1_695_049_470).is_err());
        let _ = nitro(&bytes, std::slice::from_ref(&bytes), 1_695_049_470);
    }

    #[test]
    fn mutated_real_documents_never_panic_and_never_verify_changed(sample in 0usize..4, edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4)) {
        let s = &SAMPLES[sample];
        let original = doc(s);
        let expected = nitro(&original, &[], inside(s)).unwrap();
        let ev = mutate(original.clone(), &edits);
        if let Ok(c) = nitro(&ev, &[], inside(s)) {
            // Only an edit that leaves the signed content unchanged (e.g. in the unsigned header) may pass.
            prop_assert_eq!(c, expected);
        }
    }
}

/// The CA-bundle cache skips only signatures over byte-identical certificates: after a
/// document verified, a changed intermediate, a changed leaf and a time outside the
/// window are all still refused, and the claims are the same as uncached.
#[test]
fn the_chain_cache_skips_nothing_that_changed() {
    for s in &SAMPLES {
        let ev = doc(s);
        tessera_attestation::nitro::clear_chain_cache();
        let cold = nitro(&ev, &[], inside(s)).unwrap();
        let warm = nitro(&ev, &[], inside(s)).unwrap();
        assert_eq!(cold, warm, "{}", s.dir);
        let parsed = SignedAttestationDocument::parse(&ev).unwrap();
        let last_ca = parsed.document().cabundle.last().unwrap().clone();
        let at = position(&ev, &last_ca) + last_ca.len() / 2;
        assert!(matches!(nitro(&flip(ev.clone(), at), &[], inside(s)), Err(VerifyError::CertificateChain { .. } | VerifyError::Malformed { .. })), "{}", s.dir);
        let leaf = parsed.document().certificate.clone();
        let at = position(&ev, &leaf) + leaf.len() - 1;
        assert!(matches!(nitro(&flip(ev.clone(), at), &[], inside(s)), Err(VerifyError::CertificateChain { .. })), "{}", s.dir);
        assert!(matches!(nitro(&ev, &[], s.not_after + 1), Err(VerifyError::NotValidAtTime { .. })), "{}", s.dir);
    }
}

/// PCR0 (the image) pins the code; PCR1, PCR2 and PCR8 (kernel, application, signing
/// certificate) are pinned one by one, each refusal naming its register. The sample has
/// no user data, so the binding fails too: the point here is which PCR checks do.
#[test]
fn a_nitro_policy_pins_pcr0_1_2_and_8() {
    use tessera_attestation::policy::NitroRules;
    let s = &SAMPLES[1];
    let claims = nitro(&doc(s), &[], inside(s)).unwrap();
    let pcr = |i: u8| s.pcrs.iter().find(|(n, _)| *n == i).unwrap().1.to_string();
    let rules = NitroRules { pcr0: vec![pcr(0)], pcr1: vec![pcr(1)], pcr2: vec![pcr(2)], pcr8: vec![pcr(8)], ..NitroRules::default() };
    let policy = NodePolicy { nitro: Some(rules.clone()), ..NodePolicy::default() };
    assert!(policy.pins_code());
    assert_eq!(policy.evaluate(&claims, &[0; 64], inside(s)).failures, vec![PolicyFailure::ReportDataMismatch]);
    for which in [1u8, 2, 8] {
        let mut r = rules.clone();
        let other = format!("00{}", &pcr(which)[2..]);
        match which {
            1 => r.pcr1 = vec![other],
            2 => r.pcr2 = vec![other],
            _ => r.pcr8 = vec![other],
        }
        let failures = NodePolicy { nitro: Some(r), ..NodePolicy::default() }.evaluate(&claims, &[0; 64], inside(s)).failures;
        assert_eq!(failures, vec![PolicyFailure::FieldNotAllowed { field: format!("PCR{which}"), value: pcr(which) }, PolicyFailure::ReportDataMismatch]);
    }
    // PCR1, PCR2 and PCR8 without PCR0 do not pin the whole image.
    let partial = NodePolicy { nitro: Some(NitroRules { pcr0: vec![], ..rules }), ..NodePolicy::default() };
    assert!(!partial.pins_code());
}
