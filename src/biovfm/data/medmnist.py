"""The 12 MedMNIST 2D tasks: metadata and the one npz reader/validator of the project.

Synthetic and real data share this layout exactly: six keys ``{train,val,test}_{images,labels}``,
uint8 images ``N x H x W`` (grayscale) or ``N x H x W x 3`` (RGB), labels ``N x L`` integers
(``L = 1`` except ChestMNIST's 14 labels).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MULTI_CLASS = "multi-class"
MULTI_LABEL = "multi-label, binary-class"
BINARY = "binary-class"
ORDINAL = "ordinal-regression"
TASK_TYPES = (MULTI_CLASS, MULTI_LABEL, BINARY, ORDINAL)

SPLITS = ("train", "val", "test")
NPZ_KEYS = tuple(f"{s}_{k}" for s in SPLITS for k in ("images", "labels"))


@dataclass(frozen=True)
class TaskInfo:
    """What the probe and the metrics need to know about one benchmark task."""

    flag: str
    task: str  # one of TASK_TYPES, MedMNIST's exact strings
    n_channels: int
    n_labels: int  # classes for multi-class/binary/ordinal, label columns for multi-label
    modality: str

    @property
    def label_columns(self) -> int:
        return self.n_labels if self.task == MULTI_LABEL else 1

    @property
    def n_outputs(self) -> int:
        """Logits of the probe head (2 for binary, as in the paper's CE head)."""
        return self.n_labels


# Task type, channels and class counts as in medmnist.INFO (see shared/reference/anchors.md section 6.2).
TASKS: dict[str, TaskInfo] = {
    t.flag: t
    for t in (
        TaskInfo("pathmnist", MULTI_CLASS, 3, 9, "histology"),
        TaskInfo("chestmnist", MULTI_LABEL, 1, 14, "xray"),
        TaskInfo("dermamnist", MULTI_CLASS, 3, 7, "dermoscopy"),
        TaskInfo("octmnist", MULTI_CLASS, 1, 4, "oct"),
        TaskInfo("pneumoniamnist", BINARY, 1, 2, "xray"),
        TaskInfo("retinamnist", ORDINAL, 3, 5, "fundus"),
        TaskInfo("breastmnist", BINARY, 1, 2, "ultrasound"),
        TaskInfo("bloodmnist", MULTI_CLASS, 3, 8, "blood"),
        TaskInfo("tissuemnist", MULTI_CLASS, 1, 8, "microscopy"),
        TaskInfo("organamnist", MULTI_CLASS, 1, 11, "ct"),
        TaskInfo("organcmnist", MULTI_CLASS, 1, 11, "ct"),
        TaskInfo("organsmnist", MULTI_CLASS, 1, 11, "ct"),
    )
}
MODALITIES = tuple(sorted({t.modality for t in TASKS.values()}))


class NpzFormatError(ValueError):
    """An npz file that does not follow the MedMNIST layout; the message names file and problem."""


def task_info(flag: str) -> TaskInfo:
    try:
        return TASKS[flag]
    except KeyError:
        raise KeyError(f"unknown task {flag!r}; known tasks: {', '.join(TASKS)}") from None


def load_npz(path: str | Path, info: TaskInfo | None = None) -> dict[str, np.ndarray]:
    """Read and validate a MedMNIST-layout npz; with ``info``, also check channels and label ranges."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (run the download/preprocess stage first)")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError on pickles, EOFError on truncation
        raise NpzFormatError(f"{path}: not a readable npz file ({type(e).__name__}: {e})") from e
    validate_arrays(data, path, info)
    return data


def validate_arrays(data: dict[str, np.ndarray], path: str | Path, info: TaskInfo | None = None) -> None:
    missing = [k for k in NPZ_KEYS if k not in data]
    extra = [k for k in data if k not in NPZ_KEYS]
    if missing or extra:
        raise NpzFormatError(f"{path}: expected keys {list(NPZ_KEYS)}; missing {missing}, unexpected {extra}")
    shape0 = None
    for split in SPLITS:
        x, y = data[f"{split}_images"], data[f"{split}_labels"]
        if x.dtype != np.uint8:
            raise NpzFormatError(f"{path}: {split}_images has dtype {x.dtype}, expected uint8")
        if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] != 3) or x.shape[1] != x.shape[2]:
            raise NpzFormatError(f"{path}: {split}_images has shape {x.shape}, expected N x H x W or N x H x W x 3")
        if shape0 is None:
            shape0 = x.shape[1:]
        elif x.shape[1:] != shape0:
            raise NpzFormatError(f"{path}: {split}_images has image shape {x.shape[1:]}, other splits {shape0}")
        if y.ndim != 2 or y.shape[0] != x.shape[0]:
            raise NpzFormatError(f"{path}: {split}_labels has shape {y.shape}, expected ({x.shape[0]}, L)")
        if not np.issubdtype(y.dtype, np.integer):
            raise NpzFormatError(f"{path}: {split}_labels has dtype {y.dtype}, expected integers")
        if x.shape[0] == 0:
            raise NpzFormatError(f"{path}: {split} split is empty")
        if info is not None:
            _check_labels(info, x, y, f"{path}: {split}")


def _check_labels(info: TaskInfo, x: np.ndarray, y: np.ndarray, where: str) -> None:
    channels = 3 if x.ndim == 4 else 1
    if channels != info.n_channels:
        raise NpzFormatError(f"{where}_images has {channels} channel(s), task {info.flag} expects {info.n_channels}")
    if y.shape[1] != info.label_columns:
        raise NpzFormatError(f"{where}_labels has {y.shape[1]} column(s), task {info.flag} expects {info.label_columns}")
    hi = 1 if info.task == MULTI_LABEL else info.n_labels - 1
    if y.min() < 0 or y.max() > hi:
        raise NpzFormatError(
            f"{where}_labels has values in [{y.min()}, {y.max()}], task {info.flag} ({info.task}) expects [0, {hi}]"
        )

