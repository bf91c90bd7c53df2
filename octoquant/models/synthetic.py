"""A Llama-style Hugging Face checkpoint of any size, written shard by shard (never held in memory whole).

Random weights: for memory and speed measurements of streaming quantization, not for accuracy claims.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_llama_checkpoint(
    folder: str | Path,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    vocab: int,
    heads: int,
    kv_heads: int,
    seed: int = 0,
) -> int:
    """Write config.json + one safetensors shard per block + index; returns the checkpoint's tensor bytes."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=False)
    g = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads
    std = 0.02

    def rand(*shape):
        return torch.randn(*shape, generator=g) * std

    shards = layers + 2
    name = lambda i: f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    weight_map: dict[str, str] = {}
    total = 0

    def put(i: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        save_file(tensors, str(folder / name(i)), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name(i)
            total += t.numel() * t.element_size()

    put(0, {"model.embed_tokens.weight": rand(vocab, hidden)})
    for i in range(layers):
        p = f"model.layers.{i}."
        put(
            i + 1,
            {
                p + "input_layernorm.weight": torch.ones(hidden),
                p + "post_attention_layernorm.weight": torch.ones(hidden),
                p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
                p + "mlp.gate_proj.weight": rand(intermediate, hidden),
                p + "mlp.up_proj.weight": rand(intermediate, hidden),
                p + "mlp.down_proj.weight": rand(hidden, intermediate),
            },
        )
    put(layers + 1, {"model.norm.weight": torch.ones(hidden), "lm_head.weight": rand(vocab, hidden)})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return total
