//! Persistence: SQLite through sqlx (the same code speaks PostgreSQL). Every accepted
//! client message and every sealed phase record of a round is appended, in the order
//! the enclave saw them, before the client gets its 2xx; a restart replays them.

use std::path::Path;
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use tessera_enclave::{MessageKind, StoredEvent, StoredLogEntry};
use tessera_secagg::{RoundConfig, Timestamp};

#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

#[derive(Clone, Debug)]
pub struct RoundRow {
    pub round: u64,
    pub config: RoundConfig,
    pub opened_at: Timestamp,
    pub status: String,
    pub outcome: Option<String>,
    pub release: Option<String>,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    config TEXT NOT NULL,
    opened_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    outcome TEXT,
    release TEXT,
    mean BLOB
);
CREATE TABLE IF NOT EXISTS events (
    round INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    kind TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    seq INTEGER,
    body BLOB NOT NULL,
    PRIMARY KEY (round, idx)
);
CREATE TABLE IF NOT EXISTS log (
    idx INTEGER PRIMARY KEY,
    round INTEGER NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS log_by_round ON log (round, idx);
CREATE TABLE IF NOT EXISTS evidence (
    sha256 TEXT PRIMARY KEY,
    evidence BLOB NOT NULL,
    tls_fingerprint TEXT NOT NULL,
    first_seen_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS denials (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    principal TEXT,
    reason TEXT NOT NULL
);
"#;

/// What one enclave step leaves for the store, written in one transaction: a crash
/// keeps all of it or none of it, so the log never has an entry whose event is lost,
/// nor an event without its entries.
#[derive(Debug, Default)]
pub struct Commit<'a> {
    pub round: u64,
    pub open: Option<(&'a RoundConfig, Timestamp)>,
    pub message: Option<(MessageKind, Timestamp, &'a [u8])>,
    pub sealed: Option<(u64, &'a [u8])>,
    pub log: &'a [StoredLogEntry],
    pub finish: Option<Finish>,
}

/// How a round ended: its status, outcome, and for a release the signed release (JSON)
/// and the mean.
#[derive(Debug)]
pub struct Finish {
    pub status: &'static str,
    pub outcome: String,
    pub release: Option<String>,
    pub mean: Option<Vec<u8>>,
}

/// A refused request, kept for auditors.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Denial {
    pub at_ms: u64,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub principal: Option<String>,
    pub reason: String,
}

fn kind_name(k: MessageKind) -> &'static str {
    match k {
        MessageKind::Advertise => "advertise",
        MessageKind::ShareKeys => "share_keys",
        MessageKind::MaskedInput => "masked_input",
        MessageKind::Consistency => "consistency",
        MessageKind::Unmask => "unmask",
    }
}

fn kind_from(s: &str) -> Option<MessageKind> {
    Some(match s {
        "advertise" => MessageKind::Advertise,
        "share_keys" => MessageKind::ShareKeys,
        "masked_input" => MessageKind::MaskedInput,
        "consistency" => MessageKind::Consistency,
        "unmask" => MessageKind::Unmask,
        _ => return None,
    })
}

impl Store {
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before the client hears 2xx.
            .synchronous(SqliteSynchronous::Full);
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(opts).await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        Ok(Store { pool })
    }

    pub async fn get_kv(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(sqlx::query("SELECT value FROM kv WHERE key = ?").bind(key).fetch_optional(&self.pool).await?.map(|r| r.get(0)))
    }

    pub async fn put_kv(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Writes one enclave step atomically; see [`Commit`].
    pub async fn commit(&self, c: Commit<'_>) -> Result<(), StoreError> {
        // IMMEDIATE: the write lock is taken before the first read, so a write committed
        // meanwhile by another connection (evidence is stored outside the round lock)
        // waits for busy_timeout instead of failing the upgrade with SQLITE_BUSY_SNAPSHOT,
        // which made a refused admission's log entry fail to store and the round rebuild.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        if let Some((cfg, opened_at)) = c.open {
            let json = serde_json::to_string(cfg).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            sqlx::query("INSERT INTO rounds (round, config, opened_at, status) VALUES (?, ?, ?, 'open')")
                .bind(cfg.round as i64)
                .bind(json)
                .bind(opened_at.0 as i64)
                .execute(&mut *tx)
                .await?;
        }
        let event = |kind: &str, received_at: u64, seq: Option<i64>, body: &[u8]| {
            sqlx::query(
                "INSERT INTO events (round, idx, kind, received_at, seq, body) \
                 VALUES (?1, (SELECT COALESCE(MAX(idx), 0) + 1 FROM events WHERE round = ?1), ?2, ?3, ?4, ?5)",
            )
            .bind(c.round as i64)
            .bind(kind.to_string())
            .bind(received_at as i64)
            .bind(seq)
            .bind(body.to_vec())
        };
        if let Some((kind, at, body)) = c.message {
            event(kind_name(kind), at.0, None, body).execute(&mut *tx).await?;
        }
        if let Some((seq, sealed)) = c.sealed {
            event("sealed", 0, Some(seq as i64), sealed).execute(&mut *tx).await?;
        }
        if let Some(first) = c.log.first() {
            // The log only grows at its end, without gaps: anything else means the
            // enclave's view and the store's differ, and the step is refused whole.
            let next: i64 = sqlx::query("SELECT COALESCE(MAX(idx) + 1, 0) FROM log").fetch_one(&mut *tx).await?.get(0);
            let contiguous = c.log.iter().zip(first.index..).all(|(e, i)| e.index == i);
            if first.index != next as u64 || !contiguous {
                return Err(StoreError::Corrupt(format!("log entries from {} do not continue the stored log, which ends before {next}", first.index)));
            }
        }
        for e in c.log {
            sqlx::query("INSERT INTO log (idx, round, timestamp_ms, data) VALUES (?, ?, ?, ?)")
                .bind(e.index as i64)
                .bind(e.round as i64)
                .bind(e.timestamp_ms as i64)
                .bind(&e.data)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(f) = c.finish {
            sqlx::query("UPDATE rounds SET status = ?, outcome = ?, release = ?, mean = ? WHERE round = ?")
                .bind(f.status)
                .bind(f.outcome)
                .bind(f.release)
                .bind(f.mean)
                .bind(c.round as i64)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    fn log_row(r: sqlx::sqlite::SqliteRow) -> StoredLogEntry {
        StoredLogEntry {
            index: r.get::<i64, _>("idx") as u64,
            round: r.get::<i64, _>("round") as u64,
            timestamp_ms: r.get::<i64, _>("timestamp_ms") as u64,
            data: r.get("data"),
        }
    }

    /// Log entries with `start <= index < end`, in order.
    pub async fn log_range(&self, start: u64, end: u64) -> Result<Vec<StoredLogEntry>, StoreError> {
        let rows = sqlx::query("SELECT idx, round, timestamp_ms, data FROM log WHERE idx >= ? AND idx < ? ORDER BY idx")
            .bind(start.min(i64::MAX as u64) as i64)
            .bind(end.min(i64::MAX as u64) as i64)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Self::log_row).collect())
    }

    /// A round's log entries, in order.
    pub async fn log_of_round(&self, round: u64) -> Result<Vec<StoredLogEntry>, StoreError> {
        let rows = sqlx::query("SELECT idx, round, timestamp_ms, data FROM log WHERE round = ? ORDER BY idx").bind(round as i64).fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(Self::log_row).collect())
    }

    /// Keeps evidence the aggregator presented, so a report can carry the evidence its
    /// round was opened under even after restarts produced newer evidence.
    pub async fn put_evidence(&self, sha256: &str, evidence: &[u8], tls_fingerprint: &str, at_ms: u64) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO evidence (sha256, evidence, tls_fingerprint, first_seen_ms) VALUES (?, ?, ?, ?) ON CONFLICT(sha256) DO NOTHING")
            .bind(sha256)
            .bind(evidence)
            .bind(tls_fingerprint)
            .bind(at_ms as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Evidence by its SHA-256 (hex): the bytes and the TLS fingerprint it was bound to.
    pub async fn evidence(&self, sha256: &str) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        Ok(sqlx::query("SELECT evidence, tls_fingerprint FROM evidence WHERE sha256 = ?")
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| (r.get(0), r.get(1))))
    }

    pub async fn record_denial(&self, d: &Denial) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO denials (at_ms, method, path, status, principal, reason) VALUES (?, ?, ?, ?, ?, ?)")
            .bind(d.at_ms as i64)
            .bind(&d.method)
            .bind(&d.path)
            .bind(d.status as i64)
            .bind(&d.principal)
            .bind(&d.reason)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Keeps only the newest `keep` denials of authenticated callers and the newest
    /// `keep` of unauthenticated ones, so neither kind pushes the other out.
    pub async fn prune_denials(&self, keep: u64) -> Result<(), StoreError> {
        for kind in ["principal IS NULL", "principal IS NOT NULL"] {
            sqlx::query(&format!("DELETE FROM denials WHERE {kind} AND id NOT IN (SELECT id FROM denials WHERE {kind} ORDER BY id DESC LIMIT ?)"))
                .bind(keep as i64)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// The most recent denials, newest first.
    pub async fn denials(&self, limit: u32) -> Result<Vec<Denial>, StoreError> {
        let rows = sqlx::query("SELECT at_ms, method, path, status, principal, reason FROM denials ORDER BY id DESC LIMIT ?")
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| Denial {
                at_ms: r.get::<i64, _>("at_ms") as u64,
                method: r.get("method"),
                path: r.get("path"),
                status: r.get::<i64, _>("status") as u16,
                principal: r.get("principal"),
                reason: r.get("reason"),
            })
            .collect())
    }

    fn row(r: sqlx::sqlite::SqliteRow) -> Result<RoundRow, StoreError> {
        let config: String = r.get("config");
        Ok(RoundRow {
            round: r.get::<i64, _>("round") as u64,
            config: serde_json::from_str(&config).map_err(|e| StoreError::Corrupt(format!("round config: {e}")))?,
            opened_at: Timestamp(r.get::<i64, _>("opened_at") as u64),
            status: r.get("status"),
            outcome: r.get("outcome"),
            release: r.get("release"),
        })
    }

    pub async fn round(&self, round: u64) -> Result<Option<RoundRow>, StoreError> {
        sqlx::query("SELECT round, config, opened_at, status, outcome, release FROM rounds WHERE round = ?")
            .bind(round as i64)
            .fetch_optional(&self.pool)
            .await?
            .map(Self::row)
            .transpose()
    }

    pub async fn latest_round(&self) -> Result<Option<RoundRow>, StoreError> {
        sqlx::query("SELECT round, config, opened_at, status, outcome, release FROM rounds ORDER BY round DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await?
            .map(Self::row)
            .transpose()
    }

    pub async fn rounds(&self) -> Result<Vec<RoundRow>, StoreError> {
        sqlx::query("SELECT round, config, opened_at, status, outcome, release FROM rounds ORDER BY round")
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(Self::row)
            .collect()
    }

    pub async fn mean(&self, round: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(sqlx::query("SELECT mean FROM rounds WHERE round = ? AND mean IS NOT NULL").bind(round as i64).fetch_optional(&self.pool).await?.map(|r| r.get(0)))
    }

    pub async fn events(&self, round: u64) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = sqlx::query("SELECT kind, received_at, seq, body FROM events WHERE round = ? ORDER BY idx").bind(round as i64).fetch_all(&self.pool).await?;
        rows.into_iter()
            .map(|r| {
                let kind: String = r.get("kind");
                let body: Vec<u8> = r.get("body");
                if kind == "sealed" {
                    let seq: Option<i64> = r.get("seq");
                    let seq = seq.ok_or_else(|| StoreError::Corrupt("sealed event without sequence".into()))?;
                    Ok(StoredEvent::Sealed { seq: seq as u64, sealed: body })
                } else {
                    let kind = kind_from(&kind).ok_or_else(|| StoreError::Corrupt(format!("unknown event kind {kind}")))?;
                    Ok(StoredEvent::Message { kind, received_at: Timestamp(r.get::<i64, _>("received_at") as u64), body })
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64) -> StoredLogEntry {
        StoredLogEntry { index, round: 1, timestamp_ms: 0, data: format!("entry {index}").into_bytes() }
    }

    /// A step that fails half-way (here: its second log entry collides) leaves nothing of
    /// itself behind: not the message, not the first entry. The log stays a prefix.
    #[tokio::test]
    async fn a_commit_that_fails_half_way_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db")).await.unwrap();
        let cfg = RoundConfig::with_defaults(1, vec!["00".repeat(32), "11".repeat(32), "22".repeat(32)], 4, [0; 32]);
        let first = [entry(0)];
        store.commit(Commit { round: 1, open: Some((&cfg, Timestamp(1))), log: &first, ..Default::default() }).await.unwrap();
        let colliding = [entry(1), entry(0)];
        // A gap is refused too, before anything is written.
        let gap = [entry(2)];
        assert!(store
            .commit(Commit { round: 1, message: Some((MessageKind::Advertise, Timestamp(2), &b"{}"[..])), log: &gap, ..Default::default() })
            .await
            .is_err());
        assert!(store.events(1).await.unwrap().is_empty());
        let message = (MessageKind::Advertise, Timestamp(2), &b"{}"[..]);
        let err = store.commit(Commit { round: 1, message: Some(message), log: &colliding, ..Default::default() }).await;
        assert!(err.is_err());
        assert!(store.events(1).await.unwrap().is_empty(), "the message of the failed step was not kept");
        assert_eq!(store.log_range(0, u64::MAX).await.unwrap(), first.to_vec());
        // The next step appends where the log really ends.
        store.commit(Commit { round: 1, message: Some(message), log: &[entry(1)], ..Default::default() }).await.unwrap();
        assert_eq!(store.log_range(0, u64::MAX).await.unwrap().len(), 2);
        assert_eq!(store.events(1).await.unwrap().len(), 1);
    }
}
