"""The pretraining loop, shared by every method (the method owns augmentation, heads and loss).

One job = one grid point. The global batch is fixed by params whatever the world size and accumulation:
each process takes its slice of the step's batch, draws its randomness from the step's global draws
(:class:`~biovfm.methods.base.StepContext`), and DDP averages the gradients. Rank 0 checkpoints, logs
and writes the outputs; any rerun resumes from the newest good checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import resource
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from timm.models.vision_transformer import Block
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode

from biovfm import tracking
from biovfm.config import PretrainJob, PretrainSettings
from biovfm.data.store import load_store
from biovfm.io import write_json, write_text
from biovfm.methods import build_method
from biovfm.methods.base import Method, StepContext
from biovfm.models.vit import build_encoder, count_flops_per_image, default_device, encoder_params, paper_params
from biovfm.progress import format_duration, process_times
from biovfm.train import distributed
from biovfm.train.checkpoint import clear_states, load_state, save_encoder, save_state
from biovfm.train.loader import BatchStream, micro_batch, read_batch
from biovfm.train.optim import param_groups
from biovfm.train.schedule import cosine, warmup_cosine

CHECKPOINT = "checkpoint.safetensors"
# Settings that change how a run executes but not the weights it reaches: a run may resume under others.
RUNTIME_ONLY = ("threads", "nproc", "checkpoint_every", "log_every", "compile")


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed + 1) * 7_919_993 + step)


def fingerprint(job: PretrainJob) -> str:
    """Identity of everything that shapes the weights (tracking and runtime-only settings excluded)."""
    d = asdict(job)
    d.pop("tracking")
    for k in RUNTIME_ONLY:
        d["train"].pop(k)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def train_flops_per_image(method: Method, batch: torch.Tensor, seed: int) -> float:
    """Forward+backward FLOPs of one training step (teacher included), per source image, on a tiny batch."""
    with FlopCounterMode(display=False) as counter:
        loss, _ = method(batch, StepContext.single(seed, len(batch)))
        loss.backward()
    method.zero_grad(set_to_none=True)
    return float(counter.get_total_flops()) / len(batch)


def set_schedules(opt: torch.optim.Optimizer, t: PretrainSettings, step: int) -> tuple[float, float]:
    """lr (warm-up + cosine, times each group's layer-decay scale) and weight decay (cosine to its end value)."""
    lr = warmup_cosine(step, t.steps, t.lr, int(t.warmup_frac * t.steps))
    wd = t.weight_decay if t.weight_decay_end is None else cosine(step, t.steps, t.weight_decay, t.weight_decay_end)
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]
        if g["decay"]:
            g["weight_decay"] = wd
    return lr, wd


def compile_blocks(method: Method) -> None:
    """``torch.compile`` each transformer block in place (state-dict keys unchanged, so checkpoints stay portable)."""
    for m in method.modules():
        if isinstance(m, Block):
            m.compile()


def rng_states(device: torch.device) -> dict[str, Any]:
    out = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def subset_digest(idx: np.ndarray) -> str:
    """The pretraining images of a run, as a short hash of their store rows (run.json and the MLflow input)."""
    return hashlib.sha1(idx.tobytes()).hexdigest()[:12]


def pretrain(job: PretrainJob, corpus_dir: str | Path, out_dir: str | Path) -> dict[str, Any] | None:
    """Train one grid point (in every process of a torchrun job); returns the run's metadata on rank 0."""
    out = Path(out_dir)
    device = default_device()
    world = distributed.init_world(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    try:
        return _pretrain(job, corpus_dir, out, device, world)
    finally:
        distributed.close_world()


def _pretrain(job: PretrainJob, corpus_dir: str | Path, out: Path, device: torch.device,
              world: distributed.World) -> dict[str, Any] | None:
    startup_s, entered = process_times()["process_age_s"], time.perf_counter()  # start-up: interpreter, imports
    t = job.train
    mb = micro_batch(t.batch_size, world.size, t.grad_accum)
    log = print if world.is_main else (lambda *a, **k: None)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(t.threads)
    torch.manual_seed(job.seed)
    store = load_store(corpus_dir)
    idx = store.subset(job.modality_sources, job.data_size, seed=job.seed)  # rows of the memory-mapped shards
    encoder = build_encoder(job.model, job.image_size, job.in_chans)
    method = build_method(job.method, encoder, job.method_cfg, job.image_size, job.in_chans).to(device)
    opt = torch.optim.AdamW(param_groups(method, t.weight_decay, t.layer_decay), lr=t.lr, betas=tuple(t.betas))
    fp = fingerprint(job)
    flops_train = train_flops_per_image(method, read_batch(store.images, idx[:2]).to(device), job.seed)
    flops_fwd = count_flops_per_image(encoder, job.image_size, job.in_chans)

    history: list[dict[str, float]] = []
    start, mlflow_id, elapsed_before = 0, None, 0.0
    state = load_state(out, job.run_id, fp, log=log)
    if state is not None:
        method.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        restore_rng(state["rng"], device)
        start, history, mlflow_id = int(state["step"]), json.loads(state["history"]), state["mlflow_run_id"] or None
        elapsed_before = float(state["elapsed"])
        log(f"[pretrain] {job.run_id}: resuming from step {start} (world size {world.size})", flush=True)
    if t.compile:
        compile_blocks(method)
    model = method
    if world.size > 1:
        model = DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=False)

    run = None
    if world.is_main:
        run = tracking.Run(job.tracking["uri"], job.tracking["experiment"], name=f"pretrain {job.run_id}",
                           tags={"stage": "pretrain", "grid_id": job.run_id, "method": job.method, "model": job.model.name},
                           params=asdict(job), run_id=mlflow_id, key=tracking.job_key("pretrain", job.run_id, fp),
                           record=tracking.record_path(out),  # replayable by `biovfm mlflow-import`
                           series={"file": "history.csv", "step": "step", "exclude": ["images_seen"]})
        counts = store.index["modality"].to_numpy()[idx]
        counts = dict(zip(*np.unique(counts, return_counts=True)))
        run.log_inputs([{"name": f"corpus/{job.modality}", "digest": subset_digest(idx), "source": str(corpus_dir),
                         "context": "training",
                         "profile": {"images": int(len(idx)), "image_size": job.image_size,
                                     "by_modality": {str(k): int(v) for k, v in counts.items()}}}])
    t0 = time.perf_counter()
    stream = BatchStream(store.images, idx, t.batch_size, job.seed, world.rank, t.grad_accum, mb, start, t.steps,
                         pin=device.type == "cuda")
    try:
        _train_steps(job, method, model, opt, stream, device, world, run, history, fp, out, start,
                     elapsed_before, t0, log)
    finally:
        stream.close()
    if not world.is_main:
        return None
    return _finish(job, out, method, encoder, history, run, idx, fp, start, elapsed_before, t0, device, world,
                   flops_fwd, flops_train, timing={"startup_s": startup_s, "setup_s": t0 - entered})


def _train_steps(job: PretrainJob, method: Method, model: torch.nn.Module, opt: torch.optim.Optimizer,
                 stream: BatchStream, device: torch.device, world: distributed.World, run: tracking.Run | None,
                 history: list[dict[str, float]], fp: str, out: Path, start: int, elapsed_before: float, t0: float,
                 log) -> None:
    """Steps ``[start, steps)``: forward/backward per micro-batch, one optimizer step, logging and checkpoints."""
    t = job.train
    pending: list[tuple[int, dict[str, float]]] = []
    mb = micro_batch(t.batch_size, world.size, t.grad_accum)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
    trainable = [p for p in method.parameters() if p.requires_grad]
    method.train()
    for step, batches in stream:
        lr, wd = set_schedules(opt, t, step)
        scratch: dict[str, Any] = {}  # shared by the step's micro-batches (e.g. DINO's centre sums)
        sums: dict[str, float] = {}
        for k, images in enumerate(batches):
            lo = (world.rank * t.grad_accum + k) * mb
            ctx = StepContext(step_generator(job.seed, step), t.batch_size, lo, lo + mb, step, t.steps, scratch)
            batch = images.to(device, non_blocking=True)
            sync = k == t.grad_accum - 1 or world.size == 1
            with (contextlib.nullcontext() if sync else model.no_sync()):
                with autocast:
                    loss, logs = model(batch, ctx)
                (loss / t.grad_accum).backward()
            for key, v in {"loss": loss.item(), **logs}.items():
                sums[key] = sums.get(key, 0.0) + v / t.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, t.clip_grad if t.clip_grad > 0 else float("inf"))
        method.before_optimizer_step(ctx)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_step_end(ctx)
        # on the engine's device: NCCL reduces CUDA tensors only
        stats = distributed.all_reduce_mean(torch.tensor(list(sums.values()), dtype=torch.float64, device=device))
        row = {"step": step + 1, **dict(zip(sums, stats.tolist())), "lr": lr, "weight_decay": wd,
               "grad_norm": float(grad_norm), "images_seen": (step + 1) * t.batch_size}
        history.append(row)
        pending.append((step + 1, {k: v for k, v in row.items() if k not in ("step", "images_seen")}))
        done = step + 1
        if not world.is_main:
            continue
        if done % t.log_every == 0 or done == t.steps:
            elapsed = time.perf_counter() - t0
            rate = (done - start) * t.batch_size / elapsed
            eta = elapsed / (done - start) * (t.steps - done)
            log(f"[pretrain] {job.run_id}: step {done}/{t.steps} loss {row['loss']:.4f} lr {lr:.2e} {rate:.0f} img/s, "
                f"elapsed {format_duration(elapsed)}, ETA {format_duration(eta)}", flush=True)
            run.log_series(pending)
            pending.clear()
        if done % t.checkpoint_every == 0 and done < t.steps:
            run.log_series(pending)  # what a resumed job will not replay
            pending.clear()
            save_state(out, {"run_id": job.run_id, "fingerprint": fp, "step": done, "model": method.state_dict(),
                             "optimizer": opt.state_dict(), "rng": rng_states(device),
                             "schedule": {"lr": lr, "weight_decay": wd}, "history": json.dumps(history),
                             "mlflow_run_id": run.run_id, "elapsed": elapsed_before + time.perf_counter() - t0})


def _finish(job: PretrainJob, out: Path, method: Method, encoder: torch.nn.Module, history: list[dict[str, float]],
            run: tracking.Run, idx: np.ndarray, fp: str, start: int, elapsed_before: float, t0: float,
            device: torch.device, world: distributed.World, flops_fwd: float, flops_train: float,
            timing: dict[str, float | None] | None = None) -> dict[str, Any]:
    """Write the encoder, history, config and run metadata (run.json last: the job's completion marker)."""
    t = job.train
    now = time.perf_counter()
    images_seen = t.steps * t.batch_size
    meta = {
        "run_id": job.run_id, "method": job.method, "model": job.model.name, "modality": job.modality,
        "data_size": job.data_size, "seed": job.seed, "train_steps": t.steps, "images_seen": images_seen,
        "params_encoder": encoder_params(job.model, job.image_size, job.in_chans),
        "params_paper": paper_params(job.model, job.image_size, job.in_chans),
        "params_trainable": sum(p.numel() for p in method.parameters() if p.requires_grad),
        "flops_per_image": flops_fwd, "train_flops_per_image": flops_train, "train_flops": flops_train * images_seen,
        "wall_time_s": elapsed_before + now - t0, "world_size": world.size,
        "images_per_s": (t.steps - start) * t.batch_size / max(1e-9, now - t0),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0,
        "final_loss": float(np.mean([h["loss"] for h in history[-10:]])),
        "process": {**(timing or {}), **process_times()},  # start-up, setup before training, CPU: where time goes
        "subset_hash": subset_digest(idx), "fingerprint": fp, "mlflow_run_id": run.run_id,
    }
    save_encoder(out / CHECKPOINT, method.export_encoder(), {"run_id": job.run_id, "fingerprint": fp})
    write_text(out / "history.csv", pd.DataFrame(history).to_csv(index=False))
    write_json(out / "config.json", asdict(job))
    run.log_metrics({k: v for k, v in meta.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=t.steps)
    write_json(out / "run.json", meta)
    run.finish()  # last: a job killed before its outputs are in place leaves a RUNNING run, closed by its rerun
    clear_states(out)
    return meta
