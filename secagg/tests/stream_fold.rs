//! The aggregator's streamed fold (`Aggregator::handle_masked_input_stream`): a masked
//! input read from a source in arbitrary pieces folds to the same sum as the whole body,
//! a refused one leaves the sum as it was, and a source that changes between the fold
//! and its undo aborts the round instead of releasing a wrong sum.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Cursor, Read, Seek, SeekFrom};

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tessera_secagg::aggregator::{Aggregator, Outcome, Phase};
use tessera_secagg::client::Client;
use tessera_secagg::wire::*;
use tessera_secagg::{ClientId, Error, ProtocolError, RoundConfig};

mod common;
use common::*;

/// Each client's input (m + 1 values within the modulus, small enough that three never wrap)
/// and its masked encoding.
fn masked_inputs(agg: &Aggregator, clients: &mut [Client], cfg: &RoundConfig, seed: u64) -> (Vec<Vec<u32>>, Vec<Vec<u8>>) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed ^ 0x5eed);
    let top = cfg.modulus_mask() / 3;
    let inputs: Vec<Vec<u32>> = (0..3).map(|_| (0..cfg.masked_len()).map(|_| rng.gen_range(0..=top)).collect()).collect();
    let encoded = clients
        .iter_mut()
        .enumerate()
        .map(|(i, c)| c.handle_share_bundle(&agg.share_bundle(ClientId(i as u32)).unwrap(), inputs[i].as_slice()).unwrap().encode())
        .collect();
    (inputs, encoded)
}

fn exact_sum(cfg: &RoundConfig, inputs: &[Vec<u32>]) -> Vec<u32> {
    (0..cfg.masked_len()).map(|j| inputs.iter().fold(0u32, |s, v| s.wrapping_add(v[j])) & cfg.modulus_mask()).collect()
}

/// A source that hands out at most a few bytes per read (sizes drawn from a seed); once
/// `flip_after_rewinds` seeks have happened, it reads one byte wrong (XOR a mask); with
/// `ends_at`, after that many seeks it still states its full length, but its reads end
/// at that position.
struct Choppy {
    inner: Cursor<Vec<u8>>,
    rng: ChaCha20Rng,
    max_read: usize,
    rewinds: usize,
    flip_after_rewinds: Option<(usize, u64, u8)>,
    ends_at: Option<(usize, u64)>,
}

impl Choppy {
    fn new(bytes: Vec<u8>, seed: u64, max_read: usize) -> Self {
        Choppy { inner: Cursor::new(bytes), rng: ChaCha20Rng::seed_from_u64(seed), max_read, rewinds: 0, flip_after_rewinds: None, ends_at: None }
    }
}

impl Read for Choppy {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let at = self.inner.position();
        let left = match self.ends_at {
            Some((after, end)) if self.rewinds > after => end.saturating_sub(at) as usize,
            _ => usize::MAX,
        };
        let want = buf.len().min(self.rng.gen_range(1..=self.max_read)).min(left);
        let got = self.inner.read(&mut buf[..want])?;
        if let Some((after, pos, mask)) = self.flip_after_rewinds {
            if self.rewinds > after && (at..at + got as u64).contains(&pos) {
                buf[(pos - at) as usize] ^= mask;
            }
        }
        Ok(got)
    }
}

impl Seek for Choppy {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let at = self.inner.seek(to)?;
        self.rewinds += 1;
        Ok(at)
    }
}

/// Over widths whose groups of 8 elements do and do not divide a 1 MiB leaf, bodies of
/// one to three leaves, 1 to 3 threads and reads of arbitrary size: the streamed fold
/// releases exactly the sum the whole-body fold releases, which is the inputs' sum.
#[test]
fn streamed_inputs_fold_as_whole_bodies() {
    for (m, bits, threads, max_read, seed) in [
        (700_000u32, 32u8, 2usize, 1 << 20, 1u64),
        (700_000, 20, 1, 70_001, 2),
        (1_000_000, 24, 3, 333_333, 3),
        (450_000, 17, 2, 4_093, 4),
        (5, 32, 2, 3, 5),
        (13, 9, 1, 1, 6),
    ] {
        let (mut whole, mut clients, cfg) = clients_with_shares(m, bits, seed);
        let (inputs, encoded) = masked_inputs(&whole, &mut clients, &cfg, seed);
        for e in &encoded {
            whole.handle_masked_input_encoded(e).unwrap();
        }
        let want = finish_round(&mut whole, &mut clients);
        assert_eq!(want, exact_sum(&cfg, &inputs));

        // The same round again: the same seed gives the same clients and inputs.
        let (mut streamed, mut clients, _) = clients_with_shares(m, bits, seed);
        assert_eq!(masked_inputs(&streamed, &mut clients, &cfg, seed).1, encoded);
        streamed.set_threads(threads);
        for (i, e) in encoded.iter().enumerate() {
            let (header, digest) = streamed.handle_masked_input_stream(&mut Choppy::new(e.clone(), seed + i as u64, max_read)).unwrap();
            let view = MaskedInputView::parse(e).unwrap();
            assert_eq!((header.client, header.signature, header.count, digest), (ClientId(i as u32), view.signature, view.len(), view.data_digest()));
            // The digest alone, read the same way, is the one the signature covers.
            let mut src = Choppy::new(e.clone(), seed ^ 7, max_read);
            let (h, prefix, total) = tessera_secagg::wire::MaskedInputHeader::read_from(&mut src).unwrap();
            assert_eq!(tessera_secagg::aggregator::masked_body_digest(&mut src, &h, &prefix, total, threads).unwrap(), digest);
        }
        assert_eq!(finish_round(&mut streamed, &mut clients), want, "m = {m}, {bits} bits, {threads} threads");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Small rounds of every width and length, with reads of any size.
    #[test]
    fn any_split_of_a_small_input_folds_the_same(m in 1u32..200, bits in 8u8..=32, max_read in 1usize..64, seed in any::<u64>()) {
        let (mut whole, mut clients, cfg) = clients_with_shares(m, bits, seed);
        let (inputs, encoded) = masked_inputs(&whole, &mut clients, &cfg, seed);
        for e in &encoded {
            whole.handle_masked_input_encoded(e).unwrap();
        }
        let want = finish_round(&mut whole, &mut clients);
        prop_assert_eq!(&want, &exact_sum(&cfg, &inputs));
        let (mut streamed, mut clients, _) = clients_with_shares(m, bits, seed);
        prop_assert_eq!(&masked_inputs(&streamed, &mut clients, &cfg, seed).1, &encoded);
        for (i, e) in encoded.iter().enumerate() {
            streamed.handle_masked_input_stream(&mut Choppy::new(e.clone(), seed ^ i as u64, max_read)).unwrap();
        }
        prop_assert_eq!(finish_round(&mut streamed, &mut clients), want);
    }
}

/// A refused input (tampered body, bad signature; a signed but incoherent claim) is
/// undone after it was folded: the round then releases exactly the honest inputs' sum.
/// Malformed inputs are refused with the whole-body path's error, before anything is
/// folded.
#[test]
fn a_refused_streamed_input_leaves_the_sum_as_it_was() {
    let (m, bits, seed) = (1_300_000u32, 20u8, 7u64);
    let (mut agg, mut clients, cfg) = clients_with_shares(m, bits, seed);
    // One leaf per batch: the undo reads several batches.
    agg.set_threads(1);
    let (inputs, encoded) = masked_inputs(&agg, &mut clients, &cfg, seed);
    // A source that states its length but, once its padding was checked (four seeks),
    // ends in the third of its four leaves: the leaves before it were folded (with a
    // group left open across their boundary) and are undone.
    let mut short = Choppy::new(encoded[0].clone(), 3, 1 << 20);
    short.ends_at = Some((3, (encoded[0].len() - (1 << 20) - 5000) as u64));
    let err = agg.handle_masked_input_stream(&mut short).unwrap_err().to_string();
    assert!(err.contains("ended early"), "{err}");
    // Padding that changes between its check and the last leaf's read: refused after
    // everything but the last elements was folded, and undone.
    let mut late = Choppy::new(encoded[1].clone(), 4, 1 << 20);
    late.flip_after_rewinds = Some((3, encoded[1].len() as u64 - 1, 0x80));
    let err = agg.handle_masked_input_stream(&mut late).unwrap_err().to_string();
    assert!(err.contains("padding bits"), "{err}");
    // A byte of the second leaf flipped: folded, then refused and undone.
    let mut tampered = encoded[0].clone();
    let at = tampered.len() - 1000;
    tampered[at] ^= 1;
    assert_eq!(agg.handle_masked_input_stream(&mut Choppy::new(tampered, 1, 100_000)).unwrap_err(), Error::Protocol(ProtocolError::BadSignature(ClientId(0))));
    // Malformed: the same refusal as the whole-body path, for a truncated body, an extra
    // byte, a bad header and nonzero padding bits.
    let mut extra = encoded[1].clone();
    extra.push(0);
    let mut bad_magic = encoded[1].clone();
    bad_magic[0] = b'X';
    let mut padding = encoded[1].clone();
    *padding.last_mut().unwrap() |= 0x80;
    for bad in [encoded[1][..encoded[1].len() - 1].to_vec(), extra, bad_magic, padding, encoded[1][..40].to_vec(), Vec::new()] {
        let (streamed, whole) =
            (agg.handle_masked_input_stream(&mut Cursor::new(bad.clone())).unwrap_err(), agg.handle_masked_input_encoded(&bad).unwrap_err());
        assert_eq!(streamed, whole);
    }
    for e in &encoded {
        agg.handle_masked_input_stream(&mut Cursor::new(e.clone())).unwrap();
    }
    // A retransmission is refused as one, before its body is read.
    assert_eq!(agg.handle_masked_input_stream(&mut Cursor::new(encoded[2].clone())).unwrap_err(), Error::Protocol(ProtocolError::AlreadyAccepted(ClientId(2))));
    // A header that declares far more elements than the round has: the whole-body path's
    // refusal, nothing allocated for it.
    let mut long = encoded[2].clone();
    long.resize(long.len() + 4096, 0);
    let count = u32::from_le_bytes(long[17..21].try_into().unwrap()) + (4096 * 8 / u32::from(bits));
    long[17..21].copy_from_slice(&count.to_le_bytes());
    let mut fresh = clients_with_shares(m, bits, seed).0;
    assert_eq!(fresh.handle_masked_input_stream(&mut Cursor::new(long.clone())).unwrap_err(), fresh.handle_masked_input_encoded(&long).unwrap_err());
    assert_eq!(finish_round(&mut agg, &mut clients), exact_sum(&cfg, &inputs));
}

/// The undo reads the body again and checks every leaf against the hash taken when it
/// was folded: a source that serves other bytes the second time cannot make the undo
/// subtract them. The sum can then no longer be trusted, so the round is aborted.
#[test]
fn a_source_that_changes_before_the_undo_aborts_the_round() {
    let (m, bits, seed) = (800_000u32, 32u8, 8u64);
    let (mut agg, mut clients, cfg) = clients_with_shares(m, bits, seed);
    agg.set_threads(1);
    let (_, encoded) = masked_inputs(&agg, &mut clients, &cfg, seed);
    agg.handle_masked_input_stream(&mut Cursor::new(encoded[1].clone())).unwrap();
    let mut tampered = encoded[0].clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let mut source = Choppy::new(tampered, 2, 1 << 20);
    // Two seeks before the fold at 32 bits (to the end for the length, back to the
    // start), the undo's after it: from then on a byte of the third leaf reads wrong, so
    // the undo has subtracted two leaves when it finds out.
    source.flip_after_rewinds = Some((2, (2 << 20) + 300, 0x40));
    let err = agg.handle_masked_input_stream(&mut source).unwrap_err();
    assert!(matches!(&err, Error::Protocol(ProtocolError::Aborted(why)) if why.contains("bad signature") || why.contains("signature")), "{err}");
    assert_eq!(agg.phase(), Phase::Aborted);
    assert!(
        matches!(agg.outcome(), Some(Outcome::Aborted { reason, .. }) if reason.contains("could not be undone") && reason.contains("leaf 3")),
        "{:?}",
        agg.outcome()
    );
    // Nothing is released from it, and nothing more is accepted.
    assert!(agg.survivor_set().is_none());
    assert!(agg.handle_masked_input_stream(&mut Cursor::new(encoded[2].clone())).is_err());
}
