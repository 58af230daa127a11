//! The load harness at N = 200: two hundred institutions, each with its own identity,
//! TLS connection and the real protocol, against a real `tessera-server` process; the
//! harness fails on any institution's error. The server keeps its state in PostgreSQL
//! when `TESSERA_TEST_POSTGRES` names a server (as `scripts/test` does), else SQLite.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[test]
fn the_load_harness_runs_a_round_of_200_institutions_without_errors() {
    // The aggregator as this package builds it (the same code as `tessera-server`).
    let server = env!("CARGO_BIN_EXE_tessera-test-aggregator");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tessera-load"));
    cmd.args(["--n", "200", "--m", "10000", "--dropout", "0.1", "--phase-timeout-ms", "15000", "--wait", "300", "--server-bin", server]);
    let postgres = tessera_server::store::test_postgres_admin("load harness, run on SQLite instead").unwrap();
    if let Some(admin) = &postgres {
        cmd.args(["--postgres", admin]);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let store = if postgres.is_some() { "PostgreSQL" } else { "SQLite" };
    assert!(stdout.contains(&format!("store: {store}; n = 200, m = 10000, 20 dropped")), "{stdout}");
    assert!(stdout.contains("180 completed, 20 dropped as planned, 0 errors"), "{stdout}");
    assert!(stdout.contains("| POST /v1/rounds/{round}/masked-input | 180 |"), "{stdout}");
    // Every institution read its own view of the key directory, once.
    assert!(stdout.contains("| GET /v1/rounds/{round}/key-directory/{client} | 200 |"), "{stdout}");
}
