"""Output-level agreement metrics between an FP32 model and its quantized copy."""

from __future__ import annotations

import torch


def top1_agreement(ref_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Fraction of rows whose argmax class is the same."""
    return float((ref_logits.argmax(dim=-1) == q_logits.argmax(dim=-1)).double().mean())


def mean_kl_divergence(ref_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(ref) || softmax(q)) in nats."""
    p_log = torch.log_softmax(ref_logits.double(), dim=-1)
    q_log = torch.log_softmax(q_logits.double(), dim=-1)
    return float((p_log.exp() * (p_log - q_log)).sum(dim=-1).mean())
