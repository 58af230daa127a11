"""Training throughput of Python PyTorch + PEFT, the same measurement as
client/benches/train.rs: fixed-length random batches, LoRA r=8 alpha=16 no dropout on the
query/value projections (both factors trained), AdamW lr 1e-3, the same classification
head (BERT: masked-mean pooling + linear; Llama: label-token logits at the last position).

    python scripts/bench_train_peft.py --model DIR [--batch 8] [--seq 64] [--steps 20] [--warmup 3] [--dp-sgd] [--sft] [--dtype f32|bf16|f16]

With --sft each step is the causal-LM loss over every position (`labels=input_ids`), the
anchor for `client/benches/train.rs --sft`; --dtype loads the base weights in that type
(PEFT keeps the LoRA factors in f32, its `autocast_adapter_dtype` default). The JSON line
carries the peak resident memory of the steps (reset with Linux `clear_refs` after loading).

With --dp-sgd the same steps run under Opacus (GradSampleModule per-sample gradients,
DPOptimizer clipping to C = 1 and noise σ = 1 over the expected batch size), the anchor
for `client/benches/train.rs --dp-sgd`.
"""
import argparse
import json
import pathlib
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, BertModel, LlamaForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--model", default=".tessera-data/smollm2")
p.add_argument("--batch", type=int, default=8)
p.add_argument("--seq", type=int, default=64)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--dp-sgd", action="store_true", help="DP-SGD through Opacus")
p.add_argument("--attn", default="sdpa", help="transformers attention implementation (sdpa, eager)")
p.add_argument("--sft", action="store_true", help="causal-LM loss over every position (Llama)")
p.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
a = p.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
cfg = AutoConfig.from_pretrained(a.model)
torch.manual_seed(7)
if cfg.model_type == "llama":
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    base = LlamaForCausalLM.from_pretrained(a.model, attn_implementation=a.attn, dtype=dtype)
    targets = ["q_proj", "v_proj"]
else:
    base = BertModel.from_pretrained(a.model, attn_implementation=a.attn)
    targets = ["query", "value"]
model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)).to(device)
model.train()
head = None
if cfg.model_type != "llama":
    head = torch.nn.Linear(cfg.hidden_size, 3).to(device)
label_ids = torch.tensor([1000, 1001, 1002], device=device)
params = [p for p in model.parameters() if p.requires_grad] + (list(head.parameters()) if head else [])
opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
if a.dp_sgd:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    class Both(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.head = model, head

    wrapped = GradSampleModule(Both())
    opt = DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=a.batch)
vocab = min(cfg.vocab_size, 30000)
batches = [
    (torch.randint(100, vocab, (a.batch, a.seq), device=device), torch.randint(0, 3, (a.batch,), device=device))
    for _ in range(a.steps + a.warmup)
]
mask = torch.ones((a.batch, a.seq), dtype=torch.int64, device=device)


def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


loaded_rss = rss_kib("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass


def logits(ids):
    if head is None:
        hidden = model.base_model.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden[:, -1] @ model.base_model.model.lm_head.weight[label_ids].T
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    return head((hidden * m).sum(1) / m.sum(1))


for i, (ids, labels) in enumerate(batches):
    if i == a.warmup:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
    if a.sft:
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    else:
        loss = torch.nn.functional.cross_entropy(logits(ids), labels)
    opt.zero_grad()
    loss.backward()
    if a.dp_sgd and i == 0:
        missing = [n for n, q in wrapped.named_parameters() if q.requires_grad and getattr(q, "grad_sample", None) is None]
        assert not missing, f"Opacus computed no per-sample gradients for {missing}"
    opt.step()
if device == "cuda":
    torch.cuda.synchronize()
secs = time.perf_counter() - start
print(json.dumps({
    "impl": f"PyTorch {torch.__version__} + PEFT (attn {a.attn})" + (" + Opacus DP-SGD" if a.dp_sgd else ""), "model": pathlib.Path(a.model).name, "device": device,
    "objective": "sft" if a.sft else "classify", "dtype": a.dtype,
    "loaded_rss_mib": loaded_rss // 1024, "peak_rss_mib": rss_kib("VmHWM") // 1024,
    "threads": torch.get_num_threads(), "batch": a.batch, "seq": a.seq, "steps": a.steps,
    "tokens_per_sec": a.batch * a.seq * a.steps / secs, "seconds": secs,
}))
