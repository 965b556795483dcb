"""MAE pretraining and feature-extraction throughput per ladder size (CPU or GPU), measured side by side.

    python benchmarks/pretrain_throughput.py [--models pico nano micro] [--size 28] [--steps 10] [--threads 2]

Prints images/s for a training step (augmentation + MAE forward/backward + AdamW) and for frozen-feature
extraction, with FLOPs per image from torch's FLOP counter and the resulting achieved GFLOP/s.
"""
from __future__ import annotations

import argparse
import time

import torch

from biovfm.config import load_params, model_spec
from biovfm.evaluate.features import encoder_features
from biovfm.methods import build_method
from biovfm.models.vit import build_encoder, count_flops_per_image, encoder_params
from biovfm.train.engine import param_groups, step_generator, train_flops_per_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    p = load_params(a.params)
    size = a.size or p["data"]["image_size"]
    models = a.models or p["grid"]["models"]
    print(f"image {size}px, batch {a.batch}, {a.steps} timed steps, {a.threads} threads")
    print(f"{'model':8} {'params M':>9} {'train img/s':>12} {'train GFLOP/img':>16} {'train GFLOP/s':>14} {'feat img/s':>11}")
    for name in models:
        spec = model_spec(p, name)
        torch.manual_seed(0)
        enc = build_encoder(spec, size)
        method = build_method("mae", enc, dict(p["methods"]["mae"]), size, 3)
        opt = torch.optim.AdamW(param_groups(method, 0.05), lr=1e-3)
        batch = torch.randint(0, 256, (a.batch, 3, size, size), dtype=torch.uint8)
        flops = train_flops_per_image(method, batch[:2], 0)

        def step(i: int) -> None:
            loss, _ = method.training_step(batch, step_generator(0, i))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step(-1)  # warm-up
        t0 = time.perf_counter()
        for i in range(a.steps):
            step(i)
        train_rate = a.steps * a.batch / (time.perf_counter() - t0)
        imgs = batch[:, 0].numpy()
        enc.eval()
        encoder_features(enc, imgs[:16])
        t0 = time.perf_counter()
        for _ in range(3):
            encoder_features(enc, imgs, 256)
        feat_rate = 3 * len(imgs) / (time.perf_counter() - t0)
        print(f"{name:8} {encoder_params(spec, size) / 1e6:9.2f} {train_rate:12.0f} {flops / 1e9:16.3f} "
              f"{train_rate * flops / 1e9:14.1f} {feat_rate:11.0f}  (fwd {count_flops_per_image(enc, size) / 1e9:.3f} GFLOP/img)")


if __name__ == "__main__":
    main()
