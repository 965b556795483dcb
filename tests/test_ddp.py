"""Two CPU processes under torchrun (gloo) reach the loss curve and weights of one process."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from biovfm.config import pretrain_job, to_json
from biovfm.train.distributed import torchrun_command


def start_pretrain(job, corpus, out, nproc, spy_log=None) -> subprocess.Popen:
    """``biovfm pretrain`` as one process, or as a torchrun world whose collectives ``tests/ddp_spy.py`` records."""
    args = ["pretrain", "--job", to_json(job), "--corpus", str(corpus), "--out", str(out), "--processes", str(nproc),
            "--threads", "1"]
    if spy_log is None:
        cmd = [sys.executable, "-m", "biovfm.cli", *args]
    else:
        cmd = [*torchrun_command(nproc, [])[:-2], str(Path(__file__).parent / "ddp_spy.py"), str(spy_log), "--", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    """The stdout of a pretraining run that must succeed."""
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def test_torchrun_command_is_an_argument_list():
    cmd = torchrun_command(2, ["pretrain", "--job", '{"a": "b c; rm -rf /"}'])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--nproc_per_node=2" in cmd
    assert cmd[-1] == '{"a": "b c; rm -rf /"}'  # passed through as one argument, never through a shell


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mae", "dino"])
def test_two_processes_match_one(params, corpus_dir, mlflow_uri, tmp_path, method):
    job = pretrain_job(params, method, "femto", "all", 60, 0)
    job = replace(job, tracking={"uri": mlflow_uri, "experiment": "test"},
                  train=replace(job.train, steps=8, batch_size=16, checkpoint_every=4, log_every=4))
    if method == "dino":  # KoLeo looks for neighbours within each process's share of the batch (as DINOv2 does)
        job = replace(job, method_cfg={**job.method_cfg, "koleo_weight": 0.0})
    # the two runs side by side (independent folders; each deterministic): mostly process start-up on CPUs
    one = start_pretrain(job, corpus_dir, tmp_path / "one", 1)
    two = start_pretrain(job, corpus_dir, tmp_path / "two", 2, spy_log=tmp_path / "collectives.jsonl")
    finish(one)
    two_stdout = finish(two)
    # every collective got a tensor on the device the engine trains on (NCCL takes CUDA tensors only)
    calls = [json.loads(line) for line in (tmp_path / "collectives.jsonl").read_text().splitlines()]
    assert {c["rank"] for c in calls} == {0, 1} and sum(c["op"] == "all_reduce" for c in calls) >= 2 * 8
    assert all(c["device"] == c["engine_device"] for c in calls), [c for c in calls if c["device"] != c["engine_device"]]
    h1, h2 = pd.read_csv(tmp_path / "one" / "history.csv"), pd.read_csv(tmp_path / "two" / "history.csv")
    assert len(h1) == len(h2) == 8 and (h2["images_seen"] == h1["images_seen"]).all()  # same global batch
    np.testing.assert_allclose(h2["loss"], h1["loss"], rtol=1e-4, atol=1e-5)
    w1, w2 = load_file(tmp_path / "one" / "checkpoint.safetensors"), load_file(tmp_path / "two" / "checkpoint.safetensors")
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], atol=1e-4, err_msg=k)
    assert '"world_size": 2' in (tmp_path / "two" / "run.json").read_text()
    assert two_stdout.count("step 8/8") == 1  # one process reports


def test_a_gpu_world_reduces_cuda_and_cpu_tensors(monkeypatch):
    """On GPUs the process group has NCCL for CUDA tensors and gloo for CPU ones (an NCCL-only group fails at the
    first collective on a CPU tensor); torch's own parser reads the backend string that way."""
    import torch
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import BackendConfig

    from biovfm.train import distributed

    created = []
    monkeypatch.setattr(distributed, "_DEVICE_TYPE", "cpu")  # init_world sets it; restored after the test
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: created.append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    assert distributed.init_world("cuda") == distributed.World(1, 2, 1)
    assert distributed.init_world("cpu") == distributed.World(1, 2, 1)
    gpu, cpu = (BackendConfig(b).get_device_backend_map() for b in created)
    assert gpu == {"cuda": "nccl", "cpu": "gloo"} and set(cpu.values()) == {"gloo"}


def test_a_collective_on_the_wrong_device_is_named(monkeypatch):
    import torch

    from biovfm.train import distributed

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "_DEVICE_TYPE", "cuda")
    with pytest.raises(RuntimeError, match="collective on a cpu tensor in a cuda world"):
        distributed.all_reduce_mean(torch.zeros(3))


def test_a_batch_that_does_not_split_is_refused_before_launch(params, corpus_dir, tmp_path, capsys):
    from biovfm import cli

    job = pretrain_job(params, "mae", "femto", "all", 60, 0)
    job = replace(job, train=replace(job.train, batch_size=30))
    code = cli.main(["pretrain", "--job", to_json(job), "--corpus", str(corpus_dir), "--out", str(tmp_path), "--processes", "4"])
    assert code == 1 and "batch_size=30 does not split into 4 processes x 1 accumulation steps" in capsys.readouterr().err


def test_srun_tasks_map_to_a_torch_distributed_world():
    from biovfm.train.distributed import resolve_nproc, slurm_world_env

    step = {"SLURM_JOB_ID": "4321", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
            "SLURM_LOCALID": "1", "SLURM_STEP_NUM_NODES": "1", "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7"}
    world = slurm_world_env(step)
    assert world == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(15000 + 4321 % 2500 * 10)}
    assert resolve_nproc(1, step) == 2
    two_nodes = step | {"SLURM_STEP_NUM_NODES": "2", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "3"}
    assert slurm_world_env(two_nodes)["MASTER_ADDR"] == "10.0.0.7"
    assert slurm_world_env(two_nodes)["MASTER_PORT"] == str(15000 + 4321 % 2500 * 10 + 3)
    assert slurm_world_env(step | {"MASTER_ADDR": "node1", "MASTER_PORT": "29400"})["MASTER_PORT"] == "29400"
    # not a world: one task (the jobstep plugin's srun -n1), a batch script (no step id), torchrun, no SLURM
    assert slurm_world_env(step | {"SLURM_NTASKS": "1"}) is None
    assert slurm_world_env({k: v for k, v in step.items() if k != "SLURM_STEP_ID"}) is None
    assert slurm_world_env(step | {"LOCAL_RANK": "0", "WORLD_SIZE": "4"}) is None
    assert slurm_world_env({}) is None


def test_processes_follow_the_gpus_of_a_slurm_job():
    from biovfm.train.distributed import resolve_nproc, slurm_job_gpus

    job = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}
    assert slurm_job_gpus(job | {"SLURM_GPUS_ON_NODE": "4"}) == 4
    assert slurm_job_gpus(job | {"SLURM_STEP_GPUS": "0,1"}) == 2
    assert slurm_job_gpus({"SLURM_GPUS_ON_NODE": "4"}) == 0  # not in a SLURM job
    assert resolve_nproc(1, job | {"SLURM_GPUS_ON_NODE": "4"}) == 4  # one process per GPU the job got
    assert resolve_nproc(0, job | {"SLURM_JOB_GPUS": "3"}) == 1
    assert resolve_nproc(2, job) == 2  # a CPU job: pretrain.nproc
    assert resolve_nproc(0, {}, visible_gpus=0) == 1 and resolve_nproc(0, {}, visible_gpus=8) == 8
    assert resolve_nproc(1, {"LOCAL_RANK": "0", "WORLD_SIZE": "3"}) == 3  # a torchrun process
