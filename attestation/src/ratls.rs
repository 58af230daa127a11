//! Attested TLS: the aggregator's certificate carries its evidence in an X.509 extension,
//! and the evidence's report data binds the certificate's public key
//! ([`crate::binding::aggregator_report_data`] over the SHA-256 of the SubjectPublicKeyInfo),
//! so a client checks, inside the TLS handshake, what code holds the key it is talking to.
//!
//! Extension: OID [`EVIDENCE_OID`], non-critical, value = DER OCTET STRING of the JSON
//! `{"identity_public_key": HEX, "evidence": HEX}`. The key pair is long-lived and the
//! certificate is re-issued with fresh evidence at each start, so clients pin the public
//! key (SPKI hash), not the certificate.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x509_parser::prelude::*;

use crate::policy::{NodePolicy, PolicyFailure, Verdict};

/// 2.25.N (an OID derived from a UUID value), private to Tessera.
pub const EVIDENCE_OID: &[u64] = &[2, 25, 3_982_117_745_219_441_153];
const EVIDENCE_OID_STR: &str = "2.25.3982117745219441153";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertEvidence {
    pub identity_public_key: String,
    pub evidence: String,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RaTlsError {
    #[error("the certificate does not parse: {0}")]
    Certificate(String),
    #[error("the certificate carries no Tessera evidence extension")]
    NoEvidence,
    #[error("the evidence extension is malformed: {0}")]
    Malformed(String),
}

/// DER OCTET STRING around `bytes` (the extension value rcgen embeds).
pub fn encode_extension(ev: &CertEvidence) -> Vec<u8> {
    let body = serde_json::to_vec(ev).unwrap_or_default();
    let mut out = vec![0x04];
    let len = body.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len.to_be_bytes().iter().copied().skip_while(|&b| b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(&body);
    out
}

fn decode_octet_string(der: &[u8]) -> Result<&[u8], RaTlsError> {
    let bad = |w: &str| RaTlsError::Malformed(w.to_string());
    if der.first() != Some(&0x04) {
        return Err(bad("not an OCTET STRING"));
    }
    let first = *der.get(1).ok_or_else(|| bad("no length"))?;
    let (len, start) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return Err(bad("unsupported length"));
        }
        let bytes = der.get(2..2 + n).ok_or_else(|| bad("short length"))?;
        (bytes.iter().fold(0usize, |a, &b| a << 8 | b as usize), 2 + n)
    };
    der.get(start..start + len).filter(|_| start + len == der.len()).ok_or_else(|| bad("length does not match"))
}

/// SHA-256 of the certificate's SubjectPublicKeyInfo: what clients pin.
pub fn spki_sha256(cert_der: &[u8]) -> Result<[u8; 32], RaTlsError> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| RaTlsError::Certificate(e.to_string()))?;
    Ok(Sha256::digest(cert.tbs_certificate.subject_pki.raw).into())
}

/// The evidence the certificate carries, if any.
pub fn certificate_evidence(cert_der: &[u8]) -> Result<CertEvidence, RaTlsError> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| RaTlsError::Certificate(e.to_string()))?;
    let ext = cert.extensions().iter().find(|e| e.oid.to_id_string() == EVIDENCE_OID_STR).ok_or(RaTlsError::NoEvidence)?;
    serde_json::from_slice(decode_octet_string(ext.value)?).map_err(|e| RaTlsError::Malformed(e.to_string()))
}

/// Verifies the certificate's evidence against `policy`, bound to the certificate's own
/// public key; returns the verdict and the enclave identity key it names.
pub fn verify_certificate(cert_der: &[u8], policy: &NodePolicy, now_secs: u64) -> (Verdict, Option<[u8; 32]>) {
    let refuse = |reason: String| (Verdict { accepted: false, format: None, claims: None, failures: vec![PolicyFailure::Unverified { reason }] }, None);
    let (ev, spki) = match (certificate_evidence(cert_der), spki_sha256(cert_der)) {
        (Ok(ev), Ok(spki)) => (ev, spki),
        (Err(e), _) | (_, Err(e)) => return refuse(e.to_string()),
    };
    let Some(identity) = hex::decode(&ev.identity_public_key).ok().and_then(|v| <[u8; 32]>::try_from(v).ok()) else {
        return refuse("identity_public_key is not 32 bytes of hex".into());
    };
    let Ok(evidence) = hex::decode(&ev.evidence) else { return refuse("evidence is not hex".into()) };
    let expected = crate::binding::aggregator_report_data(&identity, &spki);
    (policy.check(&evidence, &[], &expected, now_secs), Some(identity))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octet_string_round_trip_and_refusals() {
        for n in [0usize, 5, 127, 128, 300, 70_000] {
            let ev = CertEvidence { identity_public_key: "ab".into(), evidence: "c".repeat(n) };
            let der = encode_extension(&ev);
            let back: CertEvidence = serde_json::from_slice(decode_octet_string(&der).unwrap()).unwrap();
            assert_eq!(back, ev);
        }
        assert!(decode_octet_string(&[0x04, 0x05, 1]).is_err());
        assert!(decode_octet_string(&[0x30, 0x00]).is_err());
        assert!(decode_octet_string(&[0x04, 0x85, 1, 1, 1, 1, 1]).is_err());
        assert!(decode_octet_string(&[]).is_err());
    }
}
