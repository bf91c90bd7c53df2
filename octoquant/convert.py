"""oq.quantize: prepare (fold BatchNorm), calibrate (observe each layer's input), swap in int8 modules.

Every quantized layer quantizes its own *input*, so ranges are observed where the integer kernel needs them:
after a ReLU/ReLU6 the observed range starts at 0 (uint8 with zero-point 0 uses all 256 levels), after a
residual add it covers the sum. Data flows one way: Config -> observers -> qparams -> modules -> kernels.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import W8A8, Calibrator, Config, PerChannel, PerGroup, PerTensor, QDtype, QScheme, QuantMode, Rounding
from .functional import check_finite, dequantize, sqnr_db
from .nn import QConv2d, QEmbedding, QLinear, chain_convolutions
from .nn._base import CastInputError, QuantizedModule
from .nn.conv import explicit_padding
from .observers import CalibrationError, MSEObserver, Observer, make_observer
from .rounding import gptq_round, input_hessian_update
from .sampling import SampleSketch

log = logging.getLogger("octoquant")

__all__ = ["quantize", "sensitivity", "summary", "LayerRecord"]

# Calibrators channel equalization runs with. Measured on MobileNetV2 (KL vs FP32, 256 crops, without -> with):
# mse 0.0328 -> 0.0271, minmax 0.0451 -> 0.0336, auto 0.0330 -> 0.0262; but percentile 0.0361 -> 0.0555 and
# entropy 0.0752 -> 0.1235 (their tail clips, chosen on flattened channels, cut more signal): skipped for those.
CHANNEL_EQUALIZATION_CALIBRATORS = (Calibrator.MSE, Calibrator.MINMAX, Calibrator.AUTO)
# Calibrators `auto` chooses among, and the percentile it tries.
AUTO_CANDIDATES = (Calibrator.MINMAX, Calibrator.PERCENTILE, Calibrator.ENTROPY, Calibrator.MSE)


@dataclass
class LayerRecord:
    """One row of `oq.summary`: what happened to a quantizable layer."""

    name: str
    kind: str
    status: str  # "int8" or "float"
    reason: str = ""  # why it stayed float
    mode: str = ""
    weight_granularity: str = ""
    calibrator: str = ""
    clip_range: tuple[float, float] | None = None
    sqnr_db: float | None = None  # layer output vs FP32 on the calibration sample
    dynamic_sqnr_db: float | None = None  # static Linear layers: the same with per-token activations instead
    weight_sqnr_db: float | None = None
    bytes: int = 0
    float_bytes: int = 0


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "weight")


def _is_candidate(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear | nn.Conv2d) or _is_conv1d(m)


def _unsupported(m: nn.Module) -> str | None:
    """Why a layer with weights stays float (listed in the summary), or None."""
    if isinstance(m, nn.Conv1d | nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d):
        return "unsupported layer type"
    if isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear):
        # nn.MultiheadAttention's out_proj: the attention reads its weight directly (F.multi_head_attention_forward)
        return "weight read directly by nn.MultiheadAttention"
    return None


def _float_reason(m: nn.Module, cfg: Config) -> str | None:
    if isinstance(m, nn.Conv2d):
        if cfg.mode is QuantMode.W8A16:
            return "no weight-only conv kernel (W8A16 is for Linear)"
        if explicit_padding(m) is None:
            return f"padding {m.padding!r}/{m.padding_mode} not supported (zero padding, the same on both sides)"
    return None


def _select(model: nn.Module, config: Config, exclude: Sequence[str]) -> tuple[dict, dict[str, LayerRecord]]:
    targets: dict[str, tuple[nn.Module, Config]] = {}
    floats: dict[str, LayerRecord] = {}
    used = dict.fromkeys(exclude, False)
    for name, m in model.named_modules():
        if isinstance(m, QuantizedModule):
            raise ValueError(f"{name!r} is already quantized: oq.quantize expects a float model")
        unsupported = _unsupported(m)
        if unsupported:
            floats[name] = LayerRecord(name, type(m).__name__, "float", unsupported, float_bytes=_param_bytes(m))
            continue
        if not _is_candidate(m):
            continue
        hit = [p for p in exclude if fnmatch.fnmatchcase(name, p)]
        for p in hit:
            used[p] = True
        cfg = config.for_module(name)
        reason = "excluded" if hit else _float_reason(m, cfg)
        if reason:
            floats[name] = LayerRecord(name, type(m).__name__, "float", reason, float_bytes=_param_bytes(m))
        else:
            targets[name] = (m, cfg)
    for pattern, matched in used.items():
        if not matched:
            log.warning("octoquant: exclude pattern %r matches no quantizable layer", pattern)
    return targets, floats


def _param_bytes(m: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))


def _run(model: nn.Module, batch) -> object:
    """Call the model on one calibration batch: a tensor, a tuple/list of positional args, or a mapping."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    raise TypeError(f"calibration batches must be tensors, tuples/lists or dicts, got {type(batch).__name__}")


def first_tensor(out: object) -> torch.Tensor:
    """The main output: the tensor itself, a ModelOutput's first field (logits, last_hidden_state), out[0]."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        return first_tensor(next(iter(out.values())))
    if isinstance(out, tuple | list) and out:
        return first_tensor(out[0])
    raise TypeError(f"cannot find a tensor in model output of type {type(out).__name__}")


PROBE_TOKENS = 64  # sequence length of a probing run on token ids (SmolLM2 pair search: 20 s at 512 tokens)


def _probe_sample(batch):
    """A small input for probing runs: the batch's first sample (index 0 of every tensor whose first dimension is
    the batch size, that of the first tensor found), and for token ids (a 2-D integer tensor, or `input_ids` and
    the tensors of its (batch, length)) the first PROBE_TOKENS positions; anything else as given."""
    batch = _first_sample(batch)
    ids = batch if isinstance(batch, torch.Tensor) else batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point()):
        return batch
    if ids.shape[1] <= PROBE_TOKENS:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch[:, :PROBE_TOKENS]
    lead = ids.shape[:2]
    return {
        k: v[:, :PROBE_TOKENS] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[:2] == lead else v
        for k, v in batch.items()
    }


def _first_sample(batch):
    """The batch's first sample: index 0 of every tensor whose first dimension is the batch size (that of the first
    tensor found); anything else as given."""
    first = next((t for t in _tensors(batch) if t.dim()), None)
    size = None if first is None else first.shape[0]

    def cut(b):
        if isinstance(b, torch.Tensor):
            return b[:1] if b.dim() and b.shape[0] == size else b
        if isinstance(b, Mapping):
            return {k: cut(v) for k, v in b.items()}
        if isinstance(b, tuple | list):
            return type(b)(cut(v) for v in b)
        return b

    return batch if size is None or size <= 1 else cut(batch)


def _materialize(calib: Iterable | None) -> list | None:
    if calib is None:
        return None
    if isinstance(calib, torch.Tensor | Mapping):
        calib = [calib]
    batches = list(calib)
    if not batches:
        raise CalibrationError("calib is empty: give at least one batch of representative inputs")
    for i, b in enumerate(batches):
        for t in _tensors(b):
            try:
                check_finite(t, f"calibration batch {i}")
            except ValueError as e:
                raise CalibrationError(str(e)) from None
    return batches


def _tensors(batch) -> Iterator[torch.Tensor]:
    """The tensors of one calibration batch (a tensor, tuples / lists of arguments, mappings, nested)."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, tuple | list):
        for v in batch:
            yield from _tensors(v)


def _input_observer(cal: Calibrator, cfg: Config, name: str) -> Observer:
    """An observer of calibrator `cal` for a static input quantized as `cfg` says (dtype, percentile)."""
    scheme = QScheme(cfg.activation_dtype, symmetric=cfg.activation_dtype is QDtype.INT8)
    kwargs = {"percentile": cfg.percentile} if cal is Calibrator.PERCENTILE else {}
    return make_observer(cal.value, scheme, name, **kwargs)


class _Recorder:
    """Forward pre-hook: feeds a layer's input to its observers and sample sketch."""

    def __init__(self, name: str, module: nn.Module, cfg: Config) -> None:
        self.name = name
        cals = AUTO_CANDIDATES if cfg.calibrator is Calibrator.AUTO else (cfg.calibrator,)
        self.observers: dict[Calibrator, Observer] = {c: _input_observer(c, cfg, f"{name} (input)") for c in cals}
        self.sketch = SampleSketch(3 if isinstance(module, nn.Conv2d) else 1)
        self.module = module
        self.hessian: torch.Tensor | None = None
        self.wants_hessian = cfg.weight_rounding is Rounding.GPTQ

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            raise CalibrationError(f"{self.name!r}: expected a tensor input during calibration")
        x = args[0]
        check_finite(x, f"calibration input of layer {self.name!r}")
        for obs in self.observers.values():
            obs.update(x)
        self.sketch.add(x)
        if self.wants_hessian:
            self.hessian = input_hessian_update(self.hessian, x, self.module)


@torch.no_grad()
def _calibrate(model: nn.Module, targets: dict, batches: list, progress: bool) -> dict[str, _Recorder]:
    recorders = {name: _Recorder(name, m, cfg) for name, (m, cfg) in targets.items()}
    handles = [m.register_forward_pre_hook(recorders[name]) for name, (m, _) in targets.items()]
    try:
        for batch in tqdm(batches, desc="calibrating", disable=not progress, leave=False):
            _run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return recorders


def _weight_range(w: torch.Tensor, cfg: Config, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-output-channel (min, max) for the weight, or None for plain per-channel min-max."""
    w2 = w.detach().to(torch.float32).reshape(w.shape[0], -1)
    check_finite(w2, f"weight of {name!r}")
    if isinstance(cfg.weight_granularity, PerTensor):
        lo, hi = w2.min(), w2.max()
        return lo.expand(w.shape[0]).clone(), hi.expand(w.shape[0]).clone()
    if cfg.weight_calibrator is Calibrator.MSE and isinstance(cfg.weight_granularity, PerChannel):
        obs = MSEObserver(QScheme(granularity=PerChannel(0)), f"{name} (weight)")
        obs.update(w2)
        return obs.compute_range()
    return None


def _clip_range_of(cfg: Config) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """x -> (lo, hi): the static input range `cfg`'s calibrator picks for one tensor (auto: mse)."""
    cal = Calibrator.MSE if cfg.calibrator is Calibrator.AUTO else cfg.calibrator

    def clip_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        obs = _input_observer(cal, cfg, "channel-equalization sample")
        obs.update(x)
        return obs.compute_range()

    return clip_range


def _granularity_name(cfg: Config) -> str:
    g = cfg.weight_granularity
    if isinstance(g, PerTensor):
        return "per-tensor"
    if isinstance(g, PerChannel):
        return "per-channel"
    return f"per-group({g.group_size})"


def _build(
    name: str, m: nn.Module, cfg: Config, rec: _Recorder | None, backend: str | None
) -> tuple[QuantizedModule, LayerRecord]:
    """The quantized replacement of one layer, and its summary row."""
    is_conv = isinstance(m, nn.Conv2d)
    w = m.weight if not _is_conv1d(m) else m.weight.T
    wr = _weight_range(w, cfg, name)
    group = cfg.weight_granularity.group_size if isinstance(cfg.weight_granularity, PerGroup) else None
    if group is not None and w.shape[1] % group:  # a group size that does not divide K: per-channel scales
        log.info("octoquant: %r: group size %d does not divide %d inputs; per-channel scales", name, group, w.shape[1])
        group = None

    gptq_codes = None
    if cfg.weight_rounding is Rounding.GPTQ:
        if rec is None or rec.hessian is None:
            raise CalibrationError(f"{name!r}: gptq rounding needs calibration data (calib=...)")

    def make(input_range):
        nonlocal gptq_codes
        if is_conv:
            q = QConv2d.from_float(
                m,
                input_range=input_range,
                mode=cfg.mode,
                input_dtype=cfg.activation_dtype,
                weight_range=wr,
                backend=backend,
                name=name,
            )
        else:
            q = QLinear.from_float(
                m,
                cfg.mode,
                input_range=input_range,
                input_dtype=cfg.activation_dtype,
                weight_range=wr,
                group_size=group,
                backend=backend,
                name=name,
                outlier_threshold=cfg.outlier_threshold,
            )
        if cfg.weight_rounding is Rounding.GPTQ:
            if gptq_codes is None:  # the same codes for every activation candidate
                groups = rec.hessian.shape[0]
                w3 = w.detach().reshape(groups, w.shape[0] // groups, -1)
                gptq_codes = gptq_round(w3, q.weight_scale.reshape(groups, -1), rec.hessian).reshape(q.weight.shape)
            q.weight.copy_(gptq_codes)
            q._packed = None
        return q

    record = LayerRecord(
        name,
        type(m).__name__,
        "int8",
        mode=cfg.mode.value,
        weight_granularity=_granularity_name(cfg),
        float_bytes=_param_bytes(m),
    )
    sample = rec.sketch.units if rec is not None else None  # float32
    # the float layer's output on it, in its own dtype (a bf16 / fp16 model), compared in float32
    ref = m(sample.to(w.dtype)).to(torch.float32) if sample is not None else None
    if cfg.mode is QuantMode.W8A8_STATIC:
        if rec is None:
            raise CalibrationError(f"{name!r}: static W8A8 needs calibration data (calib=...)")
        best = None
        for cal, obs in rec.observers.items():
            lo, hi = obs.compute_range()
            q = make((float(lo), float(hi)))
            err = _residual_error(ref - q(sample), is_conv, cfg.bias_correction) if len(rec.observers) > 1 else 0.0
            if best is None or err < best[0]:
                best = (err, cal, q, (float(lo), float(hi)))
        _, cal, q, rng = best
        record.calibrator = cal.value + (" (auto)" if cfg.calibrator is Calibrator.AUTO else "")
        record.clip_range = rng
        if cfg.bias_correction:
            _correct_bias(q, ref - q(sample), is_conv)
    else:
        q = make(None)
        record.calibrator = "dynamic" if cfg.mode is QuantMode.W8A8_DYNAMIC else "-"
    if sample is not None:
        record.sqnr_db = sqnr_db(ref, q(sample))
        if isinstance(q, QLinear) and q.mode is QuantMode.W8A8_STATIC:  # what a dynamic fallback would give
            record.dynamic_sqnr_db = sqnr_db(ref, q.to_dynamic()(sample))
    record.weight_sqnr_db = _weight_sqnr_db(w.detach(), q)
    record.bytes = sum(b.numel() * b.element_size() for b in q.buffers())
    return q, record


# Rows per step when comparing a weight with its int8 version: float64 copies of a whole 262k-vocabulary head
# would cost gigabytes; in row blocks the peak is a few times this many elements.
WEIGHT_ROWS_ELEMENTS = 1 << 20


def _weight_sqnr_db(w: torch.Tensor, q: nn.Module) -> float:
    """SQNR (dB) of the dequantized int8 weight against the float one, accumulated over row blocks."""
    w2 = w.reshape(w.shape[0], -1)
    gran = PerChannel(0) if q.weight_scale.dim() == 1 else PerGroup(q.group_size)
    step = max(1, WEIGHT_ROWS_ELEMENTS // max(1, w2.shape[1]))
    sig = err = torch.zeros((), dtype=torch.float64)
    for i in range(0, w2.shape[0], step):
        ref = w2[i : i + step].to(torch.float64)
        dq = dequantize(q.weight[i : i + step], q.weight_scale[i : i + step], 0, gran).reshape(ref.shape)
        sig = sig + ref.pow(2).sum()
        err = err + (ref - dq.to(torch.float64)).pow(2).sum()
    return float("inf") if err == 0 else float(10.0 * torch.log10(sig / err))


def _channel_dims(error: torch.Tensor, is_conv: bool) -> list[int]:
    return [0, 2, 3] if is_conv else list(range(error.dim() - 1))


def _residual_error(error: torch.Tensor, is_conv: bool, bias_corrected: bool) -> float:
    """Mean squared output error that remains after (optional) bias correction removes its channel means."""
    if bias_corrected:
        error = error - error.mean(dim=_channel_dims(error, is_conv), keepdim=True)
    return float(error.pow(2).mean())


def _correct_bias(q: QuantizedModule, error: torch.Tensor, is_conv: bool) -> None:
    """Empirical bias correction: add the mean output error (FP32 - int8) per output channel to the bias."""
    delta = error.to(torch.float64).mean(dim=_channel_dims(error, is_conv)).to(torch.float32)  # (out_channels,)
    if q.bias is None:
        q.bias = torch.zeros_like(delta)
    q.bias.add_(delta)
    q._packed = None


def _swap(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def _output_error(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    """Noise-to-signal power ratio of the model outputs (10 ** (-SQNR / 10))."""
    num = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(ref, out, strict=True))
    den = sum(float(a.double().pow(2).sum()) for a in ref)
    return num / den if den > 0 else float("inf")


@torch.no_grad()
def _outputs(model: nn.Module, batches: list) -> list[torch.Tensor]:
    return [first_tensor(_run(model, b)).detach().float() for b in batches]


def _smooth(work: nn.Module, batches: list, config: Config) -> None:
    """SmoothQuant: the (producer -> linears) pairs of a known architecture, or those `discover_pairs` finds by
    running the model on the first calibration batch; a warning naming the blocks when none can be smoothed."""
    from .transforms.smoothquant import DISCOVERED_MIN_OUTLIER_RATIO, discover_pairs, find_pairs, smooth

    pairs = find_pairs(work)
    min_ratio = None  # the table's pairs: always searched (SmolLM2 figures)
    if pairs is None:
        min_ratio = DISCOVERED_MIN_OUTLIER_RATIO
        sample = _probe_sample(batches[0])
        pairs, rejected = discover_pairs(work, lambda: first_tensor(_run(work, sample)).detach().float())
        if not pairs:
            if rejected:  # norms / linears found, but none a float identity to fold into (post-norm residuals...)
                blocks = sorted({p.producer.rsplit(".", 1)[0] for p in rejected})
                log.warning(
                    "octoquant: SmoothQuant skipped: no (norm -> linears) pair of %s folds exactly (blocks: %s)",
                    type(work).__name__,
                    ", ".join(blocks[:6]) + (" ..." if len(blocks) > 6 else ""),
                )
            return
        log.info("octoquant: SmoothQuant on %d pairs found by tracing %s", len(pairs), type(work).__name__)
    chosen = smooth(
        work, lambda: [_run(work, b) for b in batches], config.mode, pairs, min_ratio, config.weight_granularity
    )
    work.octoquant_smoothquant = chosen


def is_token_model(model: nn.Module) -> bool:
    """A model fed token embeddings (a transformer / LLM), whose static activations default to minmax ranges."""
    return any(isinstance(m, nn.Embedding) for m in model.modules())


def _as_quantizable_layers(model: nn.Module) -> None:
    """Float-identity rewrites that expose weights as quantizable layers: nn.MultiheadAttention's packed projection
    as q/k/v Linears, nn.Conv1d as a height-1 Conv2d (also applied by `oq.load` to the float architecture)."""
    from .transforms import conv1d_as_conv2d, decompose_multihead_attention

    decompose_multihead_attention(model)
    conv1d_as_conv2d(model)


@torch.no_grad()
def _prepare(model, config, calib, exclude, inplace, backend, progress):
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, Config):
        raise TypeError(f"config must be an oq.Config (e.g. oq.W8A8), got {type(config).__name__}")
    config = config.with_default_calibrator(is_token_model(model))
    work = model if inplace else copy.deepcopy(model)
    work.eval()
    _as_quantizable_layers(work)
    targets, floats = _select(work, config, list(exclude))
    if not targets:
        reasons = sorted({r.reason for r in floats.values()})
        found = f"; its {len(floats)} candidate layers stay float: {', '.join(reasons)}" if floats else ""
        raise ValueError(f"the model has no quantizable layer (nn.Linear, nn.Conv2d, transformers Conv1D){found}")
    from .transforms import equalize_channels, equalize_depthwise, fold_batchnorm

    batches = _materialize(calib)
    if batches is None:
        fold_batchnorm(work)  # consecutive Sequential children only
    else:  # and pairs in any forward code, checked on a calibration sample
        probe = _probe_sample(batches[0])
        fold_batchnorm(work, lambda: first_tensor(_run(work, probe)).detach().float())
    if batches is not None and config.smoothquant:  # W8A16 too: activation-aware weight scaling
        _smooth(work, batches, config)
    if batches is not None and config.equalize_depthwise and config.mode is not QuantMode.W8A16:

        def calibration_pass():
            for b in batches:
                _run(work, b)

        equalize_depthwise(work, calibration_pass)
        if (
            config.equalize_channels
            and config.mode is QuantMode.W8A8_STATIC
            and isinstance(config.weight_granularity, PerChannel)
            and config.calibrator in CHANNEL_EQUALIZATION_CALIBRATORS
        ):
            equalize_channels(work, calibration_pass, _clip_range_of(config), config.bias_correction)
    from .transforms import find_conv_activation_pairs

    has_conv = any(isinstance(m, nn.Conv2d) for m, _ in targets.values())
    act_pairs = find_conv_activation_pairs(work) if has_conv else []
    static = [n for n, (_, c) in targets.items() if c.mode is QuantMode.W8A8_STATIC]
    if static and batches is None:
        raise CalibrationError(
            f"static W8A8 needs calibration data (calib=...) for {len(static)} layers, "
            "e.g. a few batches of representative inputs; or use oq.W8A8_DYNAMIC"
        )
    recorders = {}
    if batches is not None:
        # without a static or GPTQ layer the pass only measures each layer's error for the summary (and the
        # ranking of a fallback): on the first batch, one model pass over the calibration set less (SmolLM2 W8A8
        # dynamic + SmoothQuant, 8 windows: 38.5 -> 30.5 s, interleaved runs)
        needs_all = any(
            c.mode is QuantMode.W8A8_STATIC or c.weight_rounding is Rounding.GPTQ for _, c in targets.values()
        )
        recorders = _calibrate(work, targets, batches if needs_all else batches[:1], progress)
    built = {}
    for name, (m, cfg) in tqdm(targets.items(), desc="quantizing", disable=not progress, leave=False):
        built[name] = _build(name, m, cfg, recorders.get(name), backend)
    return work, targets, floats, batches, built, act_pairs


def quantize(
    model: nn.Module,
    config: Config = W8A8,
    calib: Iterable | None = None,
    *,
    exclude: Sequence[str] = (),
    inplace: bool = False,
    max_error: float | None = None,
    keep_float: int = 0,
    fallback: str = "float",
    eval_batches: int = 8,
    backend: str | None = None,
    progress: bool = True,
) -> nn.Module:
    """Quantize a float model to INT8.

    Args:
        model: a float PyTorch model (eval-mode semantics are used).
        config: `oq.W8A8` (static, calibrated), `oq.W8A8_DYNAMIC`, `oq.W8A16`, or any `oq.Config`.
        calib: iterable of batches (tensors, tuples of args, dicts such as a tokenizer's BatchEncoding, or a
            DataLoader); needed for static W8A8 and for the accuracy fallback; with W8A8 dynamic and W8A16 it
            enables SmoothQuant / activation-aware weight scaling (`Config.smoothquant`).
        exclude: glob patterns of module names to keep in float (e.g. ``["classifier.*"]``).
        inplace: modify `model` itself instead of a deep copy.
        max_error: accuracy-aware fallback: keep the most sensitive layers in float until the model output's
            noise-to-signal power ratio on the calibration batches is <= max_error (0.01 = 20 dB SQNR).
        keep_float: keep this many of the most sensitive layers in float (or in `fallback` mode).
        fallback: what a sensitive layer falls back to: "float", or "dynamic" (int8 weights and per-token
            int8 activations computed at run time: still integer arithmetic, no calibrated range to miss).
        eval_batches: calibration batches used to measure the output error for the fallback.

    Returns:
        The model with Linear / Conv2d / Conv1D layers replaced by `QLinear` / `QConv2d`; `oq.summary(model)`
        lists every layer.
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; valid: {', '.join(FALLBACKS)}")
    config, tie = head_defaults(model, config)
    work, targets, floats, batches, built, act_pairs = _prepare(
        model, config, calib, exclude, inplace, backend, progress
    )
    records = dict(floats)
    for name, (q, rec) in built.items():
        _swap(work, name, q)
        records[name] = rec
    _keep_torch_transformer_layers_on_modules(work)
    if batches is not None:  # before any measurement: such a layer breaks the model while quantized
        for name in _keep_float_where_inputs_are_cast(work, targets, records, _probe_sample(batches[0])):
            del built[name], targets[name]
    if max_error is not None or keep_float:
        if batches is None:
            raise CalibrationError("max_error / keep_float need calibration batches (calib=...) to measure error")
        _fallback(
            work, targets, built, records, batches[:eval_batches], max_error, keep_float, fallback, backend, progress
        )
    _fuse_activations(work, act_pairs)
    if tie is not None:
        _tie_embedding(work, *tie)
    work = chain_convolutions(work)  # consecutive QConv2d layers pass uint8 codes (bit-identical, faster)
    work.octoquant_layers = records
    return work


def _slow_path(module: nn.Module, args: tuple) -> None:
    """A no-op forward pre-hook: its presence turns off nn.TransformerEncoderLayer's fused fast path."""
    return None


def _keep_torch_transformer_layers_on_modules(work: nn.Module) -> None:
    """nn.TransformerEncoderLayer's inference fast path (torch._transformer_encoder_layer_fwd) reads linear1 /
    linear2 .weight as float matrices instead of calling the modules; a forward pre-hook is one of its documented
    off-switches, so a layer with quantized linears runs them (its MultiheadAttention's out_proj stays float)."""
    for m in work.modules():
        if (
            isinstance(m, nn.TransformerEncoderLayer)
            and getattr(m.self_attn, "in_proj_bias", None) is not None  # (a DecomposedMultiheadAttention turns it off)
            and any(isinstance(getattr(m, n, None), QuantizedModule) for n in ("linear1", "linear2"))
        ):
            if _slow_path not in m._forward_pre_hooks.values():
                m.register_forward_pre_hook(_slow_path)


@torch.no_grad()
def _keep_float_where_inputs_are_cast(work: nn.Module, targets: dict, records: dict, sample) -> list[str]:
    """Put back in float the quantized layers that get an integer input on `sample`: the model casts their input to
    the layer's weight dtype, int8 once quantized (Hugging Face ViT, CLIP: `pixel_values.to(patch.weight.dtype)`)."""
    cast: list[str] = []

    def hook(module, args, name):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and not x.is_floating_point():
            cast.append(name)
            return (x.float(), *args[1:])  # carry on to find any other: the result is not used

    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: hook(mod, args, name))
        for name, m in work.named_modules()
        if isinstance(m, QuantizedModule) and name in targets
    ]
    try:
        _run(work, sample)
    except Exception:  # noqa: BLE001 - a float32 stand-in for a cast input may upset a later bf16 layer
        if not cast:
            raise
    finally:
        for h in hooks:
            h.remove()
    for name in dict.fromkeys(cast):
        m = targets[name][0]
        _swap(work, name, m)
        rec = records[name]
        reason = "the model casts its input to the layer's weight dtype (int8 once quantized)"
        records[name] = LayerRecord(name, rec.kind, "float", reason, float_bytes=rec.float_bytes)
        log.warning("octoquant: %s stays float: %s", name, reason)
    found = list(dict.fromkeys(cast))
    if cast:  # once those run in float, look again: a later such layer may not have been reached
        found += _keep_float_where_inputs_are_cast(work, targets, records, sample)
    return found


def hf_embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(input embedding, output head) of a Hugging Face model; None for what it has not (vision models raise
    NotImplementedError from get_input_embeddings) or for a model without the accessors."""

    def get(attr: str) -> nn.Module | None:
        fn = getattr(model, attr, None)
        try:
            m = fn() if callable(fn) else None
        except NotImplementedError:
            return None
        return m if isinstance(m, nn.Module) else None

    return get("get_input_embeddings"), get("get_output_embeddings")


def head_defaults(model: nn.Module, config: Config) -> tuple[Config, tuple[str, str] | None]:
    """The config with the output head weight-only (see Config.head_weight_only), and the (embedding, head)
    names when the two are tied."""
    emb, head = hf_embeddings(model)
    if head is None or not isinstance(head, nn.Linear) or not config.head_weight_only:
        return config, None
    names = {id(m): n for n, m in model.named_modules()}
    head_name = names.get(id(head))
    if head_name is None:
        return config, None
    if config.mode is not QuantMode.W8A16:
        head_cfg = config.replace(
            mode=QuantMode.W8A16, weight_granularity=config.head_granularity, outlier_threshold=None, overrides=()
        )
        config = config.replace(overrides=((head_name, head_cfg), *config.overrides))  # the user's win
    if emb is not None and getattr(emb, "weight", None) is head.weight and id(emb) in names:
        return config, (names[id(emb)], head_name)
    return config, None


def _tie_embedding(work: nn.Module, emb_name: str, head_name: str) -> None:
    """A tied head quantized weight-only per channel: the embedding reads the same int8 matrix (one copy)."""
    head = work.get_submodule(head_name)
    if not isinstance(head, QLinear) or head.mode is not QuantMode.W8A16:
        return  # the head stayed float (excluded) or took another form: the embedding keeps its float matrix
    emb = work.get_submodule(emb_name)
    scale = embedding_output_scale(emb)
    if scale is None:
        log.warning(
            "octoquant: %s (%s) computes more than a row lookup: it stays float (the int8 head keeps its own copy)",
            emb_name,
            type(emb).__name__,
        )
        return
    _swap(work, emb_name, QEmbedding.tied_to(head, dtype=emb.weight.dtype, embed_scale=scale))


EMBED_PROBE_ROWS = 4096  # rows looked up to tell a plain (or constant-scaled) embedding from anything else


@torch.no_grad()
def embedding_output_scale(emb: nn.Module) -> float | None:
    """c when `emb(ids)` is its weight's rows times a constant c (1 for nn.Embedding, sqrt(hidden) for Gemma's
    scaled embedding), None when it computes anything else (then a QEmbedding cannot stand in for it)."""
    weight = getattr(emb, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or getattr(emb, "max_norm", None) is not None:
        return None  # (max_norm: the lookup renormalizes rows in place)
    ids = torch.arange(min(weight.shape[0], EMBED_PROBE_ROWS), device=weight.device)
    try:
        out = emb(ids)
    except Exception:  # noqa: BLE001 - any module that does not take bare ids is not a plain lookup
        return None
    rows = weight[ids]
    if not isinstance(out, torch.Tensor) or out.shape != rows.shape:
        return None
    if torch.equal(out, rows):
        return 1.0
    nonzero = rows != 0
    if not bool(nonzero.any()):
        return None
    c = float((out[nonzero].double() / rows[nonzero].double()).median())
    eps = torch.finfo(out.dtype).eps if out.is_floating_point() else 0.0
    if c == 0 or not torch.allclose(out.double(), rows.double() * c, rtol=4 * eps, atol=0.0):
        return None
    return c


def _fuse_activations(work: nn.Module, pairs: list[tuple[str, str, bool]]) -> None:
    """Move each ReLU/ReLU6/ChannelClamp that follows an int8 conv into the conv's epilogue (exact). A shared
    activation module (called elsewhere too, e.g. after a residual add) stays where it is: it then clamps the
    already clamped conv output again, which changes nothing, and keeps clamping its other inputs."""
    from .transforms import activation_upper

    for conv_name, act_name, shared in pairs:
        conv, act = work.get_submodule(conv_name), work.get_submodule(act_name)
        upper = activation_upper(act)
        if isinstance(conv, QConv2d) and upper is not None:
            conv.fuse_activation(upper)
            if not shared:
                _swap(work, act_name, nn.Identity())


FALLBACKS = ("float", "dynamic")


# Above this many quantized layers the fallback ranks layers by their own calibration SQNR (cheap) instead of one
# whole-model pass per layer (211 passes on SmolLM2 did not finish in 11 minutes on 2 cores).
FALLBACK_RANK_BY_MODEL_MAX = 64
# The one-pass-per-layer ranking runs on a quarter of the eval batches (at least 2): it needs an order, not the
# error itself, and each accept / reject step after it measures on all of them. Measured: MiniLM static with
# keep_float=6 (8 batches) 40.3 -> 14.9 s, MobileNetV2 keep_float=3 (4 batches) 53.0 -> 40.8 s, the same layers
# chosen and bit-identical models.
FALLBACK_RANK_FRACTION = 4


def _fallback(work, targets, built, records, batches, max_error, keep_float, fallback, backend, progress) -> None:
    """Return the most sensitive layers to float (or dynamic int8) until the error target or budget holds."""
    floats = {name: m for name, (m, _) in targets.items()}  # the (BatchNorm-folded) float layers
    for name, m in floats.items():
        _swap(work, name, m)
    ref = _outputs(work, batches)  # every layer in float
    scores = {}
    if len(targets) > FALLBACK_RANK_BY_MODEL_MAX:
        # many layers (an LLM): rank by each layer's own output SQNR from calibration, not one model pass per layer
        for name in targets:
            sq = records[name].sqnr_db
            scores[name] = 0.0 if sq is None else 10 ** (-sq / 10)
    else:
        rank = batches[: max(2, len(batches) // FALLBACK_RANK_FRACTION)]
        ref_rank = ref[: len(rank)]
        for name in tqdm(targets, desc="sensitivity", disable=not progress, leave=False):
            _swap(work, name, built[name][0])
            scores[name] = _output_error(ref_rank, _outputs(work, rank))
            _swap(work, name, floats[name])
    for name, (q, _) in built.items():
        _swap(work, name, q)
    order = sorted(scores, key=lambda n: -scores[n])  # most sensitive first
    kept = 0
    err = _output_error(ref, _outputs(work, batches))
    while order and (kept < keep_float or (max_error is not None and err > max_error)):
        name = order.pop(0)
        m, cfg = targets[name]
        rec = records[name]
        if fallback == "dynamic" and cfg.mode is QuantMode.W8A16:
            continue  # weight-only already (e.g. an LLM head): there is no dynamic version of it to fall back to
        dyn_cfg = cfg.replace(mode=QuantMode.W8A8_DYNAMIC, overrides=())
        if fallback == "dynamic" and cfg.mode is not QuantMode.W8A8_DYNAMIC and _float_reason(m, dyn_cfg) is None:
            q, new = _build(name, m, dyn_cfg, None, backend)
            new.calibrator = f"dynamic (fallback; {_db(scores[name]):.1f} dB static)"
        else:
            q = floats[name]
            reason = f"sensitive (alone: {_db(scores[name]):.1f} dB)"
            new = LayerRecord(name, rec.kind, "float", reason, float_bytes=rec.float_bytes, sqnr_db=rec.sqnr_db)
        previous = _swap(work, name, q)
        new_err = _output_error(ref, _outputs(work, batches))
        if new_err >= err:  # this fallback does not help here (e.g. dynamic ranges on a CNN): keep the layer
            _swap(work, name, previous)
            continue
        records[name] = new
        err = new_err
        kept += 1
    log.info("octoquant: %d layers fell back to %s; output SQNR %.1f dB", kept, fallback, _db(err))
    work.octoquant_output_sqnr_db = _db(err)


def static_to_dynamic(qmodel: nn.Module, count: int) -> list[str]:
    """Make exactly `count` of a quantized model's static QLinear layers dynamic per-token W8A8 (same int8 weights,
    `QLinear.to_dynamic`; no float weights or calibration data needed): those whose output noise, measured on the
    calibration sample, drops most with per-token activation scales. Layers beyond `count` that an earlier call
    made dynamic return to static, so the count can be searched up and down.

    Returns the names now dynamic, largest gain first. `oq.summary` shows them as dynamic fallbacks.
    """
    records = getattr(qmodel, "octoquant_layers", None)
    if records is None:
        raise ValueError("static_to_dynamic needs a model returned by oq.quantize (its per-layer records)")
    order = sorted(
        (n for n, r in records.items() if r.dynamic_sqnr_db is not None), key=lambda n: -_dynamic_gain(records[n])
    )
    if not 0 <= count <= len(order):
        raise ValueError(f"count must be in [0, {len(order)}] (the static W8A8 Linear layers), got {count}")
    originals = qmodel.__dict__.setdefault("_octoquant_static", {})  # name -> (static module, its record)
    for i, name in enumerate(order):
        if i < count and name not in originals:
            static = _swap(qmodel, name, qmodel.get_submodule(name).to_dynamic())
            originals[name] = (static, records[name])
            records[name] = dataclasses.replace(
                records[name],
                mode=QuantMode.W8A8_DYNAMIC.value,
                clip_range=None,
                calibrator=f"dynamic (fallback; {records[name].sqnr_db:.1f} dB static)",
            )
        elif i >= count and name in originals:
            static, records[name] = originals.pop(name)
            _swap(qmodel, name, static)
    return order[:count]


def search_dynamic_fallback(
    qmodel: nn.Module, drop: Callable[[], float], max_drop: float, on_step: Callable[[int, float], None] | None = None
) -> tuple[int, list[float]]:
    """The fewest static Linear layers to make dynamic (`static_to_dynamic`) for `drop()` to be <= `max_drop`.

    `drop()` measures the model as it stands (e.g. the perplexity increase in % on held-out text). Counts 0, 1, 2,
    4, ... until the bound holds, then a bisection down to 1/16 of the count; the model is left at the answer.
    Returns (count, [drop of each attempt]). Raises ValueError when even every static layer dynamic misses it.
    """
    limit = sum(r.dynamic_sqnr_db is not None for r in getattr(qmodel, "octoquant_layers", {}).values())
    drops: list[float] = []

    def measure(count: int) -> bool:
        static_to_dynamic(qmodel, count)
        drops.append(float(drop()))
        if on_step is not None:
            on_step(count, drops[-1])
        return drops[-1] <= max_drop

    lo, hi = -1, 0  # lo: the largest count known to miss the bound
    while not measure(hi):
        if hi == limit:
            raise ValueError(
                f"the drop stays at {drops[-1]:.2f} > {max_drop} even with all {limit} static layers dynamic"
            )
        lo, hi = hi, min(limit, max(1, 2 * hi))
    last = hi
    while hi - lo > max(1, hi // 16):
        mid = last = (lo + hi) // 2
        if measure(mid):
            hi = mid
        else:
            lo = mid
    if last != hi:
        measure(hi)
    return hi, drops


def _dynamic_gain(rec: LayerRecord) -> float:
    """Noise-to-signal power ratio removed by per-token activation scales (0 when not measured)."""
    if rec.sqnr_db is None or rec.dynamic_sqnr_db is None:
        return 0.0
    return 10 ** (-rec.sqnr_db / 10) - 10 ** (-rec.dynamic_sqnr_db / 10)


def _db(noise_ratio: float) -> float:
    return float("inf") if noise_ratio == 0 else -10 * math.log10(noise_ratio)


def sensitivity(
    model: nn.Module,
    config: Config = W8A8,
    calib: Iterable | None = None,
    metric: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
    *,
    exclude: Sequence[str] = (),
    eval_batches: int = 8,
    backend: str | None = None,
    progress: bool = True,
) -> list[tuple[str, float]]:
    """Per-layer sensitivity: the model output's metric when only that layer is quantized.

    One calibration pass, then one forward pass over `eval_batches` batches per layer. The default metric is
    the output SQNR in dB (lower = more sensitive). Returns (layer name, value), most sensitive first.
    """
    metric = metric or (lambda ref, out: sqnr_db(ref, out))
    work, targets, _, batches, built, _ = _prepare(model, config, calib, exclude, False, backend, progress)
    if batches is None:
        raise CalibrationError("sensitivity needs calibration batches (calib=...)")
    batches = batches[:eval_batches]
    ref = torch.cat([o.reshape(-1) for o in _outputs(work, batches)])
    out = []
    for name in tqdm(targets, desc="sensitivity", disable=not progress, leave=False):
        old = _swap(work, name, built[name][0])
        _keep_torch_transformer_layers_on_modules(work)
        try:
            got = torch.cat([o.reshape(-1) for o in _outputs(work, batches)])
        except CastInputError:
            log.warning("octoquant: %s cannot be quantized: its model casts its input to its weight dtype", name)
            continue
        finally:
            _swap(work, name, old)
        out.append((name, float(metric(ref, got))))
    return sorted(out, key=lambda t: t[1])


def summary(qmodel: nn.Module, print_table: bool = True) -> list[LayerRecord]:
    """Every quantizable layer of a model returned by `oq.quantize`: mode, granularity, range, SQNR, bytes."""
    records = getattr(qmodel, "octoquant_layers", None)
    if records is None:
        raise ValueError("summary() expects a model returned by oq.quantize")
    order = {name: i for i, (name, _) in enumerate(qmodel.named_modules())}
    rows = sorted(records.values(), key=lambda r: order.get(r.name, len(order)))
    if print_table:
        print(format_summary(rows))
    return rows


def format_summary(rows: list[LayerRecord]) -> str:
    head = (
        f"{'layer':<34}{'type':<8}{'mode':<14}{'weights':<14}{'calibrator':<18}{'clip range':<20}"
        f"{'SQNR dB':>8}{'bytes':>11}"
    )
    lines = [head, "-" * len(head)]
    total_q = total_f = 0
    for r in rows:
        rng = f"[{r.clip_range[0]:.3g}, {r.clip_range[1]:.3g}]" if r.clip_range else ""
        sq = f"{r.sqnr_db:.1f}" if r.sqnr_db is not None else ""
        if r.status == "float":
            lines.append(f"{r.name:<34}{r.kind:<8}{'float':<14}{r.reason:<52}{sq:>8}{r.float_bytes:>11,}")
            total_q += r.float_bytes
        else:
            lines.append(
                f"{r.name:<34}{r.kind:<8}{r.mode:<14}{r.weight_granularity:<14}{r.calibrator:<18}{rng:<20}"
                f"{sq:>8}{r.bytes:>11,}"
            )
            total_q += r.bytes
        total_f += r.float_bytes
    n_int8 = sum(r.status == "int8" for r in rows)
    lines.append(
        f"{n_int8}/{len(rows)} layers int8; layer bytes {total_q:,} vs FP32 {total_f:,} "
        f"({total_f / max(total_q, 1):.2f}x smaller)"
    )
    return "\n".join(lines)
