"""Every file under configs/ resolves to the study it describes once Snakemake lays it over params.yaml.

Snakemake merges key by key: mappings merge recursively, lists and scalars replace. A key a config file leaves out
is therefore params.yaml's, e.g. its CPU-sized `grid.extra` point, which a real study must not inherit.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config

from biovfm.config import GRID_AXES, grid_points, sub_grids, train_settings, validate_params
from conftest import REPO

CONFIGS = REPO / "configs"
# Each file with the files its header says it is laid over (after params.yaml), in --configfile order.
LAYERS = {"medmnist.yaml": ["medmnist.yaml"], "corpus.example.yaml": ["medmnist.yaml", "corpus.example.yaml"]}
# Folders and files the example corpus names: the dry run needs them to exist (they are the user's data).
EXAMPLE_DATA = ["data/raw/busi/", "data/raw/hospital/", "data/raw/pacs/", "data/raw/brain_mri/",
                "data/raw/lab/images.parquet"]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def merged(*names: str) -> dict:
    """params.yaml with --configfile NAMES laid over it, as Snakemake does: the files merge into one overwrite
    (in order), which the Snakefile's `configfile: params.yaml` then lays over params.yaml."""
    overwrite: dict = {}
    for name in names:
        update_config(overwrite, load(CONFIGS / name))
    config = load(REPO / "params.yaml")
    update_config(config, overwrite)
    return config


def own(section: str, *names: str) -> dict:
    """A section's top-level keys as the files themselves declare them (the last file that sets a key wins)."""
    out: dict = {}
    for name in names:
        out |= load(CONFIGS / name).get(section, {})
    return out


def test_every_config_file_is_checked():
    assert sorted(p.name for p in CONFIGS.iterdir()) == sorted(LAYERS)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_config_plans_exactly_its_own_grid(name):
    layers = LAYERS[name]
    p = validate_params(merged(*layers), source=" + ".join(["params.yaml", *layers]))
    grid = own("grid", *layers)
    assert set(grid) == {*GRID_AXES, "extra"} and grid["extra"] == []  # every axis spelled out, no sub-grid
    assert sub_grids(p) == [{k: grid[k] for k in GRID_AXES}]
    assert [tuple(g.values()) for g in grid_points(p)] == list(itertools.product(*(grid[k] for k in GRID_AXES)))
    models = own("models", *layers)
    for model in grid["models"]:  # the ladder entries the study trains are the files', not params.yaml's
        assert {k: p["models"][model][k] for k in models[model]} == models[model]


def test_the_real_study_and_its_corpus_example():
    p = validate_params(merged("medmnist.yaml"))
    assert {(g["method"], g["model"], g["data_size"]) for g in grid_points(p)} == {
        (m, s, n) for m in ("mae", "dino") for s in ("tiny", "small", "base") for n in (5000, 50_000, 500_000)}
    assert p["data"]["source"] == "medmnist" and p["data"]["image_size"] == 64
    assert [(s["kind"], s["on_leak"]) for s in p["corpus"]["sources"]] == [("medmnist", "drop")]
    for method in p["grid"]["methods"]:  # nothing of the CPU default's training schedule leaks in
        t = train_settings(p, method)
        assert (t.steps, t.batch_size, t.checkpoint_every) == (20000, 256, 1000), method
    q = validate_params(merged("medmnist.yaml", "corpus.example.yaml"))
    assert {(g["model"], g["modality"], g["data_size"]) for g in grid_points(q)} == {("tiny", "us", 1000),
                                                                                     ("tiny", "all", 1000)}
    on_leak = {s["name"]: s.get("on_leak", q["corpus"]["on_leak"]) for s in q["corpus"]["sources"]}
    assert on_leak == {"medmnist": "drop", "busi": "fail", "hospital": "fail", "pacs": "drop", "brain_mri": "fail",
                       "lab": "fail"}


def planned_runs(workdir: Path, *names: str) -> set[tuple]:
    """(method, model, modality, data size, seed) of every pretraining job `snakemake -n --configfile NAMES` plans."""
    from test_workflow import snakemake

    files = [str(CONFIGS / n) for n in names]
    out = snakemake(workdir, "-n", "--configfile", *files).stdout
    return {(m, s, mod, int(n), int(seed)) for m, s, mod, n, seed in
            re.findall(r"results/runs/(\w+)/(\w+)/(\w+)/n(\d+)/s(\d+)/run\.json", out)}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_snakemake_dry_run_plans_the_configs_grid(tmp_path, name):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    for entry in EXAMPLE_DATA:
        target = tmp_path / entry
        target.parent.mkdir(parents=True, exist_ok=True)
        if entry.endswith("/"):
            target.mkdir(exist_ok=True)
        else:
            target.touch()
    grid = own("grid", *LAYERS[name])
    assert planned_runs(tmp_path, *LAYERS[name]) == set(itertools.product(*(grid[k] for k in GRID_AXES)))
