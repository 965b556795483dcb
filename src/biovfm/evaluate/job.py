"""The evaluate stage: one job per checkpoint (or baseline), all tasks inside it, features extracted once."""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from biovfm import tracking
from biovfm.config import EvalJob
from biovfm.data.medmnist import SPLITS, load_npz
from biovfm.evaluate.features import Allocate, encoder_features, file_allocator, load_encoder, raw_pixel_features
from biovfm.evaluate.probe import ProbeConfig, fit_probe
from biovfm.evaluate.scores import write_scores
from biovfm.io import read_json, write_json
from biovfm.models.vit import build_encoder, count_flops_per_image, default_device, encoder_params, paper_params
from biovfm.progress import Progress


def task_path(tasks_dir: str | Path, flag: str, size: int) -> Path:
    return Path(tasks_dir) / f"{flag}_{size}.npz"


def _encoder_and_meta(job: EvalJob, checkpoint: str | Path | None) -> tuple[torch.nn.Module | None, dict[str, Any]]:
    if job.kind == "raw_pixels":
        return None, {"params_encoder": 0, "params_paper": 0, "flops_per_image": 0.0, "images_seen": 0, "train_steps": 0}
    if job.kind == "pretrained":
        run_meta = read_json(Path(checkpoint).parent / "run.json")
        enc = load_encoder(checkpoint, job.model, job.image_size)
        keys = ("params_encoder", "params_paper", "flops_per_image", "images_seen", "train_steps", "train_flops")
        return enc, {k: run_meta[k] for k in keys} | {"pretrain_mlflow_run_id": run_meta["mlflow_run_id"]}
    torch.manual_seed(job.seed)  # the same initial weights the pretraining run of this seed starts from
    enc = build_encoder(job.model, job.image_size).eval()
    return enc, {"params_encoder": encoder_params(job.model, job.image_size), "params_paper": paper_params(job.model, job.image_size),
                 "flops_per_image": count_flops_per_image(enc, job.image_size), "images_seen": 0, "train_steps": 0}


def split_features(encoder: torch.nn.Module | None, images: np.ndarray, batch_size: int, label: str,
                   allocate: Allocate | None = None) -> np.ndarray:
    """Features of one split (raw pixels without an encoder), streamed from ``images`` with progress."""
    with Progress(label, len(images)) as progress:
        if encoder is None:
            return raw_pixel_features(images, batch_size, progress, allocate)
        return encoder_features(encoder, images, batch_size, progress, allocate)


def evaluate(job: EvalJob, tasks_dir: str | Path, out_json: str | Path, checkpoint: str | Path | None = None) -> dict[str, Any]:
    torch.set_num_threads(job.threads)
    t0 = time.perf_counter()
    encoder, meta = _encoder_and_meta(job, checkpoint)
    if encoder is not None:
        encoder = encoder.to(default_device())
    probe_cfg = ProbeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in job.probe.items()})
    results: dict[str, dict[str, Any]] = {}
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # the aggregate stage bootstraps the test set from them
    for info in job.task_infos():  # MedMNIST tasks and the user's custom tasks alike
        flag = info.flag
        data = load_npz(task_path(tasks_dir, flag, job.image_size), info, mmap=True)  # images read a batch at a time
        tf = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="biovfm-features-") as tmp:  # $TMPDIR: a node's scratch on clusters
            feats = {s: split_features(encoder, data[f"{s}_images"], job.batch_size,
                                       f"[evaluate] {job.run_id} {flag} {s}", file_allocator(tmp, s)) for s in SPLITS}
            t_feat = time.perf_counter() - tf
            feature_dim = int(feats["train"].shape[1])
            res = fit_probe(feats, {s: data[f"{s}_labels"] for s in SPLITS}, info, probe_cfg, seed=job.seed,
                            inplace=True)
            del feats
        scores[flag] = (res.test_scores, data["test_labels"])
        results[flag] = {"task_type": info.task, "auc": res.auc, "acc": res.acc, "val_auc": res.val_auc, "val_loss": res.val_loss, "l2": res.l2,
                         "l2_at_edge": res.at_edge, "best_epoch": res.best_epoch, "feature_dim": feature_dim,
                         "feature_s": t_feat, "probe_s": time.perf_counter() - tf - t_feat}
        print(f"[evaluate] {job.run_id} {flag}: AUC {res.auc:.4f} ACC {res.acc:.4f} (l2 {res.l2:.0e}, epoch {res.best_epoch})", flush=True)
    mean_auc = float(np.mean([r["auc"] for r in results.values()]))
    mean_acc = float(np.mean([r["acc"] for r in results.values()]))
    wall = time.perf_counter() - t0
    print(f"[evaluate] {job.run_id}: mean AUC {mean_auc:.4f} over {len(results)} tasks in {wall:.1f}s", flush=True)

    run = tracking.Run(job.tracking["uri"], job.tracking["experiment"], name=f"evaluate {job.run_id}",
                       tags={"stage": "evaluate", "grid_id": job.run_id, "kind": job.kind, "seed": str(job.seed),
                             "model": job.model.name if job.model else "",
                             **{k: str(v) for k, v in job.descriptors.items()}},
                       params=asdict(job) | {"meta": {k: v for k, v in meta.items() if isinstance(v, str)}},
                       key=tracking.job_key("evaluate", job.run_id, tracking.fingerprint(  # job config + checkpoint
                           {k: v for k, v in asdict(job).items() if k not in ("tracking", "threads")}
                           | {"checkpoint": read_json(Path(checkpoint).parent / "run.json")["fingerprint"] if checkpoint else ""})),
                       record=tracking.record_path(out_json))  # replayable by `biovfm mlflow-import`
    metrics = {f"auc.{f}": r["auc"] for f, r in results.items()} | {f"acc.{f}": r["acc"] for f, r in results.items()}
    metrics |= {f"l2.{f}": r["l2"] for f, r in results.items()}
    metrics |= {"mean_auc": mean_auc, "mean_acc": mean_acc, "wall_time_s": wall}
    metrics |= {k: float(v) for k, v in meta.items() if isinstance(v, (int, float))}
    run.log_metrics(metrics)
    run.finish()
    out = {"run_id": job.run_id, "kind": job.kind, **job.descriptors, "seed": job.seed,
           "model": job.model.name if job.model else "", "mean_auc": mean_auc, "mean_acc": mean_acc,
           "tasks": results, **meta, "wall_time_s": wall, "mlflow_run_id": run.run_id,
           "mlflow_key": run.key}
    write_scores(out_json, scores)  # before eval.json: an eval.json always has its scores
    write_json(out_json, out)
    return out

