import sqlite3

import pandas as pd
import pytest

from biovfm import tracking
from biovfm.analysis.collect import summary_from_runs


def _eval_run(uri, grid_id, auc, kind="pretrained"):
    run = tracking.Run(uri, "test", name=f"evaluate {grid_id}",
                       tags={"stage": "evaluate", "grid_id": grid_id, "kind": kind, "method": "mae", "model": "femto",
                             "modality": "all", "data_size": "60", "seed": "0"},
                       params={"kind": kind, "nested": {"a": 1}})
    run.log_metrics({"auc.pathmnist": auc, "acc.pathmnist": auc / 2, "params_encoder": 123})
    run.finish()
    return run.run_id


def test_init_is_idempotent(mlflow_uri):
    assert tracking.init_store(mlflow_uri, "test") == tracking.init_store(mlflow_uri, "test")


def test_the_experiment_is_marked_as_model_training_so_the_ui_opens_on_its_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.init_store(uri, "new")
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("new").tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = client.create_experiment("old")  # a store made before the tag existed
    assert tracking.EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    tracking.init_store(uri, "old")
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


DATASETS = [{"name": "pathmnist", "digest": "abc123", "source": "data/processed/tasks/pathmnist_28.npz",
             "profile": {"train": 500, "val": 200, "test": 500}, "context": "evaluation"},
            {"name": "corpus/all", "digest": "def456", "source": "data/processed/corpus", "profile": {"images": 4500},
             "context": "training"}]


def _inputs(client, run_id: str) -> list[tuple[str, str, str, str]]:
    r = client.get_run(run_id)
    return sorted((d.dataset.name, d.dataset.digest, d.tags[0].value, d.dataset.profile) for d in r.inputs.dataset_inputs)


def test_datasets_and_artifacts_of_a_run(mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    (tmp_path / "report.html").write_text("<html>report</html>")
    run = tracking.Run(mlflow_uri, "test", name="x", tags={"grid_id": "x"}, params={}, start_time=1_000)
    run.log_inputs(DATASETS)
    assert run.log_artifacts([(tmp_path / "report.html", ""), (tmp_path / "report.html", "copies")]) == 2
    run.finish(end_time=61_000)
    client = MlflowClient(mlflow_uri)
    assert _inputs(client, run.run_id) == [("corpus/all", "def456", "training", '{"images": 4500}'),
                                           ("pathmnist", "abc123", "evaluation",
                                            '{"train": 500, "val": 200, "test": 500}')]
    info = client.get_run(run.run_id).info
    assert (info.start_time, info.end_time) == (1_000, 61_000)  # the span the job says, not when it was logged
    assert sorted(f.path for f in client.list_artifacts(run.run_id)) == ["copies", "report.html"]
    assert client.download_artifacts(run.run_id, "report.html", str(tmp_path / "dl")).endswith("report.html")


def test_aggregate_selects_exactly_the_named_runs(mlflow_uri):
    stale = _eval_run(mlflow_uri, "mae/femto/all/n60/s0", 0.51)  # an earlier run of the same grid point
    current = _eval_run(mlflow_uri, "mae/femto/all/n60/s0", 0.77)
    other = _eval_run(mlflow_uri, "mae/femto/all/n180/s0", 0.80)
    summary = summary_from_runs(tracking.fetch_runs(mlflow_uri, [current, other]))
    assert len(summary) == 2 and stale not in set(summary["mlflow_run_id"])
    assert summary.set_index("mlflow_run_id").loc[current, "auc"] == pytest.approx(0.77)
    assert summary["params_encoder"].tolist() == [123, 123]


def test_run_records_params_tags_and_series(mlflow_uri):
    run = tracking.Run(mlflow_uri, "test", name="pretrain x", tags={"grid_id": "x"}, params={"train": {"steps": 5}})
    run.log_series([(s, {"loss": 1.0 / s}) for s in range(1, 6)])
    run.finish()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    r = client.get_run(run.run_id)
    assert r.data.params["train.steps"] == "5" and r.data.tags["grid_id"] == "x" and r.info.status == "FINISHED"
    hist = client.get_metric_history(run.run_id, "loss")
    assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [1, 2, 3, 4, 5]


def test_missing_experiment_says_what_to_do(mlflow_uri):
    with pytest.raises(RuntimeError, match="run the mlflow_init rule first"):
        tracking.Run(mlflow_uri, "nope", name="x", tags={}, params={})


def test_summary_columns_are_typed(mlflow_uri):
    rid = _eval_run(mlflow_uri, "random/femto/s0", 0.6, kind="random_init")
    s = summary_from_runs(tracking.fetch_runs(mlflow_uri, [rid]))
    assert s.loc[0, "kind"] == "random_init" and isinstance(s, pd.DataFrame)
    assert s["data_size"].dtype.kind == "i" and s["auc"].dtype.kind == "f"


# -- an unreachable store: one warning, a local record, and a replay that adds nothing twice --------------------
def _dead_http_uri() -> str:
    import socket

    with socket.socket() as s:  # a free port that nothing listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_server_degrades_to_the_record_with_one_warning(tmp_path, monkeypatch, capfd):
    import json
    import time

    monkeypatch.setenv("MLFLOW_TRACKING_URI", _dead_http_uri())
    monkeypatch.setenv(tracking.RETRY_ENV, "1")
    out = tmp_path / "runs" / "x"
    out.mkdir(parents=True)
    (out / "history.csv").write_text("step,loss,images_seen\n1,2.0,8\n2,1.5,16\n3,1.25,24\n")
    t0 = time.monotonic()
    run = tracking.Run("sqlite:///unused.db", "test", name="pretrain x", tags={"stage": "pretrain", "grid_id": "x"},
                       params={"train": {"steps": 3}}, key="pretrain:x:abc", record=tracking.record_path(out),
                       series={"file": "history.csv", "step": "step", "exclude": ["images_seen"]})
    for s in (1, 2, 3):
        run.log_series([(s, {"loss": 1.0})])
    run.log_metrics({"final_loss": 1.25}, step=3)
    run.finish()
    assert time.monotonic() - t0 < 8  # one retry budget, then no more waiting
    assert capfd.readouterr().err.count("[tracking] WARNING") == 1
    rec = json.loads((out / "mlflow.json").read_text())
    assert rec["status"] == "FINISHED" and rec["mlflow_run_id"] is None and not rec["logged_live"]
    assert rec["params"] == {"train.steps": "3"} and rec["tags"][tracking.KEY_TAG] == "pretrain:x:abc"
    assert rec["metrics"] == [{"step": 3, "values": {"final_loss": 1.25}}]


def test_import_replays_records_once_and_aggregate_finds_them(tmp_path, monkeypatch):
    import json

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", _dead_http_uri())
    monkeypatch.setenv(tracking.RETRY_ENV, "0.5")
    res = tmp_path / "results"
    pre = res / "runs" / "mae" / "n60"
    pre.mkdir(parents=True)
    (pre / "history.csv").write_text("step,loss,lr,images_seen\n" + "".join(f"{s},{1 / s},0.1,{8 * s}\n" for s in range(1, 6)))
    run = tracking.Run("x", "test", name="pretrain mae/n60", tags={"stage": "pretrain", "grid_id": "mae/n60"},
                       params={"a": {"b": 1}}, key="pretrain:mae/n60:f1", record=tracking.record_path(pre),
                       series={"file": "history.csv", "step": "step", "exclude": ["images_seen"]})
    run.log_metrics({"wall_time_s": 3.0}, step=5)
    run.finish()
    ev = tracking.Run("x", "test", name="evaluate mae/n60", tags={"stage": "evaluate", "grid_id": "mae/n60",
                      "kind": "pretrained", "method": "mae", "model": "femto", "data_size": "60", "seed": "0"},
                      params={"kind": "pretrained"}, key="evaluate:mae/n60:f2", record=tracking.record_path(pre / "eval.json"))
    ev.log_metrics({"auc.pathmnist": 0.7, "acc.pathmnist": 0.6})
    ev.log_inputs(DATASETS[:1])
    ev.finish()
    eval_record = {"run_id": "mae/n60", "mlflow_run_id": ev.run_id, "mlflow_key": ev.key}
    assert (pre / "eval.mlflow.json").is_file() and ev.run_id is None

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    tracking.init_store(store, "test")
    with pytest.raises(RuntimeError, match=r"1 evaluation job\(s\).*mae/n60.*biovfm mlflow-import"):
        tracking.fetch_eval_runs(store, [eval_record])
    first = tracking.import_results(res)
    assert first["created"] == 2 and first["records"] == 2
    again = tracking.import_results(res)
    assert again["created"] == 0 and again["updated"] == 0 and again["unchanged"] == 2

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    p = next(r for r in runs if r.data.tags["stage"] == "pretrain")
    assert p.data.params == {"a.b": "1"} and p.data.metrics["wall_time_s"] == 3.0
    assert sorted(m.step for m in client.get_metric_history(p.info.run_id, "loss")) == [1, 2, 3, 4, 5]
    assert "images_seen" not in p.data.metrics and len(client.get_metric_history(p.info.run_id, "lr")) == 5
    got = tracking.fetch_eval_runs(store, [eval_record])
    assert [i[:3] for i in _inputs(client, got[0]["run_id"])] == [("pathmnist", "abc123", "evaluation")]  # once
    assert got[0]["metrics"]["auc.pathmnist"] == 0.7 and got[0]["tags"]["grid_id"] == "mae/n60"
    assert summary_from_runs(got).loc[0, "auc"] == pytest.approx(0.7)
    assert json.loads((pre / "mlflow.json").read_text())["mlflow_run_id"] is None  # outputs are never rewritten


def test_import_completes_a_run_cut_short_and_keeps_it(mlflow_uri, tmp_path):
    """A live run that lost the end of its curve (store down mid-job) is completed in place, not duplicated."""
    out = tmp_path / "job"
    out.mkdir()
    (out / "history.csv").write_text("step,loss\n" + "".join(f"{s},{1 / s}\n" for s in range(1, 9)))
    run = tracking.Run(mlflow_uri, "test", name="pretrain y", tags={"stage": "pretrain", "grid_id": "y"},
                       params={"p": 1}, record=tracking.record_path(out), series={"file": "history.csv"})
    run.log_series([(s, {"loss": 1 / s}) for s in range(1, 4)])  # then the store "went away"
    run.offline = True
    run.log_metrics({"final_loss": 0.125}, step=8)
    run.finish()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    assert client.get_run(run.run_id).info.status == "RUNNING"
    counts = tracking.import_results(tmp_path, uri=mlflow_uri)
    assert counts["updated"] == 1 and counts["created"] == 0
    assert sorted(m.step for m in client.get_metric_history(run.run_id, "loss")) == list(range(1, 9))
    assert client.get_run(run.run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("test").experiment_id])) == 1


def test_retry_budget_is_validated(monkeypatch):
    monkeypatch.setenv(tracking.RETRY_ENV, "soon")
    with pytest.raises(ValueError, match="BIOVFM_MLFLOW_RETRY_S"):
        tracking.retry_budget()


def _concurrent_job(uri: str, i: int, barrier) -> str:
    """One finishing job: opens its run, logs the shared datasets, its metrics and a series, and finishes."""
    barrier.wait()
    run = tracking.Run(uri, "test", name=f"evaluate job{i}", tags={"stage": "evaluate", "grid_id": f"job{i}"},
                       params={"i": i}, key=f"evaluate:job{i}:f0")
    run.log_inputs(DATASETS)
    run.log_metrics({"auc.pathmnist": i / 10})
    run.log_series([(s, {"loss": 1.0 / s}) for s in range(1, 21)])
    run.finish()
    return run.run_id


def test_eight_jobs_finishing_at_once_lose_and_duplicate_nothing(mlflow_uri):
    """8 processes released by one barrier all write one SQLite store: every run lands once, whole, with the shared
    dataset rows written once (two writers inserting the same dataset is a race the store loses to one of them)."""
    import multiprocessing as mp

    from mlflow.tracking import MlflowClient

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(8) as pool:
        barrier = manager.Barrier(8)
        run_ids = pool.starmap(_concurrent_job, [(mlflow_uri, i, barrier) for i in range(8)])
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("test").experiment_id
    runs = client.search_runs([exp], max_results=100)
    assert sorted(r.info.run_id for r in runs) == sorted(run_ids) and len(set(run_ids)) == 8
    for r in runs:
        i = int(r.data.tags["grid_id"][3:])
        assert r.info.status == "FINISHED" and r.data.metrics["auc.pathmnist"] == pytest.approx(i / 10)
        assert len(client.get_metric_history(r.info.run_id, "loss")) == 20
        assert len(_inputs(client, r.info.run_id)) == 2
    with sqlite3.connect(mlflow_uri.removeprefix("sqlite:///")) as db:
        assert db.execute("SELECT name, digest FROM datasets ORDER BY name").fetchall() == [
            ("corpus/all", "def456"), ("pathmnist", "abc123")]
