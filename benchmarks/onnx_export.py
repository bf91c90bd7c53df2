"""ONNX QDQ export: parity of the exported file in ONNX Runtime and OpenVINO with octoquant's INT8 model,
accuracy against FP32 next to ONNX Runtime's own `quantize_static` (same calibration crops), and ORT latency of
our export vs ORT FP32 vs ORT INT8, batch 1 and 8, interleaved in one process.

    python benchmarks/onnx_export.py            # -> bench-results/onnx_export.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import interleaved, machine_info, write_json  # noqa: E402
from vision import export_fp32, ort_quantize_static, ort_session  # noqa: E402

import octoquant as oq  # noqa: E402
from octoquant import export  # noqa: E402
from octoquant.evaluate import mean_kl_divergence, top1_agreement  # noqa: E402
from octoquant.evaluate.vision import load_photos, photo_crops  # noqa: E402

warnings.filterwarnings("ignore")


def _batched(fn, x, bs=32):
    return torch.cat([fn(x[i : i + bs]) for i in range(0, len(x), bs)])


def mobilenet(tmp: str, threads: int) -> dict:
    from octoquant.models.mobilenetv2 import mobilenet_v2_imagenet

    photos = load_photos()
    calib, evals = photo_crops(64, seed=0, photos=photos), photo_crops(256, seed=1, photos=photos)
    model = mobilenet_v2_imagenet().eval()
    q = oq.quantize(model, oq.W8A8, calib=[calib[i : i + 16] for i in range(0, 64, 16)], progress=False)
    path = os.path.join(tmp, "mnv2_int8.onnx")
    rep = export.onnx(q, calib[:1], path, calib=[calib[i : i + 16] for i in range(0, 64, 16)])
    with torch.no_grad():
        fp = _batched(model, evals)
        ours = _batched(q, evals)
        # the INT8 model's own sensitivity: the same model on inputs moved by 1e-6 (relative)
        jitter = _batched(q, evals * (1 + 1e-6 * torch.randn(evals.shape, generator=torch.Generator().manual_seed(5))))
    out = {
        "export": {
            "output_pairs": rep.output_pairs,
            "integer_layers": len(rep.check.integer),
            "problems": rep.check.problems,
        },
        "octoquant": {"top1_vs_fp32": top1_agreement(fp, ours), "kl_vs_fp32": mean_kl_divergence(fp, ours)},
        "octoquant_self_noise_1e-6": {
            "top1_vs_octoquant": top1_agreement(ours, jitter),
            "sqnr_db": oq.sqnr_db(ours, jitter),
        },
    }
    # exact=True: ORT reproduces octoquant's integers (float Conv of integer values / ConvInteger, no added pairs)
    exact_path = os.path.join(tmp, "mnv2_int8_exact.onnx")
    export.onnx(q, calib[:1], exact_path, exact=True)
    batches = [evals[i : i + 32] for i in range(0, 256, 32)]
    for tag, file in (("ours", path), ("ours_exact", exact_path)):
        for rt in export.RUNTIMES:
            v = export.verify(q, file, batches, runtime=rt, threads=threads)
            sess = ort_session(file, threads) if rt == "onnxruntime" else None
            if sess is not None:
                y = torch.from_numpy(np.concatenate([sess.run(None, {"input": b.numpy()})[0] for b in batches]))
            else:
                import openvino as ov

                c = ov.Core().compile_model(file, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
                y = torch.cat([torch.from_numpy(c({"input": b.numpy()})[0].copy()) for b in batches])
            out[f"{tag}_in_{rt}"] = {
                "top1_vs_octoquant": v.outputs[0]["top1_agreement"],
                "sqnr_vs_octoquant_db": v.outputs[0]["sqnr_db"],
                "top1_vs_fp32": top1_agreement(fp, y),
                "kl_vs_fp32": mean_kl_divergence(fp, y),
                "integer_ops": v.integer_ops,
                "float_ops": v.float_ops,
                "dequantized_float": v.dequantized_float,
            }
            print(f"MobileNetV2 {tag} in {rt}: {out[f'{tag}_in_{rt}']}", flush=True)
    fp32_onnx = export_fp32(model)
    theirs = ort_quantize_static(fp32_onnx, calib, "MinMax")
    s_theirs, s_fp32, s_ours = ort_session(theirs, threads), ort_session(fp32_onnx, threads), ort_session(path, threads)
    s_exact = ort_session(exact_path, threads)
    y = _batched(lambda b: torch.from_numpy(s_theirs.run(None, {"x": b.numpy()})[0]), evals)
    out["ort_quantize_static_minmax"] = {"top1_vs_fp32": top1_agreement(fp, y), "kl_vs_fp32": mean_kl_divergence(fp, y)}
    print(f"MobileNetV2 ORT quantize_static: {out['ort_quantize_static_minmax']}", flush=True)
    lat = {}
    for bs in (1, 8):
        x = evals[:bs].numpy()
        ms = interleaved(
            {
                "ort_fp32": lambda i, x=x: s_fp32.run(None, {"x": x}),
                "ort_ours_int8": lambda i, x=x: s_ours.run(None, {"input": x}),
                "ort_ours_exact": lambda i, x=x: s_exact.run(None, {"input": x}),
                "ort_quantize_static_int8": lambda i, x=x: s_theirs.run(None, {"x": x}),
            },
            reps=40,
        )
        lat[f"batch{bs}_ms"] = {k: 1e3 * v for k, v in ms.items()}
        print(f"MobileNetV2 ORT latency batch {bs} (ms): {lat[f'batch{bs}_ms']}", flush=True)
    out["latency"] = lat
    return out


def minilm(tmp: str, threads: int) -> dict:
    from octoquant.evaluate.text import wiki_sentences
    from octoquant.models.minilm import SentenceEncoder, calibration_batches, load_minilm

    tok, bert = load_minilm()
    enc = SentenceEncoder(bert).eval()

    def batches(part, n):
        return [
            {k: b[k] for k in ("input_ids", "attention_mask")}
            for b in calibration_batches(tok, wiki_sentences(part, n))
        ]

    calib, test = batches("calib", 128), batches("eval", 256)
    with torch.no_grad():
        fp = torch.cat([enc(**b) for b in test])
    out = {}
    forms = (
        ("static", oq.W8A8, "per-token", False),
        ("static_exact", oq.W8A8, "per-token", True),
        ("dynamic", oq.W8A8_DYNAMIC, "per-token", False),
        ("dynamic_per_tensor_qdq", oq.W8A8_DYNAMIC, "per-tensor", False),
    )
    for name, cfg, form, exact in forms:
        q = oq.quantize(enc, cfg, calib=calib if cfg is oq.W8A8 else None, progress=False)
        path = os.path.join(tmp, f"minilm_{name}.onnx")
        export.onnx(q, calib[0], path, calib=calib[:2], dynamic=form, exact=exact)
        with torch.no_grad():
            ours = torch.cat([q(**b) for b in test])
        row = {"octoquant_cos_vs_fp32": float(oq.cosine_similarity(fp, ours, dim=1).mean())}
        for rt in export.RUNTIMES:
            v = export.verify(q, path, test, runtime=rt, threads=threads)
            row[rt] = {
                "cos_vs_octoquant_mean": v.outputs[0]["cosine_mean"],
                "cos_vs_octoquant_min": v.outputs[0]["cosine_min"],
                "sqnr_vs_octoquant_db": v.outputs[0]["sqnr_db"],
                "integer_ops": v.integer_ops,
                "float_ops": v.float_ops,
                "dequantized_float": v.dequantized_float,
            }
        out[name] = row
        print(f"MiniLM {name}: {row}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-results/onnx_export.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        res = {"machine": info, "threads": args.threads, "mobilenetv2": mobilenet(tmp, args.threads)}
        res["minilm"] = minilm(tmp, args.threads)
    res["loadavg_end"] = os.getloadavg()
    write_json(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
