"""Shared fixtures: a tiny params dict, a tiny corpus store, a per-test MLflow SQLite store, and the small study run
once per session through Snakemake (``small_study``; tests copy it with :func:`copy_study`)."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from biovfm import tracking
from biovfm.config import validate_params
from biovfm.data.store import write_store

REPO = Path(__file__).resolve().parents[1]
TINY_PARAMS = REPO / "tests" / "data" / "params.tiny.yaml"
# The small study of the end-to-end tests: the tiny config's whole grid (2 methods x 2 models x 2 data sizes, the
# baselines) on one task of each kind (multi-class, multi-label, binary, ordinal) instead of all 12.
SMALL_STUDY_TASKS = ["pathmnist", "chestmnist", "breastmnist", "retinamnist"]


@pytest.fixture
def params() -> dict:
    return validate_params(yaml.safe_load(TINY_PARAMS.read_text()), source=str(TINY_PARAMS))


@pytest.fixture
def raw_params() -> dict:
    return copy.deepcopy(yaml.safe_load(TINY_PARAMS.read_text()))


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    n = 96
    images = rng.integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)
    images[:, :8] //= 2  # some structure for MAE to learn
    mods = np.array(["xray", "histology", "ct"] * (n // 3))
    out = tmp_path / "corpus"
    write_store(out, images, np.full(n, "test"), mods)
    return out


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.init_store(uri, "test")
    return uri


def small_study_params() -> dict:
    p = yaml.safe_load(TINY_PARAMS.read_text())
    p["data"]["tasks"] = list(SMALL_STUDY_TASKS)
    return p


def copy_study(study: Path, dest: Path) -> Path:
    """A copy of a finished study that Snakemake also sees as finished: params.yaml, data/, results/ and .snakemake/
    (the jobs' provenance records), with every modification time kept. MLflow's artifact folder is named by absolute
    path in the store, so runs logged in the copy keep their artifacts under the original's results/mlflow-artifacts."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(study / "params.yaml", dest / "params.yaml")
    for d in ("data", "results", ".snakemake"):
        shutil.copytree(study / d, dest / d, symlinks=True, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("locks", "log") if d == ".snakemake" else None)
    return dest


# Fields that measure the run (time, speed, memory, process) or name an MLflow run: equal only by accident.
VOLATILE = {"seconds", "images_per_second", "peak_rss_mb", "peak_gpu_mb", "process", "mlflow_run_id",
            "pretrain_mlflow_run_id", "start_time", "end_time"}


def volatile(key: str) -> bool:
    return key in VOLATILE or key.endswith("_s")  # wall_time_s, feature_s, probe_s, images_per_s, ...


def without_volatile(x):
    if isinstance(x, dict):
        return {k: without_volatile(v) for k, v in x.items() if not volatile(k)}
    if isinstance(x, list):
        return [without_volatile(v) for v in x]
    return x


def same_output(a: Path, b: Path) -> str | None:
    """None if the output ``a`` equals the reference ``b``, else why not: bitwise, except the run-measuring fields of
    JSON and CSV files (:func:`volatile`: times, speeds, memory, MLflow run ids) and PNG figures, compared by their
    pixels. The HTML report and the SVG figures are compared bitwise (they are deterministic)."""
    if b.is_dir():
        names = sorted(p.name for p in a.iterdir() if p.name != ".snakemake_timestamp")
        ref = sorted(p.name for p in b.iterdir() if p.name != ".snakemake_timestamp")
        if names != ref:
            return f"{a}: holds {names}, expected {ref}"
        return next(filter(None, (same_output(a / n, b / n) for n in names)), None)
    if a.read_bytes() == b.read_bytes():
        return None
    if a.suffix == ".json":
        x, y = without_volatile(json.loads(a.read_text())), without_volatile(json.loads(b.read_text()))
        if x != y:
            keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k)) if isinstance(x, dict) else []
            return f"{a} differs from the uninterrupted run's {b} in {keys}: {[x.get(k) for k in keys]} vs " \
                   f"{[y.get(k) for k in keys]}"
        ok = True
    elif a.suffix == ".csv":
        x, y = pd.read_csv(a), pd.read_csv(b)
        drop = [c for c in y.columns if volatile(c)]
        ok = x.drop(columns=drop, errors="ignore").equals(y.drop(columns=drop, errors="ignore"))
    elif a.suffix == ".png":
        from PIL import Image

        ok = np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    else:
        ok = a.read_bytes() == b.read_bytes()
    return None if ok else f"{a} differs from the uninterrupted run's {b}"


def mlflow_runs(db: Path) -> dict[str, dict]:
    """Every run of a SQLite MLflow store: {run id: status, times, key, stage, metrics, params, tags, experiment}."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exps = {e.experiment_id: e for e in client.search_experiments()}
    runs = client.search_runs(list(exps), max_results=10_000)
    return {r.info.run_id: {"status": r.info.status, "start": r.info.start_time, "end": r.info.end_time,
                            "key": r.data.tags.get(tracking.KEY_TAG, ""), "stage": r.data.tags.get("stage"),
                            "grid_id": r.data.tags.get("grid_id"), "metrics": r.data.metrics,
                            "params": r.data.params, "tags": r.data.tags,
                            "experiment": exps[r.info.experiment_id].name,
                            "artifacts": exps[r.info.experiment_id].artifact_location} for r in runs}


def fault_env(spec: dict) -> dict[str, str]:
    """Environment variables that load the fault injector of tests/faults into the ``biovfm`` jobs."""
    path = os.pathsep.join(filter(None, [str(REPO / "tests" / "faults"), os.environ.get("PYTHONPATH", "")]))
    return {"PYTHONPATH": path, "BIOVFM_FAULT": json.dumps(spec)}


def study_points(study: Path) -> Path:
    """Where the small study's jobs recorded their I/O points (next to the study, not in it)."""
    return study.parent / f"{study.name}-points"


SESSION_FIXTURE_SECONDS: dict[str, float] = {}  # this process's session fixtures, set up by the first test using them
FIXTURE_SECONDS_SEEN: dict[str, float] = {}  # every worker's, as their reports arrive (pytest_runtest_logreport)


@pytest.fixture(scope="session")
def small_study(tmp_path_factory) -> Path:
    """The small study (:func:`small_study_params`) trained, evaluated and aggregated once through the real Snakemake
    DAG, for the end-to-end tests that check a finished study (tests/test_workflow.py, tests/test_dvc_remote.py).
    Read-only: copy it with :func:`copy_study` before running anything in it."""
    work = tmp_path_factory.mktemp("small_study")
    (work / "params.yaml").write_text(yaml.safe_dump(small_study_params(), sort_keys=False))
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the `biovfm` entry point of this venv
    # The jobs' I/O points, recorded (not altered) by tests/faults/sitecustomize.py: where tests/test_kills.py kills
    study_points(work).mkdir()
    env.update(fault_env({"command": "*", "record": str(study_points(work))}))
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--workflow-profile", "none",
           "--directory", str(work), "--cores", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"the small study failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    SESSION_FIXTURE_SECONDS["small_study"] = time.perf_counter() - t0
    (work / "snakemake.log").write_text(proc.stdout + proc.stderr)
    return work


# Parallel runs (pytest-xdist, `-n auto` in pyproject.toml): tests that share a costly fixture run in one worker,
# so that it is built once. The small study's tests form one group; a module with a module-scoped fixture (a SLURM
# cluster, a tracking server, ...) is its own group; any other test goes wherever a worker is free. Groups are handed
# out longest first (the order below), so that no long group starts last. The workers find each test's group from
# its fixtures and write it to a file (GROUPS_ENV) that the scheduler in the controller reads: xdist's own
# `--dist loadgroup` marks tests by editing their node ids, which pytest 9.2 no longer allows.
GROUP_ORDER = ["small_study", "test_slurm", "test_tracking_server"]
GROUPS_ENV = "BIOVFM_TEST_GROUPS"


def shared_group(item: pytest.Item) -> str | None:
    """The group of tests that share a costly fixture with this one, if any."""
    if "small_study" in item.fixturenames:
        return "small_study"
    module = getattr(item.module, "__name__", None)
    shared = any(d.scope != "function" and d.func.__module__ == module  # a fixture of its own module
                 for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs)
    return module if shared else None


def pytest_configure(config) -> None:
    if not hasattr(config, "workerinput") and config.getoption("numprocesses", None):  # the controller of a -n run
        import tempfile

        os.environ[GROUPS_ENV] = os.path.join(tempfile.mkdtemp(prefix="biovfm-test-groups-"), "groups.json")


def pytest_collection_modifyitems(config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # not an xdist worker (`-n 0`): the files' order, unchanged
        return
    groups = {item.nodeid: shared_group(item) for item in items}
    rank = {name: i for i, name in enumerate(GROUP_ORDER)}
    items.sort(key=lambda item: rank.get(groups[item.nodeid] or "", len(rank)))  # stable: the files' order within
    from biovfm.io import write_json

    write_json(os.environ[GROUPS_ENV], groups)  # atomic; every worker writes the same


def pytest_xdist_make_scheduler(config, log):
    """Whole groups to one worker (the tests with no group one by one), in the collection's order."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        groups: dict[str, str | None] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # read once all workers have collected, which scheduling waits for
                self.groups = json.loads(Path(os.environ[GROUPS_ENV]).read_text())
            return self.groups.get(nodeid) or nodeid

    config.option.loadscopereorder = False  # keep GROUP_ORDER's order, not the largest group first
    return GroupScheduling(config, log)


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per CPU this process may use (not per physical core: 2 vCPUs are 1 core to psutil)."""
    return max(1, len(os.sched_getaffinity(0)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Carry this process's session-fixture times on the setup report, so the summary has them under xdist too."""
    report = yield
    if call.when == "setup" and SESSION_FIXTURE_SECONDS:
        report.user_properties.append(("session_fixture_seconds", dict(SESSION_FIXTURE_SECONDS)))
        SESSION_FIXTURE_SECONDS.clear()
    return report


def pytest_runtest_logreport(report) -> None:
    for key, value in report.user_properties:
        if key == "session_fixture_seconds":
            FIXTURE_SECONDS_SEEN.update(value)


@pytest.hookimpl(trylast=True)  # after the slowest-durations list
def pytest_terminal_summary(terminalreporter) -> None:
    """A session fixture runs in the setup of the first test that uses it: say how much of that setup it was."""
    for name, seconds in FIXTURE_SECONDS_SEEN.items():
        terminalreporter.write_line(f"{seconds:.2f}s session fixture {name} (part of the setup time above of the "
                                    "first test that uses it)")


def pytest_unconfigure(config) -> None:
    if not hasattr(config, "workerinput") and GROUPS_ENV in os.environ:  # the controller: its groups file
        shutil.rmtree(Path(os.environ.pop(GROUPS_ENV)).parent, ignore_errors=True)
