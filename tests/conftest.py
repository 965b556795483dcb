"""Shared fixtures: a tiny params dict, a tiny corpus store and a per-test MLflow SQLite store."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml

from biovfm import tracking
from biovfm.config import validate_params
from biovfm.data.store import write_store

REPO = Path(__file__).resolve().parents[1]
TINY_PARAMS = REPO / "tests" / "data" / "params.tiny.yaml"


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
