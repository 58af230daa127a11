//! Training throughput of the Rust (tch) LoRA trainer, for comparison with Python PyTorch +
//! PEFT on the same model, batch, sequence length and LoRA (scripts/bench-train runs both).
//!
//! cargo bench -p tessera-client --bench train -- --model DIR [--batch 8] [--seq 64] [--steps 20] [--warmup 3] [--dp-sgd] [--sft] [--dtype f32|bf16|f16]
//!
//! With `--sft` (Llama only) each step is the instruction fine-tuning objective: the
//! causal-LM loss over every position (the LM head over the whole vocabulary at each
//! token), as transformers computes `labels=` loss. `--dtype` holds the base weights in
//! bf16 or f16 (LoRA factors and AdamW state stay f32). The JSON line also carries the
//! peak resident memory of the training steps: the peak is reset (Linux `clear_refs`)
//! after the model is loaded, so loading's transient copies are not counted. (Host
//! memory only: on a GPU the activations live in device memory, not measured here.)
//!
//! With `--dp-sgd` every step is a DP-SGD step on the same fixed batch (per-example
//! gradients by expanded weights, clipping to C = 1, noise σ = 1), the measurement that
//! Opacus makes on the Python side (`bench_train_peft.py --dp-sgd`).
//!
//! Batches are fixed-length (no padding) seeded random token ids with random labels, so
//! both sides process exactly the same number of tokens. LoRA r = 8, alpha = 16, no
//! dropout, on the query and value projections, both factors trained (PEFT's default);
//! AdamW. Prints one JSON line.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use tch::{Kind, Tensor};
use tessera_client::train::data::Batch;
use tessera_client::train::dpsgd::{clipped_sum, noised_mean, DpSgdConfig, PerExampleMethod};
use tessera_client::train::federated::{Architecture, TaskModel, LABEL_WORDS};
use tessera_client::train::sft::causal_lm_loss;
use tessera_client::train::trainer::Classify;
use tessera_client::train::{bert, llama, Adapter, LoraConfig, LoraMode};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.to_string())
}

/// A field of /proc/self/status, in KiB (0 where there is none).
fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model_dir = std::path::PathBuf::from(arg("--model", ".tessera-data/smollm2"));
    let batch: i64 = arg("--batch", "8").parse()?;
    let seq: i64 = arg("--seq", "64").parse()?;
    let steps: usize = arg("--steps", "20").parse()?;
    let warmup: usize = arg("--warmup", "3").parse()?;
    let dp_sgd = std::env::args().any(|a| a == "--dp-sgd");
    let sft = std::env::args().any(|a| a == "--sft");
    let dtype: tessera_client::train::Dtype = match arg("--dtype", "f32").as_str() {
        "bf16" => tessera_client::train::Dtype::Bf16,
        "f16" => tessera_client::train::Dtype::F16,
        _ => tessera_client::train::Dtype::F32,
    };
    let dp = DpSgdConfig { noise_multiplier: 1.0, max_grad_norm: 1.0, sample_rate: 0.01 };
    let device = tessera_client::train::device();
    let arch = Architecture::detect(&model_dir)?;
    let lora = LoraConfig { r: 8, alpha: 16.0, dropout: 0.0, target_modules: arch.default_targets(), mode: LoraMode::Both, seed: 1 };
    let (model, adapter, vocab) = match arch {
        Architecture::Bert => {
            let mut a = Adapter::new(lora, "SEQ_CLS", device, Kind::Float)?;
            let m = bert::BertClassifier::load(&model_dir, &mut a, 3, device)?;
            let v = m.bert.config.vocab_size;
            (TaskModel::Bert(m), a, v)
        }
        Architecture::Llama => {
            let mut a = Adapter::new(lora, "CAUSAL_LM", device, Kind::Float)?;
            let l = llama::Llama::load_as(&model_dir, &mut a, device, dtype.kind())?;
            let v = l.config.vocab_size;
            // Any three distinct ids: the cost does not depend on which.
            let ids: Vec<i64> = (0..LABEL_WORDS.len() as i64).map(|i| 1000 + i).collect();
            (TaskModel::Llama(llama::LlamaClassifier::new(l, &ids)), a, v)
        }
    };
    let mut opt = adapter.optimizer(1e-3, 0.0)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut make = || {
        let ids: Vec<i64> = (0..batch * seq).map(|_| rng.gen_range(100..vocab.min(30_000))).collect();
        let labels: Vec<i64> = (0..batch).map(|_| rng.gen_range(0..3)).collect();
        Batch {
            ids: Tensor::from_slice(&ids).view([batch, seq]).to_device(device),
            mask: Tensor::ones([batch, seq], (Kind::Int64, device)),
            labels: Tensor::from_slice(&labels).to_device(device),
            tokens: batch * seq,
        }
    };
    let params = adapter.trainable_in_update_order();
    if sft && !matches!(model, TaskModel::Llama(_)) {
        return Err("--sft needs a Llama-family model".into());
    }
    let mut noise_rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
    let batches: Vec<Batch> = (0..steps + warmup).map(|_| make()).collect();
    let loaded_rss = rss_kib("VmRSS");
    // The peak from here on: what the training steps add to the loaded model.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let mut started = Instant::now();
    for (i, b) in batches.iter().enumerate() {
        if i == warmup {
            if device.is_cuda() {
                tch::Cuda::synchronize(0);
            }
            started = Instant::now();
        }
        if dp_sgd {
            // The noised mean over the batch, as Opacus' DPOptimizer divides by the expected batch size.
            let part = clipped_sum(&model, &adapter, b, dp.max_grad_norm, PerExampleMethod::Expanded, true);
            let grads = noised_mean(&part.sum, &DpSgdConfig { sample_rate: 1.0, ..dp }, batch as usize, &mut noise_rng);
            opt.zero_grad();
            let surrogate =
                params.iter().zip(&grads).map(|(w, g)| (w * g.detach()).sum(Kind::Float)).fold(Tensor::zeros([], (Kind::Float, device)), |a, b| a + b);
            surrogate.backward();
            opt.step();
            continue;
        }
        let loss = match (&model, sft) {
            (TaskModel::Llama(m), true) => {
                // Mixed precision on CUDA for f32 weights only, as the trainer does.
                let autocast = device.is_cuda() && dtype == tessera_client::train::Dtype::F32;
                let logits = tch::autocast(autocast, || m.llama.logits(&b.ids, &b.mask, true));
                causal_lm_loss(&logits, &b.ids)
            }
            _ => model.logits(b, true).cross_entropy_for_logits(&b.labels),
        };
        opt.zero_grad();
        loss.backward();
        opt.step();
    }
    let _ = adapter.flatten_update()?; // waits for the device
    let secs = started.elapsed().as_secs_f64();
    let tokens = (batch * seq) as f64 * steps as f64;
    println!(
        "{}",
        serde_json::json!({
            "impl": if dp_sgd { "tessera (Rust, tch) DP-SGD" } else { "tessera (Rust, tch)" }, "model": model_dir.file_name().and_then(|n| n.to_str()), "device": format!("{device:?}"),
            "objective": if sft { "sft" } else { "classify" }, "dtype": dtype.to_string(),
            "threads": tch::get_num_threads(), "batch": batch, "seq": seq, "steps": steps, "tokens_per_sec": tokens / secs, "seconds": secs,
            "loaded_rss_mib": loaded_rss / 1024, "peak_rss_mib": rss_kib("VmHWM") / 1024
        })
    );
    Ok(())
}
