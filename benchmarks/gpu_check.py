"""The prepared GPU check: the paper-scale path end to end on one machine, in a few minutes, with no downloads.

MAE and DINO on ViT-B/16 at 224 px, bf16 autocast and ``torch.compile``, DDP over every visible GPU (one process per
GPU, through the same ``biovfm pretrain`` the workflow runs), a job SIGKILLed after its first checkpoint and resumed,
then ``biovfm evaluate`` (feature extraction + probe) of each encoder. Prints images/s and model-FLOP utilisation
(MFU: counted training FLOPs per image x images/s / measured matmul peak of all GPUs) per method, and exits non-zero on
any failure. ``--cpu``: tiny sizes on CPUs, fp32, no compile, the two methods side by side (what CI runs so this
script cannot rot).

    bash benchmarks/gpu_check.sh            # on a GPU machine (under 5 minutes on one H100/H200)
    bash benchmarks/gpu_check.sh --cpu      # anywhere, in about a minute
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


def structured_images(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth random uint8 RGB images (upsampled low-resolution noise): something to reconstruct, fast to make."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(n, size // 8, size // 8, 3), dtype=np.uint8)
    return np.ascontiguousarray(low.repeat(8, axis=1).repeat(8, axis=2))


def check_params(cpu: bool) -> dict:
    """params.yaml with the paper's recipes (configs/medmnist.yaml) at 224 px on ViT-B/16, or a tiny CPU variant."""
    from biovfm.config import validate_params

    p = yaml.safe_load((REPO / "params.yaml").read_text())
    paper = yaml.safe_load((REPO / "configs" / "medmnist.yaml").read_text())
    p["grid"].pop("extra", None)
    if cpu:
        p["data"]["image_size"] = 32
        p["models"]["check"] = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}
    else:
        p["data"]["image_size"] = 224
        p["methods"] = paper["methods"]
        p["methods"]["dino"]["local_frac"] = 96 / 224  # DINOv2's 96-px local crops
        p["models"]["check"] = {"embed_dim": 768, "depth": 12, "num_heads": 12, "patch_size": 16}  # ViT-B/16
    p["grid"]["models"] = ["check"]
    return validate_params(p, source="gpu_check")


def matmul_peak(cpu: bool) -> float:
    """Measured dense matmul FLOP/s of one device: bf16 8192^3 on a GPU, fp32 1024^3 on CPUs."""
    import torch

    dev, dtype, n, reps = ("cpu", torch.float32, 1024, 5) if cpu else ("cuda", torch.bfloat16, 8192, 20)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(2):
        a @ b
    if not cpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if not cpu:
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def run(cmd: list[str], log: Path, env: dict) -> None:
    with open(log, "a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        raise SystemExit(f"FAILED ({rc}): {' '.join(cmd[:3])} ...; log: {log}\n{log.read_text()[-3000:]}")


def kill_after_first_checkpoint(cmd: list[str], out: Path, log: Path, env: dict, timeout: float) -> None:
    """Start the job in its own process group and SIGKILL the whole group once its first checkpoint is complete."""
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not list(out.glob("state-*.json")):
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
                raise SystemExit(f"FAILED: no checkpoint before the job ended or {timeout:.0f}s passed; log: {log}\n"
                                 f"{log.read_text()[-3000:]}")
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if (out / "run.json").exists():
        raise SystemExit("FAILED: the job finished before it could be killed; raise the check's steps")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="tiny sizes on CPUs, fp32, no compile (CI)")
    ap.add_argument("--steps", type=int, default=0, help="training steps per method (default 40 GPU, 60 CPU)")
    ap.add_argument("--batch-per-gpu", type=int, default=64)
    ap.add_argument("--workdir", default="", help="default: a temporary folder, removed at the end")
    a = ap.parse_args()

    import torch

    from biovfm import tracking
    from biovfm.config import eval_job, pretrain_job, to_json
    from biovfm.data.store import write_store
    from biovfm.data.synthetic import generate_task
    from biovfm.io import write_npz

    if not a.cpu and not torch.cuda.is_available():
        print("FAILED: no CUDA device visible (use --cpu on a machine without GPUs)", file=sys.stderr)
        return 2
    gpus = 0 if a.cpu else torch.cuda.device_count()
    world = max(1, gpus)
    steps = a.steps or (60 if a.cpu else 40)
    batch = (16 if a.cpu else a.batch_per_gpu) * world
    p = check_params(a.cpu)
    size = p["data"]["image_size"]
    work = Path(a.workdir or tempfile.mkdtemp(prefix="biovfm-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    device = "CPU " + (platform.processor() or platform.machine()) if a.cpu else torch.cuda.get_device_name(0)
    print(f"[gpu_check] {device} x {world}, torch {torch.__version__}, {size} px, {steps} steps, global batch {batch}, "
          f"workdir {work}", flush=True)
    t_all = time.perf_counter()

    n = max(4 * batch, 256)
    write_store(work / "corpus", structured_images(n, size, 0), np.full(n, "check"), np.full(n, "xray"),
                shard_size=256)
    task = generate_task("bloodmnist", 256, 64, 128, size=size, seed=0) if a.cpu else \
        generate_task("bloodmnist", 1024, 256, 512, size=28, seed=0)
    if not a.cpu:  # the generator renders at 28 px; the check needs the study's size
        from biovfm.data.preprocess import resize_images
        task = {k: resize_images(v, size) if k.endswith("_images") else v for k, v in task.items()}
    write_npz(work / "tasks" / f"bloodmnist_{size}.npz", **task)
    p["data"]["tasks"] = ["bloodmnist"]
    p["tracking"] = {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "gpu-check"}
    p["evaluate"]["probe"]["epochs"] = 10
    tracking.init_store(p["tracking"]["uri"], "gpu-check")
    peak = matmul_peak(a.cpu)

    def check(method: str) -> tuple:
        job = pretrain_job(p, method, "check", "all", n, 0)
        job = replace(job, modality_sources=("xray",), train=replace(
            job.train, steps=steps, batch_size=batch, checkpoint_every=max(1, steps // 6), log_every=max(1, steps // 4),
            warmup_frac=0.1, precision="fp32" if a.cpu else "bf16", compile=not a.cpu, nproc=0 if gpus else 1,
            threads=1 if a.cpu else 8))
        out, log = work / "runs" / method, work / f"{method}.log"
        cmd = [sys.executable, "-m", "biovfm.cli", "pretrain", "--job", to_json(job), "--corpus", str(work / "corpus"),
               "--out", str(out)]
        kill_after_first_checkpoint(cmd, out, log, env, timeout=240)
        run(cmd, log, env)  # resumes from the checkpoint
        meta = json.loads((out / "run.json").read_text())
        if "resuming from step" not in log.read_text() or meta["world_size"] != world:
            raise SystemExit(f"FAILED: {method} did not resume on {world} process(es); log: {log}")
        if not np.isfinite(meta["final_loss"]):
            raise SystemExit(f"FAILED: {method} loss is {meta['final_loss']}")
        ejob = eval_job(p, "pretrained", f"check/{method}", "check", 0, {"method": method})
        ejob = replace(ejob, batch_size=64 if a.cpu else 256)
        run([sys.executable, "-m", "biovfm.cli", "evaluate", "--job", to_json(ejob), "--tasks", str(work / "tasks"),
             "--checkpoint", str(out / "checkpoint.safetensors"), "--out", str(out / "eval.json")], log, env)
        ev = json.loads((out / "eval.json").read_text())
        feat_images = sum(len(task[f"{s}_labels"]) for s in ("train", "val", "test"))
        feat_s = ev["tasks"]["bloodmnist"]["feature_s"]
        mfu = meta["train_flops_per_image"] * meta["images_per_s"] / (peak * world)
        return (method, meta["images_per_s"], meta["train_flops_per_image"] / 1e9, mfu, feat_images / feat_s,
                ev["tasks"]["bloodmnist"]["auc"], meta["peak_gpu_mb"] / 1024)

    if a.cpu:  # the two methods side by side, one thread each: on CPUs the check is mostly process start-up
        with ThreadPoolExecutor(2) as pool:
            rows = list(pool.map(check, ("mae", "dino")))
    else:  # one after the other, each on every GPU
        rows = [check(method) for method in ("mae", "dino")]

    print(f"\nmatmul peak measured: {peak / 1e12:.1f} TFLOP/s per device ({'fp32' if a.cpu else 'bf16'})")
    print(f"{'method':6} {'train img/s':>11} {'GFLOP/img':>9} {'MFU':>6} {'feature img/s':>13} {'probe AUC':>9} "
          f"{'peak GPU GiB':>12}")
    for m, ips, gf, mfu, fps, auc, mem in rows:
        print(f"{m:6} {ips:11.1f} {gf:9.3g} {mfu:6.1%} {fps:13.1f} {auc:9.3f} {mem:12.1f}")
    print(f"\n[gpu_check] OK in {time.perf_counter() - t_all:.0f}s: pretrain (DDP x{world}, "
          f"{'fp32' if a.cpu else 'bf16 + compile'}), kill + resume, evaluate", flush=True)
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
