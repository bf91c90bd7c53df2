"""Train octoquant/models/fashion_cnn.py on Fashion-MNIST and write its safetensors checkpoint.

    python scripts/train_fashion_cnn.py [--epochs 3]

Deterministic (seeded, single-process data order). The checkpoint is committed; rerun only to reproduce it.
"""

import argparse
import os
import time

import torch
from safetensors.torch import save_file

from octoquant.models.fashion_cnn import CHECKPOINT, FashionCNN, load_split


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    x, y = load_split("train")
    xt, yt = load_split("t10k")
    model = FashionCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = args.epochs * (len(x) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        t0 = time.time()
        for i in range(len(x) // args.batch):
            idx = perm[i * args.batch : (i + 1) * args.batch]
            xb = x[idx]
            if torch.rand(1, generator=g) < 0.5:
                xb = xb.flip(-1)  # horizontal flip augmentation
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = sum(
                (model(xt[i : i + 1000]).argmax(1) == yt[i : i + 1000]).sum().item() for i in range(0, 10000, 1000)
            )
        print(f"epoch {epoch}: loss {loss.item():.3f} test acc {acc / 100:.2f}% ({time.time() - t0:.0f}s)", flush=True)
    CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
    tmp = CHECKPOINT.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, CHECKPOINT)
    print(f"wrote {CHECKPOINT} ({CHECKPOINT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
