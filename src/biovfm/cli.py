"""``biovfm <stage> ...``: argument parsing only; each Snakemake rule calls one subcommand."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path


def _download(a: argparse.Namespace) -> None:
    import json

    from biovfm.data.download import generate_synthetic
    from biovfm.io import write_json

    spec = json.loads(a.spec)
    manifest = generate_synthetic(a.out, **spec)
    write_json(Path(a.out) / "manifest.json", manifest)


def _preprocess_task(a: argparse.Namespace) -> None:
    from biovfm.data.preprocess import preprocess_task

    preprocess_task(a.raw, a.out, a.task, a.size)


def _preprocess_corpus(a: argparse.Namespace) -> None:
    from biovfm.data.preprocess import preprocess_corpus

    report = preprocess_corpus(a.raw, a.out, a.size, a.source, a.tasks)
    print(f"[preprocess] corpus: {report['kept']} images kept, {report['duplicates']} duplicates dropped, no leakage", flush=True)


def _mlflow_init(a: argparse.Namespace) -> None:
    from biovfm import tracking
    from biovfm.io import write_json

    exp = tracking.init_store(a.uri, a.experiment)
    write_json(a.out, {"tracking_uri": tracking.resolve_uri(a.uri), "experiment": a.experiment, "experiment_id": exp})


def _pretrain(a: argparse.Namespace) -> None:
    from biovfm.config import pretrain_job_from_json
    from biovfm.train.engine import pretrain

    job = pretrain_job_from_json(a.job)
    if a.threads:
        job = replace(job, train=replace(job.train, threads=a.threads))
    pretrain(job, a.corpus, a.out)


def _evaluate(a: argparse.Namespace) -> None:
    from biovfm.config import eval_job_from_json
    from biovfm.evaluate.job import evaluate

    job = eval_job_from_json(a.job)
    if a.threads:
        job = replace(job, threads=a.threads)
    evaluate(job, a.tasks, a.out, a.checkpoint)


def _aggregate(a: argparse.Namespace) -> None:
    from biovfm.analysis.collect import aggregate

    aggregate(a.evals, a.uri, a.out)


def _show_tasks(a: argparse.Namespace) -> None:
    from biovfm.analysis.figures import plot_task_examples

    plot_task_examples(a.tasks, a.out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="biovfm", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("download", help="fetch (or, for the synthetic default, generate) raw data")
    s.add_argument("--spec", required=True, help="data settings (JSON): tasks, split sizes, size, corpus_size, seed")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_download)

    s = sub.add_parser("preprocess-task", help="resize one evaluation task to the study's image size")
    s.add_argument("--task", required=True)
    s.add_argument("--raw", required=True)
    s.add_argument("--size", type=int, required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_preprocess_task)

    s = sub.add_parser("preprocess-corpus", help="build the pretraining store (dedup, index, leakage check)")
    s.add_argument("--raw", required=True)
    s.add_argument("--size", type=int, required=True)
    s.add_argument("--source", default="synthetic")
    s.add_argument("--tasks", nargs="*", default=[], help="evaluation npz files to check for leakage")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_preprocess_corpus)

    s = sub.add_parser("show-tasks", help="montage of example images and labels of each task")
    s.add_argument("--tasks", nargs="+", required=True, help="task npz files")
    s.add_argument("--out", required=True, help="PNG path (an SVG is written next to it)")
    s.set_defaults(fn=_show_tasks)

    s = sub.add_parser("mlflow-init", help="create the MLflow store and experiment once")
    s.add_argument("--uri", required=True)
    s.add_argument("--experiment", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_mlflow_init)

    s = sub.add_parser("pretrain", help="pretrain one grid point")
    s.add_argument("--job", required=True, help="resolved job config (JSON)")
    s.add_argument("--corpus", required=True)
    s.add_argument("--threads", type=int, default=0, help="override the job's thread count (Snakemake's {threads})")
    s.add_argument("--out", required=True, help="run directory")
    s.set_defaults(fn=_pretrain)

    s = sub.add_parser("evaluate", help="linear-probe one checkpoint or baseline on every task")
    s.add_argument("--job", required=True, help="resolved job config (JSON)")
    s.add_argument("--tasks", required=True, help="folder of processed task npz files")
    s.add_argument("--checkpoint", default=None)
    s.add_argument("--threads", type=int, default=0, help="override the job's thread count (Snakemake's {threads})")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_evaluate)

    s = sub.add_parser("aggregate", help="summary table, slopes and figures from the MLflow runs of this DAG")
    s.add_argument("--evals", nargs="+", required=True)
    s.add_argument("--uri", required=True)
    s.add_argument("--out", required=True, help="results folder")
    s.set_defaults(fn=_aggregate)

    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        print(f"biovfm {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
