//! Evidence with its endorsements in one blob, for evidence that travels inside a
//! protocol message (a client's advertisement, the aggregator's attestation answer).
//! For example, an SNP report and the VCEK/ASK/ARK certificates the guest obtained from
//! the host.
//!
//! Encoding: JSON `{"tessera_evidence_bundle": 1, "evidence": HEX, "endorsements": [HEX…]}`.

use serde::{Deserialize, Serialize};

use crate::{Format, VerifyError};

const TAG: &str = "tessera_evidence_bundle";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvidenceBundle {
    pub evidence: Vec<u8>,
    pub endorsements: Vec<Vec<u8>>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    tessera_evidence_bundle: u32,
    evidence: String,
    endorsements: Vec<String>,
}

impl EvidenceBundle {
    pub fn encode(&self) -> Vec<u8> {
        let wire =
            Wire { tessera_evidence_bundle: 1, evidence: hex::encode(&self.evidence), endorsements: self.endorsements.iter().map(hex::encode).collect() };
        // Serialising plain strings and integers cannot fail.
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    /// Whether `bytes` look like a bundle (cheap; [`EvidenceBundle::decode`] checks fully).
    pub fn detect(bytes: &[u8]) -> bool {
        bytes.starts_with(b"{") && bytes.windows(TAG.len()).take(64).any(|w| w == TAG.as_bytes())
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, VerifyError> {
        let malformed = |why: String| VerifyError::Malformed { format: Format::DevInsecure, why: format!("evidence bundle: {why}") };
        let wire: Wire = serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
        if wire.tessera_evidence_bundle != 1 {
            return Err(malformed(format!("version {} is not supported", wire.tessera_evidence_bundle)));
        }
        let evidence = hex::decode(&wire.evidence).map_err(|e| malformed(e.to_string()))?;
        let endorsements = wire.endorsements.iter().map(hex::decode).collect::<Result<_, _>>().map_err(|e| malformed(e.to_string()))?;
        Ok(EvidenceBundle { evidence, endorsements })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let b = EvidenceBundle { evidence: vec![1, 2, 3], endorsements: vec![vec![4], vec![]] };
        let bytes = b.encode();
        assert!(EvidenceBundle::detect(&bytes));
        assert_eq!(EvidenceBundle::decode(&bytes).unwrap(), b);
        assert!(EvidenceBundle::decode(b"{\"tessera_evidence_bundle\":2,\"evidence\":\"\",\"endorsements\":[]}").is_err());
        assert!(EvidenceBundle::decode(b"{\"tessera_evidence_bundle\":1,\"evidence\":\"zz\",\"endorsements\":[]}").is_err());
        assert!(!EvidenceBundle::detect(b"{\"format\":\"x\"}"));
    }
}
