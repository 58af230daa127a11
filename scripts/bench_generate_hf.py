"""Generation throughput of transformers' generate (KV cache, sdpa attention), the anchor of
client/benches/generate.rs: the same model, seeded random prompt of --prompt tokens, greedy,
exactly --new tokens (min_new_tokens = max_new_tokens), one untimed warm-up, libtorch's
default threads. Prints one JSON line: time to first token (a 1-token generate) and the
decode rate after it.
"""
import argparse
import json
import time

import torch
from transformers import LlamaForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--prompt", type=int, default=32)
p.add_argument("--new", type=int, default=64)
p.add_argument("--runs", type=int, default=3)
a = p.parse_args()
model = LlamaForCausalLM.from_pretrained(a.model, attn_implementation="sdpa", dtype=torch.float32).eval()
g = torch.Generator().manual_seed(7)
ids = torch.randint(100, 30000, (1, a.prompt), generator=g)
mask = torch.ones_like(ids)


def gen(n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


gen(a.new)
first = total = 0.0
for _ in range(a.runs):
    t = time.perf_counter()
    gen(1)
    first += time.perf_counter() - t
    t = time.perf_counter()
    gen(a.new)
    total += time.perf_counter() - t
# Decode time: a full generate minus its first token.
decode = total - first
print(json.dumps({"impl": f"transformers {__import__('transformers').__version__} generate (KV cache, sdpa)", "model": a.model.rstrip("/").split("/")[-1],
                  "device": "cpu", "threads": torch.get_num_threads(), "prompt": a.prompt, "new": a.new, "runs": a.runs,
                  "first_token_ms": round(1e3 * first / a.runs, 1), "decode_tokens_per_sec": round((a.new - 1) * a.runs / decode, 2)}))
