"""Our MAE and DINO training steps against the ``lightly`` package's, on the same timm ViT.

    python benchmarks/peer_lightly.py [--methods mae dino] [--models tiny small] [--sizes 28 64] [--pairs 5]
        [--threads 1] [--batch-mae 128] [--batch-dino 32] [--curve-steps 10] [--curve-batch 16]
        [--curve-tol-mae 1e-5] [--curve-tol-dino 5e-3] [--params params.yaml]

lightly is a benchmark-only peer, never a dependency of the project. On first run the script makes a venv under
``~/.cache/biovfm/peer-lightly`` (``BIOVFM_PEER_VENV`` overrides it) that sees the project venv's packages (a
``.pth`` file, so both sides run one torch and one timm build), installs ``lightly`` there with ``--no-deps``
(its loss and model modules import with what the project venv already has) and re-runs itself with that
interpreter. Nothing is installed into the project's venv.

Both sides get the same timm ``VisionTransformer`` (our ``build_encoder`` at the ladder's patch size for the image
size: 4 at 28 px, 8 at 64 px), the same initial weights, image size, batch, threads and fp32, AdamW with the same
parameter groups and hyper-parameters, and the sizes of params ``methods.mae`` / ``methods.dino``:

* ours: one engine step (``Method.forward`` with the method's own batched augmentation, backward, grad-norm clip,
  ``before_optimizer_step``, AdamW, ``zero_grad``, ``on_step_end``), built through the optimizer code the engine uses;
* lightly: the pieces its examples use, put together as a user would: ``MaskedVisionTransformerTIMM`` and
  ``MaskedVisionTransformerDecoderTIMM`` with lightly's token utilities and an MSE loss for MAE;
  ``MaskedVisionTransformerTIMM``, ``DINOProjectionHead`` (weight-normalised last layer, norm fixed),
  ``DINOLoss``, ``IBOTPatchLoss``, ``KoLeoLoss`` and ``update_momentum`` for DINO (our DINO is the DINOv2 recipe:
  iBOT on, KoLeo 0.1). lightly's views (crops, iBOT masks) are made before its timer starts: its side is timed
  without augmentation, ours with it. Local crops see the positions of their grid over the whole image on both
  sides (lightly: a twin ViT sharing every weight but the fixed position embedding).

Throughput: ``--pairs`` interleaved (ours, lightly) runs of ``--steps`` timed steps each after warm-up (which side
goes first alternates), the images/s ratio per pair, and the median ratio; by the wall clock and by the process's
CPU time (``cpu`` columns: images per CPU-second, the robust measure on a machine shared with other jobs, where the
wall clock also counts the time the scheduler gives to others). Loss curve: both sides trained ``--curve-steps`` steps from the same
weights on the same images, crops and masks, with the engine's lr and weight-decay schedules; the check is the
largest relative difference of the per-step losses, against ``--curve-tol-<method>``. MAE agrees to about 1e-6.
DINO agrees to about 1e-6 until a step where two crops' CLS tokens nearly coincide: KoLeo then differs by where
its epsilon sits (ours -log(|x - y| + eps), lightly's and DINOv2's -log(|x - y + eps| + eps)), and the curves move
apart by up to ~1.5e-3 within 10 steps on some images; with lightly's KoLeo formula swapped into ours they agree
to 1e-6 again. Hence DINO's looser default tolerance.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

LIGHTLY = "lightly==1.6.0"
PEER_VENV = Path(os.environ.get("BIOVFM_PEER_VENV", Path.home() / ".cache" / "biovfm" / "peer-lightly"))
PEER_IMPORTS = "import lightly.loss, lightly.models.modules, lightly.models.utils, biovfm"


def ensure_peer_interpreter() -> None:
    """Re-run this script in the peer venv (made on first use) unless lightly imports here already."""
    import importlib.util

    if importlib.util.find_spec("lightly") is not None:
        return
    if os.environ.get("BIOVFM_PEER_REEXEC"):
        sys.exit(f"lightly does not import in {sys.executable}; delete {PEER_VENV} and rerun")
    py = PEER_VENV / "bin" / "python"
    if not py.exists():
        print(f"[peer] creating {PEER_VENV} (once)", flush=True)
        subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(PEER_VENV)], check=True)
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # site.addsitedir (not a bare path) so the project venv's own .pth files (the editable biovfm) apply too
    (Path(purelib) / "_biovfm_project_venv.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n")
    if subprocess.run([str(py), "-c", PEER_IMPORTS], capture_output=True).returncode:
        print(f"[peer] pip install --no-deps {LIGHTLY} into {PEER_VENV}", flush=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", LIGHTLY], check=True)
        subprocess.run([str(py), "-c", PEER_IMPORTS], check=True)
    os.environ["BIOVFM_PEER_REEXEC"] = "1"
    os.execv(str(py), [str(py), os.path.abspath(__file__), *sys.argv[1:]])


if __name__ == "__main__":
    ensure_peer_interpreter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from torch import nn  # noqa: E402

from biovfm.config import load_params, model_spec, train_settings  # noqa: E402
from biovfm.data.synthetic import generate_corpus  # noqa: E402
from biovfm.methods import build_method  # noqa: E402
from biovfm.methods.base import Method, StepContext  # noqa: E402
from biovfm.methods.dino.method import N_GLOBAL, teacher_momentum, teacher_temperature  # noqa: E402
from biovfm.methods.mae import random_masking  # noqa: E402
from biovfm.models.vit import build_encoder  # noqa: E402
from biovfm.train.augment import normalize, random_resized_crop  # noqa: E402
from biovfm.train.engine import set_schedules  # noqa: E402
from biovfm.train.optim import param_groups  # noqa: E402


# ------------------------------------------------------------------------------------------------ both sides
def no_decay(p: torch.Tensor) -> bool:
    """The engine's rule (train/optim.py): biases, norms and tokens get no weight decay."""
    return p.ndim <= 1 or p.shape[0] == 1


def lightly_optimizer(params: list[nn.Parameter], t) -> torch.optim.AdamW:
    """AdamW as a lightly user writes it (default implementation), with the engine's groups and settings."""
    params = list({id(p): p for p in params if p.requires_grad}.values())
    groups = [{"params": [p for p in params if not no_decay(p)], "weight_decay": t.weight_decay, "lr_scale": 1.0, "decay": True},
              {"params": [p for p in params if no_decay(p)], "weight_decay": 0.0, "lr_scale": 1.0, "decay": False}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas))


class Ours:
    """One engine training step of our method (train/engine.py ``_train_steps`` without logging)."""

    def __init__(self, method: Method, t) -> None:
        self.method, self.t = method.train(), t
        self.opt = torch.optim.AdamW(param_groups(method, t.weight_decay, t.layer_decay), lr=t.lr, betas=tuple(t.betas))
        self.trainable = [p for p in method.parameters() if p.requires_grad]

    def prepare(self, batch: torch.Tensor, seed: int, step: int, total: int):
        return batch, StepContext.single(seed, len(batch), step, total)

    def step(self, inputs) -> float:
        batch, ctx = inputs
        loss, _ = self.method(batch, ctx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.t.clip_grad if self.t.clip_grad > 0 else float("inf"))
        self.method.before_optimizer_step(ctx)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.method.on_step_end(ctx)
        return loss.item()


# ------------------------------------------------------------------------------------------------ lightly MAE
class LightlyMAE(nn.Module):
    """lightly's MAE building blocks, sized and initialised as our MAE."""

    def __init__(self, ours) -> None:
        super().__init__()
        from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM

        vit = copy.deepcopy(ours.encoder)
        self.mask_ratio, self.patch_size = ours.mask_ratio, ours.p
        self.backbone = MaskedVisionTransformerTIMM(vit=vit, weight_initialization="skip", pos_embed_initialization="skip")
        self.sequence_length = self.backbone.sequence_length
        d = ours.decoder_embed.out_features
        self.embed = nn.Linear(vit.embed_dim, d)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, embed_dim=d, depth=len(ours.decoder_blocks),
            num_heads=ours.decoder_blocks[0].attn.num_heads, norm_layer=nn.LayerNorm)  # timm Block's default, as ours
        self.predict = nn.Linear(d, ours.decoder_pred.out_features)
        with torch.no_grad():  # our initial weights
            self.embed.load_state_dict(ours.decoder_embed.state_dict())
            self.predict.load_state_dict(ours.decoder_pred.state_dict())
            self.decoder.blocks.load_state_dict(ours.decoder_blocks.state_dict())
            self.decoder.norm.load_state_dict(ours.decoder_norm.state_dict())
            self.decoder.mask_token.copy_(ours.mask_token)
            self.decoder.pos_embed.copy_(ours.decoder_pos_embed)

    def forward(self, images: torch.Tensor, idx_keep=None, idx_mask=None) -> torch.Tensor:
        from lightly.models import utils

        b = images.shape[0]
        if idx_keep is None:
            idx_keep, idx_mask = utils.random_token_mask(size=(b, self.sequence_length), mask_ratio=self.mask_ratio,
                                                         device=images.device)
        x = self.embed(self.backbone.encode(images=images, idx_keep=idx_keep))
        tokens = utils.repeat_token(self.decoder.mask_token, (b, self.sequence_length))
        tokens = utils.set_at_index(tokens, idx_keep, x.type_as(tokens))
        x = self.decoder.decode(self.decoder.add_pos_embed(tokens))
        pred = self.predict(utils.get_at_index(x, idx_mask))
        target = utils.get_at_index(utils.patchify(images, self.patch_size), idx_mask - 1)
        return nn.functional.mse_loss(pred, target)


class LightlyMAEStep:
    def __init__(self, ours_method, t) -> None:
        self.model, self.t, self.ours = LightlyMAE(ours_method).train(), t, ours_method
        self.opt = lightly_optimizer(list(self.model.parameters()), t)

    def prepare(self, batch: torch.Tensor, seed: int, step: int, total: int, same_masks: bool = False):
        """The crop (our augmentation, untimed); with ``same_masks`` also our masking draw in lightly's index form."""
        ctx = StepContext.single(seed, len(batch), step, total)
        x = normalize(random_resized_crop(batch.float(), self.ours.crop_scale, ctx))
        if not same_masks:
            return x, None, None
        keep, mask, restore = random_masking(ctx.rand(self.ours.grid ** 2), self.ours.mask_ratio)
        cls = torch.zeros(len(x), 1, dtype=torch.long)
        order = restore.argsort(1)  # the noise order: kept patches first
        return x, torch.cat([cls, keep + 1], 1), order[:, keep.shape[1]:] + 1

    def step(self, inputs) -> float:
        x, idx_keep, idx_mask = inputs
        loss = self.model(x, idx_keep, idx_mask)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


# ------------------------------------------------------------------------------------------------ lightly DINO
class LightlyDINOStep:
    """lightly's DINOv2 example pattern (DINO + iBOT + KoLeo), sized and initialised as our DINO."""

    def __init__(self, ours, t) -> None:
        from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
        from lightly.models.modules import DINOProjectionHead, MaskedVisionTransformerTIMM

        self.ours, self.t = ours, t
        enc = ours.encoder
        self.student = MaskedVisionTransformerTIMM(vit=copy.deepcopy(enc), weight_initialization="skip",
                                                   pos_embed_initialization="skip")
        with torch.no_grad():
            self.student.mask_token.copy_(ours.mask_token)
        # local crops: a twin ViT that shares every module of the student's and has the crop grid's positions
        local = VisionTransformer(img_size=ours.local_size, patch_size=ours.p, embed_dim=enc.embed_dim, depth=1,
                                  num_heads=enc.blocks[0].attn.num_heads, num_classes=0, global_pool="avg",
                                  fc_norm=False, qkv_bias=True, class_token=True)
        sv = self.student.vit
        local.patch_embed.proj, local.cls_token, local.blocks, local.norm = sv.patch_embed.proj, sv.cls_token, sv.blocks, sv.norm
        local.pos_embed = nn.Parameter(ours.local_pos.clone(), requires_grad=False)
        self.student_local = MaskedVisionTransformerTIMM(vit=local, mask_token=self.student.mask_token,
                                                         weight_initialization="skip", pos_embed_initialization="skip")
        prototypes, bottleneck = ours.head.last.shape

        def head() -> DINOProjectionHead:
            return DINOProjectionHead(input_dim=enc.embed_dim, hidden_dim=ours.head.mlp[0].out_features,
                                      bottleneck_dim=bottleneck, output_dim=prototypes, norm_last_layer=True)

        self.head = head()
        with torch.no_grad():
            for i, m in enumerate(ours.head.mlp):
                if isinstance(m, nn.Linear):
                    self.head.layers[i].load_state_dict(m.state_dict())
            self.head.last_layer.weight_v.copy_(ours.head.last)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.teacher_head = head().requires_grad_(False)  # weight-normalised modules cannot be deep-copied
        self.teacher_head.load_state_dict(self.head.state_dict())
        self.dino_loss = DINOLoss(output_dim=prototypes, warmup_teacher_temp=ours.warmup_teacher_temp,
                                  teacher_temp=ours.teacher_temp, student_temp=ours.student_temp,
                                  center_momentum=ours.center_momentum)
        self.ibot_loss = IBOTPatchLoss(output_dim=prototypes, teacher_temp=ours.teacher_temp,
                                       student_temp=ours.student_temp, center_momentum=ours.center_momentum)
        self.koleo_loss = KoLeoLoss()
        self.params = [p for p in [*self.student.parameters(), *self.head.parameters()] if p.requires_grad]
        self.opt = lightly_optimizer(self.params, t)
        for m in (self.student, self.student_local, self.head):
            m.train()

    def prepare(self, batch: torch.Tensor, seed: int, step: int, total: int):
        """Crops and iBOT masks with our draws (untimed: lightly's side gets its views for free)."""
        ctx = StepContext.single(seed, len(batch), step, total)
        g, loc = self.ours.views(batch, ctx)
        masks = self.ours.ibot_masks(ctx)
        return g, loc, masks, ctx.progress

    def step(self, inputs) -> float:
        g, loc, block_mask, progress = inputs
        o = self.ours
        mask = torch.cat([block_mask.new_zeros(len(g), 1), block_mask], 1)  # no masking of the class token
        temp = teacher_temperature(progress, o.warmup_teacher_temp, o.teacher_temp, o.teacher_temp_warmup_frac)
        with torch.no_grad():
            t_feat = self.teacher.encode(g)
            t_cls = self.teacher_head(t_feat[:, 0])
            t_masked = self.teacher_head(t_feat[mask])
        s_feat = self.student.encode(g, mask=mask)
        s_cls = self.head(s_feat[:, 0])
        s_masked = self.head(s_feat[mask])
        s_local = self.head(self.student_local.encode(loc)[:, 0])
        student_out = torch.cat([s_cls, s_local])
        loss = self.dino_loss(teacher_out=list(t_cls.chunk(N_GLOBAL)),
                              student_out=list(student_out.chunk(N_GLOBAL + o.n_local)), teacher_temp=temp)
        g_h = o.grid
        loss = loss + o.ibot_weight * self.ibot_loss(teacher_out=t_masked, student_out=s_masked,
                                                     mask=block_mask.view(-1, g_h, g_h), teacher_temp=temp)
        loss = loss + o.koleo_weight * sum(self.koleo_loss(c) for c in s_feat[:, 0].chunk(N_GLOBAL)) / N_GLOBAL
        loss.backward()
        if self.t.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.t.clip_grad)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        from lightly.models.utils import update_momentum

        m = teacher_momentum(progress, o.momentum)
        update_momentum(self.student, self.teacher, m=m)
        update_momentum(self.head, self.teacher_head, m=m)
        return loss.item()


# ------------------------------------------------------------------------------------------------ harness
def build_pair(p: dict, method: str, model: str, size: int):
    p = {**p, "data": {**p["data"], "image_size": size}}
    torch.manual_seed(0)
    spec = model_spec(p, model)
    cfg = {k: v for k, v in p["methods"][method].items() if k != "pretrain"}
    ours = build_method(method, build_encoder(spec, size), cfg, size, 3)
    t = train_settings(p, method)
    peer = LightlyMAEStep(ours, t) if method == "mae" else LightlyDINOStep(ours, t)
    return Ours(ours, t), peer, t, spec


def images(n: int, size: int) -> torch.Tensor:
    x, _ = generate_corpus(n, ["blood", "dermoscopy", "histology", "xray"], size=size, seed=0)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def timed(side, batch: torch.Tensor, seeds: list[int], total: int) -> tuple[float, float]:
    """Images/s of ``side.step`` over the given step seeds (inputs prepared before the clocks start), by the wall
    clock and by the process's CPU time."""
    inputs = [side.prepare(batch, s, s, total) for s in seeds]
    t0, c0 = time.perf_counter(), time.process_time()
    for x in inputs:
        side.step(x)
    n = len(seeds) * len(batch)
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def throughput(ours: Ours, peer, batch: torch.Tensor, pairs: int, steps: int) -> dict[str, float]:
    """Medians over interleaved (ours, lightly) runs, alternating which side goes first: img/s by wall clock and
    by CPU time per side, and the per-pair ratios."""
    total = 10_000
    for side in (ours, peer):  # warm-up: allocator, oneDNN primitives, optimizer state
        timed(side, batch, [0, 1], total)
    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "peer": []}
    seed = 2
    for i in range(pairs):
        order = [("ours", ours), ("peer", peer)] if i % 2 == 0 else [("peer", peer), ("ours", ours)]
        for key, side in order:
            runs[key].append(timed(side, batch, list(range(seed, seed + steps)), total))
        seed += steps
    med = statistics.median
    (w_o, c_o), (w_p, c_p) = zip(*runs["ours"]), zip(*runs["peer"])
    return {"ours": med(w_o), "peer": med(w_p), "ratio": med(a / b for a, b in zip(w_o, w_p)),
            "ours_cpu": med(c_o), "peer_cpu": med(c_p), "ratio_cpu": med(a / b for a, b in zip(c_o, c_p))}


def loss_curves(p: dict, method: str, model: str, size: int, batch: torch.Tensor, steps: int) -> tuple[list, list]:
    ours, peer, t, _ = build_pair(p, method, model, size)
    a, b = [], []
    for s in range(steps):
        lr, wd = set_schedules(ours.opt, t, s)
        set_schedules(peer.opt, t, s)
        a.append(ours.step(ours.prepare(batch, s, s, t.steps)))
        inputs = peer.prepare(batch, s, s, t.steps, same_masks=True) if method == "mae" else peer.prepare(batch, s, s, t.steps)
        b.append(peer.step(inputs))
    return a, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--methods", nargs="+", default=["mae", "dino"])
    ap.add_argument("--models", nargs="+", default=["tiny", "small"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[28, 64])
    ap.add_argument("--threads", type=int, default=None, help="default: params pretrain.threads")
    ap.add_argument("--batch-mae", type=int, default=None, help="default: the method's params batch size")
    ap.add_argument("--batch-dino", type=int, default=None)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per run")
    ap.add_argument("--curve-steps", type=int, default=10)
    ap.add_argument("--curve-batch", type=int, default=16)
    ap.add_argument("--curve-tol-mae", type=float, default=1e-5, help="largest relative loss difference accepted")
    ap.add_argument("--curve-tol-dino", type=float, default=5e-3)
    a = ap.parse_args()
    p = load_params(a.params)
    threads = a.threads or p["pretrain"]["threads"]
    torch.set_num_threads(threads)
    import lightly

    print(f"torch {torch.__version__}, timm {__import__('timm').__version__}, lightly {lightly.__version__}, "
          f"{threads} thread(s), fp32, {a.pairs} interleaved pairs x {a.steps} step(s), loss curve {a.curve_steps} "
          f"steps at batch {a.curve_batch} (relative tolerance: mae {a.curve_tol_mae:g}, dino {a.curve_tol_dino:g})", flush=True)
    head = (f"{'method':<7}{'model':<7}{'px':>4}{'batch':>6}{'ours img/s':>12}{'lightly img/s':>15}{'ratio':>7}"
            f"{'ours cpu':>10}{'lightly cpu':>13}{'ratio cpu':>10}  loss curve")
    rows = [head]
    print(head, flush=True)
    for method in a.methods:
        bs = (a.batch_mae if method == "mae" else a.batch_dino) or train_settings(p, method).batch_size
        for model in a.models:
            for size in a.sizes:
                data = images(max(bs, a.curve_batch), size)
                ours, peer, _, spec = build_pair(p, method, model, size)
                r = throughput(ours, peer, data[:bs], a.pairs, a.steps)
                del ours, peer
                lo, ll = loss_curves(p, method, model, size, data[:a.curve_batch], a.curve_steps)
                rel = max(abs(x - y) / abs(y) for x, y in zip(lo, ll))
                tol = a.curve_tol_mae if method == "mae" else a.curve_tol_dino
                check = f"{'ok' if rel <= tol else 'DIFF'} max rel {rel:.1e} ({lo[0]:.4f}->{lo[-1]:.4f} vs {ll[0]:.4f}->{ll[-1]:.4f})"
                row = (f"{method:<7}{model:<7}{size:>4}{bs:>6}{r['ours']:>12.1f}{r['peer']:>15.1f}{r['ratio']:>7.2f}"
                       f"{r['ours_cpu']:>10.1f}{r['peer_cpu']:>13.1f}{r['ratio_cpu']:>10.2f}  {check}")
                rows.append(row)
                print(row, flush=True)
                if os.environ.get("PEER_CURVES"):
                    print("  ours   ", np.round(lo, 5).tolist(), "\n  lightly", np.round(ll, 5).tolist(), flush=True)


if __name__ == "__main__":
    main()
