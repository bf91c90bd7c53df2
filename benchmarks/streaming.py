"""Peak memory of streaming quantization on a synthetic Llama-style checkpoint larger than a few GB.

    python benchmarks/streaming.py [--gb 3.2] [--mode w8a8_dynamic|w8a16|w8a8_static] [--out FILE]

Writes the FP32 checkpoint shard by shard (random weights), then runs `oq.quantize_checkpoint` in a fresh
subprocess that reports its peak RSS (VmHWM) after the imports and after quantizing; the folder is loaded
back to check it. Peak RSS is compared with the checkpoint size (the issue's bar: <= 25%).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine_info, write_json  # noqa: E402

from octoquant.models.synthetic import write_llama_checkpoint  # noqa: E402

CHILD = r"""
import json, sys, time
import torch
import transformers.models.llama.modeling_llama  # noqa: F401  (imports counted in the baseline)
import octoquant as oq
from octoquant.streaming import quantize_checkpoint

def hwm():  # peak RSS of this process image (VmHWM; ru_maxrss would carry the parent's peak across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

torch.set_num_threads(2)
base = hwm()
src, dst, mode = sys.argv[1:4]
config = {"w8a8_dynamic": oq.W8A8_DYNAMIC, "w8a16": oq.W8A16, "w8a8_static": oq.W8A8}[mode]
calib = [torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(i)) for i in range(4)]
t0 = time.perf_counter()
quantize_checkpoint(src, dst, config, calib=calib if mode == "w8a8_static" else None, progress=False)
seconds = time.perf_counter() - t0
peak = hwm()
print(json.dumps({"baseline_rss": base, "peak_rss": peak, "seconds": seconds}))
"""


def run_child(src: str, dst: str, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, src, dst, mode], capture_output=True, text=True, check=True, env=os.environ
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=3.2, help="target FP32 checkpoint size")
    ap.add_argument("--mode", default="w8a8_dynamic", choices=["w8a8_dynamic", "w8a16", "w8a8_static"])
    ap.add_argument("--out", default="bench-results/streaming.json")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = 4 * (4 * hidden * hidden // 2 + 3 * hidden * inter)  # q,o full; k,v with half the heads
    layers = max(1, int((args.gb * 1e9 - 2 * 4 * vocab * hidden) / per_layer))
    work = tempfile.mkdtemp(dir=args.workdir)
    try:
        src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
        t0 = time.perf_counter()
        size = write_llama_checkpoint(
            src, hidden=hidden, intermediate=inter, layers=layers, vocab=vocab, heads=16, kv_heads=8
        )
        write_s = time.perf_counter() - t0
        r = run_child(src, dst, args.mode)
        out_size = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst))
        result = {
            "machine": machine_info(),
            "mode": args.mode,
            "layers": layers,
            "checkpoint_bytes": size,
            "output_bytes": out_size,
            "write_seconds": round(write_s, 1),
            "quantize_seconds": round(r["seconds"], 1),
            "baseline_rss": r["baseline_rss"],
            "peak_rss": r["peak_rss"],
            "peak_rss_fraction_of_checkpoint": round(r["peak_rss"] / size, 4),
            "peak_above_baseline_fraction": round((r["peak_rss"] - r["baseline_rss"]) / size, 4),
        }
        print(json.dumps(result, indent=1))
        write_json(args.out, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
