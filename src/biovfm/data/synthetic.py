"""Embedded synthetic MedMNIST-like benchmark: 12 evaluation tasks and an unlabeled pretraining corpus, offline.

Why it looks the way it does (see ``shared/reference/synthetic-pilot.md``):

* **Analytic rendering.** Every image is drawn on a ``[-1, 1]^2`` grid of pixel centres; all lengths are in these
  normalised units, small features are Gaussians widened by the pixel footprint (mass preserved) and edges are one
  pixel wide ramps. Any ``size`` (28, 64, 128, 224) therefore renders the same scene without resampling.
* **Heavy-tailed styles.** Each modality has a bank of ``N_STYLES`` discrete styles (stain palette, scanner/noise
  profile, anatomy template, contrast curve, texture frequency). A style's parameters depend only on
  ``(modality, style id)``. The corpus draws style ids from a Zipf law ``p(k) ~ (k+1)^-1.1``, so a bigger corpus
  sees many more styles; evaluation splits draw from a flatter law so tail styles show up at test time. The pilot
  found that a handful of continuous nuisances is covered by 2k images and data scaling then shows nothing.
* **No shortcut for a linear read-out of raw pixels** (issue 14; measured by ``benchmarks/synthetic_shortcuts.py``).
  A logistic regression on pixels can use only what is linear in them: label-correlated brightness or colour, and
  fixed pixels that carry the label. Mean-pooled ViT features lose position, so a benchmark rich in either lets raw
  pixels beat every encoder (on real MedMNIST a small MAE encoder beats them). Hence:

  - *findings, lesions, cells anywhere.* Lesions, nodules, cysts, consolidations and cells sit at random places;
    the dermoscopy lesion, the leukocyte and the kidney-cell group are framed off-centre with a per-image
    magnification; OCT findings and the retina itself move laterally and in depth; chest films vary in pose
    (shift, rotation, scale) around the registered anatomy; organ crops are jittered about the organ. The best fixed
    4 x 4-pixel block of the object-centred tasks keeps about a third of its class signal (tests/test_synthetic.py);
  - *effects stay local.* Posterior shadowing/enhancement in breast ultrasound fades within a few lesion heights
    instead of darkening a column to the bottom of the image, which the raw probe read as regional brightness;
    normal paediatric films carry smooth look-alike opacities, pneumonia patchy, mottled ones with air bronchograms;
  - *no class owns a brightness.* Class ranges of eosin staining, lesion pigment and lesion size overlap, so
    counts, shapes, textures and local colour decide. Exposure, window, gamma and stain strength come from the
    style, drawn independently of the label, and evaluation styles are nearly all distinct, so tone already varies
    image to image. The per-channel image mean is near chance on every task but pathology (bright adipose and
    background tiles) and the organ crops (the centred organ's density), as in the real datasets. An extra
    per-image acquisition jitter (gain, offset, gamma, white balance, blur, noise) was measured and left out: it
    cost position-free features 0.02-0.03 mean AUC and the raw-pixel probe almost nothing.
* **Disjoint random streams.** ``np.random.SeedSequence(seed, spawn_key=...)`` with distinct keys for the corpus and
  for every (task, split), so no corpus image can coincide with an evaluation image.

Images are float32 in ``[0, 1]`` inside the renderers and quantised to uint8 at the end. Only numpy is used.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

from biovfm.data.medmnist import MODALITIES, MULTI_LABEL, SPLITS, TASKS  # noqa: F401  (MODALITIES re-exported)

N_STYLES = 4096  # styles per modality
CORPUS_STYLE_EXPONENT = 1.1  # heavy tail: few head styles dominate small corpora
EVAL_STYLE_EXPONENT = 0.5  # flatter: evaluation reaches into the tail
CHUNK = 500  # images per vectorised call at 28 px; fewer at larger sizes (see _chunk), to bound memory

F32 = np.float32
Array = np.ndarray
Style = dict[str, Array]

# --------------------------------------------------------------------------------------------------------------
# Random streams and style sampling
# --------------------------------------------------------------------------------------------------------------


def _key(k: int | str) -> int:
    return k if isinstance(k, int) else zlib.crc32(k.encode())


def _rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A generator whose stream is fixed by ``seed`` and the purpose keys (disjoint for distinct keys)."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(_key(k) for k in keys)))


@lru_cache(maxsize=None)
def _zipf(exponent: float) -> Array:
    p = (np.arange(N_STYLES) + 1.0) ** -exponent
    return p / p.sum()


def sample_styles(rng: np.random.Generator, n: int, exponent: float) -> Array:
    """Style ids drawn from the truncated Zipf law ``p(k) ~ (k+1)^-exponent`` over the bank."""
    return rng.choice(N_STYLES, size=n, p=_zipf(exponent))


def _U(rng: np.random.Generator, lo, hi, shape) -> Array:
    """Uniform float32 draws; ``lo``/``hi`` may be arrays broadcasting against ``shape``."""
    return (lo + (np.asarray(hi, F32) - lo) * rng.random(shape, dtype=F32)).astype(F32)


def _bank(modality: str, spec: dict[str, tuple[float, float] | tuple[float, float, tuple[int, ...]]]) -> Style:
    """Uniform style parameters for all ``N_STYLES`` ids, from a stream fixed by the modality only."""
    rng = _rng(0, "style-bank", modality)
    out = {}
    for name, s in spec.items():
        shape = (N_STYLES, *s[2]) if len(s) == 3 else (N_STYLES,)
        out[name] = _U(rng, s[0], s[1], shape)
    return out


def _class_params(rng: np.random.Generator, table: dict[str, list[tuple[float, float]]], labels: Array) -> Style:
    """Per-image factors drawn uniformly from the (lo, hi) range of each image's class (ranges overlap on purpose)."""
    out = {}
    for name, ranges in table.items():
        lo, hi = np.asarray(ranges, F32).T
        out[name] = _U(rng, lo[labels], hi[labels], labels.shape)
    return out


# --------------------------------------------------------------------------------------------------------------
# Geometry, shapes, textures, noise and tone helpers (all broadcast over a leading batch axis)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """Pixel-centre coordinates in [-1, 1]; ``px`` is the pixel pitch in those units."""

    size: int
    x: Array = field(init=False, repr=False)
    y: Array = field(init=False, repr=False)

    def __post_init__(self) -> None:
        c = ((np.arange(self.size, dtype=F32) + 0.5) / self.size * 2 - 1).astype(F32)
        object.__setattr__(self, "x", c[None, None, :])  # (1, 1, W)
        object.__setattr__(self, "y", c[None, :, None])  # (1, H, 1)

    @property
    def px(self) -> float:
        return 2.0 / self.size


def _c(a: Array) -> Array:
    """Per-image (B,) or per-object (B, n) parameters -> broadcastable against (B, [n,] H, W)."""
    return np.asarray(a, F32)[..., None, None]


def _rot(x: Array, y: Array, cx, cy, ang) -> tuple[Array, Array]:
    dx, dy = x - cx, y - cy
    c, s = np.cos(ang), np.sin(ang)
    return c * dx + s * dy, -s * dx + c * dy


def _ramp(signed_dist: Array, width: float | Array) -> Array:
    """Soft inside-mask from a signed distance (positive inside), edge ``width`` wide."""
    return np.clip(signed_dist / width + 0.5, 0.0, 1.0)


def _ellipse(x, y, cx, cy, rx, ry, ang, width) -> Array:
    u, v = _rot(x, y, cx, cy, ang)
    r = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    return _ramp((1 - r) * np.sqrt(rx * ry), width)


def _star(x, y, cx, cy, r0, ang, amps: Sequence[Array], phases: Sequence[Array], aspect, width) -> Array:
    """Blob whose radius is ``r0 (1 + sum_k a_k cos(k theta + phi_k))``: smooth (small a) to spiculated (large a)."""
    u, v = _rot(x, y, cx, cy, ang)
    v = v * aspect
    th = np.arctan2(v, u)
    rb = np.ones_like(th)
    for k, (a, p) in enumerate(zip(amps, phases), start=2):
        rb = rb + a * np.cos(k * th + p)
    return _ramp(r0 * rb - np.sqrt(u * u + v * v), width)


def _gauss(x, y, cx, cy, sx, sy, ang, px: float) -> Array:
    """Gaussian spot widened by the pixel footprint, integral preserved: sub-pixel lesions stay visible."""
    fp = F32(0.4 * px)
    ex, ey = np.sqrt(sx * sx + fp * fp), np.sqrt(sy * sy + fp * fp)
    u, v = _rot(x, y, cx, cy, ang)
    return (sx * sy / (ex * ey)) * np.exp(-0.5 * ((u / ex) ** 2 + (v / ey) ** 2))


def _field(rng: np.random.Generator, g: Grid, b: int, fmin, fmax, n: int = 8, ang0=None, spread=np.pi) -> Array:
    """Unit-variance random Fourier texture; frequencies in cycles per unit; optional dominant orientation."""
    fmin, fmax = np.asarray(fmin, F32), np.asarray(fmax, F32)
    f = _U(rng, fmin[..., None] if fmin.ndim else fmin, fmax[..., None] if fmax.ndim else fmax, (b, n))
    if ang0 is None:
        th = _U(rng, -np.pi, np.pi, (b, n))
    else:
        th = ang0[:, None] + np.reshape(np.asarray(spread, F32), (-1, 1)) * _U(rng, -0.5, 0.5, (b, n))
    ph = _U(rng, 0, 2 * np.pi, (b, n))
    k = 2 * np.pi * f
    arg = _c(k * np.cos(th)) * g.x[None] + _c(k * np.sin(th)) * g.y[None] + _c(ph)
    return (np.cos(arg).sum(1) * np.sqrt(2.0 / n)).astype(F32)


def _tone(img: Array, gamma, contrast, bright) -> Array:
    """Contrast curve: gamma, then contrast about mid-grey, then brightness offset."""
    img = np.clip(img, 0, 1) ** _c(gamma)
    return (img - 0.5) * _c(contrast) + 0.5 + _c(bright)


def _speckle(rng: np.random.Generator, img: Array, sigma: Array) -> Array:
    """Log-normal multiplicative speckle with unit mean (OCT, ultrasound)."""
    s = _c(sigma)
    return img * np.exp(s * rng.standard_normal(img.shape, dtype=F32) - 0.5 * s * s)


def _gnoise(rng: np.random.Generator, img: Array, sigma: Array) -> Array:
    s = np.asarray(sigma, F32).reshape((-1,) + (1,) * (img.ndim - 1))
    return img + s * rng.standard_normal(img.shape, dtype=F32)


def _vignette(g: Grid, b: int, radius: Array, strength: Array, cx=0.0, cy=0.0) -> Array:
    """Radial fall-off of illumination (fundus camera, dermoscope)."""
    r2 = ((g.x - _c(cx)) ** 2 + (g.y - _c(cy)) ** 2) / _c(radius) ** 2
    return np.clip(1 - _c(strength) * r2, 0, 1) * np.ones((b, 1, 1), F32)


def _absorb(conc: Sequence[Array], od: Sequence[Array]) -> Array:
    """Beer-Lambert colour: transmitted RGB = exp(-sum_k c_k * OD_k); conc (B, H, W), od (B, 3)."""
    tot = sum(c[..., None] * np.asarray(o, F32)[:, None, None, :] for c, o in zip(conc, od))
    return np.exp(-tot).astype(F32)


def _in_disc(rng: np.random.Generator, shape, radius, power: float = 0.5) -> tuple[Array, Array]:
    """Points in a disc of ``radius`` (array or float): uniform for ``power=0.5``, denser at the centre above."""
    r = rng.random(shape, dtype=F32) ** power * radius
    t = _U(rng, 0, 2 * np.pi, shape)
    return (r * np.cos(t)).astype(F32), (r * np.sin(t)).astype(F32)


def _active(counts: Array, nmax: int) -> Array:
    """(B, nmax) 0/1 mask with the first ``counts`` objects on."""
    return (np.arange(nmax)[None, :] < np.round(counts)[:, None]).astype(F32)


def _cnt(rng: np.random.Generator, lam: Array, nmax: int) -> Array:
    return np.minimum(rng.poisson(np.maximum(lam, 0)), nmax).astype(F32)


# --------------------------------------------------------------------------------------------------------------
# Histology (pathmnist): H&E tissue types, Beer-Lambert stain mixing
# --------------------------------------------------------------------------------------------------------------

_H_OD = np.array([0.65, 0.70, 0.29], F32)  # hematoxylin optical density per RGB channel
_E_OD = np.array([0.07, 0.99, 0.11], F32)

_HISTO_STYLE = {
    "h_jit": (-0.25, 0.25, (3,)), "e_jit": (-0.2, 0.2, (3,)), "h_str": (0.8, 2.0), "e_str": (0.5, 1.4),
    "bg_od": (0.0, 0.12, (3,)), "fibre_f": (2.5, 8.0), "nuc_scale": (0.75, 1.3), "noise": (0.01, 0.06),
    "gamma": (0.7, 1.4), "contrast": (0.75, 1.25), "bright": (-0.08, 0.08), "soft": (1.0, 2.5),
}

# Classes of NCT-CRC-HE: adipose, background, debris, lymphocytes, mucus, smooth muscle, normal mucosa,
# cancer-associated stroma, tumour epithelium. Ranges overlap, so texture statistics (not colour) decide.
_HISTO_TABLE = {
    # one (lo, hi) per class, in the order ADI, BACK, DEB, LYM, MUC, MUS, NORM, STR, TUM
    "n_nuc": [(0, 4), (0, 3), (8, 22), (18, 36), (0, 6), (5, 12), (10, 18), (4, 10), (14, 28)],
    "nuc_r": [(.04, .06), (.03, .05), (.015, .035), (.04, .06), (.04, .06), (.035, .05), (.045, .06),
              (.03, .05), (.06, .095)],
    "aspect": [(1, 1.6), (1, 1.6), (1, 2.5), (1, 1.25), (1, 1.6), (2.5, 4.5), (1.4, 2.2), (2, 4), (1, 1.8)],
    "dark": [(.5, 1), (.3, .7), (.6, 1.1), (.9, 1.3), (.4, .8), (.6, 1), (.7, 1.1), (.6, 1), (.8, 1.2)],
    "align": [(0, 1), (0, 1), (0, 1), (0, 1), (0, 1), (0, .15), (0, 1), (.3, .8), (0, 1)],
    "eosin": [(.3, .7), (0, .3), (.35, .8), (.25, .65), (.2, .6), (.45, .9), (.35, .75), (.4, .85), (.35, .75)],
    "fibre": [(0, .1), (0, .1), (.1, .35), (0, .15), (.2, .45), (.25, .5), (0, .15), (.25, .5), (0, .15)],
    "spread": [(1, 3), (1, 3), (1, 3), (1, 3), (.6, 1.5), (.05, .25), (1, 3), (.4, 1.0), (1, 3)],
    "haze": [(0, .08), (0, .06), (.05, .2), (.05, .15), (.2, .45), (0, .06), (0, .1), (0, .08), (.05, .15)],
    "n_holes": [(5, 9), (0, 1), (0, 2), (0, 1), (0, 2), (0, 1), (1, 2.4), (0, 1.5), (0, 2)],
    "hole_r": [(.28, .45), (.1, .2), (.05, .15), (.05, .1), (.2, .4), (.05, .1), (.15, .3), (.08, .2),
               (.08, .2)],
    "ring": [(0, 0), (0, 0), (0, 0), (0, 0), (0, 0), (0, 0), (.7, 1), (0, 0), (0, .4)],
}


def render_histology(rng: np.random.Generator, labels: Array, st: Style, g: Grid) -> Array:
    """H&E tile; the tissue class sets nucleus count/size/shape/alignment, gland rings, holes and fibre texture."""
    b, lab = len(labels), labels[:, 0]
    p = _class_params(rng, _HISTO_TABLE, lab)
    soft = F32(g.px) * _c(st["soft"])[:, None]
    # holes: fat vacuoles / lumina / mucus pools (union of discs)
    nh = 9
    hx, hy = _U(rng, -1, 1, (b, nh)), _U(rng, -1, 1, (b, nh))
    hr = p["hole_r"][:, None] * _U(rng, 0.75, 1.25, (b, nh))
    on = _active(p["n_holes"], nh)
    holes = 1 - np.prod(1 - _c(on) * _ellipse(g.x, g.y, _c(hx), _c(hy), _c(hr), _c(hr * 0.85), 0, soft), axis=1)
    # nuclei: random, aligned with the fibre direction, or on a gland ring around the first hole
    nn = 36
    theta0 = _U(rng, -np.pi, np.pi, b)
    nx, ny = _U(rng, -1.1, 1.1, (b, nn)), _U(rng, -1.1, 1.1, (b, nn))
    ang = theta0[:, None] + p["align"][:, None] * _U(rng, -np.pi / 2, np.pi / 2, (b, nn))
    on_ring = rng.random((b, nn), dtype=F32) < p["ring"][:, None]
    t = _U(rng, 0, 2 * np.pi, (b, nn))
    rr = hr[:, :1] * 1.2
    nx = np.where(on_ring, hx[:, :1] + rr * np.cos(t), nx)
    ny = np.where(on_ring, hy[:, :1] + rr * np.sin(t), ny)
    ang = np.where(on_ring, t, ang)  # long axis radial, as in crypts
    r = p["nuc_r"][:, None] * st["nuc_scale"][:, None] * _U(rng, 0.8, 1.2, (b, nn))
    asp = p["aspect"][:, None] * _U(rng, 0.85, 1.15, (b, nn))
    amp = _active(p["n_nuc"], nn) * p["dark"][:, None] * _U(rng, 0.7, 1.1, (b, nn))
    rx, ry = r * np.sqrt(asp), r / np.sqrt(asp)
    nuc = (_c(amp) * _ellipse(g.x, g.y, _c(nx), _c(ny), _c(rx), _c(ry), _c(ang), soft)).sum(1)
    nuc = np.minimum(nuc, 1.4)
    fib = _field(rng, g, b, st["fibre_f"] * 0.8, st["fibre_f"] * 1.5, n=8, ang0=theta0 + np.pi / 2,
                 spread=p["spread"])
    blotch = _field(rng, g, b, 0.5, 1.5, n=5)
    e = _c(p["eosin"]) * (1 + _c(p["fibre"]) * fib + 0.15 * blotch) * (1 - holes)
    h = (nuc + _c(p["haze"]) * (1 + 0.5 * blotch)) * (1 - 0.85 * holes)
    h_od = np.clip(_H_OD + st["h_jit"], 0.05, None) * st["h_str"][:, None]
    e_od = np.clip(_E_OD + st["e_jit"], 0.02, None) * st["e_str"][:, None]
    rgb = _absorb([np.maximum(h, 0), np.maximum(e, 0), np.ones_like(h)], [h_od, e_od, st["bg_od"]])
    rgb = _tone(rgb, st["gamma"][:, None], st["contrast"][:, None], st["bright"][:, None])
    return _gnoise(rng, rgb, st["noise"])


# --------------------------------------------------------------------------------------------------------------
# Chest X-ray (chestmnist, pneumoniamnist): attenuation map, Poisson photon noise
# --------------------------------------------------------------------------------------------------------------

_XRAY_STYLE = {
    "lung_x": (0.36, 0.48), "lung_y": (-0.15, 0.05), "lung_rx": (0.27, 0.36), "lung_ry": (0.55, 0.72),
    "lung_depth": (0.25, 0.45), "heart_r": (0.2, 0.27), "heart_x": (0.0, 0.12), "med_w": (0.09, 0.16),
    "rib_f": (2.2, 3.6), "rib_curve": (0.3, 1.0), "rib_amp": (0.03, 0.1), "vessel": (0.02, 0.08),
    "vessel_f": (3.0, 7.0), "body_w": (0.85, 1.15), "photons": (40.0, 400.0), "mu": (1.5, 3.0),
    "gamma": (0.6, 1.5), "contrast": (0.7, 1.4), "bright": (-0.12, 0.12), "clav": (0.0, 0.12),
}

CHEST_FINDINGS = ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
                  "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural_thickening", "hernia")
# Prevalences keep both classes in every split (positives are assigned exactly, see _multilabel).
CHEST_PREVALENCE = (0.2, 0.12, 0.22, 0.3, 0.15, 0.16, 0.12, 0.14, 0.14, 0.1, 0.11, 0.1, 0.12, 0.1)


def _multilabel(rng: np.random.Generator, n: int, prevalence: Sequence[float]) -> Array:
    """Independent columns with exactly round(p n) positives each (at least one positive and one negative)."""
    y = np.zeros((n, len(prevalence)), np.int64)
    for j, p in enumerate(prevalence):
        k = int(np.clip(round(p * n), 1, max(n - 1, 1)))
        y[rng.permutation(n)[:k], j] = 1
    return y


def render_xray(rng: np.random.Generator, labels: Array, st: Style, g: Grid, mode: str = "chest") -> Array:
    """Frontal chest radiograph.

    ``mode="chest"``: 14 independent findings (column order ``CHEST_FINDINGS``), each drawn at a random place in a
    random lung with graded size/strength. ``mode="pneumonia"``: paediatric anatomy; label 1 = 1-3 fuzzy
    consolidations at random places, label 0 = none (both have hilar/vessel confounders).
    """
    b = len(labels)
    if mode == "chest":
        f = labels.astype(F32)
    else:
        f = np.zeros((b, 14), F32)
        f[:, 6] = labels[:, 0]
    ped = mode == "pneumonia"
    # per-image pose jitter (rotation, scale, shift) on top of the style's anatomy template
    a = _U(rng, -0.15, 0.15, b)
    sc = _U(rng, 0.85, 1.15, b)
    x, y = _rot(g.x, g.y, _c(_U(rng, -0.2, 0.2, b)), _c(_U(rng, -0.2, 0.2, b)), _c(a))
    x, y = x / _c(sc), y / _c(sc)
    lx, ly = st["lung_x"], st["lung_y"] + (0.08 if ped else 0.0)
    rx = st["lung_rx"] * _U(rng, 0.93, 1.07, b) * (1.0 + 0.12 * f[:, 10])
    ry = st["lung_ry"] * _U(rng, 0.9, 1.08, b) * (0.85 if ped else 1.0) * (1.0 + 0.12 * f[:, 10])
    edge = F32(0.06)
    lungs = [_ellipse(x, y, _c(s * lx), _c(ly), _c(rx), _c(ry), 0, edge) for s in (-1, 1)]
    lung = np.maximum(*lungs)
    hr = st["heart_r"] * (1.15 if ped else 1.0) * (1 + _U(rng, 0.25, 0.45, b) * f[:, 1])
    hx, hy = st["heart_x"], ly + ry * 0.55
    heart = _ellipse(x, y, _c(hx), _c(hy), _c(hr), _c(hr * 0.75), 0, edge)
    med = _ramp(_c(st["med_w"]) - np.abs(x), edge) * _ramp(_c(hy) - y, 0.1)
    body = _ramp(_c(st["body_w"]) - np.abs(x) * (1 + 0.3 * np.clip(-y, 0, None)), 0.15)
    ribs = np.clip(np.cos(2 * np.pi * _c(st["rib_f"]) * (y - _c(st["rib_curve"]) * x * x) + _c(_U(rng, 0, 6.3, b)))
                   - 0.3, 0, None)
    clav = np.exp(-0.5 * ((y + 0.72 - 0.25 * np.abs(x)) / 0.04) ** 2) * _ramp(0.6 - np.abs(x), 0.1)
    vess = _field(rng, g, b, st["vessel_f"], st["vessel_f"] * 1.6, n=8)
    hilum = sum(np.exp(-((x - _c(s * lx * 0.45)) ** 2 + (y - _c(ly)) ** 2) / 0.08) for s in (-1, 1))
    depth = st["lung_depth"] + 0.15 * f[:, 10]
    A = 0.75 * body - _c(depth) * lung + 0.3 * np.maximum(heart, med) + _c(st["rib_amp"]) * ribs * (0.5 + lung)
    A = A + _c(st["clav"]) * clav + _c(st["vessel"] * (1 - 0.6 * f[:, 10])) * lung * (np.abs(vess) * (0.4 + hilum))
    A = A + _c(_U(rng, 0.0, 0.12, b)) * hilum  # hilar prominence: a confounder in every image
    A = A + _findings(rng, g, x, y, f, lx, ly, rx, ry, lung, lungs, hilum)
    if ped:  # normal films: smooth, sharp-edged look-alikes (overlying soft tissue, thymus, nipple shadows), so
        for k in range(3):  # the amount of opacity in the lungs is not the whole label
            cx, cy, _ = _lung_pt(rng, b, lx, ly, rx, ry)
            keep = (1 - f[:, 6]) * (rng.random(b) < (0.5, 0.25, 0.0)[k])
            r = _U(rng, .08, .15, b)
            A = A + _c(keep * _U(rng, .15, .35, b)) * _ellipse(x, y, _c(cx), _c(cy), _c(r), _c(r * _U(rng, .6, 1, b)),
                                                                _c(_U(rng, 0, 3.1, b)), .03)
    # acquisition: transmitted photons, Poisson counts, log transform
    mu = _c(st["mu"])
    lam = _c(st["photons"]) * np.exp(-mu * np.clip(A, 0, None))
    counts = rng.poisson(lam).astype(F32)
    img = -np.log((counts + 0.5) / _c(st["photons"])) / mu
    img = _tone(img / 1.1, st["gamma"], st["contrast"], st["bright"])
    return img


def _lung_pt(rng, b, lx, ly, rx, ry, lower: bool = False) -> tuple[Array, Array, Array]:
    """A random point inside a random lung (optionally its lower half); returns (x, y, side)."""
    side = np.where(rng.random(b) < 0.5, -1.0, 1.0).astype(F32)
    u, v = _in_disc(rng, b, 0.8)
    if lower:
        v = np.abs(v)
    return side * lx + u * rx, ly + v * ry, side


def _findings(rng, g: Grid, x, y, f: Array, lx, ly, rx, ry, lung, lungs, hilum) -> Array:
    """Attenuation added by the 14 findings (active where f[:, j] = 1); every one at a random place/side."""
    b, px = len(f), g.px
    add = np.zeros_like(lung)
    on = lambda j: _c(f[:, j])  # noqa: E731
    # atelectasis: elongated band in a lower zone
    cx, cy, _ = _lung_pt(rng, b, lx, ly, rx, ry, lower=True)
    add += on(0) * _c(_U(rng, .15, .35, b)) * _gauss(x, y, _c(cx), _c(cy), _c(_U(rng, .1, .18, b)), .03,
                                                       _c(_U(rng, -.5, .5, b)), px) * lung
    # (1 cardiomegaly changes the heart size in render_xray)
    # effusion: fluid level with meniscus at the costophrenic angle of one side
    side = np.where(rng.random(b) < 0.5, 0, 1)
    lm = np.where(_c(side) == 0, lungs[0], lungs[1])
    level = _c(ly + ry * _U(rng, 0.35, 0.75, b)) - 0.35 * np.abs(x - _c(np.where(side == 0, -lx, lx)))
    add += on(2) * _c(_U(rng, .3, .6, b)) * _ramp(y - level, 0.08) * lm
    # infiltration: several faint patches
    for _ in range(4):
        cx, cy, _s = _lung_pt(rng, b, lx, ly, rx, ry)
        add += on(3) * _c(_U(rng, 0, .16, b)) * _gauss(x, y, _c(cx), _c(cy), _c(_U(rng, .06, .12, b)),
                                                      _c(_U(rng, .06, .12, b)), 0, px) * lung
    # mass: one large round opacity
    cx, cy, _ = _lung_pt(rng, b, lx, ly, rx, ry)
    r = _U(rng, .1, .18, b)
    add += on(4) * _c(_U(rng, .2, .4, b)) * _ellipse(x, y, _c(cx), _c(cy), _c(r), _c(r * _U(rng, .8, 1, b)), 0, .04)
    # nodule: 1-3 small round opacities
    for k in range(3):
        cx, cy, _ = _lung_pt(rng, b, lx, ly, rx, ry)
        keep = f[:, 5] * (rng.random(b) < (1.0, 0.5, 0.3)[k])
        s = _U(rng, .03, .05, b)
        add += _c(keep * _U(rng, .3, .6, b)) * _gauss(x, y, _c(cx), _c(cy), _c(s), _c(s), 0, px)
    # pneumonia: 1-3 patchy consolidations, mottled and crossed by air bronchograms (dark lines where a field
    # crosses zero), unlike the smooth, sharp-edged look-alikes of normal paediatric films (render_xray)
    cons = np.zeros_like(lung)
    for k in range(3):
        cx, cy, _ = _lung_pt(rng, b, lx, ly, rx, ry)
        keep = f[:, 6] * (rng.random(b) < (1.0, 0.5, 0.25)[k])
        cons += _c(keep * _U(rng, .4, .75, b)) * _gauss(x, y, _c(cx), _c(cy), _c(_U(rng, .12, .25, b)),
                                                        _c(_U(rng, .12, .25, b)), 0, px)
    mottle = 0.6 + 0.6 * np.clip(_field(rng, g, b, 2.5, 4.5, n=6), -1, 1)
    broncho = 1 - 0.7 * np.exp(-3 * np.abs(_field(rng, g, b, 1.5, 3.0, n=4)))
    add += cons * mottle * broncho * lung
    # pneumothorax: lucent rim without lung markings at the apex/lateral wall of one side
    side = np.where(rng.random(b) < 0.5, -1.0, 1.0).astype(F32)
    u = (x - _c(side * lx)) / _c(rx)
    v = (y - _c(ly)) / _c(ry)
    rim = _ramp(np.sqrt(u * u + v * v) - (1 - _c(_U(rng, .15, .35, b))), .1) * _ramp(u * _c(side) + .2 - v, .2)
    lm = np.where(_c(side) < 0, lungs[0], lungs[1])
    add -= on(7) * _c(_U(rng, .12, .25, b)) * rim * lm
    # consolidation: dense homogeneous opacity clipped to the lung
    cx, cy, _ = _lung_pt(rng, b, lx, ly, rx, ry)
    r = _U(rng, .1, .2, b)
    add += on(8) * _c(_U(rng, .3, .55, b)) * _ellipse(x, y, _c(cx), _c(cy), _c(r), _c(r * .8),
                                                      _c(_U(rng, 0, 3, b)), .06) * lung
    # edema: perihilar haze + short horizontal septal lines at the lung bases
    kerley = np.clip(np.cos(2 * np.pi * 12 * y + _c(_U(rng, 0, 6.3, b))) - 0.6, 0, None)
    base = _ramp(y - _c(ly + 0.3 * ry), 0.1)
    add += on(9) * _c(_U(rng, .1, .25, b)) * (hilum * 0.8 + kerley * base) * lung
    # (10 emphysema: bigger, darker lungs with fewer markings, in render_xray)
    # fibrosis: reticular network, lower/peripheral
    net = np.abs(_field(rng, g, b, 7.0, 12.0, n=8))
    add += on(11) * _c(_U(rng, .08, .2, b)) * net * lung * (0.4 + _ramp(y - _c(ly), .3))
    # pleural thickening: bright band along the lateral wall of one or both lungs
    for s, lm in zip((-1, 1), lungs):
        u = (x - _c(s * lx)) / _c(rx)
        v = (y - _c(ly)) / _c(ry)
        band = np.exp(-0.5 * ((np.sqrt(u * u + v * v) - 0.95) / 0.07) ** 2) * _ramp(u * s, .2)
        add += on(12) * _c(_U(rng, 0, .4, b)) * band
    # hernia: retrocardiac soft mass at the diaphragm with a gas bubble
    cx, cy = _U(rng, -.15, .15, b), ly + ry * _U(rng, .6, .85, b)
    r = _U(rng, .1, .15, b)
    sac = _ellipse(x, y, _c(cx), _c(cy), _c(r), _c(r * .8), 0, .04)
    gas = _gauss(x, y, _c(cx), _c(cy - r * .3), _c(r * .4), _c(r * .25), 0, px)
    add += on(13) * (_c(_U(rng, .2, .35, b)) * sac - 0.25 * gas)
    return add


# --------------------------------------------------------------------------------------------------------------
# Retinal OCT (octmnist): layered B-scan, log-normal speckle
# --------------------------------------------------------------------------------------------------------------

_OCT_STYLE = {
    "thick": (0.4, 0.6), "curv": (-0.35, 0.35), "refl": (0.6, 1.4, (6,)), "speckle": (0.2, 0.6),
    "gamma": (0.6, 1.5), "contrast": (0.8, 1.3), "bright": (-0.1, 0.1), "choroid_f": (3.0, 9.0),
    "noise": (0.01, 0.06), "pit": (0.0, 0.12), "soft": (1.0, 2.5), "choroid": (0.1, 0.3),
}
# inner retina layers as (start, end, reflectivity) in the relative depth d in [0, 1] between surface and RPE
_OCT_LAYERS = ((0.0, 0.12, 0.75), (0.12, 0.36, 0.42), (0.36, 0.46, 0.18), (0.46, 0.53, 0.5), (0.53, 0.86, 0.12),
               (0.88, 0.93, 0.65))


def render_oct(rng: np.random.Generator, labels: Array, st: Style, g: Grid) -> Array:
    """B-scan; class 0 CNV (RPE dome over hyper-reflective tissue), 1 DME (local thickening with dark cysts),
    2 drusen (2-5 small RPE bumps), 3 normal. Findings sit at a random lateral position, retina at a random depth."""
    b, lab = len(labels), labels[:, 0]
    x = g.x * np.where(rng.random(b) < 0.5, -1, 1).astype(F32)[:, None, None]  # random left/right eye
    y = g.y
    soft = F32(g.px) * _c(st["soft"])
    T0 = st["thick"] * _U(rng, 0.9, 1.1, b)
    y_bm = _c(_U(rng, 0.0, 0.6, b)) + _c(_U(rng, -0.25, 0.25, b)) * x + _c(st["curv"]) * x * x
    xf = _c(_U(rng, -0.45, 0.45, b))  # fovea, roughly centred as in clinical scans
    pit = np.exp(-(((x - xf) / 0.22) ** 2))
    xc = xf + _c(_U(rng, -0.35, 0.35, b))  # the finding: macular, at a random offset
    loc = lambda w: np.exp(-(((x - xc) / _c(w)) ** 2))  # noqa: E731
    cnv, dme, dru = (_c((lab == k).astype(F32)) for k in range(3))
    thick = _c(T0) * (1 - _c(st["pit"] / 0.3 + _U(rng, 0, 0.5, b)) * 0.5 * pit) * (1 + dme * _c(_U(rng, .3, .8, b))
                                                                                   * loc(_U(rng, .2, .4, b)))
    elev = cnv * _c(_U(rng, 0.15, 0.35, b)) * loc(_U(rng, 0.12, 0.25, b))
    n_dru = rng.integers(3, 7, b)
    for k in range(6):
        keep = (lab == 2) & (k < n_dru)
        xk = xf + _c(_U(rng, -0.6, 0.6, b))
        elev = elev + _c(keep * _U(rng, 0.06, 0.14, b)) * np.exp(-(((x - xk) / _c(_U(rng, .05, .1, b))) ** 2))
    y_rpe = y_bm - elev
    y_s = y_bm - thick
    d = (y - y_s) / (y_rpe - y_s)
    ds = soft / (y_rpe - y_s)
    refl = np.full((b, 1, 1), 0.02, F32) * np.ones_like(d)
    for (lo, hi, r), s in zip(_OCT_LAYERS, st["refl"].T):
        refl = refl + _c(r * s) * _ramp(np.minimum(d - lo, hi - d), ds)
    # DME cysts: dark ellipses in the nuclear layers near the finding
    cyst = np.zeros_like(d)
    n_cy = rng.integers(1, 5, b)
    for k in range(4):
        keep = (lab == 1) & (k < n_cy)
        cx = xc + _c(_U(rng, -.2, .2, b))
        dd = _U(rng, .2, .6, b)
        cy = y_s + _c(dd) * (y_rpe - y_s)
        cr = _U(rng, .05, .11, b)
        cyst = np.maximum(cyst, _c(keep) * _ellipse(x, y, cx, cy, _c(cr * 1.4), _c(cr), 0, soft))
    refl = refl * (1 - 0.9 * cyst)
    # RPE, tissue under elevated RPE (CNV: bright, drusen: medium), choroid
    rpe = np.exp(-0.5 * ((y - y_rpe) / 0.03) ** 2)
    under = _ramp(np.minimum(y - y_rpe, y_bm - y), soft) * (0.45 + 0.45 * cnv)
    fluid = cnv * _ramp(np.minimum(y - y_rpe + 0.12 * loc(0.15), y_rpe - y), soft)  # subretinal fluid over CNV
    refl = refl * (1 - 0.85 * fluid)
    chor = _ramp(y - y_bm, soft) * np.exp(-np.clip(y - y_bm, 0, None) / 0.3) * (
        _c(st["choroid"]) * (1 + 0.6 * _field(rng, g, b, st["choroid_f"], st["choroid_f"] * 1.5, n=6)))
    refl = refl + 0.95 * rpe + under + np.maximum(chor, 0)
    img = _speckle(rng, np.clip(refl, 0.01, None), st["speckle"])
    img = _tone(np.log1p(4 * img) / np.log(5.0), st["gamma"], st["contrast"], st["bright"])
    return _gnoise(rng, img, st["noise"])


# --------------------------------------------------------------------------------------------------------------
# Fundus photography (retinamnist): DR grade = graded lesion load
# --------------------------------------------------------------------------------------------------------------

_FUNDUS_STYLE = {
    "bg": (0.0, 1.0, (3,)), "tex_f": (2.0, 6.0), "tex": (0.02, 0.12), "vig": (0.2, 0.8), "fov": (0.85, 1.0),
    "disc": (0.0, 1.0, (3,)), "vessel_w": (0.015, 0.035), "vessel_d": (0.25, 0.6), "gamma": (0.7, 1.4),
    "noise": (0.01, 0.05), "sheen": (0.0, 0.15), "pigment": (0.0, 0.6),
}
# expected lesion counts per grade: microaneurysms, haemorrhages, exudates, cotton-wool spots, new vessels
_DR_LAMBDA = np.array([[0.5, 0.0, 0.2, 0.0, 0.0], [4.5, 1.5, 1.0, 0.0, 0.0], [8.0, 4.0, 3.0, 0.7, 0.0],
                       [12.0, 7.0, 5.0, 1.5, 0.15], [14.0, 9.0, 6.0, 2.5, 0.85]], F32)


def _spots(rng: np.random.Generator, g: Grid, count: Array, nmax: int, sigma: tuple[float, float],
           amp: tuple[float, float], min_aspect: float, radius: float = 0.75) -> Array:
    """Sum of ``count`` (<= nmax) Gaussian lesions per image, denser towards the posterior pole (image centre)."""
    b = len(count)
    out = np.zeros((b, g.size, g.size), F32)
    for k in range(nmax):
        cx, cy = _in_disc(rng, b, radius, power=1.0)
        s = _U(rng, *sigma, b)
        blob = _gauss(g.x, g.y, _c(cx), _c(cy), _c(s), _c(s * _U(rng, min_aspect, 1, b)), _c(_U(rng, 0, 3.1, b)), g.px)
        out += _c((k < count) * _U(rng, *amp, b)) * blob
    return out


def render_fundus(rng: np.random.Generator, labels: Array, st: Style, g: Grid) -> Array:
    """Colour fundus photo; the DR grade sets the expected number of each lesion type (ordinal, overlapping)."""
    b, lab = len(labels), labels[:, 0]
    px = g.px
    x, y = g.x, g.y
    bg = np.stack([0.65 + 0.2 * st["bg"][:, 0], 0.25 + 0.15 * st["bg"][:, 1], 0.08 + 0.1 * st["bg"][:, 2]], 1)
    tex = 1 + _c(st["tex"]) * _field(rng, g, b, st["tex_f"], st["tex_f"] * 2, n=8)
    side = np.where(rng.random(b) < 0.5, -1.0, 1.0).astype(F32)
    dx, dy = side * _U(rng, 0.35, 0.5, b), _U(rng, -0.12, 0.12, b)
    fov = _ellipse(x, y, 0, 0, _c(st["fov"]), _c(st["fov"]), 0, F32(px))
    illum = _vignette(g, b, st["fov"], st["vig"], _U(rng, -.2, .2, b), _U(rng, -.2, .2, b))
    # dark conc (red-free absorbers: vessels, haemorrhages) and bright additions (disc, exudates, cotton wool)
    dark = np.zeros((b, g.size, g.size), F32)
    macula = np.exp(-(((x - _c(dx - side * 0.9)) ** 2 + (y - _c(dy)) ** 2) / 0.03))
    dark += _c(st["pigment"]) * 0.6 * macula
    for c, w in ((_U(rng, 1.2, 2.5, b), 1.0), (_U(rng, 1.2, 2.5, b), 0.8), (_U(rng, 3, 6, b), 0.6)):
        t = -side[:, None, None]  # arcades bend temporally, towards the macula
        yy = y - _c(dy)
        dist = np.abs(x - _c(dx) - t * _c(c) * yy * yy) / np.sqrt(1 + (2 * _c(c) * yy) ** 2)
        dark += _c(st["vessel_d"]) * _gauss(dist, 0, 0, 0, _c(st["vessel_w"] * w), 1.0, 0, px)
    n = np.stack([_cnt(rng, _DR_LAMBDA[lab, k] * _U(rng, 0.8, 1.25, b), m) for k, m in enumerate((14, 10, 8, 3, 1))], 1)
    dark += _spots(rng, g, n[:, 0], 14, (.018, .03), (2.5, 4.0), 1.0)  # microaneurysms: tiny dark-red dots
    dark += _spots(rng, g, n[:, 1], 10, (.04, .09), (1.8, 3.0), 0.4)  # dot-blot and flame haemorrhages
    yellow = _spots(rng, g, n[:, 2], 8, (.02, .04), (1.2, 2.0), 1.0)  # hard exudates
    bright = _spots(rng, g, n[:, 3], 3, (.04, .07), (.5, .9), 0.7)  # cotton-wool spots
    # neovascularisation: tangled fine vessels at a random place
    cx, cy = _in_disc(rng, b, 0.6)
    nv = np.exp(-((x - _c(cx)) ** 2 + (y - _c(cy)) ** 2) / 0.03) * np.exp(
        -4 * np.abs(_field(rng, g, b, 8, 14, n=6)))
    dark += _c(n[:, 4] * _U(rng, .6, 1.2, b)) * nv
    disc = _ellipse(x, y, _c(dx), _c(dy), 0.12, 0.14, 0, F32(px) * 2)
    disc_col = np.stack([0.85 + 0.15 * st["disc"][:, 0], 0.6 + 0.3 * st["disc"][:, 1], 0.3 + 0.4 * st["disc"][:, 2]], 1)
    sheen = _c(st["sheen"]) * np.clip(_field(rng, g, b, 1.5, 3, n=4), 0, None)
    rgb = bg[:, None, None, :] * tex[..., None] * np.exp(-dark[..., None] * np.array([0.35, 1.0, 0.9], F32))
    rgb = rgb * (1 - disc[..., None]) + disc[..., None] * disc_col[:, None, None, :]
    rgb = rgb + yellow[..., None] * np.array([0.45, 0.4, 0.05], F32) + (bright + sheen)[..., None] * 0.6
    rgb = rgb * (illum * fov)[..., None]
    rgb = np.clip(rgb, 0, 1) ** _c(st["gamma"])[..., None]
    return _gnoise(rng, rgb, st["noise"])


# --------------------------------------------------------------------------------------------------------------
# Breast ultrasound (breastmnist): layered tissue, log-normal speckle, hypoechoic lesion
# --------------------------------------------------------------------------------------------------------------

_US_STYLE = {
    "skin": (-0.95, -0.75), "fat_d": (0.15, 0.45), "gland": (0.4, 0.9), "fat": (0.15, 0.4), "atten": (0.0, 0.8),
    "speckle": (0.2, 0.55), "grain_f": (6.0, 14.0), "gamma": (0.6, 1.5), "contrast": (0.8, 1.3),
    "bright": (-0.1, 0.1), "noise": (0.01, 0.05), "lesion_echo": (0.02, 0.25), "muscle": (0.3, 0.7),
}


def render_ultrasound(rng: np.random.Generator, labels: Array, st: Style, g: Grid) -> Array:
    """B-mode breast US; label 1 (malignant) = irregular/spiculated, taller-than-wide, shadowing lesion;
    label 0 = smooth oval wider-than-tall lesion with posterior enhancement, or no lesion (a quarter)."""
    b, lab = len(labels), labels[:, 0].astype(F32)
    x, y = g.x, g.y
    soft = F32(g.px)
    wav = _field(rng, g, b, 1.0, 2.5, n=4)
    top = _c(st["skin"])
    fat_end = top + _c(st["fat_d"]) + 0.1 * wav
    gland_end = fat_end + _c(_U(rng, 0.5, 1.0, b)) + 0.15 * wav
    echo = 0.05 + 0.9 * _ramp(np.minimum(y - top, top + 0.05 - y), soft)  # skin line
    echo = echo + _c(st["fat"]) * _ramp(np.minimum(y - top - 0.05, fat_end - y), 0.05)
    lob = np.clip(_field(rng, g, b, 2.5, 5.0, n=6), -1, 1)
    echo = echo + _c(st["gland"]) * (0.8 + 0.3 * lob) * _ramp(np.minimum(y - fat_end, gland_end - y), 0.08)
    echo = echo + _c(st["muscle"]) * (0.7 + 0.3 * np.cos(25 * (y + 0.1 * x))) * _ramp(y - gland_end, 0.05)
    # lesion: centre random, shape/orientation/margin graded by malignancy; benign quarter without lesion
    has = np.where(lab > 0, 1.0, (rng.random(b) > 0.25)).astype(F32)
    cx, cy = _U(rng, -0.65, 0.65, b), _U(rng, -0.45, 0.5, b)
    r0 = _U(rng, 0.18, 0.38, b)
    m = np.clip(lab * _U(rng, 0.35, 1.0, b) + (1 - lab) * _U(rng, 0.0, 0.55, b), 0, 1)  # malignancy score
    aspect = 1.6 - 0.9 * m + _U(rng, -0.15, 0.15, b)  # width/height
    amps = [_c(m * _U(rng, 0, 0.3, b) + 0.03) for _ in range(5)]  # harmonics 2..6: margin irregularity
    amps += [_c(m * _U(rng, 0, 0.16, b)) for _ in range(4)]  # harmonics 7..10: spiculation
    ph = [_c(_U(rng, 0, 6.3, b)) for _ in amps]
    les = _star(x, y, _c(cx), _c(cy), _c(r0), _c(_U(rng, -.3, .3, b)), amps, ph, _c(aspect), soft * 1.5)
    les = les * _c(has)
    # posterior shadow/enhancement: a column under the lesion that fades within a few lesion heights (local)
    below = _ramp(y - _c(cy), 0.05) * np.exp(-0.5 * ((x - _c(cx)) / _c(r0 * 0.8)) ** 2) * np.exp(
        -np.clip(y - _c(cy), 0, None) / _c(2.5 * r0))
    post = _c(has * (0.5 - m) * _U(rng, 0.6, 1.4, b)) * below  # enhancement (benign) vs shadow (malignant)
    echo = echo * (1 + post) * (1 - les) + les * _c(st["lesion_echo"]) * (1 + 0.5 * _c(m) * lob)
    echo = echo * np.exp(-_c(st["atten"]) * (y + 1) / 2)
    img = _speckle(rng, np.clip(echo, 0.01, None), st["speckle"])
    img = img * (1 + 0.25 * _field(rng, g, b, st["grain_f"], st["grain_f"] * 1.5, n=8))  # coarse speckle grain
    img = _tone(np.log1p(3 * np.clip(img, 0, None)) / np.log(4.0), st["gamma"], st["contrast"], st["bright"])
    return _gnoise(rng, img, st["noise"])


# --------------------------------------------------------------------------------------------------------------
# Blood smear (bloodmnist): one leukocyte (or platelets) among red cells, Romanowsky stain colours
# --------------------------------------------------------------------------------------------------------------

_BLOOD_STYLE = {
    "rbc_od": (-0.15, 0.15, (3,)), "nuc_od": (-0.25, 0.25, (3,)), "cyto_od": (-0.15, 0.15, (3,)),
    "stain": (0.7, 1.5), "plasma": (0.0, 0.15, (3,)), "soft": (1.0, 3.0), "rbc_n": (2.0, 9.0),
    "gran_f": (10.0, 20.0), "noise": (0.01, 0.05), "gamma": (0.7, 1.3), "scale": (0.85, 1.15),
}
_RBC_OD = np.array([0.1, 0.6, 0.45], F32)
_NUC_OD = np.array([0.8, 1.2, 0.4], F32)
_CYTO_OD = np.array([0.45, 0.3, 0.1], F32)
_EOS_OD = np.array([0.1, 0.7, 0.9], F32)
# basophil, eosinophil, erythroblast, immature granulocyte, lymphocyte, monocyte, neutrophil, platelet
_BLOOD_TABLE = {
    "cell_r": [(.28, .36), (.3, .38), (.18, .26), (.34, .44), (.2, .28), (.34, .44), (.3, .38), (0, 0)],
    "nuc_frac": [(.5, .65), (.4, .55), (.5, .7), (.6, .75), (.72, .88), (.55, .7), (.3, .42), (0, 0)],
    "lobes": [(1.5, 2.5), (1.6, 2.4), (1, 1), (1, 1), (1, 1), (1, 1), (2.6, 5.4), (0, 0)],
    "spread": [(.2, .35), (.35, .5), (0, 0), (0, .1), (0, .08), (0, .15), (.4, .6), (0, 0)],
    "indent": [(0, .3), (0, .2), (0, .1), (.2, .5), (0, .15), (.5, .8), (0, .2), (0, 0)],
    "nuc_dark": [(.7, 1.0), (.6, .9), (1.0, 1.4), (.5, .8), (.9, 1.3), (.6, .9), (.7, 1.1), (0, 0)],
    "cyto_blue": [(.2, .5), (.05, .2), (.3, .7), (.3, .6), (.4, .8), (.35, .65), (.05, .2), (0, 0)],
    "gran_dark": [(.5, 1.0), (0, .1), (0, .05), (0, .3), (0, .05), (0, .1), (0, .15), (0, 0)],
    "gran_eos": [(0, .1), (.6, 1.0), (0, .05), (0, .2), (0, .05), (0, .05), (.05, .25), (0, 0)],
    "platelets": [(0, .6), (0, .6), (0, .6), (0, .6), (0, .6), (0, .6), (0, .6), (2, 6)],
}


def render_blood(rng: np.random.Generator, labels: Array, st: Style, g: Grid) -> Array:
    """Smear tile; the class sets the leukocyte size, nucleus lobes/indentation/density, cytoplasm colour and
    granules (platelet class: no leukocyte, a clump of platelets). Cell at a random place."""
    b, lab = len(labels), labels[:, 0]
    p = _class_params(rng, _BLOOD_TABLE, lab)
    soft = F32(g.px) * _c(st["soft"])
    x, y = g.x, g.y
    # red cells with central pallor
    rbc = np.zeros((b, g.size, g.size), F32)
    nr = np.round(st["rbc_n"] * _U(rng, 0.6, 1.3, b))
    for k in range(11):
        cx, cy = _U(rng, -1.1, 1.1, b), _U(rng, -1.1, 1.1, b)
        r = _U(rng, .17, .24, b) * st["scale"]
        disc = _ellipse(x, y, _c(cx), _c(cy), _c(r), _c(r * _U(rng, .85, 1, b)), _c(_U(rng, 0, 3, b)), soft)
        pallor = 1 - 0.55 * np.exp(-((x - _c(cx)) ** 2 + (y - _c(cy)) ** 2) / _c((r * 0.5) ** 2))
        rbc = np.maximum(rbc, _c(k < nr) * disc * pallor)
    # leukocyte
    cx, cy = _U(rng, -0.5, 0.5, b), _U(rng, -0.5, 0.5, b)  # the leukocyte is not centred by the crop
    wbc = (lab != 7).astype(F32)  # the platelet class has no leukocyte
    R = np.where(wbc > 0, p["cell_r"], 0.2) * st["scale"] * _U(rng, 0.85, 1.2, b)  # per-image magnification
    p["nuc_frac"] = np.where(wbc > 0, p["nuc_frac"], 0.5)
    cyto = _c(wbc) * _ellipse(x, y, _c(cx), _c(cy), _c(R), _c(R * _U(rng, .85, 1, b)), 0, soft)
    nl = np.round(p["lobes"]).astype(int)
    t0 = _U(rng, 0, 2 * np.pi, b)
    nuc = np.zeros_like(cyto)
    for k in range(5):
        t = t0 + k * 2 * np.pi / np.maximum(nl, 1) * 0.6  # lobes on an arc, joined by their overlap
        rl = R * p["nuc_frac"] / np.sqrt(np.maximum(nl, 1)) * 1.15
        lx = cx + R * p["spread"] * np.cos(t)
        ly = cy + R * p["spread"] * np.sin(t)
        lobe = _ellipse(x, y, _c(lx), _c(ly), _c(rl), _c(rl * _U(rng, .75, 1, b)), _c(t), soft)
        nuc = np.maximum(nuc, _c(k < nl) * lobe)
    ix, iy = cx + R * p["nuc_frac"] * 0.95 * np.cos(t0 + np.pi), cy + R * p["nuc_frac"] * 0.95 * np.sin(t0 + np.pi)
    ir = R * p["nuc_frac"] * p["indent"]
    nuc = nuc * (1 - _ellipse(x, y, _c(ix), _c(iy), _c(ir + 1e-3), _c(ir + 1e-3), 0, soft))
    gran = np.clip(_field(rng, g, b, st["gran_f"], st["gran_f"] * 1.4, n=8) - 0.5, 0, None) * cyto
    # platelets: small purple fragments clustered at a random place
    pcx, pcy = _U(rng, -.6, .6, b), _U(rng, -.6, .6, b)
    plate = np.zeros_like(cyto)
    npl = np.round(p["platelets"])
    for k in range(6):
        r = _U(rng, .035, .07, b)
        qx, qy = pcx + _U(rng, -.2, .2, b), pcy + _U(rng, -.2, .2, b)
        plate = np.maximum(plate, _c(k < npl) * _ellipse(x, y, _c(qx), _c(qy), _c(r), _c(r * .7), 0, soft))
    nuc_c = _c(p["nuc_dark"]) * nuc * (1 + 0.2 * _c(p["cyto_blue"]) * gran) + 0.8 * plate + _c(p["gran_dark"]) * gran
    cyto_c = _c(p["cyto_blue"]) * cyto * (1 - nuc)
    eos_c = _c(p["gran_eos"]) * (gran * 1.5 + 0.3 * cyto) * (1 - nuc)
    rbc_c = rbc * (1 - cyto)
    sv = st["stain"][:, None]
    rgb = _absorb([rbc_c, nuc_c, cyto_c, eos_c, np.ones_like(rbc)],
                  [(_RBC_OD + st["rbc_od"]).clip(0.02) * sv, (_NUC_OD + st["nuc_od"]).clip(0.05) * sv,
                   (_CYTO_OD + st["cyto_od"]).clip(0.02) * sv, _EOS_OD * sv, st["plasma"]])
    rgb = np.clip(rgb, 0, 1) ** _c(st["gamma"])[..., None]
    return _gnoise(rng, rgb, st["noise"])


# --------------------------------------------------------------------------------------------------------------
# Kidney-cell fluorescence microscopy (tissuemnist): grayscale max projection, Poisson-Gaussian camera
# --------------------------------------------------------------------------------------------------------------

_MICRO_STYLE = {
    "bg": (0.0, 0.15), "gain": (0.6, 1.4), "photons": (20.0, 300.0), "read": (0.01, 0.05), "blur": (1.0, 4.0),
    "haze": (0.0, 0.2), "gamma": (0.6, 1.5), "punct_f": (6.0, 14.0), "scale": (0.8, 1.25),
}
# collecting duct, distal convoluted tubule, glomerular endothelium, interstitial endothelium, leukocyte,
# podocyte, proximal tubule, thick ascending limb. arrangement: 0 ring (tubule), 1 cluster, 2 single, 3 rows
_MICRO_TABLE = {
    "arr": [(0, 0), (0, 0), (1, 1), (2, 2), (2, 2), (1, 1), (0, 0), (3, 3)],
    "n": [(5, 8), (4, 7), (6, 10), (1, 2), (1, 3), (2, 4), (5, 8), (4, 8)],
    "r": [(.1, .14), (.09, .13), (.06, .09), (.07, .11), (.07, .1), (.12, .17), (.13, .18), (.09, .13)],
    "aspect": [(1, 1.5), (1, 1.6), (1.8, 3), (3, 5), (1, 1.2), (1, 1.4), (1, 1.4), (1.8, 3)],
    "bright": [(.4, .7), (.6, .9), (.4, .7), (.3, .6), (.7, 1), (.6, .9), (.5, .8), (.4, .7)],
    "punct": [(0, .3), (0, .3), (0, .2), (0, .2), (0, .1), (.1, .4), (.4, .8), (.1, .3)],
    "arms": [(0, .1), (0, .1), (0, .1), (0, .1), (0, .05), (.3, .5), (0, .1), (0, .1)],
    "ring_r": [(.35, .5), (.25, .38), (.2, .35), (0, .3), (0, .2), (.1, .3), (.4, .55), (.2, .4)],
    "hole": [(.3, .6), (.3, .6), (0, .2), (0, .2), (.5, .8), (0, .3), (.2, .5), (.2, .5)],
}


def render_microscopy(rng: np.random.Generator, labels: Array, st: Style, g: Grid) -> Array:
    """Fluorescent kidney cells; the class sets arrangement (tubule ring, tuft cluster, single, parallel rows),
    cell size/elongation/brightness, punctate texture, star-shaped processes and nuclear hole."""
    b, lab = len(labels), labels[:, 0]
    p = _class_params(rng, _MICRO_TABLE, lab)
    arr = np.round(p["arr"]).astype(int)
    soft = F32(g.px) * _c(st["blur"])[:, None]
    cx, cy = _U(rng, -0.55, 0.55, b), _U(rng, -0.55, 0.55, b)  # the cell group anywhere in the field
    nmax = 10
    k = np.arange(nmax)[None, :]
    t = _U(rng, 0, 2 * np.pi, b)[:, None] + 2 * np.pi * k / np.maximum(np.round(p["n"]), 1)[:, None]
    ring_x, ring_y = cx[:, None] + p["ring_r"][:, None] * np.cos(t), cy[:, None] + p["ring_r"][:, None] * np.sin(t)
    cl_x, cl_y = cx[:, None] + 0.2 * rng.standard_normal((b, nmax), F32), cy[:, None] + 0.2 * rng.standard_normal(
        (b, nmax), F32)
    th = _U(rng, 0, np.pi, b)[:, None]
    s = (k - 3.5) * 0.22
    row_x = cx[:, None] + s * np.cos(th) + 0.25 * (k % 2) * np.sin(th)
    row_y = cy[:, None] + s * np.sin(th) - 0.25 * (k % 2) * np.cos(th)
    sing_x, sing_y = cx[:, None] + _U(rng, -.6, .6, (b, nmax)), cy[:, None] + _U(rng, -.6, .6, (b, nmax))
    px_ = np.select([arr[:, None] == 0, arr[:, None] == 1, arr[:, None] == 2], [ring_x, cl_x, sing_x], row_x)
    py_ = np.select([arr[:, None] == 0, arr[:, None] == 1, arr[:, None] == 2], [ring_y, cl_y, sing_y], row_y)
    ang = np.where(arr[:, None] == 0, t, np.where(arr[:, None] == 3, th, _U(rng, 0, np.pi, (b, nmax))))
    r = p["r"][:, None] * st["scale"][:, None] * _U(rng, 0.8, 1.2, (b, nmax))
    asp = p["aspect"][:, None] * _U(rng, 0.85, 1.15, (b, nmax))
    arms = _c(p["arms"][:, None] * _U(rng, .5, 1, (b, nmax)))
    ph = _c(_U(rng, 0, 6.3, (b, nmax)))
    u, v = _rot(g.x[None], g.y[None], _c(px_), _c(py_), _c(ang))
    u = u / _c(np.sqrt(asp))
    v = v * _c(np.sqrt(asp))
    rr = np.sqrt(u * u + v * v)
    tt = np.arctan2(v, u)
    rb = _c(r) * (1 + arms * np.cos(4 * tt + ph))  # podocyte foot processes: four arms
    body = _ramp(rb - rr, soft)
    nuc = _ramp(_c(r * p["hole"][:, None] * 0.6) - rr, soft)
    on = _active(p["n"], nmax) * _U(rng, 0.7, 1.2, (b, nmax))
    cells = (_c(on) * body * (1 - 0.7 * nuc)).max(1)
    punct = np.clip(_field(rng, g, b, st["punct_f"], st["punct_f"] * 1.5, n=8), 0, None)
    sig = _c(p["bright"] * st["gain"]) * cells * (1 + _c(p["punct"]) * (punct - 0.5))
    sig = sig + _c(st["bg"]) + _c(st["haze"]) * np.clip(0.5 + 0.5 * _field(rng, g, b, 0.5, 1.5, n=4), 0, None)
    lam = _c(st["photons"]) * np.clip(sig, 0, None)
    img = rng.poisson(lam).astype(F32) / _c(st["photons"])
    img = np.clip(_gnoise(rng, img, st["read"]), 0, 1) ** _c(st["gamma"])
    return img


# --------------------------------------------------------------------------------------------------------------
# Abdominal CT (organamnist / organcmnist / organsmnist): slices of a 3-D ellipsoid phantom
# --------------------------------------------------------------------------------------------------------------

ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
          "lung-right", "pancreas", "spleen")
# structures in paint order: name, centre (x: patient left +, y: posterior +, z: superior +), radii, value.
_CT_STRUCTS = (
    ("fat", (0, 0.05, 0), (0.95, 0.68, 9), 0.28),
    ("muscle", (0, 0.05, 0), (0.85, 0.6, 9), 0.48),
    ("lung-right", (-0.42, 0.05, 0.62), (0.33, 0.45, 0.38), 0.03),
    ("lung-left", (0.42, 0.05, 0.62), (0.3, 0.45, 0.38), 0.03),
    ("heart", (0.1, -0.15, 0.45), (0.28, 0.26, 0.2), 0.62),
    ("liver", (-0.35, 0.0, 0.15), (0.42, 0.42, 0.25), 0.57),
    ("spleen", (0.55, 0.25, 0.15), (0.15, 0.2, 0.15), 0.6),
    ("stomach", (0.3, -0.12, 0.22), (0.22, 0.16, 0.12), 0.45),
    ("kidney-right", (-0.35, 0.35, -0.05), (0.12, 0.16, 0.2), 0.66),
    ("kidney-left", (0.35, 0.35, 0.0), (0.12, 0.16, 0.2), 0.66),
    ("pancreas", (0.1, 0.12, 0.0), (0.32, 0.08, 0.07), 0.54),
    ("bladder", (0.0, -0.25, -0.72), (0.2, 0.18, 0.15), 0.4),
    ("iliac-right", (-0.6, 0.25, -0.5), (0.12, 0.32, 0.2), 0.9),
    ("iliac-left", (0.6, 0.25, -0.5), (0.12, 0.32, 0.2), 0.9),
    ("femur-right", (-0.5, 0.0, -0.88), (0.12, 0.12, 0.28), 0.95),
    ("femur-left", (0.5, 0.0, -0.88), (0.12, 0.12, 0.28), 0.95),
    ("aorta", (0.05, 0.3, 0.1), (0.05, 0.05, 0.65), 0.72),
    ("spine", (0.0, 0.47, 0.0), (0.09, 0.08, 9), 0.92),
)
_CT_NAMES = tuple(s[0] for s in _CT_STRUCTS)
_CT_C = np.array([s[1] for s in _CT_STRUCTS], F32)
_CT_R = np.array([s[2] for s in _CT_STRUCTS], F32)
_CT_V = np.array([s[3] for s in _CT_STRUCTS], F32)
_ORGAN_IDX = np.array([_CT_NAMES.index(o) for o in ORGANS])
_CT_STYLE = {
    "c_jit": (-0.1, 0.1, (len(_CT_STRUCTS), 3)), "r_jit": (0.75, 1.25, (len(_CT_STRUCTS), 3)),
    "v_jit": (-0.12, 0.12, (len(_CT_STRUCTS),)), "level": (0.35, 0.6), "width": (0.6, 1.6), "noise": (0.04, 0.18),
    "gamma": (0.75, 1.35), "gas": (0.0, 0.6), "tex": (0.0, 0.06), "body": (0.85, 1.15),
}
_VIEW_AXES = {"axial": (2, 0, 1, 1.0), "coronal": (1, 0, 2, -1.0), "sagittal": (0, 1, 2, -1.0)}


def render_ct(rng: np.random.Generator, labels: Array, st: Style, g: Grid, view: str = "axial") -> Array:
    """CT crop centred (with jitter) on the labelled organ, in the given view; the style is the patient template
    (organ positions/sizes/densities) plus window and noise. Left/right pairs need the surrounding context."""
    b, lab = len(labels), labels[:, 0]
    n_ax, a1, a2, sgn = _VIEW_AXES[view]
    C = _CT_C[None] + st["c_jit"]
    R = _CT_R[None] * st["r_jit"]
    R[:, :2, :2] *= st["body"][:, None, None]
    V = _CT_V[None] + st["v_jit"]
    oi = _ORGAN_IDX[lab]
    c_t, r_t = C[np.arange(b), oi], R[np.arange(b), oi]
    centre = c_t + r_t * _U(rng, -0.8, 0.8, (b, 3))
    hw = np.clip(_U(rng, 1.2, 3.0, b) * np.maximum(r_t[:, a1], r_t[:, a2]), 0.22, 0.9)
    ang = _U(rng, -0.5, 0.5, b)
    u, v = _rot(g.x, g.y, 0, 0, _c(ang))
    P = [np.broadcast_to(_c(centre[:, i]), u.shape).copy() for i in range(3)]
    P[a1] = P[a1] + _c(hw) * u
    P[a2] = P[a2] + _c(hw) * v * sgn
    soft = F32(g.px) * _c(hw)
    img = np.zeros_like(u)
    gas_f = _field3(rng, P, b, 5.0, 9.0)
    for s, name in enumerate(_CT_NAMES):
        q = sum(((P[i] - _c(C[:, s, i])) / _c(R[:, s, i])) ** 2 for i in range(3))
        rad = np.sqrt(q)
        m = _ramp((1 - rad) * _c(np.min(R[:, s], axis=1)), soft * 1.5)
        val = _c(V[:, s])
        if name in ("femur-right", "femur-left", "iliac-right", "iliac-left", "spine"):
            val = val - 0.35 * _ramp(0.7 - rad, 0.05)  # marrow inside a cortical shell
        elif name.startswith("kidney"):
            val = val - 0.15 * _ramp(0.55 - rad, 0.05)  # medulla darker than cortex
        elif name.startswith("lung"):
            val = val + 0.08 * np.clip(gas_f, 0, None) ** 3  # vessels
        elif name == "muscle":  # bowel gas in the abdomen
            abd = _ramp(-0.05 - P[2], 0.1) * _ramp(P[2] + 0.65, 0.1)
            val = val - 0.45 * abd * _c(st["gas"]) * _ramp(gas_f - 1.0, 0.3)
        img = img * (1 - m) + m * val
    img = img * (1 + _c(st["tex"]) * _field3(rng, P, b, 2.0, 4.0))
    img = (img - _c(st["level"])) / _c(st["width"]) + 0.5
    img = np.clip(img, 0, 1) ** _c(st["gamma"])
    return _gnoise(rng, img, st["noise"])


def _field3(rng: np.random.Generator, P: list[Array], b: int, fmin: float, fmax: float, n: int = 6) -> Array:
    """Unit-variance random Fourier texture in 3-D body coordinates (consistent across views)."""
    d = rng.standard_normal((b, n, 3)).astype(F32)
    d /= np.linalg.norm(d, axis=2, keepdims=True)
    k = 2 * np.pi * _U(rng, fmin, fmax, (b, n))[..., None] * d
    ph = _U(rng, 0, 2 * np.pi, (b, n))
    out = np.zeros_like(P[0])
    for j in range(n):
        out += np.cos(sum(_c(k[:, j, i]) * P[i] for i in range(3)) + _c(ph[:, j]))
    return out * np.sqrt(2.0 / n)


# --------------------------------------------------------------------------------------------------------------
# Dermoscopy (dermamnist): pigmented/vascular lesion on skin, dermoscope vignette, hairs
# --------------------------------------------------------------------------------------------------------------

_DERM_STYLE = {
    "skin_mel": (0.05, 0.6), "skin_hb": (0.05, 0.35), "wb": (0.85, 1.15, (3,)), "fov": (0.9, 1.6),
    "vig": (0.1, 0.6), "hair": (0.0, 3.0), "tex_f": (4.0, 10.0), "noise": (0.01, 0.04), "gamma": (0.75, 1.3),
    "mel_od": (-0.1, 0.1, (3,)), "scale": (0.8, 1.2),
}
_MEL_OD = np.array([0.45, 0.75, 1.0], F32)
_HB_OD = np.array([0.1, 0.9, 0.6], F32)
_BLUE_OD = np.array([0.7, 0.45, 0.3], F32)
# actinic keratosis, basal cell carcinoma, benign keratosis, dermatofibroma, melanoma, nevus, vascular
_DERM_TABLE = {
    "radius": [(.3, .55), (.3, .55), (.3, .6), (.25, .45), (.35, .65), (.3, .55), (.25, .5)],
    "irreg": [(.05, .15), (.05, .2), (0, .12), (0, .08), (.12, .3), (0, .08), (0, .08)],
    "mel": [(0, .5), (0, .5), (.35, 1.0), (.2, .6), (.5, 1.2), (.45, 1.1), (0, .3)],
    "variegation": [(0, .3), (0, .3), (.1, .4), (0, .2), (.4, .8), (0, .2), (0, .2)],
    "network": [(0, .1), (0, .05), (0, .15), (.3, .6), (.2, .5), (.3, .6), (0, .05)],
    "blue": [(0, .1), (.2, .6), (0, .15), (0, .1), (.2, .6), (0, .1), (.2, .5)],
    "hb": [(.4, .8), (.3, .6), (0, .2), (.1, .3), (0, .3), (0, .2), (.7, 1.2)],
    "vessels": [(0, .2), (.4, .8), (0, .1), (0, .1), (0, .3), (0, .05), (0, .1)],
    "lacunae": [(0, 0), (0, 0), (0, 0), (0, 0), (0, 0), (0, 0), (3, 7)],
    "white": [(.2, .5), (0, .3), (0, .2), (.4, .7), (0, .3), (0, .05), (0, .1)],
    "dots": [(0, 2), (0, 3), (2, 6), (0, 1), (2, 8), (0, 3), (0, 1)],
}


def render_dermoscopy(rng: np.random.Generator, labels: Array, st: Style, g: Grid) -> Array:
    """Dermoscopy tile; the class sets lesion size, border irregularity, pigment amount/variegation, pigment
    network, blue-grey areas, redness, arborising vessels, red lacunae, white scar area and dots/globules."""
    b, lab = len(labels), labels[:, 0]
    p = _class_params(rng, _DERM_TABLE, lab)
    x, y, px = g.x, g.y, g.px
    cx, cy = _U(rng, -0.4, 0.4, b), _U(rng, -0.4, 0.4, b)  # framing varies: the lesion is rarely centred
    R = p["radius"] * st["scale"] * _U(rng, 0.8, 1.25, b)  # dermoscope magnification per image
    amps = [_c(p["irreg"] * _U(rng, 0.3, 1.0, b)) for _ in range(6)]
    ph = [_c(_U(rng, 0, 6.3, b)) for _ in amps]
    les = _star(x, y, _c(cx), _c(cy), _c(R), _c(_U(rng, 0, 3.1, b)), amps, ph, _c(_U(rng, .8, 1.2, b)), F32(px) * 2)
    core = np.exp(-((x - _c(cx)) ** 2 + (y - _c(cy)) ** 2) / _c((R * 0.6) ** 2))
    low = _field(rng, g, b, 1.5, 4.0, n=6)
    net = np.abs(_field(rng, g, b, 7.0, 11.0, n=6))  # reticular lines where the field crosses zero
    mel = les * (_c(p["mel"]) * (1 + _c(p["variegation"]) * low) * (0.7 + 0.3 * core) + _c(p["network"]) * (
        1 - np.clip(net, 0, 1)))
    dots = np.zeros_like(les)
    nd = np.round(p["dots"])
    for k in range(8):
        dx, dy = _in_disc(rng, b, R * 0.9)
        s = _U(rng, .02, .04, b)
        dots += _c((k < nd) * _U(rng, .8, 1.6, b)) * _gauss(x, y, _c(cx + dx), _c(cy + dy), _c(s), _c(s), 0, px)
    mel = mel + dots * les
    bx, by = _in_disc(rng, b, R * 0.5)
    blue = _c(p["blue"]) * les * np.exp(-((x - _c(cx + bx)) ** 2 + (y - _c(cy + by)) ** 2) / _c((R * 0.45) ** 2))
    vess = np.exp(-3 * np.abs(_field(rng, g, b, 4.0, 8.0, n=5))) * les
    lac = np.zeros_like(les)
    nl = np.round(p["lacunae"])
    for k in range(7):
        dx, dy = _in_disc(rng, b, R * 0.8)
        s = _U(rng, .04, .08, b)
        lac = np.maximum(lac, _c(k < nl) * _ellipse(x, y, _c(cx + dx), _c(cy + dy), _c(s), _c(s), 0, F32(px)))
    hb = _c(p["hb"]) * les * (0.6 + 0.4 * low) + _c(p["vessels"]) * 1.5 * vess + 1.2 * lac
    white = _c(p["white"]) * les * core
    # skin with furrows; hairs as dark curved lines
    furrow = 0.1 * np.abs(_field(rng, g, b, st["tex_f"], st["tex_f"] * 1.5, n=6))
    hair = np.zeros_like(les)
    nh = _cnt(rng, st["hair"], 6)
    for k in range(6):
        t = _U(rng, 0, np.pi, b)
        off, curv = _U(rng, -0.9, 0.9, b), _U(rng, -0.6, 0.6, b)
        along = np.cos(_c(t)) * x + np.sin(_c(t)) * y
        dist = np.abs(-np.sin(_c(t)) * x + np.cos(_c(t)) * y - _c(off) - _c(curv) * along ** 2)
        hair = np.maximum(hair, _c(k < nh) * _gauss(dist, 0, 0, 0, 0.012, 1.0, 0, px))
    skin_mel = _c(st["skin_mel"]) * (1 + furrow)
    rgb = _absorb([skin_mel + mel, _c(st["skin_hb"]) + hb, blue, 1.5 * hair],
                  [(_MEL_OD + st["mel_od"]) * np.ones((b, 1), F32), np.tile(_HB_OD, (b, 1)),
                   np.tile(_BLUE_OD, (b, 1)), np.tile(_MEL_OD * 1.5, (b, 1))])
    rgb = rgb + white[..., None] * (1 - rgb) * 0.8
    rgb = rgb * st["wb"][:, None, None, :]
    fov = _ellipse(x, y, 0, 0, _c(st["fov"]), _c(st["fov"]), 0, F32(0.1))
    rgb = rgb * (_vignette(g, b, st["fov"], st["vig"]) * fov)[..., None]
    rgb = np.clip(rgb, 0, 1) ** _c(st["gamma"])[..., None]
    return _gnoise(rng, rgb, st["noise"])


# --------------------------------------------------------------------------------------------------------------
# Task registry, labels and the public API
# --------------------------------------------------------------------------------------------------------------

Renderer = Callable[..., Array]


@dataclass(frozen=True)
class _Family:
    """One image family of a modality: renderer and the style-bank spec."""

    render: Renderer
    style: dict


_FAMILIES: dict[str, _Family] = {
    "histology": _Family(render_histology, _HISTO_STYLE),
    "xray": _Family(render_xray, _XRAY_STYLE),
    "dermoscopy": _Family(render_dermoscopy, _DERM_STYLE),
    "oct": _Family(render_oct, _OCT_STYLE),
    "fundus": _Family(render_fundus, _FUNDUS_STYLE),
    "ultrasound": _Family(render_ultrasound, _US_STYLE),
    "blood": _Family(render_blood, _BLOOD_STYLE),
    "microscopy": _Family(render_microscopy, _MICRO_STYLE),
    "ct": _Family(render_ct, _CT_STYLE),
}
_TASK_KWARGS: dict[str, dict] = {
    "chestmnist": {"mode": "chest"}, "pneumoniamnist": {"mode": "pneumonia"},
    "organamnist": {"view": "axial"}, "organcmnist": {"view": "coronal"}, "organsmnist": {"view": "sagittal"},
}


@lru_cache(maxsize=None)
def style_bank(modality: str) -> Style:
    """All ``N_STYLES`` styles of a modality (parameters fixed by (modality, style id); read-only arrays)."""
    bank = _bank(modality, _FAMILIES[modality].style)
    for a in bank.values():
        a.flags.writeable = False
    return bank


def _labels(rng: np.random.Generator, flag: str, n: int) -> Array:
    """Balanced class labels (round robin, shuffled) or exact-prevalence multi-labels for ChestMNIST."""
    info = TASKS[flag]
    if info.task == MULTI_LABEL:
        return _multilabel(rng, n, CHEST_PREVALENCE)
    return rng.permutation(np.arange(n) % info.n_labels).astype(np.int64)[:, None]


def _render(flag: str, labels: Array, styles: Array, size: int, seed: int, *keys: int | str) -> Array:
    """Render in chunks of ``CHUNK`` images, each chunk with its own stream; returns uint8 images."""
    info = TASKS[flag]
    fam = _FAMILIES[info.modality]
    bank = style_bank(info.modality)
    g = Grid(size)
    shape = (len(labels), size, size) + ((3,) if info.n_channels == 3 else ())
    out = np.empty(shape, np.uint8)
    step = _chunk(size)
    for i, s in enumerate(range(0, len(labels), step)):
        sl = slice(s, s + step)
        st = {k: v[styles[sl]] for k, v in bank.items()}
        img = fam.render(_rng(seed, *keys, "chunk", i), labels[sl], st, g, **_TASK_KWARGS.get(flag, {}))
        out[sl] = _to_uint8(img)
    return out


def _chunk(size: int) -> int:
    """Images per call: ``CHUNK`` at 28 px, scaled by pixel count (a function of size only: determinism)."""
    return max(8, int(CHUNK * (28 / size) ** 2))


def _to_uint8(img: Array) -> Array:
    return np.clip(np.floor(img * 255 + 0.5), 0, 255).astype(np.uint8)


def generate_split(flag: str, n: int, split: str, size: int = 28, seed: int = 0) -> tuple[Array, Array, Array]:
    """One split of a task: (uint8 images, int64 labels, style ids); eval styles follow the flatter law."""
    if flag not in TASKS:
        raise KeyError(f"unknown task {flag!r}; known tasks: {', '.join(TASKS)}")
    if n < 1:
        raise ValueError(f"{flag} {split}: need at least one image, got n={n}")
    rng = _rng(seed, "task", flag, split, "plan")
    labels = _labels(rng, flag, n)
    styles = sample_styles(rng, n, EVAL_STYLE_EXPONENT)
    return _render(flag, labels, styles, size, seed, "task", flag, split), labels, styles


def generate_task(flag: str, n_train: int, n_val: int, n_test: int, size: int = 28, seed: int = 0) -> dict[str, Array]:
    """One evaluation task in the exact MedMNIST npz layout (keys ``{train,val,test}_{images,labels}``)."""
    data = {}
    for split, n in zip(SPLITS, (n_train, n_val, n_test)):
        data[f"{split}_images"], data[f"{split}_labels"], _ = generate_split(flag, n, split, size, seed)
    return data


def corpus_plan(n: int, modalities: Sequence[str], seed: int = 0) -> tuple[Array, Array, Array]:
    """Who is who in the corpus: (modality names, source task flags, style ids), equal modality mix, shuffled."""
    mods = sorted(set(modalities))
    bad = [m for m in mods if m not in MODALITIES]
    if bad or not mods:
        raise ValueError(f"unknown or no modalities {bad or list(modalities)}; known: {', '.join(MODALITIES)}")
    rng = _rng(seed, "corpus", "plan")
    mod = np.asarray(mods)[rng.permutation(np.arange(n) % len(mods))]
    flags = np.empty(n, dtype=object)
    styles = np.empty(n, np.int64)
    for m in mods:  # per modality: its own style draws, and a random one of its tasks as the image family
        idx = np.flatnonzero(mod == m)
        sources = [f for f, t in TASKS.items() if t.modality == m]
        flags[idx] = np.asarray(sources, dtype=object)[rng.integers(0, len(sources), len(idx))]
        styles[idx] = sample_styles(_rng(seed, "corpus", "styles", m), len(idx), CORPUS_STYLE_EXPONENT)
    return mod, flags.astype(str), styles


def generate_corpus(n: int, modalities: Sequence[str], size: int = 28, seed: int = 0) -> tuple[Array, Array]:
    """Unlabeled pretraining images (uint8 N x size x size x 3, grayscale replicated) and their modality names.

    Label factors are drawn at random; style ids follow the heavy-tailed corpus law; every stream is keyed
    ``"corpus"`` and so disjoint from every evaluation split."""
    mod, flags, styles = corpus_plan(n, modalities, seed)
    images = np.empty((n, size, size, 3), np.uint8)
    for flag in sorted(set(flags)):
        idx = np.flatnonzero(flags == flag)
        labels = _labels(_rng(seed, "corpus", "labels", flag), flag, len(idx))
        img = _render(flag, labels, styles[idx], size, seed, "corpus", flag)
        images[idx] = img if img.ndim == 4 else img[..., None]
    return images, mod
