//! How evidence is bound to keys. Evidence carries 64 bytes of report data chosen by the
//! attested code; Tessera fills them with a hash of the keys the evidence vouches for, so
//! evidence replayed next to other keys fails the binding check.

use sha2::{Digest, Sha512};

/// Report data of the aggregator's evidence: SHA-512(label ‖ identity key ‖ len ‖ context),
/// where the context is the SHA-256 fingerprint of the aggregator's TLS certificate (and a
/// verifier's nonce, when one is given).
pub fn aggregator_report_data(identity: &[u8; 32], context: &[u8]) -> [u8; 64] {
    let mut h = Sha512::new();
    h.update(b"tessera/aggregator-evidence/v1");
    h.update(identity);
    h.update((context.len() as u64).to_le_bytes());
    h.update(context);
    h.finalize().into()
}

/// The context of evidence made for one verifier: the TLS fingerprint, then the
/// verifier's nonce. Evidence bound to it cannot be replayed to another verifier or
/// from an earlier request.
pub fn fresh_context(tls_fingerprint: &[u8; 32], nonce: &[u8]) -> Vec<u8> {
    let mut c = tls_fingerprint.to_vec();
    c.extend_from_slice(nonce);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_depends_on_every_input() {
        let a = aggregator_report_data(&[1; 32], b"ctx");
        assert_ne!(a, aggregator_report_data(&[2; 32], b"ctx"));
        assert_ne!(a, aggregator_report_data(&[1; 32], b"ctx2"));
        assert_eq!(a, aggregator_report_data(&[1; 32], b"ctx"));
    }
}
