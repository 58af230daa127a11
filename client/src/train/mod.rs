//! Local LoRA fine-tuning with libtorch (through `tch`): model code loaded from
//! safetensors checkpoints, PEFT-compatible adapters, the training loop, and the update
//! pipeline (delta, clip, DP noise share) that feeds secure aggregation.

pub mod bert;
pub mod data;
pub mod dpsgd;
pub mod federated;
pub mod llama;
pub mod lora;
pub mod privacy;
pub mod server_opt;
pub mod sft;
pub mod trainer;
pub mod weights;

pub use lora::{Adapter, LoraConfig, LoraMode};
pub use weights::ModelError;

/// Where `scripts/setup` puts models and datasets: `$TESSERA_DATA`, else `.tessera-data`
/// at the top of the repository (found from the current directory upwards).
pub fn data_root() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("TESSERA_DATA") {
        return d.into();
    }
    let mut dir = std::env::current_dir().unwrap_or_default();
    loop {
        if dir.join(".tessera-data").is_dir() {
            return dir.join(".tessera-data");
        }
        if !dir.pop() {
            return ".tessera-data".into();
        }
    }
}

/// The type the base model's weights are held and computed in; LoRA factors, their
/// gradients and the optimizer state stay in f32 whatever it is (as PEFT keeps them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub fn kind(self) -> tch::Kind {
        match self {
            Dtype::F32 => tch::Kind::Float,
            Dtype::Bf16 => tch::Kind::BFloat16,
            Dtype::F16 => tch::Kind::Half,
        }
    }

    /// bf16 on a CUDA device, f32 on the CPU: libtorch's CPU kernels compute bf16 and f16
    /// matrix products at f32 speed or below on most CPUs (see BENCHMARKS.md), so half
    /// precision there only halves the memory of the base weights.
    pub fn default_for(device: tch::Device) -> Dtype {
        if device.is_cuda() {
            Dtype::Bf16
        } else {
            Dtype::F32
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        })
    }
}

/// The device training runs on: the first CUDA GPU when libtorch sees one, else the CPU.
pub fn device() -> tch::Device {
    tch::Device::cuda_if_available()
}

impl trainer::Classify for llama::LlamaClassifier {
    fn logits(&self, batch: &data::Batch, train: bool) -> tch::Tensor {
        llama::LlamaClassifier::logits(self, &batch.ids, &batch.mask, train)
    }
    fn weight_kind(&self) -> tch::Kind {
        self.llama.dtype()
    }
}

impl trainer::Classify for bert::BertClassifier {
    fn logits(&self, batch: &data::Batch, train: bool) -> tch::Tensor {
        bert::BertClassifier::logits(self, &batch.ids, &batch.mask, train)
    }
}
