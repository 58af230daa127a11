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

/// Batched greedy generation (left-padded prompts of different lengths, rows stopping at
/// different steps) gives each prompt the tokens it gets alone, on the tiny checkpoints
/// (plain and llama3 RoPE, so per-row positions matter) and on SmolLM2's chat prompts.
#[test]
fn batched_greedy_generation_equals_one_prompt_at_a_time() {
    let refs: HashMap<String, Generation> = serde_json::from_slice(&std::fs::read(data().join("sft/generate.json")).unwrap()).unwrap();
    for (name, g) in &refs {
        let llama = load(&data().join("llama-features").join(name));
        let n = g.prompt.len();
        let prompts: Vec<Vec<i64>> = vec![g.prompt.clone(), g.prompt[..n / 2].to_vec(), vec![], g.prompt[n / 3..].to_vec(), g.prompt[..1].to_vec()];
        // A stop token that some rows meet early and others never.
        let stop = [g.continuation[2]];
        let batched = llama.generate_greedy_batch(&prompts, 12, &stop);
        for (p, got) in prompts.iter().zip(&batched) {
            let alone = llama.generate(p, 12, &Sampling::Greedy, &stop, &mut rng());
            assert_eq!(got, &alone, "{name}: prompt of {} tokens", p.len());
        }
        let cut = g.continuation.iter().position(|t| *t == stop[0]).unwrap() + 1;
        assert_eq!(batched[0], g.continuation[..cut], "{name}: the reference continuation, stopped");
        assert!(batched[2].is_empty());
    }
    use tessera_client::train::sft::{Prompt, SftEncoder};
    let dir = data_root().join("smollm2");
    let llama = load(&dir);
    let encoder = SftEncoder::load(&dir, 256).unwrap();
    let questions = ["What is the capital of France?", "Name a colour.", "Which condition is metformin taken for? Answer with the condition only.", "Hi"];
    let prompts: Vec<Prompt> =
        questions.iter().map(|q| Prompt::Chat(vec![tessera_client::train::sft::Message { role: "user".into(), content: (*q).into() }])).collect();
    let refs: Vec<&Prompt> = prompts.iter().collect();
    let batched = encoder.continue_prompts_greedy(&llama, &refs, 10, 3).unwrap();
    for (p, got) in prompts.iter().zip(&batched) {
        let alone = encoder.continue_prompt(&llama, p, 10, &Sampling::Greedy, &mut rng()).unwrap();
        assert_eq!(got, &alone);
    }
    assert_eq!(batched[0].text, "The capital of France is Paris.");
}

/// Held-out scoring from one prefill: the response loss equals the training loss's
/// full-sequence forward (`evaluate_sft`) and the answers equal one-at-a-time generation,
/// on SmolLM2 with chat and plain records of different lengths, one cut by `max_len`.
#[test]
fn held_out_scoring_equals_the_loss_and_generation_computed_apart() {
    use tessera_client::train::sft::{Message, Prompt, SftEncoder, SftExample};
    let dir = data_root().join("smollm2");
    let llama = load(&dir);
    let encoder = SftEncoder::load(&dir, 64).unwrap();
    let chat = |q: &str, a: &str| SftExample {
        prompt: Prompt::Chat(vec![Message { role: "user".into(), content: q.into() }]),
        response: a.into(),
        group: String::new(),
    };
    let records = vec![
        chat("What is the capital of France?", "Paris."),
        chat("Name a colour.", &"Blue, the colour of the sky on a clear summer day. ".repeat(6)),
        SftExample { prompt: Prompt::Text("2 + 2 =".into()), response: " 4".into(), group: String::new() },
        chat("Which condition is metformin taken for? Answer with the condition only.", "Diabetes, Type 2"),
    ];
    let scored = encoder.score_records(&llama, &records, 8, 3).unwrap();
    let (encoded, dropped) = encoder.encode_all(&records).unwrap();
    assert_eq!(dropped, 0);
    assert!(encoded[1].ids.len() == 64, "the second record is cut by max_len");
    for ((loss, count, answer), (record, enc)) in scored.iter().zip(records.iter().zip(&encoded)) {
        let apart = tessera_client::train::trainer::evaluate_sft(&llama, &encoder, std::slice::from_ref(enc), 1, Device::Cpu);
        assert_eq!(*count as i64, apart.response_tokens);
        let mean = loss / *count as f64;
        assert!((mean - apart.loss).abs() < 1e-4 * apart.loss.max(1.0), "{mean} vs {}", apart.loss);
        let alone = encoder.continue_prompt(&llama, &record.prompt, 8, &Sampling::Greedy, &mut rng()).unwrap();
        assert_eq!(answer, &alone);
    }
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

/// `tessera-client finetune`: the local-only baseline trains round after round on the
/// institution's own records and reports each round with the keys `federate` uses; the
/// adapter it writes loads again. Nothing goes to stdout.
#[test]
fn finetune_trains_alone_and_reports_each_round() {
    let bin = env!("CARGO_BIN_EXE_tessera-client");
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    let record = |q: &str, a: &str| {
        serde_json::json!({"messages": [{"role": "system", "content": "Name the condition."}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]}).to_string() + "\n"
    };
    std::fs::write(&train, record("My acne cleared up in weeks.", "Acne") + &record("I sleep through the night now.", "Insomnia")).unwrap();
    let report = dir.path().join("report.jsonl");
    let adapter = dir.path().join("adapter");
    let out = std::process::Command::new(bin)
        .args(["finetune", "--name", "clinic", "--model"])
        .arg(data_root().join("smollm2"))
        .args(["--max-len", "64", "--rounds", "2", "--steps", "2", "--batch-size", "2", "--answer-tokens", "4", "--threads", "2", "--lr", "0.01"])
        .arg("--train")
        .arg(&train)
        .arg("--test")
        .arg(&train)
        .arg("--global-test")
        .arg(&train)
        .arg("--report")
        .arg(&report)
        .arg("--adapter-out")
        .arg(&adapter)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty());
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&report).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["round"], i as u64 + 1);
        assert_eq!(r["mode"], "local-only");
        for key in ["train_loss", "held_out_loss", "held_out_perplexity", "held_out_exact_match", "global_exact_match", "initial_loss"] {
            assert!(r[key].as_f64().is_some_and(f64::is_finite), "{key} in {r}");
        }
    }
    // Training on the held-out records themselves: the response loss must fall.
    let (first, last) = (rows[0]["initial_loss"].as_f64().unwrap(), rows[1]["held_out_loss"].as_f64().unwrap());
    assert!(last < first, "held-out loss {first} -> {last}");
    let cfg = tessera_client::train::LoraConfig::from_peft(&adapter).unwrap();
    assert_eq!(cfg.r, 8);
}

/// Base weights in bf16 and f16 (LoRA factors in f32): on SmolLM2, next-token
/// log-probabilities stay within a stated distance of f32's, the completion-only loss
/// within 2%, and greedy answers (batched, so padding's masked scores must stay finite in
/// the narrow type) are the same; one training step moves the f32 factors.
#[test]
fn half_precision_weights_stay_close_to_f32() {
    use tessera_client::train::sft::{causal_lm_loss, Message, Prompt, SftEncoder, SftExample};
    let dir = data_root().join("smollm2");
    let cfg = || LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, target_modules: vec!["q_proj".into(), "v_proj".into()], mode: LoraMode::Both, seed: 1 };
    let load_as = |kind: Kind| {
        let mut adapter = Adapter::new(cfg(), "CAUSAL_LM", Device::Cpu, Kind::Float).unwrap();
        let llama = Llama::load_as(&dir, &mut adapter, Device::Cpu, kind).unwrap();
        (llama, adapter)
    };
    let encoder = SftEncoder::load(&dir, 128).unwrap();
    let chat = |q: &str, a: &str| SftExample {
        prompt: Prompt::Chat(vec![Message { role: "user".into(), content: q.into() }]),
        response: a.into(),
        group: String::new(),
    };
    let records = [chat("What is the capital of France?", "The capital of France is Paris."), chat("Name a colour.", "Blue.")];
    let encoded: Vec<_> = records.iter().map(|r| encoder.encode(r).unwrap().unwrap()).collect();
    let batch = encoder.batch(&encoded.iter().collect::<Vec<_>>(), Device::Cpu);
    let (f32_model, _) = load_as(Kind::Float);
    let reference = tch::no_grad(|| f32_model.logits(&batch.ids, &batch.mask, false)).log_softmax(-1, Kind::Float);
    let ref_loss = tch::no_grad(|| causal_lm_loss(&f32_model.logits(&batch.ids, &batch.mask, false), &batch.labels)).double_value(&[]);
    let prompts: Vec<&Prompt> = records.iter().map(|r| &r.prompt).collect();
    let ref_answers = encoder.continue_prompts_greedy(&f32_model, &prompts, 10, 2).unwrap();
    drop(f32_model);
    // Stated tolerances: the mean |Δ log p| over the real positions' 10 most likely tokens,
    // and the fraction of positions whose most likely token changes.
    for (kind, mean_tol) in [(Kind::BFloat16, 0.25), (Kind::Half, 0.05)] {
        let (model, adapter) = load_as(kind);
        let logits = tch::no_grad(|| model.logits(&batch.ids, &batch.mask, false));
        assert_eq!(logits.kind(), kind);
        let got = logits.log_softmax(-1, Kind::Float);
        let real = batch.mask.to_kind(Kind::Bool);
        let (top, idx) = reference.topk(10, -1, true, true);
        let diff = (got.gather(-1, &idx, false) - top).abs().mean_dim([-1i64].as_slice(), false, Kind::Float).masked_select(&real);
        let mean = diff.mean(Kind::Float).double_value(&[]);
        let flips = got.argmax(-1, false).ne_tensor(&reference.argmax(-1, false)).masked_select(&real).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
        eprintln!("{kind:?}: mean |Δ log p| of the top 10 {mean:.4}, most likely token changed at {:.1}% of positions", 100.0 * flips);
        assert!(mean < mean_tol, "{kind:?}: mean |Δ log p| of the top 10 = {mean}");
        assert!(flips < 0.1, "{kind:?}: the most likely token changes at {:.1}% of positions", 100.0 * flips);
        let loss = causal_lm_loss(&logits, &batch.labels).double_value(&[]);
        eprintln!("{kind:?}: completion-only loss {loss:.5} against f32 {ref_loss:.5}");
        assert!((loss - ref_loss).abs() < 0.02 * ref_loss, "{kind:?}: loss {loss} vs f32 {ref_loss}");
        let answers = encoder.continue_prompts_greedy(&model, &prompts, 10, 2).unwrap();
        assert_eq!(answers, ref_answers, "{kind:?}");
        // A training step: gradients reach the f32 factors through the half-precision base.
        let mut opt = adapter.optimizer(1e-2, 0.0).unwrap();
        let before = adapter.flatten_update().unwrap();
        let loss = causal_lm_loss(&model.logits(&batch.ids, &batch.mask, true), &batch.labels);
        loss.backward();
        opt.step();
        let after = adapter.flatten_update().unwrap();
        assert!(adapter.trainable().iter().all(|t| t.kind() == Kind::Float));
        assert!(before.iter().zip(&after).any(|(a, b)| a != b) && after.iter().all(|v| v.is_finite()), "{kind:?}: the step did not move the factors");
    }
}
