//! Simulated ("dev") evidence, for machines without a TEE. **INSECURE**: it is signed by
//! a key the node itself holds, so it proves nothing about the hardware or the code. It
//! exists so the protocol carries evidence end to end on a laptop; every output that
//! shows it says so, and [`crate::policy::NodePolicy::default`] rejects it.

use serde::{Deserialize, Serialize};

use crate::{AttestError, Attester, Claims, Format, Verifier, VerifyError};

pub const DEV_MAGIC: &str = "tessera-dev-evidence-INSECURE";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevEvidence {
    format: String,
    warning: String,
    measurement: String,
    report_data: String,
    issued_at: u64,
    debug: bool,
    public_key: String,
    signature: String,
}

fn signed_bytes(e: &DevEvidence) -> Vec<u8> {
    let mut v = Vec::new();
    for part in [e.format.as_bytes(), e.measurement.as_bytes(), e.report_data.as_bytes(), &e.issued_at.to_le_bytes(), &[e.debug as u8], e.public_key.as_bytes()]
    {
        v.extend_from_slice(&(part.len() as u64).to_le_bytes());
        v.extend_from_slice(part);
    }
    v
}

/// Signs simulated evidence with a node-local Ed25519 key.
pub struct DevAttester {
    key: ring::signature::Ed25519KeyPair,
    measurement: [u8; 48],
    debug: bool,
}

impl std::fmt::Debug for DevAttester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevAttester(INSECURE, measurement {})", hex::encode(self.measurement))
    }
}

impl DevAttester {
    /// `measurement` should be the SHA-384 of the running executable, so that the dev
    /// flow exercises measurement policies the way hardware evidence does.
    pub fn new(seed: [u8; 32], measurement: [u8; 48], debug: bool) -> Self {
        // from_seed_unchecked only fails on a wrong-length seed, which the type rules out.
        let key = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).unwrap_or_else(|_| unreachable!("32-byte seed"));
        DevAttester { key, measurement, debug }
    }
}

/// SHA-384 of a file's bytes, the dev stand-in for a launch measurement.
pub fn measure_bytes(bytes: &[u8]) -> [u8; 48] {
    use sha2::{Digest, Sha384};
    Sha384::digest(bytes).into()
}

/// [`measure_bytes`] of a file, read 1 MiB at a time: measuring a 100 MB executable
/// (release builds with line tables) no longer holds all of it in memory, which had
/// been most of an idle server's resident memory.
pub fn measure_file(path: &std::path::Path) -> std::io::Result<[u8; 48]> {
    use sha2::{Digest, Sha384};
    let mut file = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    let mut hasher = Sha384::new();
    // `io::copy` retries reads the OS interrupts.
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hasher.finalize().into())
}

impl Attester for DevAttester {
    fn format(&self) -> Format {
        Format::DevInsecure
    }

    fn attest(&self, report_data: &[u8; 64], now_secs: u64) -> Result<Vec<u8>, AttestError> {
        use ring::signature::KeyPair;
        let mut e = DevEvidence {
            format: DEV_MAGIC.into(),
            warning: "SIMULATED EVIDENCE: signed by a key the node holds; proves nothing".into(),
            measurement: hex::encode(self.measurement),
            report_data: hex::encode(report_data),
            issued_at: now_secs,
            debug: self.debug,
            public_key: hex::encode(self.key.public_key().as_ref()),
            signature: String::new(),
        };
        e.signature = hex::encode(self.key.sign(&signed_bytes(&e)).as_ref());
        serde_json::to_vec(&e).map_err(|err| AttestError::Interface(err.to_string()))
    }
}

#[derive(Debug)]
pub struct DevVerifier;

impl Verifier for DevVerifier {
    fn format(&self) -> Format {
        Format::DevInsecure
    }

    fn detect(&self, evidence: &[u8]) -> bool {
        evidence.starts_with(b"{") && evidence.windows(DEV_MAGIC.len()).any(|w| w == DEV_MAGIC.as_bytes())
    }

    fn verify(&self, evidence: &[u8], _endorsements: &[Vec<u8>], now_secs: u64) -> Result<Claims, VerifyError> {
        let malformed = |why: String| VerifyError::Malformed { format: Format::DevInsecure, why };
        let e: DevEvidence = serde_json::from_slice(evidence).map_err(|err| malformed(err.to_string()))?;
        if e.format != DEV_MAGIC {
            return Err(malformed(format!("format is {:?}", e.format)));
        }
        let pk = hex::decode(&e.public_key).map_err(|_| malformed("public_key is not hex".into()))?;
        let sig = hex::decode(&e.signature).map_err(|_| malformed("signature is not hex".into()))?;
        let measurement = hex::decode(&e.measurement).map_err(|_| malformed("measurement is not hex".into()))?;
        let report_data = hex::decode(&e.report_data).map_err(|_| malformed("report_data is not hex".into()))?;
        if measurement.len() != 48 || report_data.len() != 64 {
            return Err(malformed("measurement must be 48 bytes and report_data 64".into()));
        }
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &pk)
            .verify(&signed_bytes(&e), &sig)
            .map_err(|_| VerifyError::BadSignature { format: Format::DevInsecure, what: "the dev report".into() })?;
        // Evidence from the future (beyond a minute of clock skew) is refused.
        if e.issued_at > now_secs.saturating_add(60) {
            return Err(VerifyError::NotValidAtTime { format: Format::DevInsecure, what: "the dev report (issued in the future)".into() });
        }
        Ok(Claims {
            format: Format::DevInsecure,
            measurement: e.measurement,
            report_data: e.report_data,
            debug: e.debug,
            issued_at: Some(e.issued_at),
            tcb: None,
            signer: Some(format!("dev key {} (INSECURE)", e.public_key)),
            fields: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_measures_as_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exe");
        let bytes: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(measure_file(&path).unwrap(), measure_bytes(&bytes));
        assert!(measure_file(&dir.path().join("missing")).is_err());
    }

    fn attester() -> DevAttester {
        DevAttester::new([1; 32], [2; 48], false)
    }

    #[test]
    fn round_trip_and_labels() {
        let ev = attester().attest(&[7; 64], 1000).unwrap();
        let text = String::from_utf8(ev.clone()).unwrap();
        assert!(text.contains("INSECURE") && text.contains("SIMULATED"));
        let claims = crate::verify(&ev, &[], 1000).unwrap();
        assert_eq!(claims.format, Format::DevInsecure);
        assert_eq!(claims.report_data, hex::encode([7u8; 64]));
        assert_eq!(claims.measurement, hex::encode([2u8; 48]));
    }

    proptest::proptest! {
        #[test]
        fn verification_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600), flip in 0usize..2000) {
            let _ = crate::verify(&bytes, &[], 1000);
            // Single-byte corruptions of real evidence are refused, never accepted or panicking.
            let mut ev = attester().attest(&[7; 64], 1000).unwrap();
            let i = flip % ev.len();
            ev[i] ^= 1 + (bytes.first().copied().unwrap_or(0) % 254);
            if let Ok(claims) = crate::verify(&ev, &[], 1000) {
                // A flip inside insignificant JSON whitespace or the unsigned warning text may keep it valid,
                // but the signed claims must then be unchanged.
                proptest::prop_assert_eq!(claims.report_data, hex::encode([7u8; 64]));
                proptest::prop_assert_eq!(claims.measurement, hex::encode([2u8; 48]));
            }
        }
    }

    #[test]
    fn tampering_is_detected() {
        let ev = attester().attest(&[7; 64], 1000).unwrap();
        let text = String::from_utf8(ev).unwrap();
        let tampered = text.replace(&hex::encode([7u8; 64]), &hex::encode([8u8; 64]));
        assert!(matches!(crate::verify(tampered.as_bytes(), &[], 1000).unwrap_err(), VerifyError::BadSignature { format: Format::DevInsecure, .. }));
        let debug_flip = text.replace("\"debug\":false", "\"debug\":true");
        assert!(crate::verify(debug_flip.as_bytes(), &[], 1000).is_err());
        assert!(matches!(crate::verify(&text.as_bytes()[..40], &[], 1000), Err(VerifyError::Malformed { .. })));
        assert_eq!(crate::verify(b"garbage", &[], 1000).unwrap_err(), VerifyError::UnknownFormat);
        assert!(matches!(crate::verify(text.as_bytes(), &[], 100), Err(VerifyError::NotValidAtTime { .. })));
    }
}
