//! `tessera-demo`: a full federated fine-tuning run on this machine. It starts the
//! aggregator and several institutions as separate processes talking TLS on loopback.
//! Each institution (`tessera-client federate`) fine-tunes a LoRA adapter of SmolLM2-135M
//! (or, with `--model`, any Llama checkpoint; BERT too with `--task classify`) with
//! libtorch on its own clinics' drug reviews, split by condition so the data is non-IID:
//! by default as instructions (`--task sft`: the review is the prompt, the condition the
//! drug was taken for is the answer, generated and compared by exact match), or as the
//! sentiment classifier of earlier versions (`--task classify`). Each clips its update,
//! adds its DP noise share and submits it masked; the aggregator releases only the sum.
//! Beside the federation, each clinic also trains alone for the same steps (the
//! local-only baseline), and both are evaluated on a federation-wide test set. The demo
//! prints a table per round and writes the curves to a PNG.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use sha2::Digest;
use tessera_client::train::data::Example;
use tessera_client::train::federated::split_by_group;
use tessera_client::train::LoraMode;
use tessera_secagg::config::RoundConfig;
use tessera_secagg::dp::{noise_multiplier_for, DpParams, SkellamNoise};

/// What the clinics learn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DemoTask {
    /// Instruction fine-tuning: generate the condition a reviewed drug was taken for.
    Sft,
    /// Sentiment classification by label words (negative/neutral/positive).
    Classify,
}

/// The noise each institution adds for the institution-level guarantee.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Noise {
    /// Skellam shares drawn in the integers after quantizing: the released sum is exactly
    /// the mechanism the accountant analyses.
    Skellam,
    /// Continuous Gaussian shares, rounded into the modulus with the update.
    Gaussian,
}

#[derive(Parser)]
#[command(name = "tessera-demo", about = "Federated LoRA fine-tuning: aggregator + institutions over TLS on this machine")]
struct Args {
    /// sft: instruction fine-tuning, the review as the prompt and the condition as the
    /// answer, scored by exact match of generated answers; classify: review sentiment.
    #[arg(long, value_enum, default_value_t = DemoTask::Sft)]
    task: DemoTask,
    #[arg(long, default_value_t = 4)]
    institutions: usize,
    #[arg(long, default_value_t = 3)]
    rounds: u64,
    /// Local optimizer steps per round (default: 10 for sft, 12 for classify). The defaults
    /// (with batch and length) are chosen so that the SmolLM2 run finishes within 10
    /// minutes on a 2-core CPU.
    #[arg(long)]
    steps: Option<usize>,
    /// Examples per step (default: 4 for sft, 8 for classify).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Tokens per example, prompt included (default: 128 for sft, 64 for classify; longer
    /// reviews are truncated).
    #[arg(long)]
    max_len: Option<usize>,
    /// Local learning rate (default: 5e-3 for sft, 3e-3 for classify).
    #[arg(long)]
    lr: Option<f64>,
    /// Held-out reviews per institution, of its own conditions (default: 12 for sft, 48 for classify).
    #[arg(long)]
    held_out: Option<usize>,
    /// sft: the conditions in the federation, the most frequent in the data.
    #[arg(long, default_value_t = 8)]
    conditions: usize,
    /// sft: at most this many training reviews of one condition (the data set is dominated by one).
    #[arg(long, default_value_t = 40)]
    per_condition: usize,
    /// sft: words of each review put in the prompt.
    #[arg(long, default_value_t = 32)]
    review_words: usize,
    /// Skip the local-only baseline (each clinic training alone for the same steps).
    #[arg(long)]
    no_local_baseline: bool,
    /// ε budget for the whole run (δ = 1e-5); the noise multiplier is calibrated to spend it over all rounds.
    #[arg(long, default_value_t = 50.0)]
    epsilon: f64,
    /// The institution-level noise (where the run has it).
    #[arg(long, value_enum, default_value_t = Noise::Skellam)]
    noise: Noise,
    /// L2 clipping bound of each institution's update.
    #[arg(long, default_value_t = 0.5)]
    clip: f64,
    /// Record-level DP: each institution trains with DP-SGD and keeps every one of its
    /// records within this ε (δ = 1e-5) over all rounds; σ is calibrated per institution.
    /// Default: 8 with --task classify; off with --task sft, whose clinics hold about 45
    /// records each (too few for DP-SGD to leave anything learned: see the README).
    #[arg(long)]
    record_epsilon: Option<f64>,
    /// Train without DP-SGD (institution-level noise on the sum stays).
    #[arg(long)]
    no_record_dp: bool,
    /// No differential privacy at all: neither DP-SGD nor noise on the sum (updates are
    /// still clipped and masked). The baseline of --compare-without-dp.
    #[arg(long, conflicts_with = "no_record_dp")]
    no_dp: bool,
    /// With --task sft: add the institution-level DP noise to the sum (--epsilon); on by
    /// default with --task classify. Among 4 institutions it leaves a generative adapter
    /// nothing learned (the demo prints the noise against the update).
    #[arg(long, conflicts_with = "no_dp")]
    dp: bool,
    /// After the run, run the same federation again with --no-dp (in WORKDIR-no-dp) and
    /// print what the privacy cost: held-out loss, accuracy and time side by side.
    #[arg(long, conflicts_with = "no_dp")]
    compare_without_dp: bool,
    /// DP-SGD per-record clipping norm (with --record-epsilon).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Working directory (recreated).
    #[arg(long, default_value = ".tessera-demo")]
    workdir: PathBuf,
    /// Institution that leaves round 2 after sharing its keys, to show dropout recovery (-1: none).
    #[arg(long, default_value_t = 1)]
    dropout: i64,
    /// ffa: A frozen at the shared seeded initialisation, only B trained and sent; both:
    /// A and B trained and averaged separately.
    #[arg(long, value_enum, default_value_t = LoraMode::Ffa)]
    lora_mode: LoraMode,
    /// Model folder (default: SmolLM2-135M as converted by scripts/setup; `.tessera-data/minilm` is the fast encoder).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Bits per element of the masked update (8 to 32): the sum is computed modulo
    /// 2^bits and each element travels packed in that many bits.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(8..=32))]
    modulus_bits: u8,
    /// Shared random-k: the fraction of coordinates sent each round (the rest is kept as
    /// each clinic's error-feedback residual).
    #[arg(long)]
    keep_fraction: Option<f64>,
    /// Randomized Hadamard rotation before quantization, in blocks of this many coordinates (a power of two).
    #[arg(long)]
    rotation_block: Option<u32>,
    /// Per-coordinate quantization range [-c, c] (default: --clip without DP; C + 6σ with
    /// DP, the least the round accepts). A rotated update has small, even coordinates,
    /// so a narrow range spends the bits of --modulus-bits where the values are.
    #[arg(long)]
    coord_clip: Option<f64>,
    /// Buffered asynchronous rounds: each round is a cohort that goes on with the first K
    /// clinics ready (K must be more than half the clinics). The federation makes as many
    /// updates as the synchronous run (institutions × rounds), in that many / K cohorts;
    /// each clinic trains until the last cohort, applying those it was not part of.
    #[arg(long)]
    buffered: Option<u32>,
    /// One clinic (0-based) trains --slowdown times slower, to compare synchronous and
    /// buffered rounds.
    #[arg(long)]
    slow_institution: Option<usize>,
    #[arg(long, default_value_t = 4.0)]
    slowdown: f64,
}

fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("executable has no directory")?.join(name);
    if !path.exists() {
        bail!("{} not found next to tessera-demo; build it with `cargo build --release --bins`", path.display());
    }
    Ok(path)
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The longest answer generated for exact match: condition names are a few tokens.
const ANSWER_TOKENS: usize = 12;
/// Held-out reviews of each condition in the federation-wide test set.
const GLOBAL_PER_CONDITION: usize = 4;
/// What the model is told to do with each review (the chat's system message).
const INSTRUCTION: &str = "Name the condition the patient took the drug for.";

/// The drug-review data recast as instructions, split between the clinics by condition.
struct InstructionData {
    clinics: Vec<ClinicData>,
    /// Up to [`GLOBAL_PER_CONDITION`] held-out reviews of every condition.
    global_test: Vec<serde_json::Value>,
}

struct ClinicData {
    conditions: Vec<String>,
    train: Vec<serde_json::Value>,
    /// Held-out reviews of the clinic's own conditions (none of them in the global set).
    test: Vec<serde_json::Value>,
}

/// The condition names of the data set lost their last letter in some rows of the source
/// ("Bipolar Disorde", "ibromyalgia"); the answers are the names as written.
fn condition_name(group: &str) -> String {
    match group {
        "ibromyalgia" => "Fibromyalgia".into(),
        g if g.ends_with(" Disorde") => format!("{g}r"),
        g => g.into(),
    }
}

/// A chat record: the instruction as the system message, the review (its first `words`
/// words) as the user's, the condition as the assistant's answer.
fn instruction_record(review: &str, condition: &str, words: usize) -> serde_json::Value {
    let all: Vec<&str> = review.split_whitespace().collect();
    let mut text = all[..all.len().min(words)].join(" ");
    if all.len() > words {
        text.push_str(" …");
    }
    serde_json::json!({"messages": [
        {"role": "system", "content": INSTRUCTION},
        {"role": "user", "content": text},
        {"role": "assistant", "content": condition},
    ], "group": condition})
}

/// The `conditions` most frequent conditions of `dir/train.jsonl` (at most `per_condition`
/// reviews each), dealt to `n` clinics largest first, each to the clinic with the fewest
/// reviews so far; `held_out` test reviews per clinic from its own conditions, and
/// [`GLOBAL_PER_CONDITION`] more of every condition for the federation-wide set.
fn instruction_data(dir: &Path, n: usize, conditions: usize, per_condition: usize, words: usize, held_out: usize) -> anyhow::Result<InstructionData> {
    use std::collections::BTreeMap;
    let by_condition = |path: &Path| -> anyhow::Result<BTreeMap<String, Vec<Example>>> {
        let mut map: BTreeMap<String, Vec<Example>> = BTreeMap::new();
        for e in tessera_client::train::data::read_jsonl(path)? {
            map.entry(condition_name(&e.group)).or_default().push(e);
        }
        Ok(map)
    };
    let (train, test) = (by_condition(&dir.join("train.jsonl"))?, by_condition(&dir.join("test.jsonl"))?);
    let mut ranked: Vec<(&String, &Vec<Example>)> = train.iter().collect();
    ranked.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));
    if conditions < n || ranked.len() < conditions {
        bail!("--conditions {conditions}: needs at least one per clinic ({n}) and at most the {} conditions of the data", ranked.len());
    }
    let mut clinics: Vec<ClinicData> = (0..n).map(|_| ClinicData { conditions: Vec::new(), train: Vec::new(), test: Vec::new() }).collect();
    let mut global_test = Vec::new();
    for (name, reviews) in ranked.into_iter().take(conditions) {
        let i = (0..n).min_by_key(|&i| clinics[i].train.len()).unwrap_or(0);
        let c = &mut clinics[i];
        c.conditions.push(name.clone());
        c.train.extend(reviews.iter().take(per_condition).map(|e| instruction_record(&e.text, name, words)));
        let held: Vec<&Example> = test.get(name).map(|v| v.iter().collect()).unwrap_or_default();
        global_test.extend(held.iter().take(GLOBAL_PER_CONDITION).map(|e| instruction_record(&e.text, name, words)));
        c.test.extend(held.iter().skip(GLOBAL_PER_CONDITION).map(|e| instruction_record(&e.text, name, words)));
    }
    for c in &mut clinics {
        // Its own conditions in turn, so a short test set still covers each of them.
        let mut per: Vec<Vec<serde_json::Value>> = c.conditions.iter().map(|_| Vec::new()).collect();
        for r in c.test.drain(..) {
            if let Some(k) = c.conditions.iter().position(|x| r["group"] == x.as_str()) {
                per[k].push(r);
            }
        }
        let longest = per.iter().map(Vec::len).max().unwrap_or(0);
        c.test = (0..longest).flat_map(|j| per.iter().filter_map(move |p| p.get(j).cloned())).take(held_out).collect();
    }
    Ok(InstructionData { clinics, global_test })
}

fn write_lines(path: &Path, records: &[serde_json::Value]) -> anyhow::Result<()> {
    let text: String = records.iter().map(|r| r.to_string() + "\n").collect();
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn write_jsonl(path: &Path, examples: &[Example]) -> anyhow::Result<()> {
    let text: String = examples.iter().map(|e| serde_json::json!({"text": e.text, "label": e.label, "group": e.group}).to_string() + "\n").collect();
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[derive(Default, Clone)]
struct RoundRow {
    /// The global model's accuracy (classify) or exact match (sft) on the federation-wide test set.
    global_acc: Option<f64>,
    train_loss: Vec<f64>,
    loss: Vec<f64>,
    /// Held-out accuracy (classify) or exact match (sft), per institution.
    acc: Vec<f64>,
    /// Held-out perplexity of the responses (sft), per institution.
    ppl: Vec<f64>,
    tok_s: Vec<f64>,
    bytes: u64,
    included: usize,
    dropped: usize,
    /// The largest record-level ε of any institution after this round (DP-SGD runs).
    record_eps: Option<f64>,
    /// Seconds from the clinics' start to their report of this round (the latest).
    seconds: f64,
    /// Buffered mode: the staleness of each update in the cohort.
    staleness: Vec<u64>,
}

/// An ε for the table: two decimals, or "-" where no DP round released one.
fn eps_text(e: f64) -> String {
    if e.is_finite() {
        format!("{e:.2}")
    } else {
        "-".into()
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let sft = args.task == DemoTask::Sft;
    let steps = args.steps.unwrap_or(if sft { 10 } else { 12 });
    let lr = args.lr.unwrap_or(if sft { 5e-3 } else { 3e-3 });
    let batch_size = args.batch_size.unwrap_or(if sft { 4 } else { 8 });
    let max_len = args.max_len.unwrap_or(if sft { 128 } else { 64 });
    let held_out = args.held_out.unwrap_or(if sft { 12 } else { 48 });
    let record_epsilon = if args.no_dp || args.no_record_dp { None } else { args.record_epsilon.or((!sft).then_some(8.0)) };
    // Noise on the sum: by default for the classifier; for generation only with --dp.
    let institution_dp = !args.no_dp && (!sft || args.dp);
    if args.compare_without_dp && !institution_dp && record_epsilon.is_none() {
        bail!("--compare-without-dp compares with a run that has DP, and this one has none: with --task sft add --dp or --record-epsilon");
    }
    if args.institutions < 2 {
        bail!("a federation needs at least 2 institutions, got --institutions {}", args.institutions);
    }
    if args.dropout >= 0 && args.rounds >= 2 && args.buffered.is_none() {
        // Each institution's masks are recovered from t of its k neighbours: one dropout
        // must leave t of them.
        use tessera_secagg::config::{default_neighbours, DEFAULT_CORRUPTION_RATE, DEFAULT_DROPOUT_RATE};
        let (k, t) = default_neighbours(args.institutions as u32, DEFAULT_DROPOUT_RATE, DEFAULT_CORRUPTION_RATE);
        if k < t + 1 {
            bail!(
                "with {} institutions each has k = {k} neighbours and t = {t} of them must answer to recover its masks, so the dropout of \
                 --dropout {} in round 2 could not be recovered; use --institutions 4 or more, or --dropout -1",
                args.institutions,
                args.dropout
            );
        }
        if args.dropout as usize >= args.institutions {
            bail!("--dropout {} names no institution (there are {})", args.dropout, args.institutions);
        }
    }
    let (server_bin, client_bin) = (bin("tessera-server")?, bin("tessera-client")?);
    let data = tessera_client::train::data_root();
    let model = args.model.clone().unwrap_or_else(|| data.join("smollm2"));
    if !model.join("config.json").exists() {
        bail!("no model in {}: run scripts/setup first", model.display());
    }
    if sft && tessera_client::train::federated::Architecture::detect(&model)? != tessera_client::train::federated::Architecture::Llama {
        bail!("--task sft generates answers, which needs a Llama-family (causal LM) model; {} is an encoder: use --task classify", model.display());
    }
    let work = &args.workdir;
    if work.exists() {
        std::fs::remove_dir_all(work).with_context(|| format!("cannot clear {}", work.display()))?;
    }
    std::fs::create_dir_all(work)?;
    // What the federation releases: its rounds, or the cohorts that carry as many updates.
    let releases = match args.buffered {
        Some(k) => {
            let least = (args.institutions as u32 - 1) / 2 + 2;
            if k < least || k as usize > args.institutions {
                bail!(
                    "--buffered {k}: a cohort goes on with its first K clinics, which must hold each one's share threshold, so K must be in {least}..={}",
                    args.institutions
                );
            }
            (args.institutions as u64 * args.rounds).div_ceil(u64::from(k))
        }
        None => args.rounds,
    };
    if let Some(s) = args.slow_institution {
        if s >= args.institutions || !(args.slowdown.is_finite() && args.slowdown >= 1.0) {
            bail!("--slow-institution {s} --slowdown {}: the clinic must exist and the slowdown be at least 1", args.slowdown);
        }
    }
    let dp_delta = 1e-5;
    let z = noise_multiplier_for(args.epsilon, releases, dp_delta).context("--epsilon")?;
    let dp = DpParams { noise_multiplier: z, l2_clip: args.clip, delta: dp_delta, epsilon_budget: args.epsilon, colluders: 1, skellam: None };
    let dp_gaussian_z = z;
    println!(
        "Tessera demo: {} institutions fine-tune a LoRA adapter of {} together, {} rounds, aggregator over TLS on 127.0.0.1",
        args.institutions,
        model.file_name().and_then(|n| n.to_str()).unwrap_or("the model"),
        args.rounds
    );
    let task_line = if sft {
        format!(
            "instruction fine-tuning: each prompt is a patient's drug review ({} words at most), the answer the condition the drug was taken for, generated greedily and scored by exact match; the {} most frequent conditions, split between the clinics",
            args.review_words, args.conditions
        )
    } else {
        "drug-review sentiment (negative/neutral/positive), reviews split by condition".to_string()
    };
    println!(
        "Task: {task_line}. Local training per round: {} steps × batch {} × ≤{} tokens, lr {}, {} r=8 on the query/value projections{}.",
        steps,
        batch_size,
        max_len,
        lr,
        if args.lora_mode == LoraMode::Ffa { "FFA-LoRA" } else { "LoRA (A and B both averaged)" },
        if model.ends_with("smollm2") { " (sized for a 2-core CPU: raise --steps and --max-len on a GPU)" } else { "" }
    );
    let dropout = args.dropout >= 0 && args.buffered.is_none();
    let min_survivors = match args.buffered {
        Some(k) => k.min(args.institutions as u32 - 1).max(2),
        None => (args.institutions - usize::from(dropout)).max(2) as u32,
    };
    if let Some(k) = args.buffered {
        println!(
            "Rounds: BUFFERED cohorts of K = {k}: {releases} cohorts carry the {} updates a synchronous run of {} rounds would; stale updates weigh (1 + τ)^-0.5{}.",
            args.institutions as u64 * args.rounds,
            args.rounds,
            if args.dropout >= 0 { " (no dropout is injected in buffered mode)" } else { "" }
        );
    }
    if let Some(s) = args.slow_institution {
        println!("Clinic {s} trains {}× slower (--slowdown).", args.slowdown);
    }
    let z_out = dp.outsider_noise_multiplier(min_survivors);
    if !institution_dp && sft && !args.no_dp {
        println!(
            "Privacy: updates are masked, so the aggregator sees only their sum, but carry NO differential-privacy noise (--dp adds it, at ε = {} over the run): \
             among {} institutions that noise outweighs a generative adapter's update many times over (the figure follows below).",
            args.epsilon, args.institutions
        );
    } else if !institution_dp {
        println!(
            "Privacy: NONE (--no-dp): updates are masked (each coordinate clamped to ±{} for quantization) but carry no noise, and no DP-SGD runs.",
            args.clip
        );
    } else {
        println!(
            "Privacy: each update clipped to L2 ≤ {}, distributed {} noise, z = {z:.3} calibrated to ε = {} at δ = {dp_delta:e} over {} rounds \
         against any one participant, who knows its own noise share; against outsiders z = {z_out:.3}, ε = {:.2}. Adjacency: {}.",
            args.clip,
            if args.noise == Noise::Skellam {
                "Skellam (integer; z recalibrated for its accountant below, once the update's size is known)"
            } else {
                "Gaussian"
            },
            args.epsilon,
            releases,
            tessera_secagg::dp::epsilon(z_out, releases, dp_delta),
            tessera_secagg::dp::ADJACENCY_EXPLAINED
        );
    }
    match record_epsilon {
        Some(e) => println!(
            "Record-level privacy: every institution trains with DP-SGD and keeps each of its records within ε = {e} at δ = 1e-5 over all {} rounds (σ calibrated per institution, per-record clip {}).",
            args.rounds, args.max_grad_norm
        ),
        None if sft && !args.no_dp && !args.no_record_dp && institution_dp => println!(
            "Record-level privacy: no DP-SGD in this run (--record-epsilon E turns it on): each clinic holds about 45 records, too few for a per-record ε of 8 to leave anything learned (see the README). The institution-level guarantee above holds."
        ),
        None => {}
    }
    println!("NOTE: dev mode — attestation is SIMULATED and the sealing key is a file.\n");

    // 1. Non-IID shards: clinics by condition; held-out reviews of each clinic's own
    // conditions, and of all conditions for the global model.
    let inst_dir = |i: usize| work.join(format!("institution-{i}"));
    let mut institutions_toml = String::new();
    for i in 0..args.institutions {
        let out = Command::new(&client_bin).args(["init", "--name", &format!("clinic-{i}"), "--dir"]).arg(inst_dir(i)).stderr(Stdio::null()).output()?;
        if !out.status.success() {
            bail!("tessera-client init failed for institution {i}");
        }
        institutions_toml.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    let global_test_len = if sft {
        let data = instruction_data(&data.join("drugreview"), args.institutions, args.conditions, args.per_condition, args.review_words, held_out)?;
        for (i, clinic) in data.clinics.iter().enumerate() {
            write_lines(&inst_dir(i).join("train.jsonl"), &clinic.train)?;
            write_lines(&inst_dir(i).join("test.jsonl"), &clinic.test)?;
            println!("clinic-{i}: {} reviews of {}", clinic.train.len(), clinic.conditions.join(", "));
        }
        write_lines(&work.join("global-test.jsonl"), &data.global_test)?;
        println!(
            "federation-wide test set: {} held-out reviews, {} of each condition where the data has them (a clinic alone never sees {} of the {} conditions)",
            data.global_test.len(),
            GLOBAL_PER_CONDITION,
            args.conditions - args.conditions / args.institutions,
            args.conditions
        );
        data.global_test.len()
    } else {
        let (shards, groups) = split_by_group(&data.join("drugreview/train.jsonl"), args.institutions)?;
        let test_all = tessera_client::train::data::read_jsonl(&data.join("drugreview/test.jsonl"))?;
        for (i, (shard, names)) in shards.iter().zip(&groups).enumerate() {
            let mut test: Vec<Example> = test_all.iter().filter(|e| names.contains(&e.group)).cloned().collect();
            if test.len() < held_out {
                test.extend(test_all.iter().filter(|e| !names.contains(&e.group)).take(held_out - test.len()).cloned());
            }
            test.truncate(held_out);
            write_jsonl(&inst_dir(i).join("train.jsonl"), shard)?;
            write_jsonl(&inst_dir(i).join("test.jsonl"), &test)?;
            let shown: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
            println!("clinic-{i}: {} reviews, {} conditions ({}{})", shard.len(), names.len(), shown.join(", "), if names.len() > 3 { ", …" } else { "" });
        }
        // Held-out reviews of all conditions, for the global model (clinic-0 evaluates them).
        let global_test: Vec<Example> = test_all.iter().step_by((test_all.len() / (2 * held_out).max(1)).max(1)).take(2 * held_out).cloned().collect();
        write_jsonl(&work.join("global-test.jsonl"), &global_test)?;
        global_test.len()
    };

    // 2. The round layout of the adapter, from the same flags every institution uses.
    let mode = match args.lora_mode {
        LoraMode::Ffa => "ffa",
        LoraMode::Both => "both",
    };
    let model_flags: Vec<String> =
        vec!["--model".into(), model.display().to_string(), "--max-len".into(), max_len.to_string(), "--lora-mode".into(), mode.into()];
    // The task, and for generation the longest answer (condition names are a few tokens).
    let task_flags: Vec<String> = if sft { vec!["--task".into(), "sft".into(), "--answer-tokens".into(), ANSWER_TOKENS.to_string()] } else { Vec::new() };
    let out = Command::new(&client_bin).arg("layout").args(&model_flags).stderr(Stdio::null()).output()?;
    if !out.status.success() {
        bail!("tessera-client layout failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let layout: Vec<tessera_secagg::config::TensorSpec> = serde_json::from_slice(&out.stdout).context("layout")?;
    let m: u64 = layout.iter().map(|t| t.numel()).sum();
    let factors = if args.lora_mode == LoraMode::Ffa { "LoRA B" } else { "LoRA A and B" };
    let what = if layout.iter().any(|t| t.name.starts_with("classifier")) {
        format!("{factors} of every query/value projection + the classifier head")
    } else if sft {
        format!("{factors} of every query/value projection")
    } else {
        format!("{factors} of every query/value projection; the label words are scored by the LM head")
    };
    println!("update: {} tensors, {m} parameters ({what})", layout.len());
    if sft && !institution_dp && !args.no_dp {
        // The outsider's noise multiplier: the sum of at least t shares, on the mean of n.
        let noise = dp.outsider_noise_multiplier(min_survivors) * args.clip * (m as f64).sqrt() / args.institutions as f64;
        println!(
            "Why no noise by default: ε = {} needs z = {z:.3}, so the mean of {} updates clipped to L2 ≤ {} would carry Gaussian noise of L2 norm about {noise:.1} \
             over these {m} coordinates, against at most {} of signal. Institution-level DP needs hundreds of institutions; record-level DP-SGD (--record-epsilon) thousands of records each.",
            args.epsilon, args.institutions, args.clip, args.clip
        );
    }
    println!();

    // 3. The operator's configuration and the aggregator.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let layout_toml: String = layout.iter().map(|t| format!("[[rounds.params.layout]]\nname = \"{}\"\nshape = {:?}\n", t.name, t.shape)).collect();
    // Per-coordinate range for quantization: the clipped update plus 6σ of the noise share,
    // the least the round's validation accepts.
    let least = if !institution_dp { 0.0 } else { dp.min_range_clip(min_survivors) * 1.0001 };
    let coord_clip = match args.coord_clip {
        Some(c) if c < least => bail!("--coord-clip {c} is below C + 6σ = {least:.6}, the least a DP round accepts (the range clip would cut the noise)"),
        Some(c) => c as f32,
        None if !institution_dp => args.clip as f32,
        None => least as f32,
    };
    let admin_token = hex::encode(rand::random::<[u8; 16]>());
    // A compliance auditor's credential: the server keeps only its SHA-256.
    let auditor_token = hex::encode(rand::random::<[u8; 16]>());
    std::fs::write(work.join("auditor.token"), &auditor_token)?;
    let access_toml = format!(
        "[[access]]\nname = \"compliance-auditor\"\nrole = \"auditor\"\ntoken_sha256 = \"{}\"\n",
        hex::encode(sha2::Sha256::digest(auditor_token.as_bytes()))
    );
    let mut compression_toml = String::new();
    if args.keep_fraction.is_some() || args.rotation_block.is_some() {
        compression_toml.push_str("[rounds.params.compression]\n");
        if let Some(f) = args.keep_fraction {
            compression_toml.push_str(&format!("keep_fraction = {f}\n"));
        }
        if let Some(b) = args.rotation_block {
            compression_toml.push_str(&format!("rotation_block = {b}\n"));
        }
        compression_toml.push('\n');
    }
    let wire = format!(
        "{} bits per element{}",
        args.modulus_bits,
        match (args.keep_fraction, args.rotation_block) {
            (None, None) => String::new(),
            (k, r) => format!(
                ", {}{}",
                k.map(|f| format!("random-k keeping {:.1}% of coordinates", f * 100.0)).unwrap_or_default(),
                r.map(|b| format!("{}Hadamard rotation in blocks of {b}", if k.is_some() { ", " } else { "" })).unwrap_or_default()
            ),
        }
    );
    let compression = (args.keep_fraction.is_some() || args.rotation_block.is_some())
        .then(|| tessera_server::config::CompressionParams { keep_fraction: args.keep_fraction, rotation_block: args.rotation_block }.for_vector(m as u32))
        .transpose()
        .map_err(|e| anyhow::anyhow!(e))?;
    if let Some(c) = &compression {
        c.validate(m as u32)?;
    }
    let masked_body = tessera_secagg::pack::packed_len(tessera_secagg::compress::encoded_len(m as u32, compression.as_ref()) + 1, args.modulus_bits);
    let bytes_per_parameter = masked_body as f64 / m as f64;
    println!("wire: {wire}; a masked update is {masked_body} bytes, {bytes_per_parameter:.3} bytes per parameter");
    // Skellam noise: z calibrated for its own accountant, over the scale each round will
    // be given (which depends on the update's size, the modulus and the institutions).
    let dp = if institution_dp && args.noise == Noise::Skellam {
        let sk = SkellamNoise { scale: None, beta: tessera_secagg::dp::default_beta() };
        let mut stand_in = RoundConfig::with_defaults(1, (0..args.institutions).map(|i| hex::encode([i as u8; 32])).collect(), m as u32, [0; 32]);
        stand_in.min_survivors = min_survivors;
        stand_in.modulus_bits = args.modulus_bits;
        stand_in.max_weight = 1;
        stand_in.compression = compression;
        stand_in.dp = Some(DpParams { skellam: Some(sk), ..dp });
        let z = stand_in.calibrate_noise_multiplier(args.epsilon, releases).context("--epsilon with --noise skellam")?;
        let dp = DpParams { noise_multiplier: z, skellam: Some(sk), ..dp };
        stand_in.dp = Some(dp);
        let scale = stand_in.skellam_scale()?;
        println!(
            "exact noise: Skellam shares drawn in the integers after quantizing, z = {z:.3} for ε = {} over {releases} rounds by the Skellam accountant \
             (the Gaussian's z = {:.3}), scale {scale:.3e} at {} bits, conditional rounding β = {:.3}",
            args.epsilon, dp_gaussian_z, args.modulus_bits, sk.beta
        );
        dp
    } else {
        dp
    };
    let (privacy_toml, dp_toml) = if !institution_dp {
        (String::new(), String::new())
    } else {
        (
            format!("[privacy]\nepsilon = {}\ndelta = {dp_delta:e}\n\n", args.epsilon),
            format!(
                "[rounds.params.dp]\nnoise_multiplier = {}\nl2_clip = {}\ncolluders = 1\ndelta = {dp_delta:e}\nepsilon_budget = {}\n\n{}",
                dp.noise_multiplier,
                args.clip,
                args.epsilon,
                dp.skellam.map(|s| format!("[rounds.params.dp.skellam]\nbeta = {}\n\n", s.beta)).unwrap_or_default()
            ),
        )
    };
    let cohort_toml = match args.buffered {
        Some(k) => format!("[rounds.params.cohort]\nsize = {k}\nmax_staleness = 4\nstaleness_exponent = 0.5\n\n"),
        None => String::new(),
    };
    let config = format!(
        "listen = \"127.0.0.1:{port}\"\ndata_dir = \"server-data\"\nadmin_token = \"{}\"\ndev_insecure = true\n\n{privacy_toml}[node_policy]\nallow_insecure_dev = true\n\n\
         [rounds]\nauto_open = true\ncount = {}\nmode = \"{}\"\n\n[rounds.params]\nclip = {coord_clip}\nmax_weight = 1\nphase_timeout_ms = 20000\nadvertise_timeout_ms = 900000\nmin_survivors = {}\nmodulus_bits = {}\n\n\
         {dp_toml}{compression_toml}{cohort_toml}{layout_toml}\n{institutions_toml}\n{access_toml}",
        admin_token,
        releases,
        if args.buffered.is_some() { "buffered" } else { "synchronous" },
        min_survivors,
        args.modulus_bits,
    );
    let config_path = work.join("server.toml");
    std::fs::write(&config_path, config)?;
    let mut child =
        Command::new(&server_bin).args(["run", "--config"]).arg(&config_path).env("RUST_LOG", "warn").stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
    let server = Server(child);
    let fingerprint = line.split("fingerprint=").nth(1).map(str::trim).context("aggregator did not start")?.to_string();
    let url = format!("https://127.0.0.1:{port}");
    println!("aggregator up at {url}, TLS public key {}… (institutions pin it and check its evidence in every handshake)\n", &fingerprint[..16]);

    // 4. The institutions, each its own process for all rounds.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = (cores / args.institutions).max(1);
    let mut children = Vec::new();
    for i in 0..args.institutions {
        let dir = inst_dir(i);
        let mut cmd = Command::new(&client_bin);
        cmd.args(["federate", "--insecure-dev", "--server", &url, "--fingerprint", &fingerprint])
            .args(&model_flags)
            .args(&task_flags)
            // Buffered: as many local updates as it takes, until the last cohort.
            .args(["--rounds", &if args.buffered.is_some() { args.institutions as u64 * args.rounds } else { args.rounds }.to_string()])
            .args(["--steps", &steps.to_string(), "--batch-size", &batch_size.to_string()])
            .args(["--lr", &lr.to_string()])
            .args(["--threads", &threads.to_string()])
            .arg("--dir")
            .arg(&dir)
            .arg("--train")
            .arg(dir.join("train.jsonl"))
            .arg("--test")
            .arg(dir.join("test.jsonl"))
            .arg("--report")
            .arg(dir.join("report.jsonl"))
            .arg("--adapter-out")
            .arg(dir.join("global-adapter"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("federate.log"))?);
        if let Some(eps) = record_epsilon {
            cmd.args(["--record-epsilon", &eps.to_string(), "--max-grad-norm", &args.max_grad_norm.to_string()]);
        }
        if i == 0 {
            cmd.arg("--global-test").arg(work.join("global-test.jsonl"));
        }
        if dropout && i as i64 == args.dropout && args.rounds >= 2 {
            cmd.args(["--drop-in-round", "2"]);
        }
        if args.slow_institution == Some(i) {
            cmd.args(["--slowdown", &args.slowdown.to_string()]);
        }
        children.push((i, cmd.spawn()?));
    }
    println!("{} institutions training (logs: {}/institution-*/federate.log) …", args.institutions, work.display());
    let reports: Vec<PathBuf> = (0..args.institutions).map(|i| inst_dir(i).join("report.jsonl")).collect();
    let failed = wait_with_progress(children, &reports, sft)?;
    if !failed.is_empty() {
        bail!("institution(s) {failed:?} failed; see {}/institution-N/federate.log", work.display());
    }

    // 5. The per-round table, from the institutions' reports and the aggregator's accountant.
    let (metric, metric_key) = if sft { ("exact match", "exact_match") } else { ("accuracy", "accuracy") };
    let mut rows = vec![RoundRow::default(); releases as usize + 1];
    for i in 0..args.institutions {
        let path = inst_dir(i).join("report.jsonl");
        if args.buffered.is_some() && !path.exists() {
            println!("clinic-{i} took part in no cohort: the others made every update before its first was ready");
            continue;
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        for (k, line) in text.lines().enumerate() {
            let r: serde_json::Value = serde_json::from_str(line)?;
            if k == 0 {
                rows[0].loss.push(r["initial_loss"].as_f64().unwrap_or(f64::NAN));
                rows[0].acc.push(r[format!("initial_{metric_key}")].as_f64().unwrap_or(f64::NAN));
                rows[0].ppl.push(r["initial_loss"].as_f64().unwrap_or(f64::NAN).exp());
                if let Some(g) = r[format!("initial_global_{metric_key}")].as_f64() {
                    rows[0].global_acc = Some(g);
                }
            }
            // The round (cohort) the report is about; in buffered mode a clinic reports
            // only the cohorts it was part of.
            let Some(row) = r["round"].as_u64().and_then(|n| rows.get_mut(n as usize)).filter(|_| r["round"].as_u64() != Some(0)) else { continue };
            row.seconds = row.seconds.max(r["seconds_since_start"].as_f64().unwrap_or(0.0));
            if let Some(s) = r["staleness"].as_u64() {
                row.staleness.push(s);
            }
            if let Some(g) = r[format!("global_{metric_key}")].as_f64() {
                row.global_acc = Some(g);
            }
            row.train_loss.push(r["train_loss"].as_f64().unwrap_or(f64::NAN));
            row.loss.push(r["held_out_loss"].as_f64().unwrap_or(f64::NAN));
            row.acc.push(r[format!("held_out_{metric_key}")].as_f64().unwrap_or(f64::NAN));
            row.ppl.push(r["held_out_perplexity"].as_f64().unwrap_or(f64::NAN));
            row.tok_s.push(r["tokens_per_sec"].as_f64().unwrap_or(0.0));
            row.bytes += r["bytes_sent"].as_u64().unwrap_or(0);
            row.included = row.included.max(r["included"].as_u64().unwrap_or(0) as usize);
            row.dropped += usize::from(r["dropped"].as_bool().unwrap_or(false));
            if let Some(e) = r["record_epsilon"].as_f64() {
                row.record_eps = Some(row.record_eps.map_or(e, |m: f64| m.max(e)));
            }
        }
    }
    let privacy = privacy_report(&url, &fingerprint, &admin_token)?;
    let audit = export_for_audit(&url, &fingerprint, &auditor_token, releases, work)?;
    let eps_of = |round: u64, field: &str| -> f64 {
        privacy["per_round"].as_array().and_then(|a| a.iter().find(|r| r["round"] == round)).and_then(|r| r[field].as_f64()).unwrap_or(f64::NAN)
    };
    drop(server);
    let (metric_col, global_col) = if sft { ("exact match", "global EM") } else { ("accuracy", "global acc") };
    println!(
        "\n{:>5} | {:>8} | {:>8} | {:>10} | {:>13} | {:>7} | {:>11} | {:>10} | {:>7} | {:>7} | {:>8} | {:>8} | {:>6}",
        if args.buffered.is_some() { "cohort" } else { "round" },
        "included",
        "dropouts",
        "train loss",
        "held-out loss",
        "ppl",
        metric_col,
        global_col,
        "ε insid",
        "ε outsd",
        "MB sent",
        "tok/s",
        "time s"
    );
    let pct = |g: Option<f64>| g.map(|g| format!("{:.1}%", 100.0 * g)).unwrap_or_else(|| "-".into());
    let ppl = |row: &RoundRow| if sft { format!("{:.2}", mean(&row.ppl)) } else { "-".into() };
    println!(
        "{:>5} | {:>8} | {:>8} | {:>10} | {:>13.4} | {:>7} | {:>10.1}% | {:>10} | {:>7} | {:>7} | {:>8} | {:>8} | {:>6}",
        0,
        "-",
        "-",
        "-",
        mean(&rows[0].loss),
        ppl(&rows[0]),
        100.0 * mean(&rows[0].acc),
        pct(rows[0].global_acc),
        "0",
        "0",
        "-",
        "-",
        "-"
    );
    for (r, row) in rows.iter().enumerate().skip(1) {
        let mut record = row.record_eps.map(|e| format!(" | ε record {e:.2}")).unwrap_or_default();
        if args.buffered.is_some() {
            record.push_str(&format!(" | staleness {}", row.staleness.iter().map(u64::to_string).collect::<Vec<_>>().join(",")));
        }
        println!(
            "{:>5} | {:>8} | {:>8} | {:>10.4} | {:>13.4} | {:>7} | {:>10.1}% | {:>10} | {:>7} | {:>7} | {:>8.3} | {:>8.0} | {:>6.0}{record}",
            r,
            format!("{}/{}", row.included, args.institutions),
            row.dropped,
            mean(&row.train_loss),
            mean(&row.loss),
            ppl(row),
            100.0 * mean(&row.acc),
            pct(row.global_acc),
            eps_text(eps_of(r as u64, "epsilon_cumulative")),
            eps_text(eps_of(r as u64, "epsilon_outsider_cumulative")),
            row.bytes as f64 / 1e6,
            mean(&row.tok_s),
            row.seconds
        );
    }
    let plot = work.join("curves.png");
    let series: Vec<(f64, f64, f64)> = rows.iter().map(|r| (mean(&r.loss), mean(&r.acc), 0.0)).collect();
    tessera_tests::plot::curves(&plot, &series, metric)?;
    println!(
        "\nHeld-out loss{} and {metric}: averaged over the institutions, each on reviews of its own conditions. {global_col}: the global model on {global_test_len} reviews of all conditions (evaluated by clinic-0).",
        if sft { ", perplexity (ppl) of the answers" } else { "" }
    );
    println!(
        "ε insid: the federation's cumulative ε against any one participant, who subtracts its own noise share (the figure the budget is charged); ε outsd: against everyone else. {}.",
        tessera_secagg::dp::ADJACENCY_EXPLAINED
    );
    if let Some(e) = record_epsilon {
        println!(
            "ε record: under DP-SGD, the largest ε (δ = 1e-5) any institution's records have spent in local training, of a budget of {e}; it holds against the aggregator too (counted in each institution's own ledger)."
        );
    }
    println!("Every update left its institution clipped, noised and masked; the aggregator released only the signed mean of each round.");
    println!("\nCompliance: round {} report page {} (open it in a browser), bundle {}.", audit.round, audit.page.display(), audit.bundle.display());
    for c in &audit.outcome.checks {
        println!("  audit {} {}: {}", if c.passed { "ok  " } else { "FAIL" }, c.name, c.detail);
    }
    for (name, r) in &audit.records {
        println!("  record-level privacy of {name} in the signed log: {}", r.describe());
    }
    let attest_bin = std::env::current_exe()?.with_file_name("tessera-attest");
    println!(
        "Verify it offline yourself: {} audit {} --policy {} --mean {}",
        attest_bin.display(),
        audit.bundle.display(),
        work.join("auditor-policy.toml").display(),
        audit.mean.display()
    );
    if !audit.outcome.passed() {
        bail!("the offline audit of round {} failed", audit.round);
    }
    println!(
        "Curves: {}. Global adapters (PEFT format): {}/institution-*/global-adapter. Total {:.0} s.",
        plot.display(),
        work.display(),
        started.elapsed().as_secs_f64()
    );
    if !args.no_local_baseline && args.buffered.is_none() {
        let spec = Baseline {
            client_bin: &client_bin,
            institutions: args.institutions,
            rounds: args.rounds,
            flags: [model_flags.clone(), task_flags.clone(), if sft { Vec::new() } else { vec!["--task".into(), "classify".into()] }].concat(),
            steps,
            batch_size,
            lr,
            threads,
            work,
        };
        let local = local_baseline(&spec)?;
        println!(
            "\nLocal-only baseline: each clinic trains alone, the same {steps} steps × batch {batch_size} per round as in the federation, with nothing sent (so no DP noise or clipping); evaluated on its own held-out reviews and on the federation-wide test set:"
        );
        println!(
            "{:>5} | {:>13} | {:>7} | {:>11} | {:>22} | {:>15} | {:>18}",
            "round",
            "held-out loss",
            "ppl",
            metric_col,
            format!("{global_col}, mean of clinics"),
            format!("best clinic"),
            format!("federated {global_col}")
        );
        for (r, l) in local.iter().enumerate() {
            let best = l.global.iter().copied().fold(f64::NAN, f64::max);
            println!(
                "{:>5} | {:>13.4} | {:>7} | {:>10.1}% | {:>22} | {:>15} | {:>18}",
                r + 1,
                mean(&l.loss),
                if sft { format!("{:.2}", mean(&l.ppl)) } else { "-".into() },
                100.0 * mean(&l.acc),
                pct(Some(mean(&l.global))),
                pct(Some(best)),
                pct(rows.get(r + 1).and_then(|row| row.global_acc))
            );
        }
        if let (Some(l), Some(fed)) = (local.last(), rows.last().and_then(|r| r.global_acc)) {
            let alone = mean(&l.global);
            let why = if fed > alone {
                "alone, a clinic learns only its own conditions"
            } else if institution_dp || record_epsilon.is_some() {
                "here the clinics alone do better: their runs carry no DP noise or clipping, the federation's updates do"
            } else {
                "here the clinics alone do better"
            };
            println!(
                "On the {global_test_len} federation-wide test reviews after round {}: the federated model {:.1}% {metric}; each clinic alone {:.1}% on average (best {:.1}%): {why}.",
                args.rounds,
                100.0 * fed,
                100.0 * alone,
                100.0 * l.global.iter().copied().fold(f64::NAN, f64::max)
            );
        }
        println!("Total {:.0} s.", started.elapsed().as_secs_f64());
    }
    let last = rows.last().cloned().unwrap_or_default();
    let summary = Summary {
        held_out_loss: mean(&last.loss),
        accuracy: mean(&last.acc),
        global_accuracy: last.global_acc,
        seconds: started.elapsed().as_secs_f64(),
        epsilon_institution: institution_dp.then(|| eps_of(releases, "epsilon_cumulative")),
        epsilon_record: last.record_eps,
        bytes_per_parameter,
        mb_sent_last_round: last.bytes as f64 / 1e6,
        curve: rows.iter().skip(1).map(|r| (r.seconds, mean(&r.loss))).collect(),
    };
    std::fs::write(work.join("summary.json"), serde_json::to_vec_pretty(&summary)?)?;
    if args.compare_without_dp {
        compare_without_dp(&args, &summary)?;
    }
    Ok(())
}

/// The last round of a run, for --compare-without-dp (written to WORKDIR/summary.json).
#[derive(serde::Serialize, serde::Deserialize)]
struct Summary {
    held_out_loss: f64,
    /// Held-out accuracy (classify) or exact match (sft); `global_accuracy` likewise.
    accuracy: f64,
    global_accuracy: Option<f64>,
    seconds: f64,
    epsilon_institution: Option<f64>,
    epsilon_record: Option<f64>,
    /// Bytes of one masked update's body per parameter of the adapter.
    #[serde(default)]
    bytes_per_parameter: f64,
    /// Everything the institutions sent in the last round (all five phases), in MB.
    #[serde(default)]
    mb_sent_last_round: f64,
    /// Per round (cohort): seconds since the clinics started, and the held-out loss of
    /// the clinics that reported it.
    #[serde(default)]
    curve: Vec<(f64, f64)>,
}

/// What the local-only baseline runs: `tessera-client finetune` per clinic, on its own
/// data, with the federation's model, task and schedule.
struct Baseline<'a> {
    client_bin: &'a Path,
    institutions: usize,
    rounds: u64,
    flags: Vec<String>,
    steps: usize,
    batch_size: usize,
    lr: f64,
    threads: usize,
    work: &'a Path,
}

/// One round of the local-only baseline: per clinic.
#[derive(Default, Clone)]
struct LocalRow {
    loss: Vec<f64>,
    ppl: Vec<f64>,
    /// Accuracy or exact match on the clinic's own held-out reviews.
    acc: Vec<f64>,
    /// The same on the federation-wide test set.
    global: Vec<f64>,
}

fn local_baseline(b: &Baseline) -> anyhow::Result<Vec<LocalRow>> {
    let dir = |i: usize| b.work.join(format!("institution-{i}"));
    println!("\nLocal-only baseline: {} clinics train alone (logs: {}/institution-*/local.log) …", b.institutions, b.work.display());
    let mut children = Vec::new();
    for i in 0..b.institutions {
        let d = dir(i);
        let child = Command::new(b.client_bin)
            .args(["finetune", "--name", &format!("clinic-{i} alone"), "--no-initial-eval"])
            .args(&b.flags)
            .args(["--rounds", &b.rounds.to_string(), "--steps", &b.steps.to_string(), "--batch-size", &b.batch_size.to_string()])
            .args(["--lr", &b.lr.to_string(), "--threads", &b.threads.to_string()])
            .arg("--train")
            .arg(d.join("train.jsonl"))
            .arg("--test")
            .arg(d.join("test.jsonl"))
            .arg("--global-test")
            .arg(b.work.join("global-test.jsonl"))
            .arg("--report")
            .arg(d.join("local-report.jsonl"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("local.log"))?)
            .spawn()?;
        children.push((i, child));
    }
    let reports: Vec<PathBuf> = (0..b.institutions).map(|i| dir(i).join("local-report.jsonl")).collect();
    let failed = wait_with_progress(children, &reports, b.flags.iter().any(|f| f == "sft"))?;
    if !failed.is_empty() {
        bail!("the local-only run of clinic(s) {failed:?} failed; see {}/institution-N/local.log", b.work.display());
    }
    let mut rows = vec![LocalRow::default(); b.rounds as usize];
    for path in &reports {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        for line in text.lines() {
            let r: serde_json::Value = serde_json::from_str(line)?;
            let Some(row) = r["round"].as_u64().and_then(|n| n.checked_sub(1)).and_then(|n| rows.get_mut(n as usize)) else { continue };
            let metric = |key: &str| r[format!("{key}_exact_match")].as_f64().or(r[format!("{key}_accuracy")].as_f64()).unwrap_or(f64::NAN);
            row.loss.push(r["held_out_loss"].as_f64().unwrap_or(f64::NAN));
            row.ppl.push(r["held_out_perplexity"].as_f64().unwrap_or(f64::NAN));
            row.acc.push(metric("held_out"));
            row.global.push(metric("global"));
        }
    }
    Ok(rows)
}

/// Waits for the clinics' processes, printing each round's line from their reports as it
/// appears (and every 30 s without one, that they are still training). Returns the
/// clinics whose process failed.
fn wait_with_progress(mut children: Vec<(usize, Child)>, reports: &[PathBuf], sft: bool) -> anyhow::Result<Vec<usize>> {
    let mut seen = vec![0usize; reports.len()];
    let mut failed = Vec::new();
    let (started, mut last_news) = (Instant::now(), Instant::now());
    let metric = if sft { "exact match" } else { "accuracy" };
    loop {
        let mut running = Vec::new();
        let mut error = None;
        for (i, mut child) in children {
            match child.try_wait() {
                Ok(Some(status)) if !status.success() => failed.push(i),
                Ok(Some(_)) => {}
                Ok(None) => running.push((i, child)),
                Err(e) => {
                    let _ = child.kill();
                    error.get_or_insert(anyhow::anyhow!("cannot wait for clinic {i}'s process: {e}"));
                }
            }
        }
        if let Some(e) = error {
            // No clinic is left running behind an error.
            for (_, mut child) in running {
                let _ = child.kill();
                let _ = child.wait();
            }
            return Err(e);
        }
        children = running;
        for (i, path) in reports.iter().enumerate() {
            let Ok(text) = std::fs::read_to_string(path) else { continue };
            // Only whole lines: a report line is written at once, but may be read half-way.
            let lines: Vec<&str> = text.split_inclusive('\n').filter(|l| l.ends_with('\n')).collect();
            for line in &lines[seen[i].min(lines.len())..] {
                let Ok(r) = serde_json::from_str::<serde_json::Value>(line) else { continue };
                let m = r["held_out_exact_match"].as_f64().or(r["held_out_accuracy"].as_f64()).unwrap_or(f64::NAN);
                let global = r["global_exact_match"].as_f64().or(r["global_accuracy"].as_f64());
                println!(
                    "  [{:>4.0} s] {} round {}: train loss {:.3}, held-out loss {:.3}, {metric} {:.1}%{}",
                    started.elapsed().as_secs_f64(),
                    r["institution"].as_str().unwrap_or("?"),
                    r["round"],
                    r["train_loss"].as_f64().unwrap_or(f64::NAN),
                    r["held_out_loss"].as_f64().unwrap_or(f64::NAN),
                    100.0 * m,
                    global.map(|g| format!(", federation-wide {metric} {:.1}%", 100.0 * g)).unwrap_or_default()
                );
                last_news = Instant::now();
            }
            seen[i] = lines.len();
        }
        // Checked before the reports were read: every line of a finished clinic is printed.
        if children.is_empty() {
            break;
        }
        if last_news.elapsed() >= Duration::from_secs(30) {
            println!("  [{:>4.0} s] {} still training …", started.elapsed().as_secs_f64(), children.len());
            last_news = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    failed.sort_unstable();
    Ok(failed)
}

/// Runs the same federation again without any DP (this binary, --no-dp, in
/// WORKDIR-no-dp) and prints both last rounds side by side.
fn compare_without_dp(args: &Args, with_dp: &Summary) -> anyhow::Result<()> {
    let mut dir = args.workdir.clone().into_os_string();
    dir.push("-no-dp");
    let dir = PathBuf::from(dir);
    // The child clears its working directory first: its log goes beside it.
    let log_path = PathBuf::from(format!("{}.log", dir.display()));
    println!("\n== the same federation without DP, for comparison (output in {}) …", log_path.display());
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("--no-dp").arg("--workdir").arg(&dir);
    // The baseline without DP is a federation too; the local-only runs need no second copy.
    cmd.args(["--task", if args.task == DemoTask::Sft { "sft" } else { "classify" }, "--no-local-baseline"]);
    cmd.args(["--institutions", &args.institutions.to_string(), "--rounds", &args.rounds.to_string()]);
    cmd.args(["--clip", &args.clip.to_string(), "--dropout", &args.dropout.to_string()]);
    cmd.args([
        "--conditions",
        &args.conditions.to_string(),
        "--per-condition",
        &args.per_condition.to_string(),
        "--review-words",
        &args.review_words.to_string(),
    ]);
    for (flag, value) in [("--steps", args.steps), ("--batch-size", args.batch_size), ("--max-len", args.max_len), ("--held-out", args.held_out)] {
        if let Some(v) = value {
            cmd.args([flag, &v.to_string()]);
        }
    }
    if let Some(lr) = args.lr {
        cmd.args(["--lr", &lr.to_string()]);
    }
    cmd.args(["--lora-mode", if args.lora_mode == LoraMode::Ffa { "ffa" } else { "both" }]);
    cmd.args(["--modulus-bits", &args.modulus_bits.to_string()]);
    if let Some(c) = args.coord_clip {
        cmd.args(["--coord-clip", &c.to_string()]);
    }
    if let Some(k) = args.buffered {
        cmd.args(["--buffered", &k.to_string()]);
    }
    if let Some(s) = args.slow_institution {
        cmd.args(["--slow-institution", &s.to_string(), "--slowdown", &args.slowdown.to_string()]);
    }
    if let Some(f) = args.keep_fraction {
        cmd.args(["--keep-fraction", &f.to_string()]);
    }
    if let Some(b) = args.rotation_block {
        cmd.args(["--rotation-block", &b.to_string()]);
    }
    if let Some(m) = &args.model {
        cmd.arg("--model").arg(m);
    }
    let status = cmd.stdout(std::fs::File::create(&log_path)?).stderr(Stdio::inherit()).status()?;
    if !status.success() {
        bail!("the run without DP failed; see {}", log_path.display());
    }
    let without: Summary = serde_json::from_slice(&std::fs::read(dir.join("summary.json"))?).context("the run without DP left no summary")?;
    let pct = |g: Option<f64>| g.map(|g| format!("{:.1}%", 100.0 * g)).unwrap_or_else(|| "-".into());
    let eps = |e: Option<f64>| e.map(|e| format!("{e:.2}")).unwrap_or_else(|| "none".into());
    println!("\nWhat privacy costs, last round (round {}):", args.rounds);
    let (metric, global) = if args.task == DemoTask::Sft { ("exact match", "global EM") } else { ("accuracy", "global acc") };
    println!("{:>18} | {:>13} | {:>11} | {:>10} | {:>12} | {:>8} | {:>7}", "run", "held-out loss", metric, global, "ε institution", "ε record", "seconds");
    for (name, s) in [("with DP", with_dp), ("without DP", &without)] {
        println!(
            "{:>18} | {:>13.4} | {:>10.1}% | {:>10} | {:>12} | {:>8} | {:>7.0}",
            name,
            s.held_out_loss,
            100.0 * s.accuracy,
            pct(s.global_accuracy),
            eps(s.epsilon_institution),
            eps(s.epsilon_record),
            s.seconds
        );
    }
    println!(
        "DP costs {:+.4} held-out loss and {:+.1} points of {metric} here (the run without DP: {}).",
        with_dp.held_out_loss - without.held_out_loss,
        100.0 * (with_dp.accuracy - without.accuracy),
        log_path.display()
    );
    Ok(())
}

/// What the auditor takes away from the last round: its report bundle (JSON), the report
/// page (HTML) and the released mean; verified here with the same code as
/// `tessera-attest audit`.
struct AuditExport {
    round: u64,
    bundle: PathBuf,
    page: PathBuf,
    mean: PathBuf,
    outcome: tessera_attestation::audit::AuditOutcome,
    /// Each institution's record-level DP as its signed masked input stated it (name, claim).
    records: Vec<(String, tessera_attestation::audit::RecordPrivacyRecord)>,
}

fn export_for_audit(url: &str, fingerprint: &str, token: &str, round: u64, work: &Path) -> anyhow::Result<AuditExport> {
    let pin: [u8; 32] = hex::decode(fingerprint)?.try_into().map_err(|_| anyhow::anyhow!("bad fingerprint"))?;
    let api = tessera_client::Api::new(url, pin)?.with_bearer(token);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (bundle, page, mean) = rt.block_on(async {
        let bundle = api.get_bytes(format!("/v1/rounds/{round}/report")).await?;
        let page = api.get_bytes(format!("/reports/{round}")).await?;
        let mean = api.get_bytes(format!("/v1/rounds/{round}/result/mean")).await?;
        Ok::<_, tessera_client::http::HttpError>((bundle, page, mean))
    })?;
    let paths =
        (work.join(format!("round-{round}-report.json")), work.join(format!("round-{round}-report.html")), work.join(format!("round-{round}-mean.bin")));
    std::fs::write(&paths.0, &bundle)?;
    std::fs::write(&paths.1, &page)?;
    std::fs::write(&paths.2, &mean)?;
    // The demo's aggregator runs in INSECURE dev mode, so the auditor's policy must say so.
    std::fs::write(work.join("auditor-policy.toml"), "# The demo's aggregator has simulated evidence: accept it, knowingly.\nallow_insecure_dev = true\n")?;
    let parsed: tessera_attestation::audit::RoundBundle = serde_json::from_slice(&bundle).context("the report bundle does not parse")?;
    let inputs = tessera_attestation::audit::AuditInputs {
        policy: tessera_attestation::policy::NodePolicy::insecure_dev(),
        now_secs: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        previous_head: None,
        mean: Some(mean.to_vec()),
    };
    let outcome = tessera_attestation::audit::audit_bundle(&parsed, &inputs);
    let records = parsed
        .report
        .participants
        .iter()
        .filter_map(|p| p.record_privacy.map(|r| (parsed.names.get(&p.identity).cloned().unwrap_or_else(|| format!("client {}", p.client)), r)))
        .collect();
    Ok(AuditExport { round, bundle: paths.0, page: paths.1, mean: paths.2, outcome, records })
}

fn privacy_report(url: &str, fingerprint: &str, token: &str) -> anyhow::Result<serde_json::Value> {
    let pin: [u8; 32] = hex::decode(fingerprint)?.try_into().map_err(|_| anyhow::anyhow!("bad fingerprint"))?;
    let api = tessera_client::Api::new(url, pin)?.with_bearer(token);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let report: Result<serde_json::Value, tessera_client::http::HttpError> =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), api.get_json("/v1/privacy")).await }).context("privacy report timed out")?;
    report.context("privacy report")
}
