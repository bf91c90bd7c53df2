"""What the CLI and the report run on: a model (built-in, Hugging Face folder, or octoquant checkpoint), its
calibration data, its accuracy metric and its speed measurement, per model kind (causal LM, encoder, vision).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .hf import is_causal_lm_architecture, is_image_classifier_architecture

BUILTIN_MODELS = ("smollm2", "minilm", "mobilenetv2")
PRESETS = {
    "w8a8": "W8A8",
    "w8a8-dynamic": "W8A8_DYNAMIC",
    "w8a16": "W8A16",
    "llm-int8": "LLM_INT8",
    "smoothquant": "W8A8_DYNAMIC",  # per-token int8 with SmoothQuant: needs calibration text
}


def preset_config(name: str):
    """The Config of a preset name; ValueError listing the valid names."""
    import octoquant as oq

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return getattr(oq, PRESETS[name])


# the preset each kind gets by default: the measured best INT8 mode for it (see RESULTS.md)
DEFAULT_PRESET = {"causal": "smoothquant", "encoder": "w8a8-dynamic", "vision": "w8a8"}
METRIC = {"causal": "perplexity", "encoder": "cosine", "vision": "top1"}


@dataclass
class Workload:
    """A model with what is needed to feed it: its kind, tokenizer (text models) and where it came from."""

    name: str
    kind: str
    model: nn.Module
    tokenizer: object | None
    quantized: bool  # loaded from an octoquant / compressed-tensors checkpoint
    image: ImageSpec | None = None  # vision: the input the model expects


@dataclass(frozen=True)
class ImageSpec:
    """A vision model's input: square side in pixels and the per-channel normalisation."""

    size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet's
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _kind_of(config_json: Path) -> str:
    archs = json.loads(config_json.read_text()).get("architectures") or []
    if any(is_causal_lm_architecture(a) for a in archs):
        return "causal"
    return "vision" if any(is_image_classifier_architecture(a) for a in archs) else "encoder"


def kind_of_folder(path: str | Path) -> str | None:
    """ "causal", "encoder" or "vision" for a Hugging Face folder (from its config.json), None for anything else."""
    config = Path(path) / "config.json"
    return _kind_of(config) if config.is_file() else None


def _side(v) -> int | None:
    """The square side of a preprocessor size entry: an int, or {"height": ...} / {"shortest_edge": ...}."""
    if isinstance(v, dict):
        v = v.get("height") or v.get("shortest_edge")
    return v if isinstance(v, int) and v > 0 else None


def _image_spec(folder: Path, config) -> ImageSpec:
    """The input size and normalisation from the folder's preprocessor_config.json (else the config's image_size
    and ImageNet's statistics)."""
    spec = ImageSpec()
    size = getattr(config, "image_size", None)
    size = size[0] if isinstance(size, list | tuple) else size
    mean, std = spec.mean, spec.std
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        keys = ("crop_size", "size") if p.get("do_center_crop", True) else ("size",)  # the crop the model sees
        sides = [_side(p.get(k)) for k in keys]
        size = next((v for v in sides if v is not None), size)
        if isinstance(p.get("image_mean"), list) and len(p["image_mean"]) == 3:
            mean = tuple(float(x) for x in p["image_mean"])
        if isinstance(p.get("image_std"), list) and len(p["image_std"]) == 3:
            std = tuple(float(x) for x in p["image_std"])
    return ImageSpec(int(size) if isinstance(size, int) and size > 0 else spec.size, mean, std)


def load_workload(name: str, arch: str | None = None) -> Workload:
    """A built-in name, a Hugging Face folder, or a quantized checkpoint folder (written by `oq.save`).

    `arch`: the built-in architecture of a checkpoint of a non-Hugging Face model (mobilenetv2).

    Raises:
        FileNotFoundError: the path does not exist or holds no config.json (and no `arch` for a checkpoint).
    """
    if name == "smollm2":
        from .models.smollm2 import load_smollm2

        tok, model = load_smollm2()
        return Workload(name, "causal", model, tok, False)
    if name == "minilm":
        from .models.minilm import load_minilm

        tok, model = load_minilm()
        return Workload(name, "encoder", model, tok, False)
    if name == "mobilenetv2":
        from .models.mobilenetv2 import mobilenet_v2_imagenet

        return Workload(name, "vision", mobilenet_v2_imagenet().eval(), None, False, ImageSpec())
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(
            f"model {name!r} not found: give a Hugging Face folder, a checkpoint folder, or one of "
            f"{', '.join(BUILTIN_MODELS)}"
        )
    from .checkpoint import CONFIG_NAME, load

    if not (path / "config.json").is_file():
        if (path / CONFIG_NAME).is_file():
            if arch != "mobilenetv2":
                raise FileNotFoundError(
                    f"{name}: a checkpoint of a non-Hugging Face model; pass its architecture: --arch mobilenetv2"
                )
            from .models.mobilenetv2 import MobileNetV2

            with torch.device("meta"):
                skeleton = MobileNetV2()
            return Workload(name, "vision", load(path, skeleton), None, True, ImageSpec())
        raise FileNotFoundError(f"{name}: no config.json; not a Hugging Face model or checkpoint folder")
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kind = _kind_of(path / "config.json")
    quantized = (path / CONFIG_NAME).is_file() or "quantization_config" in json.loads(
        (path / "config.json").read_text()
    )
    if quantized:
        model = load(path)
    else:
        auto = {"causal": AutoModelForCausalLM, "vision": AutoModelForImageClassification}.get(kind, AutoModel)
        model = auto.from_pretrained(path).eval()
    if kind == "vision":
        return Workload(name, kind, model, None, quantized, _image_spec(path, model.config))
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tok = None
    return Workload(name, kind, model, tok, quantized)


def crops(w: Workload, n: int, seed: int, photos: list[torch.Tensor] | None = None) -> torch.Tensor:
    """`n` random-resized crops of `photos` (default: the bundled photos), at the model's input size and
    normalisation."""
    from .evaluate.vision import photo_crops

    spec = w.image or ImageSpec()
    return photo_crops(n, seed, spec.size, photos=photos, mean=spec.mean, std=spec.std)


def calibration(
    w: Workload, text: str | None, windows: int, seq_len: int, images: list[torch.Tensor] | None = None
) -> list | None:
    """Calibration batches: crops of `images` (default: the bundled photos) for vision, token windows (LM) or
    sentence batches (encoder) from `text`."""
    if w.kind == "vision":
        c = crops(w, windows * 16, seed=0, photos=images)
        return [c[i : i + 16] for i in range(0, len(c), 16)]
    if text is None:
        return None
    if w.tokenizer is None:
        raise ValueError(f"{w.name}: no tokenizer to turn the calibration text into tokens")
    if w.kind == "causal":
        from .hf import calibration_batches

        return calibration_batches(w.tokenizer, text, windows, seq_len)
    sentences = [s.strip() for s in text.replace("\n", " ").split(". ") if len(s.strip()) > 40]
    sentences = sentences[: windows * 16]
    if not sentences:
        raise ValueError("calibration text holds no sentences")
    from .models.minilm import calibration_batches as sentence_batches

    return sentence_batches(w.tokenizer, sentences, batch_size=16, max_length=min(seq_len, 128))


def dequantized_copy(qmodel: nn.Module) -> nn.Module:
    """The float model a quantized one stands for: every QLinear / QConv2d / QEmbedding replaced by its float
    layer with the dequantized weights (the FP32 comparator when only a checkpoint is at hand)."""
    from .config import PerChannel, PerGroup
    from .convert import _swap
    from .functional import dequantize
    from .nn import QConv2d, QEmbedding, QLinear

    model = copy.deepcopy(qmodel)
    for name, m in list(model.named_modules()):
        if not isinstance(m, (QLinear, QConv2d, QEmbedding)):
            continue
        group = m.group_size if isinstance(m, (QLinear, QEmbedding)) else None
        w = dequantize(m.weight, m.weight_scale, 0, PerGroup(group) if group else PerChannel(0))
        if isinstance(m, QEmbedding):
            w = w * m.embed_scale  # a plain nn.Embedding of the rows it returns
        if isinstance(m, QLinear):
            f = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        elif isinstance(m, QConv2d):
            f = nn.Conv2d(
                m.in_channels,
                m.out_channels,
                m.kernel_size,
                m.stride,
                m.padding,
                m.dilation,
                m.groups,
                m.bias is not None,
            )
        else:
            f = nn.Embedding(m.num_embeddings, m.embedding_dim)
        with torch.no_grad():
            f.weight.copy_(w)
            if getattr(m, "bias", None) is not None:
                f.bias.copy_(m.bias)
        _swap(model, name, f)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# accuracy


def eval_size(w: Workload, windows: int) -> int:
    """Evaluation size: LM windows of seq_len tokens; 32 sentences or crops per window otherwise."""
    return windows if w.kind == "causal" else 32 * windows


def eval_data(w: Workload, windows: int):
    """Held-out evaluation data: wiki text (LM), wiki sentences (encoder), photo crops (vision)."""
    if w.kind == "causal":
        from .evaluate.text import wiki_text

        return wiki_text("eval")
    if w.kind == "encoder":
        from .evaluate.text import wiki_sentences

        return wiki_sentences("eval", eval_size(w, windows))
    return crops(w, eval_size(w, windows), seed=1)


@torch.no_grad()
def outputs(w: Workload, model: nn.Module, data, windows: int, seq_len: int, progress: bool = False):
    """What the metric compares: perplexity (LM), embeddings (encoder), logits (vision)."""
    if w.kind == "causal":
        from .evaluate.perplexity import perplexity

        return perplexity(
            model, w.tokenizer, data, seq_len=seq_len, max_tokens=windows * seq_len + 1, progress=progress
        )
    if w.kind == "encoder":
        from .models.minilm import embed

        return embed(model, w.tokenizer, data)
    return torch.cat([logits_of(model(b)) for b in data.split(32)])


def logits_of(out) -> torch.Tensor:
    """A classifier's logits: the tensor itself, or `.logits` of a Hugging Face output."""
    return out if isinstance(out, torch.Tensor) else out.logits


def compare(w: Workload, ref, out) -> dict:
    """The accuracy row: metric name, FP32 value, INT8 value, drop (and KL for vision)."""
    from .evaluate import mean_kl_divergence, top1_agreement

    if w.kind == "causal":
        return {"metric": "perplexity", "fp32": ref, "int8": out, "drop_pct": 100 * (out / ref - 1)}
    if w.kind == "encoder":
        cos = (ref * out).sum(-1)
        return {
            "metric": "embedding cosine vs FP32",
            "fp32": 1.0,
            "int8": float(cos.mean()),
            "min": float(cos.min()),
            "drop_pct": 100 * (1 - float(cos.mean())),
        }
    agree = top1_agreement(ref, out)
    return {
        "metric": "top-1 agreement with FP32",
        "fp32": 1.0,
        "int8": agree,
        "kl": mean_kl_divergence(ref, out),
        "drop_pct": 100 * (1 - agree),
    }


# ---------------------------------------------------------------------------------------------------------------
# speed


def _timed(fn) -> tuple[float, float, float | None]:
    """(wall seconds, process CPU seconds, RAPL joules or None) of one call."""
    e0, c0, t0 = rapl_uj(), time.process_time(), time.perf_counter()
    fn()
    wall, cpu, e1 = time.perf_counter() - t0, time.process_time() - c0, rapl_uj()
    joules = (e1 - e0) / 1e6 if e0 is not None and e1 is not None and e1 >= e0 else None
    return wall, cpu, joules


def speed_fns(w: Workload, batch: int, new_tokens: int = 32):
    """(description, unit, items per call, fn(model)) for one speed row of this kind at `batch`."""
    if w.kind == "causal":
        ids = torch.full((batch, 16), 1, dtype=torch.long)
        ids[:, 1:] = torch.arange(100, 115)

        def run(m):
            m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

        return f"decode {new_tokens} tokens, batch {batch}", "tokens/s", batch * new_tokens, run
    if w.kind == "encoder":
        enc = w.tokenizer(
            ["The quick brown fox jumps over the lazy dog near the river bank."] * batch, return_tensors="pt"
        )
        return f"encode, batch {batch}", "sentences/s", batch, lambda m: m(**enc)
    side = (w.image or ImageSpec()).size
    x = torch.randn(batch, 3, side, side)
    return f"inference, batch {batch}", "images/s", batch, lambda m: m(x)


def measure_speed(
    w: Workload, fp32: nn.Module, qmodel: nn.Module, batches: tuple[int, ...], reps: int = 5, progress: bool = False
) -> list[dict]:
    """FP32 and INT8 timed alternately (A B, B A, ...) in this process after one warm-up call each; medians.

    Energy per item: RAPL joules where the counter is readable, else process CPU-seconds (the proxy, labelled).
    """
    with torch.no_grad():  # inference timing: no autograd graph on either side
        return [_speed_row(w, fp32, qmodel, batch, reps, progress) for batch in batches]


def _speed_row(w: Workload, fp32: nn.Module, qmodel: nn.Module, batch: int, reps: int, progress: bool) -> dict:
    """One speed row: FP32 and INT8 alternated, after one warm-up call each."""
    desc, unit, items, fn = speed_fns(w, batch)
    fn(fp32), fn(qmodel)  # warm-up: packing, allocator, thread pool
    res = {"fp32": [], "int8": []}
    for r in tqdm(range(max(1, reps)), desc=f"benchmark batch {batch}", disable=not progress, leave=False):
        order = (("fp32", fp32), ("int8", qmodel)) if r % 2 == 0 else (("int8", qmodel), ("fp32", fp32))
        for key, m in order:
            res[key].append(_timed(lambda m=m, fn=fn: fn(m)))
    row = {"what": desc, "unit": unit, "batch": batch, "reps": max(1, reps)}
    for key in ("fp32", "int8"):
        wall = statistics.median(t for t, _, _ in res[key])
        joules = [j for _, _, j in res[key] if j is not None]
        row[key] = {
            "latency_ms": 1e3 * wall,
            "throughput": items / wall,
            "cpu_s_per_item": statistics.fmean(c for _, c, _ in res[key]) / items,
            "joules_per_item": statistics.fmean(joules) / items if len(joules) == len(res[key]) else None,
        }
    row["speedup"] = row["fp32"]["latency_ms"] / row["int8"]["latency_ms"]
    return row


# ---------------------------------------------------------------------------------------------------------------
# memory


def weight_stats(model: nn.Module) -> dict:
    """Bytes of the weight matrices and how many weights they hold (bytes per weight), and all tensor bytes."""
    from .nn import QConv2d, QEmbedding, QLinear

    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    wbytes, wcount, lbytes, lcount, seen = 0, 0, 0, 0, set()
    for m in model.modules():
        if isinstance(m, (QLinear, QConv2d, QEmbedding)):
            tensors = [m.weight, m.weight_scale]
        elif isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)) or type(m).__name__ == "Conv1D":
            tensors = [m.weight]
        else:
            continue
        if m.weight.data_ptr() in seen:  # tied weights count once
            continue
        seen.add(m.weight.data_ptr())
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        wcount += m.weight.numel()
        wbytes += nbytes
        if not isinstance(m, (QEmbedding, nn.Embedding)):
            lcount += m.weight.numel()
            lbytes += nbytes
    return {
        "weight_bytes": wbytes,  # every weight matrix, embeddings included
        "weights": wcount,
        "bytes_per_weight": lbytes / max(1, lcount),  # Linear / Conv weights incl. their scales
        "model_bytes": total,
    }


RAPL_ENERGY = Path("/sys/class/powercap/intel-rapl:0/energy_uj")  # package counter (AMD exposes it here too)


def rapl_uj() -> int | None:
    """The RAPL package energy counter in microjoules, None where it is not readable (containers, VMs)."""
    try:
        return int(RAPL_ENERGY.read_text())
    except (OSError, ValueError):
        return None


def hardware_path() -> dict:
    from . import kernels

    return {
        "int8": f"octoquant C++ kernels, {kernels.best_isa()}",
        "fp32": f"PyTorch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})",
        "threads": torch.get_num_threads(),
    }
