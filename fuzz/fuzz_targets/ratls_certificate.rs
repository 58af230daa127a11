//! The attested-TLS certificate parser (SPKI hash and evidence extension).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tessera_attestation::policy::NodePolicy;

fuzz_target!(|data: &[u8]| {
    let _ = tessera_attestation::ratls::spki_sha256(data);
    let _ = tessera_attestation::ratls::certificate_evidence(data);
    let _ = tessera_attestation::ratls::verify_certificate(data, &NodePolicy::insecure_dev(), 1_700_000_000);
});
