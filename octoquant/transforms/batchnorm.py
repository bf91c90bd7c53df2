"""fold_batchnorm: Conv2d -> BatchNorm2d (and Linear -> BatchNorm1d) pairs become one layer.

    y = gamma * (W x + b - mean) / sqrt(var + eps) + beta
      = (W * s) x + (b - mean) * s + beta,        s = gamma / sqrt(var + eps)   (per output channel)

Pairs are found as consecutive children of an nn.Sequential (the layout of torchvision-style CNNs); the
BatchNorm is replaced by nn.Identity. Eval-mode semantics only (running statistics).
"""

from __future__ import annotations

import torch
from torch import nn


def _fold_into(layer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
    with torch.no_grad():
        w = layer.weight.to(torch.float64)
        s = bn.weight.to(torch.float64) / torch.sqrt(bn.running_var.to(torch.float64) + bn.eps)
        b = layer.bias.to(torch.float64) if layer.bias is not None else torch.zeros_like(s)
        new_w = w * s.reshape(-1, *([1] * (w.dim() - 1)))
        new_b = (b - bn.running_mean.to(torch.float64)) * s + bn.bias.to(torch.float64)
        layer.weight.copy_(new_w.to(layer.weight.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(new_b.to(layer.weight.dtype))
        else:
            layer.bias.copy_(new_b.to(layer.bias.dtype))


def fold_batchnorm(model: nn.Module) -> list[str]:
    """Fold every (Conv2d, BatchNorm2d) / (Linear, BatchNorm1d) pair of consecutive Sequential children.

    Modifies `model` in place (callers copy first) and returns the names of the folded BatchNorms.
    """
    folded = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for a, b in zip(names, names[1:], strict=False):
            layer, bn = parent._modules[a], parent._modules[b]
            pair_ok = (isinstance(layer, nn.Conv2d) and type(bn) is nn.BatchNorm2d) or (
                isinstance(layer, nn.Linear) and type(bn) is nn.BatchNorm1d
            )
            if not pair_ok or not bn.track_running_stats or bn.running_mean is None:
                continue
            if bn.num_features != layer.weight.shape[0]:
                continue
            _fold_into(layer, bn)
            parent._modules[b] = nn.Identity()
            folded.append(f"{parent_name}.{b}" if parent_name else b)
    return folded
