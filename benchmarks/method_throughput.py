"""Pretraining-step and feature-extraction throughput per method x model, with MFU against a measured matmul peak.

    python benchmarks/method_throughput.py [--methods mae dino] [--models pico tiny] [--size 28] [--batch 64]
        [--steps 5] [--precision fp32|bf16|both] [--threads 2] [--big] [--profile N] [--params params.yaml]

What it measures, all in one run on one machine at ``--threads`` threads:
  * the matmul peak: GFLOP/s of ``torch.mm`` on 2048x2048 (and 4096x4096 with ``--big``) after warm-up, for fp32
    and, where the CPU computes bf16 natively, bf16 tensors; printed first;
  * per method x model x precision: images/s of full training steps as the engine runs them (augmentation inside
    the method's forward under bf16 autocast if asked, backward, grad-norm clip, AdamW with the engine's parameter
    groups, zero_grad, on_step_end e.g. DINO's EMA teacher), after one warm-up step, on random uint8 images;
  * per model x precision: a forward-only ``features`` row (``encoder_features``, what evaluation runs).

bf16 only where the CPU has it natively: an ``avx512_bf16`` or ``amx_bf16`` flag in /proc/cpuinfo (``bf16`` on
ARM), ATen dispatching to AVX-512 code (``torch.backends.cpu.get_cpu_capability()``) and no ``ONEDNN_MAX_CPU_ISA``
below oneDNN's bf16 instructions. Elsewhere bf16 matmuls are emulated, slower than fp32 (an AVX2-only CPU took
more than 10 minutes for the bf16 peak alone), so the script skips bf16 and says why in one line.

A shared machine: every training and feature row is measured as ``--steps`` interleaved pairs (one matmul-peak
sample of the row's precision, one step), and its MFU is the median over the pairs of (achieved / the peak sample
next to it), so a neighbour's load hits both sides of each ratio. The img/s shown is the median.

``--profile N`` adds, under each row, torch.profiler's N costliest operators (self CPU time) over 2 more calls:
where the time the counter does not count goes.

How to read it: GFLOP/img comes from torch's FlopCounterMode (matmul, conv and SDPA only; forward+backward and the
DINO teacher forward for training rows; what the step executes, so work a method skips is not counted).
achieved GFLOP/s = images/s x GFLOP/img; MFU = achieved / the measured peak of the same precision, and MFU/fp32 =
achieved / the fp32 peak. Everything the counter does not count (elementwise ops, norms, softmax outside SDPA,
augmentation, masking, the optimizer, EMA, Python overhead) is overhead that lowers MFU; small models at small
image sizes are dominated by it.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
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
PEAK_N = 2048
COLS = [("method", 9), ("model", 6), ("params M", 9), ("prec", 5), ("img/s", 9), ("GFLOP/img", 10),
        ("GFLOP/s", 8), ("peak", 7), ("MFU %", 7), ("MFU/fp32 %", 10)]
# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) that include bf16 instructions
ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX",
                    "AVX10_1_512_AMX_FP16", "AVX10_2_512_AMX_2", "ALL", "DEFAULT")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):  # x86, ARM
            flags.update(value.split())
    return flags


def native_bf16() -> tuple[bool, str]:
    """Whether bf16 matmuls run natively here, and the reason when they do not."""
    cap = torch.backends.cpu.get_cpu_capability()
    flags = cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return ("bf16" in flags, f"no bf16 in the CPU features (ATen capability {cap})")
    hw = sorted({"avx512_bf16", "amx_bf16"} & flags)
    if not hw:
        return False, f"the CPU has no avx512_bf16/amx_bf16 flag (ATen capability {cap}): bf16 would be emulated"
    if not cap.startswith(("AVX512", "AMX")):
        return False, (f"ATen runs {cap} code (ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '')!r}) "
                       f"although the CPU has {'/'.join(hw)}: bf16 would be emulated")
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and isa not in ONEDNN_BF16_ISAS:
        return False, f"ONEDNN_MAX_CPU_ISA={isa} keeps oneDNN below its bf16 instructions: bf16 would be emulated"
    return True, f"{'/'.join(hw)}, ATen {cap}"


def matmul_sample(n: int, dtype: torch.dtype, mats: dict, calls: int = 3) -> float:
    """GFLOP/s of the fastest of ``calls`` n x n x n ``torch.mm`` (operands made once per size and dtype)."""
    if (n, dtype) not in mats:
        mats[n, dtype] = (torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype))
        torch.mm(*mats[n, dtype])  # warm-up
    a, b = mats[n, dtype]
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def measure_peaks(precs: list[str], big: bool, mats: dict) -> dict[str, float]:
    """Peak GFLOP/s per precision (the best over the sizes tried, median of 3 samples each)."""
    peaks = {}
    for prec in precs:
        rates = {n: statistics.median(matmul_sample(n, DTYPES[prec], mats) for _ in range(3))
                 for n in ([PEAK_N, 4096] if big else [PEAK_N])}
        print("matmul peak " + prec + ": " + ", ".join(f"{n}x{n} {r:.1f} GFLOP/s" for n, r in rates.items()), flush=True)
        peaks[prec] = max(rates.values())
    return peaks


def paired(fn: Callable[[int], None], steps: int, images_per_call: int, prec: str, mats: dict) -> tuple[float, float, float]:
    """(median images/s, median peak sample in GFLOP/s, median of images/s per peak GFLOP/s over the pairs) of
    ``fn(i)``, after ``fn(0)``.

    ``prec`` is the precision whose peak the ratio uses."""
    fn(0)
    rates, peaks, ratios = [], [], []
    for i in range(steps):
        peak = matmul_sample(PEAK_N, DTYPES[prec], mats)
        t0 = time.perf_counter()
        fn(i + 1)
        rate = images_per_call / (time.perf_counter() - t0)
        rates.append(rate)
        peaks.append(peak)
        ratios.append(rate / peak)
    return statistics.median(rates), statistics.median(peaks), statistics.median(ratios)


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


def profile_table(fn: Callable[[int], None], rows: int) -> str:
    """torch.profiler's ``rows`` costliest operators by self CPU time over two calls of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(2):
            fn(1000 + i)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=44)


def at_size(p: dict[str, Any], size: int) -> dict[str, Any]:
    """params with ``data.image_size`` set, so a ladder entry gets its patch size for that image size."""
    return {**p, "data": {**p["data"], "image_size": size}}


def build(p: dict[str, Any], method_name: str, model: str, size: int) -> Method:
    torch.manual_seed(0)
    enc = build_encoder(model_spec(at_size(p, size), model), size)
    cfg = {k: v for k, v in p["methods"][method_name].items() if k != "pretrain"}
    return build_method(method_name, enc, cfg, size, 3).train()


def row(cells: list[Any], measured: tuple[float, float, float], flops: float, fp32_peak: float) -> str:
    """A table row from ``paired``'s (img/s, peak sample, img/s per peak GFLOP/s) and the FLOPs per image."""
    rate, peak, per_peak = measured
    achieved = rate * flops / 1e9
    mfu = per_peak * flops / 1e9
    mfu_fp32 = mfu if cells[3] == "fp32" else achieved / fp32_peak
    vals = [*cells, f"{rate:.0f}", f"{flops / 1e9:.4f}", f"{achieved:.1f}", f"{peak:.0f}", f"{100 * mfu:.1f}",
            f"{100 * mfu_fp32:.1f}"]
    return " ".join(f"{v:<{w}}" if j < 2 else f"{v:>{w}}" for j, (v, (_, w)) in enumerate(zip(vals, COLS)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--methods", nargs="+", default=["mae", "dino"])
    ap.add_argument("--models", nargs="+", default=["pico", "tiny"])
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed (peak sample, step) pairs per row")
    ap.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--big", action="store_true", help="also measure the peak on 4096x4096")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print each row's N costliest operators")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    p = load_params(a.params)
    size = a.size or p["data"]["image_size"]
    precs = ["fp32", "bf16"] if a.precision == "both" else [a.precision]
    if "bf16" in precs:
        ok, why = native_bf16()
        if not ok:
            print(f"bf16 skipped: {why}")
            precs.remove("bf16")
        else:
            print(f"bf16: native ({why})")
    if not precs:
        return
    print(f"torch {torch.__version__}, {a.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"image {size}px, batch {a.batch}, {a.steps} interleaved (peak, step) pairs per row after 1 warm-up")
    mats: dict = {}
    peaks = measure_peaks(precs, a.big, mats)
    print()
    print(" ".join(f"{h:<{w}}" if j < 2 else f"{h:>{w}}" for j, (h, w) in enumerate(COLS)), flush=True)
    batch = torch.randint(0, 256, (a.batch, 3, size, size), dtype=torch.uint8)
    feat_images = batch.permute(0, 2, 3, 1).numpy()
    for model in a.models:
        spec = model_spec(at_size(p, size), model)
        params_m = f"{encoder_params(spec, size) / 1e6:.2f}"
        for name in a.methods:
            method = build(p, name, model, size)
            flops = train_flops_per_image(method, batch, 0)  # the timed batch: DINO's work depends on its masks
            for prec in precs:
                step = train_step_fn(method, batch, prec == "bf16")
                measured = paired(step, a.steps, a.batch, prec, mats)
                print(row([name, model, params_m, prec], measured, flops, peaks["fp32"]), flush=True)
                if a.profile:
                    print(profile_table(step, a.profile), flush=True)
        enc = build_encoder(spec, size).eval()
        fwd = count_flops_per_image(enc, size)
        for prec in precs:
            def extract(_: int, bf16: bool = prec == "bf16") -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    encoder_features(enc, feat_images, p["evaluate"]["batch_size"])
            print(row(["features", model, params_m, prec], paired(extract, a.steps, a.batch, prec, mats), fwd,
                      peaks["fp32"]), flush=True)
            if a.profile:
                print(profile_table(extract, a.profile), flush=True)


if __name__ == "__main__":
    main()
