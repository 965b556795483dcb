"""What a failing job leaves in its log: the one-line message on top, a hint for errors of scale, the traceback."""
from __future__ import annotations

import torch

from biovfm import cli
from biovfm.config import pretrain_job, to_json


def test_an_error_prints_its_message_first_then_the_traceback(params, tmp_path, capsys):
    job = to_json(pretrain_job(params, "mae", "femto", "all", 60, 0))
    code = cli.main(["pretrain", "--job", job, "--corpus", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines()[0] == (f"biovfm pretrain: error: {tmp_path / 'nowhere' / 'index.csv'}: missing; run the "
                                   "preprocess stage (snakemake preprocess_corpus)")
    assert "Traceback (most recent call last)" in err and "load_store" in err  # where it failed, for a bug report


def test_out_of_gpu_memory_names_the_settings_to_change(params, tmp_path, capsys, monkeypatch):
    from biovfm.train import engine

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine, "pretrain", oom)
    job = to_json(pretrain_job(params, "mae", "femto", "all", 60, 0))
    assert cli.main(["pretrain", "--job", job, "--corpus", str(tmp_path), "--out", str(tmp_path / "run")]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "biovfm pretrain: error: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "pretrain.batch_size" in lines[1] and "pretrain.grad_accum" in lines[1]
    assert "OutOfMemoryError" in lines[-1]
