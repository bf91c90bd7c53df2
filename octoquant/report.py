"""The FP32-vs-INT8 report on the user's own model: quantize, evaluate, benchmark, then one table (terminal,
report.md, index.html) and plots (per-layer SQNR, activation histograms with each calibrator's clip range,
latency). Every number in the table is read from report.json, which holds what was measured.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import time
from pathlib import Path

import torch

from . import workloads as wl

CALIBRATORS = ("minmax", "percentile", "entropy", "mse")
DEFAULT_BATCHES = {"causal": (1, 8), "encoder": (1, 32), "vision": (1, 8)}
MAX_BARS = 48  # SQNR chart rows for a large model


def _activation_samples(model, names: list[str], batch, limit: int = 1 << 21) -> dict[str, torch.Tensor]:
    """Inputs of the named layers of the FP32 model on one calibration batch (subsampled to `limit` values)."""
    from .convert import _run

    got: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())

    def keep(name):
        def hook(module, inputs, output):  # returns None: the output is left alone
            got.setdefault(name, inputs[0].detach().reshape(-1).float())

        return hook

    hooks = [mods[n].register_forward_hook(keep(n)) for n in names if n in mods]
    try:
        with torch.no_grad():
            _run(model, batch)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, x in got.items():
        if x.numel() > limit:
            x = x[torch.linspace(0, x.numel() - 1, limit).long()]
        out[n] = x
    return out


def _clip_ranges(x: torch.Tensor) -> dict[str, tuple[float, float]]:
    from .config import QDtype, QScheme
    from .observers import make_observer

    ranges = {}
    for kind in CALIBRATORS:
        ob = make_observer(kind, QScheme(QDtype.UINT8, symmetric=False), name="activation")
        ob.update(x)
        lo, hi = ob.compute_range()
        ranges[kind] = (float(lo), float(hi))
    return ranges


def run(
    model: str,
    out: str | os.PathLike,
    *,
    preset: str | None = None,
    calib_text: str | None = None,
    calib_images: list | None = None,
    calib_windows: int = 8,
    eval_windows: int = 8,
    seq_len: int = 512,
    batches: tuple[int, ...] | None = None,
    reps: int = 5,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Quantize `model` with `preset`, measure FP32 vs INT8, write the report folder; returns report.json's dict.

    Args:
        model: a built-in name (smollm2, minilm, mobilenetv2) or a Hugging Face folder (FP32).
        calib_text: calibration text for text models (default: the packaged Wikipedia calibration half).
        calib_images: calibration images (3, H, W) in [0, 1] for vision models (default: the bundled photos).
        eval_windows: evaluation size: LM windows of seq_len tokens; 32 x this many sentences / crops otherwise.
    """
    import octoquant as oq

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"report folder {out} exists; pass --overwrite to replace it")
    w = wl.load_workload(model)
    if w.quantized:
        raise ValueError(f"{model} is already quantized: the report compares an FP32 model with its INT8 version")
    preset = preset or wl.DEFAULT_PRESET[w.kind]
    config = wl.preset_config(preset)
    if w.kind != "vision" and calib_text is None:
        from .evaluate.text import wiki_text

        calib_text = wiki_text("calib")
    calib = wl.calibration(w, calib_text, calib_windows, seq_len, calib_images)
    t0 = time.perf_counter()
    qmodel = oq.quantize(w.model, config, calib=calib, progress=progress)
    quantize_s = time.perf_counter() - t0
    rows = oq.summary(qmodel, print_table=False)

    n_eval = wl.eval_size(w, eval_windows)
    data = wl.eval_data(w, eval_windows)
    ref = wl.outputs(w, w.model, data, eval_windows, seq_len, progress)
    got = wl.outputs(w, qmodel, data, eval_windows, seq_len, progress)
    accuracy = wl.compare(w, ref, got)

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        ckpt = oq.save(qmodel, tmp / "checkpoint")
        if w.tokenizer is not None and hasattr(w.tokenizer, "save_pretrained"):
            w.tokenizer.save_pretrained(ckpt)
        ckpt_bytes = sum(p.stat().st_size for p in Path(ckpt).iterdir() if p.suffix == ".safetensors")
        speed = wl.measure_speed(w, w.model, qmodel, batches or DEFAULT_BATCHES[w.kind], reps=reps, progress=progress)
        fp_mem, q_mem = wl.weight_stats(w.model), wl.weight_stats(qmodel)
        int8_rows = [r for r in rows if r.status == "int8" and r.sqnr_db is not None]
        sensitive = [r.name for r in sorted(int8_rows, key=lambda r: r.sqnr_db)[:3]]
        samples = _activation_samples(w.model, sensitive, calib[0]) if calib else {}
        result = {
            "model": model,
            "kind": w.kind,
            "preset": preset,
            "quantize_seconds": quantize_s,
            "layers": [
                {"name": r.name, "status": r.status, "mode": r.mode, "sqnr_db": r.sqnr_db, "reason": r.reason}
                for r in rows
            ],
            "layers_int8": sum(r.status == "int8" for r in rows),
            "accuracy": accuracy,
            "eval": {"windows" if w.kind == "causal" else "items": n_eval, "seq_len": seq_len},
            "memory": {"fp32": fp_mem, "int8": q_mem},
            "checkpoint": {"int8_bytes": ckpt_bytes, "fp32_tensor_bytes": fp_mem["model_bytes"], "path": "checkpoint"},
            "speed": speed,
            "energy": "rapl" if wl.rapl_uj() is not None else "cpu-seconds",
            "hardware": wl.hardware_path(),
            "activations": {
                n: {"clip": _clip_ranges(x), "min": float(x.min()), "max": float(x.max())} for n, x in samples.items()
            },
        }
        (tmp / "report.json").write_text(json.dumps(result, indent=2))
        _plots(result, samples, tmp)
        (tmp / "report.md").write_text(markdown(result))
        (tmp / "index.html").write_text(html_page(result))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------------------------------------------
# the table: one function renders it from the JSON for the terminal, markdown and HTML


def table(result: dict) -> list[tuple[str, str, str, str]]:
    """(row, FP32, INT8, note) rows, every number formatted from `result` (report.json)."""
    mem, ck, acc = result["memory"], result["checkpoint"], result["accuracy"]
    rows = [
        (
            "bytes per weight (Linear / Conv)",
            f"{mem['fp32']['bytes_per_weight']:.2f}",
            f"{mem['int8']['bytes_per_weight']:.2f}",
            "int8 weights incl. their scales",
        ),
        (
            "weight matrices (MB)",
            f"{mem['fp32']['weight_bytes'] / 1e6:.1f}",
            f"{mem['int8']['weight_bytes'] / 1e6:.1f}",
            f"{mem['fp32']['weight_bytes'] / mem['int8']['weight_bytes']:.2f}x smaller (embeddings included)",
        ),
        (
            "checkpoint (MB)",
            f"{ck['fp32_tensor_bytes'] / 1e6:.1f}",
            f"{ck['int8_bytes'] / 1e6:.1f}",
            "FP32: tensor bytes; INT8: safetensors written",
        ),
    ]
    for s in result["speed"]:
        rows.append(
            (
                f"{s['what']} ({s['unit']})",
                f"{s['fp32']['throughput']:.1f}",
                f"{s['int8']['throughput']:.1f}",
                f"{s['speedup']:.2f}x; latency {s['fp32']['latency_ms']:.1f} -> {s['int8']['latency_ms']:.1f} ms",
            )
        )
    s1 = result["speed"][0]
    item = s1["unit"].split("/")[0].rstrip("s")  # tokens/s -> token
    if result["energy"] == "rapl":
        rows.append(
            (
                f"energy per {item} (J)",
                f"{s1['fp32']['joules_per_item']:.3f}",
                f"{s1['int8']['joules_per_item']:.3f}",
                f"RAPL, {s1['what']}",
            )
        )
    else:
        rows.append(
            (
                f"CPU-seconds per {item}",
                f"{s1['fp32']['cpu_s_per_item']:.4f}",
                f"{s1['int8']['cpu_s_per_item']:.4f}",
                f"energy proxy (no RAPL here), {s1['what']}",
            )
        )
    fmt = ".3f" if acc["metric"] == "perplexity" else ".4f"
    note = f"change {acc['drop_pct']:+.2f}%" if acc["metric"] == "perplexity" else f"drop {acc['drop_pct']:.2f}%"
    if "kl" in acc:
        note += f"; KL {acc['kl']:.4f}"
    rows.append((acc["metric"], f"{acc['fp32']:{fmt}}", f"{acc['int8']:{fmt}}", note))
    hw = result["hardware"]
    rows.append(("hardware path", hw["fp32"], hw["int8"], f"{hw['threads']} threads"))
    rows.append(("layers int8", "", f"{result['layers_int8']}/{len(result['layers'])}", f"preset {result['preset']}"))
    return rows


def terminal(result: dict) -> str:
    rows = table(result)
    w0 = max(len(r[0]) for r in rows) + 2
    w1 = max(10, max(len(r[1]) for r in rows) + 2)
    w2 = max(10, max(len(r[2]) for r in rows) + 2)
    lines = [
        f"FP32 vs INT8: {result['model']} ({result['preset']}, quantized in {result['quantize_seconds']:.0f} s)",
        f"{'':<{w0}}{'FP32':>{w1}}{'INT8':>{w2}}   note",
    ]
    lines += [f"{a:<{w0}}{b:>{w1}}{c:>{w2}}   {d}" for a, b, c, d in rows]
    return "\n".join(lines)


PLOTS = (("sqnr.png", "Per-layer SQNR"), ("activations.png", "Activation histograms"), ("latency.png", "Latency"))


def markdown(result: dict) -> str:
    lines = [f"# octoquant report: {result['model']}", "", "| | FP32 | INT8 | note |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in table(result)]
    lines.append("")
    lines += [f"![{title}]({name})" for name, title in PLOTS]
    return "\n".join(lines) + "\n"


# marks <body data-images="ok"> (or "missing:a.png,...") once the page has loaded: a browser-checkable report
_IMAGE_CHECK = (
    "<script>window.addEventListener('load',()=>{const bad=[...document.images]"
    ".filter(i=>!i.complete||i.naturalWidth===0).map(i=>i.getAttribute('src'));"
    "document.body.setAttribute('data-images',bad.length?'missing:'+bad.join(','):'ok')})</script>"
)


def html_page(result: dict) -> str:
    e = html.escape
    body = "".join(
        f"<tr><th>{e(a)}</th><td>{e(b)}</td><td>{e(c)}</td><td>{e(d)}</td></tr>" for a, b, c, d in table(result)
    )
    imgs = "".join(f'<figure><img src="{n}" alt="{e(t)}"><figcaption>{e(t)}</figcaption></figure>' for n, t in PLOTS)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>octoquant report: {e(result['model'])}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}th{text-align:left}"
        "td:last-child{text-align:left}img{max-width:100%}</style></head><body>"
        f"<h1>octoquant report: {e(result['model'])}</h1>"
        f"<table><tr><th></th><th>FP32</th><th>INT8</th><th>note</th></tr>{body}</table>{imgs}{_IMAGE_CHECK}"
        "</body></html>\n"
    )


# ---------------------------------------------------------------------------------------------------------------
# plots


def _plots(result: dict, samples: dict[str, torch.Tensor], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, title = result["layers"], f"{result['model']}: per-layer SQNR (blue int8, orange kept float)"
    if len(layers) > MAX_BARS:  # a large model: its least accurate layers, and every float one
        worst = sorted((r for r in layers if r["sqnr_db"] is not None), key=lambda r: r["sqnr_db"])[:MAX_BARS]
        keep = {id(r) for r in worst} | {id(r) for r in layers if r["status"] != "int8"}
        title = f"{result['model']}: the {len(keep)} least-SQNR / float layers of {len(layers)}"
        layers = [r for r in layers if id(r) in keep]
    fig, ax = plt.subplots(figsize=(9, 0.18 * len(layers) + 1.2))
    names = [r["name"] for r in layers]
    vals = [r["sqnr_db"] if r["sqnr_db"] is not None else 0.0 for r in layers]
    colors = ["tab:blue" if r["status"] == "int8" else "tab:orange" for r in layers]
    ax.barh(range(len(layers)), vals, color=colors)
    ax.set_yticks(range(len(layers)), names, fontsize=8)
    ax.set_ylim(len(layers) - 0.5, -0.5)
    ax.set_xlabel("layer output SQNR vs FP32 (dB), calibration sample")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "sqnr.png", dpi=110)
    plt.close(fig)

    n = max(1, len(samples))
    fig, axes = plt.subplots(n, 1, figsize=(9, 3 * n), squeeze=False)
    colors = dict(zip(CALIBRATORS, ("black", "tab:green", "tab:red", "tab:purple"), strict=True))
    for ax, (name, x) in zip(axes[:, 0], samples.items(), strict=False):
        ax.hist(x.numpy(), bins=200, color="tab:gray", log=True)
        for kind, (lo, hi) in result["activations"][name]["clip"].items():
            ax.axvline(hi, color=colors[kind], linestyle="--", label=f"{kind} [{lo:.3g}, {hi:.3g}]")
            ax.axvline(lo, color=colors[kind], linestyle="--")
        ax.set_title(f"FP32 input of {name} (low SQNR): values and each calibrator's clip range", fontsize=9)
        ax.legend(fontsize=7)
    if not samples:
        axes[0, 0].text(0.5, 0.5, "no calibration data", ha="center")
    fig.tight_layout()
    fig.savefig(folder / "activations.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    speed = result["speed"]
    xs = range(len(speed))
    ax.bar([i - 0.2 for i in xs], [s["fp32"]["latency_ms"] for s in speed], 0.4, label="FP32")
    ax.bar([i + 0.2 for i in xs], [s["int8"]["latency_ms"] for s in speed], 0.4, label="INT8")
    for i, s in enumerate(speed):
        ax.text(i + 0.2, s["int8"]["latency_ms"], f"{s['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [s["what"] for s in speed])
    ax.set_ylabel("latency (ms, median)")
    ax.set_title(f"{result['model']}: FP32 vs INT8 latency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "latency.png", dpi=110)
    plt.close(fig)
