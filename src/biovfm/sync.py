"""``biovfm sync push|pull|adopt``: move the study (data, checkpoints, MLflow store, results) through a DVC remote.

``push`` uploads what ``dvc.lock`` names; ``pull`` downloads it into a checkout and then *adopts* it: DVC restores
the files but not their modification times, and a fresh clone has no ``.snakemake/metadata`` (the record of each
output's params and code that Snakemake's rerun triggers compare against). ``snakemake --touch --forceall``
touches every output of the DAG in dependency order and writes that record for the checkout's own params and
code, so the next ``snakemake`` (or ``dvc repro``) runs only what is missing -- e.g. the aggregate stage's
tables and figures -- and a later params or code change reruns exactly the jobs it affects, as on the machine
that trained. Adopting is refused when ``params.yaml`` or the code differ from ``dvc.lock``: then the pulled
outputs belong to another configuration and marking them up to date would be wrong.

Every tool runs from an argument list (never a shell string); DVC's own error is shown, followed by a hint.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

STAGE = "study"
DVC = [sys.executable, "-m", "dvc"]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


class SyncError(RuntimeError):
    """A step failed; the message says what to do (the tool's own error was already printed)."""


def _run(cmd: list[str], cwd: Path, capture: bool = False) -> tuple[int, str]:
    """Run a tool. capture: return its stdout, show its stderr only if it fails. Else stdout passes through and
    stderr is echoed live and returned (for the hint)."""
    if capture:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-5000:] + done.stderr[-5000:])
        return done.returncode, done.stdout
    proc = subprocess.Popen(cmd, cwd=cwd, stderr=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stderr is not None
    err = []
    for line in proc.stderr:
        err.append(line)
        sys.stderr.write(line)
        sys.stderr.flush()
    return proc.wait(), "".join(err)


def _dvc_query(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(DVC + args, cwd=cwd, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _remote_url(remote: str | None, cwd: Path) -> tuple[str, str]:
    """(name, url) of the remote a push/pull uses: -r NAME, else the default; ("", "") when there is none."""
    name = remote or _dvc_query(["remote", "default"], cwd)
    if not name:
        return "", ""
    for line in _dvc_query(["remote", "list"], cwd).splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == name:
            return name, parts[1]
    return name, ""


def _local_path(url: str, cwd: Path) -> Path | None:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # s3://, ssh://, gs://... (a one-letter scheme is a drive)
        return None
    path = Path(url)
    return path if path.is_absolute() else (cwd / ".dvc" / path).resolve()  # DVC resolves relative to .dvc/


def remote_hint(action: str, remote: str | None, cwd: Path, dvc_error: str) -> str:
    """What to do after a failed ``dvc push``/``dvc pull``: no remote, a bad local path, or missing data."""
    name, url = _remote_url(remote, cwd)
    add = ("dvc remote add -d storage /shared/biovfm-dvc   (or s3://bucket/biovfm, ssh://host/path); "
           "git add .dvc/config && git commit -m 'DVC remote'   (or `dvc remote add --local -d ...` for this "
           "machine only)")
    if not name:
        return f"dvc {action} failed: no DVC remote is configured. Add one: {add}"
    if not url:
        return (f"dvc {action} failed: there is no remote named {name!r} (`dvc remote list` shows the configured "
                f"ones). Add it: {add}")
    where = f"remote {name!r} ({url})"
    path = _local_path(url, cwd)
    if path is not None:
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            return (f"dvc {action} failed: {where}: {existing} is a file, not a folder. Point the remote at a "
                    f"folder: dvc remote modify {name} url /path/to/folder")
        if action == "push" and not os.access(existing, os.W_OK | os.X_OK):
            return (f"dvc {action} failed: {where}: {existing} is not writable by this user. Fix its permissions "
                    f"or point the remote elsewhere: dvc remote modify {name} url /path/to/folder")
        if action == "pull" and not path.exists():
            return (f"dvc pull failed: {where} does not exist on this machine. Is the shared folder mounted here, "
                    f"and did the machine that trained run `biovfm sync push`? Else: dvc remote modify --local "
                    f"{name} url /where/it/is/mounted")
    if action == "pull" and ("missing" in dvc_error.lower() or "do not exist" in dvc_error.lower()):
        return (f"dvc pull failed: {where} lacks some files that dvc.lock names. On the machine that trained, "
                f"from the commit you checked out: biovfm sync push   (or dvc push -r {name})")
    return (f"dvc {action} failed for {where}: check the URL (`dvc remote list`), that it can be reached from "
            f"here, and its credentials (`dvc remote modify --local {name} ...`)")


def stage_changes(cwd: Path) -> dict[str, object]:
    """``dvc status`` of the study stage as {kind: detail}; {} when dvc.lock describes the workspace."""
    rc, out = _run(DVC + ["status", STAGE, "--json"], cwd, capture=True)
    if rc != 0:
        raise SyncError(f"`dvc status {STAGE}` failed (is this a DVC checkout of the study with a dvc.lock?)")
    status = json.loads(out or "{}").get(STAGE, [])
    changes: dict[str, object] = {}
    for item in status:
        if isinstance(item, dict):
            changes.update(item)
        else:
            changes[str(item)] = True
    return changes


def _dvc_args(remote: str | None, jobs: int | None) -> list[str]:
    return (["-r", remote] if remote else []) + (["-j", str(jobs)] if jobs else [])


def push(cwd: Path, remote: str | None = None, jobs: int | None = None) -> None:
    changes = stage_changes(cwd)
    if changes:
        raise SyncError(
            f"dvc.lock does not describe the workspace ({json.dumps(changes)}), so a push would not carry these "
            f"results. Record them first: `dvc repro` (or, if you ran snakemake yourself, `dvc commit -f {STAGE}`), "
            "then git add dvc.lock && git commit")
    rc, err = _run(DVC + ["push", *_dvc_args(remote, jobs)], cwd)
    if rc != 0:
        raise SyncError(remote_hint("push", remote, cwd, err))
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "dvc.lock", ".dvc/config"], cwd=cwd,
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        print("[sync] pushed; now commit and push what names the data, so that clones find it:\n"
              "  git add dvc.lock .dvc/config && git commit -m 'study results' && git push", flush=True)
    else:
        print("[sync] pushed; clones of this commit get the study with `biovfm sync pull`", flush=True)


def adopt(cwd: Path, snakemake_args: Sequence[str] = ()) -> None:
    """Mark the checked-out outputs as Snakemake's own: touch in DAG order, record params/code metadata."""
    changes = stage_changes(cwd)
    changed = {k: v for k, v in changes.items() if k != "changed outs"}
    if changed:
        raise SyncError(
            f"params.yaml or the code differ from dvc.lock ({json.dumps(changed)}): the pulled outputs belong to "
            "another configuration, so they were not marked up to date. `dvc repro` reruns what changed; or "
            "check out the commit whose dvc.lock you pulled")
    rc, _ = _run(SNAKEMAKE + ["--touch", "--forceall", "--cores", "1", *snakemake_args], cwd, capture=True)
    if rc != 0:
        raise SyncError("`snakemake --touch --forceall` failed (see above); the pulled files are in place but "
                        "Snakemake may rerun jobs whose inputs look newer")
    print("[sync] outputs marked up to date for Snakemake; `snakemake -n` shows what is left to run", flush=True)


def pull(cwd: Path, remote: str | None = None, jobs: int | None = None, adopt_outputs: bool = True,
         snakemake_args: Sequence[str] = ()) -> None:
    rc, err = _run(DVC + ["pull", *_dvc_args(remote, jobs)], cwd)
    if rc != 0:
        raise SyncError(remote_hint("pull", remote, cwd, err))
    if adopt_outputs:
        adopt(cwd, snakemake_args)
