"""``biovfm export``: a trained encoder as a self-contained folder that timm loads offline.

A run folder (``results/runs/{method}/{model}/{modality}/n{N}/s{seed}/``) becomes::

    model.safetensors   the encoder's state dict (timm ``VisionTransformer`` keys, as trained)
    config.json         timm's Hugging Face layout: architecture, num_classes 0, model_args, pretrained_cfg
    README.md           model card: grid point, data and licenses, compute, this study's AUCs beside the baselines

``timm.create_model("local-dir:<folder>", pretrained=True)`` rebuilds the exact encoder with no network; the
study's feature is ``forward_intermediates(x, indices=1, norm=False, output_fmt="NLC",
intermediates_only=True)[-1].mean(1)`` (mean patch token after the last block, CLS excluded, final norm not
applied), checked against :func:`biovfm.models.vit.patch_features` at every export.

Nothing under ``models/`` or ``evaluate/`` changes here: their code hashes decide which study jobs rerun.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from biovfm.config import ModelSpec, run_id
from biovfm.io import atomic_dir, atomic_path, read_json, write_json, write_text

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
MANIFEST = "exported.json"  # what `biovfm export --select ...` wrote, and why (the Snakemake target)
RUN_FILES = ("checkpoint.safetensors", "config.json", "run.json", "eval.json")  # what an export reads from a run
INTERPOLATION = "bicubic"  # every image of the study was resized with PIL bicubic (tasks and corpus)
VERIFY_ATOL = 1e-5  # timm's features vs the study's, relative to their scale (the same ops: 0.0 expected)
FEATURE_CALL = ('model.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC", intermediates_only=True)[-1]'
                '.mean(dim=1)')
# Registered timm ViT entry points by width: only the family name; model_args set every dimension.
TIMM_FAMILY = ((192, "vit_tiny_patch16_224"), (384, "vit_small_patch16_224"), (768, "vit_base_patch16_224"),
               (1024, "vit_large_patch16_224"), (1280, "vit_huge_patch14_224"))


# --------------------------------------------------------------------------------------------- the run folder
@dataclass(frozen=True)
class Run:
    """The files of one pretrained and evaluated grid point."""

    folder: Path
    job: dict[str, Any]  # config.json: the resolved pretraining job
    stats: dict[str, Any]  # run.json: parameters, FLOPs, images, steps
    evaluation: dict[str, Any]  # eval.json: per-task AUC of the primary estimator

    @property
    def run_id(self) -> str:
        j = self.job
        return run_id(j["method"], j["model"]["name"], j["modality"], int(j["data_size"]), int(j["seed"]))

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(**self.job["model"])

    @property
    def image_size(self) -> int:
        return int(self.job["image_size"])

    @property
    def in_chans(self) -> int:
        return int(self.job.get("in_chans", 3))

    @property
    def checkpoint(self) -> Path:
        return self.folder / RUN_FILES[0]


def resolve_run_dir(run: str | Path, results: str | Path = "results") -> Path:
    """A run folder given as a path or as a run id (``mae/micro/all/n4500/s0``) under ``results/runs``."""
    path = Path(run)
    if path.is_dir():
        return path
    by_id = Path(results) / "runs" / str(run).strip("/")
    if by_id.is_dir():
        return by_id
    raise FileNotFoundError(f"{run}: neither a run folder nor the id of one under {Path(results) / 'runs'} "
                            "(ids look like mae/micro/all/n4500/s0)")


def read_run(folder: str | Path) -> Run:
    """The run's files, or an error naming the first one missing (an export needs a pretrained, evaluated run)."""
    folder = Path(folder)
    for name in RUN_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing; {folder} is not a complete run folder (an export "
                                    f"reads {', '.join(RUN_FILES)}: pretrain and evaluate the grid point first, "
                                    f"e.g. snakemake --cores all {folder / 'eval.json'})")
    job, stats, evaluation = (read_json(folder / n) for n in RUN_FILES[1:])
    for key in ("method", "model", "modality", "data_size", "seed", "image_size"):
        if key not in job:
            raise ValueError(f"{folder / 'config.json'}: no {key!r}; not the config of a pretraining run")
    return Run(folder, job, stats, evaluation)


def export_name(run: Run) -> str:
    """Folder name of an export: the run id with dashes (``mae-micro-all-n4500-s0``)."""
    return run.run_id.replace("/", "-")


# --------------------------------------------------------------------------------------------- timm config
def study_mean_std() -> tuple[float, float]:
    """Mean and std (on [0, 1] pixels) of the study's input normalisation, read off the function itself, so the
    exported config cannot drift from what the encoder was trained and evaluated with."""
    from biovfm.train.augment import normalize

    lo, hi = normalize(torch.tensor([0.0, 255.0], dtype=torch.float64)).tolist()  # -m/s and (1-m)/s
    std = 1.0 / (hi - lo)
    return -lo * std, std


def timm_architecture(spec: ModelSpec) -> str:
    """The registered timm ViT family nearest in width (a name only: ``model_args`` fix every dimension)."""
    return min(TIMM_FAMILY, key=lambda wn: (abs(wn[0] - spec.embed_dim), wn[0]))[1]


def timm_model_args(spec: ModelSpec, image_size: int, in_chans: int) -> dict[str, Any]:
    """The ``VisionTransformer`` arguments of :func:`biovfm.models.vit.build_encoder` (checked at export against the
    checkpoint's keys and shapes, and numerically)."""
    return {"img_size": image_size, "patch_size": spec.patch_size, "in_chans": in_chans, "embed_dim": spec.embed_dim,
            "depth": spec.depth, "num_heads": spec.num_heads, "mlp_ratio": spec.mlp_ratio, "qkv_bias": True,
            "class_token": True, "global_pool": "avg", "fc_norm": False}


def timm_config(run: Run, license_id: str) -> dict[str, Any]:
    """config.json as timm's hub loader reads it (``local-dir:`` or ``hf-hub:``)."""
    mean, std = study_mean_std()
    c, s = run.in_chans, run.image_size
    return {
        "architecture": timm_architecture(run.spec),
        "num_classes": 0,
        "num_features": run.spec.embed_dim,
        "global_pool": "avg",
        "model_args": timm_model_args(run.spec, s, c),
        "pretrained_cfg": {"input_size": [c, s, s], "fixed_input_size": True, "interpolation": INTERPOLATION,
                           "crop_pct": 1.0, "crop_mode": "center", "mean": [mean] * c, "std": [std] * c,
                           "num_classes": 0, "first_conv": "patch_embed.proj", "classifier": "head",
                           "license": license_id},
        "biovfm": {"run_id": run.run_id, "feature": FEATURE_CALL, "code_version": run.job.get("code_version", ""),
                   "fingerprint": run.stats.get("fingerprint", "")},  # provenance; timm ignores the key
    }


def check_architecture(state: dict[str, torch.Tensor], model_args: dict[str, Any], where: Path) -> None:
    """The checkpoint must fit ``VisionTransformer(**model_args)`` key for key and shape for shape."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in VisionTransformer(num_classes=0, **model_args).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if have != shapes:
        diff = sorted(set(have.items()) ^ set(shapes.items()))[:5]
        raise ValueError(f"{where}: the checkpoint does not fit the exported timm config (differences: {diff})")


def timm_features(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """The study's feature from the exported folder, through timm alone (the card's recipe)."""
    import timm

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        tokens = model.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC", intermediates_only=True)[-1]
    return tokens.mean(dim=1)


def verify_export(folder: Path, encoder: torch.nn.Module, seed: int = 0) -> float:
    """Max abs difference between timm's features from ``folder`` and the study's on a fixed random batch."""
    from biovfm.models.vit import patch_features
    from biovfm.train.augment import normalize

    c, s = encoder.patch_embed.proj.in_channels, encoder.patch_embed.img_size[0]
    images = torch.randint(0, 256, (2, c, s, s), generator=torch.Generator().manual_seed(seed)).float()
    ref = patch_features(encoder, normalize(images))
    diff = float((timm_features(folder, normalize(images)) - ref).abs().max())
    if not diff <= VERIFY_ATOL * max(1.0, float(ref.abs().max())):
        raise RuntimeError(f"{folder}: timm's features differ from the study's by {diff:.3g}; export not written")
    return diff


# --------------------------------------------------------------------------------------------- study results
@dataclass(frozen=True)
class Score:
    auc: float
    lo: float | None = None  # 95% bootstrap interval (points.csv); None from eval.json
    hi: float | None = None

    def text(self) -> str:
        return f"{self.auc:.3f}" + (f" [{self.lo:.3f}, {self.hi:.3f}]" if self.lo is not None else "")


@dataclass(frozen=True)
class Scores:
    """Per-task AUC of the encoder and of the baselines beside it ('mean' last), and where they come from."""

    tasks: tuple[str, ...]
    encoder: dict[str, Score]
    random_init: dict[str, Score]
    raw_pixels: dict[str, Score]
    source: str


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _same(cell: str, value: str) -> bool:
    """A CSV cell equals a value as text or as a number (``4500`` and ``4500.0`` are one data size)."""
    if cell == value:
        return True
    try:
        return float(cell) == float(value)
    except ValueError:
        return False


def points_scores(rows: list[dict[str, str]], **match: str) -> dict[str, Score]:
    """{task: Score} of the points.csv rows whose columns equal ``match``."""
    out = {}
    for r in rows:
        if all(_same(str(r.get(k, "")), v) for k, v in match.items()):
            lo, hi = r.get("auc_lo", ""), r.get("auc_hi", "")
            out[r["task"]] = Score(float(r["auc"]), float(lo) if lo else None, float(hi) if hi else None)
    return out


def eval_scores(evaluation: dict[str, Any]) -> dict[str, Score]:
    """{task: Score} from an eval.json (no intervals), with the mean."""
    out = {t: Score(float(r["auc"])) for t, r in evaluation.get("tasks", {}).items()}
    if "mean_auc" in evaluation:
        out["mean"] = Score(float(evaluation["mean_auc"]))
    return out


def _ordered(tasks: Iterable[str]) -> tuple[str, ...]:
    tasks = list(dict.fromkeys(tasks))
    return tuple([t for t in tasks if t != "mean"] + (["mean"] if "mean" in tasks else []))


def study_scores(run: Run, results: Path) -> Scores:
    """This study's AUCs: points.csv (95% intervals, seeds pooled) when the grid point is there, else eval.json."""
    j, points = run.job, results / "tables" / "points.csv"
    rows = _read_csv(points) if points.is_file() else []
    mine = points_scores(rows, kind="pretrained", method=j["method"], model=j["model"]["name"],
                         modality=j["modality"], data_size=str(j["data_size"]))
    if mine:
        return Scores(_ordered(r["task"] for r in rows if r["task"] in mine), mine,
                      points_scores(rows, kind="random_init", model=j["model"]["name"]),
                      points_scores(rows, kind="raw_pixels"),
                      f"`{points}`: 95% percentile intervals from test-set bootstrap resamples "
                      "(the aggregate stage's; seeds pooled)")
    rand = results / "baselines" / "random" / j["model"]["name"] / f"s{j['seed']}" / "eval.json"
    raw = results / "baselines" / "raw" / "pixels" / "eval.json"
    mine = eval_scores(run.evaluation)
    return Scores(_ordered(mine), mine, eval_scores(read_json(rand)) if rand.is_file() else {},
                  eval_scores(read_json(raw)) if raw.is_file() else {},
                  f"`{run.folder / 'eval.json'}` (no intervals: `{points}` has no row of this grid point; run the "
                  "aggregate stage for them)")


def primary_estimator(evaluation: dict[str, Any]) -> str:
    """The probe behind eval.json's AUCs (older runs did not record it)."""
    names = {r.get("primary", "") for r in evaluation.get("tasks", {}).values()} - {""}
    return names.pop() if len(names) == 1 else "the study's primary estimator"


# --------------------------------------------------------------------------------------------- pretraining data
@dataclass(frozen=True)
class DataRow:
    source: str
    modality: str
    images: int
    license: str


@dataclass(frozen=True)
class PretrainingData:
    rows: tuple[DataRow, ...]
    exact: bool  # the run's own subset (True) or the corpus' counts (False)
    note: str


def run_subset_counts(index_csv: Path, job: dict[str, Any], subset_hash: str) -> dict[tuple[str, str], int] | None:
    """(source, modality) -> images of the run's own subset, recomputed from the store's index; None when the
    store changed since the run (its subset hash no longer matches run.json's)."""
    from biovfm.data.store import CorpusStore, read_index

    index = read_index(index_csv)
    idx = CorpusStore(images=np.empty((0,)), index=index).subset(job["modality_sources"], int(job["data_size"]),
                                                                 seed=int(job["seed"]))
    if not subset_hash or hashlib.sha1(idx.tobytes()).hexdigest()[:12] != subset_hash:
        return None
    counts = index.iloc[idx].groupby(["source", "modality"]).size()
    return {k: int(v) for k, v in counts.items()}


def pretraining_data(run: Run, corpus: Path) -> PretrainingData:
    """Sources, images per modality and licenses of what the run pretrained on, from the corpus report and index."""
    report_path = corpus / "report.json"
    if not report_path.is_file():
        return PretrainingData((), False, f"no corpus report at `{report_path}`: sources and licenses unknown here")
    report = read_json(report_path)
    licenses = {name: s.get("license", "") or "not stated" for name, s in report.get("sources", {}).items()}
    mods = set(run.job.get("modality_sources", ()))
    counts = None
    if (corpus / "index.csv").is_file() and mods:
        try:
            counts = run_subset_counts(corpus / "index.csv", run.job, run.stats.get("subset_hash", ""))
        except ValueError:  # the store no longer holds the subset's images
            counts = None
    if counts is not None:
        rows = tuple(DataRow(s, m, n, licenses.get(s, "not stated")) for (s, m), n in sorted(counts.items()))
        return PretrainingData(rows, True, f"the run's own subset, recomputed from `{corpus / 'index.csv'}` (subset "
                                           "hash matches run.json)")
    rows = tuple(DataRow(name, m, int(n), licenses[name]) for name, s in report.get("sources", {}).items()
                 for m, n in sorted(s.get("by_modality", {}).items()) if m in mods)
    return PretrainingData(rows, False, f"images of the run's modalities in the whole corpus (`{report_path}`); the "
                                        f"run drew {run.job['data_size']} of them (the store changed since, or its "
                                        "index is missing)")


def hub_license(licenses: Iterable[str]) -> str:
    """The Hugging Face license id the weights inherit from their data (the most restrictive one)."""
    ids = set()
    for text in licenses:
        upper = text.upper()
        if re.search(r"\bNC\b", upper):
            ids.add("cc-by-nc-4.0")
        elif "APACHE-2.0" in upper:
            ids.add("apache-2.0")
        elif re.search(r"\bCC BY 4\.0\b", upper) or "CC-BY-4.0" in upper:
            ids.add("cc-by-4.0")
        else:
            ids.add("other")
    for strictest in ("other", "cc-by-nc-4.0", "cc-by-4.0", "apache-2.0"):
        if strictest in ids:
            return strictest
    return "other"  # no data information: the user has to check


# --------------------------------------------------------------------------------------------- model card
def _yaml_list(items: Iterable[str]) -> str:
    return "".join(f"\n  - {json.dumps(i)}" for i in items)


def _fmt(x: Any, spec: str = ".3g") -> str:
    return format(float(x), spec) if isinstance(x, (int, float)) else "n/a"


def timm_version() -> str:
    import timm

    return timm.__version__


def loading_snippet(name: str) -> str:
    """The copy-paste code of the card: timm only, no network, the study's feature."""
    return f'''```python
import timm, torch
from PIL import Image

# offline: reads config.json and model.safetensors from the folder
model = timm.create_model("local-dir:path/to/{name}", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))  # bicubic, mean/std 0.5

x = torch.stack([transform(Image.open(p).convert("RGB")) for p in ["image.png"]])
with torch.no_grad():  # the study's feature: mean patch token after the last block, CLS excluded, no final norm
    tokens = model.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC", intermediates_only=True)[-1]
    features = tokens.mean(dim=1)  # (batch, embed_dim)
```'''


def _card_metadata(run: Run, data: PretrainingData, license_id: str) -> list[str]:
    """The Hub's YAML block."""
    tags = ["timm", "image-feature-extraction", "vision-transformer", "self-supervised", "medical-imaging",
            run.job["method"], "biovfm-scale"]
    lines = ["---", "library_name: timm", f"license: {license_id}", "pipeline_tag: image-feature-extraction",
             "tags:" + _yaml_list(tags)]
    if data.rows:
        lines.append("datasets:" + _yaml_list(sorted({r.source for r in data.rows})))
    return lines + ["---", ""]


def _card_model(run: Run, name: str) -> list[str]:
    j, st, spec = run.job, run.stats, run.spec
    mean, std = study_mean_std()
    lines = [f"# {name}", "",
             f"ViT encoder `{spec.name}` ({_fmt(st.get('params_encoder'), ',.0f')} parameters) pretrained with "
             f"{j['method'].upper()} in the BioVFM-Scale study, grid point `{run.run_id}`, exported for timm.", "",
             "## Model", "", "| | |", "|---|---|",
             f"| method | {j['method']} (settings: `{json.dumps(j.get('method_cfg', {}), sort_keys=True)}`) |",
             f"| architecture | ViT `{spec.name}`: embed dim {spec.embed_dim}, depth {spec.depth}, {spec.num_heads} "
             f"heads, patch {spec.patch_size}, MLP ratio {spec.mlp_ratio:g}, CLS token, fixed 2-D sin-cos positions |",
             f"| input | {run.in_chans} x {run.image_size} x {run.image_size}, RGB (gray replicated), {INTERPOLATION} "
             f"resize, then (x / 255 - {mean:g}) / {std:g} |",
             f"| parameters | {_fmt(st.get('params_encoder'), ',.0f')} (encoder; {_fmt(st.get('params_paper'), ',.0f')} "
             "as the paper counts them: encoder + standard MAE decoder, fixed positions excluded) |",
             f"| feature | {spec.embed_dim}-d mean patch token (see *Feature recipe*) |",
             f"| grid point | method `{j['method']}`, model `{spec.name}`, modality mix `{j['modality']}`, "
             f"{j['data_size']} pretraining images, seed {j['seed']} |", ""]
    if j["method"] == "dino":
        lines += ["DINO: these are the weights of the EMA teacher's backbone, the encoder the study evaluates.", ""]
    return lines


def _card_data(run: Run, data: PretrainingData) -> list[str]:
    j = run.job
    lines = ["## Pretraining data", "",
             f"Modality mix `{j['modality']}` ({', '.join(j.get('modality_sources', ())) or 'n/a'}), "
             f"{j['data_size']} images, seed {j['seed']}. Counts: {data.note}.", ""]
    if data.rows:
        lines += ["| source | modality | images | license |", "|---|---|---:|---|"]
        lines += [f"| {r.source} | {r.modality} | {r.images:,} | {r.license} |" for r in data.rows] + [""]
    return lines


def _card_compute(run: Run) -> list[str]:
    st, train = run.stats, run.job.get("train", {})
    steps = st.get("train_steps", train.get("steps", "n/a"))
    return ["## Training and compute", "", "| | |", "|---|---|",
            f"| steps | {steps} at a global batch of {train.get('batch_size', 'n/a')} (base lr "
            f"{train.get('base_lr', 'n/a')}, {train.get('precision', 'n/a')}) |",
            f"| images seen | {_fmt(st.get('images_seen'), ',.0f')} |",
            f"| FLOPs | {_fmt(st.get('flops_per_image'))} per image (encoder forward); "
            f"{_fmt(st.get('train_flops_per_image'))} per training image; {_fmt(st.get('train_flops'))} in total |",
            f"| wall time | {_fmt(st.get('wall_time_s'), '.0f')} s on {st.get('world_size', 'n/a')} process(es), "
            f"{_fmt(st.get('images_per_s'), '.0f')} images/s |", ""]


def _card_scores(run: Run, scores: Scores) -> list[str]:
    model = run.spec.name
    lines = ["## Evaluation in this study", "",
             f"Linear probe ({primary_estimator(run.evaluation)}) on the frozen features, test AUC per task. "
             f"Source: {scores.source}. Baselines: a random-init `{model}` and a linear probe on raw pixels.", "",
             f"| task | this encoder | random-init {model} | raw pixels |", "|---|---|---|---|"]
    for t in scores.tasks:
        cells = [d[t].text() if t in d else "n/a" for d in (scores.encoder, scores.random_init, scores.raw_pixels)]
        lines.append(f"| {'**mean**' if t == 'mean' else t} | " + " | ".join(cells) + " |")
    return lines + [""]


def _card_usage(name: str, verified: float) -> list[str]:
    return ["## How to use", "",
            f"Offline, with timm alone (nothing is downloaded; tested with timm {timm_version()}):", "",
            loading_snippet(name), "",
            "Older timm without the `local-dir:` scheme: `cfg = json.load(open('config.json'))`, then "
            "`timm.create_model(cfg['architecture'], pretrained=True, "
            "pretrained_cfg_overlay=dict(cfg['pretrained_cfg'], file='model.safetensors'), **cfg['model_args'])`.", "",
            "## Feature recipe", "",
            "The study's feature is the mean of the patch tokens after the last block, CLS token excluded, final "
            f"LayerNorm **not** applied: `{FEATURE_CALL}`. The probes then apply a parameter-free LayerNorm "
            "(`torch.nn.functional.layer_norm(features, features.shape[-1:])`). `model(x)` is not that feature: "
            "it averages the tokens after the final norm. Checked at export: max abs difference "
            f"{verified:.3g} from the study's own feature extractor.", "",
            "## Intended use", "",
            "Frozen features for linear probes, kNN and few-label studies on 2-D biomedical images of the input "
            "size above, and a starting point for fine-tuning; comparisons with the scaling study it comes from.", ""]


def _card_limitations(run: Run, data: PretrainingData, license_id: str) -> list[str]:
    j, st = run.job, run.stats
    lines = ["## Limitations", "",
             "- Research artefact, not a medical device: no clinical validation; do not use for diagnosis.",
             f"- Pretrained for {st.get('train_steps', 'n/a')} steps on {j['data_size']} images at {run.image_size} "
             "px. The AUCs above are from this study's tasks and probe; expect different numbers elsewhere, and "
             "read them against the baselines beside them.",
             "- Fixed input size and patch grid (position embeddings are fixed sin-cos for this grid).",
             f"- The data licenses travel with the weights: `{license_id}` is the most restrictive of the "
             "pretraining sources' licenses listed above. MedMNIST+ is CC BY 4.0 except DermaMNIST, which is "
             "CC BY-NC 4.0 (non-commercial): an encoder pretrained on a corpus with DermaMNIST images is for "
             "non-commercial use."]
    if any(r.source == "synthetic" for r in data.rows):
        lines.append("- Pretrained on the study's generated (synthetic) images: a pipeline check, not a medical model.")
    if not data.rows:
        lines.append("- The pretraining sources are not recorded here: check their licenses before sharing the "
                     "weights.")
    return lines + [""]


def _card_provenance(run: Run) -> list[str]:
    return ["## Provenance", "",
            f"Run `{run.run_id}`, code version `{run.job.get('code_version', '') or 'n/a'}`, run fingerprint "
            f"`{run.stats.get('fingerprint', 'n/a')}`, MLflow runs `{run.stats.get('mlflow_run_id', 'n/a')}` "
            f"(pretraining) and `{run.evaluation.get('mlflow_run_id', 'n/a')}` (evaluation). Exported by "
            "`biovfm export`; code: Apache-2.0.", ""]


def model_card(run: Run, name: str, scores: Scores, data: PretrainingData, license_id: str, verified: float) -> str:
    """README.md of an export: YAML metadata for the Hub, then what a user needs to judge and load the encoder."""
    return "\n".join(_card_metadata(run, data, license_id) + _card_model(run, name) + _card_data(run, data)
                     + _card_compute(run) + _card_scores(run, scores) + _card_usage(name, verified)
                     + _card_limitations(run, data, license_id) + _card_provenance(run))


# --------------------------------------------------------------------------------------------- export
def export_run(run_dir: str | Path, out: str | Path | None = None, results: str | Path = "results",
               corpus: str | Path = "data/processed/corpus") -> Path:
    """Export one run folder (or run id) into ``out`` (default ``results/export/<name>``), atomically."""
    from safetensors.torch import save_file

    from biovfm.evaluate.features import load_encoder

    results, corpus = Path(results), Path(corpus)
    run = read_run(resolve_run_dir(run_dir, results))
    name = export_name(run)
    out = Path(out) if out else results / "export" / name
    encoder = load_encoder(run.checkpoint, run.spec, run.image_size, run.in_chans)
    state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    data = pretraining_data(run, corpus)
    license_id = hub_license(r.license for r in data.rows) if data.rows else "other"
    config = timm_config(run, license_id)
    check_architecture(state, config["model_args"], run.checkpoint)
    check_replaceable(out)
    with atomic_dir(out) as tmp:
        with atomic_path(tmp / WEIGHTS) as weights:  # atomic_path also gives the file the usual permissions
            save_file(state, str(weights), metadata={"format": "pt"})
        write_json(tmp / CONFIG, config)
        verified = verify_export(tmp, encoder)
        write_text(tmp / CARD, model_card(run, name, study_scores(run, results), data, license_id, verified))
    print(f"[export] {run.run_id} -> {out} (timm features match the study's: max abs difference {verified:.3g})",
          flush=True)
    return out


def check_replaceable(out: Path) -> None:
    """An export replaces its folder whole: refuse a folder holding anything but a previous export's files."""
    if out.exists() and (not out.is_dir() or {p.name for p in out.iterdir()} - {WEIGHTS, CONFIG, CARD}):
        raise FileExistsError(f"{out}: exists and is not an export folder (it would be replaced whole); give a new "
                              "folder with --out")


def _truthy(value: str | None) -> bool:
    return value is None or str(value).strip().lower() in ("true", "1")


def select_runs(summary_csv: str | Path, select: str) -> list[str]:
    """Run ids to export from summary.csv: ``best`` = each method's run with the highest mean AUC over tasks
    (primary-estimator rows), ``all`` = every pretrained run."""
    path = Path(summary_csv)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the aggregate stage first (snakemake --cores all)")
    rows = [r for r in _read_csv(path) if r.get("kind") == "pretrained" and _truthy(r.get("primary"))
            and r.get("task") != "mean"]
    if not rows:
        raise ValueError(f"{path}: no pretrained runs with primary-estimator rows to export")
    aucs: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        aucs.setdefault((r["method"], r["run_id"]), []).append(float(r["auc"]))
    if select == "all":
        return sorted(run for _, run in aucs)
    if select != "best":
        raise ValueError(f"select {select!r}: expected best or all")
    best: dict[str, tuple[float, str]] = {}
    for (method, run), v in sorted(aucs.items()):
        score = float(np.mean(v))
        if method not in best or score > best[method][0]:
            best[method] = (score, run)
    return [run for _, run in sorted(best.values(), key=lambda sr: sr[1])]


def mean_aucs(summary_csv: str | Path) -> dict[str, float]:
    """Mean primary AUC over tasks per run id (for the manifest)."""
    by_run: dict[str, list[float]] = {}
    for r in _read_csv(Path(summary_csv)):
        if r.get("kind") == "pretrained" and _truthy(r.get("primary")) and r.get("task") != "mean":
            by_run.setdefault(r["run_id"], []).append(float(r["auc"]))
    return {k: float(np.mean(v)) for k, v in by_run.items()}


def export_selected(select: str, results: str | Path = "results", out_root: str | Path | None = None,
                    corpus: str | Path = "data/processed/corpus", manifest: str | Path | None = None) -> list[Path]:
    """Export the runs :func:`select_runs` picks into ``out_root/<name>``; the manifest, written last, lists them."""
    results = Path(results)
    summary = results / "summary.csv"
    out_root = Path(out_root) if out_root else results / "export"
    runs = select_runs(summary, select)
    scores = mean_aucs(summary)
    outs = []
    for rid in runs:
        folder = resolve_run_dir(rid, results)
        outs.append(export_run(folder, out_root / export_name(read_run(folder)), results, corpus))
    write_json(Path(manifest) if manifest else out_root / MANIFEST,
               {"select": select, "summary": str(summary),
                "exports": [{"run_id": r, "folder": str(o), "mean_auc": scores.get(r)} for r, o in zip(runs, outs)]})
    return outs
