"""params.yaml: validation (schema + cross-references), typed views, grid expansion and run paths.

This is the project's one config parser. The Snakefile calls :func:`validate_params` on its ``config``;
each job receives its own resolved slice as JSON (:func:`pretrain_job` / :func:`eval_job`) so that a
job never re-reads params.yaml and a grid change touches only the jobs it implies.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import yaml

from biovfm.data.medmnist import BINARY, MODALITIES, SIZES, TASKS, TaskInfo, task_info, task_info_from_dict

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "params.schema.yaml"


class ParamsError(ValueError):
    """A params problem, with the file and the offending key in the message."""


# --------------------------------------------------------------------------------------------- loading
def load_params(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        raise ParamsError(f"{path}: the file is empty; a params file is a mapping with at least grid: and models: "
                          "(see params.yaml of the repository)")
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return validate_params(raw, source=str(path))


def validate_params(params: dict[str, Any], source: str = "params.yaml") -> dict[str, Any]:
    """Fill defaults from the schema, then check types, unknown keys and cross-references.

    Returns a new dict; raises :class:`ParamsError` naming ``source`` and the key path.
    """
    params = copy.deepcopy(params)
    for m in (params.get("models") or {}).values():  # YAML reads `{28: 4}` with int keys; JSON schema wants strings
        if isinstance(m, dict) and isinstance(m.get("patch_size"), dict):
            m["patch_size"] = {str(k): v for k, v in m["patch_size"].items()}
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    _empty_sections_to_mappings(params, schema)
    validator = _defaulting_validator(schema)
    errors = sorted(validator.iter_errors(params), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {_key_path(e)}: {_short_message(e)}" for e in errors[:10]]
        raise ParamsError(f"{source}: invalid parameters:\n" + "\n".join(lines))
    _check_data(params, source)
    _check_references(params, source)
    return params


def _defaulting_validator(schema: dict) -> jsonschema.protocols.Validator:
    """A Draft 2020-12 validator that also writes ``default`` values into missing properties."""
    base = jsonschema.Draft202012Validator

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    def pattern(validator, patrn, instance, schema):
        # JSON Schema's `$` (ECMA-262) matches only at the very end; Python's re, which jsonschema uses, also before a
        # final newline, so "mine\n" would pass ^[a-z][a-z0-9_]*$ and reach file names and wildcards
        if isinstance(instance, str) and instance.endswith("\n") and patrn.endswith("$"):
            yield jsonschema.ValidationError(f"{instance!r} does not match {patrn!r} (it ends in a newline)")
            return
        yield from base.VALIDATORS["pattern"](validator, patrn, instance, schema)

    cls = jsonschema.validators.extend(base, {"properties": set_defaults, "pattern": pattern})
    return cls(schema)


def _empty_sections_to_mappings(params: dict[str, Any], schema: dict[str, Any]) -> None:
    """A section left empty in YAML (``evaluate:`` with every line below commented out) reads as null: take it as
    an empty mapping, i.e. all defaults, as the user meant (recursively through the schema's object sections)."""
    for key, sub in (schema.get("properties") or {}).items():
        if key not in params or not isinstance(sub, dict) or sub.get("type") != "object":
            continue
        if params[key] is None:
            params[key] = {}
        if isinstance(params[key], dict):
            _empty_sections_to_mappings(params[key], sub)


def _key_path(error: jsonschema.ValidationError) -> str:
    path = ""
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def _short_message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        return error.message.replace("Additional properties are not allowed", "unknown key(s)")
    if error.validator == "type" and isinstance(error.instance, str) and _is_number(error.instance):
        return f"{error.message} ({_number_hint(error.instance, error.validator_value)})"
    if error.validator in ("oneOf", "anyOf") and isinstance(error.schema, dict) and error.schema.get("description"):
        return f"{error.instance!r} is not valid here: expected {error.schema['description']}"
    return error.message


def _number_hint(text: str, expected: Any) -> str:
    """How to write a number that YAML read as text: quoted, or 1e-4 / 1e3 (YAML 1.1, as PyYAML and Snakemake read
    params, takes a float only with a dot and a signed exponent)."""
    value = float(text)
    if "integer" in (expected if isinstance(expected, list) else [expected]) and value.is_integer():
        return f"YAML reads {text} as text; write {int(value)}"
    mantissa, e, exponent = text.strip().lower().partition("e")
    if e and "." not in mantissa:
        return f"YAML reads {text} as text; write {mantissa}.0e{exponent if exponent[:1] in '+-' else '+' + exponent}"
    return f"YAML reads {text} as text; write the number without quotes"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")


def _check_data(p: dict[str, Any], source: str) -> None:
    """Resolve data.medmnist.size (null: the study's size when MedMNIST+ has it) and check the custom tasks."""
    d = p["data"]
    m = d["medmnist"]
    if m["size"] is None and d["image_size"] in SIZES:
        m["size"] = d["image_size"]
    if d["source"] == "medmnist" and m["size"] is None:
        raise ParamsError(
            f"{source}: data.medmnist.size: data.image_size={d['image_size']} is not a MedMNIST+ size; set "
            f"data.medmnist.size to one of {', '.join(map(str, SIZES))} (the files are resized to data.image_size)"
        )
    seen: set[str] = set()
    for i, t in enumerate(d["custom_tasks"]):
        where = f"{source}: data.custom_tasks[{i}] ({t['name']})"
        if t["name"] in TASKS:
            raise ParamsError(f"{where}: name is a MedMNIST task; pick another name (MedMNIST tasks go in data.tasks)")
        if t["name"] in seen:
            raise ParamsError(f"{where}: name used twice; each custom task needs its own name")
        seen.add(t["name"])
        if t["task"] == BINARY and len(t["labels"]) != 2:
            raise ParamsError(f"{where}: a binary-class task has 2 labels (negative, positive), got {len(t['labels'])}")


def _check_references(p: dict[str, Any], source: str) -> None:
    for i, grid in enumerate(sub_grids(p)):
        where = source if i == 0 else f"{source} (grid.extra[{i - 1}])"
        _check_grid({**p, "grid": grid}, where)
    _check_corpus(p, source)
    names = [e["name"] for e in p["evaluate"]["external"]]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ParamsError(f"{source}: evaluate.external: names must be unique ({', '.join(twice)} given twice)")


def _check_grid(p: dict[str, Any], source: str) -> None:
    grid = p["grid"]
    for name in grid["models"]:
        if name not in p["models"]:
            raise ParamsError(f"{source}: grid.models: {name!r} has no definition under models (defined: {', '.join(p['models'])})")
    for name in grid["modalities"]:
        if name not in p["modalities"]:
            raise ParamsError(
                f"{source}: grid.modalities: {name!r} has no definition under modalities (defined: {', '.join(p['modalities'])})"
            )
    for name in grid["methods"]:
        if name not in p["methods"]:
            raise ParamsError(f"{source}: grid.methods: {name!r} has no settings under methods")
    size = p["data"]["image_size"]
    for name in grid["models"]:
        m = p["models"][name]
        patch = resolve_patch_size(m["patch_size"], size, f"{source}: models.{name}.patch_size")
        if size % patch:
            raise ParamsError(
                f"{source}: models.{name}.patch_size={patch} does not divide data.image_size={size}; "
                f"pick a patch size that divides {size} for this study"
            )
        if m["embed_dim"] % m["num_heads"]:
            raise ParamsError(f"{source}: models.{name}: embed_dim={m['embed_dim']} is not divisible by num_heads={m['num_heads']}")
    mae = p["methods"]["mae"]
    if mae["decoder_dim"] % mae["decoder_heads"]:
        raise ParamsError(f"{source}: methods.mae: decoder_dim is not divisible by decoder_heads")
    for method in grid["methods"]:
        t = train_settings(p, method)
        if t.batch_size % t.grad_accum:
            raise ParamsError(f"{source}: {method}: batch_size={t.batch_size} is not divisible by grad_accum={t.grad_accum}")


def _check_corpus(p: dict[str, Any], source: str) -> None:
    """Resolve corpus.sources (defaults per kind) and check them against the grid's modality mixes.

    Image counts are known from params only for the synthetic corpus (an equal mix of the nine task modalities),
    so the data-size check stays exact there; for real sources the store's report.json gives the counts, and a
    pretraining job asking a mix for more images than the store holds fails with the counts by modality."""
    from biovfm.data.sources import SourceError, default_sources, source_from_dict, source_to_dict, static_modalities

    c = p["corpus"]
    grid = {k: grid_values(p, k) for k in GRID_AXES}  # every sub-grid's values (the checks are per value)
    c.setdefault("sources", default_sources(p["data"]))
    try:
        srcs = [source_from_dict(d, p["data"]) for d in c["sources"]]
    except SourceError as e:
        raise ParamsError(f"{source}: corpus.sources: {e}") from None
    names = [s.name for s in srcs]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ParamsError(f"{source}: corpus.sources: names must be unique; repeated: {', '.join(dupes)}")
    c["sources"] = [source_to_dict(s) for s in srcs]
    known = [static_modalities(s) for s in srcs]
    if all(k is not None for k in known):
        have = set().union(*known)
        for name in grid["modalities"]:
            if not set(p["modalities"][name]) & have:
                raise ParamsError(
                    f"{source}: grid.modalities: mix {name!r} ({', '.join(p['modalities'][name])}) has no images in "
                    f"corpus.sources, which provide {', '.join(sorted(have))}; add a source of that modality or drop the mix"
                )
    if all(s.kind == "synthetic" for s in srcs):
        pool = p["data"]["synthetic"]["corpus_size"]
        for n in grid["data_sizes"]:
            if n > pool:
                raise ParamsError(
                    f"{source}: grid.data_sizes: {n} exceeds data.synthetic.corpus_size={pool}; raise corpus_size or drop the value"
                )
        for n, name in dict.fromkeys((g["data_size"], g["modality"]) for g in grid_points(p)):
            share = len(set(p["modalities"][name]) & set(MODALITIES))
            have = pool * share // len(MODALITIES)  # the synthetic corpus: an equal mix of the task modalities
            if n > have:
                raise ParamsError(
                    f"{source}: grid.data_sizes: {n} images of modality mix {name!r} need a larger corpus "
                    f"(about {have} of data.synthetic.corpus_size={pool} are {name}); raise corpus_size"
                )


# --------------------------------------------------------------------------------------------- typed views
@dataclass(frozen=True)
class ModelSpec:
    name: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class PretrainSettings:
    """Engine settings of one method (params ``pretrain`` merged with ``methods.<name>.pretrain``)."""

    steps: int
    batch_size: int  # global: fixed whatever the number of processes and accumulation steps
    base_lr: float
    warmup_frac: float
    weight_decay: float
    weight_decay_end: float | None
    betas: tuple[float, float]
    clip_grad: float
    layer_decay: float
    grad_accum: int
    precision: str
    compile: bool
    nproc: int
    checkpoint_every: int
    log_every: int
    threads: int

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 256


@dataclass(frozen=True)
class PretrainJob:
    """Everything one pretraining grid point needs; serialised into the job's command line."""

    method: str
    model: ModelSpec
    modality: str
    modality_sources: tuple[str, ...]
    data_size: int
    seed: int
    image_size: int
    in_chans: int
    train: PretrainSettings
    method_cfg: dict[str, Any]
    tracking: dict[str, str]
    code_version: str = ""

    @property
    def run_id(self) -> str:
        return run_id(self.method, self.model.name, self.modality, self.data_size, self.seed)


@dataclass(frozen=True)
class EvalJob:
    """One evaluation job: a checkpoint (or a baseline) probed on every task."""

    kind: str  # pretrained | random_init | raw_pixels
    run_id: str
    model: ModelSpec | None
    seed: int
    image_size: int
    tasks: tuple[str, ...]
    batch_size: int
    threads: int
    probe: dict[str, Any]
    tracking: dict[str, str]
    code_version: str = ""
    primary: str = "logreg"  # the estimator of the headline: logreg (the converged reference) or paper
    logreg: dict[str, Any] = field(default_factory=dict)
    knn_k: int = 11  # 0: no kNN
    label_fractions: tuple[float, ...] = (1.0,)  # always with 1.0
    descriptors: dict[str, Any] = field(default_factory=dict)  # method, modality, data_size of the grid point
    custom_tasks: tuple[TaskInfo, ...] = ()  # what the job knows of the non-MedMNIST names in ``tasks``
    external: dict[str, Any] = field(default_factory=dict)  # kind external: the evaluate.external entry

    def task_infos(self) -> tuple[TaskInfo, ...]:
        """The TaskInfo of every task, in benchmark order: custom ones from the job, MedMNIST ones by flag."""
        custom = {t.flag: t for t in self.custom_tasks}
        return tuple(custom[n] if n in custom else task_info(n) for n in self.tasks)


IN_CHANS = 3  # grayscale images are replicated to RGB, as the paper does (as_rgb=True)


def custom_task_infos(p: dict[str, Any]) -> tuple[TaskInfo, ...]:
    """The user's own evaluation tasks (data.custom_tasks) as TaskInfo; n_labels from the label names."""
    return tuple(TaskInfo(flag=t["name"], task=t["task"], n_channels=t["channels"], n_labels=len(t["labels"]),
                          modality=t["modality"], label_names=tuple(t["labels"])) for t in p["data"]["custom_tasks"])


def benchmark_tasks(p: dict[str, Any]) -> tuple[str, ...]:
    """Every evaluation task of the study: the MedMNIST flags of data.tasks, then the custom task names."""
    return tuple(p["data"]["tasks"]) + tuple(t["name"] for t in p["data"]["custom_tasks"])


def resolve_patch_size(patch: int | dict[str, int], image_size: int, where: str = "patch_size") -> int:
    """A ladder entry's patch size at this image size (an int, or a mapping from image size to patch size)."""
    if isinstance(patch, int):
        return patch
    if str(image_size) not in patch:
        raise ParamsError(f"{where}: no patch size for data.image_size={image_size} (given for {', '.join(patch)}); add one")
    return int(patch[str(image_size)])


def model_spec(p: dict[str, Any], name: str) -> ModelSpec:
    m = dict(p["models"][name])
    m["patch_size"] = resolve_patch_size(m["patch_size"], p["data"]["image_size"], f"models.{name}.patch_size")
    return ModelSpec(name=name, **m)


def train_settings(p: dict[str, Any], method: str) -> PretrainSettings:
    """The shared ``pretrain`` section with the method's own overrides on top."""
    t = {**p["pretrain"], **p["methods"][method].get("pretrain", {})}
    t["betas"] = tuple(t["betas"])
    return PretrainSettings(**t)


def pretrain_job(p: dict[str, Any], method: str, model: str, modality: str, data_size: int, seed: int, code_version: str = "") -> PretrainJob:
    return PretrainJob(
        method=method,
        model=model_spec(p, model),
        modality=modality,
        modality_sources=tuple(p["modalities"][modality]),
        data_size=int(data_size),
        seed=int(seed),
        image_size=p["data"]["image_size"],
        in_chans=IN_CHANS,
        train=train_settings(p, method),
        method_cfg={k: v for k, v in p["methods"][method].items() if k != "pretrain"},
        tracking=dict(p["tracking"]),
        code_version=code_version,
    )


def eval_job(p: dict[str, Any], kind: str, run: str, model: str | None = None, seed: int = 0,
             descriptors: dict[str, Any] | None = None, code_version: str = "",
             external: dict[str, Any] | None = None) -> EvalJob:
    e = p["evaluate"]
    return EvalJob(
        kind=kind,
        run_id=run,
        model=model_spec(p, model) if model else None,
        seed=int(seed),
        image_size=p["data"]["image_size"],
        tasks=benchmark_tasks(p),
        batch_size=e["batch_size"],
        threads=e["threads"],
        probe=dict(e["probe"]),
        tracking=dict(p["tracking"]),
        code_version=code_version,
        primary=e["primary"],
        logreg=dict(e["logreg"]),
        knn_k=int(e["knn_k"]),
        label_fractions=tuple(sorted({float(f) for f in e["label_fractions"]} | {1.0}, reverse=True)),
        descriptors=dict(descriptors or {}),
        custom_tasks=custom_task_infos(p),
        external=dict(external or {}),
    )


def external_entry(p: dict[str, Any], name: str) -> dict[str, Any]:
    """The ``evaluate.external`` entry called ``name``."""
    for entry in p["evaluate"].get("external", []):
        if entry["name"] == name:
            return dict(entry)
    raise ParamsError(f"evaluate.external: no entry named {name!r}")


def to_json(job: PretrainJob | EvalJob) -> str:
    return json.dumps(asdict(job), sort_keys=True, separators=(",", ":"))


def pretrain_job_from_json(text: str) -> PretrainJob:
    d = json.loads(text)
    d["model"] = ModelSpec(**d["model"])
    d["modality_sources"] = tuple(d["modality_sources"])
    d["train"] = PretrainSettings(**{**d["train"], "betas": tuple(d["train"]["betas"])})
    return PretrainJob(**d)


def eval_job_from_json(text: str) -> EvalJob:
    d = json.loads(text)
    d["model"] = ModelSpec(**d["model"]) if d["model"] else None
    d["tasks"] = tuple(d["tasks"])
    d["label_fractions"] = tuple(d.get("label_fractions", (1.0,)))
    d["custom_tasks"] = tuple(task_info_from_dict(t) for t in d.get("custom_tasks", ()))
    return EvalJob(**d)


# --------------------------------------------------------------------------------------------- grid and names
def run_id(method: str, model: str, modality: str, data_size: int, seed: int) -> str:
    """Stable id of a pretraining grid point; also its folder under results/runs/."""
    return f"{method}/{model}/{modality}/n{data_size}/s{seed}"


def random_init_id(model: str, seed: int) -> str:
    return f"random/{model}/s{seed}"


def external_id(name: str) -> str:
    """Run id (and folder under results/baselines/) of an outside encoder of evaluate.external."""
    return f"external/{name}"


RAW_PIXELS_ID = "raw/pixels"


GRID_AXES = ("methods", "models", "modalities", "data_sizes", "seeds")


def sub_grids(p: dict[str, Any]) -> list[dict[str, list]]:
    """The main grid, then each ``grid.extra`` entry with the axes it leaves out taken from the main grid."""
    base = {k: p["grid"][k] for k in GRID_AXES}
    return [base] + [{**base, **extra} for extra in p["grid"].get("extra", [])]


def grid_values(p: dict[str, Any], axis: str) -> list:
    """Every value of ``axis`` in any sub-grid, in first-seen order."""
    return list(dict.fromkeys(v for g in sub_grids(p) for v in g[axis]))


def grid_points(p: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every grid point once: the main product, then the extra sub-grids' points it does not already hold."""
    seen = set()
    for g in sub_grids(p):
        for point in itertools.product(*(g[k] for k in GRID_AXES)):
            if point not in seen:
                seen.add(point)
                yield dict(zip(("method", "model", "modality", "data_size", "seed"), point))


def code_version(*parts: str) -> str:
    """Hash of the package sources a stage depends on, so that code edits rerun only that stage's jobs."""
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    for part in parts:
        target = pkg / part
        files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
        for f in files:
            h.update(str(f.relative_to(pkg)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def pretrain_code_version(method: str) -> str:
    """The pretraining code of one method: the loop, the models and the methods' shared base, and of the objectives
    only its own (``methods/<method>.py`` or ``methods/<method>/``), so an edit of DINO retrains no MAE point."""
    folder = Path(__file__).resolve().parent / "methods" / method
    own = f"methods/{method}" if folder.is_dir() else f"methods/{method}.py"
    return code_version("models", "train", "data/store.py", "config.py", "methods/__init__.py", "methods/base.py", own)


# --------------------------------------------------------------------------------------------- cluster (SLURM)
# Rules whose jobs may run on GPUs, and the section of params' cluster that sizes them by model.
GPU_RULES = {"pretrain": "pretrain", "evaluate": "evaluate", "evaluate_random_init": "evaluate",
             "evaluate_external": "evaluate"}  # outside encoders: cluster.evaluate's `default` size


def cluster_resources(p: dict[str, Any], rule: str, model: str | None = None) -> dict[str, Any]:
    """What a job of ``rule`` asks for, from the params' ``cluster`` section (defaults filled by the schema).

    Keys are the SLURM executor plugin's resource names: ``slurm_partition``, ``slurm_account``, ``mem_mb``,
    ``runtime`` (minutes) and, for the GPU rules (pretraining, and evaluation of an encoder) of ``model``, ``gpu``
    (a count; 0 = a CPU job), ``gpu_model`` and ``cpus_per_gpu``, by model size from ``cluster.pretrain`` or
    ``cluster.evaluate``. Every other rule is a CPU-only job: ``cluster.cpu_jobs``, overridden by
    ``cluster.rules.<rule>``. A value of None means "not set" (the cluster's default). The GPU count also applies to
    local runs on a machine with GPUs (one job per GPU); the rest only to SLURM.
    """
    c = p["cluster"]
    res: dict[str, Any] = {"slurm_account": c["account"]}
    if rule in GPU_RULES:
        section = GPU_RULES[rule]
        if model is None:
            raise ValueError(f"cluster_resources(..., {rule!r}, model): the model size is required")
        sizes = c[section]
        unknown = sorted(set(sizes) - set(p["models"]) - {"default"})
        if unknown:
            raise ParamsError(f"cluster.{section}: {', '.join(unknown)} not a model size under models "
                              f"(sizes: {', '.join(p['models'])}, or `default`)")
        lim = {**sizes["default"], **sizes.get(model, {})}
        gpus = lim["gpus"]
        res |= {"slurm_partition": c["gpu_partition"] if gpus else c["cpu_partition"], "mem_mb": lim["mem_mb"],
                "runtime": lim["runtime"], "gpu": gpus,
                "gpu_model": c["gpu_model"] if gpus else None, "cpus_per_gpu": c["cpus_per_gpu"] if gpus else None}
        return res
    lim = {**c["cpu_jobs"], **c["rules"].get(rule, {})}
    res |= {"slurm_partition": c["cpu_partition"], "mem_mb": lim["mem_mb"], "runtime": lim["runtime"]}
    return res
