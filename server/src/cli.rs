//! The `tessera-server` command line (the binary is a one-line wrapper, so test
//! harnesses can run the same code as a separate process).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tessera-server", version, about = "Tessera secure-aggregation server (aggregator host + enclave)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve rounds as configured.
    Run {
        #[arg(long, default_value = "tessera-server.toml")]
        config: PathBuf,
    },
    /// Print the SHA-256 of the TLS public key that clients pin (creating the key if needed).
    Fingerprint {
        #[arg(long, default_value = "tessera-server.toml")]
        config: PathBuf,
    },
    /// Make a new access token: prints the token (give it to its holder) on stdout and the
    /// `[[access]]` entry with its SHA-256 (for the configuration) on stderr.
    Token {
        /// Who holds it (shown in the denial log).
        #[arg(long)]
        name: String,
        /// institution, auditor or admin.
        #[arg(long, default_value = "auditor")]
        role: String,
        /// For role institution: its name in [[institutions]].
        #[arg(long)]
        institution: Option<String>,
    },
}

/// The blocking threads the server's runtime may start. Each upload in flight writes its
/// spool file on one for a moment (64 KiB at a time); with tokio's default of 512, 50
/// uploads at once started 230 threads (measured; their memory was small, 2.37 -> 2.30 ×
/// m·4 at m = 6.8M, but nothing bounded their number). The early checks run one at a
/// time on one; nothing on them waits for another.
const BLOCKING_THREADS: usize = 16;

/// Parses the command line and runs the server; returns the process exit code.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Fingerprint { config } => {
            let cfg = crate::ServerConfig::load(&config)?;
            let backend = crate::service::TeeBackend::from_config(&cfg)?;
            let key = crate::tls::load_or_create_key(&cfg.data_dir.join("tls"), &backend.sealing)?;
            println!("{}", hex::encode(key.spki_sha256));
            Ok(())
        }
        Command::Token { name, role, institution } => {
            if !["institution", "auditor", "admin"].contains(&role.as_str()) {
                anyhow::bail!("--role must be institution, auditor or admin, not {role:?}");
            }
            if (role == "institution") != institution.is_some() {
                anyhow::bail!("--institution is needed with --role institution, and only then");
            }
            let mut bytes = [0u8; 24];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
            let token = zeroize::Zeroizing::new(hex::encode(bytes));
            println!("{}", token.as_str());
            let inst = institution.map(|i| format!("institution = {i:?}\n")).unwrap_or_default();
            eprintln!(
                "# add to the server configuration:\n[[access]]\nname = {name:?}\nrole = {role:?}\n{inst}token_sha256 = \"{}\"",
                hex::encode(crate::auth::token_sha256(&token))
            );
            Ok(())
        }
        Command::Run { config } => {
            let cfg = crate::ServerConfig::load(&config)?;
            let rt = tokio::runtime::Builder::new_multi_thread().max_blocking_threads(BLOCKING_THREADS).enable_all().build()?;
            rt.block_on(async move {
                let running = crate::spawn(cfg).await?;
                if running.service.config().dev_insecure {
                    eprintln!("WARNING: INSECURE DEV MODE — simulated attestation; sealing key on disk. Never use with real data.");
                }
                eprintln!("tessera-server listening on https://{}", running.addr);
                eprintln!("TLS public key SHA-256 (pin this): {}", hex::encode(running.fingerprint));
                let info = running.service.attestation();
                eprintln!("enclave identity key: {} (evidence: {})", info.identity_public_key, info.format);
                // Machine-readable line for scripts and tests.
                println!("READY addr={} fingerprint={}", running.addr, hex::encode(running.fingerprint));
                use std::io::Write;
                std::io::stdout().flush()?;
                tokio::signal::ctrl_c().await?;
                eprintln!("shutting down");
                running.stop().await;
                Ok(())
            })
        }
    }
}
