"""The `octoquant` command: thin over the public API."""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from .workloads import BUILTIN_MODELS, PRESETS


class UsageError(Exception):
    """A user error: printed as one line, exit code 2."""


def _median_ms(fn, x, reps: int = 20) -> float:
    times = []
    with torch.no_grad():
        fn(x)
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def cmd_demo(args: argparse.Namespace) -> int:
    """Quantize a real ImageNet MobileNetV2 to static W8A8 and compare it with FP32 on real photo crops."""
    from . import W8A8, PerTensor, quantize, summary
    from .evaluate import mean_kl_divergence, top1_agreement
    from .evaluate.vision import load_photos, photo_crops
    from .models.mobilenetv2 import mobilenet_v2_imagenet

    model = mobilenet_v2_imagenet()
    photos = load_photos()
    calib = photo_crops(args.calib, seed=0, photos=photos)
    evals = photo_crops(args.eval, seed=1, photos=photos)
    print(
        f"MobileNetV2 (ImageNet weights), {args.calib} calibration crops, {args.eval} held-out crops "
        f"of {len(photos)} bundled photos; {torch.get_num_threads()} threads"
    )
    t0 = time.perf_counter()
    qmodel = quantize(model, W8A8, calib=list(calib.split(16)))
    quantize_s = time.perf_counter() - t0
    summary(qmodel)
    naive = quantize(
        model,
        W8A8.replace(
            weight_granularity=PerTensor(),
            calibrator="minmax",
            bias_correction=False,
            equalize_depthwise=False,
            equalize_channels=False,
        ),
        calib=list(calib.split(16)),
        progress=False,
    )
    with torch.no_grad():
        ref = torch.cat([model(b) for b in evals.split(32)])
        out = torch.cat([qmodel(b) for b in evals.split(32)])
        out_naive = torch.cat([naive(b) for b in evals.split(32)])
    fp_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    q_bytes = sum(b.numel() * b.element_size() for b in qmodel.buffers()) + sum(
        p.numel() * p.element_size() for p in qmodel.parameters()
    )
    x1 = evals[:1].contiguous()
    ms_fp, ms_q = _median_ms(model, x1), _median_ms(qmodel, x1)
    rows = [
        (
            "weights + buffers (MB)",
            f"{fp_bytes / 1e6:.2f}",
            f"{q_bytes / 1e6:.2f}",
            f"{fp_bytes / q_bytes:.2f}x smaller",
        ),
        ("latency batch 1 (ms, median)", f"{ms_fp:.1f}", f"{ms_q:.1f}", f"{ms_fp / ms_q:.2f}x"),
        (
            "top-1 agreement with FP32",
            "1.0000",
            f"{top1_agreement(ref, out):.4f}",
            f"naive per-tensor min-max: {top1_agreement(ref, out_naive):.4f}",
        ),
        (
            "mean KL(FP32 || INT8)",
            "0",
            f"{mean_kl_divergence(ref, out):.4f}",
            f"naive per-tensor min-max: {mean_kl_divergence(ref, out_naive):.4f}",
        ),
    ]
    print(f"\nFP32 vs INT8 (static W8A8, quantized in {quantize_s:.0f} s)")
    print(f"{'':<30}{'FP32':>10}{'INT8':>10}   note")
    for name, a, b, note in rows:
        print(f"{name:<30}{a:>10}{b:>10}   {note}")
    return 0


def _preset(name: str):
    from .workloads import preset_config

    return preset_config(name)  # ValueError naming the valid presets: one line, exit 2


def _calib_text(spec: str | None) -> str | None:
    """--calib: 'wiki' (the packaged Wikipedia calibration half), a text file, or a folder of .txt files."""
    from pathlib import Path

    if spec is None:
        return None
    if spec == "wiki":
        from .evaluate.text import wiki_text

        return wiki_text("calib")
    p = Path(spec)
    if p.is_file():
        return p.read_text(errors="replace")
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise UsageError(f"calibration folder {spec} holds no .txt files")
        return "\n\n".join(f.read_text(errors="replace") for f in files)
    raise UsageError(f"calibration data {spec!r} not found (a text file, a folder of .txt files, or 'wiki')")


def _calib_images(spec: str | None) -> list | None:
    """--calib for a vision model: an image file or a folder of images (None: not images)."""
    from pathlib import Path

    from .evaluate.vision import IMAGE_SUFFIXES, load_images

    if spec is None or spec == "wiki":
        return None
    p = Path(spec)
    is_images = (p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES) or (
        p.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir())
    )
    if not is_images:
        return None
    try:
        return load_images(p)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _model_kind(model: str) -> str | None:
    """The workload kind of a built-in name or a Hugging Face folder, read before loading any weights."""
    from . import workloads as wl

    builtin = {"smollm2": "causal", "minilm": "encoder", "mobilenetv2": "vision"}
    return builtin.get(model) or wl.kind_of_folder(model)


def _calibration_inputs(spec: str | None, kind: str | None) -> tuple[str | None, list | None]:
    """(text, images) of --calib: images only for a vision model (default: the bundled photos), text otherwise."""
    images = _calib_images(spec)
    if kind == "vision":
        if spec is not None and images is None:
            raise UsageError(f"--calib for a vision model: an image or a folder of images, got {spec!r}")
        return None, images
    if images is not None:
        raise UsageError(f"--calib {spec}: images, but the model is a {kind or 'text'} model (calibration text needed)")
    return _calib_text(spec), None


def cmd_quantize(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import octoquant as oq

    config = _preset(args.preset)
    if args.calibrator:
        config = config.replace(calibrator=args.calibrator)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"output folder {out} exists; pass --overwrite to replace it")
    kind = _model_kind(args.model)
    text, images = _calibration_inputs(args.calib, kind)
    needs_calib = config.needs_calibration or args.preset == "smoothquant"
    if args.stream and args.max_drop is not None:
        raise UsageError("--max-drop needs the model in memory; it does not combine with --stream")
    if needs_calib and text is None and kind != "vision":  # checked before any model is loaded
        raise UsageError(f"preset {args.preset} needs calibration data: --calib FILE|DIR|wiki")
    t0 = time.perf_counter()
    if args.stream:
        if not Path(args.model).is_dir():
            raise UsageError("--stream reads a Hugging Face checkpoint folder (config.json + safetensors)")
        calib = None
        if text is not None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(args.model)
            calib = oq.hf.calibration_batches(tok, text, args.calib_windows, args.seq_len)
        if needs_calib and calib is None:
            raise UsageError(f"preset {args.preset} needs calibration data: --calib FILE|DIR|wiki")
        oq.quantize_checkpoint(args.model, out, config, calib, exclude=args.exclude, overwrite=args.overwrite)
        result = {"model": args.model, "preset": args.preset, "out": str(out), "streamed": True}
    else:
        from . import workloads as wl

        w = wl.load_workload(args.model)
        model, tok = w.model, w.tokenizer
        calib = wl.calibration(w, text, args.calib_windows, args.seq_len, images)
        if needs_calib and calib is None:
            raise UsageError(f"preset {args.preset} needs calibration data: --calib FILE|DIR|wiki")
        qmodel = oq.quantize(model, config, calib=calib, exclude=args.exclude, progress=not args.json)
        if args.max_drop is not None:
            qmodel, drops = _within_drop(w, config, calib, args, qmodel)
        oq.save(qmodel, out, overwrite=args.overwrite)
        if tok is not None and hasattr(tok, "save_pretrained"):
            tok.save_pretrained(out)  # a served checkpoint needs its tokenizer (vLLM, eval, export)
        rows = oq.summary(qmodel, print_table=not args.json)
        result = {
            "model": args.model,
            "preset": args.preset,
            "out": str(out),
            "layers_int8": sum(r.status == "int8" for r in rows),
            "layers": len(rows),
        }
        if args.max_drop is not None:
            result["max_drop_pct"], result["drops_pct"] = args.max_drop, drops
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["checkpoint_bytes"] = sum(p.stat().st_size for p in out.iterdir())
    if args.json:
        print(json.dumps(result))
    else:
        print(f"wrote {out} ({result['checkpoint_bytes'] / 1e6:.1f} MB) in {result['seconds']} s")
    return 0


def _percent(text: str) -> float:
    try:
        value = float(text.strip().rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage (e.g. 1%)") from None
    if not 0 <= value < 100:
        raise argparse.ArgumentTypeError(f"{text!r}: a drop between 0% and 100% expected")
    return value


def _within_drop(w, config, calib, args, qmodel):
    """--max-drop: measure the accuracy drop on held-out data; while it is above the bound, move sensitive layers
    out of static int8. Text models: static Linear layers become dynamic W8A8 in place (same int8 weights, no
    re-quantization; `oq.search_dynamic_fallback` finds the fewest). Vision models: the 1, 2, 4, ... most
    sensitive layers fall back to float (re-quantizing with `keep_float`, up to half the layers).

    Returns (model, [drop % of each attempt]); raises UsageError when the bound cannot be met.
    """
    import octoquant as oq

    from . import workloads as wl

    data = wl.eval_data(w, args.eval_windows)
    ref = wl.outputs(w, w.model, data, args.eval_windows, args.seq_len, progress=not args.json)
    in_place = config.mode is oq.QuantMode.W8A8_STATIC and w.kind != "vision"
    what = "static int8" if in_place else "int8"

    def drop(model) -> dict:
        return wl.compare(w, ref, wl.outputs(w, model, data, args.eval_windows, args.seq_len, not args.json))

    def report(keep: int, acc: dict) -> None:
        if not args.json:
            print(
                f"{acc['metric']}: {acc['int8']:.4f} vs FP32 {acc['fp32']:.4f}, drop {acc['drop_pct']:.2f}% "
                f"with {keep} layer(s) out of {what} (bound {args.max_drop}%)"
            )

    if in_place:
        last = {}

        def measure() -> float:
            last["acc"] = drop(qmodel)
            return last["acc"]["drop_pct"]

        try:
            _, drops = oq.search_dynamic_fallback(
                qmodel, measure, args.max_drop, on_step=lambda keep, _: report(keep, last["acc"])
            )
        except ValueError as e:
            raise UsageError(f"accuracy drop bound {args.max_drop}% not met: {e}; try another preset") from None
        return qmodel, [round(d, 4) for d in drops]
    keep, limit = 0, len(oq.summary(qmodel, print_table=False)) // 2
    acc = drop(qmodel)
    report(keep, acc)
    drops = [round(acc["drop_pct"], 4)]
    while drops[-1] > args.max_drop:
        keep = max(1, 2 * keep)
        if keep > limit:
            raise UsageError(
                f"accuracy drop {drops[-1]:.2f}% stays above {args.max_drop}% even with half the layers out of "
                f"{what}; try another preset"
            )
        qmodel = oq.quantize(
            w.model, config, calib=calib, exclude=args.exclude, keep_float=keep, progress=not args.json
        )
        acc = drop(qmodel)
        report(keep, acc)
        drops.append(round(acc["drop_pct"], 4))
    return qmodel, drops


def _pair(args: argparse.Namespace):
    """(workload, FP32 reference, model under test, label) for eval / bench.

    A quantized checkpoint is tested against --reference (an FP32 model) or, without it, its own dequantized
    weights; an FP32 model is quantized with --preset (default: the measured best preset for its kind).
    """
    from . import workloads as wl

    if args.preset:
        _preset(args.preset)  # checked before any model is loaded
    w = wl.load_workload(args.model, getattr(args, "arch", None))
    if w.quantized:
        if args.preset:
            raise UsageError(f"{args.model} is already quantized: --preset applies to FP32 models")
        ref_name = getattr(args, "reference", None)
        ref = wl.load_workload(ref_name).model if ref_name else wl.dequantized_copy(w.model)
        return w, ref, w.model, "checkpoint vs " + (ref_name or "its dequantized weights")
    import octoquant as oq

    preset = args.preset or wl.DEFAULT_PRESET[w.kind]
    config = _preset(preset)
    text = None
    if w.kind != "vision":
        from .evaluate.text import wiki_text

        text = wiki_text("calib")
    calib = wl.calibration(w, text, 8, 512)
    qmodel = oq.quantize(w.model, config, calib=calib, progress=not args.json)
    return w, w.model, qmodel, f"FP32 vs {preset}"


def _eval_text(spec: str | None, w, windows: int):
    from . import workloads as wl

    if spec in (None, "wiki"):
        return wl.eval_data(w, windows)
    text = _calib_text(spec)
    if w.kind == "causal":
        return text
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise UsageError(f"{spec} holds no sentences (one per line)")
    return lines


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from . import workloads as wl

    w, ref, test, label = _pair(args)
    expected = wl.METRIC[w.kind]
    task = args.task or expected
    if task != expected:
        raise UsageError(f"task {task!r} does not fit a {w.kind} model; valid for it: {expected}")
    if w.kind == "vision":
        images = _calib_images(args.data)
        if args.data is not None and images is None:
            raise UsageError(f"--data for a vision model: an image or a folder of images, got {args.data!r}")
        data = (
            wl.eval_data(w, args.windows) if images is None else wl.crops(w, wl.eval_size(w, args.windows), 1, images)
        )
    else:
        data = _eval_text(args.data, w, args.windows)
    r = wl.outputs(w, ref, data, args.windows, args.seq_len, progress=not args.json)
    q = wl.outputs(w, test, data, args.windows, args.seq_len, progress=not args.json)
    result = {"model": args.model, "task": task, "compared": label, **wl.compare(w, r, q)}
    if args.json:
        print(json.dumps(result))
    else:
        extra = f", KL {result['kl']:.4f}" if "kl" in result else ""
        print(
            f"{args.model} {task} ({label}): reference {result['fp32']:.4f}, tested {result['int8']:.4f}, "
            f"change {result['drop_pct']:+.2f}%{extra}"
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from . import workloads as wl

    w, ref, test, label = _pair(args)
    rows = wl.measure_speed(w, ref, test, tuple(args.batches), reps=args.reps, progress=not args.json)
    mem = {"reference": wl.weight_stats(ref), "tested": wl.weight_stats(test)}
    if args.json:
        print(json.dumps({"model": args.model, "compared": label, "speed": rows, "memory": mem}))
        return 0
    print(f"{args.model}: {label}, {torch.get_num_threads()} threads, medians of {args.reps} alternating runs")
    print(f"{'':<28}{'FP32':>12}{'INT8':>12}   note")
    m0, m1 = mem["reference"], mem["tested"]
    print(
        f"{'weights (MB)':<28}{m0['weight_bytes'] / 1e6:>12.1f}{m1['weight_bytes'] / 1e6:>12.1f}   "
        f"{m0['weight_bytes'] / m1['weight_bytes']:.2f}x smaller; {m1['bytes_per_weight']:.2f} bytes/weight"
    )
    for r in rows:
        print(
            f"{r['what'] + ' (ms)':<28}{r['fp32']['latency_ms']:>12.1f}{r['int8']['latency_ms']:>12.1f}   "
            f"{r['speedup']:.2f}x; {r['int8']['throughput']:.1f} {r['unit']}"
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import export
    from . import workloads as wl

    if args.format != "onnx":
        raise UsageError(f"unknown format {args.format!r}; valid: onnx")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    w = wl.load_workload(args.model, args.arch)
    if not w.quantized:
        raise UsageError(f"{args.model} is not a quantized checkpoint: run octoquant quantize first")
    model = w.model
    if w.kind == "vision":
        side = (w.image or wl.ImageSpec()).size
        example = torch.randn(1, 3, side, side)
    else:
        ids = torch.arange(16).reshape(1, 16) % 100 + 1
        example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if w.kind == "causal":
            model = export.LogitsOnly(model)
    rep = export.onnx(model, example, out, overwrite=args.overwrite, dynamic=args.dynamic, exact=args.exact)
    v = export.verify(model, out, example)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, opset {rep.opset}, {len(rep.check.integer)} int8 layers)")
    print(v.summary())
    for p in rep.check.problems:
        print(f"placement: {p}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import json

    from . import report

    if args.preset:
        _preset(args.preset)
    text, images = _calibration_inputs(args.calib, _model_kind(args.model))
    result = report.run(
        args.model,
        args.out,
        preset=args.preset,
        calib_text=text,
        calib_images=images,
        calib_windows=args.calib_windows,
        eval_windows=args.eval_windows,
        seq_len=args.seq_len,
        reps=args.reps,
        overwrite=args.overwrite,
        progress=not args.json,
    )
    if args.json:
        print(json.dumps({"out": args.out, **{k: result[k] for k in ("model", "preset", "accuracy", "speed")}}))
    else:
        print(report.terminal(result))
        print(f"\nreport: {args.out}/index.html, {args.out}/report.md, {args.out}/report.json, plots, checkpoint/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="octoquant", description="INT8 post-training quantization for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize a real MobileNetV2 to INT8 and compare it with FP32 on photos")
    demo.add_argument("--calib", type=int, default=64, help="calibration crops (default 64)")
    demo.add_argument("--eval", type=int, default=128, help="held-out evaluation crops (default 128)")
    demo.set_defaults(func=cmd_demo)
    q = sub.add_parser("quantize", help="quantize a model and write an octoquant / compressed-tensors checkpoint")
    q.add_argument("model", help=f"a Hugging Face folder, or a built-in model: {', '.join(BUILTIN_MODELS)}")
    q.add_argument("--preset", default="w8a8-dynamic", help=f"one of {', '.join(PRESETS)} (default w8a8-dynamic)")
    q.add_argument(
        "--calib",
        help="calibration text: a file, a folder of .txt files, or 'wiki'; for a vision model an image or a folder "
        "of images (default: the bundled photos)",
    )
    q.add_argument("--calib-windows", type=int, default=8, help="calibration windows / batches (default 8)")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    q.add_argument("--calibrator", help="static activation calibrator: minmax, percentile, entropy, mse, auto")
    q.add_argument("--exclude", nargs="*", default=[], help="glob patterns of layers kept float")
    q.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--stream", action="store_true", help="quantize block by block from the safetensors files")
    q.add_argument(
        "--max-drop",
        type=_percent,
        help="accuracy drop bound on held-out data, e.g. 1%%: sensitive "
        "layers fall back (static -> dynamic, else float) until it holds",
    )
    q.add_argument(
        "--eval-windows",
        type=int,
        default=8,
        help="--max-drop evaluation: LM windows; x32 sentences or crops (default 8)",
    )
    q.add_argument("--json", action="store_true", help="print a JSON result line instead of tables")
    q.set_defaults(func=cmd_quantize)

    def model_args(p, what="an FP32 model (built-in name or Hugging Face folder) or a quantized checkpoint folder"):
        p.add_argument("model", help=what)
        p.add_argument("--preset", help=f"for FP32 models: one of {', '.join(PRESETS)} (default: by model kind)")
        p.add_argument("--arch", help="architecture of a non-Hugging Face checkpoint (mobilenetv2)")
        p.add_argument("--json", action="store_true", help="print one JSON line")

    e = sub.add_parser("eval", help="accuracy of INT8 vs FP32: perplexity (LMs), cosine (encoders), top-1 (vision)")
    model_args(e)
    e.add_argument("--task", help="perplexity, cosine or top1 (the one that fits the model kind)")
    e.add_argument(
        "--data",
        help="evaluation text: a file, a folder of .txt files, or 'wiki' (default); for a vision model an image or "
        "a folder of images (default: the bundled photos)",
    )
    e.add_argument("--reference", help="FP32 model to compare a checkpoint with (default: its dequantized weights)")
    e.add_argument("--windows", type=int, default=8, help="LM windows of --seq-len tokens; 32x crops (default 8)")
    e.add_argument("--seq-len", type=int, default=512)
    e.set_defaults(func=cmd_eval)
    b = sub.add_parser("bench", help="latency, throughput and memory of INT8 vs FP32, measured in one run")
    model_args(b)
    b.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    b.add_argument("--reps", type=int, default=5, help="alternating FP32 / INT8 runs per batch (default 5)")
    b.set_defaults(func=cmd_bench)
    x = sub.add_parser("export", help="export a quantized checkpoint as an ONNX QDQ graph, checked in ONNX Runtime")
    x.add_argument("model", help="a quantized checkpoint folder (octoquant quantize --out)")
    x.add_argument("--format", default="onnx", help="onnx")
    x.add_argument("--arch", help="architecture of a non-Hugging Face checkpoint (mobilenetv2)")
    x.add_argument("--out", required=True, help="output file (refused if it exists, unless --overwrite)")
    x.add_argument("--overwrite", action="store_true")
    x.add_argument(
        "--dynamic",
        default="per-token",
        help="dynamic W8A8 layers: per-token (octoquant's numerics, "
        "MatMulInteger; ORT runs it int8) or per-tensor (QDQ DynamicQuantizeLinear; OpenVINO runs it int8)",
    )
    x.add_argument(
        "--exact",
        action="store_true",
        help="static layers as the integer ops octoquant computes (ORT reproduces octoquant's integers, running "
        "requantizing convs as QLinearConv; slower than the default)",
    )
    x.set_defaults(func=cmd_export)
    r = sub.add_parser("report", help="quantize + evaluate + benchmark: the FP32-vs-INT8 table, HTML, plots")
    r.add_argument("model", help=f"an FP32 model: a Hugging Face folder or one of {', '.join(BUILTIN_MODELS)}")
    r.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default: the measured best for the model kind)")
    r.add_argument(
        "--calib",
        help="calibration text: a file, a folder of .txt files, or 'wiki' (default); for a vision model an image "
        "or a folder of images (default: the bundled photos)",
    )
    r.add_argument("--calib-windows", type=int, default=8, help="calibration windows / batches (default 8)")
    r.add_argument("--eval-windows", type=int, default=8, help="LM windows; x32 sentences or crops (default 8)")
    r.add_argument("--seq-len", type=int, default=512)
    r.add_argument("--reps", type=int, default=5, help="alternating FP32 / INT8 timing runs (default 5)")
    r.add_argument("--out", default="report", help="report folder (default ./report)")
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"octoquant: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
