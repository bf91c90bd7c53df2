"""Shared benchmark plumbing: interleaved timing, medians, machine facts, cold-weight cycling."""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

COLD_BYTES = 256 * 2**20  # cycle weights through >= 256 MiB so each call reads them from DRAM


def machine_info() -> dict:
    import octoquant.kernels as k

    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "octoquant_isa": k.best_isa(),
        "loadavg_start": os.getloadavg(),
    }


def copies_for(nbytes: int, cold: bool) -> int:
    return max(1, -(-COLD_BYTES // max(nbytes, 1))) if cold else 1


def interleaved(
    fns: dict[str, Callable[[int], object]], reps: int, budget_s: float = 20.0, wake: bool = False
) -> dict[str, float]:
    """Median seconds per call of each fn, timed in rounds (each fn once per round) so drift hits all alike.

    Each fn takes the call index (to cycle through cold weight copies). wake: each fn is called twice in a row and
    only the second call timed (with the next index: another cold copy). For microsecond calls from different
    runtimes: while ONNX Runtime runs, torch's OpenMP workers go to sleep (and ORT's while torch runs), so the
    first call after another runtime's pays a thread wake-up. Measured on 384x1536 M = 1 cold, without -> with:
    octoquant 33 -> 29 us, fbgemm 73 -> 47 us, ORT DynamicQuantizeMatMul 74 -> 65 us.
    """
    for f in fns.values():  # warm-up (packing, allocator, thread pools)
        f(0)
        f(1)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    start = time.perf_counter()
    i = 0
    order = random.Random(0)
    while i < reps or (i < 3):
        # a new order every round, so that each method follows each other one about equally often: what ran just
        # before (another runtime's thread pool, a cache-flushing FP32 GEMM) changes the next timing. (Rotating
        # the list, A B C / B C A / C A B, kept every method after the same neighbour: the method listed after FP32
        # ran right after the FP32 GEMM in all rounds but one in len(names).)
        round_names = names[:]
        order.shuffle(round_names)
        for name in round_names:
            if wake:
                fns[name](2 * i)
            t0 = time.perf_counter()
            fns[name](2 * i + 1 if wake else i)
            times[name].append(time.perf_counter() - t0)
        i += 1
        if time.perf_counter() - start > budget_s and i >= 3:
            break
    return {name: statistics.median(ts) for name, ts in times.items()}


def alone(fns: dict[str, Callable[[], object]], reps: int, rounds: int = 6, pause_s: float = 0.05) -> dict[str, float]:
    """Median seconds per call of each fn run on its own: blocks of `reps` calls (after 3 warm-up calls), the
    block order alternating over `rounds`, a pause between blocks so that a runtime's spinning thread pool has
    parked before the next one runs. For runtimes measured in their default thread settings (ORT spins its
    workers between calls, which call-by-call interleaving turns into stolen CPU for the others)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            f = fns[name]
            for _ in range(3):
                f()
            for _ in range(reps):
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
            time.sleep(pause_s)
    return {name: statistics.median(ts) for name, ts in times.items()}


def read_bandwidth_gbs(threads: int, pages: str = "best") -> float:
    """DRAM read GB/s: sum over a 512 MiB tensor (memory-bound), median of 5.

    pages: "4k" (an ordinary tensor), "huge" (octoquant's packed-weight memory: transparent huge pages where
    the OS serves them, which raise the read rate: the prefetchers do not stop every 4 KiB), or "best" (the
    larger of the two: the roofline a kernel on either kind of memory is measured against).
    """
    if pages == "best":
        return max(read_bandwidth_gbs(threads, "4k"), read_bandwidth_gbs(threads, "huge"))
    from octoquant.kernels.cpu import weight_buffer

    torch.set_num_threads(threads)
    n = 128 * 2**20
    x = torch.empty(n, dtype=torch.float32) if pages == "4k" else weight_buffer((n,), torch.float32)
    x.fill_(1.0)
    x.sum()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(ts) / 1e9


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def weight_bytes(model) -> int:
    """Bytes of the parameters and buffers, each shared tensor counted once (a tied embedding/head too)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
