"""The evaluate stage: one job per checkpoint (or baseline), all tasks inside it, features extracted once."""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from biovfm import tracking
from biovfm.config import EvalJob
from biovfm.data.medmnist import MULTI_LABEL, SPLITS, TaskInfo, load_npz, task_digest
from biovfm.evaluate.external import ExternalEncoder, ExternalSpec
from biovfm.evaluate.features import (Allocate, batched_features, encoder_features, file_allocator, load_encoder,
                                      raw_pixel_features)
from biovfm.evaluate.knn import fit_knn
from biovfm.evaluate.logreg import LogRegConfig, fit_logreg
from biovfm.evaluate.probe import ProbeConfig, fit_probe, normalize_features
from biovfm.evaluate.scores import variant_name, write_scores
from biovfm.evaluate.subsets import label_subset
from biovfm.io import read_json, write_json
from biovfm.models.vit import build_encoder, count_flops_per_image, default_device, encoder_params, paper_params
from biovfm.progress import Progress, process_times


def task_path(tasks_dir: str | Path, flag: str, size: int) -> Path:
    return Path(tasks_dir) / f"{flag}_{size}.npz"


Encoder = torch.nn.Module | ExternalEncoder | None  # None: raw pixels


def model_name(job: EvalJob) -> str:
    """The summary's model column: the ladder name, an outside encoder's name, or '' (raw pixels)."""
    return job.model.name if job.model else job.external.get("name", "")


def external_spec(entry: dict[str, Any]) -> ExternalSpec:
    return ExternalSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()})


def _encoder_and_meta(job: EvalJob, checkpoint: str | Path | None, device: torch.device) -> tuple[Encoder, dict[str, Any]]:
    if job.kind == "external":
        ext = ExternalEncoder(external_spec(job.external), device)
        n = ext.n_params
        return ext, {"params_encoder": n, "params_paper": n, "flops_per_image": 0.0, "images_seen": 0, "train_steps": 0,
                     "architecture": ext.model.default_cfg.get("architecture", job.external.get("arch", "")),
                     "weights": str(ext.weights), "feature": ext.feature, "input_size": ext.input_size}
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


def split_features(encoder: Encoder, images: np.ndarray, batch_size: int, label: str,
                   allocate: Allocate | None = None) -> np.ndarray:
    """Features of one split (raw pixels without an encoder), streamed from ``images`` with progress."""
    with Progress(label, len(images)) as progress:
        if encoder is None:
            return raw_pixel_features(images, batch_size, progress, allocate)
        if isinstance(encoder, ExternalEncoder):
            return batched_features(images, encoder.features, batch_size, progress, allocate)
        return encoder_features(encoder, images, batch_size, progress, allocate)


def majority_acc(y_train: np.ndarray, y_test: np.ndarray, info: TaskInfo) -> float:
    """Test accuracy of always predicting the training set's most frequent class (per label: multi-label): the
    floor a probe's accuracy must clear."""
    tr, te = np.asarray(y_train).reshape(len(y_train), -1), np.asarray(y_test).reshape(len(y_test), -1)
    if info.task == MULTI_LABEL:
        return float(np.mean(te == (tr.mean(axis=0) > 0.5)))
    values, counts = np.unique(tr[:, 0], return_counts=True)
    return float(np.mean(te[:, 0] == values[np.argmax(counts)]))


def _subset(x: dict[str, np.ndarray], y: dict[str, np.ndarray], rows: np.ndarray) -> tuple[dict, dict]:
    """The splits with the training rows ``rows`` only (a copy of those rows; val and test unchanged)."""
    return {**x, "train": np.asarray(x["train"][rows])}, {**y, "train": np.asarray(y["train"])[rows]}


def _config(cls: type, values: dict[str, Any]) -> Any:
    """A frozen config dataclass from params (YAML lists become the tuples the dataclass holds)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def estimators(job: EvalJob, feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], info: TaskInfo,
               device: torch.device) -> dict[str, dict[str, Any]]:
    """Every estimator of the job on one task's features, by variant name: the paper's head, the reference
    logistic regression, the primary one at each label fraction, kNN. One feature extraction serves them all.

    The features are LayerNorm-ed in place first (the paper's frozen fc_norm: part of the representation), so
    every estimator reads the same matrix."""
    feats = {s: normalize_features(feats[s], s, inplace=True) for s in SPLITS}
    probe_cfg, lr_cfg = _config(ProbeConfig, job.probe), _config(LogRegConfig, job.logreg)
    out: dict[str, dict[str, Any]] = {}

    def paper(x: dict, y: dict) -> dict[str, Any]:
        r = fit_probe(x, y, info, probe_cfg, seed=job.seed, normalized=True)
        return {"probe": "paper", "auc": r.auc, "acc": r.acc, "val_auc": r.val_auc, "scores": r.test_scores,
                "l2": r.l2, "l2_at_edge": r.at_edge, "best_epoch": r.best_epoch, "val_loss": r.val_loss}

    def logreg(x: dict, y: dict, rows: np.ndarray | None = None) -> dict[str, Any]:
        r = fit_logreg(x, y, info, lr_cfg, train_rows=rows, device=device)
        return {"probe": "logreg", "auc": r.auc, "acc": r.acc, "val_auc": r.val_auc, "scores": r.test_scores,
                "c": r.c, "c_at_edge": r.at_edge, "lbfgs_iter": r.n_iter, "converged": r.converged}

    n_train = len(feats["train"])
    for frac in job.label_fractions:  # descending: 1.0 first
        rows = label_subset(labels["train"], frac, info, job.seed)
        for probe in ("logreg", "paper"):
            if frac < 1 and probe != job.primary:
                continue  # label efficiency: the primary estimator only
            t0 = time.perf_counter()
            if probe == "logreg":
                res = logreg(feats, labels, None if frac == 1 else rows)
            else:
                res = paper(*((feats, labels) if frac == 1 else _subset(feats, labels, rows)))
            out[variant_name(probe, frac)] = res | {"label_fraction": frac, "n_train": len(rows),
                                                    "seconds": time.perf_counter() - t0}
    if job.knn_k > 0:
        t0 = time.perf_counter()
        r = fit_knn(feats, labels, info, job.knn_k, device)
        out["knn"] = {"probe": "knn", "auc": r.auc, "acc": r.acc, "scores": r.test_scores, "k": r.k,
                      "label_fraction": 1.0, "n_train": n_train, "seconds": time.perf_counter() - t0}
    return out


def evaluate(job: EvalJob, tasks_dir: str | Path, out_json: str | Path, checkpoint: str | Path | None = None) -> dict[str, Any]:
    startup_s = process_times()["process_age_s"]  # interpreter and imports, before this function
    torch.set_num_threads(job.threads)
    t0, started_ms = time.perf_counter(), int(time.time() * 1000)  # the MLflow run spans the job's real work
    device = default_device()
    encoder, meta = _encoder_and_meta(job, checkpoint, device)
    if isinstance(encoder, torch.nn.Module):
        encoder = encoder.to(device)
    results: dict[str, dict[str, Any]] = {}
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # the aggregate stage bootstraps the test set from them
    variant_scores: dict[str, dict[str, np.ndarray]] = {}
    datasets: list[dict[str, Any]] = []  # the task files, as MLflow dataset inputs
    for info in job.task_infos():  # MedMNIST tasks and the user's custom tasks alike
        flag = info.flag
        path = task_path(tasks_dir, flag, job.image_size)
        data = load_npz(path, info, mmap=True)  # images read a batch at a time
        datasets.append({"name": flag, "digest": task_digest(data), "source": str(path), "context": "evaluation",
                         "profile": {s: int(len(data[f"{s}_labels"])) for s in SPLITS}
                         | {"image_size": job.image_size, "task": info.task}})
        labels = {s: data[f"{s}_labels"] for s in SPLITS}
        tf = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="biovfm-features-") as tmp:  # $TMPDIR: a node's scratch on clusters
            feats = {s: split_features(encoder, data[f"{s}_images"], job.batch_size,
                                       f"[evaluate] {job.run_id} {flag} {s}", file_allocator(tmp, s)) for s in SPLITS}
            t_feat = time.perf_counter() - tf
            feature_dim = int(feats["train"].shape[1])
            with threadpool_limits(job.threads):  # numpy/scipy BLAS too: its idle threads spin against busy cores
                variants = estimators(job, feats, labels, info, device)
            del feats
        primary = variants[job.primary]
        scores[flag] = (primary["scores"], data["test_labels"])
        for name, v in variants.items():
            variant_scores.setdefault(name, {})[flag] = v["scores"]
        results[flag] = {"task_type": info.task, "primary": job.primary, "auc": primary["auc"], "acc": primary["acc"],
                         "val_auc": primary["val_auc"], "majority_acc": majority_acc(labels["train"], labels["test"], info),
                         "feature_dim": feature_dim, "feature_s": t_feat, "probe_s": time.perf_counter() - tf - t_feat,
                         "variants": {n: {k: val for k, val in v.items() if k != "scores"} for n, v in variants.items()}}
        others = ", ".join(f"{n} {v['auc']:.4f}" for n, v in variants.items() if n != job.primary)
        print(f"[evaluate] {job.run_id} {flag}: AUC {primary['auc']:.4f} ACC {primary['acc']:.4f} ({job.primary}); "
              f"{others}", flush=True)
    mean_auc = float(np.mean([r["auc"] for r in results.values()]))
    mean_acc = float(np.mean([r["acc"] for r in results.values()]))
    wall = time.perf_counter() - t0
    print(f"[evaluate] {job.run_id}: mean AUC {mean_auc:.4f} over {len(results)} tasks in {wall:.1f}s", flush=True)

    run = tracking.Run(job.tracking["uri"], job.tracking["experiment"], name=f"evaluate {job.run_id}",
                       tags={"stage": "evaluate", "grid_id": job.run_id, "kind": job.kind, "seed": str(job.seed),
                             "primary_probe": job.primary,
                             "model": model_name(job),
                             **{k: str(v) for k, v in job.descriptors.items()}},
                       params=asdict(job) | {"meta": {k: v for k, v in meta.items() if isinstance(v, str)}},
                       key=tracking.job_key("evaluate", job.run_id, tracking.fingerprint(  # job config + checkpoint
                           {k: v for k, v in asdict(job).items() if k not in ("tracking", "threads")}
                           | {"checkpoint": read_json(Path(checkpoint).parent / "run.json")["fingerprint"] if checkpoint else ""})),
                       record=tracking.record_path(out_json),  # replayable by `biovfm mlflow-import`
                       start_time=started_ms)
    run.log_inputs(datasets)
    metrics = {f"auc.{f}": r["auc"] for f, r in results.items()} | {f"acc.{f}": r["acc"] for f, r in results.items()}
    for f, r in results.items():  # every estimator: auc_<variant>.<task>, acc_<variant>.<task>
        metrics[f"majority_acc.{f}"] = r["majority_acc"]
        metrics[f"l2.{f}"] = r["variants"]["paper"]["l2"]  # the paper head's chosen penalty
        if "logreg" in r["variants"]:
            metrics[f"c.{f}"] = r["variants"]["logreg"]["c"]  # the reference's chosen C
        for name, v in r["variants"].items():
            metrics |= {f"auc_{name}.{f}": v["auc"], f"acc_{name}.{f}": v["acc"]}
    metrics |= {"mean_auc": mean_auc, "mean_acc": mean_acc, "wall_time_s": wall}
    metrics |= {k: float(v) for k, v in meta.items() if isinstance(v, (int, float))}
    run.log_metrics(metrics)
    out = {"run_id": job.run_id, "kind": job.kind, **job.descriptors, "seed": job.seed,
           "model": model_name(job), "mean_auc": mean_auc, "mean_acc": mean_acc,
           "tasks": results, **meta, "wall_time_s": wall, "mlflow_run_id": run.run_id,
           "mlflow_key": run.key, "process": {"startup_s": startup_s, **process_times()}}
    write_scores(out_json, scores, variant_scores)  # before eval.json: an eval.json always has its scores
    write_json(out_json, out)
    run.finish()  # last: a job killed before its outputs are in place leaves a RUNNING run, closed by its rerun
    return out

