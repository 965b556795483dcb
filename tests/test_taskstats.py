"""Task characteristics (biovfm.analysis.taskstats) on small npz files of known structure."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from biovfm.analysis import taskstats as ts
from biovfm.cli import main
from biovfm.data.medmnist import BINARY, MULTI_CLASS, MULTI_LABEL, TASKS, TaskInfo

SIZE = 12
SPLIT_N = {"train": 60, "val": 20, "test": 30}


def _info(flag="toy", task=MULTI_CLASS, n_labels=3, channels=1, modality="xray") -> TaskInfo:
    return TaskInfo(flag, task, channels, n_labels, modality)


def _images(labels: np.ndarray, rng, separation: float, channels: int = 1, noise: float = 30.0) -> np.ndarray:
    """Class c: a base image with a class-specific bright block (``separation`` sets its contrast) plus noise."""
    n = len(labels)
    x = np.full((n, SIZE, SIZE), 100.0) + rng.normal(0, noise, size=(n, SIZE, SIZE))
    for c in np.unique(labels):
        r = (int(c) * 4) % SIZE
        x[labels == c, r:r + 4, :] += separation
    x = np.clip(x, 0, 255).astype(np.uint8)
    return np.repeat(x[..., None], 3, axis=-1) if channels == 3 else x


def write_task(path, n_classes=3, separation=120.0, seed=0, channels=1, multilabel=0, constant=False, splits=None,
               single_class_split=None):
    rng = np.random.default_rng(seed)
    arrays = {}
    for s, n in (splits or SPLIT_N).items():
        if multilabel:
            y = (rng.random((n, multilabel)) < 0.3).astype(np.int64)
            groups = (y.max(axis=1) > 0).astype(int)
        else:
            y = (np.arange(n) % n_classes).astype(np.int64)[:, None]
            if s == single_class_split:
                y[:] = 0
            groups = y[:, 0]
        x = _images(groups, rng, separation, channels)
        if constant:
            x[:] = 77
        arrays[f"{s}_images"], arrays[f"{s}_labels"] = x, y
    np.savez(path, **arrays)
    return path


def test_separable_classes_have_lower_dbi(tmp_path):
    info = _info()
    sep = ts.task_characteristics(write_task(tmp_path / "sep_12.npz", separation=150), info)
    mixed = ts.task_characteristics(write_task(tmp_path / "mix_12.npz", separation=0), info)
    assert np.isfinite(sep["dbi"]) and np.isfinite(mixed["dbi"])
    assert sep["dbi"] < 0.5 * mixed["dbi"]


def test_counts_and_metadata(tmp_path):
    info = _info(n_labels=3, modality="ct")
    r = ts.task_characteristics(write_task(tmp_path / "toy_12.npz"), info)
    assert set(r) == set(ts.STATS_COLUMNS)
    assert r["n_samples"] == sum(SPLIT_N.values()) and r["n_train"] == SPLIT_N["train"]
    assert (r["task"], r["n_classes"], r["label_type"], r["modality"], r["image_size"]) == ("toy", 3, MULTI_CLASS,
                                                                                            "ct", SIZE)
    assert r["imbalance"] == pytest.approx(1.0)  # 60 train images over 3 classes in turn


def test_constant_images_compress_better_than_noise(tmp_path):
    info = _info()
    const = ts.task_characteristics(write_task(tmp_path / "c_12.npz", constant=True), info)
    noisy = ts.task_characteristics(write_task(tmp_path / "n_12.npz"), info)
    assert const["gzip_median"] < noisy["gzip_median"]
    assert const["pixel_entropy"] == 0.0 and noisy["pixel_entropy"] > 3.0


def test_deterministic_and_subsampled(tmp_path):
    path = write_task(tmp_path / "toy_12.npz")
    info = _info()
    a = ts.task_characteristics(path, info, max_images=40, seed=3)
    b = ts.task_characteristics(path, info, max_images=40, seed=3)
    c = ts.task_characteristics(path, info, max_images=40, seed=4)
    assert a == b
    assert a["dbi"] != c["dbi"]  # another subsample
    assert a["n_samples"] == c["n_samples"] == sum(SPLIT_N.values())  # counts never subsampled


def test_rgb_binary_and_multilabel(tmp_path):
    rgb = ts.task_characteristics(write_task(tmp_path / "rgb_12.npz", n_classes=2, channels=3),
                                  _info("rgb", BINARY, 2, channels=3))
    assert np.isfinite(rgb["dbi"]) and rgb["n_classes"] == 2
    ml = ts.task_characteristics(write_task(tmp_path / "ml_12.npz", multilabel=4), _info("ml", MULTI_LABEL, 4))
    assert ml["label_type"] == MULTI_LABEL and np.isfinite(ml["dbi"]) and ml["imbalance"] >= 1.0


def test_imbalance_ratio(tmp_path):
    path = tmp_path / "imb_12.npz"
    write_task(path)
    z = dict(np.load(path))
    z["train_labels"] = np.array([0] * 40 + [1] * 15 + [2] * 5)[:, None]
    np.savez(path, **z)
    assert ts.task_characteristics(path, _info())["imbalance"] == pytest.approx(8.0)


def test_bad_files_name_the_file(tmp_path):
    info = _info()
    missing = write_task(tmp_path / "nosplit_12.npz", splits={"train": 30, "val": 10})
    with pytest.raises(ValueError, match="nosplit_12.npz.*test_images"):
        ts.task_characteristics(missing, info)
    single = write_task(tmp_path / "single_12.npz", single_class_split="val")
    with pytest.raises(ValueError, match=r"single_12\.npz.*val split has a single class"):
        ts.task_characteristics(single, info)
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        ts.task_characteristics(tmp_path / "absent.npz", info)
    (tmp_path / "junk_12.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk_12.npz"):
        ts.task_characteristics(tmp_path / "junk_12.npz", info)


def test_compressed_npz_reads_the_same(tmp_path):
    path = write_task(tmp_path / "toy_12.npz")
    comp = tmp_path / "comp_12.npz"
    np.savez_compressed(comp, **dict(np.load(path)))
    a, b = ts.task_characteristics(path, _info()), ts.task_characteristics(comp, _info())
    assert a == b


def test_val_and_test_images_equal_to_train_images_are_counted(tmp_path, monkeypatch):
    """MedMNIST ships some val/test images that are train images too: the table says how many, per task."""
    z = dict(np.load(write_task(tmp_path / "toy_12.npz")))
    tr, va, te = z["train_images"], z["val_images"], z["test_images"]
    te[0], te[1], te[2], te[3] = tr[5], tr[5], tr[59], va[2]  # two copies of one train image; a val image
    va[0], tr[7] = tr[1], tr[8]  # a within-train copy counts for nothing here
    np.savez(tmp_path / "toy_12.npz", **z)
    np.savez_compressed(tmp_path / "comp_12.npz", **z)
    monkeypatch.setattr(ts, "HASH_CHUNK", 7)  # chunks that split the arrays anywhere
    assert ts.copies_of_train(tmp_path / "toy_12.npz") == {"val_in_train": 1, "test_in_train": 3}
    r = ts.task_characteristics(tmp_path / "comp_12.npz", _info())
    assert (r["val_in_train"], r["test_in_train"]) == (1, 3)
    assert ts.task_characteristics(write_task(tmp_path / "clean_12.npz"), _info())["test_in_train"] == 0


def test_report_shows_what_the_corpus_left_out_and_each_tasks_copies():
    from biovfm.analysis.report import LEAKED_SHOWN, _data_section

    leaked = [{"image": f"pneumoniamnist.npz:train[{i}]", "equals": f"pneumoniamnist_28.npz:test[{i}]"}
              for i in range(30)]
    mm = {"kind": "medmnist", "read": 150, "duplicates": 19, "leaked": 31, "on_leak": "drop", "kept": 100,
          "leaked_images": leaked}  # 31 left out, 30 listed
    corpus = {"n_images": 100, "image_size": 28, "on_leak": "fail", "leakage": {"val_test": 31}, "sources": {"medmnist": mm}}
    stats = pd.DataFrame({"task": ["pneumoniamnist"], "n_train": [4708], "val_in_train": [2], "test_in_train": [7]})
    html = _data_section(corpus, stats)
    assert "<code>medmnist:pneumoniamnist.npz:train[0]</code> = <code>pneumoniamnist_28.npz:test[0]</code>" in html
    assert html.count("<li><code>") == LEAKED_SHOWN and f"and {31 - LEAKED_SHOWN} more" in html
    assert "<td class=''>7</td>" in html and "<td class='l'>drop</td>" in html
    assert _data_section(None, stats.drop(columns=["val_in_train", "test_in_train"])) == ""  # older inputs: nothing


def test_table_order_and_flags(tmp_path):
    paths = {"b": write_task(tmp_path / "b_12.npz", seed=1), "a": write_task(tmp_path / "a_12.npz", seed=2)}
    infos = {"a": _info("a"), "b": _info("b")}
    t = ts.task_stats_table(paths, infos, max_images=50)
    assert list(t.columns) == ts.STATS_COLUMNS and list(t["task"]) == ["b", "a"]
    assert ts.flag_from_path("data/processed/tasks/pathmnist_224.npz") == "pathmnist"
    assert ts.flag_from_path("raw/pathmnist.npz") == "pathmnist"
    assert ts.flag_from_path("site_2.npz", {"site_2"}) == "site_2"


def test_cli_writes_csv(tmp_path):
    npz = write_task(tmp_path / "pneumoniamnist_12.npz", n_classes=2)
    custom = write_task(tmp_path / "mytask_12.npz", n_classes=3, seed=5)
    out = tmp_path / "tables" / "task_stats.csv"
    spec = json.dumps([{"flag": "mytask", "task": MULTI_CLASS, "n_channels": 1, "n_labels": 3, "modality": "ct",
                        "label_names": ["a", "b", "c"]}])
    assert main(["task-stats", "--tasks", str(npz), str(custom), "--custom-tasks", spec, "--max-images", "50",
                 "--out", str(out)]) == 0
    t = pd.read_csv(out)
    assert list(t["task"]) == ["pneumoniamnist", "mytask"]
    assert t.loc[0, "label_type"] == TASKS["pneumoniamnist"].task and t.loc[1, "n_classes"] == 3
    assert main(["task-stats", "--tasks", str(custom), "--out", str(tmp_path / "x.csv")]) == 1  # unknown flag


def _stats(n=6):
    rng = np.random.default_rng(0)
    return pd.DataFrame({"task": [f"t{i}" for i in range(n)], "n_samples": np.arange(n) * 100 + 50,
                         "dbi": rng.random(n), "n_classes": [2] * n, "gzip_median": rng.random(n),
                         "pixel_entropy": rng.random(n), "imbalance": rng.random(n) + 1,
                         "modality": ["ct", "ct", "xray", "xray", "oct", "oct"][:n],
                         "label_type": [BINARY] * n})


def test_factor_correlations():
    stats = _stats()
    slopes = pd.DataFrame({"task": list(stats["task"]) * 2, "method": ["dino"] * 6 + ["mae"] * 6,
                           "slope": list(stats["n_samples"] * 1e-5) + [0.01, 0.011, 0.03, 0.031, 0.02, 0.021]})
    slopes = pd.concat([slopes, pd.DataFrame({"task": ["mean"], "method": ["dino"], "slope": [0.5]})])
    c = ts.factor_correlations(slopes, stats)
    assert list(c.columns) == ts.CORRELATION_COLUMNS
    assert len(c) == 2 * (len(ts.NUMERIC_FACTORS) + len(ts.CATEGORICAL_FACTORS))
    row = c[(c.method == "dino") & (c.factor == "n_samples")].iloc[0]
    assert row["r"] == pytest.approx(1.0) and row["n"] == 6 and row["kind"] == "pearson"
    const = c[(c.method == "dino") & (c.factor == "n_classes")].iloc[0]
    assert np.isnan(const["r"]) and const["note"] == "constant factor"
    eta = c[(c.method == "mae") & (c.factor == "modality")].iloc[0]
    assert eta["kind"] == "eta" and 0.95 < eta["r"] <= 1.0 and eta["p"] < 0.05  # slopes grouped by modality
    y = np.array([0.01, 0.011, 0.03, 0.031, 0.02, 0.021])
    g = np.array([0, 0, 1, 1, 2, 2])
    ssb = sum((g == k).sum() * (y[g == k].mean() - y.mean()) ** 2 for k in range(3))
    assert eta["r"] == pytest.approx(np.sqrt(ssb / ((y - y.mean()) ** 2).sum()))
    assert c[(c.factor == "label_type")]["note"].eq("constant factor").all()
    few = ts.factor_correlations(slopes[slopes.task.isin(["t0", "t1"])], stats)
    assert few["r"].isna().all() and few["note"].str.startswith("fewer than 3").all()


def test_davies_bouldin_by_hand():
    z = np.array([[0.0], [2.0], [10.0], [12.0]])
    assert ts.davies_bouldin(z, np.array([0, 0, 1, 1])) == pytest.approx(0.2)  # (1 + 1) / 10
    assert np.isnan(ts.davies_bouldin(z, np.zeros(4)))
