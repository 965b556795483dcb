"""Helpers of the DVC tests: a git + DVC checkout of the real workflow on the small config, and tool runners."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO, TINY_PARAMS

DVC = [sys.executable, "-m", "dvc"]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
BIOVFM = [sys.executable, "-m", "biovfm.cli"]


def env() -> dict[str, str]:
    e = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@x", GIT_COMMITTER_NAME="t",
             GIT_COMMITTER_EMAIL="t@x")
    e.pop("MLFLOW_TRACKING_URI", None)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}"  # this venv's snakemake, dvc and biovfm
    return e


def run_proc(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env(), timeout=timeout)


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> str:
    """stdout of a command that must succeed (else its output is in the failure)."""
    proc = run_proc(cmd, cwd, timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def make_project(path: Path, params: Path = TINY_PARAMS) -> Path:
    """A git checkout of the workflow with ``params`` (default: the small config) as its params.yaml (DVC
    initialised, committed)."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, path / name)
    shutil.copytree(REPO / "workflow", path / "workflow")
    shutil.copytree(REPO / "envs", path / "envs")  # the rules' conda env (Snakemake records its hash per job)
    shutil.copytree(REPO / "src", path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(params, path / "params.yaml")
    run(["git", "init", "-q"], path)
    run(DVC + ["init", "-q"], path)
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-qm", "init"], path)
    return path


def job_stats(log: str) -> dict[str, int]:
    """Snakemake's "Job stats" table (jobs by rule) from its output; {} when it had nothing to do."""
    if "Job stats:" not in log:
        assert "Nothing to be done" in log, log[-3000:]
        return {}
    table = log.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def planned_jobs(workdir: Path) -> dict[str, int]:
    """Snakemake's dry-run job counts by rule ({} when there is nothing to do)."""
    proc = run_proc(SNAKEMAKE + ["-n", "--quiet", "rules"], workdir)
    if proc.returncode != 0:
        raise AssertionError(f"snakemake -n failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return job_stats(proc.stdout + proc.stderr)


def rule_outputs(workdir: Path) -> dict[str, str]:
    """Every output file of the DAG, by path, with the rule that declares it (``snakemake --summary``)."""
    out = run(SNAKEMAKE + ["--summary"], workdir)
    rows = [line.split("\t") for line in out.splitlines() if "\t" in line]
    assert rows and rows[0][:3] == ["output_file", "date", "rule"], out[-2000:]
    return {r[0]: r[2] for r in rows[1:]}


def tree(root: Path, *dirs: str, skip: tuple[str, ...] = ()) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256, mtime_ns)} of every file under ``root/dirs``, except paths under ``skip``."""
    files = {}
    for d in dirs:
        for f in sorted((root / d).rglob("*")):
            rel = f.relative_to(root).as_posix()
            if f.is_file() and not any(rel == s or rel.startswith(s.rstrip("/") + "/") for s in skip):
                files[rel] = (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
    return files
