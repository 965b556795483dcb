"""torch.distributed in one place: set up from torchrun's environment, and collectives that are no-ops
in a single process (so methods and the engine call them unconditionally)."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

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


def init_world(device_type: str) -> World:
    """Join the process group torchrun set up (gloo on CPU, nccl on GPU); a plain process is a world of one."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        torch.cuda.set_device(world.local_rank)
    return world


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place; the identity in a single process."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if active():
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
