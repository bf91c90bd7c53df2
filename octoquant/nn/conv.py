"""QConv2d: static W8A8 convolution on integer kernels (NHWC im2col + int8 GEMM, or a depthwise kernel), and
ConvChain: a Sequential whose consecutive QConv2d layers hand each other uint8 codes instead of float.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from dataclasses import dataclass
from itertools import repeat

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..config import PerChannel, QDtype, QuantMode
from ..kernels.cpu import scratch
from ..kernels.reference import ActivationQParams, dequantize_codes
from ._base import QuantizedModule, check_float_input, input_qparams, quantize_weight

# the per-thread buffers (kernels.cpu.scratch) a ConvChain's layers write their codes into, alternately
CHAIN_SLOTS = ("chain-codes-0", "chain-codes-1")
CHAIN_INPUT_SLOT = "chain-input-codes"  # the first layer's quantized input
# cached call plans per layer (input shape x qparams); dynamic shapes beyond this start a fresh cache
PLANS_PER_LAYER = 16


def explicit_padding(conv: nn.Conv1d | nn.Conv2d) -> tuple[int, ...] | None:
    """The zero padding `conv` applies before and after each spatial dimension, as one symmetric amount per dimension:
    its own explicit padding; "valid" -> 0; "same" -> dilation * (kernel - 1) / 2 where that amount is whole (odd
    kernels: always). None where no such tuple exists: "same" with an odd total (PyTorch pads the extra pixel at the
    end only) or a padding mode other than zeros."""
    if conv.padding_mode != "zeros":
        return None
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding == "same":
        totals = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]
        return None if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)
    return tuple(conv.padding)


class QConv2d(QuantizedModule):
    """Conv2d with int8 per-output-channel weights and per-tensor int8/uint8 activations.

    Static mode uses calibrated activation qparams; dynamic mode takes min/max of each input at run time.
    Buffers: weight (O, C/groups, kh, kw) int8; weight_scale (O,) float32; bias (O,) float32 (optional);
    input_scale () float32 and input_zero_point () int32 (static). Output: float, NCHW shape in
    channels_last memory.

    A layer whose output goes straight to another convolution that quantizes it (`requantize_for`, set by
    `chain_convolutions`) requantizes in integer arithmetic for that reader, as integer runtimes do (ONNX Runtime's
    QLinearConv, bit for bit): codes = round(float32(acc + bias_q) * mult) + zero-point (kernels.reference.
    requantize_codes); its float output is then those codes dequantized, which the reader quantizes back exactly.
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
        self._in_q = self._in_q_of = None  # input_q() cache, keyed on the cached (scale, zero-point)
        # A fused ReLU/ReLU6 (see fuse_activation): output clamped to [0, output_clamp[c]] in the epilogue.
        self.register_buffer("output_clamp", None)

    def requantize_for(self, reader: QConv2d | None) -> None:
        """Hand this layer's output to `reader` (a static QConv2d reading nothing else but it) requantized for the
        reader's input qparams (see the class docstring); None: float output. A plain attribute, not a child: the
        state dict is unchanged, and `chain_convolutions` derives it again on a loaded model."""
        if reader is not None and (not isinstance(reader, QConv2d) or reader.mode is not QuantMode.W8A8_STATIC):
            raise ValueError("requantize_for: the reader must be a static QConv2d")
        self.__dict__["_reader"] = reader

    @property
    def reader(self) -> QConv2d | None:
        """The convolution this layer requantizes its output for (`requantize_for`), or None."""
        return self.__dict__.get("_reader")

    def output_q(self) -> ActivationQParams | None:
        """The qparams this layer's output is requantized to: its reader's input qparams, or None (float)."""
        reader = self.__dict__.get("_reader")
        return None if reader is None else reader.input_q()

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
        padding = explicit_padding(module)
        if padding is None:
            raise ValueError(
                f"{name!r}: only zero padding, symmetric on each side, is supported, got {module.padding!r}/"
                f"{module.padding_mode}"
            )
        q = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            padding,
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

    def input_q(self, x: torch.Tensor | None = None) -> ActivationQParams:
        """This layer's input quantization: calibrated (static) or taken from x's own range (dynamic)."""
        if self.mode is QuantMode.W8A8_STATIC:
            qparams = self._static_qparams()  # cached with the packed weights
            if getattr(self, "_in_q_of", None) is not qparams:  # (getattr: modules pickled before the cache)
                self._in_q, self._in_q_of = ActivationQParams(*qparams, self.input_dtype), qparams
            return self._in_q
        if x is None:
            raise ValueError("a dynamic QConv2d's input qparams depend on its input")
        lo, hi = torch.aminmax(x.detach().to(torch.float32))
        s, z = input_qparams((lo, hi), self.input_dtype)
        return ActivationQParams(float(s), int(z), self.input_dtype)

    def input_codes(self, x: torch.Tensor, scratch_slot: str | None = None) -> tuple[torch.Tensor, ActivationQParams]:
        """Float (N, C, H, W) input -> its (N, H, W, C) uint8 codes and their qparams (in the per-thread buffer
        `scratch_slot` where the backend can write into one, see forward_codes)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"QConv2d expects (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        check_float_input(self, x)
        in_q = self.input_q(x)
        backend = self.packed_with_backend()[0]
        if scratch_slot is None or not hasattr(backend, "conv_plan"):
            return backend.quantize_nhwc(x, in_q), in_q
        n, c, h, w = x.shape
        return backend.quantize_nhwc(x, in_q, scratch(scratch_slot, (n, h, w, c))), in_q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_q = self.output_q()
        y = self.forward_codes(*self.input_codes(x), out_q)  # (N, Ho, Wo, O)
        if out_q is not None:  # the reader quantizes these values back to the same codes
            y = dequantize_codes(y, out_q)
        return y.permute(0, 3, 1, 2).to(x.dtype)  # NCHW view of NHWC memory

    def forward_codes(
        self,
        a: torch.Tensor,
        in_q: ActivationQParams,
        out_q: ActivationQParams | None = None,
        scratch_slot: str | None = None,
    ) -> torch.Tensor:
        """(N, H, W, C) uint8 codes of `in_q` -> (N, Ho, Wo, O) float32, or codes of `out_q` (the integer
        requantization, `kernels.reference.requantize_codes`, in the kernel epilogue). With `scratch_slot`, a backend
        that can write into a given tensor puts the result in that per-thread reusable buffer
        (`kernels.cpu.scratch`): for results dead before the slot's next use."""
        key = (a.shape, id(in_q), id(out_q))  # the entry keeps both objects alive: their ids cannot be reused
        packed = self._packed
        # fast path (per call at batch 1, Python is a third of the time): a plan of these packed weights
        if packed is not None and self.__dict__.get("_plans_of") is packed:
            entry = self._plans.get(key)
            if entry is not None and entry[0] is in_q and entry[1] is out_q:
                return entry[2](a, scratch_slot)
        backend, packed = self.packed_with_backend()
        if not hasattr(backend, "conv_plan"):
            return backend.conv2d_codes(a, packed, self.stride, self.padding, self.dilation, in_q, out_q)
        # plans hold the packed weights' addresses: kept per packed copy, a few shapes at most
        if self.__dict__.get("_plans_of") is not packed or len(self._plans) > PLANS_PER_LAYER:
            self._plans, self._plans_of = {}, packed
        plan = backend.conv_plan(a.shape, packed, self.stride, self.padding, self.dilation, in_q, out_q)
        self._plans[key] = (in_q, out_q, plan)
        return plan(a, scratch_slot)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, mode={self.mode.value}, "
            f"input_dtype={self.input_dtype.value}"
        )


def _walk(seq: nn.Sequential, layers: list, bypassed: list) -> None:
    """Collect the layers a Sequential runs, in order, looking through nested Sequentials that keep its
    forward and skipping Identity; `bypassed` gets the modules whose __call__ a chained run skips."""
    for m in seq._modules.values():
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
            bypassed.append(m)
            _walk(m, layers, bypassed)
        elif isinstance(m, nn.Identity | QConv2d):
            bypassed.append(m)
            if isinstance(m, QConv2d):
                layers.append(m)
        elif m is not None:
            layers.append(m)


def _links(layers: list[nn.Module]) -> list[bool]:
    """links[i]: layer i can hand codes to layer i + 1 (both QConv2d on one device, the consumer static)."""
    return [
        isinstance(a, QConv2d)
        and isinstance(b, QConv2d)
        and b.mode is QuantMode.W8A8_STATIC
        and a.weight.device == b.weight.device
        for a, b in zip(layers, layers[1:], strict=False)
    ]


_MODULES = operator.itemgetter("_modules")
_PACKED = operator.itemgetter("_packed")
_HOOKS = operator.itemgetter("_forward_hooks")
_PRE_HOOKS = operator.itemgetter("_forward_pre_hooks")


class _Snapshot:
    """What a chain's cached structure was derived from, checked on every call: `changed()` (a Sequential it
    looked through holds other children, or a convolution was repacked: moved, reloaded) and `observed()` (hooks,
    or a forward patched on the instance, e.g. by ONNX export, on a module the chained run bypasses: each layer
    must then run on its own). Both are C-level loops over the modules' __dict__s: 32 us per MobileNetV2 forward
    (260 modules, hot loop), where Python loops took 46 us."""

    __slots__ = ("_seqs", "_children", "_convs", "_packed", "_packed_ids", "_bypassed")

    def __init__(self, seqs: list[nn.Module], convs: list[QConv2d], bypassed: list[nn.Module]) -> None:
        self._seqs = [m.__dict__ for m in seqs]
        self._children = self._children_now()
        self._convs = [m.__dict__ for m in convs]
        self._packed = list(map(_PACKED, self._convs))  # kept alive, so that their ids stay unique
        self._packed_ids = list(map(id, self._packed))
        self._bypassed = [m.__dict__ for m in bypassed]

    def _children_now(self) -> list[tuple]:
        return list(map(tuple, map(dict.values, map(_MODULES, self._seqs))))

    def changed(self) -> bool:
        # ids, not ==: packed weights are dataclasses of tensors
        return list(map(id, map(_PACKED, self._convs))) != self._packed_ids or self._children_now() != self._children

    def observed(self) -> bool:
        registry = nn.modules.module
        if getattr(registry, "_global_forward_hooks", None) or getattr(registry, "_global_forward_pre_hooks", None):
            return True
        d = self._bypassed
        return any(map(_HOOKS, d)) or any(map(_PRE_HOOKS, d)) or any(map(operator.contains, d, repeat("forward")))


class ConvChain(nn.Sequential):
    """A Sequential (same children, same state-dict keys) in which a QConv2d followed by a static QConv2d
    requantizes its output in the kernel epilogue and hands over uint8 codes in NHWC layout: no float tensor,
    no quantize pass between them (about 2 bytes of memory traffic per activation instead of 10).

    The result is bit-identical to running the layers one by one (`nn.Sequential.forward`), which it does
    whenever the input is not float32 or anything observes the layers (forward hooks, a patched forward).
    Built by `chain_convolutions`.
    """

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_structure_cache", None)  # holds packed weights: a copy derives its own
        state.pop("_chain_plans", None)  # kernel programs holding their addresses
        return state

    def _structure(self) -> tuple[list, list, list]:
        """(layers, bypassed, links) of `_walk` / `_links`, cached: re-derived only when a Sequential it looked
        through holds other children or a layer was repacked (moved, reloaded): a snapshot comparison instead of
        a Python walk per call (~130 us per MobileNetV2 forward)."""
        cached = self.__dict__.get("_structure_cache")
        if cached is not None and not cached[0].changed():
            return cached[1]
        layers, bypassed = [], []
        _walk(self, layers, bypassed)
        seqs = [self] + [m for m in bypassed if isinstance(m, nn.Sequential)]
        structure = (layers, bypassed, _links(layers))
        _set_readers(self, layers, structure[2])
        # the packed weights change with the device or the weights (.to(), load_state_dict): links re-derived
        snapshot = _Snapshot(seqs, [m for m in layers if isinstance(m, QConv2d)], bypassed)
        self._structure_cache = (snapshot, structure)
        return structure

    def _plan(self, structure: tuple, i: int, j: int, shape: torch.Size):
        """Layers i..j (each handing codes to the next) as one kernel program for this input shape, or None where
        the backend has none (reference, CUDA) or a layer is not static. Cached with the structure: it holds the
        packed weights' addresses, and the structure is re-derived whenever those change."""
        cached = self.__dict__.get("_chain_plans")
        if cached is None or cached[0] is not structure:
            cached = self._chain_plans = (structure, {})
        plans = cached[1]
        key = (i, shape)
        if key in plans:
            return plans[key]
        layers = structure[0]
        backend = layers[i].packed_with_backend()[0]
        plan = None
        if hasattr(backend, "chain_program") and all(
            layers[k].mode is QuantMode.W8A8_STATIC and layers[k].packed_with_backend()[0] is backend
            for k in range(i, j + 1)
        ):
            specs = []
            for k in range(i, j + 1):
                layer = layers[k]
                out_q = layers[k + 1].input_q() if k < j else None
                spec = backend.conv_spec(
                    shape, layer.packed(), layer.stride, layer.padding, layer.dilation, layer.input_q(), out_q
                )
                specs.append(spec)
                shape = spec.out_shape
            plan = backend.chain_program(specs)
        if len(plans) >= PLANS_PER_LAYER:  # many input shapes: start over rather than grow without bound
            plans.clear()
        plans[key] = plan
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        structure = self._structure()
        layers, _, links = structure
        if x.dtype != torch.float32 or self._structure_cache[0].observed():
            return super().forward(x)
        i, n = 0, len(layers)
        while i < n:
            layer = layers[i]
            if not (i < len(links) and links[i]):
                x = layer(x)
                i += 1
                continue
            j = i  # layers i..j hand codes on; j's result is float
            while j < len(links) and links[j]:
                j += 1
            codes, in_q = layer.input_codes(x, CHAIN_INPUT_SLOT)
            last_q = layers[j].output_q()  # j requantizes for a reader after this chain (a BlockChain's link)
            plan = self._plan(structure, i, j, codes.shape) if last_q is None else None
            if plan is not None:  # the whole run in one kernel call
                x = plan(codes, CHAIN_SLOTS).permute(0, 3, 1, 2)
            else:
                for k in range(i, j + 1):
                    out_q = layers[k + 1].input_q() if k < j else last_q
                    if k == j and out_q is not None:  # codes dequantized: what QConv2d.forward returns
                        x = dequantize_codes(layers[k].forward_codes(codes, in_q, out_q), out_q).permute(0, 3, 1, 2)
                        break
                    # codes handed to the next layer are dead once it ran: two per-thread buffers, used in turn
                    y = layers[k].forward_codes(codes, in_q, out_q, None if out_q is None else CHAIN_SLOTS[k % 2])
                    if out_q is None:
                        x = y.permute(0, 3, 1, 2)  # NCHW view of NHWC memory, as QConv2d returns
                    else:
                        codes, in_q = y, out_q
            i = j + 1
        return x


def _link_readers(owner: nn.Module, pairs: list[tuple[QConv2d, QConv2d]]) -> None:
    """Link each (producer, reader) pair (`QConv2d.requantize_for`) after unlinking the producers `owner` linked
    before (its structure may have changed). A pair already linked (by an inner ConvChain) stays that owner's, and
    links set by another owner stay (a BlockChain links a block's last convolution to the next block's first)."""
    for conv in owner.__dict__.get("_oq_linked", ()):
        conv.requantize_for(None)
    linked = []
    for producer, reader in pairs:
        if producer.reader is not reader:
            producer.requantize_for(reader)
            linked.append(producer)
    owner.__dict__["_oq_linked"] = linked


def _set_readers(owner: nn.Module, layers: list, links: list[bool]) -> None:
    """Link each layer that hands codes on (links[k]) to the next (`_link_readers`)."""
    _link_readers(owner, [(layers[k], layers[k + 1]) for k, link in enumerate(links) if link])


def chain_convolutions(model: nn.Module) -> nn.Module:
    """Turn every Sequential holding two consecutive QConv2d layers (looking through Identity and nested
    Sequentials) into a ConvChain, outermost first, then every Sequential of convolution blocks (`x + seq(x)` /
    `seq(x)` modules over such chains, and QConv2d layers) into a BlockChain. Returns the model (a new object only
    when the model itself is such a Sequential); numerics are unchanged.
    """

    def chain(seq: nn.Sequential) -> nn.Module:
        layers = []
        _walk(seq, layers, [])
        if type(seq).forward is not nn.Sequential.forward or not any(_links(layers)):
            return seq
        new = ConvChain(OrderedDict(seq._modules))
        new.train(seq.training)
        _set_readers(new, layers, _links(layers))
        return new

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent._modules.items()):
            new = chain(child) if isinstance(child, nn.Sequential) else child
            if new is not child:
                parent._modules[name] = new
                visit_layers(new)
            elif child is not None:
                visit(child)

    def visit_layers(new: ConvChain) -> None:
        """Inside a new chain, look for more in the layers it runs (not in the Sequentials it flattens)."""
        layers = []
        _walk(new, layers, [])
        for layer in layers:
            if not isinstance(layer, QConv2d):
                visit(layer)

    if isinstance(model, nn.Sequential):
        new = chain(model)
        if new is not model:
            visit_layers(new)
            return _chain_blocks(new)
    visit(model)
    return _chain_blocks(model)


# ---------------------------------------------------------------------------------------------------------------
# Blocks: a Sequential of convolution blocks (residual or not) as one kernel program


@dataclass(frozen=True)
class BlockForm:
    """A module whose forward is `act?(main(x) + branch(x))` or `main(x)`: `main` its children called one after the
    other on x, `branch` x itself (None) or one child called on x, `relu_after` a ReLU on the sum."""

    main: tuple[str, ...]
    residual: bool
    branch: str | None = None
    relu_after: bool = False


_ADDS = (operator.add, operator.iadd, torch.add)
_RELUS = (torch.relu, F.relu)


def _block_form(m: nn.Module) -> BlockForm | None:
    """The BlockForm of `m`, found by symbolic tracing with `m`'s children as leaves (never traced into); None for
    any other forward (more inputs, other ops, a child called on something else). MobileNetV2's inverted residuals
    (`x + conv(x)`) and torchvision's ResNet blocks (`relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))`)."""
    import torch.fx

    class _Children(torch.fx.Tracer):
        def is_leaf_module(self, mod: nn.Module, qualname: str) -> bool:
            return True

    try:
        graph = _Children().trace(m)
    except Exception:  # anything fx cannot trace (data-dependent control flow, ...) is not such a block
        return None
    nodes = list(graph.nodes)
    ph = [n for n in nodes if n.op == "placeholder"]
    out = [n for n in nodes if n.op == "output"]
    if len(ph) != 1 or len(out) != 1 or any(n.kwargs for n in nodes if n.op != "output"):
        return None
    x, end = ph[0], out[0].args[0]
    used = {x, out[0]}
    relu_after = False
    if (
        isinstance(end, torch.fx.Node)
        and len(end.args) == 1
        and (
            (end.op == "call_function" and end.target in _RELUS)
            or (end.op == "call_module" and isinstance(m.get_submodule(end.target), nn.ReLU))
        )
    ):
        if isinstance(end.args[0], torch.fx.Node) and end.args[0].target in _ADDS:
            used.add(end)
            end, relu_after = end.args[0], True

    def chain(node) -> list[str] | None:  # child names called one after the other from x to `node`
        names = []
        while node is not x:
            if not isinstance(node, torch.fx.Node) or node.op != "call_module" or len(node.args) != 1:
                return None
            used.add(node)
            names.append(node.target)
            node = node.args[0]
        return names[::-1]

    if isinstance(end, torch.fx.Node) and end.op == "call_function" and end.target in _ADDS:
        if len(end.args) != 2:
            return None
        used.add(end)
        a, b = (chain(arg) for arg in end.args)
        if a is None or b is None:
            return None
        main, branch = (a, b) if len(a) >= len(b) else (b, a)
        if not main or len(branch) > 1:
            return None
        form = BlockForm(tuple(main), True, branch[0] if branch else None, relu_after)
    else:
        main = chain(end)
        if not main or relu_after:
            return None
        form = BlockForm(tuple(main), False)
    names = (*form.main, *((form.branch,) if form.branch else ()))
    if used != set(nodes) or len(set(names)) != len(names) or any("." in n for n in names):
        return None  # (a child called twice, or a grandchild: not a chain of children)
    return form


def _chain_convs(m: nn.Module, convs: list, inner: list) -> bool:
    """Append the static QConv2d layers `m` runs (a QConv2d, an Identity, or a Sequential of them) to `convs`."""
    if isinstance(m, QConv2d):
        convs.append(m)
        inner.append(m)
        return True
    if isinstance(m, nn.Identity):
        inner.append(m)
        return True
    if isinstance(m, nn.Sequential) and type(m).forward in (nn.Sequential.forward, ConvChain.forward):
        found = []
        inner.append(m)
        _walk(m, found, inner)
        if all(isinstance(c, QConv2d) for c in found):
            convs.extend(found)
            return True
    return False


def _redundant_relu(act: nn.Module, convs: list) -> bool:
    """A ReLU right after a conv whose fused clamp already keeps its output in [0, upper]: a no-op."""
    return isinstance(act, nn.ReLU) and bool(convs) and convs[-1].output_clamp is not None


def _block_unit(layer: nn.Module, bypassed: list) -> tuple | None:
    """(residual, convs, branch conv or None, relu_after) of a block (`_oq_block_form`) of static QConv2d layers."""
    form = layer.__dict__.get("_oq_block_form")
    if form is None:
        return None
    convs, inner = [], [layer]
    for name in form.main:
        child = getattr(layer, name, None)
        if isinstance(child, nn.Module) and _redundant_relu(child, convs):
            inner.append(child)
            continue
        if not isinstance(child, nn.Module) or not _chain_convs(child, convs, inner):
            return None
    if not convs or not all(_links(convs)):
        return None
    branch = None
    if form.branch is not None:
        found = []
        child = getattr(layer, form.branch, None)
        if not isinstance(child, nn.Module) or not _chain_convs(child, found, inner) or len(found) != 1:
            return None
        branch = found[0]
        if branch.mode is not QuantMode.W8A8_STATIC or branch.input_dtype is not convs[0].input_dtype:
            return None
        if branch._static_qparams() != convs[0]._static_qparams():  # both read the block input's codes
            return None
    bypassed += inner
    return form.residual, convs, branch, form.relu_after


def _block_units(seq: nn.Sequential) -> tuple[list, list] | None:
    """(units, bypassed) of a Sequential every layer of which is a static QConv2d or a block (`_block_form`) of
    static QConv2d layers that hand each other codes; units: (residual, convs, branch conv, relu_after). None
    otherwise."""
    layers, bypassed = [], []
    _walk(seq, layers, bypassed)
    units, blocks = [], 0
    for layer in layers:
        unit = (False, [layer], None, False) if isinstance(layer, QConv2d) else _block_unit(layer, bypassed)
        if unit is None:
            return None
        units.append(unit)
        blocks += not isinstance(layer, QConv2d)
    convs = _unit_convs(units)
    if not blocks:  # only QConv2d layers: a ConvChain's job
        return None
    if len(units) < 2 or not all(c.mode is QuantMode.W8A8_STATIC for c in convs):
        return None
    return units, bypassed + convs


class BlockChain(nn.Sequential):
    """A Sequential of convolution blocks (MobileNetV2's features: a stem conv, inverted residual blocks `x +
    conv(x)` or `conv(x)`, a last conv) run as one kernel program: inside a block the convolutions hand each other
    uint8 codes (as in ConvChain), and across blocks the last convolution requantizes for the next block, or, where
    a residual add needs the float value, writes it, adds the block's float input and quantizes the sum for the
    next block in one pass. No Python and no float hand-over per block.

    The result is bit-identical to running the children one by one (`nn.Sequential.forward`), which it does
    whenever the input is not float32, the backend has no block programs, or anything observes the layers.
    Built by `chain_convolutions` (same children, same state-dict keys).
    """

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_block_cache", None)  # packed weights' addresses: a copy derives its own
        return state

    def _units(self):
        """`_block_units`, cached on a snapshot of the children and the packed weights (re-derived on a change)."""
        cached = self.__dict__.get("_block_cache")
        if cached is not None and not cached[0].changed():
            return cached[1], cached[2]
        found = _block_units(self)
        _set_block_readers(self, found[0] if found else [])
        mods = [self] + ([m for m in found[1] if isinstance(m, nn.Module) and m._modules] if found else [])
        convs = _unit_convs(found[0]) if found else []
        for c in convs:  # packed before the snapshot: packing them later (the program does) would change it
            c.packed()
        self._block_cache = (_Snapshot(mods, convs, found[1] if found else []), found, {})
        return found, self._block_cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return super().forward(x)
        found, plans = self._units()
        if found is None or self._block_cache[0].observed():
            return super().forward(x)
        units = found[0]
        first = units[0][1][0]
        codes, _ = first.input_codes(x, CHAIN_INPUT_SLOT)
        plan = plans.get(codes.shape, False)
        if plan is False:
            plan = self._program(units, codes.shape)
            if len(plans) >= PLANS_PER_LAYER:
                plans.clear()
            plans[codes.shape] = plan
        if plan is None:
            return super().forward(x)
        float_in = None
        if plan.float_input:  # the first block adds its own input: x's values in NHWC order
            float_in = (
                x
                if x.is_contiguous(memory_format=torch.channels_last)
                else x.contiguous(memory_format=torch.channels_last)
            )
        return plan(codes, CHAIN_SLOTS, float_in).permute(0, 3, 1, 2)

    @staticmethod
    def _program(units: list, shape: torch.Size):
        convs = _unit_convs(units)
        backend = convs[0].packed_with_backend()[0]
        if not hasattr(backend, "block_program") or any(c.packed_with_backend()[0] is not backend for c in convs):
            return None
        described = []
        for i, (residual, cs, branch, relu_after) in enumerate(units):
            next_q = units[i + 1][1][0].input_q() if i + 1 < len(units) else None
            # the last convolution gives float where a residual add reads it (this block's or the next one's
            # identity input)
            next_reads = i + 1 < len(units) and units[i + 1][0] and units[i + 1][2] is None
            float_out = residual or next_reads or next_q is None
            branch_spec = None
            if branch is not None:
                branch_spec = backend.conv_spec(
                    shape, branch.packed(), branch.stride, branch.padding, branch.dilation, branch.input_q()
                )
            specs = []
            for k, c in enumerate(cs):
                out_q = cs[k + 1].input_q() if k + 1 < len(cs) else (None if float_out else next_q)
                spec = backend.conv_spec(shape, c.packed(), c.stride, c.padding, c.dilation, c.input_q(), out_q)
                specs.append(spec)
                shape = spec.out_shape
            described.append((residual, specs, next_q, branch_spec, relu_after))
        return backend.block_program(described)


def _set_block_readers(owner: nn.Module, units: list) -> None:
    """Link the convolutions of `units` that hand codes on (`_link_readers`), as `BlockChain._program` runs them:
    inside a unit, and a unit's last convolution to the next unit's first where no residual add reads its float
    value."""
    pairs = []
    for i, (residual, cs, _, _) in enumerate(units):
        pairs += zip(cs, cs[1:], strict=False)
        if i + 1 < len(units):
            nxt = units[i + 1]
            if not (residual or (nxt[0] and nxt[2] is None)):  # (see _program's float_out)
                pairs.append((cs[-1], nxt[1][0]))
    _link_readers(owner, pairs)


def _unit_convs(units: list) -> list:
    """Every QConv2d a block program runs (main paths and branches)."""
    return [c for _, cs, branch, _ in units for c in (*cs, *((branch,) if branch is not None else ()))]


def _chain_blocks(model: nn.Module) -> nn.Module:
    """Mark every module of `BlockForm` (residual or plain blocks of static QConv2d layers), and turn each Sequential
    of such blocks and QConv2d layers into a BlockChain (outermost first)."""

    def holds_convs(m: nn.Module) -> bool:  # a QConv2d child, or one in a child Sequential: worth tracing m
        return any(
            isinstance(c, QConv2d)
            or (isinstance(c, nn.Sequential) and any(isinstance(d, QConv2d) for d in c.modules()))
            for c in m.children()
        )

    candidates = [m for m in model.modules() if not isinstance(m, nn.Sequential | QConv2d) and m._modules]
    for m in candidates:
        if "_oq_block_form" not in m.__dict__ and len(m._modules) <= 8 and holds_convs(m):
            form = _block_form(m)
            if form is not None:
                m._oq_block_form = form

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent._modules.items()):
            found = (
                _block_units(child) if isinstance(child, nn.Sequential) and not isinstance(child, BlockChain) else None
            )
            if found:
                new = BlockChain(OrderedDict(child._modules))
                new.train(child.training)
                _set_block_readers(new, found[0])
                parent._modules[name] = new
            elif child is not None:
                visit(child)

    found = _block_units(model) if isinstance(model, nn.Sequential) and not isinstance(model, BlockChain) else None
    if found:
        new = BlockChain(OrderedDict(model._modules))
        new.train(model.training)
        _set_block_readers(new, found[0])
        return new
    visit(model)
    return model
