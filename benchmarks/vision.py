"""MobileNetV2 (ImageNet weights) INT8: accuracy of every calibrator vs peers, and latency vs FP32 and ORT.

    python benchmarks/vision.py [--out bench-results/vision.json] [--quick]

Accuracy protocol (the issue's): 64 augmented crops of the bundled photos calibrate, 256 different crops
evaluate: top-1 agreement with FP32 and mean KL(FP32 || INT8). Latency: batch 1 and 8, median of
interleaved runs, 2 threads (thread count and machine load recorded).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import alone, interleaved, machine_info, write_json  # noqa: E402

import octoquant as oq  # noqa: E402
from octoquant.evaluate import mean_kl_divergence, top1_agreement  # noqa: E402
from octoquant.evaluate.vision import load_photos, photo_crops  # noqa: E402
from octoquant.models.mobilenetv2 import mobilenet_v2_imagenet  # noqa: E402

warnings.filterwarnings("ignore")


def ort_session(path_or_bytes, threads, spinning: bool = False):
    """An ORT CPU session; spinning off by default (interleaved with PyTorch, ORT's spinning workers steal its CPU)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


def export_fp32(model) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (torch.randn(1, 3, 224, 224),),
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
    )
    return buf.getvalue()


def ort_quantize_static(fp32: bytes, calib: torch.Tensor, method: str) -> bytes:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": calib[i : i + 1].numpy()} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "fp32.onnx"), os.path.join(d, "int8.onnx")
        with open(src, "wb") as f:
            f.write(fp32)
        quantize_static(
            src,
            dst,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, method),
        )
        with open(dst, "rb") as f:
            return f.read()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-results/vision.json")
    ap.add_argument("--quick", action="store_true", help="default config only, fewer latency runs")
    args = ap.parse_args()
    torch.set_num_threads(2)
    info = machine_info()
    photos = load_photos()
    calib = photo_crops(64, seed=0, photos=photos)
    evals = photo_crops(256, seed=1, photos=photos)
    batches = [calib[i : i + 16] for i in range(0, 64, 16)]
    model = mobilenet_v2_imagenet()
    with torch.no_grad():
        ref = torch.cat([model(evals[i : i + 32]) for i in range(0, 256, 32)])

    def score(out):
        return {"top1_agreement": top1_agreement(ref, out), "kl": mean_kl_divergence(ref, out)}

    def run_oq(cfg, **kw):
        t0 = time.perf_counter()
        q = oq.quantize(model, cfg, calib=batches, progress=False, **kw)
        secs = time.perf_counter() - t0
        with torch.no_grad():
            out = torch.cat([q(evals[i : i + 32]) for i in range(0, 256, 32)])
        return q, {**score(out), "quantize_seconds": secs}

    rows = {}
    configs = {"default (mse)": oq.W8A8}
    if not args.quick:
        for cal in ["minmax", "percentile", "entropy", "mse", "auto"]:
            for gran_name, gran in [("per-channel", oq.PerChannel(0)), ("per-tensor", oq.PerTensor())]:
                configs[f"{cal} {gran_name}"] = oq.W8A8.replace(calibrator=cal, weight_granularity=gran)
        configs["naive per-tensor minmax (no equalization, no bias corr.)"] = oq.W8A8.replace(
            calibrator="minmax",
            weight_granularity=oq.PerTensor(),
            bias_correction=False,
            equalize_depthwise=False,
            equalize_channels=False,
        )
    print("accuracy vs FP32 on 256 held-out crops (calibration: 64 other crops)")
    for name, cfg in configs.items():
        q, r = run_oq(cfg)
        rows[name] = r
        print(
            f"  octoquant {name:<58} agree {r['top1_agreement']:.4f}  KL {r['kl']:.4f}  ({r['quantize_seconds']:.0f}s)",
            flush=True,
        )
    q_default = run_oq(oq.W8A8)[0]
    q_fallback, r = run_oq(oq.W8A8, keep_float=3)
    rows["default + 3 float layers (keep_float=3)"] = r
    print(f"  octoquant {'default + keep_float=3':<58} agree {r['top1_agreement']:.4f}  KL {r['kl']:.4f}")

    fp32_onnx = export_fp32(model)
    ort_fp32 = ort_session(fp32_onnx, 2)
    ort_best = None
    for method in ["MinMax", "Entropy", "Percentile"]:
        try:
            int8_onnx = ort_quantize_static(fp32_onnx, calib, method)
        except Exception as e:  # noqa: BLE001 - a peer's failure is a result, not a crash
            rows[f"onnxruntime quantize_static {method}"] = {"error": f"{type(e).__name__}: {e}"[:200]}
            continue
        sess = ort_session(int8_onnx, 2)
        out = torch.cat(
            [torch.from_numpy(sess.run(None, {"x": evals[i : i + 32].numpy()})[0]) for i in range(0, 256, 32)]
        )
        r = score(out)
        rows[f"onnxruntime quantize_static {method}"] = r
        print(
            f"  onnxruntime quantize_static {method:<42} agree {r['top1_agreement']:.4f}  KL {r['kl']:.4f}", flush=True
        )
        if ort_best is None or r["kl"] < ort_best[0]:
            ort_best = (r["kl"], sess, method, int8_onnx)

    latency = {}
    for bs in (1, 8):
        x = evals[:bs].contiguous()
        xn = x.numpy()
        fns = {
            "pytorch_fp32": lambda i, x=x: model(x),
            "ort_fp32": lambda i, xn=xn: ort_fp32.run(None, {"x": xn}),
            "octoquant_int8": lambda i, x=x: q_default(x),
        }
        if ort_best is not None:
            fns[f"ort_int8_{ort_best[2].lower()}"] = lambda i, xn=xn: ort_best[1].run(None, {"x": xn})
        with torch.no_grad():
            t = interleaved(fns, reps=10 if args.quick else 30, budget_s=60)
        latency[f"batch{bs}"] = {k: v * 1e3 for k, v in t.items()}
        print(
            f"latency batch {bs} (ms, median of interleaved runs, 2 threads): "
            + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in t.items()),
            flush=True,
        )
    # each runtime on its own, ORT in its default settings (workers spinning between calls): the figure a user of
    # either sees; call-by-call interleaving above needs spinning off and measured ORT ~10-20% slower than this
    latency_alone = {}
    spinning = {"ort_fp32": ort_session(fp32_onnx, 2, spinning=True)}
    if ort_best is not None:
        spinning["ort_int8"] = ort_session(ort_best[3], 2, spinning=True)
    for bs in (1, 8):
        x = evals[:bs].contiguous()
        xn = x.numpy()
        fns = {"octoquant_int8": lambda x=x: q_default(x)}
        fns.update({k: (lambda s=s, xn=xn: s.run(None, {"x": xn})) for k, s in spinning.items()})
        with torch.no_grad():
            t = alone(fns, reps=30 if bs == 1 else 8)
        latency_alone[f"batch{bs}"] = {k: v * 1e3 for k, v in t.items()}
        print(
            f"latency batch {bs} (ms, each runtime alone in blocks, ORT spinning, 2 threads): "
            + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in t.items()),
            flush=True,
        )
    info["loadavg_end"] = os.getloadavg()
    write_json(args.out, {"machine": info, "accuracy": rows, "latency_ms": latency, "latency_alone_ms": latency_alone})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
