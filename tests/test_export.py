"""`biovfm export`: a run folder becomes a folder that timm alone loads offline, with the study's features."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from biovfm import export
from biovfm.cli import main
from biovfm.evaluate.features import encoder_features, load_encoder
from tiny_run import RUN_ID, SIZE, SPEC, make_study, write_csv

# Run in a fresh interpreter that never imports biovfm, with sockets refused: only timm and the folder.
TIMM_ONLY = """
import socket, sys
def refuse(*a, **k):
    raise OSError("network access attempted")
socket.socket.connect = refuse
import numpy as np, timm, torch
from PIL import Image

folder, images_npy, out = sys.argv[1:]
model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
cfg = timm.data.resolve_data_config({}, model=model)
images = np.load(images_npy)
mean, std = torch.tensor(cfg["mean"]).view(1, -1, 1, 1), torch.tensor(cfg["std"]).view(1, -1, 1, 1)
x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
transform = timm.data.create_transform(**cfg)
x_pil = torch.stack([transform(Image.fromarray(im).convert("RGB")) for im in images])

def features(x):
    with torch.no_grad():
        tokens = model.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC", intermediates_only=True)[-1]
    return tokens.mean(dim=1).numpy()

assert "biovfm" not in sys.modules
np.savez(out, tensor=features(x), pil=features(x_pil), forward=model(x).detach().numpy())
"""


@pytest.fixture
def study(tmp_path, corpus_dir) -> tuple[Path, Path]:
    return make_study(tmp_path, corpus_dir)


def test_export_loads_in_timm_alone_with_the_study_features(study, tmp_path):
    results, corpus = study
    out = tmp_path / "export" / "enc"
    assert main(["export", RUN_ID, "--results", str(results), "--corpus", str(corpus), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_classes"] == 0 and cfg["pretrained_cfg"]["mean"] == [0.5] * 3
    assert cfg["model_args"] | {"img_size": SIZE, "patch_size": 4, "embed_dim": 32, "depth": 2} == cfg["model_args"]

    images = np.random.default_rng(1).integers(0, 256, size=(5, SIZE, SIZE, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    script = tmp_path / "timm_only.py"
    script.write_text(TIMM_ONLY)
    proc = subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "images.npy"), str(tmp_path / "f.npz")],
                          capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    got = np.load(tmp_path / "f.npz")

    encoder = load_encoder(results / "runs" / RUN_ID / "checkpoint.safetensors", SPEC, SIZE)
    ref = encoder_features(encoder, images)
    np.testing.assert_allclose(got["tensor"], ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["pil"], ref, rtol=0, atol=1e-6)  # timm's own transform from the config
    assert np.abs(got["forward"] - ref).max() > 1e-2  # model(x) applies the final norm: not the study's feature

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\nlicense: cc-by-4.0\n")
    assert "| pathmnist | 0.800 [0.780, 0.820] | 0.610 [0.590, 0.630] | 0.710 [0.690, 0.730] |" in card
    assert "| **mean** | 0.750 [0.730, 0.770]" in card
    assert "| test | xray | " in card and "DermaMNIST, which is CC BY-NC 4.0" in card
    assert 'timm.create_model("local-dir:path/to/mae-femto-mix-n40-s0", pretrained=True)' in card


def test_incomplete_run_folder_names_the_missing_file(study, tmp_path, capsys):
    results, corpus = study
    checkpoint = results / "runs" / RUN_ID / "checkpoint.safetensors"
    checkpoint.unlink()
    assert main(["export", str(checkpoint.parent), "--results", str(results), "--out", str(tmp_path / "x")]) == 1
    first = capsys.readouterr().err.splitlines()[0]
    assert str(checkpoint) in first and "missing" in first
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileNotFoundError, match="mae/femto/mix/n999/s0"):
        export.resolve_run_dir("mae/femto/mix/n999/s0", results)


def test_without_points_the_card_reads_eval_json_and_an_export_never_replaces_other_files(study, tmp_path):
    results, corpus = study
    (results / "tables" / "points.csv").unlink()
    out = export.export_run(RUN_ID, tmp_path / "e", results, tmp_path / "no-corpus")
    card = (out / "README.md").read_text()
    assert "| pathmnist | 0.800 | n/a | n/a |" in card and "license: other" in card
    export.export_run(RUN_ID, out, results, corpus)  # a previous export is replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not an export folder"):
        export.export_run(RUN_ID, tmp_path / "mine", results, corpus)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_select_best_run_per_method_by_mean_primary_auc(tmp_path):
    rows = []
    for run, method, aucs, primary in [("mae/a", "mae", (0.70, 0.72), True), ("mae/b", "mae", (0.80, 0.70), True),
                                       ("mae/a", "mae", (0.99, 0.99), False),  # another estimator: ignored
                                       ("dino/c", "dino", (0.60, 0.61), True)]:
        rows += [{"run_id": run, "kind": "pretrained", "method": method, "task": t, "primary": primary, "auc": a}
                 for t, a in zip(("pathmnist", "bloodmnist"), aucs)]
    rows += [{"run_id": "raw/pixels", "kind": "raw_pixels", "method": "raw", "task": "pathmnist", "primary": True,
              "auc": 0.9}]
    write_csv(tmp_path / "summary.csv", rows)
    assert export.select_runs(tmp_path / "summary.csv", "best") == ["dino/c", "mae/b"]
    assert export.select_runs(tmp_path / "summary.csv", "all") == ["dino/c", "mae/a", "mae/b"]
    assert export.hub_license(["generated, Apache-2.0", "CC BY 4.0 (DermaMNIST: CC BY-NC 4.0)"]) == "cc-by-nc-4.0"
