//! Shared harness for Tessera's integration tests and the demo: institutions with real
//! identities, server configurations on loopback, synthetic updates and plaintext FedAvg
//! to check the secure aggregate against.

pub mod fake_snp;
pub mod plot;

use std::path::{Path, PathBuf};

use tessera_client::Identity;
use tessera_server::config::{Institution, RoundParams, RoundSchedule, ServerConfig};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// `n` institutions, each with an identity directory under `root`.
pub fn institutions(root: &Path, n: usize) -> Vec<(PathBuf, Identity)> {
    (0..n)
        .map(|i| {
            let dir = root.join(format!("institution-{i}"));
            let id = Identity::init(&dir, &format!("institution-{i}")).expect("identity");
            (dir, id)
        })
        .collect()
}

pub fn server_config(data_dir: &Path, listen: std::net::SocketAddr, ids: &[(PathBuf, Identity)], params: RoundParams, rounds: u64) -> ServerConfig {
    ServerConfig {
        listen,
        data_dir: data_dir.to_path_buf(),
        admin_token: ADMIN_TOKEN.into(),
        dev_insecure: true,
        tee: None,
        node_policy: tessera_attestation::policy::NodePolicy::insecure_dev(),
        rounds: RoundSchedule {
            auto_open: rounds > 0,
            count: rounds,
            mode: if params.cohort.is_some() { tessera_server::config::RoundMode::Buffered } else { Default::default() },
            params,
        },
        institutions: ids.iter().map(|(_, id)| Institution { name: id.name.clone(), public_key: id.public_key_hex() }).collect(),
        access: Vec::new(),
        certificate_refresh_secs: tessera_server::config::DEFAULT_CERTIFICATE_REFRESH_SECS,
        privacy: None,
        limits: Default::default(),
        threads: None,
        store: None,
    }
}

/// A deterministic, institution-specific update with values in [-0.5, 0.5].
pub fn synthetic_update(institution: usize, round: u64, m: usize) -> Vec<f32> {
    (0..m).map(|j| (((institution * 7919 + j * 104_729 + round as usize * 31) % 1000) as f32 / 1000.0) - 0.5).collect()
}

/// Plaintext FedAvg: Σ w_i x_i / Σ w_i over the included institutions.
pub fn fedavg(updates: &[(Vec<f32>, u32)], included: &[usize]) -> Vec<f32> {
    let m = updates[0].0.len();
    let total: f64 = included.iter().map(|&i| updates[i].1 as f64).sum();
    (0..m).map(|j| (included.iter().map(|&i| updates[i].0[j] as f64 * updates[i].1 as f64).sum::<f64>() / total) as f32).collect()
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// The auditor CLI `tessera-attest`, built by `cargo test --workspace` next to the
/// running test's directory.
pub fn attest_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let bin = exe.parent().and_then(|d| d.parent()).expect("target directory").join("tessera-attest");
    assert!(bin.exists(), "{} is missing: run the tests with `cargo test --workspace`", bin.display());
    bin
}

/// The institution CLI `tessera-client`, built by `cargo test --workspace` next to the
/// running test's directory.
pub fn client_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let bin = exe.parent().and_then(|d| d.parent()).expect("target directory").join("tessera-client");
    assert!(bin.exists(), "{} is missing: run the tests with `cargo test --workspace`", bin.display());
    bin
}

/// Runs `tessera-attest audit` on `bundle` (written to `dir`) under the dev policy, with
/// `extra` arguments (`--json`); the CLI's output, whatever its exit status.
pub fn audit_with_cli(dir: &std::path::Path, bundle: &tessera_attestation::audit::RoundBundle, extra: &[&str]) -> std::process::Output {
    std::fs::create_dir_all(dir).expect("audit directory");
    let (file, policy) = (dir.join(format!("round-{}.json", bundle.round)), dir.join("dev.toml"));
    std::fs::write(&file, serde_json::to_vec(bundle).expect("bundle serializes")).expect("write bundle");
    std::fs::write(&policy, b"allow_insecure_dev = true\n").expect("write policy");
    std::process::Command::new(attest_bin()).arg("audit").arg(&file).arg("--policy").arg(&policy).args(extra).output().expect("run tessera-attest")
}

/// What an honest client trusts for the server's open round, read the way
/// `participate` reads it: the enclave's identity key from its (dev) evidence and the
/// configuration's signature from the round status.
pub async fn dev_trust(api: &tessera_client::Api, status: &serde_json::Value) -> tessera_secagg::client::Trust {
    let aggregator_key = tessera_client::participate::check_aggregator(api, true, None).await.expect("the aggregator's dev evidence verifies");
    let config_signature = status["config_signature"]
        .as_str()
        .and_then(|h| hex::decode(h).ok())
        .and_then(|v| v.try_into().ok())
        .expect("the open round's status carries the configuration's signature");
    tessera_secagg::client::Trust { aggregator_key, config_signature, floors: Default::default() }
}

/// A `tessera-server` process (`run --config`), killed when dropped.
#[derive(Debug)]
pub struct ServerProcess {
    pub child: std::process::Child,
    /// The SHA-256 of the server's TLS public key, from its READY line.
    pub fingerprint: [u8; 32],
}

impl ServerProcess {
    /// Starts `bin` on `config` with `RUST_LOG = log` (its log goes to this process's
    /// stderr) and waits for its READY line.
    pub fn start(bin: &Path, config: &Path, log: &str) -> anyhow::Result<ServerProcess> {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new(bin).args(["run", "--config"]).arg(config).env("RUST_LOG", log).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?;
        let mut line = String::new();
        let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("the server has no stdout"))?;
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let fingerprint = line
            .split("fingerprint=")
            .nth(1)
            .map(str::trim)
            .and_then(|h| hex::decode(h).ok())
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| anyhow::anyhow!("the server did not start: {line:?}"))?;
        Ok(ServerProcess { child, fingerprint })
    }

    /// SIGKILL: no shutdown code runs, as in a power cut.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A counter's value in the server's `/metrics` text (`NAME VALUE` lines).
pub fn metric(metrics: &str, name: &str) -> Option<u64> {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}
