//! Generation throughput of the Rust (tch) decoder with its KV cache, for comparison with
//! `transformers.generate` (its cache, sdpa attention) on the same model, prompt length,
//! number of new tokens and threads (scripts/bench-generate runs both).
//!
//! cargo bench -p tessera-client --bench generate -- --model DIR [--prompt 32] [--new 64] [--runs 3]
//!
//! The prompt is seeded random token ids; greedy decoding with no stop token, so every run
//! generates exactly `--new` tokens. One warm-up run is not timed. Prints one JSON line:
//! the time to the first token (the prompt's forward pass) and the decode rate after it.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use tch::{Kind, Tensor};
use tessera_client::train::llama::{KvCache, Llama, Sampling};
use tessera_client::train::{Adapter, LoraConfig, LoraMode};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.to_string())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model_dir = std::path::PathBuf::from(arg("--model", ".tessera-data/smollm2"));
    let prompt_len: usize = arg("--prompt", "32").parse()?;
    let new: usize = arg("--new", "64").parse()?;
    let runs: usize = arg("--runs", "3").parse()?;
    let device = tessera_client::train::device();
    let lora = LoraConfig { r: 8, alpha: 16.0, dropout: 0.0, target_modules: vec!["q_proj".into(), "v_proj".into()], mode: LoraMode::Both, seed: 1 };
    let mut adapter = Adapter::new(lora, "CAUSAL_LM", device, Kind::Float)?;
    let llama = Llama::load(&model_dir, &mut adapter, device)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let prompt: Vec<i64> = (0..prompt_len).map(|_| rng.gen_range(100..30_000)).collect();
    let mut sample_rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let _ = llama.generate(&prompt, new, &Sampling::Greedy, &[], &mut sample_rng);
    let (mut first, mut decode) = (0.0, 0.0);
    for _ in 0..runs {
        let t0 = Instant::now();
        let mut cache = KvCache::default();
        let logits = tch::no_grad(|| llama.step(&Tensor::from_slice(&prompt).view([1, -1]).to_device(device), &mut cache));
        let mut token = logits.argmax(-1, false).int64_value(&[]);
        first += t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for _ in 1..new {
            let logits = tch::no_grad(|| llama.step(&Tensor::from_slice(&[token]).view([1, 1]).to_device(device), &mut cache));
            token = logits.argmax(-1, false).int64_value(&[]);
        }
        decode += t1.elapsed().as_secs_f64();
    }
    let model = model_dir.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    println!(
        "{{\"impl\":\"tessera (Rust, tch, KV cache)\",\"model\":\"{model}\",\"device\":\"{device:?}\",\"threads\":{},\"prompt\":{prompt_len},\"new\":{new},\"runs\":{runs},\"first_token_ms\":{:.1},\"decode_tokens_per_sec\":{:.2}}}",
        tch::get_num_threads(),
        1e3 * first / runs as f64,
        ((new - 1) * runs) as f64 / decode
    );
    Ok(())
}
