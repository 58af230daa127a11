//! The enclave end to end in memory: admission by evidence, release of the weighted
//! mean, and rebuilding a round from stored events after a "crash".

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tessera_attestation::dev::DevAttester;
use tessera_attestation::policy::{NodePolicy, PolicyFailure};
use tessera_attestation::Attester;
use tessera_enclave::{Enclave, EnclaveError, MessageKind, SealingKey, StoredEvent};
use tessera_secagg::aggregator::{Outcome, Phase};
use tessera_secagg::client::{Client, Trust};
use tessera_secagg::crypto::MessageSigner;
use tessera_secagg::floors::SecurityFloors;
use tessera_secagg::quantize::Quantizer;
use tessera_secagg::{ClientId, RoundConfig, Timestamp};

fn signer(i: usize) -> Arc<ring::signature::Ed25519KeyPair> {
    Arc::new(ring::signature::Ed25519KeyPair::from_seed_unchecked(&[i as u8 + 1; 32]).unwrap())
}

fn config(n: usize) -> RoundConfig {
    let roster = (0..n).map(|i| hex::encode(signer(i).public_key())).collect();
    let mut cfg = RoundConfig::with_defaults(1, roster, 6, [1; 32]);
    // A strict majority, as the institutions' default floors require.
    cfg.min_survivors = (n / 2 + 1) as u32;
    cfg.max_weight = 1000;
    cfg
}

fn trust(e: &Enclave) -> Trust {
    Trust { aggregator_key: e.identity_public_key(), config_signature: e.config_signature().unwrap(), floors: SecurityFloors::default() }
}

/// The enclave of the machine whose sealing key is `key`: the first start makes its
/// identity, later starts unseal the same one (as the host's stored copy does).
fn enclave(key: [u8; 32]) -> Enclave {
    static IDENTITIES: std::sync::Mutex<Vec<([u8; 32], Vec<u8>)>> = std::sync::Mutex::new(Vec::new());
    let attester = Box::new(DevAttester::new([9; 32], [3; 48], false));
    let mut ids = IDENTITIES.lock().unwrap();
    let known = ids.iter().find(|(k, _)| *k == key).map(|(_, s)| s.clone());
    let (e, sealed) = Enclave::start(SealingKey::from_bytes(key), known.as_deref(), attester, NodePolicy::insecure_dev()).unwrap();
    if known.is_none() {
        ids.push((key, sealed));
    }
    e
}

/// Runs a round with `n` clients where the listed clients never send a masked input.
/// Returns the enclave, the stored events, and the plaintext updates with weights.
/// Plaintext updates with their FedAvg weights.
type Updates = Vec<(Vec<f32>, u32)>;

fn run(n: usize, drop: &[usize]) -> (Enclave, Vec<StoredEvent>, Updates) {
    run_with(n, drop, |_, _| {})
}

/// [`run`], with `tamper` applied to each client's quantized input (its index and the
/// words, weight last) before it is masked: a malicious roster member's input.
fn run_with(n: usize, drop: &[usize], tamper: impl Fn(usize, &mut Vec<u32>)) -> (Enclave, Vec<StoredEvent>, Updates) {
    let cfg = config(n);
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let mut e = enclave([1; 32]);
    let mut log = Vec::new();
    let mut now = Timestamp(1_700_000_000_000);
    e.open_round(cfg.clone(), now).unwrap();
    let mut clients: Vec<Client> = (0..n).map(|i| Client::new(cfg.clone(), ClientId(i as u32), signer(i), &trust(&e), &mut rng).unwrap()).collect();
    let updates: Updates = (0..n).map(|i| ((0..6).map(|j| (i as f32 - j as f32) / 10.0).collect(), 10 + i as u32 * 5)).collect();
    let q = Quantizer::new(&cfg).unwrap();
    let feed = |e: &mut Enclave, log: &mut Vec<StoredEvent>, kind, body: Vec<u8>, now| {
        e.handle_message(kind, &body, now).unwrap();
        log.push(StoredEvent::Message { kind, received_at: now, body });
    };
    let step = |e: &mut Enclave, log: &mut Vec<StoredEvent>, now: &mut Timestamp| {
        *now = now.saturating_add_ms(cfg.phase_timeout_ms);
        let t = e.advance(*now).unwrap().expect("phase closes");
        log.push(StoredEvent::Sealed { seq: t.seq, sealed: t.sealed });
    };
    for c in &clients {
        let ev = DevAttester::new([i_seed(c.id()); 32], [3; 48], false).attest(&c.key_binding(), now.0 / 1000).unwrap();
        feed(&mut e, &mut log, MessageKind::Advertise, serde_json::to_vec(&c.advertise(ev)).unwrap(), now);
    }
    step(&mut e, &mut log, &mut now);
    for c in &mut clients {
        let dir = e.aggregator().unwrap().key_directory(c.id()).unwrap();
        let m = c.handle_key_directory(&dir, &mut rng).unwrap();
        feed(&mut e, &mut log, MessageKind::ShareKeys, serde_json::to_vec(&m).unwrap(), now);
    }
    step(&mut e, &mut log, &mut now);
    for (i, c) in clients.iter_mut().enumerate() {
        let bundle = e.aggregator().unwrap().share_bundle(c.id()).unwrap();
        let mut input = q.quantize(&updates[i].0, updates[i].1, &mut rng).unwrap();
        tamper(i, &mut input);
        let m = c.handle_share_bundle(&bundle, input.as_slice()).unwrap();
        if !drop.contains(&i) {
            feed(&mut e, &mut log, MessageKind::MaskedInput, m.encode(), now);
        }
    }
    step(&mut e, &mut log, &mut now);
    let set = e.aggregator().unwrap().survivor_set().unwrap();
    for c in clients.iter_mut().filter(|c| set.survivors.contains(&c.id())) {
        let m = c.handle_survivor_set(&set).unwrap();
        feed(&mut e, &mut log, MessageKind::Consistency, serde_json::to_vec(&m).unwrap(), now);
    }
    step(&mut e, &mut log, &mut now);
    let req = e.aggregator().unwrap().unmask_request().unwrap();
    for c in clients.iter_mut().filter(|c| set.survivors.contains(&c.id())) {
        let m = c.handle_unmask_request(&req).unwrap();
        feed(&mut e, &mut log, MessageKind::Unmask, serde_json::to_vec(&m).unwrap(), now);
    }
    step(&mut e, &mut log, &mut now);
    (e, log, updates)
}

fn i_seed(id: ClientId) -> u8 {
    100 + id.0 as u8
}

#[test]
fn release_is_the_signed_weighted_mean_of_survivors() {
    let (e, _, updates) = run(6, &[2]);
    let r = e.release().expect("released");
    assert_eq!(r.included.len(), 5);
    assert!(r.verify(&e.identity_public_key()));
    let total: u32 = updates.iter().enumerate().filter(|(i, _)| *i != 2).map(|(_, u)| u.1).sum();
    assert_eq!(r.total_weight, total as u64);
    for j in 0..6 {
        let want: f32 = updates.iter().enumerate().filter(|(i, _)| *i != 2).map(|(_, u)| u.0[j] * u.1 as f32).sum::<f32>() / total as f32;
        assert!((r.mean[j] - want).abs() as f64 <= r.error_bound + 1e-6, "coord {j}: {} vs {want}", r.mean[j]);
    }
    let mut forged = r.clone();
    std::sync::Arc::make_mut(&mut forged.mean)[0] += 1.0;
    assert!(!forged.verify(&e.identity_public_key()));
}

/// A roster member that picks its weight word so that the total weight is zero modulo
/// the modulus cannot leave the round finished without a release (stuck, every later
/// step an error): the enclave aborts it, logs why, releases nothing, and a replay of the
/// stored events ends the same way.
#[test]
fn a_total_weight_of_zero_aborts_the_round() {
    let n = 5;
    let modulus = config(n).modulus_mask();
    let others: u32 = (0..n - 1).map(|i| 10 + i as u32 * 5).sum();
    let (mut e, log, _) = run_with(n, &[], |i, input| {
        if i == n - 1 {
            *input.last_mut().unwrap() = 0u32.wrapping_sub(others) & modulus;
        }
    });
    assert!(e.release().is_none());
    assert_eq!(e.phase(), Some(Phase::Aborted));
    let Some(Outcome::Aborted { reason, .. }) = e.outcome() else { panic!("{:?}", e.outcome()) };
    assert!(reason.contains("total weight of the sum is zero"), "{reason}");
    let entries = e.take_log_entries();
    assert!(entries.iter().any(|l| String::from_utf8_lossy(&l.data).contains("\"aborted\"")), "the log names the abort");
    let mut fresh = enclave([1; 32]);
    fresh.restore_round(config(n), Timestamp(1_700_000_000_000), &log).unwrap();
    assert_eq!(fresh.phase(), Some(Phase::Aborted));
    assert!(fresh.release().is_none());
}

#[test]
fn replay_after_crash_rebuilds_the_same_round() {
    let (e, log, _) = run(5, &[]);
    let want = e.release().unwrap().clone();
    // Replay every prefix: each must restore cleanly, and the full log reproduces the result.
    for cut in 0..=log.len() {
        let mut fresh = enclave([1; 32]);
        fresh.restore_round(config(5), Timestamp(1_700_000_000_000), &log[..cut]).unwrap();
        if cut == log.len() {
            assert_eq!(fresh.phase(), Some(Phase::Finished));
            let got = fresh.release().unwrap();
            assert_eq!(got.mean, want.mean);
            assert_eq!(got.included, want.included);
        }
    }
    // Under another sealing key the records do not unseal.
    let mut other = enclave([2; 32]);
    assert!(matches!(other.restore_round(config(5), Timestamp(1_700_000_000_000), &log), Err(EnclaveError::Unseal(_))));
    // Dropping a stored masked input makes the replay disagree with the sealed record.
    let pos = log.iter().position(|ev| matches!(ev, StoredEvent::Message { kind: MessageKind::MaskedInput, .. })).unwrap();
    let mut rolled_back = log.clone();
    rolled_back.remove(pos);
    let mut fresh = enclave([1; 32]);
    assert!(matches!(fresh.restore_round(config(5), Timestamp(1_700_000_000_000), &rolled_back), Err(EnclaveError::ReplayMismatch { .. })));
}

/// A masked input the host stored in a file (a spooled upload, or parts read back from
/// the store) replays through the streamed fold exactly as the received bytes do: same
/// release, same log. A file whose bytes changed on disk fails the restore for the
/// sender's signature, before any phase record is checked; a preverified spooled upload is
/// checked the same way before the round's lock.
#[test]
fn masked_inputs_replayed_from_files_rebuild_the_same_round() {
    use std::os::unix::fs::FileExt;
    let (e, log, _) = run(5, &[]);
    let want = e.release().unwrap().clone();
    // As a restore reads them back: every input in one file, each at its offset.
    let file = std::sync::Arc::new(tempfile::tempfile().unwrap());
    let mut end = 0u64;
    let mut to_file = |body: &[u8]| {
        file.write_all_at(body, end).unwrap();
        end += body.len() as u64;
        tessera_enclave::spool::SpooledInput::part(file.clone(), end - body.len() as u64, body.len() as u64)
    };
    let spooled: Vec<StoredEvent> = log
        .iter()
        .map(|ev| match ev {
            StoredEvent::Message { kind: MessageKind::MaskedInput, received_at, body } => {
                StoredEvent::MaskedInputFile { received_at: *received_at, input: to_file(body) }
            }
            other => other.clone(),
        })
        .collect();
    let mut fresh = enclave([1; 32]);
    fresh.restore_round(config(5), Timestamp(1_700_000_000_000), &spooled).unwrap();
    assert_eq!(fresh.phase(), Some(Phase::Finished));
    let got = fresh.release().unwrap();
    assert_eq!((&got.mean, &got.included), (&want.mean, &want.included));
    assert_eq!(fresh.log().root(), e.log().root(), "the replay logs what the original round logged");

    // The preverification of a spooled upload accepts the genuine input and refuses a
    // flipped byte in the body for its signature.
    let (cfg, digest) = (config(5), e.aggregator().unwrap().config_digest());
    let (at, input) = spooled
        .iter()
        .enumerate()
        .find_map(|(i, ev)| if let StoredEvent::MaskedInputFile { input, .. } = ev { Some((i, input.clone())) } else { None })
        .unwrap();
    tessera_enclave::preverify_masked_file(&cfg, &digest, &input, 2).unwrap();
    let mut last = [0u8; 3];
    input.read_exact_at(&mut last, input.len() - 3).unwrap();
    last[0] ^= 0x40;
    // The first input was written first: it starts at byte 0 of the shared file.
    file.write_all_at(&last, input.len() - 3).unwrap();
    let bad =
        |r: Result<(), EnclaveError>| matches!(r, Err(EnclaveError::Protocol(tessera_secagg::Error::Protocol(tessera_secagg::ProtocolError::BadSignature(_)))));
    assert!(bad(tessera_enclave::preverify_masked_file(&cfg, &digest, &input, 2)));
    // The stored file changed on disk: the restore fails for the signature it no longer carries.
    let mut fresh = enclave([1; 32]);
    let r = fresh.restore_round(config(5), Timestamp(1_700_000_000_000), &spooled[..=at]);
    let shown = format!("{r:?}");
    assert!(bad(r), "{shown}");
}

#[test]
fn sealed_records_are_bound_to_the_round_configuration() {
    let (_, log, _) = run(5, &[]);
    // The host moves the round's sealed phase records under another configuration (the
    // same round number, other parameters): they no longer unseal, so a record cannot
    // vouch for a round it was not sealed in.
    let sealed: Vec<StoredEvent> = log.iter().filter(|ev| matches!(ev, StoredEvent::Sealed { .. })).cloned().collect();
    assert!(!sealed.is_empty());
    let mut other_cfg = config(5);
    other_cfg.phase_timeout_ms += 1;
    let mut fresh = enclave([1; 32]);
    assert!(matches!(fresh.restore_round(other_cfg, Timestamp(1_700_000_000_000), &sealed), Err(EnclaveError::Unseal("phase record"))));
    // The same machine (sealing key) under a new enclave identity: refused as well.
    let attester = Box::new(DevAttester::new([9; 32], [3; 48], false));
    let (mut reborn, _) = Enclave::start(SealingKey::from_bytes([1; 32]), None, attester, NodePolicy::insecure_dev()).unwrap();
    assert!(matches!(reborn.restore_round(config(5), Timestamp(1_700_000_000_000), &sealed), Err(EnclaveError::Unseal("phase record"))));
    // Under its own configuration the first record unseals (and then disagrees with a
    // replay that holds no messages): the refusal above is the binding, not the key.
    let mut fresh = enclave([1; 32]);
    assert!(matches!(fresh.restore_round(config(5), Timestamp(1_700_000_000_000), &sealed), Err(EnclaveError::ReplayMismatch { .. })));
}

#[test]
fn admission_refuses_missing_replayed_and_debug_evidence() {
    let cfg = config(4);
    let mut rng = ChaCha20Rng::seed_from_u64(8);
    let mut e = enclave([1; 32]);
    let now = Timestamp(1_700_000_000_000);
    e.open_round(cfg.clone(), now).unwrap();
    let clients: Vec<Client> = (0..4).map(|i| Client::new(cfg.clone(), ClientId(i), signer(i as usize), &trust(&e), &mut rng).unwrap()).collect();
    let secs = now.0 / 1000;
    let reasons = |r: Result<_, EnclaveError>| match r {
        Err(EnclaveError::NotAdmitted { verdict, .. }) => verdict.failures,
        other => panic!("expected a refusal, got {other:?}"),
    };
    // No evidence.
    assert_eq!(reasons(e.handle_advertise(clients[0].advertise(vec![]), now)), vec![PolicyFailure::MissingEvidence]);
    // Evidence bound to another client's keys (replayed).
    let other = DevAttester::new([1; 32], [3; 48], false).attest(&clients[1].key_binding(), secs).unwrap();
    assert_eq!(reasons(e.handle_advertise(clients[2].advertise(other), now)), vec![PolicyFailure::ReportDataMismatch]);
    // Debug-mode evidence.
    let debug = DevAttester::new([1; 32], [3; 48], true).attest(&clients[3].key_binding(), secs).unwrap();
    assert_eq!(reasons(e.handle_advertise(clients[3].advertise(debug), now)), vec![PolicyFailure::DebugMode]);
    // Good evidence is admitted; the rejected ones are recorded with their reasons.
    let good = DevAttester::new([1; 32], [3; 48], false).attest(&clients[1].key_binding(), secs).unwrap();
    assert!(e.handle_advertise(clients[1].advertise(good), now).unwrap().accepted);
    assert_eq!(e.verdicts().unwrap().len(), 4);
    // Only one client admitted: with t = 3 the round cannot start.
    let t = e.advance(now.saturating_add_ms(cfg.phase_timeout_ms)).unwrap().unwrap();
    assert_eq!(t.change.to, Phase::Aborted);
    assert!(e.release().is_none());
}

#[test]
fn sealed_identity_survives_restart_and_rejects_other_keys() {
    let attester = || Box::new(DevAttester::new([9; 32], [3; 48], false)) as Box<dyn Attester>;
    let (a, sealed) = Enclave::start(SealingKey::from_bytes([1; 32]), None, attester(), NodePolicy::default()).unwrap();
    let (b, _) = Enclave::start(SealingKey::from_bytes([1; 32]), Some(&sealed), attester(), NodePolicy::default()).unwrap();
    assert_eq!(a.identity_public_key(), b.identity_public_key());
    assert!(Enclave::start(SealingKey::from_bytes([2; 32]), Some(&sealed), attester(), NodePolicy::default()).is_err());
}

/// Tree heads of the round log are signed with the enclave's identity key, the one its
/// evidence binds, and verify with it after a restart from the sealed identity.
#[test]
fn tree_heads_are_signed_by_the_identity_key() {
    use tessera_attestation::translog::{leaf_hash, root_of, HeadError};
    let e = enclave([5; 32]);
    let root = root_of(&[leaf_hash(b"round 1 opened"), leaf_hash(b"client 0 admitted")]);
    let head = e.sign_tree_head(2, &root, 1_700_000_000_000);
    head.verify(&e.identity_public_key()).unwrap();
    let other = enclave([6; 32]);
    assert_eq!(head.verify(&other.identity_public_key()), Err(HeadError::BadSignature));
}

/// The stateless checks the server runs before it takes the round's lock: every honest
/// message of a round passes; a forged signature, another round, a sender outside the
/// roster and a masked input of the wrong length are refused, each by name.
#[test]
fn preverify_passes_honest_messages_and_refuses_forgeries_without_state() {
    use tessera_enclave::preverify;
    use tessera_secagg::{Error, ProtocolError};
    let (_, log, _) = run(5, &[]);
    let cfg = config(5);
    let digest = cfg.digest();
    let messages: Vec<(MessageKind, Vec<u8>)> =
        log.iter().filter_map(|ev| if let StoredEvent::Message { kind, body, .. } = ev { Some((*kind, body.clone())) } else { None }).collect();
    assert!(messages.len() >= 20);
    for (kind, body) in &messages {
        preverify(&cfg, &digest, *kind, body).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
    }
    let protocol = |r: Result<tessera_enclave::Preverified, EnclaveError>| match r {
        Err(EnclaveError::Protocol(Error::Protocol(p))) => p,
        other => panic!("expected a protocol refusal, got {other:?}"),
    };
    let (_, advert) = messages.iter().find(|(k, _)| *k == MessageKind::Advertise).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(advert).unwrap();
    let sig = v["signature"].as_str().unwrap().to_string();
    v["signature"] = serde_json::Value::String(format!("{}{}", if sig.starts_with('0') { "1" } else { "0" }, &sig[1..]));
    assert!(matches!(protocol(preverify(&cfg, &digest, MessageKind::Advertise, &serde_json::to_vec(&v).unwrap())), ProtocolError::BadSignature(_)));
    let mut v: serde_json::Value = serde_json::from_slice(advert).unwrap();
    v["client"] = serde_json::json!(9);
    assert!(matches!(protocol(preverify(&cfg, &digest, MessageKind::Advertise, &serde_json::to_vec(&v).unwrap())), ProtocolError::UnknownClient(ClientId(9))));
    let mut v: serde_json::Value = serde_json::from_slice(advert).unwrap();
    v["round"] = serde_json::json!(7);
    assert!(matches!(protocol(preverify(&cfg, &digest, MessageKind::Advertise, &serde_json::to_vec(&v).unwrap())), ProtocolError::WrongRound { got: 7, .. }));
    // Another configuration (digest) than the round's: the signature no longer verifies.
    assert!(matches!(protocol(preverify(&cfg, &[0; 32], MessageKind::Advertise, advert)), ProtocolError::BadSignature(_)));
    // A masked input with one word too few is refused before its body is hashed; one
    // with a flipped data byte fails its signature.
    let (_, masked) = messages.iter().find(|(k, _)| *k == MessageKind::MaskedInput).unwrap();
    assert!(matches!(preverify(&cfg, &digest, MessageKind::MaskedInput, &masked[..masked.len() - 4]), Err(EnclaveError::Protocol(_))));
    let mut flipped = masked.clone();
    *flipped.last_mut().unwrap() ^= 1;
    assert!(matches!(protocol(preverify(&cfg, &digest, MessageKind::MaskedInput, &flipped)), ProtocolError::BadSignature(_)));
    // Garbage is malformed.
    assert!(matches!(preverify(&cfg, &digest, MessageKind::Unmask, b"{not json"), Err(EnclaveError::Protocol(Error::Malformed(_)))));
}

/// The host proposes a cohort's global version; the enclave opens the cohort only at the
/// number of releases its own log holds, so a stale update cannot be passed off as fresh
/// (a lower version) nor fresh ones refused as stale (a higher one).
#[test]
fn a_cohort_opens_only_at_the_version_the_log_counts() {
    let (mut e, _, _) = run(6, &[]);
    assert!(e.release().is_some(), "one release in the log");
    let mut cfg = config(6);
    cfg.round = 2;
    cfg.neighbours = 5;
    cfg.share_threshold = 3;
    cfg.min_survivors = 4;
    for (version, ok) in [(0, false), (2, false), (1, true)] {
        cfg.cohort = Some(tessera_secagg::config::Cohort { version, size: 4, max_staleness: 2, staleness_exponent: 0.5 });
        match e.open_round(cfg.clone(), Timestamp(1_700_000_100_000)) {
            Ok(()) => assert!(ok, "version {version} was accepted"),
            Err(err) => {
                assert!(!ok, "version {version}: {err}");
                assert!(err.to_string().contains(&format!("global version is {version}, but the log holds 1 releases")), "{err}");
            }
        }
    }
}
