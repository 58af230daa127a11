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

/// The device training runs on: the first CUDA GPU when libtorch sees one, else the CPU.
pub fn device() -> tch::Device {
    tch::Device::cuda_if_available()
}

impl trainer::Classify for llama::LlamaClassifier {
    fn logits(&self, batch: &data::Batch, train: bool) -> tch::Tensor {
        llama::LlamaClassifier::logits(self, &batch.ids, &batch.mask, train)
    }
}

impl trainer::Classify for bert::BertClassifier {
    fn logits(&self, batch: &data::Batch, train: bool) -> tch::Tensor {
        bert::BertClassifier::logits(self, &batch.ids, &batch.mask, train)
    }
}
