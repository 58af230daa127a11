//! Persistence: SQLite through sqlx (the same code speaks PostgreSQL). Every accepted
//! client message and every sealed phase record of a round is appended, in the order
//! the enclave saw them, before the client gets its 2xx; a restart replays them.

use std::path::Path;
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use tessera_enclave::{MessageKind, StoredEvent};
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
"#;

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

    pub async fn insert_round(&self, cfg: &RoundConfig, opened_at: Timestamp) -> Result<(), StoreError> {
        let json = serde_json::to_string(cfg).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query("INSERT INTO rounds (round, config, opened_at, status) VALUES (?, ?, ?, 'open')")
            .bind(cfg.round as i64)
            .bind(json)
            .bind(opened_at.0 as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn finish_round(&self, round: u64, status: &str, outcome: &str, release: Option<&str>, mean: Option<&[u8]>) -> Result<(), StoreError> {
        sqlx::query("UPDATE rounds SET status = ?, outcome = ?, release = ?, mean = ? WHERE round = ?")
            .bind(status)
            .bind(outcome)
            .bind(release)
            .bind(mean)
            .bind(round as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
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

    /// Appends one event in one transaction; `idx` orders a round's events.
    pub async fn append_event(&self, round: u64, event: &StoredEvent) -> Result<(), StoreError> {
        match event {
            StoredEvent::Message { kind, received_at, body } => self.append_raw(round, kind_name(*kind), received_at.0, None, body).await,
            StoredEvent::Sealed { seq, sealed } => self.append_raw(round, "sealed", 0, Some(*seq as i64), sealed).await,
        }
    }

    /// Appends a client message from borrowed bytes (a masked input is not copied again).
    pub async fn append_message(&self, round: u64, kind: MessageKind, received_at: Timestamp, body: &[u8]) -> Result<(), StoreError> {
        self.append_raw(round, kind_name(kind), received_at.0, None, body).await
    }

    async fn append_raw(&self, round: u64, kind: &str, received_at: u64, seq: Option<i64>, body: &[u8]) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO events (round, idx, kind, received_at, seq, body) \
             VALUES (?1, (SELECT COALESCE(MAX(idx), 0) + 1 FROM events WHERE round = ?1), ?2, ?3, ?4, ?5)",
        )
        .bind(round as i64)
        .bind(kind)
        .bind(received_at as i64)
        .bind(seq)
        .bind(body)
        .execute(&self.pool)
        .await?;
        Ok(())
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
