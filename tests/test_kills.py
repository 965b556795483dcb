"""A kill at any point of any stage (issue 15): each stage's job is SIGKILLed at 5 seeded I/O points, including in
the middle of writing its outputs, and the same ``snakemake`` command is run again; the outputs then equal those of
the uninterrupted small study, and nothing half-written is ever taken as done.

The points come from tests/faults/sitecustomize.py, which recorded every job's I/O in the ``small_study`` fixture
(each open for writing, each ``write()`` call, rename, removal and temp-folder creation in the study). Per stage,
on a copy of the finished study with that stage's outputs deleted, one chain of runs: kill at point 1, run again and
kill at point 2, ..., then a last run that completes. The points are taken in their order in the job, so a job that
resumes (pretraining, from its last checkpoint) still reaches the next one. Odd kills take the job's process only
(Snakemake sees a failed job); even ones the whole process group with Snakemake, as on a preempted node (after which
``snakemake --unlock`` is needed, as Snakemake's message says).
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, copy_study, fault_env, mlflow_runs, same_output, study_points
from test_workflow import _env

# The README's local command: the local profile sets rerun-incomplete, which a rerun after a kill of Snakemake itself
# needs (without it Snakemake refuses, saying to add it)
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
             "--workflow-profile", str(REPO / "workflow" / "profiles" / "local")]


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(SNAKEMAKE + ["--directory", str(workdir), *args], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc

KILLS_PER_STAGE = 5
TASKS = ["pathmnist", "chestmnist", "breastmnist", "retinamnist"]  # conftest.SMALL_STUDY_TASKS
RUN = "results/runs/dino/atto/all/n60/s0"


@dataclass(frozen=True)
class Stage:
    rule: str
    command: str  # the `biovfm` command of its job
    target: str  # what `snakemake` is asked for
    outputs: tuple[str, ...]  # the job's outputs (files or folders), deleted before the chain
    pick: str = ""  # a fragment of the job's argv that tells its record from other jobs of the rule


STAGES = [
    Stage("download", "download", "data/raw/synthetic/manifest.json",
          tuple(f"data/raw/synthetic/{t}.npz" for t in TASKS) + ("data/raw/synthetic/corpus.npz",
                                                                 "data/raw/synthetic/manifest.json")),
    Stage("preprocess_task", "preprocess-task", "data/processed/tasks/chestmnist_16.npz",
          ("data/processed/tasks/chestmnist_16.npz",), pick="chestmnist"),
    Stage("preprocess_corpus", "preprocess-corpus", "data/processed/corpus/report.json",
          tuple(f"data/processed/corpus/{f}" for f in ("index.csv", "shards.json", "shards", "report.json"))),
    Stage("pretrain", "pretrain", f"{RUN}/run.json",
          tuple(f"{RUN}/{f}" for f in ("checkpoint.safetensors", "run.json", "history.csv", "config.json",
                                       "mlflow.json")), pick="dino/atto/all/n60"),
    Stage("evaluate", "evaluate", f"{RUN}/eval.json",
          tuple(f"{RUN}/{f}" for f in ("eval.json", "scores.npz", "eval.mlflow.json")), pick="dino/atto/all/n60"),
    Stage("aggregate", "aggregate", "results/summary.csv",
          ("results/summary.csv", "results/summary.json", "results/fits.csv", "results/report.html")),
]


def _aggregate_outputs(study: Path) -> tuple[str, ...]:
    """The aggregate's tables and figures, as the finished study has them (task_stats and task_examples are other
    rules' outputs)."""
    files = [p for p in (study / "results" / "tables").glob("*.csv") if p.name != "task_stats.csv"]
    files += [p for p in (study / "results" / "figures").iterdir() if not p.name.startswith("task_examples")]
    return tuple(str(p.relative_to(study)) for p in sorted(files))


def stage_outputs(stage: Stage, study: Path) -> tuple[str, ...]:
    return stage.outputs + (_aggregate_outputs(study) if stage.rule == "aggregate" else ())


def job_points(study: Path, stage: Stage) -> list[dict]:
    """The I/O points that the stage's job went through in the uninterrupted study."""
    for f in sorted(study_points(study).glob(f"{stage.command}.*.jsonl")):
        lines = f.read_text().splitlines()
        if stage.pick in " ".join(json.loads(lines[0])["argv"]):
            return [json.loads(line) for line in lines[1:]]
    raise AssertionError(f"no recorded points for {stage.command} {stage.pick} in {study_points(study)}")


def choose_points(points: list[dict], rule: str, n: int = KILLS_PER_STAGE) -> list[dict]:
    """n distinct points, seeded by the rule: one in the middle of writing an output, one at an output's rename (the
    temp file complete, not yet in place), one in the first half of the job (pretraining: its checkpoints), the
    rest anywhere; in the order the job reaches them. A pick is a place
    (what is done to which file), then one of its occurrences, so that a file written in 10^4 small pieces (an SVG)
    is not picked 10^4 times as often as one written at once. Creating a folder that exists is not worth a kill,
    creating a temp folder is."""
    def pick(candidates: list[dict]) -> str:
        places: dict[str, list[dict]] = {}
        for p in candidates:
            places.setdefault(p["id"].rsplit(" #", 1)[0], []).append(p)
        return rng.choice(places[rng.choice(sorted(places))])["id"]

    # MLflow's artifact folder is named by absolute path in the store: in a copy of the study it is the original's,
    # outside the copy, so its points are not the copy's.
    usable = [p for p in points if "mlflow-artifacts" not in p["path"]
              and (p["kind"] != "mkdir" or Path(p["path"]).name.startswith("."))]
    rng = random.Random(f"kill-{rule}")
    chosen = {pick([p for p in usable if p["kind"] == "write"]), pick([p for p in usable if p["kind"] == "rename"]),
              pick(usable[:len(usable) // 2])}
    while len(chosen) < n:
        chosen.add(pick(usable))
    return sorted((p for p in usable if p["id"] in chosen), key=lambda p: p["i"])


def stale_temps(study: Path) -> list[str]:
    """Temp files and folders of our atomic writes (``.<name>.<host>-<pid>.<random>.tmp...``) left in the study."""
    return sorted(str(p.relative_to(study)) for d in ("data", "results") for p in (study / d).rglob(".*")
                  if (".tmp" in p.name or p.name.endswith(".old")) and "mlflow-artifacts" not in p.parts)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES, ids=[s.rule for s in STAGES])
def test_a_kill_at_any_point_of_a_stage_is_survived(stage, small_study, tmp_path):
    work = copy_study(small_study, tmp_path / "study")
    outputs = stage_outputs(stage, small_study)
    for rel in outputs:
        shutil.rmtree(work / rel) if (work / rel).is_dir() else (work / rel).unlink()
    points = choose_points(job_points(small_study, stage), stage.rule)
    assert len(points) == KILLS_PER_STAGE and any(p["kind"] == "write" for p in points), points
    runs_before = mlflow_runs(work / "results" / "mlflow.db")
    cmd = SNAKEMAKE + ["--directory", str(work), "--cores", "2", stage.target]
    log = tmp_path / "killed.json"
    printed = []  # what the jobs printed (the job's log is overwritten by each run)
    for k, point in enumerate(points):
        victim = "group" if k % 2 else "job"
        env = _env() | fault_env({"command": stage.command, "kill_at": point["id"], "victim": victim,
                                  "log": str(log)})
        log.unlink(missing_ok=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
        assert log.exists(), (f"kill {k + 1} at {point['id']!r} was not reached (exit {proc.returncode}):\n"
                              f"{proc.stderr[-3000:]}")
        assert proc.returncode != 0
        printed.append(proc.stdout)
        for rel in outputs:  # a file at an output's name is whole: only a complete temp file is renamed there
            # (the job's MLflow record is rewritten at the start and the end of a run: it is not an output)
            if (work / rel).exists() and not (work / rel).is_dir() and not rel.endswith("mlflow.json"):
                assert same_output(work / rel, small_study / rel) is None, f"after a kill at {point['id']!r}"
        if victim == "group":
            snakemake(work, "--unlock")
    done = snakemake(work, "--cores", "2", stage.target)
    printed.append(done.stdout)
    assert f"(Rule: {stage.rule})" in done.stderr, done.stderr[-2000:]  # the job ran again
    for rel in outputs:
        assert (work / rel).exists(), rel
        assert same_output(work / rel, small_study / rel) is None
    assert stale_temps(work) == []
    # MLflow: the killed attempts are closed as KILLED, one finished run per job, nothing else touched.
    runs = mlflow_runs(work / "results" / "mlflow.db")
    new = {i: r for i, r in runs.items() if i not in runs_before}
    assert not [i for i, r in runs.items() if r["status"] == "RUNNING"], runs
    assert {i: runs[i] for i in runs_before} == runs_before  # nothing else touched
    finished = [i for i, r in new.items() if r["status"] == "FINISHED"]
    assert len(finished) <= 1 and {r["status"] for r in new.values()} <= {"FINISHED", "KILLED"}, new
    if stage.rule == "pretrain":  # a rerun resumed from a checkpoint and still reached the same weights
        assert any("resuming from step" in text for text in printed)
    if stage.rule in ("pretrain", "evaluate"):  # the one finished run is the one its output names
        named = json.loads((work / stage.target).read_text())["mlflow_run_id"]
        assert finished == [named]
