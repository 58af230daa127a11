//! AWS Nitro Enclaves attestation documents, verified offline at a caller-supplied time.
//!
//! Follows the format and validation rules of aws/aws-nitro-enclaves-nsm-api
//! `docs/attestation_process.md`: a COSE_Sign1 (RFC 8152 §4.2; tagged with CBOR tag 18 or
//! untagged) signed with ES384 by the leaf certificate of a chain that starts at the AWS Nitro
//! root. Two steps, as everywhere in this crate: [`SignedAttestationDocument::parse`] checks the
//! syntax only; [`SignedAttestationDocument::verify`] checks the certificate chain, the COSE
//! signature and the times, and yields [`Claims`].
//!
//! What the claims mean:
//! - `measurement` is PCR0 (the hash of the enclave image file);
//! - `report_data` is `user_data` in hex, the 64 bytes Tessera binds (see [`crate::binding`]).
//!   The verifier does not require 64 bytes (real documents carry other payloads there); the
//!   policy's binding check does. When `user_data` is absent, `report_data` is the empty string,
//!   never the nonce: the nonce is the relying party's challenge, not something the enclave
//!   bound, and an empty string can never match 64 bytes, so the binding check fails closed;
//! - `debug` is true when any of PCR0, PCR1, PCR2 is all zero. Enclaves started in debug mode
//!   report all three as zero; a production enclave's PCRs are SHA-384 values and never zero,
//!   so treating any zero one as debug changes nothing for real documents and fails safe for
//!   odd ones. [`crate::policy::NodePolicy`] rejects debug evidence unless `allow_debug`;
//! - `issued_at` is the document's `timestamp` (milliseconds) divided by 1000;
//! - `signer` is the leaf certificate's subject and the module id;
//! - `fields` holds every PCR (`PCR0`..`PCR15`, the names AWS uses), `module_id`, `digest`,
//!   `timestamp_ms`, `nonce`, `public_key`, `user_data` (hex, when present), and `trust_anchor`
//!   (which root the chain ended at).
//!
//! Stricter than the specification where real documents allow it: unknown or duplicate payload
//! fields are refused, every PCR must be 48 bytes (the digest is always SHA384), and PCR0..2
//! must be present. Optional fields may be absent or `null` (the NSM writes `null`).
//!
//! Trust anchor: the pinned AWS root ([`AWS_NITRO_ROOT_PEM`]), or a root the *verifier*
//! configured ([`verify_with_roots`], a policy's `additional_nitro_roots`, for private test
//! roots). A Nitro document carries its whole chain, so the registry's verifier accepts no
//! endorsement at all: endorsements travel in evidence bundles the attested peer supplies,
//! and a peer that may choose the root can sign anything. `fields["trust_anchor"]` says
//! which root the chain ended at.

use std::collections::BTreeMap;

use ciborium::Value;
use coset::{iana, CborSerializable, CoseSign1, RegisteredLabelWithPrivate, TaggedCborSerializable};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::{Claims, Format, Verifier, VerifyError};

/// The AWS Nitro Enclaves root `CN=aws.nitro-enclaves` (see `roots/aws/PROVENANCE.md`).
pub const AWS_NITRO_ROOT_PEM: &[u8] = include_bytes!("../roots/aws/aws_nitro_root.pem");

/// Larger input is refused before parsing. The specification bounds the payload to 16 KiB
/// (real documents are about 4.5 KiB); headers and the signature add little.
pub const MAX_EVIDENCE_LEN: usize = 32 * 1024;

/// Documents stamped more than this far ahead of the verification time are refused.
const CLOCK_SKEW_SECS: u64 = 60;

const FORMAT: Format = Format::AwsNitro;
const ES384_SIGNATURE_LEN: usize = 96;
const PCR_LEN: usize = 48;

fn malformed(why: impl Into<String>) -> VerifyError {
    VerifyError::Malformed { format: FORMAT, why: why.into() }
}

fn chain_error(why: impl Into<String>) -> VerifyError {
    VerifyError::CertificateChain { format: FORMAT, why: why.into() }
}

/// The signed payload of a Nitro attestation document, syntactically checked against
/// `attestation_process.md` §3.2.2 (field types, sizes, no unknown or duplicate keys).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttestationDocument {
    pub module_id: String,
    /// Always "SHA384".
    pub digest: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// PCR index (0..32) → 48-byte value. PCR0, PCR1 and PCR2 are always present.
    pub pcrs: BTreeMap<u8, Vec<u8>>,
    /// The leaf ("target") certificate, DER.
    pub certificate: Vec<u8>,
    /// The issuing CA bundle, DER, root first: `[root, intermediate_1, …, issuer of the leaf]`.
    pub cabundle: Vec<Vec<u8>>,
    pub public_key: Option<Vec<u8>>,
    pub user_data: Option<Vec<u8>>,
    pub nonce: Option<Vec<u8>>,
}

/// A parsed, not yet verified, Nitro attestation document. The fields are private so that
/// the document [`Self::verify`] reports on is always the one the signature covers.
#[derive(Clone, Debug)]
pub struct SignedAttestationDocument {
    document: AttestationDocument,
    sign1: CoseSign1,
}

/// True when `evidence` starts like a COSE_Sign1 (untagged `0x84`, or tag 18 `0xD2 0x84`)
/// whose first element is a byte string (the protected header). The dev format starts with
/// `{`, SEV-SNP reports with a little-endian version (2, 3, 5), Intel quotes with a
/// little-endian u16 version (3, 4, 5): none starts with `0x84` or `0xD2`.
pub fn looks_like_cose_sign1(evidence: &[u8]) -> bool {
    let body = match evidence {
        [0xD2, rest @ ..] => rest,
        other => other,
    };
    matches!(body, [0x84, header, ..] if (0x40..=0x5B).contains(header))
}

impl SignedAttestationDocument {
    /// Parses the COSE_Sign1 envelope and the payload. Checks syntax only; nothing here is
    /// trusted until [`Self::verify`] succeeds.
    pub fn parse(evidence: &[u8]) -> Result<Self, VerifyError> {
        if evidence.len() > MAX_EVIDENCE_LEN {
            return Err(malformed(format!("{} bytes, more than the {MAX_EVIDENCE_LEN} allowed", evidence.len())));
        }
        let sign1 = if evidence.first() == Some(&0xD2) { CoseSign1::from_tagged_slice(evidence) } else { CoseSign1::from_slice(evidence) }
            .map_err(|e| malformed(format!("not a COSE_Sign1: {e}")))?;
        let alg = sign1.protected.header.alg.as_ref();
        if alg != Some(&RegisteredLabelWithPrivate::Assigned(iana::Algorithm::ES384)) {
            return Err(malformed(format!("the protected header's alg is {alg:?}, expected ES384 (-35)")));
        }
        if !sign1.protected.header.crit.is_empty() {
            return Err(malformed("the protected header lists critical parameters this verifier does not know"));
        }
        if sign1.signature.len() != ES384_SIGNATURE_LEN {
            return Err(malformed(format!("the signature is {} bytes, ES384 (r‖s) needs {ES384_SIGNATURE_LEN}", sign1.signature.len())));
        }
        let payload = sign1.payload.as_deref().ok_or_else(|| malformed("the payload is detached (nil)"))?;
        let document = parse_payload(payload)?;
        Ok(SignedAttestationDocument { document, sign1 })
    }

    /// The decoded payload: not trustworthy until [`Self::verify`] succeeds.
    pub fn document(&self) -> &AttestationDocument {
        &self.document
    }

    /// Verifies the document against `root_der` (the trust anchor, DER) at `now_secs`:
    /// `cabundle[0]` equals the root; each certificate is signed by the one before it, with
    /// CA constraints and key usages as AWS specifies; the COSE signature verifies with the
    /// leaf's key; every certificate is valid at `now_secs`; the document is not from the future.
    pub fn verify(&self, root_der: &[u8], now_secs: u64) -> Result<Claims, VerifyError> {
        let doc = &self.document;
        // 1. The chain starts at the trust anchor, byte for byte.
        let first = doc.cabundle.first().ok_or_else(|| malformed("cabundle is empty"))?;
        if first.as_slice() != root_der {
            return Err(VerifyError::UntrustedRoot { format: FORMAT });
        }
        let mut chain = Vec::with_capacity(doc.cabundle.len() + 1);
        for (i, der) in doc.cabundle.iter().enumerate() {
            chain.push(parse_certificate(der, &format!("cabundle[{i}]"))?);
        }
        let leaf = parse_certificate(&doc.certificate, "the leaf certificate")?;
        chain.push(leaf);
        let names: Vec<String> =
            (0..chain.len()).map(|i| if i + 1 == chain.len() { "the leaf certificate".to_string() } else { format!("cabundle[{i}]") }).collect();

        // 2. Each link: names chain, signature verifies, constraints hold. The CA part
        //    (root → … → instance CA) is shared by every document of an instance: when
        //    these exact certificates verified before, their signatures are not checked
        //    again. The leaf's signature, every constraint and every validity period are.
        let cas = chain.len() - 1;
        let ca_key = ca_bundle_key(&doc.cabundle);
        let ca_cached = ca_cache().lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&ca_key);
        for (i, cert) in chain.iter().enumerate() {
            check_extensions(cert, &names[i], i < cas, cas.saturating_sub(i + 1))?;
            if i > 0 {
                let issuer = &chain[i - 1];
                if cert.issuer().as_raw() != issuer.subject().as_raw() {
                    return Err(chain_error(format!(
                        "{}'s issuer ({}) is not the subject of {} ({})",
                        names[i],
                        cert.issuer(),
                        names[i - 1],
                        issuer.subject()
                    )));
                }
                if !(ca_cached && i < cas) {
                    verify_certificate_signature(cert, issuer.public_key())
                        .map_err(|why| chain_error(format!("{}'s signature by {} does not verify: {why}", names[i], names[i - 1])))?;
                }
            }
        }
        if !ca_cached {
            let mut set = ca_cache().lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if set.len() >= CA_CACHE_MAX {
                set.clear();
            }
            set.insert(ca_key);
        }

        // 3. The COSE signature, with the (now trusted) leaf key.
        let leaf = &chain[cas];
        let leaf_key = leaf.public_key();
        if ec_curve(leaf_key) != Some(Curve::P384) {
            return Err(chain_error("the leaf certificate's key is not an ECDSA P-384 key, so it cannot sign ES384"));
        }
        let tbs = self.sign1.tbs_data(b"");
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P384_SHA384_FIXED, leaf_key.subject_public_key.data.as_ref())
            .verify(&tbs, &self.sign1.signature)
            .map_err(|_| VerifyError::BadSignature { format: FORMAT, what: "the COSE_Sign1 attestation document (ES384 by the leaf certificate)".into() })?;

        // 4. Times: every certificate (the root too) is valid now; the document is not from the future.
        let now = i128::from(now_secs);
        for (cert, name) in chain.iter().zip(&names) {
            let v = cert.validity();
            if now < i128::from(v.not_before.timestamp()) || now > i128::from(v.not_after.timestamp()) {
                return Err(VerifyError::NotValidAtTime { format: FORMAT, what: format!("{name} (valid {} to {})", v.not_before, v.not_after) });
            }
        }
        let issued_at = doc.timestamp_ms / 1000;
        if issued_at > now_secs.saturating_add(CLOCK_SKEW_SECS) {
            return Err(VerifyError::NotValidAtTime { format: FORMAT, what: format!("the attestation document (timestamp {issued_at} s is in the future)") });
        }

        Ok(self.claims(&leaf.subject().to_string(), root_der))
    }

    fn claims(&self, leaf_subject: &str, root_der: &[u8]) -> Claims {
        let doc = &self.document;
        let pcr = |i: u8| doc.pcrs.get(&i).map(Vec::as_slice).unwrap_or_default();
        let zero = |i: u8| pcr(i).iter().all(|b| *b == 0);
        let mut fields = BTreeMap::new();
        for (i, value) in &doc.pcrs {
            fields.insert(format!("PCR{i}"), hex::encode(value));
        }
        fields.insert("module_id".into(), doc.module_id.clone());
        fields.insert("digest".into(), doc.digest.clone());
        fields.insert("timestamp_ms".into(), doc.timestamp_ms.to_string());
        for (name, value) in [("nonce", &doc.nonce), ("public_key", &doc.public_key), ("user_data", &doc.user_data)] {
            if let Some(v) = value {
                fields.insert(name.into(), hex::encode(v));
            }
        }
        let pinned = pinned_root_der().is_ok_and(|der| der == root_der);
        let fingerprint = hex::encode(ring::digest::digest(&ring::digest::SHA256, root_der));
        let anchor = if pinned { "pinned AWS Nitro root" } else { "CONFIGURED root (additional_nitro_roots; not the AWS root)" };
        fields.insert("trust_anchor".into(), format!("{anchor}, sha256 {fingerprint}"));
        Claims {
            format: FORMAT,
            measurement: hex::encode(pcr(0)),
            report_data: doc.user_data.as_deref().map(hex::encode).unwrap_or_default(),
            debug: zero(0) || zero(1) || zero(2),
            issued_at: Some(doc.timestamp_ms / 1000),
            tcb: None,
            signer: Some(format!("{leaf_subject} (module {})", doc.module_id)),
            fields,
        }
    }
}

/// The pinned AWS Nitro root, DER.
/// CA bundles whose links verified, by the SHA-256 of every certificate in them
/// (length-prefixed, in order). Bounded: emptied when it reaches [`CA_CACHE_MAX`].
static CA_CACHE: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<[u8; 32]>>> = std::sync::OnceLock::new();
pub const CA_CACHE_MAX: usize = 256;

fn ca_cache() -> &'static std::sync::Mutex<std::collections::HashSet<[u8; 32]>> {
    CA_CACHE.get_or_init(Default::default)
}

fn ca_bundle_key(cabundle: &[Vec<u8>]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for der in cabundle {
        h.update((der.len() as u64).to_le_bytes());
        h.update(der);
    }
    h.finalize().into()
}

/// Forgets every cached CA bundle (for benchmarks and tests).
pub fn clear_chain_cache() {
    if let Some(c) = CA_CACHE.get() {
        c.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    }
}

pub fn pinned_root_der() -> Result<Vec<u8>, VerifyError> {
    root_der_from(AWS_NITRO_ROOT_PEM)
}

/// A root certificate given as PEM (`-----BEGIN CERTIFICATE-----`) or DER, as DER.
fn root_der_from(bytes: &[u8]) -> Result<Vec<u8>, VerifyError> {
    let trimmed = bytes.trim_ascii_start();
    let der = if trimmed.starts_with(b"-----BEGIN") {
        let (rest, pem) = x509_parser::pem::parse_x509_pem(trimmed).map_err(|e| chain_error(format!("the configured root is not valid PEM: {e}")))?;
        if pem.label != "CERTIFICATE" {
            return Err(chain_error(format!("the configured root is a PEM {:?}, not a CERTIFICATE", pem.label)));
        }
        if !rest.trim_ascii().is_empty() {
            return Err(chain_error("the configured root holds more than one PEM block"));
        }
        pem.contents
    } else {
        bytes.to_vec()
    };
    match X509Certificate::from_der(&der) {
        Ok(([], _)) => Ok(der),
        _ => Err(chain_error("the configured root is not a DER X.509 certificate")),
    }
}

fn parse_certificate<'a>(der: &'a [u8], name: &str) -> Result<X509Certificate<'a>, VerifyError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(malformed(format!("{name} has trailing bytes after the certificate"))),
        Err(e) => Err(malformed(format!("{name} is not a DER X.509 certificate: {e}"))),
    }
}

/// `attestation_process.md` §3.2.3.2–3: CA certificates have critical `cA` basic constraints,
/// `keyCertSign`, and a path length that allows the CAs below them; the leaf is no CA and has
/// `digitalSignature`. Unknown critical extensions are refused (RFC 5280 §4.2).
fn check_extensions(cert: &X509Certificate<'_>, name: &str, is_ca: bool, cas_below: usize) -> Result<(), VerifyError> {
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::ParseError { .. } => return Err(chain_error(format!("{name} has an extension {} that does not parse", ext.oid))),
            ParsedExtension::UnsupportedExtension { .. } if ext.critical => {
                return Err(chain_error(format!("{name} has an unknown critical extension {}", ext.oid)));
            }
            _ => {}
        }
    }
    let bc = cert.basic_constraints().map_err(|e| chain_error(format!("{name}'s basic constraints: {e}")))?;
    let ku = cert.key_usage().map_err(|e| chain_error(format!("{name}'s key usage: {e}")))?;
    if is_ca {
        let bc =
            bc.filter(|b| b.critical && b.value.ca).ok_or_else(|| chain_error(format!("{name} is not marked as a CA (critical basic constraints, cA)")))?;
        if let Some(max) = bc.value.path_len_constraint {
            if usize::try_from(max).is_ok_and(|max| max < cas_below) {
                return Err(chain_error(format!("{name} allows {max} CA certificates below it, the chain has {cas_below}")));
            }
        }
        if !ku.is_some_and(|k| k.value.key_cert_sign()) {
            return Err(chain_error(format!("{name} may not sign certificates (no keyCertSign key usage)")));
        }
    } else {
        if bc.is_some_and(|b| b.value.ca) {
            return Err(chain_error(format!("{name} is a CA certificate, expected an end-entity certificate")));
        }
        if !ku.is_some_and(|k| k.value.digital_signature()) {
            return Err(chain_error(format!("{name} may not sign documents (no digitalSignature key usage)")));
        }
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
}

fn ec_curve(spki: &SubjectPublicKeyInfo<'_>) -> Option<Curve> {
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return None;
    }
    let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
    if curve == OID_NIST_EC_P384 {
        Some(Curve::P384)
    } else if curve == OID_EC_P256 {
        Some(Curve::P256)
    } else {
        None
    }
}

/// Checks `cert`'s signature over its TBS bytes with the issuer's key. ECDSA with SHA-256 or
/// SHA-384 on P-256 or P-384, which covers the AWS PKI (P-384, SHA-384 throughout).
fn verify_certificate_signature(cert: &X509Certificate<'_>, issuer_key: &SubjectPublicKeyInfo<'_>) -> Result<(), String> {
    use ring::signature as sig;
    if cert.signature_algorithm != cert.tbs_certificate.signature {
        return Err("the signed and unsigned signature algorithms differ".into());
    }
    let alg_oid = &cert.signature_algorithm.algorithm;
    let sha384 = if *alg_oid == OID_SIG_ECDSA_WITH_SHA384 {
        true
    } else if *alg_oid == OID_SIG_ECDSA_WITH_SHA256 {
        false
    } else {
        return Err(format!("unsupported signature algorithm {alg_oid}"));
    };
    let alg: &'static sig::EcdsaVerificationAlgorithm = match (ec_curve(issuer_key), sha384) {
        (Some(Curve::P384), true) => &sig::ECDSA_P384_SHA384_ASN1,
        (Some(Curve::P384), false) => &sig::ECDSA_P384_SHA256_ASN1,
        (Some(Curve::P256), true) => &sig::ECDSA_P256_SHA384_ASN1,
        (Some(Curve::P256), false) => &sig::ECDSA_P256_SHA256_ASN1,
        (None, _) => return Err("the issuer's key is not an ECDSA P-256 or P-384 key".into()),
    };
    if cert.signature_value.unused_bits != 0 {
        return Err("the signature bit string has unused bits".into());
    }
    sig::UnparsedPublicKey::new(alg, issuer_key.subject_public_key.data.as_ref())
        .verify(cert.tbs_certificate.as_ref(), cert.signature_value.data.as_ref())
        .map_err(|_| "ECDSA verification failed".to_string())
}

/// The payload map, per `attestation_process.md` §3.2.2. Optional fields may be absent or
/// `null` (the NSM writes `null` for those it was not given).
fn parse_payload(payload: &[u8]) -> Result<AttestationDocument, VerifyError> {
    let mut rest = payload;
    let value: Value = ciborium::from_reader(&mut rest).map_err(|e| malformed(format!("the payload is not CBOR: {e}")))?;
    if !rest.is_empty() {
        return Err(malformed("trailing bytes after the payload map"));
    }
    let Value::Map(entries) = value else {
        return Err(malformed("the payload is not a CBOR map"));
    };
    let mut map: BTreeMap<String, Value> = BTreeMap::new();
    for (k, v) in entries {
        let Value::Text(key) = k else {
            return Err(malformed("a payload key is not a text string"));
        };
        if !matches!(key.as_str(), "module_id" | "digest" | "timestamp" | "pcrs" | "certificate" | "cabundle" | "public_key" | "user_data" | "nonce") {
            return Err(malformed(format!("unknown payload field {key:?}")));
        }
        if map.contains_key(&key) {
            return Err(malformed(format!("payload field {key:?} appears twice")));
        }
        map.insert(key, v);
    }
    let mut required = |name: &str| map.remove(name).filter(|v| !v.is_null()).ok_or_else(|| malformed(format!("required field {name} is missing")));

    let module_id = match required("module_id")? {
        Value::Text(s) if !s.is_empty() => s,
        _ => return Err(malformed("module_id is not a non-empty text string")),
    };
    let digest = match required("digest")? {
        Value::Text(s) if s == "SHA384" => s,
        other => return Err(malformed(format!("digest is {other:?}, expected \"SHA384\""))),
    };
    let timestamp_ms = match required("timestamp")? {
        Value::Integer(i) => u64::try_from(i).ok().filter(|t| *t > 0).ok_or_else(|| malformed("timestamp is not a positive 64-bit integer"))?,
        _ => return Err(malformed("timestamp is not an integer")),
    };
    let Value::Map(pcr_entries) = required("pcrs")? else {
        return Err(malformed("pcrs is not a map"));
    };
    if pcr_entries.is_empty() || pcr_entries.len() > 32 {
        return Err(malformed(format!("pcrs has {} entries, expected 1 to 32", pcr_entries.len())));
    }
    let mut pcrs = BTreeMap::new();
    for (k, v) in pcr_entries {
        let index = match k {
            Value::Integer(i) => u8::try_from(i).ok().filter(|i| *i < 32).ok_or_else(|| malformed("a PCR index is outside 0..32"))?,
            _ => return Err(malformed("a PCR index is not an integer")),
        };
        let value = match v {
            Value::Bytes(b) if b.len() == PCR_LEN => b,
            _ => return Err(malformed(format!("PCR{index} is not a {PCR_LEN}-byte string (digest is SHA384)"))),
        };
        if pcrs.insert(index, value).is_some() {
            return Err(malformed(format!("PCR{index} appears twice")));
        }
    }
    if (0..3).any(|i| !pcrs.contains_key(&i)) {
        return Err(malformed("PCR0, PCR1 and PCR2 must all be present"));
    }
    let certificate = cert_bytes(required("certificate")?, "certificate")?;
    let Value::Array(bundle) = required("cabundle")? else {
        return Err(malformed("cabundle is not an array"));
    };
    if bundle.is_empty() {
        return Err(malformed("cabundle is empty"));
    }
    let cabundle = bundle.into_iter().enumerate().map(|(i, v)| cert_bytes(v, &format!("cabundle[{i}]"))).collect::<Result<Vec<_>, _>>()?;
    let public_key = optional_bytes(map.remove("public_key"), "public_key", 1, 1024)?;
    let user_data = optional_bytes(map.remove("user_data"), "user_data", 0, 512)?;
    let nonce = optional_bytes(map.remove("nonce"), "nonce", 0, 512)?;
    Ok(AttestationDocument { module_id, digest, timestamp_ms, pcrs, certificate, cabundle, public_key, user_data, nonce })
}

fn cert_bytes(v: Value, name: &str) -> Result<Vec<u8>, VerifyError> {
    match v {
        Value::Bytes(b) if (1..=1024).contains(&b.len()) => Ok(b),
        _ => Err(malformed(format!("{name} is not a byte string of 1 to 1024 bytes"))),
    }
}

fn optional_bytes(v: Option<Value>, name: &str, min: usize, max: usize) -> Result<Option<Vec<u8>>, VerifyError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bytes(b)) if (min..=max).contains(&b.len()) => Ok(Some(b)),
        Some(_) => Err(malformed(format!("{name} is not a byte string of {min} to {max} bytes"))),
    }
}

/// The Nitro format in the [`crate::registry`] table: the pinned AWS root only.
///
/// Endorsements: none. Any endorsement is refused ([`VerifyError::PeerSuppliedRoot`]):
/// the document carries its chain, so an endorsement could only be a root, and roots come
/// from the verifier's configuration ([`verify_with_roots`]), never from the peer.
#[derive(Clone, Copy, Debug, Default)]
pub struct NitroVerifier;

impl Verifier for NitroVerifier {
    fn format(&self) -> Format {
        FORMAT
    }

    fn detect(&self, evidence: &[u8]) -> bool {
        looks_like_cose_sign1(evidence)
    }

    fn verify(&self, evidence: &[u8], endorsements: &[Vec<u8>], now_secs: u64) -> Result<Claims, VerifyError> {
        verify_with_roots(evidence, endorsements, &[], now_secs)
    }
}

/// Verifies a Nitro document whose chain must start at the pinned AWS root or at one of
/// `configured_roots` (PEM or DER certificates from the verifier's own configuration).
/// `endorsements` must be empty: they come with the evidence, from the peer.
pub fn verify_with_roots(evidence: &[u8], endorsements: &[Vec<u8>], configured_roots: &[&[u8]], now_secs: u64) -> Result<Claims, VerifyError> {
    if !endorsements.is_empty() {
        return Err(VerifyError::PeerSuppliedRoot { format: FORMAT, count: endorsements.len() });
    }
    let doc = SignedAttestationDocument::parse(evidence)?;
    let first = doc.document().cabundle.first().ok_or_else(|| malformed("cabundle is empty"))?;
    let pinned = pinned_root_der()?;
    if first.as_slice() == pinned.as_slice() {
        return doc.verify(&pinned, now_secs);
    }
    for root in configured_roots {
        let der = root_der_from(root)?;
        if first.as_slice() == der.as_slice() {
            return doc.verify(&der, now_secs);
        }
    }
    Err(VerifyError::UntrustedRoot { format: FORMAT })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_root_is_the_published_aws_root() {
        let der = pinned_root_der().unwrap();
        let fingerprint = hex::encode(ring::digest::digest(&ring::digest::SHA256, &der));
        assert_eq!(fingerprint, "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b");
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(cert.subject().to_string(), "C=US, O=Amazon, OU=AWS, CN=aws.nitro-enclaves");
    }

    #[test]
    fn detection_does_not_collide_with_other_formats() {
        assert!(looks_like_cose_sign1(&[0x84, 0x44, 0xa1, 0x01, 0x38, 0x22]));
        assert!(looks_like_cose_sign1(&[0xD2, 0x84, 0x44]));
        assert!(!looks_like_cose_sign1(b"{\"format\":\"tessera-dev-evidence-INSECURE\"}"));
        let mut snp = vec![0u8; 1184];
        snp[0] = 2;
        assert!(!looks_like_cose_sign1(&snp));
        for version in [3u16, 4, 5] {
            let mut quote = version.to_le_bytes().to_vec();
            quote.extend_from_slice(&[2, 0, 0x81, 0, 0, 0]);
            assert!(!looks_like_cose_sign1(&quote));
        }
        assert!(!looks_like_cose_sign1(&[]) && !looks_like_cose_sign1(&[0x84]) && !looks_like_cose_sign1(&[0xD2]));
    }

    #[test]
    fn any_endorsement_is_refused_before_parsing() {
        for endorsements in [vec![vec![1]], vec![vec![1], vec![2]], vec![AWS_NITRO_ROOT_PEM.to_vec()]] {
            let e = NitroVerifier.verify(&[0x84, 0x40], &endorsements, 0).unwrap_err();
            assert_eq!(e, VerifyError::PeerSuppliedRoot { format: Format::AwsNitro, count: endorsements.len() });
        }
    }
}
