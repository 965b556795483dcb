"""Model-independent task characteristics, for the paper's Figure F (per-task slope vs task factors).

The paper (``shared/reference/paper.md`` section 4.5) correlates the per-task scaling slope with
``num_samples``, ``dbi``, ``num_classes`` and ``gzip_median`` (plus an unplotted ``entropy``) of
each task; the values and how they were computed were not released. The definitions here are
this project's, fixed and documented so that they are reproducible:

* ``n_samples``: train + val + test images (the paper's definition, verified in section 4.5).
* ``dbi``: Davies-Bouldin index of the class clusters in a fixed pixel feature space that does not
  depend on any model: images to grayscale (ITU-R 601 luma for RGB), area-resized to 16 x 16,
  flattened, standardised per feature, PCA to 32 dimensions (exact eigendecomposition), all fitted on a seeded
  subsample of at most ``max_images`` images pooled over the three splits. Clusters are the class
  label for binary, multi-class and ordinal tasks; for multi-label tasks they are "no positive
  label" vs "any positive label" (for ChestMNIST: no finding vs some finding). Higher DBI = less
  separable classes. NaN when the subsample holds a single cluster or identical images.
* ``gzip_median``: median over a seeded subsample of at most 1000 images (pooled over splits) of
  ``len(gzip(image bytes, level 9, mtime 0)) / len(image bytes)``, raw uint8 bytes (all channels).
  Lower = more compressible. Deterministic.
* ``pixel_entropy``: median over the same subsample of the per-image Shannon entropy (bits) of the
  256-bin histogram of its uint8 values (all channels pooled).
* ``imbalance``: single-label tasks: largest / smallest class count on the train split, over the
  classes present there; multi-label tasks: largest / smallest per-label positive rate on train,
  over the labels with at least one positive. 1 = balanced.
* ``val_in_train`` / ``test_in_train``: validation / test images pixel-identical to some train image
  of the same task (MedMNIST ships a few). Not factors: they tell a reader that the probe, trained on
  the train split, has seen those test images with their labels. Every image is hashed, streamed a
  chunk at a time.

Images are read lazily: uncompressed npz members (the MedMNIST layout) are memory-mapped, so only
the sampled images of a 224 px task are read for the factors; the copy counts stream every image
through a chunked reader, never holding a split in memory.
"""
from __future__ import annotations

import gzip
import re
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from biovfm.data.medmnist import MULTI_LABEL, SPLITS, TaskInfo, load_npz

FEATURE_SIZE = 16  # area-resized side of the DBI feature space
PCA_DIMS = 32
GZIP_LEVEL = 9
MAX_COMPRESS_IMAGES = 1000
_CHUNK = 64  # images per vectorised block
HASH_CHUNK = 1024  # images per read when hashing a split

STATS_COLUMNS = ["task", "n_samples", "n_train", "n_classes", "label_type", "modality", "image_size", "dbi",
                 "gzip_median", "pixel_entropy", "imbalance", "val_in_train", "test_in_train"]
NUMERIC_FACTORS = ("n_samples", "dbi", "n_classes", "gzip_median", "pixel_entropy", "imbalance")
CATEGORICAL_FACTORS = ("modality", "label_type")
CORRELATION_COLUMNS = ["method", "factor", "kind", "r", "p", "n", "note"]


# ------------------------------------------------------------------------------------------ reading
def _groups(labels: np.ndarray, info: TaskInfo) -> np.ndarray:
    """Cluster id per image: the class, or for multi-label 0 = no positive label, 1 = any positive."""
    if info.task == MULTI_LABEL:
        return (labels.max(axis=1) > 0).astype(np.int64)
    return labels[:, 0].astype(np.int64)


# ------------------------------------------------------------------------------------------ features
def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``n_out x n_in`` weights of area (box) resampling: each output pixel averages the inputs it covers."""
    edges_out = np.arange(n_out + 1) * (n_in / n_out)
    lo = np.maximum(edges_out[:-1, None], np.arange(n_in)[None, :])
    hi = np.minimum(edges_out[1:, None], np.arange(n_in)[None, :] + 1)
    w = np.clip(hi - lo, 0, None)
    return w / w.sum(axis=1, keepdims=True)


def _gray(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    if x.ndim == 4:
        x = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return x


def _gather(data: dict[str, np.ndarray], picks: np.ndarray, offsets: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(split, sorted local indices) for sorted global indices ``picks`` over the concatenated splits."""
    out = []
    for i, s in enumerate(SPLITS):
        sel = picks[(picks >= offsets[i]) & (picks < offsets[i + 1])] - offsets[i]
        if sel.size:
            out.append((s, sel))
    return out


def _iter_images(data: dict[str, np.ndarray], picks: np.ndarray, offsets: np.ndarray):
    for s, sel in _gather(data, picks, offsets):
        x = data[f"{s}_images"]
        for a in range(0, sel.size, _CHUNK):
            yield np.asarray(x[sel[a:a + _CHUNK]])


def _dbi(data: dict[str, np.ndarray], groups: np.ndarray, picks: np.ndarray, offsets: np.ndarray,
         image_size: int) -> float:
    g = groups[picks]
    if np.unique(g).size < 2:
        return float("nan")
    a = _area_matrix(image_size, FEATURE_SIZE).astype(np.float32)
    feats = [((a @ _gray(x)) @ a.T).reshape(len(x), -1) for x in _iter_images(data, picks, offsets)]
    f = np.concatenate(feats).astype(np.float64)
    sd = f.std(axis=0)
    if not (sd > 0).any():
        return float("nan")  # every sampled image looks the same: no cluster structure to measure
    f = (f - f.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    dims = min(PCA_DIMS, f.shape[0], f.shape[1])
    # PCA: top eigenvectors of the (centred) features' scatter matrix, 256 x 256 (much cheaper than an SVD of the
    # samples); DBI only needs distances, so the components' signs do not matter.
    _, vecs = np.linalg.eigh(f.T @ f)
    z = f @ vecs[:, ::-1][:, :dims]
    return davies_bouldin(z, g)


def davies_bouldin(z: np.ndarray, groups: np.ndarray) -> float:
    """Davies-Bouldin index (as ``sklearn.metrics.davies_bouldin_score``, without its import cost).

    Mean over clusters of the worst ``(s_i + s_j) / d(c_i, c_j)``, with ``s`` the mean distance of a
    cluster's points to its centroid ``c``. Edge cases as sklearn: 0 when no cluster has spread or all
    centroids coincide; a pair of coinciding centroids contributes a ratio of 0.
    """
    codes, _ = pd.factorize(pd.Series(np.asarray(groups)), sort=True)
    k = int(codes.max()) + 1
    if k < 2:
        return float("nan")
    counts = np.bincount(codes, minlength=k).astype(float)
    cent = np.zeros((k, z.shape[1]))
    np.add.at(cent, codes, z)
    cent /= counts[:, None]
    spread = np.bincount(codes, weights=np.linalg.norm(z - cent[codes], axis=1), minlength=k) / counts
    dist = np.linalg.norm(cent[:, None, :] - cent[None, :, :], axis=-1)
    if np.allclose(spread, 0) or np.allclose(dist, 0):
        return 0.0
    dist[dist == 0] = np.inf
    ratio = (spread[:, None] + spread[None, :]) / dist
    np.fill_diagonal(ratio, -np.inf)
    return float(ratio.max(axis=1).mean())


def _entropy_bits(x: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of each image's 256-bin histogram of uint8 values."""
    n = len(x)
    flat = x.reshape(n, -1).astype(np.int64)
    counts = np.bincount((flat + 256 * np.arange(n)[:, None]).ravel(), minlength=256 * n).reshape(n, 256)
    p = counts / flat.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p), 0.0)
    return -terms.sum(axis=1)


def _compress_entropy(data: dict[str, np.ndarray], picks: np.ndarray, offsets: np.ndarray) -> tuple[float, float]:
    ratios, entropies = [], []
    for x in _iter_images(data, picks, offsets):
        x = np.ascontiguousarray(x)
        entropies.append(_entropy_bits(x))
        for img in x:
            b = img.tobytes()
            ratios.append(len(gzip.compress(b, compresslevel=GZIP_LEVEL, mtime=0)) / len(b))
    return float(np.median(ratios)), float(np.median(np.concatenate(entropies)))


def _imbalance(train_labels: np.ndarray, info: TaskInfo) -> float:
    if info.task == MULTI_LABEL:
        rates = (train_labels > 0).mean(axis=0)
        rates = rates[rates > 0]
        return float(rates.max() / rates.min()) if rates.size else float("nan")
    counts = np.bincount(train_labels[:, 0].astype(np.int64))
    counts = counts[counts > 0]
    return float(counts.max() / counts.min())


def _split_hashes(path: Path, split: str) -> Iterator[bytes]:
    """Content hash of every image of one split, read a chunk at a time (stored or deflated members alike)."""
    from biovfm.data.sources import iter_npz_rows
    from biovfm.data.store import content_hash

    for _, rows in iter_npz_rows(path, f"{split}_images", HASH_CHUNK, "evaluation task"):
        for im in rows:
            yield bytes.fromhex(content_hash(im))


def copies_of_train(path: str | Path) -> dict[str, int]:
    """``val_in_train`` and ``test_in_train``: held-out images equal to a train image of the same task."""
    train = set(_split_hashes(Path(path), "train"))
    return {f"{s}_in_train": sum(h in train for h in _split_hashes(Path(path), s)) for s in ("val", "test")}


def _subsample(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= k else np.sort(rng.choice(n, size=k, replace=False))


# ------------------------------------------------------------------------------------------ public
def task_characteristics(path: str | Path, info: TaskInfo, max_images: int = 2000, seed: int = 0) -> dict:
    """The task factors of one task npz (MedMNIST layout); see the module docstring for the definitions.

    Returns a dict with keys :data:`STATS_COLUMNS` (floats rounded to 6 decimals). Deterministic for a
    given ``seed``. Raises ValueError (naming the file) when the npz lacks a split or a split holds a
    single class (for multi-label tasks: only images with no positive label, or only images with some).
    """
    path = Path(path)
    if max_images < 2:
        raise ValueError(f"max_images must be >= 2, got {max_images}")
    data = load_npz(path, info, mmap=True)  # images memory-mapped: only the sampled ones are read
    sizes = [len(data[f"{s}_labels"]) for s in SPLITS]
    groups = []
    for s in SPLITS:
        g = _groups(data[f"{s}_labels"], info)
        if np.unique(g).size < 2:
            what = (f"only images with {'some' if g[0] else 'no'} positive label" if info.task == MULTI_LABEL
                    else f"a single class ({int(g[0])})")
            raise ValueError(f"{path}: task {info.flag}: the {s} split has {what}; task statistics need two classes "
                             "in every split")
        groups.append(g)
    groups_all = np.concatenate(groups)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n_total = int(offsets[-1])
    image_size = int(data["train_images"].shape[1])
    rng = np.random.default_rng(seed)
    dbi_picks = _subsample(n_total, max_images, rng)
    gz_picks = _subsample(n_total, min(max_images, MAX_COMPRESS_IMAGES), rng)
    gzip_median, entropy = _compress_entropy(data, gz_picks, offsets)
    r6 = lambda v: round(float(v), 6)  # noqa: E731 -- stable CSVs: BLAS may differ in the last bits
    return {
        "task": info.flag,
        "n_samples": n_total,
        "n_train": int(sizes[0]),
        "n_classes": int(info.n_labels),
        "label_type": info.task,
        "modality": info.modality,
        "image_size": image_size,
        "dbi": r6(_dbi(data, groups_all, dbi_picks, offsets, image_size)),
        "gzip_median": r6(gzip_median),
        "pixel_entropy": r6(entropy),
        "imbalance": r6(_imbalance(data["train_labels"], info)),
        **copies_of_train(path),
    }


def task_stats_table(paths: dict[str, str | Path], infos: dict[str, TaskInfo], max_images: int = 2000,
                     seed: int = 0) -> pd.DataFrame:
    """One row per task (in the order of ``paths``), columns :data:`STATS_COLUMNS`."""
    unknown = [f for f in paths if f not in infos]
    if unknown:
        raise KeyError(f"no task description for {unknown}; known: {sorted(infos)}")
    rows = [task_characteristics(p, infos[f], max_images=max_images, seed=seed) for f, p in paths.items()]
    return pd.DataFrame(rows, columns=STATS_COLUMNS)


_SIZE_SUFFIX = re.compile(r"^(?P<flag>.+)_(?P<size>\d+)$")


def flag_from_path(path: str | Path, known: "set[str] | dict | None" = None) -> str:
    """Task name of an npz path: the stem itself if it is a known task, else the stem before ``_<size>``."""
    stem = Path(path).name
    stem = stem[:-4] if stem.endswith(".npz") else stem
    if known is not None and stem in known:
        return stem
    m = _SIZE_SUFFIX.match(stem)
    return m.group("flag") if m else stem


# ------------------------------------------------------------------------------------------ correlations
def _eta(groups: pd.Series, y: np.ndarray) -> tuple[float, float]:
    """Correlation ratio eta = sqrt(SS_between / SS_total) and the one-way ANOVA p-value."""
    from scipy.stats import f as f_dist

    codes, uniq = pd.factorize(groups)
    k, n = len(uniq), len(y)
    mean = y.mean()
    ss_tot = float(((y - mean) ** 2).sum())
    means = np.array([y[codes == i].mean() for i in range(k)])
    counts = np.bincount(codes, minlength=k)
    ss_b = float((counts * (means - mean) ** 2).sum())
    eta = float(np.sqrt(ss_b / ss_tot))
    ss_w = ss_tot - ss_b
    if n - k > 0 and ss_w > 0:
        p = float(f_dist.sf((ss_b / (k - 1)) / (ss_w / (n - k)), k - 1, n - k))
    else:
        p = float("nan")
    return eta, p


def factor_correlations(slopes: pd.DataFrame, stats: pd.DataFrame) -> pd.DataFrame:
    """Per method x task factor: how the per-task scaling slope relates to the factor (Figure F).

    ``slopes``: columns task, method, slope (one row per method x task; ``task = "mean"`` rows are
    ignored). ``stats``: :func:`task_stats_table`. Numeric factors (:data:`NUMERIC_FACTORS`) get the
    Pearson r and its two-sided p-value (``scipy.stats.pearsonr``, ``kind = "pearson"``); the
    categorical ones (:data:`CATEGORICAL_FACTORS`) get the correlation ratio eta =
    sqrt(between-group / total sum of squares of the slope) and the one-way ANOVA p-value
    (``kind = "eta"``; eta is in [0, 1], no sign). Tasks with a non-finite slope or factor are left
    out; ``n`` counts the tasks used. r/eta are NaN, with a ``note``, when fewer than 3 tasks remain
    or the factor or the slope is constant.

    Returns columns :data:`CORRELATION_COLUMNS`, methods in order of appearance, factors numeric first.
    """
    from scipy.stats import pearsonr

    for name, df, cols in (("slopes", slopes, ("task", "method", "slope")), ("stats", stats, ("task",))):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise ValueError(f"factor_correlations: {name} lacks column(s) {missing}")
    s = slopes[slopes["task"] != "mean"]
    dup = s.duplicated(["method", "task"])
    if dup.any():
        raise ValueError(f"factor_correlations: several slopes for (method, task) "
                         f"{s.loc[dup, ['method', 'task']].iloc[0].tolist()}; filter to one series first")
    rows = []
    for method in pd.unique(s["method"]):
        m = s[s["method"] == method][["task", "slope"]].merge(stats, on="task", how="inner")
        for factor in NUMERIC_FACTORS + CATEGORICAL_FACTORS:
            kind = "eta" if factor in CATEGORICAL_FACTORS else "pearson"
            row = {"method": method, "factor": factor, "kind": kind, "r": np.nan, "p": np.nan, "n": 0, "note": ""}
            rows.append(row)
            if factor not in m.columns:
                row["note"] = "factor not in stats"
                continue
            y = pd.to_numeric(m["slope"], errors="coerce").to_numpy(dtype=float)
            if kind == "pearson":
                x = pd.to_numeric(m[factor], errors="coerce").to_numpy(dtype=float)
                ok = np.isfinite(x) & np.isfinite(y)
            else:
                x = m[factor].astype("string")
                ok = x.notna().to_numpy() & np.isfinite(y)
            x, yy = x[ok], y[ok]
            row["n"] = int(ok.sum())
            if row["n"] < 3:
                row["note"] = f"fewer than 3 tasks ({row['n']})"
            elif (pd.Series(x).nunique() if kind == "eta" else np.unique(x).size) < 2:
                row["note"] = "constant factor"
            elif np.ptp(yy) == 0:
                row["note"] = "constant slope"
            elif kind == "pearson":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # nearly constant inputs: r is still defined; n is reported
                    res = pearsonr(x, yy)
                row["r"], row["p"] = float(res[0]), float(res[1])
            else:
                row["r"], row["p"] = _eta(pd.Series(np.asarray(x)), yy)
            if (~ok).any():
                row["note"] = "; ".join(filter(None, [row["note"], f"{int((~ok).sum())} task(s) without a value"]))
    return pd.DataFrame(rows, columns=CORRELATION_COLUMNS)


# ------------------------------------------------------------------------------------------ CLI stage
def resolve_infos(paths: list[str | Path], custom: "list[TaskInfo] | tuple[TaskInfo, ...]" = ()) -> dict[str, TaskInfo]:
    """flag -> TaskInfo for each npz path: custom tasks first, then the MedMNIST tasks (KeyError if neither)."""
    from biovfm.data.medmnist import TASKS

    known = {**TASKS, **{t.flag: t for t in custom}}
    out: dict[str, TaskInfo] = {}
    for p in paths:
        flag = flag_from_path(p, known)
        if flag not in known:
            raise KeyError(f"{p}: task {flag!r} is neither a MedMNIST task ({', '.join(TASKS)}) nor a custom task "
                           f"given with --custom-tasks ({', '.join(t.flag for t in custom) or 'none'})")
        if flag in out:
            raise ValueError(f"{p}: task {flag!r} given twice")
        out[flag] = known[flag]
    return out


def run_task_stats(paths: list[str | Path], out: str | Path, custom: "list[TaskInfo] | tuple[TaskInfo, ...]" = (),
                   max_images: int = 2000, seed: int = 0) -> pd.DataFrame:
    """``biovfm task-stats``: the table of every task npz, written atomically as CSV to ``out``."""
    from biovfm.io import write_text

    infos = resolve_infos(paths, custom)
    table = task_stats_table({f: p for f, p in zip(infos, paths)}, infos, max_images=max_images, seed=seed)
    write_text(out, table.to_csv(index=False))
    print(f"[task-stats] {len(table)} task(s) -> {out}", flush=True)
    return table
