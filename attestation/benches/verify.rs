//! Verification time per evidence format, on the real samples in tests/vectors, at a
//! time inside each sample's validity window. Every verification is complete (chain to
//! the pinned root, CRLs and collateral for DCAP). Each format is measured twice: with
//! its cache emptied before every run (cold), and warm. SEV-SNP and Nitro cache verified
//! chains (the evidence's own signature, the leaf link, validity periods and TCB
//! extensions are still checked); DCAP remembers verified signatures (times, CRL
//! revocation and the TCB match are still evaluated).
//!
//! `cargo bench -p tessera-attestation --bench verify`

use std::time::Instant;

const V: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors");

fn secs(rfc3339: &str) -> u64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339).map(|d| d.timestamp() as u64).unwrap_or_else(|e| panic!("{rfc3339}: {e}"))
}

fn read(p: &str) -> Vec<u8> {
    std::fs::read(format!("{V}/{p}")).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// (name, evidence, endorsements, verification time).
type Case = (&'static str, Vec<u8>, Vec<Vec<u8>>, u64);

fn main() {
    let cases: Vec<Case> = vec![
        (
            "AMD SEV-SNP (Milan, VCEK + ASK/ARK)",
            read("sev-snp/milan-virtee/report.bin"),
            vec![read("sev-snp/milan-virtee/vcek.der"), read("sev-snp/milan-virtee/cert_chain.pem")],
            secs("2026-01-01T00:00:00Z"),
        ),
        (
            "Intel TDX quote v4 + collateral",
            read("tdx-sgx-dcap/tdx-v4-uptodate/quote.bin"),
            vec![read("tdx-sgx-dcap/tdx-v4-uptodate/collateral.json")],
            secs("2025-07-01T00:00:00Z"),
        ),
        ("AWS Nitro (COSE_Sign1, ES384)", read("aws-nitro/beta-2022-10-13-nondebug/attestation_doc.cbor"), vec![], secs("2022-10-13T09:30:00Z")),
    ];
    let reps = 50;
    println!("| format | median | min | runs |\n| --- | ---: | ---: | ---: |");
    for (name, evidence, endorsements, at) in cases {
        tessera_attestation::verify(&evidence, &endorsements, at).unwrap_or_else(|e| panic!("{name}: {e}"));
        let measure = |cold: bool| {
            let mut times: Vec<f64> = (0..reps)
                .map(|_| {
                    if cold {
                        tessera_attestation::snp::clear_chain_cache();
                        tessera_attestation::nitro::clear_chain_cache();
                        tessera_attestation::dcap::clear_signature_cache();
                    }
                    let t = Instant::now();
                    let claims = tessera_attestation::verify(&evidence, &endorsements, at);
                    let dt = t.elapsed().as_secs_f64();
                    std::hint::black_box(claims).ok();
                    dt
                })
                .collect();
            times.sort_by(f64::total_cmp);
            (times[reps / 2] * 1e3, times[0] * 1e3)
        };
        let (median, min) = measure(true);
        println!("| {name}, not cached | {median:.2} ms | {min:.2} ms | {reps} |");
        tessera_attestation::verify(&evidence, &endorsements, at).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (median, min) = measure(false);
        println!("| {name}, cached | {median:.2} ms | {min:.2} ms | {reps} |");
    }
}
