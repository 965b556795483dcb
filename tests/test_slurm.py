"""The SLURM profile against a real single-node SLURM (tests/cluster/slurm_ci.sh): the small study's whole DAG as
sbatch jobs, a 2-process torchrun pretraining job, ``srun -n 2`` tasks as one DDP world, and a GPU request on a
cluster without GPUs failing at submission with SLURM's own message.

Needs root and slurm-wlm + munge (apt-get install -y slurm-wlm munge); skipped without them, except under CI=true,
where a missing SLURM is a failure. The cluster uses ports 6817/6818 on 127.0.0.1 and links /etc/slurm/slurm.conf
(the jobstep plugin only finds the config there) for the duration of this module.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, TINY_PARAMS

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SCRIPT = REPO / "tests" / "cluster" / "slurm_ci.sh"
PROFILE = REPO / "workflow" / "profiles" / "slurm"
DAG_TIMEOUT_S = 720


def _missing() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root (the SLURM daemons of the test cluster run as root)"
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"])
    absent = [b for b in ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "srun") if not shutil.which(b, path=path)]
    if absent:
        return f"{', '.join(absent)} not found: apt-get install -y slurm-wlm munge"
    return None


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", ""), "/usr/sbin"])
    return env | (extra or {})


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = _missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but no local SLURM: {why}")
        pytest.skip(why)
    state = Path(tempfile.mkdtemp(prefix="biovfm-slurm-ci-"))  # not under pytest's 0700 tmp: munged runs as munge
    state.chmod(0o755)
    env = _env({"SLURM_CI_DIR": str(state), "SLURM_CI_CPUS": "2"})
    try:
        proc = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"slurm_ci.sh start failed:\n{proc.stdout}\n{proc.stderr}"
        yield state
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def snakemake_slurm(workdir: Path, *args: str, timeout_s: int = DAG_TIMEOUT_S) -> tuple[subprocess.CompletedProcess, float]:
    # timeout -k: while it waits on jobs Snakemake ignores SIGTERM
    cmd = ["timeout", "-k", "10", str(timeout_s), sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--executor", "slurm", "--profile", str(PROFILE),
           "--slurm-status-command", "squeue",  # no accounting database (sacct) on the test cluster
           "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5", "--jobs", "4", *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=_env(), timeout=timeout_s + 30)
    return proc, time.monotonic() - t0


def _tail(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"


@pytest.fixture(scope="module")
def study(slurm, tmp_path_factory):
    """The small config's whole DAG through the SLURM profile; DINO pretraining as 2 processes per job."""
    workdir = tmp_path_factory.mktemp("study")
    p = yaml.safe_load(TINY_PARAMS.read_text())
    p["methods"]["dino"]["pretrain"]["nproc"] = 2
    # every rule, fewer jobs (each SLURM job costs ~10 s of Snakemake start-up and polling on top of its work)
    p["data"]["tasks"] = ["pathmnist", "chestmnist", "breastmnist", "bloodmnist"]
    p["grid"]["data_sizes"] = [60]
    p["cluster"] = {"cpu_jobs": {"mem_mb": 500, "runtime": 15},
                    "pretrain": {"default": {"gpus": 0, "mem_mb": 1000, "runtime": 15}},
                    "evaluate": {"default": {"gpus": 0, "mem_mb": 1000, "runtime": 15}}}
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    proc, elapsed = snakemake_slurm(workdir)
    print(f"[test_slurm] the small study's DAG through SLURM: {elapsed:.0f} s")
    assert proc.returncode == 0, _tail(proc)
    return workdir, p, proc


def test_the_whole_dag_runs_as_slurm_jobs(study):
    workdir, p, proc = study
    res = workdir / "results"
    n_tasks = len(p["data"]["tasks"])
    n_pre = len(p["grid"]["methods"]) * len(p["grid"]["models"]) * len(p["grid"]["data_sizes"])
    n_models = n_pre + len(p["grid"]["models"]) + 1
    summary = pd.read_csv(res / "summary.csv", keep_default_na=False)
    summary = summary[summary["primary"]]  # one row per model x task for the study's estimator
    assert len(summary) == n_models * n_tasks
    assert summary["auc"].between(0, 1).all()
    for fig in ("mean_auc_vs_params", "task_grid", "auc_vs_data_size", "task_examples"):
        assert (res / "figures" / f"{fig}.png").stat().st_size > 10_000, fig

    # every job but the local mlflow_init was an sbatch job: one SLURM log per job, named by its SLURM job id
    logs = sorted((res / "logs" / "slurm").rglob("*.log"))
    by_rule: dict[str, list[int]] = {}
    for log in logs:
        rule = log.relative_to(res / "logs" / "slurm").parts[0].removeprefix("rule_")
        by_rule.setdefault(rule, []).append(int(log.stem))
    out = proc.stdout + proc.stderr
    planned = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", out.split("Job stats:")[1], re.M)}
    local = set(re.findall(r"^localrule (\w+):", out, re.M))
    assert local == {"mlflow_init", "all"}
    assert planned["preprocess_task"] == n_tasks and planned["pretrain"] == planned["evaluate"] == n_pre
    expected = {r: n for r, n in planned.items() if r not in local | {"total"}}
    assert {r: len(ids) for r, ids in by_rule.items()} == expected
    job_ids = [i for ids in by_rule.values() for i in ids]
    assert len(set(job_ids)) == len(job_ids)
    # ... and SLURM ran every one to completion (finished jobs stay listed: MinJobAge=600)
    states = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %T"], capture_output=True, text=True,
                            env=_env(), check=True).stdout.split("\n")
    state_of = dict(line.split() for line in states if line.strip())
    assert all(state_of.get(str(i)) == "COMPLETED" for i in job_ids), {i: state_of.get(str(i)) for i in job_ids}

    # DINO: one torchrun job of 2 processes (pretrain: {nproc: 2}); MAE: 1 process
    for run in (res / "runs").glob("*/*/*/n*/s*/run.json"):
        world = json.loads(run.read_text())["world_size"]
        assert world == (2 if run.parts[-6] == "dino" else 1), run
    dino_logs = list((res / "logs" / "slurm" / "rule_pretrain").glob("dino_*/*.log"))
    assert dino_logs and all("--processes 2" in log.read_text() for log in dino_logs)


def test_srun_tasks_form_one_ddp_world(study):
    """`srun -n 2 biovfm pretrain` without torchrun: the two tasks join one gloo world via SLURM's variables."""
    from biovfm.config import pretrain_job, to_json, validate_params

    workdir, p, _ = study
    job = pretrain_job(validate_params(p), "mae", "femto", "all", 60, 0)
    out = workdir / "srun_run"
    cmd = ["timeout", "-k", "5", "120", "srun", "-n", "2", "-c", "1", "--mem=1000", sys.executable, "-m", "biovfm.cli",
           "pretrain", "--job", to_json(job), "--corpus", str(workdir / "data" / "processed" / "corpus"),
           "--out", str(out), "--threads", "1"]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=_env(), timeout=150)
    assert proc.returncode == 0, _tail(proc)
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert proc.stdout.count(f"step {job.train.steps}/{job.train.steps}") == 1  # rank 0 reports


def test_a_gpu_request_on_a_cluster_without_gpus_fails_at_submission(study):
    workdir, p, _ = study
    p = json.loads(json.dumps(p))
    p["cluster"]["pretrain"]["default"]["gpus"] = 1  # the params key -> sbatch --gpus=1; this cluster has no GRES
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    target = "results/runs/mae/femto/all/n60/s0/checkpoint.safetensors"
    proc, elapsed = snakemake_slurm(workdir, "--force", target, "--retries", "0", timeout_s=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and proc.returncode not in (124, 137), _tail(proc)
    assert elapsed < 60, f"took {elapsed:.0f} s to fail"
    assert re.search(r"Invalid generic resource|Requested node configuration is not available", out), _tail(proc)
    assert "--gpus=1" in out  # the request came from params' cluster.pretrain


def test_a_requeued_pretraining_job_resumes_from_its_checkpoint(study):
    """Preemption: `scontrol requeue` kills a running pretraining job after a checkpoint; SLURM runs it again under
    the same job id (the profile submits with --requeue) and it resumes from the checkpoint, while the Snakemake that
    submitted it keeps waiting and completes."""
    workdir, p, _ = study
    p = json.loads(json.dumps(p))
    p["pretrain"].update(steps=400, checkpoint_every=40, log_every=40)  # long enough to be caught mid-run
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    run_dir = workdir / "results/runs/mae/femto/all/n60/s0"
    cmd = ["timeout", "-k", "10", "400", sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--executor", "slurm", "--profile", str(PROFILE),
           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5",
           "--retries", "0", "--force", "results/runs/mae/femto/all/n60/s0/checkpoint.safetensors"]
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        deadline = time.monotonic() + 240
        while not list(run_dir.glob("state-*.pt")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        if not list(run_dir.glob("state-*.pt")):
            proc.kill()
            pytest.fail(f"no checkpoint appeared while the job ran:\n{proc.communicate()[0][-6000:]}")
        running = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True,
                                 env=_env(), check=True).stdout.split()
        assert len(running) == 1, running
        job_id = running[0]
        t_requeue = time.monotonic()
        subprocess.run(["scontrol", "requeue", job_id], env=_env(), check=True, capture_output=True, text=True)
        # a requeued job waits for its begin time; let it start again at once
        for _ in range(20):
            upd = subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now"], env=_env(),
                                 capture_output=True, text=True)
            if upd.returncode == 0:
                break
            print(f"[test_slurm] scontrol update: {upd.stderr.strip()}")
            time.sleep(0.5)
        out, _ = proc.communicate(timeout=420)
        print(f"[test_slurm] requeued job {job_id} finished {time.monotonic() - t_requeue:.0f} s after the requeue")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-6000:]
    log = (workdir / "results/logs/pretrain/mae_femto_all_n60_s0.log").read_text()
    assert re.search(r"resuming from step \d+", log), log[-3000:]
    assert json.loads((run_dir / "run.json").read_text())["train_steps"] == 400
    slurm_logs = list((workdir / "results/logs/slurm/rule_pretrain").rglob(f"{job_id}.log"))
    assert slurm_logs, "the requeued job kept its SLURM job id and log"
