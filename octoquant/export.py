"""ONNX QDQ export of octoquant models, and verification in ONNX Runtime / OpenVINO.

    import octoquant as oq
    oq.export.onnx(qmodel, example, "model.onnx")            # QuantizeLinear / DequantizeLinear graph
    report = oq.export.verify(qmodel, "model.onnx", inputs)   # runtime vs octoquant, side by side

What the graph holds, per quantized module (the octoquant scales and zero-points, unchanged):
- weights: int8 initializers + per-output-channel `DequantizeLinear` (axis set), zero-point 0;
- static W8A8: the input through `QuantizeLinear` -> `DequantizeLinear` with the calibrated scale / zero-point;
- dynamic W8A8: octoquant's per-token scales computed in the graph (ReduceMax, Round) feeding
  `MatMulInteger` (int8 x int8 -> int32) and the rescale; or, with `dynamic="per-tensor"`, the QDQ form
  `DynamicQuantizeLinear` (uint8, one scale per tensor) -> `DequantizeLinear` -> MatMul;
- W8A16: the dequantized weight feeds a float MatMul (weight-only; per-group scales as Mul on the int8 weight);
- bias: float; int32 + `DequantizeLinear` (octoquant's bias_q) where the conv's output is requantized, so that
  OpenVINO, which adds a float bias as given, computes QLinearConv's (and octoquant's) integers too;
- fused ReLU / ReLU6 as `Relu` / `Clip` / `Min`.

Placement follows ONNX Runtime's and TensorRT's QDQ rules, so the runtimes fuse the pairs into integer
kernels: a convolution whose output is not read by a `QuantizeLinear` gets an output Q/DQ pair (ORT fuses
DQ -> Conv -> Q into QLinearConv), reusing the qparams of a QuantizeLinear that already reads the tensor, else
the range observed on `calib` (`quantize_branch_outputs=False` leaves residual-branch outputs float, as octoquant
computes them: closer to octoquant, slower in ORT); residual Adds stay float unless `quantize_adds`
(QLinearAdd / TensorRT's conv + add fusion). MatMul outputs stay float (ORT runs DQ -> MatMul as
MatMulIntegerToFloat / DynamicQuantizeMatMul). Modules with no QDQ mapping (layers kept in float) export in
float, with a warning.

`exact=True` exports static layers as the arithmetic octoquant itself performs instead, with no Q/DQ pairs added:
a convolution that requantizes for the next one (octoquant's integer requantization, which is QLinearConv's: int32
bias, one float32 multiplier) in the QDQ form ORT fuses into QLinearConv; one whose float output octoquant keeps as
octoquant's input quantization, the integer product (MatMulInteger for Linears and for 1x1 convs reading codes, in
NHWC order; a conv whose sums provably stay below 2**24 as a float Conv of the integers q - zp and w, exact in
float32 and on the runtime's fast float kernels; else ConvInteger), then octoquant's rescale
float32(acc) * (x_scale * w_scale) + bias. ONNX Runtime then reproduces octoquant's
integers bit for bit (MobileNetV2's 52 convolutions: identical feature maps), where the QDQ default's branch-output
pairs add roundings octoquant does not have: a file to verify a deployment against, slower than the QDQ default.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
import sys
import tempfile
import types
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import QDtype, QScheme, QuantMode
from .functional import cosine_similarity, sqnr_db
from .nn import QConv2d, QEmbedding, QLinear
from .nn._base import QuantizedModule
from .observers import make_observer

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
_MARK_DOMAIN = "octoquant"  # temporary marker nodes, removed before the file is written
RUNTIMES = ("onnxruntime", "openvino")
DYNAMIC_FORMS = ("per-token", "per-tensor")


class ExportError(ValueError):
    """The model cannot be exported as asked (unquantized model, bad inputs, existing file)."""


# ---------------------------------------------------------------------------------------------------------------
# Traceable ONNX ops: forward computes what the op computes (so tracing sees true shapes and dtypes), symbolic
# emits the ONNX node.


class _QuantizeLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point):
        # no `.to()` on x: a no-op cast returns x itself, and the tracer would then bind x's later uses to it
        qmin, qmax = (0, 255) if zero_point.dtype == torch.uint8 else (-128, 127)
        return (torch.round(x / scale) + zero_point.to(torch.int32)).clamp(qmin, qmax).to(zero_point.dtype)

    @staticmethod
    def symbolic(g, x, scale, zero_point):
        out = g.op("QuantizeLinear", x, scale, zero_point)
        out.setType(x.type().with_dtype(zero_point.type().dtype()))
        return out


class _DequantizeLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, scale, zero_point, axis):
        shape = [1] * q.dim()
        if scale.dim():
            shape[axis] = -1
        return (q.to(torch.float32) - zero_point.to(torch.float32).reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis):
        if scale.type().dim() in (None, 0):  # per-tensor: axis is not allowed to matter
            out = g.op("DequantizeLinear", q, scale, zero_point)
        else:
            out = g.op("DequantizeLinear", q, scale, zero_point, axis_i=axis)
        out.setType(q.type().with_dtype(torch.float32))  # typed: the exporter adds no Casts after it
        return out


class _DynamicQuantizeLinear(torch.autograd.Function):
    """ONNX DynamicQuantizeLinear: uint8, scale = (max(0, x) - min(0, x)) / 255, zero-point saturated-rounded."""

    @staticmethod
    def forward(ctx, x):
        xf = x.to(torch.float32)
        lo, hi = torch.clamp(xf.min(), max=0.0), torch.clamp(xf.max(), min=0.0)
        scale = (hi - lo) / 255.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.round(-lo / scale).clamp(0, 255)
        q = (torch.round(xf / scale) + zp).clamp(0, 255).to(torch.uint8)
        return q, scale, zp.to(torch.uint8)

    @staticmethod
    def symbolic(g, x):
        return g.op("DynamicQuantizeLinear", x, outputs=3)


class _MatMulInteger(torch.autograd.Function):
    """ONNX MatMulInteger: (a - a_zero_point) x b -> int32, b int8 with zero-point 0."""

    @staticmethod
    def forward(ctx, a, b, a_zero_point):
        a0 = a.to(torch.float64) - a_zero_point.to(torch.float64)
        return torch.matmul(a0, b.to(torch.float64)).round().to(torch.int32)

    @staticmethod
    def symbolic(g, a, b, a_zero_point):
        out = g.op("MatMulInteger", a, b, a_zero_point)
        out.setType(a.type().with_dtype(torch.int32))
        return out


class _ConvInteger(torch.autograd.Function):
    """ONNX ConvInteger: (x - x_zero_point) conv w -> int32, padding with the zero-point (a real 0), b int8."""

    @staticmethod
    def forward(ctx, x, w, x_zero_point, stride, padding, dilation, groups):
        x0 = x.to(torch.float64) - x_zero_point.to(torch.float64)
        return F.conv2d(x0, w.to(torch.float64), None, stride, padding, dilation, groups).round().to(torch.int32)

    @staticmethod
    def symbolic(g, x, w, x_zero_point, stride, padding, dilation, groups):
        out = g.op(
            "ConvInteger",
            x,
            w,
            x_zero_point,
            strides_i=list(stride),
            pads_i=[padding[0], padding[1], padding[0], padding[1]],
            dilations_i=list(dilation),
            group_i=groups,
        )
        out.setType(x.type().with_dtype(torch.int32))
        return out


class _CastToFloat(torch.autograd.Function):
    """An int8 weight as float32 values, cast in the graph: the file keeps the int8 initializer (1 byte per weight)
    and runtimes fold the Cast at load."""

    @staticmethod
    def forward(ctx, w):
        return w.to(torch.float32)

    @staticmethod
    def symbolic(g, w):
        out = g.op("Cast", w, to_i=1)  # TensorProto.FLOAT
        out.setType(w.type().with_dtype(torch.float32))
        return out


class _Mark(torch.autograd.Function):
    """Identity that tags a quantized module's float output with the module's name (for the placement pass)."""

    @staticmethod
    def forward(ctx, y, name):
        return y.clone()

    @staticmethod
    def symbolic(g, y, name):
        out = g.op(f"{_MARK_DOMAIN}::Mark", y, name_s=name)
        out.setType(y.type())
        return out


def _q(x: torch.Tensor, scale: float, zero_point: int, dtype: QDtype) -> torch.Tensor:
    s = torch.tensor(scale, dtype=torch.float32)
    z = torch.tensor(zero_point, dtype=dtype.torch_dtype)
    return _DequantizeLinear.apply(_QuantizeLinear.apply(x, s, z), s, z, 0)


def _dq_weight(weight: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    zp = torch.zeros(scale.shape, dtype=torch.int8)
    return _DequantizeLinear.apply(weight, scale, zp, axis)


# ---------------------------------------------------------------------------------------------------------------
# Export forwards of the quantized modules (patched in for the duration of the export)


def _input_qdq(m: QuantizedModule, x: torch.Tensor) -> torch.Tensor:
    if m.mode is QuantMode.W8A8_STATIC:
        scale, zp = m._static_qparams()
        return _q(x, scale, zp, m.input_dtype)
    if m.mode is QuantMode.W8A8_DYNAMIC:
        q, s, z = _DynamicQuantizeLinear.apply(x)
        return _DequantizeLinear.apply(q, s, z, 0)
    return x  # W8A16: float activations


def _per_token_linear(self: QLinear, x: torch.Tensor) -> torch.Tensor:
    """octoquant's dynamic W8A8 as ONNX ops: per-row absmax scale, Round (half to even), MatMulInteger, rescale."""
    absmax = x.abs().amax(dim=-1, keepdim=True)  # (..., 1)
    scale = torch.clamp(absmax / 127.0, min=torch.finfo(torch.float32).tiny)
    scale = torch.where(absmax == 0, torch.ones_like(scale), scale)
    # the int8 codes shifted by 128 into uint8 with zero-point 128: the same integers (sum (q + 128 - 128) * w),
    # and the u8 x s8 form CPU kernels run natively (VNNI); ORT's s8 x s8 path measured 2x slower than FP32
    xq = (torch.clamp(torch.round(x / scale), -128.0, 127.0) + 128.0).to(torch.uint8)
    acc = _MatMulInteger.apply(xq, self.weight.t(), torch.tensor(128, dtype=torch.uint8))
    # column scales first, row scales after: ORT fuses MatMulInteger -> Cast -> Mul(a_scale * b_scale) into
    # MatMulIntegerToFloat, which reads a (..., 1) row scale as a per-column one (wrong results, measured 7 dB)
    y = (acc.to(torch.float32) * self.weight_scale) * scale
    if self.bias is not None:
        y = y + self.bias
    return _Mark.apply(y, self._export_name)


def _exact_static_linear(self: QLinear, x: torch.Tensor) -> torch.Tensor:
    """octoquant's static W8A8 linear as integer ops: QuantizeLinear to uint8 codes, MatMulInteger, then
    float32(acc) * (x_scale * w_scale) + bias, octoquant's rescale in its order."""
    s, z = _static_qparams_u8(self)
    return _Mark.apply(_integer_matmul(self, _QuantizeLinear.apply(x, s, z), self.weight.t(), s, z), self._export_name)


def _integer_matmul(self: QuantizedModule, codes, w_t: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """MatMulInteger of uint8 codes (zero-point z) and int8 weights (K, N), then octoquant's rescale
    float32(acc) * (x_scale * w_scale) + bias in its order."""
    y = _MatMulInteger.apply(codes, w_t, z).to(torch.float32) * (s * self.weight_scale)
    return y + self.bias if self.bias is not None else y


def _qlinear_forward(self: QLinear, x: torch.Tensor) -> torch.Tensor:
    if self.mode is QuantMode.W8A8_DYNAMIC and self._export_dynamic == "per-token":
        return _per_token_linear(self, x)
    if self.mode is QuantMode.W8A8_STATIC and self._export_exact:
        return _exact_static_linear(self, x)
    flat = x.dim() == 2 and self.mode is not QuantMode.W8A16
    if flat:  # (M, K) -> (1, M, K): ORT fuses a 2-D MatMul + bias into a float Gemm before its QDQ fusions
        x = x.unsqueeze(0)
    xd = _input_qdq(self, x)
    wt = self.weight.t()  # (K, N): MatMul's layout, so DQ feeds MatMul directly (no Transpose in between)
    if self.group_size:  # W8A16 per-group: (N, K) as (N * K/g, g) rows, one scale each: a per-axis DQ
        k, n, g = self.in_features, self.out_features, self.group_size
        rows = _dq_weight(self.weight.reshape(n * (k // g), g), self.weight_scale.reshape(-1), axis=0)
        wd = rows.reshape(n, k).t()
    else:
        wd = _dq_weight(wt, self.weight_scale, axis=1)
    y = torch.matmul(xd, wd)
    if self.bias is not None:
        y = y + self.bias
    return _Mark.apply(y.squeeze(0) if flat else y, self._export_name)


def _integer_conv(self: QConv2d, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The exact integer conv of uint8 codes q (zero-point z; ConvInteger: ORT runs it on u8 x s8 kernels), then
    float32(acc) * (x_scale * w_scale) + bias in the order octoquant's rescale computes it."""
    acc = _ConvInteger.apply(q, self.weight, z, self.stride, self.padding, self.dilation, self.groups)
    y = acc.to(torch.float32) * (s * self.weight_scale).reshape(1, -1, 1, 1)
    return y + self.bias.reshape(1, -1, 1, 1) if self.bias is not None else y


def _sums_fit_float32(self: QConv2d, zero_point: int) -> bool:
    """Whether every partial sum of (q - zero_point) * w, for any uint8 codes q, is an integer below 2**24 in
    magnitude (max |q - zp| x the largest per-channel sum of |w|): float32 then computes the conv exactly, in any
    summation order, fused multiply-adds included."""
    l1 = self.weight.to(torch.int64).abs().flatten(1).sum(1).max()
    return int(l1) * max(zero_point, 255 - zero_point) < 2**24


def _float_valued_conv(self: QConv2d, x: torch.Tensor, s: torch.Tensor, zero_point: int) -> torch.Tensor:
    """The integer conv on integer-valued floats, exact where `_sums_fit_float32` holds, on the runtime's fast float
    kernels (ORT's ConvInteger ran MobileNetV2 at 40-67 ms per image against 12 ms for this form, measured):
    - q - zp = round(clamp(x / s, -zp, 255 - zp)): octoquant's quantization without the uint8 round trip (ORT's
      uint8 -> float conversions cost more than the conv);
    - the int8 weights cast to float in the graph (the file stays 1 byte per weight);
    - the rescale's per-channel factor read through an int32 DequantizeLinear, which runtimes leave unfolded:
      a constant Mul would be folded into the weights (ORT's Conv + Mul fusion), changing the products."""
    q0 = torch.round(torch.clamp(x / s, float(-zero_point), float(255 - zero_point)))
    return _conv_of_integers(self, q0, s)


def _conv_of_integers(self: QConv2d, q0: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float Conv of the integer-valued q0 and the int8 weights (cast in the graph), then octoquant's rescale."""
    acc = F.conv2d(q0, _CastToFloat.apply(self.weight), None, self.stride, self.padding, self.dilation, self.groups)
    c = self.out_channels
    ones, zeros = torch.ones(1, c, 1, 1, dtype=torch.int32), torch.zeros(c, dtype=torch.int32)
    y = acc * _DequantizeLinear.apply(ones, s * self.weight_scale, zeros, 1)
    return y + self.bias.reshape(1, -1, 1, 1) if self.bias is not None else y


def _codes_conv(self: QConv2d, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The exact conv of uint8 codes (a requantizing conv's QLinearConv output) with octoquant's float rescale: a
    1x1 conv as MatMulInteger on the codes in NHWC order (ORT keeps the graph NHWC around its QLinearConvs; 17
    such in MobileNetV2 cost less than the float form's conversions and reorders, measured); else as
    `_float_valued_conv` on q - zp = DequantizeLinear(codes, 1, zp) (exact integers) where the sums fit float32,
    else ConvInteger."""
    if _pointwise(self):  # a 1x1 conv is a MatMul over channels: MatMulInteger on the codes in NHWC order
        w_t = self.weight.reshape(self.out_channels, -1).t()
        return _integer_matmul(self, codes.permute(0, 2, 3, 1), w_t, s, z).permute(0, 3, 1, 2)
    if not _sums_fit_float32(self, int(z)):
        return _integer_conv(self, codes, s, z)
    q0 = _DequantizeLinear.apply(codes, torch.tensor(1.0, dtype=torch.float32), z, 0)
    return _conv_of_integers(self, q0, s)


def _pointwise(self: QConv2d) -> bool:
    return self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0) and self.groups == 1


def _static_qparams_u8(self: QuantizedModule) -> tuple[torch.Tensor, torch.Tensor]:
    """octoquant's static input qparams for uint8 codes: int8 data shifted by 128 (the zero-point too), the same
    integers q - zp that octoquant's kernels multiply."""
    scale, zp = self._static_qparams()
    shift = 128 if self.input_dtype is QDtype.INT8 else 0
    return torch.tensor(scale, dtype=torch.float32), torch.tensor(zp + shift, dtype=torch.uint8)


def _qconv_forward(self: QConv2d, x: torch.Tensor) -> torch.Tensor:
    if self.mode is QuantMode.W8A8_DYNAMIC and self.input_dtype is QDtype.UINT8:
        q, s, z = _DynamicQuantizeLinear.apply(x)
        y = _integer_conv(self, q, s, z)
    elif self.mode is QuantMode.W8A8_STATIC and self._export_exact and self.reader is None:
        # float output in octoquant: its arithmetic as is (a requantizing conv takes the QDQ form below: ORT's
        # QLinearConv computes octoquant's integer requantization bit for bit)
        s, z = _static_qparams_u8(self)
        if self._export_reads_codes:  # the input is a requantizing conv's codes: Q fuses into its QLinearConv
            y = _codes_conv(self, _QuantizeLinear.apply(x, s, z), s, z)
        elif _sums_fit_float32(self, int(z)):
            y = _float_valued_conv(self, x, s, int(z))
        else:
            y = _integer_conv(self, _QuantizeLinear.apply(x, s, z), s, z)
    else:
        xd = _input_qdq(self, x)
        wd = _dq_weight(self.weight, self.weight_scale, axis=0)
        y = F.conv2d(xd, wd, self.bias, self.stride, self.padding, self.dilation, self.groups)
    upper = self.output_clamp  # a fused ReLU (inf) / ReLU6 (6) / per-channel bound (ReLU6 after equalization)
    if upper is None:
        return _Mark.apply(y, self._export_name)
    if bool(torch.isinf(upper).all()):
        return _Mark.apply(torch.relu(y), self._export_name)
    if bool((upper == upper[0]).all()):
        return _Mark.apply(torch.clamp(y, 0.0, float(upper[0])), self._export_name)
    # per channel: the ReLU stays fusable into the conv, the Min follows the output Q/DQ pair (a float Min on
    # dequantized values, requantized by the next layer's Q; dropped when that Q saturates inside it)
    marked = _Mark.apply(torch.relu(y), self._export_name)
    return torch.minimum(marked, upper.reshape(1, -1, *([1] * (y.dim() - 2))))


def _qembedding_forward(self: QEmbedding, ids: torch.Tensor) -> torch.Tensor:
    """Gather the int8 rows first, then scale them: the table stays int8 in the file (no float copy folded in)."""
    rows = F.embedding(ids, self.weight).to(torch.float32)  # (..., D) int8 codes
    scale = F.embedding(ids, self.weight_scale.reshape(self.num_embeddings, -1))  # (..., 1) or (..., G)
    if self.group_size is None:
        out = rows * scale
    else:
        out = (rows.reshape(*rows.shape[:-1], -1, self.group_size) * scale.unsqueeze(-1)).reshape(rows.shape)
    return out if self.embed_scale == 1.0 else out * self.embed_scale


_EXPORT_FORWARDS = {QLinear: _qlinear_forward, QConv2d: _qconv_forward, QEmbedding: _qembedding_forward}


@contextlib.contextmanager
def _export_forwards(model: nn.Module, dynamic: str = "per-token", exact: bool = False):
    patched = []
    readers = {id(m.reader) for m in model.modules() if isinstance(m, QConv2d) and m.reader is not None}
    try:
        for name, m in model.named_modules():
            fwd = _EXPORT_FORWARDS.get(type(m))
            if fwd is not None:
                m.forward = types.MethodType(fwd, m)
                m._export_name, m._export_dynamic, m._export_exact = name, dynamic, exact
                m._export_reads_codes = id(m) in readers
                patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward
            del m._export_name
            del m._export_dynamic
            del m._export_exact
            del m._export_reads_codes


class LogitsOnly(nn.Module):
    """A causal LM as (input_ids, attention_mask) -> logits, without the KV cache: one exportable graph."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class KeywordCall(nn.Module):
    """A Hugging Face model called with keywords only: `forward(*tensors)` passes them as `keys`. The TorchScript
    exporter calls positionally and fills every parameter it is not given with its default, which transformers'
    config-default decorators then collide with (RoBERTa, Electra, GPT2Model: "got multiple values for argument
    'use_cache'"). `forward` gets a signature naming `keys`, so the exporter binds a dict example by name."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.keys = model, keys

        def forward(*tensors, **named):  # positional (the tracer) or by name (verify)
            return self.model(**dict(zip(self.keys, tensors, strict=False)), **named)

        params = [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in keys]
        forward.__signature__ = inspect.Signature(params)
        self.forward = forward


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def _is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face decoder-only generator (GenerationMixin, not encoder-decoder)."""
    tf = sys.modules.get("transformers")
    generation = getattr(tf, "GenerationMixin", None) if tf is not None else None
    if generation is None or not isinstance(model, generation):
        return False
    return not getattr(getattr(model, "config", None), "is_encoder_decoder", False)


def _export_view(model: nn.Module, example):
    """(module, example) to trace: a Hugging Face causal LM as `LogitsOnly` (its KV cache and generation arguments
    are no graph), fed {input_ids, attention_mask} from a tensor of ids or a tokenizer batch; any other Hugging Face
    model given token ids (a tensor, or a dict of tensors holding input_ids) is traced as a `KeywordCall`; anything
    else as given."""
    if isinstance(model, LogitsOnly | KeywordCall):
        return model, example
    if not _is_causal_lm(model):
        tf = sys.modules.get("transformers")
        if tf is None or not isinstance(model, tf.PreTrainedModel):
            return model, example
        if isinstance(example, torch.Tensor) and not example.is_floating_point():
            if "input_ids" in inspect.signature(model.forward).parameters:
                return KeywordCall(model, ("input_ids",)), example
        elif isinstance(example, Mapping) and "input_ids" in example:
            return KeywordCall(model, tuple(example)), example
        return model, example
    if isinstance(example, torch.Tensor) and not example.is_floating_point():
        ids, mask = example, None
    elif isinstance(example, Mapping) and "input_ids" in example:
        ids, mask = example["input_ids"], example.get("attention_mask")
    else:
        return model, example
    return LogitsOnly(model), {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else mask}


def _as_args(example) -> tuple[tuple, dict]:
    if isinstance(example, torch.Tensor):
        return (example,), {}
    if isinstance(example, Mapping):
        return (), dict(example)
    if isinstance(example, Sequence) and all(isinstance(t, torch.Tensor) for t in example):
        return tuple(example), {}
    raise ExportError(f"example inputs must be a tensor, a tuple of tensors or a dict of tensors, got {type(example)}")


def _input_names(args: tuple, kwargs: dict) -> list[str]:
    if kwargs:
        return list(kwargs)
    return ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]


def _default_dynamic_axes(names: list[str], tensors: list[torch.Tensor], outputs: list[str]) -> dict:
    """Batch (dim 0) everywhere; for integer inputs of 2+ dims (token ids, masks) also the sequence (dim 1): one
    "sequence" for those as long as the first, `<name>_sequence` for another length (a decoder's ids)."""
    axes = {}
    first = None
    for n, t in zip(names, tensors, strict=True):
        if t.dim() == 0:
            continue
        axes[n] = {0: "batch"}
        if t.dim() >= 2 and not t.is_floating_point():
            first = t.shape[1] if first is None else first
            axes[n][1] = "sequence" if t.shape[1] == first else f"{n}_sequence"
    for n in outputs:
        axes[n] = {0: "batch"}
    return axes


def _run(model: nn.Module, example):
    args, kwargs = _as_args(example)
    return model(*args, **kwargs)


@contextlib.contextmanager
def _without_kv_cache(model: nn.Module):
    """A Hugging Face model with `config.use_cache` on returns its KV cache (a Cache object the exporter cannot
    trace): off while exporting / verifying, the graph is (inputs) -> outputs, as `LogitsOnly` gives. Every config
    in the model: an encoder-decoder's stacks hold their own copies (T5)."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    on = [c for c in configs.values() if getattr(c, "use_cache", False) is True]
    for c in on:
        c.use_cache = False
    try:
        yield
    finally:
        for c in on:
            c.use_cache = True


def _flat_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flat_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flat_outputs(v)]
    return []


# ---------------------------------------------------------------------------------------------------------------
# Output ranges of the quantized convolutions (for the Q/DQ pairs ORT / TensorRT need at their outputs)


@torch.no_grad()
def _observe_outputs(model: nn.Module, batches: Iterable, calibrator: str) -> dict[str, tuple[float, float]]:
    convs = {n: m for n, m in model.named_modules() if isinstance(m, QConv2d)}
    observers = {n: make_observer(calibrator, QScheme(QDtype.UINT8, symmetric=False), name=n) for n in convs}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: observers[n].update(out.detach())) for n, m in convs.items()
    ]
    try:
        for b in batches:
            _run(model, b)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, ob in observers.items():
        lo, hi = ob.compute_range()
        out[n] = (float(lo), float(hi))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The placement pass on the ONNX graph


class _Graph:
    """Producer / consumer maps and constant lookup over an onnx GraphProto, with small edits."""

    def __init__(self, model) -> None:
        import onnx
        from onnx import numpy_helper

        self.onnx, self.numpy_helper = onnx, numpy_helper
        self.model, self.g = model, model.graph
        # standalone copies: protobuf repeated fields copy on extend, so edits work on this list (see commit)
        self.nodes = []
        for n in self.g.node:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            self.nodes.append(c)
        self._uid = 0
        self.refresh()

    def refresh(self) -> None:
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {t.name: t for t in self.g.initializer}

    def commit(self) -> None:
        """Write the edited node list back into the graph, topologically sorted (stable)."""
        ready = {i.name for i in self.g.input} | set(self.inits) | {""}
        pending, order = list(self.nodes), []
        while pending:
            rest = []
            for n in pending:
                if all(i in ready for i in n.input):
                    order.append(n)
                    ready.update(n.output)
                else:
                    rest.append(n)
            if len(rest) == len(pending):
                raise ExportError(f"the edited graph has a cycle or a missing input at node {rest[0].name}")
            pending = rest
        self.nodes = order
        used = {i for n in order for i in n.input} | {o.name for o in self.g.output}
        keep = [t for t in self.g.initializer if t.name in used]
        if len(keep) != len(self.g.initializer):  # constants of removed nodes
            kept = []
            for t in keep:
                c = self.onnx.TensorProto()
                c.CopyFrom(t)
                kept.append(c)
            del self.g.initializer[:]
            self.g.initializer.extend(kept)
        del self.g.node[:]
        self.g.node.extend(self.nodes)

    def const(self, name: str):
        """numpy value of an initializer or Constant output, else None."""
        if name in self.inits:
            return self.numpy_helper.to_array(self.inits[name])
        p = self.producer.get(name)
        if p is not None and p.op_type == "Constant":
            for a in p.attribute:
                if a.name == "value":
                    return self.numpy_helper.to_array(a.t)
        return None

    def fresh(self, base: str) -> str:
        self._uid += 1
        return f"{base}_oq{self._uid}"

    def add_const(self, base: str, value) -> str:
        name = self.fresh(base)
        self.g.initializer.append(self.numpy_helper.from_array(value, name))
        return name

    def qparams_of(self, node) -> tuple:
        """(scale, zero_point) numpy values of a Q / DQ node, None where not constant."""
        s = self.const(node.input[1])
        z = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return s, z

    def same_qparams(self, a, b) -> bool:
        import numpy as np

        (sa, za), (sb, zb) = self.qparams_of(a), self.qparams_of(b)
        if sa is None or sb is None or za is None or zb is None:
            return False
        return sa.shape == sb.shape and za.dtype == zb.dtype and np.array_equal(sa, sb) and np.array_equal(za, zb)

    def rename_input(self, node, old: str, new: str) -> None:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new

    def replace_uses(self, old: str, new: str) -> None:
        """Every reader of `old` (nodes and graph outputs) reads `new` instead."""
        for n in self.consumers.get(old, []):
            self.rename_input(n, old, new)
        for o in self.g.output:
            if o.name == old:
                self._alias_output(o.name, new)

    def _alias_output(self, out_name: str, src: str) -> None:
        self.nodes.append(self.onnx.helper.make_node("Identity", [src], [out_name], name=self.fresh("out")))

    def remove(self, nodes) -> None:
        ids = {id(n) for n in nodes}
        self.nodes = [n for n in self.nodes if id(n) not in ids]

    def insert_after(self, anchor, new_nodes) -> None:
        """Insert nodes right after `anchor` (keeps the node list topologically sorted)."""
        at = next(i for i, n in enumerate(self.nodes) if n is anchor) + 1
        self.nodes[at:at] = list(new_nodes)


def _constants_to_initializers(gr: _Graph) -> None:
    """Constant nodes (scales, zero-points, clamp bounds) become initializers: one place for every constant. An
    Identity of an initializer (the exporter shares equal tensors that way: a tied table, two layers with equal
    weights) gives way to the initializer itself, still stored once."""
    drop = []
    inits = {t.name for t in gr.g.initializer}
    outputs = {o.name for o in gr.g.output}
    for n in gr.nodes:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = gr.onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            gr.g.initializer.append(t)
            drop.append(n)
        elif n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs:
            gr.replace_uses(n.output[0], n.input[0])
            drop.append(n)
    gr.remove(drop)
    gr.refresh()


def _int8_conv_weights(gr: _Graph) -> int:
    """A Conv weight of int8 integers stored as float (the exporter folds an exact export's Cast) goes back to an
    int8 initializer cast in the graph: 1 byte per weight in the file, lossless. Returns the weights converted."""
    import numpy as np

    done = 0
    for n in list(gr.nodes):
        w = gr.const(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in gr.inits else None
        if w is None or w.dtype != np.float32 or (np.abs(w) > 127).any() or not np.array_equal(w, np.round(w)):
            continue
        name = gr.add_const(f"{n.input[1]}_int8", w.astype(np.int8))
        out = gr.fresh(f"{n.input[1]}_float")
        gr.nodes.append(
            gr.onnx.helper.make_node("Cast", [name], [out], to=gr.onnx.TensorProto.FLOAT, name=gr.fresh("Cast"))
        )
        n.input[1] = out
        done += 1
    gr.refresh()
    return done


def _merge_duplicate_quantize(gr: _Graph) -> None:
    """One QuantizeLinear per tensor and qparams (e.g. Q, K, V projections reading the same hidden state)."""
    drop = []
    for t, cons in list(gr.consumers.items()):
        qs = [c for c in cons if c.op_type == "QuantizeLinear" and c.input[0] == t]
        for i, a in enumerate(qs):
            if any(a is d for d in drop):
                continue
            for b in qs[i + 1 :]:
                if not any(b is d for d in drop) and gr.same_qparams(a, b):
                    gr.replace_uses(b.output[0], a.output[0])
                    drop.append(b)
    gr.remove(drop)
    gr.refresh()


def _quantize_outputs(
    gr: _Graph, kinds: dict[str, str], ranges: dict[str, tuple[float, float]], branches: bool = True
) -> list[str]:
    """Resolve the Mark nodes: a convolution output read by anything but a QuantizeLinear gets a Q/DQ pair.

    The pair reuses the qparams of a QuantizeLinear that already reads the tensor (calibrated by octoquant for
    exactly this tensor), else the observed output range. With `branches` False, an output read by an Add with
    no Q to reuse (a residual branch, float in octoquant) keeps no pair. Returns the modules left without a pair
    for want of a range, and the number of pairs given an observed range (a rounding octoquant does not have).
    """
    import numpy as np

    unquantized, observed = [], 0
    for mark in [n for n in gr.nodes if n.op_type == "Mark" and n.domain == _MARK_DOMAIN]:
        name = next(a.s.decode() for a in mark.attribute if a.name == "name")
        y, m = mark.input[0], mark.output[0]
        cons = gr.consumers.get(m, [])
        qs = [c for c in cons if c.op_type == "QuantizeLinear"]
        others = [c for c in cons if c.op_type != "QuantizeLinear"]
        # qparams to reuse: a Q reading this tensor, or one reading it through a clamp (Min / Clip / Relu)
        reuse = qs or (
            [c for c in gr.consumers.get(others[0].output[0], []) if c.op_type == "QuantizeLinear"]
            if len(others) == 1 and others[0].op_type in ("Min", "Clip", "Relu")
            else []
        )
        gr.replace_uses(m, y)
        gr.remove([mark])
        if kinds.get(name) != "conv" or not others:
            continue  # MatMul / Gemm / dynamic Conv run integer with a float output; Conv -> Q already fuses
        if not branches and not reuse and any(c.op_type == "Add" for c in others):
            continue  # a residual branch left float, as octoquant computes it
        if reuse:
            s_name, z_name = reuse[0].input[1], reuse[0].input[2]
        elif name in ranges:
            from .qparams import choose_qparams

            lo, hi = ranges[name]
            s, z = choose_qparams(torch.tensor(lo), torch.tensor(hi), QDtype.UINT8, symmetric=False)
            s_name = gr.add_const(f"{name}.output_scale", np.array(float(s), dtype=np.float32))
            z_name = gr.add_const(f"{name}.output_zero_point", np.array(int(z), dtype=np.uint8))
            observed += 1
        else:
            unquantized.append(name)
            continue
        qn, dn = gr.fresh(f"{name}.output_q"), gr.fresh(f"{name}.output_dq")
        helper = gr.onnx.helper
        q = helper.make_node("QuantizeLinear", [y, s_name, z_name], [qn], name=gr.fresh("Q"))
        dq = helper.make_node("DequantizeLinear", [qn, s_name, z_name], [dn], name=gr.fresh("DQ"))
        gr.insert_after(gr.producer[y], [q, dq])
        for c in others:
            gr.rename_input(c, y, dn)
        for c in qs:
            if gr.same_qparams(c, q):  # the same quantization: its readers take the new Q's output
                for r in gr.consumers.get(c.output[0], []):
                    gr.rename_input(r, c.output[0], qn)
                gr.remove([c])
        gr.refresh()
    return unquantized, observed


def _q_limits(gr: _Graph, q) -> tuple[float, float] | None:
    """The float range a QuantizeLinear can represent: ((qmin - zp) * s, (qmax - zp) * s), per-tensor only."""
    s, z = gr.qparams_of(q)
    if s is None or z is None or s.ndim or z.ndim:
        return None
    qmin, qmax = (0, 255) if z.dtype.kind == "u" else (-128, 127)
    return (qmin - int(z)) * float(s), (qmax - int(z)) * float(s)


def _reader_limits(gr: _Graph, r) -> tuple[float, float] | None:
    """The float range a quantizing reader keeps distinct: a QuantizeLinear, or an exact export's Div by the scale
    -> Clip to the integer bounds -> Round (a value clamped within an ulp of an integer bound rounds to it)."""
    if r.op_type == "QuantizeLinear":
        return _q_limits(gr, r)
    s = gr.const(r.input[1]) if r.op_type == "Div" else None
    if s is None or s.ndim:
        return None
    chain, node = [], r
    for op in ("Clip", "Round"):
        readers = gr.consumers.get(node.output[0], [])
        if len(readers) != 1 or readers[0].op_type != op:
            return None
        node = readers[0]
        chain.append(node)
    clip = chain[0]
    if len(clip.input) < 3 or not clip.input[1] or not clip.input[2]:
        return None
    lo, hi = gr.const(clip.input[1]), gr.const(clip.input[2])
    if lo is None or hi is None:
        return None
    return float(lo) * float(s), float(hi) * float(s)


def _drop_redundant_clamps(gr: _Graph) -> int:
    """Bypass a Relu / Clip / Min (with constant bounds) read only by quantizing readers that saturate inside it
    (QuantizeLinear, or an exact export's Div -> Clip -> Round; see `_reader_limits`).

    Q(min(y, u)) == Q(y) when every u >= the Q's largest representable value (and likewise for lower bounds):
    exact, and it keeps conv -> Q chains free of float islands (a per-channel ReLU6 bound after depthwise
    equalization would otherwise stop ORT at every block). Returns the number of nodes removed.
    """
    drop = []
    for n in gr.nodes:
        if n.op_type not in ("Relu", "Clip", "Min"):
            continue
        readers = gr.consumers.get(n.output[0], [])
        if not readers or any(r.op_type not in ("QuantizeLinear", "Div") for r in readers):
            continue
        if any(o.name == n.output[0] for o in gr.g.output):
            continue
        lo, hi = -math.inf, math.inf
        if n.op_type == "Relu":
            lo = 0.0
        elif n.op_type == "Clip":
            vals = [gr.const(i) if i else None for i in list(n.input[1:3]) + [""] * (3 - len(n.input))]
            if (n.input[1:2] and vals[0] is None) or (len(n.input) > 2 and n.input[2] and vals[1] is None):
                continue
            lo = float(vals[0]) if vals[0] is not None else -math.inf
            hi = float(vals[1]) if vals[1] is not None else math.inf
        else:
            if len(n.input) != 2 or gr.const(n.input[1]) is None:
                continue
            hi = float(gr.const(n.input[1]).min())
        limits = [_reader_limits(gr, r) for r in readers]
        if any(lim is None or lim[0] < lo or lim[1] > hi for lim in limits):
            continue
        for r in readers:
            gr.rename_input(r, n.output[0], n.input[0])
        drop.append(n)
    gr.remove(drop)
    gr.refresh()
    return len(drop)


def _integer_clamps(gr: _Graph) -> int:
    """DQ -> Min(constant bounds) -> Q, both Q/DQ at the same per-tensor qparams, becomes a Min on the codes:
    Q(min(DQ(q), u)) == min(q, Q(u)) (quantization is monotone; Q(DQ(q)) == q), so the conv before and the conv
    after keep their QLinearConv fusions and the float round trip goes (a per-channel ReLU6 bound left by
    equalization cost MobileNetV2 2.2 ms of Min plus its Q / DQ at batch 8 in ORT). Returns the Mins rewritten."""
    import numpy as np

    done = []
    for mn in [n for n in gr.nodes if n.op_type == "Min" and len(n.input) == 2]:
        dq, u = gr.producer.get(mn.input[0]), gr.const(mn.input[1])
        readers = gr.consumers.get(mn.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or u is None or not readers:
            continue
        if len(gr.consumers.get(dq.output[0], [])) != 1 or any(o.name == dq.output[0] for o in gr.g.output):
            continue
        if any(r.op_type != "QuantizeLinear" or not gr.same_qparams(r, dq) for r in readers):
            continue
        if any(o.name in (mn.output[0], *(r.output[0] for r in readers)) for o in gr.g.output):
            continue
        s, z = gr.qparams_of(dq)
        if s.ndim or z.ndim:
            continue
        qmin, qmax = (0, 255) if z.dtype == np.uint8 else (-128, 127)
        codes = np.clip(np.round(u.astype(np.float32) / s) + int(z), qmin, qmax).astype(z.dtype)
        name = gr.fresh(f"{mn.output[0]}_codes")
        bound = gr.add_const(f"{mn.output[0]}_code_bound", codes)
        gr.nodes.append(gr.onnx.helper.make_node("Min", [dq.input[0], bound], [name], name=gr.fresh("Min")))
        for r in readers:  # the Q's readers (DequantizeLinear nodes) read the clamped codes
            for c in gr.consumers.get(r.output[0], []):
                gr.rename_input(c, r.output[0], name)
        done.append([dq, mn, *readers])
    gr.remove([n for group in done for n in group])
    gr.refresh()
    return len(done)


def _collapse_requantize(gr: _Graph) -> None:
    """DQ -> Q with the same qparams is the identity on the integers: readers of the Q read the first Q's output."""
    drop = []
    for q in gr.nodes:
        if q.op_type != "QuantizeLinear":
            continue
        dq = gr.producer.get(q.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or not gr.same_qparams(q, dq):
            continue
        if any(o.name == q.output[0] for o in gr.g.output):
            continue
        for r in gr.consumers.get(q.output[0], []):
            gr.rename_input(r, q.output[0], dq.input[0])
        drop.append(q)
    gr.remove(drop)
    gr.refresh()
    # DQ nodes left without readers
    gr.remove(
        [
            n
            for n in gr.nodes
            if n.op_type == "DequantizeLinear"
            and not gr.consumers.get(n.output[0])
            and not any(o.name == n.output[0] for o in gr.g.output)
        ]
    )
    gr.refresh()


def _requantizing_readers_only(gr: _Graph, out: str) -> bool:
    """Every reader of `out`, through Relu / Clip / Min, is a QuantizeLinear: the tensor only exists as codes."""
    cons = gr.consumers.get(out, [])
    if not cons or any(o.name == out for o in gr.g.output):
        return False
    for c in cons:
        if c.op_type == "QuantizeLinear" and c.input[0] == out:
            continue
        if c.op_type in ("Relu", "Clip", "Min") and c.input[0] == out and _requantizing_readers_only(gr, c.output[0]):
            continue
        return False
    return True


def _integer_conv_biases(gr: _Graph) -> int:
    """The float bias of a QDQ Conv whose output is requantized becomes int32 + DequantizeLinear (scale x_scale *
    w_scale per channel, axis 0), bias_q = round_half_even(bias / (x_scale * w_scale)) in float32: the integer bias
    octoquant's requantization adds (`kernels.reference.requantization`) and ONNX Runtime's QLinearConv derives
    from a float bias itself. OpenVINO adds a float bias as given: float32(acc) * s + bias instead of
    (acc + bias_q) * s moves a code by one step now and then, which every later layer amplifies (a 1x1 -> ReLU ->
    1x1 chain: 4% of its outputs differed from octoquant's, none with int32 biases; measured). Returns the biases
    converted."""
    import numpy as np

    from .kernels.reference import requantization

    done = 0
    for n in list(gr.nodes):
        if n.op_type != "Conv" or len(n.input) < 3 or n.input[2] not in gr.inits:
            continue
        xdq, wdq = gr.producer.get(n.input[0]), gr.producer.get(n.input[1])
        if xdq is None or wdq is None or xdq.op_type != "DequantizeLinear" or wdq.op_type != "DequantizeLinear":
            continue
        sx, sw, bias = gr.qparams_of(xdq)[0], gr.qparams_of(wdq)[0], gr.const(n.input[2])
        if sx is None or sw is None or sx.size != 1 or bias.dtype != np.float32 or sw.size not in (1, bias.size):
            continue
        if not _requantizing_readers_only(gr, n.output[0]):
            continue  # a float output: octoquant adds the float bias
        sw_t = torch.from_numpy(np.broadcast_to(sw.astype(np.float32).reshape(-1), bias.shape).copy())
        # with an output scale of 1 the multiplier is the bias scale x_scale * w_scale itself
        s, bq = requantization(float(sx.reshape(())), sw_t, torch.from_numpy(bias.copy()), 1.0)
        q_name = gr.add_const(f"{n.input[2]}_int32", bq.numpy().astype(np.int32))
        s_name = gr.add_const(f"{n.input[2]}_scale", s.numpy().astype(np.float32))
        out = gr.fresh(f"{n.input[2]}_dq")
        gr.nodes.append(
            gr.onnx.helper.make_node("DequantizeLinear", [q_name, s_name], [out], axis=0, name=gr.fresh("DQ"))
        )
        n.input[2] = out
        done += 1
    gr.refresh()
    return done


def _quantize_residual_adds(gr: _Graph) -> int:
    """An Add whose sum is quantized reads DQ'd inputs (ORT: QLinearAdd; TensorRT: the Add fuses into the conv).

    An input with a QuantizeLinear reader reads its DequantizeLinear instead of the float tensor. Returns the
    number of inputs rewired.
    """
    rewired = 0
    for add in [n for n in gr.nodes if n.op_type == "Add"]:
        if not any(c.op_type == "QuantizeLinear" for c in gr.consumers.get(add.output[0], [])):
            continue
        for i, t in enumerate(add.input):
            p = gr.producer.get(t)
            if p is not None and p.op_type == "DequantizeLinear":
                continue
            qs = [c for c in gr.consumers.get(t, []) if c.op_type == "QuantizeLinear"]
            if not qs:
                continue
            q = qs[0]
            dn = gr.fresh(f"{t}_dq")
            dq = gr.onnx.helper.make_node("DequantizeLinear", [q.output[0], *q.input[1:3]], [dn], name=gr.fresh("DQ"))
            gr.insert_after(q, [dq])
            add.input[i] = dn
            rewired += 1
            gr.refresh()
    return rewired


# ---------------------------------------------------------------------------------------------------------------
# Checker


_COMPUTE = {"Conv": 1, "MatMul": 1, "Gemm": 1}  # op -> index of the weight input


@dataclass(frozen=True)
class QDQCheck:
    """What the placement check found: integer-ready layers, weight-only layers, float layers, problems."""

    integer: tuple[str, ...]
    weight_only: tuple[str, ...]
    float_layers: tuple[str, ...]
    problems: tuple[str, ...]


def _int8_cast(gr: _Graph, node) -> bool:
    """A Cast of an int8 constant (an exact export's conv weight)."""
    import numpy as np

    return node is not None and node.op_type == "Cast" and getattr(gr.const(node.input[0]), "dtype", None) == np.int8


def _integer_values(gr: _Graph, dq) -> bool:
    """A DequantizeLinear with scale 1: codes as the integers q - zp (an exact export's `_codes_conv`)."""
    if dq is None or dq.op_type != "DequantizeLinear":
        return False
    s, _ = gr.qparams_of(dq)
    return s is not None and s.ndim == 0 and float(s) == 1.0


def _reads_codes(gr: _Graph, q, reader) -> bool:
    """`reader` takes the codes of QuantizeLinear `q` as QDQ intends: a DequantizeLinear with q's qparams, or with
    q's zero-point and scale 1 (the integers q - zp)."""
    if reader.op_type != "DequantizeLinear":
        return False
    import numpy as np

    if gr.same_qparams(q, reader):
        return True
    (_, zr), (_, zq) = gr.qparams_of(reader), gr.qparams_of(q)
    return _integer_values(gr, reader) and zr is not None and zq is not None and np.array_equal(zr, zq)


def _codes_read_right(gr: _Graph, q, c, z) -> bool:
    """Whether node `c` reads the codes of QuantizeLinear `q` (zero-point z) as an integer pipeline does: a DQ with
    q's qparams (or scale 1: the integers), an integer op with q's zero-point, or a clamp on the codes
    (`_integer_clamps`) / a layout Transpose passing them on to such readers."""
    import numpy as np

    if c.op_type in ("ConvInteger", "MatMulInteger"):  # the codes' zero-point is the Q's
        return len(c.input) > 2 and np.array_equal(gr.const(c.input[2]), z)
    readers = gr.consumers.get(c.output[0], [])
    if c.op_type == "Min":
        if getattr(gr.const(c.input[1]), "dtype", None) != z.dtype:
            return False
        return bool(readers) and all(_codes_read_right(gr, q, d, z) for d in readers)
    if c.op_type == "Transpose":
        return bool(readers) and all(_codes_read_right(gr, q, d, z) for d in readers)
    return _reads_codes(gr, q, c)


def check(model_or_path) -> QDQCheck:
    """onnx.checker (full) plus the QDQ placement rules the runtimes' fusions need.

    Rules: a DequantizeLinear has constant float32 scales and int8/uint8 zero-points, per-axis scales as long as
    the axis; a QuantizeLinear is read only by DequantizeLinear nodes with the same qparams; a weight DQ is int8
    with zero-point 0 (symmetric); a Conv with DQ'd input and weight writes to exactly one QuantizeLinear.
    """
    import numpy as np
    import onnx

    model = onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    onnx.checker.check_model(model, full_check=True)
    gr = _Graph(model)
    problems, integer, weight_only, floats = [], [], [], []
    for n in gr.nodes:
        label = n.name or n.output[0]
        src = gr.producer.get(n.input[0]) if n.input else None
        if n.op_type == "DequantizeLinear" and src is not None and src.op_type == "DynamicQuantizeLinear":
            pass  # run-time qparams
        elif n.op_type == "DequantizeLinear" and getattr(gr.const(n.input[0]), "dtype", None) == np.int32:
            pass  # an int32 constant (an exact export's per-channel rescale), not an activation
        elif n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            s, z = gr.qparams_of(n)
            if s is None or s.dtype != np.float32:
                problems.append(f"{n.op_type} {label}: scale is not a float32 constant")
                continue
            if z is None or z.dtype not in (np.int8, np.uint8):
                problems.append(f"{n.op_type} {label}: zero-point is not an int8/uint8 constant")
                continue
            if s.shape != z.shape:
                problems.append(f"{n.op_type} {label}: scale {s.shape} and zero-point {z.shape} differ in shape")
            if s.ndim == 1:
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                w = gr.const(n.input[0])
                if w is not None and w.shape[axis] != s.shape[0]:
                    problems.append(f"{label}: {s.shape[0]} scales for axis {axis} of size {w.shape[axis]}")
            if (s <= 0).any() or not np.isfinite(s).all():
                problems.append(f"{n.op_type} {label}: non-positive or non-finite scale")
            if n.op_type == "QuantizeLinear":
                for c in gr.consumers.get(n.output[0], []):
                    if not _codes_read_right(gr, n, c, z):
                        problems.append(f"QuantizeLinear {label}: read by {c.op_type} {c.name} without matching DQ")
        if n.op_type in ("MatMulInteger", "ConvInteger"):
            w = gr.const(n.input[1])
            (integer if w is not None and w.dtype == np.int8 else floats).append(label)
            continue
        if n.op_type not in _COMPUTE or len(n.input) <= _COMPUTE[n.op_type]:
            continue
        wp = gr.producer.get(n.input[_COMPUTE[n.op_type]])
        xp = gr.producer.get(n.input[0])
        if (
            n.op_type == "Conv"
            and _int8_cast(gr, wp)
            and xp is not None
            and (xp.op_type == "Round" or _integer_values(gr, xp))
        ):
            integer.append(label)  # an exact export's conv of integers (`_float_valued_conv`): float out by design
            continue
        w_dq = wp is not None and wp.op_type == "DequantizeLinear" and gr.const(wp.input[0]) is not None
        if not w_dq:
            if wp is None or wp.op_type != "Mul":  # per-group weight-only: Cast * scales
                floats.append(label)
            else:
                weight_only.append(label)
            continue
        wq, (_, wz) = gr.const(wp.input[0]), gr.qparams_of(wp)
        if wq.dtype != np.int8 or wz is None or (wz != 0).any():
            problems.append(f"{n.op_type} {label}: weight is not symmetric int8 (dtype {wq.dtype})")
        if xp is None or xp.op_type != "DequantizeLinear":
            weight_only.append(label)
            continue
        integer.append(label)
        if n.op_type == "Conv":
            cons = gr.consumers.get(n.output[0], [])
            # a fused activation may sit between (ORT removes Relu / Clip ahead of a Q that clamps the same)
            while len(cons) == 1 and cons[0].op_type in ("Relu", "Clip"):
                cons = gr.consumers.get(cons[0].output[0], [])
            if len(cons) != 1 or cons[0].op_type != "QuantizeLinear":
                problems.append(f"Conv {label}: output not read by exactly one QuantizeLinear (no integer fusion)")
    return QDQCheck(tuple(integer), tuple(weight_only), tuple(floats), tuple(problems))


# ---------------------------------------------------------------------------------------------------------------
# Export


@dataclass(frozen=True)
class ExportReport:
    """What `onnx()` wrote: the file, the quantized modules, float layers, Q/DQ pairs added, the check."""

    path: str
    opset: int
    quantized_modules: int
    float_modules: tuple[str, ...]
    output_pairs: int  # convolution outputs given a Q/DQ pair at an observed range (a rounding octoquant lacks)
    residual_inputs: int
    check: QDQCheck
    input_names: tuple[str, ...] = field(default=())
    output_names: tuple[str, ...] = field(default=())


def _float_compute_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)]


def onnx(
    qmodel: nn.Module,
    example_inputs,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    calib: Iterable | None = None,
    calibrator: str = "mse",
    quantize_adds: bool = False,
    quantize_branch_outputs: bool = True,
    dynamic: str = "per-token",
    exact: bool = False,
    dynamic_axes: dict | None = None,
    output_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Export an octoquant model as an ONNX QDQ graph (see the module docstring for what it holds).

    Args:
        qmodel: a model returned by `oq.quantize` (or holding QLinear / QConv2d modules).
        example_inputs: a tensor, a tuple of tensors, or a dict of keyword tensors (e.g. a tokenizer batch).
        calib: batches (same form as example_inputs) to observe the output ranges of convolutions the runtimes
            need quantized (see module docstring); default: the example inputs.
        calibrator: observer for those ranges (minmax, percentile, entropy, mse).
        quantize_adds: also quantize the inputs of residual Adds whose sum is quantized (ORT QLinearAdd,
            TensorRT's conv + add fusion). Off by default: the residual stream then reuses a clipped scale, which
            cost MobileNetV2 KL 0.037 -> 0.13 against FP32 (measured); the Add runs in float instead.
        quantize_branch_outputs: give a convolution whose output feeds a residual Add (octoquant keeps it float)
            an output Q/DQ pair over its observed range, so ORT fuses it into QLinearConv: the speed default.
            False keeps those outputs float, as octoquant computes them (ORT then runs those convolutions on
            dequantized weights). Measured on MobileNetV2 in ORT (256 crops, KL vs FP32 / batch-1 ms):
            True 0.0399 / 2.57 ms, False 0.0295 / 4.30 ms; octoquant itself 0.0271.
        dynamic: how dynamic W8A8 layers export: "per-token" (octoquant's numerics: per-row absmax scales,
            Round, MatMulInteger int8 x int8 -> int32, rescale; ORT and OpenVINO run it on integer kernels) or
            "per-tensor" (QDQ form: DynamicQuantizeLinear uint8 -> DequantizeLinear -> MatMul, which ORT fuses
            into DynamicQuantizeMatMul and OpenVINO runs as i8 FullyConnected; a coarser quantization than
            octoquant's). OpenVINO runs MatMulInteger in f32: use "per-tensor" for OpenVINO.
        exact: export static W8A8 layers as the arithmetic octoquant itself performs, with no added Q/DQ pairs. A
            convolution that requantizes its output for the next one (`QConv2d.requantize_for`: octoquant's
            integer requantization, the arithmetic of ORT's QLinearConv) takes the QDQ form, which ORT fuses into
            QLinearConv; one whose float output octoquant keeps (a residual add reads it) is written as
            octoquant's quantization of the input, the integer product (MatMulInteger for a 1x1 conv reading
            codes and for Linears; a float Conv of the integers where its sums provably stay below 2**24; else
            ConvInteger), then float32(acc) * (x_scale * w_scale) + bias in octoquant's order. ORT then
            reproduces octoquant's integers bit for bit (MobileNetV2: 36 QLinearConv + 17 MatMulInteger, feature
            maps identical, 1.3-1.8x faster than ORT FP32), a little slower than the QDQ default, whose
            branch-output pairs add a rounding octoquant does not have and so agree with octoquant only to it.
        dynamic_axes: torch.onnx dynamic axes; default: dim 0 of every input and output is "batch", dim 1 of
            integer inputs (token ids, masks) is "sequence".
        overwrite: replace an existing file (default: refuse).

    The file is written atomically; the model is left unchanged.
    """
    import onnx as onnx_lib

    path = Path(path)
    if path.exists() and not overwrite:
        raise ExportError(f"{path} exists (pass overwrite=True to replace it)")
    if not path.parent.is_dir():
        raise ExportError(f"folder {path.parent} does not exist")
    if dynamic not in DYNAMIC_FORMS:
        raise ExportError(f"unknown dynamic form {dynamic!r}; valid: {', '.join(DYNAMIC_FORMS)}")
    if exact and quantize_adds:
        raise ExportError(
            "exact=True keeps octoquant's float residual adds: it cannot also quantize them (quantize_adds)"
        )
    if not 13 <= opset <= 20:
        raise ExportError(f"opset {opset} not supported: per-axis QDQ needs >= 13, the exporter supports <= 20")
    user_model = qmodel
    qmodel, example_inputs = _export_view(*_float32_view(qmodel, example_inputs))
    if calib is not None:
        calib = [_as_float32(_export_view(user_model, b)[1]) for b in calib]
    qmods = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantizedModule)}
    if not qmods:
        raise ExportError("the model has no quantized layers: quantize it first (oq.quantize), then export")
    floats = _float_compute_modules(qmodel)
    if floats:
        shown = ", ".join(floats[:8]) + (f" and {len(floats) - 8} more" if len(floats) > 8 else "")
        warnings.warn(f"{len(floats)} layer(s) have no int8 form and export in float: {shown}", stacklevel=2)
    outliers = [n for n, m in qmods.items() if isinstance(m, QLinear) and m.outlier_threshold is not None]
    if outliers:
        warnings.warn(
            f"{len(outliers)} layer(s) use LLM.int8() outlier decomposition, which ONNX QDQ cannot express: "
            "they export as plain dynamic W8A8",
            stacklevel=2,
        )
    args, kwargs = _as_args(example_inputs)
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad(), _without_kv_cache(qmodel):
            ref_out = _flat_outputs(qmodel(*args, **kwargs))
            ranges = (
                {} if exact else _observe_outputs(qmodel, calib if calib is not None else [example_inputs], calibrator)
            )
        in_names = _input_names(args, kwargs)
        out_names = (
            list(output_names)
            if output_names
            else (["output"] if len(ref_out) == 1 else [f"output_{i}" for i in range(len(ref_out))])
        )
        in_tensors = list(kwargs.values()) if kwargs else list(args)
        axes = dynamic_axes if dynamic_axes is not None else _default_dynamic_axes(in_names, in_tensors, out_names)
        with (
            tempfile.TemporaryDirectory() as tmp,
            _without_kv_cache(qmodel),
            _export_forwards(qmodel, dynamic, exact),
            torch.no_grad(),
            warnings.catch_warnings(),
        ):
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice
            raw = os.path.join(tmp, "raw.onnx")
            try:
                torch.onnx.export(
                    qmodel,
                    args + ((kwargs,) if kwargs else ()),
                    raw,
                    input_names=in_names,
                    output_names=out_names,
                    dynamic_axes=axes,
                    opset_version=opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
            except torch.onnx.errors.UnsupportedOperatorError as e:  # e.g. aten::histc in a mixture-of-experts router
                first = str(e).splitlines()[0]
                hint = (
                    " (transformers derives masks with aten::diff when none is given: pass attention_mask, and "
                    "decoder_attention_mask for an encoder-decoder, in the example inputs)"
                    if "aten::diff" in first
                    else ""
                )
                raise ExportError(
                    f"the model's own code uses an op the ONNX exporter cannot write: {first}{hint}"
                ) from e
            model = onnx_lib.load(raw)
    finally:
        qmodel.train(was_training)
    # static convolutions get output Q/DQ pairs (ORT then fuses QLinearConv); a dynamic one's output is float in
    # octoquant, and a pair there would add a rounding (at a range fixed on the example) octoquant does not have;
    # neither does an exact export's ConvInteger
    kinds = {
        n: ("conv" if m.mode is QuantMode.W8A8_STATIC and (not exact or m.reader is not None) else "integer-conv")
        if isinstance(m, QConv2d)
        else "linear"
        for n, m in qmods.items()
    }
    gr = _Graph(model)
    _constants_to_initializers(gr)
    _merge_duplicate_quantize(gr)
    unquantized, pairs = _quantize_outputs(gr, kinds, ranges, quantize_branch_outputs)
    residual = _quantize_residual_adds(gr) if quantize_adds else 0
    _merge_duplicate_quantize(gr)
    while _drop_redundant_clamps(gr):  # a Relu before a dropped Min may be redundant now
        pass
    if exact:
        _int8_conv_weights(gr)
    _integer_clamps(gr)
    _collapse_requantize(gr)
    _integer_conv_biases(gr)
    if unquantized:
        log.warning("no output range for %s: their convolutions stay float in ORT", ", ".join(unquantized))
    gr.commit()
    keep = [o for o in model.opset_import if o.domain != _MARK_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    chk = check(model)
    for p in chk.problems:
        log.warning("QDQ check: %s", p)
    tmp_path = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        onnx_lib.save(model, str(tmp_path))
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return ExportReport(
        str(path), opset, len(qmods), tuple(floats), pairs, residual, chk, tuple(in_names), tuple(out_names)
    )


# ---------------------------------------------------------------------------------------------------------------
# Verification in a runtime


_ORT_INTEGER = (
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "QGemm",
    "QLinearAdd",
    "MatMulNBits",
)
_ORT_FLOAT = ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm")
_OV_COMPUTE = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")


@dataclass(frozen=True)
class Verification:
    """Runtime vs octoquant on the same inputs.

    outputs: per model output, {"name", "sqnr_db", "cosine_mean", "cosine_min", "max_abs", "top1_agreement"
    (2-D outputs only)}; integer_ops / float_ops: compute nodes of the runtime's optimized graph by precision
    (ORT: op types of the optimized model; OpenVINO: layer types of the compiled runtime model by runtime
    precision); dequantized_float: float Conv / MatMul nodes still fed by a dequantized int8 weight.
    """

    runtime: str
    outputs: tuple[dict, ...]
    integer_ops: dict[str, int]
    float_ops: dict[str, int]
    dequantized_float: int

    def summary(self) -> str:
        lines = [f"{self.runtime}: integer ops {self.integer_ops or '{}'}, float compute ops {self.float_ops or '{}'}"]
        for o in self.outputs:
            top1 = f", top-1 agreement {o['top1_agreement']:.4f}" if "top1_agreement" in o else ""
            lines.append(
                f"  {o['name']}: SQNR {o['sqnr_db']:.1f} dB, cosine mean {o['cosine_mean']:.5f} "
                f"(min {o['cosine_min']:.5f}), max |diff| {o['max_abs']:.4g}{top1}"
            )
        return "\n".join(lines)


def _feeds(names: list[str], example) -> dict:
    args, kwargs = _as_args(example)
    if kwargs:
        missing = [n for n in names if n not in kwargs]
        if missing:
            raise ExportError(f"inputs {missing} of the ONNX graph are not in the example dict {list(kwargs)}")
        return {n: _numpy(kwargs[n]) for n in names}
    by_name = dict(zip(_input_names(args, {}), args, strict=True))
    return {n: _numpy(by_name[n]) for n in names}


def _numpy(t: torch.Tensor):
    """A runtime input: float inputs as float32 (the graph's float type; numpy has no bfloat16)."""
    return (t.to(torch.float32) if t.is_floating_point() else t).detach().cpu().numpy()


def _float32_view(model: nn.Module, example):
    """(model, example) with every float parameter, buffer and input in float32: ONNX graphs are exported in float32
    (runtimes pick their own precisions). A copy when anything else was float; the model itself is left as is."""
    if all(t.dtype == torch.float32 for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()):
        return model, example
    warnings.warn("the model's float layers are not float32: the ONNX graph is exported in float32", stacklevel=3)
    copy32 = copy.deepcopy(model).float()
    for m in copy32.modules():
        if isinstance(m, QEmbedding):
            m.dtype = torch.float32

    return copy32, _as_float32(example)


def _as_float32(batch):
    """The batch with its float tensors in float32."""
    if isinstance(batch, torch.Tensor):
        return batch.to(torch.float32) if batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return {k: _as_float32(v) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_as_float32(v) for v in batch)
    return batch


class _OrtRunner:
    def __init__(self, path: str, threads: int | None) -> None:
        import onnx as onnx_lib
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        with tempfile.TemporaryDirectory() as tmp:
            so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
            self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            optimized = onnx_lib.load(so.optimized_model_filepath)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.integer_ops, self.float_ops, self.dequantized_float = _ort_ops(optimized)

    def __call__(self, example) -> list[torch.Tensor]:
        return [torch.from_numpy(o) for o in self.session.run(None, _feeds(self.inputs, example))]


def _ort_ops(model) -> tuple[dict, dict, int]:
    gr = _Graph(model)
    integer, floats, deq = {}, {}, 0
    for n in gr.nodes:
        if n.op_type in _ORT_INTEGER:
            integer[n.op_type] = integer.get(n.op_type, 0) + 1
        elif n.op_type in _ORT_FLOAT:
            floats[n.op_type] = floats.get(n.op_type, 0) + 1
            w = gr.producer.get(n.input[1]) if len(n.input) > 1 else None
            if w is not None and w.op_type == "DequantizeLinear" and gr.const(w.input[0]) is not None:
                deq += 1
    return integer, floats, deq


class _OpenVinoRunner:
    def __init__(self, path: str, threads: int | None) -> None:
        try:
            import openvino as ov
        except ImportError as e:
            raise ExportError("runtime 'openvino' needs the openvino package: pip install openvino") from e
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32"}  # no silent bf16 on CPUs that have it: compare like for like
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        model = core.read_model(path)
        self.inputs = [p.get_any_name() for p in model.inputs]
        self.compiled = core.compile_model(model, "CPU", config)
        self.integer_ops, self.float_ops, self.dequantized_float = _openvino_ops(self.compiled.get_runtime_model())

    def __call__(self, example) -> list[torch.Tensor]:
        res = self.compiled(_feeds(self.inputs, example))
        return [torch.from_numpy(res[o].copy()) for o in self.compiled.outputs]


def _openvino_ops(runtime_model) -> tuple[dict, dict, int]:
    integer, floats = {}, {}
    for op in runtime_model.get_ops():
        rt = op.get_rt_info()
        kind = rt["layerType"].astype(str) if "layerType" in rt else op.get_type_name()
        if kind not in _OV_COMPUTE:
            continue
        prec = rt["runtimePrecision"].astype(str) if "runtimePrecision" in rt else "?"
        bucket = integer if prec in ("i8", "u8") else floats
        key = f"{kind}:{prec}"
        bucket[key] = bucket.get(key, 0) + 1
    # float weight layers (FullyConnected / Convolution); a float MatMul is activation x activation (attention)
    return integer, floats, sum(v for k, v in floats.items() if not k.startswith("MatMul:"))


def verify(
    qmodel: nn.Module, path: str | os.PathLike, inputs, runtime: str = "onnxruntime", threads: int | None = None
) -> Verification:
    """Run the exported file in ONNX Runtime or OpenVINO (CPU) beside the octoquant model; report agreement.

    octoquant quantizes a float tensor as the ONNX spec does, round(x / scale) + zero_point, and ORT computes the
    same. OpenVINO runs QuantizeLinear as a FakeQuantize, round(x * isc + ish) with isc = 255 / (high - low), which
    takes a different code for a few values per million (measured 4-7e-6; microsoft/onnxruntime#25045): the
    integer layers themselves match, but deep CNNs amplify those rare flips, so OpenVINO agrees with octoquant
    about as well as octoquant agrees with itself under a 1e-6 input jitter, not bit for bit.

    Args:
        inputs: one example (tensor / tuple / dict, as given to `onnx()`) or a list of them (batches).
        threads: runtime threads (default: the runtime's own choice).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    if not Path(path).is_file():
        raise ExportError(f"{path} is not a file")
    runner = (_OrtRunner if runtime == "onnxruntime" else _OpenVinoRunner)(str(path), threads)
    batches = inputs if isinstance(inputs, list) else [inputs]
    if not batches:
        raise ExportError("verify needs at least one input batch")
    view = _export_view(qmodel, batches[0])[0]  # the module `onnx` traced (LogitsOnly for a causal LM)
    batches = [_export_view(qmodel, b)[1] for b in batches]
    qmodel = view
    refs, outs = [], []
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad(), _without_kv_cache(qmodel):
            for b in batches:
                refs.append([t.to(torch.float32) for t in _flat_outputs(_run(qmodel, b))])
                outs.append([t.to(torch.float32) for t in runner(b)])
    finally:
        qmodel.train(was_training)
    if len(refs[0]) != len(outs[0]):
        raise ExportError(f"the model gives {len(refs[0])} outputs, the ONNX graph {len(outs[0])}")
    metrics = []
    for i in range(len(refs[0])):
        pairs = []  # per batch (rows, features): batches may differ in shape (sequence lengths)
        for rb, ob in zip(refs, outs, strict=True):
            if rb[i].shape != ob[i].shape:
                raise ExportError(
                    f"output {i}: shape {tuple(ob[i].shape)} from the runtime, {tuple(rb[i].shape)} from octoquant"
                )
            pairs.append(tuple(t.reshape(len(t), -1) if t.dim() else t.reshape(1, 1) for t in (rb[i], ob[i])))
        r, o = (torch.cat([p[k].flatten() for p in pairs]) for k in (0, 1))
        cos = torch.cat([cosine_similarity(a, b, dim=1) for a, b in pairs])
        m = {
            "name": f"output_{i}",
            "sqnr_db": sqnr_db(r, o),
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "max_abs": float((r - o).abs().max()),
        }
        if refs[0][i].dim() == 2 and refs[0][i].shape[1] > 1:
            same = torch.cat([a.argmax(1) == b.argmax(1) for a, b in pairs])
            m["top1_agreement"] = float(same.to(torch.float32).mean())
        metrics.append(m)
    return Verification(runtime, tuple(metrics), runner.integer_ops, runner.float_ops, runner.dequantized_float)
