"""DVC over the real pipeline: `dvc repro` runs the small study in a git checkout; params and metrics are DVC's."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_PARAMS
from dvc_study import DVC, make_project, rule_outputs, run


@pytest.fixture
def project(tmp_path) -> Path:
    """A git checkout of the workflow with the small config as its params.yaml."""
    return make_project(tmp_path)


def test_dvc_yaml_declares_params_outs_and_metrics():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["study"]
    outs = {next(iter(o)) for o in stage["outs"]}
    assert {"data/raw", "data/processed", "results/runs"} <= outs
    assert stage["params"] == [{"params.yaml": None}]
    assert next(iter(stage["metrics"][0])) == "results/summary.json"


def test_every_output_of_the_dag_is_a_dvc_out(tmp_path):
    """What a clone needs to rebuild the figures and tables without retraining travels through the DVC remote:
    every file a rule declares (logs aside), and the MLflow store the aggregate step reads the evaluations from."""
    for name in ("Snakefile", "params.yaml"):
        shutil.copy(REPO / name if name == "Snakefile" else TINY_PARAMS, tmp_path / name)
    shutil.copytree(REPO / "workflow", tmp_path / "workflow")
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["study"]
    outs = [next(iter(o)) for o in stage["outs"] + stage["metrics"]]
    uncovered = [f for f in rule_outputs(tmp_path) if not f.startswith("results/logs/")
                 and not any(f == o or f.startswith(o + "/") for o in outs)]
    assert not uncovered, f"rule outputs that no DVC out of dvc.yaml covers (a clone would miss them): {uncovered}"
    params = yaml.safe_load(TINY_PARAMS.read_text())
    store = params["tracking"]["uri"].removeprefix("sqlite:///")
    assert store in outs and "results/mlflow_init.json" in outs


@pytest.mark.slow
def test_dvc_repro_params_diff_and_metrics_show(project):
    run(DVC + ["repro"], project)
    metrics = json.loads(run(DVC + ["metrics", "show", "--json"], project))
    shown = json.dumps(metrics)
    assert "mean_auc" in shown and "raw_pixels/" in shown  # a mean AUC per evaluated model, baselines too
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "study"], project)
    assert "up to date" in run(DVC + ["status"], project).lower()

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pretrain"]["steps"] = 20
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    diff = run(DVC + ["params", "diff"], project)
    assert "pretrain.steps" in diff and "12" in diff and "20" in diff
    assert "params.yaml" in run(DVC + ["status"], project)
