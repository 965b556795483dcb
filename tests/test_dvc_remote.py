"""DVC remote round trip: the small study (trained once per session) reproduced with `dvc repro`, `biovfm sync push` to
a local-folder remote, `git clone` + `biovfm sync pull` elsewhere, and the figures and tables rebuild from the pulled
outputs without retraining, byte for byte."""
from __future__ import annotations

import json
import shutil
import time

import pytest
import yaml

from conftest import copy_study
from dvc_study import BIOVFM, DVC, job_stats, make_project, planned_jobs, rule_outputs, run, run_proc, tree

# Not shared through the remote: job logs, and MLflow's artifact folder (the store names it by absolute path, so it
# would not resolve in a clone anyway; the one artifact, the corpus report, is data/processed/corpus/report.json).
LOCAL_ONLY = ("results/logs", "results/mlflow-artifacts")
TRAINING_RULES = {"download", "preprocess_task", "preprocess_corpus", "mlflow_init", "pretrain", "evaluate",
                  "evaluate_random_init", "evaluate_raw_pixels"}


@pytest.fixture(scope="module")
def study(small_study, tmp_path_factory) -> dict:
    """The small study in a git + DVC project, reproduced (`dvc repro`) and pushed to a local-folder remote named in
    .dvc/config. The session's finished study (conftest's ``small_study``, trained by the same Snakemake DAG) is
    copied in first, so the stage's `snakemake --cores all` finds every job done and DVC records and caches its
    outputs: training it a second time would test nothing more."""
    root = tmp_path_factory.mktemp("dvc_remote")
    t0 = time.perf_counter()
    origin = make_project(root / "origin", params=small_study / "params.yaml")
    copy_study(small_study, origin)
    repro = run_proc(DVC + ["repro"], origin)
    out = repro.stdout + repro.stderr
    assert repro.returncode == 0, out[-3000:]
    assert "Running stage 'study'" in out and job_stats(out) == {}, f"Snakemake reran jobs:\n{out[-3000:]}"
    remote = root / "remote"
    run(DVC + ["remote", "add", "-d", "store", str(remote)], origin)
    run(["git", "add", "-A"], origin)
    run(["git", "commit", "-qm", "study"], origin)
    push = run_proc(BIOVFM + ["sync", "push"], origin)
    assert push.returncode == 0, push.stderr[-3000:]
    assert remote.is_dir() and any(remote.rglob("*")), "nothing reached the remote"
    print(f"[test] reproduced and pushed in {time.perf_counter() - t0:.0f}s")
    return {"root": root, "origin": origin, "remote": remote}


@pytest.mark.slow
def test_dvc_metrics_show_status_and_params_diff(study):
    """After `dvc repro`: the metrics are DVC's, the stage is up to date, and a params edit shows in diff and status."""
    origin, root = study["origin"], study["root"]
    shown = json.dumps(json.loads(run(DVC + ["metrics", "show", "--json"], origin)))
    assert "mean_auc" in shown and "raw_pixels/" in shown  # a mean AUC per evaluated model, baselines too
    assert "up to date" in run(DVC + ["status"], origin).lower()
    edit = root / "edit"  # a clone of its own: the other tests keep the committed params
    run(["git", "clone", "-q", str(origin), str(edit)], root)
    params = yaml.safe_load((edit / "params.yaml").read_text())
    params["pretrain"]["steps"] = 20
    (edit / "params.yaml").write_text(yaml.safe_dump(params))
    diff = run(DVC + ["params", "diff"], edit)
    assert "pretrain.steps" in diff and "12" in diff and "20" in diff
    assert "params.yaml" in run(DVC + ["status", "study"], edit)
    shutil.rmtree(edit)


@pytest.mark.slow
def test_pull_rebuilds_figures_and_tables_without_retraining(study):
    origin, clone = study["origin"], study["root"] / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], study["root"])
    pulled = run_proc(BIOVFM + ["sync", "pull"], clone)  # dvc pull from the remote named in .dvc/config, then adopt
    assert pulled.returncode == 0, pulled.stdout[-3000:] + pulled.stderr[-3000:]

    # everything the study made (logs aside) came through the remote, byte for byte
    original = tree(origin, "data", "results", skip=LOCAL_ONLY)
    here = tree(clone, "data", "results", skip=LOCAL_ONLY)
    assert sorted(here) == sorted(original)
    assert [f for f in original if here[f][0] != original[f][0]] == []
    assert "up to date" in run(DVC + ["status"], clone).lower()
    assert planned_jobs(clone) == {}  # pulled outputs are Snakemake's own: nothing to rerun

    # delete what the aggregate rule declares: only the aggregate stage is planned, and `dvc repro` rebuilds it
    agg = sorted(f for f, rule in rule_outputs(clone).items() if rule == "aggregate")
    assert "results/summary.csv" in agg and "results/summary.json" in agg and any(f.endswith(".png") for f in agg)
    for f in agg:
        (clone / f).unlink()
    assert planned_jobs(clone) == {"aggregate": 1, "all": 1}
    before = {f: v for f, v in here.items() if f not in agg}
    repro = run_proc(DVC + ["repro"], clone)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    assert job_stats(repro.stdout + repro.stderr) == {"aggregate": 1, "all": 1}

    after = tree(clone, "data", "results", skip=LOCAL_ONLY)
    assert sorted(after) == sorted(original)
    differ = [f for f in original if after[f][0] != original[f][0]]
    assert differ == [], f"rebuilt outputs that are not byte-identical to the originals: {differ}"
    rebuilt = {f for f in after if f not in before or after[f][1] != before[f][1]}
    assert set(agg) <= rebuilt
    # no job rewrote data, checkpoints or evaluations (DVC itself re-links its single-file outs on commit, so
    # the MLflow store and mlflow_init.json are checked by content above)
    assert not [f for f in rebuilt if f.startswith(("data/", "results/runs/", "results/baselines/"))]
    assert run(["git", "status", "--porcelain"], clone) == ""  # dvc.lock unchanged: the same hashes
    assert "up to date" in run(DVC + ["status"], clone).lower()
    assert planned_jobs(clone) == {}

    # and a later params change reruns exactly what it affects, as on the machine that trained
    params = (clone / "params.yaml").read_text()
    (clone / "params.yaml").write_text(params.replace("steps: 12", "steps: 13", 1))
    jobs = planned_jobs(clone)
    assert set(jobs) & TRAINING_RULES == {"pretrain", "evaluate"} and jobs["aggregate"] == 1


@pytest.mark.slow
def test_a_bad_or_missing_remote_gives_dvcs_error_and_a_hint(study):
    origin, root = study["origin"], study["root"]
    blocker = root / "a_file"
    blocker.write_text("not a folder")
    run(DVC + ["remote", "add", "--local", "bad", str(blocker / "store")], origin)
    proc = run_proc(BIOVFM + ["sync", "push", "-r", "bad"], origin)
    assert proc.returncode == 1
    assert "ERROR" in proc.stderr and "Not a directory" in proc.stderr  # DVC's own message
    assert f"{blocker} is a file, not a folder" in proc.stderr and "dvc remote modify bad url" in proc.stderr

    proc = run_proc(BIOVFM + ["sync", "push", "-r", "nosuch"], origin)
    assert proc.returncode == 1 and "there is no remote named 'nosuch'" in proc.stderr
    assert "dvc remote add -d" in proc.stderr

    # a clone without a remote: DVC's error, then how to add one
    lonely = root / "lonely"
    run(["git", "clone", "-q", str(origin), str(lonely)], root)
    run(DVC + ["remote", "remove", "store"], lonely)
    proc = run_proc(BIOVFM + ["sync", "pull"], lonely)
    assert proc.returncode == 1 and "ERROR" in proc.stderr
    assert "no DVC remote is configured" in proc.stderr and "dvc remote add -d" in proc.stderr

    # a remote folder that is not there (e.g. not mounted on this machine)
    run(DVC + ["remote", "add", "--local", "-d", "gone", str(root / "not_mounted")], lonely)
    proc = run_proc(BIOVFM + ["sync", "pull"], lonely)
    assert proc.returncode == 1 and "ERROR" in proc.stderr
    assert "does not exist on this machine" in proc.stderr
    shutil.rmtree(lonely)
