"""Converts a llama.cpp GGUF checkpoint of a Llama-architecture model into what the Rust
trainer loads: f32 weights under Hugging Face `LlamaForCausalLM` names in
model.safetensors, config.json, and a tokenizer.json rebuilt from the GGUF metadata.

    python convert_gguf.py MODEL.gguf OUT_DIR

Quantized tensors are dequantized with the `gguf` package. llama.cpp's converter permutes
the rows of q_proj and k_proj (it interleaves the two halves of each head for its RoPE
layout); this undoes that permutation, so the result runs with Hugging Face's
rotate-half RoPE.
"""
import json
import pathlib
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # Inverse of llama.cpp's `permute`: reshape(n_head, 2, d/2, …).swapaxes(1, 2).
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def main() -> None:
    src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    r = GGUFReader(src)
    arch = field(r, "general.architecture")
    if arch != "llama":
        sys.exit(f"{src}: architecture {arch!r}, only llama is supported")
    n_head = int(field(r, "llama.attention.head_count"))
    n_kv = int(field(r, "llama.attention.head_count_kv", n_head))
    hidden = int(field(r, "llama.embedding_length"))
    tensors = {}
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape.tolist())])
        name = t.name
        if name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf = "model.norm.weight"
        elif name == "output.weight":
            hf = "lm_head.weight"
        else:
            _, layer, kind, suffix = name.split(".", 3)
            hf = f"model.layers.{layer}.{NAMES[kind]}.{suffix}"
            if kind == "attn_q":
                w = unpermute(w, n_head)
            elif kind == "attn_k":
                w = unpermute(w, n_kv)
        tensors[hf] = np.ascontiguousarray(w)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))

    tokens = field(r, "tokenizer.ggml.tokens")
    vocab_size = len(tokens)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(field(r, "llama.feed_forward_length")),
        "num_hidden_layers": int(field(r, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "rms_norm_eps": float(field(r, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(r, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field(r, "llama.context_length")),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "hidden_act": "silu",
        "bos_token_id": int(field(r, "tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(field(r, "tokenizer.ggml.eos_token_id", 2)),
        "pad_token_id": int(field(r, "tokenizer.ggml.padding_token_id", 2)),
        "torch_dtype": "float32",
        "source": src.name,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))

    model = field(r, "tokenizer.ggml.model")
    if model != "gpt2":
        sys.exit(f"{src}: tokenizer model {model!r}, only byte-level BPE (gpt2) is supported")
    types = field(r, "tokenizer.ggml.token_type")
    merges = field(r, "tokenizer.ggml.merges")
    pre = field(r, "tokenizer.ggml.pre", "default")
    # llama.cpp's `smollm` pre-tokenizer: single digits, then GPT-2's byte-level regex.
    pretokenizers = [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]
    if pre in ("smollm", "starcoder", "refact"):
        pretokenizers.insert(0, {"type": "Digits", "individual_digits": True})
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for i, (tok, ty) in enumerate(zip(tokens, types))
        if ty == 3
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretokenizers},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": list(merges),
        },
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    # The chat template and special tokens, where transformers keeps them.
    special = {k: tokens[int(field(r, f"tokenizer.ggml.{k}_token_id", d))] for k, d in (("bos", 1), ("eos", 2), ("padding", 2))}
    tokenizer_config = {"bos_token": special["bos"], "eos_token": special["eos"], "pad_token": special["padding"], "tokenizer_class": "GPT2Tokenizer"}
    template = field(r, "tokenizer.chat_template", None)
    if template is not None:
        tokenizer_config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    print(f"{src.name} -> {out}: {len(tensors)} tensors, vocab {vocab_size}, {len(added)} special tokens")


if __name__ == "__main__":
    main()
