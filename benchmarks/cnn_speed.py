"""Latency of CNN layouts octoquant has no special code for: ResNet-18 (torchvision's layout, its blocks written as
forward code: BatchNorm folded by tracing, convolutions not chained), INT8 vs PyTorch FP32, ONNX Runtime FP32 and
ORT's own INT8 model (`quantize_static`, QDQ, per-channel, MinMax on the same calibration images).

    python benchmarks/cnn_speed.py [--out bench-results/cnn_speed.json] [--reps 12]

Speed only: the weights are random (latency does not depend on their values; accuracy claims use the real
MobileNetV2 in benchmarks/vision.py). Batch 1 and 8, 2 threads, medians of interleaved rounds, load recorded.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _common import interleaved, machine_info, write_json  # noqa: E402
from vision import export_fp32, ort_quantize_static, ort_session  # noqa: E402

import octoquant as oq  # noqa: E402


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block, as forward code."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        blocks, c = [], 64
        for cout, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
            blocks.append(BasicBlock(c, cout, stride))
            c = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(x), 1), 1))


def resnet18_random() -> nn.Module:
    torch.manual_seed(0)
    model = ResNet18().eval()
    for bn in model.modules():  # statistics of a trained network's scale, so folding does real work
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.data.uniform_(0.5, 1.0)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-results/cnn_speed.json")
    ap.add_argument("--reps", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(2)
    info = machine_info()
    info["threads"] = 2
    model = resnet18_random()
    calib = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    q = oq.quantize(model, oq.W8A8, calib=list(calib.split(4)), progress=False)
    fp32_onnx = export_fp32(model)
    ort_fp32 = ort_session(fp32_onnx, 2)
    ort_int8 = ort_session(ort_quantize_static(fp32_onnx, calib, "MinMax"), 2)
    latency = {}
    for bs in (1, 8):
        x = torch.randn(bs, 3, 224, 224, generator=torch.Generator().manual_seed(2))
        xn = x.numpy()
        fns = {
            "pytorch_fp32": lambda i, x=x: model(x),
            "ort_fp32": lambda i, xn=xn: ort_fp32.run(None, {"x": xn}),
            "ort_int8_minmax": lambda i, xn=xn: ort_int8.run(None, {"x": xn}),
            "octoquant_int8": lambda i, x=x: q(x),
        }
        with torch.no_grad():
            t = interleaved(fns, reps=args.reps, budget_s=90)
        latency[f"batch{bs}"] = {k: v * 1e3 for k, v in t.items()}
        print(
            f"ResNet-18 batch {bs} (ms, median of interleaved runs, 2 threads): "
            + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in t.items()),
            flush=True,
        )
    info["loadavg_end"] = os.getloadavg()
    write_json(args.out, {"machine": info, "model": "resnet18 (random weights, speed only)", "latency_ms": latency})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
