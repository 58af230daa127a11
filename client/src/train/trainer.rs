//! The local training loop: AdamW with linear warm-up and decay, gradient accumulation,
//! an optional FedProx proximal term, mixed precision on CUDA, progress with loss and
//! tokens/s, and held-out evaluation.

use std::time::Instant;

use rand::rngs::OsRng;
use rand::{RngCore, SeedableRng};
use rand_chacha::{ChaCha20Rng, ChaCha8Rng};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::data::{shuffled, Batch, Encoded, TextEncoder};
use super::dpsgd::{clipped_sum, noised_mean, poisson_sample, DpSgdConfig, PerExampleMethod};
use super::lora::Adapter;
use super::weights::ModelError;

/// A model that maps a batch to class logits `[batch, classes]`.
pub trait Classify {
    fn logits(&self, batch: &Batch, train: bool) -> Tensor;
    /// The type of the base weights (f32 unless loaded in half precision).
    fn weight_kind(&self) -> Kind {
        Kind::Float
    }
}

/// Mixed precision on CUDA for f32 base weights; weights already in bf16 or f16 compute
/// in their own type (autocast's f16 would otherwise recast bf16 weights).
fn autocast_for(device: Device, weights: Kind) -> bool {
    device.is_cuda() && weights == Kind::Float
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub lr: f64,
    /// Fraction of the steps spent warming the learning rate up linearly; it then decays linearly to 0.
    pub warmup: f64,
    pub weight_decay: f64,
    /// FedProx μ: adds μ/2 ‖w − w_global‖² to the loss (0 = plain FedAvg).
    pub prox_mu: f64,
    pub seed: u64,
    /// Print a progress line every this many steps (0: never).
    pub log_every: usize,
    /// Record-level DP-SGD: Poisson-sampled batches at rate q, per-example clipping and
    /// Gaussian noise on every step; `batch_size` is then the physical micro-batch.
    #[serde(default)]
    pub dp_sgd: Option<DpSgdConfig>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig { steps: 20, batch_size: 8, grad_accum: 1, lr: 1e-3, warmup: 0.1, weight_decay: 0.0, prox_mu: 0.0, seed: 0, log_every: 5, dp_sgd: None }
    }
}

impl TrainConfig {
    pub fn lr_at(&self, step: usize) -> f64 {
        let warm = ((self.steps as f64) * self.warmup).ceil().max(1.0);
        let s = step as f64 + 1.0;
        if s <= warm {
            self.lr * s / warm
        } else {
            self.lr * ((self.steps as f64 - s + 1.0) / (self.steps as f64 - warm + 1.0)).max(0.0)
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TrainStats {
    pub steps: usize,
    pub examples: usize,
    pub tokens: i64,
    /// Mean training loss over the last quarter of the steps.
    pub final_loss: f64,
    pub tokens_per_sec: f64,
    pub seconds: f64,
    /// Under DP-SGD: the fraction of sampled records whose gradient was clipped.
    pub clipped_fraction: f64,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct EvalStats {
    pub loss: f64,
    pub accuracy: f64,
    pub examples: usize,
}

/// Trains the adapter's trainable tensors on `data` for `cfg.steps` optimizer steps.
pub fn train(
    model: &dyn Classify,
    adapter: &Adapter,
    encoder: &TextEncoder,
    data: &[Encoded],
    cfg: &TrainConfig,
    label: &str,
) -> Result<TrainStats, ModelError> {
    if data.is_empty() {
        return Err(ModelError::Adapter("no training examples".into()));
    }
    if let Some(dp) = &cfg.dp_sgd {
        return train_dp(
            model,
            adapter,
            encoder,
            data,
            cfg,
            dp,
            &mut ChaCha20Rng::from_rng(OsRng).map_err(|e| ModelError::Adapter(format!("the OS random generator failed: {e}")))?,
            label,
        );
    }
    let device = adapter.trainable().first().map(|t| t.device()).unwrap_or(Device::Cpu);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut order = shuffled(data.len(), &mut rng);
    let mut cursor = 0usize;
    let next = move || {
        let mut items = Vec::with_capacity(cfg.batch_size);
        while items.len() < cfg.batch_size.max(1) {
            if cursor == order.len() {
                order = shuffled(data.len(), &mut rng);
                cursor = 0;
            }
            items.push(order[cursor]);
            cursor += 1;
        }
        items
    };
    let autocast = autocast_for(device, model.weight_kind());
    optimize(adapter, cfg, label, next, |picked| {
        let items: Vec<&Encoded> = picked.iter().map(|&i| &data[i]).collect();
        let batch = encoder.batch(&items, device);
        let logits = tch::autocast(autocast, || model.logits(&batch, true));
        (logits.to_kind(Kind::Float).cross_entropy_for_logits(&batch.labels), batch.tokens)
    })
}

/// Supervised instruction fine-tuning of a causal LM: the next-token loss on the response
/// tokens only ([`super::sft::causal_lm_loss`]), batches grouped by length
/// ([`super::sft::length_grouped_batches`], reshuffled every epoch).
pub fn train_sft(
    llama: &super::llama::Llama,
    adapter: &Adapter,
    encoder: &super::sft::SftEncoder,
    data: &[super::sft::SftEncoded],
    cfg: &TrainConfig,
    label: &str,
) -> Result<TrainStats, ModelError> {
    if data.is_empty() {
        return Err(ModelError::Adapter("no training examples".into()));
    }
    if let Some(dp) = &cfg.dp_sgd {
        let mut rng = ChaCha20Rng::from_rng(OsRng).map_err(|e| ModelError::Adapter(format!("the OS random generator failed: {e}")))?;
        return train_sft_dp(llama, adapter, encoder, data, cfg, dp, &mut rng, label);
    }
    let device = adapter.trainable().first().map(|t| t.device()).unwrap_or(Device::Cpu);
    let lengths: Vec<usize> = data.iter().map(|e| e.ids.len()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut pending: std::collections::VecDeque<Vec<usize>> = Default::default();
    let next = move || loop {
        if let Some(b) = pending.pop_front() {
            return b;
        }
        pending.extend(super::sft::length_grouped_batches(&lengths, cfg.batch_size, &mut rng));
    };
    let autocast = autocast_for(device, llama.dtype());
    optimize(adapter, cfg, label, next, |picked| {
        let items: Vec<&super::sft::SftEncoded> = picked.iter().map(|&i| &data[i]).collect();
        let batch = encoder.batch(&items, device);
        let logits = tch::autocast(autocast, || llama.logits(&batch.ids, &batch.mask, true));
        (super::sft::causal_lm_loss(&logits, &batch.labels), batch.tokens)
    })
}

/// The optimizer loop both objectives share: `cfg.steps` AdamW steps of `cfg.grad_accum`
/// micro-batches, each the indices `next()` gives, with the loss `loss_of` computes (and
/// the real tokens it covered); FedProx, warm-up and decay, progress lines.
// `loss = loss + …`, not `+=`: tch's `+=` works in place on a tensor of the autograd graph.
#[allow(clippy::assign_op_pattern)]
fn optimize(
    adapter: &Adapter,
    cfg: &TrainConfig,
    label: &str,
    mut next: impl FnMut() -> Vec<usize>,
    loss_of: impl Fn(&[usize]) -> (Tensor, i64),
) -> Result<TrainStats, ModelError> {
    let device = adapter.trainable().first().map(|t| t.device()).unwrap_or(Device::Cpu);
    let mut opt = adapter.optimizer(cfg.lr, cfg.weight_decay)?;
    let global = if cfg.prox_mu > 0.0 { adapter.snapshot() } else { Vec::new() };
    let started = Instant::now();
    let mut stats = TrainStats::default();
    let mut losses = Vec::with_capacity(cfg.steps);
    for step in 0..cfg.steps {
        opt.set_lr(cfg.lr_at(step));
        let mut step_loss = 0.0;
        for _ in 0..cfg.grad_accum.max(1) {
            let picked = next();
            let (mut loss, tokens) = loss_of(&picked);
            if cfg.prox_mu > 0.0 {
                let prox: Tensor = adapter
                    .trainable_in_update_order()
                    .iter()
                    .zip(&global)
                    .map(|(w, g)| (w - g).square().sum(Kind::Float))
                    .fold(Tensor::zeros([], (Kind::Float, device)), |a, b| a + b);
                loss = loss + prox * (cfg.prox_mu / 2.0);
            }
            let loss = loss / cfg.grad_accum.max(1) as f64;
            loss.backward();
            step_loss += loss.double_value(&[]);
            stats.tokens += tokens;
            stats.examples += picked.len();
        }
        opt.step();
        opt.zero_grad();
        if !step_loss.is_finite() {
            return Err(ModelError::Adapter(format!("training diverged at step {}: loss is {step_loss}", step + 1)));
        }
        losses.push(step_loss);
        stats.steps += 1;
        if cfg.log_every > 0 && ((step + 1) % cfg.log_every == 0 || step + 1 == cfg.steps) {
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "[{label}] step {:>3}/{} loss {:.4} lr {:.1e} {:.0} tok/s",
                step + 1,
                cfg.steps,
                step_loss,
                cfg.lr_at(step),
                stats.tokens as f64 / secs.max(1e-9)
            );
        }
    }
    stats.seconds = started.elapsed().as_secs_f64();
    stats.tokens_per_sec = stats.tokens as f64 / stats.seconds.max(1e-9);
    let tail = &losses[losses.len() - losses.len().div_ceil(4)..];
    stats.final_loss = tail.iter().sum::<f64>() / tail.len() as f64;
    Ok(stats)
}

/// DP-SGD: `cfg.steps` steps, each on a Poisson sample of `data` at rate q processed in
/// micro-batches of `cfg.batch_size`, with per-example clipping and noise (see
/// [`super::dpsgd`]). Sampling and noise come from `rng`, which must be a CSPRNG seeded
/// unpredictably outside tests. The FedProx term, which depends on no record, is added
/// to the noised gradient.
#[allow(clippy::too_many_arguments)]
pub fn train_dp(
    model: &dyn Classify,
    adapter: &Adapter,
    encoder: &TextEncoder,
    data: &[Encoded],
    cfg: &TrainConfig,
    dp: &DpSgdConfig,
    rng: &mut dyn RngCore,
    label: &str,
) -> Result<TrainStats, ModelError> {
    let device = adapter.trainable().first().map(|t| t.device()).unwrap_or(Device::Cpu);
    let autocast = autocast_for(device, model.weight_kind());
    dp_optimize(adapter, data.len(), cfg, dp, rng, label, |chunk| {
        let items: Vec<&Encoded> = chunk.iter().map(|&i| &data[i]).collect();
        let batch = encoder.batch(&items, device);
        (tch::autocast(autocast, || clipped_sum(model, adapter, &batch, dp.max_grad_norm, PerExampleMethod::Expanded, true)), batch.tokens)
    })
}

/// DP-SGD on the instruction objective: as [`train_dp`], each record's loss the mean
/// over its own response tokens ([`super::dpsgd::summed_sft_loss`]).
#[allow(clippy::too_many_arguments)]
pub fn train_sft_dp(
    llama: &super::llama::Llama,
    adapter: &Adapter,
    encoder: &super::sft::SftEncoder,
    data: &[super::sft::SftEncoded],
    cfg: &TrainConfig,
    dp: &DpSgdConfig,
    rng: &mut dyn RngCore,
    label: &str,
) -> Result<TrainStats, ModelError> {
    let device = adapter.trainable().first().map(|t| t.device()).unwrap_or(Device::Cpu);
    let autocast = autocast_for(device, llama.dtype());
    dp_optimize(adapter, data.len(), cfg, dp, rng, label, |chunk| {
        let items: Vec<&super::sft::SftEncoded> = chunk.iter().map(|&i| &data[i]).collect();
        let batch = encoder.batch(&items, device);
        (tch::autocast(autocast, || super::dpsgd::clipped_sum_sft(llama, adapter, &batch, dp.max_grad_norm, PerExampleMethod::Expanded, true)), batch.tokens)
    })
}

/// The DP-SGD loop both objectives share: per step a Poisson sample of the `records`,
/// in micro-batches of `cfg.batch_size` whose clipped sums `clipped_of` computes (with
/// the real tokens covered), noised once per step.
fn dp_optimize(
    adapter: &Adapter,
    records: usize,
    cfg: &TrainConfig,
    dp: &DpSgdConfig,
    rng: &mut dyn RngCore,
    label: &str,
    clipped_of: impl Fn(&[usize]) -> (super::dpsgd::ClippedSum, i64),
) -> Result<TrainStats, ModelError> {
    dp.validate()?;
    if cfg.grad_accum > 1 {
        return Err(ModelError::Adapter(
            "DP-SGD sets the logical batch by its sampling rate; gradient accumulation does not apply (leave it at 1, raise --sample-rate instead)".into(),
        ));
    }
    let device = adapter.trainable().first().map(|t| t.device()).unwrap_or(Device::Cpu);
    let mut opt = adapter.optimizer(cfg.lr, cfg.weight_decay)?;
    let global = if cfg.prox_mu > 0.0 { adapter.snapshot() } else { Vec::new() };
    let params = adapter.trainable_in_update_order();
    let started = Instant::now();
    let mut stats = TrainStats::default();
    let mut losses = Vec::with_capacity(cfg.steps);
    let (mut sampled, mut clipped) = (0usize, 0usize);
    for step in 0..cfg.steps {
        opt.set_lr(cfg.lr_at(step));
        let picked = poisson_sample(records, dp.sample_rate, rng);
        let mut sum: Vec<Tensor> = params.iter().map(Tensor::zeros_like).collect();
        let mut loss = 0.0;
        for chunk in picked.chunks(cfg.batch_size.max(1)) {
            let (part, tokens) = clipped_of(chunk);
            for (s, p) in sum.iter_mut().zip(&part.sum) {
                *s = &*s + p;
            }
            clipped += part.norms.iter().filter(|&&n| n > dp.max_grad_norm).count();
            loss += part.loss;
            stats.tokens += tokens;
        }
        // An empty batch is a step of noise alone: skipping it would change the mechanism.
        let mut grads = noised_mean(&sum, dp, records, rng);
        if cfg.prox_mu > 0.0 {
            for ((g, w), w0) in grads.iter_mut().zip(&params).zip(&global) {
                *g = &*g + (w.detach() - w0) * cfg.prox_mu;
            }
        }
        opt.zero_grad();
        // d/dw Σ w·g = g: sets each tensor's gradient to the noised one.
        let surrogate = params.iter().zip(&grads).map(|(w, g)| (w * g.detach()).sum(Kind::Float)).fold(Tensor::zeros([], (Kind::Float, device)), |a, b| a + b);
        surrogate.backward();
        opt.step();
        opt.zero_grad();
        let step_loss = if picked.is_empty() { f64::NAN } else { loss / picked.len() as f64 };
        if !picked.is_empty() && !step_loss.is_finite() {
            return Err(ModelError::Adapter(format!("training diverged at step {}: loss is {step_loss}", step + 1)));
        }
        if step_loss.is_finite() {
            losses.push(step_loss);
        }
        sampled += picked.len();
        stats.examples += picked.len();
        stats.steps += 1;
        if cfg.log_every > 0 && ((step + 1) % cfg.log_every == 0 || step + 1 == cfg.steps) {
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "[{label}] DP-SGD step {:>3}/{} batch {:>3} loss {:.4} clipped {:.0}% lr {:.1e} {:.0} tok/s",
                step + 1,
                cfg.steps,
                picked.len(),
                step_loss,
                100.0 * clipped as f64 / sampled.max(1) as f64,
                cfg.lr_at(step),
                stats.tokens as f64 / secs.max(1e-9)
            );
        }
    }
    stats.seconds = started.elapsed().as_secs_f64();
    stats.tokens_per_sec = stats.tokens as f64 / stats.seconds.max(1e-9);
    stats.clipped_fraction = clipped as f64 / sampled.max(1) as f64;
    if !losses.is_empty() {
        let tail = &losses[losses.len() - losses.len().div_ceil(4)..];
        stats.final_loss = tail.iter().sum::<f64>() / tail.len() as f64;
    } else {
        stats.final_loss = f64::NAN;
    }
    Ok(stats)
}

/// Held-out loss of the instruction objective: the mean next-token cross-entropy over
/// every response token of `data`, and its perplexity.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct SftEval {
    pub loss: f64,
    pub perplexity: f64,
    pub response_tokens: i64,
}

pub fn evaluate_sft(
    llama: &super::llama::Llama,
    encoder: &super::sft::SftEncoder,
    data: &[super::sft::SftEncoded],
    batch_size: usize,
    device: Device,
) -> SftEval {
    tch::no_grad(|| {
        let (mut sum, mut count) = (0.0, 0i64);
        for chunk in data.chunks(batch_size.max(1)) {
            let items: Vec<&super::sft::SftEncoded> = chunk.iter().collect();
            let batch = encoder.batch(&items, device);
            let (s, n) = super::sft::causal_lm_loss_sum(&llama.logits(&batch.ids, &batch.mask, false), &batch.labels);
            sum += s;
            count += n;
        }
        let loss = sum / count.max(1) as f64;
        SftEval { loss, perplexity: loss.exp(), response_tokens: count }
    })
}

/// Mean cross-entropy and accuracy on `data`, without dropout or gradients.
pub fn evaluate(model: &dyn Classify, encoder: &TextEncoder, data: &[Encoded], batch_size: usize, device: Device) -> EvalStats {
    tch::no_grad(|| {
        let mut loss = 0.0;
        let mut correct = 0i64;
        for chunk in data.chunks(batch_size.max(1)) {
            let items: Vec<&Encoded> = chunk.iter().collect();
            let batch = encoder.batch(&items, device);
            let logits = model.logits(&batch, false).to_kind(Kind::Float);
            loss += logits.cross_entropy_loss::<Tensor>(&batch.labels, None, tch::Reduction::Sum, -100, 0.0).double_value(&[]);
            correct += logits.argmax(-1, false).eq_tensor(&batch.labels).sum(Kind::Int64).int64_value(&[]);
        }
        let n = data.len().max(1) as f64;
        EvalStats { loss: loss / n, accuracy: correct as f64 / n, examples: data.len() }
    })
}
