//! A host that deletes the last commit's log rows (the round's release and final phase
//! closing) and resets the round to "open" gets the release signed again at the next
//! start; before the fix the replay appended nothing, so the log showed the round
//! unfinished and its ε missing from the ledger. Now the replay appends the missing
//! entries again, byte for byte, and a stored entry the events contradict stops the
//! round with the entry named.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sqlx::Row;
use tessera_client::{participate, Api, Options, Participation};
use tessera_server::config::RoundParams;
use tessera_tests::*;

async fn run_one_round(cfg: tessera_server::config::ServerConfig, ids: &[(std::path::PathBuf, tessera_client::Identity)]) {
    let server = tessera_server::spawn(cfg).await.unwrap();
    let url = format!("https://{}", server.addr);
    let mut tasks = Vec::new();
    for (i, (dir, _)) in ids.iter().enumerate() {
        let identity = tessera_client::Identity::load(dir).unwrap();
        let api = Api::new(&url, server.fingerprint).unwrap();
        let opts = Options { insecure_dev: true, round: Some(1), quiet: true, wait: Duration::from_secs(60), ..Options::default() };
        let update = (synthetic_update(i, 1, 8), 1);
        tasks.push(tokio::spawn(async move { participate(&api, &identity, &opts, move |_| Ok(update)).await }));
    }
    for t in tasks {
        assert!(matches!(t.await.unwrap().unwrap(), Participation::Completed(_)));
    }
    server.stop().await;
}

async fn db(data_dir: &std::path::Path) -> sqlx::SqlitePool {
    sqlx::SqlitePool::connect(&format!("sqlite://{}", data_dir.join("tessera.db").display())).await.unwrap()
}

async fn log_rows(pool: &sqlx::SqlitePool) -> Vec<(i64, Vec<u8>)> {
    sqlx::query("SELECT idx, data FROM log ORDER BY idx").fetch_all(pool).await.unwrap().into_iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// Restarts the server on `cfg` and waits until round 1 is no longer open.
async fn restart(cfg: tessera_server::config::ServerConfig) -> serde_json::Value {
    let server = tessera_server::spawn(cfg).await.unwrap();
    let api = Api::new(&format!("https://{}", server.addr), server.fingerprint).unwrap();
    let mut status: serde_json::Value = serde_json::Value::Null;
    for _ in 0..100 {
        status = api.get_json("/v1/rounds/1").await.unwrap();
        if status["phase"] != "unmasking" && status["phase"] != "masked_input" && status["phase"] != "consistency_check" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleted_log_rows_are_appended_again_and_contradicted_ones_stop_the_round() {
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 3);
    let data_dir = root.path().join("server");
    let params = RoundParams { vector_len: 8, min_survivors: 2, phase_timeout_ms: 3_000, ..RoundParams::default() };
    let cfg = server_config(&data_dir, "127.0.0.1:0".parse().unwrap(), &ids, params, 1);
    run_one_round(cfg.clone(), &ids).await;

    let pool = db(&data_dir).await;
    let original = log_rows(&pool).await;
    let released = original.iter().position(|(_, d)| String::from_utf8_lossy(d).contains("\"type\":\"released\"")).expect("a released entry");
    // The host deletes the last commit's rows (the phase closing and the release) and
    // reopens the round.
    let cut = released - 1;
    sqlx::query("DELETE FROM log WHERE idx >= ?").bind(cut as i64).execute(&pool).await.unwrap();
    sqlx::query("UPDATE rounds SET status = 'open', outcome = NULL, release = NULL, mean = NULL WHERE round = 1").execute(&pool).await.unwrap();
    assert_eq!(log_rows(&pool).await.len(), cut);

    let status = restart(cfg.clone()).await;
    assert_eq!(status["phase"], "finished", "{status}");
    assert_eq!(log_rows(&pool).await, original, "the log holds every entry again, byte for byte");

    // A stored entry the round's events contradict: the masked input of client 0 is said
    // to hash otherwise. The round cannot be resumed, and the abort names the entry.
    let masked = original.iter().position(|(_, d)| String::from_utf8_lossy(d).contains("\"type\":\"masked_input\"")).expect("a masked-input entry");
    let text = String::from_utf8(original[masked].1.clone()).unwrap();
    let at = text.find("\"sha256\":\"").unwrap() + 10;
    let flipped = if &text[at..at + 1] == "0" { "1" } else { "0" };
    let tampered = format!("{}{}{}", &text[..at], flipped, &text[at + 1..]);
    sqlx::query("UPDATE log SET data = ? WHERE idx = ?").bind(tampered.as_bytes()).bind(masked as i64).execute(&pool).await.unwrap();
    sqlx::query("DELETE FROM log WHERE idx >= ?").bind(cut as i64).execute(&pool).await.unwrap();
    sqlx::query("UPDATE rounds SET status = 'open', outcome = NULL, release = NULL, mean = NULL WHERE round = 1").execute(&pool).await.unwrap();
    let status = restart(cfg).await;
    assert_eq!(status["phase"], "aborted", "{status}");
    let outcome = status["outcome"].as_str().unwrap();
    assert!(outcome.contains(&format!("disagrees with the replayed round at entry {masked}")), "{outcome}");
}
