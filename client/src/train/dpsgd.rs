//! DP-SGD (Abadi et al., CCS 2016) over an institution's records, as Opacus runs it:
//! each step samples every record independently with probability q (Poisson sampling, so
//! batches vary in size and may be empty), clips each record's gradient of the trainable
//! tensors to L2 norm C, sums, adds N(0, (σC)²) to every coordinate and divides by the
//! expected batch size qN. The privacy of one record over all steps is then that of the
//! Poisson-subsampled Gaussian, which `tessera_secagg::rdp` accounts.
//!
//! Per-example gradients come from one of two paths that must agree within 1e-5:
//! - [`PerExampleMethod::Expanded`] (the default): every trainable tensor is replaced in
//!   the forward pass by `batch` copies of itself, so a single backward pass of the summed
//!   loss leaves each example's gradient in its own copy (Opacus' expanded weights; for
//!   LoRA the trainable tensors are small, so the copies cost little memory);
//! - [`PerExampleMethod::OneByOne`]: the reference, one forward and backward per example.
//!
//! The noise and the sampling come from a ChaCha20 stream seeded by the operating system:
//! Opacus' `secure_mode` makes the same point, a predictable generator voids the guarantee.

use rand::{Rng, RngCore};
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

use super::data::Batch;
use super::lora::Adapter;
use super::trainer::Classify;
use super::weights::ModelError;

/// The DP-SGD parameters of local training.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpSgdConfig {
    /// σ: the noise std is σ·C.
    pub noise_multiplier: f64,
    /// C: each record's gradient is clipped to this L2 norm.
    pub max_grad_norm: f64,
    /// q: the probability that a record is in a step's batch.
    pub sample_rate: f64,
}

impl DpSgdConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier >= 0.0) {
            return Err(ModelError::Adapter(format!("DP-SGD: the noise multiplier must be finite and ≥ 0, got {}", self.noise_multiplier)));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm > 0.0) {
            return Err(ModelError::Adapter(format!("DP-SGD: the clipping norm must be positive, got {}", self.max_grad_norm)));
        }
        if !(self.sample_rate > 0.0 && self.sample_rate <= 1.0) {
            return Err(ModelError::Adapter(format!("DP-SGD: the sampling rate must be in (0, 1], got {}", self.sample_rate)));
        }
        Ok(())
    }

    /// The accountant's view of `steps` steps with these parameters.
    pub fn steps(&self, steps: u64) -> tessera_secagg::rdp::SgmSteps {
        tessera_secagg::rdp::SgmSteps { noise_multiplier: self.noise_multiplier, sample_rate: self.sample_rate, steps }
    }
}

/// How per-example gradients are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PerExampleMethod {
    /// One backward pass with per-example copies of the trainable tensors.
    Expanded,
    /// The reference: one forward and backward pass per example.
    OneByOne,
}

/// The indices of the records in one Poisson-sampled batch: each of `n` independently
/// with probability `q`.
pub fn poisson_sample<R: RngCore + ?Sized>(n: usize, q: f64, rng: &mut R) -> Vec<usize> {
    (0..n).filter(|_| rng.gen_bool(q)).collect()
}

/// The summed training loss of a batch: cross-entropy of each example, summed (not
/// averaged), so that each example's gradient is its own.
pub fn summed_loss(model: &dyn Classify, batch: &Batch, train: bool) -> Tensor {
    let logits = model.logits(batch, train).to_kind(Kind::Float);
    logits.cross_entropy_loss::<Tensor>(&batch.labels, None, Reduction::Sum, -100, 0.0)
}

/// What one physical batch contributes to a DP-SGD step.
#[derive(Debug)]
pub struct ClippedSum {
    /// Σ_i clip_C(g_i) for each trainable tensor, in update order.
    pub sum: Vec<Tensor>,
    /// ‖g_i‖ before clipping, for each example.
    pub norms: Vec<f64>,
    /// Σ_i loss_i.
    pub loss: f64,
}

/// Opacus' clipping factor: min(1, C / (‖g‖ + 1e-6)), so a clipped norm is below C.
fn clip_factors(norms: &Tensor, c: f64) -> Tensor {
    ((norms + 1e-6).reciprocal() * c).clamp_max(1.0)
}

/// Per-example gradients of the summed loss over `batch`, each clipped to L2 norm `c`
/// (the norm taken over all trainable tensors together, in f64), and their sum.
pub fn clipped_sum(model: &dyn Classify, adapter: &Adapter, batch: &Batch, c: f64, method: PerExampleMethod, train: bool) -> ClippedSum {
    let rows = batch.ids.size()[0];
    clipped_sum_of(adapter, rows, c, method, &|row| match row {
        None => summed_loss(model, batch, train),
        Some(r) => {
            let one = Batch { ids: batch.ids.narrow(0, r, 1), mask: batch.mask.narrow(0, r, 1), labels: batch.labels.narrow(0, r, 1), tokens: 0 };
            summed_loss(model, &one, train)
        }
    })
}

/// Each record's loss on the instruction objective: the mean next-token cross-entropy
/// over its own response tokens, summed over the records of `batch` (so that a record's
/// gradient does not depend on the others in its batch).
pub fn summed_sft_loss(llama: &super::llama::Llama, batch: &super::sft::SftBatch, train: bool) -> Tensor {
    let logits = llama.logits(&batch.ids, &batch.mask, train).to_kind(Kind::Float);
    let (rows, len, vocab) = (logits.size()[0], logits.size()[1], logits.size()[2]);
    let pred = logits.reshape([-1, vocab]);
    let target = super::sft::next_token_targets(&batch.labels).reshape([-1]);
    let per_token = pred.cross_entropy_loss::<Tensor>(&target, None, Reduction::None, super::sft::IGNORE, 0.0).view([rows, len]);
    let counted = target.ne(super::sft::IGNORE).view([rows, len]).to_kind(Kind::Float);
    let per_record =
        per_token.sum_dim_intlist([1i64].as_slice(), false, Kind::Float) / counted.sum_dim_intlist([1i64].as_slice(), false, Kind::Float).clamp_min(1.0);
    per_record.sum(Kind::Float)
}

/// [`clipped_sum`] for the instruction objective ([`summed_sft_loss`]).
pub fn clipped_sum_sft(
    llama: &super::llama::Llama,
    adapter: &Adapter,
    batch: &super::sft::SftBatch,
    c: f64,
    method: PerExampleMethod,
    train: bool,
) -> ClippedSum {
    let rows = batch.ids.size()[0];
    clipped_sum_of(adapter, rows, c, method, &|row| match row {
        None => summed_sft_loss(llama, batch, train),
        Some(r) => {
            let one = super::sft::SftBatch {
                ids: batch.ids.narrow(0, r, 1),
                mask: batch.mask.narrow(0, r, 1),
                labels: batch.labels.narrow(0, r, 1),
                tokens: 0,
                response_tokens: 0,
            };
            summed_sft_loss(llama, &one, train)
        }
    })
}

/// The clipped sum for any objective: `loss_of(None)` is the summed loss of the `rows`
/// records of the batch, `loss_of(Some(r))` the loss of record `r` alone.
fn clipped_sum_of(adapter: &Adapter, rows: i64, c: f64, method: PerExampleMethod, loss_of: &dyn Fn(Option<i64>) -> Tensor) -> ClippedSum {
    match method {
        PerExampleMethod::Expanded => {
            let per = adapter.per_example(rows);
            let loss = loss_of(None);
            loss.backward();
            let grads: Vec<Tensor> = per.copies.iter().map(|t| t.grad().flatten(1, -1)).collect();
            let device = grads.first().map(|g| g.device()).unwrap_or(tch::Device::Cpu);
            let sq = grads
                .iter()
                .map(|g| g.to_kind(Kind::Double).square().sum_dim_intlist([1i64].as_slice(), false, Kind::Double))
                .fold(Tensor::zeros([rows], (Kind::Double, device)), |a, b| a + b);
            let norms = sq.sqrt();
            let factors = clip_factors(&norms, c).to_kind(Kind::Float);
            let sum = grads
                .iter()
                .zip(&per.copies)
                .map(|(g, t)| (g * factors.unsqueeze(1)).sum_dim_intlist([0i64].as_slice(), false, Kind::Float).view(&t.size()[1..]))
                .collect();
            ClippedSum { sum, norms: Vec::<f64>::try_from(norms.to_device(tch::Device::Cpu)).unwrap_or_default(), loss: loss.double_value(&[]) }
        }
        PerExampleMethod::OneByOne => {
            let params = adapter.trainable_in_update_order();
            let mut sum: Vec<Tensor> = params.iter().map(Tensor::zeros_like).collect();
            let (mut norms, mut total) = (Vec::new(), 0.0);
            for row in 0..rows {
                for p in &params {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.zero_();
                    }
                }
                let loss = loss_of(Some(row));
                loss.backward();
                total += loss.double_value(&[]);
                let grads: Vec<Tensor> = params.iter().map(|p| p.grad().detach().copy()).collect();
                let norm = grads.iter().map(|g| g.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[])).sum::<f64>().sqrt();
                let factor = (c / (norm + 1e-6)).min(1.0);
                for (s, g) in sum.iter_mut().zip(&grads) {
                    *s = &*s + g * factor;
                }
                norms.push(norm);
            }
            for p in &params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            ClippedSum { sum, norms, loss: total }
        }
    }
}

/// The noised mean gradient of one step: (Σ clipped + N(0, (σC)²)) / (q·N), every
/// coordinate's noise drawn from `rng`.
pub fn noised_mean<R: RngCore + ?Sized>(sum: &[Tensor], dp: &DpSgdConfig, records: usize, rng: &mut R) -> Vec<Tensor> {
    let std = dp.noise_multiplier * dp.max_grad_norm;
    let expected = dp.sample_rate * records as f64;
    sum.iter()
        .map(|s| {
            let n = s.numel();
            let z: Vec<f32> = (0..n)
                .map(|_| {
                    let x: f64 = StandardNormal.sample(rng);
                    (x * std) as f32
                })
                .collect();
            let noise = Tensor::from_slice(&z).view(s.size().as_slice()).to_device(s.device()).to_kind(s.kind());
            (s + noise) / expected
        })
        .collect()
}

/// Record-level DP for a federation run: the DP-SGD parameters of every local training
/// run, the records' budget, and the ledger that holds them to it.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordPrivacy {
    pub dp: DpSgdConfig,
    /// How the records' ε is counted (and σ calibrated).
    pub accountant: tessera_secagg::prv::Accountant,
    /// The records' ε budget over every local run, at `delta`.
    pub budget: f64,
    pub delta: f64,
    /// Steps per local run.
    pub steps: u64,
    pub records: usize,
}

/// What the institution asks for on its command line.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordPrivacyRequest {
    pub budget: f64,
    pub delta: f64,
    /// σ; calibrated when absent so that `rounds` runs exactly fit what is left.
    pub noise_multiplier: Option<f64>,
    pub max_grad_norm: f64,
    /// q; `batch_size / records` when absent.
    pub sample_rate: Option<f64>,
    pub accountant: tessera_secagg::prv::Accountant,
}

impl RecordPrivacy {
    /// Settles the parameters before any training: q from the batch size, σ calibrated
    /// against what `ledger` has spent, and the whole plan (`rounds` runs of `steps`)
    /// checked against the budget, so a run that cannot finish is refused up front.
    pub fn plan(
        req: &RecordPrivacyRequest,
        ledger: &crate::ledger::PrivacyLedger,
        records: usize,
        batch_size: usize,
        steps: u64,
        rounds: u64,
    ) -> Result<RecordPrivacy, ModelError> {
        let bad = |m: String| ModelError::Adapter(format!("record-level DP: {m}"));
        if records == 0 {
            return Err(bad("no training records".into()));
        }
        if !(req.delta > 0.0 && req.delta < 1.0 / records as f64) {
            return Err(bad(format!(
                "δ = {:e} must be positive and below 1/records = {:e} (at δ ≥ 1/N, publishing one record at random would be allowed)",
                req.delta,
                1.0 / records as f64
            )));
        }
        if !(req.budget.is_finite() && req.budget > 0.0) {
            return Err(bad(format!("the ε budget must be positive, got {}", req.budget)));
        }
        let q = req.sample_rate.unwrap_or((batch_size as f64 / records as f64).min(1.0));
        let history = ledger.record_history();
        let total = steps.checked_mul(rounds).ok_or_else(|| bad("too many steps".into()))?;
        let sigma = match req.noise_multiplier {
            Some(s) => s,
            None => req.accountant.noise_multiplier_for(req.budget, req.delta, q, total, &history).map_err(|e| bad(e.to_string()))?,
        };
        let dp = DpSgdConfig { noise_multiplier: sigma, max_grad_norm: req.max_grad_norm, sample_rate: q };
        dp.validate()?;
        if sigma <= 0.0 {
            return Err(bad("DP-SGD needs noise: the noise multiplier must be positive".into()));
        }
        let mut all = history;
        all.push(dp.steps(total));
        let projected = req.accountant.epsilon(&all, req.delta).map_err(|e| bad(e.to_string()))?;
        if projected > req.budget {
            return Err(bad(format!(
                "{rounds} round(s) of {steps} steps at σ = {sigma:.3}, q = {q:.4} would take each record to ε = {projected:.3} (δ = {:e}), past the budget of {} \
                 (ε = {:.3} spent already); lower --rounds or --steps, raise the noise, or leave --noise-multiplier out to calibrate it",
                req.delta,
                req.budget,
                ledger.record_spent(req.delta, req.accountant)
            )));
        }
        Ok(RecordPrivacy { dp, accountant: req.accountant, budget: req.budget, delta: req.delta, steps, records })
    }

    /// The claim signed with the masked input of a run after which the records have
    /// spent `epsilon` ([`tessera_secagg::wire::RecordPrivacyClaim`]).
    pub fn claim(&self, epsilon: f64) -> tessera_secagg::wire::RecordPrivacyClaim {
        tessera_secagg::wire::RecordPrivacyClaim {
            epsilon,
            delta: self.delta,
            budget: self.budget,
            noise_multiplier: self.dp.noise_multiplier,
            sample_rate: self.dp.sample_rate,
            max_grad_norm: self.dp.max_grad_norm,
            steps: self.steps,
        }
    }

    /// Charges one local run to the ledger at `path` before it starts (refusing it past
    /// the budget); returns ε spent after it.
    pub fn charge(&self, path: &std::path::Path, purpose: &str, now_ms: u64) -> Result<f64, crate::ledger::LedgerError> {
        let run = crate::ledger::RecordCharge {
            purpose: purpose.into(),
            noise_multiplier: self.dp.noise_multiplier,
            sample_rate: self.dp.sample_rate,
            steps: self.steps,
            records: self.records,
            charged_at_ms: now_ms,
        };
        crate::ledger::PrivacyLedger::charge_record(path, run, self.budget, self.delta, self.accountant)
    }
}
