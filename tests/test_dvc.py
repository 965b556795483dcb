"""DVC over the real pipeline: `dvc repro` runs the small study in a git checkout; params and metrics are DVC's."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_PARAMS


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@x", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@x")
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


@pytest.fixture
def project(tmp_path) -> Path:
    """A git checkout of the workflow with the small config as its params.yaml."""
    for name in ("Snakefile", "dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "workflow", tmp_path / "workflow")
    shutil.copytree(REPO / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(TINY_PARAMS, tmp_path / "params.yaml")
    run(["git", "init", "-q"], tmp_path)
    run([sys.executable, "-m", "dvc", "init", "-q"], tmp_path)
    run(["git", "add", "-A"], tmp_path)
    run(["git", "commit", "-qm", "init"], tmp_path)
    return tmp_path


def test_dvc_yaml_declares_params_outs_and_metrics():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["study"]
    outs = {next(iter(o)) for o in stage["outs"]}
    assert {"data/raw", "data/processed", "results/runs"} <= outs
    assert stage["params"] == [{"params.yaml": None}]
    assert next(iter(stage["metrics"][0])) == "results/summary.json"


@pytest.mark.slow
def test_dvc_repro_params_diff_and_metrics_show(project):
    dvc = [sys.executable, "-m", "dvc"]
    run(dvc + ["repro"], project)
    metrics = json.loads(run(dvc + ["metrics", "show", "--json"], project))
    shown = json.dumps(metrics)
    assert "mean_auc" in shown and "raw/pixels" in shown
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "study"], project)
    assert "up to date" in run(dvc + ["status"], project).lower()

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pretrain"]["steps"] = 20
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    diff = run(dvc + ["params", "diff"], project)
    assert "pretrain.steps" in diff and "12" in diff and "20" in diff
    assert "params.yaml" in run(dvc + ["status"], project)
