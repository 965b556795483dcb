"""Preprocess stage: evaluation tasks resized to the study's image size; the corpus into its store."""
from __future__ import annotations

import multiprocessing as mp
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from biovfm.data import store
from biovfm.data.medmnist import SPLITS, TaskInfo, load_npz, task_info
from biovfm.data.sources import (ON_LEAK, Source, SourceError, UnitResult, convert_unit, iter_npz_rows, iter_units,
                                 resize_bicubic, source_from_dict, source_inputs)
from biovfm.io import atomic_dir, stream_npz, write_json


TASK_CHUNK = 1024  # images resized at a time by preprocess_task


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of uint8 N x H x W [x 3] images (PIL, as MedMNIST+ was made); identity at equal size.

    The corpus resizes with the same function, so a task image that reaches a corpus hashes alike."""
    if images.shape[1] == size:
        return images
    out = np.empty((len(images), size, size, *images.shape[3:]), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i] = resize_bicubic(im, size)
    return out


def preprocess_task(raw_npz: str | Path, out_npz: str | Path, task: str | TaskInfo, size: int,
                    chunk: int = TASK_CHUNK) -> None:
    """Validate a task file (MedMNIST flag or a custom task's TaskInfo) and resize every split to ``size``.

    Streams: ``chunk`` images at a time are read (stored or deflated members alike), resized and appended to an
    uncompressed npz that the evaluation stage memory-maps, so memory is bounded by the chunk, not the task
    (PathMNIST-224 holds ~16 GB of pixels). The output's bytes depend on the arrays alone."""
    info = task if isinstance(task, TaskInfo) else task_info(task)
    labels, shapes = _validated_layout(raw_npz, info)
    with stream_npz(out_npz) as out:
        for split in SPLITS:
            key = f"{split}_images"
            n, _, _, *channels = shapes[key]
            with out.member(key, (n, size, size, *channels), np.uint8) as put:
                for _, rows in iter_npz_rows(raw_npz, key, chunk, f"task {info.flag}"):
                    if rows.ndim == 4 and rows.shape[-1] == 1:  # grayscale stored N x H x W x 1 (load_npz accepts it)
                        rows = rows[..., 0]
                    put(resize_images(rows, size))
            out.add(f"{split}_labels", labels[f"{split}_labels"])


def _validated_layout(raw_npz: str | Path, info: TaskInfo) -> tuple[dict[str, np.ndarray], dict[str, tuple]]:
    """The task's labels and image shapes, checked by the one validator (:func:`load_npz`); uncompressed images
    (MedMNIST's files) are memory-mapped there, so no pixel is read (a deflated member is, once, then let go).
    Labels and shapes come normalised (labels N x L integers, grayscale images N x H x W)."""
    data = load_npz(raw_npz, info, mmap=True)
    return ({k: v for k, v in data.items() if k.endswith("_labels")},
            {k: v.shape for k, v in data.items() if k.endswith("_images")})


# --------------------------------------------------------------------------------------------- the corpus
MAX_LISTED = 1000  # skipped files (and images left out as evaluation copies) listed per source in the report
LEAK_EXAMPLES = 5
UNITS_PER_TASK = 8  # units sent to a worker at once (files, or npz chunks of NPZ_CHUNK rows)


class CorpusError(ValueError):
    """The corpus cannot be built as declared (too many bad files, leakage); the message says where the report is."""


@dataclass
class SourceStats:
    """What one source contributed; the report's per-source entry."""

    kind: str
    license: str
    inputs: list[str]
    on_leak: str  # the source's policy for val/test copies: fail | drop
    files: int = 0  # files, or npz rows
    read: int = 0  # images (frames, slices) converted
    skipped: int = 0
    bad: int = 0  # skipped because unreadable/corrupt (the max_bad_fraction numerator)
    skipped_files: list[dict[str, Any]] = field(default_factory=list)
    ignored: int = 0  # files of other formats in a walked folder
    blank: int = 0  # constant frames/slices dropped
    duplicates: int = 0  # identical to an earlier image (this or an earlier source)
    leaked: int = 0  # identical to a validation/test image of an evaluation task (never kept)
    leaked_images: list[dict[str, str]] = field(default_factory=list)  # {image: origin, equals: "file:split[i]"}
    train_overlap: int = 0  # identical to a train image of an evaluation task (kept)
    kept: int = 0
    by_modality: dict[str, int] = field(default_factory=dict)

    def add_skips(self, skips: list[dict[str, Any]]) -> None:
        self.skipped += len(skips)
        self.bad += sum(s["bad"] for s in skips)
        room = MAX_LISTED - len(self.skipped_files)
        self.skipped_files.extend(skips[: max(room, 0)])

    def add_leak(self, origin: str, where: str) -> None:
        self.leaked += 1
        if len(self.leaked_images) < MAX_LISTED:
            self.leaked_images.append({"image": origin, "equals": where})


def preprocess_corpus(sources: list[dict[str, Any] | Source], out_dir: str | Path, size: int,
                      task_npzs: list[str | Path] = (), *, workers: int = 1, shard_size: int = store.DEFAULT_SHARD_SIZE,
                      max_bad_fraction: float = 0.01, on_leak: str = "fail", data: dict[str, Any] | None = None) -> dict:
    """Stream every source into a sharded store (dedup, leakage check, per-source report), atomically.

    Fails (nothing written but ``<out>.failed-report.json``) when a source has more than ``max_bad_fraction``
    unreadable files, or when an image equals a validation/test image of a task and the source's ``on_leak`` (else
    ``on_leak``, the corpus default) is ``fail``. With ``drop`` such images are left out and listed in the report."""
    srcs = [s if isinstance(s, Source) else source_from_dict(s, data) for s in sources]
    if not srcs:
        raise SourceError("corpus.sources is empty; declare at least one source")
    if dupes := sorted({s.name for s in srcs if [t.name for t in srcs].count(s.name) > 1}):
        raise SourceError(f"corpus.sources: names must be unique; repeated: {dupes}")
    if on_leak not in ON_LEAK:
        raise ValueError(f"on_leak must be one of {ON_LEAK}, got {on_leak!r}")
    t0 = time.perf_counter()
    evals = evaluation_hashes(task_npzs)
    out = Path(out_dir)
    failed = failed_report_path(out)
    stats = {i: SourceStats(s.kind, s.license, source_inputs(s), s.leak_policy(on_leak)) for i, s in enumerate(srcs)}
    ignored: dict[str, int] = {}
    leaks: list[str] = []
    with atomic_dir(out) as tmp:
        writer = store.StoreWriter(tmp, (size, size, 3), shard_size)
        seen: set[bytes] = set()
        next_note = time.perf_counter() + 30
        for res in run_units(iter_units(srcs, ignored), srcs, size, workers):
            st, src = stats[res.source], srcs[res.source]
            st.files += res.inputs
            st.blank += res.blank
            st.add_skips(res.skipped)
            for origin, modality, img, h in res.images:
                st.read += 1
                key = bytes.fromhex(h)
                if key in seen:
                    st.duplicates += 1
                    continue
                seen.add(key)
                split, where = evals.get(h, ("", ""))
                if split in ("val", "test"):
                    st.add_leak(origin, where)
                    if len(leaks) < LEAK_EXAMPLES:
                        leaks.append(f"{src.name}:{origin} = {where}")
                    continue
                st.train_overlap += split == "train"
                writer.add(img, src.name, modality, h, origin)
                st.kept += 1
                st.by_modality[modality] = st.by_modality.get(modality, 0) + 1
            if time.perf_counter() > next_note:
                next_note += 30
                print(f"[preprocess] corpus: {sum(s.read for s in stats.values())} images read, {writer.n} kept "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
        manifest = writer.close()
        for i, s in enumerate(srcs):
            stats[i].ignored = ignored.get(s.name, 0)
        report = corpus_report(srcs, stats, manifest, evals, leaks, task_npzs, size, workers,
                               time.perf_counter() - t0, on_leak, max_bad_fraction)
        if problems := corpus_problems(srcs, stats, report, max_bad_fraction):
            write_json(failed, report)
            raise CorpusError("\n".join(problems) + f"\nThe full report (paths and reasons): {failed}")
        write_json(tmp / store.REPORT, report)
    failed.unlink(missing_ok=True)
    return report


def failed_report_path(out_dir: str | Path) -> Path:
    """Where a failed build leaves its report: next to the store, outside any output a scheduler deletes."""
    out = Path(out_dir)
    return out.parent / f"{out.name}.failed-report.json"


def run_units(units: Iterator, sources: list[Source], size: int, workers: int) -> Iterator[UnitResult]:
    """Convert units in order with ``workers`` processes, at most a few batches in flight (constant memory)."""
    if workers <= 1:
        for u in units:
            yield convert_unit(u, sources[u.source], size)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(tuple(sources), size)) as pool:
        pending: deque = deque()
        for batch in _batched(units, UNITS_PER_TASK):
            pending.append(pool.apply_async(_convert_batch, (batch,)))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


_WORKER: tuple[tuple[Source, ...], int] = ((), 0)


def _init_worker(sources: tuple[Source, ...], size: int) -> None:
    global _WORKER
    _WORKER = (sources, size)


def _convert_batch(units: list) -> list[UnitResult]:
    sources, size = _WORKER
    return [convert_unit(u, sources[u.source], size) for u in units]


def _batched(items: Iterator, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def corpus_report(srcs: list[Source], stats: dict[int, SourceStats], manifest: dict, evals: dict, leaks: list[str],
                  task_npzs, size: int, workers: int, seconds: float, on_leak: str, max_bad_fraction: float) -> dict:
    """The stage's record: totals, leakage, and per source what was read, skipped (path, reason), kept."""
    by_modality: dict[str, int] = {}
    for st in stats.values():
        for m, c in st.by_modality.items():
            by_modality[m] = by_modality.get(m, 0) + c
    per_source = {}
    for i, s in enumerate(srcs):
        d = asdict(stats[i])
        d["skipped_files_omitted"] = stats[i].skipped - len(stats[i].skipped_files)
        d["leaked_images_omitted"] = stats[i].leaked - len(stats[i].leaked_images)
        per_source[s.name] = d
    read = sum(st.read for st in stats.values())
    return {
        "image_size": size, "n_images": manifest["n_images"], "shards": len(manifest["shards"]),
        "shard_size": manifest["shard_size"], "by_modality": dict(sorted(by_modality.items())),
        "workers": workers, "seconds": round(seconds, 2), "images_per_second": round(read / max(seconds, 1e-9), 1),
        "max_bad_fraction": max_bad_fraction, "on_leak": on_leak,
        "leakage": {"checked_against": [Path(p).name for p in task_npzs], "evaluation_images": len(evals),
                    "val_test": sum(st.leaked for st in stats.values()),
                    "train": sum(st.train_overlap for st in stats.values()), "examples": leaks},
        "sources": per_source,
    }


def corpus_problems(srcs: list[Source], stats: dict[int, SourceStats], report: dict,
                    max_bad_fraction: float) -> list[str]:
    """Reasons to refuse the corpus (empty sources, too many bad files, leakage); prints the warnings."""
    problems = []
    for i, s in enumerate(srcs):
        st = stats[i]
        if st.files == 0:
            problems.append(f"{s.where}: found nothing to read in {', '.join(st.inputs)}")
        elif st.bad > max_bad_fraction * st.files:
            problems.append(f"{s.where}: {st.bad} of {st.files} files are unreadable ({st.bad / st.files:.1%} > "
                            f"corpus.max_bad_fraction={max_bad_fraction}), e.g. {st.skipped_files[0]['path']}: "
                            f"{st.skipped_files[0]['reason']}")
        if st.train_overlap and s.kind != "medmnist":
            print(f"[preprocess] warning: {s.where}: {st.train_overlap} images equal train images of an evaluation "
                  "task (kept: pretraining may see probe-training images, never val/test ones)", flush=True)
        if not st.leaked:
            continue
        examples = "; ".join(f"{s.name}:{e['image']} = {e['equals']}" for e in st.leaked_images[:LEAK_EXAMPLES])
        if st.on_leak == "fail":
            problems.append(f"{s.where}: {st.leaked} corpus images are identical to evaluation images (validation/test "
                            f"splits), e.g. {examples}; the corpus must not contain them: remove them from the source "
                            "(or set on_leak: drop for this source, or corpus.on_leak: drop, to leave them out)")
        else:
            print(f"[preprocess] {s.where}: {st.leaked} images equal validation/test images and were left out "
                  f"(on_leak: drop), e.g. {examples}", flush=True)
    if not problems and report["n_images"] == 0:
        total = {k: sum(getattr(st, k) for st in stats.values()) for k in ("files", "skipped", "blank", "duplicates",
                                                                            "leaked")}
        problems.append(f"the corpus is empty: of {total['files']} input(s), {total['skipped']} skipped (not images: "
                        f"reports, unsupported DICOM modalities, ...), {total['blank']} blank frame(s), "
                        f"{total['duplicates']} duplicate(s), {total['leaked']} left out as evaluation images")
    return problems


def evaluation_hashes(task_npzs: list[str | Path]) -> dict[str, tuple[str, str]]:
    """Content hash (as RGB, the corpus convention) -> (split, "file:split[i]") for every image of these tasks.

    A hash found in several splits is reported under the held-out one (val/test win over train). The files are
    streamed a chunk at a time, so large tasks (PathMNIST at 224 px) are never held in memory."""
    out: dict[str, tuple[str, str]] = {}
    for path in task_npzs:
        name = Path(path).name
        for split in SPLITS:  # train, val, test: later splits overwrite
            for start, rows in iter_npz_rows(path, f"{split}_images", 1024, "evaluation task"):
                for i, im in enumerate(rows, start):
                    rgb = im if im.ndim == 3 else np.repeat(im[..., None], 3, axis=-1)
                    out[store.content_hash(rgb)] = (split, f"{name}:{split}[{i}]")
    return out


def log_corpus_report(report: dict, report_path: str | Path, uri: str, experiment: str) -> str | None:
    """Log the report to MLflow (a run tagged stage=preprocess) when the tracking store exists; never creates it.

    Tracking is a record, not a requirement: a missing store or a logging error prints a note and returns None."""
    from biovfm import tracking

    resolved = tracking.resolve_uri(uri)
    if resolved.startswith("sqlite:///") and not Path(resolved[len("sqlite:///"):]).is_file():
        print(f"[preprocess] MLflow store {resolved} does not exist yet: report not logged "
              "(the workflow creates it first, in the mlflow_init rule)", flush=True)
        return None
    try:
        params = {"image_size": report["image_size"], "shard_size": report["shard_size"], "on_leak": report["on_leak"],
                  "max_bad_fraction": report["max_bad_fraction"],
                  "sources": {n: {"kind": s["kind"], "license": s["license"], "inputs": ", ".join(s["inputs"]),
                                  **({"on_leak": s["on_leak"]} if "on_leak" in s else {})}  # older reports lack it
                              for n, s in report["sources"].items()}}
        tags = {"stage": "preprocess"}
        if examples := report["leakage"]["examples"]:  # the images left out as copies of val/test images
            tags["leaked_examples"] = "; ".join(examples)
        run = tracking.Run(uri, experiment, name="preprocess/corpus", tags=tags, params=params,
                           start_time=int((time.time() - report["seconds"]) * 1000))  # spans the stage's work
        metrics = {"n_images": report["n_images"], "seconds": report["seconds"],
                   "images_per_second": report["images_per_second"], "leaked": report["leakage"]["val_test"],
                   "train_overlap": report["leakage"]["train"]}
        metrics.update({f"modality.{m}": c for m, c in report["by_modality"].items()})
        for name, s in report["sources"].items():
            metrics.update({f"source.{name}.{k}": s[k] for k in ("files", "read", "skipped", "bad", "blank",
                                                                  "duplicates", "leaked", "kept")})
        run.log_metrics(metrics)
        if run.run_id is not None:  # offline (server down): the Run already warned once; the report stays on disk
            run.client.log_artifact(run.run_id, str(report_path))
        run.finish()
        return run.run_id
    except Exception as e:  # noqa: BLE001 - tracking must not fail a stage whose outputs are complete
        print(f"[preprocess] warning: report not logged to MLflow ({type(e).__name__}: {e})", flush=True)
        return None
