"""The 12 MedMNIST 2D tasks: metadata and the one npz reader/validator of the project.

Synthetic and real data share this layout exactly: six keys ``{train,val,test}_{images,labels}``,
uint8 images ``N x H x W`` (grayscale) or ``N x H x W x 3`` (RGB), labels ``N x L`` integers
(``L = 1`` except ChestMNIST's 14 labels).

Real MedMNIST+ metadata (v3, Zenodo record 10519652): file names, MD5s per size, label names and licenses.
"""
from __future__ import annotations

import struct
import zipfile
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
    label_names: tuple[str, ...] = ()  # index -> name (classes, or label columns for multi-label)

    def __post_init__(self) -> None:
        if self.task not in TASK_TYPES:
            raise ValueError(f"task {self.flag!r}: unknown task type {self.task!r}; expected one of {TASK_TYPES}")
        if self.label_names and len(self.label_names) != self.n_labels:
            raise ValueError(f"task {self.flag!r}: {len(self.label_names)} label names for {self.n_labels} labels")

    @property
    def label_columns(self) -> int:
        return self.n_labels if self.task == MULTI_LABEL else 1

    @property
    def n_outputs(self) -> int:
        """Logits of the probe head (2 for binary, as in the paper's CE head)."""
        return self.n_labels


_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
           "lung-right", "pancreas", "spleen")
# Label names as in medmnist.INFO[flag]["label"] (index order).
LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "pathmnist": ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
                  "cancer-associated stroma", "colorectal adenocarcinoma epithelium"),
    "chestmnist": ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
                   "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"),
    "dermamnist": ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi", "vascular lesions"),
    "octmnist": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
    "pneumoniamnist": ("normal", "pneumonia"),
    "retinamnist": ("0", "1", "2", "3", "4"),
    "breastmnist": ("malignant", "normal, benign"),
    "bloodmnist": ("basophil", "eosinophil", "erythroblast",
                   "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte", "monocyte",
                   "neutrophil", "platelet"),
    "tissuemnist": ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule", "Glomerular endothelial cells",
                    "Interstitial endothelial cells", "Leukocytes", "Podocytes", "Proximal Tubule Segments",
                    "Thick Ascending Limb"),
    "organamnist": _ORGANS,
    "organcmnist": _ORGANS,
    "organsmnist": _ORGANS,
}

# Task type and channels as in medmnist.INFO (see shared/reference/anchors.md section 6.2); class counts are the
# lengths of the label lists above.
TASKS: dict[str, TaskInfo] = {
    flag: TaskInfo(flag, task, channels, len(LABEL_NAMES[flag]), modality, LABEL_NAMES[flag])
    for flag, task, channels, modality in (
        ("pathmnist", MULTI_CLASS, 3, "histology"),
        ("chestmnist", MULTI_LABEL, 1, "xray"),
        ("dermamnist", MULTI_CLASS, 3, "dermoscopy"),
        ("octmnist", MULTI_CLASS, 1, "oct"),
        ("pneumoniamnist", BINARY, 1, "xray"),
        ("retinamnist", ORDINAL, 3, "fundus"),
        ("breastmnist", BINARY, 1, "ultrasound"),
        ("bloodmnist", MULTI_CLASS, 3, "blood"),
        ("tissuemnist", MULTI_CLASS, 1, "microscopy"),
        ("organamnist", MULTI_CLASS, 1, "ct"),
        ("organcmnist", MULTI_CLASS, 1, "ct"),
        ("organsmnist", MULTI_CLASS, 1, "ct"),
    )
}
MODALITIES = tuple(sorted({t.modality for t in TASKS.values()}))

# ------------------------------------------------------------------ MedMNIST+ files (Zenodo record 10519652, v3)
ZENODO_FILES = "https://zenodo.org/records/10519652/files"  # "the only official distribution link"
SIZES = (28, 64, 128, 224)
LICENSES = {flag: "CC BY-NC 4.0" if flag == "dermamnist" else "CC BY 4.0" for flag in TASKS}
# Published MD5 of <flag>.npz (28 px) and <flag>_<size>.npz, from medmnist.INFO (anchors.md section 6.3).
MD5: dict[str, dict[int, str]] = {
    "pathmnist": {28: "a8b06965200029087d5bd730944a56c1", 64: "55aa9c1e0525abe5a6b9d8343a507616",
                  128: "ac42d08fb904d92c244187169d1fd1d9", 224: "2c51a510bcdc9cf8ddb2af93af1eadec"},
    "chestmnist": {28: "02c8a6516a18b556561a56cbdd36c4a8", 64: "9de6cd0b934ebb5b7426cfba5efbae16",
                   128: "db107e5590b27930b62dbaf558aebee3", 224: "45bd33e6f06c3e8cdb481c74a89152aa"},
    "dermamnist": {28: "0744692d530f8e62ec473284d019b0c7", 64: "b70a2f5635c6199aeaa28c31d7202e1f",
                   128: "2defd784463fa5243564e855ed717de1", 224: "8974907d8e169bef5f5b96bc506ae45d"},
    "octmnist": {28: "c68d92d5b585d8d81f7112f81e2d0842", 64: "e229e9440236b774d9f0dfef9d07bdaf",
                 128: "0a97e76651ace45c5d943ee3f65b63ae", 224: "abc493b6d529d5de7569faaef2773ba3"},
    "pneumoniamnist": {28: "28209eda62fecd6e6a2d98b1501bb15f", 64: "8f4eceb4ccffa70c672198ea285246c6",
                       128: "05b46931834c231683c68f40c47b2971", 224: "d6a3c71de1b945ea11211b03746c1fe1"},
    "retinamnist": {28: "bd4c0672f1bba3e3a89f0e4e876791e4", 64: "afda852cc34dcda56f86ad2b2457dbcc",
                    128: "e48e916a24454daf90583d4e6efb1a18", 224: "eae7e3b6f3fcbda4ae613ebdcbe35348"},
    "breastmnist": {28: "750601b1f35ba3300ea97c75c52ff8f6", 64: "742edef2a1fd1524b2efff4bd7ba9364",
                    128: "363e4b3f8d712e9b5de15470a2aaadf1", 224: "b56378a6eefa9fed602bb16d192d4c8b"},
    "bloodmnist": {28: "7053d0359d879ad8a5505303e11de1dc", 64: "2b94928a2ae4916078ca51e05b6b800b",
                   128: "adace1e0ed228fccda1f39692059dd4c", 224: "b718ff6835fcbdb22ba9eacccd7b2601"},
    "tissuemnist": {28: "ebe78ee8b05294063de985d821c1c34b", 64: "123ece2eba09d0aa5d698fda57103344",
                    128: "61b955355d7425a89687b06cca3ce0c2", 224: "b077128c4a949f0a4eb01517f9037b9c"},
    "organamnist": {28: "68e3f8846a6bd62f0c9bf841c0d9eacc", 64: "2dcccc29b88e6da5a01161ef20cda288",
                    128: "eeae80d0a227a8d099027e1b3cfd3b60", 224: "50747347e05c87dd3aaf92c49f9f3170"},
    "organcmnist": {28: "b9ceb9546e10131b32923c5bbeaea2b1", 64: "3ce34a8724ea6f548e6db4744d03b6a9",
                    128: "773c1f009daa3fe5d9a2a201b2a7ed94", 224: "050f5e875dc056f6768abf94ec9995d1"},
    "organsmnist": {28: "9ab87b696fb54e2a387ebe992d6ed5f1", 64: "53a6d115339d874c25e309a994ff46d3",
                    128: "ded0c5fa01a95dc4978b956f613e9b8e", 224: "b354719e553fbbb2513d5533f52a4cb1"},
}


def size_suffix(size: int) -> str:
    """``""`` at 28 px, ``"_<size>"`` otherwise: the MedMNIST+ file-name convention."""
    if size not in SIZES:
        raise ValueError(f"MedMNIST+ has no {size}px files; sizes are {', '.join(map(str, SIZES))}")
    return "" if size == 28 else f"_{size}"


def npz_name(flag: str, size: int) -> str:
    """Published file name: ``<flag>.npz`` at 28 px, ``<flag>_<size>.npz`` otherwise."""
    task_info(flag)
    return f"{flag}{size_suffix(size)}.npz"


def published_md5(flag: str, size: int) -> str:
    """The MD5 of the official file, for :func:`npz_name` (``flag``, ``size``)."""
    npz_name(flag, size)
    return MD5[flag][size]


class NpzFormatError(ValueError):
    """An npz file that does not follow the MedMNIST layout; the message names file and problem."""


def task_info(flag: str) -> TaskInfo:
    try:
        return TASKS[flag]
    except KeyError:
        raise KeyError(f"unknown task {flag!r}; known tasks: {', '.join(TASKS)}") from None


def task_info_from_dict(d: dict) -> TaskInfo:
    """A TaskInfo back from its ``asdict`` form (JSON gives lists; the dataclass holds tuples)."""
    return TaskInfo(**{**d, "label_names": tuple(d.get("label_names", ()))})


def load_npz(path: str | Path, info: TaskInfo | None = None, mmap: bool = False) -> dict[str, np.ndarray]:
    """Read and validate a MedMNIST-layout npz; with ``info``, also check channels and label ranges.

    ``mmap``: uncompressed members (MedMNIST's files are) become read-only memory maps, so a reader that
    needs a sample of a 224-px task does not hold all of it in memory; labels are always read whole."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (run the download/preprocess stage first)")
    if mmap:
        data = _read_npz_mmap(path)
        data.update({k: np.array(v) for k, v in data.items() if k.endswith("_labels")})
    else:
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: _read_member(z, k, path) for k in z.files}
        except NpzFormatError:
            raise
        except Exception as e:  # zipfile.BadZipFile, EOFError on truncation, ...
            raise NpzFormatError(f"{path}: not a readable npz file ({type(e).__name__}: {e})") from e
    validate_arrays(data, path, info)
    return data


def _read_member(z, key: str, path: Path) -> np.ndarray:
    try:
        return z[key]
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise pickled_array_error(path, key) from None
        raise


def pickled_array_error(path: str | Path, key: str) -> NpzFormatError:
    """The refusal of an npz member that holds Python objects: reading it would unpickle, which can run code."""
    return NpzFormatError(f"{path}: {key} holds Python objects (a pickled object array); refused, as unpickling can "
                          "run code. Save plain arrays: uint8 images and integer labels (np.savez, no dtype=object)")


DIGEST_SAMPLE = 256  # images per split hashed for a task's digest


def task_digest(data: dict[str, np.ndarray], sample: int = DIGEST_SAMPLE) -> str:
    """A content fingerprint of a task: every label, every array's shape and dtype, and ``sample`` evenly spaced
    images per split (MLflow's own dataset digests also hash a sample), so it stays cheap on a memory-mapped task
    of 10^5 224-px images and changes whenever the labels, the sizes or the sampled images do."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(data):
        a = data[key]
        h.update(f"{key}:{a.shape}:{a.dtype};".encode())
        rows = a if key.endswith("_labels") else a[np.unique(np.linspace(0, len(a) - 1, min(len(a), sample)).astype(int))]
        h.update(np.ascontiguousarray(rows).tobytes())
    return h.hexdigest()[:12]


def _read_npz_mmap(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an npz; uncompressed members as read-only memory maps, compressed ones read whole."""
    data: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            for zi in zf.infolist():
                key = zi.filename[:-4] if zi.filename.endswith(".npy") else zi.filename
                if zi.compress_type != zipfile.ZIP_STORED:
                    with zf.open(zi) as f:
                        try:
                            data[key] = np.lib.format.read_array(f, allow_pickle=False)
                        except ValueError as e:
                            if "allow_pickle" in str(e):
                                raise pickled_array_error(path, key) from None
                            raise
                    continue
                raw.seek(zi.header_offset)
                header = raw.read(30)
                if header[:4] != b"PK\x03\x04":
                    raise ValueError(f"bad local header for member {zi.filename}")
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                raw.seek(zi.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(raw)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(raw)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(raw)
                if dtype.hasobject:
                    raise pickled_array_error(path, key)
                offset = raw.tell()
                if int(np.prod(shape)) == 0:
                    data[key] = np.empty(shape, dtype=dtype)
                else:
                    data[key] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                                          order="F" if fortran else "C")
    except NpzFormatError:
        raise
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, struct.error) as e:
        raise NpzFormatError(f"{path}: not a readable npz file ({type(e).__name__}: {e})") from e
    return data


def validate_arrays(data: dict[str, np.ndarray], path: str | Path, info: TaskInfo | None = None) -> None:
    """Check the MedMNIST layout; the message names the file, the array and what to change.

    Harmless variants of the layout are accepted and normalised in ``data`` (in place), so every reader sees the
    one layout: labels stored as ``(N,)`` (some public copies of MedMNIST) become ``(N, 1)``; boolean labels and
    float labels holding whole numbers become int64; grayscale images stored as ``N x H x W x 1`` become
    ``N x H x W``."""
    missing = [k for k in NPZ_KEYS if k not in data]
    extra = [k for k in data if k not in NPZ_KEYS]
    if missing or extra:
        raise NpzFormatError(f"{path}: expected keys {list(NPZ_KEYS)}; missing {missing}, unexpected {extra}")
    shape0 = None
    for split in SPLITS:
        x, y = data[f"{split}_images"], data[f"{split}_labels"]
        if x.dtype != np.uint8:
            hint = (" (images scaled to [0, 1]: (x * 255).round().astype(np.uint8))"
                    if np.issubdtype(x.dtype, np.floating) else " (map the intensities to 0..255 first)")
            raise NpzFormatError(f"{path}: {split}_images has dtype {x.dtype}, expected uint8; convert the images to "
                                 f"uint8{hint}")
        if x.ndim == 4 and x.shape[-1] == 1:  # grayscale with a channel axis: the same images
            data[f"{split}_images"] = x = x[..., 0]
        if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] != 3):
            raise NpzFormatError(f"{path}: {split}_images has shape {x.shape}, expected N x H x W (grayscale) or "
                                 "N x H x W x 3 (RGB)")
        if x.shape[1] != x.shape[2]:
            raise NpzFormatError(f"{path}: {split}_images has shape {x.shape}: the images are {x.shape[1]} x "
                                 f"{x.shape[2]} pixels, expected square ones (H = W); crop or pad them to a square")
        if shape0 is None:
            shape0 = x.shape[1:]
        elif x.shape[1:] != shape0:
            raise NpzFormatError(f"{path}: {split}_images has image shape {x.shape[1:]}, other splits {shape0}")
        if y.ndim == 1 and y.shape[0] == x.shape[0]:  # one label per image, without the column axis
            data[f"{split}_labels"] = y = y.reshape(-1, 1)
        if y.ndim != 2 or y.shape[0] != x.shape[0]:
            raise NpzFormatError(f"{path}: {split}_labels has shape {y.shape}, expected ({x.shape[0]}, L): one row "
                                 f"per image of {split}_images")
        if y.dtype == np.bool_ or (np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y))
                                   and np.array_equal(y, np.round(y))):
            data[f"{split}_labels"] = y = y.astype(np.int64)  # 0/1 flags, or whole numbers stored as floats
        if not np.issubdtype(y.dtype, np.integer):
            raise NpzFormatError(f"{path}: {split}_labels has dtype {y.dtype} with values that are not whole numbers, "
                                 "expected integers: class indices 0..K-1 (multi-label: 0/1 per column)")
        if x.shape[0] == 0:
            raise NpzFormatError(f"{path}: {split} split is empty (0 images); every split (train, val, test) needs "
                                 "images")
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

