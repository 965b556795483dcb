"""The pretraining loop, shared by every method (the method owns augmentation, heads and loss)."""
from __future__ import annotations

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
from torch.utils.flop_counter import FlopCounterMode

from biovfm import tracking
from biovfm.config import PretrainJob
from biovfm.data.store import load_store
from biovfm.io import write_json, write_text
from biovfm.methods import build_method
from biovfm.models.vit import build_encoder, count_flops_per_image, default_device, encoder_params, paper_params
from biovfm.train.checkpoint import load_state, save_encoder, save_state
from biovfm.train.schedule import warmup_cosine

CHECKPOINT = "checkpoint.safetensors"


def batch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Sampling without replacement, epoch by epoch, as a pure function of (seed, step): resuming needs no sampler state."""
    start = step * batch
    pos = torch.arange(start, start + batch)
    epochs = pos // n
    out = torch.empty(batch, dtype=torch.long)
    for e in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))
        sel = epochs == e
        out[sel] = perm[pos[sel] % n]
    return out


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed + 1) * 7_919_993 + step)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and tokens (1-D parameters), as in MAE/timm."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or p.shape[0] == 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fingerprint(job: PretrainJob) -> str:
    """Identity of everything that shapes the weights (tracking settings excluded)."""
    d = asdict(job)
    d.pop("tracking")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def train_flops_per_image(method: torch.nn.Module, batch: torch.Tensor, seed: int) -> float:
    """Forward+backward FLOPs of one training step, per source image, measured on a tiny batch."""
    with FlopCounterMode(display=False) as counter:
        loss, _ = method.training_step(batch, step_generator(seed, 0))
        loss.backward()
    method.zero_grad(set_to_none=True)
    return float(counter.get_total_flops()) / len(batch)


def pretrain(job: PretrainJob, corpus_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    out = Path(out_dir)
    device = default_device()
    out.mkdir(parents=True, exist_ok=True)
    t = job.train
    torch.set_num_threads(t.threads)
    torch.manual_seed(job.seed)
    store = load_store(corpus_dir)
    idx = store.subset(job.modality_sources, job.data_size, seed=job.seed)
    images = torch.from_numpy(np.ascontiguousarray(store.images[idx])).permute(0, 3, 1, 2).contiguous()
    encoder = build_encoder(job.model, job.image_size, job.in_chans)
    method = build_method(job.method, encoder, job.method_cfg, job.image_size, job.in_chans).to(device)
    opt = torch.optim.AdamW(param_groups(method, t.weight_decay), lr=t.lr, betas=(0.9, 0.95))
    fp = fingerprint(job)
    flops_train = train_flops_per_image(method, images[:2].to(device), job.seed)
    flops_fwd = count_flops_per_image(encoder, job.image_size, job.in_chans)

    history: list[dict[str, float]] = []
    start, mlflow_id, elapsed_before = 0, None, 0.0
    state = load_state(out, job.run_id, fp)
    if state is not None:
        method.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history, mlflow_id = int(state["step"]), json.loads(state["history"]), state["mlflow_run_id"] or None
        elapsed_before = float(state["elapsed"])
        print(f"[pretrain] {job.run_id}: resuming from step {start}", flush=True)

    run = tracking.Run(job.tracking["uri"], job.tracking["experiment"], name=f"pretrain {job.run_id}",
                       tags={"stage": "pretrain", "grid_id": job.run_id, "method": job.method, "model": job.model.name},
                       params=asdict(job), run_id=mlflow_id)
    warmup = int(t.warmup_frac * t.steps)
    method.train()
    t0 = time.perf_counter()
    pending: list[tuple[int, dict[str, float]]] = []
    for step in range(start, t.steps):
        lr = warmup_cosine(step, t.steps, t.lr, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = images[batch_indices(len(images), t.batch_size, step, job.seed)].to(device, non_blocking=True)
        loss, logs = method.training_step(batch, step_generator(job.seed, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.on_step_end(step, t.steps)
        row = {"step": step + 1, "loss": loss.item(), "lr": lr, "images_seen": (step + 1) * t.batch_size, **logs}
        history.append(row)
        pending.append((step + 1, {"loss": row["loss"], "lr": lr, **logs}))
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            rate = (done - start) * t.batch_size / (time.perf_counter() - t0)
            print(f"[pretrain] {job.run_id}: step {done}/{t.steps} loss {row['loss']:.4f} lr {lr:.2e} {rate:.0f} img/s", flush=True)
            run.log_series(pending)
            pending = []
        if done % t.checkpoint_every == 0 and done < t.steps:
            run.log_series(pending)  # what a resumed job will not replay
            pending = []
            save_state(out, {"run_id": job.run_id, "fingerprint": fp, "step": done, "model": method.state_dict(),
                             "optimizer": opt.state_dict(), "history": json.dumps(history), "mlflow_run_id": run.run_id,
                             "elapsed": elapsed_before + time.perf_counter() - t0})
    wall = elapsed_before + time.perf_counter() - t0
    images_seen = t.steps * t.batch_size
    meta = {
        "run_id": job.run_id, "method": job.method, "model": job.model.name, "modality": job.modality,
        "data_size": job.data_size, "seed": job.seed, "train_steps": t.steps, "images_seen": images_seen,
        "params_encoder": encoder_params(job.model, job.image_size, job.in_chans),
        "params_paper": paper_params(job.model, job.image_size, job.in_chans),
        "params_trainable": sum(p.numel() for p in method.parameters() if p.requires_grad),
        "flops_per_image": flops_fwd, "train_flops_per_image": flops_train, "train_flops": flops_train * images_seen,
        "wall_time_s": wall, "images_per_s": (t.steps - start) * t.batch_size / max(1e-9, time.perf_counter() - t0),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0,
        "final_loss": float(np.mean([h["loss"] for h in history[-10:]])),
        "subset_hash": hashlib.sha1(idx.tobytes()).hexdigest()[:12], "fingerprint": fp, "mlflow_run_id": run.run_id,
    }
    save_encoder(out / CHECKPOINT, method.export_encoder(), {"run_id": job.run_id, "fingerprint": fp})
    write_text(out / "history.csv", pd.DataFrame(history).to_csv(index=False))
    write_json(out / "config.json", asdict(job))
    run.log_metrics({k: v for k, v in meta.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=t.steps)
    run.finish()
    write_json(out / "run.json", meta)  # last: the job's completion marker
    (out / "state.pt").unlink(missing_ok=True)
    return meta
