# Helpers shared by the rules: grid expansion, paths and each job's resolved config (as JSON).
import dataclasses
import json
import os
import re

from biovfm import config as cfg
from biovfm import devices
from biovfm.data.medmnist import npz_name

SIZE = config["data"]["image_size"]
TASKS = config["data"]["tasks"]
RAW = f"data/raw/{config['data']['source']}"
TASK_DIR = "data/processed/tasks"
SOURCE = config["data"]["source"]  # synthetic | medmnist
MEDMNIST_SIZE = config["data"]["medmnist"]["size"]  # the downloaded MedMNIST+ size (resolved by validate_params)
CUSTOM_TASKS = {t.flag: t for t in cfg.custom_task_infos(config)}  # the user's own evaluation tasks
CUSTOM_PATHS = {t["name"]: t["path"] for t in config["data"]["custom_tasks"]}
BENCHMARK = list(cfg.benchmark_tasks(config))  # every evaluated task: data.tasks, then the custom tasks
TASK_FILES = expand(f"{TASK_DIR}/{{task}}_{{size}}.npz", task=BENCHMARK, size=SIZE)


def raw_task(task):
    """Raw npz of a benchmark task: the user's own file, the published MedMNIST+ file, or the synthetic one."""
    if task in CUSTOM_PATHS:
        return CUSTOM_PATHS[task]
    if SOURCE == "medmnist":
        return f"{RAW}/{npz_name(task, MEDMNIST_SIZE)}"
    return f"{RAW}/{task}.npz"


CORPUS_DIR = "data/processed/corpus"
CONDA_ENV = "../../envs/biovfm.yaml"  # for sites that deploy with conda (snakemake --sdm conda); relative to rules/
MLFLOW_INIT = "results/mlflow_init.json"


def mlflow_store():
    """The input that makes a job wait for the MLflow store. ancient(): re-creating results/mlflow_init.json reruns
    nothing; but when tracking.uri or .experiment changed (the file names another store), a plain input, so that the
    jobs that log rerun in the same run as mlflow_init (Snakemake does not look at the params of jobs below a rerun
    job whose inputs from it are all ancient: they would rerun only on the next invocation)."""
    try:
        with open(MLFLOW_INIT) as f:
            made = json.load(f)
    except (OSError, ValueError):
        return ancient(MLFLOW_INIT)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or config["tracking"]["uri"]  # as biovfm.tracking.resolve_uri
    same = (made.get("tracking_uri"), made.get("experiment")) == (uri, config["tracking"]["experiment"])
    return ancient(MLFLOW_INIT) if same else MLFLOW_INIT


MLFLOW_STORE = mlflow_store()

# Each stage's code, a param of its jobs: an edit reruns that stage and what reads its outputs (nothing else).
CODE_PRETRAIN = {m: cfg.pretrain_code_version(m) for m in cfg.grid_values(config, "methods")}  # per method
CODE_EVAL = cfg.code_version("evaluate", "models", "data/medmnist.py", "data/preprocess.py", "train/augment.py",
                             "config.py")  # train/augment.py: the input normalisation of the features
CODE_DOWNLOAD = cfg.code_version("data/synthetic.py")  # the synthetic benchmark's generator (MedMNIST+: the MD5s)
CODE_TASKS = cfg.code_version("data/preprocess.py", "data/sources.py", "data/medmnist.py")  # the evaluation tasks
CODE_CORPUS = cfg.code_version("data/preprocess.py", "data/sources.py", "data/medmnist.py", "data/store.py")
CODE_ANALYSIS = cfg.code_version("analysis", "evaluate/scores.py", "data/medmnist.py")  # tables, figures, report


wildcard_constraints:
    method="|".join(cfg.grid_values(config, "methods")),
    model="|".join(config["models"]),
    modality="|".join(config["modalities"]),
    n=r"\d+",
    seed=r"\d+",


def run_dirs():
    return [f"results/runs/{cfg.run_id(**g)}" for g in cfg.grid_points(config)]


def eval_outputs():
    outs = [f"{d}/eval.json" for d in run_dirs()]
    if config["evaluate"]["random_init"]:
        outs += [f"results/baselines/{cfg.random_init_id(m, s)}/eval.json" for m in cfg.grid_values(config, "models")
                 for s in cfg.grid_values(config, "seeds")]
    if config["evaluate"]["raw_pixels"]:
        outs.append(f"results/baselines/{cfg.RAW_PIXELS_ID}/eval.json")
    outs += [f"results/baselines/{cfg.external_id(e['name'])}/eval.json" for e in config["evaluate"]["external"]]
    return outs


def external_weights(w):
    """The files an outside encoder is read from (a folder's config and weights, or the weights file): its inputs."""
    path = cfg.external_entry(config, w.name)["path"]
    if not os.path.isdir(path):
        return [path]
    weights = [os.path.join(path, f) for f in ("model.safetensors", "pytorch_model.bin")]
    return [os.path.join(path, "config.json")] + [f for f in weights if os.path.exists(f)][:1]


def pretrain_job(w):
    job = cfg.pretrain_job(config, w.method, w.model, w.modality, int(w.n), int(w.seed), CODE_PRETRAIN[w.method])
    # threads only schedule the job (the command's --threads sets them): a changed count must rerun nothing
    return cfg.to_json(dataclasses.replace(job, train=dataclasses.replace(job.train, threads=1)))


def eval_job(w, kind):
    """An evaluation job as JSON, its threads fixed (the command's --threads sets them): a new count reruns nothing."""
    return cfg.to_json(dataclasses.replace(_eval_job(w, kind), threads=1))


def _eval_job(w, kind):
    if kind == "pretrained":
        desc = {"method": w.method, "modality": w.modality, "data_size": int(w.n)}
        run = cfg.run_id(w.method, w.model, w.modality, int(w.n), int(w.seed))
        return cfg.eval_job(config, kind, run, w.model, int(w.seed), desc, CODE_EVAL)
    if kind == "random_init":
        desc = {"method": "random", "modality": "", "data_size": 0}
        run = cfg.random_init_id(w.model, int(w.seed))
        return cfg.eval_job(config, kind, run, w.model, int(w.seed), desc, CODE_EVAL)
    if kind == "external":
        entry = cfg.external_entry(config, w.name)
        desc = {"method": "external", "modality": "", "data_size": 0}
        return cfg.eval_job(config, kind, cfg.external_id(w.name), None, int(entry.get("seed", 0)), desc, CODE_EVAL,
                            entry)
    desc = {"method": "raw", "modality": "", "data_size": 0}
    return cfg.eval_job(config, kind, cfg.RAW_PIXELS_ID, None, 0, desc, CODE_EVAL)


AGGREGATE_OUTPUTS = [
    "results/report.html",
    "results/summary.json",
    "results/figures/task_examples.png",
]


def on_slurm():
    """In the SLURM executor or its job step (where sbatch/srun are built)."""
    plugin = workflow.executor_plugin
    return plugin is not None and plugin.name in ("slurm", "slurm-jobstep")


# One job per GPU on a machine with GPUs: the `gpu` resource is limited to the visible GPUs (unless the command line
# sets it, e.g. --resources gpu=1 to keep a GPU free), every GPU job asks for its GPUs, and `biovfm ... --gpus N`
# claims that many free devices (CUDA_VISIBLE_DEVICES) when it starts. BIOVFM_GPUS=N (or ids "0,3") overrides the
# count; BIOVFM_GPUS=0 runs everything on CPUs.
LOCAL_GPUS = 0 if on_slurm() else len(devices.visible_gpus())
if LOCAL_GPUS and "gpu" not in workflow.global_resources:
    workflow.register_resource("gpu", LOCAL_GPUS)


def gpu_job(rule, key):
    """One resource of a pretraining or encoder-evaluation job, from params' cluster section by model size,
    as params say (GPUs, partition, memory, time); locally the GPU count is at most the visible GPUs."""

    def get(wildcards):
        res = cfg.cluster_resources(config, rule, wildcards.get("model", "default"))  # outside encoders: default
        if key == "gpu":
            return res["gpu"] if on_slurm() else min(res["gpu"], LOCAL_GPUS)
        if key in ("gpu_model", "cpus_per_gpu") and not (on_slurm() and res["gpu"]):
            return None
        return res[key]

    return get


def gpu_job_threads(rule, cpu_threads):
    """Threads of a job of a GPU rule: cpus_per_gpu per GPU it gets, else ``cpu_threads(wildcards)``."""

    def get(wildcards):
        gpus = gpu_job(rule, "gpu")(wildcards)
        return gpus * config["cluster"]["cpus_per_gpu"] if gpus else cpu_threads(wildcards)

    return get


def pretrain_cpu_threads(wildcards):
    """Threads of a CPU pretraining job: pretrain.threads, and at least one per process."""
    t = cfg.train_settings(config, wildcards.method)
    return max(t.threads, t.nproc)


def gpu_job_resources(rule):
    """The resources block of a GPU rule: partition, account, memory and time on SLURM; the GPU count everywhere."""
    keys = ("slurm_partition", "slurm_account", "mem_mb", "runtime", "gpu", "gpu_model", "cpus_per_gpu")
    return {k: gpu_job(rule, k) for k in keys}
