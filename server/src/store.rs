//! Persistence: SQLite (the default, a file in the data directory) or PostgreSQL
//! (`store = "postgres://…"`), through sqlx's `Any` driver, so both run the same
//! statements. Every accepted client message and every sealed phase record of a round is
//! appended, in the order the enclave saw them, before the client gets its 2xx; a
//! restart replays them. A step is one transaction on either backend, and steps are
//! serialized: SQLite takes its write lock up front (`BEGIN IMMEDIATE`), PostgreSQL a
//! transaction-scoped advisory lock.

use std::path::Path;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};
use tessera_enclave::{MessageKind, StoredEvent, StoredLogEntry};
use tessera_secagg::{RoundConfig, Timestamp};

#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// PostgreSQL: a connection holding a session advisory lock for as long as the
    /// server runs, so a second server on the same database refuses to start (two
    /// servers would each extend and sign their own log: a fork).
    _single_writer: Option<std::sync::Arc<tokio::sync::Mutex<sqlx::AnyConnection>>>,
}

/// Which database server holds the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The advisory lock key PostgreSQL steps serialize on ("tessera" in ASCII).
const PG_STEP_LOCK: i64 = 0x0074_6573_7365_7261;
/// The session advisory lock one server holds on its database ("tesserA").
const PG_SERVER_LOCK: i64 = 0x0074_6573_7365_7241;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("store {0} is neither sqlite://PATH nor postgres://…")]
    Url(String),
    #[error("another tessera-server holds the database {0}; two servers on one database would fork the log")]
    Busy(String),
    #[error("spooled masked input: {0}")]
    Spool(String),
}

impl Backend {
    /// The backend a store URL names, if any.
    pub fn of(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

/// `url` with any password replaced (`user:PASSWORD@` and `password=` in the query),
/// for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = before_query.split_at(before_query.find('/').unwrap_or(before_query.len()));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            let hidden = if userinfo.contains(':') { ":…" } else { "" };
            format!("{user}{hidden}@{host}")
        }
        None => authority.to_string(),
    };
    let query = query.map(|q| {
        let pairs: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=…"),
                _ => kv.to_string(),
            })
            .collect();
        format!("?{}", pairs.join("&"))
    });
    format!("{scheme}://{authority}{path}{}", query.unwrap_or_default())
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

/// The tables, with each backend's type names put in by [`schema`].
const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value {bytes} NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round {int} PRIMARY KEY,
    config TEXT NOT NULL,
    opened_at {int} NOT NULL,
    status TEXT NOT NULL,
    outcome TEXT,
    release TEXT,
    mean {bytes}
);
CREATE TABLE IF NOT EXISTS events (
    round {int} NOT NULL,
    idx {int} NOT NULL,
    kind TEXT NOT NULL,
    received_at {int} NOT NULL,
    seq {int},
    body {bytes} NOT NULL,
    PRIMARY KEY (round, idx)
);
CREATE TABLE IF NOT EXISTS event_parts (
    round {int} NOT NULL,
    idx {int} NOT NULL,
    part {int} NOT NULL,
    data {bytes} NOT NULL,
    PRIMARY KEY (round, idx, part)
);
CREATE TABLE IF NOT EXISTS mean_parts (
    round {int} NOT NULL,
    part {int} NOT NULL,
    data {bytes} NOT NULL,
    PRIMARY KEY (round, part)
);
CREATE TABLE IF NOT EXISTS log (
    idx {int} PRIMARY KEY,
    round {int} NOT NULL,
    timestamp_ms {int} NOT NULL,
    data {bytes} NOT NULL
);
CREATE INDEX IF NOT EXISTS log_by_round ON log (round, idx);
CREATE TABLE IF NOT EXISTS evidence (
    sha256 TEXT PRIMARY KEY,
    evidence {bytes} NOT NULL,
    tls_fingerprint TEXT NOT NULL,
    first_seen_ms {int} NOT NULL
);
CREATE TABLE IF NOT EXISTS denials (
    id {serial_pk},
    at_ms {int} NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status {int} NOT NULL,
    principal TEXT,
    reason TEXT NOT NULL
);
"#;

/// [`SCHEMA`] in the backend's types: SQLite's INTEGER, BLOB and AUTOINCREMENT key,
/// PostgreSQL's BIGINT, BYTEA and BIGSERIAL.
fn schema(backend: Backend) -> String {
    let (int, bytes, serial_pk) = match backend {
        Backend::Sqlite => ("INTEGER", "BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT"),
        Backend::Postgres => ("BIGINT", "BYTEA", "BIGSERIAL PRIMARY KEY"),
    };
    SCHEMA.replace("{serial_pk}", serial_pk).replace("{int}", int).replace("{bytes}", bytes)
}

/// What one enclave step leaves for the store, written in one transaction: a crash
/// keeps all of it or none of it, so the log never has an entry whose event is lost,
/// nor an event without its entries.
#[derive(Debug, Default)]
pub struct Commit<'a> {
    pub round: u64,
    pub open: Option<(&'a RoundConfig, Timestamp)>,
    pub message: Option<(MessageKind, Timestamp, &'a [u8])>,
    /// A masked input spooled to a file as it arrived: stored in parts of
    /// [`BODY_PART_BYTES`], read from the file one at a time (the server never holds it).
    pub masked_input_file: Option<(Timestamp, &'a tessera_enclave::spool::SpooledInput)>,
    pub sealed: Option<(u64, &'a [u8])>,
    pub log: &'a [StoredLogEntry],
    pub finish: Option<&'a Finish>,
}

/// The size of the parts a spooled masked input is stored in (the last may be shorter).
pub const BODY_PART_BYTES: usize = 1 << 20;

/// The event kind of a masked input stored in parts (`event_parts`), not in `events.body`.
const MASKED_INPUT_PARTS: &str = "masked_input_parts";

/// How a round ended: its status, outcome, and for a release the signed release (JSON)
/// and the mean (little-endian f32s), stored in parts of [`BODY_PART_BYTES`] from the
/// bytes the release shares, so that storing it copies one part at a time.
#[derive(Debug)]
pub struct Finish {
    pub status: &'static str,
    pub outcome: String,
    pub release: Option<String>,
    pub mean: Option<bytes::Bytes>,
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
    /// Opens (creating if needed) the SQLite database at `path`.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::connect(&format!("sqlite://{}?mode=rwc", path.display())).await
    }

    /// Opens the store at `url`: `sqlite://PATH` or `postgres://USER@HOST:PORT/DB`
    /// (the database must exist; the tables are created if missing).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of(url).ok_or_else(|| StoreError::Url(redact(url)))?;
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 8 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    match backend {
                        // WAL, and FULL: a commit is on disk before the client hears 2xx.
                        // A 256 KiB page cache per connection, not SQLite's 2 MB: the store
                        // appends parts and reads them back once, and four full caches were
                        // a fifth of the server's memory beside the sum (measured).
                        Backend::Sqlite => {
                            conn.execute("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000; PRAGMA cache_size = -256;").await?
                        }
                        // The same for PostgreSQL, whatever the server's default.
                        Backend::Postgres => conn.execute("SET synchronous_commit = on").await?,
                    };
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        let single_writer = match backend {
            Backend::Postgres => Some(std::sync::Arc::new(tokio::sync::Mutex::new(Self::hold_server_lock(url).await?))),
            Backend::Sqlite => None,
        };
        let store = Store { pool, backend, _single_writer: single_writer };
        // Under the step lock: two servers starting on one empty database would race
        // to create the tables.
        let mut tx = store.begin_step().await?;
        tx.execute(schema(backend).as_str()).await?;
        tx.commit().await?;
        Ok(store)
    }

    /// Takes the database's server lock on a connection of its own. A server killed a
    /// moment ago may still hold it until PostgreSQL notices the closed connection, so
    /// this retries for a while before giving up.
    async fn hold_server_lock(url: &str) -> Result<sqlx::AnyConnection, StoreError> {
        use sqlx::Connection;
        let mut conn = sqlx::AnyConnection::connect(url).await?;
        for _ in 0..60 {
            let held: bool = sqlx::query("SELECT pg_try_advisory_lock($1)").bind(PG_SERVER_LOCK).fetch_one(&mut conn).await?.try_get(0)?;
            if held {
                return Ok(conn);
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        Err(StoreError::Busy(redact(url)))
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Starts a step's transaction, holding the store's write lock until it ends.
    async fn begin_step(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        Ok(match self.backend {
            // IMMEDIATE: the write lock is taken before the first read, so a write
            // committed meanwhile by another connection (evidence is stored outside the
            // round lock) waits for busy_timeout instead of failing the upgrade with
            // SQLITE_BUSY_SNAPSHOT, which made a refused admission's log entry fail to
            // store and the round rebuild.
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            // READ COMMITTED plus one advisory lock: steps run one at a time, so the
            // next event index and log index each step reads cannot change under it.
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(PG_STEP_LOCK).execute(&mut *tx).await?;
                tx
            }
        })
    }

    pub async fn get_kv(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(sqlx::query("SELECT value FROM kv WHERE key = $1").bind(key).fetch_optional(&self.pool).await?.map(|r| r.get(0)))
    }

    pub async fn put_kv(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO kv (key, value) VALUES ($1, $2) ON CONFLICT(key) DO UPDATE SET value = excluded.value")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Writes one enclave step atomically; see [`Commit`].
    pub async fn commit(&self, c: Commit<'_>) -> Result<(), StoreError> {
        let mut tx = self.begin_step().await?;
        if let Some((cfg, opened_at)) = c.open {
            let json = serde_json::to_string(cfg).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            sqlx::query("INSERT INTO rounds (round, config, opened_at, status) VALUES ($1, $2, $3, 'open')")
                .bind(cfg.round as i64)
                .bind(json)
                .bind(opened_at.0 as i64)
                .execute(&mut *tx)
                .await?;
        }
        // The body is bound by reference: a message is not copied again to be stored. The
        // event's index comes back, for the parts of a masked input stored beside it.
        fn event<'q>(
            round: u64,
            kind: &str,
            received_at: u64,
            seq: Option<i64>,
            body: &'q [u8],
        ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
            sqlx::query(
                "INSERT INTO events (round, idx, kind, received_at, seq, body) \
                 VALUES ($1, (SELECT COALESCE(MAX(idx), 0) + 1 FROM events WHERE round = $1), $2, $3, $4, $5) RETURNING idx",
            )
            .bind(round as i64)
            .bind(kind.to_string())
            .bind(received_at as i64)
            .bind(seq)
            .bind(body)
        }
        if let Some((kind, at, body)) = c.message {
            event(c.round, kind_name(kind), at.0, None, body).execute(&mut *tx).await?;
        }
        if let Some((at, input)) = c.masked_input_file {
            let idx: i64 = event(c.round, MASKED_INPUT_PARTS, at.0, None, &[]).fetch_one(&mut *tx).await?.get(0);
            let len = input.len();
            let mut part = vec![0u8; BODY_PART_BYTES];
            let mut offset = 0u64;
            let mut index = 0i64;
            while offset < len {
                let n = (len - offset).min(BODY_PART_BYTES as u64) as usize;
                input.read_exact_at(&mut part[..n], offset).map_err(|e| StoreError::Spool(e.to_string()))?;
                sqlx::query("INSERT INTO event_parts (round, idx, part, data) VALUES ($1, $2, $3, $4)")
                    .bind(c.round as i64)
                    .bind(idx)
                    .bind(index)
                    .bind(&part[..n])
                    .execute(&mut *tx)
                    .await?;
                offset += n as u64;
                index += 1;
            }
        }
        if let Some((seq, sealed)) = c.sealed {
            event(c.round, "sealed", 0, Some(seq as i64), sealed).execute(&mut *tx).await?;
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
            sqlx::query("INSERT INTO log (idx, round, timestamp_ms, data) VALUES ($1, $2, $3, $4)")
                .bind(e.index as i64)
                .bind(e.round as i64)
                .bind(e.timestamp_ms as i64)
                .bind(&e.data)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(f) = c.finish {
            sqlx::query("UPDATE rounds SET status = $1, outcome = $2, release = $3 WHERE round = $4")
                .bind(f.status)
                .bind(f.outcome.as_str())
                .bind(f.release.as_deref())
                .bind(c.round as i64)
                .execute(&mut *tx)
                .await?;
            // A round finished again (a replay after a commit whose answer was lost) stores
            // its mean again, in place of what was there.
            sqlx::query("DELETE FROM mean_parts WHERE round = $1").bind(c.round as i64).execute(&mut *tx).await?;
            for (index, part) in f.mean.as_deref().unwrap_or_default().chunks(BODY_PART_BYTES).enumerate() {
                sqlx::query("INSERT INTO mean_parts (round, part, data) VALUES ($1, $2, $3)")
                    .bind(c.round as i64)
                    .bind(index as i64)
                    .bind(part)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    fn log_row(r: AnyRow) -> StoredLogEntry {
        StoredLogEntry {
            index: r.get::<i64, _>("idx") as u64,
            round: r.get::<i64, _>("round") as u64,
            timestamp_ms: r.get::<i64, _>("timestamp_ms") as u64,
            data: r.get("data"),
        }
    }

    /// Log entries with `start <= index < end`, in order.
    pub async fn log_range(&self, start: u64, end: u64) -> Result<Vec<StoredLogEntry>, StoreError> {
        let rows = sqlx::query("SELECT idx, round, timestamp_ms, data FROM log WHERE idx >= $1 AND idx < $2 ORDER BY idx")
            .bind(start.min(i64::MAX as u64) as i64)
            .bind(end.min(i64::MAX as u64) as i64)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Self::log_row).collect())
    }

    /// A round's log entries, in order.
    pub async fn log_of_round(&self, round: u64) -> Result<Vec<StoredLogEntry>, StoreError> {
        let rows = sqlx::query("SELECT idx, round, timestamp_ms, data FROM log WHERE round = $1 ORDER BY idx").bind(round as i64).fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(Self::log_row).collect())
    }

    /// Keeps evidence the aggregator presented, so a report can carry the evidence its
    /// round was opened under even after restarts produced newer evidence.
    pub async fn put_evidence(&self, sha256: &str, evidence: &[u8], tls_fingerprint: &str, at_ms: u64) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO evidence (sha256, evidence, tls_fingerprint, first_seen_ms) VALUES ($1, $2, $3, $4) ON CONFLICT(sha256) DO NOTHING")
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
        Ok(sqlx::query("SELECT evidence, tls_fingerprint FROM evidence WHERE sha256 = $1")
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| (r.get(0), r.get(1))))
    }

    pub async fn record_denial(&self, d: &Denial) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO denials (at_ms, method, path, status, principal, reason) VALUES ($1, $2, $3, $4, $5, $6)")
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
            sqlx::query(&format!("DELETE FROM denials WHERE {kind} AND id NOT IN (SELECT id FROM denials WHERE {kind} ORDER BY id DESC LIMIT $1)"))
                .bind(keep as i64)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// The most recent denials, newest first.
    pub async fn denials(&self, limit: u32) -> Result<Vec<Denial>, StoreError> {
        let rows = sqlx::query("SELECT at_ms, method, path, status, principal, reason FROM denials ORDER BY id DESC LIMIT $1")
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

    fn row(r: AnyRow) -> Result<RoundRow, StoreError> {
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
        sqlx::query("SELECT round, config, opened_at, status, outcome, release FROM rounds WHERE round = $1")
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

    /// A released round's mean, read one part at a time into a buffer of its length; a
    /// store written before the mean was kept in parts holds it in `rounds.mean`.
    pub async fn mean(&self, round: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let len: Option<i64> = sqlx::query("SELECT SUM(LENGTH(data)) FROM mean_parts WHERE round = $1").bind(round as i64).fetch_one(&self.pool).await?.get(0);
        let Some(len) = len else {
            return Ok(sqlx::query("SELECT mean FROM rounds WHERE round = $1 AND mean IS NOT NULL")
                .bind(round as i64)
                .fetch_optional(&self.pool)
                .await?
                .map(|r| r.get(0)));
        };
        let mut mean = Vec::with_capacity(usize::try_from(len).map_err(|_| StoreError::Corrupt(format!("round {round}'s mean is {len} bytes")))?);
        self.each_part("SELECT data FROM mean_parts WHERE round = $1 AND part = $2", &[round as i64], |data, _| {
            mean.extend_from_slice(data);
            Ok(())
        })
        .await?;
        if mean.len() as i64 != len {
            return Err(StoreError::Corrupt(format!("round {round}'s mean parts do not follow each other from part 0")));
        }
        Ok(Some(mean))
    }

    /// A round's events, in order. The masked inputs stored in parts are read back one
    /// part at a time into one unnamed file in `spool` (gone when the last event is
    /// dropped), each at its own offset: a restore holds none of them in memory and opens
    /// one file however many there are. An input whose parts are missing reads as empty
    /// (the replay then refuses it, and the round is not resumed).
    pub async fn events(&self, round: u64, spool: &Path) -> Result<Vec<StoredEvent>, StoreError> {
        let rows =
            sqlx::query("SELECT idx, kind, received_at, seq, body FROM events WHERE round = $1 ORDER BY idx").bind(round as i64).fetch_all(&self.pool).await?;
        let mut events = Vec::with_capacity(rows.len());
        let mut inputs: Option<(std::sync::Arc<std::fs::File>, u64)> = None;
        for r in rows {
            let kind: String = r.get("kind");
            if kind == MASKED_INPUT_PARTS {
                let idx: i64 = r.get("idx");
                if inputs.is_none() {
                    let file = tempfile::tempfile_in(spool).map_err(|e| StoreError::Spool(format!("{}: {e}", spool.display())))?;
                    inputs = Some((std::sync::Arc::new(file), 0));
                }
                let Some((file, end)) = inputs.as_mut() else { unreachable!("created above") };
                let len = self.read_parts(round, idx, file, *end, spool).await?;
                let input = tessera_enclave::spool::SpooledInput::part(file.clone(), *end, len);
                *end += len;
                events.push(StoredEvent::MaskedInputFile { received_at: Timestamp(r.get::<i64, _>("received_at") as u64), input });
                continue;
            }
            events.push({
                let body: Vec<u8> = r.get("body");
                if kind == "sealed" {
                    let seq: Option<i64> = r.get("seq");
                    let seq = seq.ok_or_else(|| StoreError::Corrupt("sealed event without sequence".into()))?;
                    StoredEvent::Sealed { seq: seq as u64, sealed: body }
                } else {
                    let kind = kind_from(&kind).ok_or_else(|| StoreError::Corrupt(format!("unknown event kind {kind}")))?;
                    StoredEvent::Message { kind, received_at: Timestamp(r.get::<i64, _>("received_at") as u64), body }
                }
            });
        }
        Ok(events)
    }

    /// Writes the parts of event `idx` of `round`, in order, to `file` from byte `at`;
    /// returns how many bytes they hold.
    async fn read_parts(&self, round: u64, idx: i64, file: &std::fs::File, at: u64, spool: &Path) -> Result<u64, StoreError> {
        use std::os::unix::fs::FileExt;
        let spool_err = |e: std::io::Error| StoreError::Spool(format!("{}: {e}", spool.display()));
        self.each_part("SELECT data FROM event_parts WHERE round = $1 AND idx = $2 AND part = $3", &[round as i64, idx], |data, offset| {
            file.write_all_at(data, at + offset).map_err(spool_err)
        })
        .await
    }

    /// Hands `sink` each part that `sql` selects (its keys bound from `keys`, then the
    /// part's number), with its offset, one at a time from part 0 until one is missing;
    /// returns how many bytes the parts held.
    async fn each_part(&self, sql: &str, keys: &[i64], mut sink: impl FnMut(&[u8], u64) -> Result<(), StoreError>) -> Result<u64, StoreError> {
        let mut len = 0u64;
        for part in 0i64.. {
            let query = keys.iter().fold(sqlx::query(sql), |q, k| q.bind(*k));
            let Some(row) = query.bind(part).fetch_optional(&self.pool).await? else { break };
            let data: Vec<u8> = row.get(0);
            sink(&data, len)?;
            len += data.len() as u64;
        }
        Ok(len)
    }
}

/// For tests: the admin URL of the PostgreSQL server that `TESSERA_TEST_POSTGRES` names
/// (ending in `/DATABASE`, as `scripts/postgres start` prints). `Ok(None)` when the
/// variable is unset, with a line on stderr saying what (`what`) does not run; an error
/// under `CI=true`, where `scripts/test` always starts that server.
pub fn test_postgres_admin(what: &str) -> Result<Option<String>, String> {
    match std::env::var("TESSERA_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => Ok(Some(url)),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            Err("CI=true but TESSERA_TEST_POSTGRES is unset: scripts/test starts PostgreSQL and sets it".into())
        }
        _ => {
            eprintln!("NOT RUN against PostgreSQL ({what}): TESSERA_TEST_POSTGRES is unset; scripts/test sets it");
            Ok(None)
        }
    }
}

/// For tests: a fresh, empty database on the server [`test_postgres_admin`] names, as a
/// store URL (`Ok(None)` when there is no such server outside CI).
pub async fn test_postgres_database(label: &str) -> Result<Option<String>, String> {
    match test_postgres_admin(label)? {
        Some(admin) => create_database(&admin, label).await.map(Some),
        None => Ok(None),
    }
}

/// Creates a fresh database `tessera_LABEL_PID_N` on the PostgreSQL server `admin` names
/// (a URL ending in `/DATABASE`) and returns its URL: for tests and the load harness.
pub async fn create_database(admin: &str, label: &str) -> Result<String, String> {
    use sqlx::Connection;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if !label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
        return Err(format!("database label {label:?} must be lower-case letters, digits and _"));
    }
    let (base, _) = admin.rsplit_once('/').ok_or_else(|| format!("{} names no database", redact(admin)))?;
    let name = format!("tessera_{label}_{}_{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let mut conn = sqlx::PgConnection::connect(admin).await.map_err(|e| format!("{}: {e}", redact(admin)))?;
    conn.execute(format!("CREATE DATABASE {name}").as_str()).await.map_err(|e| format!("CREATE DATABASE {name}: {e}"))?;
    conn.close().await.map_err(|e| e.to_string())?;
    Ok(format!("{base}/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spool() -> std::path::PathBuf {
        std::env::temp_dir()
    }

    fn entry(index: u64) -> StoredLogEntry {
        StoredLogEntry { index, round: 1, timestamp_ms: 0, data: format!("entry {index}").into_bytes() }
    }

    /// A step that fails half-way (here: its second log entry collides) leaves nothing of
    /// itself behind: not the message, not the first entry. The log stays a prefix.
    async fn a_commit_that_fails_half_way_leaves_nothing(store: Store) {
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
        assert!(store.events(1, &spool()).await.unwrap().is_empty());
        let message = (MessageKind::Advertise, Timestamp(2), &b"{}"[..]);
        let err = store.commit(Commit { round: 1, message: Some(message), log: &colliding, ..Default::default() }).await;
        assert!(err.is_err());
        assert!(store.events(1, &spool()).await.unwrap().is_empty(), "the message of the failed step was not kept");
        // Nor are the parts of a spooled masked input.
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &vec![7u8; BODY_PART_BYTES + 1]).unwrap();
        let input = tessera_enclave::spool::SpooledInput::whole(file).unwrap();
        assert!(store.commit(Commit { round: 1, masked_input_file: Some((Timestamp(2), &input)), log: &colliding, ..Default::default() }).await.is_err());
        assert!(store.events(1, &spool()).await.unwrap().is_empty());
        let parts: i64 = sqlx::query("SELECT COUNT(*) FROM event_parts").fetch_one(&store.pool).await.unwrap().get(0);
        assert_eq!(parts, 0, "the parts of the failed step were not kept");
        // Nor the mean of a round end that fails with its step.
        let finish = Finish { status: "finished", outcome: "released".into(), release: Some("{}".into()), mean: Some(vec![9u8; BODY_PART_BYTES + 1].into()) };
        assert!(store.commit(Commit { round: 1, finish: Some(&finish), log: &colliding, ..Default::default() }).await.is_err());
        let parts: i64 = sqlx::query("SELECT COUNT(*) FROM mean_parts").fetch_one(&store.pool).await.unwrap().get(0);
        assert_eq!(parts, 0, "the mean of the failed step was not kept");
        assert_eq!(store.round(1).await.unwrap().unwrap().status, "open");
        assert_eq!(store.log_range(0, u64::MAX).await.unwrap(), first.to_vec());
        // The next step appends where the log really ends.
        store.commit(Commit { round: 1, message: Some(message), log: &[entry(1)], ..Default::default() }).await.unwrap();
        assert_eq!(store.log_range(0, u64::MAX).await.unwrap().len(), 2);
        assert_eq!(store.events(1, &spool()).await.unwrap().len(), 1);
    }

    /// Everything the store keeps reads back as written: rounds with their config,
    /// status and release, events in order, the log, the mean, evidence, key-value pairs
    /// and denials (pruned per kind).
    async fn everything_reads_back(store: Store) {
        let cfg = RoundConfig::with_defaults(7, vec!["00".repeat(32), "11".repeat(32), "22".repeat(32)], 4, [0; 32]);
        store.commit(Commit { round: 7, open: Some((&cfg, Timestamp(5))), log: &[entry(0)], ..Default::default() }).await.unwrap();
        store.commit(Commit { round: 7, message: Some((MessageKind::Advertise, Timestamp(6), &b"adv"[..])), ..Default::default() }).await.unwrap();
        store.commit(Commit { round: 7, sealed: Some((3, &b"sealed"[..])), log: &[entry(1)], ..Default::default() }).await.unwrap();
        // The mean is stored in parts: here 2.5 of them.
        let mean: Vec<u8> = (0..BODY_PART_BYTES * 5 / 2).map(|i| (i * 13 + i / 5) as u8).collect();
        let finish = Finish { status: "finished", outcome: "released".into(), release: Some("{}".into()), mean: Some(mean.clone().into()) };
        store.commit(Commit { round: 7, finish: Some(&finish), ..Default::default() }).await.unwrap();
        let parts: i64 = sqlx::query("SELECT COUNT(*) FROM mean_parts WHERE round = 7").fetch_one(&store.pool).await.unwrap().get(0);
        assert_eq!(parts, 3);
        // Finishing the round again (a replay after a commit whose answer was lost)
        // stores the mean again, not a second copy beside the first.
        store.commit(Commit { round: 7, finish: Some(&finish), ..Default::default() }).await.unwrap();
        let parts: i64 = sqlx::query("SELECT COUNT(*) FROM mean_parts WHERE round = 7").fetch_one(&store.pool).await.unwrap().get(0);
        assert_eq!(parts, 3);
        let row = store.round(7).await.unwrap().unwrap();
        assert_eq!(
            (row.round, row.opened_at, row.status.as_str(), row.outcome.as_deref(), row.release.as_deref()),
            (7, Timestamp(5), "finished", Some("released"), Some("{}"))
        );
        assert_eq!(row.config, cfg);
        assert_eq!(store.latest_round().await.unwrap().unwrap().round, 7);
        assert_eq!(store.rounds().await.unwrap().len(), 1);
        assert!(store.round(8).await.unwrap().is_none());
        assert!(store.mean(7).await.unwrap() == Some(mean), "the mean reads back from its parts");
        // A store written before the mean was kept in parts has it in its round's row.
        let cfg6 = RoundConfig { round: 6, ..cfg.clone() };
        store.commit(Commit { round: 6, open: Some((&cfg6, Timestamp(4))), ..Default::default() }).await.unwrap();
        sqlx::query("UPDATE rounds SET mean = $1 WHERE round = 6").bind(&[1u8, 2, 3][..]).execute(&store.pool).await.unwrap();
        assert_eq!(store.mean(6).await.unwrap(), Some(vec![1, 2, 3]));
        assert_eq!(store.mean(8).await.unwrap(), None);
        // A part the host deleted is named, not served as a shorter mean.
        sqlx::query("DELETE FROM mean_parts WHERE round = 7 AND part = 1").execute(&store.pool).await.unwrap();
        assert!(matches!(store.mean(7).await, Err(StoreError::Corrupt(_))));
        let events = store.events(7, &spool()).await.unwrap();
        assert!(matches!(&events[0], StoredEvent::Message { kind: MessageKind::Advertise, received_at: Timestamp(6), body } if body == b"adv"));
        assert!(matches!(&events[1], StoredEvent::Sealed { seq: 3, sealed } if sealed == b"sealed"));
        // A spooled masked input is stored in parts and reads back, in its place among
        // the events, as the same bytes in a file: here 2.5 parts, then one shorter than a part.
        use std::io::{Read, Write};
        for len in [BODY_PART_BYTES * 5 / 2, 1000] {
            let body: Vec<u8> = (0..len).map(|i| (i * 31 + i / 7) as u8).collect();
            let mut file = tempfile::tempfile().unwrap();
            file.write_all(&body).unwrap();
            let input = tessera_enclave::spool::SpooledInput::whole(file).unwrap();
            store.commit(Commit { round: 7, masked_input_file: Some((Timestamp(8), &input)), log: &[], ..Default::default() }).await.unwrap();
            store.commit(Commit { round: 7, message: Some((MessageKind::Consistency, Timestamp(9), &b"c"[..])), ..Default::default() }).await.unwrap();
            let events = store.events(7, &spool()).await.unwrap();
            let StoredEvent::MaskedInputFile { received_at: Timestamp(8), input } = &events[events.len() - 2] else { panic!("{:?}", events[events.len() - 2]) };
            let mut back = Vec::new();
            input.reader().read_to_end(&mut back).unwrap();
            assert!(back == body, "{len} bytes read back as {} different ones", back.len());
            assert!(matches!(&events[events.len() - 1], StoredEvent::Message { kind: MessageKind::Consistency, .. }));
        }
        let parts: i64 = sqlx::query("SELECT COUNT(*) FROM event_parts WHERE round = 7").fetch_one(&store.pool).await.unwrap().get(0);
        assert_eq!(parts, 3 + 1);
        // Parts the host deleted read back as an empty input (which the replay refuses,
        // so the round is not resumed), not as a store that cannot start.
        sqlx::query("DELETE FROM event_parts WHERE round = 7 AND part = 0").execute(&store.pool).await.unwrap();
        let events = store.events(7, &spool()).await.unwrap();
        let emptied = events.iter().filter(|e| matches!(e, StoredEvent::MaskedInputFile { input, .. } if input.is_empty())).count();
        assert_eq!(emptied, 2);
        assert_eq!(store.log_of_round(1).await.unwrap(), vec![entry(0), entry(1)]);
        assert_eq!(store.log_range(1, 2).await.unwrap(), vec![entry(1)]);
        store.put_kv("k", b"v1").await.unwrap();
        store.put_kv("k", b"v2").await.unwrap();
        assert_eq!(store.get_kv("k").await.unwrap(), Some(b"v2".to_vec()));
        assert_eq!(store.get_kv("missing").await.unwrap(), None);
        store.put_evidence("ab", b"evidence", "fp", 9).await.unwrap();
        store.put_evidence("ab", b"other", "fp2", 10).await.unwrap();
        assert_eq!(store.evidence("ab").await.unwrap(), Some((b"evidence".to_vec(), "fp".to_string())), "the first evidence stays");
        for i in 0..5u64 {
            let principal = (i % 2 == 0).then(|| format!("p{i}"));
            store.record_denial(&Denial { at_ms: i, method: "GET".into(), path: "/x".into(), status: 403, principal, reason: "no".into() }).await.unwrap();
        }
        store.prune_denials(1).await.unwrap();
        let kept: Vec<u64> = store.denials(10).await.unwrap().iter().map(|d| d.at_ms).collect();
        assert_eq!(kept, vec![4, 3], "the newest of each kind");
    }

    #[tokio::test]
    async fn sqlite_commits_are_atomic() {
        let dir = tempfile::tempdir().unwrap();
        a_commit_that_fails_half_way_leaves_nothing(Store::open(&dir.path().join("t.db")).await.unwrap()).await;
    }

    #[tokio::test]
    async fn sqlite_reads_back_what_it_stored() {
        let dir = tempfile::tempdir().unwrap();
        everything_reads_back(Store::open(&dir.path().join("t.db")).await.unwrap()).await;
    }

    #[tokio::test]
    async fn postgres_commits_are_atomic() {
        if let Some(url) = test_postgres_database("store_atomic").await.unwrap() {
            let store = Store::connect(&url).await.unwrap();
            assert_eq!(store.backend(), Backend::Postgres);
            a_commit_that_fails_half_way_leaves_nothing(store).await;
        }
    }

    /// A second server on the same database refuses to start (after its retries), and
    /// starts once the first is gone.
    #[tokio::test]
    async fn postgres_admits_one_server_per_database() {
        let Some(url) = test_postgres_database("store_single").await.unwrap() else { return };
        let first = Store::connect(&url).await.unwrap();
        let started = std::time::Instant::now();
        let err = Store::connect(&url).await.unwrap_err();
        assert!(matches!(err, StoreError::Busy(_)), "{err}");
        assert!(err.to_string().contains("another tessera-server holds the database"), "{err}");
        assert!(started.elapsed() >= std::time::Duration::from_secs(10), "gave up after {:?}", started.elapsed());
        drop(first);
        Store::connect(&url).await.unwrap();
    }

    #[tokio::test]
    async fn postgres_reads_back_what_it_stored() {
        if let Some(url) = test_postgres_database("store_reads").await.unwrap() {
            everything_reads_back(Store::connect(&url).await.unwrap()).await;
        }
    }

    #[test]
    fn store_urls_are_checked_and_passwords_redacted() {
        assert_eq!(Backend::of("sqlite:///tmp/x.db"), Some(Backend::Sqlite));
        assert_eq!(Backend::of("postgresql://u@h/db"), Some(Backend::Postgres));
        assert_eq!(Backend::of("mysql://u@h/db"), None);
        assert_eq!(redact("postgres://tessera:s3cret@db.example:5432/rounds"), "postgres://tessera:…@db.example:5432/rounds");
        assert_eq!(redact("postgres://tessera@db/rounds"), "postgres://tessera@db/rounds");
        assert_eq!(redact("postgres://tessera@db/rounds?sslmode=disable&password=s3cret"), "postgres://tessera@db/rounds?sslmode=disable&password=…");
    }
}
