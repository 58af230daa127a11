"""A LoRA adapter made by Python PEFT, and the outputs it gives, for the test that the Rust
trainer loads PEFT adapters with the same meaning (names, scaling, math).

Run once by a developer (needs torch, transformers, peft, tokenizers, safetensors):
    python scripts/reference/peft_reference.py MINILM_DIR client/tests/data/peft_minilm
Writes OUT/adapter_model.safetensors, OUT/adapter_config.json (PEFT's own files) and
OUT/reference.safetensors (inputs and BertModel+LoRA hidden states). Committed.
"""
import pathlib
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import BertModel

model_dir, out = sys.argv[1], pathlib.Path(sys.argv[2])
torch.manual_seed(7)
base = BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
config = LoraConfig(r=2, lora_alpha=6, lora_dropout=0.0, target_modules=["query", "value"], init_lora_weights=False)
model = get_peft_model(base, config).eval()
model.save_pretrained(out)
(out / "README.md").unlink(missing_ok=True)  # PEFT's model-card template
tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
tok.no_padding()
tok.no_truncation()
texts = ["This drug changed my life.", "Awful nausea, stopped after a week and felt better."]
encs = [tok.encode(t).ids for t in texts]
width = max(len(e) for e in encs)
ids = torch.zeros((len(texts), width), dtype=torch.int64)
mask = torch.zeros((len(texts), width), dtype=torch.int64)
for i, e in enumerate(encs):
    ids[i, : len(e)] = torch.tensor(e)
    mask[i, : len(e)] = 1
with torch.no_grad():
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
save_file({"input_ids": ids, "attention_mask": mask, "last_hidden_state": hidden.contiguous()}, str(out / "reference.safetensors"))
print(f"wrote {out}: adapter r=2 on query/value, hidden {tuple(hidden.shape)}")
