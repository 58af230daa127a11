"""Tiny random Llama-family checkpoints, one per configuration feature that changes the
math, with the logits Hugging Face transformers computes for them, for the parity tests
in client/tests/llama_features.rs.

Run once by a developer (needs torch, transformers and safetensors, e.g. the .venv-bench
that scripts/bench-train creates; the output is
committed, CI only reads it):
    python scripts/reference/llama_features.py client/tests/data/llama-features

Each folder holds what `save_pretrained` writes (config.json, model.safetensors); beside
it, NAME.reference.safetensors holds input_ids and attention_mask [2, 24] (the second row
right-padded) and the logits [2, 24, vocab] of the eager implementation in float32.

Weights are drawn with a large initializer_range and the biases made non-zero, so that a
feature computed wrongly, or ignored, moves the logits far beyond the tests' tolerance.
"""
import json
import pathlib
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

out = pathlib.Path(sys.argv[1])
VOCAB, HIDDEN, LEN = 48, 16, 24
common = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=256,
    initializer_range=0.3,
    tie_word_embeddings=True,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# head_dim 8, θ = 1e4: wavelengths 6.3, 63, 628, 6283. With original context 32,
# low_freq_factor 0.5 and high_freq_factor 4 the bounds are 8 and 64, so the first
# frequency is kept, the second smoothed and the last two divided by the factor: every
# branch of transformers' llama3 rule is taken.
llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0.5, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
variants = {
    "base": (LlamaConfig, LlamaForCausalLM, {}),
    "rope-llama3": (LlamaConfig, LlamaForCausalLM, {"rope_scaling": llama3}),
    "rope-linear": (LlamaConfig, LlamaForCausalLM, {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "attention-bias": (LlamaConfig, LlamaForCausalLM, {"attention_bias": True, "mlp_bias": True}),
    "head-dim": (LlamaConfig, LlamaForCausalLM, {"head_dim": 12}),
    "untied": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": False}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),
}

gen = torch.Generator().manual_seed(7)
ids = torch.randint(3, VOCAB, (2, LEN), generator=gen)
mask = torch.ones((2, LEN), dtype=torch.int64)
mask[1, LEN - 6 :] = 0
ids[1, LEN - 6 :] = 0

for name, (config_cls, model_cls, extra) in variants.items():
    torch.manual_seed(11)
    config = config_cls(**{**common, **extra})
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(module, torch.nn.Linear) and bias is not None:
                bias.normal_(0.0, 0.5)
        logits = model(input_ids=ids, attention_mask=mask).logits
    folder = out / name
    model.save_pretrained(folder, safe_serialization=True)
    for extra_file in ["generation_config.json"]:
        (folder / extra_file).unlink(missing_ok=True)
    # Beside the folder, not in it: every *.safetensors in a model folder is read as weights.
    save_file({"input_ids": ids.contiguous(), "attention_mask": mask.contiguous(), "logits": logits.contiguous()}, str(out / f"{name}.reference.safetensors"))
    saved = json.loads((folder / "config.json").read_text())
    print(f"{name}: logits {tuple(logits.shape)}, max |logit| {logits.abs().max():.2f}, rope {saved.get('rope_parameters') or saved.get('rope_scaling')}")
