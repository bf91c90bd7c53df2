"""MobileNetV2 INT8, octoquant vs ONNX Runtime's own INT8 model of the same network, as paired rounds.

    python benchmarks/mnv2_vs_ort.py [--rounds 20] [--repeat 3] [--out bench-results/mnv2_vs_ort.json]

On a shared 2-core machine the speed of either runtime drifts by 10-50% within minutes, so a single median of each
says little about which is faster. Here every round times a block of calls of each runtime back to back (order
alternating between rounds), and the round's ratio octoquant / ORT is taken: drift slower than a round cancels.
Reported per batch size and ORT threading mode (its workers spinning or not): the median ratio, the share of
rounds octoquant won, and each runtime's median; `--repeat` runs the whole measurement several times (fresh
sessions and models each time are not needed: the same ones are timed again). ORT's model is `quantize_static`
(QDQ, per-channel, MinMax) on the same calibration crops octoquant uses; both run 2 threads (`--threads`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine_info, write_json  # noqa: E402
from vision import export_fp32, ort_quantize_static, ort_session  # noqa: E402

import octoquant as oq  # noqa: E402
from octoquant.evaluate.vision import load_photos, photo_crops  # noqa: E402
from octoquant.models.mobilenetv2 import mobilenet_v2_imagenet  # noqa: E402

warnings.filterwarnings("ignore")


def paired_rounds(fns: dict, reps: int, rounds: int, pause: float = 0.1) -> dict[str, list[float]]:
    """Seconds per call of each function, one block of `reps` calls per function per round (2 warm-up calls first),
    the order of the functions reversed every other round. Each block starts `pause` seconds after the previous
    one ended: the idle worker threads of the runtime that ran before (ORT's spinning pool, OpenMP's spin-wait)
    have gone to sleep by then instead of taking the cores from the next block."""
    names = list(fns)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            f = fns[k]
            time.sleep(pause)
            f()
            f()
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            out[k].append((time.perf_counter() - t0) / reps)
    return out


def summary(times: dict[str, list[float]], ours: str, peer: str) -> dict:
    ratios = [a / b for a, b in zip(times[ours], times[peer], strict=True)]
    return {
        "median_ratio": statistics.median(ratios),
        "rounds_won": sum(r < 1.0 for r in ratios),
        "rounds": len(ratios),
        "ours_median_ms": statistics.median(times[ours]) * 1e3,
        "peer_median_ms": statistics.median(times[peer]) * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench-results/mnv2_vs_ort.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()
    photos = load_photos()
    calib = photo_crops(32, seed=0, photos=photos)
    model = mobilenet_v2_imagenet().eval()
    q = oq.quantize(model, oq.W8A8, calib=[calib[:16], calib[16:]], progress=False)
    int8 = ort_quantize_static(export_fp32(model), calib, "MinMax")
    sessions = {
        "ort_int8_spinning": ort_session(int8, args.threads, spinning=True),
        "ort_int8_no_spinning": ort_session(int8, args.threads),
    }
    results = []
    for rep in range(args.repeat):
        for bs in (1, 8):
            x = photo_crops(bs, seed=5, photos=photos).contiguous()
            xn = x.numpy()
            reps = 20 if bs == 1 else 4
            for name, sess in sessions.items():
                with torch.no_grad():
                    fns = {
                        "octoquant": lambda x=x: q(x),
                        name: lambda s=sess, xn=xn: s.run(None, {"x": xn}),
                    }
                    times = paired_rounds(fns, reps, args.rounds)
                row = {"repeat": rep, "batch": bs, "peer": name, **summary(times, "octoquant", name)}
                row["loadavg"] = os.getloadavg()[0]
                results.append(row)
                print(
                    f"run {rep} batch {bs} vs {name:21s}: octoquant / ORT median ratio {row['median_ratio']:.3f}, "
                    f"won {row['rounds_won']}/{row['rounds']} rounds, medians {row['ours_median_ms']:.2f} vs "
                    f"{row['peer_median_ms']:.2f} ms (load {row['loadavg']:.2f})",
                    flush=True,
                )
    info["loadavg_end"] = os.getloadavg()
    write_json(args.out, {"machine": info, "threads": args.threads, "rounds": args.rounds, "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
