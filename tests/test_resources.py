"""Running out of resources: a full disk while a checkpoint, a corpus shard or a result table is written, and a job
that runs out of memory. Real parts only: a small tmpfs filled up by a file (so the write stops part-way with
ENOSPC), real training steps, a real `biovfm` process under an address-space limit.

What each case promises: the job fails with a one-line message naming the output and the problem, a hint saying
what to do, the previous good state left as it was (nothing half-written at the output's name, no temp files), and
the same command, rerun once there is room, ending as an uninterrupted run would."""
from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from biovfm import cli, tracking
from biovfm.config import ModelSpec, PretrainJob, pretrain_job, to_json
from biovfm.data import store
from biovfm.data.preprocess import failed_report_path
from biovfm.io import DiskFullError, atomic_path, free_bytes, write_text
from biovfm.methods import build_method
from biovfm.models.vit import build_encoder
from biovfm.train.checkpoint import load_state, save_state
from biovfm.train.engine import CHECKPOINT, fingerprint

DISK_KIB = 8192  # the tmpfs: more than NEARLY_FULL (1 MiB) when empty, so a write error there is not a full disk
FILLER = "filler"
HINT = ("hint: the disk holding {} is full (No space left on device); free space there or point the study at a bigger "
        "disk, then rerun the same command: finished outputs are kept and nothing half-written is taken as done")
BIOVFM = Path(sys.executable).parent / "biovfm"  # the installed entry point of this venv


class SmallDisk:
    """A tmpfs mounted for one test: outputs go on it, and a filler file takes its space away."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.page = os.statvfs(path).f_frsize

    def free(self) -> int:
        return free_bytes(self.path)

    def fill(self, leave: int) -> None:
        """Leave ``leave`` bytes free (rounded down to whole pages, tmpfs's unit)."""
        leave = leave // self.page * self.page
        size = self.free() - leave
        assert size > 0, f"the {DISK_KIB} KiB disk has only {self.free()} bytes free; {leave} should be left"
        with open(self.path / FILLER, "wb") as f:
            f.write(bytes(size))
        assert self.free() == leave, f"filled {size} bytes, {self.free()} left instead of {leave}"

    def unfill(self) -> None:
        (self.path / FILLER).unlink()


@pytest.fixture
def small_disk(tmp_path) -> Iterator[SmallDisk]:
    """A real small disk (tmpfs, unmounted afterwards); skipped where mounting one is not allowed."""
    if os.geteuid() != 0:
        pytest.skip("disk-full tests need root to mount a small tmpfs: not running as root")
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_KIB}k", "tmpfs", str(mount)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"disk-full tests need root to mount a small tmpfs: {e}")
    if r.returncode:
        pytest.skip(f"disk-full tests need root to mount a small tmpfs: mount exited {r.returncode}: {r.stderr.strip()}")
    try:
        yield SmallDisk(mount)
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)  # a file still open: detach it


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> Iterator[str]:
    """One MLflow store for the module (creating one takes seconds): the jobs' runs are not what is checked here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
        tracking.init_store(uri, "test")
        yield uri


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temps(folder: Path) -> list[str]:
    """Temp files and folders of atomic writes (``.<name>.<host>-<pid>.<random>.tmp``/``.old``) in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------- disk full
def checkpoint_job(params: dict, uri: str) -> PretrainJob:
    """A tiny MAE job whose states (steps 2 and 4 of 6) are mostly tensors, so their size is predictable."""
    job = pretrain_job(params, "mae", "femto", "all", 60, 0)
    return replace(job, model=ModelSpec("pico", embed_dim=64, depth=2, num_heads=2, patch_size=4),
                   tracking={"uri": uri, "experiment": "test"},
                   train=replace(job.train, steps=6, checkpoint_every=2, log_every=2, threads=1))


def state_bytes(job: PretrainJob) -> int:
    """About the size of one training state of ``job``: the model's tensors, AdamW's two moments of each trainable
    parameter, and 64 KiB for the zip records, the RNG state and the history (within a few % here)."""
    method = build_method(job.method, build_encoder(job.model, job.image_size, job.in_chans), job.method_cfg,
                          job.image_size, job.in_chans)
    model = sum(t.numel() * t.element_size() for t in method.state_dict().values())
    moments = 2 * sum(p.numel() * p.element_size() for p in method.parameters() if p.requires_grad)
    return model + moments + (64 << 10)


def encoder_file(path: Path) -> tuple[dict[str, str], dict[str, bytes]]:
    """A safetensors file's metadata and tensors (as bytes). Not the file's bytes: safetensors writes the metadata
    keys in hash-map order, which changes from process to process."""
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def test_disk_full_while_checkpointing_fails_the_job_and_it_resumes_from_the_previous_checkpoint(
        params, corpus_dir, store_uri, small_disk, tmp_path, capsys):
    """The disk fills up between two checkpoints: the second one fails the job (it must not train on without one),
    the first stays verified and resumable, and after freeing space the same command ends with the weights and
    history of an uninterrupted run."""
    job = checkpoint_job(params, store_uri)
    argv = ["pretrain", "--job", to_json(job), "--corpus", str(corpus_dir), "--out"]
    straight = tmp_path / "straight"
    assert cli.main(argv + [str(straight)]) == 0, capsys.readouterr().err
    out = small_disk.path / "run"
    small_disk.fill(leave=3 * state_bytes(job) // 2)  # room for the state of step 2, not for that of step 4 too
    capsys.readouterr()

    assert cli.main(argv + [str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    first, second = out / "state-000000002.pt", out / "state-000000004.pt"
    assert sorted(os.listdir(out)) == ["mlflow.json", first.with_suffix(".json").name, first.name], \
        f"expected the disk to fill up during the second checkpoint; stderr: {err[:2]}"
    assert err[0].startswith(f"biovfm pretrain: error: {second}: not written: the disk holding it is full (No space "
                             "left on device"), err[0]
    assert err[0].endswith("the half-written temp file was removed and any earlier state-000000004.pt is unchanged")
    assert err[1] == HINT.format(second)
    assert json.loads(first.with_suffix(".json").read_text())["sha256"] == sha256(first)  # as written and verified
    assert load_state(out, job.run_id, fingerprint(job))["step"] == 2

    small_disk.unfill()
    assert cli.main(argv + [str(out)]) == 0, capsys.readouterr().err
    assert f"{job.run_id}: resuming from step 2" in capsys.readouterr().out
    assert encoder_file(out / CHECKPOINT) == encoder_file(straight / CHECKPOINT)
    assert (out / "history.csv").read_text() == (straight / "history.csv").read_text()
    assert not list(out.glob("state-*")) and not temps(out)


def test_disk_full_between_a_state_and_its_sidecar_leaves_no_orphan_state(small_disk, tmp_path):
    """Room for a state file but not for its sidecar (the record that makes it count): the state is removed too,
    the previous state stays the one a resume loads, and with room again the save completes."""
    run, fp = "mae/pico/all/n60/s0", "abc"

    def state(step: int) -> dict:
        return {"run_id": run, "fingerprint": fp, "step": step, "w": torch.arange(100_000, dtype=torch.float32) * step}

    size = save_state(tmp_path / "sizing", state(4)).stat().st_size  # the same bytes but for the name: same size
    out = small_disk.path / "run"
    save_state(out, state(2))
    before = snapshot(out)
    small_disk.fill(leave=-(-size // small_disk.page) * small_disk.page)  # whole pages for the state file, no more
    with pytest.raises(DiskFullError) as e:
        save_state(out, state(4))
    assert e.value.filename == str(out / "state-000000004.json")
    assert str(e.value).startswith(f"{out / 'state-000000004.json'}: not written: the disk holding it is full")
    assert snapshot(out) == before and not temps(out)
    assert load_state(out, run, fp)["step"] == 2
    small_disk.unfill()
    save_state(out, state(4))
    assert load_state(out, run, fp)["step"] == 4


def write_pngs(folder: Path, first: int, n: int) -> None:
    """``n`` distinct 16 x 16 RGB scans named by number."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(first, first + n):
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{k:04d}.png")


def test_disk_full_while_writing_corpus_shards_keeps_the_previous_store(small_disk, tmp_path, capsys):
    """A rebuild of the corpus store runs out of space in the middle of its shards: the store folder is the previous
    one, byte for byte, no temp folder or failure report is left, and once there is room the same command builds
    what a build on a roomy disk builds."""
    scans = tmp_path / "scans"
    write_pngs(scans, 0, 24)
    spec = {"sources": [{"name": "scans", "kind": "folder", "path": str(scans), "modality": "xray"}], "shard_size": 8}
    argv = ["preprocess-corpus", "--spec", json.dumps(spec), "--size", "16", "--out"]
    corpus = small_disk.path / "corpus"
    assert cli.main(argv + [str(corpus)]) == 0, capsys.readouterr().err
    previous = snapshot(corpus)
    write_pngs(scans, 24, 200)  # more scans arrive: the rebuild writes 28 shards
    reference = tmp_path / "reference"
    assert cli.main(argv + [str(reference)]) == 0, capsys.readouterr().err
    need = sum(-(-len(b) // small_disk.page) * small_disk.page for b in snapshot(reference).values())
    small_disk.fill(leave=need // 2)
    capsys.readouterr()

    assert cli.main(argv + [str(corpus)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"biovfm preprocess-corpus: error: {corpus}: not written: the disk holding it is full "
                             "(No space left on device"), err[0]
    assert err[0].endswith("the half-written temp folder was removed and any earlier corpus is unchanged")
    assert err[1] == HINT.format(corpus)
    assert snapshot(corpus) == previous
    assert sorted(os.listdir(small_disk.path)) == ["corpus", FILLER]  # no temp folder, no failed-build report
    assert not failed_report_path(corpus).exists()

    small_disk.unfill()
    assert cli.main(argv + [str(corpus)]) == 0, capsys.readouterr().err
    built, expected = snapshot(corpus), snapshot(reference)
    report, expected_report = (json.loads(d.pop(store.REPORT)) for d in (built, expected))
    assert built == expected  # index, manifest and every shard
    timing = ("seconds", "images_per_second")
    assert {k: v for k, v in report.items() if k not in timing} == {
        k: v for k, v in expected_report.items() if k not in timing}
    assert report["n_images"] == 224 and not temps(small_disk.path)


def test_disk_full_while_writing_a_result_table_keeps_the_previous_table(small_disk, tmp_path, capsys):
    """The aggregate step rewrites a results table on a disk that fills up part-way: the previous table stays,
    byte for byte, the error names the table, and with room again the table is the one a roomy disk gets. A write
    error that is not about space is not reported as a full disk."""
    rng = np.random.default_rng(0)

    def points(n: int) -> str:
        return pd.DataFrame({"kind": "pretrained", "method": "mae", "model": "pico", "task": [f"task{i % 12}" for i in
                             range(n)], "auc": rng.random(n), "auc_lo": rng.random(n), "auc_hi": rng.random(n)}
                            ).to_csv(index=False)

    table = small_disk.path / "results" / "tables" / "points.csv"
    old, new = points(20), points(4000)
    write_text(table, old)
    small_disk.fill(leave=len(new) // 2)
    with pytest.raises(DiskFullError) as e:
        write_text(table, new)
    assert str(e.value).startswith(f"{table}: not written: the disk holding it is full (No space left on device")
    assert table.read_text() == old and os.listdir(table.parent) == ["points.csv"]
    cli.report_error("aggregate", e.value)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"biovfm aggregate: error: {e.value}" and err[1] == HINT.format(table)

    small_disk.unfill()
    write_text(table, new)
    write_text(tmp_path / "points.csv", new)
    assert table.read_bytes() == (tmp_path / "points.csv").read_bytes() and os.listdir(table.parent) == ["points.csv"]
    assert small_disk.free() > (1 << 20)
    with pytest.raises(OSError) as e:
        with atomic_path(table):
            raise OSError("the source went away")  # not about space, on a disk with room: passed on as it is
    assert not isinstance(e.value, DiskFullError) and table.read_text() == new


# --------------------------------------------------------------------------------------------- out of memory
def big_image_corpus(folder: Path, size: int = 512, n: int = 32) -> Path:
    """A corpus of a few large images: a batch of them is a large allocation without a slow sampler."""
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    store.write_store(folder, images, np.full(n, "test"), np.array(["xray", "ct"] * (n // 2)))
    return folder


@pytest.mark.slow
def test_out_of_memory_in_a_pretraining_job_names_the_settings_to_change(params, store_uri, tmp_path):
    """A real `biovfm pretrain` process under an address-space limit that lets it start (imports, store, model,
    MLflow run) but not read its first batch: the uint8 images of one batch alone need twice the limit. It must
    exit 1 with the allocation failure on top, a hint naming pretrain.batch_size and pretrain.grad_accum, and no
    outputs."""
    limit, size, batch = 12 << 30, 512, 1 << 15  # 32768 images of 512 x 512 x 3 bytes = 24 GiB
    corpus = big_image_corpus(tmp_path / "corpus", size)
    job = pretrain_job(params, "mae", "femto", "all", 32, 0)
    job = replace(job, model=ModelSpec("femto", embed_dim=16, depth=1, num_heads=2, patch_size=64), image_size=size,
                  tracking={"uri": store_uri, "experiment": "test"},
                  train=replace(job.train, steps=2, batch_size=batch, threads=1))
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"CUDA_VISIBLE_DEVICES": ""}

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run([str(BIOVFM), "pretrain", "--job", to_json(job), "--corpus", str(corpus), "--out", str(out)],
                          capture_output=True, text=True, env=env, preexec_fn=limit_memory, timeout=300)
    err = proc.stderr.splitlines()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert err[0] == (f"biovfm pretrain: error: Unable to allocate {batch * size * size * 3 / 2**30:.1f} GiB for an "
                      f"array with shape ({batch}, {size}, {size}, 3) and data type uint8"), proc.stderr[-3000:]
    assert err[1].startswith("hint: the job ran out of memory (RAM); lower pretrain.batch_size or raise "
                             "pretrain.grad_accum (same global batch, smaller micro-batches)"), err[1]
    assert "MemoryError" in err[-1]
    assert sorted(os.listdir(out)) == ["mlflow.json"]  # the tracking record of the attempt; no output, no temp


@pytest.mark.parametrize("cmd, settings", [
    ("pretrain", ["pretrain.batch_size", "pretrain.grad_accum", "cluster.pretrain.<model>.mem_mb"]),
    ("evaluate", ["evaluate.batch_size", "evaluate.probe.batch_size", "cluster.evaluate.<model>.mem_mb"]),
    ("preprocess-corpus", ["--workers", "corpus.shard_size"]),
    ("aggregate", ["--threads", "--n-boot"]),
])
def test_out_of_memory_hint_names_the_settings_of_each_command(cmd, settings, capsys):
    """The refusals of numpy's and torch's CPU allocators (real ones: more than any address space holds), also
    when another error was raised from one, get the hint of the command that ran out."""
    failures = []
    for allocate in (lambda: np.empty(1 << 62, np.uint8), lambda: torch.empty(1 << 62, dtype=torch.uint8)):
        try:
            allocate()
        except (MemoryError, RuntimeError) as e:
            failures.append(e)
    try:
        raise RuntimeError("feature extraction of task pathmnist failed") from failures[0]
    except RuntimeError as e:
        failures.append(e)
    assert len(failures) == 3
    for e in failures:
        cli.report_error(cmd, e)
        err = capsys.readouterr().err.splitlines()
        assert err[0] == f"biovfm {cmd}: error: {e}"
        assert err[1].startswith("hint: the job ran out of memory (RAM); ") and all(s in err[1] for s in settings), err[1]
