"""Outside encoders (evaluate.external): timm models from local weights on the study's own protocol."""
from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from biovfm.cli import main
from biovfm.config import ParamsError, eval_job, validate_params
from biovfm.data.synthetic import generate_task
from biovfm.evaluate.external import ExternalEncoder, ExternalSpec
from biovfm.evaluate.job import evaluate
from biovfm.io import read_json, write_npz
from tiny_run import RUN_ID, SIZE, SPEC, make_study

VIT_ARGS = {"img_size": SIZE, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def _images(n: int = 6, side: int = SIZE, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)


def _vit(num_classes: int = 0) -> torch.nn.Module:
    torch.manual_seed(3)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **VIT_ARGS).eval()


def _reference(model: torch.nn.Module, images: np.ndarray, mean: float, std: float) -> np.ndarray:
    """The study's feature computed by hand from timm's model: mean patch token, no final norm."""
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    with torch.no_grad():
        tokens = model.blocks(model.norm_pre(model._pos_embed(model.patch_embed(x))))
    return tokens[:, model.num_prefix_tokens:].mean(1).numpy()


def test_a_timm_vit_from_a_safetensors_file_gives_the_study_feature(tmp_path):
    model = _vit()
    save_file(model.state_dict(), str(tmp_path / "vit.safetensors"))
    ext = ExternalEncoder(ExternalSpec("vit", str(tmp_path / "vit.safetensors"), "vit_tiny_patch16_224", VIT_ARGS))
    assert ext.feature == "mean_patch" and ext.input_size == SIZE  # built size, not the registry's 224
    images = _images()
    cfg = model.pretrained_cfg  # vit_tiny's own normalisation (0.5, 0.5)
    np.testing.assert_allclose(ext.features(images), _reference(model, images, cfg["mean"][0], cfg["std"][0]),
                               rtol=0, atol=1e-6)


def test_a_torch_file_with_a_classifier_head_nested_under_model_loads_without_the_head(tmp_path):
    model = _vit(num_classes=7)
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, tmp_path / "ckpt.pth")
    ext = ExternalEncoder(ExternalSpec("vit", str(tmp_path / "ckpt.pth"), "vit_tiny_patch16_224", VIT_ARGS))
    images = _images()
    np.testing.assert_allclose(ext.features(images), _reference(model, images, 0.5, 0.5), rtol=0, atol=1e-6)


def test_a_convnet_gives_timms_pooled_features_and_images_are_resized_to_its_input(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    save_file(model.state_dict(), str(tmp_path / "r.safetensors"))
    ext = ExternalEncoder(ExternalSpec("r10", str(tmp_path / "r.safetensors"), "resnet10t", input_size=32,
                                       interpolation="bilinear", mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2)))
    assert ext.feature == "pooled"
    images = _images(4, side=SIZE)
    x = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, size=(32, 32),
                                        mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    with torch.no_grad():
        ref = model((x - 0.4) / 0.2).numpy()
    assert ext.features(images).shape == (4, model.num_features)
    np.testing.assert_allclose(ext.features(images), ref, rtol=0, atol=1e-5)


class _Boom:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("case", ["pickle", "no_arch", "wrong_arch", "missing", "suffix"])
def test_bad_outside_weights_are_refused_with_the_file_named(tmp_path, case):
    path = tmp_path / "w.pth"
    arch, args = "vit_tiny_patch16_224", VIT_ARGS
    if case == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": _Boom()}))
        match = "weights_only"
    else:
        save_file(_vit().state_dict(), str(path := tmp_path / "w.safetensors"))
        match = {"no_arch": "no `arch`", "wrong_arch": "do not fit", "missing": "not found",
                 "suffix": "unknown weights format"}[case]
        if case == "no_arch":
            arch = ""
        elif case == "wrong_arch":
            args = VIT_ARGS | {"depth": 3}
        elif case == "missing":
            path = tmp_path / "absent.safetensors"
        else:
            path = path.rename(tmp_path / "w.npz")
    with pytest.raises((ValueError, FileNotFoundError), match=match) as err:
        ExternalEncoder(ExternalSpec("x", str(path), arch, args))
    assert case == "no_arch" or str(path) in str(err.value)


def test_external_params_are_validated(raw_params):
    raw_params["evaluate"]["external"] = [{"name": "a", "path": "w.safetensors", "arch": "resnet10t"}] * 2
    with pytest.raises(ParamsError, match="a given twice"):
        validate_params(raw_params)
    raw_params["evaluate"]["external"] = [{"name": "a; touch pwned", "path": "w.safetensors"}]
    with pytest.raises(ParamsError, match="name"):
        validate_params(raw_params)
    raw_params["evaluate"]["external"] = [{"name": "a", "path": "w", "feature": "cls"}]
    with pytest.raises(ParamsError, match="feature"):
        validate_params(raw_params)


def test_an_exported_encoder_reimported_from_outside_scores_exactly_what_it_scored_inside(
        tmp_path, corpus_dir, raw_params, mlflow_uri):
    results, corpus = make_study(tmp_path, corpus_dir)
    folder = tmp_path / "export" / "enc"
    assert main(["export", RUN_ID, "--results", str(results), "--corpus", str(corpus), "--out", str(folder)]) == 0
    raw_params["data"]["tasks"] = ["breastmnist", "dermamnist", "chestmnist"]  # binary, multi-class, multi-label
    raw_params["data"]["image_size"] = SIZE
    raw_params["evaluate"]["label_fractions"] = [0.5, 1.0]
    raw_params["evaluate"]["external"] = [{"name": "enc", "path": str(folder)}]
    p = validate_params(raw_params)
    tasks = tmp_path / "tasks"
    for flag in p["data"]["tasks"]:
        write_npz(tasks / f"{flag}_{SIZE}.npz", **generate_task(flag, 60, 30, 40, size=SIZE, seed=0))
    track = {"uri": mlflow_uri, "experiment": "test"}
    inside = replace(eval_job(p, "pretrained", RUN_ID, None, 0, {"method": "mae"}), model=SPEC, tracking=track)
    outside = replace(eval_job(p, "external", "external/enc", None, 0, {"method": "external"}, "",
                               p["evaluate"]["external"][0]), tracking=track)
    a = evaluate(inside, tasks, tmp_path / "in" / "eval.json", results / "runs" / RUN_ID / "checkpoint.safetensors")
    b = evaluate(outside, tasks, tmp_path / "out" / "eval.json")
    assert b["params_encoder"] == a["params_encoder"] and b["feature"] == "mean_patch"
    for flag in p["data"]["tasks"]:
        va, vb = a["tasks"][flag]["variants"], b["tasks"][flag]["variants"]
        assert set(va) == set(vb) == {"logreg", "paper", "logreg_50pct", "knn"}
        for name in va:
            for key in ("auc", "acc"):
                assert va[name][key] == vb[name][key], (flag, name, key)  # exactly, not approximately
    sa, sb = np.load(tmp_path / "in" / "scores.npz"), np.load(tmp_path / "out" / "scores.npz")
    assert sorted(sa.files) == sorted(sb.files)
    for k in sa.files:
        assert np.array_equal(sa[k], sb[k]), k
    assert read_json(tmp_path / "out" / "eval.json")["model"] == "enc"


def test_outside_encoders_are_reference_lines_in_figure_a(tmp_path):
    import pandas as pd

    from biovfm.analysis.figures import plot_mean_auc_vs_params

    rows = []
    for kind, method, model, params, auc in [("pretrained", "mae", "femto", 1e5, 0.70), ("pretrained", "mae", "pico", 4e5, 0.74),
                                             ("external", "external", "vit-s-in21k", 2.2e7, 0.81)]:
        rows.append({"kind": kind, "method": method, "model": model, "modality": "all" if kind == "pretrained" else "",
                     "data_size": 100 if kind == "pretrained" else 0, "task": "mean", "auc": auc, "auc_lo": auc - 0.01,
                     "auc_hi": auc + 0.01, "params_encoder": params, "params_paper": params, "train_steps": 10,
                     "images_seen": 100, "train_flops": 1e9, "n_seeds": 1})
    fits = pd.DataFrame(columns=["axis", "kind", "method", "model", "modality", "data_size", "task", "form", "selected"])
    png, svg = plot_mean_auc_vs_params(pd.DataFrame(rows), fits, tmp_path / "a.png")
    text = Path(svg).read_text()
    assert "vit-s-in21k (22M params, 81.00)" in text  # its legend entry: name, size, mean AUC x 100
