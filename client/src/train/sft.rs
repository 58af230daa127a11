//! Supervised instruction fine-tuning (SFT) data, as Hugging Face TRL users have it:
//! JSON lines of `{"prompt", "response"}` or of chat `{"messages": [{"role", "content"}, …]}`
//! (the last message, the assistant's, is the response). Chat records are rendered with
//! the model's own chat template (`chat_template` of `tokenizer_config.json`, or
//! `chat_template.jinja`), through minijinja with the settings transformers uses
//! (`trim_blocks`, `lstrip_blocks`, Python string methods).
//!
//! The loss is on the response tokens only: the prompt's labels are -100, as TRL's
//! completion-only loss does, and the causal-LM loss is the mean next-token cross-entropy
//! over the response tokens of the batch (transformers' `ForCausalLMLoss`). Batches are
//! grouped by length (transformers' `LengthGroupedSampler`), so little compute goes to
//! padding.

use std::path::Path;

use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

use super::weights::ModelError;

/// The label of positions that carry no loss (prompt and padding).
pub const IGNORE: i64 = -100;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What the model is given: plain text, or a conversation the chat template renders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    Chat(Vec<Message>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SftExample {
    pub prompt: Prompt,
    pub response: String,
    /// The natural partition key, as in the classification data.
    pub group: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    PromptResponse {
        prompt: String,
        response: String,
        #[serde(default)]
        group: String,
    },
    Chat {
        messages: Vec<Message>,
        #[serde(default)]
        group: String,
    },
}

impl SftExample {
    /// One JSON line in either shape; a conversation must end with the assistant's turn.
    pub fn parse(line: &str) -> Result<SftExample, String> {
        let raw: Raw = serde_json::from_str(line).map_err(|_| {
            "expected {\"prompt\": …, \"response\": …} or {\"messages\": [{\"role\": …, \"content\": …}, …]} (and optionally \"group\")".to_string()
        })?;
        match raw {
            Raw::PromptResponse { prompt, response, group } => Ok(SftExample { prompt: Prompt::Text(prompt), response, group }),
            Raw::Chat { mut messages, group } => {
                let last = messages.pop().ok_or("\"messages\" is empty")?;
                if last.role != "assistant" {
                    return Err(format!("the last message is the {}'s; the response must be the assistant's turn", last.role));
                }
                if messages.is_empty() {
                    return Err("a conversation needs at least one message before the assistant's response".into());
                }
                Ok(SftExample { prompt: Prompt::Chat(messages), response: last.content, group })
            }
        }
    }
}

/// Reads JSON lines of SFT records; a bad line is an error naming its number.
pub fn read_sft_jsonl(path: &Path) -> Result<Vec<SftExample>, ModelError> {
    super::data::read_json_lines(path, SftExample::parse)
}

/// A model's chat template, compiled once, with the special tokens it refers to.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// The name the template is compiled under in its environment.
const TEMPLATE: &str = "chat";

fn template_error(e: minijinja::Error) -> ModelError {
    ModelError::Tokenizer(format!("chat template: {e}"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// `bos_token` / `eos_token` are a string or an AddedToken object.
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// Compiles `source` with the settings transformers uses; a template that does not
    /// compile is refused here, not at the first record.
    pub fn new(source: impl Into<String>, bos_token: impl Into<String>, eos_token: impl Into<String>) -> Result<ChatTemplate, ModelError> {
        let mut env = minijinja::Environment::new();
        env.set_syntax(minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build().map_err(template_error)?);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(TEMPLATE, source.into()).map_err(template_error)?;
        Ok(ChatTemplate { env, bos_token: bos_token.into(), eos_token: eos_token.into() })
    }

    /// The template of the model in `dir`: `chat_template.jinja` if present, else
    /// `chat_template` in `tokenizer_config.json` (a string, or the one named `default`).
    /// `None` when the model has none.
    pub fn load(dir: &Path) -> Result<Option<ChatTemplate>, ModelError> {
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = if config_path.exists() { super::weights::read_json(&config_path)? } else { serde_json::Value::Null };
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.exists() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::Read { path: jinja.clone(), reason: e.to_string() })?)
        } else {
            match config.get("chat_template").cloned().map(serde_json::from_value::<TemplateField>) {
                None => None,
                Some(Ok(TemplateField::One(s))) => Some(s),
                Some(Ok(TemplateField::Named(list))) => Some(list.into_iter().find(|t| t.name == "default").map(|t| t.template).ok_or_else(|| {
                    ModelError::Config { path: config_path.clone(), reason: "chat_template lists templates but none named `default`".into() }
                })?),
                Some(Err(e)) => return Err(ModelError::Config { path: config_path, reason: format!("chat_template: {e}") }),
            }
        };
        source.map(|s| ChatTemplate::new(s, token_text(config.get("bos_token")), token_text(config.get("eos_token")))).transpose()
    }

    /// The conversation as text, with the assistant's turn opened after it when
    /// `add_generation_prompt` (what the model is asked to continue).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, ModelError> {
        self.env
            .get_template(TEMPLATE)
            .map_err(template_error)?
            .render(minijinja::context! {
                messages => minijinja::value::Serde(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(template_error)
    }
}

/// What [`SftEncoder::continue_prompt`] generated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Continuation {
    /// The new tokens decoded, without special tokens and without the stop token.
    pub text: String,
    pub prompt_tokens: usize,
    /// New tokens, the stop token included.
    pub generated: usize,
    /// Ended by a stop token rather than by the token limit.
    pub stopped: bool,
}

/// Token ids of a prompt and response, with the labels of the loss.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SftEncoded {
    pub ids: Vec<i64>,
    /// `IGNORE` on the prompt, the token itself on the response.
    pub labels: Vec<i64>,
}

impl SftEncoded {
    pub fn response_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }
}

/// Turns SFT records into token ids and labels, at most `max_len` tokens each.
#[derive(Debug)]
pub struct SftEncoder {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    /// config.json's `eos_token_id` (a number or a list); the first closes plain responses.
    eos_ids: Vec<i64>,
    pad_id: i64,
    max_len: usize,
}

impl SftEncoder {
    /// The tokenizer, chat template and end-of-sequence token of the model in `dir`.
    pub fn load(dir: &Path, max_len: usize) -> Result<SftEncoder, ModelError> {
        let path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let template = ChatTemplate::load(dir)?;
        let config: serde_json::Value = super::weights::read_json(&dir.join("config.json")).unwrap_or(serde_json::Value::Null);
        let ids_of = |key: &str| -> Vec<i64> {
            match config.get(key) {
                Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
                Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_i64()).collect(),
                _ => Vec::new(),
            }
        };
        let eos_ids = ids_of("eos_token_id");
        let pad_id = ids_of("pad_token_id").first().or(eos_ids.first()).copied().unwrap_or(0);
        Ok(SftEncoder { tokenizer, template, eos_ids, pad_id, max_len })
    }

    /// Where generation stops: the configured end-of-sequence tokens and the end of a chat
    /// turn (`<|im_end|>`, `<|eot_id|>`, `<|end_of_text|>`) where the vocabulary has them.
    pub fn stop_tokens(&self) -> Vec<i64> {
        let turn_ends = ["<|im_end|>", "<|eot_id|>", "<|end_of_text|>"].into_iter().filter_map(|t| self.tokenizer.token_to_id(t)).map(i64::from);
        let mut stop: Vec<i64> = self.eos_ids.iter().copied().chain(turn_ends).collect();
        stop.sort_unstable();
        stop.dedup();
        stop
    }

    /// The prompt's token ids as the model is given them: plain text with the tokenizer's
    /// special tokens, a rendered conversation without (its template writes them).
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<i64>, ModelError> {
        match prompt {
            Prompt::Text(p) => self.ids(p, true),
            Prompt::Chat(messages) => self.ids(&self.chat_template()?.render(messages, true)?, false),
        }
    }

    /// Greedy or sampled continuation of `prompt` by `llama` (at most `max_new_tokens`,
    /// stopped at [`SftEncoder::stop_tokens`]), decoded as transformers decodes it.
    pub fn continue_prompt(
        &self,
        llama: &super::llama::Llama,
        prompt: &Prompt,
        max_new_tokens: usize,
        sampling: &super::llama::Sampling,
        rng: &mut dyn rand::RngCore,
    ) -> Result<Continuation, ModelError> {
        let ids = self.prompt_ids(prompt)?;
        let stop = self.stop_tokens();
        let tokens = llama.generate(&ids, max_new_tokens, sampling, &stop, rng);
        self.continuation(ids.len(), tokens, &stop)
    }

    /// The [`Continuation`] of a prompt of `prompt_tokens` tokens by the generated
    /// `tokens`: a final stop token is counted but not decoded.
    fn continuation(&self, prompt_tokens: usize, mut tokens: Vec<i64>, stop: &[i64]) -> Result<Continuation, ModelError> {
        let generated = tokens.len();
        let stopped = tokens.last().is_some_and(|t| stop.contains(t));
        if stopped {
            tokens.pop();
        }
        let text = self.tokenizer.decode(&tokens.iter().map(|&t| t as u32).collect::<Vec<_>>(), true).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(Continuation { text, prompt_tokens, generated, stopped })
    }

    /// Greedy continuations of many prompts, decoded as [`SftEncoder::continue_prompt`]
    /// decodes one, computed `batch` prompts at a time (similar lengths together) with
    /// [`super::llama::Llama::generate_greedy_batch`]. In the order of `prompts`.
    pub fn continue_prompts_greedy(
        &self,
        llama: &super::llama::Llama,
        prompts: &[&Prompt],
        max_new_tokens: usize,
        batch: usize,
    ) -> Result<Vec<Continuation>, ModelError> {
        let ids: Vec<Vec<i64>> = prompts.iter().map(|p| self.prompt_ids(p)).collect::<Result<_, _>>()?;
        Ok(self.score_and_continue(llama, &ids, &vec![Vec::new(); ids.len()], max_new_tokens, batch)?.into_iter().map(|(_, c)| c).collect())
    }

    /// Held-out scoring of records: for each, the summed cross-entropy of its response
    /// tokens (as [`SftEncoder::encode`] cuts them to `max_len`; none when the prompt
    /// fills it) and the number of them, and the greedy continuation of its prompt; one
    /// prefill serves both ([`super::llama::Llama::score_and_generate`]).
    pub fn score_records(
        &self,
        llama: &super::llama::Llama,
        records: &[SftExample],
        max_new_tokens: usize,
        batch: usize,
    ) -> Result<Vec<(f64, usize, Continuation)>, ModelError> {
        let mut prompts = Vec::with_capacity(records.len());
        let mut responses = Vec::with_capacity(records.len());
        for r in records {
            match self.encode(r)? {
                Some(enc) => {
                    let n_prompt = enc.ids.len() - enc.response_tokens();
                    prompts.push(enc.ids[..n_prompt].to_vec());
                    responses.push(enc.ids[n_prompt..].to_vec());
                }
                None => {
                    prompts.push(self.prompt_ids(&r.prompt)?);
                    responses.push(Vec::new());
                }
            }
        }
        let scored = self.score_and_continue(llama, &prompts, &responses, max_new_tokens, batch)?;
        Ok(scored.into_iter().zip(&responses).map(|((loss, c), resp)| (loss, resp.len(), c)).collect())
    }

    /// `batch` prompts at a time, similar lengths together, in the order given.
    fn score_and_continue(
        &self,
        llama: &super::llama::Llama,
        prompts: &[Vec<i64>],
        responses: &[Vec<i64>],
        max_new_tokens: usize,
        batch: usize,
    ) -> Result<Vec<(f64, Continuation)>, ModelError> {
        let stop = self.stop_tokens();
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&i| prompts[i].len());
        let mut out: Vec<Option<(f64, Continuation)>> = vec![None; prompts.len()];
        for chunk in order.chunks(batch.max(1)) {
            let p: Vec<Vec<i64>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
            let r: Vec<Vec<i64>> = chunk.iter().map(|&i| responses[i].clone()).collect();
            let (losses, continuations) = llama.score_and_generate(&p, &r, max_new_tokens, &stop);
            for ((&i, loss), tokens) in chunk.iter().zip(losses).zip(continuations) {
                out[i] = Some((loss, self.continuation(prompts[i].len(), tokens, &stop)?));
            }
        }
        Ok(out.into_iter().map(|c| c.unwrap_or((0.0, Continuation { text: String::new(), prompt_tokens: 0, generated: 0, stopped: false }))).collect())
    }

    fn chat_template(&self) -> Result<&ChatTemplate, ModelError> {
        self.template.as_ref().ok_or_else(|| ModelError::Tokenizer("chat records need a chat template, and this model has none".into()))
    }

    pub fn template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    fn ids(&self, text: &str, special: bool) -> Result<Vec<i64>, ModelError> {
        let enc = self.tokenizer.encode(text, special).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// The prompt as the model sees it, and the text of the response that follows it.
    pub fn texts(&self, ex: &SftExample) -> Result<(String, String), ModelError> {
        match &ex.prompt {
            Prompt::Text(p) => Ok((p.clone(), ex.response.clone())),
            Prompt::Chat(messages) => {
                let template = self.chat_template()?;
                let prompt = template.render(messages, true)?;
                let mut all = messages.clone();
                all.push(Message { role: "assistant".into(), content: ex.response.clone() });
                let full = template.render(&all, false)?;
                let response = full.strip_prefix(&prompt).ok_or_else(|| {
                    ModelError::Tokenizer(
                        "the chat template does not render the prompt as the start of the conversation, so the response cannot be told apart".into(),
                    )
                })?;
                Ok((prompt, response.to_string()))
            }
        }
    }

    /// Prompt and response tokenized apart and joined (as TRL does, so no token spans the
    /// boundary), plain-text responses closed with the end-of-sequence token (a chat
    /// template closes the turn itself), cut to `max_len`. `None` when nothing of the
    /// response fits.
    pub fn encode(&self, ex: &SftExample) -> Result<Option<SftEncoded>, ModelError> {
        let (prompt, response) = self.texts(ex)?;
        let chat = matches!(ex.prompt, Prompt::Chat(_));
        // The same tokens as `prompt_ids`, from the prompt text `texts` rendered already.
        let mut ids = self.ids(&prompt, !chat)?;
        let n_prompt = ids.len();
        let mut resp = self.ids(&response, false)?;
        if !chat {
            if let Some(&eos) = self.eos_ids.first() {
                if resp.last() != Some(&eos) {
                    resp.push(eos);
                }
            }
        }
        ids.extend(resp);
        ids.truncate(self.max_len);
        if ids.len() <= n_prompt {
            return Ok(None);
        }
        let labels = ids.iter().enumerate().map(|(i, &t)| if i < n_prompt { IGNORE } else { t }).collect();
        Ok(Some(SftEncoded { ids, labels }))
    }

    /// Every record that keeps some of its response within `max_len`, and how many did not.
    pub fn encode_all(&self, examples: &[SftExample]) -> Result<(Vec<SftEncoded>, usize), ModelError> {
        let mut out = Vec::with_capacity(examples.len());
        let mut dropped = 0;
        for e in examples {
            match self.encode(e)? {
                Some(enc) => out.push(enc),
                None => dropped += 1,
            }
        }
        Ok((out, dropped))
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Right-padded batch on `device`.
    pub fn batch(&self, items: &[&SftEncoded], device: Device) -> SftBatch {
        sft_batch(items, self.pad_id, device)
    }
}

#[derive(Debug)]
pub struct SftBatch {
    pub ids: Tensor,
    pub mask: Tensor,
    pub labels: Tensor,
    /// Real (unpadded) tokens.
    pub tokens: i64,
    /// Tokens that carry the loss.
    pub response_tokens: i64,
}

/// `items` right-padded with `pad_id` (labels with [`IGNORE`]).
pub fn sft_batch(items: &[&SftEncoded], pad_id: i64, device: Device) -> SftBatch {
    let width = items.iter().map(|e| e.ids.len()).max().unwrap_or(1).max(1);
    let mut ids = vec![pad_id; items.len() * width];
    let mut mask = vec![0i64; items.len() * width];
    let mut labels = vec![IGNORE; items.len() * width];
    for (row, e) in items.iter().enumerate() {
        let r = row * width..row * width + e.ids.len();
        ids[r.clone()].copy_from_slice(&e.ids);
        mask[r.clone()].fill(1);
        labels[r].copy_from_slice(&e.labels);
    }
    let shape = [items.len() as i64, width as i64];
    SftBatch {
        ids: Tensor::from_slice(&ids).view(shape).to_device(device),
        mask: Tensor::from_slice(&mask).view(shape).to_device(device),
        labels: Tensor::from_slice(&labels).view(shape).to_device(device),
        tokens: items.iter().map(|e| e.ids.len() as i64).sum(),
        response_tokens: items.iter().map(|e| e.response_tokens() as i64).sum(),
    }
}

/// The next-token targets of `labels` `[batch, len]`: position i is scored against label
/// i + 1, and the last position against [`IGNORE`]. transformers shifts the labels this
/// way rather than slicing the logits, which would copy all of them (vocabulary-wide, the
/// largest tensor of a step).
pub fn next_token_targets(labels: &Tensor) -> Tensor {
    let (batch, len) = (labels.size()[0], labels.size()[1]);
    let last = Tensor::full([batch, 1], IGNORE, (Kind::Int64, labels.device()));
    Tensor::cat(&[labels.narrow(1, 1, len - 1), last], 1)
}

/// Mean next-token cross-entropy over the labelled positions: logits `[batch, len, vocab]`
/// at position i predict the label at i + 1 (transformers' `ForCausalLMLoss`).
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Tensor {
    let vocab = logits.size()[2];
    let pred = logits.to_kind(Kind::Float).reshape([-1, vocab]);
    pred.cross_entropy_loss::<Tensor>(&next_token_targets(labels).reshape([-1]), None, tch::Reduction::Mean, IGNORE, 0.0)
}

/// Summed next-token cross-entropy and the number of labelled positions.
pub fn causal_lm_loss_sum(logits: &Tensor, labels: &Tensor) -> (f64, i64) {
    let vocab = logits.size()[2];
    let pred = logits.to_kind(Kind::Float).reshape([-1, vocab]);
    let target = next_token_targets(labels).reshape([-1]);
    let sum = pred.cross_entropy_loss::<Tensor>(&target, None, tch::Reduction::Sum, IGNORE, 0.0).double_value(&[]);
    (sum, target.ne(IGNORE).sum(Kind::Int64).int64_value(&[]))
}

/// Batches of `batch_size` indices grouped by length, as transformers'
/// `LengthGroupedSampler`: a random order cut into mega-batches of `50 × batch_size`,
/// each sorted longest first and cut into batches; the batch with the longest example
/// goes first, so a length that does not fit in memory fails at once.
pub fn length_grouped_batches<R: Rng + ?Sized>(lengths: &[usize], batch_size: usize, rng: &mut R) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(rng);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for mega in order.chunks(50 * batch_size) {
        let mut mega = mega.to_vec();
        mega.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(mega.chunks(batch_size).map(<[usize]>::to_vec));
    }
    if let Some(longest) = (0..batches.len()).max_by_key(|&b| batches[b].iter().map(|&i| lengths[i]).max().unwrap_or(0)) {
        batches.swap(0, longest);
    }
    batches
}

/// Padding positions a batching spends: Σ over batches of (longest × size − Σ lengths).
pub fn padding_of(batches: &[Vec<usize>], lengths: &[usize]) -> usize {
    batches.iter().map(|b| b.iter().map(|&i| lengths[i]).max().unwrap_or(0) * b.len() - b.iter().map(|&i| lengths[i]).sum::<usize>()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn both_shapes_parse_and_bad_records_are_named() {
        let p = SftExample::parse(r#"{"prompt": "2+2?", "response": "4", "group": "math"}"#).unwrap();
        assert_eq!(p, SftExample { prompt: Prompt::Text("2+2?".into()), response: "4".into(), group: "math".into() });
        let c = SftExample::parse(
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}"#,
        )
        .unwrap();
        assert_eq!(c.response, "4");
        assert!(matches!(&c.prompt, Prompt::Chat(m) if m.len() == 2 && m[1].role == "user"));
        for (bad, says) in [
            (r#"{"messages": [{"role": "user", "content": "hi"}]}"#, "the user's"),
            (r#"{"messages": []}"#, "empty"),
            (r#"{"messages": [{"role": "assistant", "content": "hi"}]}"#, "at least one message"),
            (r#"{"text": "a review", "label": 1}"#, "expected"),
            (r#"{"prompt": 3, "response": "x"}"#, "expected"),
        ] {
            let e = SftExample::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn length_grouping_covers_every_record_once_and_wastes_less_padding() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let lengths: Vec<usize> = (0..1000).map(|_| rng.gen_range(5..400)).collect();
        let grouped = length_grouped_batches(&lengths, 8, &mut rng);
        let mut seen: Vec<usize> = grouped.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        assert!(grouped.iter().all(|b| b.len() <= 8));
        let longest = lengths.iter().max().unwrap();
        assert!(grouped[0].iter().any(|&i| lengths[i] == *longest));
        let mut order: Vec<usize> = (0..1000).collect();
        order.shuffle(&mut rng);
        let random: Vec<Vec<usize>> = order.chunks(8).map(<[usize]>::to_vec).collect();
        let (g, r) = (padding_of(&grouped, &lengths), padding_of(&random, &lengths));
        assert!(g * 10 < r, "grouped padding {g} vs random {r}");
    }
}
