# Helpers shared by the rules: grid expansion, paths and each job's resolved config (as JSON).
import dataclasses
import json
import os

from biovfm import config as cfg
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

CODE_PRETRAIN = cfg.code_version("models", "methods", "train", "data/store.py", "config.py")
CODE_EVAL = cfg.code_version("evaluate", "models", "data/medmnist.py", "config.py")


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
    return outs


def pretrain_job(w):
    return cfg.to_json(cfg.pretrain_job(config, w.method, w.model, w.modality, int(w.n), int(w.seed), CODE_PRETRAIN))


def eval_job(w, kind):
    if kind == "pretrained":
        desc = {"method": w.method, "modality": w.modality, "data_size": int(w.n)}
        run = cfg.run_id(w.method, w.model, w.modality, int(w.n), int(w.seed))
        return cfg.to_json(cfg.eval_job(config, kind, run, w.model, int(w.seed), desc, CODE_EVAL))
    if kind == "random_init":
        desc = {"method": "random", "modality": "", "data_size": 0}
        run = cfg.random_init_id(w.model, int(w.seed))
        return cfg.to_json(cfg.eval_job(config, kind, run, w.model, int(w.seed), desc, CODE_EVAL))
    desc = {"method": "raw", "modality": "", "data_size": 0}
    return cfg.to_json(cfg.eval_job(config, kind, cfg.RAW_PIXELS_ID, None, 0, desc, CODE_EVAL))


AGGREGATE_OUTPUTS = [
    "results/report.html",
    "results/summary.json",
    "results/figures/task_examples.png",
]


def on_slurm():
    """In the SLURM executor or its job step (where sbatch/srun are built). Only there do pretraining jobs ask for the
    GPUs of params' cluster.pretrain: a local run keeps `gpu` out of its scheduling unless asked
    (--set-resources pretrain:gpu=1, with the local profile's `resources: gpu=1`)."""
    plugin = workflow.executor_plugin
    return plugin is not None and plugin.name in ("slurm", "slurm-jobstep")


def pretrain_cluster(key, gpu_only=False):
    """One resource of a pretraining job from params' cluster section, by model size (None: not set)."""

    def get(wildcards):
        res = cfg.cluster_resources(config, "pretrain", wildcards.model)
        if gpu_only and not (on_slurm() and res["gpu"]):
            return None
        return res[key]

    return get
