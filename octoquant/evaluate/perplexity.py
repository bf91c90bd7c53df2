"""Perplexity of a causal LM over non-overlapping windows of a text."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model, tokenizer, text: str, seq_len: int = 512, max_tokens: int | None = 8192, progress: bool = True
) -> float:
    """exp(mean next-token negative log-likelihood) over consecutive `seq_len`-token windows of `text`."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < seq_len + 1:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {seq_len} + 1")
    nll, count = 0.0, 0
    windows = range(0, len(ids) - seq_len, seq_len)
    for start in tqdm(windows, desc="perplexity", disable=not progress, leave=False):
        chunk = ids[start : start + seq_len + 1].unsqueeze(0)
        logits = model(chunk[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
        nll += float(loss)
        count += seq_len
    return math.exp(nll / count)
