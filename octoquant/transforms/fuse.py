"""Find (Conv2d -> ReLU / ReLU6 / ChannelClamp) pairs so the activation runs in the int8 conv's epilogue.

Fusing is exact (the same clamp, applied before the float output is written) and saves a full pass over
the activation tensor per layer.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from .equalize import ChannelClamp, trace_or_none


def activation_upper(m: nn.Module) -> torch.Tensor | None:
    """The per-channel upper clamp of a fusable activation (lower bound 0), or None if not fusable."""
    if isinstance(m, nn.ReLU):
        return torch.tensor(float("inf"))
    if isinstance(m, nn.ReLU6):
        return torch.tensor(6.0)
    if isinstance(m, nn.Hardtanh) and m.min_val == 0.0:
        return torch.tensor(float(m.max_val))
    if isinstance(m, ChannelClamp):
        return m.upper.reshape(-1)
    return None


def find_conv_activation_pairs(model: nn.Module) -> list[tuple[str, str, bool]]:
    """(conv, activation, shared) where the activation module is the conv output's only consumer; `shared`: the
    same activation module is also called elsewhere (torchvision's ResNet blocks call one `self.relu` after conv1
    and after the residual add), so it must stay in the model (clamping twice is exact: these are idempotent)."""
    gm = trace_or_none(model, "activation fusion")  # untraceable models just run unfused
    if gm is None:
        return []
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.Conv2d) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        # look through identities (a folded BatchNorm leaves nn.Identity between conv and activation)
        while user.op == "call_module" and isinstance(modules[user.target], nn.Identity) and len(user.users) == 1:
            user = next(iter(user.users))
        if user.op == "call_module" and activation_upper(modules[user.target]) is not None:
            pairs.append((node.target, user.target, calls[user.target] > 1))
    return pairs
