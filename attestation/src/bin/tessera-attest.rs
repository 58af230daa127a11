//! `tessera-attest`: the auditor's command line. Scripts rely on its contract:
//!
//! - `verify EVIDENCE [ENDORSEMENT ...] [--policy FILE] [--at RFC3339] [--report-data HEX] [--json]`
//!   detects the format from the bytes and verifies signatures up to the pinned vendor
//!   root at the given time (default: now), then applies the policy (default: the
//!   secure default policy, which refuses simulated evidence). Exit 0 only when every
//!   check passes; 1 when verification or policy fails (each failed check named); 2 when
//!   the input is unusable (unreadable file, unknown format, malformed evidence, bad policy).
//! - `inspect EVIDENCE` decodes and prints every field without verifying anything.
//! - `fetch URL` gets a running aggregator's evidence over TLS and verifies it, including
//!   its binding to the certificate the server presented in that very connection and to
//!   a fresh nonce of ours (the evidence is made for this request).
//! - `audit BUNDLE [--previous-head FILE] [--mean FILE] [--policy FILE] [--at RFC3339] [--json]`
//!   verifies an exported round report offline: the aggregator's evidence and its binding
//!   to the log key, the signed tree head, every entry's inclusion proof, that the report
//!   is exactly what the entries say, consistency with a tree head kept from earlier, and
//!   the released mean's hash, and that the entries agree with each other (responders
//!   admitted and in the roster, the released set = the masked inputs). Certificates and
//!   collateral are judged at the present time; `--at` reproduces a verdict as of another
//!   time and is printed as such. The policy must pin the aggregator's code (outside dev
//!   mode). Same exit contract; `--save-head FILE` keeps the bundle's tree head for the
//!   next audit.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::{Parser, Subcommand};
use serde_json::json;
use tessera_attestation::policy::{NodePolicy, PolicyFailure, Verdict};
use tessera_attestation::VerifyError;

#[derive(Parser)]
#[command(name = "tessera-attest", version, about = "Verify and inspect TEE attestation evidence (SEV-SNP, TDX, SGX DCAP, Nitro, dev)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct PolicyArgs {
    /// Node policy (TOML). Default: the secure default (no dev evidence, no debug, any measurement).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Verification time, RFC 3339 (default: now).
    #[arg(long)]
    at: Option<String>,
    /// Expected 64-byte report data (hex); without it the binding is not checked.
    #[arg(long)]
    report_data: Option<String>,
    /// Print one JSON object: verified, format, claims, failures.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Verify evidence (and endorsements) against the vendor roots and a policy.
    Verify {
        evidence: PathBuf,
        endorsements: Vec<PathBuf>,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Decode and print every field of the evidence, verifying nothing.
    Inspect { evidence: PathBuf },
    /// Fetch a running aggregator's evidence (https://HOST:PORT) and verify it.
    Fetch {
        url: String,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Verify an exported round report bundle (GET /v1/rounds/N/report) offline.
    Audit {
        bundle: PathBuf,
        /// A signed tree head kept from an earlier audit: the log must extend it.
        #[arg(long)]
        previous_head: Option<PathBuf>,
        /// The released mean (GET /v1/rounds/N/result/mean), checked against the logged hash.
        #[arg(long)]
        mean: Option<PathBuf>,
        /// Write the bundle's tree head here (after a passing audit), for the next one.
        #[arg(long)]
        save_head: Option<PathBuf>,
        #[command(flatten)]
        policy: PolicyArgs,
    },
}

/// Unusable input: exit code 2.
struct Unusable(String);

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(Unusable(why)) => {
            eprintln!("error: {why}");
            ExitCode::from(2)
        }
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, Unusable> {
    std::fs::read(path).map_err(|e| Unusable(format!("cannot read {}: {e}", path.display())))
}

fn now_or(at: &Option<String>) -> Result<u64, Unusable> {
    match at {
        None => Ok(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)),
        Some(t) => chrono::DateTime::parse_from_rfc3339(t)
            .map_err(|e| Unusable(format!("--at {t:?} is not an RFC 3339 time: {e}")))
            .and_then(|d| u64::try_from(d.timestamp()).map_err(|_| Unusable(format!("--at {t:?} is before 1970")))),
    }
}

fn rfc3339(secs: u64) -> Option<String> {
    chrono::DateTime::from_timestamp(i64::try_from(secs).ok()?, 0).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

fn run(cli: Cli) -> Result<bool, Unusable> {
    match cli.command {
        Command::Inspect { evidence } => {
            let bytes = read(&evidence)?;
            let (format, text) = tessera_attestation::inspect(&bytes).map_err(|e| Unusable(e.to_string()))?;
            println!("format: {format}\n{text}");
            Ok(true)
        }
        Command::Verify { evidence, endorsements, policy } => {
            if load_policy(&policy)?.require_pinned_code("this evidence").is_err() {
                eprintln!("WARNING: the policy pins no measurement: a pass says the evidence is genuine and bound, not which code it runs (list allowed_measurements or a per-format section)");
            }
            let bytes = read(&evidence)?;
            let endorsements = endorsements.iter().map(read).collect::<Result<Vec<_>, _>>()?;
            check(&bytes, &endorsements, &policy, None)
        }
        Command::Audit { bundle, previous_head, mean, save_head, policy } => audit(&bundle, previous_head, mean, save_head, &policy),
        Command::Fetch { url, policy } => {
            load_policy(&policy)?.require_pinned_code("the aggregator").map_err(Unusable)?;
            // A nonce of our own: the answer must carry evidence made for it, now.
            let mut nonce = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce).map_err(|_| Unusable("no system randomness".into()))?;
            let (body, cert_der) = fetch(&url, &nonce)?;
            let info: serde_json::Value = serde_json::from_slice(&body).map_err(|e| Unusable(format!("{url}: not an attestation answer: {e}")))?;
            let field = |k: &str| info[k].as_str().map(str::to_string).ok_or_else(|| Unusable(format!("{url}: answer lacks {k}")));
            if !field("nonce")?.eq_ignore_ascii_case(&hex::encode(nonce)) {
                return Err(Unusable(format!("{url}: the answer is not for our nonce")));
            }
            let evidence = hex::decode(field("fresh_evidence")?).map_err(|_| Unusable("evidence is not hex".into()))?;
            let identity: [u8; 32] = hex::decode(field("identity_public_key")?)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| Unusable("identity_public_key is not 32 bytes of hex".into()))?;
            let fingerprint = tessera_attestation::ratls::spki_sha256(&cert_der).map_err(|e| Unusable(format!("{url}: {e}")))?;
            let context = tessera_attestation::binding::fresh_context(&fingerprint, &nonce);
            let expected = tessera_attestation::binding::aggregator_report_data(&identity, &context);
            if !policy.json {
                println!("aggregator {url}: TLS public key SHA-256 {}, enclave identity {}", hex::encode(fingerprint), hex::encode(identity));
            }
            check(&evidence, &[], &policy, Some(expected))
        }
    }
}

fn load_policy(args: &PolicyArgs) -> Result<NodePolicy, Unusable> {
    match &args.policy {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Unusable(format!("cannot read {}: {e}", p.display())))?;
            let policy = NodePolicy::from_toml(&text).map_err(|e| Unusable(format!("policy {}: {e}", p.display())))?;
            policy.validate().map_err(|e| Unusable(format!("policy {}: {e}", p.display())))?;
            if let Some(warning) = policy.extra_roots_warning() {
                eprintln!("{warning} ({})", p.display());
            }
            Ok(policy)
        }
        None => Ok(NodePolicy::default()),
    }
}

fn audit(bundle: &PathBuf, previous_head: Option<PathBuf>, mean: Option<PathBuf>, save_head: Option<PathBuf>, args: &PolicyArgs) -> Result<bool, Unusable> {
    use tessera_attestation::audit::{audit_bundle, AuditInputs, RoundBundle};
    use tessera_attestation::translog::SignedTreeHead;
    let parsed: RoundBundle = serde_json::from_slice(&read(bundle)?).map_err(|e| Unusable(format!("{}: not a round bundle: {e}", bundle.display())))?;
    let previous_head = match &previous_head {
        Some(p) => Some(serde_json::from_slice::<SignedTreeHead>(&read(p)?).map_err(|e| Unusable(format!("{}: not a signed tree head: {e}", p.display())))?),
        None => None,
    };
    // Certificates, CRLs and collateral are judged at the present time: the host chose
    // the round's clock and ships the collateral, so a platform revoked or out of date
    // since then must not audit as verified. `--at` reproduces a verdict as of another
    // time, and says so. (The age limit is measured from the round's opening.)
    let now_secs = now_or(&args.at)?;
    let judged_at = match &args.at {
        Some(at) => format!("{} (--at: reproducing a verdict as of that time, not today's)", rfc3339(now_secs).unwrap_or_else(|| at.clone())),
        None => format!("{} (now)", rfc3339(now_secs).unwrap_or_else(|| now_secs.to_string())),
    };
    let policy = load_policy(args)?;
    policy.require_pinned_code("the aggregator").map_err(Unusable)?;
    let inputs = AuditInputs { policy, now_secs, previous_head, mean: mean.as_ref().map(read).transpose()? };
    let outcome = audit_bundle(&parsed, &inputs);
    let passed = outcome.passed();
    let format = match outcome.verified_format {
        Some(f) => f.to_string(),
        None => format!("evidence unverified; the bundle says {:?}", parsed.aggregator.format),
    };
    if args.json {
        println!(
            "{}",
            json!({"verified": passed, "round": parsed.round, "judged_at": now_secs, "reproduction": args.at.is_some(), "aggregator_format": outcome.verified_format, "tree_head": parsed.tree_head, "checks": outcome.checks, "privacy": parsed.report.dp.map(|dp| json!({"adjacency": dp.adjacency, "colluders": dp.colluders, "noise_multiplier": dp.noise_multiplier, "noise": if dp.skellam.is_some() { "skellam" } else { "gaussian" }, "skellam": dp.skellam, "delta": dp.delta, "epsilon_round": parsed.report.epsilon_round, "epsilon_cumulative": parsed.report.epsilon_cumulative, "epsilon_outsider_round": parsed.report.epsilon_outsider_round, "epsilon_outsider_cumulative": parsed.report.epsilon_outsider_cumulative})), "record_privacy": parsed.report.participants.iter().filter_map(|p| p.record_privacy.map(|rp| json!({"client": p.client, "identity": p.identity, "institution": parsed.names.get(&p.identity), "epsilon": rp.claim.epsilon, "delta": rp.claim.delta, "budget": rp.claim.budget, "noise_multiplier": rp.claim.noise_multiplier, "sample_rate": rp.claim.sample_rate, "max_grad_norm": rp.claim.max_grad_norm, "steps": rp.claim.steps, "source": rp.source, "source_explained": rp.source.explained()}))).collect::<Vec<_>>()})
        );
    } else {
        println!("round {}: {} (aggregator {format}, log size {})", parsed.round, parsed.report.status, parsed.tree_head.tree_size);
        println!("evidence judged at {judged_at}");
        if let Some(p) = parsed.report.privacy_summary() {
            println!("privacy: {p}");
        }
        for p in &parsed.report.participants {
            if let Some(rp) = p.record_privacy {
                let who = parsed.names.get(&p.identity).cloned().unwrap_or_else(|| format!("client {}", p.client));
                println!("record privacy: {who}: {}", rp.describe());
            }
        }
        for c in &outcome.checks {
            if c.passed {
                println!("ok      {}: {}", c.name, c.detail);
            } else {
                eprintln!("FAILED  {}: {}", c.name, c.detail);
            }
        }
        if inputs.previous_head.is_none() {
            println!("note    no --previous-head: consistency with an earlier view of the log was not checked");
        }
        println!("{}", if passed { "VERIFIED: every check passed" } else { "NOT VERIFIED" });
    }
    if passed {
        if let Some(path) = save_head {
            let text = serde_json::to_vec_pretty(&parsed.tree_head).map_err(|e| Unusable(e.to_string()))?;
            std::fs::write(&path, text).map_err(|e| Unusable(format!("cannot write {}: {e}", path.display())))?;
        }
    }
    Ok(passed)
}

/// Verifies, applies the policy, prints the outcome; Ok(true) when everything passed.
fn check(evidence: &[u8], endorsements: &[Vec<u8>], args: &PolicyArgs, bound: Option<[u8; 64]>) -> Result<bool, Unusable> {
    let now = now_or(&args.at)?;
    let policy = load_policy(args)?;
    let expected = match (&args.report_data, bound) {
        (_, Some(b)) => Some(b),
        (Some(h), None) => {
            Some(hex::decode(h).ok().and_then(|v| <[u8; 64]>::try_from(v).ok()).ok_or_else(|| Unusable("--report-data must be 64 bytes of hex".into()))?)
        }
        (None, None) => None,
    };
    let claims = match policy.verify(evidence, endorsements, now) {
        Ok(c) => c,
        Err(e @ (VerifyError::UnknownFormat | VerifyError::Malformed { .. })) => return Err(Unusable(e.to_string())),
        Err(e) => {
            report(
                &Verdict { accepted: false, format: e.format(), claims: None, failures: vec![PolicyFailure::Unverified { reason: e.to_string() }] },
                args.json,
                expected.is_some(),
            );
            return Ok(false);
        }
    };
    let mut verdict = policy.evaluate(&claims, &expected.unwrap_or([0; 64]), now);
    if expected.is_none() {
        verdict.failures.retain(|f| *f != PolicyFailure::ReportDataMismatch);
        verdict.accepted = verdict.failures.is_empty();
    }
    report(&verdict, args.json, expected.is_some());
    Ok(verdict.accepted)
}

fn report(v: &Verdict, as_json: bool, binding_checked: bool) {
    if as_json {
        let out = json!({
            "verified": v.accepted,
            "format": v.format,
            "claims": v.claims,
            "failures": v.failures.iter().map(|f| json!({"check": f, "message": f.to_string()})).collect::<Vec<_>>(),
            "binding_checked": binding_checked,
        });
        println!("{out}");
        return;
    }
    if let Some(c) = &v.claims {
        println!("format:       {}", c.format);
        println!("measurement:  {}", c.measurement);
        println!("report_data:  {}", c.report_data);
        println!("debug:        {}", c.debug);
        if let Some(t) = &c.tcb {
            println!("tcb:          {t}");
        }
        if let Some(s) = &c.signer {
            println!("signer:       {s}");
        }
    }
    if !binding_checked {
        println!("binding:      not checked (no --report-data)");
    }
    if v.accepted {
        println!("VERIFIED: every check passed");
    } else {
        for f in &v.failures {
            eprintln!("FAILED: {f}");
        }
    }
}

/// GET /v1/attestation over TLS, returning the body and the certificate the server used.
/// The certificate is not trusted by itself: the evidence must vouch for it.
fn fetch(url: &str, nonce: &[u8; 32]) -> Result<(Vec<u8>, Vec<u8>), Unusable> {
    let bad = |why: String| Unusable(format!("{url}: {why}"));
    let hostport = url.strip_prefix("https://").ok_or_else(|| bad("expected https://HOST:PORT".into()))?.trim_end_matches('/');
    let (host, _) = hostport.rsplit_once(':').ok_or_else(|| bad("expected https://HOST:PORT".into()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let verifier = Arc::new(RecordCert { seen: seen.clone(), provider: provider.clone() });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| bad(e.to_string()))?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| bad(e.to_string()))?;
    let tcp = std::net::TcpStream::connect(hostport).map_err(|e| bad(e.to_string()))?;
    let _ = tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)));
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(tls, "GET /v1/attestation?nonce={} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n", hex::encode(nonce))
        .map_err(|e| bad(e.to_string()))?;
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw) {
        Ok(_) => {}
        // Servers may close without close_notify after a Connection: close response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(bad(e.to_string())),
    }
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no HTTP response".into()))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    if !head.starts_with("HTTP/1.1 200") {
        return Err(bad(format!("server answered {}", head.lines().next().unwrap_or(""))));
    }
    let body = raw[split + 4..].to_vec();
    let cert = seen.lock().map(|c| c.clone()).unwrap_or_default();
    if cert.is_empty() {
        return Err(bad("the server presented no certificate".into()));
    }
    Ok((body, cert))
}

/// Accepts the server's certificate provisionally and records it; the handshake
/// signature is still checked against it, so the peer holds its private key.
#[derive(Debug)]
struct RecordCert {
    seen: Arc<Mutex<Vec<u8>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for RecordCert {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Ok(mut s) = self.seen.lock() {
            *s = end_entity.to_vec();
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
