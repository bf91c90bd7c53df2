"""The `octoquant` command: thin over the public API."""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


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
            weight_granularity=PerTensor(), calibrator="minmax", bias_correction=False, equalize_depthwise=False
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


PRESETS = {
    "w8a8": "W8A8",
    "w8a8-dynamic": "W8A8_DYNAMIC",
    "w8a16": "W8A16",
    "llm-int8": "LLM_INT8",
    "smoothquant": "W8A8_DYNAMIC",  # per-token int8 with SmoothQuant: needs calibration text
}
BUILTIN_MODELS = ("smollm2", "minilm", "mobilenetv2")


def _preset(name: str):
    import octoquant as oq

    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return getattr(oq, PRESETS[name])


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


def _load_model(name: str):
    """(model, tokenizer or None, kind) for a built-in name or a Hugging Face folder."""
    from pathlib import Path

    if name == "smollm2":
        from .models.smollm2 import load_smollm2

        tok, model = load_smollm2()
        return model, tok, "causal"
    if name == "minilm":
        from .models.minilm import load_minilm

        tok, model = load_minilm()
        return model, tok, "encoder"
    if name == "mobilenetv2":
        from .models.mobilenetv2 import mobilenet_v2_imagenet

        return mobilenet_v2_imagenet(), None, "vision"
    path = Path(name)
    if not path.exists():
        raise UsageError(f"model {name!r} not found: give a Hugging Face folder or one of {', '.join(BUILTIN_MODELS)}")
    if not (path / "config.json").is_file():
        raise UsageError(f"{name}: no config.json; not a Hugging Face model folder")
    import json

    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    causal = any(a.endswith("ForCausalLM") for a in archs)
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(path).eval()
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tok = None
    return model, tok, "causal" if causal else "encoder"


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
    text = _calib_text(args.calib)
    needs_calib = config.needs_calibration or args.preset == "smoothquant"
    if needs_calib and text is None and args.model != "mobilenetv2":  # checked before any model is loaded
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
        model, tok, kind = _load_model(args.model)
        calib = None
        if kind == "vision":
            from .evaluate.vision import photo_crops

            crops = photo_crops(args.calib_windows * 16, seed=0)
            calib = [crops[i : i + 16] for i in range(0, len(crops), 16)]
        elif text is not None:
            if tok is None:
                raise UsageError(f"{args.model}: no tokenizer to turn the calibration text into tokens")
            calib = oq.hf.calibration_batches(tok, text, args.calib_windows, args.seq_len)
        if needs_calib and calib is None:
            raise UsageError(f"preset {args.preset} needs calibration data: --calib FILE|DIR|wiki")
        qmodel = oq.quantize(model, config, calib=calib, exclude=args.exclude, progress=not args.json)
        oq.save(qmodel, out, overwrite=args.overwrite)
        rows = oq.summary(qmodel, print_table=not args.json)
        result = {
            "model": args.model,
            "preset": args.preset,
            "out": str(out),
            "layers_int8": sum(r.status == "int8" for r in rows),
            "layers": len(rows),
        }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["checkpoint_bytes"] = sum(p.stat().st_size for p in out.iterdir())
    if args.json:
        print(json.dumps(result))
    else:
        print(f"wrote {out} ({result['checkpoint_bytes'] / 1e6:.1f} MB) in {result['seconds']} s")
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
    q.add_argument("--calib", help="calibration text: a file, a folder of .txt files, or 'wiki'")
    q.add_argument("--calib-windows", type=int, default=8, help="calibration windows / batches (default 8)")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    q.add_argument("--calibrator", help="static activation calibrator: minmax, percentile, entropy, mse, auto")
    q.add_argument("--exclude", nargs="*", default=[], help="glob patterns of layers kept float")
    q.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--stream", action="store_true", help="quantize block by block from the safetensors files")
    q.add_argument("--json", action="store_true", help="print a JSON result line instead of tables")
    q.set_defaults(func=cmd_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"octoquant: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
