//! Labelled text examples (JSON lines: `{"text": …, "label": …, "group": …}`, as written
//! by `scripts/setup`) and their tokenization into padded batches.

use std::path::Path;

use rand::seq::SliceRandom;
use rand::Rng;
use serde::Deserialize;
use tch::{Device, Kind, Tensor};
use tokenizers::{Tokenizer, TruncationParams};

use super::weights::ModelError;

#[derive(Clone, Debug, Deserialize)]
pub struct Example {
    pub text: String,
    /// Class index.
    pub label: i64,
    /// The natural partition key (a drug review's condition, a news topic).
    #[serde(default)]
    pub group: String,
}

/// Reads a JSON-lines file of examples; a bad line is an error naming its number.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>, ModelError> {
    read_json_lines(path, |l| serde_json::from_str(l).map_err(|e| e.to_string()))
}

/// Every non-blank line of `path` through `parse`; a bad line is an error naming its number.
pub fn read_json_lines<T>(path: &Path, parse: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Read { path: path.into(), reason: e.to_string() })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| parse(l).map_err(|e| ModelError::Config { path: path.into(), reason: format!("line {}: {e}", i + 1) }))
        .collect()
}

/// A tokenizer with truncation to `max_len` and no padding of its own (we pad per batch).
/// With a prompt (for decoders), each text becomes `prefix + text + suffix`, the text
/// truncated so that the suffix (which the label follows) is always kept.
#[derive(Debug)]
pub struct TextEncoder {
    tokenizer: Tokenizer,
    pad_id: i64,
    max_len: usize,
    prompt: Option<(String, Vec<i64>)>,
}

#[derive(Debug)]
pub struct Encoded {
    pub ids: Vec<i64>,
    pub label: i64,
}

#[derive(Debug)]
pub struct Batch {
    pub ids: Tensor,
    pub mask: Tensor,
    pub labels: Tensor,
    /// Real (unpadded) tokens in the batch.
    pub tokens: i64,
}

impl TextEncoder {
    pub fn load(path: &Path, max_len: usize) -> Result<TextEncoder, ModelError> {
        let mut tokenizer = Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        tokenizer.with_padding(None);
        tokenizer.with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() })).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let pad_id = ["[PAD]", "<pad>", "<|endoftext|>"].iter().find_map(|t| tokenizer.token_to_id(t)).unwrap_or(0) as i64;
        Ok(TextEncoder { tokenizer, pad_id, max_len, prompt: None })
    }

    /// Decoder prompts: `prefix` before each text and `suffix` after it.
    pub fn with_prompt(mut self, prefix: &str, suffix: &str) -> Result<TextEncoder, ModelError> {
        self.tokenizer.with_truncation(None).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let suffix_ids = self.raw(suffix)?;
        if suffix_ids.len() + 8 > self.max_len {
            return Err(ModelError::Tokenizer(format!("max_len {} leaves no room for text around the prompt", self.max_len)));
        }
        self.prompt = Some((prefix.to_string(), suffix_ids));
        Ok(self)
    }

    /// Token ids of `text` without special tokens or truncation.
    pub fn raw(&self, text: &str) -> Result<Vec<i64>, ModelError> {
        let enc = self.tokenizer.encode(text, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    pub fn encode(&self, text: &str) -> Result<Vec<i64>, ModelError> {
        if let Some((prefix, suffix)) = &self.prompt {
            let mut ids = self.raw(&format!("{prefix}{text}"))?;
            ids.truncate(self.max_len - suffix.len());
            ids.extend_from_slice(suffix);
            return Ok(ids);
        }
        let enc = self.tokenizer.encode(text, true).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    pub fn encode_all(&self, examples: &[Example]) -> Result<Vec<Encoded>, ModelError> {
        examples.iter().map(|e| Ok(Encoded { ids: self.encode(&e.text)?, label: e.label })).collect()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Right-padded batch of `items` on `device`.
    pub fn batch(&self, items: &[&Encoded], device: Device) -> Batch {
        let width = items.iter().map(|e| e.ids.len()).max().unwrap_or(1).max(1);
        let mut ids = vec![self.pad_id; items.len() * width];
        let mut mask = vec![0i64; items.len() * width];
        for (row, e) in items.iter().enumerate() {
            ids[row * width..row * width + e.ids.len()].copy_from_slice(&e.ids);
            mask[row * width..row * width + e.ids.len()].fill(1);
        }
        let shape = [items.len() as i64, width as i64];
        let labels: Vec<i64> = items.iter().map(|e| e.label).collect();
        Batch {
            ids: Tensor::from_slice(&ids).view(shape).to_device(device),
            mask: Tensor::from_slice(&mask).view(shape).to_device(device),
            labels: Tensor::from_slice(&labels).to_kind(Kind::Int64).to_device(device),
            tokens: items.iter().map(|e| e.ids.len() as i64).sum(),
        }
    }
}

/// Indices of `n` items in a fresh random order.
pub fn shuffled<R: Rng + ?Sized>(n: usize, rng: &mut R) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(rng);
    v
}
