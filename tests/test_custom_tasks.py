"""The user's own labelled tasks (data.custom_tasks): params, job JSON, preprocess, evaluation and figures."""
from __future__ import annotations

import struct
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from biovfm.config import ParamsError, benchmark_tasks, eval_job, eval_job_from_json, to_json, validate_params
from biovfm.data.medmnist import BINARY, MULTI_LABEL, TASKS, NpzFormatError, TaskInfo, load_npz
from biovfm.data.preprocess import preprocess_task
from biovfm.data.synthetic import generate_task
from biovfm.io import read_json, write_npz

CUSTOM = {"name": "my_xray", "path": "mine/my_xray.npz", "task": "binary-class", "labels": ["healthy", "sick"],
          "channels": 1, "modality": "xray"}


def _with_custom(raw_params: dict, *tasks: dict) -> dict:
    raw_params["data"]["custom_tasks"] = [dict(t) for t in (tasks or (CUSTOM,))]
    return raw_params


def _binary_npz(path, size: int = 20, n: tuple[int, int, int] = (60, 40, 40), seed: int = 0) -> None:
    """A small grayscale binary task with a real signal: class 1 is bright on the left, class 0 on the right.

    (A spatial pattern, not overall brightness: the paper's probe head starts with a per-sample LayerNorm.)
    """
    rng = np.random.default_rng(seed)
    left = np.arange(size) < size // 2
    data = {}
    for split, k in zip(("train", "val", "test"), n):
        y = np.arange(k) % 2
        x = rng.integers(0, 120, size=(k, size, size)) + 100 * (left[None, None, :] == y[:, None, None])
        data[f"{split}_images"], data[f"{split}_labels"] = x.astype(np.uint8), y[:, None].astype(np.int64)
    write_npz(path, **data)


def test_custom_tasks_join_the_benchmark_and_roundtrip_through_the_job_json(raw_params):
    p = validate_params(_with_custom(raw_params))
    assert benchmark_tasks(p) == tuple(p["data"]["tasks"]) + ("my_xray",)
    job = eval_job(p, "raw_pixels", "raw/pixels")
    info = TaskInfo("my_xray", BINARY, 1, 2, "xray", ("healthy", "sick"))
    assert job.custom_tasks == (info,) and job.task_infos()[-1] == info
    assert [t.flag for t in job.task_infos()] == list(benchmark_tasks(p))
    back = eval_job_from_json(to_json(job))
    assert back == job and back.task_infos()[-1].label_names == ("healthy", "sick")


def test_modality_is_optional(raw_params):
    t = {k: v for k, v in CUSTOM.items() if k != "modality"} | {"task": MULTI_LABEL, "labels": ["a", "b", "c"]}
    job = eval_job(validate_params(_with_custom(raw_params, t)), "raw_pixels", "raw/pixels")
    assert job.task_infos()[-1] == TaskInfo("my_xray", MULTI_LABEL, 1, 3, "", ("a", "b", "c"))
    assert job.task_infos()[-1].label_columns == 3


@pytest.mark.parametrize(
    "edit, needle",
    [
        (dict(name="pathmnist"), "data.custom_tasks[0] (pathmnist): name is a MedMNIST task"),
        (dict(labels=["a", "b", "c"]), "data.custom_tasks[0] (my_xray): a binary-class task has 2 labels"),
        (dict(task="regression"), "data.custom_tasks[0].task: 'regression' is not one of"),
        (dict(channels=2), "data.custom_tasks[0].channels: 2 is not one of [1, 3]"),
        (dict(name="My X-ray"), "data.custom_tasks[0].name: 'My X-ray' does not match"),
        (dict(labels=["only"]), "data.custom_tasks[0].labels: ['only'] is too short"),
    ],
)
def test_bad_custom_task_params_name_the_entry(raw_params, edit, needle):
    with pytest.raises(ParamsError) as e:
        validate_params(_with_custom(raw_params, CUSTOM | edit), source="my.yaml")
    assert "my.yaml" in str(e.value) and needle in str(e.value)


def test_duplicate_custom_names_are_refused(raw_params):
    with pytest.raises(ParamsError, match=r"data.custom_tasks\[1\] \(my_xray\): name used twice"):
        validate_params(_with_custom(raw_params, CUSTOM, CUSTOM))


@pytest.mark.parametrize(
    "corrupt, needle",
    [
        (lambda d: d.update(train_images=np.repeat(d["train_images"][..., None], 3, -1)),
         "train_images has 3 channel(s), task my_xray expects 1"),
        (lambda d: d.update(val_labels=d["val_labels"] + 1), "val_labels has values in [1, 2], task my_xray (binary-class) expects [0, 1]"),
        (lambda d: d.pop("test_labels"), "missing ['test_labels']"),
    ],
)
def test_bad_custom_file_gets_an_error_naming_file_and_problem(tmp_path, corrupt, needle):
    raw = tmp_path / "my_xray.npz"
    _binary_npz(raw)
    data = dict(np.load(raw))
    corrupt(data)
    write_npz(raw, **data)
    info = TaskInfo("my_xray", BINARY, 1, 2, "xray", ("healthy", "sick"))
    with pytest.raises(NpzFormatError) as e:
        preprocess_task(raw, tmp_path / "out.npz", info, 16)
    assert str(raw) in str(e.value) and needle in str(e.value)


def test_custom_task_is_preprocessed_probed_and_scored_like_medmnist(tmp_path, raw_params, mlflow_uri):
    from biovfm.evaluate.job import evaluate

    raw_params["data"]["tasks"] = ["breastmnist"]
    p = validate_params(_with_custom(raw_params))
    job = eval_job_from_json(to_json(eval_job(p, "raw_pixels", "raw/pixels", descriptors={"method": "raw"})))
    job = replace(job, tracking={"uri": mlflow_uri, "experiment": "test"})
    tasks = tmp_path / "tasks"
    _binary_npz(tmp_path / "my_xray.npz", size=20)
    write_npz(tmp_path / "breastmnist.npz", **generate_task("breastmnist", 60, 40, 40, size=16, seed=0))
    for info, raw in zip(job.task_infos(), (tmp_path / "breastmnist.npz", tmp_path / "my_xray.npz")):
        preprocess_task(raw, tasks / f"{info.flag}_16.npz", info, 16)
    assert load_npz(tasks / "my_xray_16.npz")["train_images"].shape[1:] == (16, 16)
    out = evaluate(job, tasks, tmp_path / "eval.json")
    assert list(out["tasks"]) == ["breastmnist", "my_xray"]
    assert out["tasks"]["my_xray"]["auc"] > 0.9  # the bright side separates the classes: the probe must find it
    assert read_json(tmp_path / "eval.json")["tasks"]["my_xray"]["acc"] > 0.8

    from biovfm.analysis.collect import summary_from_runs
    from biovfm.tracking import fetch_runs

    summary = summary_from_runs(fetch_runs(mlflow_uri, [out["mlflow_run_id"]]))
    assert set(summary["task"]) == {"breastmnist", "my_xray"}


def test_task_grid_shows_more_than_twelve_tasks(tmp_path):
    from biovfm.analysis.collect import analyse
    from biovfm.analysis.figures import plot_task_examples, plot_task_grid

    rows = []
    for t in [*TASKS, "my_xray"]:
        for model, n in (("pico", 200_000), ("nano", 600_000)):
            for kind, method, d in (("pretrained", "mae", 100), ("random_init", "random", 0)):
                rows.append(dict(run_id=f"{kind}-{model}", kind=kind, method=method, model=model, modality="all",
                                 data_size=d, seed=0, task=t, auc=0.7 + 0.01 * len(t) % 0.2, acc=0.6,
                                 params_encoder=n, params_paper=n, flops_per_image=1.0, train_flops=1.0, images_seen=1,
                                 train_steps=10, mlflow_run_id=f"{kind}-{model}"))
    t = analyse(pd.DataFrame(rows), {}, pd.DataFrame({"task": []}), {}, n_boot=20)  # no scores: no intervals
    png, _ = plot_task_grid(t["points"], t["fits"], tmp_path / "grid.png")
    height = struct.unpack(">II", png.read_bytes()[16:24])[1]
    assert height >= 4 * 3.6 * 150 - 2  # 13 panels: a fourth row of the 4-column grid

    _binary_npz(tmp_path / "my_xray_16.npz", size=16, n=(4, 4, 4))  # fewer training images than montage columns
    examples, _ = plot_task_examples([tmp_path / "my_xray_16.npz"], tmp_path / "examples.png", per_task=10)
    assert examples.stat().st_size > 1000
