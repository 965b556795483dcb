"""A tiny pretrained-and-evaluated run folder (seeded encoder, run files, points table): the export tests' and the
outside-encoder tests' shared input."""
from __future__ import annotations

import csv
import hashlib
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from biovfm.config import ModelSpec
from biovfm.data.store import load_store
from biovfm.io import write_json
from biovfm.models.vit import build_encoder

SPEC = ModelSpec("femto", embed_dim=32, depth=2, num_heads=2, patch_size=4)
SIZE = 16
RUN_ID = "mae/femto/mix/n40/s0"


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def points_rows(kind: str, aucs: dict[str, float], **cols: str) -> list[dict]:
    base = {"kind": kind, "method": "", "model": "", "modality": "", "data_size": "0"} | cols
    return [base | {"task": t, "n_seeds": 1, "auc": a, "auc_lo": a - 0.02, "auc_hi": a + 0.02} for t, a in aucs.items()]


def make_study(tmp_path: Path, corpus_dir: Path) -> tuple[Path, Path]:
    """A results folder with one pretrained-and-evaluated run of a tiny seeded encoder, and its corpus."""
    torch.manual_seed(0)
    encoder = build_encoder(SPEC, SIZE)
    with torch.no_grad():  # move every tensor off its init value: the export must carry all of them
        for p in encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run_dir = tmp_path / "results" / "runs" / RUN_ID
    run_dir.mkdir(parents=True)
    save_file(encoder.state_dict(), str(run_dir / "checkpoint.safetensors"))
    job = {"method": "mae", "model": asdict(SPEC), "modality": "mix", "modality_sources": ["xray", "ct"],
           "data_size": 40, "seed": 0, "image_size": SIZE, "in_chans": 3, "method_cfg": {"mask_ratio": 0.75},
           "train": {"steps": 3, "batch_size": 8, "base_lr": 1e-3, "precision": "fp32"}, "code_version": "test"}
    write_json(run_dir / "config.json", job)
    subset = load_store(corpus_dir).subset(job["modality_sources"], job["data_size"], seed=0)
    write_json(run_dir / "run.json", {
        "run_id": RUN_ID, "params_encoder": sum(p.numel() for p in encoder.parameters()), "params_paper": 0,
        "train_steps": 3, "mlflow_run_id": "",
        "images_seen": 24, "flops_per_image": 1e6, "train_flops": 7e7, "subset_hash":
        hashlib.sha1(subset.tobytes()).hexdigest()[:12], "fingerprint": "f" * 16})
    write_json(run_dir / "eval.json", {"run_id": RUN_ID, "mean_auc": 0.75, "tasks": {
        "pathmnist": {"auc": 0.8, "primary": "logreg"}, "bloodmnist": {"auc": 0.7, "primary": "logreg"}}})
    write_json(corpus_dir / "report.json", {"sources": {"test": {"license": "CC BY 4.0", "by_modality": {}}}})
    aucs = {"pathmnist": 0.8, "bloodmnist": 0.7, "mean": 0.75}
    write_csv(tmp_path / "results" / "tables" / "points.csv",
               points_rows("pretrained", aucs, method="mae", model="femto", modality="mix", data_size="40")
               + points_rows("random_init", {"pathmnist": 0.61, "bloodmnist": 0.62, "mean": 0.615}, method="random",
                         model="femto")
               + points_rows("raw_pixels", {"pathmnist": 0.71, "bloodmnist": 0.72, "mean": 0.715}, method="raw"))
    return tmp_path / "results", corpus_dir


