"""Where a finished study's time went: wall and CPU seconds per rule and per job, split into start-up, setup, work
and the rest.

Reads what the study left behind, nothing else: Snakemake's job records (``.snakemake/metadata``: rule, start and
end of every job) and each job's own report (``run.json`` of pretraining, ``eval.json`` of evaluation: start-up =
the process's age when the job function began, i.e. interpreter and imports; its in-function wall time split into
setup and work; its CPU seconds). ``rest`` is the job's wall time minus those: tracking, writing outputs, process
exit and Snakemake's own bookkeeping. Run from the study's folder, or pass it:

    python benchmarks/where_time_goes.py [STUDY_DIR] [--jobs]
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
from collections import defaultdict
from pathlib import Path


def snakemake_jobs(study: Path) -> list[dict]:
    """One dict per job: rule, start, end and its outputs (from the per-output metadata records)."""
    jobs: dict[tuple[str, int], dict] = {}
    for f in (study / ".snakemake" / "metadata").iterdir():
        try:
            rec = json.loads(f.read_text())
            output = base64.b64decode(f.name.replace("@", "/")).decode()
        except (ValueError, UnicodeDecodeError):
            continue
        if rec.get("incomplete") or rec.get("starttime") is None:
            continue
        job = jobs.setdefault((rec["rule"], rec["job_hash"]), {"rule": rec["rule"], "start": rec["starttime"],
                                                               "end": rec["endtime"], "outputs": []})
        job["outputs"].append(output)
    return sorted(jobs.values(), key=lambda j: j["start"])


def self_report(study: Path, job: dict) -> dict | None:
    """The job's own account of its time (run.json or eval.json among its outputs), if it wrote one."""
    for name in ("run.json", "eval.json"):
        for out in job["outputs"]:
            if out.endswith(name) and (study / out).is_file():
                return json.loads((study / out).read_text())
    return None


def split(job: dict, rep: dict | None) -> dict:
    """Wall, CPU, start-up, setup, work and rest seconds of one job (None where the job does not say)."""
    wall = job["end"] - job["start"]
    row = {"rule": job["rule"], "job": min(job["outputs"], key=len), "wall": wall, "cpu": None, "startup": None,
           "setup": None, "work": None, "rest": None, "estimators": {}}
    if rep is None:
        return row
    proc = rep.get("process") or {}  # older job reports lack it: no CPU, start-up or pretraining setup
    row["cpu"], row["startup"] = proc.get("cpu_s"), proc.get("startup_s")
    inside = rep["wall_time_s"]
    if "tasks" in rep:  # evaluation: per task, features then every estimator
        work = sum(t["feature_s"] + t["probe_s"] for t in rep["tasks"].values())
        row["setup"], row["work"] = inside - work, work
        est = defaultdict(float)
        for t in rep["tasks"].values():
            est["features"] += t["feature_s"]
            for name, v in t["variants"].items():
                est[name] += v.get("seconds", 0.0)
        row["estimators"] = dict(est)
    else:  # pretraining: setup (store, model, FLOP count) before the training loop, then the loop
        row["setup"], row["work"] = proc.get("setup_s"), inside
    if None not in (row["startup"], row["setup"], row["work"]):
        row["rest"] = wall - row["startup"] - row["setup"] - row["work"]
    return row


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", nargs="?", default=".", help="the study's folder (where `snakemake` ran)")
    ap.add_argument("--jobs", action="store_true", help="also one line per job")
    args = ap.parse_args()
    study = Path(args.study)
    jobs = snakemake_jobs(study)
    if not jobs:
        raise SystemExit(f"{study}: no finished Snakemake jobs in .snakemake/metadata; run the study first")
    rows = [split(j, self_report(study, j)) for j in jobs]
    span = max(j["end"] for j in jobs) - min(j["start"] for j in jobs)
    print(f"# {study.resolve()}: {len(rows)} jobs, {span:.0f} s from the first job's start to the last one's end; "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    cols = ("wall", "cpu", "startup", "setup", "work", "rest")
    header = f"{'rule':<22} {'jobs':>4} " + " ".join(f"{c + '_s':>9}" for c in cols) + f" {'wall %':>6}"
    print(header)
    print("-" * len(header))
    total_wall = sum(r["wall"] for r in rows)
    by_rule: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_rule[r["rule"]].append(r)
    for rule, rs in sorted(by_rule.items(), key=lambda kv: -sum(r["wall"] for r in kv[1])):
        sums = {c: (None if any(r[c] is None for r in rs) else sum(r[c] for r in rs)) for c in cols}
        print(f"{rule:<22} {len(rs):>4} " + " ".join(f"{_fmt(sums[c]):>9}" for c in cols)
              + f" {100 * sums['wall'] / total_wall:>5.1f}%")
    print(f"{'total':<22} {len(rows):>4} {total_wall:>9.1f}  (job-seconds; wall span {span:.0f} s)")
    est: dict[str, float] = defaultdict(float)
    for r in rows:
        for k, v in r["estimators"].items():
            est[k] += v
    if est:
        print("\n# evaluation work by part (seconds, summed over jobs and tasks)")
        for k, v in sorted(est.items(), key=lambda kv: -kv[1]):
            print(f"{k:<22} {v:>9.1f}")
    if args.jobs:
        print("\n# per job")
        for r in rows:
            print(f"{r['rule']:<22} {r['job'][:60]:<60} " + " ".join(f"{_fmt(r[c]):>8}" for c in cols))


if __name__ == "__main__":
    main()
