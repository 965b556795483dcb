"""Pretraining sources: readers (PNG/JPEG/TIFF, DICOM, NIfTI), manifests and their safety, the streamed sharded
store, de-duplication, the leakage check, the per-source report and the preprocess-corpus CLI. No internet: the
DICOM and NIfTI samples ship inside the pydicom and nibabel wheels."""
from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from biovfm.config import ParamsError, SCHEMA_PATH, validate_params
from biovfm.data import sources as S
from biovfm.data import store
from biovfm.data.preprocess import CorpusError, failed_report_path, log_corpus_report, preprocess_corpus
from biovfm.data.synthetic import generate_task
from biovfm.io import write_npz

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")
from nibabel.testing import data_path as NIB_DATA  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402


def dcm(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"{name} is not in the pydicom wheel"
    return path


def nii(name: str) -> str:
    return os.path.join(NIB_DATA, name)


def src(**kw) -> S.Source:
    kw.setdefault("name", "s")
    kw.setdefault("kind", "folder")
    return S.Source(**kw)


def png16_rgb(path: Path, arr: np.ndarray) -> None:
    """A 16-bit RGB PNG (PIL cannot write one): signature, IHDR, one zlib IDAT, IEND."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def rand(shape, seed=0, dtype=np.uint8, hi=256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, hi, shape).astype(dtype)


def build(tmp_path: Path, sources: list[dict], size: int = 16, tasks=(), **kw) -> dict:
    return preprocess_corpus(sources, tmp_path / "store", size, list(tasks), **kw)


# --------------------------------------------------------------------------------------------- conversion
def test_square_crop_resize_and_gray_to_rgb():
    gray = rand((20, 40), 1)
    out = S.to_study(gray, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], gray[:, 10:30]) and np.array_equal(out[..., 0], out[..., 2])  # center crop
    rgb = rand((16, 16, 3), 2)
    assert np.array_equal(S.to_study(rgb, 16), rgb)  # square at size: untouched, so hashes match evaluation copies
    assert S.to_study(rgb, 8).shape == (8, 8, 3)


def test_png_8_and_16_bit_gray_and_rgb_tiff_jpeg(tmp_path):
    gray, rgb = rand((12, 12), 3), rand((12, 12, 3), 4)
    Image.fromarray(gray).save(tmp_path / "g8.png")
    Image.fromarray(rgb).save(tmp_path / "c8.png")
    g16 = (np.arange(144).reshape(12, 12) * 25).astype(np.uint16)  # 0..3575, a 12-bit range in a 16-bit file
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.fromarray(g16).save(tmp_path / "g16.tif")
    png16_rgb(tmp_path / "c16.png", (rgb.astype(np.uint16) << 8) | 0x7F)
    smooth = np.stack([*np.meshgrid(np.linspace(0, 200, 12), np.linspace(40, 90, 12)), np.full((12, 12), 120.0)], -1)
    Image.fromarray(smooth.astype(np.uint8)).save(tmp_path / "c.jpg", quality=95)
    pages = [Image.fromarray(rand((12, 12), k)) for k in range(3)]
    pages[0].save(tmp_path / "multi.tif", save_all=True, append_images=pages[1:])
    s = src(clip_percentiles=(0.0, 100.0))
    read = lambda name: S.read_image_file(tmp_path / name, s)  # noqa: E731
    assert np.array_equal(read("g8.png")[0][1], gray) and np.array_equal(read("c8.png")[0][1], rgb)
    for name in ("g16.png", "g16.tif"):  # windowed to the full 0..255 range, order preserved
        im = read(name)[0][1]
        assert im.dtype == np.uint8 and im.min() == 0 and im.max() == 255
        assert np.array_equal(np.argsort(im, axis=None, kind="stable"), np.argsort(g16, axis=None, kind="stable"))
    assert np.array_equal(read("c16.png")[0][1], rgb)  # 16-bit RGB: the high byte
    assert read("c.jpg")[0][1].shape == (12, 12, 3) and np.abs(read("c.jpg")[0][1] - smooth).mean() < 4
    frames = read("multi.tif")
    assert [f[0] for f in frames] == ["#0", "#1", "#2"]
    assert np.array_equal(frames[2][1], np.asarray(pages[2]))
    assert [f[0] for f in S.read_image_file(tmp_path / "multi.tif", src(frame_stride=2))] == ["#0", "#2"]


# --------------------------------------------------------------------------------------------- DICOM
def test_dicom_rescale_file_window_and_modality_from_tag():
    ds = pydicom.dcmread(dcm("MR_small.dcm"))  # WindowCenter 600, WidthWidth 1600 in the file
    (suffix, modality, im), = S.read_dicom(dcm("MR_small.dcm"), src(), "")
    lo, hi = 600 - 800, 600 + 800
    expected = np.rint(np.clip((ds.pixel_array.astype(np.float32) - lo) * (255 / (hi - lo)), 0, 255)).astype(np.uint8)
    assert modality == "mr" and suffix == "" and np.array_equal(im, expected)
    # CT without a file window: slope/intercept to HU, then the CT default window (40 +- 200 HU)
    ct = pydicom.dcmread(dcm("CT_small.dcm"))
    hu = ct.pixel_array.astype(np.float32) * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    (_, modality, im), = S.read_dicom(dcm("CT_small.dcm"), src(), "")
    assert modality == "ct" and np.array_equal(im, S.scale_to_uint8(hu, -160, 240))
    (_, _, explicit), = S.read_dicom(dcm("CT_small.dcm"), src(window=(0.0, 2000.0)), "")
    assert np.array_equal(explicit, S.scale_to_uint8(hu, -1000, 1000)) and not np.array_equal(explicit, im)


def test_dicom_monochrome1_is_inverted_and_slope_applied(tmp_path):
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.RescaleSlope = 2
    ds.save_as(tmp_path / "m1.dcm")
    (_, _, inv), = S.read_dicom(tmp_path / "m1.dcm", src(window=(0.0, 4000.0)), "ct")
    hu = ds.pixel_array.astype(np.float32) * 2 + float(ds.RescaleIntercept)
    assert np.array_equal(inv, 255 - S.scale_to_uint8(hu, -2000, 2000))


def test_dicom_multiframe_colour_and_non_image_modalities():
    frames = S.read_dicom(dcm("examples_ybr_color.dcm"), src(frame_stride=10), "")
    assert [f[0] for f in frames] == ["#0", "#10", "#20"] and {f[1] for f in frames} == {"ultrasound"}
    assert frames[0][2].shape == (240, 320, 3) and frames[0][2].dtype == np.uint8  # YBR converted to RGB
    palette = S.read_dicom(dcm("examples_palette.dcm"), src(), "")
    assert palette[0][2].shape == (350, 800, 3)
    res = S.convert_unit(S.FileUnit(0, dcm("rtdose.dcm"), "rtdose.dcm", "dicom", ""), src(kind="dicom"), 16)
    assert res.images == [] and res.skipped[0]["bad"] is False and "RTDOSE" in res.skipped[0]["reason"]
    res = S.convert_unit(S.FileUnit(0, dcm("rtdose.dcm"), "rtdose.dcm", "dicom", "nm"), src(kind="dicom"), 16)
    assert len(res.images) == 15 and res.images[3][0] == "rtdose.dcm#3"  # a fixed modality takes every frame


# --------------------------------------------------------------------------------------------- NIfTI
def test_nifti_axes_stride_volume_normalisation_and_aspect():
    s = src(kind="nifti", modality="mr", axes=("axial", "coronal", "sagittal"), slice_stride=2, window="percentile",
            clip_percentiles=(1.0, 99.0))
    out = S.read_nifti(nii("anatomical.nii"), s)  # 33 x 41 x 25 voxels of 2 mm, LAS on disk
    names = [o[0] for o in out]
    assert names.count("#axial=0") == 1 and sum(n.startswith("#axial") for n in names) == 13
    assert sum(n.startswith("#coronal") for n in names) == 21 and sum(n.startswith("#sagittal") for n in names) == 17
    vol = np.asarray(nib.as_closest_canonical(nib.load(nii("anatomical.nii"))).dataobj, np.float32)
    lo, hi = np.percentile(vol, (1, 99))
    axial12 = dict(out)["#axial=12"]
    assert axial12.shape == (41, 33)  # rows: anterior-posterior, columns: left-right
    assert np.array_equal(axial12, np.rot90(S.scale_to_uint8(vol[:, :, 12], lo, hi)))  # one mapping per volume
    # 4D data: first volume; 2.2 mm slices: a coronal slice is stretched to square pixels (24 slices -> 26 rows)
    cor = S.read_nifti(nii("example4d.nii.gz"), src(kind="nifti", modality="mr", axes=("coronal",)))
    assert len(cor) == 96 and cor[0][1].shape == (26, 128)


# --------------------------------------------------------------------------------------------- sources, safety
def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def test_manifest_refuses_traversal_absolute_and_escaping_symlinks(tmp_path):
    root = tmp_path / "root"
    write_png(root / "a.png", rand((8, 8), 1))
    outside = write_png(tmp_path / "outside.png", rand((8, 8), 2))
    (root / "link.png").symlink_to(outside)
    cases = {"../outside.png": "climbs out", str(outside): "absolute path", "link.png": "outside the root"}
    for entry, needle in cases.items():
        pd.DataFrame({"path": ["a.png", entry], "modality": ["xray", "xray"]}).to_csv(tmp_path / "m.csv", index=False)
        with pytest.raises(S.SourceError, match=needle) as e:
            build(tmp_path, [{"name": "mine", "kind": "manifest", "manifest": str(tmp_path / "m.csv"), "root": str(root)}])
        assert "'mine'" in str(e.value) and not (tmp_path / "store").exists()
    pd.DataFrame({"path": ["a.png", str(outside)], "modality": ["xray", "us"]}).to_csv(tmp_path / "m.csv", index=False)
    r = build(tmp_path, [{"name": "mine", "kind": "manifest", "manifest": str(tmp_path / "m.csv"), "root": str(root),
                          "allow_absolute": True}])
    assert r["sources"]["mine"]["by_modality"] == {"ultrasound": 1, "xray": 1}  # alias us -> ultrasound


def test_folder_refuses_a_symlink_escaping_its_root(tmp_path):
    write_png(tmp_path / "root" / "a.png", rand((8, 8), 1))
    (tmp_path / "root" / "b.png").symlink_to(write_png(tmp_path / "elsewhere" / "b.png", rand((8, 8), 2)))
    with pytest.raises(S.SourceError, match="outside the source's root"):
        build(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "root"), "modality": "xray"}])
    (tmp_path / "root" / "b.png").unlink()
    (tmp_path / "root" / "c.png").symlink_to(tmp_path / "root" / "a.png")  # inside the root: fine (a duplicate)
    r = build(tmp_path, [{"name": "f", "kind": "folder", "path": str(tmp_path / "root"), "modality": "xray"}])
    assert r["sources"]["f"]["kept"] == 1 and r["sources"]["f"]["duplicates"] == 1


def test_unknown_modality_or_format_is_an_error_naming_the_source(tmp_path):
    write_png(tmp_path / "a.png", rand((8, 8), 1))
    (tmp_path / "b.bmp").write_bytes(b"BM")
    for rows, needle in (({"path": ["a.png"], "modality": ["sonar"]}, "unknown modality 'sonar'"),
                         ({"path": ["b.bmp"], "modality": ["xray"]}, "unknown format")):
        pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
        with pytest.raises(S.SourceError, match=needle) as e:
            build(tmp_path, [{"name": "lab", "kind": "manifest", "manifest": str(tmp_path / "m.csv")}])
        assert "corpus source 'lab'" in str(e.value)
    with pytest.raises(S.SourceError, match="corpus source 'x'.*unknown modality 'sonar'"):
        S.source_from_dict({"name": "x", "kind": "folder", "path": "p", "modality": "sonar"})
    with pytest.raises(S.SourceError, match="unknown kind 'zip'"):
        S.source_from_dict({"name": "x", "kind": "zip"})


def test_parquet_manifest(tmp_path):
    write_png(tmp_path / "img" / "a.png", rand((8, 8), 1))
    write_png(tmp_path / "img" / "b.png", rand((8, 8, 3), 2))
    pd.DataFrame({"file": ["a.png", "b.png"], "mod": ["CT", "fundus"]}).to_parquet(tmp_path / "m.parquet")
    r = build(tmp_path, [{"name": "pq", "kind": "manifest", "manifest": str(tmp_path / "m.parquet"),
                          "root": str(tmp_path / "img"), "path_column": "file", "modality_column": "mod"}])
    assert r["by_modality"] == {"ct": 1, "fundus": 1}


def test_corrupt_and_truncated_files_are_skipped_counted_and_bounded(tmp_path):
    root = tmp_path / "f"
    for k in range(6):
        write_png(root / f"ok{k}.png", rand((10, 10), k))
    good = (root / "ok0.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "noise.dcm").write_bytes(os.urandom(300))
    (root / "empty.nii.gz").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    spec = [{"name": "f", "kind": "folder", "path": str(root), "modality": "xray"}]
    with pytest.raises(CorpusError, match=r"3 of 9 files are unreadable .*max_bad_fraction=0.01") as e:
        build(tmp_path, spec)
    failed = failed_report_path(tmp_path / "store")
    assert str(failed) in str(e.value) and not (tmp_path / "store").exists()
    listed = {s["path"] for s in json.loads(failed.read_text())["sources"]["f"]["skipped_files"]}
    assert listed == {"truncated.png", "noise.dcm", "empty.nii.gz"}
    r = build(tmp_path, spec, max_bad_fraction=0.5)
    f = r["sources"]["f"]
    assert (f["files"], f["skipped"], f["bad"], f["ignored"], f["kept"]) == (9, 3, 3, 1, 6)
    assert not failed.exists() and json.loads((tmp_path / "store" / store.REPORT).read_text()) == r


def test_dedup_across_sources_gray_and_rgb_copies(tmp_path):
    im = rand((12, 12), 7)
    write_png(tmp_path / "a" / "x.png", im)
    write_png(tmp_path / "a" / "y.png", rand((12, 12), 8))
    write_png(tmp_path / "b" / "x_rgb.png", np.repeat(im[..., None], 3, axis=-1))  # the same picture, as RGB
    write_png(tmp_path / "b" / "z.png", rand((12, 12), 9))
    r = build(tmp_path, [{"name": "a", "kind": "folder", "path": str(tmp_path / "a"), "modality": "xray"},
                         {"name": "b", "kind": "folder", "path": str(tmp_path / "b"), "modality": "ct"}])
    assert (r["sources"]["a"]["kept"], r["sources"]["b"]["kept"], r["sources"]["b"]["duplicates"]) == (2, 1, 1)
    idx = store.load_store(tmp_path / "store").index
    assert idx["origin"].tolist() == ["x.png", "y.png", "z.png"] and idx["hash"].is_unique


# --------------------------------------------------------------------------------------------- leakage
@pytest.fixture
def task_npz(tmp_path) -> tuple[Path, dict]:
    task = generate_task("breastmnist", 20, 20, 20, size=16, seed=0)
    path = tmp_path / "breastmnist_16.npz"
    write_npz(path, **task)
    return path, task


def test_leakage_check_fails_on_val_test_keeps_train_and_can_drop(tmp_path, task_npz):
    path, task = task_npz
    root = tmp_path / "mine"
    write_png(root / "fine.png", rand((16, 16), 1))
    write_png(root / "leak.png", task["test_images"][4])
    write_png(root / "also_train.png", task["train_images"][2])
    spec = [{"name": "mine", "kind": "folder", "path": str(root), "modality": "ultrasound"}]
    with pytest.raises(CorpusError, match=r"1 corpus images are identical to evaluation images") as e:
        build(tmp_path, spec, tasks=[path])
    assert "mine:leak.png = breastmnist_16.npz:test[4]" in str(e.value) and not (tmp_path / "store").exists()
    r = build(tmp_path, spec, tasks=[path], on_leak="drop")
    assert (r["leakage"]["val_test"], r["leakage"]["train"], r["n_images"]) == (1, 1, 2)
    assert "leak.png" not in store.load_store(tmp_path / "store").index["origin"].tolist()


def test_medmnist_source_reads_train_split_only_and_passes_the_check(tmp_path, task_npz):
    path, task = task_npz
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(path, raw / "breastmnist.npz")  # the 28-px file name; images are 16 px here, resized to 16
    r = build(tmp_path, [{"name": "mm", "kind": "medmnist", "root": str(raw), "flags": ["breastmnist"], "size": 28}],
              tasks=[path])
    mm = r["sources"]["mm"]
    assert (mm["files"], mm["kept"], mm["train_overlap"], mm["leaked"]) == (20, 20, 20, 0)
    idx = store.load_store(tmp_path / "store").index
    assert set(idx["modality"]) == {"ultrasound"} and idx["origin"].iloc[3] == "breastmnist.npz:train[3]"


def benchmark_with_cross_split_copies(tmp_path: Path) -> tuple[Path, Path, dict]:
    """A MedMNIST-layout task as MedMNIST ships some: train images equal to val/test images, and repeated in train.

    Returns the raw folder (the 28-px file name; 16-px images), the evaluation task file and the arrays."""
    task = generate_task("breastmnist", 30, 20, 20, size=16, seed=0)
    tr = task["train_images"]
    tr[3], tr[5], tr[6], tr[9] = task["val_images"][1], task["test_images"][4], task["test_images"][4], tr[0]
    raw = tmp_path / "raw"
    write_npz(raw / "breastmnist.npz", **task)
    write_npz(tmp_path / "breastmnist_16.npz", **task)
    return raw, tmp_path / "breastmnist_16.npz", task


def test_benchmark_train_splits_leave_out_their_val_test_copies_and_report_them(tmp_path):
    """kind medmnist drops (by default) what equals a val/test image; within-train copies stay duplicates."""
    raw, task_file, _ = benchmark_with_cross_split_copies(tmp_path)
    mm = {"name": "mm", "kind": "medmnist", "root": str(raw), "flags": ["breastmnist"], "size": 28}
    r = build(tmp_path, [mm], tasks=[task_file])  # the corpus default on_leak is fail: the source's own wins
    m = r["sources"]["mm"]
    assert (m["on_leak"], m["read"], m["leaked"], m["duplicates"], m["kept"]) == ("drop", 30, 2, 2, 26)
    assert m["leaked_images"] == [{"image": "breastmnist.npz:train[3]", "equals": "breastmnist_16.npz:val[1]"},
                                  {"image": "breastmnist.npz:train[5]", "equals": "breastmnist_16.npz:test[4]"}]
    assert r["leakage"]["val_test"] == 2 and json.loads((tmp_path / "store" / store.REPORT).read_text()) == r
    origins = store.load_store(tmp_path / "store").index["origin"].tolist()
    assert not {"breastmnist.npz:train[3]", "breastmnist.npz:train[5]", "breastmnist.npz:train[9]"} & set(origins)
    with pytest.raises(CorpusError, match=r"'mm' \(medmnist\): 2 corpus images are identical to evaluation images"):
        build(tmp_path, [{**mm, "on_leak": "fail"}], tasks=[task_file])


@pytest.mark.parametrize("kind", ["folder", "synthetic"])
def test_a_users_source_with_the_same_copies_still_fails_unless_it_drops(tmp_path, kind):
    raw, task_file, task = benchmark_with_cross_split_copies(tmp_path)
    copies = np.stack([task["val_images"][1], task["test_images"][4], rand((16, 16), 1)])
    if kind == "folder":
        for k, im in enumerate(copies):
            write_png(tmp_path / "mine" / f"{k}.png", im)
        mine = {"name": "mine", "kind": "folder", "path": str(tmp_path / "mine"), "modality": "ultrasound"}
        first = "mine:0.png = breastmnist_16.npz:val[1]"
    else:
        write_npz(tmp_path / "mine.npz", images=np.repeat(copies[..., None], 3, axis=-1),
                  modality=np.array(["ultrasound"] * 3))
        mine = {"name": "mine", "kind": kind, "path": str(tmp_path / "mine.npz")}
        first = "mine:mine.npz[0] = breastmnist_16.npz:val[1]"
    mm = {"name": "mm", "kind": "medmnist", "root": str(raw), "flags": ["breastmnist"], "size": 28}
    with pytest.raises(CorpusError, match=rf"'mine' \({kind}\): 2 corpus images are identical") as e:
        build(tmp_path, [mine, mm], tasks=[task_file])
    assert first in str(e.value) and "on_leak: drop" in str(e.value) and "'mm'" not in str(e.value)
    r = build(tmp_path, [{**mine, "on_leak": "drop"}, mm], tasks=[task_file])
    assert (r["sources"]["mine"]["leaked"], r["sources"]["mine"]["kept"], r["sources"]["mm"]["leaked"]) == (2, 1, 0)
    assert r["sources"]["mm"]["duplicates"] == 4  # train[3, 5, 6]: copies of what `mine` left out; train[9]


def test_source_on_leak_defaults_drop_for_the_benchmark_only(raw_params):
    raw_params["data"] |= {"source": "medmnist", "medmnist": {"size": 28}}
    raw_params["grid"]["data_sizes"] = [60]
    p = validate_params(raw_params)
    assert [(s["kind"], s["on_leak"]) for s in p["corpus"]["sources"]] == [("medmnist", "drop")]
    assert p["corpus"]["on_leak"] == "fail" and validate_params(p) == p
    raw_params["corpus"] = {"sources": [{"name": "mm", "kind": "medmnist", "on_leak": "fail"},
                                        {"name": "cxr", "kind": "folder", "path": "/data/cxr", "modality": "xray"}]}
    srcs = validate_params(raw_params)["corpus"]["sources"]
    assert srcs[0]["on_leak"] == "fail" and "on_leak" not in srcs[1]  # the corpus' on_leak
    assert S.source_from_dict(srcs[1]).leak_policy("drop") == "drop"
    raw_params["corpus"]["sources"][1]["on_leak"] = "ignore"
    with pytest.raises(ParamsError, match=r"corpus.sources\[1\].on_leak: 'ignore' is not one of"):
        validate_params(raw_params)


def test_evaluation_hashes_prefer_held_out_splits(tmp_path):
    from biovfm.data.preprocess import evaluation_hashes

    task = generate_task("breastmnist", 20, 20, 20, size=16, seed=0)
    task["val_images"][0] = task["train_images"][5]
    write_npz(tmp_path / "t.npz", **task)
    h = evaluation_hashes([tmp_path / "t.npz"])
    rgb = np.repeat(task["train_images"][5][..., None], 3, axis=-1)
    assert h[store.content_hash(rgb)] == ("val", "t.npz:val[0]") and len(h) == 59


# --------------------------------------------------------------------------------------------- store
def legacy_store(folder: Path, images: np.ndarray, modalities: list[str]) -> None:
    """The former layout, byte for byte what the previous write_store wrote: images.npy + index.csv."""
    folder.mkdir(parents=True)
    np.save(folder / "images.npy", images)
    hashes = [store.content_hash(im) for im in images]
    pd.DataFrame({"source": "s", "modality": modalities, "hash": hashes}).to_csv(folder / "index.csv", index_label="row")


def test_sharded_store_round_trip_and_subsets_equal_the_single_array_store(tmp_path):
    images = rand((50, 8, 8, 3), 11)
    mods = np.array(["xray", "ct", "histology", "ultrasound", "mr"] * 10)
    counts = store.write_store(tmp_path / "new", images, np.full(50, "s"), mods, shard_size=7)
    assert counts == {"read": 50, "duplicates": 0, "kept": 50}
    manifest = json.loads((tmp_path / "new" / store.MANIFEST).read_text())
    assert [s["n"] for s in manifest["shards"]] == [7] * 7 + [1]
    legacy_store(tmp_path / "old", images, list(mods))
    new, old = store.load_store(tmp_path / "new"), store.load_store(tmp_path / "old")
    assert isinstance(old.images, np.memmap) and isinstance(new.images, store.ShardedImages)
    assert np.array_equal(new.images[np.arange(50)], images) and np.array_equal(new.images[:], images)
    assert np.array_equal(new.images[[49, 0, 13, 13]], images[[49, 0, 13, 13]]) and np.array_equal(new.images[-1], images[-1])
    for mix, n, seed in ((["xray"], 10, 0), (["ct", "mr"], 7, 3), (list(set(mods)), 50, 1), (["histology"], 1, 5)):
        a, b = new.subset(mix, n, seed), old.subset(mix, n, seed)
        assert np.array_equal(a, b) and np.array_equal(new.images[a], old.images[b])
    # the semantics, pinned (values of the previous implementation): nested seeded prefixes of the eligible rows
    assert new.subset(["xray"], 4, seed=0).tolist() == [10, 20, 25, 45]
    assert set(new.subset(["xray"], 4, seed=0)) <= set(new.subset(["xray"], 8, seed=0))
    with pytest.raises(ValueError, match="corpus has 10 images of modalities \\['mr'\\]"):
        new.subset(["mr"], 11)


def test_store_is_replaced_whole_and_corrupt_manifest_detected(tmp_path):
    store.write_store(tmp_path / "c", rand((9, 4, 4, 3), 1), np.full(9, "a"), np.full(9, "ct"), shard_size=4)
    store.write_store(tmp_path / "c", rand((3, 4, 4, 3), 2), np.full(3, "b"), np.full(3, "ct"), shard_size=4)
    assert sorted(p.name for p in (tmp_path / "c" / store.SHARDS).iterdir()) == ["000000.npy"]  # no stale shards
    assert len(store.load_store(tmp_path / "c")) == 3 and not list(tmp_path.glob(".c.*"))
    (tmp_path / "c" / store.SHARDS / "000000.npy").unlink()
    with pytest.raises(FileNotFoundError, match="shard"):
        store.load_store(tmp_path / "c")


def test_workers_give_the_identical_store(tmp_path):
    root = tmp_path / "f"
    for k in range(40):
        write_png(root / f"{k:02d}.png", rand((20, 14 + k % 5), k))
    spec = [{"name": "f", "kind": "folder", "path": str(root), "modality": "xray"}]
    one = preprocess_corpus(spec, tmp_path / "one", 12, workers=1, shard_size=16)
    two = preprocess_corpus(spec, tmp_path / "two", 12, workers=2, shard_size=16)
    a, b = store.load_store(tmp_path / "one"), store.load_store(tmp_path / "two")
    assert a.index.equals(b.index) and np.array_equal(a.images[:], b.images[:]) and one["n_images"] == two["n_images"] == 40


# --------------------------------------------------------------------------------------------- modality experiments
def test_single_modality_size_matched_and_full_corpora_from_real_sources(tmp_path):
    for k in range(6):
        write_png(tmp_path / "us" / f"{k}.png", rand((16, 16), 100 + k))
    for k in range(20):
        write_png(tmp_path / "cxr" / f"{k}.png", rand((16, 16), 200 + k))
        write_png(tmp_path / "path" / f"{k}.png", rand((16, 16, 3), 300 + k))
    build(tmp_path, [{"name": "busi", "kind": "folder", "path": str(tmp_path / "us"), "modality": "us"},
                     {"name": "cxr", "kind": "folder", "path": str(tmp_path / "cxr"), "modality": "xray"},
                     {"name": "path", "kind": "folder", "path": str(tmp_path / "path"), "modality": "histology"}])
    st = store.load_store(tmp_path / "store")
    mixes = {"us": ["ultrasound"], "all": ["histology", "ultrasound", "xray"]}
    us_only = st.subset(mixes["us"], 6, seed=0)
    matched = st.subset(mixes["all"], 6, seed=0)  # the paper's "same size, mixed modalities"
    full = st.subset(mixes["all"], len(st), seed=0)
    assert set(st.index["modality"].iloc[us_only]) == {"ultrasound"} and len(matched) == 6
    assert len(full) == 46 and set(matched) <= set(full) and len(set(st.index["modality"].iloc[matched])) > 1


# --------------------------------------------------------------------------------------------- CLI and report
def test_cli_builds_a_mixed_dicom_nifti_png_folder_with_a_per_modality_report(tmp_path, capsys):
    from biovfm.cli import main

    root = tmp_path / "data"
    (root / "ct").mkdir(parents=True)
    (root / "mr").mkdir()
    shutil.copy(dcm("CT_small.dcm"), root / "ct" / "slice.dcm")
    shutil.copy(dcm("MR_small.dcm"), root / "mr" / "scan.dcm")
    shutil.copy(nii("anatomical.nii"), root / "mr" / "head.nii")
    for k in range(3):
        write_png(root / "xray" / f"{k}.png", rand((30, 24), k))
    (root / "xray" / "README.txt").write_text("ignored")
    spec = {"sources": [{"name": "hospital", "kind": "folder", "path": str(root), "modality": "from_folder",
                         "axes": ["axial"], "slice_stride": 5}], "shard_size": 4}
    rc = main(["preprocess-corpus", "--spec", json.dumps(spec), "--size", "16", "--workers", "2", "--out", str(tmp_path / "c")])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "c" / store.REPORT).read_text())
    h = report["sources"]["hospital"]
    assert h["by_modality"] == {"ct": 1, "mr": 1 + 5, "xray": 3} == report["by_modality"]  # 25 slices, every 5th
    assert (h["files"], h["ignored"], h["skipped"], report["n_images"], report["shards"]) == (6, 1, 0, 10, 3)
    st = store.load_store(tmp_path / "c")
    assert st.images[np.arange(10)].shape == (10, 16, 16, 3) and st.index["origin"].iloc[0] == "ct/slice.dcm"
    assert "hospital: 6 inputs" in capsys.readouterr().out
    # the same folder with an unknown subfolder name: a clear error naming the source, exit status 1
    (root / "sonar").mkdir()
    write_png(root / "sonar" / "x.png", rand((8, 8), 1))
    assert main(["preprocess-corpus", "--spec", json.dumps(spec), "--size", "16", "--out", str(tmp_path / "d")]) == 1
    assert "corpus source 'hospital'" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_report_is_logged_to_mlflow_only_into_an_existing_store(tmp_path, mlflow_uri):
    write_png(tmp_path / "f" / "a.png", rand((16, 16), 1))
    raw, task_file, _ = benchmark_with_cross_split_copies(tmp_path)  # with images left out as val/test copies
    f = {"name": "f", "kind": "folder", "path": str(tmp_path / "f"), "modality": "xray", "license": "CC0"}
    mm = {"name": "mm", "kind": "medmnist", "root": str(raw), "flags": ["breastmnist"], "size": 28}
    report = build(tmp_path, [f, mm], tasks=[task_file])
    run_id = log_corpus_report(report, tmp_path / "store" / store.REPORT, mlflow_uri, "test")
    from mlflow.tracking import MlflowClient

    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.data.tags["stage"] == "preprocess" and run.data.metrics["source.f.kept"] == 1
    assert run.data.metrics["modality.xray"] == 1 and run.data.params["sources.f.license"] == "CC0"
    assert run.data.metrics["source.mm.leaked"] == 2 and run.data.params["sources.mm.on_leak"] == "drop"
    assert run.data.params["sources.f.on_leak"] == "fail"
    assert "mm:breastmnist.npz:train[5] = breastmnist_16.npz:test[4]" in run.data.tags["leaked_examples"]
    missing = tmp_path / "nowhere" / "mlflow.db"
    assert log_corpus_report(report, tmp_path / "store" / store.REPORT, f"sqlite:///{missing}", "test") is None
    assert not missing.exists()


# --------------------------------------------------------------------------------------------- params
def test_schema_vocabulary_and_source_defaults_match_the_code():
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    props = schema["properties"]
    assert tuple(props["modalities"]["additionalProperties"]["items"]["enum"]) == S.CORPUS_MODALITIES
    item = props["corpus"]["properties"]["sources"]["items"]["properties"]
    assert tuple(item["kind"]["enum"]) == S.KINDS
    defaults = S.Source(name="x", kind="folder")
    for key, sub in item.items():
        if "default" in sub:
            value = getattr(defaults, key)
            assert (list(value) if isinstance(value, tuple) else value) == sub["default"], key


def test_params_check_corpus_sources_against_the_grid(raw_params):
    p = validate_params(raw_params)
    assert [s["kind"] for s in p["corpus"]["sources"]] == ["synthetic"]  # the default corpus, resolved
    assert validate_params(p) == p  # resolved params validate again unchanged
    bad = json.loads(json.dumps(raw_params))
    bad["corpus"] = {"sources": [{"name": "pacs", "kind": "dicom", "path": "/data/pacs", "modality": "sonar"}]}
    with pytest.raises(ParamsError, match="corpus source 'pacs'.*unknown modality 'sonar'"):
        validate_params(bad)
    us = json.loads(json.dumps(raw_params))
    us["modalities"] = {"all": ["ct", "xray"], "us": ["ultrasound"]}
    us["grid"]["modalities"] = ["us"]
    us["corpus"] = {"sources": [{"name": "cxr", "kind": "folder", "path": "/data/cxr", "modality": "xray"}]}
    with pytest.raises(ParamsError, match="mix 'us' .*has no images in corpus.sources"):
        validate_params(us)
    us["corpus"]["sources"].append({"name": "busi", "kind": "folder", "path": "/data/busi", "modality": "us"})
    assert validate_params(us)["corpus"]["sources"][1]["modality"] == "ultrasound"
    big = json.loads(json.dumps(raw_params))  # the synthetic check keeps its meaning
    big["grid"]["data_sizes"] = [10_000]
    with pytest.raises(ParamsError, match="exceeds data.synthetic.corpus_size"):
        validate_params(big)
    big["corpus"] = {"sources": [{"name": "cxr", "kind": "folder", "path": "/data/cxr", "modality": "xray"}]}
    big["modalities"] = {"all": ["xray"]}
    assert validate_params(big)  # real sources: counted by the store, checked when a job draws its subset
