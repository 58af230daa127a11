//! The load harness in a small form: a few institutions against a real `tessera-server`
//! process; the harness fails on any institution's error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[test]
fn the_load_harness_runs_a_round_without_errors() {
    // The aggregator as this package builds it (the same code as `tessera-server`).
    let server = env!("CARGO_BIN_EXE_tessera-test-aggregator");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera-load"))
        .args(["--n", "6", "--m", "2000", "--dropout", "0.2", "--phase-timeout-ms", "3000", "--wait", "120", "--server-bin", server])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("5 completed, 1 dropped as planned, 0 errors"), "{stdout}");
    // One kept-alive connection per institution.
    assert!(stdout.contains("over 6 TLS handshakes"), "{stdout}");
    assert!(stdout.contains("| POST /v1/rounds/{round}/masked-input | 5 |"), "{stdout}");
}
