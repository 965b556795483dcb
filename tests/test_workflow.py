"""End to end: the real Snakemake DAG on the small config in a temporary folder with its own MLflow store."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from biovfm.config import grid_points, validate_params
from conftest import REPO, TINY_PARAMS, copy_study

SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--workflow-profile", "none"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the `biovfm` entry point of this venv
    return env


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(SNAKEMAKE + ["--directory", str(workdir), *args], capture_output=True, text=True, env=_env(),
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    out = snakemake(workdir, "-n", "--quiet", "rules", *args).stdout
    table = out.split("Job stats:")[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}


@pytest.fixture
def workdir(tmp_path) -> Path:
    shutil.copy(TINY_PARAMS, tmp_path / "params.yaml")
    return tmp_path


def test_dry_run_of_the_default_grid_has_one_job_per_grid_point(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    p = validate_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    g = p["grid"]
    n_product = len(g["methods"]) * len(g["models"]) * len(g["data_sizes"]) * len(g["modalities"]) * len(g["seeds"])
    n_points = len(list(grid_points(p)))
    assert n_points == n_product + 4  # grid.extra: the data axis and a single-modality corpus at one size, both methods
    jobs = planned_jobs(tmp_path)
    assert jobs["pretrain"] == n_points and jobs["evaluate"] == n_points
    assert jobs["evaluate_random_init"] == len(g["models"]) * len(g["seeds"]) and jobs["evaluate_raw_pixels"] == 1
    assert jobs["task_stats"] == 1 and jobs["aggregate"] == 1


def test_bad_params_fail_before_any_job(workdir):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["grid"]["models"].append("giant")
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    proc = snakemake(workdir, "-n", check=False)
    assert proc.returncode != 0
    assert "grid.models: 'giant' has no definition under models" in proc.stdout + proc.stderr
    assert not (workdir / "results").exists()


def _outside_encoder(workdir: Path, p: dict) -> str:
    """A timm ViT with weights saved in the study folder, as evaluate.external (a user's local weights file)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    args = {"img_size": 16, "patch_size": 4, "embed_dim": 24, "depth": 1, "num_heads": 2}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args)
    (workdir / "weights").mkdir()
    save_file(model.state_dict(), str(workdir / "weights" / "outside vit.safetensors"))  # a space: quoted paths
    p["evaluate"]["external"] = [{"name": "outside-vit", "arch": "vit_tiny_patch16_224", "model_args": args,
                                  "path": "weights/outside vit.safetensors"}]
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    return "outside-vit"


@pytest.mark.slow
def test_small_study_end_to_end(small_study, tmp_path):
    """The small study's whole DAG (run once per session by the ``small_study`` fixture, copied here), then an outside
    encoder added to it: only its evaluation and the aggregate step run, and every output covers it."""
    workdir = copy_study(small_study, tmp_path / "study")
    log = (small_study / "snakemake.log").read_text()
    table = log.split("Job stats:")[1].split("total")[0]  # what the session's run did: the whole DAG
    ran = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}
    p = yaml.safe_load((workdir / "params.yaml").read_text())
    n_pre = len(p["grid"]["methods"]) * len(p["grid"]["models"]) * len(p["grid"]["data_sizes"])
    assert ran == {"download": 1, "mlflow_init": 1, "preprocess_task": len(p["data"]["tasks"]), "preprocess_corpus": 1,
                   "task_examples": 1, "task_stats": 1, "pretrain": n_pre, "evaluate": n_pre,
                   "evaluate_random_init": len(p["grid"]["models"]), "evaluate_raw_pixels": 1, "aggregate": 1, "all": 1}
    outside = _outside_encoder(workdir, p)
    assert planned_jobs(workdir) == {"evaluate_external": 1, "aggregate": 1, "all": 1}  # nothing else reruns
    snakemake(workdir, "--cores", "2")
    res = workdir / "results"
    summary = pd.read_csv(res / "summary.csv", keep_default_na=False)
    n_tasks = len(p["data"]["tasks"])
    n_models = n_pre + len(p["grid"]["models"]) + 1 + 1  # + random-init per size + raw pixels + the outside encoder
    fractions = validate_params(p)["evaluate"]["label_fractions"]
    n_estimators = 2 + len(fractions)  # paper, kNN, logreg at each fraction (1 among them)
    assert len(summary) == n_models * n_tasks * n_estimators
    primary = summary[summary["primary"]]
    assert len(primary) == n_models * n_tasks and set(primary["probe"]) == {"logreg"}
    assert set(summary["probe"]) == {"logreg", "paper", "knn"}
    assert sorted(summary.loc[summary["probe"] == "logreg", "label_fraction"].unique()) == sorted(fractions)
    assert set(summary["kind"]) == {"pretrained", "random_init", "raw_pixels", "external"}
    ext = summary[summary["kind"] == "external"]
    assert set(ext["model"]) == {outside} and len(ext) == n_tasks * n_estimators and ext["params_encoder"].gt(0).all()
    assert f"{outside} (" in (res / "figures" / "mean_auc_vs_params.svg").read_text()  # its reference line
    assert summary["auc"].between(0, 1).all() and summary["acc"].between(0, 1).all()
    assert set(summary.loc[summary["kind"] == "pretrained", "method"]) == {"mae", "dino"}
    for fig in ("mean_auc_vs_params", "task_grid", "task_slopes", "data_comparison", "auc_vs_data_size",
                "factor_correlations", "compute_frontier", "extrapolation", "label_efficiency"):
        assert (res / "figures" / f"{fig}.png").stat().st_size > 10_000
    headline = json.loads((res / "summary.json").read_text())
    assert headline["n_models"] == n_models
    # every AUC with a bootstrap interval around it; fits for every axis; the report holds it all
    points = pd.read_csv(res / "tables" / "points.csv", keep_default_na=False)
    assert len(points) == n_models * (n_tasks + 1)  # + the task mean
    assert ((points["auc_lo"] <= points["auc"]) & (points["auc"] <= points["auc_hi"])).all()
    assert (points["auc_hi"] - points["auc_lo"]).min() > 0
    fits = pd.read_csv(res / "fits.csv")
    assert set(fits["axis"]) == {"params", "params_paper", "images", "compute"}
    assert set(fits["form"]) == {"loglog", "saturating"}
    # the probe-fidelity check and label efficiency, per model and task, with paired intervals
    fid = pd.read_csv(res / "tables" / "probe_fidelity.csv", keep_default_na=False)
    assert len(fid) == n_models * (n_tasks + 1) and (fid["diff_lo"] <= fid["diff_hi"]).all()
    curve = pd.read_csv(res / "tables" / "label_efficiency.csv", keep_default_na=False)
    assert len(curve) == n_models * (len(fractions) + 1)  # + kNN
    mean = fits[(fits["axis"] == "params") & (fits["task"] == "mean") & (fits["form"] == "loglog")]
    assert mean["slope_lo"].notna().all() and (mean["slope_lo"] <= mean["slope"]).all()
    stats = pd.read_csv(res / "tables" / "task_stats.csv")
    assert len(stats) == n_tasks and stats["dbi"].notna().all()
    html = (res / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 9 and "Missing evaluations" not in html
    assert "Probe fidelity" in html and "Slopes on both parameter axes" in html

    # a failed or missing evaluation is listed in the report, not a crash
    evals = sorted(str(p) for p in res.rglob("eval.json"))
    proc = subprocess.run(["biovfm", "aggregate", "--evals", *evals, str(res / "runs/mae/atto/all/n999/s0/eval.json"),
                           "--uri", f"sqlite:///{res / 'mlflow.db'}", "--out", str(workdir / "partial"), "--n-boot", "50"],
                          capture_output=True, text=True, env=_env(), cwd=workdir, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "n999/s0/eval.json" in (workdir / "partial" / "report.html").read_text()

    # MLflow: one run per pretraining job and per evaluation job (+ the corpus report), and the summary names
    # exactly the evaluation runs
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{res / 'mlflow.db'}")
    exp = client.get_experiment_by_name(p["tracking"]["experiment"])
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    stages = pd.Series([r.data.tags["stage"] for r in runs]).value_counts().to_dict()
    # one aggregate run per content: the study's, then the one with the outside encoder
    assert stages == {"preprocess": 1, "pretrain": n_pre, "evaluate": n_models, "aggregate": 2}
    exp_tags = exp.tags
    assert exp_tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs table
    first, agg = sorted((r for r in runs if r.data.tags["stage"] == "aggregate"), key=lambda r: r.info.start_time)
    assert first.data.metrics["n_models"] == n_models - 1
    assert {"report.html", "summary.csv", "summary.json", "fits.csv", "figures", "tables"} == {
        f.path for f in client.list_artifacts(agg.info.run_id)}
    assert len(client.list_artifacts(agg.info.run_id, "figures")) >= 9
    slopes = {k: v for k, v in agg.data.metrics.items() if k.startswith("slope.pretrained/")}
    assert len(slopes) == 2 * len(p["grid"]["data_sizes"]) and agg.data.metrics["n_models"] == n_models
    ev = next(r for r in runs if r.data.tags["stage"] == "evaluate")
    assert {d.dataset.name for d in ev.inputs.dataset_inputs} == set(p["data"]["tasks"])
    assert (ev.info.end_time - ev.info.start_time) / 1000 >= ev.data.metrics["wall_time_s"] - 0.5
    corpus = json.loads((workdir / "data" / "processed" / "corpus" / "report.json").read_text())
    assert corpus["n_images"] == corpus["sources"]["synthetic"]["kept"] == p["data"]["synthetic"]["corpus_size"]
    assert all(r.info.status == "FINISHED" for r in runs)
    eval_ids = {r.info.run_id for r in runs if r.data.tags["stage"] == "evaluate"}
    assert set(summary["mlflow_run_id"]) == eval_ids
    for method in p["grid"]["methods"]:
        run = next(r for r in runs if r.data.tags["stage"] == "pretrain" and r.data.tags["method"] == method)
        steps = p["methods"][method].get("pretrain", {}).get("steps", p["pretrain"]["steps"])
        assert len(client.get_metric_history(run.info.run_id, "loss")) == steps  # the live curve, every step
        assert {"train_flops", "images_per_s", "peak_rss_mb", "wall_time_s"} <= set(run.data.metrics)
        assert [(d.dataset.name, d.tags[0].value) for d in run.inputs.dataset_inputs] == [("corpus/all", "training")]
        if method == "dino":
            assert {"teacher_entropy", "kl", "ibot_loss"} <= set(run.data.metrics)

    # nothing left to do; a new data size adds exactly its jobs; a failed job leaves no output Snakemake trusts
    assert "Nothing to be done" in snakemake(workdir, "-n").stdout
    p["grid"]["data_sizes"].insert(1, 120)
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    jobs = planned_jobs(workdir)
    assert jobs == {"pretrain": 4, "evaluate": 4, "aggregate": 1, "all": 1}  # 2 methods x 2 models


@pytest.mark.slow
def test_medmnist_source_end_to_end(workdir):
    """data.source: medmnist from a local mirror (MD5 overrides), plus a custom task, through the whole DAG.

    The pretraining corpus is the corpus section's default for this source: the downloaded train splits, which hold
    copies of val/test images as MedMNIST's do: they are left out of the corpus and reported, not fatal.
    """
    import io

    import numpy as np

    from biovfm.data.medmnist import npz_name
    from biovfm.data.synthetic import generate_task
    from biovfm.io import write_npz
    from http_mirror import Mirror

    tasks = ["chestmnist", "breastmnist"]  # multi-label and binary; a 3-channel custom task below
    files = {}
    for flag in tasks:
        task = generate_task(flag, 60, 40, 60, size=28, seed=1)
        tr = task["train_images"]  # copies across splits (left out of the corpus) and within train (a duplicate)
        tr[3], tr[4], tr[5], tr[6] = task["val_images"][0], task["test_images"][1], task["test_images"][2], tr[7]
        buf = io.BytesIO()
        np.savez(buf, **task)
        files[npz_name(flag, 28)] = buf.getvalue()
    md5 = {name: hashlib.md5(b).hexdigest() for name, b in files.items()}
    write_npz(workdir / "mine" / "my_derm.npz", **generate_task("dermamnist", 60, 40, 60, size=20, seed=2))

    p = yaml.safe_load((workdir / "params.yaml").read_text())
    p["grid"] |= {"methods": ["mae"], "models": p["grid"]["models"][:1], "data_sizes": [60]}  # the smallest DAG
    p["evaluate"]["random_init"] = False
    custom = {"name": "my_derm", "path": "mine/my_derm.npz", "task": "multi-class", "labels": list("abcdefg"),
              "channels": 3}
    with Mirror({name: (b, "drop_once") for name, b in files.items()}) as mirror:
        p["data"] |= {"source": "medmnist", "tasks": tasks, "custom_tasks": [custom],
                      "medmnist": {"base_url": mirror.url, "size": 28, "retries": 2, "backoff": 0, "md5": md5}}
        (workdir / "params.yaml").write_text(yaml.safe_dump(p))
        snakemake(workdir, "--cores", "2")
    assert sorted(n for n, _ in mirror.requests) == sorted(2 * list(files))  # each dropped once, then resumed
    raw = workdir / "data" / "raw" / "medmnist"
    for name in files:
        assert (raw / name).read_bytes() == files[name] and (raw / f"{name}.md5").exists()
    res = workdir / "results"
    summary = pd.read_csv(res / "summary.csv", keep_default_na=False)
    summary = summary[summary["primary"]]
    assert set(summary["task"]) == {*tasks, "my_derm"} and len(summary) == 2 * 3  # pretrained + raw pixels
    assert summary["auc"].between(0, 1).all()
    assert (res / "figures" / "task_grid.png").stat().st_size > 10_000
    corpus = json.loads((workdir / "data" / "processed" / "corpus" / "report.json").read_text())["sources"]["medmnist"]
    assert (corpus["on_leak"], corpus["leaked"], corpus["duplicates"], corpus["kept"]) == ("drop", 6, 2, 112)
    assert {"image": "chestmnist.npz:train[4]", "equals": "chestmnist_16.npz:test[1]"} in corpus["leaked_images"]
    stats = pd.read_csv(res / "tables" / "task_stats.csv", index_col="task")
    assert stats["val_in_train"].to_dict() == {**dict.fromkeys(tasks, 1), "my_derm": 0}
    assert stats["test_in_train"].to_dict() == {**dict.fromkeys(tasks, 2), "my_derm": 0}
    html = (res / "report.html").read_text()
    assert "<code>medmnist:breastmnist.npz:train[3]</code> = <code>breastmnist_16.npz:val[0]</code>" in html
    assert "test_in_train" in html

    # a new mirror or retry policy re-downloads nothing (the server is gone, so any download would fail)
    p["data"]["medmnist"] |= {"base_url": "http://127.0.0.1:9/elsewhere", "retries": 0}
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    assert "Nothing to be done" in snakemake(workdir, "-n").stdout


@pytest.mark.slow
def test_killed_pretraining_job_resumes_when_the_workflow_reruns(workdir):
    """Preemption as a cluster does it: the whole Snakemake process group is SIGKILLed mid-training (a 2-process
    torchrun DDP job); after `--unlock`, rerunning the workflow resumes the job from its last checkpoint."""
    import signal
    import time

    p = yaml.safe_load((workdir / "params.yaml").read_text())
    p["data"]["tasks"] = ["pathmnist"]  # the evaluation tasks only feed the corpus' leak check here
    p["grid"] |= {"methods": ["dino"], "models": ["atto"], "data_sizes": [180]}
    steps = 200  # killed at the first checkpoint (step 20): the rest is what the rerun resumes
    p["methods"]["dino"]["pretrain"] = {**p["methods"]["dino"].get("pretrain", {}), "steps": steps, "batch_size": 16,
                                        "checkpoint_every": 20, "log_every": 100, "nproc": 2, "threads": 2}
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    run_dir = workdir / "results" / "runs" / "dino" / "atto" / "all" / "n180" / "s0"
    target = "results/runs/dino/atto/all/n180/s0/run.json"  # relative to --directory
    proc = subprocess.Popen(SNAKEMAKE + ["--directory", str(workdir), "--cores", "2", target], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not list(run_dir.glob("state-*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(run_dir.glob("state-*.json")), "no checkpoint was written before the deadline"
    assert not (run_dir / "run.json").exists(), "the job finished before it could be killed; raise steps"
    snakemake(workdir, "--unlock")
    snakemake(workdir, "--cores", "2", target)
    log = (workdir / "results" / "logs" / "pretrain" / "dino_atto_all_n180_s0.log").read_text()
    assert re.search(r"resuming from step [1-9]\d* \(world size 2\)", log), log[-2000:]
    history = pd.read_csv(run_dir / "history.csv")
    assert history["step"].tolist() == list(range(1, steps + 1))
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2
    assert not list(run_dir.glob("state-*"))


@pytest.mark.parametrize("configfile", [None, "configs/medmnist.yaml"], ids=["default", "medmnist"])
def test_snakemake_lint_is_clean(tmp_path, configfile):
    """`snakemake --lint` reports nothing, for the default study and the real-MedMNIST one (other download rules)."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    extra = ["--configfile", str(REPO / configfile)] if configfile else []
    proc = snakemake(tmp_path, "--lint", *extra, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Congratulations, your workflow is in a good condition!" in out, out[-3000:]
    assert "Lints for" not in out
