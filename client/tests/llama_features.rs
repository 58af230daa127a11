//! Llama-family configuration features that change the math, each on a tiny random
//! checkpoint made with Hugging Face transformers (`scripts/reference/llama_features.py`,
//! committed under `tests/data/llama-features/`): the logits match transformers', and
//! the same checkpoint with the feature left out does not, so the test would catch a
//! feature that is ignored. Unsupported features are refused by name.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use tessera_client::train::llama::Llama;
use tessera_client::train::{Adapter, LoraConfig, LoraMode, ModelError};

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/llama-features")
}

fn adapter() -> Adapter {
    let cfg = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, target_modules: vec!["q_proj".into(), "v_proj".into()], mode: LoraMode::Both, seed: 1 };
    Adapter::new(cfg, "CAUSAL_LM", Device::Cpu, Kind::Float).unwrap()
}

fn load(dir: &Path) -> Result<Llama, ModelError> {
    Llama::load(dir, &mut adapter(), Device::Cpu)
}

/// Largest |ours − transformers'| over the real positions, and the largest reference logit.
fn difference(llama: &Llama, name: &str) -> (f64, f64) {
    let t: HashMap<String, Tensor> = Tensor::read_safetensors(data().join(format!("{name}.reference.safetensors"))).unwrap().into_iter().collect();
    let (ids, mask, want) = (&t["input_ids"], &t["attention_mask"], &t["logits"]);
    let got = tch::no_grad(|| llama.logits(ids, mask, false));
    let valid = mask.to_kind(Kind::Float).unsqueeze(-1);
    (((&got - want).abs() * &valid).max().double_value(&[]), want.abs().max().double_value(&[]))
}

fn assert_matches(name: &str) {
    let llama = load(&data().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let (diff, scale) = difference(&llama, name);
    assert!(diff < 1e-4 * scale.max(1.0), "{name}: max |tch − transformers| logit = {diff:e} (largest {scale:.2})");
    eprintln!("{name}: max logit difference {diff:.2e} (largest logit {scale:.2})");
}

/// A copy of the variant's folder with its config.json edited by `edit`.
fn edited(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(data().join(name).join(f), dir.path().join(f)).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    dir
}

/// The reference with the feature taken out differs by far more than the tolerance.
fn assert_sensitive(name: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let dir = edited(name, edit);
    let llama = load(dir.path()).unwrap_or_else(|e| panic!("{name} without the feature: {e}"));
    let (diff, scale) = difference(&llama, name);
    assert!(diff > 1e-2 * scale.max(1.0), "{name}: leaving the feature out changes the logits by only {diff:e}");
}

fn drop_rope(cfg: &mut serde_json::Value) {
    let o = cfg.as_object_mut().unwrap();
    o.remove("rope_scaling");
    if let Some(p) = o.get_mut("rope_parameters").and_then(|p| p.as_object_mut()) {
        p.retain(|k, _| k == "rope_theta");
        p.insert("rope_type".into(), "default".into());
    }
}

#[test]
fn a_plain_llama_matches_transformers() {
    assert_matches("base");
}

#[test]
fn llama3_rope_scaling_matches_transformers_and_is_not_ignored() {
    assert_matches("rope-llama3");
    assert_sensitive("rope-llama3", drop_rope);
    // The same scaling written as transformers < 5 writes it (`rope_scaling`, `type`).
    let old_style = edited("rope-llama3", |cfg| {
        let o = cfg.as_object_mut().unwrap();
        let mut p = o.remove("rope_parameters").unwrap_or_else(|| o.remove("rope_scaling").unwrap());
        let p = p.as_object_mut().unwrap();
        let theta = p.remove("rope_theta");
        if let Some(t) = theta {
            o.insert("rope_theta".into(), t);
        }
        let kind = p.remove("rope_type").unwrap();
        p.insert("type".into(), kind);
        o.insert("rope_scaling".into(), serde_json::Value::Object(p.clone()));
    });
    let llama = load(old_style.path()).unwrap();
    let (diff, scale) = difference(&llama, "rope-llama3");
    assert!(diff < 1e-4 * scale.max(1.0), "old-style rope_scaling: {diff:e}");
}

#[test]
fn linear_rope_scaling_matches_transformers_and_is_not_ignored() {
    assert_matches("rope-linear");
    assert_sensitive("rope-linear", drop_rope);
}

#[test]
fn attention_and_mlp_biases_match_transformers() {
    assert_matches("attention-bias");
    // Declared but missing from the checkpoint: refused, naming the tensor.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(data().join("attention-bias/config.json"), dir.path().join("config.json")).unwrap();
    std::fs::copy(data().join("base/model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let err = load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("q_proj.bias"), "{err}");
}

#[test]
fn qwen2_qkv_biases_are_loaded_without_a_flag() {
    assert_matches("qwen2");
}

#[test]
fn a_head_dim_other_than_hidden_over_heads_matches_transformers() {
    assert_matches("head-dim");
    let dir = edited("head-dim", |cfg| {
        cfg.as_object_mut().unwrap().remove("head_dim");
    });
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::Shape { .. }), "{err}");
}

#[test]
fn an_untied_lm_head_matches_transformers_and_is_required() {
    assert_matches("untied");
    assert_sensitive("untied", |cfg| {
        cfg["tie_word_embeddings"] = true.into();
    });
    // Untied but without lm_head.weight: refused rather than silently tied.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(data().join("untied/config.json"), dir.path().join("config.json")).unwrap();
    std::fs::copy(data().join("base/model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let err = load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("lm_head.weight"), "{err}");
}

#[test]
fn features_that_would_change_the_outputs_are_refused_by_name() {
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "base",
            Box::new(|c| {
                drop_rope(c);
                c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
                c.as_object_mut().unwrap().remove("rope_parameters");
            }),
            "`yarn` is not supported",
        ),
        ("base", Box::new(|c| c["rope_parameters"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})), "`dynamic`"),
        ("base", Box::new(|c| c["sliding_window"] = 4096.into()), "sliding_window"),
        ("base", Box::new(|c| c["partial_rotary_factor"] = 0.5.into()), "partial_rotary_factor"),
        ("qwen2", Box::new(|c| c["layer_types"] = serde_json::json!(["full_attention", "sliding_attention"])), "`sliding_attention`"),
        ("base", Box::new(|c| c["model_type"] = "gemma2".into()), "model_type `gemma2`"),
        ("base", Box::new(|c| c["hidden_act"] = "gelu".into()), "hidden_act `gelu`"),
        (
            "rope-llama3",
            Box::new(|c| {
                let key = if c.get("rope_parameters").is_some() { "rope_parameters" } else { "rope_scaling" };
                c[key].as_object_mut().unwrap().remove("original_max_position_embeddings");
            }),
            "original_max_position_embeddings",
        ),
    ];
    for (name, edit, says) in cases {
        let dir = edited(name, edit);
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains(says), "expected {says:?} in: {err}");
    }
}
