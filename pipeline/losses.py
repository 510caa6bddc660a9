"""Alignment losses and fusion operators, each a small pure function (METHODS §1, §4).

All take batch tensors and return a scalar (batch mean) unless stated otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_logits(visual: torch.Tensor, text: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """``S_ij = cos(visual_i, text_j) / tau`` (MARNet Eq. 8)."""
    return F.normalize(visual, dim=-1) @ F.normalize(text, dim=-1).T / tau


def same_class_targets(labels: torch.Tensor) -> torch.Tensor:
    """Row-normalised ``1[y_i == y_j]``: the matching distribution ``q`` of SDM / multi-positive."""
    match = (labels[:, None] == labels[None, :]).float()
    return match / match.sum(dim=1, keepdim=True)


def ita_loss(visual: torch.Tensor, text: torch.Tensor, tau: float | torch.Tensor = 0.07,
             labels: torch.Tensor | None = None) -> torch.Tensor:
    """ITA: symmetric InfoNCE, the *sum* of both directions (MARNet Eq. 9-11; MGCA).

    ``L = CE(S, arange(B)) + CE(S^T, arange(B))``. With ``labels`` (multi-positive, METHODS §3
    #18) every same-class pair is a positive: the target of row i is uniform over
    ``{j : y_j = y_i}`` instead of one-hot at i.
    """
    logits = cosine_logits(visual, text, tau)
    if labels is None:
        target = torch.arange(len(visual), device=visual.device)
        return F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)
    q = same_class_targets(labels)
    return soft_cross_entropy(logits, q) + soft_cross_entropy(logits.T, q)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_i -sum_j target_ij log softmax(logits)_ij``."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def sdm_loss(visual: torch.Tensor, text: torch.Tensor, labels: torch.Tensor,
             tau: float = 0.02, eps: float = 1e-8) -> torch.Tensor:
    """SDM (IRRA): ``KL(p_i || q_i)`` both ways, ``p = softmax(cos / tau)``, ``q`` from labels.

    ``L_i2t = mean_i sum_j p_ij (log p_ij - log(q_ij + eps))``; ``L = L_i2t + L_t2i`` (METHODS §4.2).
    """
    logits = cosine_logits(visual, text, tau)
    q = same_class_targets(labels)

    def kl(scores: torch.Tensor) -> torch.Tensor:
        p = F.softmax(scores, dim=1)
        return (p * (F.log_softmax(scores, dim=1) - torch.log(q + eps))).sum(dim=1).mean()

    return kl(logits) + kl(logits.T)


def feature_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||pred - target||^2`` as a mean over dimensions and batch (MARNet Eq. 19, #13)."""
    return F.mse_loss(pred, target)


FEATURE_FUSIONS = ("concat", "add", "mul")
LOGIT_FUSIONS = ("sum", "hm")
FUSIONS = FEATURE_FUSIONS + LOGIT_FUSIONS


def fuse_features(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """Feature-level fusion of MARNet Eq. 24: ``concat``, ``add`` or ``mul`` (elementwise)."""
    if mode == "concat":
        return torch.cat([a, b], dim=-1)
    if a.shape != b.shape:
        raise ValueError(f"fusion {mode!r} needs equal dims, got {a.shape[-1]} and {b.shape[-1]}")
    if mode == "add":
        return a + b
    if mode == "mul":
        return a * b
    raise ValueError(f"unknown feature fusion {mode!r}")


def fuse_logits(z_a: torch.Tensor, z_b: torch.Tensor, mode: str, eps: float = 1e-12) -> torch.Tensor:
    """Logit-level fusion from CF-VQA (two-branch form, METHODS §1.4).

    ``sum``: ``log sigmoid(z_a + z_b)``. ``hm``: ``p = sigmoid(z_a) sigmoid(z_b)``,
    ``z = log(p + eps) - log1p(p)``. The result is used as logits of a softmax CE.
    """
    if mode == "sum":
        return F.logsigmoid(z_a + z_b)
    if mode == "hm":
        p = torch.sigmoid(z_a) * torch.sigmoid(z_b)
        return torch.log(p + eps) - torch.log1p(p)
    raise ValueError(f"unknown logit fusion {mode!r}")
