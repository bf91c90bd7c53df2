"""The `octoquant` command: thin over the public API."""

from __future__ import annotations

import argparse
import sys

import torch

from . import PerChannel, PerGroup, PerTensor, sqnr_db
from .config import QDtype
from .functional import fake_quantize, reduce_minmax
from .qparams import choose_qparams


class UsageError(Exception):
    """A user error: printed as one line, exit code 2."""


def _weight_sqnr(w: torch.Tensor, granularity) -> float:
    w2 = w.reshape(w.shape[0], -1)
    lo, hi = reduce_minmax(w2, granularity)
    scale, zp = choose_qparams(lo, hi, QDtype.INT8, symmetric=True)
    return sqnr_db(w2, fake_quantize(w2, scale, zp, granularity))


def cmd_demo(args: argparse.Namespace) -> int:
    """Per-layer int8 weight error of a real ImageNet MobileNetV2: per-tensor vs per-channel (vs per-group)."""
    from .models.mobilenetv2 import mobilenet_v2_imagenet

    model = mobilenet_v2_imagenet()
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Conv2d | torch.nn.Linear):
            w = mod.weight.detach()
            k = w[0].numel()
            row = (name, tuple(w.shape), _weight_sqnr(w, PerTensor()), _weight_sqnr(w, PerChannel(0)))
            rows.append(row + ((_weight_sqnr(w, PerGroup(32)) if k % 32 == 0 else float("nan")),))
    print(f"MobileNetV2 (ImageNet weights): int8 symmetric weight SQNR in dB, {len(rows)} layers")
    print(f"{'layer':<28}{'shape':<22}{'per-tensor':>11}{'per-channel':>12}{'per-group32':>12}")
    for name, shape, a, b, c in rows:
        print(f"{name:<28}{str(shape):<22}{a:>11.1f}{b:>12.1f}{c:>12.1f}")
    worst = min(rows, key=lambda r: r[2])
    print(f"worst per-tensor layer: {worst[0]} {worst[2]:.1f} dB -> per-channel {worst[3]:.1f} dB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="octoquant", description="INT8 post-training quantization for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="per-layer int8 weight error table of a real MobileNetV2")
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
