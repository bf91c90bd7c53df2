"""MobileNetV2 layer by layer: octoquant's block program (per-step wall time, `ChainProgram.set_profile`) against
ONNX Runtime's own INT8 model of the same network (`quantize_static`, per-node profile), 1 thread by default, and
both whole models on their own in ORT's default thread settings (workers spinning), 2 threads.

    python benchmarks/mnv2_layers.py [--batch 8] [--out bench-results/mnv2_layers.json]

Where octoquant's kernels trail ORT's, per layer type; the weights are the real ones (speed does not depend on
them, but the layer shapes are MobileNetV2's).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import alone, machine_info, write_json  # noqa: E402
from vision import export_fp32, ort_quantize_static, ort_session  # noqa: E402

import octoquant as oq  # noqa: E402
from octoquant.evaluate.vision import load_photos, photo_crops  # noqa: E402
from octoquant.models.mobilenetv2 import mobilenet_v2_imagenet  # noqa: E402
from octoquant.nn import QConv2d  # noqa: E402

warnings.filterwarnings("ignore")


def _kind(m: QConv2d) -> str:
    if m.groups > 1 and m.groups == m.in_channels:
        return "depthwise"
    if m.kernel_size != (1, 1):
        return "stem 3x3"
    return "pointwise expand" if m.out_channels > m.in_channels else "pointwise project"


def ort_node_ms(int8_onnx: bytes, x: torch.Tensor, reps: int, threads: int, warmup: int = 3) -> list[tuple[str, float]]:
    """(op type, ms per run) of every node of ORT's model, in execution order (the first `warmup` runs dropped)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as d:
        so.profile_file_prefix = os.path.join(d, "prof")
        s = ort.InferenceSession(int8_onnx, so, providers=["CPUExecutionProvider"])
        for _ in range(warmup + reps):
            s.run(None, {"x": x.numpy()})
        with open(s.end_profiling()) as f:
            events = json.load(f)
    runs, kinds = collections.defaultdict(list), {}  # node -> its kernel time per run, in run order
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            kinds.setdefault(e["name"], e["args"]["op_name"])
            runs[e["name"]].append(e["dur"] / 1e3)
    return [(kinds[n], sum(ts[warmup:]) / reps) for n, ts in runs.items()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="threads of the layer-by-layer part (default 1)")
    ap.add_argument("--out", default="bench-results/mnv2_layers.json")
    args = ap.parse_args()
    info = machine_info()
    photos = load_photos()
    calib = photo_crops(64, seed=0, photos=photos)
    model = mobilenet_v2_imagenet().eval()
    q = oq.quantize(model, oq.W8A8, calib=[calib[i : i + 16] for i in range(0, 64, 16)], progress=False)
    int8_onnx = ort_quantize_static(export_fp32(model), calib, "MinMax")
    x = calib[: args.batch].contiguous()

    torch.set_num_threads(args.threads)
    with torch.no_grad():
        for _ in range(3):  # pack, settle the cached program
            q(x)
        plan = q.features._units()[1][(x.shape[0], x.shape[2], x.shape[3], x.shape[1])]
        plan.program.set_profile(True)
        for _ in range(args.reps):
            q(x)
        step_ms = [t / 1e6 / args.reps for t in plan.program.step_ns()]
        plan.program.set_profile(False)
    ours = [(k, t) for k, t in zip(plan.step_kinds, step_ms, strict=True)]
    theirs = ort_node_ms(int8_onnx, x, args.reps, args.threads)
    convs = [(n, m) for n, m in q.features.named_modules() if isinstance(m, QConv2d)]
    our_convs = [t for k, t in ours if k != "addq"]
    their_convs = [t for k, t in theirs if k == "QLinearConv"]
    if not len(convs) == len(our_convs) == len(their_convs):
        raise SystemExit(f"layer counts differ: {len(convs)} convs, {len(our_convs)} steps, {len(their_convs)} nodes")
    layers, by_kind = [], collections.defaultdict(lambda: [0.0, 0.0])
    for (name, m), a, b in zip(convs, our_convs, their_convs, strict=True):
        kind = _kind(m)
        layers.append({"layer": f"features.{name}", "kind": kind, "octoquant_ms": a, "ort_ms": b})
        by_kind[kind][0] += a
        by_kind[kind][1] += b
    by_kind["residual add + quantize"] = [
        sum(t for k, t in ours if k == "addq"),
        sum(t for k, t in theirs if k == "QLinearAdd"),
    ]
    print(
        f"batch {args.batch}, {args.threads} thread(s), ms per run (octoquant block program steps vs ORT INT8 nodes):"
    )
    for kind, (a, b) in by_kind.items():
        print(f"  {kind:<26} octoquant {a:7.2f}  ORT {b:7.2f}  ratio {a / b:5.2f}")
    print(f"  {'all steps / all nodes':<26} octoquant {sum(step_ms):7.2f}  ORT {sum(t for _, t in theirs):7.2f}")

    torch.set_num_threads(2)
    sess = ort_session(int8_onnx, 2, spinning=True)
    whole = {}
    for bs in (1, 8):
        xb, xn = calib[:bs].contiguous(), calib[:bs].numpy()
        fns = {"octoquant": lambda xb=xb: q(xb), "ort_int8": lambda xn=xn: sess.run(None, {"x": xn})}
        with torch.no_grad():
            t = alone(fns, reps=30 if bs == 1 else 8)
        whole[f"batch{bs}"] = {k: v * 1e3 for k, v in t.items()}
        print(
            f"whole model, batch {bs}, 2 threads, each alone (ORT spinning): "
            + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in t.items())
        )
    info["loadavg_end"] = os.getloadavg()
    write_json(
        args.out,
        {
            "machine": info,
            "batch": args.batch,
            "layer_threads": args.threads,
            "per_kind_ms": {k: {"octoquant": a, "ort": b} for k, (a, b) in by_kind.items()},
            "layers": layers,
            "whole_model_alone_ms": whole,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
