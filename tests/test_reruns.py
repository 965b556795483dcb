"""Reruns and concurrent runs through real Snakemake runs (issue 15, "Reliability, counted").

A: a finished study reruns nothing; one changed params value, one edited source file of a stage, or one --forcerun
reruns exactly the jobs it implies (expected sets derived from the grid). B: a second `snakemake` on a running study
is refused by Snakemake's lock and the first ends as a lone run would. C: two studies with different params, run at
once in two folders, share nothing.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import yaml

from biovfm.config import benchmark_tasks, grid_points, grid_values, run_id, validate_params
from conftest import REPO, copy_study, mlflow_runs, same_output, small_study_params, without_volatile
from test_workflow import SNAKEMAKE, _env, planned_jobs, snakemake

# Every test reads the session's small study (its whole DAG, run once): end-to-end, hence slow.
pytestmark = pytest.mark.slow

# ------------------------------------------------------------------------------------------------ helpers


def _planned(workdir: Path, *args: str) -> dict[str, int]:
    """The dry run's job counts by rule; {} when Snakemake has nothing to do (planned_jobs finds no job table)."""
    try:
        return planned_jobs(workdir, *args)
    except IndexError:  # a failed dry run raises AssertionError in snakemake(); no "Job stats:" = nothing to do
        return {}


def _set(p: dict, key: str, value) -> dict:
    """A deep copy of params ``p`` with the dotted ``key`` set to ``value``."""
    p = copy.deepcopy(p)
    *path, last = key.split(".")
    d = p
    for k in path:
        d = d.setdefault(k, {})
    d[last] = value
    return p


def _get(p: dict, key: str):
    for k in key.split("."):
        p = p[k]
    return p


class Expect:
    """Job counts of the parts of the small study's DAG, from its grid (no hard-coded counts)."""

    def __init__(self, p: dict):
        v = validate_params(copy.deepcopy(p))
        self.points = list(grid_points(v))
        sizes = len(grid_values(v, "models")) * len(grid_values(v, "seeds"))
        self.random = sizes if v["evaluate"]["random_init"] else 0
        self.raw = int(v["evaluate"]["raw_pixels"])
        self.tasks = len(benchmark_tasks(v))

    def points_of(self, *methods: str) -> dict[str, int]:
        n = sum(g["method"] in methods for g in self.points)
        return {"pretrain": n, "evaluate": n}

    def all_points(self) -> dict[str, int]:
        return self.points_of(*{g["method"] for g in self.points})

    def evaluations(self) -> dict[str, int]:
        return {"evaluate": len(self.points), "evaluate_random_init": self.random, "evaluate_raw_pixels": self.raw}

    @staticmethod
    def aggregate() -> dict[str, int]:
        return {"aggregate": 1, "all": 1}

    def task_files(self) -> dict[str, int]:  # the evaluation tasks and everything that reads them
        return {"preprocess_task": self.tasks, "task_examples": 1, "task_stats": 1, "preprocess_corpus": 1,
                **self.all_points(), **self.evaluations(), **self.aggregate()}


def _jobs(*parts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        out.update(part)
    return {k: n for k, n in out.items() if n}


def _outputs(study: Path, point: str) -> list[str]:
    """The study's data files and the outputs of one grid point (relative paths; MLflow records left out)."""
    files = [f for d in ("data", f"results/runs/{point}") for f in (study / d).rglob("*") if f.is_file()]
    return sorted(str(f.relative_to(study)) for f in files if not f.name.endswith("mlflow.json"))


def _assert_same_outputs(study: Path, reference: Path, point: str) -> None:
    """Every data file and output of ``point`` in ``study`` equals the reference's (conftest's ``same_output``:
    bitwise, apart from timings and run ids in JSON/CSV)."""
    files = _outputs(study, point)
    missing = [f for f in files if not (reference / f).is_file()]
    differ = [f for f in files if f not in missing and same_output(study / f, reference / f) is not None]
    assert not missing and not differ, f"missing in the reference: {missing}; differ: {differ}"


def _mtimes(study: Path) -> dict[str, int]:
    return {str(f.relative_to(study)): f.stat().st_mtime_ns for d in ("data", "results") for f in (study / d).rglob("*")
            if f.is_file()}


def _new_study(folder: Path, params: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


def _start(study: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A snakemake run in the background; its output goes to <study>.log (a pipe could fill up and stall it)."""
    with open(f"{study}.log", "w") as log:
        return subprocess.Popen(SNAKEMAKE + ["--directory", str(study), *args], env=env or _env(), stdout=log,
                                stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, what: str) -> str:
    proc.wait(timeout=600)
    out = Path(f"{proc.args[proc.args.index('--directory') + 1]}.log").read_text()
    assert proc.returncode == 0, f"{what} failed:\n{out[-6000:]}"
    return out


# --------------------------------------------------------------------------------------- A: targeted reruns


def test_a_finished_study_reruns_nothing(small_study, tmp_path):
    """`snakemake -n` on a finished study plans nothing, and a real second run starts no job and touches no file."""
    study = copy_study(small_study, tmp_path / "study")
    assert "Nothing to be done" in snakemake(study, "-n").stdout
    before, runs = _mtimes(study), mlflow_runs(study / "results" / "mlflow.db")
    proc = snakemake(study, "--cores", "2")
    out = proc.stdout + proc.stderr
    assert "Nothing to be done" in out and not re.search(r"^(local)?rule \w+:", out, re.M), out[-3000:]
    assert _mtimes(study) == before
    assert mlflow_runs(study / "results" / "mlflow.db") == runs


def test_one_params_value_reruns_exactly_the_jobs_it_affects(small_study, tmp_path):
    """One params value per dry run: the planned jobs are exactly those whose inputs it changes. Thread counts and
    cluster resources only schedule jobs (the commands' --threads set them): they rerun nothing."""
    p = yaml.safe_load((small_study / "params.yaml").read_text())
    e = Expect(p)
    assert "base_lr" in p["methods"]["dino"]["pretrain"] and "steps" not in p["methods"]["dino"]["pretrain"]
    edits = [  # (key, new value, expected jobs)
        ("methods.mae.decoder_dim", 24, _jobs(e.points_of("mae"), e.aggregate())),  # a MAE-only setting
        ("methods.dino.pretrain.base_lr", 0.016, _jobs(e.points_of("dino"), e.aggregate())),  # DINO's own override
        ("pretrain.base_lr", 1e-3, _jobs(e.points_of("mae"), e.aggregate())),  # shared, but DINO overrides it
        ("pretrain.steps", 10, _jobs(e.all_points(), e.aggregate())),  # shared by both methods
        ("evaluate.probe.epochs", 10, _jobs(e.evaluations(), e.aggregate())),  # every evaluation, no pretraining
        ("corpus.shard_size", 100, _jobs({"preprocess_corpus": 1}, e.all_points(), e.aggregate())),
        ("data.synthetic.n_test", 50, _jobs({"download": 1}, e.task_files())),  # new data: all but mlflow_init
        ("tracking.experiment", "elsewhere",  # a new experiment: every job that logs (one run, see common.smk)
         _jobs({"mlflow_init": 1, "preprocess_corpus": 1}, e.all_points(), e.evaluations(), e.aggregate())),
        ("pretrain.threads", 2, {}),
        ("evaluate.threads", 2, {}),
        ("corpus.threads", 1, {}),
        ("cluster.pretrain.default.mem_mb", 8000, {}),
    ]

    full = validate_params(copy.deepcopy(p))  # with the schema's defaults

    def dry_run(i: int) -> dict[str, int]:
        key, value, _ = edits[i]
        assert _get(full, key) != value, key
        study = copy_study(small_study, tmp_path / f"edit{i}")
        (study / "params.yaml").write_text(yaml.safe_dump(_set(p, key, value), sort_keys=False))
        return _planned(study)

    with ThreadPoolExecutor(2) as pool:  # dry runs are single-threaded: two at once on two cores
        planned = list(pool.map(dry_run, range(len(edits))))
    wrong = {key: (got, want) for (key, _, want), got in zip(edits, planned) if got != want}
    assert not wrong, "planned != expected:\n" + "\n".join(f"{k}: {g} != {w}" for k, (g, w) in wrong.items())


CODE_EDITS = [  # (source file under src/biovfm, the parts of the DAG it reruns, why)
    ("methods/mae.py", lambda e: _jobs(e.points_of("mae"), e.aggregate()), "one method's objective: its points only"),
    ("methods/dino/loss.py", lambda e: _jobs(e.points_of("dino"), e.aggregate()), "the other method's, in a folder"),
    ("methods/base.py", lambda e: _jobs(e.all_points(), e.aggregate()), "what every method shares"),
    ("train/augment.py", lambda e: _jobs(e.all_points(), e.evaluations(), e.aggregate()),
     "pretraining, and the input normalisation of every evaluation's features"),
    ("evaluate/probe.py", lambda e: _jobs(e.evaluations(), e.aggregate()), "an estimator: every evaluation"),
    ("analysis/bootstrap.py", lambda e: _jobs({"task_stats": 1, "task_examples": 1}, e.aggregate()),
     "the analysis: tables, figures, report"),
    ("data/store.py", lambda e: _jobs({"preprocess_corpus": 1}, e.all_points(), e.aggregate()),
     "the corpus store (written by preprocess_corpus, read by pretraining)"),
    ("data/preprocess.py", lambda e: e.task_files(), "the preprocessing of tasks and corpus"),
    ("data/synthetic.py", lambda e: _jobs({"download": 1}, e.task_files()), "the synthetic benchmark's generator"),
    ("tracking.py", lambda e: {}, "plumbing (MLflow retries, records): not a result, reruns nothing"),
]


def test_one_source_file_reruns_its_stage_and_what_reads_it(small_study, tmp_path, monkeypatch):
    """A copy of the package and workflow with one file changed by a no-op line, dry-run on a copy of the finished
    study (PYTHONPATH and -s point at the copy, so the stage fingerprints of workflow/rules/common.smk read it)."""
    study = copy_study(small_study, tmp_path / "study")
    e = Expect(yaml.safe_load((study / "params.yaml").read_text()))
    code = tmp_path / "code"
    shutil.copytree(REPO / "src", code / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for d in ("workflow", "envs"):
        shutil.copytree(REPO / d, code / d)
    shutil.copy(REPO / "Snakefile", code / "Snakefile")
    monkeypatch.setenv("PYTHONPATH", str(code / "src"))
    assert _planned(study, "-s", str(code / "Snakefile")) == {}  # the unchanged copy: the same code
    wrong = {}
    for rel, expect, why in CODE_EDITS:
        f = code / "src" / "biovfm" / rel
        text = f.read_text()
        f.write_text(text + "\n_EDITED_BY_TEST_RERUNS = None\n")
        try:
            got = _planned(study, "-s", str(code / "Snakefile"))
        finally:
            f.write_text(text)
        if got != expect(e):
            wrong[f"{rel} ({why})"] = (got, expect(e))
    assert not wrong, "planned != expected:\n" + "\n".join(f"{k}: {g} != {w}" for k, (g, w) in wrong.items())


def test_forcerun_of_one_grid_point_reruns_only_it(small_study, tmp_path):
    """--forcerun of one point's run.json: its pretraining, evaluation and the aggregate rerun, nothing else; every
    MLflow run already in the store is left as it was; the aggregate reads the new evaluation run."""
    study = copy_study(small_study, tmp_path / "study")
    e = Expect(yaml.safe_load((study / "params.yaml").read_text()))
    point = run_id(**e.points[0])
    run_dir, target = study / "results" / "runs" / point, f"results/runs/{point}/run.json"
    assert _planned(study, "--forcerun", target) == _jobs({"pretrain": 1, "evaluate": 1}, e.aggregate())
    db = study / "results" / "mlflow.db"
    runs, mtimes = mlflow_runs(db), _mtimes(study)
    old_eval = json.loads((run_dir / "eval.json").read_text())
    old_train = json.loads((run_dir / "run.json").read_text())
    old_weights = (run_dir / "checkpoint.safetensors").read_bytes()

    snakemake(study, "--cores", "2", "--forcerun", target)
    new_eval = json.loads((run_dir / "eval.json").read_text())
    new_train = json.loads((run_dir / "run.json").read_text())
    assert new_train["mlflow_run_id"] != old_train["mlflow_run_id"]
    assert new_eval["mlflow_run_id"] != old_eval["mlflow_run_id"]
    assert new_eval["pretrain_mlflow_run_id"] == new_train["mlflow_run_id"]
    # the rerun is the same computation: same weights, same metrics
    assert (run_dir / "checkpoint.safetensors").read_bytes() == old_weights
    assert without_volatile(new_eval) == without_volatile(old_eval)
    assert without_volatile(new_train) == without_volatile(old_train)

    after = mlflow_runs(db)
    assert {k: after[k] for k in runs} == runs  # same ids, status, times, metrics, params and tags
    added = {k: v for k, v in after.items() if k not in runs}
    assert sorted(r["stage"] for r in added.values()) == ["aggregate", "evaluate", "pretrain"]
    assert {new_train["mlflow_run_id"], new_eval["mlflow_run_id"]} <= set(added)
    assert all(r["status"] == "FINISHED" for r in added.values())
    agg = next(r for r in added.values() if r["stage"] == "aggregate")
    read = agg["params"]["evaluation_runs"].split(",")
    assert new_eval["mlflow_run_id"] in read and old_eval["mlflow_run_id"] not in read

    # the aggregate's outputs name the new evaluation run, never the old one
    summary = pd.read_csv(study / "results" / "summary.csv", keep_default_na=False)
    assert set(summary.loc[summary["run_id"] == point, "mlflow_run_id"]) == {new_eval["mlflow_run_id"]}
    assert old_eval["mlflow_run_id"] not in set(summary["mlflow_run_id"])
    rewritten = {f for f, t in _mtimes(study).items() if mtimes.get(f) != t}
    outside = {f for f in rewritten if not f.startswith((f"results/runs/{point}/", "results/logs/"))
               and not re.match(r"results/(mlflow\.db|summary\.(csv|json)|fits\.csv|report\.html|tables/|figures/)", f)}
    assert not outside, f"files rewritten outside the point and the aggregate's outputs: {sorted(outside)}"
    assert "results/tables/task_stats.csv" not in rewritten and "results/figures/task_examples.png" not in rewritten


# ------------------------------------------- B and C: concurrent invocations (one set of runs, two promises)


ALLOWED_OUTSIDE = [  # per-user caches of the tools (not of biovfm), written by any run of them
    r"home/\.cache/snakemake/",  # Snakemake's source cache
    r"home/\.cache/matplotlib/",  # matplotlib's font list
]


@pytest.fixture(scope="module")
def at_once(small_study, tmp_path_factory) -> dict:
    """Two studies at once in two folders, with HOME and TMPDIR fresh folders: study 1 (the small study's params,
    whose lone run is the session's small study) up to one grid point's evaluation, study 2 (other data, seed,
    tasks and experiment) up to one pretraining, after a lone run of study 2 alone. While study 1 runs, a second
    `snakemake` with its targets is started in its folder. Runs once for the B and C tests below."""
    tmp = tmp_path_factory.mktemp("concurrent")
    p1 = small_study_params()
    p2 = _set(_set(_set(_set(p1, "data.synthetic.seed", 1), "grid.seeds", [1]), "tracking.experiment", "second"),
              "data.tasks", p1["data"]["tasks"][:2])
    pt1 = run_id(**next(iter(grid_points(validate_params(copy.deepcopy(p1))))))
    pt2 = run_id(**next(iter(grid_points(validate_params(copy.deepcopy(p2))))))
    t1 = f"results/runs/{pt1}/eval.json"  # download, preprocessing, one pretraining and its evaluation
    t2 = f"results/runs/{pt2}/run.json"
    lone2 = _new_study(tmp / "lone2", p2)
    _finish(_start(lone2, "--cores", "2", t2), "the lone run of study 2")

    env = _env()
    for var in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR"):
        env.pop(var, None)
    outside = tmp / "outside"
    env |= {"HOME": str(outside / "home"), "TMPDIR": str(outside / "tmp")}
    for d in ("home", "tmp"):
        (outside / d).mkdir(parents=True)
    s1, s2 = _new_study(tmp / "s1", p1), _new_study(tmp / "s2", p2)
    first = _start(s1, "--cores", "2", t1, env=env)  # each as a lone run would: --cores 2 (the corpus' 2 workers)
    other = _start(s2, "--cores", "2", t2, env=env)
    locks = s1 / ".snakemake" / "locks"
    deadline = time.time() + 120
    while not (locks.is_dir() and any(locks.iterdir())) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    running = first.poll() is None
    second = subprocess.run(SNAKEMAKE + ["--directory", str(s1), "--cores", "2", t1], capture_output=True, text=True,
                            env=env, timeout=300) if running else None
    refused_while_running = running and first.poll() is None
    _finish(first, "study 1")
    _finish(other, "study 2")
    return {"p1": p1, "p2": p2, "pt1": pt1, "pt2": pt2, "t1": t1, "s1": s1, "s2": s2, "lone2": lone2,
            "outside": outside, "second": second, "refused_while_running": refused_while_running, "locks": locks}


def test_a_second_snakemake_on_a_running_study_is_refused(at_once, small_study):
    """While one `snakemake` runs a study, a second with the same targets stops on Snakemake's lock without doing
    anything; the first finishes with the outputs of a lone run (the session's small study, same params)."""
    c = at_once
    second = c["second"]
    assert second is not None, "study 1 ended before a second snakemake could be started in it"
    out = second.stdout + second.stderr
    assert second.returncode != 0 and "Directory cannot be locked" in out, out[-3000:]
    assert "--unlock" in out  # Snakemake says how to clear a stale lock (only when no other snakemake runs)
    assert not re.search(r"^(local)?rule \w+:", out, re.M)  # it started no job
    assert c["refused_while_running"]
    assert not c["locks"].exists() or not any(c["locks"].iterdir())  # the first released its lock
    _assert_same_outputs(c["s1"], small_study, c["pt1"])
    compared = _outputs(c["s1"], c["pt1"])
    for f in ("data/processed/tasks/pathmnist_16.npz", "data/processed/corpus/index.csv", "checkpoint.safetensors",
              "history.csv", "eval.json", "scores.npz"):
        assert any(x.endswith(f) for x in compared), f
    assert "Nothing to be done" in snakemake(c["s1"], "-n", c["t1"]).stdout


def test_two_studies_at_once_in_two_folders_share_nothing(at_once, small_study):
    """Two studies with different data, seeds, tasks and experiment, run at the same time in two folders, each with
    its own MLflow store: each ends with the outputs of a lone run of it, each store holds only its own runs, and
    nothing is written outside the two folders but the tools' own per-user caches."""
    c = at_once
    s1, s2 = c["s1"], c["s2"]
    _assert_same_outputs(s1, small_study, c["pt1"])
    _assert_same_outputs(s2, c["lone2"], c["pt2"])
    assert _outputs(s2, c["pt2"]) == _outputs(c["lone2"], c["pt2"])  # no file more or less than alone
    assert (s1 / "data/raw/synthetic/corpus.npz").read_bytes() != (s2 / "data/raw/synthetic/corpus.npz").read_bytes()

    for s, p, pt, other, stages in ((s1, c["p1"], c["pt1"], s2, ["evaluate", "preprocess", "pretrain"]),
                                    (s2, c["p2"], c["pt2"], s1, ["preprocess", "pretrain"])):
        runs = mlflow_runs(s / "results" / "mlflow.db")
        assert sorted(r["stage"] for r in runs.values()) == stages
        assert {r["experiment"] for r in runs.values()} == {p["tracking"]["experiment"]}
        assert all(r["status"] == "FINISHED" for r in runs.values())
        assert json.loads((s / "results" / "runs" / pt / "run.json").read_text())["mlflow_run_id"] in runs
        assert {r["grid_id"] for r in runs.values() if r["stage"] != "preprocess"} == {pt}
        assert all(Path(r["artifacts"].removeprefix("file://")).is_relative_to(s) for r in runs.values())
        assert not set(runs) & set(mlflow_runs(other / "results" / "mlflow.db"))
        artifacts = {d.name for d in (s / "results" / "mlflow-artifacts").iterdir()}
        assert artifacts <= set(runs), f"artifacts of runs of another store in {s}"
    outside = c["outside"]
    written = sorted(str(f.relative_to(outside)) for f in outside.rglob("*") if f.is_file())
    unexpected = [f for f in written if not any(re.match(a, f) for a in ALLOWED_OUTSIDE)]
    assert not unexpected, f"files written outside the two study folders: {unexpected}"
