"""MLflow: a local SQLite store or a shared ``mlflow server``; every run is also recorded in the job's own files.

* Local (``sqlite:///results/mlflow.db``): one store, created once before parallel jobs (the ``mlflow_init`` rule).
* Server (``http://HOST:PORT``, e.g. several jobs on several nodes): jobs log live (a pretraining job's loss curve
  appears while it runs). Every call retries for a bounded time (``BIOVFM_MLFLOW_RETRY_S`` seconds, default 15);
  MLflow's own HTTP retries are turned off so that an unreachable server fails fast into that loop. If the store
  stays unreachable, the job prints ONE warning and keeps going without MLflow: nothing is lost, because each run
  is also described by a record next to the job's outputs (``mlflow.json`` / ``<name>.mlflow.json``: experiment,
  run name, tags, params, point metrics, the file holding its metric series).
* ``biovfm mlflow-import`` (:func:`import_results`) replays those records into MLflow, creating only what is
  missing: runs are identified by a stable key tag (``biovfm.key`` = stage:grid_id:fingerprint of the job config),
  set at live-logging time too, so importing twice, or after jobs that logged live, adds nothing.

The aggregate step reads back exactly the evaluation runs that this DAG's outputs name (:func:`fetch_eval_runs`),
so stale runs of earlier params never leak into tables or figures.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

# MLflow 3 reports usage over the network from every process unless told not to; the study's only network calls are
# the download stage's (MLFLOW_DISABLE_TELEMETRY=false in the environment allows it).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

T = TypeVar("T")
MAX_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call
RETRY_ENV = "BIOVFM_MLFLOW_RETRY_S"
DEFAULT_RETRY_S = 15.0
KEY_TAG = "biovfm.key"
RECORD_NAME = "mlflow.json"  # a job's record in its run folder; next to another output: <stem>.mlflow.json
IMPORT_HINT = "biovfm mlflow-import --results results"
# The MLflow UI opens an experiment on its GenAI traces overview unless this tag marks it as model training.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# MLflow 3.17's UI picks its view (GenAI overview or the model-training runs table) from this URL parameter or the
# browser's last choice, default GenAI; the experiment tag above only filters the experiment list. So the link a
# user opens carries it.
UI_VIEW = "workflowType=machine_learning"
DATA_CONTEXT_TAG = "mlflow.data.context"  # MLflow's input tag: what the dataset was used for (training, evaluation)

# An unreachable server must fail fast into our own bounded retry loop, not into MLflow's (7 retries with
# exponential backoff and a 120 s timeout: minutes per call). Users may still override these.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

# Errors that no retry can fix (a wrong id, a bad value): reported at once.
_PERMANENT = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
              "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "NOT_FOUND"}
_SYNC: contextvars.ContextVar[bool] = contextvars.ContextVar("biovfm_tracking_sync", default=False)


class TrackingUnavailable(RuntimeError):
    """The MLflow store could not be reached (or kept failing) for the whole retry budget."""


def resolve_uri(uri: str) -> str:
    """``MLFLOW_TRACKING_URI`` overrides params (e.g. a shared server on a cluster)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or uri


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def retry_budget() -> float:
    """Seconds a tracking call keeps retrying (``BIOVFM_MLFLOW_RETRY_S``, default 15)."""
    text = os.environ.get(RETRY_ENV, "").strip()
    if not text:
        return DEFAULT_RETRY_S
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{RETRY_ENV}={text!r}: expected seconds (a number >= 0), e.g. {RETRY_ENV}=15") from None
    if not value >= 0:
        raise ValueError(f"{RETRY_ENV}={text!r}: expected seconds (a number >= 0), e.g. {RETRY_ENV}=15")
    return value


def _client(uri: str, exact: bool = False):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri if exact else resolve_uri(uri))


def _error_code(e: BaseException) -> str:
    return str(getattr(e, "error_code", "") or "")


RACE_RETRIES = 5


def _lost_insert_race(e: BaseException) -> bool:
    text = str(e)
    return "UNIQUE constraint failed" in text or "duplicate key value" in text or "Duplicate entry" in text


def _retry(fn: Callable[[], T], what: str, budget: float | None = None) -> T:
    """Call ``fn`` until it succeeds, backing off (0.5 s doubling, at most 4 s) for ``budget`` seconds in all.

    Transient failures ("database is locked", a server briefly down or restarting) are retried; permanent ones
    (a missing run, a bad value) are raised at once. A unique-constraint failure is the store's check-then-insert
    race lost to another writer (two jobs logging the same dataset at once): the transaction was rolled back and a
    retry finds the row, so it is retried a few times before it counts as permanent.
    Raises :class:`TrackingUnavailable` when the budget is spent.
    """
    budget = retry_budget() if budget is None else budget
    deadline = time.monotonic() + budget
    delay, attempts, races = 0.5, 0, 0
    while True:
        attempts += 1
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            if _lost_insert_race(e) and races < RACE_RETRIES:
                races += 1
                time.sleep(0.05 * races)
                continue
            if _error_code(e) in _PERMANENT:
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrackingUnavailable(f"MLflow: {what} failed after {attempts} attempt(s) over {budget:g} s "
                                          f"({type(e).__name__}: {str(e)[:300]})") from e
            time.sleep(min(delay, left))
            delay = min(delay * 2, 4.0)


def _get_or_create_experiment(client, experiment: str, uri: str, create: bool) -> str:
    exp = _retry(lambda: client.get_experiment_by_name(experiment), "get experiment")
    if exp is not None:
        if create and exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            _retry(lambda: client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND),
                   "tag experiment")
        return exp.experiment_id
    if not create:
        raise RuntimeError(f"MLflow experiment {experiment!r} does not exist in {uri}; run the mlflow_init rule first")
    try:
        return _retry(lambda: client.create_experiment(experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}),
                      "create experiment")
    except Exception as e:  # noqa: BLE001 - another job created it first
        if _error_code(e) != "RESOURCE_ALREADY_EXISTS":
            raise
        return _retry(lambda: client.get_experiment_by_name(experiment), "get experiment").experiment_id


def init_store(uri: str, experiment: str) -> str | None:
    """Create (or open) the store and the experiment once; returns the experiment id.

    Run serially before any training job: concurrent first creation of a SQLite store races in
    MLflow's migrations (shared/reference/environment.md section 4). A tracking server that cannot be reached
    is not fatal: a warning, and ``None`` (the jobs then keep their records locally, see the module doc).
    """
    uri = resolve_uri(uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    client = _client(uri, exact=True)
    if is_server(uri):
        try:
            return _get_or_create_experiment(client, experiment, uri, create=True)
        except TrackingUnavailable as e:
            _warn(f"MLflow server {uri} is unreachable ({e}); the jobs will keep their tracking records next to "
                  f"their outputs. Start the server and run `{IMPORT_HINT}` to replay them.")
            return None
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # a store made before the tag: open on the runs
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlflow-artifacts").resolve().as_uri()
    return client.create_experiment(experiment, artifact_location=artifacts, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def ui_url(base: str, experiment_id: str) -> str:
    """The link that opens the MLflow UI at ``base`` on the experiment's runs table (the model-training view)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?{UI_VIEW}"


def experiment_id(uri: str, experiment: str) -> str:
    """The id of an existing experiment; a clear error when the store or the experiment is not there."""
    uri = resolve_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise FileNotFoundError(f"no MLflow store at {uri[len('sqlite:///'):]}: run the study first "
                                "(snakemake --cores all), or pass --uri")
    exp = _retry(lambda: _client(uri, exact=True).get_experiment_by_name(experiment), "get experiment")
    if exp is None:
        raise RuntimeError(f"MLflow experiment {experiment!r} does not exist in {uri}; run the study first, or pass "
                           "--experiment (params.yaml: tracking.experiment)")
    return exp.experiment_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def fingerprint(config: Any) -> str:
    """Short content hash of a JSON-able config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def job_key(stage: str, grid_id: str, fp: str) -> str:
    """The stable identity of a job's run (tag ``biovfm.key``): what import and the aggregate step match on."""
    return f"{stage}:{grid_id}:{fp}"


def record_path(output: str | os.PathLike) -> Path:
    """Where a job records its run: ``<dir>/mlflow.json`` for a folder, ``<dir>/<stem>.mlflow.json`` for a file."""
    p = Path(output)
    return p / RECORD_NAME if p.is_dir() or not p.suffix else p.with_name(f"{p.stem}.{RECORD_NAME}")


def _warn(msg: str) -> None:
    print(f"[tracking] WARNING: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def replaying() -> Iterator[None]:
    """Inside this block every :class:`Run` is a replay: it reuses the run with the same key (or id) and logs only
    what that run lacks, and tracking errors are raised (an import must not pretend to succeed)."""
    token = _SYNC.set(True)
    try:
        yield
    finally:
        _SYNC.reset(token)


class Run:
    """An MLflow run that one job owns.

    Every call retries for :func:`retry_budget` seconds. If the store stays unreachable, the run goes offline:
    one warning, then every further call is a no-op, so training and evaluation go on; ``record`` (a JSON file next
    to the job's outputs, rewritten at start and at :meth:`finish`) keeps everything needed to replay the run
    later (``series`` names the CSV file that holds the metric series, e.g. ``history.csv``).
    """

    def __init__(self, uri: str, experiment: str, name: str, tags: dict[str, str], params: dict[str, Any],
                 run_id: str | None = None, *, key: str | None = None, record: str | os.PathLike | None = None,
                 series: dict[str, Any] | None = None, exact_uri: bool = False, start_time: int | None = None) -> None:
        from mlflow.entities import RunTag

        self._tag = RunTag
        self.uri = uri if exact_uri else resolve_uri(uri)
        self.client = _client(self.uri, exact=True)
        self.replay = _SYNC.get()
        self.experiment, self.name = experiment, name
        self.params = flatten(params)
        tags = {k: str(v) for k, v in tags.items()}
        self.key = key or job_key(tags.get("stage", ""), tags.get("grid_id", name), fingerprint(self.params))
        self.tags = {**tags, KEY_TAG: self.key}
        self.record = Path(record) if record else None
        self.series = series
        self.start_time = start_time or int(time.time() * 1000)
        self.points: list[dict[str, Any]] = []  # what log_metrics logged: replayed from the record
        self.inputs: list[dict[str, Any]] = []  # what log_inputs logged: replayed from the record
        self._has_inputs = False  # replay: the run already holds its dataset inputs
        self.status = "RUNNING"
        self.offline = False
        self.created = False  # a new MLflow run (replay: none matched)
        self.logged_points = 0
        self._existing: dict[str, set[int]] | None = None  # replay: steps each metric already has
        self.run_id: str | None = None
        self._guard("start run", lambda: self._start(run_id))
        self._write_record()

    # -- plumbing ------------------------------------------------------------------------------------------
    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a tracking step; on lasting failure go offline (one warning) - or raise, when replaying."""
        if self.offline:
            return None
        try:
            return fn()
        except TrackingUnavailable as e:  # an unreachable store must not kill a job; a wrong config still does
            if self.replay:
                raise
            self.offline = True
            where = self.record or "the job's output files"
            _warn(f"MLflow at {self.uri} failed ({what}: {type(e).__name__}: {str(e)[:300]}). Continuing WITHOUT "
                  f"MLflow for the rest of this job (no further warnings); its params, tags and metrics are kept in "
                  f"{where}. When the store is back, run `{IMPORT_HINT}` to replay them.")
            return None

    def _start(self, run_id: str | None) -> None:
        from mlflow.entities import Param

        c = self.client
        if self.replay:
            found = self._find(run_id)
            if found is not None:
                self.run_id = found.info.run_id
                self._attach(found)
                return
            run_id = None
        if run_id is not None:  # resuming a killed job: keep logging into its run
            self.run_id = run_id
            _retry(lambda: c.update_run(run_id, status="RUNNING"), "reopen run")
            return
        exp_id = _get_or_create_experiment(c, self.experiment, self.uri, create=is_server(self.uri) or self.replay)
        run = _retry(lambda: c.create_run(exp_id, start_time=self.start_time, run_name=self.name, tags=self.tags),
                     "create run")
        self.run_id, self.created = run.info.run_id, True
        self._existing = {}
        if not self.replay:
            self._close_killed_attempts(exp_id)
        items = [Param(k, v) for k, v in self.params.items()]
        for i in range(0, len(items), 90):
            chunk = items[i:i + 90]
            _retry(lambda: c.log_batch(self.run_id, params=chunk), "log params")

    def _close_killed_attempts(self, exp_id: str) -> None:
        """Earlier attempts of this job that a kill left RUNNING (a killed process cannot end its run) are marked
        KILLED, so that the UI shows one live run per job. Snakemake never runs one job twice at once; two studies
        with identical params logging to one server share keys, and a run marked here still ends FINISHED."""
        flt = f"tags.`{KEY_TAG}` = '{self.key}' and attributes.status = 'RUNNING'"
        for old in _retry(lambda: self.client.search_runs([exp_id], flt, max_results=50), "search killed attempts"):
            if old.info.run_id != self.run_id:
                _retry(lambda: self.client.set_terminated(old.info.run_id, status="KILLED"), "close a killed attempt")

    def _find(self, run_id: str | None):
        """Replay: the run with this id, else the newest run with this key, else None."""
        c = self.client
        if run_id:
            try:
                return _retry(lambda: c.get_run(run_id), f"get run {run_id}")
            except Exception as e:  # noqa: BLE001
                if _error_code(e) != "RESOURCE_DOES_NOT_EXIST":
                    raise
        exp = _retry(lambda: c.get_experiment_by_name(self.experiment), "get experiment")
        if exp is None:
            return None
        runs = _search_key(c, [exp.experiment_id], self.key)
        return runs[0] if runs else None

    def _attach(self, run) -> None:
        from mlflow.entities import Param

        c = self.client
        missing = [Param(k, v) for k, v in self.params.items() if k not in run.data.params]
        for i in range(0, len(missing), 90):
            chunk = missing[i:i + 90]
            _retry(lambda: c.log_batch(self.run_id, params=chunk), "log params")
        new_tags = {k: v for k, v in self.tags.items() if run.data.tags.get(k) != v}
        if new_tags:
            items = [self._tag(k, v) for k, v in new_tags.items()]
            _retry(lambda: c.log_batch(self.run_id, tags=items), "set tags")
        self.status = run.info.status
        self._has_inputs = bool(run.inputs and run.inputs.dataset_inputs)
        self._existing = {}
        for k in run.data.metrics:
            hist = _retry(lambda: c.get_metric_history(self.run_id, k), f"get history of {k}")
            self._existing[k] = {int(m.step) for m in hist}

    def _write_record(self) -> None:
        if self.record is None:
            return
        from biovfm.io import write_json

        write_json(self.record, {
            "format": 1, "uri": self.uri, "experiment": self.experiment, "run_name": self.name, "key": self.key,
            "tags": self.tags, "params": self.params, "mlflow_run_id": self.run_id, "status": self.status,
            "logged_live": not self.offline, "start_time": self.start_time,
            "end_time": getattr(self, "end_time", None), "metrics": self.points, "series": self.series,
            "inputs": self.inputs,
        })

    # -- logging -------------------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.points.append({"step": int(step), "values": {k: float(v) for k, v in metrics.items()}})
        self.log_series([(step, metrics)])

    def log_series(self, rows: Iterable[tuple[int, dict[str, float]]], timestamp: int | None = None) -> None:
        from mlflow.entities import Metric

        if self.offline:
            return
        now = timestamp or int(time.time() * 1000)
        items = []
        for step, m in rows:
            for k, v in m.items():
                v = float(v)
                if math.isnan(v) and self.replay:
                    continue  # a gap in a CSV column, not a value
                if self._existing is not None and int(step) in self._existing.get(k, ()):
                    continue  # replay: already in the run
                items.append(Metric(k, v, now, int(step)))
        for i in range(0, len(items), MAX_BATCH):
            chunk = items[i:i + MAX_BATCH]
            self._guard("log metrics", lambda: _retry(lambda: self.client.log_batch(self.run_id, metrics=chunk),
                                                      "log metrics"))
            if self.offline:
                return
            self.logged_points += len(chunk)
            if self._existing is not None:
                for m in chunk:
                    self._existing.setdefault(m.key, set()).add(m.step)

    def log_inputs(self, datasets: list[dict[str, Any]]) -> None:
        """Datasets the run read, as MLflow dataset inputs (the UI's Datasets column): each a dict of ``name``,
        ``digest``, ``source`` (a path), ``profile`` (counts) and ``context`` (training, evaluation)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        self.inputs += datasets
        if self.offline or self._has_inputs or not datasets:
            return
        items = [DatasetInput(Dataset(name=d["name"], digest=d["digest"], source_type="local",
                                      source=json.dumps({"uri": str(d["source"])}), profile=json.dumps(d["profile"])),
                              tags=[InputTag(DATA_CONTEXT_TAG, d["context"])]) for d in datasets]
        self._guard("log inputs", lambda: _retry(lambda: self.client.log_inputs(self.run_id, datasets=items),
                                                 "log inputs"))

    def log_artifacts(self, files: Iterable[tuple[str | os.PathLike, str]]) -> int:
        """Upload ``(local file, artifact folder)`` pairs into the run's artifact store; returns how many."""
        done = 0
        for path, folder in files:
            self._guard("log artifact", lambda: _retry(
                lambda: self.client.log_artifact(self.run_id, str(path), folder or None), f"log artifact {path}"))
            if self.offline:
                break
            done += 1
        return done

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})
        items = [self._tag(k, str(v)) for k, v in tags.items()]
        self._guard("set tags", lambda: _retry(lambda: self.client.log_batch(self.run_id, tags=items), "set tags"))

    def finish(self, status: str = "FINISHED", end_time: int | None = None) -> None:
        """End the run (``status`` FINISHED/FAILED/KILLED) and write the record (status included).

        The record first, the store's status last: the status is a job's last write, so a job killed before it
        leaves its run RUNNING, and the job's rerun closes it as KILLED."""
        self.end_time = end_time or int(time.time() * 1000)
        current = self.status
        self.status = status
        self._write_record()
        if not (self.replay and current == status):
            self._guard("end run", lambda: _retry(
                lambda: self.client.set_terminated(self.run_id, status=status, end_time=self.end_time), "end run"))
            if self.offline:  # the store missed the end: the record says so
                self._write_record()


def _search_key(client, experiment_ids: list[str], key: str, finished_only: bool = False) -> list:
    flt = f"tags.`{KEY_TAG}` = '{key}'"
    if finished_only:
        flt += " and attributes.status = 'FINISHED'"
    return _retry(lambda: client.search_runs(experiment_ids, flt, order_by=["attributes.start_time DESC"],
                                             max_results=50), f"search runs with {KEY_TAG}={key}")


def finished_run(uri: str, experiment: str, key: str) -> str | None:
    """The newest finished run with this key (a job already logged, e.g. the same aggregate), or None."""
    uri = resolve_uri(uri)
    client = _client(uri, exact=True)
    exp = _retry(lambda: client.get_experiment_by_name(experiment), "get experiment")
    runs = _search_key(client, [exp.experiment_id], key, finished_only=True) if exp is not None else []
    return runs[0].info.run_id if runs else None


def _as_dict(r) -> dict[str, Any]:
    return {"run_id": r.info.run_id, "status": r.info.status, "params": dict(r.data.params),
            "metrics": dict(r.data.metrics), "tags": dict(r.data.tags)}


def fetch_runs(uri: str, run_ids: Iterable[str]) -> list[dict[str, Any]]:
    """Params, metrics (latest values) and tags of exactly these runs."""
    client = _client(uri)
    return [_as_dict(_retry(lambda: client.get_run(rid), f"get run {rid}")) for rid in run_ids]


def fetch_eval_runs(uri: str, evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finished MLflow run of each evaluation record (an ``eval.json``), in order, shaped as :func:`fetch_runs`.

    A record names its run by ``mlflow_run_id`` (when the job logged live) and by ``mlflow_key`` (its stable key
    tag, which is also how replayed runs are found). A job whose run is missing or unfinished (the store was down
    while it ran) is an error that names the jobs and says how to replay them.
    """
    uri = resolve_uri(uri)
    try:
        return _fetch_eval_runs(uri, evals)
    except TrackingUnavailable as e:
        raise TrackingUnavailable(
            f"cannot read the evaluation runs: the MLflow store {uri} is unreachable ({e}). Start it (or point "
            f"MLFLOW_TRACKING_URI at the right one); if jobs ran while it was down, replay them first with "
            f"`{IMPORT_HINT}`, then rerun this step.") from e


def _fetch_eval_runs(uri: str, evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    client = _client(uri, exact=True)
    exp_ids: list[str] | None = None
    out, missing = [], []
    for e in evals:
        run = None
        rid = e.get("mlflow_run_id")
        if rid:
            try:
                run = _retry(lambda: client.get_run(rid), f"get run {rid}")
            except Exception as err:  # noqa: BLE001
                if _error_code(err) != "RESOURCE_DOES_NOT_EXIST":
                    raise
            if run is not None and run.info.status != "FINISHED":
                run = None
        if run is None and e.get("mlflow_key"):
            if exp_ids is None:
                exp_ids = [x.experiment_id for x in _retry(lambda: client.search_experiments(), "list experiments")]
            found = _search_key(client, exp_ids, e["mlflow_key"], finished_only=True) if exp_ids else []
            run = found[0] if found else None
        if run is None:
            missing.append(str(e.get("run_id", e.get("mlflow_key", "?"))))
        else:
            out.append(_as_dict(run))
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise RuntimeError(
            f"{len(missing)} evaluation job(s) have no finished run in MLflow at {uri}: {shown}. Their results are "
            f"complete in their eval.json files (the store was unreachable while they ran): replay them into MLflow "
            f"with `{IMPORT_HINT}` (same tracking URI), then rerun this step.")
    return out


# -- replay ----------------------------------------------------------------------------------------------------
def find_records(results: str | os.PathLike) -> list[Path]:
    root = Path(results)
    return sorted({*root.rglob(RECORD_NAME), *root.rglob(f"*.{RECORD_NAME}")})


def _series_rows(record_file: Path, series: dict[str, Any]) -> list[tuple[int, dict[str, float]]]:
    import pandas as pd

    path = record_file.parent / series["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{record_file}: its metric series {path} is missing; rerun the job that wrote it")
    df = pd.read_csv(path)
    step_col, skip = series.get("step", "step"), set(series.get("exclude", ())) | {series.get("step", "step")}
    cols = [c for c in df.columns if c not in skip]
    return [(int(row[step_col]), {c: float(row[c]) for c in cols}) for _, row in df.iterrows()]


def replay_record(record_file: str | os.PathLike, uri: str | None = None, experiment: str | None = None) -> Run:
    """Replay one job record into MLflow, adding only what its run lacks (see :func:`import_results`)."""
    record_file = Path(record_file)
    rec = json.loads(record_file.read_text())
    target = uri or resolve_uri(rec["uri"])
    with replaying():
        run = Run(target, experiment or rec["experiment"], rec["run_name"], rec["tags"], rec["params"],
                  run_id=rec.get("mlflow_run_id"), key=rec["key"], exact_uri=True, start_time=rec.get("start_time"))
        stamp = rec.get("end_time") or rec.get("start_time")
        if rec.get("series"):
            run.log_series(_series_rows(record_file, rec["series"]), timestamp=stamp)
        for p in rec.get("metrics", []):
            run.log_series([(p["step"], p["values"])], timestamp=stamp)
        run.log_inputs(rec.get("inputs", []))
        run.finish(rec["status"], end_time=rec.get("end_time"))
    return run


def import_results(results: str | os.PathLike, uri: str | None = None, experiment: str | None = None,
                   corpus_report: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> dict[str, int]:
    """Replay every finished job under ``results`` (and the corpus report) into MLflow; returns counts.

    Idempotent: a job's run is found by its recorded id or its key tag and only missing params, tags, metric
    points and the final status are added; a job without a run gets a new one.
    """
    counts = {"records": 0, "created": 0, "updated": 0, "unchanged": 0, "skipped": 0}
    records = find_records(results)
    for f in records:
        rec = json.loads(f.read_text())
        if rec.get("status") != "FINISHED":
            log(f"[mlflow-import] skipped {f}: the job did not finish (rerun it)")
            counts["skipped"] += 1
            continue
        counts["records"] += 1
        run = replay_record(f, uri, experiment)
        state = "created" if run.created else ("updated" if run.logged_points else "unchanged")
        counts[state] += 1
        if state != "unchanged":
            log(f"[mlflow-import] {state} {rec['run_name']} ({run.run_id}, {run.logged_points} metric points)")
    if corpus_report is not None and Path(corpus_report).is_file():
        from biovfm.data.preprocess import log_corpus_report

        report = json.loads(Path(corpus_report).read_text())
        target = uri or resolve_uri(_first(records, "uri"))
        with replaying(), _uri_env(target):
            rid = log_corpus_report(report, corpus_report, target, experiment or _first(records, "experiment"))
        if rid is None:
            raise TrackingUnavailable(f"the corpus report {corpus_report} could not be replayed (see above)")
        counts["records"] += 1
    log(f"[mlflow-import] {counts['records']} job record(s): {counts['created']} run(s) created, {counts['updated']} "
        f"completed, {counts['unchanged']} already complete, {counts['skipped']} unfinished job(s) skipped")
    return counts


def _first(records: list[Path], field: str) -> str:
    for f in records:
        return json.loads(f.read_text())[field]
    raise ValueError(f"no job records found to take the tracking {field} from; pass --uri and --experiment")


@contextlib.contextmanager
def _uri_env(uri: str) -> Iterator[None]:
    old = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
