"""Reference outputs of a Llama decoder from Hugging Face transformers, for the parity test
of the Rust (tch) implementation in client/src/train/llama.rs.

Run once by a developer (needs torch, transformers, tokenizers, safetensors), on the
SmolLM2 folder that scripts/setup converts from GGUF:
    python scripts/reference/llama_reference.py .tessera-data/smollm2 client/tests/data/smollm2_reference.safetensors
The output is committed; CI only reads it.
"""
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM

model_dir, out = sys.argv[1], sys.argv[2]
texts = [
    "Review: The medication worked well and I had no side effects.\nSentiment:",
    "Review: Terrible headaches.\nSentiment:",
]
tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
encs = [tok.encode(t, add_special_tokens=False).ids for t in texts]
width = max(len(e) for e in encs)
ids = torch.full((len(texts), width), 2, dtype=torch.int64)
mask = torch.zeros((len(texts), width), dtype=torch.int64)
for i, e in enumerate(encs):
    ids[i, : len(e)] = torch.tensor(e)
    mask[i, : len(e)] = 1
model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="eager", torch_dtype=torch.float32).eval()
with torch.no_grad():
    out_all = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
hidden = out_all.hidden_states[-1]  # after the final norm
logits = out_all.logits[..., :2048]
save_file({"input_ids": ids, "attention_mask": mask, "hidden": hidden.contiguous(), "logits_head": logits.contiguous()}, out)
print(f"wrote {out}: hidden {tuple(hidden.shape)}, logits[..., :2048]; token ids {encs}")
