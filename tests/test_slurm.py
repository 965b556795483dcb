"""The SLURM profile against a real single-node SLURM (tests/cluster/slurm_ci.sh): the small study's whole DAG as
sbatch jobs (one pretraining job preempted by `scontrol requeue` mid-run, resumed under the same job id), a
2-process torchrun pretraining job, ``srun -n 2`` tasks as one DDP world, and a GPU request on a cluster without GPUs
failing at submission with SLURM's own message.

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


def slurm_snakemake_cmd(workdir: Path, *args: str, timeout_s: int = DAG_TIMEOUT_S) -> list[str]:
    # timeout -k: while it waits on jobs Snakemake ignores SIGTERM
    return ["timeout", "-k", "10", str(timeout_s), sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
            "--directory", str(workdir), "--executor", "slurm", "--profile", str(PROFILE),
            "--slurm-status-command", "squeue",  # no accounting database (sacct) on the test cluster
            "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5", "--jobs", "4", *args]


def snakemake_slurm(workdir: Path, *args: str, timeout_s: int = DAG_TIMEOUT_S) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run(slurm_snakemake_cmd(workdir, *args, timeout_s=timeout_s), cwd=workdir, capture_output=True,
                          text=True, env=_env(), timeout=timeout_s + 30)
    return proc, time.monotonic() - t0


def _squeue_state(job_id: str) -> list[str]:
    """[state, reason] of a job, as squeue shows it ([] once SLURM has forgotten it)."""
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True,
                          env=_env()).stdout.split()


def requeue_after_first_checkpoint(run_dir: Path, slurm_logs: Path, proc: subprocess.Popen,
                                   timeout_s: float = 300) -> dict:
    """Preemption, while the DAG runs: once the pretraining job of ``run_dir`` has written its first checkpoint,
    `scontrol requeue` it (SLURM kills it and queues it again under the same job id), then let it start again at
    once. Returns the job id and timings, or ``error``: what went wrong (the requeue test reports it)."""
    t0 = time.monotonic()
    while not list(run_dir.glob("state-*.json")):  # a checkpoint counts once its sidecar is written
        if proc.poll() is not None or time.monotonic() - t0 > timeout_s:
            return {"error": f"no checkpoint appeared in {run_dir} while the job ran"}
        time.sleep(0.05)
    logs = sorted(slurm_logs.glob("*.log"))  # <jobid>.log, opened by SLURM when the job starts
    if len(logs) != 1:
        return {"error": f"expected the SLURM log of one running job in {slurm_logs}, found {logs}"}
    job_id = logs[0].stem
    if _squeue_state(job_id)[:1] != ["RUNNING"]:
        return {"error": f"job {job_id} is {_squeue_state(job_id)} at its first checkpoint, not running: raise steps"}
    t_requeue = time.monotonic()
    req = subprocess.run(["scontrol", "requeue", job_id], env=_env(), capture_output=True, text=True)
    if req.returncode:
        return {"error": f"scontrol requeue {job_id}: {req.stderr.strip()}"}
    # SLURM holds a requeued job for its credential lifetime (BeginTime = now + 121 s) once it has left
    # COMPLETING; an update before that is overwritten. Let it start again at once.
    while time.monotonic() - t_requeue < 60:
        st = _squeue_state(job_id)
        if st[:2] == ["PENDING", "BeginTime"]:
            upd = subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now"], env=_env(),
                                 capture_output=True, text=True)
            if upd.returncode:
                print(f"[test_slurm] scontrol update: {upd.stderr.strip()}")
        elif st[:1] == ["RUNNING"] or st[:1] and st[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            break
        time.sleep(0.1)
    print(f"[test_slurm] job {job_id} requeued {t_requeue - t0:.0f} s after the DAG started, "
          f"{' '.join(_squeue_state(job_id)).lower()} again {time.monotonic() - t_requeue:.1f} s later")
    return {"job_id": job_id}


def _tail(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"


@pytest.fixture(scope="module")
def study(slurm, tmp_path_factory):
    """The small config's whole DAG through the SLURM profile; DINO pretraining as 2 processes per job. While it runs,
    the MAE pretraining job is preempted (requeued) after its first checkpoint (test_a_requeued_...)."""
    workdir = tmp_path_factory.mktemp("study")
    p = yaml.safe_load(TINY_PARAMS.read_text())
    p["methods"]["dino"]["pretrain"]["nproc"] = 2
    # a few seconds of MAE training, caught mid-run after its first checkpoint (step 20)
    p["methods"]["mae"]["pretrain"] = {"steps": 400, "checkpoint_every": 20, "log_every": 40}
    # every rule, as few jobs as that takes (each SLURM job costs ~10 s of Snakemake start-up and polling on top of
    # its work): 2 tasks, one model and data size, both methods -> 13 sbatch jobs. (A binary task among them: the
    # aggregate step's below-majority table fails without one.)
    p["data"]["tasks"] = ["pathmnist", "breastmnist"]
    p["grid"] |= {"models": ["femto"], "data_sizes": [60]}
    p["cluster"] = {"cpu_jobs": {"mem_mb": 500, "runtime": 15},
                    "pretrain": {"default": {"gpus": 0, "mem_mb": 1000, "runtime": 15}},
                    "evaluate": {"default": {"gpus": 0, "mem_mb": 1000, "runtime": 15}}}
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    t0 = time.monotonic()
    cmd = slurm_snakemake_cmd(workdir)
    popen = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        # stdout/stderr are read only at the end: Snakemake writes its log to stderr, well under a pipe's buffer
        requeue = requeue_after_first_checkpoint(workdir / "results/runs/mae/femto/all/n60/s0",
                                                 workdir / "results/logs/slurm/rule_pretrain/mae_femto_all_60_0", popen)
        out, err = popen.communicate(timeout=DAG_TIMEOUT_S + 30)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.communicate()
    proc = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    print(f"[test_slurm] the small study's DAG through SLURM: {time.monotonic() - t0:.0f} s")
    assert proc.returncode == 0, _tail(proc)
    return workdir, p, proc, requeue


def test_the_whole_dag_runs_as_slurm_jobs(study):
    workdir, p, proc, _ = study
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


def test_a_requeued_pretraining_job_resumes_from_its_checkpoint(study):
    """Preemption: `scontrol requeue` killed the running MAE pretraining job of the DAG after a checkpoint; SLURM ran it
    again under the same job id (the profile submits with --requeue) and it resumed from the checkpoint, while the
    Snakemake that submitted it kept waiting and completed the study (the ``study`` fixture)."""
    workdir, p, proc, requeue = study
    assert "error" not in requeue, requeue["error"]
    job_id = requeue["job_id"]
    log = (workdir / "results/logs/pretrain/mae_femto_all_n60_s0.log").read_text()
    assert re.search(r"resuming from step [1-9]\d*", log), log[-3000:]
    steps = p["methods"]["mae"]["pretrain"]["steps"]
    assert json.loads((workdir / "results/runs/mae/femto/all/n60/s0/run.json").read_text())["train_steps"] == steps
    # the requeued job kept its SLURM job id and log: one job, not a resubmission by Snakemake
    slurm_logs = sorted((workdir / "results/logs/slurm/rule_pretrain/mae_femto_all_60_0").glob("*.log"))
    assert [f.name for f in slurm_logs] == [f"{job_id}.log"], slurm_logs
    assert f"SLURM jobid {job_id} " in proc.stderr + proc.stdout
    state = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=_env()).stdout
    assert "JobState=COMPLETED" in state and re.search(r"Restarts=[1-9]", state), state


def test_srun_tasks_form_one_ddp_world(study):
    """`srun -n 2 biovfm pretrain` without torchrun: the two tasks join one gloo world via SLURM's variables."""
    from biovfm.config import pretrain_job, to_json, validate_params

    workdir, p, _, _ = study
    p = json.loads(json.dumps(p))
    del p["methods"]["mae"]["pretrain"]  # the small config's 12 steps, not the requeue scenario's 400
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
    workdir, p, _, _ = study
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
