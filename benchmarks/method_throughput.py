"""Pretraining-step and feature-extraction throughput per method x model, with MFU against a measured matmul peak.

    python benchmarks/method_throughput.py [--methods mae dino] [--models pico tiny] [--size 28] [--batch 64]
        [--steps 5] [--precision fp32|bf16|both] [--threads 2] [--big] [--params params.yaml]

What it measures, all in one run on one machine at ``--threads`` threads:
  * the matmul peak: median GFLOP/s of ``torch.mm`` on 2048x2048 (and 4096x4096 with ``--big``) after warm-up,
    for fp32 and bf16 tensors; printed first;
  * per method x model x precision: images/s of full training steps as the engine runs them (augmentation inside
    the method's forward under bf16 autocast if asked, backward, grad-norm clip, AdamW, zero_grad, on_step_end
    e.g. DINO's EMA teacher), after one warm-up step, on random uint8 images;
  * per model x precision: a forward-only ``features`` row (``encoder_features``, what evaluation runs).

How to read it: GFLOP/img comes from torch's FlopCounterMode (matmul, conv and SDPA only; forward+backward and the
DINO teacher forward for training rows). achieved GFLOP/s = images/s x GFLOP/img; MFU = achieved / the measured
peak of the same precision, and MFU/fp32 = achieved / the fp32 peak. Everything the counter does not count
(elementwise ops, norms, softmax outside SDPA, augmentation, masking, the optimizer, EMA, Python overhead) is
overhead that lowers MFU; small models at small image sizes are dominated by it.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch

from biovfm.config import load_params, model_spec
from biovfm.evaluate.features import encoder_features
from biovfm.methods import build_method
from biovfm.methods.base import Method, StepContext
from biovfm.models.vit import build_encoder, count_flops_per_image, encoder_params
from biovfm.train.engine import train_flops_per_image
from biovfm.train.optim import param_groups

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COLS = [("method", 9), ("model", 6), ("params M", 9), ("prec", 5), ("img/s", 9), ("GFLOP/img", 10),
        ("GFLOP/s", 8), ("MFU %", 7), ("MFU/fp32 %", 10)]


def matmul_gflops(n: int, dtype: torch.dtype, repeats: int = 7) -> float:
    """Median GFLOP/s of an n x n x n ``torch.mm`` after two warm-up calls."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        torch.mm(a, b)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def measure_peaks(big: bool) -> dict[str, float]:
    """Peak GFLOP/s per precision (the best over the sizes tried)."""
    peaks = {}
    for prec, dtype in DTYPES.items():
        rates = {n: matmul_gflops(n, dtype) for n in ([2048, 4096] if big else [2048])}
        print("matmul peak " + prec + ": " + ", ".join(f"{n}x{n} {r:.1f} GFLOP/s" for n, r in rates.items()))
        peaks[prec] = max(rates.values())
    return peaks


def timed_rate(fn: Callable[[int], None], steps: int, images_per_call: int) -> float:
    """Images/s of ``fn(i)`` for i in range(steps), after one warm-up call ``fn(0)``."""
    fn(0)
    t0 = time.perf_counter()
    for i in range(steps):
        fn(i)
    return steps * images_per_call / (time.perf_counter() - t0)


def train_step_fn(method: Method, batch: torch.Tensor, bf16: bool) -> Callable[[int], None]:
    """One engine training step (single process, no gradient accumulation)."""
    opt = torch.optim.AdamW(param_groups(method, 0.05), lr=1e-4)
    trainable = [p for p in method.parameters() if p.requires_grad]

    def step(i: int) -> None:
        ctx = StepContext.single(seed=i, n=len(batch), step=i, total_steps=100)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = method(batch, ctx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, float("inf"))
        method.before_optimizer_step(ctx)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_step_end(ctx)
    return step


def build(p: dict[str, Any], method_name: str, model: str, size: int) -> Method:
    torch.manual_seed(0)
    enc = build_encoder(model_spec(p, model), size)
    cfg = {k: v for k, v in p["methods"][method_name].items() if k != "pretrain"}
    return build_method(method_name, enc, cfg, size, 3).train()


def row(cells: list[Any], peaks: dict[str, float], rate: float, flops: float) -> str:
    achieved = rate * flops / 1e9
    vals = [*cells, f"{rate:.0f}", f"{flops / 1e9:.4f}", f"{achieved:.1f}",
            f"{100 * achieved / peaks[cells[3]]:.1f}", f"{100 * achieved / peaks['fp32']:.1f}"]
    return " ".join(f"{v:<{w}}" if j < 2 else f"{v:>{w}}" for j, (v, (_, w)) in enumerate(zip(vals, COLS)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--methods", nargs="+", default=["mae", "dino"])
    ap.add_argument("--models", nargs="+", default=["pico", "tiny"])
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--big", action="store_true", help="also measure the peak on 4096x4096")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    p = load_params(a.params)
    size = a.size or p["data"]["image_size"]
    precs = ["fp32", "bf16"] if a.precision == "both" else [a.precision]
    print(f"torch {torch.__version__}, {a.threads} threads, image {size}px, batch {a.batch}, "
          f"{a.steps} timed steps after 1 warm-up")
    peaks = measure_peaks(a.big)
    print()
    print(" ".join(f"{h:<{w}}" if j < 2 else f"{h:>{w}}" for j, (h, w) in enumerate(COLS)))
    batch = torch.randint(0, 256, (a.batch, 3, size, size), dtype=torch.uint8)
    feat_images = batch.permute(0, 2, 3, 1).numpy()
    for model in a.models:
        params_m = f"{encoder_params(model_spec(p, model), size) / 1e6:.2f}"
        for name in a.methods:
            method = build(p, name, model, size)
            flops = train_flops_per_image(method, batch[:2], 0)
            for prec in precs:
                rate = timed_rate(train_step_fn(method, batch, prec == "bf16"), a.steps, a.batch)
                print(row([name, model, params_m, prec], peaks, rate, flops))
        enc = build_encoder(model_spec(p, model), size).eval()
        fwd = count_flops_per_image(enc, size)
        for prec in precs:
            def extract(_: int, bf16: bool = prec == "bf16") -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    encoder_features(enc, feat_images, p["evaluate"]["batch_size"])
            rate = timed_rate(extract, a.steps, a.batch)
            print(row(["features", model, params_m, prec], peaks, rate, fwd))


if __name__ == "__main__":
    main()
