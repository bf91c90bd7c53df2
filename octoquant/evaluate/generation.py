"""Greedy generation from fixed prompts: does a quantized causal LM write what its float original writes?"""

from __future__ import annotations

import torch

# The LLM issue's five fixed prompts (32 greedy tokens each)
GREEDY_PROMPTS = (
    "The capital of France is",
    "In mathematics, a prime number is",
    "The history of the city begins",
    "Water boils at a temperature of",
    "The first computers were",
)


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts=GREEDY_PROMPTS, new_tokens: int = 32) -> list[list[int]]:
    """The `new_tokens` greedy token ids after each prompt (batch 1, no sampling)."""
    outs = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        outs.append(out[0, ids.shape[1] :].tolist())
    return outs
