//! One institution's part of federated LoRA fine-tuning: hold the global adapter, train
//! locally from it, hand over `delta = local − global` (clipped and noised when the
//! round has DP), and apply each released mean to the global adapter.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind};
use tessera_secagg::config::TensorSpec;
use tessera_secagg::RoundConfig;

use super::bert::BertClassifier;
use super::data::{read_jsonl, Batch, Encoded, Example, TextEncoder};
use super::llama::{Llama, LlamaClassifier};
use super::lora::{Adapter, LoraConfig};
use super::privacy;
use super::server_opt::{ServerOptimizer, Strategy};
use super::trainer::{evaluate, train, Classify, EvalStats, TrainConfig, TrainStats};
use super::weights::{read_json, ModelError};

/// A sequence classifier with its adapter and an institution's data.
#[derive(Debug)]
pub struct Institution {
    pub name: String,
    pub model: TaskModel,
    pub adapter: Adapter,
    pub encoder: TextEncoder,
    pub train: Vec<Encoded>,
    pub test: Vec<Encoded>,
    pub train_config: TrainConfig,
    pub device: Device,
    /// How each released mean moves the global adapter (FedAvg unless set).
    pub server_opt: ServerOptimizer,
}

/// A sequence classifier of either architecture.
#[derive(Debug)]
pub enum TaskModel {
    /// Encoder + pooled linear head.
    Bert(BertClassifier),
    /// Decoder scoring the label words after a prompt.
    Llama(LlamaClassifier),
}

impl Classify for TaskModel {
    fn logits(&self, batch: &Batch, train: bool) -> tch::Tensor {
        match self {
            TaskModel::Bert(m) => m.logits(&batch.ids, &batch.mask, train),
            TaskModel::Llama(m) => m.logits(&batch.ids, &batch.mask, train),
        }
    }
    fn weight_kind(&self) -> tch::Kind {
        match self {
            TaskModel::Bert(_) => tch::Kind::Float,
            TaskModel::Llama(m) => m.llama.dtype(),
        }
    }
}

/// Which architecture a model folder holds, from its config.json.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Bert,
    Llama,
}

impl Architecture {
    pub fn detect(dir: &Path) -> Result<Architecture, ModelError> {
        #[derive(serde::Deserialize)]
        struct Probe {
            #[serde(default)]
            model_type: String,
            #[serde(default)]
            architectures: Vec<String>,
        }
        let path = dir.join("config.json");
        let p: Probe = read_json(&path)?;
        let arch = p.architectures.first().map(String::as_str).unwrap_or("");
        match (p.model_type.as_str(), arch) {
            ("bert", _) | (_, "BertModel") => Ok(Architecture::Bert),
            ("llama", _) | (_, "LlamaForCausalLM") => Ok(Architecture::Llama),
            (t, a) => Err(ModelError::Config { path, reason: format!("model_type `{t}` / architecture `{a}`: supported are bert and llama") }),
        }
    }

    /// PEFT's default LoRA targets for the architecture (query and value projections).
    pub fn default_targets(self) -> Vec<String> {
        match self {
            Architecture::Bert => vec!["query".into(), "value".into()],
            Architecture::Llama => vec!["q_proj".into(), "v_proj".into()],
        }
    }
}

/// The prompt around each review for decoders, and the label words that follow it.
pub const PROMPT_PREFIX: &str = "Review: ";
pub const PROMPT_SUFFIX: &str = "\nSentiment:";
pub const LABEL_WORDS: [&str; 3] = [" negative", " neutral", " positive"];

/// The model every institution of a federation loads: the same folder, head and LoRA.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    /// config.json, *.safetensors, tokenizer.json.
    pub dir: PathBuf,
    pub lora: LoraConfig,
    pub num_labels: i64,
    /// Tokens per example; longer texts are truncated.
    pub max_len: usize,
    /// The base weights' type (Llama family; BERT runs in f32).
    pub dtype: super::Dtype,
}

/// Examples per shard, and the groups each shard holds.
pub type Shards = (Vec<Vec<Example>>, Vec<Vec<String>>);

#[derive(Debug)]
pub struct LocalUpdate {
    /// local − global, in the adapter's update order (not yet clipped or noised).
    pub delta: Vec<f32>,
    pub examples: usize,
    pub stats: TrainStats,
}

impl Institution {
    /// Loads the encoder model of `spec` with a fresh adapter (identical in every
    /// process for the same LoRA seed) and encodes the institution's examples.
    pub fn new(
        name: &str,
        spec: &ModelSpec,
        train_examples: &[Example],
        test_examples: &[Example],
        train_config: TrainConfig,
    ) -> Result<Institution, ModelError> {
        let device = super::device();
        let arch = Architecture::detect(&spec.dir)?;
        let mut lora = spec.lora.clone();
        if lora.target_modules.is_empty() {
            lora.target_modules = arch.default_targets();
        }
        let encoder = TextEncoder::load(&spec.dir.join("tokenizer.json"), spec.max_len)?;
        let (model, adapter, encoder) = match arch {
            Architecture::Bert => {
                if spec.dtype != super::Dtype::F32 {
                    return Err(ModelError::Config { path: spec.dir.clone(), reason: format!("BERT models run in f32 here, not {}", spec.dtype) });
                }
                let mut adapter = Adapter::new(lora, "SEQ_CLS", device, Kind::Float)?;
                let model = BertClassifier::load(&spec.dir, &mut adapter, spec.num_labels, device)?;
                (TaskModel::Bert(model), adapter, encoder)
            }
            Architecture::Llama => {
                if spec.num_labels as usize != LABEL_WORDS.len() {
                    return Err(ModelError::Config {
                        path: spec.dir.clone(),
                        reason: format!("decoder classification knows {} label words", LABEL_WORDS.len()),
                    });
                }
                let mut adapter = Adapter::new(lora, "CAUSAL_LM", device, Kind::Float)?;
                let llama = Llama::load_as(&spec.dir, &mut adapter, device, spec.dtype.kind())?;
                let encoder = encoder.with_prompt(PROMPT_PREFIX, PROMPT_SUFFIX)?;
                let mut label_ids = Vec::new();
                for w in LABEL_WORDS {
                    let first = *encoder.raw(w)?.first().ok_or_else(|| ModelError::Tokenizer(format!("label word {w:?} encodes to nothing")))?;
                    if label_ids.contains(&first) {
                        return Err(ModelError::Tokenizer(format!("label words share their first token {first}")));
                    }
                    label_ids.push(first);
                }
                (TaskModel::Llama(LlamaClassifier::new(llama, &label_ids)), adapter, encoder)
            }
        };
        let train = encoder.encode_all(train_examples)?;
        let test = encoder.encode_all(test_examples)?;
        Ok(Institution {
            name: name.into(),
            model,
            adapter,
            encoder,
            train,
            test,
            train_config,
            device,
            server_opt: ServerOptimizer::new(Strategy::FedAvg, 1.0),
        })
    }

    /// The round layout of this adapter's update.
    pub fn layout(&self) -> Vec<TensorSpec> {
        self.adapter.update_layout().into_iter().map(|(name, shape)| TensorSpec { name, shape: shape.into_iter().map(|d| d as u64).collect() }).collect()
    }

    /// Trains from the current global adapter; returns the delta and leaves the adapter
    /// at the global values again (the local model never replaces the global one).
    pub fn local_update(&mut self, round: u64) -> Result<LocalUpdate, ModelError> {
        let cfg = round_config(&self.train_config, round);
        let label = format!("{} round {round}", self.name);
        let (model, encoder, data) = (&self.model, &self.encoder, &self.train);
        let (delta, stats) = delta_of(&self.adapter, |adapter| train(model, adapter, encoder, data, &cfg, &label))?;
        Ok(LocalUpdate { delta, examples: self.train.len(), stats })
    }

    /// Moves the global adapter by the server optimizer's step for the released mean
    /// (global += mean for FedAvg with server learning rate 1).
    pub fn apply_mean(&mut self, mean: &[f32]) -> Result<(), ModelError> {
        let step = self.server_opt.step(mean);
        self.adapter.add_flat(&step)
    }

    pub fn evaluate(&self, data: &[Encoded]) -> EvalStats {
        evaluate(&self.model, &self.encoder, data, 32, self.device)
    }
}

/// The local training configuration of `round`: the seed varies with the round.
fn round_config(base: &TrainConfig, round: u64) -> TrainConfig {
    TrainConfig { seed: base.seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15), ..base.clone() }
}

/// Runs `train` from the adapter's current (global) values and returns `local − global`,
/// leaving the adapter at the global values again.
fn delta_of(adapter: &Adapter, train: impl FnOnce(&Adapter) -> Result<TrainStats, ModelError>) -> Result<(Vec<f32>, TrainStats), ModelError> {
    let global = adapter.snapshot();
    let before = adapter.flatten_update()?;
    let result = train(adapter);
    let after = adapter.flatten_update();
    adapter.restore(&global);
    let stats = result?;
    let delta = after?.iter().zip(&before).map(|(a, b)| a - b).collect();
    Ok((delta, stats))
}

/// One institution's part of federated instruction fine-tuning of a Llama-family model:
/// the same round protocol as [`Institution`], on prompt/response records, with the
/// completion-only loss ([`super::sft`]).
#[derive(Debug)]
pub struct SftInstitution {
    pub name: String,
    pub llama: Llama,
    pub adapter: Adapter,
    pub encoder: super::sft::SftEncoder,
    pub train: Vec<super::sft::SftEncoded>,
    pub train_config: TrainConfig,
    pub device: Device,
    pub server_opt: ServerOptimizer,
}

/// Prompts scored and generated for together in an evaluation (greedy, KV cache,
/// left-padded).
pub const GENERATION_BATCH: usize = 16;

/// Held-out figures of the instruction objective.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct SftEvaluation {
    pub loss: f64,
    pub perplexity: f64,
    /// Fraction of records whose greedy answer, normalized, equals the reference response.
    pub exact_match: f64,
    pub examples: usize,
}

/// An answer as exact match compares it: trimmed, whitespace collapsed, lower case, a
/// final full stop dropped.
pub fn normalize_answer(s: &str) -> String {
    let t = s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    t.strip_suffix('.').map(str::to_string).unwrap_or(t)
}

impl SftInstitution {
    /// Loads the decoder of `spec` (Llama family) with a fresh adapter and encodes the
    /// training records; records with no response left within `max_len` are refused.
    pub fn new(name: &str, spec: &ModelSpec, train_records: &[super::sft::SftExample], train_config: TrainConfig) -> Result<SftInstitution, ModelError> {
        let device = super::device();
        if Architecture::detect(&spec.dir)? != Architecture::Llama {
            return Err(ModelError::Config { path: spec.dir.clone(), reason: "instruction fine-tuning needs a Llama-family (causal LM) model".into() });
        }
        let mut lora = spec.lora.clone();
        if lora.target_modules.is_empty() {
            lora.target_modules = Architecture::Llama.default_targets();
        }
        let mut adapter = Adapter::new(lora, "CAUSAL_LM", device, Kind::Float)?;
        let llama = Llama::load_as(&spec.dir, &mut adapter, device, spec.dtype.kind())?;
        let encoder = super::sft::SftEncoder::load(&spec.dir, spec.max_len)?;
        let (train, dropped) = encoder.encode_all(train_records)?;
        if dropped > 0 {
            return Err(ModelError::Tokenizer(format!(
                "{dropped} of {} training records have no response token within {} tokens; raise --max-len or shorten the prompts",
                train_records.len(),
                spec.max_len
            )));
        }
        Ok(SftInstitution { name: name.into(), llama, adapter, encoder, train, train_config, device, server_opt: ServerOptimizer::new(Strategy::FedAvg, 1.0) })
    }

    pub fn layout(&self) -> Vec<TensorSpec> {
        self.adapter.update_layout().into_iter().map(|(name, shape)| TensorSpec { name, shape: shape.into_iter().map(|d| d as u64).collect() }).collect()
    }

    /// See [`Institution::local_update`].
    pub fn local_update(&mut self, round: u64) -> Result<LocalUpdate, ModelError> {
        let cfg = round_config(&self.train_config, round);
        let label = format!("{} round {round}", self.name);
        let (llama, encoder, data) = (&self.llama, &self.encoder, &self.train);
        let (delta, stats) = delta_of(&self.adapter, |adapter| super::trainer::train_sft(llama, adapter, encoder, data, &cfg, &label))?;
        Ok(LocalUpdate { delta, examples: self.train.len(), stats })
    }

    pub fn apply_mean(&mut self, mean: &[f32]) -> Result<(), ModelError> {
        let step = self.server_opt.step(mean);
        self.adapter.add_flat(&step)
    }

    /// Response loss and perplexity on `records`, and exact match of the greedy answers
    /// (at most `max_new_tokens` each, stopped at the end of the turn or sequence), from
    /// one prefill of each batch of prompts ([`super::sft::SftEncoder::score_records`]).
    pub fn evaluate(&self, records: &[super::sft::SftExample], max_new_tokens: usize) -> Result<SftEvaluation, ModelError> {
        let scored = self.encoder.score_records(&self.llama, records, max_new_tokens, GENERATION_BATCH)?;
        let (sum, count) = scored.iter().fold((0.0, 0usize), |(s, n), (l, c, _)| (s + l, n + c));
        let hits = scored.iter().zip(records).filter(|((_, _, a), r)| normalize_answer(&a.text) == normalize_answer(&r.response)).count();
        let loss = sum / count.max(1) as f64;
        Ok(SftEvaluation { loss, perplexity: loss.exp(), exact_match: hits as f64 / records.len().max(1) as f64, examples: records.len() })
    }
}

/// What leaves the institution for a round: the delta clipped to the round's L2 bound and
/// with its DP noise share when the round has DP; unchanged otherwise. Returns the norm
/// before clipping (for the institution's own log, never sent).
pub fn prepare_for_round(delta: &mut [f32], cfg: &RoundConfig) -> Option<f64> {
    cfg.dp.as_ref().map(|dp| privacy::privatize(delta, dp, cfg.min_survivors))
}

/// Reads a JSON-lines dataset and splits it into `n` non-IID shards by `group`: groups
/// go, largest first, to the shard with the fewest examples so far. Deterministic.
pub fn split_by_group(path: &Path, n: usize) -> Result<Shards, ModelError> {
    let all = read_jsonl(path)?;
    let mut groups: BTreeMap<String, Vec<Example>> = BTreeMap::new();
    for e in all {
        groups.entry(e.group.clone()).or_default().push(e);
    }
    let mut ordered: Vec<(String, Vec<Example>)> = groups.into_iter().collect();
    ordered.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
    let mut shards: Vec<Vec<Example>> = vec![Vec::new(); n.max(1)];
    let mut names: Vec<Vec<String>> = vec![Vec::new(); n.max(1)];
    for (g, ex) in ordered {
        let i = (0..shards.len()).min_by_key(|&i| shards[i].len()).unwrap_or(0);
        names[i].push(g);
        shards[i].extend(ex);
    }
    Ok((shards, names))
}
