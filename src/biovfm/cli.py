"""``biovfm <stage> ...``: argument parsing only; each Snakemake rule calls one subcommand."""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path


def _download(a: argparse.Namespace) -> None:
    from biovfm.data.download import generate_synthetic
    from biovfm.io import write_json

    spec = _json_arg("--spec", a.spec, "the download settings")
    if not isinstance(spec, dict):
        raise ValueError(f"--spec: expected the download settings as a JSON object, got {a.spec[:80]!r}")
    _check_call("--spec", "the download settings", generate_synthetic, a.out, **spec)
    manifest = generate_synthetic(a.out, **spec)
    write_json(Path(a.out) / "manifest.json", manifest)


def _download_medmnist(a: argparse.Namespace) -> None:
    from biovfm.data.download import download_medmnist
    from biovfm.data.medmnist import ZENODO_FILES

    overrides = dict(_name_md5(x) for x in a.md5)  # a DownloadError is a RuntimeError: main() reports it
    records = download_medmnist(a.out, a.flags, a.size, a.base_url or ZENODO_FILES, overrides, a.retries, a.timeout,
                                a.backoff)
    fetched = [r for r in records if r["downloaded"]]
    print(f"[download] {len(records)} MedMNIST+ file(s) at {a.size}px verified in {a.out} "
          f"({len(fetched)} fetched, {sum(r['bytes'] for r in fetched) / 1e6:.1f} MB)", flush=True)


def _name_md5(text: str) -> tuple[str, str]:
    name, sep, md5 = text.partition("=")
    if not sep or not name or len(md5) != 32:
        raise ValueError(f"--md5 {text!r}: expected FILE=MD5 (32 hex digits), e.g. pathmnist_64.npz=55aa9c1e...")
    return name, md5.lower()


def _preprocess_task(a: argparse.Namespace) -> None:
    from biovfm.data.medmnist import task_info_from_dict
    from biovfm.data.preprocess import preprocess_task

    what = "a task description (TaskInfo)"
    info = _parse("--info", what, task_info_from_dict, _json_arg("--info", a.info, what)) if a.info else a.task
    preprocess_task(a.raw, a.out, info, a.size)


def _preprocess_corpus(a: argparse.Namespace) -> None:
    from biovfm.data import store
    from biovfm.data.preprocess import log_corpus_report, preprocess_corpus

    spec = _json_arg("--spec", a.spec, "the corpus section")
    if not isinstance(spec, dict) or "sources" not in spec:
        raise ValueError(f"--spec: expected the corpus section as a JSON object with `sources`, got {a.spec[:80]!r}")
    report = preprocess_corpus(spec["sources"], a.out, a.size, a.tasks, workers=a.workers,
                               shard_size=spec.get("shard_size", store.DEFAULT_SHARD_SIZE),
                               max_bad_fraction=spec.get("max_bad_fraction", 0.01), on_leak=spec.get("on_leak", "fail"))
    for name, s in report["sources"].items():
        print(f"[preprocess] {name}: {s['files']} inputs, {s['read']} images read, {s['skipped']} skipped "
              f"({s['bad']} bad), {s['blank']} blank, {s['duplicates']} duplicates, {s['leaked']} left out as "
              f"evaluation images, {s['kept']} kept {s['by_modality']}", flush=True)
    print(f"[preprocess] corpus: {report['n_images']} images in {report['shards']} shard(s) at {a.out}; "
          f"{report['images_per_second']:.0f} images/s with {a.workers} worker(s); by modality {report['by_modality']}",
          flush=True)
    if a.tracking_uri:
        log_corpus_report(report, Path(a.out) / store.REPORT, a.tracking_uri, a.experiment)


def _mlflow_init(a: argparse.Namespace) -> None:
    from biovfm import tracking
    from biovfm.io import write_json

    exp = tracking.init_store(a.uri, a.experiment)
    write_json(a.out, {"tracking_uri": tracking.resolve_uri(a.uri), "experiment": a.experiment, "experiment_id": exp})


def _mlflow_import(a: argparse.Namespace) -> None:
    from biovfm import tracking

    if not Path(a.results).is_dir():
        raise FileNotFoundError(f"--results {a.results}: no such folder (run from the study's folder, or pass it)")
    corpus = a.corpus_report or None
    tracking.import_results(a.results, a.uri or None, a.experiment or None, corpus)


def _ui(a: argparse.Namespace) -> None:
    """The MLflow UI on the study's store, bound to ``--host`` (127.0.0.1 by default), with the link to its runs."""
    from biovfm import tracking

    exp = tracking.experiment_id(a.uri, a.experiment)
    if tracking.is_server(tracking.resolve_uri(a.uri)):  # a tracking server serves its own UI: just the link
        print(tracking.ui_url(tracking.resolve_uri(a.uri), exp), flush=True)
        return
    print(f"[ui] the study's runs: {tracking.ui_url(f'http://{a.host}:{a.port}', exp)}  (Ctrl-C stops the UI)", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking.resolve_uri(a.uri),
           "--host", a.host, "--port", str(a.port)]
    os.execv(sys.executable, cmd)  # this process becomes the UI: Ctrl-C and kill reach it directly


def _models(a: argparse.Namespace) -> None:
    from biovfm.config import load_params, model_spec
    from biovfm.models.vit import encoder_params, paper_params

    p = load_params(a.params)
    size = a.image_size or p["data"]["image_size"]
    p["data"]["image_size"] = size
    print(f"ViT ladder at {size} px (paper params: encoder + standard MAE decoder, fixed position embeddings excluded)")
    print(f"{'model':8} {'dim':>5} {'depth':>5} {'heads':>5} {'patch':>5} {'tokens':>6} {'encoder M':>10} {'paper M':>9}")
    for name in p["models"]:
        try:
            spec = model_spec(p, name)
        except ValueError as e:
            print(f"{name:8} skipped: {e}")
            continue
        print(f"{name:8} {spec.embed_dim:5d} {spec.depth:5d} {spec.num_heads:5d} {spec.patch_size:5d} "
              f"{(size // spec.patch_size) ** 2:6d} {encoder_params(spec, size) / 1e6:10.2f} {paper_params(spec, size) / 1e6:9.2f}")


def _pretrain(a: argparse.Namespace) -> None:
    from biovfm import devices
    from biovfm.train import distributed

    if distributed.launched_as_world():  # a process of the job's torchrun / srun world: the job holds the GPUs
        return _pretrain_process(a, 0)
    with devices.job_gpus(a.gpus) as gpus:
        if gpus:
            print(f"[pretrain] GPU(s) {','.join(gpus)} of this machine (CUDA_VISIBLE_DEVICES)", flush=True)
        _pretrain_process(a, len(gpus))


def _pretrain_process(a: argparse.Namespace, claimed_gpus: int) -> None:
    from biovfm.config import pretrain_job_from_json
    from biovfm.train import distributed
    from biovfm.train.engine import pretrain
    from biovfm.train.loader import micro_batch

    job = _parse("--job", "a pretraining job", pretrain_job_from_json, a.job)
    # 0: one per visible GPU; a job that got GPUs (SLURM, or claimed here): one per GPU; under srun -n N: N
    nproc = distributed.resolve_nproc(job.train.nproc if a.processes is None else a.processes, gpus=claimed_gpus)
    threads = a.threads or job.train.threads
    micro_batch(job.train.batch_size, nproc, job.train.grad_accum)  # fail here, not in every process
    if nproc > 1 and not distributed.launched_as_world():
        # Re-run this very command as nproc processes; each gets its share of the job's threads.
        argv = ["pretrain", "--job", a.job, "--corpus", a.corpus, "--out", a.out, "--processes", str(nproc),
                "--threads", str(max(1, threads // nproc))]
        status = distributed.relaunch(nproc, argv)
        if status:
            raise RuntimeError(f"torchrun with {nproc} processes exited with status {status} (the ranks' errors are "
                               "printed above)")
        return
    job = replace(job, train=replace(job.train, threads=threads, nproc=nproc))
    pretrain(job, a.corpus, a.out)


def _evaluate(a: argparse.Namespace) -> None:
    from biovfm import devices
    from biovfm.config import eval_job_from_json

    job = _parse("--job", "an evaluation job", eval_job_from_json, a.job)
    if a.threads:
        job = replace(job, threads=a.threads)
    with devices.job_gpus(a.gpus) as gpus:
        if gpus:
            print(f"[evaluate] GPU(s) {','.join(gpus)} of this machine (CUDA_VISIBLE_DEVICES)", flush=True)
        from biovfm.evaluate.job import evaluate

        evaluate(job, a.tasks, a.out, a.checkpoint)


def _aggregate(a: argparse.Namespace) -> None:
    from biovfm.analysis.collect import aggregate

    study = _json_arg("--study", a.study, "the study settings")
    aggregate(a.evals, a.uri, a.out, study=study, task_stats=a.task_stats, n_boot=a.n_boot,
              corpus_report=a.corpus_report, experiment=a.experiment, workers=a.threads)


def _export(a: argparse.Namespace) -> None:
    from biovfm import export

    if a.select and (a.run or a.out):
        raise ValueError("give either RUN (and --out) or --select, not both")
    if a.select:
        export.export_selected(a.select, a.results, a.out_root, a.corpus, a.manifest)
    elif a.run:
        export.export_run(a.run, a.out, a.results, a.corpus)
    else:
        raise ValueError("nothing to export: give a run folder or id (e.g. mae/micro/all/n4500/s0), or --select best|all")


def _show_tasks(a: argparse.Namespace) -> None:
    from biovfm.analysis.figures import plot_task_examples

    plot_task_examples(a.tasks, a.out)


def _task_stats(a: argparse.Namespace) -> None:
    from biovfm.analysis.taskstats import run_task_stats
    from biovfm.data.medmnist import task_info_from_dict

    custom = ([_parse("--custom-tasks", "a list of task descriptions (TaskInfo)", task_info_from_dict, d)
               for d in _json_arg("--custom-tasks", a.custom_tasks, "a list of task descriptions")]
              if a.custom_tasks else [])
    run_task_stats(a.tasks, a.out, custom, max_images=a.max_images, seed=a.seed)


def _sync(a: argparse.Namespace) -> None:
    from biovfm import sync

    cwd = Path(a.dir)
    if a.action == "push":
        sync.push(cwd, a.remote, a.jobs)
    elif a.action == "pull":
        sync.pull(cwd, a.remote, a.jobs, adopt_outputs=not a.no_adopt, snakemake_args=a.snakemake)
    else:
        sync.adopt(cwd, a.snakemake)


def _json_arg(option: str, text: str, what: str):
    """A JSON argument; malformed JSON is an error naming the option (the workflow writes these: a hand-edited
    command line is the usual cause)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{option}: not valid JSON ({e.msg} at character {e.pos}): expected {what}, as the workflow "
                         f"writes it; copy the command from the job's log or rerun it through snakemake") from None


def _parse(option: str, what: str, fn, value):
    """``fn(value)`` for a job description; a missing or unknown field is an error naming the option."""
    try:
        return fn(value)
    except json.JSONDecodeError:
        _json_arg(option, value, what)  # raises, naming the option
        raise
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{option}: not {what} of this version of biovfm ({type(e).__name__}: {_text(e)}); "
                         "the workflow writes it: rerun the job through snakemake") from None


def _check_call(option: str, what: str, fn, *args, **kwargs) -> None:
    """Check that the JSON fields of ``option`` fit ``fn``'s parameters, before anything runs."""
    import inspect

    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"{option}: not {what} of this version of biovfm ({e}); the workflow writes it: rerun "
                         "the job through snakemake") from None


def _text(e: BaseException) -> str:
    """An exception's message; a KeyError's without the quotes str() adds."""
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        return e.args[0]
    return str(e)


GPUS_HELP = ("GPUs this job uses on a machine with GPUs: it claims that many free ones (one job per GPU) and pins "
             "itself to them with CUDA_VISIBLE_DEVICES; 0 or no GPU: CPU. Inside a SLURM job, SLURM's allocation")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="biovfm", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("download", help="fetch (or, for the synthetic default, generate) raw data")
    s.add_argument("--spec", required=True, help="data settings (JSON): tasks, split sizes, size, corpus_size, seed")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_download)

    s = sub.add_parser("download-medmnist", help="fetch and verify real MedMNIST+ npz files (resume, retries, MD5)")
    s.add_argument("--flags", nargs="+", required=True, help="MedMNIST 2D flags, e.g. pathmnist chestmnist")
    s.add_argument("--size", type=int, required=True, help="28, 64, 128 or 224")
    s.add_argument("--out", required=True, help="folder for <flag>[_<size>].npz (+ a .md5 sidecar each)")
    s.add_argument("--base-url", default=None, help="folder URL of the files (a mirror); default: the Zenodo record")
    s.add_argument("--md5", nargs="*", default=[], metavar="FILE=MD5", help="MD5 overrides for re-packed mirrors")
    s.add_argument("--retries", type=int, default=5)
    s.add_argument("--timeout", type=float, default=60.0, help="seconds")
    s.add_argument("--backoff", type=float, default=2.0, help="seconds before the first retry (doubling)")
    s.set_defaults(fn=_download_medmnist)

    s = sub.add_parser("preprocess-task", help="resize one evaluation task to the study's image size")
    s.add_argument("--task", required=True)
    s.add_argument("--info", default="", help="task description (TaskInfo JSON) for a custom task")
    s.add_argument("--raw", required=True)
    s.add_argument("--size", type=int, required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_preprocess_task)

    s = sub.add_parser("preprocess-corpus", help="build the pretraining store from corpus.sources (dedup, leakage "
                       "check, per-source report)")
    s.add_argument("--spec", required=True, help="the corpus section (JSON): sources, shard_size, max_bad_fraction, on_leak")
    s.add_argument("--size", type=int, required=True, help="the study's image size")
    s.add_argument("--tasks", nargs="*", default=[], help="evaluation npz files (every split is checked for leakage)")
    s.add_argument("--workers", type=int, default=1, help="reader processes (Snakemake's {threads})")
    s.add_argument("--tracking-uri", default="", help="MLflow store to log the report to, if it exists")
    s.add_argument("--experiment", default="biovfm-scale")
    s.add_argument("--out", required=True, help="store folder (replaced as a whole on success)")
    s.set_defaults(fn=_preprocess_corpus)

    s = sub.add_parser("show-tasks", help="montage of example images and labels of each task")
    s.add_argument("--tasks", nargs="+", required=True, help="task npz files")
    s.add_argument("--out", required=True, help="PNG path (an SVG is written next to it)")
    s.set_defaults(fn=_show_tasks)

    s = sub.add_parser("task-stats", help="model-independent task characteristics (samples, DBI, compressibility, "
                       "entropy, imbalance) for the slope-vs-factor analysis")
    s.add_argument("--tasks", nargs="+", required=True, help="task npz files (<task>_<size>.npz)")
    s.add_argument("--custom-tasks", default="", help="JSON list of TaskInfo dicts for the non-MedMNIST tasks")
    s.add_argument("--max-images", type=int, default=2000, help="images sampled per task for the DBI")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="CSV path, e.g. results/tables/task_stats.csv")
    s.set_defaults(fn=_task_stats)

    s = sub.add_parser("models", help="the ViT ladder with parameter counts (encoder-only and as the paper counts them)")
    s.add_argument("--params", default="params.yaml")
    s.add_argument("--image-size", type=int, default=0, help="default: data.image_size of the params")
    s.set_defaults(fn=_models)

    s = sub.add_parser("mlflow-init", help="create the MLflow store and experiment once")
    s.add_argument("--uri", required=True)
    s.add_argument("--experiment", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_mlflow_init)

    s = sub.add_parser("mlflow-import", help="replay the jobs' tracking records (params, tags, metric histories) into "
                       "MLflow, adding only what is missing (after the store was unreachable; safe to rerun)")
    s.add_argument("--results", default="results", help="the study's results folder (searched for *mlflow.json records)")
    s.add_argument("--uri", default="", help="target store; default MLFLOW_TRACKING_URI, else the URI each job used")
    s.add_argument("--experiment", default="", help="default: the experiment each job used")
    s.add_argument("--corpus-report", default="data/processed/corpus/report.json",
                   help="the corpus report to replay too, if the file exists ('' to skip)")
    s.set_defaults(fn=_mlflow_import)

    s = sub.add_parser("ui", help="the MLflow UI on the study's store, with the link that opens on its runs table")
    s.add_argument("--uri", default="sqlite:///results/mlflow.db", help="the store (MLFLOW_TRACKING_URI wins)")
    s.add_argument("--experiment", default="biovfm-scale", help="params.yaml: tracking.experiment")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    s.add_argument("--port", type=int, default=5000)
    s.set_defaults(fn=_ui)

    s = sub.add_parser("pretrain", help="pretrain one grid point")
    s.add_argument("--job", required=True, help="resolved job config (JSON)")
    s.add_argument("--corpus", required=True)
    s.add_argument("--threads", type=int, default=0, help="override the job's thread count (Snakemake's {threads})")
    s.add_argument("--processes", type=int, default=None,
                   help="processes (torchrun, DDP) for this job; default pretrain.nproc; 0 = one per visible GPU")
    s.add_argument("--gpus", type=int, default=0, help=GPUS_HELP)
    s.add_argument("--out", required=True, help="run directory")
    s.set_defaults(fn=_pretrain)

    s = sub.add_parser("evaluate", help="linear-probe one checkpoint or baseline on every task")
    s.add_argument("--job", required=True, help="resolved job config (JSON)")
    s.add_argument("--tasks", required=True, help="folder of processed task npz files")
    s.add_argument("--checkpoint", default=None)
    s.add_argument("--threads", type=int, default=0, help="override the job's thread count (Snakemake's {threads})")
    s.add_argument("--gpus", type=int, default=0, help=GPUS_HELP)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_evaluate)

    s = sub.add_parser("aggregate", help="bootstrap intervals, scaling fits, figures and report from the MLflow runs of "
                       "this DAG; eval.json files that do not exist are reported as missing")
    s.add_argument("--evals", nargs="+", required=True, help="the expected eval.json files")
    s.add_argument("--uri", required=True)
    s.add_argument("--study", default="{}", help="JSON: data source, image size and modalities (params.yaml)")
    s.add_argument("--task-stats", default=None, help="CSV of task characteristics (biovfm task-stats) for Figure F")
    s.add_argument("--corpus-report", default=None,
                   help="the corpus report (data/processed/corpus/report.json): what the corpus left out, in the report")
    s.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of each test set")
    s.add_argument("--experiment", default=None,
                   help="MLflow experiment of an aggregate run holding the report, figures, tables and headline")
    s.add_argument("--threads", type=int, default=1, help="processes of the bootstrap (one task each)")
    s.add_argument("--out", required=True, help="results folder")
    s.set_defaults(fn=_aggregate)

    s = sub.add_parser("export", help="an encoder as a folder timm loads offline: model.safetensors, config.json "
                       "(timm's hub layout) and a model card (README.md)")
    s.add_argument("run", nargs="?", default="", help="run folder, or run id under RESULTS/runs (mae/micro/all/n4500/s0)")
    s.add_argument("--out", default="", help="export folder (default RESULTS/export/<method>-<model>-<modality>-n<N>-s<seed>)")
    s.add_argument("--results", default="results", help="the study's results folder (run ids, points.csv, baselines)")
    s.add_argument("--corpus", default="data/processed/corpus",
                   help="the pretraining store (report.json, index.csv): sources, counts and licenses for the card")
    s.add_argument("--select", choices=["best", "all"], default="",
                   help="instead of RUN: from RESULTS/summary.csv, each method's best run by mean AUC, or every run")
    s.add_argument("--out-root", default="", help="with --select: parent of the export folders (default RESULTS/export)")
    s.add_argument("--manifest", default="", help="with --select: JSON list of the exports (default OUT_ROOT/exported.json)")
    s.set_defaults(fn=_export)

    s = sub.add_parser("sync", help="push the study (data, checkpoints, MLflow store, results) to a DVC remote, or "
                       "pull it and mark it up to date so only missing outputs rebuild")
    s.add_argument("action", choices=["push", "pull", "adopt"],
                   help="push: dvc push; pull: dvc pull + adopt; adopt: after a `dvc checkout`, touch the outputs in "
                   "DAG order and record Snakemake's params/code metadata (snakemake --touch --forceall)")
    s.add_argument("-r", "--remote", default=None, help="DVC remote name (default: the default remote)")
    s.add_argument("-j", "--jobs", type=int, default=None, help="parallel transfers (dvc -j)")
    s.add_argument("--no-adopt", action="store_true", help="pull: only `dvc pull`")
    s.add_argument("--dir", default=".", help="the study's checkout (default: here)")
    s.add_argument("snakemake", nargs="*", metavar="-- SNAKEMAKE_ARGS",
                   help="extra snakemake arguments for adopt, after `--` (e.g. -- --configfile configs/x.yaml)")
    s.set_defaults(fn=_sync)

    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except Exception as e:  # noqa: BLE001 - every failure ends as a message on top and its traceback in the log
        report_error(args.cmd, e)
        return 1
    return 0


def report_error(cmd: str, e: BaseException) -> None:
    """The one-line message first (what a user reads in Snakemake's summary), a hint for the errors of scale (out of
    GPU memory or RAM: the settings of this command to change; a full disk: what to free and that a rerun is safe; a
    failed collective), then the traceback, so that a CUDA out-of-memory or NCCL error in a cluster log can be traced."""
    from biovfm.io import full_disk_error

    print(f"biovfm {cmd}: error: {_text(e) or type(e).__name__}", file=sys.stderr)
    name = type(e).__name__
    memory = _out_of_memory(e)
    if memory:
        print(f"hint: the job ran out of {memory}; {MEMORY_SETTINGS.get(cmd, MEMORY_SETTINGS[''])}"
              + (MEMORY_RAM.get(cmd, MEMORY_RAM[""]) if memory == "memory (RAM)" else ""), file=sys.stderr)
    elif (full := full_disk_error(e)) is not None:
        where = full.filename or "the job's outputs"
        what = "is full" if full.errno == errno.ENOSPC else "is over its quota"
        print(f"hint: the disk holding {where} {what} ({full.strerror}); free space there or point the study at a "
              "bigger disk, then rerun the same command: finished outputs are kept and nothing half-written is taken "
              "as done", file=sys.stderr)
    elif name == "DistBackendError":
        print("hint: a collective between the job's processes failed (NCCL/gloo); the traceback of the rank that "
              "failed first is the one to read", file=sys.stderr)
    print("".join(traceback.format_exception(e)).rstrip(), file=sys.stderr, flush=True)


# What sizes a command's memory (RAM or GPU): the settings to lower when it runs out.
MEMORY_SETTINGS = {
    "pretrain": "lower pretrain.batch_size or raise pretrain.grad_accum (same global batch, smaller micro-batches)",
    "evaluate": "lower evaluate.batch_size (images per feature-extraction batch) or evaluate.probe.batch_size (the "
                "linear probe's mini-batches)",
    "preprocess-corpus": "lower the rule's threads (--workers: reader processes) or corpus.shard_size (images held "
                         "before a shard is written)",
    "aggregate": "lower the rule's threads (--threads: bootstrap processes, one task each) or --n-boot",
    "": "lower the batch sizes of its stage (pretrain.batch_size, evaluate.batch_size)",
}
# Where a job asks for more RAM (SLURM: the params' cluster section; locally: fewer jobs at once).
MEMORY_RAM = {
    "pretrain": ", or give it more (cluster.pretrain.<model>.mem_mb) or run fewer jobs at once on this machine",
    "evaluate": ", or give it more (cluster.evaluate.<model>.mem_mb) or run fewer jobs at once on this machine",
    "": ", or give it more (cluster.rules.<rule>.mem_mb) or run fewer jobs at once on this machine",
}


def _out_of_memory(e: BaseException) -> str:
    """"GPU memory" or "memory (RAM)" when ``e`` (or what it was raised from) is an allocation that failed, else ""."""
    from biovfm.io import exception_chain

    for x in exception_chain(e):
        text = str(x)
        if type(x).__name__ == "OutOfMemoryError" or "CUDA out of memory" in text:
            return "GPU memory"
        # numpy's _ArrayMemoryError is a MemoryError; torch's CPU allocator raises a RuntimeError that names itself
        if isinstance(x, MemoryError) or ("DefaultCPUAllocator" in text and "memory" in text):
            return "memory (RAM)"
    return ""


def run() -> None:
    """The ``biovfm`` command: :func:`main`, then the exit handlers, then a quick exit without the interpreter's
    teardown, which after torch, timm and MLflow are loaded takes about 1.2 s of every job (module teardown and
    garbage collection of thousands of modules; ``benchmarks/where_time_goes.py`` counts it in "rest"). Every
    output is closed and renamed by then, and the exit handlers (logging, multiprocessing, MLflow) still run."""
    import atexit

    code = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
