"""The test-score file of an evaluation (``scores.npz`` next to its ``eval.json``): per task, the probe's
test probabilities and the test labels, so the aggregate stage can bootstrap the test set without torch."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from biovfm.io import write_npz


def scores_path(eval_json: str | Path) -> Path:
    return Path(eval_json).with_name("scores.npz")


def write_scores(eval_json: str | Path, per_task: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """``per_task[flag] = (test scores N x C, test labels)``, written atomically."""
    path = scores_path(eval_json)
    arrays = {}
    for flag, (scores, labels) in per_task.items():
        arrays[f"{flag}.scores"] = np.asarray(scores, dtype=np.float64)
        arrays[f"{flag}.labels"] = np.asarray(labels)
    write_npz(path, **arrays)
    return path


def read_scores(eval_json: str | Path, tasks: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    path = scores_path(eval_json)
    with np.load(path) as z:
        missing = [t for t in tasks if f"{t}.scores" not in z]
        if missing:
            raise ValueError(f"{path}: no test scores for {missing}; rerun that evaluation")
        return {t: (z[f"{t}.scores"], z[f"{t}.labels"]) for t in tasks}
