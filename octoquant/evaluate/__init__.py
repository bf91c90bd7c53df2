"""Accuracy of a quantized model against its FP32 original."""

from .metrics import mean_kl_divergence, top1_agreement

__all__ = ["top1_agreement", "mean_kl_divergence"]
