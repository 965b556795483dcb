"""DINO-family losses as pure functions: cross-view cross-entropy, teacher centering and Sinkhorn-Knopp,
iBOT's masked-patch loss and the KoLeo regulariser. Written for this project after the DINO / DINOv2 papers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from biovfm.train.distributed import all_reduce_sum


def centered_teacher_probs(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """DINO's teacher targets: softmax of centred logits at a low temperature (centering and sharpening
    pull in opposite directions, which is what prevents collapse)."""
    return F.softmax((logits - center) / temp, dim=-1)


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets with equal prototype mass over the (global, all-process) batch; rows sum to 1."""
    q = torch.exp(logits.float() / temp).t()  # (K, B); head logits are cosines (|l| <= 1), so no overflow
    k = q.shape[0]
    b = all_reduce_sum(torch.tensor(float(q.shape[1]), device=q.device))
    q /= all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def cross_view_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Mean cross-entropy H(teacher view i, student view j) over all pairs i != j and all samples.

    student_logits: (S, B, K), the first T views being the teacher's (global) views; teacher_probs: (T, B, K)."""
    t, s = teacher_probs.shape[0], student_logits.shape[0]
    if s < 2:
        raise ValueError("DINO needs at least two views per image")
    logp = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    ce = -torch.einsum("tbk,sbk->tsb", teacher_probs.float(), logp)  # (T, S, B)
    pairs = ~torch.eye(t, s, dtype=torch.bool, device=ce.device)
    return ce[pairs].mean()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the rows of ``probs``."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()


def masked_patch_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, sample: torch.Tensor,
                         n_samples: int, student_temp: float) -> torch.Tensor:
    """iBOT: cross-entropy between teacher and student on masked patches, averaged within each image and
    then over all ``n_samples`` images (images without masked patches count 0, so the mean over a global
    batch equals the mean of per-process means). ``sample`` (M,) gives each masked token's image."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    ce = -(teacher_probs.float() * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)
    per_image = torch.zeros(n_samples, device=ce.device).index_add_(0, sample, ce)
    count = torch.zeros(n_samples, device=ce.device).index_add_(0, sample, torch.ones_like(ce))
    return (per_image / count.clamp_min(1)).sum() / n_samples


def koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser: minus the mean log distance of each L2-normalised row to its nearest neighbour
    (it spreads features over the sphere); computed in fp32."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    dots = x @ x.t()
    dots.fill_diagonal_(-2.0)
    nn_idx = dots.argmax(dim=1)
    dist = (x - x[nn_idx]).norm(dim=-1)
    return -torch.log(dist + eps).mean()
