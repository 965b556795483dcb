"""Security (issue 15, item 6): values from params never run as shell code, pickles are never unpickled, manifest
entries cannot leave their root, and the one server the project starts binds to 127.0.0.1 unless told otherwise.

Each malicious payload here is live: a positive control shows that loading it the unsafe way does what it says (it
creates a folder, with no shell involved), so that "nothing was created" means the project refused it.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from biovfm import cli, tracking
from biovfm.config import ModelSpec, ParamsError, validate_params
from biovfm.data import sources as S
from biovfm.data.medmnist import BINARY, NpzFormatError, TaskInfo, load_npz
from biovfm.data.preprocess import preprocess_corpus, preprocess_task
from biovfm.evaluate.external import read_state_dict
from biovfm.evaluate.features import load_encoder
from biovfm.io import write_npz
from biovfm.train.checkpoint import load_state
from conftest import REPO, TINY_PARAMS

BIN = Path(sys.executable).parent
# Shell metacharacters in every form: a command separator, substitutions, a newline, background and pipe, quotes.
EVIL = "x; touch pwned1 $(touch pwned2) `touch pwned3` \"q\" 'q'\ntouch pwned4 & touch pwned5 | touch pwned6"
MINE = TaskInfo("mine", BINARY, 1, 2, "xray", ("healthy", "sick"))


class MakeDir:
    """A pickled object whose unpickling creates the folder ``path`` (os.mkdir): a stand-in for malicious code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def pwned(*roots: Path) -> list[str]:
    return sorted(str(p) for root in roots for p in root.rglob("pwned*"))


# --------------------------------------------------------------------------------------------- shell commands
def task_arrays(size: int = 16, n: int = 20, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for split in ("train", "val", "test"):
        out[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        out[f"{split}_labels"] = (np.arange(n) % 2)[:, None].astype(np.int64)
    return out


def evil_study(root: Path) -> dict[str, str]:
    """A tiny study whose string fields that reach shell commands hold EVIL: a custom task's path, an outside
    encoder's path, the experiment name, the tracking URI and a corpus source's folder. Returns those values."""
    p = yaml.safe_load(TINY_PARAMS.read_text())
    p["data"]["tasks"] = ["breastmnist"]
    p["grid"].update(methods=["mae"], models=["femto"], data_sizes=[60])
    task = Path(f"in {EVIL}") / "mine.npz"
    (root / task).parent.mkdir(parents=True)
    write_npz(root / task, **task_arrays())
    weights = f"w {EVIL}.safetensors"
    (root / weights).write_bytes(b"")
    folder = f"f {EVIL}"
    (root / folder).mkdir()
    uri = "sqlite:///results/mlflow $(touch pwned7).db"
    p["data"]["custom_tasks"] = [{"name": "mine", "path": str(task), "task": BINARY, "labels": ["a", "b"], "channels": 1}]
    p["evaluate"]["external"] = [{"name": "ext", "path": weights, "arch": "vit_tiny_patch16_224"}]
    p["tracking"] = {"uri": uri, "experiment": EVIL}
    p["corpus"] = {"sources": [{"name": "synthetic", "kind": "synthetic"},
                               {"name": "mine", "kind": "folder", "path": folder, "modality": "xray"}]}
    (root / "params.yaml").write_text(yaml.safe_dump(p))
    return {"task": str(task), "weights": weights, "folder": folder, "uri": uri, "experiment": EVIL}


def snakemake(study: Path, *args: str, path_prefix: Path = BIN) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = f"{path_prefix}{os.pathsep}{BIN}{os.pathsep}{env['PATH']}"
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--workflow-profile", "none",
                           "--directory", str(study), *args], cwd=study, capture_output=True, text=True, env=env,
                          timeout=300)


def shell_commands(dry_run_output: str) -> list[str]:
    """The commands of ``snakemake -n -p``: each from "Shell command: " to the next blank line (a quoted newline in a
    value continues the command on the next line); "None" for a rule without one (``all``)."""
    found = re.finditer(r"^Shell command: (.*?)\n\n", dry_run_output + "\n\n", re.S | re.M)
    return [m.group(1) for m in found if not m.group(1).startswith("None\n")]


def recorded_calls(folder: Path) -> list[list[str]]:
    """The argv of each stub call (NUL-terminated arguments, one file per call)."""
    return [[a.decode() for a in f.read_bytes().split(b"\0")[:-1]] for f in sorted(folder.iterdir())]


def _arg(argv: list[str], option: str) -> str:
    return argv[argv.index(option) + 1]


def test_params_values_reach_every_rule_as_single_quoted_arguments(tmp_path):
    """Dry-run the whole DAG of a study whose params hold shell metacharacters, then run every printed command in
    bash with a stub ``biovfm`` that records its argv: each value arrives as one argument, byte for byte, and no
    ``touch pwned`` ever runs (neither in the dry run, nor in any command)."""
    study = tmp_path / "study"
    study.mkdir()
    values = evil_study(study)
    proc = snakemake(study, "-n", "-p")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    commands = shell_commands(proc.stdout + proc.stderr)
    rules = {shlex.split(c)[1] for c in commands}
    assert {"preprocess-task", "mlflow-init", "preprocess-corpus", "pretrain", "evaluate", "aggregate"} <= rules

    stub_bin, calls = tmp_path / "stub", tmp_path / "calls"
    stub_bin.mkdir()
    calls.mkdir()
    stub = stub_bin / "biovfm"
    stub.write_text('#!/bin/bash\nf=$(mktemp "$BIOVFM_CALLS/call.XXXXXX")\nprintf \'%s\\0\' "$@" > "$f"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub_bin}{os.pathsep}{os.environ['PATH']}", "BIOVFM_CALLS": str(calls)}
    for command in commands:
        words = shlex.split(command)
        for i, w in enumerate(words):  # the log folders the redirections write to
            if w in (">", "tee") and i + 1 < len(words):
                (study / words[i + 1]).parent.mkdir(parents=True, exist_ok=True)
        run = subprocess.run(["bash", "-c", "set -euo pipefail; " + command], cwd=study, env=env, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, (command, run.stderr)
    assert pwned(tmp_path) == []
    control = tmp_path / "control"  # positive control: the same value, unquoted, does run commands
    control.mkdir()
    subprocess.run(["bash", "-c", f"biovfm --experiment {EVIL}"], cwd=control, env=env | {"BIOVFM_CALLS": str(control)},
                   capture_output=True, timeout=60)
    assert len(pwned(control)) >= 4
    shutil.rmtree(control)

    argvs = recorded_calls(calls)
    assert len(argvs) == len(commands)
    by_cmd: dict[str, list[list[str]]] = {}
    for argv in argvs:
        by_cmd.setdefault(argv[0], []).append(argv)
    (task,) = [a for a in by_cmd["preprocess-task"] if _arg(a, "--task") == "mine"]
    assert _arg(task, "--raw") == values["task"]
    (init,) = by_cmd["mlflow-init"]
    assert _arg(init, "--experiment") == EVIL and _arg(init, "--uri") == values["uri"]
    (corpus,) = by_cmd["preprocess-corpus"]
    assert _arg(corpus, "--experiment") == EVIL and _arg(corpus, "--tracking-uri") == values["uri"]
    assert json.loads(_arg(corpus, "--spec"))["sources"][1]["path"] == values["folder"]
    (aggregate,) = by_cmd["aggregate"]
    assert _arg(aggregate, "--experiment") == EVIL and _arg(aggregate, "--uri") == values["uri"]
    jobs = [json.loads(_arg(a, "--job")) for a in by_cmd["evaluate"] + by_cmd["pretrain"]]
    assert all(j["tracking"] == {"uri": values["uri"], "experiment": EVIL} for j in jobs)
    assert [j["external"]["path"] for j in jobs if j.get("kind") == "external"] == [values["weights"]]


@pytest.mark.slow  # Snakemake runs one real job (4 s here, more on a loaded machine)
def test_a_rule_runs_on_such_a_value_and_nothing_else_runs(tmp_path):
    """The custom task's preprocess rule, for real, on a file whose path holds every metacharacter."""
    study = tmp_path / "study"
    study.mkdir()
    evil_study(study)
    proc = snakemake(study, "--cores", "1", "data/processed/tasks/mine_16.npz")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = load_npz(study / "data/processed/tasks/mine_16.npz", MINE)
    assert np.array_equal(out["test_labels"], task_arrays()["test_labels"])
    assert pwned(tmp_path) == []


@pytest.mark.parametrize("edit, key", [
    (lambda p: p["data"].update(custom_tasks=[{"name": "a; touch pwned", "path": "x.npz", "task": BINARY,
                                                "labels": ["a", "b"], "channels": 1}]), "data.custom_tasks[0].name"),
    (lambda p: p["evaluate"].update(external=[{"name": "$(touch pwned)", "path": "w"}]), "evaluate.external[0].name"),
    (lambda p: p.update(corpus={"sources": [{"name": "`touch pwned`", "kind": "synthetic"}]}), "corpus.sources[0].name"),
    (lambda p: p["grid"].update(models=["femto\ntouch pwned"]), "grid.models[0]"),
    (lambda p: p["grid"].update(modalities=["all;x"]), "grid.modalities[0]"),
    # Python's re lets `$` match before a final newline; validate_params keeps JSON Schema's meaning (the very end)
    (lambda p: p["data"].update(custom_tasks=[{"name": "mine\n", "path": "x.npz", "task": BINARY, "labels": ["a", "b"],
                                                "channels": 1}]), "data.custom_tasks[0].name: 'mine\\n'"),
    (lambda p: p["evaluate"].update(external=[{"name": "ext\n", "path": "w"}]), "(it ends in a newline)"),
    (lambda p: p["grid"].update(models=["femto\n"]), "grid.models[0]: 'femto\\n' does not match"),
], ids=["custom-task-name", "external-name", "corpus-source-name", "model-name-with-newline", "modality-mix-name",
        "custom-task-name-trailing-newline", "external-name-trailing-newline", "model-name-trailing-newline"])
def test_names_that_become_paths_or_wildcards_refuse_metacharacters(raw_params, edit, key):
    """Names end up in file paths and Snakemake wildcards: the schema allows letters, digits, _ . - only."""
    edit(raw_params)
    with pytest.raises(ParamsError) as e:
        validate_params(raw_params, source="my.yaml")
    assert "my.yaml" in str(e.value) and key in str(e.value)


# --------------------------------------------------------------------------------------------- npz pickles
def pickled_npz(path: Path, payload: Path, key: str = "train_labels", compressed: bool = False) -> None:
    data = task_arrays(size=8, n=4)
    data[key] = np.array([MakeDir(payload)] * 4, dtype=object)[:, None]
    (np.savez_compressed if compressed else np.savez)(path, **data)


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_an_npz_with_a_pickled_object_array_is_refused_and_never_unpickled(tmp_path, compressed):
    payload, control = tmp_path / "pwned", tmp_path / "control"
    pickled_npz(tmp_path / "task.npz", payload, compressed=compressed)
    pickled_npz(tmp_path / "corpus.npz", payload, key="modality", compressed=compressed)
    with np.load(tmp_path / "task.npz", allow_pickle=True) as z:  # positive control: the unsafe way runs the payload
        z["train_labels"]
    assert payload.is_dir()
    payload.rename(control)
    for mmap in (False, True):
        with pytest.raises(NpzFormatError, match="train_labels holds Python objects .*refused, as unpickling can run code"):
            load_npz(tmp_path / "task.npz", MINE, mmap=mmap)
    with pytest.raises(NpzFormatError, match=re.escape(str(tmp_path / "task.npz"))):
        preprocess_task(tmp_path / "task.npz", tmp_path / "out.npz", MINE, 8)
    with pytest.raises(S.SourceError, match="holds Python objects|Object arrays cannot be loaded"):
        list(S.iter_npz_rows(tmp_path / "task.npz", "train_labels", 2))
    with pytest.raises(S.SourceError, match="corpus source 'c' \\(synthetic\\).*corpus.npz"):
        preprocess_corpus([{"name": "c", "kind": "synthetic", "path": str(tmp_path / "corpus.npz")}],
                          tmp_path / "store", 8)
    assert not payload.exists() and not (tmp_path / "out.npz").exists() and not (tmp_path / "store").exists()


# --------------------------------------------------------------------------------------------- checkpoints
def malicious_pt(path: Path, payload: Path, legacy: bool = False) -> None:
    state = {"step": 1, "w": torch.zeros(2), "hook": MakeDir(payload)}
    if legacy:  # a plain pickle stream, as torch.save(..., _use_new_zipfile_serialization=False) or pickle writes
        path.write_bytes(pickle.dumps(state))
    else:
        torch.save(state, path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the plain pickle's protocol
@pytest.mark.parametrize("legacy", [False, True], ids=["torch-zip", "plain-pickle"])
def test_a_malicious_checkpoint_is_refused_and_creates_nothing(tmp_path, legacy):
    payload = tmp_path / "pwned"
    malicious_pt(tmp_path / "control.pt", tmp_path / "control", legacy)
    with open(tmp_path / "control.pt", "rb") as f:  # positive control: the unsafe load runs the payload
        pickle.load(f) if legacy else torch.load(f, weights_only=False)
    assert (tmp_path / "control").is_dir()

    run = tmp_path / "run"  # a training state with a valid sidecar (digest and run match): only its content is bad
    run.mkdir()
    state = run / "state-000000001.pt"
    malicious_pt(state, payload, legacy)
    (run / "state-000000001.json").write_text(json.dumps({"step": 1, "run_id": "r", "fingerprint": "f",
                                                          "sha256": hashlib.sha256(state.read_bytes()).hexdigest(),
                                                          "file": state.name}))
    logs: list[str] = []
    assert load_state(run, "r", "f", log=logs.append) is None
    assert "refused by torch.load(weights_only=True)" in logs[0] and "restarting from scratch" in logs[-1]

    malicious_pt(tmp_path / "ext.pt", payload, legacy)  # an outside encoder's weights (evaluate.external)
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'ext.pt'))}: cannot be read as plain tensors"):
        read_state_dict(tmp_path / "ext.pt")
    shutil.copy(tmp_path / "ext.pt", tmp_path / "encoder.safetensors")  # a pickle where the encoder should be
    with pytest.raises(Exception):
        load_encoder(tmp_path / "encoder.safetensors", ModelSpec("femto", 16, 1, 2, 4), 16)
    assert not payload.exists()


# --------------------------------------------------------------------------------------------- manifest paths
def png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("entry, needle", [
    ("../secret.png", "climbs out of the root with '..'"),
    ("sub/../../secret.png", "climbs out of the root with '..'"),
    ("{tmp}/secret.png", "absolute path"),
    ("{tmp}/root/../secret.png", "absolute path"),
    ("/etc/passwd", "absolute path"),
    ("link.png", "outside the root"),
    ("linkdir/secret.png", "outside the root"),
], ids=["parent", "nested-parent", "absolute", "absolute-through-root", "system-file", "symlink-file", "symlink-dir"])
def test_manifest_entries_cannot_leave_their_root(tmp_path, entry, needle):
    root = tmp_path / "root"
    png(root / "a.png", 0)
    (root / "sub").mkdir()
    secret = png(tmp_path / "secret.png", 1)
    (root / "link.png").symlink_to(secret)
    (root / "linkdir").symlink_to(tmp_path, target_is_directory=True)
    entry = entry.replace("{tmp}", str(tmp_path))
    with pytest.raises(S.SourceError, match=needle) as e:
        S.resolve_entry(root, entry, False, "corpus source 'lab' (manifest): m.csv row 2")
    assert "refused" in str(e.value) and "m.csv row 2" in str(e.value)
    (tmp_path / "m.csv").write_text(f"path,modality\na.png,xray\n{json.dumps(entry)},xray\n")
    with pytest.raises(S.SourceError, match=needle):
        preprocess_corpus([{"name": "lab", "kind": "manifest", "manifest": str(tmp_path / "m.csv"), "root": str(root)}],
                          tmp_path / "store", 8)
    assert not (tmp_path / "store").exists()


def test_absolute_entries_only_when_the_source_allows_them_and_symlinked_folders_are_not_walked(tmp_path):
    root = tmp_path / "root"
    png(root / "a.png", 0)
    secret = png(tmp_path / "outside" / "secret.png", 1)
    assert S.resolve_entry(root, str(secret), True, "w") == secret  # opted in: allow_absolute: true
    (root / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    report = preprocess_corpus([{"name": "f", "kind": "folder", "path": str(root), "modality": "xray"}],
                               tmp_path / "store", 8)
    assert report["sources"]["f"]["files"] == 1 and report["n_images"] == 1  # linked/secret.png never read


# --------------------------------------------------------------------------------------------- servers
def test_the_ui_binds_to_localhost_unless_told_otherwise(monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "experiment_id", lambda uri, experiment: "7")
    execs: list[list[str]] = []
    monkeypatch.setattr(cli.os, "execv", lambda exe, argv: execs.append(argv))
    assert cli.main(["ui", "--uri", "sqlite:///results/mlflow.db"]) == 0
    assert cli.main(["ui", "--uri", "sqlite:///results/mlflow.db", "--host", "0.0.0.0", "--port", "8080"]) == 0
    local, configured = execs
    assert local[1:4] == ["-m", "mlflow", "ui"] and _arg(local, "--host") == "127.0.0.1" and _arg(local, "--port") == "5000"
    assert _arg(configured, "--host") == "0.0.0.0" and _arg(configured, "--port") == "8080"
    assert "http://127.0.0.1:5000/#/experiments/7" in capsys.readouterr().out


def test_the_workflow_starts_no_server_and_the_docs_bind_localhost():
    """Jobs log to a SQLite file or to a server the user runs; no rule starts one. The README's server recipe binds
    127.0.0.1 (exposing it is the user's explicit choice)."""
    rules = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
    for path in rules:
        text = path.read_text()
        assert not re.search(r"mlflow\s+(server|ui)|biovfm\s+ui|--host|0\.0\.0\.0|http\.server", text), path
    hosts = re.findall(r"--host[ =](\S+)", (REPO / "README.md").read_text())
    assert hosts and set(hosts) == {"127.0.0.1"}
