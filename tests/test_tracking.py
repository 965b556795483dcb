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
