//! One error type for the crate, with the failing check in the variant, so that the
//! server can map each refusal to an HTTP status and a caller can match on the cause.

use crate::aggregator::Phase;
use crate::config::ClientId;

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum Error {
    #[error("invalid round configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("the round is below this institution's security floor: {0}")]
    BelowFloor(#[from] crate::floors::FloorViolation),
    #[error("cryptographic failure: {0}")]
    Crypto(&'static str),
    /// A masked input's source (a file the host spooled it to) could not be read: the
    /// reader's failure, not the sender's.
    #[error("cannot read the masked input: {0}")]
    Io(String),
}

/// A message that is well formed but not acceptable at this point of the round.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("message is for round {got}, this round is {expected}")]
    WrongRound { expected: u64, got: u64 },
    #[error("message belongs to phase {got:?} but the round is in phase {current:?}")]
    WrongPhase { current: Phase, got: Phase },
    #[error("client {0} is not a participant of this round")]
    UnknownClient(ClientId),
    #[error("client {0} already sent a different message for this phase (replay or equivocation)")]
    Duplicate(ClientId),
    #[error("client {0} already sent this exact message; nothing changed")]
    AlreadyAccepted(ClientId),
    #[error("client {0} is not in the set allowed to send this message")]
    NotInSurvivorSet(ClientId),
    #[error("signature by client {0} does not verify")]
    BadSignature(ClientId),
    #[error("masked input has {got} elements, the round expects {expected}")]
    WrongLength { expected: usize, got: usize },
    #[error("share message from client {from} is inconsistent: {why}")]
    BadShares { from: ClientId, why: &'static str },
    #[error("survivor set has {got} members, below the threshold {threshold}")]
    BelowThreshold { threshold: usize, got: usize },
    #[error("the server asked for a survivor set different from the one this client signed")]
    ConflictingSurvivorSet,
    #[error("the server asked to reveal both the self-mask share and the mask-key share of client {0}")]
    BothSharesRequested(ClientId),
    #[error("too few valid consistency signatures: {valid} of the {threshold} required")]
    TooFewConsistencySignatures { threshold: usize, valid: usize },
    #[error("could not reconstruct the secret of client {0}: too few shares")]
    TooFewShares(ClientId),
    #[error("reconstructed secret of client {0} does not match its commitment")]
    ReconstructionMismatch(ClientId),
    #[error("the round was aborted: {0}")]
    Aborted(String),
    #[error("the client state machine is in state {state}, it cannot accept {got}")]
    ClientOutOfOrder { state: &'static str, got: &'static str },
    #[error("the {message} does not carry a valid signature by the attested aggregator identity")]
    BadAggregatorSignature { message: &'static str },
    #[error("{set} names client {client}, which is not in the {superset} this client verified")]
    NotInVerifiedSet { set: &'static str, superset: &'static str, client: ClientId },
    #[error("{set} holds {got} of this client's neighbours, at least {threshold} are required")]
    TooFewNeighbours { set: &'static str, threshold: usize, got: usize },
    #[error("this client aborted the round after refusing a server message: {0}")]
    ClientAborted(String),
    #[error("the update was trained from version {base}, {staleness} versions before this cohort's version {version}; the cohort accepts at most {max} versions of staleness")]
    TooStale { base: u64, version: u64, staleness: u64, max: u32 },
    #[error("the update names base version {base}, later than this cohort's version {version}")]
    FutureVersion { base: u64, version: u64 },
    #[error("{0}")]
    BaseVersion(&'static str),
}

impl Error {
    pub(crate) fn malformed(why: impl Into<String>) -> Self {
        Error::Malformed(why.into())
    }
}
