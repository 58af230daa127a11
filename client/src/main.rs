//! `tessera-client`: the institution's command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tessera_client::ledger::PrivacyLedger;
use tessera_client::participate::ParticipateError;
use tessera_client::train::data::read_jsonl;
use tessera_client::train::dpsgd::{RecordPrivacy, RecordPrivacyRequest};
use tessera_client::train::federated::{prepare_for_round, Institution, ModelSpec, SftInstitution};
use tessera_client::train::server_opt::{ServerOptimizer, Strategy};
use tessera_client::train::sft::{read_sft_jsonl, SftExample};
use tessera_client::train::trainer::TrainConfig;
use tessera_client::train::{Dtype, LoraConfig, LoraMode};
use tessera_client::{participate, update, Api, DropPoint, Identity, Options, Participation};
use tessera_secagg::prv::Accountant;

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
    /// Threads for masking the update (default: every core; the masked vector is the
    /// same for any count).
    #[arg(long)]
    mask_threads: Option<usize>,
}

/// The data and local schedule `federate` and `finetune` share.
#[derive(clap::Args)]
struct Schedule {
    /// Training examples (JSON lines, as --task says); they never leave this machine.
    #[arg(long)]
    train: PathBuf,
    /// Held-out examples, evaluated after every round.
    #[arg(long)]
    test: PathBuf,
    /// Held-out examples of the whole federation (all groups), also evaluated after every round.
    #[arg(long)]
    global_test: Option<PathBuf>,
    /// With --task sft: the longest greedy answer generated for exact match.
    #[arg(long, default_value_t = 32)]
    answer_tokens: usize,
    /// Rounds: of the federation to take part in (`federate`), or of local training, each
    /// followed by an evaluation (`finetune`).
    #[arg(long, default_value_t = 3)]
    rounds: u64,
    /// Optimizer steps per round.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Append one JSON object per round (losses, accuracy, exact match, bytes, tokens/s)
    /// to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// libtorch CPU threads (0: libtorch's default, one per core).
    #[arg(long, default_value_t = 0)]
    threads: i32,
}

#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// Model folder: config.json, *.safetensors, tokenizer.json of a BertModel (classified
    /// by a pooled head) or LlamaForCausalLM checkpoint (classified by label words).
    #[arg(long)]
    model: PathBuf,
    /// Classes of the sequence classifier.
    #[arg(long, default_value_t = 3)]
    num_labels: i64,
    /// Tokens per example (longer texts are truncated).
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    #[arg(long, default_value_t = 8)]
    lora_r: i64,
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    lora_dropout: f64,
    /// Modules that get adapters (last path component), comma-separated. Default: the
    /// query and value projections (BERT: query,value; Llama: q_proj,v_proj).
    #[arg(long, value_delimiter = ',')]
    lora_targets: Vec<String>,
    /// ffa: A frozen at the shared seeded initialisation, only B trained and sent (exact
    /// aggregation of B·A); both: A and B trained and averaged separately.
    #[arg(long, value_enum, default_value_t = LoraMode::Ffa)]
    lora_mode: LoraMode,
    /// Seed of the shared adapter initialisation: the same for every institution.
    #[arg(long, default_value_t = 2026)]
    lora_seed: u64,
    /// Type of the base weights (Llama family): bf16 by default on a CUDA GPU, f32 on the
    /// CPU, where libtorch's bf16 and f16 products run slower than f32 (BENCHMARKS.md) and
    /// half precision only saves memory. LoRA factors and optimizer state stay in f32.
    #[arg(long, value_enum)]
    dtype: Option<Dtype>,
}

impl ModelArgs {
    fn spec(&self) -> ModelSpec {
        let lora = LoraConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            target_modules: self.lora_targets.clone(),
            mode: self.lora_mode,
            seed: self.lora_seed,
        };
        let dtype = self.dtype.unwrap_or_else(|| Dtype::default_for(tessera_client::train::device()));
        ModelSpec { dir: self.model.clone(), lora, num_labels: self.num_labels, max_len: self.max_len, dtype }
    }
}

// Parsed once per process; the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
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
        /// In a buffered federation: the global version (releases applied) the update was
        /// trained from; a cohort round requires it and weighs the update by its staleness.
        #[arg(long)]
        base_version: Option<u64>,
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
        /// Security floors (TOML) this institution requires of every round: min_participants,
        /// min_survivor_fraction, roster_sha256, allowed_peers, [dp]. Default: at least 3
        /// participants and min_survivors above half of them.
        #[arg(long)]
        floors: Option<PathBuf>,
        /// Files sent with this node's evidence: on SEV-SNP without a host certificate
        /// table the VCEK (DER) and ASK/ARK (PEM); on TDX the DCAP collateral (JSON).
        #[arg(long = "tee-endorsement")]
        tee_endorsements: Vec<PathBuf>,
        /// Fault injection for tests and demos: leave the round at this point.
        #[arg(long, value_enum)]
        drop_after: Option<DropPoint>,
    },
    /// Fine-tune a LoRA adapter locally (libtorch; CUDA when present) and take part in
    /// successive rounds: train from the global adapter, submit the clipped and noised
    /// delta through secure aggregation, apply the released mean, evaluate.
    Federate {
        #[arg(long, default_value = "tessera-client")]
        dir: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        model: ModelArgs,
        /// classify: sequence classification (JSON lines: text, label, group); sft:
        /// instruction fine-tuning of a Llama-family model (JSON lines {"prompt",
        /// "response"} or chat {"messages"}), loss on the responses only.
        #[arg(long, value_enum, default_value_t = Task::Classify)]
        task: Task,
        #[command(flatten)]
        schedule: Schedule,
        #[arg(long, default_value_t = 1)]
        grad_accum: usize,
        /// FedProx proximal coefficient μ (0: FedAvg).
        #[arg(long, default_value_t = 0.0)]
        prox_mu: f64,
        /// Record-level DP: train with DP-SGD (per-record clipping and noise in every step)
        /// and keep each training record within this ε over all local training, counted in
        /// the identity directory's privacy ledger. The guarantee holds against the
        /// aggregator too. Runs past it are refused before they start.
        #[arg(long)]
        record_epsilon: Option<f64>,
        /// δ of the record-level guarantee (must be below 1/records).
        #[arg(long, default_value_t = 1e-5, requires = "record_epsilon")]
        record_delta: f64,
        /// DP-SGD noise multiplier σ (default: calibrated so that --rounds rounds of --steps
        /// steps spend exactly what is left of --record-epsilon).
        #[arg(long, requires = "record_epsilon")]
        noise_multiplier: Option<f64>,
        /// DP-SGD per-record clipping norm C.
        #[arg(long, default_value_t = 1.0, requires = "record_epsilon")]
        max_grad_norm: f64,
        /// DP-SGD Poisson sampling rate q (default: batch size / records); --batch-size is
        /// then the micro-batch that bounds memory.
        #[arg(long, requires = "record_epsilon")]
        sample_rate: Option<f64>,
        /// How the records' ε is counted and σ calibrated: prv (privacy loss random
        /// variables, Gopi et al. 2021; Opacus' default, tighter) or rdp (Rényi DP).
        #[arg(long, default_value_t = Accountant::Prv, requires = "record_epsilon")]
        accountant: Accountant,
        /// Server optimizer applied to each released mean (Reddi et al. 2021). Every
        /// institution applies it to the same signed release, so all hold the same model;
        /// they must agree on it, as on the model and LoRA flags.
        #[arg(long, value_enum, default_value_t = Strategy::FedAvg)]
        server_opt: Strategy,
        /// Server learning rate (default: 1 for FedAvg, 0.01 for FedAdam/FedYogi).
        #[arg(long)]
        server_lr: Option<f32>,
        /// Write the global adapter (PEFT format) here after every round.
        #[arg(long)]
        adapter_out: Option<PathBuf>,
        /// Accept SIMULATED aggregator evidence and present simulated evidence (INSECURE dev mode).
        #[arg(long)]
        insecure_dev: bool,
        /// Seconds to wait for each round to progress.
        #[arg(long, default_value_t = 600)]
        wait: u64,
        /// Policy (TOML) the aggregator's evidence must meet.
        #[arg(long)]
        aggregator_policy: Option<PathBuf>,
        /// Security floors (TOML) this institution requires of every round: min_participants,
        /// min_survivor_fraction, roster_sha256, allowed_peers, [dp]. Default: at least 3
        /// participants and min_survivors above half of them.
        #[arg(long)]
        floors: Option<PathBuf>,
        /// Files sent with this node's evidence (see `submit --help`).
        #[arg(long = "tee-endorsement")]
        tee_endorsements: Vec<PathBuf>,
        /// Fault injection for demos: leave round N after sharing keys.
        #[arg(long)]
        drop_in_round: Option<u64>,
        /// Fault injection for demos and benchmarks: after each local training, wait
        /// (F − 1) times as long as it took, as an institution F times slower would.
        #[arg(long, default_value_t = 1.0)]
        slowdown: f64,
    },
    /// Fine-tune a LoRA adapter on this institution's data alone, with no federation: the
    /// same schedule as `federate` (--steps per round, then evaluation), each round's
    /// update applied locally. The baseline a federation is compared with; nothing is sent.
    Finetune {
        /// Name shown in progress lines and the report; it also seeds the batch order.
        #[arg(long, default_value = "local")]
        name: String,
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, value_enum, default_value_t = Task::Sft)]
        task: Task,
        #[command(flatten)]
        schedule: Schedule,
        /// Write the adapter (PEFT format) here after every round.
        #[arg(long)]
        adapter_out: Option<PathBuf>,
        /// Skip evaluating the model before training (its figures are left out of the report).
        #[arg(long)]
        no_initial_eval: bool,
    },
    /// Print the round layout (tensor names and shapes) of an adapter, for the server's
    /// `[[rounds.params.layout]]`: every institution must use the same model and LoRA flags.
    Layout {
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Continue a prompt with a Llama-family model (and a LoRA adapter, e.g. the global one
    /// `federate --adapter-out` saved). Only the continuation goes to stdout, decoded as
    /// transformers decodes it (special tokens left out); notes go to stderr.
    Generate {
        /// Model folder (config.json, *.safetensors, tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// PEFT adapter folder (adapter_config.json, adapter_model.safetensors).
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// 0: greedy (the default); above 0: sampling at this temperature.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Nucleus sampling: keep the most likely tokens whose probability reaches P (with --temperature).
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// Seed of the sampling (default: from the OS).
        #[arg(long)]
        seed: Option<u64>,
        /// Apply the model's chat template: the prompt is the user's message.
        #[arg(long)]
        chat: bool,
        /// libtorch threads on CPU (0: libtorch's default).
        #[arg(long, default_value_t = 0)]
        threads: i32,
        /// Type of the base weights (default: bf16 on a CUDA GPU, f32 on the CPU).
        #[arg(long, value_enum)]
        dtype: Option<Dtype>,
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

fn load_policy(path: Option<&std::path::Path>) -> anyhow::Result<Option<tessera_attestation::policy::NodePolicy>> {
    let Some(p) = path else { return Ok(None) };
    let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    let policy = tessera_attestation::policy::NodePolicy::from_toml(&text).with_context(|| format!("invalid policy {}", p.display()))?;
    policy.validate().map_err(|e| anyhow::anyhow!("invalid policy {}: {e}", p.display()))?;
    if let Some(warning) = policy.extra_roots_warning() {
        eprintln!("{warning} ({})", p.display());
    }
    Ok(Some(policy))
}

/// This node's evidence source: configfs-tsm in an SEV-SNP or TDX guest; none (the
/// simulated one) in dev mode.
fn own_attester(insecure_dev: bool, endorsements: Vec<PathBuf>) -> anyhow::Result<Option<tessera_client::participate::AttesterHandle>> {
    if insecure_dev {
        if !endorsements.is_empty() {
            anyhow::bail!("--tee-endorsement goes with hardware evidence, not --insecure-dev");
        }
        return Ok(None);
    }
    let root = std::path::Path::new(tessera_attestation::tsm::DEFAULT_ROOT);
    Ok(Some(tessera_client::participate::AttesterHandle::configfs_tsm(root, endorsements)?))
}

/// The institution's own privacy ledger, in its identity directory.
const LEDGER_FILE: &str = "privacy-ledger.json";

fn load_floors(path: Option<&std::path::Path>) -> anyhow::Result<tessera_secagg::floors::SecurityFloors> {
    let Some(p) = path else { return Ok(Default::default()) };
    let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid security floors {}", p.display()))
}

/// The aggregator policy: the file's, or the default; outside dev mode it must pin the
/// aggregator's code (allowed_measurements), checked before anything else runs.
fn aggregator_policy_or_refuse(
    path: Option<&std::path::Path>,
    insecure_dev: bool,
) -> anyhow::Result<(Option<tessera_attestation::policy::NodePolicy>, tessera_attestation::policy::NodePolicy)> {
    let policy = load_policy(path)?;
    let effective = policy.clone().unwrap_or_else(|| default_policy(insecure_dev));
    effective.require_pinned_code("the aggregator").map_err(|e| anyhow::anyhow!("{e} (--aggregator-policy)"))?;
    Ok((policy, effective))
}

fn default_policy(insecure_dev: bool) -> tessera_attestation::policy::NodePolicy {
    if insecure_dev {
        tessera_attestation::policy::NodePolicy::insecure_dev()
    } else {
        tessera_attestation::policy::NodePolicy::default()
    }
}

/// The released mean of `round`, for an institution that left it (it still needs the
/// global model), checked against the attested enclave's signature.
/// Whether the aggregator's current round is a cohort of a buffered federation.
fn runs_cohorts(rt: &tokio::runtime::Runtime, api: &Api) -> bool {
    rt.block_on(api.get_json::<serde_json::Value>("/v1/rounds/current")).is_ok_and(|s| !s["config"]["cohort"].is_null())
}

/// How one try to take part in a buffered federation's cohort ended.
enum Attempt {
    Done(Participation),
    /// The aggregator's schedule is over: no cohort is left for this update.
    Ended(u64),
    /// The update is too stale to send: catch up and train again.
    TooStale(tessera_secagg::ProtocolError),
}

fn fetch_release(rt: &tokio::runtime::Runtime, api: &Api, round: u64, opts: &Options) -> anyhow::Result<Vec<f32>> {
    rt.block_on(async {
        let enclave_key = tessera_client::participate::check_aggregator(api, opts.insecure_dev, opts.aggregator_policy.as_ref()).await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(opts.wait.as_secs());
        loop {
            match tessera_client::participate::fetch_release(api, &enclave_key, round).await {
                Ok(release) => return Ok(std::sync::Arc::unwrap_or_clone(release.mean)),
                // Not released yet (or the server unreachable): wait; a release that does not verify is final.
                Err(ParticipateError::Http(_)) if std::time::Instant::now() <= deadline => tokio::time::sleep(Duration::from_millis(500)).await,
                Err(e) => return Err(e.into()),
            }
        }
    })
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
        Command::Generate { model, adapter, prompt, max_new_tokens, temperature, top_p, seed, chat, threads, dtype } => {
            if threads > 0 {
                tch::set_num_threads(threads);
            }
            let dtype = dtype.unwrap_or_else(|| Dtype::default_for(tessera_client::train::device()));
            generate(&model, adapter.as_deref(), &prompt, max_new_tokens, (temperature, top_p), seed, chat, dtype)
        }
        Command::Finetune { name, model, task, schedule: s, adapter_out, no_initial_eval } => {
            if s.threads > 0 {
                tch::set_num_threads(s.threads);
            }
            let data = LocalData::read(task, &s.train, &s.test, s.global_test.as_deref())?;
            eprintln!(
                "[{name}] local-only fine-tuning of {} on {:?}: {} training and {} held-out examples, {} rounds of {} steps",
                model.model.display(),
                tessera_client::train::device(),
                data.train_len(),
                data.test_len(),
                s.rounds,
                s.steps
            );
            let seed = u64::from_le_bytes(<sha2::Sha256 as sha2::Digest>::digest(name.as_bytes())[..8].try_into()?);
            let cfg = TrainConfig { steps: s.steps, batch_size: s.batch_size, lr: s.lr, seed, log_every: 5, ..TrainConfig::default() };
            let mut inst = Local::new(&name, &model.spec(), data, cfg, s.answer_tokens)?;
            let (before, global_before) = if no_initial_eval { (None, None) } else { (inst.evaluate(false)?, inst.evaluate(true)?) };
            if let Some(b) = before {
                eprintln!("[{name}] initial model: held-out {b}");
            }
            let started = std::time::Instant::now();
            for round in 1..=s.rounds {
                let update = inst.local_update(round)?;
                // Alone, the round's "mean" is this institution's own update, unclipped and
                // without noise: nothing leaves it.
                inst.apply_mean(&update.delta)?;
                let (eval, global_eval) = (inst.evaluate(false)?.unwrap_or_default(), inst.evaluate(true)?);
                eprintln!("[{name}] round {round}: train loss {:.4}, held-out {eval}, {:.0} tok/s", update.stats.final_loss, update.stats.tokens_per_sec);
                let row = report_row(
                    &RoundEvals { task, institution: &name, round, stats: &update.stats, eval, global_eval, before, global_before, started },
                    serde_json::json!({ "mode": "local-only" }),
                );
                if let Some(path) = &s.report {
                    append_report(path, &row)?;
                }
                if let Some(out) = &adapter_out {
                    inst.adapter().save_peft(out, &model.model.display().to_string())?;
                }
            }
            Ok(())
        }
        Command::Layout { model } => {
            let inst = Institution::new("layout", &model.spec(), &[], &[], TrainConfig::default())?;
            let layout = inst.layout();
            let m: u64 = layout.iter().map(|t| t.numel()).sum();
            eprintln!("{} tensors, {m} parameters per update", layout.len());
            println!("{}", serde_json::to_string(&layout)?);
            Ok(())
        }
        Command::Federate {
            dir,
            server,
            model,
            task,
            schedule: Schedule { train, test, global_test, answer_tokens, rounds, steps, batch_size, lr, report, threads },
            grad_accum,
            prox_mu,
            record_epsilon,
            record_delta,
            noise_multiplier,
            max_grad_norm,
            sample_rate,
            accountant,
            server_opt,
            server_lr,
            adapter_out,
            insecure_dev,
            wait,
            aggregator_policy,
            floors,
            tee_endorsements,
            drop_in_round,
            slowdown,
        } => {
            anyhow::ensure!(slowdown.is_finite() && slowdown >= 1.0, "--slowdown must be at least 1, got {slowdown}");
            if threads > 0 {
                tch::set_num_threads(threads);
            }
            let identity = Identity::load(&dir).with_context(|| format!("no identity in {} (run `tessera-client init` first)", dir.display()))?;
            let data = LocalData::read(task, &train, &test, global_test.as_deref())?;
            let (train_examples, test_examples) = (data.train_len(), data.test_len());
            let device = tessera_client::train::device();
            eprintln!(
                "[{}] loading {} on {device:?}; {} training and {} held-out examples",
                identity.name,
                model.model.display(),
                train_examples,
                test_examples
            );
            let cfg = TrainConfig {
                steps,
                batch_size,
                grad_accum,
                lr,
                prox_mu,
                seed: u64::from_str_radix(&identity.public_key_hex()[..16], 16)?,
                log_every: 5,
                ..TrainConfig::default()
            };
            let ledger_path = dir.join(LEDGER_FILE);
            let record_privacy = match record_epsilon {
                None => None,
                Some(budget) => {
                    let req = RecordPrivacyRequest { budget, delta: record_delta, noise_multiplier, max_grad_norm, sample_rate, accountant };
                    let ledger = PrivacyLedger::load(&ledger_path)?;
                    let plan = RecordPrivacy::plan(&req, &ledger, train_examples, batch_size, steps as u64, rounds)?;
                    eprintln!(
                        "[{}] record-level DP-SGD: σ = {:.3}{}, C = {}, q = {:.4} (expected batch {:.1}); ε = {:.3} of {budget} spent so far (δ = {record_delta:e}, {accountant} accountant)",
                        identity.name,
                        plan.dp.noise_multiplier,
                        if noise_multiplier.is_none() { " (calibrated)" } else { "" },
                        plan.dp.max_grad_norm,
                        plan.dp.sample_rate,
                        plan.dp.sample_rate * train_examples as f64,
                        ledger.record_spent(record_delta, accountant),
                    );
                    Some(plan)
                }
            };
            let cfg = TrainConfig { dp_sgd: record_privacy.as_ref().map(|p| p.dp), ..cfg };
            let mut inst = Local::new(&identity.name, &model.spec(), data, cfg, answer_tokens)?;
            let lr = server_lr.unwrap_or(if server_opt == Strategy::FedAvg { 1.0 } else { 0.01 });
            inst.set_server_opt(ServerOptimizer::new(server_opt, lr));
            let (aggregator_policy, handshake_policy) = aggregator_policy_or_refuse(aggregator_policy.as_deref(), insecure_dev)?;
            let floors = load_floors(floors.as_deref())?;
            // Before training: a node that cannot attest finds out now, not after an epoch.
            let attester = own_attester(insecure_dev, tee_endorsements)?;
            let api = Api::attested(&server.server, pin(&server)?, Some(handshake_policy))?;
            let before = inst.evaluate(false)?.unwrap_or_default();
            let global_before = inst.evaluate(true)?;
            eprintln!("[{}] initial model: held-out {before}", identity.name);
            let mut next_round: Option<u64> = None;
            // What shared random-k rounds have not sent yet (kept here, added to the next update).
            let mut feedback = tessera_client::feedback::ErrorFeedback::default();
            // In a buffered federation: the releases this institution has applied (its global
            // version) and the last round it accounted for, so that cohorts it was not part
            // of are fetched and applied in order.
            let started = std::time::Instant::now();
            let mut version = 0u64;
            let mut applied_round = 0u64;
            let mut buffered = false;
            let mut i = 1;
            while i <= rounds {
                let record_epsilon = match &record_privacy {
                    Some(plan) => {
                        let purpose = format!("local training for round {}", next_round.unwrap_or(i));
                        let eps = plan.charge(&ledger_path, &purpose, now_ms())?;
                        eprintln!("[{}] {purpose}: records will have spent ε = {eps:.3} of {} (δ = {:e})", identity.name, plan.budget, plan.delta);
                        Some(eps)
                    }
                    None => None,
                };
                let record_claim = record_privacy.as_ref().zip(record_epsilon).map(|(plan, epsilon)| plan.claim(epsilon));
                let update = inst.local_update(next_round.unwrap_or(i))?;
                if slowdown > 1.0 {
                    let wait = Duration::from_secs_f64(update.stats.seconds * (slowdown - 1.0));
                    eprintln!("[{}] --slowdown {slowdown}: waiting {:.1} s more, as a slower institution would train", identity.name, wait.as_secs_f64());
                    std::thread::sleep(wait);
                }
                let drop_after = (drop_in_round == Some(i)).then_some(DropPoint::AfterShareKeys);
                let opts = Options {
                    insecure_dev,
                    drop_after,
                    wait: Duration::from_secs(wait),
                    round: next_round,
                    quiet: false,
                    aggregator_policy: aggregator_policy.clone(),
                    attester: attester.clone(),
                    floors: floors.clone(),
                    ledger: Some(ledger_path.clone()),
                    mask_threads: server.mask_threads,
                    record_privacy: record_claim,
                    // Used only by a cohort round: the version this update was trained from.
                    base_version: Some(version),
                    acknowledged: None,
                };
                let examples = update.examples;
                let name = &identity.name;
                // A buffered cohort that closed before this institution joined is followed
                // by the next one: the same update tries again there (its staleness grows).
                let result = loop {
                    let delta = update.delta.clone();
                    let kept = feedback.clone();
                    let fb = &mut feedback;
                    let attempt = rt.block_on(participate(&api, &identity, &opts, move |cfg| {
                        let mut delta = delta;
                        if let Some(sent) = fb.apply(&mut delta, cfg)? {
                            eprintln!(
                                "[{name}] compression: sending {} of {} coordinates ({}); {:.4} (L2) kept back for later rounds",
                                sent.kept,
                                sent.of,
                                cfg.compression.map(|c| c.describe(cfg.vector_len)).unwrap_or_default(),
                                sent.residual_norm
                            );
                        }
                        let dp = prepare_for_round(&mut delta, cfg).is_some();
                        Ok((delta, if dp { 1 } else { examples.min(u32::MAX as usize) as u32 }))
                    }));
                    match attempt {
                        // Only before the masked input left: after it, the update may be in
                        // that cohort's sum, and sending it again would count it twice.
                        Err(ParticipateError::TooLate { round, what })
                            if (what == "key advertisement" || what == "key shares") && (buffered || runs_cohorts(&rt, &api)) =>
                        {
                            buffered = true;
                            feedback = kept;
                            eprintln!("[{name}] cohort {round} went on without this institution's {what}; joining the next one");
                        }
                        // An aborted cohort released nothing: the update goes to the next one.
                        Err(ParticipateError::Aborted { round, reason }) if buffered => {
                            feedback = kept;
                            eprintln!("[{name}] cohort {round} was aborted ({reason}); joining the next one");
                        }
                        Err(ParticipateError::FederationEnded(last)) => break Attempt::Ended(last),
                        Err(ParticipateError::Protocol(tessera_secagg::Error::Protocol(stale @ tessera_secagg::ProtocolError::TooStale { .. }))) => {
                            feedback = kept;
                            break Attempt::TooStale(stale);
                        }
                        other => break Attempt::Done(other?),
                    }
                };
                let me = identity.public_key_hex();
                let result = match result {
                    Attempt::Done(r) => r,
                    Attempt::Ended(last) => {
                        eprintln!("[{name}] the federation's last cohort was round {last}; this update is not needed, stopping after {} update(s)", i - 1);
                        break;
                    }
                    Attempt::TooStale(stale) => {
                        // Too far behind: apply what was released meanwhile and train again from there.
                        eprintln!("[{name}] {stale}; catching up and training again");
                        let key = rt.block_on(tessera_client::participate::check_aggregator(&api, insecure_dev, opts.aggregator_policy.as_ref()))?;
                        let current: serde_json::Value = rt.block_on(api.get_json("/v1/rounds/current"))?;
                        let before = current["round"].as_u64().and_then(|r| r.checked_add(1)).context("the current round has no valid number")?;
                        let mut last = applied_round;
                        let applied = rt.block_on(tessera_client::participate::missed_releases(&api, &key, &me, (applied_round, before), version, |m| {
                            last = m.release.round;
                            inst.apply_mean(&m.release.mean).map_err(|e| ParticipateError::Update(e.to_string()))
                        }))?;
                        anyhow::ensure!(
                            applied > 0,
                            "{stale}, and no release was missed: this institution trains slower than the cohorts' staleness bound allows"
                        );
                        version += applied;
                        applied_round = last;
                        continue;
                    }
                };
                let (round, cohort) = match &result {
                    Participation::Completed(r) => (r.round, r.config.cohort),
                    Participation::Dropped { round, .. } => (*round, None),
                };
                buffered |= cohort.is_some();
                let staleness = cohort.zip(opts.base_version).map(|(c, base)| c.version.saturating_sub(base));
                if buffered {
                    // The cohorts this institution was not part of, in order, before this one's release.
                    let key = rt.block_on(tessera_client::participate::check_aggregator(&api, insecure_dev, opts.aggregator_policy.as_ref()))?;
                    let applied = rt.block_on(tessera_client::participate::missed_releases(&api, &key, &me, (applied_round, round), version, |m| {
                        inst.apply_mean(&m.release.mean).map_err(|e| ParticipateError::Update(e.to_string()))
                    }))?;
                    if applied > 0 {
                        eprintln!("[{name}] applied {applied} release(s) of cohorts this institution was not part of");
                    }
                    version += applied;
                    if let Some(c) = cohort {
                        anyhow::ensure!(
                            version == c.version,
                            "cohort {round} started from global version {}, but this institution has applied {version} releases: its global model would differ",
                            c.version
                        );
                    }
                }
                let (round, bytes, included, clamped) = match result {
                    Participation::Completed(r) => {
                        inst.apply_mean(&r.release.mean)?;
                        let (c, of) = r.range_clamped;
                        (r.round, r.bytes_sent, r.release.included.len(), Some(c as f64 / of.max(1) as f64))
                    }
                    Participation::Dropped { round, .. } => {
                        // The others' aggregate is still ours to apply: fetch the signed release.
                        let release = fetch_release(&rt, &api, round, &opts)?;
                        inst.apply_mean(&release)?;
                        (round, 0, 0, None)
                    }
                };
                version += 1;
                applied_round = round;
                // A buffered federation: join whichever cohort opens next.
                next_round = if buffered { None } else { Some(round + 1) };
                let eval = inst.evaluate(false)?.unwrap_or_default();
                let global_eval = inst.evaluate(true)?;
                let row = report_row(
                    &RoundEvals {
                        task,
                        institution: &identity.name,
                        round,
                        stats: &update.stats,
                        eval,
                        global_eval,
                        before: Some(before),
                        global_before,
                        started,
                    },
                    serde_json::json!({
                        "bytes_sent": bytes, "included": included, "dropped": drop_in_round == Some(i),
                        "record_epsilon": record_epsilon, "record_delta": record_privacy.as_ref().map(|p| p.delta),
                        "clipped_fraction": record_privacy.as_ref().map(|_| update.stats.clipped_fraction),
                        "global_version": buffered.then_some(version), "staleness": staleness, "range_clamped_fraction": clamped,
                    }),
                );
                eprintln!(
                    "[{}] round {round}: train loss {:.4}, held-out {eval}, {:.0} tok/s",
                    identity.name, update.stats.final_loss, update.stats.tokens_per_sec
                );
                if let Some(path) = &report {
                    append_report(path, &row)?;
                }
                if let Some(out) = &adapter_out {
                    inst.adapter().save_peft(out, &model.model.display().to_string())?;
                }
                i += 1;
            }
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
        Command::Submit {
            dir,
            server,
            update: update_path,
            global,
            weight,
            round,
            base_version,
            out,
            insecure_dev,
            wait,
            drop_after,
            aggregator_policy,
            floors,
            tee_endorsements,
        } => {
            let attester = own_attester(insecure_dev, tee_endorsements)?;
            rt.block_on(async {
                let identity = Identity::load(&dir).with_context(|| format!("no identity in {} (run `tessera-client init` first)", dir.display()))?;
                // The aggregator's evidence is checked in every TLS handshake (attested TLS)
                // and once more, with the same policy, before anything is prepared.
                let (aggregator_policy, handshake_policy) = aggregator_policy_or_refuse(aggregator_policy.as_deref(), insecure_dev)?;
                let floors = load_floors(floors.as_deref())?;
                let api = Api::attested(&server.server, pin(&server)?, Some(handshake_policy))?;
                let opts = Options {
                    insecure_dev,
                    drop_after,
                    wait: Duration::from_secs(wait),
                    round,
                    quiet: false,
                    aggregator_policy,
                    attester,
                    floors,
                    ledger: Some(dir.join(LEDGER_FILE)),
                    mask_threads: server.mask_threads,
                    record_privacy: None,
                    base_version,
                    acknowledged: None,
                };
                let result = participate(&api, &identity, &opts, |cfg| {
                    let mut flat = update::load_update(&update_path, global.as_deref(), &cfg.layout, cfg.vector_len as u64)
                        .map_err(|e| ParticipateError::Update(e.to_string()))?;
                    // One update, one round: what random-k does not send is not kept by submit
                    // (federate keeps it and sends it in later rounds).
                    if let Some(sent) = tessera_client::feedback::ErrorFeedback::default().apply(&mut flat, cfg)? {
                        eprintln!(
                            "compression: this round sends {} of {} coordinates; the other coordinates of this update (L2 {:.4}) are not sent (tessera-client federate keeps them for later rounds)",
                            sent.kept, sent.of, sent.residual_norm
                        );
                    }
                    // A round with DP: clip to its L2 bound and add this institution's noise share.
                    if let Some(norm) = prepare_for_round(&mut flat, cfg) {
                        if let Some(dp) = cfg.dp {
                            eprintln!("DP: update norm {norm:.4} {}", tessera_client::train::privacy::describe(&dp, cfg.min_survivors));
                        }
                        return Ok((flat, 1));
                    }
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

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// `tessera-client generate`.
#[allow(clippy::too_many_arguments)]
fn generate(
    model: &Path,
    adapter: Option<&Path>,
    prompt: &str,
    max_new_tokens: usize,
    (temperature, top_p): (f64, f64),
    seed: Option<u64>,
    chat: bool,
    dtype: Dtype,
) -> anyhow::Result<()> {
    use rand::SeedableRng;
    use tessera_client::train::llama::{Llama, Sampling};
    use tessera_client::train::sft::{Message, Prompt, SftEncoder};
    use tessera_client::train::{Adapter, LoraConfig, LoraMode};
    if !(temperature.is_finite() && temperature >= 0.0) {
        anyhow::bail!("--temperature must be 0 (greedy) or positive, got {temperature}");
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        anyhow::bail!("--top-p must be in (0, 1], got {top_p}");
    }
    let device = tessera_client::train::device();
    let lora = match adapter {
        Some(dir) => LoraConfig::from_peft(dir)?,
        // Without an adapter: LoRA B starts at zero, so the base model is what runs.
        None => LoraConfig { r: 1, alpha: 1.0, dropout: 0.0, target_modules: vec!["q_proj".into(), "v_proj".into()], mode: LoraMode::Both, seed: 0 },
    };
    let mut lora_adapter = Adapter::new(lora, "CAUSAL_LM", device, tch::Kind::Float)?;
    let llama = Llama::load_as(model, &mut lora_adapter, device, dtype.kind())?;
    if let Some(dir) = adapter {
        lora_adapter.load_peft(dir)?;
        eprintln!("adapter {} loaded ({} tensors)", dir.display(), lora_adapter.tensors().len());
    }
    // The prompt is never truncated here: max_len bounds training records only.
    let encoder = SftEncoder::load(model, usize::MAX)?;
    let prompt = if chat {
        if encoder.template().is_none() {
            anyhow::bail!("--chat: {} has no chat template (tokenizer_config.json or chat_template.jinja)", model.display());
        }
        Prompt::Chat(vec![Message { role: "user".into(), content: prompt.into() }])
    } else {
        Prompt::Text(prompt.into())
    };
    let sampling = if temperature == 0.0 { Sampling::Greedy } else { Sampling::Sample { temperature, top_p } };
    let mut rng = match seed {
        Some(s) => rand_chacha::ChaCha20Rng::seed_from_u64(s),
        None => rand_chacha::ChaCha20Rng::from_rng(rand::rngs::OsRng)?,
    };
    let started = std::time::Instant::now();
    let out = encoder.continue_prompt(&llama, &prompt, max_new_tokens, &sampling, &mut rng)?;
    let (decoded, stopped, n) = (&out.text, out.stopped, out.generated);
    println!("{decoded}");
    eprintln!(
        "{} prompt tokens, {n} generated in {:.1} s ({}){}",
        out.prompt_tokens,
        started.elapsed().as_secs_f64(),
        if stopped { "stopped at end of sequence" } else { "reached --max-new-tokens" },
        if sampling == Sampling::Greedy { ", greedy" } else { "" }
    );
    Ok(())
}

/// What every report row states of a round, in `federate` and `finetune` alike.
struct RoundEvals<'a> {
    task: Task,
    institution: &'a str,
    round: u64,
    stats: &'a tessera_client::train::trainer::TrainStats,
    eval: Eval,
    global_eval: Option<Eval>,
    /// The evaluations before the first round (absent with `--no-initial-eval`).
    before: Option<Eval>,
    global_before: Option<Eval>,
    started: std::time::Instant,
}

/// One JSON report row: the keys of [`RoundEvals`], then the command's own (`extra`, an
/// object whose keys are not among them).
fn report_row(r: &RoundEvals, extra: serde_json::Value) -> serde_json::Value {
    let (eval, global, before, global_before) = (r.eval, r.global_eval, r.before, r.global_before);
    let mut row = serde_json::json!({
        "task": r.task, "institution": r.institution, "round": r.round, "train_loss": r.stats.final_loss,
        "held_out_loss": eval.loss, "held_out_accuracy": eval.accuracy, "held_out_exact_match": eval.exact_match, "held_out_perplexity": eval.perplexity,
        "global_loss": global.map(|e| e.loss), "global_accuracy": global.and_then(|e| e.accuracy),
        "global_exact_match": global.and_then(|e| e.exact_match), "global_perplexity": global.and_then(|e| e.perplexity),
        "initial_loss": before.map(|e| e.loss), "initial_accuracy": before.and_then(|e| e.accuracy), "initial_exact_match": before.and_then(|e| e.exact_match),
        "initial_global_loss": global_before.map(|e| e.loss), "initial_global_accuracy": global_before.and_then(|e| e.accuracy),
        "initial_global_exact_match": global_before.and_then(|e| e.exact_match),
        "tokens_per_sec": r.stats.tokens_per_sec, "train_seconds": r.stats.seconds, "seconds_since_start": r.started.elapsed().as_secs_f64(),
    });
    debug_assert!(extra.is_object(), "the extra keys of a report row come as an object");
    if let (Some(row), serde_json::Value::Object(extra)) = (row.as_object_mut(), extra) {
        debug_assert!(extra.keys().all(|k| !row.contains_key(k)), "a command's own keys do not replace the shared ones");
        row.extend(extra);
    }
    row
}

/// Appends one JSON line to a per-round report.
fn append_report(path: &Path, row: &serde_json::Value) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{row}")?;
    Ok(())
}

/// What `federate` trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Task {
    Classify,
    Sft,
}

/// An institution's data for `federate`, as its task reads it.
enum LocalData {
    Classify {
        train: Vec<tessera_client::train::data::Example>,
        test: Vec<tessera_client::train::data::Example>,
        global: Option<Vec<tessera_client::train::data::Example>>,
    },
    Sft {
        train: Vec<SftExample>,
        test: Vec<SftExample>,
        global: Option<Vec<SftExample>>,
    },
}

impl LocalData {
    fn read(task: Task, train: &Path, test: &Path, global: Option<&Path>) -> anyhow::Result<LocalData> {
        Ok(match task {
            Task::Classify => LocalData::Classify { train: read_jsonl(train)?, test: read_jsonl(test)?, global: global.map(read_jsonl).transpose()? },
            Task::Sft => LocalData::Sft { train: read_sft_jsonl(train)?, test: read_sft_jsonl(test)?, global: global.map(read_sft_jsonl).transpose()? },
        })
    }

    fn train_len(&self) -> usize {
        match self {
            LocalData::Classify { train, .. } => train.len(),
            LocalData::Sft { train, .. } => train.len(),
        }
    }

    fn test_len(&self) -> usize {
        match self {
            LocalData::Classify { test, .. } => test.len(),
            LocalData::Sft { test, .. } => test.len(),
        }
    }
}

/// Held-out figures of either task.
#[derive(Clone, Copy, Debug, Default)]
struct Eval {
    loss: f64,
    accuracy: Option<f64>,
    exact_match: Option<f64>,
    perplexity: Option<f64>,
}

impl std::fmt::Display for Eval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "loss {:.4}", self.loss)?;
        if let Some(p) = self.perplexity {
            write!(f, ", perplexity {p:.2}")?;
        }
        if let Some(a) = self.accuracy {
            write!(f, ", accuracy {a:.3}")?;
        }
        if let Some(e) = self.exact_match {
            write!(f, ", exact match {e:.3}")?;
        }
        Ok(())
    }
}

/// The institution of either task.
enum Local {
    Classify { inst: Box<Institution>, global: Option<Vec<tessera_client::train::data::Encoded>> },
    Sft { inst: Box<SftInstitution>, test: Vec<SftExample>, global: Option<Vec<SftExample>>, answer_tokens: usize },
}

impl Local {
    fn new(name: &str, spec: &ModelSpec, data: LocalData, cfg: TrainConfig, answer_tokens: usize) -> anyhow::Result<Local> {
        Ok(match data {
            LocalData::Classify { train, test, global } => {
                let inst = Institution::new(name, spec, &train, &test, cfg)?;
                let global = global.map(|g| inst.encoder.encode_all(&g)).transpose()?;
                Local::Classify { inst: Box::new(inst), global }
            }
            LocalData::Sft { train, test, global } => Local::Sft { inst: Box::new(SftInstitution::new(name, spec, &train, cfg)?), test, global, answer_tokens },
        })
    }

    fn set_server_opt(&mut self, opt: ServerOptimizer) {
        match self {
            Local::Classify { inst, .. } => inst.server_opt = opt,
            Local::Sft { inst, .. } => inst.server_opt = opt,
        }
    }

    fn adapter(&self) -> &tessera_client::train::Adapter {
        match self {
            Local::Classify { inst, .. } => &inst.adapter,
            Local::Sft { inst, .. } => &inst.adapter,
        }
    }

    fn local_update(&mut self, round: u64) -> anyhow::Result<tessera_client::train::federated::LocalUpdate> {
        Ok(match self {
            Local::Classify { inst, .. } => inst.local_update(round)?,
            Local::Sft { inst, .. } => inst.local_update(round)?,
        })
    }

    fn apply_mean(&mut self, mean: &[f32]) -> anyhow::Result<()> {
        match self {
            Local::Classify { inst, .. } => inst.apply_mean(mean)?,
            Local::Sft { inst, .. } => inst.apply_mean(mean)?,
        }
        Ok(())
    }

    /// On the institution's own held-out data, or (`global`) the federation-wide set if given.
    fn evaluate(&self, global: bool) -> anyhow::Result<Option<Eval>> {
        Ok(match self {
            Local::Classify { inst, global: g } => {
                let set = if global { g.as_ref() } else { Some(&inst.test) };
                set.map(|s| {
                    let e = inst.evaluate(s);
                    Eval { loss: e.loss, accuracy: Some(e.accuracy), ..Eval::default() }
                })
            }
            Local::Sft { inst, test, global: g, answer_tokens } => {
                let set = if global { g.as_ref() } else { Some(test) };
                match set {
                    Some(s) => {
                        let e = inst.evaluate(s, *answer_tokens)?;
                        Some(Eval { loss: e.loss, perplexity: Some(e.perplexity), exact_match: Some(e.exact_match), accuracy: None })
                    }
                    None => None,
                }
            }
        })
    }
}
