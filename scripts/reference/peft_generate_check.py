"""Checks that an adapter trained generatively by Tessera (`tessera-client federate --task
sft --adapter-out DIR`) loads in PEFT (`PeftModel.from_pretrained`) and generates there
the same greedy answers as `tessera-client generate --adapter DIR` does.

Run by a developer after a federated instruction fine-tune (needs torch, transformers
and peft, e.g. the .venv-bench that scripts/bench-train creates, and the debug or release
tessera-client):
    python scripts/reference/peft_generate_check.py MODEL_DIR ADAPTER_DIR TESSERA_CLIENT OUT.json

Writes OUT.json with every prompt, both continuations and whether they agree; exits 1 if
any differs. The result of the run recorded in BENCHMARKS.md is committed as
scripts/reference/peft_generate_check.json.
"""
import json
import os
import subprocess
import sys

import torch
from peft import PeftModel
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

model_dir, adapter_dir, client, out = sys.argv[1:5]
prompts = [
    "Which condition is this review about?\nI have been taking this pill for three years and have had no pregnancy scares.",
    "Which condition is this review about?\nMy back pain is finally bearable after two weeks on this.",
    "Which condition is this review about?\nI feel less hopeless and I can get out of bed in the morning again.",
    "What is the capital of France?",
]
tok = PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json")
config = json.load(open(f"{model_dir}/tokenizer_config.json"))
tok.chat_template = config["chat_template"]
base = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
model = PeftModel.from_pretrained(base, adapter_dir).eval()
results = []
for p in prompts:
    text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, eos_token_id=[2], pad_token_id=2)
    peft_answer = tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True)
    # The base model alone, to show that the adapter is what the two agree on.
    with torch.no_grad(), model.disable_adapter():
        plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, eos_token_id=[2], pad_token_id=2)
    base_answer = tok.decode(plain[0, ids.shape[1]:], skip_special_tokens=True)
    run = subprocess.run(
        [client, "generate", "--model", model_dir, "--adapter", adapter_dir, "--chat", "--prompt", p, "--max-new-tokens", "24"],
        capture_output=True, text=True, check=True, env={**os.environ},
    )
    tessera_answer = run.stdout[:-1] if run.stdout.endswith("\n") else run.stdout
    results.append({"prompt": p, "peft": peft_answer, "tessera": tessera_answer, "equal": peft_answer == tessera_answer, "base_model_alone": base_answer})
    print(f"{'ok  ' if peft_answer == tessera_answer else 'DIFF'} {p[:50]!r}: peft {peft_answer!r} / tessera {tessera_answer!r}")
adapter_config = json.load(open(f"{adapter_dir}/adapter_config.json"))
adapter_config.pop("base_model_name_or_path", None)  # a path on the machine that ran it
json.dump({"adapter_config": adapter_config, "results": results}, open(out, "w"), indent=1)
sys.exit(0 if all(r["equal"] for r in results) else 1)
