"""MLflow server mode, end to end, against real ``mlflow server`` processes on 127.0.0.1 (no mocks).

One small study (module-scoped, shared) runs through Snakemake while its jobs log live to a server; the other
tests reuse its server, store and corpus: the UI in headless Chromium, a brief outage, and a study run while the
server is down, replayed afterwards with ``biovfm mlflow-import``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, TINY_PARAMS

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--workflow-profile", "none"]
ARTIFACTS = REPO / "test-artifacts"
WARNING = "[tracking] WARNING"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend; stop/start keep the store and the port."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root, self.port = root, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 120) -> "Server":
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no background job workers
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--default-artifact-root", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"mlflow server not up after {timeout}s: {(self.root / 'server.log').read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)  # the server's own process group (uvicorn worker included)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)

    # -- the REST API, as a browser or another tool sees it ----------------------------------------------------
    def api(self, path: str, body: dict | None = None, **query) -> dict:
        url = f"{self.url}/api/2.0/mlflow/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"{}")

    def experiment_id(self, name: str) -> str:
        return self.api("experiments/get-by-name", experiment_name=name)["experiment"]["experiment_id"]

    def runs(self, name: str, flt: str = "") -> list[dict]:
        out, token = [], None
        while True:
            body = {"experiment_ids": [self.experiment_id(name)], "filter": flt, "max_results": 1000}
            if token:
                body["page_token"] = token
            page = self.api("runs/search", body)
            out += page.get("runs", [])
            token = page.get("next_page_token")
            if not token:
                return out

    def history(self, run_id: str, key: str) -> list[dict]:
        return self.api("metrics/get-history", run_id=run_id, metric_key=key, max_results=25000).get("metrics", [])


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def metrics(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def small_params(steps: int, log_every: int) -> dict:
    """The tiny config cut to 2 grid points (mae femto, n60 and n180), 2 tasks, raw-pixel baseline only."""
    p = yaml.safe_load(TINY_PARAMS.read_text())
    p["data"]["tasks"] = ["pathmnist", "breastmnist"]
    p["grid"] |= {"methods": ["mae"], "models": ["femto"], "data_sizes": [60, 180]}
    p["pretrain"] |= {"steps": steps, "log_every": log_every, "checkpoint_every": max(steps // 2, 1)}
    p["evaluate"] |= {"random_init": False, "raw_pixels": True}
    return p


def env_for(uri: str, retry_s: float) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, BIOVFM_MLFLOW_RETRY_S=str(retry_s))
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env


def snakemake(workdir: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(SNAKEMAKE + ["--directory", str(workdir), "--cores", "2", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def expected_runs(p: dict) -> tuple[set[str], set[str]]:
    g = p["grid"]
    pre = {f"{m}/{mo}/{mod}/n{n}/s{s}" for m in g["methods"] for mo in g["models"] for mod in g["modalities"]
           for n in g["data_sizes"] for s in g["seeds"]}
    return pre, pre | {"raw/pixels"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The small study through Snakemake with MLFLOW_TRACKING_URI=http://127.0.0.1:PORT, watched while it runs."""
    root = tmp_path_factory.mktemp("server_study")
    work = root / "work"
    work.mkdir()
    p = small_params(steps=150, log_every=2)
    (work / "params.yaml").write_text(yaml.safe_dump(p))
    server = Server(root / "server").start()
    t0 = time.monotonic()
    proc = snakemake(work, env_for(server.url, 20))
    live: list[tuple[str, int]] = []  # (run, loss points) seen while the run was RUNNING
    try:
        while proc.poll() is None:
            try:
                for r in server.runs("test", "tags.stage = 'pretrain' and attributes.status = 'RUNNING'"):
                    n = len(server.history(r["info"]["run_id"], "loss"))
                    if n and server.api("runs/get", run_id=r["info"]["run_id"])["run"]["info"]["status"] == "RUNNING":
                        live.append((r["info"]["run_id"], n))
            except (urllib.error.HTTPError, KeyError):
                pass  # the experiment does not exist yet
            time.sleep(0.3)
        log = proc.stdout.read()
        assert proc.returncode == 0, f"snakemake failed:\n{log[-6000:]}"
        yield {"work": work, "server": server, "params": p, "live": live, "seconds": time.monotonic() - t0}
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()


def test_jobs_log_live_to_a_server_and_every_grid_point_is_there(study):
    server, p, work = study["server"], study["params"], study["work"]
    print(f"small study with a live server: {study['seconds']:.0f}s")
    assert study["live"], "no RUNNING pretraining run with a loss history was seen while the study ran"
    assert len({n for _, n in study["live"]}) >= 1
    runs = server.runs("test")
    by = {(tags(r)["stage"], tags(r).get("grid_id", "")): r for r in runs}
    pre, evals = expected_runs(p)
    assert {g for s, g in by if s == "pretrain"} == pre and {g for s, g in by if s == "evaluate"} == evals
    assert len(runs) == len(pre) + len(evals) + 2  # + the corpus report and the aggregate run; no duplicates
    for r in runs:
        assert r["info"]["status"] == "FINISHED" and tags(r)["biovfm.key"]
    for g in pre:
        run = by[("pretrain", g)]
        assert len(server.history(run["info"]["run_id"], "loss")) == p["pretrain"]["steps"]
        assert {"train_flops", "wall_time_s", "final_loss"} <= set(metrics(run))
        rec = json.loads((work / "results" / "runs" / g / "mlflow.json").read_text())
        assert rec["logged_live"] and rec["mlflow_run_id"] == run["info"]["run_id"]
    for g in evals:
        run = by[("evaluate", g)]
        m = metrics(run)
        assert {"auc.pathmnist", "auc.breastmnist", "mean_auc"} <= set(m)
        span_s = (int(run["info"]["end_time"]) - int(run["info"]["start_time"])) / 1000
        assert span_s >= m["wall_time_s"] - 0.5, (g, span_s, m["wall_time_s"])  # the run spans the job's work
        inputs = run["inputs"]["dataset_inputs"]
        assert sorted(i["dataset"]["name"] for i in inputs) == ["breastmnist", "pathmnist"]
    agg = by[("aggregate", "aggregate")]
    assert metrics(agg)["n_models"] == len(evals) and any(k.startswith("mean_auc.pretrained/mae") for k in metrics(agg))
    listed = server.api("artifacts/list", run_id=agg["info"]["run_id"]).get("files", [])
    assert {"report.html", "summary.csv", "figures", "tables"} <= {f["path"] for f in listed}
    summary = pd.read_csv(work / "results" / "summary.csv")
    assert set(summary["mlflow_run_id"]) == {by[("evaluate", g)]["info"]["run_id"] for g in evals}
    # everything is already in MLflow: an import adds nothing
    before = len(runs)
    out = subprocess.run([str(BIN / "biovfm"), "mlflow-import", "--results", "results"], cwd=work, text=True,
                         capture_output=True, env=env_for(server.url, 10), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "0 run(s) created, 0 completed" in out.stdout and len(server.runs("test")) == before


@pytest.mark.browser
def test_mlflow_ui_shows_the_runs_in_a_real_browser(study, tmp_path):
    server, p = study["server"], study["params"]
    pre, evals = expected_runs(p)
    runs = server.runs("test")
    names = {r["info"]["run_name"] for r in runs}
    assert {f"pretrain {g}" for g in pre} | {f"evaluate {g}" for g in evals} <= names
    assert all(metrics(r) for r in runs)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("headless Chromium is required when CI=true (apt-get install chromium)")
        pytest.skip("no chromium on PATH")
    from PIL import Image

    exp = server.api("experiments/get", experiment_id=server.experiment_id("test"))["experiment"]
    assert {t["key"]: t["value"] for t in exp.get("tags", [])}.get("mlflow.experimentKind") == "custom_model_development"
    # What a user runs: `biovfm ui` on the study's store, then the link it prints (a second UI on the same store)
    port = free_port()
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    ui = subprocess.Popen([str(BIN / "biovfm"), "ui", "--uri", f"sqlite:///{server.root / 'mlflow.db'}",
                           "--experiment", "test", "--port", str(port)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        line = ui.stdout.readline()
        assert f"http://127.0.0.1:{port}/#/experiments/" in line, line
        page = next(w for w in line.split() if w.startswith("http://"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000", "--virtual-time-budget=20000"]
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "mlflow_ui.png"
        shot.unlink(missing_ok=True)
        # one page load: the DOM and a screenshot of the same rendered page
        dom = subprocess.run(flags + ["--dump-dom", f"--screenshot={shot}", page], capture_output=True, text=True,
                             timeout=180).stdout
        assert f"pretrain {sorted(pre)[0]}" in dom, f"the link did not open on the runs table: {dom[-2000:]}"
        assert ">aggregate<" in dom  # the run that holds the report, figures and tables
        assert "No data available" not in dom  # not the GenAI traces overview
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
    assert shot.is_file(), "chromium wrote no screenshot"
    im = Image.open(shot).convert("RGB")
    assert im.size == (1400, 1000)
    import numpy as np

    px = np.asarray(im.resize((350, 250))).reshape(-1, 3)
    colours = len(np.unique(px, axis=0))
    non_white = float((px.min(axis=1) < 235).mean())
    assert colours > 50 and non_white > 0.03, f"blank-looking page: {colours} colours, {non_white:.1%} non-white"


def test_server_down_jobs_finish_with_one_warning_then_import_replays_once(tmp_path):
    """The store is unreachable for a whole study: every job finishes on its own files with one warning; the
    aggregate step says what to do; after `biovfm mlflow-import` (twice: nothing added) it succeeds."""
    work = tmp_path / "work"
    work.mkdir()
    p = small_params(steps=12, log_every=4)
    p["grid"]["data_sizes"] = [60]  # one grid point: a pretraining job, its evaluation and the raw-pixel one
    (work / "params.yaml").write_text(yaml.safe_dump(p))
    port = free_port()
    env = env_for(f"http://127.0.0.1:{port}", 2)
    t0 = time.monotonic()
    proc = snakemake(work, env)
    log = proc.communicate(timeout=900)[0]
    print(f"small study with the server down: {time.monotonic() - t0:.0f}s")
    assert proc.returncode != 0, "the aggregate step cannot succeed before the import"
    res = work / "results"
    agg = (res / "logs" / "aggregate.log").read_text()
    assert "is unreachable" in agg and "biovfm mlflow-import" in agg, agg  # says what to do
    job_logs = sorted((res / "logs" / "pretrain").glob("*.log")) + sorted((res / "logs" / "evaluate").glob("*.log"))
    pre, evals = expected_runs(p)
    assert len(job_logs) == len(pre) + len(evals) == 3  # 1 pretraining + 2 evaluation jobs
    for f in job_logs:
        assert f.read_text().count(WARNING) == 1, f"{f}: expected exactly one tracking warning\n{f.read_text()}"
    for g in pre:
        assert (res / "runs" / g / "run.json").is_file() and (res / "runs" / g / "eval.json").is_file()
        assert json.loads((res / "runs" / g / "mlflow.json").read_text())["mlflow_run_id"] is None

    server = Server(tmp_path / "server", port).start()
    try:
        def imp() -> str:
            out = subprocess.run([str(BIN / "biovfm"), "mlflow-import", "--results", "results"], cwd=work,
                                 text=True, capture_output=True, env=env, timeout=300)
            assert out.returncode == 0, out.stdout + out.stderr
            return out.stdout

        first = imp()
        assert f"{len(pre) + len(evals)} run(s) created" in first, first
        n = len(server.runs("test"))
        assert n == len(pre) + len(evals) + 1  # + the corpus report
        second = imp()
        assert "0 run(s) created, 0 completed" in second and len(server.runs("test")) == n
        for r in server.runs("test", "tags.stage = 'pretrain'"):
            assert len(server.history(r["info"]["run_id"], "loss")) == p["pretrain"]["steps"]
            assert r["info"]["status"] == "FINISHED"
        proc = snakemake(work, env)
        log = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, log[-5000:]
        summary = pd.read_csv(work / "results" / "summary.csv")
        eval_ids = {r["info"]["run_id"] for r in server.runs("test", "tags.stage = 'evaluate'")}
        assert set(summary["mlflow_run_id"]) == eval_ids
        assert len(server.runs("test")) == n + 1  # no job run duplicated; + the aggregate run of the rerun
        assert len(server.runs("test", "tags.stage = 'aggregate'")) == 1
    finally:
        server.stop()


def test_a_brief_outage_loses_nothing(study, tmp_path):
    """The server is killed mid-training and restarted within the retry budget: no warning, every step logged."""
    from biovfm import config as cfg

    server = Server(tmp_path / "server").start()
    steps = 200  # every step logged, so the job blocks on the dead server rather than finishing without it
    params = cfg.validate_params(study["params"] | {"pretrain": study["params"]["pretrain"] | {
        "steps": steps, "log_every": 1, "checkpoint_every": 1000}})
    job = cfg.to_json(cfg.pretrain_job(params, "mae", "femto", "all", 60, 0, "test"))
    from biovfm import tracking

    env = env_for(server.url, 60)
    tracking.init_store(server.url, "test")
    out = tmp_path / "run"
    proc = subprocess.Popen([str(BIN / "biovfm"), "pretrain", "--job", job, "--corpus",
                             str(study["work"] / "data" / "processed" / "corpus"), "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            running = server.runs("test", "attributes.status = 'RUNNING'")
            if running and len(server.history(running[0]["info"]["run_id"], "loss")) >= 5:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the job ended before the outage could start; give it more steps"
        server.stop(signal.SIGKILL)  # a crash, not a clean shutdown
        time.sleep(2)
        assert proc.poll() is None
        server.start()
        log = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, log[-4000:]
        assert WARNING not in log, log[-4000:]
        (run,) = server.runs("test")
        assert run["info"]["status"] == "FINISHED"
        hist = server.history(run["info"]["run_id"], "loss")
        assert sorted({int(m["step"]) for m in hist}) == list(range(1, steps + 1))
        assert len(pd.read_csv(out / "history.csv")) == steps
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
