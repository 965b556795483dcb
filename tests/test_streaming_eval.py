"""Evaluation streams its images: memory bounded by a batch, not by the task (the 224-px, 10^5-image case)."""
from __future__ import annotations

import io
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest
import torch

from biovfm.config import eval_job, validate_params
from biovfm.data.preprocess import resize_images
from biovfm.data.synthetic import generate_task
from biovfm.evaluate import job as eval_module
from biovfm.evaluate.features import encoder_features, raw_pixel_features
from biovfm.progress import Progress, progress_line
from biovfm.evaluate.probe import LN_EPS, layer_norm
from biovfm.io import read_json, write_npz
from biovfm.models.vit import build_encoder


def _memmap(path, images: np.ndarray) -> np.memmap:
    m = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=images.shape)
    m[:] = images
    m.flush()
    return np.load(path, mmap_mode="r")


def _job(params: dict, kind: str, mlflow_uri: str):
    model = "femto" if kind == "random_init" else None
    job = eval_job(params, kind, "test/run", model, descriptors={"method": kind})
    return replace(job, tracking={"uri": mlflow_uri, "experiment": "test"}, probe=job.probe | {"epochs": 3})


@pytest.fixture
def tiny(raw_params) -> dict:
    raw_params["data"]["tasks"] = ["breastmnist", "dermamnist"]  # gray and RGB
    return validate_params(raw_params)


@pytest.mark.parametrize("kind", ["raw_pixels", "random_init"])
def test_evaluation_reads_an_uncompressed_task_through_a_memory_map(tmp_path, tiny, mlflow_uri, monkeypatch, kind):
    job = _job(tiny, kind, mlflow_uri)
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    packed.mkdir()
    for flag in tiny["data"]["tasks"]:
        data = generate_task(flag, 40, 30, 30, size=16, seed=0)
        write_npz(plain / f"{flag}_16.npz", **data)  # stored members: mappable
        np.savez_compressed(packed / f"{flag}_16.npz", **data)  # deflated: read whole, same numbers
    seen: list[type] = []
    extract = eval_module.raw_pixel_features if kind == "raw_pixels" else eval_module.encoder_features

    def spy(*args, **kwargs):
        seen.append(type(args[0] if kind == "raw_pixels" else args[1]))
        return extract(*args, **kwargs)

    monkeypatch.setattr(eval_module, extract.__name__, spy)
    out = eval_module.evaluate(job, plain, tmp_path / "plain.json")
    assert seen == [np.memmap] * 6  # 2 tasks x 3 splits, every one a map of the file
    eval_module.evaluate(job, packed, tmp_path / "packed.json")
    a, b = read_json(tmp_path / "plain.json")["tasks"], read_json(tmp_path / "packed.json")["tasks"]
    for flag in tiny["data"]["tasks"]:
        for key in ("auc", "acc", "val_auc", "feature_dim", "variants"):
            if key == "variants":  # every estimator's numbers (timings aside) are the same
                drop = lambda v: {n: {k: x for k, x in r.items() if k != "seconds"} for n, r in v.items()}  # noqa: E731
                assert drop(a[flag][key]) == drop(b[flag][key]), flag
            else:
                assert a[flag][key] == b[flag][key], (flag, key)
    assert out["tasks"]["dermamnist"]["feature_dim"] == (16 * 16 * 3 if kind == "raw_pixels" else 16)


def test_layer_norm_in_chunks_equals_the_float64_reference_exactly() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3000, 97)) * rng.uniform(1e-3, 1e3, (3000, 1)) + rng.uniform(-50, 50, (3000, 1)))
    for a in (x.astype(np.float32), x):
        before = a.copy()
        x64 = np.asarray(a, dtype=np.float64)
        ref = torch.from_numpy((x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + LN_EPS)).float()
        for chunk in (1, 7, 1000, 4096):
            got = layer_norm(a, chunk=chunk)
            assert got.dtype == torch.float32 and torch.equal(got, ref), chunk
        assert np.array_equal(a, before)  # the caller's features are not normalised in place


def test_layer_norm_extra_memory_is_bounded_by_the_chunk() -> None:
    x = np.random.default_rng(0).standard_normal((20_000, 500)).astype(np.float32)  # 40 MB
    tracemalloc.start()
    try:
        layer_norm(x, chunk=256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the float32 result plus two float64 chunks (2 MB); a whole float64 copy alone would be 80 MB
    assert peak < x.nbytes + 4 * 256 * 500 * 8, peak / 2**20


@pytest.mark.parametrize("channels", [(), (3,)])
def test_raw_pixels_are_the_28px_image_flattened(channels) -> None:
    rng = np.random.default_rng(1)
    at28 = rng.integers(0, 256, (37, 28, 28, *channels), dtype=np.uint8)
    today = at28.reshape(37, -1).astype(np.float32) / 255.0  # the definition at the default study's size
    assert np.array_equal(raw_pixel_features(at28, batch_size=8), today)
    at56 = rng.integers(0, 256, (37, 56, 56, *channels), dtype=np.uint8)
    feats = raw_pixel_features(at56, batch_size=8)
    assert feats.shape == (37, 28 * 28 * max(channels, default=1))
    assert np.array_equal(feats, raw_pixel_features(resize_images(at56, 28)))
    at16 = at28[:, :16, :16]  # below 28 px: the pixels themselves, not an upsampled copy
    assert np.array_equal(raw_pixel_features(at16), at16.reshape(37, -1).astype(np.float32) / 255.0)


def test_raw_pixels_of_a_224px_memory_map_stay_within_a_few_batches(tmp_path) -> None:
    rng = np.random.default_rng(2)
    images = _memmap(tmp_path / "x.npy", rng.integers(0, 256, (400, 224, 224, 3), dtype=np.uint8))  # 60 MB
    tracemalloc.start()
    try:
        feats = raw_pixel_features(images, batch_size=32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # features (3.8 MB) plus a batch; a float32 copy of the images would be 240 MB
    assert peak < 400 * 2352 * 4 + 8 * 32 * 2352 * 4 + 2**20, peak / 2**20
    assert feats.shape == (400, 2352)
    assert np.array_equal(feats[:5], raw_pixel_features(np.array(images[:5])))


def test_encoder_features_from_a_memory_map_equal_those_from_memory(tmp_path) -> None:
    from biovfm.config import ModelSpec

    torch.manual_seed(0)
    enc = build_encoder(ModelSpec("femto", embed_dim=16, depth=1, num_heads=2, patch_size=4), 16).eval()
    images = np.random.default_rng(3).integers(0, 256, (50, 16, 16), dtype=np.uint8)
    mapped = _memmap(tmp_path / "x.npy", images)
    stream = io.StringIO()
    with Progress("[evaluate] run task train", len(images), stream=stream) as progress:
        streamed = encoder_features(enc, mapped, batch_size=16, progress=progress)
    assert np.array_equal(streamed, encoder_features(enc, images, batch_size=16))
    assert progress.done == 50 and stream.getvalue() == ""  # a fast split prints nothing


def test_progress_prints_a_plain_line_every_interval_when_not_a_terminal() -> None:
    now = [0.0]
    stream = io.StringIO()
    with Progress("[evaluate] r t train", 100_000, stream=stream, every_s=30.0, clock=lambda: now[0]) as progress:
        for _ in range(10):
            now[0] += 10.0
            progress.update(10_000)
    lines = stream.getvalue().splitlines()  # at 30, 60 and 90 s, then the last one
    assert lines[0] == "[evaluate] r t train: 30,000/100,000 images, 1,000 img/s, ETA 1m10s"
    assert len(lines) == 4 and lines[-1] == "[evaluate] r t train: 100,000/100,000 images, 1,000 img/s, ETA 0s"
    assert progress_line("x", 12_288, 90_000, 30.0).endswith("410 img/s, ETA 3m10s")
