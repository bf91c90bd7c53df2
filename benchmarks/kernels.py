"""Kernel benchmark: octoquant QLinear modes vs FP32 and peers, side by side in one process.

    python benchmarks/kernels.py [--quick] [--threads 2] [--cache cold] [--out bench-results/kernels.json]

Per shape (M x K -> N), hot (one weight copy, cache-resident when it fits) and cold (weights cycled through
>= 256 MiB, read from DRAM as in a real model), 1 and 2 threads, median seconds of interleaved runs of:
  fp32         torch F.linear
  ort_fp32     ONNX Runtime MatMul(+Add), prepacked constant weight (often the best FP32 on small M)
  fbgemm_dyn   torch.ops.quantized.linear_dynamic (torch.ao dynamic int8; u8s8, saturating on AVX2)
  ort_dqmm     ONNX Runtime DynamicQuantizeMatMul (int8 per-column weights)
  oq_w8a8_dyn  octoquant dynamic W8A8 (per-token int8, exact)
  oq_w8a8_st   octoquant static W8A8 (per-tensor int8 activations, exact)
  oq_w8a16     octoquant weight-only int8
Ratios are FP32 time / method time (> 1: faster than FP32). M=1 also reports GB/s of int8 weights read vs a
measured DRAM read bandwidth (the better of a sum over ordinary memory and over huge pages, where octoquant's
packed weights live).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import copies_for, interleaved, machine_info, read_bandwidth_gbs, write_json  # noqa: E402

import octoquant as oq  # noqa: E402
from octoquant.nn import QLinear  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)

SHAPES_KN = [(4096, 4096), (4096, 11008), (384, 1536), (768, 768)]
MS = [1, 8, 32, 512]


def _ort_session(model_bytes: bytes, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # do not steal torch's cores
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def ort_fp32_model(w: torch.Tensor, b: torch.Tensor) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    k = w.shape[1]
    nodes = [helper.make_node("MatMul", ["x", "wt"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "fp32",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", w.shape[0]])],
        [numpy_helper.from_array(w.T.contiguous().numpy(), "wt"), numpy_helper.from_array(b.numpy(), "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def ort_dqmm_model(wq: torch.Tensor, ws: torch.Tensor, b: torch.Tensor) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    n, k = wq.shape
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "wq", "ws", "wzp", "b"], ["y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node],
        "dqmm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        [
            numpy_helper.from_array(wq.T.contiguous().numpy(), "wq"),
            numpy_helper.from_array(ws.numpy(), "ws"),
            numpy_helper.from_array(torch.zeros(n, dtype=torch.int8).numpy(), "wzp"),
            numpy_helper.from_array(b.numpy(), "b"),
        ],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    ).SerializeToString()


class ShapeSetup:
    """Every method's weights for one (K, N), built once: enough copies to cycle >= 256 MiB (cold)."""

    def __init__(self, k: int, n: int, with_ort: bool) -> None:
        torch.manual_seed(0)
        self.k, self.n, self.with_ort = k, n, with_ort
        lin = torch.nn.Linear(k, n)
        self.w, self.b = lin.weight.detach(), lin.bias.detach()
        self.calib_range = (-4.0, 4.0)  # activations are N(0, 1) below
        c_fp, c_i8 = copies_for(self.w.numel() * 4, True), copies_for(self.w.numel(), True)
        self.fp32 = [self.w.clone() for _ in range(c_fp)]
        self.mods = {}
        for name, mode in (("oq_w8a8_dyn", "w8a8_dynamic"), ("oq_w8a8_st", "w8a8_static"), ("oq_w8a16", "w8a16")):
            first = QLinear.from_float(lin, mode, input_range=self.calib_range if mode == "w8a8_static" else None)
            first.packed()
            copies = [first]
            for _ in range(c_i8 - 1):  # the same packed weights in other memory
                c = copy.deepcopy(first)  # a copy drops the cached packing: packed again, as a user's layer is
                c.packed()  # (into octoquant's packed-weight memory: huge pages where the OS has them)
                assert c.packed().packed.data_ptr() != first.packed().packed.data_ptr()
                copies.append(c)
            for c in copies:
                c.weight = torch.empty(0, dtype=torch.int8)  # only the packed bytes are read
            self.mods[name] = copies
        q = QLinear.from_float(lin, "w8a8_dynamic")
        self.w_int8, self.w_scale = q.weight.clone(), q.weight_scale.clone()
        wq_pc = torch.quantize_per_channel(
            self.w, self.w_scale.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8
        )
        self.fbgemm = [torch.ops.quantized.linear_prepack(wq_pc.clone(), self.b) for _ in range(c_i8)]
        self.ort: dict[int, dict[str, list]] = {}

    def ort_sessions(self, threads: int) -> dict[str, list]:
        if threads not in self.ort:
            fp, dq = ort_fp32_model(self.w, self.b), ort_dqmm_model(self.w_int8, self.w_scale, self.b)
            self.ort[threads] = {
                "ort_fp32": [_ort_session(fp, threads) for _ in range(len(self.fp32))],
                "ort_dqmm": [_ort_session(dq, threads) for _ in range(len(self.fbgemm))],
            }
        return self.ort[threads]


def bench_shape(setup: ShapeSetup, m: int, threads: int, cold: bool, reps: int) -> dict:
    torch.set_num_threads(threads)
    k, n = setup.k, setup.n
    x = torch.randn(m, k)

    def cyc(items):  # cold: cycle through all copies; hot: always the first
        return items if cold else items[:1]

    fp = cyc(setup.fp32)
    fns = {"fp32": lambda i: F.linear(x, fp[i % len(fp)], setup.b)}
    for name, copies in setup.mods.items():
        cs = cyc(copies)
        fns[name] = lambda i, cs=cs: cs[i % len(cs)](x)
    fb = cyc(setup.fbgemm)
    fns["fbgemm_dyn"] = lambda i: torch.ops.quantized.linear_dynamic(x, fb[i % len(fb)], True)
    if setup.with_ort:
        xn = x.numpy()
        for name, sessions in setup.ort_sessions(threads).items():
            ss = cyc(sessions)
            fns[name] = lambda i, ss=ss: ss[i % len(ss)].run(None, {"x": xn})

    # correctness of what we time (not a test; a guard against benchmarking garbage)
    ref = F.linear(x, setup.w, setup.b)
    for name in setup.mods:
        assert oq.sqnr_db(ref, fns[name](0)) > 25, name

    # every copy called once before timing: a layer's first call builds its call plan (a user's model pays that
    # once; with 456 copies and 24 rounds every timed call of a 384x1536 M = 1 row was a first call, which made the
    # static mode look 1.4-1.6x slower than the dynamic one there)
    copies = max([len(fp), len(fb)] + [len(cyc(c)) for c in setup.mods.values()])
    for f in fns.values():
        for i in range(copies):
            f(i)
    t = interleaved(fns, reps, wake=True)  # each call timed with its runtime's thread pool awake
    row = {"M": m, "K": k, "N": n, "threads": threads, "cold": cold, "seconds": t}
    row["speedup_vs_fp32"] = {name: t["fp32"] / v for name, v in t.items()}
    best_fp32 = min(t["fp32"], t.get("ort_fp32", float("inf")))
    row["speedup_vs_best_fp32"] = {name: best_fp32 / v for name, v in t.items()}
    peers = [t[p] for p in ("fbgemm_dyn", "ort_dqmm") if p in t]
    row["fastest_peer_s"] = min(peers)
    if m == 1:
        row["gbs_int8_weights"] = {name: n * k / t[name] / 1e9 for name in ("oq_w8a8_dyn", "oq_w8a16", "fbgemm_dyn")}
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 threads, cold, fewer shapes")
    ap.add_argument("--threads", type=int, nargs="+", help="thread counts (default 1 2; --quick: 2)")
    ap.add_argument("--cache", choices=["cold", "hot"], nargs="+", help="default cold hot (--quick: cold)")
    ap.add_argument("--out", default="bench-results/kernels.json")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--no-ort", action="store_true")
    ap.add_argument(
        "--recheck",
        metavar="JSON",
        help="re-measure only the rows of this earlier result where an octoquant W8A8 mode was slower than the "
        "fastest peer (with --reps, e.g. 60: a row's medians move with the machine)",
    )
    args = ap.parse_args()
    if args.recheck:
        recheck(args)
        return
    try:
        import onnxruntime  # noqa: F401

        with_ort = not args.no_ort
    except ImportError:
        with_ort = False
    info = machine_info()
    threads_list = args.threads or ([2] if args.quick else [1, 2])
    colds = [c == "cold" for c in args.cache] if args.cache else ([True] if args.quick else [True, False])
    shapes = [(4096, 4096), (384, 1536)] if args.quick else SHAPES_KN
    info["dram_read_gbs_by_pages"] = {
        t: {pages: read_bandwidth_gbs(t, pages) for pages in ("4k", "huge")} for t in threads_list
    }
    # the roofline: the better of 4 KiB and huge pages (read_bandwidth_gbs(t, "best"), without measuring again)
    info["dram_read_gbs"] = {t: max(by.values()) for t, by in info["dram_read_gbs_by_pages"].items()}
    rows = []
    print(f"machine: {info}")
    hdr = f"{'M':>4} {'K':>5} {'N':>6} thr cache  fp32(ms) " + " ".join(
        f"{n:>11}" for n in ["oq_w8a8_dyn", "oq_w8a8_st", "oq_w8a16", "fbgemm_dyn", "ort_dqmm", "ort_fp32"]
    )
    print("ratios: FP32 torch time / method time")
    print(hdr)
    for k, n in shapes:
        setup = ShapeSetup(k, n, with_ort)
        for threads in threads_list:
            for cold in colds:
                for m in MS:
                    r = bench_shape(setup, m, threads, cold, args.reps)
                    rows.append(r)
                    sp = r["speedup_vs_fp32"]
                    cells = " ".join(
                        f"{sp.get(name, float('nan')):>10.2f}x"
                        for name in ["oq_w8a8_dyn", "oq_w8a8_st", "oq_w8a16", "fbgemm_dyn", "ort_dqmm", "ort_fp32"]
                    )
                    print(
                        f"{m:>4} {k:>5} {n:>6} {threads:>3} {'cold' if cold else 'hot ':>5} "
                        f"{r['seconds']['fp32'] * 1e3:>8.3f} {cells}",
                        flush=True,
                    )
    info["loadavg_end"] = os.getloadavg()
    write_json(args.out, {"machine": info, "rows": rows})
    print(f"wrote {args.out}")


def behind(row: dict) -> list[str]:
    """The octoquant W8A8 modes slower than the fastest peer in a result row."""
    return [m for m in ("oq_w8a8_dyn", "oq_w8a8_st") if row["seconds"][m] > row["fastest_peer_s"]]


def recheck(args) -> None:
    with open(args.recheck) as f:
        before = json.load(f)["rows"]
    todo = [r for r in before if behind(r)]
    info = machine_info()
    print(f"machine: {info}")
    print(f"{len(todo)} of {len(before)} rows of {args.recheck} had a W8A8 mode behind the fastest peer")
    print(f"time / fastest peer's time, before -> now (reps {args.reps})")
    rows, setups = [], {}
    for old in todo:
        k, n = old["K"], old["N"]
        if (k, n) not in setups:
            setups.clear()  # one shape's cold copies at a time
            setups[(k, n)] = ShapeSetup(k, n, not args.no_ort)
        r = bench_shape(setups[(k, n)], old["M"], old["threads"], old["cold"], args.reps)
        r["before"] = {"seconds": old["seconds"], "fastest_peer_s": old["fastest_peer_s"]}
        rows.append(r)
        cells = "  ".join(
            f"{m} {old['seconds'][m] / old['fastest_peer_s']:.3f} -> {r['seconds'][m] / r['fastest_peer_s']:.3f}"
            for m in ("oq_w8a8_dyn", "oq_w8a8_st")
        )
        print(
            f"{old['M']:>4} {k:>5} {n:>6} {old['threads']:>3} {'cold' if old['cold'] else 'hot ':>5}  {cells}",
            flush=True,
        )
    info["loadavg_end"] = os.getloadavg()
    ahead = sum(not behind(r) for r in rows)
    print(f"now at least as fast as the fastest peer in both W8A8 modes: {ahead} of {len(rows)} rows")
    write_json(args.out, {"machine": info, "recheck_of": args.recheck, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
