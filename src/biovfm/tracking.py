"""MLflow: one local SQLite store (created once, before parallel jobs), runs tagged by grid point.

Jobs log to the store directly with retries (SQLite allows one writer at a time); the aggregate step
reads back exactly the runs whose ids the current DAG's outputs name, so stale runs of earlier params
never leak into tables or figures.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

T = TypeVar("T")
MAX_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call


def resolve_uri(uri: str) -> str:
    """``MLFLOW_TRACKING_URI`` overrides params (e.g. a shared server on a cluster)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or uri


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=resolve_uri(uri))


def _retry(fn: Callable[[], T], what: str, attempts: int = 6, delay: float = 0.5) -> T:
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # "database is locked", a server briefly down
            if i == attempts - 1:
                raise RuntimeError(f"MLflow: {what} failed after {attempts} attempts: {e}") from e
            time.sleep(delay * 2**i)
    raise AssertionError("unreachable")


def init_store(uri: str, experiment: str) -> str:
    """Create (or open) the store and the experiment once; returns the experiment id.

    Run serially before any training job: concurrent first creation of a SQLite store races in
    MLflow's migrations (shared/reference/environment.md section 4).
    """
    uri = resolve_uri(uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlflow-artifacts").resolve().as_uri()
    return client.create_experiment(experiment, artifact_location=artifacts)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


class Run:
    """An MLflow run that one job owns; every call retries, so a locked SQLite store does not kill a job."""

    def __init__(self, uri: str, experiment: str, name: str, tags: dict[str, str], params: dict[str, Any],
                 run_id: str | None = None) -> None:
        from mlflow.entities import Param, RunTag

        self.client = _client(uri)
        if run_id is None:
            exp = _retry(lambda: self.client.get_experiment_by_name(experiment), "get experiment")
            if exp is None:
                raise RuntimeError(f"MLflow experiment {experiment!r} does not exist in {resolve_uri(uri)}; run the mlflow_init rule first")
            run = _retry(lambda: self.client.create_run(exp.experiment_id, run_name=name, tags=tags), "create run")
            self.run_id = run.info.run_id
            items = [Param(k, v) for k, v in flatten(params).items()]
            for i in range(0, len(items), 90):
                chunk = items[i:i + 90]
                _retry(lambda: self.client.log_batch(self.run_id, params=chunk), "log params")
        else:  # resuming a killed job: keep logging into its run
            self.run_id = run_id
            _retry(lambda: self.client.update_run(run_id, status="RUNNING"), "reopen run")
        self._tag = RunTag

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.log_series([(step, metrics)])

    def log_series(self, rows: Iterable[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for step, m in rows for k, v in m.items()]
        for i in range(0, len(items), MAX_BATCH):
            chunk = items[i:i + MAX_BATCH]
            _retry(lambda: self.client.log_batch(self.run_id, metrics=chunk), "log metrics")

    def set_tags(self, tags: dict[str, str]) -> None:
        items = [self._tag(k, str(v)) for k, v in tags.items()]
        _retry(lambda: self.client.log_batch(self.run_id, tags=items), "set tags")

    def finish(self, status: str = "FINISHED") -> None:
        _retry(lambda: self.client.set_terminated(self.run_id, status=status), "end run")


def fetch_runs(uri: str, run_ids: Iterable[str]) -> list[dict[str, Any]]:
    """Params, metrics (latest values) and tags of exactly these runs."""
    client = _client(uri)
    out = []
    for rid in run_ids:
        r = _retry(lambda: client.get_run(rid), f"get run {rid}")
        out.append({"run_id": rid, "status": r.info.status, "params": dict(r.data.params),
                    "metrics": dict(r.data.metrics), "tags": dict(r.data.tags)})
    return out
