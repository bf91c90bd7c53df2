"""Equalize the input channels of depthwise convolutions (cross-layer equalization, Nagel et al. 2019).

A depthwise conv sees its input through ONE per-tensor activation scale, while its input channels often
span very different ranges (one channel up to 6, another up to 0.05). For a producer conv whose output
feeds only the depthwise conv, through element-wise ReLU/ReLU6/BatchNorm-folded identities:

    producer row c  *= 1 / s_c      (and its bias)
    ReLU6           -> clamp(0, 6 / s_c) per channel        (ReLU is positively homogeneous: unchanged)
    depthwise filter c *= s_c

leaves the float output unchanged, and with s_c = max_c / max_all every input channel reaches the same
range. Both weight quantizers are per output channel, so their relative precision is unchanged: only
the activation quantizer gains. Pairs are found on a torch.fx trace (the true dataflow).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger("octoquant")


class ChannelClamp(nn.Module):
    """clamp(x, 0, upper[c]) per channel of an NCHW tensor: a ReLU6 whose channels were rescaled."""

    def __init__(self, upper: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("upper", upper.reshape(1, -1, 1, 1).to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(x.clamp_min(0.0), self.upper.to(x.dtype))


_PASS_THROUGH = (nn.ReLU, nn.ReLU6, nn.Identity)


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps octoquant's own modules as single call_module nodes (like torch.nn modules)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ChannelClamp) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """An fx graph of `model` (raises if the model is not symbolically traceable)."""
    return torch.fx.GraphModule(model, _LeafTracer().trace(model))


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def find_depthwise_pairs(model: nn.Module) -> list[tuple[str, list[str], str]]:
    """(producer conv, element-wise modules between, depthwise conv) triples, by fx dataflow."""
    try:
        gm = trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure just means: no equalization
        log.info("octoquant: depthwise equalization skipped (model not fx-traceable: %s)", type(e).__name__)
        return []
    modules = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _is_depthwise(modules[node.target]):
            continue
        between, cur = [], node.args[0]
        while (
            isinstance(cur, torch.fx.Node)
            and cur.op == "call_module"
            and len(cur.users) == 1
            and isinstance(modules[cur.target], _PASS_THROUGH)
        ):
            between.append(cur.target)
            cur = cur.args[0]
        if not (isinstance(cur, torch.fx.Node) and cur.op == "call_module" and len(cur.users) == 1):
            continue
        producer = modules[cur.target]
        if isinstance(producer, nn.Conv2d) and producer.out_channels == modules[node.target].in_channels:
            pairs.append((cur.target, between[::-1], node.target))
    return pairs


@torch.no_grad()
def equalize_depthwise(model: nn.Module, run_calibration: Callable[[], None]) -> int:
    """Rescale every (producer -> depthwise) pair of `model` in place; returns the number of pairs.

    `run_calibration()` runs the model over calibration data once, to measure each depthwise input's
    per-channel maximum.
    """
    pairs = find_depthwise_pairs(model)
    if not pairs:
        return 0
    maxima: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args):
            m = args[0].detach().abs().amax(dim=(0, 2, 3)).to(torch.float32)
            maxima[name] = m if name not in maxima else torch.maximum(maxima[name], m)

        return fn

    handles = [model.get_submodule(dw).register_forward_pre_hook(hook(dw)) for _, _, dw in pairs]
    try:
        run_calibration()
    finally:
        for h in handles:
            h.remove()
    done = 0
    for prod_name, between, dw_name in pairs:
        if dw_name not in maxima:
            continue
        mx = maxima[dw_name]
        if not (mx > 0).any():
            continue
        s = torch.where(mx > 0, mx / mx.max(), torch.ones_like(mx))  # (C,) in (0, 1]
        prod, dw = model.get_submodule(prod_name), model.get_submodule(dw_name)
        prod.weight.div_(s.reshape(-1, 1, 1, 1))
        if prod.bias is not None:
            prod.bias.div_(s)
        dw.weight.mul_(s.reshape(-1, 1, 1, 1))
        for name in between:
            mod = model.get_submodule(name)
            if isinstance(mod, nn.ReLU6):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, ChannelClamp(6.0 / s))
        done += 1
    return done
