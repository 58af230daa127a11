//! The transparency log at scale: appending, signing-head roots, inclusion and
//! consistency proofs, with cached complete subtrees (`MerkleLog`) and with the plain
//! RFC 6962 recursion over the leaves; and the offline audit of a round bundle.
//!
//! `cargo bench -p tessera-attestation --bench translog`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use tessera_attestation::translog::{consistency_proof, inclusion_proof, leaf_hash, root_of, MerkleLog};

fn median<T>(reps: usize, mut f: impl FnMut() -> T) -> f64 {
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            std::hint::black_box(f());
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

fn fmt(secs: f64) -> String {
    if secs < 1e-3 {
        format!("{:.1} µs", secs * 1e6)
    } else {
        format!("{:.2} ms", secs * 1e3)
    }
}

fn main() {
    println!("| entries | append (per entry) | root | inclusion proof | consistency proof | root, plain | inclusion, plain |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for n in [1_000u64, 100_000, 1_000_000] {
        let entries: Vec<Vec<u8>> = (0..n).map(|i| format!("{{\"index\":{i},\"event\":\"x\"}}").into_bytes()).collect();
        let t = Instant::now();
        let mut log = MerkleLog::new();
        for e in &entries {
            log.append(e);
        }
        let append = t.elapsed().as_secs_f64() / n as f64;
        let leaves: Vec<_> = entries.iter().map(|e| leaf_hash(e)).collect();
        let mut i = 0u64;
        let root = median(101, || log.root());
        let incl = median(101, || {
            i = (i * 7919 + 13) % n;
            log.inclusion(i, n).unwrap()
        });
        let cons = median(101, || {
            i = (i * 7919 + 13) % n;
            log.consistency(i, n).unwrap()
        });
        let reps = if n > 100_000 { 5 } else { 21 };
        let plain_root = median(reps, || root_of(&leaves));
        let plain_incl = median(reps, || inclusion_proof(&leaves, n / 3).unwrap());
        assert_eq!(log.root(), root_of(&leaves));
        assert_eq!(log.consistency(n / 3, n).unwrap(), consistency_proof(&leaves, n / 3).unwrap());
        println!("| {n} | {} | {} | {} | {} | {} | {} |", fmt(append), fmt(root), fmt(incl), fmt(cons), fmt(plain_root), fmt(plain_incl));
    }

    // The offline audit of the committed sample bundle (14 entries, dev evidence).
    let d = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/audit");
    let bundle: tessera_attestation::audit::RoundBundle = serde_json::from_slice(&std::fs::read(format!("{d}/round-bundle.json")).unwrap()).unwrap();
    let head: tessera_attestation::translog::SignedTreeHead = serde_json::from_slice(&std::fs::read(format!("{d}/earlier-head.json")).unwrap()).unwrap();
    let inputs = tessera_attestation::audit::AuditInputs {
        policy: tessera_attestation::policy::NodePolicy::insecure_dev(),
        now_secs: bundle.report.opened_at_ms / 1000,
        previous_head: Some(head),
        mean: Some(std::fs::read(format!("{d}/round-mean.bin")).unwrap()),
    };
    assert!(tessera_attestation::audit::audit_bundle(&bundle, &inputs).passed());
    let audit = median(51, || tessera_attestation::audit::audit_bundle(&bundle, &inputs));
    println!("\nOffline audit of a round bundle ({} entries, with consistency and mean): {}", bundle.entries.len(), fmt(audit));
}
