"""QConv2d: static W8A8 convolution on integer kernels (NHWC im2col + int8 GEMM, or a depthwise kernel)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from ..config import PerChannel, QDtype, QuantMode
from ._base import QuantizedModule, input_qparams, quantize_weight


class QConv2d(QuantizedModule):
    """Conv2d with int8 per-output-channel weights and per-tensor int8/uint8 activations.

    Static mode uses calibrated activation qparams; dynamic mode takes min/max of each input at run time.
    Buffers: weight (O, C/groups, kh, kw) int8; weight_scale (O,) float32; bias (O,) float32 (optional);
    input_scale () float32 and input_zero_point () int32 (static). Output: float, NCHW shape in
    channels_last memory.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=True,
        input_dtype: QDtype | str = QDtype.UINT8,
        backend: str | None = None,
        mode: QuantMode | str = QuantMode.W8A8_STATIC,
    ) -> None:
        super().__init__(backend)
        self.mode = QuantMode.parse(mode)
        if self.mode is QuantMode.W8A16:
            raise ValueError("QConv2d runs W8A8 (static or dynamic); weight-only convolution is not supported")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.input_dtype = QDtype.parse(input_dtype)
        kh, kw = self.kernel_size
        self.register_buffer("weight", torch.zeros(out_channels, in_channels // groups, kh, kw, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_channels, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)
        if self.mode is QuantMode.W8A8_STATIC:
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32))
            self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32))
        # A fused ReLU/ReLU6 (see fuse_activation): output clamped to [0, output_clamp[c]] in the epilogue.
        self.register_buffer("output_clamp", None)

    def fuse_activation(self, upper: torch.Tensor) -> None:
        """Apply y = min(max(y, 0), upper[c]) in the kernel epilogue (upper may be +inf: ReLU)."""
        upper = torch.as_tensor(upper, dtype=torch.float32).reshape(-1).expand(self.out_channels).clone()
        self.output_clamp = upper
        self._packed = None

    @classmethod
    def from_float(
        cls,
        module: nn.Conv2d,
        *,
        input_range: tuple[float, float] | None = None,
        mode: QuantMode | str = QuantMode.W8A8_STATIC,
        input_dtype: QDtype | str = QDtype.UINT8,
        weight_range: tuple[torch.Tensor, torch.Tensor] | None = None,
        backend: str | None = None,
        name: str = "conv",
    ) -> QConv2d:
        """Quantize a float Conv2d; static mode needs the calibrated (min, max) of its input."""
        mode = QuantMode.parse(mode)
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"QConv2d.from_float expects nn.Conv2d, got {type(module).__name__}")
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(
                f"{name!r}: only explicit zero padding is supported, got {module.padding!r}/{module.padding_mode}"
            )
        q = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            input_dtype,
            backend,
            mode,
        )
        wq, ws = quantize_weight(module.weight, PerChannel(0), name, weight_range)
        q._set_quantized(wq, ws, module.bias, input_range if mode is QuantMode.W8A8_STATIC else None, name)
        return q

    def _pack(self, backend):
        return backend.pack_conv(self.weight, self.weight_scale, self.bias, self.groups, self.output_clamp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"QConv2d expects (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if self.mode is QuantMode.W8A8_STATIC:
            scale, zp = self._static_qparams()
        else:  # dynamic: this input's own range
            lo, hi = torch.aminmax(x.detach().to(torch.float32))
            s, z = input_qparams((lo, hi), self.input_dtype)
            scale, zp = float(s), int(z)
        y = self.backend.conv2d_static(
            x, self.packed(), self.stride, self.padding, self.dilation, scale, zp, self.input_dtype
        )
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, mode={self.mode.value}, "
            f"input_dtype={self.input_dtype.value}"
        )
