//! The chaos soak in a short form: a few rounds with the server SIGKILLed at random
//! moments and institutions crashing mid-round; the soak itself checks that no
//! acknowledged input is lost, every release is the FedAvg of its inputs, every report
//! audits, the log never forks and the data directory holds no plaintext update. Once on
//! SQLite, once on PostgreSQL (`TESSERA_TEST_POSTGRES`, started by `scripts/test`).
//! The long form: `target/release/tessera-soak --rounds 100` (BENCHMARKS.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

fn soak(extra: &[&str]) -> String {
    let server = env!("CARGO_BIN_EXE_tessera-test-aggregator");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera-soak"))
        .args(["--rounds", "4", "--n", "5", "--m", "2048", "--seed", "3", "--server-bin", server])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("lost 0"), "{stdout}");
    assert!(stdout.contains("all consistent with the last"), "{stdout}");
    assert!(stdout.contains("no plaintext update"), "{stdout}");
    let kills: u64 = stdout.split(" server kills").next().and_then(|s| s.rsplit(' ').next()).and_then(|k| k.parse().ok()).unwrap();
    assert!(kills >= 1, "the server was never killed: {stdout}");
    stdout
}

#[test]
fn rounds_survive_server_kills_and_institution_crashes_on_sqlite() {
    let out = soak(&[]);
    assert!(out.contains("store SQLite"), "{out}");
}

#[test]
fn rounds_survive_server_kills_and_institution_crashes_on_postgres() {
    let Some(admin) = tessera_server::store::test_postgres_admin("soak").unwrap() else { return };
    let out = soak(&["--postgres", &admin]);
    assert!(out.contains("store PostgreSQL"), "{out}");
}
