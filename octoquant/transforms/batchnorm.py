"""fold_batchnorm: Conv2d -> BatchNorm2d (and Linear -> BatchNorm1d) pairs become one layer.

    y = gamma * (W x + b - mean) / sqrt(var + eps) + beta
      = (W * s) x + (b - mean) * s + beta,        s = gamma / sqrt(var + eps)   (per output channel)

Pairs are found as consecutive children of an nn.Sequential (the layout of torchvision-style CNNs), and, given a
way to run the model, in any forward code (`self.bn1(self.conv1(x))` in a ResNet block): a BatchNorm whose input is
a layer's output tensor, kept when folding it leaves the model's output unchanged (to float rounding: the conv
output feeds nothing else). The BatchNorm is replaced by nn.Identity. Eval-mode semantics only (running statistics).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from ..functional import sqnr_db
from .conv1d import Conv1dAs2d

# A fold found by tracing is kept when the model output stays within this SQNR of itself (a relative RMS change of
# 1e-4): folding changes float rounding only (~1e-7 per layer); a conv output that also feeds something else moves
# it by O(1).
FOLD_MIN_SQNR_DB = 80.0
_LAYER_INDEX = re.compile(r"\.\d+(?=\.|$)")


def _fold_into(layer: nn.Conv2d | nn.Linear | Conv1dAs2d, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
    if isinstance(layer, Conv1dAs2d):
        layer = layer.conv2d
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


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    pair_ok = (isinstance(layer, nn.Conv2d) and type(bn) is nn.BatchNorm2d) or (
        isinstance(layer, nn.Linear | Conv1dAs2d) and type(bn) is nn.BatchNorm1d
    )
    if isinstance(layer, Conv1dAs2d):
        layer = layer.conv2d
    return (
        pair_ok and bn.track_running_stats and bn.running_mean is not None and bn.num_features == layer.weight.shape[0]
    )


def _set(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    old = model.get_submodule(name)
    model.set_submodule(name, module)
    return old


def _traced_pairs(model: nn.Module, run: Callable[[], torch.Tensor]) -> list[tuple[str, str]]:
    """(layer, BatchNorm) pairs where the BatchNorm's input is the layer's output tensor, each BatchNorm called once."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: list[tuple[str, str]] = []
    calls: dict[str, int] = {}
    hooks = []

    def out_hook(module, args, out):
        if isinstance(out, torch.Tensor):
            produced[id(out)] = (names[module], out)

    def bn_hook(module, args):
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        x = args[0] if args else None
        hit = produced.get(id(x)) if isinstance(x, torch.Tensor) else None
        if hit is not None and hit[1] is x:
            pairs.append((hit[0], name))

    for m in names:
        if isinstance(m, nn.Conv2d | nn.Linear | Conv1dAs2d):
            hooks.append(m.register_forward_hook(out_hook))
        elif type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
            hooks.append(m.register_forward_pre_hook(bn_hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    modules = dict(model.named_modules())
    return [(a, b) for a, b in dict.fromkeys(pairs) if calls[b] == 1 and _foldable(modules[a], modules[b])]


def _fold_pairs(model: nn.Module, pairs: list[tuple[str, str]]) -> list[tuple[nn.Module, dict, str, nn.Module]]:
    """Fold the pairs in place; returns what undoes it: (layer, its saved state, BatchNorm name, BatchNorm)."""
    undo = []
    modules = dict(model.named_modules())
    for a, b in pairs:
        layer, bn = modules[a], modules[b]
        layer = layer.conv2d if isinstance(layer, Conv1dAs2d) else layer
        saved = {
            "weight": layer.weight.detach().clone(),
            "bias": None if layer.bias is None else layer.bias.detach().clone(),
        }
        _fold_into(layer, bn)
        undo.append((layer, saved, b, _set(model, b, nn.Identity())))
    return undo


def _unfold(model: nn.Module, undo: list) -> None:
    with torch.no_grad():
        for layer, saved, b, bn in reversed(undo):
            layer.weight.copy_(saved["weight"])
            if saved["bias"] is None:
                layer.bias = None
            else:
                layer.bias.copy_(saved["bias"])
            _set(model, b, bn)


def _fold_traced(model: nn.Module, run: Callable[[], torch.Tensor]) -> list[str]:
    """Fold the traced pairs that keep the output; each kind (name without the layer index) tested once."""
    with torch.no_grad():
        ref = run().detach().clone()
    candidates = _traced_pairs(model, run)
    kinds: dict[tuple, bool] = {}
    for pair in candidates:
        kind = tuple(_LAYER_INDEX.sub(".#", n) for n in pair)
        if kind not in kinds:
            undo = _fold_pairs(model, [pair])
            with torch.no_grad():
                kinds[kind] = sqnr_db(ref, run()) >= FOLD_MIN_SQNR_DB
            _unfold(model, undo)
    accepted = [p for p in candidates if kinds[tuple(_LAYER_INDEX.sub(".#", n) for n in p)]]
    undo = _fold_pairs(model, accepted)
    with torch.no_grad():
        if accepted and sqnr_db(ref, run()) < FOLD_MIN_SQNR_DB:  # blocks of one kind that differ: one by one
            _unfold(model, undo)
            kept = []
            for pair in accepted:
                undo = _fold_pairs(model, [pair])
                if sqnr_db(ref, run()) >= FOLD_MIN_SQNR_DB:
                    kept.append(pair)
                    ref = run().detach().clone()
                else:
                    _unfold(model, undo)
            accepted = kept
    return [b for _, b in accepted]


def fold_batchnorm(model: nn.Module, run: Callable[[], torch.Tensor] | None = None) -> list[str]:
    """Fold every (Conv2d, BatchNorm2d) / (Linear, BatchNorm1d) pair of consecutive Sequential children, and given
    `run` (the model's main output on a fixed sample), the pairs a traced forward finds in any forward code.

    Modifies `model` in place (callers copy first) and returns the names of the folded BatchNorms.
    """
    folded = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for a, b in zip(names, names[1:], strict=False):
            layer, bn = parent._modules[a], parent._modules[b]
            if not _foldable(layer, bn):
                continue
            _fold_into(layer, bn)
            parent._modules[b] = nn.Identity()
            folded.append(f"{parent_name}.{b}" if parent_name else b)
    if run is not None:
        folded += _fold_traced(model, run)
    return folded
