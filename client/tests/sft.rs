//! Instruction fine-tuning data against Hugging Face transformers
//! (`scripts/reference/sft_reference.py`, references committed under `tests/data/sft/`):
//! chat templates render exactly as transformers renders them, the completion-only
//! causal-LM loss equals transformers' `labels=` loss, and records encode with the prompt
//! masked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use tch::{Device, Kind, Tensor};
use tessera_client::train::data::read_jsonl;
use tessera_client::train::data_root;
use tessera_client::train::llama::Llama;
use tessera_client::train::sft::{causal_lm_loss, ChatTemplate, Message, Prompt, SftEncoder, SftExample, IGNORE};
use tessera_client::train::trainer::{evaluate_sft, train_sft, TrainConfig};
use tessera_client::train::{Adapter, LoraConfig, LoraMode};

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn smollm2() -> PathBuf {
    data_root().join("smollm2")
}

#[derive(serde::Deserialize)]
struct Case {
    template: String,
    messages: Vec<Message>,
    add_generation_prompt: bool,
    rendered: String,
    ids: Option<Vec<u32>>,
}

#[derive(serde::Deserialize)]
struct Chat {
    templates: HashMap<String, String>,
    cases: Vec<Case>,
}

#[test]
fn chat_templates_render_as_transformers_renders_them() {
    let chat: Chat = serde_json::from_slice(&std::fs::read(data().join("sft/chat.json")).unwrap()).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(smollm2().join("tokenizer.json")).unwrap();
    for c in &chat.cases {
        let t = ChatTemplate::new(chat.templates[&c.template].clone(), "<s>", "</s>").unwrap();
        let got = t.render(&c.messages, c.add_generation_prompt).unwrap();
        assert_eq!(got, c.rendered, "{} template, {} messages, generation prompt {}", c.template, c.messages.len(), c.add_generation_prompt);
        if let Some(ids) = &c.ids {
            assert_eq!(tokenizer.encode(got.as_str(), false).unwrap().get_ids(), ids.as_slice());
        }
    }
    // The template's own refusal reaches the caller.
    let t = ChatTemplate::new(chat.templates["methods"].clone(), "<s>", "</s>").unwrap();
    let err = t.render(&[Message { role: "tool".into(), content: "x".into() }], false).unwrap_err().to_string();
    assert!(err.contains("unknown role tool"), "{err}");
}

#[test]
fn the_completion_only_loss_is_transformers_loss() {
    let t: HashMap<String, Tensor> = Tensor::read_safetensors(data().join("sft/loss.reference.safetensors")).unwrap().into_iter().collect();
    let cfg = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, target_modules: vec!["q_proj".into(), "v_proj".into()], mode: LoraMode::Both, seed: 1 };
    let mut adapter = Adapter::new(cfg, "CAUSAL_LM", Device::Cpu, Kind::Float).unwrap();
    let llama = Llama::load(&data().join("llama-features/base"), &mut adapter, Device::Cpu).unwrap();
    let logits = tch::no_grad(|| llama.logits(&t["input_ids"], &t["attention_mask"], false));
    let got = causal_lm_loss(&logits, &t["labels"]).double_value(&[]);
    let want = t["loss"].double_value(&[0]);
    assert!((got - want).abs() < 1e-5 * want, "loss {got} vs transformers {want}");
    // Counting the prompt as well would be another number.
    let all = causal_lm_loss(&logits, &t["input_ids"].where_self(&t["attention_mask"].eq(1), &Tensor::from(IGNORE))).double_value(&[]);
    assert!((all - want).abs() > 1e-3, "{all} vs {want}");
}

#[test]
fn records_encode_with_the_prompt_masked() {
    let enc = SftEncoder::load(&smollm2(), 256).unwrap();
    assert!(enc.template().is_some(), "scripts/setup writes SmolLM2-Instruct's chat template to tokenizer_config.json");
    let chat = SftExample {
        prompt: Prompt::Chat(vec![Message { role: "user".into(), content: "Condition of: 'I could finally sleep.'".into() }]),
        response: "Insomnia".into(),
        group: String::new(),
    };
    let (prompt, response) = enc.texts(&chat).unwrap();
    assert!(prompt.ends_with("<|im_start|>assistant\n") && prompt.contains("named SmolLM"), "{prompt:?}");
    assert_eq!(response, "Insomnia<|im_end|>\n");
    let e = enc.encode(&chat).unwrap().unwrap();
    let n_prompt = enc.tokenizer().encode(prompt.as_str(), false).unwrap().get_ids().len();
    assert!(e.labels[..n_prompt].iter().all(|&l| l == IGNORE));
    assert_eq!(&e.labels[n_prompt..], &e.ids[n_prompt..]);
    let resp: Vec<u32> = e.ids[n_prompt..].iter().map(|&i| i as u32).collect();
    assert_eq!(enc.tokenizer().decode(&resp, false).unwrap(), "Insomnia<|im_end|>\n");

    // Plain prompt/response: no template; the response is closed with EOS (<|im_end|>, id 2).
    let plain = SftExample { prompt: Prompt::Text("Review: slept well.\nCondition:".into()), response: " Insomnia".into(), group: String::new() };
    let p = enc.encode(&plain).unwrap().unwrap();
    assert_eq!(p.ids.last(), Some(&2));
    assert_eq!(p.response_tokens(), enc.tokenizer().encode(" Insomnia", false).unwrap().get_ids().len() + 1);

    // A prompt that fills max_len leaves no response: the record is dropped and counted.
    let short = SftEncoder::load(&smollm2(), 8).unwrap();
    let long = SftExample { prompt: Prompt::Text("word ".repeat(20)), response: "x".into(), group: String::new() };
    assert_eq!(short.encode(&long).unwrap(), None);
    let (kept, dropped) = short.encode_all(&[long, plain]).unwrap();
    assert_eq!((kept.len(), dropped), (0, 2));
    // Batches pad ids with the pad token and labels with IGNORE.
    let b = enc.batch(&[&e, &p], Device::Cpu);
    assert_eq!(b.tokens, (e.ids.len() + p.ids.len()) as i64);
    assert_eq!(b.response_tokens, (e.response_tokens() + p.response_tokens()) as i64);
    let pad_labels = b.labels.narrow(1, p.ids.len() as i64, b.ids.size()[1] - p.ids.len() as i64).get(1);
    assert!(pad_labels.eq(IGNORE).all().int64_value(&[]) == 1);
}

/// A few LoRA steps of instruction fine-tuning on SmolLM2 (drug reviews recast as
/// "which condition?" chat records) lower the held-out loss on the responses.
#[test]
fn instruction_fine_tuning_lowers_the_response_loss() {
    let reviews = read_jsonl(&data_root().join("drugreview/train.jsonl")).unwrap();
    let records: Vec<SftExample> = reviews
        .iter()
        .filter(|r| ["Birth Control", "Depression", "Pain"].contains(&r.group.as_str()))
        .take(16)
        .map(|r| SftExample {
            prompt: Prompt::Chat(vec![Message {
                role: "user".into(),
                content: format!("Which condition is this review about?\n{}", r.text.chars().take(120).collect::<String>()),
            }]),
            response: r.group.clone(),
            group: r.group.clone(),
        })
        .collect();
    let enc = SftEncoder::load(&smollm2(), 80).unwrap();
    let (data, dropped) = enc.encode_all(&records).unwrap();
    assert_eq!((data.len(), dropped), (16, 0));
    let cfg = LoraConfig { r: 8, alpha: 16.0, dropout: 0.0, target_modules: vec!["q_proj".into(), "v_proj".into()], mode: LoraMode::Both, seed: 3 };
    let mut adapter = Adapter::new(cfg, "CAUSAL_LM", Device::Cpu, Kind::Float).unwrap();
    let llama = Llama::load(&smollm2(), &mut adapter, Device::Cpu).unwrap();
    let before = evaluate_sft(&llama, &enc, &data, 8, Device::Cpu);
    let stats = train_sft(&llama, &adapter, &enc, &data, &TrainConfig { steps: 5, batch_size: 4, lr: 3e-3, log_every: 0, ..Default::default() }, "t").unwrap();
    let after = evaluate_sft(&llama, &enc, &data, 8, Device::Cpu);
    assert!(before.response_tokens > 16 && after.response_tokens == before.response_tokens);
    assert!(after.loss < 0.8 * before.loss, "response loss {:.3} -> {:.3} (ppl {:.1} -> {:.1})", before.loss, after.loss, before.perplexity, after.perplexity);
    assert_eq!(stats.examples, 20);
    eprintln!(
        "SFT: response loss {:.3} -> {:.3}, perplexity {:.1} -> {:.1}, {:.0} tok/s",
        before.loss, after.loss, before.perplexity, after.perplexity, stats.tokens_per_sec
    );
}

/// Two clinics fine-tune SmolLM2 on instructions ("which condition is this review about?")
/// for one federated round, in process: each trains from the same global adapter, the
/// mean of their deltas is applied by both, they then hold the same adapter, and the
/// held-out response loss has dropped. Exact match is computed from greedy answers.
#[test]
fn one_federated_round_of_instruction_tuning() {
    use tessera_client::train::federated::{normalize_answer, ModelSpec, SftInstitution};
    let reviews = read_jsonl(&data_root().join("drugreview/train.jsonl")).unwrap();
    let record = |r: &tessera_client::train::data::Example| SftExample {
        prompt: Prompt::Chat(vec![Message {
            role: "user".into(),
            content: format!("Which condition is this review about?\n{}", r.text.chars().take(100).collect::<String>()),
        }]),
        response: r.group.clone(),
        group: r.group.clone(),
    };
    let of = |groups: &[&str], skip: usize, n: usize| -> Vec<SftExample> {
        reviews.iter().filter(|r| groups.contains(&r.group.as_str())).skip(skip).take(n).map(record).collect()
    };
    let shards = [of(&["Birth Control", "Pain"], 0, 8), of(&["Depression", "Pain"], 0, 8)];
    let test = of(&["Birth Control", "Depression", "Pain"], 30, 6);
    let spec = ModelSpec {
        dir: smollm2(),
        lora: LoraConfig { r: 8, alpha: 16.0, dropout: 0.0, target_modules: vec![], mode: LoraMode::Ffa, seed: 5 },
        num_labels: 0,
        max_len: 72,
        dtype: Default::default(),
    };
    let cfg = TrainConfig { steps: 4, batch_size: 4, lr: 5e-3, log_every: 0, ..Default::default() };
    let mut clinics: Vec<SftInstitution> =
        shards.iter().enumerate().map(|(i, s)| SftInstitution::new(&format!("clinic-{i}"), &spec, s, cfg.clone()).unwrap()).collect();
    assert_eq!(clinics[0].layout(), clinics[1].layout());
    let before = clinics[0].evaluate(&test, 6).unwrap();
    let deltas: Vec<Vec<f32>> = clinics.iter_mut().map(|c| c.local_update(1).unwrap().delta).collect();
    let mean: Vec<f32> = deltas[0].iter().zip(&deltas[1]).map(|(a, b)| (a + b) / 2.0).collect();
    for c in &mut clinics {
        c.apply_mean(&mean).unwrap();
    }
    assert_eq!(clinics[0].adapter.flatten_update().unwrap(), clinics[1].adapter.flatten_update().unwrap());
    let after = clinics[0].evaluate(&test, 6).unwrap();
    assert!(after.loss < before.loss, "held-out response loss {:.3} -> {:.3}", before.loss, after.loss);
    assert!((0.0..=1.0).contains(&after.exact_match) && after.examples == 6);
    assert_eq!(normalize_answer("  Birth   Control. "), "birth control");
    eprintln!(
        "one round: response loss {:.3} -> {:.3}, perplexity {:.1} -> {:.1}, exact match {:.2} -> {:.2}",
        before.loss, after.loss, before.perplexity, after.perplexity, before.exact_match, after.exact_match
    );
}
