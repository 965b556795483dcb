"""dvc.yaml covers the DAG (the study itself runs through DVC in test_dvc_remote.py, trained once for all DVC tests)."""
from __future__ import annotations

import shutil

import yaml

from conftest import REPO, TINY_PARAMS
from dvc_study import rule_outputs


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
