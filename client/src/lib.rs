//! The institution's side of Tessera: its identity, HTTPS to the aggregator with a
//! pinned certificate, reading updates from safetensors, and the round driver. The
//! `tessera-client` binary is thin glue over these modules; local LoRA training plugs
//! into [`participate::participate`] as the update provider.

pub mod feedback;
pub mod http;
pub mod identity;
pub mod ledger;
pub mod participate;
pub mod train;
pub mod update;

pub use http::Api;
pub use identity::Identity;
pub use participate::{participate, DropPoint, Options, ParticipateError, Participation, RoundReport};
