//! `tessera-client`: the institution's command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tessera_client::participate::ParticipateError;
use tessera_client::{participate, update, Api, DropPoint, Identity, Options, Participation};

#[derive(Parser)]
#[command(name = "tessera-client", version, about = "Take part in Tessera secure-aggregation rounds as an institution")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ServerArgs {
    /// Aggregator URL, https://HOST:PORT
    #[arg(long, env = "TESSERA_SERVER")]
    server: String,
    /// SHA-256 of the aggregator's TLS public key (hex), as printed by the server.
    #[arg(long, env = "TESSERA_FINGERPRINT")]
    fingerprint: String,
}

#[derive(Subcommand)]
enum Command {
    /// Create this institution's long-term signing key and print the entry for the server's configuration.
    Init {
        #[arg(long, default_value = "tessera-client")]
        dir: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Join the current (or a given) round and submit an update from a safetensors file.
    Submit {
        #[arg(long, default_value = "tessera-client")]
        dir: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
        /// The update: a delta, or (with --global) a locally trained adapter.
        #[arg(long)]
        update: PathBuf,
        /// The global adapter the local one was trained from; the delta is update − global.
        #[arg(long)]
        global: Option<PathBuf>,
        /// FedAvg weight: the number of local training examples.
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Wait for this round number instead of joining the current one.
        #[arg(long)]
        round: Option<u64>,
        /// Write the released aggregate (the weighted mean update) to this safetensors file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Accept SIMULATED aggregator evidence and present simulated evidence (INSECURE dev mode).
        #[arg(long)]
        insecure_dev: bool,
        /// Seconds to wait for the round to progress before giving up.
        #[arg(long, default_value_t = 300)]
        wait: u64,
        /// Policy (TOML) the aggregator's evidence must meet, e.g. its allowed measurements.
        #[arg(long)]
        aggregator_policy: Option<PathBuf>,
        /// Fault injection for tests and demos: leave the round at this point.
        #[arg(long, value_enum)]
        drop_after: Option<DropPoint>,
    },
    /// Show the state of the current (or a given) round.
    Status {
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long)]
        round: Option<u64>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn pin(args: &ServerArgs) -> anyhow::Result<[u8; 32]> {
    hex::decode(args.fingerprint.trim())
        .ok()
        .and_then(|v| v.try_into().ok())
        .context("--fingerprint must be the 64 hex digits of the SHA-256 of the server's public key")
}

fn api(args: &ServerArgs) -> anyhow::Result<Api> {
    Ok(Api::new(&args.server, pin(args)?)?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match cli.command {
        Command::Init { dir, name } => {
            let id = Identity::init(&dir, &name)?;
            eprintln!("created identity {name} in {} (private key: identity.pk8, mode 0600)", dir.display());
            eprintln!("send this entry to the aggregator's operator for its configuration:\n");
            println!("{}", id.server_config_snippet());
            Ok(())
        }
        Command::Status { server, round } => rt.block_on(async {
            let api = api(&server)?;
            let path = match round {
                Some(r) => format!("/v1/rounds/{r}"),
                None => "/v1/rounds/current".to_string(),
            };
            let status: serde_json::Value = api.get_json(path).await?;
            println!("{}", serde_json::to_string_pretty(&status)?);
            Ok(())
        }),
        Command::Submit { dir, server, update: update_path, global, weight, round, out, insecure_dev, wait, drop_after, aggregator_policy } => {
            rt.block_on(async {
                let identity = Identity::load(&dir).with_context(|| format!("no identity in {} (run `tessera-client init` first)", dir.display()))?;
                let aggregator_policy = match aggregator_policy {
                    Some(p) => Some(
                        tessera_attestation::policy::NodePolicy::from_toml(
                            &std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?,
                        )
                        .with_context(|| format!("invalid policy {}", p.display()))?,
                    ),
                    None => None,
                };
                // The aggregator's evidence is checked in every TLS handshake (attested TLS)
                // and once more, with the same policy, before anything is prepared.
                let handshake_policy = aggregator_policy.clone().unwrap_or_else(|| {
                    if insecure_dev {
                        tessera_attestation::policy::NodePolicy::insecure_dev()
                    } else {
                        tessera_attestation::policy::NodePolicy::default()
                    }
                });
                let api = Api::attested(&server.server, pin(&server)?, Some(handshake_policy))?;
                let opts = Options { insecure_dev, drop_after, wait: Duration::from_secs(wait), round, quiet: false, aggregator_policy };
                let result = participate(&api, &identity, &opts, |cfg| {
                    let flat = update::load_update(&update_path, global.as_deref(), &cfg.layout, cfg.vector_len as u64)
                        .map_err(|e| ParticipateError::Update(e.to_string()))?;
                    Ok((flat, weight))
                })
                .await?;
                match result {
                    Participation::Completed(report) => {
                        if let Some(out) = out {
                            update::save_flat(&out, &report.release.mean, &report.config.layout)?;
                            eprintln!("aggregate written to {}", out.display());
                        }
                        println!(
                            "{}",
                            serde_json::json!({
                                "round": report.round,
                                "included": report.release.included,
                                "total_weight": report.release.total_weight,
                                "error_bound": report.release.error_bound,
                                "bytes_sent": report.bytes_sent,
                            })
                        );
                    }
                    Participation::Dropped { round, after } => eprintln!("left round {round} {after:?} as asked"),
                }
                Ok(())
            })
        }
    }
}
