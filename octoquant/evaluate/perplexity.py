"""Perplexity of a causal LM over non-overlapping windows of a text."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: str,
    seq_len: int = 512,
    max_tokens: int | None = 8192,
    progress: bool = True,
    stride: int | None = None,
) -> float:
    """exp(mean next-token negative log-likelihood) over `seq_len`-token windows of `text`.

    stride None (or seq_len): consecutive windows. stride < seq_len: sliding windows, each scoring only its
    last `stride` tokens with up to seq_len - stride tokens of context (the Hugging Face recipe).
    """
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < seq_len + 1:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {seq_len} + 1")
    if stride is not None and stride != seq_len:
        return _strided_perplexity(model, ids, seq_len, stride, progress)
    nll, count = 0.0, 0
    windows = range(0, len(ids) - seq_len, seq_len)
    for start in tqdm(windows, desc="perplexity", disable=not progress, leave=False):
        chunk = ids[start : start + seq_len + 1].unsqueeze(0)
        logits = model(chunk[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
        nll += float(loss)
        count += seq_len
    return math.exp(nll / count)


@torch.no_grad()
def _strided_perplexity(model, ids: torch.Tensor, seq_len: int, stride: int, progress: bool) -> float:
    if not 0 < stride < seq_len:
        raise ValueError(f"stride must be in (0, seq_len={seq_len}], got {stride}")
    nll, count, scored_to = 0.0, 0, 0
    starts = range(0, len(ids) - 1, stride)
    for begin in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
        end = min(begin + seq_len, len(ids) - 1)
        new = end - max(scored_to, begin)  # targets not scored by an earlier window
        if new <= 0:
            break
        chunk = ids[begin : end + 1].unsqueeze(0)
        logits = model(chunk[:, :-1]).logits.float()[0, -new:]
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[0, -new:], reduction="sum"))
        count += new
        scored_to = end
        if end == len(ids) - 1:
            break
    return math.exp(nll / count)
