import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
from safetensors.numpy import load_file

from biovfm.config import pretrain_job, to_json
from biovfm.data.store import load_store
from biovfm.train.checkpoint import CheckpointMismatch, save_state
from biovfm.train.engine import batch_indices, fingerprint, pretrain
from biovfm.train.schedule import warmup_cosine


def tiny_job(params, mlflow_uri, **train):
    job = pretrain_job(params, "mae", "femto", "all", 60, 0)
    return replace(job, tracking={"uri": mlflow_uri, "experiment": "test"}, train=replace(job.train, **train))


def test_batch_indices_cover_each_epoch_once():
    seen = np.concatenate([batch_indices(10, 4, s, seed=3).numpy() for s in range(5)])  # 20 draws = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert np.array_equal(batch_indices(10, 4, 2, seed=3), batch_indices(10, 4, 2, seed=3))


def test_warmup_cosine_shape():
    lrs = [warmup_cosine(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] < 0.01 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_store_subsets_are_nested_prefixes(corpus_dir):
    store = load_store(corpus_dir)
    small, large = store.subset(["xray", "ct"], 20, seed=0), store.subset(["xray", "ct"], 60, seed=0)
    assert set(small) <= set(large)
    assert set(store.index.loc[large, "modality"]) == {"xray", "ct"}
    with pytest.raises(ValueError, match="a subset of 65 was requested"):
        store.subset(["xray", "ct"], 65)


def test_pretrain_writes_outputs_and_is_deterministic(params, corpus_dir, mlflow_uri, tmp_path):
    job = tiny_job(params, mlflow_uri, steps=6, checkpoint_every=3, threads=1)
    a = pretrain(job, corpus_dir, tmp_path / "a")
    b = pretrain(job, corpus_dir, tmp_path / "b")
    for name in ("checkpoint.safetensors", "history.csv", "config.json", "run.json"):
        assert (tmp_path / "a" / name).is_file()
    assert not (tmp_path / "a" / "state.pt").exists()
    wa, wb = load_file(tmp_path / "a" / "checkpoint.safetensors"), load_file(tmp_path / "b" / "checkpoint.safetensors")
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert a["final_loss"] == b["final_loss"] and a["images_seen"] == 6 * 32
    assert a["flops_per_image"] > 0 and a["train_flops"] > a["flops_per_image"] * a["images_seen"]
    assert a["params_encoder"] > 0 and a["params_paper"] > a["params_encoder"]


def test_resume_refuses_a_foreign_checkpoint(params, corpus_dir, mlflow_uri, tmp_path):
    job = tiny_job(params, mlflow_uri, steps=4)
    save_state(tmp_path, {"run_id": "mae/other/all/n9/s0", "fingerprint": "x", "step": 2})
    with pytest.raises(CheckpointMismatch, match="mae/other/all/n9/s0.*cannot resume run 'mae/femto/all/n60/s0'"):
        pretrain(job, corpus_dir, tmp_path)


def test_corrupt_checkpoint_restarts_from_scratch(params, corpus_dir, mlflow_uri, tmp_path, capsys):
    job = tiny_job(params, mlflow_uri, steps=3)
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    meta = pretrain(job, corpus_dir, tmp_path)
    assert "unreadable checkpoint" in capsys.readouterr().out and meta["train_steps"] == 3


@pytest.mark.slow
def test_killed_job_resumes_to_the_same_weights(params, corpus_dir, mlflow_uri, tmp_path):
    """SIGKILL a real `biovfm pretrain` process after its first checkpoint, rerun it, compare with an uninterrupted run."""
    job = tiny_job(params, mlflow_uri, steps=400, checkpoint_every=20, log_every=50, threads=1, batch_size=16)
    cmd = [sys.executable, "-m", "biovfm.cli", "pretrain", "--job", to_json(job), "--corpus", str(corpus_dir)]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "run.json").exists(), "the job finished before it could be killed; raise steps"
    assert not (killed / "checkpoint.safetensors").exists()
    subprocess.run(cmd + ["--out", str(killed)], check=True, capture_output=True)
    straight = tmp_path / "straight"
    subprocess.run(cmd + ["--out", str(straight)], check=True, capture_output=True)
    wk, ws = load_file(killed / "checkpoint.safetensors"), load_file(straight / "checkpoint.safetensors")
    assert all(np.array_equal(wk[k], ws[k]) for k in ws)
    hk = (killed / "history.csv").read_text()
    assert hk == (straight / "history.csv").read_text()
    assert json.loads((killed / "run.json").read_text())["mlflow_run_id"]
