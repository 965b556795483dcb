"""One job per GPU on a machine with GPUs, tested with a fake device count on CPUs: which GPUs a job claims, that
concurrent jobs never share one, and the `gpu` resources the workflow asks for (not CUDA itself)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from biovfm import devices
from conftest import REPO, TINY_PARAMS


def test_visible_gpus_from_the_override_cuda_visible_devices_and_the_driver(tmp_path):
    assert devices.visible_gpus({"BIOVFM_GPUS": "2"}) == ["0", "1"]
    assert devices.visible_gpus({"BIOVFM_GPUS": "0,3", "CUDA_VISIBLE_DEVICES": "5"}) == ["0", "3"]
    assert devices.visible_gpus({"BIOVFM_GPUS": "0"}) == []
    assert devices.visible_gpus({"CUDA_VISIBLE_DEVICES": "4,GPU-8f2e"}) == ["4", "GPU-8f2e"]
    assert devices.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == [] == devices.visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"})
    proc = tmp_path / "gpus"
    for bus in ("0000:01:00.0", "0000:41:00.0"):
        (proc / bus).mkdir(parents=True)
    assert devices.visible_gpus({}, proc) == ["0", "1"]
    assert devices.visible_gpus({}, tmp_path / "absent") == []
    with pytest.raises(ValueError, match="BIOVFM_GPUS='two'"):
        devices.visible_gpus({"BIOVFM_GPUS": "two"})


def _hold(n: int, lock_dir: str, hold_s: float, out: str) -> None:
    env = {"BIOVFM_GPUS": "3", devices.LOCK_DIR_ENV: lock_dir}
    with devices.job_gpus(n, env) as ids:
        t0 = time.time()
        assert env["CUDA_VISIBLE_DEVICES"] == ",".join(ids)
        time.sleep(hold_s)
        Path(out).write_text(json.dumps({"ids": ids, "start": t0, "end": time.time()}))


def test_concurrent_jobs_never_share_a_gpu(tmp_path):
    """Six jobs (one wants two GPUs) start at once on a machine with three GPUs: each runs on devices that no other
    job holds while it runs, and jobs wait rather than oversubscribe."""
    ctx = mp.get_context("spawn")
    wants = [1, 1, 2, 1, 1, 1]
    procs = [ctx.Process(target=_hold, args=(n, str(tmp_path / "locks"), 0.6, str(tmp_path / f"{i}.json")))
             for i, n in enumerate(wants)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    runs = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(len(wants))]
    assert [len(r["ids"]) for r in runs] == wants
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            if a["start"] < b["end"] and b["start"] < a["end"]:  # ran at the same time
                assert not set(a["ids"]) & set(b["ids"]), (a, b)
    events = sorted([(r["start"], len(r["ids"])) for r in runs] + [(r["end"], -len(r["ids"])) for r in runs])
    busy = 0
    for _, d in events:
        busy += d
        assert busy <= 3


def test_a_killed_job_frees_its_gpu(tmp_path):
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_hold, args=(3, str(tmp_path / "locks"), 60, str(tmp_path / "x.json")))
    p.start()
    time.sleep(3)  # holds all three
    with pytest.raises(RuntimeError, match="no 1 free GPU"):
        with devices.claim(1, ["0", "1", "2"], tmp_path / "locks", wait_s=0.3, poll_s=0.1):
            pass
    p.kill()
    p.join()
    with devices.claim(3, ["0", "1", "2"], tmp_path / "locks", wait_s=5) as ids:
        assert ids == ["0", "1", "2"]


def test_no_gpu_no_claim_and_too_many_asked(tmp_path):
    env = {"BIOVFM_GPUS": "0", devices.LOCK_DIR_ENV: str(tmp_path)}
    with devices.job_gpus(1, env) as ids:
        assert ids == [] and "CUDA_VISIBLE_DEVICES" not in env
    with pytest.raises(RuntimeError, match="needs 4 GPU"):
        with devices.job_gpus(4, {"BIOVFM_GPUS": "2", devices.LOCK_DIR_ENV: str(tmp_path)}):
            pass


def test_locks_are_per_machine_and_per_slurm_job():
    """SLURM numbers each job's GPUs from 0: two jobs on one node must not wait on each other's 'gpu0'."""
    base = devices.lock_dir({})
    assert base.name.startswith("biovfm-gpu-locks-")
    assert devices.lock_dir({"SLURM_JOB_ID": "41"}) == base / "slurm-41" != devices.lock_dir({"SLURM_JOB_ID": "42"})
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    with devices.job_gpus(1, env) as ids:
        assert env["CUDA_VISIBLE_DEVICES"] == env["BIOVFM_GPUS"] == ids[0]
    assert env == {"CUDA_VISIBLE_DEVICES": "0,1"}


def _snakemake(workdir: Path, *args: str, gpus: str) -> str:
    env = dict(os.environ, BIOVFM_GPUS=gpus, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--workflow-profile", "none",
                           "--directory", str(workdir), "--cores", "8", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_the_workflow_runs_one_job_per_gpu(tmp_path):
    """With 2 (fake) GPUs: the `gpu` resource is limited to 2, every pretraining and encoder-evaluation job asks for
    its GPUs (at most the visible ones) and cpus_per_gpu threads per GPU, the raw-pixel probe none; without GPUs
    nothing asks for one. The command line's own limit wins."""
    p = yaml.safe_load(TINY_PARAMS.read_text())
    p["cluster"] = {"cpus_per_gpu": 3, "pretrain": {"atto": {"gpus": 4}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    out = _snakemake(tmp_path, "results/mlflow_init.json", gpus="2")  # a real run of one job: the scheduler's limits
    assert re.search(r"Provided resources:.*gpu\D+2\b", out), out[-2000:]
    plan = _snakemake(tmp_path, "-n", "-p", gpus="2")
    cmds = [line.split("Shell command: ", 1)[1] for line in plan.splitlines() if line.startswith("Shell command: biovfm ")]
    pretrain = [c for c in cmds if c.startswith("biovfm pretrain")]
    evaluate = [c for c in cmds if c.startswith("biovfm evaluate") and "raw_pixels" not in c]
    raw = [c for c in cmds if c.startswith("biovfm evaluate") and "raw_pixels" in c]
    assert len(pretrain) == 8 and len(evaluate) == 10 and len(raw) == 1
    for c in pretrain + evaluate:
        gpus = 2 if c.startswith("biovfm pretrain") and '"name":"atto"' in c else 1  # atto asks 4, 2 are visible
        assert f"--gpus {gpus} " in c and f"--threads {3 * gpus} " in c, c[-300:]
    assert "--gpus" not in raw[0]
    out = _snakemake(tmp_path, "--forceall", "--resources", "gpu=1", "--until", "mlflow_init", gpus="2")
    assert re.search(r"Provided resources:.*gpu\D+1\b", out)
    plan = _snakemake(tmp_path, "-n", "-p", gpus="0")
    assert plan.count("--gpus 0 ") == 18 and "--gpus 1" not in plan
