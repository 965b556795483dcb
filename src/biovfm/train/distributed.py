"""torch.distributed in one place: set up from torchrun's environment, and collectives that are no-ops
in a single process (so methods and the engine call them unconditionally)."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def slurm_world_env(env: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """torch.distributed's environment for a process started as one of N tasks of a SLURM job step
    (``srun -n N biovfm pretrain ...``): RANK/WORLD_SIZE/LOCAL_RANK from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, the
    rendezvous on 127.0.0.1 for a one-node step (else SLURM_LAUNCH_NODE_IPADDR, the node srun ran on: run srun from
    the batch script) and a port derived from the job and step ids. MASTER_ADDR/MASTER_PORT already set win.

    None outside a multi-task step (a single task, a batch script, no SLURM) or under torchrun, which sets its own.
    """
    env = os.environ if env is None else env
    if "LOCAL_RANK" in env and "WORLD_SIZE" in env:  # torchrun (also when torchrun runs inside a SLURM step)
        return None
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return None
    nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")))
    addr = env.get("MASTER_ADDR") or ("127.0.0.1" if nodes == 1 else env.get("SLURM_LAUNCH_NODE_IPADDR"))
    if not addr:
        raise RuntimeError("a multi-node SLURM step without SLURM_LAUNCH_NODE_IPADDR: set MASTER_ADDR to the address "
                           "of the node of task 0")
    job, step = int(env.get("SLURM_JOB_ID", "0")), int(env["SLURM_STEP_ID"])
    port = env.get("MASTER_PORT") or str(15000 + (job % 2500) * 10 + step % 10)  # 15000-39999, one per job step
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": addr, "MASTER_PORT": port}


def slurm_job_gpus(env: Mapping[str, str] | None = None) -> int:
    """GPUs SLURM gave this job (step) on this node: SLURM_GPUS_ON_NODE, else the ids in SLURM_STEP_GPUS or
    SLURM_JOB_GPUS; 0 outside SLURM or in a job without GPUs."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env:
        return 0
    if env.get("SLURM_GPUS_ON_NODE", "").strip().isdigit():
        return int(env["SLURM_GPUS_ON_NODE"])
    ids = env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS") or ""
    return len([i for i in ids.split(",") if i.strip()])


def launched_as_world() -> bool:
    """Already one process of several: under torchrun, or one of the N tasks of ``srun -n N``."""
    return launched_by_torchrun() or slurm_world_env() is not None


def resolve_nproc(requested: int, env: Mapping[str, str] | None = None, visible_gpus: int | None = None,
                  gpus: int = 0) -> int:
    """The number of processes of a pretraining job.

    - one of N SLURM tasks or a torchrun process: the world it is part of;
    - a job that got GPUs (from SLURM, or ``gpus`` claimed on this machine): one process per GPU, whatever
      ``requested`` says;
    - ``requested`` 0: one per visible GPU (at least 1);
    - else ``requested``.
    """
    env = os.environ if env is None else env
    if "LOCAL_RANK" in env and "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    world = slurm_world_env(env)
    if world is not None:
        return int(world["WORLD_SIZE"])
    got = slurm_job_gpus(env) or gpus
    if got:
        if requested not in (0, got):
            print(f"[pretrain] the job got {got} GPU(s): {got} processes, one per GPU (not {requested}); "
                  "set the GPUs per model size in params' cluster.pretrain", file=sys.stderr, flush=True)
        return got
    if requested == 0:
        if visible_gpus is None:
            visible_gpus = torch.cuda.device_count()
        return max(1, visible_gpus)
    return requested


def backend_for(device_type: str) -> str:
    """The process group's backend: gloo on CPU; on GPUs NCCL for CUDA tensors *and* gloo for CPU ones, so that a
    collective on a CPU tensor (a count, a flag) works on a GPU job too instead of failing at the first step."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


_DEVICE_TYPE = "cpu"  # the device type of this process's world (set by init_world)


def init_world(device_type: str) -> World:
    """Join the process group torchrun or ``srun -n N`` set up (:func:`backend_for`); a plain process is a world
    of one. On GPUs each process uses the GPU of its local rank."""
    global _DEVICE_TYPE
    _DEVICE_TYPE = device_type
    slurm = slurm_world_env()
    if slurm is not None:
        os.environ.update(slurm)  # env:// rendezvous below reads them
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if device_type == "cuda":
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device_type))
    return world


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _check_device(t: torch.Tensor) -> None:
    """Collectives run on the world's device: a CPU tensor in a GPU job would be a silent host round trip (or,
    with an NCCL-only group, a crash), so it is a bug in the caller, named here."""
    if t.device.type != _DEVICE_TYPE:
        raise RuntimeError(f"collective on a {t.device.type} tensor in a {_DEVICE_TYPE} world: create it on the "
                           "engine's device")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place; the identity in a single process."""
    if active():
        _check_device(t)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if active():
        _check_device(t)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The command that reruns ``biovfm <argv>`` as ``nproc`` processes on this node (an argument list,
    never a shell string). ``--standalone`` picks a free rendezvous port, so parallel jobs do not collide.
    torchrun's parser takes any unambiguous prefix of its own flags, so ``argv`` must not use such prefixes
    (hence ``biovfm pretrain --processes``, not ``--nproc``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "biovfm.cli", *argv]


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run ``biovfm <argv>`` under torchrun and return its exit status."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run(torchrun_command(nproc, argv), env=env).returncode
