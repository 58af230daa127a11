//! The round transparency log, kept by the enclave.
//!
//! The enclave composes every entry itself from what it has seen (the host only stores
//! the bytes), keeps the Merkle tree over them, and signs its tree heads with its
//! attested identity key. It also keeps the privacy ledger: the ε each release spends
//! is computed from the log's own `released` entries, so the figures in the log can be
//! recomputed by anyone who holds it.
//!
//! Crash safety is the host's part: it stores the entries of one enclave step in the
//! same database transaction as the step's stored events, and after a restart it hands
//! the stored entries back ([`TransparencyLog::load`]). Replaying a round's stored
//! events reconciles the log: each entry the replay composes must equal the stored entry
//! at its position, and entries missing from the store (rows a host deleted, e.g. a
//! release it wants signed again without its ε in the ledger) are appended again, so
//! the log and its ledger never show less than the events prove. A stored entry that
//! disagrees stops the replay, naming its index.

use std::collections::BTreeMap;

use tessera_attestation::audit::{DpSummary, LogEntry, LogEvent};
use tessera_attestation::translog::{leaf_hash, Hash, MerkleLog, ProofError};
use tessera_secagg::dp::{add_release as add, Against, Mechanism, SkellamNoise};

/// An entry as the host stores it: its position, round and the exact bytes hashed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredLogEntry {
    pub index: u64,
    pub round: u64,
    pub timestamp_ms: u64,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    #[error("stored log entry {index} is corrupt: {why}")]
    Corrupt { index: u64, why: String },
    #[error("stored log entries are not contiguous: expected entry {expected}, found {found}")]
    Gap { expected: u64, found: u64 },
    #[error(transparent)]
    Proof(#[from] ProofError),
    #[error("the stored log disagrees with the replayed round at entry {index}: {why}")]
    ReplayDiverges { index: u64, why: String },
}

/// ε bookkeeping over released DP rounds, as RDP groups (mechanism, rounds).
#[derive(Clone, Debug, Default, PartialEq)]
struct Ledger {
    /// Against a coalition of the rounds' colluders (what the budget is charged).
    federation: Vec<(Mechanism, u64)>,
    /// Against an outsider, who knows no noise share.
    outsider: Vec<(Mechanism, u64)>,
    by_participant: BTreeMap<String, Vec<(Mechanism, u64)>>,
    /// The roster and minimum survivors of each round seen opening, to name the
    /// included clients and to derive the outsider's multiplier.
    rosters: BTreeMap<u64, (Vec<String>, u32)>,
    /// The round opened last, while it has no end entry.
    open_round: Option<u64>,
    /// Releases so far: the global model's version in a buffered federation.
    releases: u64,
}

/// The ε figures of one release.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ReleaseFigures {
    pub round: f64,
    pub cumulative: f64,
    pub outsider_round: f64,
    pub outsider_cumulative: f64,
    pub by_participant: BTreeMap<String, f64>,
}

/// The mechanism a release under `dp` ran in a round with `t` minimum survivors, as
/// `against` sees it. Rounds logged before `colluders` are charged against one
/// participant (`DpParams::coalition_noise_multiplier`). A Skellam summary whose scale,
/// β or dimension is out of range cannot come from a round this enclave opened (each was
/// validated); it is charged as no noise at all (ε infinite), never as less than it was.
fn mechanism(dp: &DpSummary, t: u32, against: Against) -> Mechanism {
    let params = tessera_secagg::dp::DpParams {
        noise_multiplier: dp.noise_multiplier,
        l2_clip: dp.l2_clip,
        delta: dp.delta,
        epsilon_budget: dp.epsilon_budget,
        colluders: dp.colluders,
        skellam: dp.skellam.map(|s| SkellamNoise { scale: Some(s.scale), beta: s.beta }),
    };
    if dp.skellam.is_some_and(|s| !(s.scale.is_finite() && s.scale > 0.0 && (0.0..1.0).contains(&s.beta) && s.dim > 0)) {
        return tessera_secagg::dp::NO_NOISE;
    }
    let dim = dp.skellam.map_or(1, |s| s.dim);
    params.mechanism(t, dim, against).unwrap_or(tessera_secagg::dp::NO_NOISE)
}

impl Ledger {
    fn observe(&mut self, entry: &LogEntry) {
        match &entry.event {
            LogEvent::RoundOpened { roster, min_survivors, .. } => {
                self.rosters.insert(entry.round, (roster.clone(), *min_survivors));
                self.open_round = Some(entry.round);
            }
            e if e.is_terminal() && self.open_round == Some(entry.round) => {
                self.open_round = None;
                if matches!(e, LogEvent::Released { .. }) {
                    self.releases += 1;
                }
                if let LogEvent::Released { included, dp: Some(dp), .. } = e {
                    self.observe_release(entry.round, included, dp);
                }
            }
            _ => {}
        }
    }

    fn observe_release(&mut self, round: u64, included: &[u32], dp: &DpSummary) {
        let (roster, t) = self.rosters.get(&round).cloned().unwrap_or_default();
        let z = mechanism(dp, t, Against::Coalition);
        add(&mut self.federation, z);
        add(&mut self.outsider, mechanism(dp, t, Against::Outsider));
        for c in included {
            if let Some(id) = roster.get(*c as usize) {
                add(self.by_participant.entry(id.clone()).or_default(), z);
            }
        }
    }

    /// The ε figures a release of `round` under `dp` including `included` would carry.
    fn release_figures(&self, round: u64, dp: &DpSummary, included: &[u32]) -> ReleaseFigures {
        let (roster, t) = self.rosters.get(&round).cloned().unwrap_or_default();
        let z = mechanism(dp, t, Against::Coalition);
        let eps_round = tessera_secagg::dp::epsilon_of(&[(z, 1)], dp.delta);
        let mut fed = self.federation.clone();
        add(&mut fed, z);
        let eps_cum = tessera_secagg::dp::epsilon_of(&fed, dp.delta);
        let z_out = mechanism(dp, t, Against::Outsider);
        let mut outsider = self.outsider.clone();
        add(&mut outsider, z_out);
        let mut by = BTreeMap::new();
        for c in included {
            if let Some(id) = roster.get(*c as usize) {
                let mut g = self.by_participant.get(id).cloned().unwrap_or_default();
                add(&mut g, z);
                by.insert(id.clone(), tessera_secagg::dp::epsilon_of(&g, dp.delta));
            }
        }
        ReleaseFigures {
            round: eps_round,
            cumulative: eps_cum,
            outsider_round: tessera_secagg::dp::epsilon_of(&[(z_out, 1)], dp.delta),
            outsider_cumulative: tessera_secagg::dp::epsilon_of(&outsider, dp.delta),
            by_participant: by,
        }
    }
}

/// The log: the Merkle tree over every entry, the entries appended since the host last
/// took them, and the privacy ledger.
#[derive(Debug, Default)]
pub struct TransparencyLog {
    tree: MerkleLog,
    pending: Vec<StoredLogEntry>,
    ledger: Ledger,
    /// The entries from the last `round_opened` on, parsed, and the ledger as it stood
    /// before that entry: what a replay of the last round is compared with.
    tail: Vec<LogEntry>,
    tail_start: u64,
    ledger_before_tail: Ledger,
    /// Set while a round is replayed from stored events.
    replay: Option<Replay>,
}

#[derive(Debug)]
struct Replay {
    /// Index of the stored entry the next composed entry is compared with.
    next: u64,
    /// The first disagreement, reported when the replay ends.
    diverged: Option<LogError>,
}

/// Entries of a round that no stored event reproduces: a refused admission (the refused
/// advertisement is not stored).
fn unreplayable(entry: &LogEntry) -> bool {
    matches!(entry.event, LogEvent::Admission { accepted: false, .. })
}

impl TransparencyLog {
    /// Rebuilds the log from the host's stored entries, checking each one: it must
    /// parse, name its own position, and follow the previous one without a gap.
    pub fn load(entries: &[StoredLogEntry]) -> Result<TransparencyLog, LogError> {
        let mut log = TransparencyLog::default();
        for (i, stored) in entries.iter().enumerate() {
            let i = i as u64;
            if stored.index != i {
                return Err(LogError::Gap { expected: i, found: stored.index });
            }
            let entry = LogEntry::parse(&stored.data).map_err(|e| LogError::Corrupt { index: i, why: e.to_string() })?;
            if entry.index != i || entry.round != stored.round {
                return Err(LogError::Corrupt { index: i, why: format!("the entry says index {} round {}", entry.index, entry.round) });
            }
            log.remember(entry);
            log.tree.push_leaf_hash(leaf_hash(&stored.data));
        }
        Ok(log)
    }

    /// Feeds the ledger and keeps the entries of the last round opened.
    fn remember(&mut self, entry: LogEntry) {
        if matches!(entry.event, LogEvent::RoundOpened { .. }) {
            self.ledger_before_tail = self.ledger.clone();
            self.tail_start = entry.index;
            self.tail.clear();
        }
        self.ledger.observe(&entry);
        if !self.tail.is_empty() || matches!(entry.event, LogEvent::RoundOpened { .. }) {
            self.tail.push(entry);
        }
    }

    /// Starts replaying `round`: its composed entries are compared with the stored ones
    /// from its `round_opened` on (or appended after the end, if the store has none).
    pub(crate) fn begin_replay(&mut self, round: u64) {
        let opened_here = self.tail.first().is_some_and(|e| e.round == round);
        let next = if opened_here {
            // The ledger is rebuilt over the round's entries as the replay meets them.
            self.ledger = self.ledger_before_tail.clone();
            self.tail_start
        } else {
            self.tree.size()
        };
        self.replay = Some(Replay { next, diverged: None });
    }

    /// Ends a replay: stored entries the replay did not reach must be ones no event
    /// reproduces; the first disagreement is returned.
    pub(crate) fn end_replay(&mut self) -> Result<(), LogError> {
        let Some(replay) = self.replay.take() else { return Ok(()) };
        if let Some(e) = replay.diverged {
            return Err(e);
        }
        let size = self.tree.size();
        for index in replay.next..size {
            match self.stored(index) {
                Some(e) if unreplayable(e) => {}
                _ => return Err(LogError::ReplayDiverges { index, why: "the stored log holds an entry the stored events do not produce".into() }),
            }
        }
        Ok(())
    }

    fn stored(&self, index: u64) -> Option<&LogEntry> {
        index.checked_sub(self.tail_start).and_then(|i| self.tail.get(i as usize))
    }

    /// During a replay: compares the composed event with the stored entry at the cursor
    /// (skipping entries no event reproduces), or appends it when the store has no entry
    /// there. Returns whether it must be appended.
    fn reconcile(&mut self, round: u64, timestamp_ms: u64, event: &mut LogEvent) -> bool {
        let size = self.tree.size();
        let Some(replay) = self.replay.as_mut() else { return true };
        if replay.diverged.is_some() {
            return false;
        }
        loop {
            let index = replay.next;
            if index >= size {
                replay.next += 1;
                return true;
            }
            let Some(stored) = index.checked_sub(self.tail_start).and_then(|i| self.tail.get(i as usize)) else {
                replay.diverged = Some(LogError::ReplayDiverges { index, why: "the entry precedes the replayed round's opening".into() });
                return false;
            };
            // The evidence an enclave presents is made when it starts, not from events:
            // a replayed opening keeps the hash the stored one names.
            if let (LogEvent::RoundOpened { aggregator_evidence_sha256: ours, .. }, LogEvent::RoundOpened { aggregator_evidence_sha256: theirs, .. }) =
                (&mut *event, &stored.event)
            {
                ours.clone_from(theirs);
            }
            if stored.round == round && stored.timestamp_ms == timestamp_ms && stored.event == *event {
                let stored = stored.clone();
                replay.next += 1;
                self.ledger.observe(&stored);
                return false;
            }
            if unreplayable(stored) {
                replay.next += 1;
                continue;
            }
            replay.diverged =
                Some(LogError::ReplayDiverges { index, why: format!("stored {} in round {}, replayed {}", stored.event.name(), stored.round, event.name()) });
            return false;
        }
    }

    pub fn size(&self) -> u64 {
        self.tree.size()
    }

    pub fn root(&self) -> Hash {
        self.tree.root()
    }

    pub fn inclusion(&self, index: u64, size: u64) -> Result<Vec<Hash>, ProofError> {
        self.tree.inclusion(index, size)
    }

    pub fn consistency(&self, old: u64, new: u64) -> Result<Vec<Hash>, ProofError> {
        self.tree.consistency(old, new)
    }

    pub fn root_at(&self, size: u64) -> Result<Hash, ProofError> {
        self.tree.root_at(size)
    }

    /// Appends an event; during a replay, only one the store lacks (see [`Self::reconcile`]).
    pub(crate) fn append(&mut self, round: u64, timestamp_ms: u64, mut event: LogEvent) {
        if !self.reconcile(round, timestamp_ms, &mut event) {
            return;
        }
        let entry = LogEntry { index: self.tree.size(), timestamp_ms, round, event };
        let data = entry.to_bytes();
        self.tree.append(&data);
        self.pending.push(StoredLogEntry { index: entry.index, round, timestamp_ms, data });
        self.remember(entry);
    }

    /// The round opened last, if the log has no end entry for it yet.
    pub fn open_round(&self) -> Option<u64> {
        self.ledger.open_round
    }

    /// The entries appended since the last call, for the host to store.
    pub fn take_pending(&mut self) -> Vec<StoredLogEntry> {
        std::mem::take(&mut self.pending)
    }

    /// The federation's ε (at `delta`) over the DP rounds released so far.
    pub fn spent_epsilon(&self, delta: f64) -> f64 {
        if self.ledger.federation.is_empty() {
            return 0.0;
        }
        tessera_secagg::dp::epsilon_of(&self.ledger.federation, delta)
    }

    /// The federation's ε (at `delta`) after one more released round of `m` (against a
    /// coalition of its colluders), over every DP round this log has released; a round
    /// whose mechanism is unknown counts as no noise.
    pub fn projected_epsilon(&self, m: Option<Mechanism>, delta: f64) -> f64 {
        let mut fed = self.ledger.federation.clone();
        add(&mut fed, m.unwrap_or(tessera_secagg::dp::NO_NOISE));
        tessera_secagg::dp::epsilon_of(&fed, delta)
    }

    /// Rounds this log has released: the global model's version in a buffered federation.
    pub fn releases(&self) -> u64 {
        self.ledger.releases
    }

    pub(crate) fn release_figures(&self, round: u64, dp: &DpSummary, included: &[u32]) -> ReleaseFigures {
        self.ledger.release_figures(round, dp, included)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aborted(round: u64) -> LogEvent {
        LogEvent::Aborted { phase: "advertise_keys".into(), reason: format!("test {round}") }
    }

    #[test]
    fn load_rebuilds_the_same_tree_and_refuses_gaps_and_corruption() {
        let mut log = TransparencyLog::default();
        for r in 0..5 {
            log.append(r, 1000 + r, aborted(r));
        }
        let stored = log.take_pending();
        assert_eq!(stored.len(), 5);
        assert!(log.take_pending().is_empty());
        let loaded = TransparencyLog::load(&stored).unwrap();
        assert_eq!(loaded.root(), log.root());
        assert_eq!(loaded.size(), 5);

        let mut gap = stored.clone();
        gap.remove(2);
        assert_eq!(TransparencyLog::load(&gap).unwrap_err(), LogError::Gap { expected: 2, found: 3 });

        let mut corrupt = stored.clone();
        corrupt[1].data[3] ^= 0x20;
        assert!(matches!(TransparencyLog::load(&corrupt), Err(LogError::Corrupt { index: 1, .. }) | Err(LogError::Gap { .. })));

        let mut wrong_round = stored;
        wrong_round[4].round = 9;
        assert!(matches!(TransparencyLog::load(&wrong_round), Err(LogError::Corrupt { index: 4, .. })));
    }

    fn opened(round: u64) -> LogEvent {
        LogEvent::RoundOpened {
            config_digest: format!("{round:064x}"),
            roster: vec!["aa".repeat(32)],
            min_survivors: 1,
            neighbours: 0,
            vector_len: 1,
            dp: None,
            node_policy_sha256: String::new(),
            aggregator_format: "dev".into(),
            aggregator_evidence_sha256: String::new(),
        }
    }

    /// A release logged by a version before `colluders` (0 in the entry): its noise was
    /// split over all t shares, so the ledger charges it at what one participant faced,
    /// z·√((t − 1)/t), and an outsider's figure at z; a new round at z and z·√(t/(t − f)).
    #[test]
    fn releases_are_charged_against_a_coalition_and_reported_against_outsiders() {
        let entries = |colluders: u32| {
            let dp =
                DpSummary { noise_multiplier: 2.0, l2_clip: 1.0, delta: 1e-5, epsilon_budget: 100.0, colluders, adjacency: Default::default(), skellam: None };
            let open = LogEvent::RoundOpened {
                config_digest: "00".repeat(32),
                roster: vec!["aa".repeat(32), "bb".repeat(32), "cc".repeat(32)],
                min_survivors: 3,
                neighbours: 2,
                vector_len: 1,
                dp: Some(dp),
                node_policy_sha256: String::new(),
                aggregator_format: "dev".into(),
                aggregator_evidence_sha256: String::new(),
            };
            let mut log = TransparencyLog::default();
            log.append(1, 0, open);
            let f = log.release_figures(1, &dp, &[0, 1, 2]);
            log.append(
                1,
                1,
                LogEvent::Released {
                    included: vec![0, 1, 2],
                    total_weight: 3,
                    mean_sha256: String::new(),
                    error_bound: 0.0,
                    release_signature: String::new(),
                    dp: Some(dp),
                    epsilon_round: Some(f.round),
                    epsilon_cumulative: Some(f.cumulative),
                    epsilon_by_participant: f.by_participant.clone(),
                    epsilon_outsider_round: Some(f.outsider_round),
                    epsilon_outsider_cumulative: Some(f.outsider_cumulative),
                },
            );
            (log, f)
        };
        let eps = |z: f64| tessera_secagg::dp::epsilon(z, 1, 1e-5);
        let (mut legacy, f) = entries(0);
        let spent = legacy.spent_epsilon(1e-5);
        assert!((spent - eps(2.0 * (2.0f64 / 3.0).sqrt())).abs() < 1e-9);
        assert!((f.outsider_round - eps(2.0)).abs() < 1e-9);
        let (new, f) = entries(1);
        assert!((new.spent_epsilon(1e-5) - eps(2.0)).abs() < 1e-9);
        assert!((f.outsider_round - eps(2.0 * 1.5f64.sqrt())).abs() < 1e-9);
        assert!((f.by_participant["bb".repeat(32).as_str()] - eps(2.0)).abs() < 1e-9);
        // Reloading the stored log rebuilds the same ledger.
        let stored = legacy.take_pending();
        assert!((TransparencyLog::load(&stored).unwrap().spent_epsilon(1e-5) - spent).abs() < 1e-12);
    }

    #[test]
    fn the_open_round_is_the_last_one_without_an_end() {
        let mut log = TransparencyLog::default();
        assert_eq!(log.open_round(), None);
        log.append(1, 0, opened(1));
        assert_eq!(log.open_round(), Some(1));
        log.append(1, 1, aborted(1));
        assert_eq!(log.open_round(), None);
        log.append(2, 2, opened(2));
        // Reloading gives the same answer.
        let stored = log.take_pending();
        assert_eq!(TransparencyLog::load(&stored).unwrap().open_round(), Some(2));
    }

    #[test]
    fn replay_appends_nothing_the_store_holds_and_restores_what_it_lacks() {
        let mut log = TransparencyLog::default();
        log.append(1, 0, opened(1));
        log.append(1, 1, aborted(1));
        let stored = log.take_pending();
        // Replaying the same events: nothing new, and the ledger is unchanged.
        let mut replayed = TransparencyLog::load(&stored).unwrap();
        let ledger = replayed.ledger.clone();
        replayed.begin_replay(1);
        replayed.append(1, 0, opened(1));
        replayed.append(1, 1, aborted(1));
        replayed.end_replay().unwrap();
        assert!(replayed.take_pending().is_empty());
        assert_eq!((replayed.size(), replayed.ledger.clone()), (2, ledger));
        // The host deleted the round's last entry: the replay appends it again.
        let mut truncated = TransparencyLog::load(&stored[..1]).unwrap();
        truncated.begin_replay(1);
        truncated.append(1, 0, opened(1));
        truncated.append(1, 1, aborted(1));
        truncated.end_replay().unwrap();
        assert_eq!(truncated.take_pending(), stored[1..].to_vec());
        assert_eq!(truncated.root(), log.root());
        // A stored entry the events contradict stops the replay, naming it.
        let mut other = TransparencyLog::load(&stored).unwrap();
        other.begin_replay(1);
        other.append(1, 0, opened(1));
        other.append(1, 2, aborted(1));
        assert!(matches!(other.end_replay(), Err(LogError::ReplayDiverges { index: 1, .. })));
        // Stored entries beyond what the events produce.
        let mut extra = TransparencyLog::load(&stored).unwrap();
        extra.begin_replay(1);
        extra.append(1, 0, opened(1));
        assert!(matches!(extra.end_replay(), Err(LogError::ReplayDiverges { index: 1, .. })));
    }
}
