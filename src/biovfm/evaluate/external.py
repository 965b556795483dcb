"""Outside encoders on the study's protocol (``evaluate.external``): any timm architecture with local weights.

An entry names a weights file (safetensors, or a torch file read with ``weights_only=True``) with its timm
architecture, or a folder in timm's Hugging Face layout (``config.json`` + ``model.safetensors``, as
``biovfm export`` writes). Nothing is downloaded: the model is built with ``pretrained=False`` and the weights are
loaded from disk. Each task's uint8 images are scaled to [0, 1], resized to the model's input size (its config's
interpolation; no resize when the sizes agree), normalised with its mean and std, and turned into one feature
vector per image:

* ``mean_patch``: the study's feature (mean patch token after the last block, prefix tokens excluded, final norm
  not applied), for timm models with ``forward_intermediates`` and prefix tokens (ViTs);
* ``pooled``: timm's own pooled pre-logits output (``model(x)`` with ``num_classes=0``), for any architecture;
* ``auto`` (default): ``mean_patch`` for a timm ``VisionTransformer``, else ``pooled``.

The features then go through the very estimators, metrics and bootstrap of the study's own encoders, so an
exported study encoder re-imported here scores exactly what it scored inside the study.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from biovfm.evaluate.features import read_safetensors, to_nchw

FEATURES = ("auto", "mean_patch", "pooled")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
HEAD_PREFIXES = ("head.", "fc.", "classifier.", "head_dist.")  # classifier weights: not part of a feature encoder
NESTED_KEYS = ("state_dict", "model", "module", "teacher")  # common wrappers of a state dict in torch files


@dataclass(frozen=True)
class ExternalSpec:
    """One outside encoder (an ``evaluate.external`` entry of params)."""

    name: str  # id in the study: results/baselines/external/<name>, the summary's model column, the figure's label
    path: str  # a weights file or an exported/timm folder (config.json + model.safetensors)
    arch: str = ""  # timm architecture; "" : the folder's config.json says
    model_args: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    input_size: int = 0  # 0: the model's config
    mean: tuple[float, ...] = ()  # (): the model's config
    std: tuple[float, ...] = ()
    interpolation: str = ""  # "": the model's config (bicubic, bilinear, nearest)
    feature: str = "auto"
    seed: int = 0  # of the estimators (paper head, label subsets), as a grid point's seed

    def __post_init__(self) -> None:
        if self.feature not in FEATURES:
            raise ValueError(f"evaluate.external {self.name!r}: feature must be one of {FEATURES}, got {self.feature!r}")


def _folder_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; an outside encoder folder needs timm's layout "
                                f"(config.json + model.safetensors, as `biovfm export` writes) or give a weights file")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None


def weights_file(path: Path) -> Path:
    """The weights of an entry: the file itself, or the folder's model.safetensors (pytorch_model.bin)."""
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in the folder")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights not found; place the file there (nothing is downloaded)")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a torch file loaded with ``weights_only=True`` (a pickle that is not
    plain tensors is refused); a state dict nested under a common key (``state_dict``, ``model``, ...) and a
    ``module.`` prefix (DistributedDataParallel) are unwrapped."""
    if path.suffix == ".safetensors":
        state: Any = read_safetensors(path)
    elif path.suffix in TORCH_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - an unpickling refusal or a corrupt file: say which and why
            raise ValueError(f"{path}: cannot be read as plain tensors with weights_only=True ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); save a state_dict or safetensors") from None
    else:
        raise ValueError(f"{path}: unknown weights format {path.suffix!r}; use .safetensors or one of {TORCH_SUFFIXES}")
    for key in NESTED_KEYS:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


class ExternalEncoder:
    """A timm model with its input recipe: ``features(uint8 images) -> float32 N x D``."""

    def __init__(self, spec: ExternalSpec, device: torch.device | str = "cpu"):
        import timm
        import timm.data
        from timm.models.vision_transformer import VisionTransformer

        self.spec = spec
        path = Path(spec.path)
        folder_cfg = _folder_config(path) if path.is_dir() else {}
        arch = spec.arch or folder_cfg.get("architecture", "")
        if not arch:
            raise ValueError(f"evaluate.external {spec.name!r}: no `arch` for the weights file {path} "
                             "(a timm architecture name, e.g. vit_small_patch16_224)")
        kwargs = {**folder_cfg.get("model_args", {}), **spec.model_args, "num_classes": 0}
        pretrained_cfg = folder_cfg.get("pretrained_cfg")
        try:
            model = timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=pretrained_cfg, **kwargs)
        except Exception as e:  # noqa: BLE001 - an unknown name or bad argument: name the entry
            raise ValueError(f"evaluate.external {spec.name!r}: timm cannot build {arch!r} with {kwargs} "
                             f"({type(e).__name__}: {e})") from None
        self.weights = weights_file(path)
        state = {k: v for k, v in read_state_dict(self.weights).items() if not k.startswith(HEAD_PREFIXES)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{self.weights}: the weights do not fit timm {arch!r} with {kwargs} "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        self.model = model.eval().to(device)
        data = timm.data.resolve_data_config({}, model=model)
        self.in_chans, side = int(data["input_size"][0]), int(data["input_size"][-1])
        built = getattr(getattr(model, "patch_embed", None), "img_size", None)  # a ViT built for another size
        self.input_size = spec.input_size or (int(built[0]) if built else side)
        self.interpolation = spec.interpolation or str(data.get("interpolation", "bicubic"))
        mean, std = spec.mean or tuple(data["mean"]), spec.std or tuple(data["std"])
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.device = torch.device(device)
        self.feature = spec.feature if spec.feature != "auto" else (
            "mean_patch" if isinstance(model, VisionTransformer) else "pooled")
        if self.feature == "mean_patch" and not hasattr(model, "forward_intermediates"):
            raise ValueError(f"evaluate.external {spec.name!r}: {arch} has no forward_intermediates; use feature: pooled")

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 N x H x W [x 3] -> the model's normalised input (grey replicated to its channels)."""
        x = to_nchw(images, self.in_chans).to(self.device)
        if x.shape[1] != self.in_chans:
            raise ValueError(f"evaluate.external {self.spec.name!r}: images have {x.shape[1]} channels, the model "
                             f"takes {self.in_chans}")
        x = x / 255.0
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            mode = self.interpolation if self.interpolation in ("bilinear", "bicubic", "nearest") else "bicubic"
            smooth = mode != "nearest"
            x = torch.nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode=mode,
                                                align_corners=False if smooth else None, antialias=smooth)
            x = x.clamp_(0.0, 1.0)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        x = self.preprocess(images)
        if self.feature == "mean_patch":
            tokens = self.model.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC",
                                                      intermediates_only=True)[-1]
            return tokens.mean(dim=1).float().cpu().numpy()
        return self.model(x).float().cpu().numpy()
