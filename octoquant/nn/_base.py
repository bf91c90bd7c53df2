"""What QLinear and QConv2d share: backend choice, the packed-weight cache, weight quantization."""

from __future__ import annotations

import torch
from torch import nn

from ..config import Granularity, PerChannel, PerTensor, QDtype, QScheme
from ..functional import check_finite, quantize, reduce_minmax
from ..kernels import backend_for, get_backend
from ..qparams import choose_qparams

# Weights: symmetric int8, zero-point 0 (what int8 GEMMs, compressed-tensors and ONNX QDQ expect).
WEIGHT_SCHEME = QScheme(QDtype.INT8, symmetric=True, granularity=PerChannel(0))


# Elements per row block when quantizing a weight (bounds the float temporaries of a large matrix)
WEIGHT_ROWS_ELEMENTS = 1 << 20


def quantize_weight(
    weight: torch.Tensor, granularity: Granularity, name: str, weight_range: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float weight -> (int8 weight, float32 scale) with symmetric per-channel or per-group scales.

    `weight_range` (min, max) per channel, e.g. from an MSE observer, overrides plain min-max.
    """
    w = weight.detach().to(torch.float32)
    check_finite(w, f"weight of {name!r}")
    lo, hi = weight_range if weight_range is not None else reduce_minmax(w, granularity)
    scale, _ = choose_qparams(lo, hi, QDtype.INT8, symmetric=True)
    if isinstance(granularity, PerTensor) or w.dim() < 2:
        return quantize(w, scale, 0, granularity, QDtype.INT8), scale
    # per-channel / per-group scales run along dim 0: quantize in row blocks, so the float temporaries stay
    # small next to a large matrix (same element-wise arithmetic, same result)
    step = max(1, WEIGHT_ROWS_ELEMENTS // max(1, w[0].numel()))
    out = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for i in range(0, len(w), step):
        out[i : i + step] = quantize(w[i : i + step], scale[i : i + step], 0, granularity, QDtype.INT8)
    return out, scale


def input_qparams(input_range: tuple[float, float], input_dtype: QDtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor activation qparams: int8 symmetric, or uint8 asymmetric (the natural fit after ReLU)."""
    lo, hi = (torch.as_tensor(v, dtype=torch.float32) for v in input_range)
    return choose_qparams(lo, hi, input_dtype, symmetric=input_dtype is QDtype.INT8)


class CastInputError(TypeError):
    """A quantized layer got an integer input: its model casts the input to the layer's (int8) weight dtype."""


def check_float_input(module: nn.Module, x: torch.Tensor) -> None:
    """A quantized layer computes on float inputs; an integer one means the model cast it to the layer's weight
    dtype (int8 here): `x.to(layer.weight.dtype)`, as Hugging Face ViT / CLIP do before their patch embedding."""
    if not x.is_floating_point():
        raise CastInputError(
            f"{type(module).__name__} got a {x.dtype} input: the model casts its input to this layer's weight dtype "
            "(int8 once quantized). Keep the layer in float (exclude=[its name]), or quantize with calib=... so "
            "that oq.quantize finds such layers and keeps them in float"
        )


class QuantizedModule(nn.Module):
    """Keeps a backend-specific packed copy of the weights, rebuilt after loading or moving the buffers."""

    def __init__(self, backend: str | None) -> None:
        super().__init__()
        self.backend_name = backend
        self._packed = None
        self._qparams: tuple[float, int] | None = None

    @property
    def backend(self):
        return backend_for(self.weight.device) if self.backend_name is None else get_backend(self.backend_name)

    def packed(self):
        if self._packed is None:
            backend = self.backend
            self._packed = self._pack(backend)
            self._packed_backend = backend
            self._qparams = None
        return self._packed

    # per-process caches derived from the buffers: never pickled or deep-copied (a copy repacks lazily). Call plans
    # hold raw data addresses of these packed weights: a copy sharing them would read the original's memory.
    _CACHES = ("_packed", "_packed_backend", "_plans", "_plans_of", "_qparams", "_in_q", "_in_q_of", "_linear_plan")

    def __getstate__(self):
        state = dict(self.__dict__)
        for name in self._CACHES:
            state.pop(name, None)
        state["_packed"] = state["_qparams"] = None
        return state

    def packed_with_backend(self):
        """(backend, packed weights): the backend that packed them, without the per-call device lookup of
        `backend` (a buffer read through nn.Module.__getattr__, ~1 us: per-call cost on small decode layers)."""
        packed = self._packed
        if packed is None:
            packed = self.packed()
        backend = self.__dict__.get("_packed_backend")
        return (self.backend if backend is None else backend), packed

    def _static_qparams(self) -> tuple[float, int]:
        """(input scale, zero-point) as Python numbers, cached with the packed weights (no per-call .item())."""
        self.packed()
        if self._qparams is None:
            self._qparams = (float(self.input_scale), int(self.input_zero_point))
        return self._qparams

    def _set_quantized(self, weight_q, weight_scale, bias, input_range, name: str) -> None:
        """Set the buffers from quantized weights, the float bias and (static mode) the input range.

        Buffers are assigned, not copied into, so a module built on the meta device (see `from_float`) never
        holds a second, zero-filled copy of a large matrix.
        """
        if weight_q.shape != self.weight.shape or weight_q.dtype != torch.int8:
            raise ValueError(f"{name!r}: int8 weight of shape {tuple(self.weight.shape)} expected")
        dev = weight_q.device
        self.weight = weight_q.contiguous()
        self.weight_scale = weight_scale.detach().to(dev, torch.float32).reshape(self.weight_scale.shape).clone()
        if self.bias is not None:
            if bias is None:
                raise ValueError(f"{name!r}: the layer has a bias but none was given")
            self.bias = bias.detach().to(dev, torch.float32).reshape(self.bias.shape).clone()
        if hasattr(self, "input_scale"):  # static activations
            if input_range is None:
                raise ValueError(f"{name!r}: static W8A8 needs a calibrated input_range (min, max)")
            s, zp = input_qparams(input_range, self.input_dtype)
            self.input_scale = s.to(dev, torch.float32).reshape(())
            self.input_zero_point = zp.to(dev, torch.int32).reshape(())

    def _pack(self, backend):  # pragma: no cover - abstract
        raise NotImplementedError

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        """`.to(device)` moves everything; `.to(dtype)` / `.half()` leave the float32 scales and bias alone.

        Rounding scales to bf16 would change every dequantized value; activations in bf16 are still welcome
        (outputs take the input's dtype). The target device is read off `fn` applied to a 0-d probe.
        """
        self._packed = None
        device = fn(torch.zeros((), dtype=torch.float32, device=self.weight.device)).device
        keep = {k: b.to(device) for k, b in self._buffers.items() if b is not None and b.is_floating_point()}
        out = super()._apply(fn, recurse)
        self._buffers.update(keep)
        return out
