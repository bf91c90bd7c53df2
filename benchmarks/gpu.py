"""Everything GPU-side in one run (< 5 min on an H200): correctness on the device, GEMM throughput, end-to-end LLMs.

    python benchmarks/gpu.py --out $OUT/gpu.json [--quick]

1. correctness: Triton int8 GEMM int32 == cuBLASLt (torch._int_mm) bit for bit; per-token quantization == the
   reference's; fused W8A8 epilogue within 1 LSB of the reference rescale; W8A16 vs a float64 product.
2. GEMMs: bf16 F.linear (cuBLAS) vs torch._int_mm (cuBLASLt IMMA) vs octoquant's Triton int8 GEMM (raw int32),
   octoquant W8A8 dynamic linear (per-token quantization + GEMM + rescale/bias epilogue, bf16 in and out) and
   octoquant W8A16 linear, for M in {1, 16, 128, 2048, 8192} x (K, N) in {(4096, 4096), (8192, 28672)};
   medians of triton.testing.do_bench (CUDA events, L2 not flushed between reps at large shapes: the weights
   exceed L2 anyway).
3. End to end: the SmolLM2-135M architecture and a larger Llama-style stack (hidden 4096, 8 layers), random
   weights (the real SmolLM2 file does not fit the device transfer; speed does not depend on weight values;
   accuracy is measured on CPU with the real weights): bf16 vs octoquant W8A16 vs W8A8 dynamic, prefill 1 x 512
   and greedy decode ms/token at batch 1 and 8 (eager, and CUDA-graph replay of one decode step with a static
   KV cache when capture works).
Each section's failure is recorded in the JSON instead of stopping the run; the JSON is rewritten after each.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import octoquant as oq  # noqa: E402
from octoquant.kernels import get_backend  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import weight_bytes  # noqa: E402

# NVIDIA H100/H200 SXM datasheet dense peaks (the H200 has the H100's tensor cores)
PEAK_TOPS = {"int8": 1979.0, "bf16": 989.0}

RESULTS: dict = {}


def save(path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    os.replace(tmp, path)


def section(name: str, out: str):
    def run(fn):
        t0 = time.perf_counter()
        try:
            RESULTS[name] = fn()
        except Exception:  # recorded, so the other sections still run
            RESULTS[name] = {"error": traceback.format_exc(limit=8)}
            print(RESULTS[name]["error"], flush=True)
        RESULTS.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)
        save(out)
        return fn

    return run


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=60, return_mode="median"))


def env_info() -> dict:
    import triton

    p = torch.cuda.get_device_properties(0)
    return {
        "gpu": p.name,
        "sm_count": p.multi_processor_count,
        "memory_gib": round(p.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "peak_tops_datasheet": PEAK_TOPS,
    }


def correctness() -> dict:
    from octoquant.kernels import triton_kernels as tk
    from octoquant.kernels.cuda import int_mm_padded
    from octoquant.kernels.reference import rescale

    cb, ref = get_backend("cuda"), get_backend("reference")
    g = torch.Generator(device="cuda").manual_seed(0)
    out = {}
    for m, k, n in [(1, 4096, 4096), (37, 4096, 4096), (2048, 4096, 4096), (130, 8192, 28672), (5, 300, 77)]:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda", generator=g)
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda", generator=g)
        ours = tk.int8_linear(a, w)
        out[f"int32_equal_cublaslt_{m}x{k}x{n}"] = bool(torch.equal(ours, int_mm_padded(a, w.T)))
    a = torch.randint(-128, 128, (7, 300), dtype=torch.int8)
    w = torch.randint(-128, 128, (77, 300), dtype=torch.int8)
    ours = tk.int8_linear(a.cuda(), w.cuda()).cpu()
    out["int32_equal_reference_7x300x77"] = bool(torch.equal(ours, ref.int8_mm(a, w.T)))

    x = torch.randn(64, 4096, device="cuda", generator=g) * 3
    x[1] = 0
    x[2, :4] = torch.tensor([0.5, 1.5, -2.5, 381.0])
    q, s = cb.quantize_per_token(x)
    q_ref, s_ref = ref.quantize_per_token(x)  # pure torch, on the GPU
    out["per_token_quant_bit_equal"] = bool(torch.equal(q, q_ref) and torch.equal(s, s_ref))
    xb = x.to(torch.bfloat16)
    qb, sb = cb.quantize_per_token(xb)
    qb_ref, sb_ref = ref.quantize_per_token(xb)
    out["per_token_quant_bf16_bit_equal"] = bool(torch.equal(qb, qb_ref) and torch.equal(sb, sb_ref))

    w = torch.randint(-128, 128, (1024, 4096), dtype=torch.int8, device="cuda", generator=g)
    ws = torch.rand(1024, device="cuda", generator=g) * 0.01
    bias = torch.randn(1024, device="cuda", generator=g)
    y = cb.linear_dynamic(x, cb.pack_w8a8(w, ws, bias))
    y_ref = rescale(int_mm_padded(q_ref, w.T), s_ref, ws, bias)  # exact int32, then the reference's rescale
    lsb = s_ref.reshape(-1, 1) * ws.reshape(1, -1)
    out["w8a8_dynamic_max_err_in_lsb"] = float(((y - y_ref).abs() / lsb).max())
    for uz in (0, 117):
        ys = cb.linear_static(x, cb.pack_w8a8(w, ws, bias), 0.05, uz, oq.QDtype.UINT8)
        qs = oq.quantize_tensor(x, torch.tensor(0.05, device="cuda"), uz, dtype=oq.QDtype.UINT8)
        acc = ((qs.to(torch.float64) - uz) @ w.T.to(torch.float64)).to(torch.int32)  # exact in float64
        ys_ref = rescale(acc, torch.tensor(0.05, device="cuda"), ws, bias)
        out[f"w8a8_static_u8_zp{uz}_max_err_in_lsb"] = float(((ys - ys_ref).abs() / (0.05 * ws).reshape(1, -1)).max())
    for m in (1, 3, 64):
        for gs in (4096, 128):
            xs = torch.randn(m, 4096, device="cuda", generator=g).to(torch.bfloat16)
            sc = torch.rand(1024, 4096 // gs, device="cuda", generator=g) * 0.01
            yw = cb.linear_weight_only(xs, cb.pack_w8a16(w, sc, gs, bias)).double()
            wd = (w.double().reshape(1024, -1, gs) * sc.double()[..., None]).reshape(1024, 4096)
            yr = xs.double() @ wd.T + bias.double()
            out[f"w8a16_bf16_m{m}_g{gs}_rel_err"] = float((yw - yr).abs().max() / yr.abs().max())
    return out


def time_linears(cb, int8_linear, int_mm_padded, m: int, wb, wq, p8, p16) -> dict[str, float]:
    """Median ms of each implementation of one (M, K) x (K, N) product, same inputs."""
    k = wb.shape[1]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    return {
        "bf16_linear": bench_ms(lambda: F.linear(x, wb, None)),
        "int_mm_cublaslt": bench_ms(lambda: int_mm_padded(a, wq.T)),
        "octoquant_int8_gemm": bench_ms(lambda: int8_linear(a, wq)),
        "octoquant_w8a8_dynamic": bench_ms(lambda: cb.linear_dynamic(x, p8)),
        "octoquant_w8a16": bench_ms(lambda: cb.linear_weight_only(x, p16)),
    }


def gemms(quick: bool) -> dict:
    from octoquant.kernels import triton_kernels as tk
    from octoquant.kernels.cuda import int_mm_padded

    cb = get_backend("cuda")
    rows = []
    shapes = [(4096, 4096), (8192, 28672)]
    ms = [1, 16, 128, 2048, 8192] if not quick else [1, 2048]
    for k, n in shapes:
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        wq = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
        ws = torch.rand(n, device="cuda") * 0.01
        bias = torch.randn(n, device="cuda")
        p8 = cb.pack_w8a8(wq, ws, bias)
        p16 = cb.pack_w8a16(wq, ws, k, bias)
        for m in ms:
            t = time_linears(cb, tk.int8_linear, int_mm_padded, m, wb, wq, p8, p16)
            flops = 2.0 * m * n * k
            row = {"M": m, "K": k, "N": n, "ms": {name: round(v, 5) for name, v in t.items()}}
            row["tops"] = {name: round(flops / (v * 1e-3) / 1e12, 1) for name, v in t.items()}
            row["speedup_vs_bf16"] = {name: round(t["bf16_linear"] / v, 3) for name, v in t.items()}
            row["int8_gemm_pct_of_peak"] = round(100 * row["tops"]["octoquant_int8_gemm"] / PEAK_TOPS["int8"], 1)
            weight_gb = {"bf16": n * k * 2 / 1e9, "int8": n * k / 1e9}
            row["weight_read_gbs"] = {
                "bf16_linear": round(weight_gb["bf16"] / (t["bf16_linear"] * 1e-3), 1),
                "octoquant_w8a16": round(weight_gb["int8"] / (t["octoquant_w8a16"] * 1e-3), 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del wb, wq, p8, p16
        torch.cuda.empty_cache()
    return {"rows": rows}


def llama(config_kwargs: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**config_kwargs)
    cfg._attn_implementation = "sdpa"
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).eval()
    return cfg, model


def to_gpu_bf16(model):
    return model.to("cuda").to(torch.bfloat16)  # octoquant modules keep float32 scales (QuantizedModule._apply)


@torch.no_grad()
def prefill_ms(model, vocab: int, seq: int = 512) -> float:
    ids = torch.randint(0, vocab, (1, seq), device="cuda")
    return bench_ms(lambda: model(ids, use_cache=False))


@torch.no_grad()
def decode_eager_ms(model, vocab: int, batch: int, new_tokens: int = 32) -> float:
    ids = torch.randint(0, vocab, (batch, 16), device="cuda")
    times = []
    for _ in range(2):
        out = model(ids, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0) / new_tokens)
    return min(times)


@torch.no_grad()
def decode_graph_ms(model, cfg, batch: int, prompt: int = 16, steps: int = 64) -> float:
    """One decode step captured as a CUDA graph over a StaticCache, replayed `steps` times (positions advance)."""
    from transformers import StaticCache

    cache = StaticCache(config=cfg, max_cache_len=prompt + steps + 8)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device="cuda")
    pos = torch.arange(prompt, device="cuda")
    model(ids, past_key_values=cache, cache_position=pos, use_cache=True)  # allocates the cache
    step_ids = torch.zeros((batch, 1), dtype=torch.long, device="cuda")
    step_pos = torch.tensor([prompt], device="cuda")
    for _ in range(2):  # warm-up outside the graph (autotuning, lazy init)
        model(step_ids, past_key_values=cache, cache_position=step_pos, use_cache=True)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        model(step_ids, past_key_values=cache, cache_position=step_pos, use_cache=True)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        logits = model(step_ids, past_key_values=cache, cache_position=step_pos, use_cache=True).logits
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step_pos.fill_(prompt + i)
        graph.replay()
        step_ids.copy_(logits[:, -1:].argmax(-1))
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / steps


def end_to_end(name: str, config_kwargs: dict, quick: bool) -> dict:
    cfg, model = llama(config_kwargs)
    res: dict = {"config": config_kwargs, "weights": "random (speed only)"}
    variants = {"bf16": lambda: to_gpu_bf16(copy.deepcopy(model))}
    variants["octoquant_w8a16"] = lambda: to_gpu_bf16(oq.quantize(model, oq.W8A16, progress=False))
    variants["octoquant_w8a8_dynamic"] = lambda: to_gpu_bf16(oq.quantize(model, oq.W8A8_DYNAMIC, progress=False))
    for vname, build in variants.items():
        r: dict = {}
        try:
            t0 = time.perf_counter()
            m = build()
            r["build_s"] = round(time.perf_counter() - t0, 1)
            r["weight_bytes"] = weight_bytes(m)
            r["prefill_1x512_ms"] = round(prefill_ms(m, cfg.vocab_size), 3)
            for b in (1, 8) if not quick else (1,):
                r[f"decode_eager_b{b}_ms_per_step"] = round(decode_eager_ms(m, cfg.vocab_size, b), 3)
                try:
                    r[f"decode_graph_b{b}_ms_per_step"] = round(decode_graph_ms(m, cfg, b), 3)
                except Exception:
                    r[f"decode_graph_b{b}_error"] = traceback.format_exc(limit=4)
            del m
            torch.cuda.empty_cache()
        except Exception:
            r["error"] = traceback.format_exc(limit=8)
        res[vname] = r
        print(name, vname, json.dumps({k: v for k, v in r.items() if "error" not in k}), flush=True)
    base = res.get("bf16", {})
    for vname in ("octoquant_w8a16", "octoquant_w8a8_dynamic"):
        for key, v in list(res.get(vname, {}).items()):
            if key.endswith("_ms") or key.endswith("_ms_per_step"):
                if isinstance(base.get(key), float):
                    res[vname][key.replace("_ms", "_speedup_vs_bf16", 1)] = round(base[key] / v, 3)
    return res


SMOLLM2 = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=2048,
)  # fmt: skip
LLAMA_4096 = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096,
)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-results/gpu.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: correctness,gemm,smollm2,llama")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.set_num_threads(min(16, os.cpu_count() or 1))
    skip = set(filter(None, args.skip.split(",")))
    RESULTS["env"] = env_info()
    save(args.out)
    if "correctness" not in skip:
        section("correctness", args.out)(correctness)
    if "gemm" not in skip:
        section("gemm", args.out)(lambda: gemms(args.quick))
    if "smollm2" not in skip:
        section("smollm2_135m_arch", args.out)(lambda: end_to_end("smollm2", SMOLLM2, args.quick))
    if "llama" not in skip:
        section("llama_4096x8_synthetic", args.out)(lambda: end_to_end("llama4096", LLAMA_4096, args.quick))
    print(json.dumps(RESULTS.get("correctness"), indent=1))


if __name__ == "__main__":
    main()
