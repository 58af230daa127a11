"""References for the instruction fine-tuning tests in client/tests/sft.rs, from Hugging Face
transformers (run once by a developer, e.g. with the .venv-bench that scripts/bench-train
creates; the output is committed, CI only reads it):
    python scripts/reference/sft_reference.py .tessera-data/smollm2 client/tests/data

Writes
- sft/loss.reference.safetensors: a right-padded batch for the tiny random Llama of
  llama-features/base, labels -100 on each row's prompt and padding, and the loss
  transformers computes with `labels=` (next-token cross-entropy, mean over labelled
  tokens);
- sft/chat.json: conversations rendered by transformers' own Jinja rendering
  (`render_jinja_template`) with SmolLM2-Instruct's chat template and with a template that
  uses Python string methods, `raise_exception` and `bos_token`, plus the token ids the
  SmolLM2 tokenizer gives the rendered SmolLM2 texts;
- sft/generate.json: greedy continuations by transformers' generate (KV cache) of the
  tiny plain and llama3-RoPE checkpoints.
"""
import json
import pathlib
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM
from transformers.utils.chat_template_utils import render_jinja_template

smol, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
(out / "sft").mkdir(parents=True, exist_ok=True)

# 1. The completion-only causal-LM loss.
model = LlamaForCausalLM.from_pretrained(out / "llama-features/base", attn_implementation="eager", dtype=torch.float32).eval()
gen = torch.Generator().manual_seed(5)
ids = torch.randint(3, 48, (3, 20), generator=gen)
mask = torch.ones((3, 20), dtype=torch.int64)
labels = ids.clone()
for row, (prompt, length) in enumerate([(7, 20), (3, 14), (12, 17)]):
    labels[row, :prompt] = -100
    labels[row, length:] = -100
    mask[row, length:] = 0
    ids[row, length:] = 0
with torch.no_grad():
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
save_file({"input_ids": ids, "attention_mask": mask, "labels": labels, "loss": loss.reshape(1)}, str(out / "sft/loss.reference.safetensors"))
print(f"loss {loss.item():.6f}")

# 2. Chat templates.
smol_template = json.loads((smol / "tokenizer_config.json").read_text())["chat_template"]
methods_template = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% if m['role'] == 'system' %}[SYS] {{ m['content'] | trim }}\n"
    "{% elif m['content'].startswith('!') %}<{{ m['role'] | upper }}> {{ m['content'][1:].strip() }}\n"
    "{% else %}<{{ m['role'] | upper }}> {{ m['content'].strip() }}{{ eos_token if m['role'] == 'assistant' else '' }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<ASSISTANT>{% endif %}"
)
conversations = [
    [{"role": "user", "content": "What does ibuprofen treat?"}],
    [{"role": "system", "content": "  Answer in one word. "}, {"role": "user", "content": "Condition of: 'I could finally sleep.'"}, {"role": "assistant", "content": "Insomnia"}],
    [{"role": "user", "content": "!  Rate it"}, {"role": "assistant", "content": " 9/10 "}, {"role": "user", "content": "And the condition?"}],
]
tok = Tokenizer.from_file(str(smol / "tokenizer.json"))
cases = []
for name, template in [("smollm2", smol_template), ("methods", methods_template)]:
    for conv in conversations:
        for gen_prompt in (False, True):
            text = render_jinja_template(conversations=[conv], chat_template=template, add_generation_prompt=gen_prompt, bos_token="<s>", eos_token="</s>")[0][0]
            case = {"template": name, "messages": conv, "add_generation_prompt": gen_prompt, "rendered": text}
            if name == "smollm2":
                case["ids"] = tok.encode(text, add_special_tokens=False).ids
            cases.append(case)
(out / "sft/chat.json").write_text(json.dumps({"templates": {"smollm2": smol_template, "methods": methods_template}, "cases": cases}, indent=1, ensure_ascii=False))
print(f"{len(cases)} chat cases")

# 3. Greedy generation with a KV cache (transformers' generate), on two tiny checkpoints:
#    the plain one and the one with llama3 RoPE scaling (positions after the prompt).
generations = {}
for name in ("base", "rope-llama3"):
    m = LlamaForCausalLM.from_pretrained(out / "llama-features" / name, attn_implementation="eager", dtype=torch.float32).eval()
    prompt = torch.tensor([[5, 9, 13, 7, 20, 31, 4]])
    with torch.no_grad():
        seq = m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False, eos_token_id=2, pad_token_id=0)
    generations[name] = {"prompt": prompt[0].tolist(), "continuation": seq[0, prompt.shape[1]:].tolist()}
(out / "sft/generate.json").write_text(json.dumps(generations, indent=1))
print(f"generations: {generations}")
