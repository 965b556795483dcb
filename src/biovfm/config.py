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

from biovfm.data.medmnist import MODALITIES

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
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return validate_params(raw, source=str(path))


def validate_params(params: dict[str, Any], source: str = "params.yaml") -> dict[str, Any]:
    """Fill defaults from the schema, then check types, unknown keys and cross-references.

    Returns a new dict; raises :class:`ParamsError` naming ``source`` and the key path.
    """
    params = copy.deepcopy(params)
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    validator = _defaulting_validator(schema)
    errors = sorted(validator.iter_errors(params), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {_key_path(e)}: {_short_message(e)}" for e in errors[:10]]
        raise ParamsError(f"{source}: invalid parameters:\n" + "\n".join(lines))
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

    cls = jsonschema.validators.extend(base, {"properties": set_defaults})
    return cls(schema)


def _key_path(error: jsonschema.ValidationError) -> str:
    path = ""
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def _short_message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        return error.message.replace("Additional properties are not allowed", "unknown key(s)")
    return error.message


def _check_references(p: dict[str, Any], source: str) -> None:
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
        if size % m["patch_size"]:
            raise ParamsError(
                f"{source}: models.{name}.patch_size={m['patch_size']} does not divide data.image_size={size}; "
                f"pick a patch size that divides {size} for this study"
            )
        if m["embed_dim"] % m["num_heads"]:
            raise ParamsError(f"{source}: models.{name}: embed_dim={m['embed_dim']} is not divisible by num_heads={m['num_heads']}")
    mae = p["methods"]["mae"]
    if mae["decoder_dim"] % mae["decoder_heads"]:
        raise ParamsError(f"{source}: methods.mae: decoder_dim is not divisible by decoder_heads")
    if p["data"]["source"] == "synthetic":
        pool = p["data"]["synthetic"]["corpus_size"]
        for n in grid["data_sizes"]:
            if n > pool:
                raise ParamsError(
                    f"{source}: grid.data_sizes: {n} exceeds data.synthetic.corpus_size={pool}; raise corpus_size or drop the value"
                )
            for name in grid["modalities"]:
                have = pool * len(p["modalities"][name]) // len(MODALITIES)  # the synthetic corpus: an equal mix of all
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
    steps: int
    batch_size: int
    base_lr: float
    warmup_frac: float
    weight_decay: float
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
    descriptors: dict[str, Any] = field(default_factory=dict)  # method, modality, data_size of the grid point


IN_CHANS = 3  # grayscale images are replicated to RGB, as the paper does (as_rgb=True)


def model_spec(p: dict[str, Any], name: str) -> ModelSpec:
    return ModelSpec(name=name, **p["models"][name])


def pretrain_job(p: dict[str, Any], method: str, model: str, modality: str, data_size: int, seed: int, code_version: str = "") -> PretrainJob:
    t = dict(p["pretrain"])
    return PretrainJob(
        method=method,
        model=model_spec(p, model),
        modality=modality,
        modality_sources=tuple(p["modalities"][modality]),
        data_size=int(data_size),
        seed=int(seed),
        image_size=p["data"]["image_size"],
        in_chans=IN_CHANS,
        train=PretrainSettings(**t),
        method_cfg=dict(p["methods"][method]),
        tracking=dict(p["tracking"]),
        code_version=code_version,
    )


def eval_job(p: dict[str, Any], kind: str, run: str, model: str | None = None, seed: int = 0,
             descriptors: dict[str, Any] | None = None, code_version: str = "") -> EvalJob:
    e = p["evaluate"]
    return EvalJob(
        kind=kind,
        run_id=run,
        model=model_spec(p, model) if model else None,
        seed=int(seed),
        image_size=p["data"]["image_size"],
        tasks=tuple(p["data"]["tasks"]),
        batch_size=e["batch_size"],
        threads=e["threads"],
        probe=dict(e["probe"]),
        tracking=dict(p["tracking"]),
        code_version=code_version,
        descriptors=dict(descriptors or {}),
    )


def to_json(job: PretrainJob | EvalJob) -> str:
    return json.dumps(asdict(job), sort_keys=True, separators=(",", ":"))


def pretrain_job_from_json(text: str) -> PretrainJob:
    d = json.loads(text)
    d["model"] = ModelSpec(**d["model"])
    d["modality_sources"] = tuple(d["modality_sources"])
    d["train"] = PretrainSettings(**d["train"])
    return PretrainJob(**d)


def eval_job_from_json(text: str) -> EvalJob:
    d = json.loads(text)
    d["model"] = ModelSpec(**d["model"]) if d["model"] else None
    d["tasks"] = tuple(d["tasks"])
    return EvalJob(**d)


# --------------------------------------------------------------------------------------------- grid and names
def run_id(method: str, model: str, modality: str, data_size: int, seed: int) -> str:
    """Stable id of a pretraining grid point; also its folder under results/runs/."""
    return f"{method}/{model}/{modality}/n{data_size}/s{seed}"


def random_init_id(model: str, seed: int) -> str:
    return f"random/{model}/s{seed}"


RAW_PIXELS_ID = "raw/pixels"


def grid_points(p: dict[str, Any]) -> Iterator[dict[str, Any]]:
    g = p["grid"]
    for method, model, modality, n, seed in itertools.product(g["methods"], g["models"], g["modalities"], g["data_sizes"], g["seeds"]):
        yield dict(method=method, model=model, modality=modality, data_size=n, seed=seed)


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
