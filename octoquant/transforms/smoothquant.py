"""SmoothQuant: move activation outliers into the weights before W8A8 quantization (Xiao et al., 2023).

For a producer P (a norm, or a linear whose output feeds only the next linear's input channel-wise) and the
linears L_i reading its output, per input channel j:

    s_j = max|X_j| ** alpha / max_i max|W_i[:, j]| ** (1 - alpha)
    P's output channel j /= s_j        L_i.weight[:, j] *= s_j

which leaves the float function unchanged (tested) and flattens the activation channels that break int8.
alpha is searched per pair on a grid, minimizing the pair's int8 output error on calibration activations
(per-token or per-tensor activation quantization, the layers' weight granularity), not fixed globally.

Weight-only W8A16 uses the same search with float activations (the activation-aware scaling of AWQ, Lin et al.,
2024): the input channels that carry large activations get larger weight columns, so their weights round on a
finer grid relative to their size, where their rounding error would be multiplied by the large inputs. SmolLM2-135M,
group-64 weights (RESULTS.md): perplexity change +0.13% -> +0.05% on 4 held-out windows.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..config import Granularity, PerChannel, PerTensor, PerToken, QDtype, QuantMode
from ..functional import fake_quantize_static, fake_quantize_weight, quantize_dynamic, reduce_minmax, sqnr_db

log = logging.getLogger("octoquant.smoothquant")

ALPHAS = (0.0, 0.15, 0.3, 0.4, 0.5, 0.6, 0.7, 0.85)
SAMPLE_TOKENS = 512  # calibration tokens per pair kept for the alpha search
# Pairs found by tracing (not the architecture table) are smoothed only when their input has outlier channels: a
# channel range >= this many times the median one. Random-weight CLIP (ratios ~2-4) lost 31.5 -> 18.3 dB on its
# text embeddings with every traced pair smoothed (static W8A8); the outlier channels SmoothQuant is for give 10-100+.
DISCOVERED_MIN_OUTLIER_RATIO = 8.0
S_MIN = 1e-5


@dataclass(frozen=True)
class SmoothPair:
    producer: str  # a norm (weight [, bias]) or a Linear whose output rows are scaled
    consumers: tuple[str, ...]  # Linears reading the producer's output
    norm_offset: float = 0.0  # a norm computing (norm_offset + weight) * x_hat (+ bias): 1 for Gemma's RMSNorm


# (producer glob, consumer suffixes) per block, by Hugging Face model_type: a table, not if-chains.
_LLAMA = (
    ("*.input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("*.post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("*.mlp.up_proj", ("mlp.down_proj",)),  # down(act(gate(x)) * up(x)): up's rows scale down's columns
)
ARCHITECTURES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": (("*.ln_1", ("attn.c_attn",)), ("*.ln_2", ("mlp.c_fc",))),
}


def find_pairs(model: nn.Module) -> list[SmoothPair] | None:
    """The smoothing pairs of a known architecture, or None (unknown model_type)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table = ARCHITECTURES.get(model_type)
    if table is None:
        return None
    names = dict(model.named_modules())
    pairs = []
    for glob, suffixes in table:
        for name in names:
            if not fnmatch.fnmatchcase(name, glob):
                continue
            block = name.rsplit(".", 2)[0] if glob.startswith("*.mlp.") else name.rsplit(".", 1)[0]
            consumers = tuple(f"{block}.{s}" for s in suffixes)
            if all(c in names for c in consumers):
                pairs.append(SmoothPair(name, consumers))
    return pairs


# Pair discovery on a model with no table entry (`discover_pairs`): candidates from one traced forward, each kind
# of candidate kept only if (1) the model's output does not change by one bit when the producer's output is divided
# by powers of two (a forward hook) and the consumers' columns multiplied by them: exact in any float format, so any
# nonlinearity (softmax, GELU, a residual) between the two ends shows; and (2) the producer's own parameters can
# divide its output so (a Linear always; a norm as weight / s, or as (1 + weight) / s - 1 for Gemma's RMSNorm).
_LAYER_INDEX = re.compile(r"\.\d+(?=\.|$)")
NORM_OFFSETS = (0.0, 1.0)  # the norm parametrizations tried: (offset + weight) * x_hat
NOISE_MIN_SQNR_DB = 80.0  # run-to-run SQNR below which the bit-exact test means nothing (dropout left on)
NORM_MIN_SQNR_DB = 100.0  # a norm's rescaled output against output / s (float32 rounding of (1 + w) / s - 1: ~140 dB)


def _is_norm(m: nn.Module) -> bool:
    """A leaf normalization layer with a per-channel affine weight (LayerNorm, RMSNorm, ...)."""
    w = getattr(m, "weight", None)
    return (
        "norm" in type(m).__name__.lower()
        and isinstance(w, torch.Tensor)
        and w.dim() == 1
        and next(m.children(), None) is None
    )


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _features(m: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear or GPT-2 Conv1D."""
    w = _weight(m)
    return w.shape[1], w.shape[0]


def _power_of_two_scales(n: int, seed: int) -> torch.Tensor:
    """(n,) scales of 1/2, 1 or 2: multiplying or dividing by them is exact in any float format."""
    return torch.pow(2.0, torch.randint(-1, 2, (n,), generator=torch.Generator().manual_seed(seed)).float())


def _trace_candidates(model: nn.Module, run: Callable[[], object]) -> tuple[list[SmoothPair], dict[str, tuple]]:
    """Candidates seen in one forward: (norm -> the linears whose input is that norm's output tensor), and
    (linear -> a sibling linear whose input width is its output width: up -> down, v -> o, fc1 -> fc2); and each
    norm's first input arguments."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (norm, output): kept alive, ids stay unique
    norm_args: dict[str, tuple] = {}
    readers: dict[str, list[str]] = {}
    called: list[str] = []
    hooks = []

    def norm_hook(module, args, out):
        if isinstance(out, torch.Tensor):
            produced[id(out)] = (names[module], out)
            norm_args.setdefault(names[module], args)

    def linear_hook(module, args):
        name = names[module]
        if name not in called:
            called.append(name)
        x = args[0] if args else None
        hit = produced.get(id(x)) if isinstance(x, torch.Tensor) else None
        if hit is not None and hit[1] is x and name not in readers.setdefault(hit[0], []):
            readers[hit[0]].append(name)

    for m in names:
        if _is_norm(m):
            hooks.append(m.register_forward_hook(norm_hook))
        elif _is_linear(m):
            hooks.append(m.register_forward_pre_hook(linear_hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    pairs = [SmoothPair(norm, tuple(linears)) for norm, linears in readers.items()]
    modules = dict(model.named_modules())
    for down in called:
        parent = down.rpartition(".")[0]
        for up in called:
            if up != down and up.rpartition(".")[0] == parent:
                if _features(modules[up])[1] == _features(modules[down])[0]:
                    pairs.append(SmoothPair(up, (down,)))
    return pairs, norm_args


@torch.no_grad()
def _moves_through(
    model: nn.Module, run: Callable[[], torch.Tensor], ref: torch.Tensor, pairs: list[SmoothPair], min_db: float
) -> bool:
    """True when dividing each producer's output channels by powers of two (a forward hook on it) and multiplying
    its consumers' input columns by the same leaves the model's output unchanged."""
    names = dict(model.named_modules())
    consumers = {c: names[c] for p in pairs for c in p.consumers}
    saved = [(m.weight, m.weight.detach().clone()) for m in consumers.values()]
    hooks = []
    try:
        for i, p in enumerate(pairs):
            s = _power_of_two_scales(_features(consumers[p.consumers[0]])[0], i)
            hooks.append(names[p.producer].register_forward_hook(lambda m, a, out, s=s: out / s.to(out.dtype)))
            for c in p.consumers:
                _scale_consumer_columns(consumers[c], s)
        out = run()
    finally:
        for h in hooks:
            h.remove()
        for t, v in saved:
            t.data.copy_(v)
    return sqnr_db(ref, out) >= min_db


@torch.no_grad()
def _norm_offset(m: nn.Module, args: tuple) -> float | None:
    """The offset c of a norm computing (c + weight) * x_hat (+ bias), among NORM_OFFSETS, found by rescaling its
    parameters and comparing its output on `args` with output / s; None if none fits."""
    ref = m(*args)
    s = _power_of_two_scales(m.weight.numel(), 0)
    target = (ref / s.to(ref.dtype)).double()
    saved = [(t, t.detach().clone()) for t in (m.weight, getattr(m, "bias", None)) if t is not None]
    for offset in NORM_OFFSETS:
        try:
            _scale_producer_output(m, s, offset)
            out = m(*args).double()
        finally:
            for t, v in saved:
                t.data.copy_(v)
        if sqnr_db(target, out) >= NORM_MIN_SQNR_DB:
            return offset
    return None


def _kind(p: SmoothPair) -> tuple:
    """The pair's names with the layer index taken out: the same code runs in every block."""
    return _LAYER_INDEX.sub(".#", p.producer), tuple(_LAYER_INDEX.sub(".#", c) for c in p.consumers)


def discover_pairs(model: nn.Module, run: Callable[[], torch.Tensor]) -> tuple[list[SmoothPair], list[SmoothPair]]:
    """(pairs, rejected): the smoothing pairs of any model, found by running it (`run` returns its main output on a
    fixed sample). Candidates come from `_trace_candidates`; each kind of candidate is tested once on its first
    block (`_moves_through`, `_norm_offset`), then all accepted pairs together (one by one if that fails). A norm
    whose output also feeds a residual (post-norm BERT), or a nonlinearity between two linears (GELU, softmax)
    fails: those pairs are not smoothed."""
    with torch.no_grad():
        ref = run().detach().clone()
        # inf on deterministic kernels (bit-identical runs); else (atomics in a GPU reduction) the run-to-run SQNR,
        # less a margin of 4x in noise power
        min_db = sqnr_db(ref, run()) - 6.0
    if min_db < NOISE_MIN_SQNR_DB:
        log.warning("SmoothQuant pair search: the model's output changes between identical runs; no pairs searched")
        return [], []
    candidates, norm_args = _trace_candidates(model, run)
    names = dict(model.named_modules())
    kinds: dict[tuple, float | None] = {}  # kind -> the producer's norm offset (0 for a Linear), None: rejected
    for p in candidates:
        if _kind(p) in kinds:
            continue
        offset = _norm_offset(names[p.producer], norm_args[p.producer]) if p.producer in norm_args else 0.0
        kinds[_kind(p)] = offset if offset is not None and _moves_through(model, run, ref, [p], min_db) else None
    accepted, taken = [], set()
    for p in candidates:  # one producer per consumer: stats are gathered at the consumer's input
        if kinds[_kind(p)] is not None and taken.isdisjoint(p.consumers):
            accepted.append(replace(p, norm_offset=kinds[_kind(p)]))
            taken.update(p.consumers)
    if accepted and not _moves_through(model, run, ref, accepted, min_db):
        accepted = [p for p in accepted if _moves_through(model, run, ref, [p], min_db)]
    kept = {(p.producer, p.consumers) for p in accepted}
    return accepted, [p for p in candidates if (p.producer, p.consumers) not in kept]


def _weight(m: nn.Module) -> torch.Tensor:
    """(out, in) view of a Linear or GPT-2 Conv1D weight."""
    return m.weight.T if type(m).__name__ == "Conv1D" else m.weight


def _scale_consumer_columns(m: nn.Module, s: torch.Tensor) -> None:
    if type(m).__name__ == "Conv1D":  # weight (in, out)
        m.weight.data.mul_(s.reshape(-1, 1).to(m.weight.dtype))
    else:
        m.weight.data.mul_(s.reshape(1, -1).to(m.weight.dtype))


def _scale_producer_output(m: nn.Module, s: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Divide m's output channels by s: a Linear's rows (a Conv1D's columns) and bias, or a norm's affine
    parameters ((offset + weight) / s - offset for a norm that multiplies by offset + weight)."""
    inv = (1.0 / s).to(m.weight.dtype)
    if isinstance(m, nn.Linear):  # rows = output channels
        m.weight.data.mul_(inv.reshape(-1, 1))
    elif type(m).__name__ == "Conv1D":  # weight (in, out)
        m.weight.data.mul_(inv.reshape(1, -1))
    elif norm_offset:
        m.weight.data.copy_((m.weight.data + norm_offset) * inv - norm_offset)
    else:  # norm: elementwise affine weight
        m.weight.data.mul_(inv)
    if getattr(m, "bias", None) is not None:
        m.bias.data.mul_(inv)


def _fake_act(x: torch.Tensor, mode: QuantMode) -> torch.Tensor:
    if mode is QuantMode.W8A16:  # float activations: only the weights round
        return x
    if mode is QuantMode.W8A8_DYNAMIC:
        q, s, _ = quantize_dynamic(x, PerToken(), QDtype.INT8, symmetric=True)
        return q.float() * s.reshape(-1, 1)
    return fake_quantize_static(x, *reduce_minmax(x, PerTensor()))


def migration_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """s_j = max|X_j| ** alpha / max|W[:, j]| ** (1 - alpha), 1 where either is 0; all ones for alpha None."""
    if alpha is None:
        return torch.ones_like(act_absmax)
    s = (act_absmax.pow(alpha) / w_absmax.clamp_min(S_MIN).pow(1 - alpha)).clamp_min(S_MIN)
    return torch.where((act_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s))


def search_alpha(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    act_absmax: torch.Tensor,
    mode: QuantMode,
    weight_granularity: Granularity = PerChannel(0),
) -> tuple[float | None, torch.Tensor, float]:
    """(alpha, s, relative error) minimizing sum_i |X W_i^T - Q(X/s) Q(W_i s)^T|^2 over the alpha grid.

    alpha None is "no smoothing" (s = 1), kept when no grid point beats it.
    """
    w_absmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
    refs = [x @ w.T for w in weights]
    norm = sum(float(r.pow(2).sum()) for r in refs) or 1.0
    best = None
    for alpha in (None, *ALPHAS):
        s = migration_scales(act_absmax, w_absmax, alpha)
        xq = _fake_act(x / s, mode)
        err = sum(
            float((r - xq @ fake_quantize_weight(w * s, weight_granularity).T).pow(2).sum())
            for r, w in zip(refs, weights, strict=True)
        )
        if best is None or err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2], best[0] / norm


@torch.no_grad()
def outlier_ratio(act_absmax: torch.Tensor) -> float:
    """max / median of the per-channel activation ranges: LLM outlier channels make it 10-100+."""
    med = float(act_absmax.median())
    return float(act_absmax.max()) / med if med > 0 else float("inf")


def smooth(
    model: nn.Module,
    calibration_pass: Callable[[], None],
    mode: QuantMode,
    pairs: list[SmoothPair],
    min_outlier_ratio: float | None = None,
    weight_granularity: Granularity = PerChannel(0),
) -> dict[str, float | None]:
    """Apply SmoothQuant in place on the given pairs; returns the chosen alpha per producer (None: left alone).

    With `min_outlier_ratio`, a pair whose input has no outlier channel (`outlier_ratio` below it) is left alone:
    the alpha search minimizes the pair's mean output error over tokens, which on activations without outliers can
    trade the few tokens a model reads on (a CLIP text tower's end token) for the average."""
    names = dict(model.named_modules())
    stats: dict[str, dict] = {p.producer: {"absmax": None, "sample": []} for p in pairs}
    hooks = []
    for p in pairs:
        st = stats[p.producer]

        def hook(module, args, st=st):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            amax = x.abs().amax(dim=0)
            st["absmax"] = amax if st["absmax"] is None else torch.maximum(st["absmax"], amax)
            have = sum(len(t) for t in st["sample"])
            if have < SAMPLE_TOKENS:
                step = max(1, len(x) // max(1, SAMPLE_TOKENS // 4))  # spread over the batch's tokens
                st["sample"].append(x[::step][: SAMPLE_TOKENS - have].clone())

        hooks.append(names[p.consumers[0]].register_forward_pre_hook(hook))
    try:
        calibration_pass()
    finally:
        for h in hooks:
            h.remove()
    chosen = {}
    for p in pairs:
        st = stats[p.producer]
        if st["absmax"] is None:
            continue
        if min_outlier_ratio is not None and outlier_ratio(st["absmax"]) < min_outlier_ratio:
            chosen[p.producer] = None
            continue
        x = torch.cat(st["sample"])
        weights = [_weight(names[c]).detach().float() for c in p.consumers]
        alpha, s, rel = search_alpha(x, weights, st["absmax"], mode, weight_granularity)
        chosen[p.producer] = alpha
        if alpha is None:
            continue
        _scale_producer_output(names[p.producer], s, p.norm_offset)
        for c in p.consumers:
            _scale_consumer_columns(names[c], s)
        log.debug("smoothquant %s: alpha %.2f, relative error %.3g", p.producer, alpha, rel)
    return chosen
