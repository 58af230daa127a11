//! Keys, configurations and trust shared by the in-memory protocol tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use tessera_secagg::aggregator::Aggregator;
use tessera_secagg::client::Trust;
use tessera_secagg::crypto::MessageSigner;
use tessera_secagg::floors::SecurityFloors;
use tessera_secagg::RoundConfig;

/// Deterministic Ed25519 keys for tests.
pub fn signer(i: usize) -> Arc<ring::signature::Ed25519KeyPair> {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    Arc::new(ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).unwrap())
}

/// The aggregator's identity key (the enclave's, in production).
pub fn aggregator_signer() -> Arc<ring::signature::Ed25519KeyPair> {
    Arc::new(ring::signature::Ed25519KeyPair::from_seed_unchecked(&[0xA6; 32]).unwrap())
}

pub fn config(n: usize, t: u32, k: u32, ts: u32, m: u32, bits: u8) -> RoundConfig {
    let roster = (0..n).map(|i| hex::encode(signer(i).public_key())).collect();
    let mut cfg = RoundConfig::with_defaults(3, roster, m, [42; 32]);
    cfg.min_survivors = t;
    cfg.neighbours = k;
    cfg.share_threshold = ts;
    cfg.modulus_bits = bits;
    cfg.max_weight = 1;
    cfg
}

/// Floors that accept any threshold: for tests of the protocol's arithmetic at every t,
/// not of what an institution should accept.
pub fn any_threshold() -> SecurityFloors {
    SecurityFloors { min_participants: 0, min_survivor_fraction: 0.0, ..SecurityFloors::default() }
}

/// What a client trusts for `agg`'s round.
pub fn trust(agg: &Aggregator, floors: SecurityFloors) -> Trust {
    Trust { aggregator_key: aggregator_signer().public_key(), config_signature: agg.config_signature(), floors }
}

pub fn sign_as_aggregator(transcript: &[u8]) -> [u8; 64] {
    MessageSigner::sign(&*aggregator_signer(), transcript)
}
