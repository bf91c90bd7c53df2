"""SmolLM2-135M in ONNX Runtime: octoquant's INT8 export vs ORT FP32 vs ORT's own `quantize_dynamic`, same windows.

    python benchmarks/llm_onnx.py [--windows 8] [--out bench-results/llm_onnx.json]

The LM exports as one graph (input_ids, attention_mask) -> logits without a KV cache, so this measures
perplexity and prefill (1 x 512) latency, interleaved in one process; decode speed is in benchmarks/llm.py.
octoquant: W8A8 dynamic per-token + SmoothQuant (8 calibration windows from the other half of the articles),
exported with `oq.export.onnx` (per-token MatMulInteger). ORT: `quantize_dynamic` (QInt8 weights, per-tensor
uint8 activations) of the FP32 export.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import interleaved, machine_info, write_json  # noqa: E402

import octoquant as oq  # noqa: E402
from octoquant import export  # noqa: E402
from octoquant.evaluate.perplexity import perplexity  # noqa: E402
from octoquant.evaluate.text import wiki_text  # noqa: E402
from octoquant.models.smollm2 import load_smollm2  # noqa: E402

warnings.filterwarnings("ignore")


def ort_perplexity(sess, ids: torch.Tensor, seq_len: int, windows: int) -> float:
    nll, count = 0.0, 0
    for w in range(windows):
        chunk = ids[w * seq_len : w * seq_len + seq_len + 1]
        x = chunk[:-1].unsqueeze(0).numpy()
        logits = torch.from_numpy(sess.run(None, {"input_ids": x, "attention_mask": np.ones_like(x)})[0])
        nll += float(torch.nn.functional.cross_entropy(logits[0].float(), chunk[1:], reduction="sum"))
        count += seq_len
    return math.exp(nll / count)


def main() -> None:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench-results/llm_onnx.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()
    tok, model = load_smollm2()
    seq = 512
    text = wiki_text("eval")
    ids = tok(text, return_tensors="pt").input_ids[0][: args.windows * seq + 1]
    calib = oq.hf.calibration_batches(tok, wiki_text("calib"), 8, seq)
    q = oq.quantize(model, oq.W8A8_DYNAMIC, calib=calib, progress=False)
    example = {"input_ids": ids[:16].unsqueeze(0), "attention_mask": torch.ones(1, 16, dtype=torch.long)}
    res = {"machine": info, "threads": args.threads, "windows": args.windows}

    def sess(path):
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    with tempfile.TemporaryDirectory() as tmp:
        fp32_path, ours_path, theirs_path = (os.path.join(tmp, f) for f in ("fp32.onnx", "ours.onnx", "ort.onnx"))
        with torch.no_grad():
            torch.onnx.export(
                export.LogitsOnly(model),
                (),
                fp32_path,
                kwargs=example,
                input_names=list(example),
                output_names=["logits"],
                opset_version=17,
                dynamo=False,
                dynamic_axes={k: {0: "batch", 1: "sequence"} for k in example},
            )
        rep = export.onnx(export.LogitsOnly(q), example, ours_path)
        quantize_dynamic(fp32_path, theirs_path, weight_type=QuantType.QInt8)
        sizes = {k: os.path.getsize(p) for k, p in (("fp32", fp32_path), ("ours", ours_path), ("ort", theirs_path))}
        s_fp, s_ours, s_ort = sess(fp32_path), sess(ours_path), sess(theirs_path)
        v = export.verify(export.LogitsOnly(q), ours_path, example, threads=args.threads)
        res["export"] = {
            "integer_layers": len(rep.check.integer),
            "integer_ops": v.integer_ops,
            "logits_sqnr_vs_octoquant_db": v.outputs[0]["sqnr_db"],
            "file_bytes": sizes,
        }
        with torch.no_grad():
            ppl = {
                "pytorch_fp32": perplexity(model, tok, text, seq, args.windows * seq + 1, progress=False),
                "octoquant_pytorch": perplexity(q, tok, text, seq, args.windows * seq + 1, progress=False),
            }
        for name, s in (("ort_fp32", s_fp), ("octoquant_export_in_ort", s_ours), ("ort_quantize_dynamic", s_ort)):
            ppl[name] = ort_perplexity(s, ids, seq, args.windows)
            print(f"{name}: perplexity {ppl[name]:.3f}", flush=True)
        res["perplexity"] = ppl
        x = ids[:seq].unsqueeze(0).numpy()
        feed = {"input_ids": x, "attention_mask": np.ones_like(x)}
        ms = interleaved(
            {
                n: (lambda i, s=s: s.run(None, feed))
                for n, s in (("ort_fp32", s_fp), ("octoquant_export", s_ours), ("ort_quantize_dynamic", s_ort))
            },
            reps=8,
        )
        res["prefill_512_ms"] = {k: 1e3 * v for k, v in ms.items()}
    res["loadavg_end"] = os.getloadavg()
    print(res["perplexity"], res["prefill_512_ms"], res["export"])
    write_json(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
