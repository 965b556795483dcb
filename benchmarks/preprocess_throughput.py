"""Throughput of the corpus preprocess stage (read, window, crop, resize, hash, dedup, shard) in images/s.

Writes N synthetic PNG files (8-bit gray and RGB, 16-bit gray) and N single-frame CT DICOM files (int16 with a
rescale intercept, the layout of pydicom's CT_small.dcm) of ``--side`` pixels into a temp folder, then builds a
store from each kind with 1 and with N worker processes. Run:

    .venv/bin/python benchmarks/preprocess_throughput.py [--n 400] [--side 256] [--size 64] [--workers 1 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from biovfm.data.preprocess import preprocess_corpus


def texture(rng: np.random.Generator, side: int) -> np.ndarray:
    """A smooth random field (compresses like a real image, unlike white noise), floats in [0, 1]."""
    coarse = rng.random((side // 16 + 1, side // 16 + 1))
    img = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC), np.float32)
    return np.clip(img / 255 + rng.normal(0, 0.03, (side, side)), 0, 1)


def write_pngs(folder: Path, n: int, side: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        t = texture(rng, side)
        if i % 3 == 0:
            Image.fromarray((t * 255).astype(np.uint8)).save(folder / f"{i:05d}_gray8.png")
        elif i % 3 == 1:
            rgb = np.stack([t, t ** 2, 1 - t], -1)
            Image.fromarray((rgb * 255).astype(np.uint8)).save(folder / f"{i:05d}_rgb8.png")
        else:
            Image.fromarray((t * 4095).astype(np.uint16)).save(folder / f"{i:05d}_gray16.png")


def write_dicoms(folder: Path, n: int, side: int) -> None:
    import pydicom
    from pydicom.data import get_testdata_file

    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    for i in range(n):
        ds = template.copy()
        hu = (texture(rng, side) * 1600 - 1000 + 1024).astype(np.int16)  # stored values; intercept -1024 -> HU
        ds.set_pixel_data(hu, photometric_interpretation="MONOCHROME2", bits_stored=16)
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / f"{i:05d}.dcm")


def time_build(folder: Path, kind: str, size: int, workers: int, out: Path) -> tuple[float, int]:
    src = {"name": kind, "kind": "dicom" if kind == "dicom" else "folder", "path": str(folder)}
    if kind != "dicom":
        src["modality"] = "xray"
    t0 = time.perf_counter()
    report = preprocess_corpus([src], out, size, workers=workers)
    return time.perf_counter() - t0, report["sources"][kind]["read"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="files per input kind")
    ap.add_argument("--side", type=int, default=256, help="side of the written images (pixels)")
    ap.add_argument("--size", type=int, default=64, help="the study's image size (output)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    a = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {a.n} files of {a.side}x{a.side} "
          f"px per input -> {a.size}x{a.size}x3 uint8")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        write_pngs(tmp / "png", a.n, a.side)
        write_dicoms(tmp / "dicom", a.n, a.side)
        print(f"# inputs written in {time.perf_counter() - t0:.1f}s")
        print(f"{'input':<8} {'workers':>7} {'images':>7} {'seconds':>8} {'images/s':>9}")
        for kind in ("png", "dicom"):
            for w in sorted(set(a.workers)):
                seconds, n = time_build(tmp / kind, kind, a.size, w, tmp / f"out_{kind}_{w}")
                print(f"{kind:<8} {w:>7} {n:>7} {seconds:>8.2f} {n / seconds:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
