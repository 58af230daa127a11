//! Whole SecAgg+ rounds in memory, deterministic under a seeded RNG: the released sum
//! is exactly the sum of the included inputs for every dropout schedule that leaves
//! enough survivors, and nothing is released otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tessera_secagg::aggregator::{Aggregator, Outcome, Phase};
use tessera_secagg::client::Client;
use tessera_secagg::crypto::MessageSigner;
use tessera_secagg::graph::CommunicationGraph;
use tessera_secagg::wire::*;
use tessera_secagg::{ClientId, Error, ProtocolError, RoundConfig, Timestamp};

mod common;
use common::*;

/// The last phase a client takes part in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Drop {
    BeforeAdvertise,
    BeforeShare,
    BeforeMasked,
    BeforeConsistency,
    BeforeUnmask,
    Never,
}

const DROPS: [Drop; 6] = [Drop::BeforeAdvertise, Drop::BeforeShare, Drop::BeforeMasked, Drop::BeforeConsistency, Drop::BeforeUnmask, Drop::Never];

struct RoundResult {
    outcome: Outcome,
    masked_inputs: Vec<MaskedInput>,
}

fn run_round(cfg: &RoundConfig, inputs: &[Vec<u32>], drops: &[Drop], seed: u64) -> RoundResult {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let n = cfg.participants();
    let mut agg = Aggregator::new(cfg.clone(), aggregator_signer(), Timestamp(0)).unwrap();
    // Each phase is closed by its deadline: the clock jumps past it every time.
    let step = cfg.phase_timeout_ms;
    let mut clock = 0u64;
    let mut far = || {
        clock += step;
        Timestamp(clock)
    };
    let mut clients: Vec<Option<Client>> =
        (0..n).map(|i| Some(Client::new(cfg.clone(), ClientId(i as u32), signer(i), &trust(&agg, any_threshold()), &mut rng).unwrap())).collect();
    let alive = |c: &mut Vec<Option<Client>>, i: usize, at: Drop| {
        if drops[i] <= at {
            c[i] = None;
        }
        c[i].is_some()
    };

    for i in 0..n {
        if alive(&mut clients, i, Drop::BeforeAdvertise) {
            let c = clients[i].as_ref().unwrap();
            agg.handle_advertise(c.advertise(vec![])).unwrap();
        }
    }
    agg.advance(far());
    // Each client's own view of U1: its neighbours' keys only.
    let views: Vec<Option<KeyDirectory>> = (0..n).map(|i| agg.key_directory(ClientId(i as u32))).collect();
    if views.iter().any(Option::is_some) {
        for i in 0..n {
            if alive(&mut clients, i, Drop::BeforeShare) {
                let dir = views[i].as_ref().unwrap();
                match clients[i].as_mut().unwrap().handle_key_directory(dir, &mut rng) {
                    Ok(msg) => agg.handle_share_keys(msg).unwrap(),
                    // Too few neighbours advertised: the client cannot protect its secrets
                    // and leaves the round, as the protocol requires.
                    Err(Error::Protocol(ProtocolError::BelowThreshold { .. })) => clients[i] = None,
                    Err(e) => panic!("client {i}: {e}"),
                }
            }
        }
        agg.advance(far());
    }
    let mut masked_inputs = Vec::new();
    for i in 0..n {
        if alive(&mut clients, i, Drop::BeforeMasked) {
            let Some(bundle) = agg.share_bundle(ClientId(i as u32)) else { continue };
            match clients[i].as_mut().unwrap().handle_share_bundle(&bundle, inputs[i].as_slice()) {
                Ok(masked) => {
                    // Through the wire encoding: packed below 32 bits.
                    agg.handle_masked_input_encoded(&masked.encode()).unwrap();
                    masked_inputs.push(masked);
                }
                // Too few of its neighbours shared keys: it could not mask safely and leaves.
                Err(Error::Protocol(ProtocolError::TooFewNeighbours { set: "U2", .. })) => clients[i] = None,
                Err(e) => panic!("client {i}: {e}"),
            }
        }
    }
    agg.advance(far());
    if let Some(set) = agg.survivor_set() {
        for i in 0..n {
            if set.survivors.contains(&ClientId(i as u32)) && alive(&mut clients, i, Drop::BeforeConsistency) {
                match clients[i].as_mut().unwrap().handle_survivor_set(&set) {
                    Ok(sig) => agg.handle_consistency(sig).unwrap(),
                    // None of the neighbours it masked with survived: signing would unmask it alone.
                    Err(Error::Protocol(ProtocolError::TooFewNeighbours { set: "U3", .. })) => clients[i] = None,
                    Err(e) => panic!("client {i}: {e}"),
                }
            }
        }
        agg.advance(far());
    }
    if let Some(req) = agg.unmask_request() {
        for i in 0..n {
            if req.signatures.iter().any(|s| s.client.0 as usize == i) && alive(&mut clients, i, Drop::BeforeUnmask) {
                let shares = clients[i].as_mut().unwrap().handle_unmask_request(&req).unwrap();
                agg.handle_unmask(shares).unwrap();
            }
        }
        agg.advance(far());
    }
    let outcome = agg.outcome().cloned().expect("round ended");
    RoundResult { outcome, masked_inputs }
}

/// Independent model of who survives and whether every needed secret is recoverable.
fn expected_included(cfg: &RoundConfig, drops: &[Drop]) -> Option<Vec<ClientId>> {
    let n = cfg.participants();
    let t = cfg.min_survivors as usize;
    let ts = cfg.share_threshold as usize;
    let g = CommunicationGraph::for_config(cfg).unwrap();
    let set = |d: Drop| -> BTreeSet<usize> { (0..n).filter(|&i| drops[i] > d).collect() };
    let u1 = set(Drop::BeforeAdvertise);
    if u1.len() < t {
        return None;
    }
    let nb = |i: usize| g.neighbours(ClientId(i as u32)).iter().map(|c| c.0 as usize).collect::<Vec<_>>();
    let u2: BTreeSet<usize> = set(Drop::BeforeShare).into_iter().filter(|&i| nb(i).iter().filter(|v| u1.contains(v)).count() >= ts).collect();
    // A client masks only with at least ts of its neighbours in U2, and signs U3 only if
    // one of them is in it.
    let masked_with = |i: usize| nb(i).into_iter().filter(|v| u2.contains(v)).collect::<Vec<_>>();
    let u3: BTreeSet<usize> = u2.iter().copied().filter(|&i| drops[i] > Drop::BeforeMasked && masked_with(i).len() >= ts).collect();
    let u4: BTreeSet<usize> = u3.iter().copied().filter(|&i| drops[i] > Drop::BeforeConsistency && masked_with(i).iter().any(|v| u3.contains(v))).collect();
    let u5: BTreeSet<usize> = u4.iter().copied().filter(|&i| drops[i] > Drop::BeforeUnmask).collect();
    if [u2.len(), u3.len(), u4.len(), u5.len()].iter().any(|&s| s < t) {
        return None;
    }
    let holders = |u: usize| nb(u).iter().filter(|v| u5.contains(v)).count();
    for &u in &u2 {
        let needed = u3.contains(&u) || nb(u).iter().any(|v| u3.contains(v));
        if needed && holders(u) < ts {
            return None;
        }
    }
    Some(u3.into_iter().map(|i| ClientId(i as u32)).collect())
}

fn exact_sum(cfg: &RoundConfig, inputs: &[Vec<u32>], included: &[ClientId]) -> Vec<u32> {
    let mut sum = vec![0u32; cfg.masked_len()];
    for c in included {
        for (s, x) in sum.iter_mut().zip(&inputs[c.0 as usize]) {
            *s = s.wrapping_add(*x);
        }
    }
    sum.iter().map(|x| x & cfg.modulus_mask()).collect()
}

fn arb_round() -> impl Strategy<Value = (RoundConfig, Vec<Vec<u32>>, Vec<Drop>, u64)> {
    (3usize..=20, any::<u64>(), 1u32..=40, prop_oneof![Just(32u8), Just(16u8), Just(24u8), Just(12u8), Just(8u8)]).prop_flat_map(|(n, seed, m, bits)| {
        let complete = n as u32 - 1;
        let max_even = (complete / 2) * 2;
        let k_choices: Vec<u32> = std::iter::once(complete).chain((2..=max_even).step_by(2)).collect();
        (Just(n), Just(seed), Just(m), Just(bits), proptest::sample::select(k_choices), 0.0f64..1.0, 0.0f64..1.0).prop_flat_map(
            move |(n, seed, m, bits, k, ts_frac, t_frac)| {
                let ts = k / 2 + 1 + ((k - k / 2 - 1) as f64 * ts_frac) as u32;
                let t = 1 + ((n as u32 - 1) as f64 * t_frac) as u32;
                let cfg = config(n, t, k, ts, m, bits);
                let mask = cfg.modulus_mask();
                let inputs = proptest::collection::vec(proptest::collection::vec(0..=mask / n as u32, m as usize + 1), n);
                let drops = proptest::collection::vec(prop_oneof![6 => Just(Drop::Never), 1 => proptest::sample::select(DROPS.to_vec())], n);
                (Just(cfg), inputs, drops, Just(seed))
            },
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn released_sum_is_exact_for_any_dropout_schedule((cfg, inputs, drops, seed) in arb_round()) {
        let result = run_round(&cfg, &inputs, &drops, seed);
        match (expected_included(&cfg, &drops), result.outcome) {
            (Some(included), Outcome::Sum(sum)) => {
                prop_assert_eq!(&sum.included, &included);
                prop_assert_eq!(sum.sum, exact_sum(&cfg, &inputs, &included));
            }
            (None, Outcome::Aborted { .. }) => {}
            (want, got) => prop_assert!(false, "expected {:?}, got {:?}", want, got),
        }
    }
}

#[test]
fn classic_secagg_with_thirty_percent_dropout() {
    let cfg = config(10, 7, 9, 5, 100, 32);
    let inputs: Vec<Vec<u32>> = (0..10).map(|i| vec![i * 1000 + 7; 101]).collect();
    let mut drops = vec![Drop::Never; 10];
    drops[1] = Drop::BeforeMasked;
    drops[4] = Drop::BeforeConsistency;
    drops[8] = Drop::BeforeUnmask;
    let result = run_round(&cfg, &inputs, &drops, 1);
    let Outcome::Sum(sum) = result.outcome else { panic!("aborted: {:?}", result.outcome) };
    let included: Vec<ClientId> = (0..10).filter(|&i| i != 1).map(ClientId).collect();
    assert_eq!(sum.included, included);
    assert_eq!(sum.sum, exact_sum(&cfg, &inputs, &included));
}

/// A compressed round (shared random-k, then a Hadamard rotation, 12-bit elements packed
/// on the wire) with a dropout: the released sum is exactly the sum of the included
/// clients' compressed inputs, and the decoded mean is their mean on the kept coordinates
/// (zero elsewhere) within the quantization bound.
#[test]
fn a_compressed_packed_round_releases_the_exact_sum() {
    use tessera_secagg::compress::Compression;
    use tessera_secagg::quantize::Quantizer;
    let m = 1000u32;
    let mut cfg = config(6, 4, 5, 3, m, 12);
    cfg.compression = Some(Compression { keep: Some(300), rotation_block: Some(128) });
    cfg.clip = 0.25;
    cfg.validate().unwrap();
    assert_eq!(cfg.encoded_len(), 2 * 128 + 64);
    assert_eq!(cfg.masked_bytes(), (321 * 12usize).div_ceil(8));
    let q = Quantizer::new(&cfg).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let updates: Vec<Vec<f32>> = (0..6).map(|_| (0..m).map(|_| rng.gen_range(-0.05f32..0.05)).collect()).collect();
    let inputs: Vec<Vec<u32>> = updates.iter().map(|u| q.quantize(u, 1, &mut rng).unwrap()).collect();
    assert!(inputs.iter().all(|v| v.len() == cfg.masked_len()));
    let mut drops = vec![Drop::Never; 6];
    drops[2] = Drop::BeforeMasked;
    let result = run_round(&cfg, &inputs, &drops, 5);
    for masked in &result.masked_inputs {
        let bytes = masked.encode();
        assert_eq!(bytes[4], 4, "version 4: packed");
        assert_eq!(MaskedInputView::parse(&bytes).unwrap().body.len(), cfg.masked_bytes());
    }
    let Outcome::Sum(sum) = result.outcome else { panic!("aborted: {:?}", result.outcome) };
    let included: Vec<ClientId> = [0, 1, 3, 4, 5].map(ClientId).to_vec();
    assert_eq!(sum.included, included);
    assert_eq!(sum.sum, exact_sum(&cfg, &inputs, &included));
    let mean = q.dequantize_sum(sum.sum, included.len()).unwrap();
    assert_eq!(mean.mean.len(), m as usize);
    let kept: BTreeSet<u32> = q.encoding().unwrap().selected().unwrap().iter().copied().collect();
    let bound = q.mean_error_bound(included.len(), mean.total_weight) as f32;
    let mut worst = 0f32;
    for j in 0..m {
        let want = if kept.contains(&j) { included.iter().map(|c| updates[c.0 as usize][j as usize]).sum::<f32>() / 5.0 } else { 0.0 };
        let got = mean.mean[j as usize];
        if !kept.contains(&j) {
            assert_eq!(got, 0.0, "coordinate {j} is not sent");
        }
        worst = worst.max((got - want).abs());
    }
    // The clip applies to rotated coordinates; a rotated block of values in ±0.05 has
    // coordinates of standard deviation 0.029, far inside 0.25, so the error is quantization only.
    assert!(worst <= bound, "worst {worst} > bound {bound}");
    assert!(worst > 0.0 && worst < 0.05, "{worst}");
}

/// A masked input whose width is not the round's is refused, packed or not.
#[test]
fn a_masked_input_of_the_wrong_width_is_refused() {
    let (mut agg, mut clients, _) = up_to_masked_input(config(3, 2, 2, 2, 10, 16), 4);
    let bundle = agg.share_bundle(ClientId(0)).unwrap();
    let masked = clients[0].handle_share_bundle(&bundle, [1; 11]).unwrap();
    assert_eq!(masked.bits, 16);
    let as_words = MaskedInput { bits: 32, ..masked.clone() };
    let err = agg.handle_masked_input_encoded(&as_words.encode()).unwrap_err().to_string();
    assert!(err.contains("32 bits wide, the round's modulus is 2^16"), "{err}");
    let as_twelve = MaskedInput { bits: 12, data: masked.data.iter().map(|x| x & 0xFFF).collect(), ..masked.clone() };
    assert!(agg.handle_masked_input_encoded(&as_twelve.encode()).unwrap_err().to_string().contains("12 bits wide"));
    agg.handle_masked_input_encoded(&masked.encode()).unwrap();
}

#[test]
fn fewer_than_t_survivors_release_nothing() {
    let cfg = config(6, 5, 5, 3, 8, 32);
    let inputs = vec![vec![1u32; 9]; 6];
    let mut drops = vec![Drop::Never; 6];
    drops[0] = Drop::BeforeMasked;
    drops[1] = Drop::BeforeMasked;
    let result = run_round(&cfg, &inputs, &drops, 2);
    assert!(matches!(result.outcome, Outcome::Aborted { phase: Phase::MaskedInput, .. }), "{:?}", result.outcome);
}

/// Bits of a masked input of all zeros are indistinguishable from uniform: the
/// frequency of ones and the byte histogram (chi-square, 255 degrees of freedom) are
/// within what a uniform source gives.
#[test]
fn masked_input_looks_uniform() {
    let cfg = config(3, 2, 2, 2, 65_535, 32);
    let inputs = vec![vec![0u32; 65_536]; 3];
    let result = run_round(&cfg, &inputs, &[Drop::Never; 3], 3);
    for masked in &result.masked_inputs {
        let bytes: Vec<u8> = masked.data.iter().flat_map(|w| w.to_le_bytes()).collect();
        let ones: u64 = bytes.iter().map(|b| b.count_ones() as u64).sum();
        let bits = bytes.len() as f64 * 8.0;
        let z = (ones as f64 - bits / 2.0) / (bits / 4.0).sqrt();
        assert!(z.abs() < 5.0, "ones z-score {z}");
        let mut hist = [0u64; 256];
        bytes.iter().for_each(|&b| hist[b as usize] += 1);
        let expected = bytes.len() as f64 / 256.0;
        let chi2: f64 = hist.iter().map(|&o| (o as f64 - expected).powi(2) / expected).sum();
        // mean 255, sd ~22.6; 255 + 6 sd keeps the false-failure rate negligible.
        assert!(chi2 < 390.0 && chi2 > 140.0, "chi-square {chi2}");
        // Adjacent words are uncorrelated.
        let corr = masked.data.windows(2).filter(|w| (w[0] ^ w[1]) & 1 == 0).count() as f64 / (masked.data.len() - 1) as f64;
        assert!((corr - 0.5).abs() < 0.01, "{corr}");
    }
}

struct Harness {
    cfg: RoundConfig,
    agg: Aggregator,
    clients: Vec<Client>,
    rng: ChaCha20Rng,
}

/// Drives a round with every client of `cfg` honest up to the masked-input phase.
fn up_to_masked_input(cfg: RoundConfig, seed: u64) -> (Aggregator, Vec<Client>, ChaCha20Rng) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut agg = Aggregator::new(cfg.clone(), aggregator_signer(), Timestamp(0)).unwrap();
    let mut clients: Vec<Client> =
        (0..cfg.participants()).map(|i| Client::new(cfg.clone(), ClientId(i as u32), signer(i), &trust(&agg, any_threshold()), &mut rng).unwrap()).collect();
    for c in &clients {
        agg.handle_advertise(c.advertise(vec![])).unwrap();
    }
    agg.advance(Timestamp(1)).unwrap();
    for c in &mut clients {
        let dir = agg.key_directory(c.id()).unwrap();
        agg.handle_share_keys(c.handle_key_directory(&dir, &mut rng).unwrap()).unwrap();
    }
    agg.advance(Timestamp(2)).unwrap();
    (agg, clients, rng)
}

/// Drives a round with every client honest up to the survivor set.
fn up_to_survivor_set(n: usize, drop_masked: &[usize]) -> (Harness, SurvivorSet) {
    let cfg = config(n, 3, (n - 1) as u32, 3, 4, 32);
    let (mut agg, mut clients, rng) = up_to_masked_input(cfg.clone(), 9);
    for (i, c) in clients.iter_mut().enumerate() {
        let bundle = agg.share_bundle(ClientId(i as u32)).unwrap();
        let masked = c.handle_share_bundle(&bundle, [1, 2, 3, 4, 1]).unwrap();
        if !drop_masked.contains(&i) {
            agg.handle_masked_input(&masked).unwrap();
        }
    }
    agg.advance(Timestamp(u64::MAX / 2)).unwrap();
    let set = agg.survivor_set().unwrap();
    (Harness { cfg, agg, clients, rng }, set)
}

#[test]
fn honest_client_refuses_to_reveal_both_shares_of_a_peer() {
    let (mut h, set) = up_to_survivor_set(5, &[4]);
    assert!(!set.survivors.contains(&ClientId(4)));
    let sigs: Vec<ConsistencySignature> = h.clients[..4].iter_mut().map(|c| c.handle_survivor_set(&set).unwrap()).collect();
    // A malicious server now claims client 4 survived (to get its self-mask shares) while
    // the honest clients signed a set without it (for which they reveal its mask key).
    let mut lying = set.clone();
    lying.survivors.push(ClientId(4));
    lying.aggregator_signature = sign_as_aggregator(SurvivorSet::aggregator_transcript(&h.cfg.digest(), set.round, &lying.survivors).as_bytes());
    let request = |survivors: &[ClientId], signatures: &[ConsistencySignature]| {
        let mut r = UnmaskRequest { round: set.round, survivors: survivors.to_vec(), signatures: signatures.to_vec(), aggregator_signature: [0; 64] };
        r.aggregator_signature = sign_as_aggregator(r.transcript(&h.cfg.digest()).as_bytes());
        r
    };
    assert_eq!(
        h.clients[0].handle_survivor_set(&lying).unwrap_err(),
        Error::Protocol(ProtocolError::ClientOutOfOrder { state: "awaiting unmask request", got: "a survivor set" })
    );
    let honest_req = request(&set.survivors, &sigs);
    let revealed = h.clients[0].handle_unmask_request(&honest_req).unwrap();
    assert!(revealed.mask_key_shares.iter().any(|r| r.of == ClientId(4)));
    assert!(revealed.self_mask_shares.iter().all(|r| r.of != ClientId(4)));
    // The same request again (a retransmission) gives the same shares and nothing more.
    assert_eq!(h.clients[0].handle_unmask_request(&honest_req).unwrap(), revealed);
    let lying_req = request(&lying.survivors, &sigs);
    assert_eq!(h.clients[0].handle_unmask_request(&lying_req).unwrap_err(), Error::Protocol(ProtocolError::ConflictingSurvivorSet));
    // After a lie the client is out of the round: not even the honest request is answered.
    assert!(matches!(h.clients[0].handle_unmask_request(&honest_req).unwrap_err(), Error::Protocol(ProtocolError::ClientAborted(_))));
    // Without t valid signatures over the set, nothing is revealed.
    let unsigned = request(&set.survivors, &sigs[..2]);
    assert!(matches!(
        h.clients[1].handle_unmask_request(&unsigned).unwrap_err(),
        Error::Protocol(ProtocolError::TooFewConsistencySignatures { threshold: 3, valid: 2 })
    ));
    let _ = (&h.cfg, &mut h.rng);
}

#[test]
fn aggregator_rejects_replay_wrong_round_wrong_phase_and_forgery() {
    let (mut h, set) = up_to_survivor_set(4, &[]);
    let sig = h.clients[0].handle_survivor_set(&set).unwrap();
    h.agg.handle_consistency(sig.clone()).unwrap();
    // A byte-identical retransmission is recognised; a different message is equivocation.
    assert_eq!(h.agg.handle_consistency(sig.clone()).unwrap_err(), Error::Protocol(ProtocolError::AlreadyAccepted(ClientId(0))));
    let mut equivocation = sig.clone();
    equivocation.signature[5] ^= 1;
    assert_eq!(h.agg.handle_consistency(equivocation).unwrap_err(), Error::Protocol(ProtocolError::Duplicate(ClientId(0))));
    let mut other_round = sig.clone();
    other_round.round += 1;
    assert!(matches!(h.agg.handle_consistency(other_round).unwrap_err(), Error::Protocol(ProtocolError::WrongRound { .. })));
    let mut forged = h.clients[1].handle_survivor_set(&set).unwrap();
    forged.signature[0] ^= 1;
    assert_eq!(h.agg.handle_consistency(forged).unwrap_err(), Error::Protocol(ProtocolError::BadSignature(ClientId(1))));
    let mut stranger = sig.clone();
    stranger.client = ClientId(99);
    assert_eq!(h.agg.handle_consistency(stranger).unwrap_err(), Error::Protocol(ProtocolError::UnknownClient(ClientId(99))));
    // A replayed advertisement is recognised as such; one with other content is equivocation.
    assert_eq!(h.agg.handle_advertise(h.clients[2].advertise(vec![])).unwrap_err(), Error::Protocol(ProtocolError::AlreadyAccepted(ClientId(2))));
    assert_eq!(h.agg.handle_advertise(h.clients[2].advertise(vec![1])).unwrap_err(), Error::Protocol(ProtocolError::Duplicate(ClientId(2))));
    // A message of a later phase is refused with both phases named.
    let early = UnmaskShares { round: set.round, client: ClientId(0), self_mask_shares: vec![], mask_key_shares: vec![], signature: [0; 64] };
    assert_eq!(h.agg.handle_unmask(early).unwrap_err(), Error::Protocol(ProtocolError::WrongPhase { current: Phase::ConsistencyCheck, got: Phase::Unmasking }));
    // The round still completes after all the rejected messages.
    for c in &mut h.clients[1..] {
        h.agg.handle_consistency(c.handle_survivor_set(&set).unwrap()).unwrap();
    }
    h.agg.advance(Timestamp(u64::MAX / 2)).unwrap();
    let req = h.agg.unmask_request().unwrap();
    for c in &mut h.clients {
        h.agg.handle_unmask(c.handle_unmask_request(&req).unwrap()).unwrap();
    }
    h.agg.advance(Timestamp(u64::MAX / 2)).unwrap();
    let Some(Outcome::Sum(sum)) = h.agg.outcome() else { panic!("{:?}", h.agg.outcome()) };
    assert_eq!(sum.sum, vec![4, 8, 12, 16, 4]);
}

/// Three clients of a round with t = k = 2 over 4 values, advertised and with their keys
/// shared: the aggregator waits for masked inputs.
fn three_clients_with_shares(seed: u64) -> (Aggregator, Vec<Client>, RoundConfig) {
    clients_with_shares(4, 32, seed)
}

#[test]
fn tampered_masked_input_is_rejected_and_sum_unaffected() {
    let (mut agg, mut clients, _) = three_clients_with_shares(11);
    let mut masked: Vec<MaskedInput> =
        clients.iter_mut().enumerate().map(|(i, c)| c.handle_share_bundle(&agg.share_bundle(ClientId(i as u32)).unwrap(), [5; 5]).unwrap()).collect();
    let mut tampered = masked[0].clone();
    tampered.data[0] ^= 1;
    assert_eq!(agg.handle_masked_input(&tampered).unwrap_err(), Error::Protocol(ProtocolError::BadSignature(ClientId(0))));
    let mut short = masked[0].clone();
    short.data.pop();
    assert!(matches!(agg.handle_masked_input(&short).unwrap_err(), Error::Protocol(ProtocolError::WrongLength { .. })));
    for m in masked.drain(..) {
        agg.handle_masked_input(&m).unwrap();
    }
    assert_eq!(finish_round(&mut agg, &mut clients), vec![15; 5]);
}

/// The record-level privacy claim travels under the sender's signature: changed,
/// stripped or added by anyone else, the input is refused and the sum is unaffected; a
/// claim its sender did sign but that no honest ledger could produce is refused too.
#[test]
fn record_privacy_claims_are_signed_and_checked() {
    let (mut agg, mut clients, cfg) = three_clients_with_shares(13);
    let claim = RecordPrivacyClaim { epsilon: 4.0, delta: 1e-5, budget: 8.0, noise_multiplier: 1.0, sample_rate: 0.02, max_grad_norm: 1.0, steps: 50 };
    clients[0].set_record_privacy(claim).unwrap();
    // The client refuses to sign an incoherent claim, as the aggregator would refuse it.
    assert!(clients[1].set_record_privacy(RecordPrivacyClaim { epsilon: 9.0, ..claim }).is_err());
    let masked: Vec<MaskedInput> =
        clients.iter_mut().enumerate().map(|(i, c)| c.handle_share_bundle(&agg.share_bundle(ClientId(i as u32)).unwrap(), [5; 5]).unwrap()).collect();
    assert_eq!(masked[0].record_privacy, Some(claim));
    assert_eq!(masked[1].record_privacy, None);
    // Through the wire encoding, as the enclave receives it.
    let encoded = masked[0].encode();
    assert_eq!(MaskedInputView::parse(&encoded).unwrap().record_privacy, Some(claim));
    let bad_sig = |m: &MaskedInput| Error::Protocol(ProtocolError::BadSignature(m.client));
    let lowered = MaskedInput { record_privacy: Some(RecordPrivacyClaim { epsilon: 0.5, ..claim }), ..masked[0].clone() };
    assert_eq!(agg.handle_masked_input(&lowered).unwrap_err(), bad_sig(&lowered));
    let stripped = MaskedInput { record_privacy: None, ..masked[0].clone() };
    assert_eq!(agg.handle_masked_input(&stripped).unwrap_err(), bad_sig(&stripped));
    let added = MaskedInput { record_privacy: Some(claim), ..masked[1].clone() };
    assert_eq!(agg.handle_masked_input(&added).unwrap_err(), bad_sig(&added));
    // Signed by its sender, but below what its own run spends: refused, typed.
    let mut incoherent = MaskedInput { record_privacy: Some(RecordPrivacyClaim { epsilon: 0.01, ..claim }), ..masked[2].clone() };
    incoherent.signature = MessageSigner::sign(signer(2).as_ref(), incoherent.transcript(&cfg.digest()).as_bytes());
    match agg.handle_masked_input(&incoherent).unwrap_err() {
        Error::Malformed(m) => assert!(m.contains("less than this run alone spends"), "{m}"),
        other => panic!("{other:?}"),
    }
    for m in &masked {
        agg.handle_masked_input(m).unwrap();
    }
    assert_eq!(finish_round(&mut agg, &mut clients), vec![15; 5]);
}

#[test]
fn deadline_closes_a_phase_without_stragglers() {
    let cfg = config(4, 3, 3, 2, 2, 32);
    let mut rng = ChaCha20Rng::seed_from_u64(12);
    let mut agg = Aggregator::new(cfg.clone(), aggregator_signer(), Timestamp(1000)).unwrap();
    let clients: Vec<Client> =
        (0..4).map(|i| Client::new(cfg.clone(), ClientId(i), signer(i as usize), &trust(&agg, any_threshold()), &mut rng).unwrap()).collect();
    for c in &clients[..3] {
        agg.handle_advertise(c.advertise(vec![])).unwrap();
    }
    assert_eq!(agg.advance(Timestamp(1000 + cfg.phase_timeout_ms - 1)), None);
    assert_eq!(agg.poll_timeout(), Some(Timestamp(1000 + cfg.phase_timeout_ms)));
    let change = agg.advance(Timestamp(1000 + cfg.phase_timeout_ms)).unwrap();
    assert_eq!(change.to, Phase::ShareKeys);
    assert_eq!(change.responded.len(), 3);
    let _ = rng.gen::<u8>();
}

/// A neighbour that reveals a wrong (but validly signed) self-mask share cannot make the
/// aggregator release a wrong sum: the reconstruction fails its commitment and the round
/// aborts instead.
#[test]
fn lying_neighbour_aborts_instead_of_corrupting_the_sum() {
    let (mut h, set) = up_to_survivor_set(4, &[]);
    for c in &mut h.clients {
        h.agg.handle_consistency(c.handle_survivor_set(&set).unwrap()).unwrap();
    }
    h.agg.advance(Timestamp(u64::MAX / 2)).unwrap();
    let req = h.agg.unmask_request().unwrap();
    let digest = h.cfg.digest();
    for (i, c) in h.clients.iter_mut().enumerate() {
        let mut shares = c.handle_unmask_request(&req).unwrap();
        if i == 0 {
            shares.self_mask_shares[0].share.y[0] ^= 0x55;
            shares.signature = MessageSigner::sign(&*signer(0), shares.transcript(&digest).as_bytes());
        }
        h.agg.handle_unmask(shares).unwrap();
    }
    h.agg.advance(Timestamp(u64::MAX / 2 + 1)).unwrap();
    match h.agg.outcome() {
        Some(Outcome::Aborted { reason, .. }) => assert!(reason.contains("does not match its commitment"), "{reason}"),
        other => panic!("expected an abort, got {other:?}"),
    }
}

/// A cohort of a buffered federation (K = 4 of 5, at version 4, staleness at most 2):
/// key advertisement closes at the fourth institution, so a fifth that comes later is
/// refused and waits for the next cohort; each masked input names its base version under
/// its signature; a too-stale or unnamed base is refused with the numbers; and the
/// release is the exact staleness-weighted sum, each sender having weighed its update by
/// (1 + τ)^-a.
#[test]
fn a_buffered_cohort_closes_at_k_and_releases_the_staleness_weighted_sum() {
    use tessera_secagg::config::Cohort;
    use tessera_secagg::quantize::Quantizer;
    let mut cfg = config(5, 3, 4, 3, 6, 32);
    cfg.max_weight = 1000;
    cfg.cohort = Some(Cohort { version: 4, size: 4, max_staleness: 2, staleness_exponent: 0.5 });
    cfg.validate().unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(21);
    let mut agg = Aggregator::new(cfg.clone(), aggregator_signer(), Timestamp(0)).unwrap();
    let mut clients: Vec<Client> =
        (0..5).map(|i| Client::new(cfg.clone(), ClientId(i as u32), signer(i), &trust(&agg, any_threshold()), &mut rng).unwrap()).collect();
    for c in &clients[..3] {
        agg.handle_advertise(c.advertise(vec![])).unwrap();
        assert!(agg.advance(Timestamp(1)).is_none(), "fewer than K: the phase stays open");
    }
    agg.handle_advertise(clients[3].advertise(vec![])).unwrap();
    let closed = agg.advance(Timestamp(1)).expect("K advertised: the cohort goes on without waiting for the deadline");
    assert_eq!(closed.to, Phase::ShareKeys);
    let late = agg.handle_advertise(clients[4].advertise(vec![])).unwrap_err();
    assert!(matches!(late, Error::Protocol(ProtocolError::WrongPhase { .. })), "{late}");
    assert!(agg.key_directory(ClientId(4)).is_none(), "no view for a client outside U1");
    for c in &mut clients[..4] {
        let dir = agg.key_directory(c.id()).unwrap();
        agg.handle_share_keys(c.handle_key_directory(&dir, &mut rng).unwrap()).unwrap();
    }
    agg.advance(Timestamp(2)).unwrap();

    // The institutions trained from versions 4, 3, 2 and 4 (τ = 0, 1, 2, 0).
    let bases = [4u64, 3, 2, 4];
    let q = Quantizer::new(&cfg).unwrap();
    let updates: Vec<Vec<f32>> = (0..4).map(|i| (0..6).map(|j| 0.1 * (i as f32 + 1.0) - 0.05 * j as f32).collect()).collect();
    let mut weights = Vec::new();
    let mut inputs = Vec::new();
    let mut masked = Vec::new();
    for i in 0..4 {
        let tau = clients[i].set_base_version(bases[i]).unwrap();
        assert_eq!(tau, 4 - bases[i]);
        let w = (1000.0 * cfg.cohort.unwrap().staleness_weight(tau)).round() as u32;
        weights.push(w);
        let input = q.quantize(&updates[i], w, &mut rng).unwrap();
        let bundle = agg.share_bundle(ClientId(i as u32)).unwrap();
        masked.push(clients[i].handle_share_bundle(&bundle, input.as_slice()).unwrap());
        inputs.push(input);
    }
    assert_eq!(weights, vec![1000, 707, 577, 1000]);
    // The client refuses to name a base the aggregator would refuse, with the numbers.
    let err = clients[4].set_base_version(1).unwrap_err().to_string();
    assert!(err.contains("trained from version 1, 3 versions before this cohort's version 4") && err.contains("at most 2"), "{err}");
    assert!(clients[4].set_base_version(5).unwrap_err().to_string().contains("later than this cohort's version 4"));
    // A sender that signs a too-stale base itself is refused by the aggregator, and one that names none too.
    let resign = |m: &MaskedInput, base: Option<u64>| {
        let mut m = MaskedInput { base_version: base, ..m.clone() };
        m.signature = MessageSigner::sign(&*signer(2), m.transcript(&cfg.digest()).as_bytes());
        m
    };
    let stale = agg.handle_masked_input_encoded(&resign(&masked[2], Some(1)).encode()).unwrap_err();
    assert_eq!(stale, Error::Protocol(ProtocolError::TooStale { base: 1, version: 4, staleness: 3, max: 2 }));
    assert!(matches!(agg.handle_masked_input_encoded(&resign(&masked[2], None).encode()).unwrap_err(), Error::Protocol(ProtocolError::BaseVersion(_))));
    // Another base under the original signature does not verify.
    let swapped = MaskedInput { base_version: Some(4), ..masked[2].clone() };
    assert_eq!(agg.handle_masked_input_encoded(&swapped.encode()).unwrap_err(), Error::Protocol(ProtocolError::BadSignature(ClientId(2))));
    for m in &masked {
        agg.handle_masked_input_encoded(&m.encode()).unwrap();
    }
    agg.advance(Timestamp(3)).unwrap();
    let set = agg.survivor_set().unwrap();
    for c in &mut clients[..4] {
        agg.handle_consistency(c.handle_survivor_set(&set).unwrap()).unwrap();
    }
    agg.advance(Timestamp(4)).unwrap();
    let req = agg.unmask_request().unwrap();
    for c in &mut clients[..4] {
        agg.handle_unmask(c.handle_unmask_request(&req).unwrap()).unwrap();
    }
    agg.advance(Timestamp(5)).unwrap();
    let Some(Outcome::Sum(sum)) = agg.outcome().cloned() else { panic!("{:?}", agg.outcome()) };
    let all: Vec<ClientId> = (0..4).map(ClientId).collect();
    assert_eq!(sum.sum, exact_sum(&cfg, &inputs, &all));
    let mean = q.dequantize_sum(sum.sum, 4).unwrap();
    assert_eq!(mean.total_weight, 1000 + 707 + 577 + 1000);
    let bound = q.mean_error_bound(4, mean.total_weight) as f32;
    for (j, got) in mean.mean.iter().enumerate() {
        let want = weights.iter().zip(&updates).map(|(&w, u)| w as f32 * u[j]).sum::<f32>() / mean.total_weight as f32;
        assert!((got - want).abs() <= bound + 1e-6, "coordinate {j}: {got} vs {want}");
    }
}

/// A synchronous round refuses a base version, and a cohort's size and graph are checked.
#[test]
fn base_versions_belong_to_cohorts() {
    let cfg = config(3, 2, 2, 2, 4, 32);
    let mut rng = ChaCha20Rng::seed_from_u64(22);
    let agg = Aggregator::new(cfg.clone(), aggregator_signer(), Timestamp(0)).unwrap();
    let mut c = Client::new(cfg.clone(), ClientId(0), signer(0), &trust(&agg, any_threshold()), &mut rng).unwrap();
    assert!(c.set_base_version(0).unwrap_err().to_string().contains("this round is synchronous"));
    let mut buffered = cfg.clone();
    let cohort = tessera_secagg::config::Cohort { version: 0, size: 1, max_staleness: 0, staleness_exponent: 1.0 };
    buffered.cohort = Some(cohort);
    let err = buffered.validate().unwrap_err().to_string();
    assert!(err.contains("cohort.size must be in 3..=3") && err.contains("got 1"), "{err}");
    buffered.cohort = Some(tessera_secagg::config::Cohort { size: 3, ..cohort });
    buffered.validate().unwrap();
    let sparse = config(12, 8, 4, 3, 4, 32);
    let mut sparse_cohort = sparse.clone();
    sparse_cohort.cohort = Some(tessera_secagg::config::Cohort { size: 8, ..cohort });
    assert!(sparse_cohort.validate().unwrap_err().to_string().contains("complete graph"));
}

/// SecAgg+ views: each client is served its own and its neighbours' advertisements (and
/// U1's ids), and exactly the shares its neighbours dealt it: O(k) keys and shares per
/// client whatever n, with one client that never advertised.
#[test]
fn each_client_receives_exactly_its_neighbours_keys_and_shares() {
    let mut rng = ChaCha20Rng::seed_from_u64(17);
    let cfg = config(40, 21, 8, 5, 16, 32);
    let graph = CommunicationGraph::for_config(&cfg).unwrap();
    let mut agg = Aggregator::new(cfg.clone(), aggregator_signer(), Timestamp(0)).unwrap();
    let mut clients: Vec<Client> =
        (0..40).map(|i| Client::new(cfg.clone(), ClientId(i as u32), signer(i), &trust(&agg, any_threshold()), &mut rng).unwrap()).collect();
    let absent = ClientId(7);
    for c in clients.iter().filter(|c| c.id() != absent) {
        agg.handle_advertise(c.advertise(vec![])).unwrap();
    }
    agg.advance(Timestamp(1 << 40)).unwrap();
    assert!(agg.key_directory(absent).is_none());
    let u1: Vec<ClientId> = (0..40).map(ClientId).filter(|&c| c != absent).collect();
    for c in clients.iter_mut().filter(|c| c.id() != absent) {
        let me = c.id();
        let dir = agg.key_directory(me).unwrap();
        assert_eq!(dir.to, me);
        assert_eq!(dir.admitted, u1);
        let mut expected: Vec<ClientId> = graph.neighbours(me).iter().copied().filter(|&v| v != absent).collect();
        expected.push(me);
        expected.sort_unstable();
        assert_eq!(dir.advertised.iter().map(|a| a.client).collect::<Vec<_>>(), expected, "view of {me}");
        agg.handle_share_keys(c.handle_key_directory(&dir, &mut rng).unwrap()).unwrap();
    }
    agg.advance(Timestamp(1 << 41)).unwrap();
    for c in clients.iter().filter(|c| c.id() != absent) {
        let bundle = agg.share_bundle(c.id()).unwrap();
        let from: Vec<ClientId> = bundle.shares.iter().map(|s| s.from).collect();
        let expected: Vec<ClientId> = graph.neighbours(c.id()).iter().copied().filter(|&v| v != absent).collect();
        assert_eq!(from, expected, "shares forwarded to {}", c.id());
    }
}
