"""SmolLM2-135M: FP32 vs octoquant W8A16 / W8A8 dynamic vs torch.ao dynamic int8 (first measurement).

    python benchmarks/llm.py [--windows 16] [--out bench-results/llm.json]

Perplexity on the held-out half of the Wikipedia articles (512-token windows; calibration text never overlaps),
greedy decode ms/token at batch 1 (64 new tokens, KV cache on), median of interleaved runs, and weight bytes.
No SmoothQuant / LLM.int8() yet (the LLM issue): this is the baseline those methods must improve.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine_info, write_json  # noqa: E402

import octoquant as oq  # noqa: E402
from octoquant.evaluate.perplexity import perplexity  # noqa: E402
from octoquant.evaluate.text import wiki_text  # noqa: E402
from octoquant.models.smollm2 import load_smollm2  # noqa: E402

warnings.filterwarnings("ignore")


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def decode_ms_per_token(model, tok, new_tokens: int = 64) -> float:
    ids = tok("The history of the city begins", return_tensors="pt").input_ids
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return 1e3 * (time.perf_counter() - t0) / (out.shape[1] - ids.shape[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", default="bench-results/llm.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tok, model = load_smollm2()
    text = wiki_text("eval")
    max_tokens = args.windows * 512 + 1
    models = {"fp32": model}
    t0 = time.perf_counter()
    models["octoquant_w8a16"] = oq.quantize(model, oq.W8A16, progress=False)
    models["octoquant_w8a8_dynamic"] = oq.quantize(model, oq.W8A8_DYNAMIC, progress=False)
    quantize_s = time.perf_counter() - t0
    models["torch_ao_dynamic_qint8"] = torch.ao.quantization.quantize_dynamic(
        model, {torch.nn.Linear}, dtype=torch.qint8
    )
    rows = {}
    for name, m in models.items():
        ppl = perplexity(m, tok, text, 512, max_tokens, progress=False)
        rows[name] = {"perplexity": ppl, "weight_bytes": weight_bytes(m)}
        print(
            f"{name:<26} perplexity {ppl:8.3f}  ({100 * (ppl / rows['fp32']['perplexity'] - 1):+.2f}%)  "
            f"weights+buffers {rows[name]['weight_bytes'] / 1e6:.0f} MB",
            flush=True,
        )
    decode = {name: [] for name in models}
    for _ in range(3):  # interleaved rounds
        for name, m in models.items():
            decode[name].append(decode_ms_per_token(m, tok))
    for name in models:
        ms = sorted(decode[name])[1]
        rows[name]["decode_ms_per_token"] = ms
        speedup = rows["fp32"]["decode_ms_per_token"] / ms  # fp32 comes first in `models`
        print(f"{name:<26} decode {ms:6.1f} ms/token  ({speedup:.2f}x fp32)")
    write_json(args.out, {"machine": machine_info(), "quantize_seconds_both": quantize_s, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
