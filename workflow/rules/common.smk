# Helpers shared by the rules: grid expansion, paths and each job's resolved config (as JSON).
import json
import os

from biovfm import config as cfg

GRID = config["grid"]
SIZE = config["data"]["image_size"]
TASKS = config["data"]["tasks"]
RAW = f"data/raw/{config['data']['source']}"
TASK_DIR = "data/processed/tasks"
CORPUS_DIR = "data/processed/corpus"
MLFLOW_INIT = "results/mlflow_init.json"

CODE_PRETRAIN = cfg.code_version("models", "methods", "train", "data/store.py", "config.py")
CODE_EVAL = cfg.code_version("evaluate", "models", "data/medmnist.py", "config.py")


wildcard_constraints:
    method="|".join(GRID["methods"]),
    model="|".join(config["models"]),
    modality="|".join(config["modalities"]),
    n=r"\d+",
    seed=r"\d+",


def run_dirs():
    return [f"results/runs/{cfg.run_id(**g)}" for g in cfg.grid_points(config)]


def eval_outputs():
    outs = [f"{d}/eval.json" for d in run_dirs()]
    if config["evaluate"]["random_init"]:
        outs += [f"results/baselines/{cfg.random_init_id(m, s)}/eval.json" for m in GRID["models"] for s in GRID["seeds"]]
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
    "results/summary.csv",
    "results/summary.json",
    "results/figures/mean_auc_vs_params.png",
    "results/figures/task_grid.png",
    "results/figures/auc_vs_data_size.png",
    "results/figures/task_examples.png",
]
