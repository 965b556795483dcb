"""The test-score file of an evaluation (``scores.npz`` next to its ``eval.json``): per task, the probe's
test probabilities and the test labels, so the aggregate stage can bootstrap the test set without torch."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from biovfm.io import write_npz


def scores_path(eval_json: str | Path) -> Path:
    return Path(eval_json).with_name("scores.npz")


def write_scores(eval_json: str | Path, per_task: dict[str, tuple[np.ndarray, np.ndarray]],
                 variants: dict[str, dict[str, np.ndarray]] | None = None) -> Path:
    """``per_task[flag] = (test scores N x C, test labels)`` of the primary estimator, and optionally
    ``variants[variant][flag]`` = test scores of every estimator (``{flag}.{variant}.scores``), written atomically."""
    path = scores_path(eval_json)
    arrays = {}
    for flag, (scores, labels) in per_task.items():
        arrays[f"{flag}.scores"] = np.asarray(scores, dtype=np.float64)
        arrays[f"{flag}.labels"] = np.asarray(labels)
    for variant, per in (variants or {}).items():
        parse_variant(variant)
        for flag, scores in per.items():
            arrays[f"{flag}.{variant}.scores"] = np.asarray(scores, dtype=np.float64)
    write_npz(path, **arrays)
    return path


def read_scores(eval_json: str | Path, tasks: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    path = scores_path(eval_json)
    with np.load(path) as z:
        missing = [t for t in tasks if f"{t}.scores" not in z]
        if missing:
            raise ValueError(f"{path}: no test scores for {missing}; rerun that evaluation")
        return {t: (z[f"{t}.scores"], z[f"{t}.labels"]) for t in tasks}


# Variants: one estimator (probe) at one label fraction. The primary variant's scores are also stored under the
# plain ``{task}.scores`` key (and its metrics as ``auc.{task}``), which is what a run of an older version has.
VARIANT_RE = re.compile(r"^(?P<probe>[a-z]+)(?:_(?P<pct>[0-9.]+)pct)?$")


def variant_name(probe: str, fraction: float = 1.0) -> str:
    """``('logreg', 0.1)`` -> 'logreg_10pct'; full labels: the probe's name alone."""
    return probe if fraction == 1 else f"{probe}_{fraction * 100:g}pct"


def parse_variant(name: str) -> tuple[str, float]:
    """Inverse of :func:`variant_name`: (probe, label fraction)."""
    m = VARIANT_RE.match(name)
    if not m:
        raise ValueError(f"not a probe variant name: {name!r} (expected e.g. 'logreg' or 'logreg_10pct')")
    return m["probe"], (float(m["pct"]) / 100 if m["pct"] else 1.0)


def read_variant_scores(eval_json: str | Path, tasks: list[str]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Test scores and labels of every variant: ``out[variant][task] = (scores, labels)``. A file of an older
    version (no variant keys) gives its one probe as variant 'paper'."""
    path = scores_path(eval_json)
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    with np.load(path) as z:
        for key in z.files:
            task, _, rest = key.partition(".")
            if task in tasks and rest.endswith(".scores") and rest != "scores":
                out.setdefault(rest[:-len(".scores")], {})[task] = (z[key], z[f"{task}.labels"])
        if not out:
            out["paper"] = read_scores(eval_json, tasks)
    return out
