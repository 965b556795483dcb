"""GPUs for jobs on one machine: how many are visible, and which ones a job may use (one job per GPU).

Snakemake limits the number of GPU jobs running at once through the ``gpu`` resource, but it does not say *which*
GPU a job should use. Each GPU job therefore claims free devices itself, through one lock file per device
(``flock``: the kernel releases a lock when its process dies, so a killed job never leaves a GPU taken), and
restricts itself to them with ``CUDA_VISIBLE_DEVICES`` before CUDA starts. Inside a SLURM job the devices are those of
the allocation (all of them for a job the SLURM executor submitted; shared out between the jobs of a local
``snakemake`` run in an ``salloc`` session). No torch import here: the Snakefile counts GPUs at DAG time with it.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

GPUS_ENV = "BIOVFM_GPUS"  # override: a count ("2") or device ids ("0,3"); "0" hides every GPU from the study
LOCK_DIR_ENV = "BIOVFM_GPU_LOCKS"  # where the lock files live (default: machine-wide, see lock_dir)
NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")


def lock_dir(env: Mapping[str, str] | None = None) -> Path:
    """One folder per machine and user, so that two studies on one workstation share the GPUs fairly; inside a SLURM
    allocation one per job, whose device ids are its own (SLURM renumbers them from 0 in every job)."""
    env = os.environ if env is None else env
    if LOCK_DIR_ENV in env:
        return Path(env[LOCK_DIR_ENV])
    base = Path(tempfile.gettempdir()) / f"biovfm-gpu-locks-{os.getuid()}"
    return base / f"slurm-{env['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in env else base


def visible_gpus(env: Mapping[str, str] | None = None, proc: Path = NVIDIA_PROC) -> list[str]:
    """Device ids this process may use: ``BIOVFM_GPUS``, else ``CUDA_VISIBLE_DEVICES``, else every NVIDIA GPU the
    driver lists (none on a machine without one)."""
    env = os.environ if env is None else env
    if GPUS_ENV in env:
        return _parse_ids(env[GPUS_ENV], GPUS_ENV)
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d for d in (x.strip() for x in env["CUDA_VISIBLE_DEVICES"].split(",")) if d and d != "-1"]
    if proc.is_dir():
        return [str(i) for i in range(len(list(proc.iterdir())))]
    return []


def _parse_ids(value: str, name: str) -> list[str]:
    value = value.strip()
    if value.isdigit() and "," not in value:
        return [str(i) for i in range(int(value))]
    ids = [x.strip() for x in value.split(",") if x.strip()]
    if not all(x.isdigit() for x in ids):
        raise ValueError(f"{name}={value!r}: expected a GPU count (e.g. 2) or device ids (e.g. 0,3)")
    return ids


def _try_lock(path: Path):
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


@contextmanager
def claim(n: int, devices: list[str], lock_dir: str | Path, wait_s: float = 3600.0,
          poll_s: float = 0.5) -> Iterator[list[str]]:
    """Hold ``n`` of ``devices`` exclusively (lowest free ids first) for the duration of the block.

    Waits while other jobs hold them (Snakemake's ``gpu`` resource normally prevents that; a job started by hand
    next to a running study waits its turn) and fails after ``wait_s`` seconds with a message saying who to ask."""
    if n > len(devices):
        raise RuntimeError(f"this job needs {n} GPU(s) but only {len(devices)} are visible ({','.join(devices) or 'none'}); "
                           "lower the GPUs per model size in params' cluster.pretrain / cluster.evaluate")
    folder = Path(lock_dir)
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    held: list = []
    try:
        while len(held) < n:
            for d in devices:
                if len(held) < n and (f := _try_lock(folder / f"gpu{d}.lock")) is not None:
                    held.append((d, f))
            if len(held) == n:
                break
            for _, f in held:  # do not sit on part of what we need while waiting (two jobs could deadlock)
                f.close()
            held = []
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {n} free GPU(s) among {','.join(devices)} after {wait_s:.0f}s: other jobs "
                                   f"hold the locks in {folder}")
            time.sleep(poll_s)
        yield [d for d, _ in held]
    finally:
        for _, f in held:
            f.close()


@contextmanager
def job_gpus(n: int, env: dict[str, str] | None = None) -> Iterator[list[str]]:
    """The GPUs of one job: claims ``n`` free visible devices and sets ``CUDA_VISIBLE_DEVICES`` (and ``BIOVFM_GPUS``,
    for the job's own processes) to them in ``env`` (default ``os.environ``), restored afterwards. A no-op for ``n``
    0 or without GPUs."""
    env = os.environ if env is None else env
    devices = visible_gpus(env)
    if n <= 0 or not devices:
        yield []
        return
    with claim(n, devices, lock_dir(env)) as ids:
        saved = {k: env.get(k) for k in ("CUDA_VISIBLE_DEVICES", GPUS_ENV)}
        env["CUDA_VISIBLE_DEVICES"] = env[GPUS_ENV] = ",".join(ids)
        try:
            yield ids
        finally:
            for k, v in saved.items():
                if v is None:
                    env.pop(k, None)
                else:
                    env[k] = v
