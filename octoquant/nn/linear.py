"""QLinear: int8 weights (N, K) + scales; static W8A8, dynamic W8A8 (per-token) or W8A16."""

from __future__ import annotations

import torch
from torch import nn

from ..config import PerChannel, PerGroup, QDtype, QuantMode
from ..kernels.reference import ActivationQParams
from ._base import QuantizedModule, check_float_input, quantize_weight


def _float_weight(module: nn.Module) -> torch.Tensor:
    """(out, in) weight of nn.Linear, or of Hugging Face GPT-2's Conv1D (stored transposed, (in, out))."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.T
    raise TypeError(f"QLinear.from_float expects nn.Linear or transformers Conv1D, got {type(module).__name__}")


def linear_dynamic_outliers(backend, x, packed, weight, weight_scale, threshold: float) -> torch.Tensor:
    """LLM.int8() decomposition: columns of x (M, K) with any |x| > threshold use float products with the
    dequantized weight columns; the other columns go through the per-token int8 kernel."""
    cols = (x.abs() > threshold).any(dim=0)  # (K,) outlier input columns of this call
    if not bool(cols.any()):
        return backend.linear_dynamic(x, packed)
    y = backend.linear_dynamic(x.masked_fill(cols, 0.0), packed)  # (M, N) float32, bias included
    w_out = weight[:, cols].to(torch.float32) * weight_scale.reshape(-1, 1)  # (N, k_out)
    return y + x[:, cols].to(torch.float32) @ w_out.T


class QLinear(QuantizedModule):
    """A Linear layer with int8 weights.

    Buffers (a plain state dict, 1:1 with safetensors / compressed-tensors names):
        weight (N, K) int8; weight_scale (N,) float32, or (N, K // group_size) for per-group W8A16;
        bias (N,) float32 (optional); input_scale () float32 and input_zero_point () int32 (static only).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mode: QuantMode | str = QuantMode.W8A8_DYNAMIC,
        group_size: int | None = None,
        input_dtype: QDtype | str = QDtype.INT8,
        backend: str | None = None,
        outlier_threshold: float | None = None,
    ) -> None:
        super().__init__(backend)
        self.in_features, self.out_features = in_features, out_features
        self.outlier_threshold = outlier_threshold
        self.mode = QuantMode.parse(mode)
        self.input_dtype = QDtype.parse(input_dtype)
        if outlier_threshold is not None and self.mode is not QuantMode.W8A8_DYNAMIC:
            raise ValueError("outlier_threshold (LLM.int8() decomposition) applies to dynamic W8A8 only")
        if group_size is not None and self.mode is not QuantMode.W8A16:
            raise ValueError("per-group weights (group_size) are supported in W8A16 mode only")
        if group_size is not None and in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide in_features {in_features}")
        self.group_size = group_size
        groups = 1 if group_size is None else in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        scale_shape = (out_features,) if group_size is None else (out_features, groups)
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        if self.mode is QuantMode.W8A8_STATIC:
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32))
            self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32))

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        mode: QuantMode | str = QuantMode.W8A8_DYNAMIC,
        *,
        input_range: tuple[float, float] | None = None,
        input_dtype: QDtype | str = QDtype.INT8,
        weight_range: tuple[torch.Tensor, torch.Tensor] | None = None,
        group_size: int | None = None,
        backend: str | None = None,
        name: str = "linear",
        outlier_threshold: float | None = None,
    ) -> QLinear:
        """Quantize a float Linear (or GPT-2 Conv1D).

        Args:
            mode: static W8A8 needs `input_range` (calibrated min, max of the input activation).
            input_dtype: static activations as int8 (symmetric) or uint8 (asymmetric).
            weight_range: per-channel (min, max) of the weight from an observer; default min-max.
            group_size: per-group weight scales along the input dim (W8A16 only).
        """
        mode = QuantMode.parse(mode)
        w = _float_weight(module)
        out_f, in_f = w.shape
        with torch.device("meta"):  # every buffer is assigned below: allocate nothing twice
            q = cls(in_f, out_f, module.bias is not None, mode, group_size, input_dtype, backend, outlier_threshold)
        gran = PerChannel(0) if group_size is None else PerGroup(group_size)
        wq, ws = quantize_weight(w, gran, name, weight_range)
        q._set_quantized(wq, ws, module.bias, input_range if mode is QuantMode.W8A8_STATIC else None, name)
        return q

    def to_dynamic(self) -> QLinear:
        """This static layer with per-token activation scales computed at run time: the same int8 weights (no
        float weights needed), no calibrated range that an outlier can overflow."""
        if self.mode is not QuantMode.W8A8_STATIC:
            raise ValueError(f"to_dynamic converts a static W8A8 QLinear, not {self.mode.value}")
        q = QLinear(
            self.in_features,
            self.out_features,
            self.bias is not None,
            QuantMode.W8A8_DYNAMIC,
            backend=self.backend_name,
        )
        q.weight, q.weight_scale, q.bias = self.weight, self.weight_scale, self.bias
        return q

    def _pack(self, backend):
        if self.mode is QuantMode.W8A16:
            return backend.pack_w8a16(self.weight, self.weight_scale, self.group_size or self.in_features, self.bias)
        return backend.pack_w8a8(self.weight, self.weight_scale, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fast path: a call plan of these packed weights (a contiguous float32 cpu input of any leading shape)
        plan = self.__dict__.get("_linear_plan")
        if (
            plan is not None
            and plan[0] is self._packed
            and x.dtype is torch.float32
            and x.is_cpu
            and x.shape[-1] == self.in_features
            and x.is_contiguous()
        ):
            return plan[1](x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QLinear expects last dim {self.in_features}, got input shape {tuple(x.shape)}")
        check_float_input(self, x)
        flat = x.dim() == 2  # (M, K) as given: no reshapes (a microsecond each, per call on small decode layers)
        x2 = x if flat else x.reshape(-1, self.in_features)  # (M, K)
        be, p = self.packed_with_backend()
        stale = plan is None or plan[0] is not p  # built once per packing (the general path runs for odd inputs)
        if stale and hasattr(be, "linear_plan") and self.outlier_threshold is None:
            in_q = None
            if self.mode is QuantMode.W8A8_STATIC:
                in_q = ActivationQParams(*self._static_qparams(), self.input_dtype)
            self._linear_plan = (p, be.linear_plan(p, in_q))
        if self.mode is QuantMode.W8A8_DYNAMIC and self.outlier_threshold is not None:
            y = linear_dynamic_outliers(be, x2, p, self.weight, self.weight_scale, self.outlier_threshold)
        elif self.mode is QuantMode.W8A8_DYNAMIC:
            y = be.linear_dynamic(x2, p)
        elif self.mode is QuantMode.W8A8_STATIC:
            y = be.linear_static(x2, p, *self._static_qparams(), self.input_dtype)
        else:
            y = be.linear_weight_only(x2, p)
        if not flat:
            y = y.reshape(*x.shape[:-1], self.out_features)  # (..., N)
        return y if y.dtype is x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        g += f", outlier_threshold={self.outlier_threshold}" if self.outlier_threshold is not None else ""
        return f"{self.in_features}, {self.out_features}, mode={self.mode.value}{g}, bias={self.bias is not None}"
