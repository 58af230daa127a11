//! Training throughput of the Rust (tch) LoRA trainer, for comparison with Python PyTorch +
//! PEFT on the same model, batch, sequence length and LoRA (scripts/bench-train runs both).
//!
//! cargo bench -p tessera-client --bench train -- --model DIR [--batch 8] [--seq 64] [--steps 20] [--warmup 3] [--dp-sgd]
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
use tessera_client::train::trainer::Classify;
use tessera_client::train::{bert, llama, Adapter, LoraConfig, LoraMode};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.to_string())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model_dir = std::path::PathBuf::from(arg("--model", ".tessera-data/smollm2"));
    let batch: i64 = arg("--batch", "8").parse()?;
    let seq: i64 = arg("--seq", "64").parse()?;
    let steps: usize = arg("--steps", "20").parse()?;
    let warmup: usize = arg("--warmup", "3").parse()?;
    let dp_sgd = std::env::args().any(|a| a == "--dp-sgd");
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
            let l = llama::Llama::load(&model_dir, &mut a, device)?;
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
    let mut noise_rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
    let batches: Vec<Batch> = (0..steps + warmup).map(|_| make()).collect();
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
        let loss = model.logits(b, true).cross_entropy_for_logits(&b.labels);
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
            "threads": tch::get_num_threads(), "batch": batch, "seq": seq, "steps": steps, "tokens_per_sec": tokens / secs, "seconds": secs
        })
    );
    Ok(())
}
