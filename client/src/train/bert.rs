//! A BERT encoder (Hugging Face `BertModel`) in libtorch, loaded from safetensors, with
//! LoRA on the chosen attention projections, and a sequence classifier on top (mean
//! pooling over the attention mask, as sentence-transformers pools, then a linear head).

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::lora::{Adapter, Linear};
use super::weights::{read_json, ModelError, Weights};

#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub max_position_embeddings: i64,
    #[serde(default = "two")]
    pub type_vocab_size: i64,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "gelu")]
    pub hidden_act: String,
}

fn two() -> i64 {
    2
}
fn eps() -> f64 {
    1e-12
}
fn gelu() -> String {
    "gelu".into()
}

#[derive(Debug)]
struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        let n = self.w.size()[0];
        x.layer_norm([n], Some(&self.w), Some(&self.b), self.eps, false)
    }
}

#[derive(Debug)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

#[derive(Debug)]
pub struct Bert {
    pub config: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
}

/// Checkpoints of `BertModel` name tensors `encoder.…`; task models nest them under `bert.`.
const PREFIXES: [&str; 2] = ["", "bert."];

impl Bert {
    /// Loads `config.json` and the safetensors weights of `dir`; LoRA pairs are added to
    /// `adapter` for the target modules, under the same module paths as in PEFT.
    pub fn load(dir: &Path, adapter: &mut Adapter, device: Device) -> Result<Bert, ModelError> {
        let config: BertConfig = read_json(&dir.join("config.json"))?;
        if config.hidden_act != "gelu" {
            return Err(ModelError::Config { path: dir.join("config.json"), reason: format!("hidden_act `{}` is not supported (gelu is)", config.hidden_act) });
        }
        if config.num_attention_heads < 1 || config.hidden_size % config.num_attention_heads != 0 {
            return Err(ModelError::Config { path: dir.join("config.json"), reason: "hidden_size must be a multiple of num_attention_heads".into() });
        }
        let w = Weights::load(dir, device, Kind::Float)?;
        Self::from_weights(config, &w, adapter)
    }

    pub fn from_weights(config: BertConfig, w: &Weights, adapter: &mut Adapter) -> Result<Bert, ModelError> {
        let h = config.hidden_size;
        let get = |name: &str, shape: &[i64]| w.get_any(&PREFIXES, name, shape);
        let norm = |p: &str| -> Result<LayerNorm, ModelError> {
            Ok(LayerNorm { w: get(&format!("{p}.weight"), &[h])?, b: get(&format!("{p}.bias"), &[h])?, eps: config.layer_norm_eps })
        };
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let mut lin = |name: &str, out_f: i64, in_f: i64| -> Result<Linear, ModelError> {
                let module = format!("{p}.{name}");
                let weight = get(&format!("{module}.weight"), &[out_f, in_f])?;
                let bias = get(&format!("{module}.bias"), &[out_f])?;
                Ok(adapter.linear(&module, weight, Some(bias)))
            };
            let f = config.intermediate_size;
            layers.push(Layer {
                query: lin("attention.self.query", h, h)?,
                key: lin("attention.self.key", h, h)?,
                value: lin("attention.self.value", h, h)?,
                attn_out: lin("attention.output.dense", h, h)?,
                intermediate: lin("intermediate.dense", f, h)?,
                output: lin("output.dense", h, f)?,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                out_norm: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        Ok(Bert {
            word: get("embeddings.word_embeddings.weight", &[config.vocab_size, h])?,
            position: get("embeddings.position_embeddings.weight", &[config.max_position_embeddings, h])?,
            token_type: get("embeddings.token_type_embeddings.weight", &[config.type_vocab_size, h])?,
            emb_norm: norm("embeddings.LayerNorm")?,
            layers,
            config,
        })
    }

    /// Hidden states `[batch, len, hidden]` for token ids and a 0/1 attention mask, both `[batch, len]` (int64).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let c = &self.config;
        let (batch, len) = (ids.size()[0], ids.size()[1]);
        let positions = Tensor::arange(len, (Kind::Int64, ids.device()));
        let x = Tensor::embedding(&self.word, ids, -1, false, false)
            + Tensor::embedding(&self.position, &positions, -1, false, false).unsqueeze(0)
            + self.token_type.get(0).view([1, 1, c.hidden_size]);
        let mut x = self.emb_norm.forward(&x).dropout(c.hidden_dropout_prob, train);
        let heads = c.num_attention_heads;
        let dh = c.hidden_size / heads;
        // As transformers does: masked keys get the most negative f32 added to their scores.
        let bias = (mask.eq(0).to_kind(Kind::Float) * f64::from(f32::MIN)).view([batch, 1, 1, len]);
        for l in &self.layers {
            let split = |t: Tensor| t.view([batch, len, heads, dh]).transpose(1, 2);
            let q = split(l.query.forward(&x, train));
            let k = split(l.key.forward(&x, train));
            let v = split(l.value.forward(&x, train));
            let scores = q.matmul(&k.transpose(-1, -2)) / (dh as f64).sqrt() + &bias;
            let probs = scores.softmax(-1, Kind::Float).dropout(c.attention_probs_dropout_prob, train);
            let ctx = probs.matmul(&v).transpose(1, 2).contiguous().view([batch, len, c.hidden_size]);
            let attn = l.attn_out.forward(&ctx, train).dropout(c.hidden_dropout_prob, train);
            x = l.attn_norm.forward(&(attn + &x));
            let inter = l.intermediate.forward(&x, train).gelu("none");
            let out = l.output.forward(&inter, train).dropout(c.hidden_dropout_prob, train);
            x = l.out_norm.forward(&(out + &x));
        }
        x
    }
}

/// BERT + masked mean pooling + a linear head over `num_labels` classes.
#[derive(Debug)]
pub struct BertClassifier {
    pub bert: Bert,
    head: Linear,
    pub num_labels: i64,
}

impl BertClassifier {
    pub fn load(dir: &Path, adapter: &mut Adapter, num_labels: i64, device: Device) -> Result<BertClassifier, ModelError> {
        let bert = Bert::load(dir, adapter, device)?;
        let head = adapter.head("classifier", bert.config.hidden_size, num_labels);
        Ok(BertClassifier { bert, head, num_labels })
    }

    /// Class logits `[batch, num_labels]`.
    pub fn logits(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let hidden = self.bert.forward(ids, mask, train);
        let m = mask.to_kind(Kind::Float).unsqueeze(-1);
        let pooled =
            (hidden * &m).sum_dim_intlist([1i64].as_slice(), false, Kind::Float) / m.sum_dim_intlist([1i64].as_slice(), false, Kind::Float).clamp_min(1e-9);
        let pooled = pooled.dropout(self.bert.config.hidden_dropout_prob, train);
        self.head.forward(&pooled, train)
    }
}
