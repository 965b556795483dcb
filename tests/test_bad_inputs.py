"""The bad-input catalogue (issue 15, item 5): what a user sees for each kind of wrong input, as tables.

One row per case: an id, how the bad input is made (a function of the test's folder), and the fragments the
message must contain (``{tmp}`` stands for that folder, so the file named in the message is checked). Every refused
case must end in the project's own error with the file and the problem named (for the CLI: exit status 1 or 2 and
the one-line ``biovfm <command>: error: ...`` message, never a bare traceback) and must leave nothing behind but
the documented failure report (``<out>.failed-report.json`` of the corpus stage): every file of the test's folder
after the failure was there before it. Harmless real-world variants (labels stored as ``(N,)``, grayscale as
``N x H x W x 1``, boolean or whole-number float labels, compressed npz, exotic PIL modes, an empty YAML section)
are accepted instead, in :data:`ACCEPTED`. docs/reliability.md counts these rows with the older tests' cases.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from biovfm import cli
from biovfm.config import ModelSpec, ParamsError, load_params
from biovfm.data import sources as S
from biovfm.data.medmnist import BINARY, MULTI_LABEL, NpzFormatError, TaskInfo, load_npz, task_info
from biovfm.data.preprocess import CorpusError, preprocess_corpus, preprocess_task
from biovfm.evaluate.external import read_state_dict  # imports torch and timm once, at collection
from biovfm.evaluate.features import load_encoder
from biovfm.io import write_npz
from conftest import TINY_PARAMS

TINY = yaml.safe_load(TINY_PARAMS.read_text())
MINE = TaskInfo("mine", BINARY, 1, 2, "xray", ("healthy", "sick"))
SPLIT_SIZES = {"train": 6, "val": 4, "test": 4}


@dataclass(frozen=True)
class Case:
    """A refused input: ``make(tmp)`` builds it and returns the action that must fail with ``error``."""

    kind: str
    id: str
    make: Callable[[Path], Callable[[], Any]]
    fragments: tuple[str, ...]
    error: type[BaseException] | tuple[type[BaseException], ...] = Exception


@dataclass(frozen=True)
class Accepted:
    """A harmless variant: ``make(tmp)`` builds it and returns the action; ``check(result, tmp)`` asserts the outcome."""

    kind: str
    id: str
    make: Callable[[Path], Callable[[], Any]]
    check: Callable[[Any, Path], None]


class CliError(Exception):
    """The one-line error a CLI command printed (exit status checked by :func:`run_cli`)."""


# --------------------------------------------------------------------------------------------- makers
def params_case(id: str, edit: Callable[[dict], Any] | None, *fragments: str, text: str | None = None) -> Case:
    """params.yaml (the tiny study, edited, or the raw ``text``) read by :func:`load_params`, the one parser."""

    def make(tmp: Path):
        path = tmp / "params.yaml"
        if text is not None:
            path.write_text(text)
        elif edit is not None:
            p = copy.deepcopy(TINY)
            edit(p)
            path.write_text(yaml.safe_dump(p, sort_keys=False))
        return lambda: load_params(path)

    return Case("params", id, make, ("{tmp}/params.yaml", *fragments), ParamsError)


def task_arrays(size: int = 8, channels: int = 0, columns: int = 1, classes: int = 2, seed: int = 0) -> dict:
    """A valid MedMNIST-layout task: uint8 images N x H x W [x 3], int64 labels N x L."""
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in SPLIT_SIZES.items():
        data[f"{split}_images"] = rng.integers(0, 256, (n, size, size) + ((channels,) if channels else ()), dtype=np.uint8)
        y = rng.integers(0, classes, (n, columns))
        y[0] = 0
        y[1] = classes - 1  # every class present
        data[f"{split}_labels"] = y.astype(np.int64)
    return data


def npz_case(id: str, corrupt: Callable[[dict], Any], *fragments: str, info: TaskInfo = MINE, save=np.savez,
             read_whole: bool = False, error=NpzFormatError) -> Case:
    """A custom task file ``mine.npz`` preprocessed as the workflow does (into ``out.npz``), or read whole."""

    def make(tmp: Path):
        data = task_arrays(channels=3 if info.n_channels == 3 else 0,
                           columns=info.label_columns, classes=2 if info.task == MULTI_LABEL else info.n_labels)
        corrupt(data)
        path = tmp / "mine.npz"
        if save is not None:
            save(path, **data)
        if read_whole:
            return lambda: load_npz(path, info)
        return lambda: preprocess_task(path, tmp / "out.npz", info, 8)

    return Case("npz", id, make, ("{tmp}/mine.npz", *fragments), error)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` 8-bit gray pixels, with (almost) no pixel data."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def gray(seed: int = 0, shape=(12, 10)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray()).save(buf, format="JPEG")
    return buf.getvalue()


def dicom_bytes() -> bytes:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm")).read_bytes()


def nifti_bytes() -> bytes:
    from nibabel.testing import data_path

    return (Path(data_path) / "anatomical.nii").read_bytes()


def corpus_file_case(kind: str, id: str, name: str, content: Callable[[], bytes], *fragments: str,
                     source: dict | None = None) -> Case:
    """One unreadable file in a folder source: the corpus stage refuses it (1 of 1 files bad > 1 %), naming it."""

    def make(tmp: Path):
        root = tmp / "images"
        root.mkdir()
        (root / name).write_bytes(content())
        spec = {"name": "mine", "kind": "folder", "path": str(root), "modality": "xray"} | (source or {})
        return lambda: preprocess_corpus([spec], tmp / "out", 16, [])

    return Case(kind, id, make, ("corpus source 'mine'", "1 of 1 files are unreadable", f"e.g. {name}: ", *fragments,
                                 "{tmp}/out.failed-report.json"), CorpusError)


def manifest_case(id: str, name: str, content: Callable[[Path], Any], *fragments: str,
                  error: type[BaseException] = S.SourceError, **source) -> Case:
    """A manifest source ``name`` (written by ``content(path)``) over a root holding one good image ``a.png``."""

    def make(tmp: Path):
        root = tmp / "root"
        root.mkdir()
        Image.fromarray(gray()).save(root / "a.png")
        manifest = tmp / name
        content(manifest)
        spec = {"name": "lab", "kind": "manifest", "manifest": str(manifest), "root": str(root)}
        spec |= {k: v.replace("{tmp}", str(tmp)) if isinstance(v, str) else v for k, v in source.items()}
        return lambda: preprocess_corpus([spec], tmp / "out", 16, [])

    return Case("manifest", id, make, ("corpus source 'lab' (manifest)", *fragments), error)


def csv(rows: dict) -> Callable[[Path], None]:
    return lambda path: pd.DataFrame(rows).to_csv(path, index=False)


def write_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def encoder_case(id: str, write: Callable[[Path], None], *fragments: str, name: str = "encoder.safetensors",
                 marks=()) -> Any:
    """An encoder checkpoint read by the evaluation stage (features.load_encoder: safetensors only)."""

    def make(tmp: Path):
        path = tmp / name
        write(path)
        return lambda: load_encoder(path, ModelSpec("femto", 16, 1, 2, 4), 16)

    case = Case("checkpoint", id, make, ("{tmp}/" + name, *fragments), (ValueError, FileNotFoundError, OSError))
    return pytest.param(case, id=f"{case.kind}-{id}", marks=marks) if marks else case


def weights_case(id: str, write: Callable[[Path], None], *fragments: str, name: str = "w.pt", marks=()) -> Any:
    """An outside encoder's weights file (evaluate.external) read by external.read_state_dict."""

    def make(tmp: Path):
        path = tmp / name
        write(path)
        return lambda: read_state_dict(path)

    case = Case("checkpoint", id, make, ("{tmp}/" + name, *fragments), (ValueError, FileNotFoundError))
    return pytest.param(case, id=f"{case.kind}-{id}", marks=marks) if marks else case


def run_cli(*argv: str) -> None:
    """``biovfm ARGV`` in-process; raises :class:`CliError` with the one-line error after checking the exit path:
    status 1 (a failing command) or 2 (argparse), the error line first (status 1) or last (argparse usage)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(list(argv))
        except SystemExit as e:
            code = e.code
    lines = err.getvalue().splitlines()
    assert code in (1, 2), f"biovfm {' '.join(argv)}: exit status {code}, stderr {lines}"
    assert lines and not lines[0].startswith("Traceback"), f"a bare traceback: {lines[:3]}"
    line = lines[0] if code == 1 else lines[-1]  # argparse prints its usage, then the error
    assert line.startswith("biovfm") and ": error: " in line, lines
    raise CliError(line)


def cli_case(id: str, argv: Callable[[Path], list[str]], *fragments: str, setup: Callable[[Path], Any] = None) -> Case:
    def make(tmp: Path):
        if setup:
            setup(tmp)
        args = argv(tmp)
        return lambda: run_cli(*args)

    return Case("cli", id, make, fragments, CliError)


def save_task(path: Path, **changes) -> None:
    write_npz(path, **(task_arrays() | changes))


# --------------------------------------------------------------------------------------------- the table
def _set(section: str, **values) -> Callable[[dict], None]:
    def edit(p: dict) -> None:
        target = p
        for key in section.split("."):
            target = target.setdefault(key, {})
        target.update(values)

    return edit


NONSQUARE = lambda d: d.update(train_images=d["train_images"][:, :, :6])  # noqa: E731
TO_OBJECT = lambda d: d.update(train_labels=d["train_labels"].astype(object))  # noqa: E731

CASES: list[Any] = [
    # ---------------------------------------------------------------- params (config.load_params / validate_params)
    params_case("file-missing", None, "no such params file"),
    params_case("file-empty", None, "the file is empty", "grid: and models:", text="# nothing yet\n"),
    params_case("top-level-list", None, "expected a mapping at the top level, got list", text="- grid\n- models\n"),
    params_case("tab-indentation", None, "not valid YAML", "found character '\\t'", text="grid:\n\tmodels: [a]\n"),
    params_case("unknown-top-level-key", lambda p: p.update(grids={}), "(top level): unknown key(s) ('grids' was unexpected)"),
    params_case("missing-required-section", lambda p: p.pop("grid"), "'grid' is a required property"),
    params_case("image-size-below-minimum", _set("data", image_size=4), "data.image_size: 4 is less than the minimum of 8"),
    params_case("fraction-above-maximum", _set("pretrain", warmup_frac=1.5),
                "pretrain.warmup_frac: 1.5 is greater than the maximum of 1"),
    params_case("negative-count", _set("pretrain", nproc=-1), "pretrain.nproc: -1 is less than the minimum of 0"),
    params_case("float-written-1e-4-reads-as-text", _set("pretrain", base_lr="1e-4"),
                "pretrain.base_lr: '1e-4' is not of type 'number'", "YAML reads 1e-4 as text; write 1.0e-4"),
    params_case("integer-written-1e3-reads-as-text", _set("pretrain", steps="1e3"),
                "pretrain.steps: '1e3' is not of type 'integer'", "write 1000"),
    params_case("scalar-for-a-list", _set("grid", seeds="0"), "grid.seeds: '0' is not of type 'array'"),
    params_case("repeated-grid-value", _set("grid", data_sizes=[60, 60]), "grid.data_sizes: [60, 60] has non-unique elements"),
    params_case("enum-value", _set("pretrain", precision="fp16"), "pretrain.precision: 'fp16' is not one of ['fp32', 'bf16']"),
    params_case("zero-label-fraction", _set("evaluate", label_fractions=[0]),
                "evaluate.label_fractions[0]: 0 is less than or equal to the minimum of 0"),
    params_case("heads-do-not-divide-width", _set("models.femto", num_heads=3),
                "models.femto: embed_dim=16 is not divisible by num_heads=3"),
    params_case("decoder-heads-do-not-divide", _set("methods.mae", decoder_heads=3),
                "methods.mae: decoder_dim is not divisible by decoder_heads"),
    params_case("patch-size-mapping-with-a-bad-key", _set("models.femto", patch_size={"abc": 4}),
                "models.femto.patch_size: {'abc': 4} is not valid here",
                "expected an integer, or a mapping from image size to patch size"),
    params_case("modality-outside-the-vocabulary", lambda p: p.update(modalities={"all": ["sonar"]}),
                "modalities.all[0]: 'sonar' is not one of"),
    params_case("empty-experiment-name", _set("tracking", experiment=""), "tracking.experiment: '' should be non-empty"),
    params_case("external-entry-without-path", _set("evaluate", external=[{"name": "ext"}]),
                "evaluate.external[0]: 'path' is a required property"),
    params_case("corpus-source-names-repeat",
                _set("corpus", sources=[{"name": "a", "kind": "synthetic"}, {"name": "a", "kind": "synthetic"}]),
                "corpus.sources: names must be unique; repeated: a"),
    params_case("corpus-source-unknown-key", _set("corpus", sources=[{"name": "a", "kind": "synthetic", "pth": "x"}]),
                "corpus.sources[0]: unknown key(s) ('pth' was unexpected)"),
    params_case("folder-source-without-path", _set("corpus", sources=[{"name": "a", "kind": "folder", "modality": "xray"}]),
                "corpus source 'a' (folder): needs `path`, the folder to read"),
    params_case("manifest-source-without-manifest", _set("corpus", sources=[{"name": "a", "kind": "manifest"}]),
                "corpus source 'a' (manifest): needs `manifest`"),
    params_case("medmnist-source-unknown-flag",
                _set("corpus", sources=[{"name": "m", "kind": "medmnist", "flags": ["foomnist"]}]),
                "corpus source 'm' (medmnist): unknown MedMNIST flag(s) ['foomnist']"),
    params_case("modality-on-a-synthetic-source",
                _set("corpus", sources=[{"name": "s", "kind": "synthetic", "modality": "xray"}]),
                "corpus source 's' (synthetic): `modality` is not set for this kind"),
    # ---------------------------------------------------------------- npz task files (medmnist.load_npz, preprocess)
    npz_case("non-square-images", NONSQUARE, "train_images has shape (6, 8, 6)", "expected square ones",
             "crop or pad them"),
    npz_case("empty-split", lambda d: d.update(test_images=d["test_images"][:0], test_labels=d["test_labels"][:0]),
             "test split is empty (0 images)"),
    npz_case("pickled-object-array", TO_OBJECT, "train_labels holds Python objects", "refused"),
    npz_case("pickled-object-array-compressed", TO_OBJECT, "train_labels holds Python objects", "refused",
             save=np.savez_compressed),
    npz_case("pickled-object-array-read-whole", TO_OBJECT, "train_labels holds Python objects", read_whole=True),
    npz_case("float-images-in-0-1", lambda d: d.update(train_images=d["train_images"].astype(np.float32) / 255),
             "train_images has dtype float32, expected uint8", "(x * 255).round().astype(np.uint8)"),
    npz_case("uint16-images", lambda d: d.update(val_images=d["val_images"].astype(np.uint16) * 256),
             "val_images has dtype uint16, expected uint8", "0..255"),
    npz_case("rgba-images", lambda d: d.update(**{f"{s}_images": np.zeros((n, 8, 8, 4), np.uint8)
                                                  for s, n in SPLIT_SIZES.items()}),
             "train_images has shape (6, 8, 8, 4)", "N x H x W x 3 (RGB)"),
    npz_case("splits-of-different-sizes", lambda d: d.update(val_images=d["val_images"][:, :6, :6]),
             "val_images has image shape (6, 6), other splits (8, 8)"),
    npz_case("fractional-float-labels", lambda d: d.update(train_labels=d["train_labels"] * 0.5),
             "train_labels has dtype float64 with values that are not whole numbers", "class indices"),
    npz_case("negative-label-as-unknown", lambda d: d["train_labels"].__setitem__(2, -1),
             "train_labels has values in [-1, 1]", "expects [0, 1]"),
    npz_case("more-labels-than-images", lambda d: d.update(val_labels=np.zeros(5, np.int64)),
             "val_labels has shape (5,), expected (4, L)"),
    npz_case("extra-array", lambda d: d.update(extra=np.zeros(3)), "unexpected ['extra']"),
    npz_case("multi-label-columns-missing", lambda d: [d.update({f"{s}_labels": d[f"{s}_labels"][:, :1]})
                                                       for s in SPLIT_SIZES],
             "train_labels has 1 column(s), task chestmnist expects 14", info=task_info("chestmnist")),
    npz_case("not-a-zip-file", lambda d: None, "not a readable npz file",
             save=lambda path, **_: path.write_text("train_images,train_labels\n")),
    npz_case("fortran-ordered-images",
             lambda d: d.update(train_images=np.asfortranarray(d["train_images"])),
             "train_images must be a C-ordered array", "Fortran (column-major) order", "np.ascontiguousarray",
             error=S.SourceError),  # found when streaming the rows; the output is written atomically
    # ---------------------------------------------------------------- image files (a folder source)
    corpus_file_case("image", "truncated-jpeg", "scan.jpg", lambda: jpeg_bytes()[:200], "OSError"),
    corpus_file_case("image", "random-bytes-jpeg", "scan.jpg", lambda: os.urandom(256), "UnidentifiedImageError"),
    corpus_file_case("image", "zero-byte-png", "scan.png", lambda: b"", "UnidentifiedImageError"),
    corpus_file_case("image", "decompression-bomb-png", "scan.png", lambda: png_claiming(30_000, 30_000),
                     "DecompressionBombError"),
    # ---------------------------------------------------------------- DICOM / NIfTI
    corpus_file_case("dicom", "truncated-pixel-data", "ct.dcm", lambda: dicom_bytes()[:-2000],
                     "pixel data is less than expected", source={"kind": "dicom", "modality": "from_file"}),
    corpus_file_case("nifti", "truncated-volume", "vol.nii", lambda: nifti_bytes()[:30_000],
                     "could the file be damaged", source={"kind": "nifti", "modality": "mr"}),
    corpus_file_case("nifti", "not-gzip", "vol.nii.gz", lambda: os.urandom(300), "not a gzip file",
                     source={"kind": "nifti", "modality": "mr"}),
    # ---------------------------------------------------------------- manifests
    manifest_case("no-path-column", "m.csv", csv({"file": ["a.png"], "modality": ["xray"]}),
                  "{tmp}/m.csv lacks column(s) ['path']", "set path_column/modality_column"),
    manifest_case("no-modality-column", "m.csv", csv({"path": ["a.png"]}), "{tmp}/m.csv lacks column(s) ['modality']"),
    manifest_case("manifest-missing", "m.csv", lambda path: None, "manifest {tmp}/m.csv does not exist"),
    manifest_case("not-csv-or-parquet", "m.txt", write_bytes(b"path,modality\na.png,xray\n"),
                  "manifest {tmp}/m.txt must be .csv or .parquet"),
    manifest_case("empty-csv", "m.csv", write_bytes(b""), "manifest {tmp}/m.csv cannot be read as CSV (EmptyDataError",
                  "a header row with the `path` column"),
    manifest_case("binary-csv", "m.csv", write_bytes(bytes(range(128, 256))),
                  "manifest {tmp}/m.csv cannot be read as CSV (UnicodeDecodeError"),
    manifest_case("unclosed-quote", "m.csv", write_bytes(b'path,modality\n"a.png,xray\n'),
                  "manifest {tmp}/m.csv cannot be read as CSV (ParserError"),
    manifest_case("corrupt-parquet", "m.parquet", write_bytes(b"PAR1 not really"),
                  "manifest {tmp}/m.parquet cannot be read as Parquet (ArrowInvalid"),
    manifest_case("header-only", "m.csv", write_bytes(b"path,modality\n"), "found nothing to read in {tmp}/m.csv",
                  error=CorpusError),
    manifest_case("entry-names-a-missing-file", "m.csv", csv({"path": ["gone.png"], "modality": ["xray"]}),
                  "1 of 1 files are unreadable", "gone.png: FileNotFoundError", error=CorpusError),
    manifest_case("blank-modality-cell", "m.csv", csv({"path": ["a.png"], "modality": [""]}),
                  "{tmp}/m.csv row 1: unknown modality ''"),
    manifest_case("root-not-a-folder", "m.csv", csv({"path": ["a.png"], "modality": ["xray"]}),
                  "root {tmp}/nowhere is not a folder; fix `root`", root="{tmp}/nowhere"),
    # ---------------------------------------------------------------- checkpoints and encoder weights
    encoder_case("encoder-missing", lambda path: None, "No such file"),
    encoder_case("encoder-of-another-model", lambda path: _save_tensors(path, {"x": np.zeros(3, np.float32)}),
                 "checkpoint does not fit model femto at 16px"),
    encoder_case("encoder-random-bytes", lambda path: path.write_bytes(os.urandom(64)),
                 "not a readable safetensors file"),
    weights_case("weights-list-not-dict", lambda path: _torch_save([np.zeros(2, np.float32)], path),
                 "not a state dict of tensors"),
    weights_case("weights-random-bytes-pt", lambda path: path.write_bytes(os.urandom(64)),
                 "cannot be read as plain tensors with weights_only=True"),
    weights_case("weights-random-bytes-safetensors", lambda path: path.write_bytes(os.urandom(64)),
                 "not a readable safetensors file", name="w.safetensors"),
    # ---------------------------------------------------------------- CLI arguments (biovfm.cli.main, in-process)
    cli_case("no-command", lambda tmp: [], "biovfm: error: the following arguments are required: cmd"),
    cli_case("misspelt-command", lambda tmp: ["pretrian"], "invalid choice: 'pretrian'"),
    cli_case("size-not-an-integer",
             lambda tmp: ["preprocess-task", "--task", "x", "--raw", "r", "--size", "abc", "--out", f"{tmp}/out.npz"],
             "biovfm preprocess-task: error: argument --size: invalid int value: 'abc'"),
    cli_case("info-not-json",
             lambda tmp: ["preprocess-task", "--task", "x", "--info", "{name: x}", "--raw", "r", "--size", "8",
                          "--out", f"{tmp}/out.npz"],
             "biovfm preprocess-task: error: --info: not valid JSON", "rerun it through snakemake"),
    cli_case("info-missing-fields",
             lambda tmp: ["preprocess-task", "--task", "x", "--info", '{"flag": "x"}', "--raw", "r", "--size", "8",
                          "--out", f"{tmp}/out.npz"],
             "--info: not a task description (TaskInfo) of this version of biovfm", "'n_channels'"),
    cli_case("unknown-task-flag",
             lambda tmp: ["preprocess-task", "--task", "foomnist", "--raw", "r", "--size", "8", "--out", f"{tmp}/out.npz"],
             "biovfm preprocess-task: error: unknown task 'foomnist'; known tasks: pathmnist"),
    cli_case("raw-file-missing",
             lambda tmp: ["preprocess-task", "--task", "pathmnist", "--raw", f"{tmp}/absent.npz", "--size", "8",
                          "--out", f"{tmp}/out.npz"],
             "biovfm preprocess-task: error: ", "absent.npz: no such file"),
    cli_case("raw-file-not-square",
             lambda tmp: ["preprocess-task", "--task", "mine", "--info", json.dumps(asdict(MINE)),
                          "--raw", f"{tmp}/mine.npz", "--size", "8", "--out", f"{tmp}/out.npz"],
             "biovfm preprocess-task: error: ", "mine.npz: train_images has shape (6, 8, 6)",
             setup=lambda tmp: save_task(tmp / "mine.npz", train_images=np.zeros((6, 8, 6), np.uint8))),
    cli_case("job-not-json",
             lambda tmp: ["evaluate", "--job", "job.json", "--tasks", str(tmp), "--out", f"{tmp}/out/eval.json"],
             "biovfm evaluate: error: --job: not valid JSON", "expected an evaluation job"),
    cli_case("job-missing-fields",
             lambda tmp: ["evaluate", "--job", '{"kind": "raw_pixels"}', "--tasks", str(tmp), "--out", f"{tmp}/out/e.json"],
             "biovfm evaluate: error: --job: not an evaluation job of this version of biovfm (KeyError: model)"),
    cli_case("download-spec-missing-fields",
             lambda tmp: ["download", "--spec", '{"tasks": ["pathmnist"]}', "--out", f"{tmp}/out"],
             "biovfm download: error: --spec: not the download settings", "'n_train'"),
    cli_case("corpus-spec-not-an-object",
             lambda tmp: ["preprocess-corpus", "--spec", "[]", "--size", "16", "--out", f"{tmp}/out"],
             "biovfm preprocess-corpus: error: --spec: expected the corpus section as a JSON object with `sources`"),
    cli_case("md5-not-file-equals-hash",
             lambda tmp: ["download-medmnist", "--flags", "breastmnist", "--size", "28", "--md5", "abc", "--out", f"{tmp}/out"],
             "biovfm download-medmnist: error: --md5 'abc': expected FILE=MD5"),
    cli_case("medmnist-size-not-published",
             lambda tmp: ["download-medmnist", "--flags", "breastmnist", "--size", "32", "--out", f"{tmp}/out"],
             "MedMNIST+ has no 32px files; sizes are 28, 64, 128, 224"),
    cli_case("ui-without-a-store", lambda tmp: ["ui", "--uri", f"sqlite:///{tmp}/mlflow.db"],
             "biovfm ui: error: no MLflow store at", "mlflow.db: run the study first"),
    cli_case("models-params-missing", lambda tmp: ["models", "--params", f"{tmp}/params.yaml"],
             "biovfm models: error: ", "params.yaml: no such params file"),
    cli_case("import-results-missing", lambda tmp: ["mlflow-import", "--results", f"{tmp}/results"],
             "biovfm mlflow-import: error: --results ", "results: no such folder"),
    cli_case("export-nothing", lambda tmp: ["export", "--results", f"{tmp}/results"],
             "biovfm export: error: nothing to export"),
]


def _save_tensors(path: Path, arrays: dict) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.from_numpy(v) for k, v in arrays.items()}, str(path))


def _torch_save(obj, path: Path) -> None:
    import torch

    torch.save([torch.from_numpy(a) for a in obj] if isinstance(obj, list) else obj, path)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _case_id(case: Any) -> str:
    return f"{case.kind}-{case.id}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bad_input_is_refused_naming_file_and_problem_and_leaves_nothing(case: Case, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    action = case.make(tmp_path)
    before = _files(tmp_path)
    with pytest.raises(case.error) as e:
        action()
    message = str(e.value)
    for fragment in case.fragments:
        assert fragment.replace("{tmp}", str(tmp_path)) in message, f"{fragment!r} not in:\n{message}"
    left = {p for p in _files(tmp_path) - before if not p.name.endswith(".failed-report.json")}
    assert not left, f"partial output left behind: {sorted(map(str, left))}"


def test_the_catalogue_is_counted_by_kind():
    """docs/reliability.md quotes these numbers: keep them in step with the tables."""
    def kind(c):
        return (c.values[0] if hasattr(c, "values") else c).kind

    refused = pd.Series([kind(c) for c in CASES]).value_counts().to_dict()
    accepted = pd.Series([c.kind for c in ACCEPTED]).value_counts().to_dict()
    assert refused == {"params": 27, "npz": 16, "image": 4, "dicom": 1, "nifti": 2, "manifest": 12, "checkpoint": 6,
                       "cli": 18}
    assert accepted == {"params": 2, "npz": 6, "image": 6, "nifti": 1}
    assert len(SKIPPED) == 3


# --------------------------------------------------------------------------------------------- the CLI's exit path
def test_a_failing_command_exits_1_with_the_message_first_and_no_output(tmp_path):
    """The installed entry point, in a subprocess: status 1, the one-line message first (what Snakemake's summary
    shows), the traceback after it for a bug report, and no --out file."""
    save_task(tmp_path / "mine.npz", train_images=np.zeros((6, 8, 6), np.uint8))
    info = json.dumps({"flag": "mine", "task": BINARY, "n_channels": 1, "n_labels": 2, "modality": "xray"})
    proc = subprocess.run([str(Path(sys.executable).parent / "biovfm"), "preprocess-task", "--task", "mine", "--info",
                           info, "--raw", str(tmp_path / "mine.npz"), "--size", "8", "--out", str(tmp_path / "out.npz")],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1, proc.stderr
    assert lines[0] == (f"biovfm preprocess-task: error: {tmp_path / 'mine.npz'}: train_images has shape (6, 8, 6): the "
                        "images are 8 x 6 pixels, expected square ones (H = W); crop or pad them to a square")
    assert lines[1] == "Traceback (most recent call last):" and "NpzFormatError" in lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.npz"]


# --------------------------------------------------------------------------------------------- harmless variants
def _preprocessed(tmp: Path, data: dict, info: TaskInfo = MINE, save=write_npz) -> Callable[[], dict]:
    save(tmp / "mine.npz", **data)

    def run() -> dict:
        preprocess_task(tmp / "mine.npz", tmp / "out.npz", info, 8)
        return load_npz(tmp / "out.npz", info, mmap=True)

    return run


def _variant(change: Callable[[dict], Any], info: TaskInfo = MINE, save=write_npz):
    def make(tmp: Path):
        data = task_arrays(columns=info.label_columns, classes=2)
        change(data)
        return _preprocessed(tmp, data, info, save)

    return make


def _same_task(out: dict, tmp: Path) -> None:
    """The preprocessed task holds the reference arrays in the one layout: N x H x W uint8, N x 1 integer labels."""
    ref = task_arrays(columns=1)
    for key, value in ref.items():
        assert out[key].shape == value.shape and np.array_equal(out[key], value), key
        assert out[key].dtype == np.uint8 if key.endswith("_images") else np.issubdtype(out[key].dtype, np.integer)


def _one_image(mode: str, save: Callable[[Path], None], name: str) -> Accepted:
    def make(tmp: Path):
        path = tmp / name
        save(path)
        source = S.Source(name="s", kind="folder", modality="xray")
        return lambda: S.convert_unit(S.FileUnit(0, str(path), name, "image", "xray"), source, 16)

    def check(res, tmp):
        assert res.skipped == [] and len(res.images) == 1
        assert res.images[0][2].shape == (16, 16, 3) and res.images[0][2].dtype == np.uint8

    return Accepted("image", f"{mode}-mode-converted", make, check)


def _pil(mode: str, channels: int, fmt: str):
    def save(path: Path) -> None:
        im = Image.fromarray(gray(1, (12, 10, 3) if channels == 3 else (12, 10)))
        if mode == "F":
            im = Image.fromarray(gray(1, (12, 10)).astype(np.float32) / 255, "F")
        elif mode == "RGBA":
            im = Image.fromarray(gray(1, (12, 10, 4)), "RGBA")
        else:
            im = im.convert(mode)
        im.save(path, format=fmt)

    return save


def _params_accepted(id: str, edit: Callable[[dict], Any], check: Callable[[dict], bool], extra: str = "") -> Accepted:
    def make(tmp: Path):
        p = copy.deepcopy(TINY)
        edit(p)
        path = tmp / "params.yaml"
        path.write_text(yaml.safe_dump(p, sort_keys=False) + extra)
        return lambda: load_params(path)

    return Accepted("params", id, make, lambda p, tmp: check(p))


def _all_nan_volume(tmp: Path):
    import nibabel as nib

    path = tmp / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 3), np.nan, np.float32), np.eye(4)), path)
    source = S.Source(name="s", kind="nifti", modality="mr")
    return lambda: S.convert_unit(S.FileUnit(0, str(path), path.name, "nifti", "mr"), source, 16)


ACCEPTED: list[Accepted] = [
    Accepted("npz", "labels-stored-as-(N,)-like-some-public-medmnist-copies",
             _variant(lambda d: [d.update({f"{s}_labels": d[f"{s}_labels"][:, 0]}) for s in SPLIT_SIZES]), _same_task),
    Accepted("npz", "grayscale-stored-as-NxHxWx1",
             _variant(lambda d: [d.update({f"{s}_images": d[f"{s}_images"][..., None]}) for s in SPLIT_SIZES]),
             _same_task),
    Accepted("npz", "grayscale-NxHxWx1-compressed",
             _variant(lambda d: [d.update({f"{s}_images": d[f"{s}_images"][..., None]}) for s in SPLIT_SIZES],
                      save=np.savez_compressed), _same_task),
    Accepted("npz", "whole-number-float-labels",
             _variant(lambda d: [d.update({f"{s}_labels": d[f"{s}_labels"].astype(np.float32)}) for s in SPLIT_SIZES]),
             _same_task),
    Accepted("npz", "boolean-multi-label-labels",
             _variant(lambda d: [d.update({f"{s}_labels": d[f"{s}_labels"].astype(bool)}) for s in SPLIT_SIZES],
                      info=TaskInfo("mine", MULTI_LABEL, 1, 1, "xray", ("finding",))), _same_task),
    Accepted("npz", "compressed-npz", _variant(lambda d: None, save=np.savez_compressed), _same_task),
    _params_accepted("empty-section-means-defaults", lambda p: p.pop("evaluate"),  # every line below it commented out
                     lambda p: p["evaluate"]["probe"]["lr"] == 0.01 and p["evaluate"]["threads"] == 1,
                     extra="evaluate:\n  # threads: 4\n"),
    _params_accepted("patch-size-mapping-with-integer-keys", _set("models.femto", patch_size={16: 4, 224: 16}),
                     lambda p: p["models"]["femto"]["patch_size"] == {"16": 4, "224": 16}),
    _one_image("RGBA", _pil("RGBA", 4, "PNG"), "a.png"),
    _one_image("CMYK", _pil("CMYK", 3, "JPEG"), "a.jpg"),
    _one_image("P", _pil("P", 3, "PNG"), "a.png"),
    _one_image("1", _pil("1", 1, "PNG"), "a.png"),
    _one_image("F", _pil("F", 1, "TIFF"), "a.tif"),
    _one_image("LAB", _pil("LAB", 3, "TIFF"), "a.tif"),
    Accepted("nifti", "all-nan-volume-gives-blank-slices-not-an-error", _all_nan_volume,
             lambda res, tmp: (res.images, res.skipped, res.blank) == ([], [], 3)),
]


@pytest.mark.parametrize("case", ACCEPTED, ids=_case_id)
def test_harmless_variant_is_accepted(case: Accepted, tmp_path):
    result = case.make(tmp_path)()
    assert case.check(result, tmp_path) is not False, result  # a check asserts, or returns whether it holds


# --------------------------------------------------------------------------------------------- skipped, not bad
def _dicom_edit(edit: Callable[[Any], None]) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        import pydicom
        from pydicom.data import get_testdata_file

        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        edit(ds)
        ds.save_as(tmp / "x.dcm")
        return tmp / "x.dcm"

    return write


SKIPPED = [  # a readable DICOM that holds no image for the corpus: listed in the report, not counted as unreadable
    ("dicom-without-pixel-data", _dicom_edit(lambda ds: delattr(ds, "PixelData")), "DICOM without pixel data"),
    ("dicom-structured-report", _dicom_edit(lambda ds: setattr(ds, "Modality", "SR")),
     "DICOM Modality 'SR' is not a corpus modality; give the source a fixed `modality`"),
    ("dicom-without-modality", _dicom_edit(lambda ds: setattr(ds, "Modality", "")),
     "DICOM Modality '(none)' is not a corpus modality"),
]


@pytest.mark.parametrize("id, write, reason", SKIPPED, ids=[s[0] for s in SKIPPED])
def test_a_file_without_an_image_is_skipped_and_listed_not_counted_bad(id, write, reason, tmp_path):
    path = write(tmp_path)
    res = S.convert_unit(S.FileUnit(0, str(path), path.name, "dicom", ""), S.Source(name="s", kind="dicom"), 16)
    assert res.images == [] and len(res.skipped) == 1 and res.blank == 0
    assert res.skipped[0]["path"] == "x.dcm" and res.skipped[0]["bad"] is False
    assert reason in res.skipped[0]["reason"]


def test_a_corpus_of_only_non_images_says_what_was_left_out(tmp_path):
    root = tmp_path / "dicoms"
    root.mkdir()
    _dicom_edit(lambda ds: setattr(ds, "Modality", "SR"))(root)
    with pytest.raises(CorpusError) as e:
        preprocess_corpus([{"name": "pacs", "kind": "dicom", "path": str(root)}], tmp_path / "out", 16, [])
    assert "the corpus is empty: of 1 input(s), 1 skipped (not images" in str(e.value)
    assert str(tmp_path / "out.failed-report.json") in str(e.value) and not (tmp_path / "out").exists()
