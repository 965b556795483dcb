"""Peak anonymous memory of every data-touching stage at N and at 4N images: is memory bounded by the batch?

    python benchmarks/memory_scaling.py [--n 14000] [--size 224] [--workdir DIR] [--keep] [--quick]
        [--stages preprocess_task ... evaluate_raw_pixels] [--mem-limit-gib G] [--interval 0.05]
    python benchmarks/memory_scaling.py --n 2000 --quick        # a smoke run of about a minute

The goal it checks: at 224 px on 10^5-10^6 images no stage may hold a task or the corpus in RAM, so a stage's
peak at 4N images must stay within 1.3x its peak at N.

What it does, in ``--workdir`` (a new folder under /tmp by default, removed at the end unless ``--keep``):
  * writes a synthetic PathMNIST-layout task (RGB, 9 classes) at ``--size`` px twice: a train split of N images and
    one of 4N (val and test N/8 each, scaled alike), chunk by chunk with :func:`biovfm.io.stream_npz` (never whole
    in memory). 14,000 train images at 224 px are 2.1 GB; the 4N task is 10.5 GB with its val/test splits;
  * runs each stage as its own ``biovfm`` process with the arguments its Snakemake rule gives it (job JSON from
    :mod:`biovfm.config` as in workflow/rules/common.smk), once on the N data and once on the 4N data:
    ``preprocess_task`` (the task resized to half size, so every image is resized), ``preprocess_corpus`` (a
    ``medmnist``-kind source: the task's train split, checked for leakage against the task), ``pretrain_mae`` and
    ``pretrain_dino`` (femto with 16-px patches, a few small steps; data_size N and 4N of the 4N store, as the
    study's grid does), ``evaluate_random_init`` (femto, random weights) and ``evaluate_raw_pixels`` on the N and
    the 4N task, and ``show_tasks`` (the task-example figure);
  * samples ``RssAnon`` of the stage's process and all its descendants (from /proc, every ``--interval`` s, in a
    thread of this process) and keeps the peak of the sum. Memory-mapped file pages and the page cache are
    file-backed, not anonymous, so they do not count: what counts is what the stage allocated. A stage above
    ``--mem-limit-gib`` is stopped and reported as over the limit (the machine may be shared). The sum of
    ``Pss_Anon`` is sampled alongside: forked workers (the corpus readers) share their parent's pages
    copy-on-write, which RssAnon counts once per process and Pss_Anon once in all.

Reading the table: ``ratio`` = peak at 4N / peak at N. A stage that streams has a ratio near 1 (its peak is the
interpreter, torch, a batch and the outputs that are inherently per image, such as the probe's feature matrix);
a stage that loads its data has a ratio near 4 once the data outweighs the interpreter.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from biovfm import config as cfg
from biovfm.data.medmnist import npz_name
from biovfm.io import stream_npz

REPO = Path(__file__).resolve().parents[1]
FLAG = "pathmnist"  # RGB, 9 classes, histology: the corpus modality of the study's `histology` mix
N_CLASSES = 9
N_TEMPLATES = 64  # smooth base images; each image is one of them plus its own noise (so no two are equal)
CHUNK = 256  # images generated and written at a time
GOAL = 1.3  # peak at 4N / peak at N
STAGES = ("preprocess_task", "preprocess_corpus", "pretrain_mae", "pretrain_dino", "evaluate_random_init",
          "evaluate_raw_pixels", "show_tasks")
MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------- synthetic data
def templates(size: int, seed: int) -> np.ndarray:
    """``N_TEMPLATES`` smooth RGB images (low-frequency sinusoids) in 0..223: structure for a probe to find."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((N_TEMPLATES, size, size, 3), np.uint8)
    for k in range(N_TEMPLATES):
        fx, fy, phase = rng.uniform(0.5, 4, (3, 2)), rng.uniform(0.5, 4, (3, 2)), rng.uniform(0, 2 * np.pi, (3, 2))
        chans = [np.sin(2 * np.pi * (fx[c, 0] * xx + fy[c, 0] * yy) + phase[c, 0])
                 * np.cos(2 * np.pi * (fx[c, 1] * xx - fy[c, 1] * yy) + phase[c, 1]) for c in range(3)]
        out[k] = np.rint((np.stack(chans, -1) + 1) * 111.5).astype(np.uint8)
    return out


def image_chunks(n: int, base: np.ndarray, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``n`` images (template + noise 0..31) and their labels (template id mod 9), ``CHUNK`` at a time."""
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        ids = rng.integers(0, N_TEMPLATES, m)
        noise = np.frombuffer(rng.bytes(m * base[0].size), np.uint8).reshape(m, *base.shape[1:]) >> 3
        yield base[ids] + noise, (ids % N_CLASSES).astype(np.int64)[:, None]


def write_task(path: Path, n_train: int, size: int, seed: int) -> int:
    """A PathMNIST-layout npz with ``n_train`` train images (val and test: n_train / 8 each); returns its images."""
    base = templates(size, seed)
    rng = np.random.default_rng(seed + 1)
    n_eval = max(n_train // 8, 32)
    with stream_npz(path) as out:
        for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
            labels = []
            with out.member(f"{split}_images", (n, size, size, 3), np.uint8) as put:
                for images, y in image_chunks(n, base, rng):
                    put(images)
                    labels.append(y)
            out.add(f"{split}_labels", np.concatenate(labels))
    return n_train + 2 * n_eval


# --------------------------------------------------------------------------------------------- measurement
def _field_kib(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def anon_kib(pid: int) -> tuple[int, int]:
    """(``RssAnon``, ``Pss_Anon``) of one process in KiB, (0, 0) once it is gone. RssAnon counts the anonymous pages
    a forked worker still shares with its parent in both; Pss_Anon splits them, so its sum over a tree is exact."""
    return _field_kib(f"/proc/{pid}/status", "RssAnon:"), _field_kib(f"/proc/{pid}/smaps_rollup", "Pss_Anon:")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its living descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    todo.extend(int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split())
    return out


@dataclass
class Measurement:
    peak_mib: float  # summed RssAnon
    pss_mib: float  # summed Pss_Anon
    wall_s: float
    status: str  # ok | failed | over limit


def measure(cmd: list[str], cwd: Path, log: Path, interval: float, limit_mib: float) -> Measurement:
    """Run ``cmd`` to completion, sampling the anonymous memory of its process tree; stop it above ``limit_mib``."""
    peak, pss, over = 0, 0, False
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak, pss, over
            while not done.is_set():
                rss_pss = [anon_kib(p) for p in process_tree(proc.pid)]
                peak, pss = max(peak, sum(r for r, _ in rss_pss)), max(pss, sum(q for _, q in rss_pss))
                if peak * 1024 > limit_mib * MIB and not over:
                    over = True
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                done.wait(interval)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        done.set()
        thread.join()
    status = "over limit" if over else "ok" if rc == 0 else "failed"
    if status == "failed":
        print(f"  {cmd[1]} failed (exit {rc}); the end of {log}:\n" + "\n".join(log.read_text().splitlines()[-15:]))
    return Measurement(peak / 1024, pss / 1024, wall, status)


# --------------------------------------------------------------------------------------------- the study
def bench_params(size: int, n: int, workdir: Path, quick: bool) -> dict:
    """params.yaml for this benchmark: one task at ``size`` px, femto with 16-px patches, short runs."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["data"].update(image_size=size, tasks=[FLAG])
    p["grid"] = {"methods": ["mae", "dino"], "models": ["femto"], "modalities": ["histology"],
                 "data_sizes": [n, 4 * n], "seeds": [0]}
    p["models"] = {"femto": {"embed_dim": 32, "depth": 3, "num_heads": 2, "patch_size": 16}}
    steps = 2 if quick else 6
    p["pretrain"].update(steps=steps, batch_size=32, checkpoint_every=1000, log_every=1)
    p["methods"]["dino"]["pretrain"].update(steps=steps, batch_size=16, checkpoint_every=1000)
    p["evaluate"]["probe"].update(epochs=1 if quick else 3, max_grid_extensions=0)
    p["corpus"]["sources"] = [{"name": "task", "kind": "medmnist", "flags": [FLAG], "size": size,
                               "root": str(workdir / "4n" / "raw"), "license": "generated"}]  # the 4N train split
    p["tracking"] = {"uri": f"sqlite:///{workdir / 'mlflow.db'}", "experiment": "memory-scaling"}
    return cfg.validate_params(p, source="memory_scaling")


@dataclass(frozen=True)
class Scale:
    """The files of one scale (N or 4N). The raw task is also the processed task at the study's size (same name)."""

    name: str
    n: int
    root: Path
    size: int

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def task(self) -> Path:
        return self.raw / npz_name(FLAG, self.size)

    @property
    def store(self) -> Path:
        return self.root / "store"


def corpus_spec(p: dict, s: Scale) -> str:
    """The corpus section as the preprocess_corpus rule passes it; its one source is the train split of ``s``."""
    src = p["corpus"]["sources"][0] | {"root": str(s.raw)}
    return json.dumps({k: v for k, v in p["corpus"].items() if k != "threads"} | {"sources": [src]}, sort_keys=True)


def stage_command(stage: str, p: dict, s: Scale, store: Path) -> tuple[list[str], Path]:
    """The ``biovfm`` command of ``stage`` on scale ``s`` as its rule runs it, and its output folder."""
    biovfm = str(Path(sys.executable).with_name("biovfm"))
    size = p["data"]["image_size"]
    out = s.root / "out" / stage
    if stage == "preprocess_task":
        return [biovfm, "preprocess-task", "--task", FLAG, "--info=", "--raw", str(s.task), "--size", str(size // 2),
                "--out", str(out / f"{FLAG}_{size // 2}.npz")], out
    if stage == "preprocess_corpus":
        return [biovfm, "preprocess-corpus", "--spec", corpus_spec(p, s), "--size", str(size), "--tasks", str(s.task),
                "--workers", str(p["corpus"]["threads"]), "--tracking-uri", p["tracking"]["uri"],
                "--experiment", p["tracking"]["experiment"], "--out", str(store)], store
    if stage.startswith("pretrain_"):
        method = stage.removeprefix("pretrain_")
        job = cfg.to_json(cfg.pretrain_job(p, method, "femto", "histology", s.n, 0, "memory-scaling"))
        t = cfg.train_settings(p, method)
        return [biovfm, "pretrain", "--job", job, "--corpus", str(store), "--threads", str(max(t.threads, t.nproc)),
                "--processes", str(t.nproc), "--gpus", "0", "--out", str(out)], out
    if stage == "show_tasks":
        return [biovfm, "show-tasks", "--tasks", str(s.task), "--out", str(out / "task_examples.png")], out
    kind = stage.removeprefix("evaluate_")
    model, run = ("femto", cfg.random_init_id("femto", 0)) if kind == "random_init" else (None, cfg.RAW_PIXELS_ID)
    job = cfg.to_json(cfg.eval_job(p, kind, run, model, 0, {"method": kind, "modality": "", "data_size": 0},
                                   "memory-scaling"))
    gpus = ["--gpus", "0"] if kind == "random_init" else []  # as the rules: the raw-pixel probe is a CPU job
    return [biovfm, "evaluate", "--job", job, "--tasks", str(s.raw), "--threads", str(p["evaluate"]["threads"]), *gpus,
            "--out", str(out / "eval.json")], out


def run_stages(stages: list[str], p: dict, scales: list[Scale], workdir: Path, interval: float,
               limit_mib: float) -> dict[str, list[Measurement | None]]:
    """Every stage at every scale, in pipeline order; outputs are deleted once measured (disk, not memory, is short).

    Pretraining reads the largest scale's store with data_size N and 4N (one corpus, as the study's grid has it)."""
    results: dict[str, list[Measurement | None]] = {}
    corpus = scales[-1].store
    last_pretrain = max((i for i, st in enumerate(stages) if st.startswith("pretrain_")), default=-1)
    for i, stage in enumerate(stages):
        results[stage] = []
        for s in scales:
            if stage.startswith("pretrain_") and not (corpus / "index.csv").is_file():
                print(f"  {stage:20} {s.name:3}: skipped (no corpus store: preprocess_corpus did not run or failed)")
                results[stage].append(None)
                continue
            cmd, out = stage_command(stage, p, s, s.store if stage == "preprocess_corpus" else corpus)
            m = measure(cmd, workdir, workdir / f"{stage}_{s.name}.log", interval, limit_mib)
            print(f"  {stage:20} {s.name:3}: peak RssAnon {m.peak_mib:6.0f} MiB, Pss_Anon {m.pss_mib:6.0f} MiB, "
                  f"{m.wall_s:6.1f} s ({m.status})", flush=True)
            results[stage].append(m)
            if out != corpus:
                shutil.rmtree(out, ignore_errors=True)
        if i == last_pretrain:
            shutil.rmtree(corpus, ignore_errors=True)
    return results


def verdict(ms: list[Measurement | None]) -> tuple[str, str]:
    """(ratio, verdict) of one stage's two measurements; a stage stopped at the limit at 4N only has grown."""
    small, large = ms
    if small is not None and small.status == "ok" and large is not None and large.status == "over limit":
        return f">{large.peak_mib / small.peak_mib:.1f}", "GROWS with the data (stopped at the limit at 4N)"
    if any(m is None or m.status != "ok" for m in ms):
        return "-", "not measured (" + " / ".join(m.status if m else "skipped" for m in ms) + ")"
    ratio = large.peak_mib / small.peak_mib
    return f"{ratio:.2f}", "bounded" if ratio <= GOAL else f"GROWS with the data (> {GOAL}x)"


def print_table(results: dict[str, list[Measurement | None]], n: int) -> None:
    head = (f"{'stage':20} | {'peak RssAnon at N (MiB)':>23} | {'at 4N (MiB)':>11} | {'ratio':>5} | "
            f"{'Pss_Anon N / 4N':>15} | {'wall s N / 4N':>13} | verdict")
    print(f"\nN = {n:,} train images, 4N = {4 * n:,}; goal: peak at 4N <= {GOAL} x peak at N")
    print(f"{head}\n{'-' * len(head)}")
    for stage, ms in results.items():
        ratio, word = verdict(ms)
        peaks = [f"{m.peak_mib:.0f}" if m else "-" for m in ms]
        pss = " / ".join(f"{m.pss_mib:.0f}" if m else "-" for m in ms)
        walls = " / ".join(f"{m.wall_s:.0f}" if m else "-" for m in ms)
        print(f"{stage:20} | {peaks[0]:>23} | {peaks[1]:>11} | {ratio:>5} | {pss:>15} | {walls:>13} | {word}")


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mem_available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=14_000, help="train images at the small scale (the large one has 4x)")
    ap.add_argument("--size", type=int, default=224, choices=(224, 128), help="image side (a MedMNIST+ size)")
    ap.add_argument("--workdir", default=None, help="folder for the data and outputs (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir (data, outputs, one log per stage)")
    ap.add_argument("--quick", action="store_true", help="2 training steps and 1 probe epoch (a smoke run)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--mem-limit-gib", type=float, default=None,
                    help="stop a stage whose RssAnon exceeds this (default: 60%% of MemAvailable at start)")
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between memory samples")
    a = ap.parse_args(argv)
    limit_mib = a.mem_limit_gib * 1024 if a.mem_limit_gib else 0.6 * mem_available_mib()
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="memory_scaling_", dir="/tmp")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; MemAvailable {mem_available_mib() / 1024:.1f} GiB; "
          f"stage limit {limit_mib / 1024:.1f} GiB; workdir {workdir}")
    t_all = time.perf_counter()
    try:
        p = bench_params(a.size, a.n, workdir, a.quick)
        scales = [Scale("N", a.n, workdir / "n", a.size), Scale("4N", 4 * a.n, workdir / "4n", a.size)]
        for i, s in enumerate(scales):
            t0 = time.perf_counter()
            images = write_task(s.task, s.n, a.size, seed=i)
            print(f"  data {s.name:3}: {images:,} images at {a.size} px ({s.task.stat().st_size / 2**30:.2f} GiB) "
                  f"written in {time.perf_counter() - t0:.0f} s", flush=True)
        subprocess.run([str(Path(sys.executable).with_name("biovfm")), "mlflow-init", "--uri", p["tracking"]["uri"],
                        "--experiment", p["tracking"]["experiment"], "--out", str(workdir / "mlflow_init.json")],
                       check=True, capture_output=True)
        results = run_stages(a.stages, p, scales, workdir, a.interval, limit_mib)
        print_table(results, a.n)
        print(f"total wall time {time.perf_counter() - t_all:.0f} s")
    finally:
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
