//! Generation with a KV cache: greedy continuations equal transformers' `generate` on the
//! tiny checkpoints (`scripts/reference/sft_reference.py`), the cache equals recomputing
//! the whole sequence on SmolLM2, and sampling follows the softmax and top-p.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use rand::SeedableRng;
use tch::{Device, Kind, Tensor};
use tessera_client::train::data_root;
use tessera_client::train::llama::{KvCache, Llama, Sampling};
use tessera_client::train::{Adapter, LoraConfig, LoraMode};

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn load(dir: &std::path::Path) -> Llama {
    let cfg = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, target_modules: vec!["q_proj".into(), "v_proj".into()], mode: LoraMode::Both, seed: 1 };
    let mut adapter = Adapter::new(cfg, "CAUSAL_LM", Device::Cpu, Kind::Float).unwrap();
    Llama::load(dir, &mut adapter, Device::Cpu).unwrap()
}

#[derive(serde::Deserialize)]
struct Generation {
    prompt: Vec<i64>,
    continuation: Vec<i64>,
}

fn rng() -> rand_chacha::ChaCha20Rng {
    rand_chacha::ChaCha20Rng::seed_from_u64(9)
}

#[test]
fn greedy_generation_equals_transformers_generate() {
    let refs: HashMap<String, Generation> = serde_json::from_slice(&std::fs::read(data().join("sft/generate.json")).unwrap()).unwrap();
    for (name, g) in &refs {
        let llama = load(&data().join("llama-features").join(name));
        let got = llama.generate(&g.prompt, g.continuation.len(), &Sampling::Greedy, &[2], &mut rng());
        assert_eq!(&got, &g.continuation, "{name}");
    }
    // A stop token ends the continuation and is kept.
    let g = &refs["base"];
    let llama = load(&data().join("llama-features/base"));
    let stop = g.continuation[3];
    let got = llama.generate(&g.prompt, 20, &Sampling::Greedy, &[stop], &mut rng());
    assert_eq!(got, g.continuation[..4]);
}

/// On SmolLM2, the cached logits of each new position equal those of the whole sequence
/// recomputed without a cache.
#[test]
fn the_kv_cache_equals_recomputation() {
    let llama = load(&data_root().join("smollm2"));
    let prompt: Vec<i64> = vec![1, 9690, 198, 2683, 359, 253, 5356, 2, 198, 1, 4093, 198, 10576, 28, 378, 346, 2, 198, 1, 520, 9531, 198];
    let tokens = llama.generate(&prompt, 6, &Sampling::Greedy, &[], &mut rng());
    assert_eq!(tokens.len(), 6);
    let mut cache = KvCache::default();
    let mut seq = prompt.clone();
    let mut cached = tch::no_grad(|| llama.step(&Tensor::from_slice(&prompt).view([1, -1]), &mut cache));
    for &t in &tokens {
        let full =
            tch::no_grad(|| llama.logits(&Tensor::from_slice(&seq).view([1, -1]), &Tensor::ones([1, seq.len() as i64], (Kind::Int64, Device::Cpu)), false));
        let last = full.get(0).get(seq.len() as i64 - 1);
        let diff = (&last - &cached).abs().max().double_value(&[]);
        assert!(diff < 1e-3, "position {}: cached and recomputed logits differ by {diff}", seq.len());
        assert_eq!(last.argmax(-1, false).int64_value(&[]), t);
        seq.push(t);
        cached = tch::no_grad(|| llama.step(&Tensor::from_slice(&[t]).view([1, 1]), &mut cache));
    }
    assert_eq!(cache.len(), seq.len() as i64);
}

#[test]
fn sampling_follows_the_softmax_and_top_p() {
    let logits = Tensor::from_slice(&[0.0f32, 3f32.ln(), -30.0]);
    let mut r = rng();
    let n = 4000;
    let draws: Vec<i64> = (0..n).map(|_| Sampling::Sample { temperature: 1.0, top_p: 1.0 }.choose(&logits, &mut r)).collect();
    let ones = draws.iter().filter(|&&t| t == 1).count() as f64;
    let se = (0.75f64 * 0.25 / n as f64).sqrt();
    assert!((ones / n as f64 - 0.75).abs() < 4.0 * se, "P(token 1) = {}", ones / n as f64);
    assert!(draws.iter().all(|&t| t != 2));
    // top_p below the largest probability keeps only the most likely token.
    assert!((0..200).all(|_| Sampling::Sample { temperature: 1.0, top_p: 0.5 }.choose(&logits, &mut r) == 1));
    // A low temperature sharpens towards greedy.
    assert!((0..200).all(|_| Sampling::Sample { temperature: 0.05, top_p: 1.0 }.choose(&logits, &mut r) == 1));
    assert_eq!(Sampling::Greedy.choose(&logits, &mut r), 1);
}

/// `tessera-client generate --chat`: stdout carries only the continuation, as transformers
/// decodes its own greedy continuation of the same prompt (SmolLM2-Instruct, with its
/// chat template: tokens [504, 3575, 282, 4649, 314, 7042, 30] then <|im_end|>).
#[test]
fn the_cli_prints_only_the_continuation() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera-client"))
        .args(["generate", "--model"])
        .arg(data_root().join("smollm2"))
        .args(["--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "24"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "The capital of France is Paris.\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("stopped at end of sequence"));
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_tessera-client"))
        .args(["generate", "--model"])
        .arg(data_root().join("smollm2"))
        .args(["--prompt", "x", "--top-p", "0"])
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--top-p must be in (0, 1]"));
}

/// Greedy tokens on SmolLM2-Instruct for its chat template's prompt, as transformers'
/// generate gives them for the same checkpoint (recorded with transformers 5.24:
/// `generate(do_sample=False, eos_token_id=[2])`).
#[test]
fn smollm2_greedy_tokens_equal_transformers() {
    use tessera_client::train::sft::{ChatTemplate, Message};
    let dir = data_root().join("smollm2");
    let llama = load(&dir);
    let template = ChatTemplate::load(&dir).unwrap().expect("scripts/setup writes the chat template");
    let text = template.render(&[Message { role: "user".into(), content: "What is the capital of France?".into() }], true).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let ids: Vec<i64> = tok.encode(text.as_str(), false).unwrap().get_ids().iter().map(|&i| i as i64).collect();
    let got = llama.generate(&ids, 24, &Sampling::Greedy, &[2], &mut rng());
    assert_eq!(got, vec![504, 3575, 282, 4649, 314, 7042, 30, 2]);
}

/// `federate --task sft` reads instruction records and refuses, before any network or
/// training, a record-level DP plan that cannot hold (δ not below 1/records) and a bad
/// record.
#[test]
fn federate_sft_refuses_what_it_cannot_do() {
    let bin = env!("CARGO_BIN_EXE_tessera-client");
    let dir = tempfile::tempdir().unwrap();
    let id = dir.path().join("id");
    assert!(std::process::Command::new(bin).args(["init", "--name", "clinic", "--dir"]).arg(&id).output().unwrap().status.success());
    let good = dir.path().join("good.jsonl");
    std::fs::write(&good, "{\"prompt\": \"2+2?\", \"response\": \"4\"}\n".repeat(3)).unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"2+2?\", \"response\": \"4\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n").unwrap();
    let run = |train: &std::path::Path, extra: &[&str]| {
        let out = std::process::Command::new(bin)
            .args(["federate", "--task", "sft", "--insecure-dev", "--server", "https://127.0.0.1:9", "--fingerprint", &"00".repeat(32), "--model"])
            .arg(data_root().join("smollm2"))
            .arg("--dir")
            .arg(&id)
            .arg("--train")
            .arg(train)
            .arg("--test")
            .arg(&good)
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&good, &["--record-epsilon", "8", "--record-delta", "0.5"]);
    assert!(e.contains("below 1/records"), "{e}");
    let e = run(&bad, &[]);
    assert!(e.contains("line 2") && e.contains("the user's"), "{e}");
}
