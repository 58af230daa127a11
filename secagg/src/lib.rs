//! Sans-IO core of Tessera's secure aggregation: SecAgg+ (Bell et al., CCS 2020), that is
//! the protocol of Bonawitz et al. (CCS 2017) run on a sparse k-regular communication graph.
//!
//! This crate contains no networking, no files and no clocks: time enters as a
//! [`Timestamp`] argument, randomness as an RNG argument, and messages as typed values
//! (see [`wire`]). A round is driven by feeding messages into a [`client::Client`] per
//! institution and one [`aggregator::Aggregator`], in the order documented on each; the
//! server and client crates only move bytes between them. Whole rounds run in memory,
//! deterministically, in this crate's tests.
//!
//! Module map, in protocol order:
//! - [`config`]: the public round parameters and their validation;
//! - [`floors`]: what an institution requires of any round, whatever the server proposes;
//! - [`graph`]: the k-regular neighbour graph of SecAgg+;
//! - [`compress`]: linear encodings before quantization (shared random-k, Hadamard rotation);
//! - [`quantize`]: clipping, stochastic rounding into `Z_{2^b}`, and dequantization of sums;
//! - [`pack`]: `b`-bit packing of masked vectors on the wire;
//! - [`crypto`]: X25519 agreement, HKDF-SHA256 derivations, AES-GCM share encryption,
//!   Ed25519 signatures over message transcripts;
//! - [`shamir`]: t-of-k secret sharing over GF(2^8), constant time;
//! - [`prg`]: AES-128-CTR mask expansion fused with the masking arithmetic;
//! - [`dp`] and [`rdp`]: distributed DP of the release and the Rényi-DP accountants
//!   (institution level, and DP-SGD's record level); [`prv`]: the PRV accountant;
//!   [`skellam`]: integer (Skellam) noise shares and their accountant;
//! - [`wire`]: the messages of the five phases and their canonical encodings;
//! - [`client`] and [`aggregator`]: the two state machines.

pub mod aggregator;
pub mod client;
pub mod compress;
pub mod config;
pub mod crypto;
pub mod dp;
pub mod error;
pub mod floors;
pub mod graph;
pub mod pack;
pub mod prg;
pub mod prv;
pub mod quantize;
pub mod rdp;
pub mod shamir;
pub mod skellam;
pub mod wire;

pub use config::{ClientId, RoundConfig};
pub use error::{Error, ProtocolError};

/// Milliseconds since the Unix epoch, supplied by the caller. The core never reads a clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn saturating_add_ms(self, ms: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }
}
