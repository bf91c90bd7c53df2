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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="octoquant", description="INT8 post-training quantization for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize a real MobileNetV2 to INT8 and compare it with FP32 on photos")
    demo.add_argument("--calib", type=int, default=64, help="calibration crops (default 64)")
    demo.add_argument("--eval", type=int, default=128, help="held-out evaluation crops (default 128)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, FileNotFoundError, ValueError) as e:
        print(f"octoquant: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
