"""Fault injection for the kill tests (tests/test_kills.py), loaded by any Python process that has this folder on
PYTHONPATH and BIOVFM_FAULT in its environment; every other process is untouched.

Like SQLite's fault-injecting VFS, it names the I/O points of one ``biovfm <command>`` process: each open for
writing, each ``write()`` call on a file open for writing, each rename, removal and folder creation, all under the
job's working folder (the study). A point's id is its kind, its path with the random parts of temp names and MLflow
run ids masked, and its occurrence, e.g. ``write data/raw/synthetic/.corpus.npz.*.tmp.npz #3``: the same point in a
rerun of the job, so a resumed job can be killed again further on. BIOVFM_FAULT is JSON:

* ``{"command": "*", "record": "DIR"}`` writes the points of each process to ``DIR/<command>.<pid>.jsonl`` (a first
  line with its argv, then one line per point);
* ``{"command": "pretrain", "kill_at": ID, "victim": "job" | "group", "log": FILE}`` writes the point to FILE once
  the job reaches it, then SIGKILLs the job's process (``job``: Snakemake sees a failed job) or its whole process
  group (``group``: Snakemake dies with it, as on a preempted node).

Audit hooks see opens, renames and removals before they happen; ``write()`` calls are seen by a profile function
that is on only while a file under the study is open for writing.
"""
from __future__ import annotations

import atexit
import collections
import json
import os
import re
import signal
import sys

_SPEC = json.loads(os.environ.get("BIOVFM_FAULT") or "null")
# The audit events of changes to the tree, with the position of their dir_fd argument (None: it has none).
_DIR_FD = {"os.rename": 2, "os.remove": 1, "os.mkdir": 2, "shutil.rmtree": 1, "os.truncate": None}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# The random parts of names: our temps (.<name>.<host>-<pid>.<random>.tmp), MLflow's (.artifact.uploading.<random>)
# and MLflow run ids.
_RANDOM = [(re.compile(r"\.[^./]+-\d+\.[A-Za-z0-9_]{8}\.(tmp|old)"), r".*.\1"),
           (re.compile(r"\.[A-Za-z0-9_]{8}\.(tmp|old)"), r".*.\1"),
           (re.compile(r"(\.uploading)\.[A-Za-z0-9_]{8}$"), r"\1.*"),
           (re.compile(r"[0-9a-f]{32}"), "<run>")]


def _mask(path: str) -> str:
    for pattern, repl in _RANDOM:
        path = pattern.sub(repl, path)
    return path


def _ours() -> bool:
    return (_SPEC is not None and len(sys.argv) > 1 and os.path.basename(sys.argv[0]) == "biovfm"
            and _SPEC["command"] in (sys.argv[1], "*"))


class _Points:
    def __init__(self, spec: dict) -> None:
        self.spec, self.root = spec, os.path.realpath(os.getcwd()) + os.sep
        self.seen: collections.Counter[str] = collections.Counter()
        self.writing: set[str] = set()  # paths open for writing under the study
        self.busy = False  # inside our own record/log writes
        self.record = None

    def inside(self, path) -> str | None:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, (str, os.PathLike)):
            return None
        full = os.path.realpath(os.fspath(path))
        return full[len(self.root):] if full.startswith(self.root) else None

    def point(self, kind: str, rel: str) -> None:
        if self.busy:
            return
        self.busy = True
        name = f"{kind} {_mask(rel)}"
        self.seen[name] += 1
        entry = {"id": f"{name} #{self.seen[name]}", "i": sum(self.seen.values()), "kind": kind, "path": rel}
        if "record" in self.spec:
            if self.record is None:  # opened once, closed at exit (a recording process is never killed)
                out = os.path.join(self.spec["record"], f"{sys.argv[1]}.{os.getpid()}.jsonl")
                self.record = open(out, "w")
                atexit.register(self.record.close)
                self.record.write(json.dumps({"argv": sys.argv[1:]}) + "\n")
            self.record.write(json.dumps(entry) + "\n")
        elif entry["id"] == self.spec["kill_at"]:
            with open(self.spec["log"], "w") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())
            if self.spec.get("victim") == "group":
                os.killpg(os.getpgid(0), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        self.busy = False

    def audit(self, event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
                      else bool((flags or 0) & _WRITE_FLAGS))
            rel = self.inside(path) if writes else None
            if rel is not None:
                self.point("open-for-write", rel)
                if isinstance(mode, str):  # a file object, whose write() calls the profile function sees
                    self.writing.add(rel)
                    sys.setprofile(self.profile)
        elif event in _DIR_FD:
            dir_fd = args[_DIR_FD[event]] if _DIR_FD[event] is not None else None
            rel = self.inside(args[0]) if dir_fd in (None, -1) else None  # a name relative to a folder's fd: not here
            if rel is not None:
                self.point(event.split(".")[-1], rel)

    def profile(self, frame, what: str, arg) -> None:
        if what != "c_call" or getattr(arg, "__name__", None) not in ("write", "writelines", "close", "__exit__"):
            return
        rel = self.inside(getattr(getattr(arg, "__self__", None), "name", None))
        if rel is None or rel not in self.writing:
            return
        if arg.__name__ in ("close", "__exit__"):
            self.writing.discard(rel)
            if not self.writing:
                sys.setprofile(None)
        else:
            self.point("write", rel)


if _ours():
    sys.addaudithook(_Points(_SPEC).audit)
