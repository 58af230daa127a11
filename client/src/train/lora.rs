//! LoRA adapters as in Hugging Face PEFT: `y = W x + b + (alpha / r) · B A dropout(x)`,
//! with the base weights frozen. Adapters are saved and loaded as PEFT's
//! `adapter_model.safetensors` + `adapter_config.json`, with PEFT's tensor names
//! (`base_model.model.<module>.lora_A.weight`, and `base_model.model.<module>.weight` for
//! `modules_to_save` such as a classification head), so an adapter trained with Python
//! PEFT can be submitted, and an aggregated one loads in PEFT.
//!
//! Initial values do not come from libtorch's generator: every tensor is drawn from a
//! ChaCha stream keyed by (seed, tensor name), so all institutions start a federation
//! from bit-identical adapters on any device. That is what FFA-LoRA needs (A frozen at a
//! shared initialisation) and what keeps plain FedAvg of A and B meaningful.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use super::weights::ModelError;

/// Which adapter tensors are trained and aggregated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LoraMode {
    /// FFA-LoRA (Sun et al., ICLR 2024): A stays at its seeded shared initialisation and
    /// only B is trained and aggregated, so the mean of the B·A products is exact, and
    /// half the LoRA bytes are sent.
    Ffa,
    /// Both factors trained; the aggregate averages A and B separately (not the mean of
    /// the products B·A).
    Both,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    /// Last components of the module paths that get adapters (PEFT's `target_modules`).
    pub target_modules: Vec<String>,
    pub mode: LoraMode,
    /// Seed of the shared initialisation.
    pub seed: u64,
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// The configuration of a PEFT adapter folder (`adapter_config.json`), so an adapter
    /// trained with Python PEFT loads with the same meaning. Variants this trainer does
    /// not implement (rsLoRA, DoRA, fan-in-fan-out weights, trained biases) are refused.
    pub fn from_peft(dir: &Path) -> Result<LoraConfig, ModelError> {
        #[derive(Deserialize)]
        struct Peft {
            peft_type: String,
            r: i64,
            lora_alpha: f64,
            #[serde(default)]
            lora_dropout: f64,
            target_modules: serde_json::Value,
            #[serde(default)]
            use_rslora: bool,
            #[serde(default)]
            use_dora: bool,
            #[serde(default)]
            fan_in_fan_out: bool,
            #[serde(default)]
            bias: Option<String>,
            #[serde(default)]
            tessera: Option<Tessera>,
        }
        #[derive(Deserialize)]
        struct Tessera {
            mode: LoraMode,
            seed: u64,
        }
        let path = dir.join("adapter_config.json");
        let p: Peft = super::weights::read_json(&path)?;
        let bad = |reason: String| ModelError::Config { path: path.clone(), reason };
        if p.peft_type != "LORA" {
            return Err(bad(format!("peft_type {} is not LORA", p.peft_type)));
        }
        if p.use_rslora || p.use_dora || p.fan_in_fan_out || p.bias.as_deref().is_some_and(|b| b != "none") {
            return Err(bad("rsLoRA, DoRA, fan_in_fan_out and trained biases are not supported".into()));
        }
        let target_modules = match p.target_modules {
            serde_json::Value::String(s) => return Err(bad(format!("target_modules as a regular expression ({s}) is not supported; list the modules"))),
            serde_json::Value::Array(v) => v
                .into_iter()
                .map(|m| m.as_str().map(str::to_owned).ok_or_else(|| bad("target_modules must be strings".into())))
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err(bad("target_modules must be a list".into())),
        };
        let (mode, seed) = p.tessera.map(|t| (t.mode, t.seed)).unwrap_or((LoraMode::Both, 0));
        let cfg = LoraConfig { r: p.r, alpha: p.lora_alpha, dropout: p.lora_dropout, target_modules, mode, seed };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        if self.r < 1 || self.r > 1024 {
            return Err(ModelError::Adapter(format!("rank must be in 1..=1024, got {}", self.r)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelError::Adapter(format!("dropout must be in [0, 1), got {}", self.dropout)));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(ModelError::Adapter(format!("alpha must be positive, got {}", self.alpha)));
        }
        if self.target_modules.is_empty() {
            return Err(ModelError::Adapter("no target modules".into()));
        }
        Ok(())
    }
}

/// Where per-example copies of one trainable tensor are put while DP-SGD computes
/// per-example gradients (see [`Adapter::per_example`]); empty otherwise.
#[derive(Clone, Debug, Default)]
struct PerExample(Arc<Mutex<Option<Tensor>>>);

impl PerExample {
    fn get(&self) -> Option<Tensor> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(Tensor::shallow_clone)
    }
    fn set(&self, t: Option<Tensor>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }
}

/// A linear layer of the base model, with its LoRA pair when it is a target.
#[derive(Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraPair>,
    /// Set for modules trained whole (a head).
    per_weight: Option<PerExample>,
    per_bias: Option<PerExample>,
}

#[derive(Debug)]
struct LoraPair {
    a: Tensor,
    b: Tensor,
    scaling: f64,
    dropout: f64,
    /// Set when A is trained (not under FFA-LoRA).
    per_a: Option<PerExample>,
    per_b: Option<PerExample>,
}

/// `x W_iᵀ` for each example i of the batch: `x` is `[batch, …, in]`, `w` `[batch, out, in]`.
fn per_example_linear(x: &Tensor, w: &Tensor) -> Tensor {
    let size = x.size();
    let (batch, inner) = (size[0], size[size.len() - 1]);
    let mut out = size.clone();
    out[size.len() - 1] = w.size()[1];
    x.reshape([batch, -1, inner]).matmul(&w.transpose(1, 2)).reshape(out)
}

/// A per-example bias `[batch, out]` shaped to broadcast over `[batch, …, out]`.
fn per_example_bias(b: &Tensor, dims: usize) -> Tensor {
    let mut shape = vec![1i64; dims];
    let s = b.size();
    shape[0] = s[0];
    shape[dims - 1] = s[1];
    b.reshape(shape)
}

fn get(slot: &Option<PerExample>) -> Option<Tensor> {
    slot.as_ref().and_then(PerExample::get)
}

impl Linear {
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = match get(&self.per_weight) {
            None => match get(&self.per_bias) {
                None => x.linear(&self.weight, self.bias.as_ref()),
                Some(b) => x.linear::<Tensor>(&self.weight, None) + per_example_bias(&b, x.dim()),
            },
            Some(w) => {
                let y = per_example_linear(x, &w);
                match (get(&self.per_bias), &self.bias) {
                    (Some(b), _) => y + per_example_bias(&b, x.dim()),
                    (None, Some(b)) => y + b,
                    (None, None) => y,
                }
            }
        };
        match &self.lora {
            None => y,
            Some(l) => {
                // The LoRA factors stay in f32 under half-precision base weights, as PEFT
                // keeps them: the input is cast to the factors' type and the product back.
                let x = if x.kind() == l.b.kind() { x.shallow_clone() } else { x.to_kind(l.b.kind()) };
                let x = if train && l.dropout > 0.0 { x.dropout(l.dropout, true) } else { x };
                let h = match get(&l.per_a) {
                    Some(a) => per_example_linear(&x, &a),
                    None => x.linear::<Tensor>(&l.a, None),
                };
                let h = match get(&l.per_b) {
                    Some(b) => per_example_linear(&h, &b),
                    None => h.linear::<Tensor>(&l.b, None),
                };
                let (h, kind) = (h * l.scaling, y.kind());
                if h.kind() == kind {
                    y + h
                } else {
                    y + h.to_kind(kind)
                }
            }
        }
    }
}

/// While alive, the forward pass uses per-example copies of every trainable tensor, so
/// one backward pass of a summed loss leaves example i's gradient in row i of each
/// copy's `grad()` (the "expanded weights" of Opacus' `grad_sample_mode="ew"`). Dropping
/// it restores the shared tensors.
#[derive(Debug)]
pub struct PerExampleGrads<'a> {
    adapter: &'a Adapter,
    /// `[batch, …shape]` leaf tensors, in update order.
    pub copies: Vec<Tensor>,
}

impl Drop for PerExampleGrads<'_> {
    fn drop(&mut self) {
        for slot in self.adapter.per_example.values() {
            slot.set(None);
        }
    }
}

/// The trainable state: LoRA factors and the modules saved whole (a task head), in a
/// VarStore whose variable names are the PEFT names without the `base_model.model.` prefix.
#[derive(Debug)]
pub struct Adapter {
    pub config: LoraConfig,
    vs: nn::VarStore,
    /// Names of the modules trained whole (PEFT `modules_to_save`).
    modules_to_save: Vec<String>,
    /// PEFT task type written to the config (`SEQ_CLS`, `CAUSAL_LM`).
    task_type: String,
    kind: Kind,
    /// The per-example slot of every trainable tensor, by name (sorted as update order).
    per_example: BTreeMap<String, PerExample>,
}

pub const PEFT_PREFIX: &str = "base_model.model.";

impl Adapter {
    pub fn new(config: LoraConfig, task_type: &str, device: Device, kind: Kind) -> Result<Adapter, ModelError> {
        config.validate()?;
        Ok(Adapter { config, vs: nn::VarStore::new(device), modules_to_save: Vec::new(), task_type: task_type.into(), kind, per_example: BTreeMap::new() })
    }

    /// Wraps a frozen base linear layer; adds a LoRA pair when `module` is a target.
    pub fn linear(&mut self, module: &str, weight: Tensor, bias: Option<Tensor>) -> Linear {
        let last = module.rsplit('.').next().unwrap_or(module);
        if !self.config.target_modules.iter().any(|t| t == last) {
            return Linear { weight, bias, lora: None, per_weight: None, per_bias: None };
        }
        let (out_f, in_f) = match weight.size()[..] {
            [o, i] => (o, i),
            _ => (0, 0),
        };
        let r = self.config.r;
        // PEFT: A ~ kaiming_uniform(a=√5) = U(±1/√in), B = 0.
        let a = self.seeded_uniform(&format!("{module}.lora_A.weight"), &[r, in_f], 1.0 / (in_f as f64).sqrt());
        let (a, per_a) = self.add(&format!("{module}.lora_A.weight"), &a, self.config.mode == LoraMode::Both);
        let (b, per_b) = self.add(&format!("{module}.lora_B.weight"), &Tensor::zeros([out_f, r], (self.kind, self.vs.device())), true);
        let lora = LoraPair { a, b, scaling: self.config.scaling(), dropout: self.config.dropout, per_a, per_b };
        Linear { weight, bias, lora: Some(lora), per_weight: None, per_bias: None }
    }

    /// A new linear module trained whole (a task head): weight U(±1/√in), bias 0.
    pub fn head(&mut self, module: &str, in_f: i64, out_f: i64) -> Linear {
        self.modules_to_save.push(module.into());
        let w = self.seeded_uniform(&format!("{module}.weight"), &[out_f, in_f], 1.0 / (in_f as f64).sqrt());
        let (weight, per_weight) = self.add(&format!("{module}.weight"), &w, true);
        let (bias, per_bias) = self.add(&format!("{module}.bias"), &Tensor::zeros([out_f], (self.kind, self.vs.device())), true);
        Linear { weight, bias: Some(bias), lora: None, per_weight, per_bias }
    }

    fn seeded_uniform(&self, name: &str, shape: &[i64], bound: f64) -> Tensor {
        let key: [u8; 32] =
            Sha256::new().chain_update(b"tessera lora init v1").chain_update(self.config.seed.to_le_bytes()).chain_update(name.as_bytes()).finalize().into();
        let mut rng = ChaCha20Rng::from_seed(key);
        let n: i64 = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-bound..bound) as f32).collect();
        Tensor::from_slice(&v).reshape(shape).to_kind(self.kind).to_device(self.vs.device())
    }

    fn add(&mut self, name: &str, value: &Tensor, trainable: bool) -> (Tensor, Option<PerExample>) {
        let mut path = self.vs.root();
        let parts: Vec<&str> = name.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            path = path.sub(*p);
        }
        let last = parts[parts.len() - 1];
        let t = if trainable { path.zeros(last, &value.size()) } else { path.zeros_no_train(last, &value.size()) };
        tch::no_grad(|| t.shallow_clone().copy_(value));
        let slot = trainable.then(|| self.per_example.entry(name.to_string()).or_default().clone());
        (t, slot)
    }

    /// Puts `batch` per-example copies of every trainable tensor into the forward pass
    /// until the returned guard is dropped.
    pub fn per_example(&self, batch: i64) -> PerExampleGrads<'_> {
        let all = self.tensors();
        let copies = self
            .per_example
            .iter()
            .map(|(name, slot)| {
                let t = &all[name];
                let mut shape = vec![batch];
                shape.extend(t.size());
                let copy = t.detach().unsqueeze(0).expand(shape.as_slice(), false).contiguous().set_requires_grad(true);
                slot.set(Some(copy.shallow_clone()));
                copy
            })
            .collect();
        PerExampleGrads { adapter: self, copies }
    }

    /// Every adapter tensor by its name (without the PEFT prefix), sorted.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.vs.variables().into_iter().collect()
    }

    /// Names of the tensors that are trained, and therefore sent and aggregated: LoRA B
    /// (and A unless FFA) plus the heads. Sorted, so every institution agrees on the order.
    pub fn update_names(&self) -> Vec<String> {
        let trainable: Vec<Tensor> = self.vs.trainable_variables();
        let mut names: Vec<String> =
            self.vs.variables().into_iter().filter(|(_, t)| trainable.iter().any(|x| x.data_ptr() == t.data_ptr())).map(|(n, _)| n).collect();
        names.sort();
        names
    }

    /// (name, shape) of the update tensors, in order: the round layout.
    pub fn update_layout(&self) -> Vec<(String, Vec<i64>)> {
        let all = self.tensors();
        self.update_names().into_iter().map(|n| (n.clone(), all[&n].size())).collect()
    }

    /// The update tensors flattened into one f32 vector, in [`update_names`] order.
    pub fn flatten_update(&self) -> Result<Vec<f32>, ModelError> {
        let all = self.tensors();
        let parts: Vec<Tensor> = self.update_names().iter().map(|n| all[n].detach().to_kind(Kind::Float).to_device(Device::Cpu).flatten(0, -1)).collect();
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        Ok(Vec::<f32>::try_from(Tensor::cat(&parts, 0))?)
    }

    /// Adds a flat vector (in [`update_names`] order) to the update tensors.
    pub fn add_flat(&self, delta: &[f32]) -> Result<(), ModelError> {
        let all = self.tensors();
        let mut offset = 0usize;
        for n in self.update_names() {
            let t = &all[&n];
            let len = t.numel();
            let chunk =
                delta.get(offset..offset + len).ok_or_else(|| ModelError::Adapter(format!("update has {} values, the adapter needs more", delta.len())))?;
            let d = Tensor::from_slice(chunk).reshape(t.size()).to_kind(t.kind()).to_device(t.device());
            tch::no_grad(|| {
                let _ = t.shallow_clone().g_add_(&d);
            });
            offset += len;
        }
        if offset != delta.len() {
            return Err(ModelError::Adapter(format!("update has {} values, the adapter has {offset}", delta.len())));
        }
        Ok(())
    }

    pub fn optimizer(&self, lr: f64, weight_decay: f64) -> Result<nn::Optimizer, ModelError> {
        Ok(nn::AdamW { beta1: 0.9, beta2: 0.999, wd: weight_decay, eps: 1e-8, amsgrad: false }.build(&self.vs, lr)?)
    }

    pub fn trainable(&self) -> Vec<Tensor> {
        self.vs.trainable_variables()
    }

    /// The update tensors themselves (not copies), in [`update_names`] order.
    pub fn trainable_in_update_order(&self) -> Vec<Tensor> {
        let all = self.tensors();
        self.update_names().iter().map(|n| all[n].shallow_clone()).collect()
    }

    /// Writes `adapter_model.safetensors` and `adapter_config.json` (PEFT's format) into `dir`.
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::Read { path: dir.into(), reason: e.to_string() })?;
        let named: Vec<(String, Tensor)> =
            self.tensors().into_iter().map(|(n, t)| (format!("{PEFT_PREFIX}{n}"), t.detach().to_device(Device::Cpu).contiguous())).collect();
        let file = dir.join("adapter_model.safetensors");
        Tensor::write_safetensors(&named, &file)?;
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": base_model,
            "r": self.config.r,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": self.config.target_modules,
            "modules_to_save": if self.modules_to_save.is_empty() { serde_json::Value::Null } else { serde_json::json!(self.modules_to_save) },
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "tessera": { "mode": self.config.mode, "seed": self.config.seed },
        });
        let text = serde_json::to_string_pretty(&config).map_err(|e| ModelError::Adapter(e.to_string()))?;
        std::fs::write(dir.join("adapter_config.json"), text).map_err(|e| ModelError::Read { path: dir.into(), reason: e.to_string() })
    }

    /// Loads the values of a PEFT adapter into this adapter. Every tensor must be present
    /// with its shape, and the file must hold no tensor this model does not have.
    pub fn load_peft(&self, dir: &Path) -> Result<(), ModelError> {
        let file = dir.join("adapter_model.safetensors");
        let bytes = std::fs::read(&file).map_err(|e| ModelError::Read { path: file.clone(), reason: e.to_string() })?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Read { path: file.clone(), reason: e.to_string() })?;
        let ours = self.tensors();
        for name in st.names() {
            let short = name.strip_prefix(PEFT_PREFIX).unwrap_or(name);
            // PEFT files written with an adapter name keep it in the path.
            let short = short.replace(".default.", ".");
            if !ours.contains_key(&short) {
                return Err(ModelError::Adapter(format!("{}: tensor `{name}` does not belong to this model's adapter", file.display())));
            }
        }
        for (name, t) in &ours {
            let view = st
                .tensor(&format!("{PEFT_PREFIX}{name}"))
                .or_else(|_| st.tensor(name))
                .map_err(|_| ModelError::Adapter(format!("{}: missing `{PEFT_PREFIX}{name}`", file.display())))?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if shape != t.size() {
                return Err(ModelError::Shape { name: name.clone(), expected: t.size(), found: shape });
            }
            let kind = match view.dtype() {
                safetensors::Dtype::F32 => Kind::Float,
                safetensors::Dtype::F16 => Kind::Half,
                safetensors::Dtype::BF16 => Kind::BFloat16,
                d => return Err(ModelError::Adapter(format!("{name}: unsupported dtype {d:?}"))),
            };
            let src = Tensor::f_from_data_size(view.data(), &shape, kind)?;
            tch::no_grad(|| t.shallow_clone().copy_(&src));
        }
        Ok(())
    }

    /// Copies of the update tensors (for deltas and FedProx).
    pub fn snapshot(&self) -> Vec<Tensor> {
        let all = self.tensors();
        self.update_names().iter().map(|n| all[n].detach().copy()).collect()
    }

    /// Sets the update tensors back to `snapshot`.
    pub fn restore(&self, snapshot: &[Tensor]) {
        let all = self.tensors();
        for (n, s) in self.update_names().iter().zip(snapshot) {
            tch::no_grad(|| all[n].shallow_clone().copy_(s));
        }
    }
}
