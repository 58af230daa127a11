//! Frozen base weights read from a safetensors checkpoint, with shape checks that turn a
//! wrong or truncated file into a typed error before libtorch sees it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("checkpoint lacks tensor `{0}` (is it a checkpoint of this architecture?)")]
    Missing(String),
    #[error("tensor `{name}` has shape {found:?}, the config implies {expected:?}")]
    Shape { name: String, expected: Vec<i64>, found: Vec<i64> },
    #[error("adapter: {0}")]
    Adapter(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Named tensors, never trained (`requires_grad` is off).
#[derive(Debug)]
pub struct Weights {
    map: HashMap<String, Tensor>,
    path: PathBuf,
}

impl Weights {
    /// Reads every `*.safetensors` file of `dir` (sharded checkpoints included), converts
    /// floating tensors to `kind` and moves them to `device`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Weights, ModelError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ModelError::Read { path: dir.into(), reason: e.to_string() })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ModelError::Read { path: dir.into(), reason: "no *.safetensors file in the model folder".into() });
        }
        let mut map = HashMap::new();
        for file in &files {
            // Parse the header with the safetensors crate first: libtorch's reader
            // aborts on some malformed files instead of returning an error.
            let bytes = std::fs::read(file).map_err(|e| ModelError::Read { path: file.clone(), reason: e.to_string() })?;
            safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Read { path: file.clone(), reason: e.to_string() })?;
            drop(bytes);
            for (name, t) in Tensor::read_safetensors(file).map_err(|e| ModelError::Read { path: file.clone(), reason: e.to_string() })? {
                let t = if t.is_floating_point() { t.to_kind(kind) } else { t };
                map.insert(name, t.to_device(device).set_requires_grad(false));
            }
        }
        Ok(Weights { map, path: dir.into() })
    }

    pub fn from_map(map: HashMap<String, Tensor>) -> Weights {
        Weights { map, path: PathBuf::new() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor `name` (also tried under each of `prefixes`), which must have `shape`.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor, ModelError> {
        let t = self.map.get(name).ok_or_else(|| ModelError::Missing(name.to_string()))?;
        if t.size() != shape {
            return Err(ModelError::Shape { name: name.into(), expected: shape.to_vec(), found: t.size() });
        }
        Ok(t.shallow_clone())
    }

    /// Like [`get`](Self::get), trying `name` under each prefix in turn (checkpoints of
    /// the bare model and of a task model name the same tensor differently).
    pub fn get_any(&self, prefixes: &[&str], name: &str, shape: &[i64]) -> Result<Tensor, ModelError> {
        for p in prefixes {
            let full = format!("{p}{name}");
            if self.map.contains_key(&full) {
                return self.get(&full, shape);
            }
        }
        Err(ModelError::Missing(name.to_string()))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }
}

/// Reads and parses a JSON config file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Read { path: path.into(), reason: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config { path: path.into(), reason: e.to_string() })
}
