//! Keys, configurations and trust shared by the in-memory protocol tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use rand::SeedableRng;
use tessera_secagg::aggregator::{Aggregator, Outcome};
use tessera_secagg::client::{Client, Trust};
use tessera_secagg::crypto::MessageSigner;
use tessera_secagg::floors::SecurityFloors;
use tessera_secagg::{ClientId, RoundConfig, Timestamp};

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

/// Three clients of a round with t = k = 2 over `m` values of `bits` bits, advertised and
/// with their keys shared: the aggregator waits for masked inputs. The same seed builds
/// the same round.
pub fn clients_with_shares(m: u32, bits: u8, seed: u64) -> (Aggregator, Vec<Client>, RoundConfig) {
    let cfg = config(3, 2, 2, 2, m, bits);
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let mut agg = Aggregator::new(cfg.clone(), aggregator_signer(), Timestamp(0)).unwrap();
    let mut clients: Vec<Client> =
        (0..3).map(|i| Client::new(cfg.clone(), ClientId(i), signer(i as usize), &trust(&agg, any_threshold()), &mut rng).unwrap()).collect();
    for c in &clients {
        agg.handle_advertise(c.advertise(vec![])).unwrap();
    }
    agg.advance(Timestamp(1));
    for c in &mut clients {
        let dir = agg.key_directory(c.id()).unwrap();
        agg.handle_share_keys(c.handle_key_directory(&dir, &mut rng).unwrap()).unwrap();
    }
    agg.advance(Timestamp(2));
    (agg, clients, cfg)
}

/// Closes the masked-input phase and runs consistency and unmasking with every client;
/// returns the released sum.
pub fn finish_round(agg: &mut Aggregator, clients: &mut [Client]) -> Vec<u32> {
    agg.advance(Timestamp(3));
    let set = agg.survivor_set().unwrap();
    for c in clients.iter_mut() {
        agg.handle_consistency(c.handle_survivor_set(&set).unwrap()).unwrap();
    }
    agg.advance(Timestamp(4));
    let req = agg.unmask_request().unwrap();
    for c in clients.iter_mut() {
        agg.handle_unmask(c.handle_unmask_request(&req).unwrap()).unwrap();
    }
    agg.advance(Timestamp(5));
    let Some(Outcome::Sum(sum)) = agg.outcome() else { panic!("{:?}", agg.outcome()) };
    sum.sum.clone()
}
