"""Reference outputs of a BERT encoder from Hugging Face transformers, for the parity test
of the Rust (tch) implementation in client/src/train/bert.rs.

Run once by a developer (needs torch, transformers, tokenizers, safetensors):
    python scripts/reference/bert_reference.py MODEL_DIR client/tests/data/minilm_reference.safetensors
The output is committed; CI only reads it.
"""
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import BertModel

model_dir, out = sys.argv[1], sys.argv[2]
texts = [
    "The medication worked well and I had no side effects.",
    "Terrible headaches for weeks; I stopped taking it.",
    "Fine.",
]
tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
tok.no_truncation()
tok.no_padding()
encs = [tok.encode(t) for t in texts]
width = max(len(e.ids) for e in encs)
ids = torch.zeros((len(texts), width), dtype=torch.int64)
mask = torch.zeros((len(texts), width), dtype=torch.int64)
for i, e in enumerate(encs):
    ids[i, : len(e.ids)] = torch.tensor(e.ids)
    mask[i, : len(e.ids)] = 1
model = BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
with torch.no_grad():
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
save_file({"input_ids": ids, "attention_mask": mask, "last_hidden_state": hidden.contiguous()}, out)
print(f"wrote {out}: {tuple(hidden.shape)}; token ids {[e.ids for e in encs]}")
