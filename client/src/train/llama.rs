//! A Llama decoder (Hugging Face `LlamaForCausalLM`: RMSNorm, rotary position embeddings,
//! grouped-query attention through libtorch's `scaled_dot_product_attention`, SwiGLU,
//! optionally tied embeddings) in libtorch, loaded from
//! safetensors, with LoRA on the chosen projections. Any checkpoint with these names
//! loads: SmolLM2 converted by `scripts/setup`, or Llama-3-8B on a GPU box.
//!
//! As a classifier it scores the label words after a prompt: the logits of the first
//! token of each label at the last prompt position, i.e. the causal-LM loss restricted to
//! the verbalizers, so no new head is trained.
//!
//! Configuration fields that change the math are implemented or refused by name, never
//! ignored: `rope_scaling` / `rope_parameters` of type `llama3` (Llama 3.1/3.2),
//! `linear` or `default`; `attention_bias` and `mlp_bias` (and Qwen2's q/k/v biases,
//! loaded whenever the checkpoint has them); `head_dim` other than hidden/heads; an
//! untied `lm_head`. Anything else that would change the outputs (another RoPE type,
//! a sliding window, partial rotary embeddings, another `model_type`) is refused with
//! the field's name ([`LlamaConfig::check`]).

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::lora::{Adapter, Linear};
use super::weights::{read_json, ModelError, Weights};

#[derive(Clone, Debug, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    #[serde(default = "eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "silu")]
    pub hidden_act: String,
    #[serde(default)]
    pub head_dim: Option<i64>,
    /// Biases on q/k/v/o (Llama's `attention_bias`); required in the checkpoint when true.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections; required in the checkpoint when true.
    #[serde(default)]
    pub mlp_bias: bool,
    /// RoPE frequency scaling as transformers < 5 writes it (`{"rope_type" | "type", "factor", …}`).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// The same as transformers 5 writes it, `rope_theta` included.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub sliding_window: Option<serde_json::Value>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    /// Per-layer attention kind (Qwen2, transformers 5): only `full_attention` is computed.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub max_position_embeddings: Option<i64>,
}

/// How rotary frequencies are scaled ([`LlamaConfig::rope`]).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (transformers' `linear`).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling (transformers' `_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

fn eps() -> f64 {
    1e-6
}
fn theta() -> f64 {
    10_000.0
}
fn silu() -> String {
    "silu".into()
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// RoPE base frequency: `rope_parameters.rope_theta` (transformers 5) or `rope_theta`.
    pub fn theta(&self) -> f64 {
        self.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64()).unwrap_or(self.rope_theta)
    }

    /// The RoPE scaling the configuration asks for, or why it is not supported.
    pub fn rope(&self) -> Result<RopeScaling, String> {
        let Some(spec) = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref()).filter(|v| !v.is_null()) else {
            return Ok(RopeScaling::None);
        };
        let field = if self.rope_parameters.is_some() { "rope_parameters" } else { "rope_scaling" };
        let kind = spec.get("rope_type").or_else(|| spec.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
        let num = |name: &str| -> Result<f64, String> {
            spec.get(name)
                .and_then(|v| v.as_f64())
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| format!("{field} of type {kind} needs a positive `{name}`"))
        };
        if let Some(f) = spec.get("attention_factor").and_then(|v| v.as_f64()) {
            if f != 1.0 {
                return Err(format!("{field}.attention_factor = {f} is not supported"));
            }
        }
        match kind {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
            "llama3" => {
                let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
                if high <= low {
                    return Err(format!("{field}: high_freq_factor ({high}) must exceed low_freq_factor ({low})"));
                }
                Ok(RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                })
            }
            other => {
                Err(format!("{field} of type `{other}` is not supported (default, linear and llama3 are); refusing rather than computing other positions"))
            }
        }
    }

    /// Refuses, by name, every field whose effect this implementation does not compute.
    pub fn check(&self) -> Result<(), String> {
        if let Some(t) = self.model_type.as_deref() {
            if !["llama", "qwen2", "mistral"].contains(&t) {
                return Err(format!("model_type `{t}` is not supported (llama, qwen2 and mistral are)"));
            }
        }
        if self.hidden_act != "silu" {
            return Err(format!("hidden_act `{}` is not supported (silu is)", self.hidden_act));
        }
        let (h, kv) = (self.num_attention_heads, self.kv_heads());
        if h < 1 || kv < 1 || h % kv != 0 || self.head_dim() < 2 || self.head_dim() % 2 != 0 {
            return Err("attention heads must be a multiple of key/value heads, with an even head dimension".into());
        }
        if let Some(f) = self.partial_rotary_factor {
            if f != 1.0 {
                return Err(format!("partial_rotary_factor = {f} is not supported (rotary embeddings over the whole head are)"));
            }
        }
        let window = self.sliding_window.as_ref().filter(|v| !v.is_null());
        if let Some(w) = window {
            if self.use_sliding_window != Some(false) {
                return Err(format!("sliding_window = {w} is not supported: attention here is over the whole causal context"));
            }
        }
        if let Some(other) = self.layer_types.iter().flatten().find(|t| *t != "full_attention") {
            return Err(format!("layer_types names `{other}` attention: only full_attention is supported"));
        }
        self.rope().map(|_| ())
    }

    /// Rotary inverse frequencies `[head_dim / 2]`, scaled as the configuration says.
    fn inv_freq(&self, device: Device) -> Result<Tensor, String> {
        let d = self.head_dim();
        let base = (Tensor::arange_start_step(0, d, 2, (Kind::Double, device)) * (-(self.theta().ln()) / d as f64)).exp();
        Ok(match self.rope()? {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base / factor,
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                let wavelen = (base.reciprocal() * (2.0 * std::f64::consts::PI)).to_kind(Kind::Double);
                let scaled = base.where_self(&wavelen.le(low_wavelen), &(&base / factor));
                let smooth = (wavelen.reciprocal() * old - low_freq_factor) / (high_freq_factor - low_freq_factor);
                let smoothed = (smooth.ones_like() - &smooth) * &scaled / factor + &smooth * &scaled;
                let medium = wavelen.ge(high_wavelen).logical_and(&wavelen.le(low_wavelen));
                smoothed.where_self(&medium, &scaled)
            }
        })
    }
}

#[derive(Debug)]
struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
}

#[derive(Debug)]
pub struct Llama {
    pub config: LlamaConfig,
    embed: Tensor,
    lm_head: Tensor,
    norm: Tensor,
    layers: Vec<Layer>,
    /// Rotary inverse frequencies (f64), scaling applied.
    inv_freq: Tensor,
}

/// The most negative finite value of `kind`: what masked attention scores are set to.
/// f32's would overflow to -inf in f16 (and round past bf16's range), and a row of
/// padding whose every score is -inf would turn to NaN.
pub fn lowest(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.3895313892515355e38,
        _ => f64::from(f32::MIN),
    }
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let xf = x.to_kind(Kind::Float);
    let var = xf.square().mean_dim([-1i64].as_slice(), true, Kind::Float);
    (xf * (var + eps).rsqrt()).to_kind(kind) * w
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[x2.neg(), x1], -1)
}

impl Llama {
    pub fn load(dir: &Path, adapter: &mut Adapter, device: Device) -> Result<Llama, ModelError> {
        Self::load_as(dir, adapter, device, Kind::Float)
    }

    /// With the base weights in `dtype` (f32, bf16 or f16); the adapter's factors keep
    /// their own type (f32), and logits are returned in `dtype` (losses compute in f32).
    pub fn load_as(dir: &Path, adapter: &mut Adapter, device: Device, dtype: Kind) -> Result<Llama, ModelError> {
        let path = dir.join("config.json");
        if !matches!(dtype, Kind::Float | Kind::BFloat16 | Kind::Half) {
            return Err(ModelError::Config { path, reason: format!("base weights can be f32, bf16 or f16, not {dtype:?}") });
        }
        let config: LlamaConfig = read_json(&path)?;
        config.check().map_err(|reason| ModelError::Config { path: path.clone(), reason })?;
        let w = Weights::load(dir, device, dtype)?;
        if !config.tie_word_embeddings && !w.contains("lm_head.weight") {
            return Err(ModelError::Config {
                path,
                reason: "tie_word_embeddings is false but the checkpoint has no lm_head.weight (transformers would start an untrained head)".into(),
            });
        }
        Self::from_weights(config, &w, adapter)
    }

    pub fn from_weights(config: LlamaConfig, w: &Weights, adapter: &mut Adapter) -> Result<Llama, ModelError> {
        let (hidden, ffn, d) = (config.hidden_size, config.intermediate_size, config.head_dim());
        let (qd, kvd) = (config.num_attention_heads * d, config.kv_heads() * d);
        let embed = w.get("model.embed_tokens.weight", &[config.vocab_size, hidden])?;
        let inv_freq = config.inv_freq(embed.device()).map_err(|reason| ModelError::Config { path: w.path().join("config.json"), reason })?;
        let lm_head = if config.tie_word_embeddings || !w.contains("lm_head.weight") {
            embed.shallow_clone()
        } else {
            w.get("lm_head.weight", &[config.vocab_size, hidden])?
        };
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            // A bias the configuration declares must be there; one it does not declare is
            // loaded when present (Qwen2's q/k/v biases have no flag).
            let mut lin = |name: &str, out_f: i64, in_f: i64, declared: bool| -> Result<Linear, ModelError> {
                let module = format!("{p}.{name}");
                let weight = w.get(&format!("{module}.weight"), &[out_f, in_f])?;
                let bias_name = format!("{module}.bias");
                let bias = if declared || w.contains(&bias_name) { Some(w.get(&bias_name, &[out_f])?) } else { None };
                Ok(adapter.linear(&module, weight, bias))
            };
            let (ab, mb) = (config.attention_bias, config.mlp_bias);
            layers.push(Layer {
                q: lin("self_attn.q_proj", qd, hidden, ab)?,
                k: lin("self_attn.k_proj", kvd, hidden, ab)?,
                v: lin("self_attn.v_proj", kvd, hidden, ab)?,
                o: lin("self_attn.o_proj", hidden, qd, ab)?,
                gate: lin("mlp.gate_proj", ffn, hidden, mb)?,
                up: lin("mlp.up_proj", ffn, hidden, mb)?,
                down: lin("mlp.down_proj", hidden, ffn, mb)?,
                input_norm: w.get(&format!("{p}.input_layernorm.weight"), &[hidden])?,
                post_norm: w.get(&format!("{p}.post_attention_layernorm.weight"), &[hidden])?,
            });
        }
        Ok(Llama { norm: w.get("model.norm.weight", &[hidden])?, embed, lm_head, layers, config, inv_freq })
    }

    /// cos and sin of the rotary embedding at `positions` (f32), in `kind`: `[n, d]` for
    /// positions `[n]` shared by the batch, `[batch, 1, n, d]` for positions `[batch, n]`
    /// (left-padded rows, each counting from its own first token).
    fn rotary(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let inv_freq = self.inv_freq.to_kind(Kind::Float);
        let freqs = positions.unsqueeze(-1) * inv_freq;
        let mut emb = Tensor::cat(&[&freqs, &freqs], -1);
        if positions.dim() == 2 {
            emb = emb.unsqueeze(1);
        }
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }

    /// One decoder layer on `x` `[batch, n, hidden]`: attention over `past` keys and
    /// values (`[batch, kv, past, d]`, rotated) followed by the new ones, with an additive
    /// `bias` `[batch or 1, 1, n, past + n]`. Returns the layer's output and its full keys
    /// and values (for a cache).
    // `x = x + f(x)`, not `x += f(x)`: tch's `+=` adds in place, which would overwrite a
    // tensor that autograd saved for the backward pass.
    #[allow(clippy::assign_op_pattern, clippy::too_many_arguments)]
    fn layer(
        &self,
        l: &Layer,
        x: Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: Option<&Tensor>,
        past: Option<&(Tensor, Tensor)>,
        train: bool,
    ) -> (Tensor, Tensor, Tensor) {
        let c = &self.config;
        let (batch, n) = (x.size()[0], x.size()[1]);
        let (heads, kv, d) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let h = rms_norm(&x, &l.input_norm, c.rms_norm_eps);
        let q = l.q.forward(&h, train).view([batch, n, heads, d]).transpose(1, 2);
        let k = l.k.forward(&h, train).view([batch, n, kv, d]).transpose(1, 2);
        let v = l.v.forward(&h, train).view([batch, n, kv, d]).transpose(1, 2);
        let q = &q * cos + rotate_half(&q) * sin;
        let k = &k * cos + rotate_half(&k) * sin;
        let (k, v) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2), Tensor::cat(&[pv, &v], 2)),
            None => (k, v),
        };
        // libtorch's fused attention (flash or memory-efficient kernels where they
        // apply): no [batch, heads, len, len] score matrix is kept for the backward
        // pass, and the key/value heads are shared by their query groups in place.
        let ctx =
            Tensor::scaled_dot_product_attention(&q, &k, &v, bias, 0.0, false, None, heads / kv > 1).transpose(1, 2).contiguous().view([batch, n, heads * d]);
        let mut x = x + l.o.forward(&ctx, train);
        let h = rms_norm(&x, &l.post_norm, c.rms_norm_eps);
        let ff = l.gate.forward(&h, train).silu() * l.up.forward(&h, train);
        x = x + l.down.forward(&ff, train);
        (x, k, v)
    }

    /// Final hidden states `[batch, len, hidden]` (after the last RMSNorm) for right-padded
    /// token ids and a 0/1 attention mask, both `[batch, len]`.
    pub fn hidden(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let c = &self.config;
        let (batch, len) = (ids.size()[0], ids.size()[1]);
        let device = ids.device();
        let mut x = Tensor::embedding(&self.embed, ids, -1, false, false);
        // Rotary embeddings as Hugging Face computes them (rotate-half layout), the
        // frequencies scaled at load time.
        let (cos, sin) = self.rotary(&Tensor::arange(len, (Kind::Float, device)), x.kind());
        // Causal mask plus padding mask on the keys.
        let causal = Tensor::ones([len, len], (Kind::Bool, device)).triu(1);
        let pad = mask.eq(0).view([batch, 1, 1, len]);
        let blocked = causal.view([1, 1, len, len]).logical_or(&pad);
        let bias = Tensor::zeros([batch, 1, len, len], (x.kind(), device)).masked_fill(&blocked, lowest(x.kind()));
        for l in &self.layers {
            x = self.layer(l, x, &cos, &sin, Some(&bias), None, train).0;
        }
        rms_norm(&x, &self.norm, c.rms_norm_eps)
    }

    /// Feeds `ids` `[1, n]` after what `cache` holds and returns the vocabulary logits
    /// `[vocab]` (f32) of the last position; the cache then holds the new keys and values.
    pub fn step(&self, ids: &Tensor, cache: &mut KvCache) -> Tensor {
        let (start, n) = (cache.len, ids.size()[1]);
        let positions = Tensor::arange_start(start, start + n, (Kind::Float, ids.device()));
        self.project_last(&self.forward_cached(ids, &positions, None, cache)).view([-1])
    }

    /// Vocabulary logits `[batch, vocab]` (f32) of the last position of `hidden` `[batch, n, hidden]`.
    fn project_last(&self, hidden: &Tensor) -> Tensor {
        let n = hidden.size()[1];
        hidden.narrow(1, n - 1, 1).matmul(&self.lm_head.tr()).to_kind(Kind::Float).squeeze_dim(1)
    }

    /// Feeds `ids` `[batch, n]` at `positions` (`[n]` for every row, or `[batch, n]`) after
    /// what `cache` holds, and returns the final hidden states `[batch, n, hidden]` (after
    /// the last RMSNorm). `valid` (`[batch, past + n]`, bool) marks the key positions that are
    /// real tokens rather than left padding; `None`: all are. The cache then holds the new
    /// keys and values.
    fn forward_cached(&self, ids: &Tensor, positions: &Tensor, valid: Option<&Tensor>, cache: &mut KvCache) -> Tensor {
        let c = &self.config;
        let (batch, n) = (ids.size()[0], ids.size()[1]);
        let device = ids.device();
        let start = cache.len;
        let mut x = Tensor::embedding(&self.embed, ids, -1, false, false);
        let (cos, sin) = self.rotary(positions, x.kind());
        // New position i sees every cached key and the new keys up to itself, padding excepted.
        let keys = start + n;
        let causal = (n > 1).then(|| Tensor::ones([n, keys], (Kind::Bool, device)).triu(start + 1).view([1, 1, n, keys]));
        let padding = valid.map(|v| v.logical_not().view([batch, 1, 1, keys]));
        let blocked = match (causal, padding) {
            (Some(c), Some(p)) => Some(c.logical_or(&p)),
            (c, p) => c.or(p),
        };
        // A left-padding query row sees no real key at all: let it attend to every key
        // instead (its output is never used), as transformers' `_unmask_unattended` does,
        // because some fused kernels turn a row of only masked scores into NaN, and a
        // NaN key or value would reach the real rows through the masked products.
        let blocked = blocked.map(|b| {
            let unattended = b.all_dim(-1, true);
            b.logical_and(&unattended.logical_not())
        });
        let bias = blocked.map(|b| {
            let shape = b.size();
            Tensor::zeros(shape.as_slice(), (x.kind(), device)).masked_fill(&b, lowest(x.kind()))
        });
        let mut next = Vec::with_capacity(self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            let (y, k, v) = self.layer(l, x, &cos, &sin, bias.as_ref(), cache.layers.get(i), false);
            x = y;
            next.push((k, v));
        }
        cache.layers = next;
        cache.len = keys;
        rms_norm(&x, &self.norm, c.rms_norm_eps)
    }

    /// Continues `prompt` by up to `max_new_tokens` tokens with a KV cache, choosing each
    /// by `sampling`, and stops after any of `stop` (which is kept in the output).
    pub fn generate(&self, prompt: &[i64], max_new_tokens: usize, sampling: &Sampling, stop: &[i64], rng: &mut dyn rand::RngCore) -> Vec<i64> {
        tch::no_grad(|| {
            let device = self.embed.device();
            let mut cache = KvCache::default();
            let mut out = Vec::with_capacity(max_new_tokens);
            if prompt.is_empty() || max_new_tokens == 0 {
                return out;
            }
            let mut logits = self.step(&Tensor::from_slice(prompt).view([1, -1]).to_device(device), &mut cache);
            for _ in 0..max_new_tokens {
                let token = sampling.choose(&logits, rng);
                out.push(token);
                if stop.contains(&token) {
                    break;
                }
                logits = self.step(&Tensor::from_slice(&[token]).view([1, 1]).to_device(device), &mut cache);
            }
            out
        })
    }

    /// Greedy continuations of several prompts at once, as [`Llama::generate`] gives each
    /// alone (up to floating-point rounding, which can flip a near tie): the prompts are
    /// left-padded into one batch, each row's positions count from its own first token and
    /// padding is masked from attention; a row that reached a stop token (kept) waits for
    /// the others. An empty prompt gets an empty continuation.
    pub fn generate_greedy_batch(&self, prompts: &[Vec<i64>], max_new_tokens: usize, stop: &[i64]) -> Vec<Vec<i64>> {
        self.score_and_generate(prompts, &vec![Vec::new(); prompts.len()], max_new_tokens, stop).1
    }

    /// For each prompt: the summed next-token cross-entropy (nats, f64) of `responses[i]`
    /// following it (teacher-forced, as the training loss counts it), and its greedy
    /// continuation as [`Llama::generate_greedy_batch`] gives it; both from one prefill of
    /// the prompts. An empty prompt scores 0 and gets an empty continuation.
    pub fn score_and_generate(&self, prompts: &[Vec<i64>], responses: &[Vec<i64>], max_new_tokens: usize, stop: &[i64]) -> (Vec<f64>, Vec<Vec<i64>>) {
        let mut scores = vec![0.0; prompts.len()];
        let mut out = vec![Vec::new(); prompts.len()];
        let rows: Vec<usize> = (0..prompts.len()).filter(|&r| !prompts[r].is_empty()).collect();
        if rows.is_empty() {
            return (scores, out);
        }
        tch::no_grad(|| {
            let device = self.embed.device();
            let batch = rows.len() as i64;
            let width = rows.iter().map(|&r| prompts[r].len()).max().unwrap_or(0);
            let (mut ids, mut valid, mut positions) = (vec![0i64; rows.len() * width], vec![false; rows.len() * width], vec![0f32; rows.len() * width]);
            for (b, &r) in rows.iter().enumerate() {
                let offset = width - prompts[r].len();
                for (j, &t) in prompts[r].iter().enumerate() {
                    ids[b * width + offset + j] = t;
                    valid[b * width + offset + j] = true;
                    positions[b * width + offset + j] = j as f32;
                }
            }
            let shape = [batch, width as i64];
            let valid = Tensor::from_slice(&valid).view(shape).to_device(device);
            let mut cache = KvCache::default();
            let prefill = self.forward_cached(
                &Tensor::from_slice(&ids).view(shape).to_device(device),
                &Tensor::from_slice(&positions).view(shape).to_device(device),
                Some(&valid),
                &mut cache,
            );
            let first = self.project_last(&prefill);
            let response = |r: usize| responses.get(r).map_or(&[][..], Vec::as_slice);
            let longest = rows.iter().map(|&r| response(r).len()).max().unwrap_or(0);
            if longest > 0 {
                // The response after the prompt's cache: position j predicts token j + 1;
                // the prompt's last position predicted token 0. Right padding is masked
                // (and scored with IGNORE).
                let mut fed = KvCache { layers: cache.layers.iter().map(|(k, v)| (k.shallow_clone(), v.shallow_clone())).collect(), len: cache.len };
                let n = longest as i64;
                let (mut tok, mut real, mut pos, mut target) = (
                    vec![0i64; rows.len() * longest],
                    vec![false; rows.len() * longest],
                    vec![0f32; rows.len() * longest],
                    vec![super::sft::IGNORE; rows.len() * longest],
                );
                for (b, &r) in rows.iter().enumerate() {
                    for (j, &t) in response(r).iter().enumerate() {
                        tok[b * longest + j] = t;
                        real[b * longest + j] = true;
                        target[b * longest + j] = t;
                    }
                    for j in 0..longest {
                        pos[b * longest + j] = (prompts[r].len() + j) as f32;
                    }
                }
                let mut logits = first.unsqueeze(1);
                if n > 1 {
                    let shape = [batch, n];
                    let keys = Tensor::cat(&[&valid, &Tensor::from_slice(&real).view(shape).to_device(device)], 1).narrow(1, 0, width as i64 + n - 1);
                    let hidden = self.forward_cached(
                        &Tensor::from_slice(&tok).view(shape).to_device(device).narrow(1, 0, n - 1),
                        &Tensor::from_slice(&pos).view(shape).to_device(device).narrow(1, 0, n - 1),
                        Some(&keys),
                        &mut fed,
                    );
                    logits = Tensor::cat(&[logits, hidden.matmul(&self.lm_head.tr()).to_kind(Kind::Float)], 1);
                }
                let vocab = logits.size()[2];
                let per_token = logits.reshape([-1, vocab]).cross_entropy_loss::<Tensor>(
                    &Tensor::from_slice(&target).to_device(device),
                    None,
                    tch::Reduction::None,
                    super::sft::IGNORE,
                    0.0,
                );
                let per_row: Vec<f64> =
                    Vec::<f64>::try_from(per_token.view([batch, n]).to_kind(Kind::Double).sum_dim_intlist([1i64].as_slice(), false, Kind::Double))
                        .unwrap_or_default();
                for (b, &r) in rows.iter().enumerate() {
                    scores[r] = per_row.get(b).copied().unwrap_or(f64::NAN);
                }
            }
            if max_new_tokens == 0 {
                return;
            }
            let mut valid = valid;
            let mut logits = first;
            let mut done = vec![false; rows.len()];
            for step in 0..max_new_tokens {
                let next: Vec<i64> = Vec::<i64>::try_from(logits.argmax(-1, false)).unwrap_or_default();
                for (b, &r) in rows.iter().enumerate() {
                    if !done[b] {
                        let t = next.get(b).copied().unwrap_or_default();
                        out[r].push(t);
                        done[b] = stop.contains(&t);
                    }
                }
                if done.iter().all(|&d| d) || step + 1 == max_new_tokens {
                    break;
                }
                let pos: Vec<f32> = rows.iter().map(|&r| (prompts[r].len() + step) as f32).collect();
                valid = Tensor::cat(&[&valid, &Tensor::ones([batch, 1], (Kind::Bool, device))], 1);
                let hidden = self.forward_cached(
                    &Tensor::from_slice(&next).view([batch, 1]).to_device(device),
                    &Tensor::from_slice(&pos).view([batch, 1]).to_device(device),
                    Some(&valid),
                    &mut cache,
                );
                logits = self.project_last(&hidden);
            }
        });
        (scores, out)
    }

    /// Vocabulary logits `[batch, len, vocab]`.
    pub fn logits(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        self.hidden(ids, mask, train).matmul(&self.lm_head.tr())
    }

    /// The type of the base weights.
    pub fn dtype(&self) -> Kind {
        self.embed.kind()
    }

    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }
}

/// Keys and values of the positions fed so far, per layer (`[batch, kv_heads, len, head_dim]`).
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: i64,
}

impl KvCache {
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// How the next token is chosen from the logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token (ties: the lowest id, as `argmax`).
    Greedy,
    /// Sampled from softmax(logits / temperature), restricted to the smallest set of most
    /// likely tokens whose probability reaches `top_p` (nucleus sampling, as
    /// transformers' `TopPLogitsWarper`: the most likely token is always kept).
    Sample { temperature: f64, top_p: f64 },
}

impl Sampling {
    pub fn choose(&self, logits: &Tensor, rng: &mut dyn rand::RngCore) -> i64 {
        match *self {
            Sampling::Greedy => logits.argmax(-1, false).int64_value(&[]),
            Sampling::Sample { temperature, top_p } => {
                let probs = (logits.to_kind(Kind::Double) / temperature.max(1e-6)).softmax(-1, Kind::Double);
                let (sorted, order) = probs.sort(-1, true);
                let p: Vec<f64> = Vec::<f64>::try_from(&sorted).unwrap_or_default();
                let ids: Vec<i64> = Vec::<i64>::try_from(&order).unwrap_or_default();
                let mut keep = 0;
                let mut mass = 0.0;
                while keep < p.len() && (keep == 0 || mass < top_p) {
                    mass += p[keep];
                    keep += 1;
                }
                let u = rand::Rng::gen::<f64>(rng) * mass;
                let mut acc = 0.0;
                for i in 0..keep {
                    acc += p[i];
                    if u < acc {
                        return ids[i];
                    }
                }
                ids[keep.saturating_sub(1)]
            }
        }
    }
}

/// Classification by the label words' next-token logits after the prompt.
#[derive(Debug)]
pub struct LlamaClassifier {
    pub llama: Llama,
    /// The first token of each label word; `label_ids[c]` scores class `c`.
    pub label_ids: Tensor,
}

impl LlamaClassifier {
    pub fn new(llama: Llama, label_ids: &[i64]) -> LlamaClassifier {
        let device = llama.embed.device();
        LlamaClassifier { label_ids: Tensor::from_slice(label_ids).to_device(device), llama }
    }

    /// Class logits `[batch, labels]` at each row's last real token.
    pub fn logits(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let hidden = self.llama.hidden(ids, mask, train);
        let last = (mask.sum_dim_intlist([1i64].as_slice(), false, Kind::Int64) - 1).clamp_min(0);
        let batch = ids.size()[0];
        let idx = last.view([batch, 1, 1]).expand([batch, 1, hidden.size()[2]], false);
        let h = hidden.gather(1, &idx, false).squeeze_dim(1);
        let heads = self.llama.lm_head.index_select(0, &self.label_ids);
        h.matmul(&heads.tr())
    }
}
