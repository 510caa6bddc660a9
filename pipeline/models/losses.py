"""Alignment losses and fusion operators, each a small pure function (methods §1, §4).

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

    ``L = CE(S, arange(B)) + CE(S^T, arange(B))``. With ``labels`` (multi-positive,
    methods §3.18) every same-class pair is a positive: the target of row i is uniform over
    ``{j : y_j = y_i}`` instead of one-hot at i.
    """
    return symmetric_infonce(cosine_logits(visual, text, tau), labels)


def symmetric_infonce(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """``CE(S, arange(B)) + CE(S^T, arange(B))`` on a square score matrix ``S`` (InfoNCE both ways).

    With ``labels`` the target of row i is uniform over ``{j : y_j = y_i}`` (methods §3.18).
    """
    if labels is None:
        target = torch.arange(len(logits), device=logits.device)
        return F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)
    q = same_class_targets(labels)
    return soft_cross_entropy(logits, q) + soft_cross_entropy(logits.T, q)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_i -sum_j target_ij log softmax(logits)_ij``."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def sdm_loss(visual: torch.Tensor, text: torch.Tensor, labels: torch.Tensor,
             tau: float = 0.02, eps: float = 1e-8) -> torch.Tensor:
    """SDM (IRRA): ``KL(p_i || q_i)`` both ways, ``p = softmax(cos / tau)``, ``q`` from labels.

    ``L_i2t = mean_i sum_j p_ij (log p_ij - log(q_ij + eps))``; ``L = L_i2t + L_t2i``
    (methods §4.2).
    """
    logits = cosine_logits(visual, text, tau)
    q = same_class_targets(labels)

    def kl(scores: torch.Tensor) -> torch.Tensor:
        p = F.softmax(scores, dim=1)
        return (p * (F.log_softmax(scores, dim=1) - torch.log(q + eps))).sum(dim=1).mean()

    return kl(logits) + kl(logits.T)


def random_directions(dim: int, num: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """``num`` directions from ``N(0, I_dim)`` scaled to unit length, as columns ``[dim, num]``."""
    device = device if device is not None else (generator.device if generator is not None else None)
    theta = torch.randn(dim, num, generator=generator, device=device)
    return theta / theta.norm(dim=0, keepdim=True)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """SWD (Lee et al., CVPR 2019; methods §4.3): project both batches on ``directions``
    ``[K, M]``, sort each projection over the batch, and take the mean squared difference.

    ``mean((sort_batch(a theta) - sort_batch(b theta))^2)``: sorting makes it a distance between
    the two empirical distributions, not between pairs (apple/ml-cvpr2019-swd, pytorch-adapt).
    """
    proj_a = torch.sort(a @ directions, dim=0).values
    proj_b = torch.sort(b @ directions, dim=0).values
    return (proj_a - proj_b).pow(2).mean()


def class_centroids(features: torch.Tensor, labels: torch.Tensor,
                    classes: torch.Tensor) -> torch.Tensor:
    """Mean feature of each class in ``classes`` (each must occur in ``labels``), ``[M, D]``."""
    member = (labels[None, :] == classes[:, None]).to(features.dtype)
    return member @ features / member.sum(dim=1, keepdim=True)


def ssan_soft_labels(source_logits: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor,
                     temperature: float = 5.0) -> torch.Tensor:
    """SSAN's class soft labels ``q_k = mean_{i: y_i = k} softmax(z_i / T)``, ``k`` in ``classes``.

    BIT-DA/SSAN ``loss.py::knowledge_distillation_loss_func`` (T = 5; no detach, as there).
    """
    return class_centroids(F.softmax(source_logits / temperature, dim=1), labels, classes)


def ssan_isa_loss(target_logits: torch.Tensor, source_logits: torch.Tensor, labels: torch.Tensor,
                  alpha: float = 0.1, temperature: float = 5.0, eps: float = 1e-5) -> torch.Tensor:
    """SSAN implicit semantic alignment (Li et al., ACM MM 2020; methods §4.4).

    ``(1 - a) CE(z_t, y) + a L_soft`` with ``L_soft = sum_k mean_{i: y_i = k} -sum_j q_kj
    log(p_ij + eps)``, ``p = softmax(z_t)`` and ``q`` from :func:`ssan_soft_labels` of the source
    logits: the per-class sum of means of BIT-DA/SSAN ``knowledge_distillation_loss_func``.
    Here source = text and target = image, with the same labels (paired samples).
    """
    classes = labels.unique()
    q = ssan_soft_labels(source_logits, labels, classes, temperature)
    cross = -torch.log(F.softmax(target_logits, dim=1) + eps) @ q.T  # [B, M]: -sum_j q_kj log p_ij
    member = (labels[:, None] == classes[None, :]).to(cross.dtype)
    soft = ((cross * member).sum(dim=0) / member.sum(dim=0)).sum()
    return (1 - alpha) * F.cross_entropy(target_logits, labels) + alpha * soft


def ssan_esa_loss(source: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SSAN explicit semantic alignment: the "three"-prototype triplet-centroid loss
    (methods §4.4).

    ``sum_k ||mu_k^s - mu_k^t||^2 + ||mu_k^s - mu_k^st||^2 + ||mu_k^t - mu_k^st||^2`` over the
    classes in the batch, ``mu^st`` the centroid of both domains pooled (BIT-DA/SSAN ``loss.py::
    explicit_semantic_alignment_loss_func``, summed squared errors).
    """
    classes = labels.unique()
    mu_s = class_centroids(source, labels, classes)
    mu_t = class_centroids(target, labels, classes)
    mu_st = class_centroids(torch.cat([source, target]), torch.cat([labels, labels]), classes)
    return ((mu_s - mu_t).pow(2).sum() + (mu_s - mu_st).pow(2).sum()
            + (mu_t - mu_st).pow(2).sum())


def pairwise_sq_distances(x: torch.Tensor) -> torch.Tensor:
    """``||x_i - x_j||^2`` for all pairs (clamped at 0; differentiable at ``i = j``)."""
    norms = x.pow(2).sum(dim=1)
    return (norms[:, None] + norms[None, :] - 2 * x @ x.T).clamp_min(0)


def multi_gaussian_kernel(sq_dist: torch.Tensor, sigma0: torch.Tensor | float, kernels: int = 5,
                          kernel_mul: float = 2.0) -> torch.Tensor:
    """``sum_i exp(-d^2 / (sigma0 * mul^(i - kernels // 2)))`` for ``i = 0..kernels-1`` (CAN)."""
    exponents = torch.arange(kernels, device=sq_dist.device) - kernels // 2
    bandwidths = sigma0 * kernel_mul ** exponents.to(sq_dist.dtype)
    return torch.exp(-sq_dist[..., None] / bandwidths).sum(dim=-1)


def cdd_loss(visual: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, kernels: int = 5,
             kernel_mul: float = 2.0) -> torch.Tensor:
    """CDD, the contrastive domain discrepancy of CAN (Kang et al., CVPR 2019; methods §4.5).

    A class-aware MMD with ``k`` = :func:`multi_gaussian_kernel` (5 kernels, bandwidths
    ``sigma0 * 2^(i-2)``, ``sigma0`` the mean pairwise squared distance of the pooled batch, off
    the diagonal, not differentiated, as CAN's ``gamma_estimation``). For the M classes in the
    batch, ``D(c1, c2) = e1 + e2 - 2 e3`` with ``e1`` the mean kernel within visual class c1,
    ``e2`` within text class c2, ``e3`` across them, and
    ``L = mean_c D(c, c) - mean_{c != c'} D(c, c')`` (CAN ``discrepancy/cdd.py``).
    """
    pooled = torch.cat([visual, text])
    sq = pairwise_sq_distances(pooled)
    n = len(pooled)
    sigma0 = (sq.sum() / (n * n - n)).detach()
    k = multi_gaussian_kernel(sq, sigma0, kernels, kernel_mul)
    b = len(visual)
    k_vv, k_ss, k_vs = k[:b, :b], k[b:, b:], k[:b, b:]
    classes = labels.unique()
    member = (labels[:, None] == classes[None, :]).to(k.dtype)  # [B, M]
    counts = member.sum(dim=0)
    e1 = (member.T @ k_vv @ member).diagonal() / counts ** 2
    e2 = (member.T @ k_ss @ member).diagonal() / counts ** 2
    e3 = member.T @ k_vs @ member / (counts[:, None] * counts[None, :])
    discrepancy = e1[:, None] + e2[None, :] - 2 * e3  # [M, M]: D(c1 visual, c2 text)
    m = len(classes)
    intra = discrepancy.diagonal().sum() / m
    if m == 1:
        return intra
    inter = (discrepancy.sum() - discrepancy.diagonal().sum()) / (m * (m - 1))
    return intra - inter


def token_alignment_scores(visual_tokens: torch.Tensor, text_tokens: torch.Tensor,
                           text_mask: torch.Tensor, attention_tau: float = 0.1,
                           eps: float = 1e-8, block_mb: float = 0.0) -> torch.Tensor:
    """TEAM's token-level matching scores ``S [I, T]`` for every image i and text t (methods §4.6).

    Tokens are L2-normalised. Text -> image: word ``w_j`` attends over the patches,
    ``a_jk = softmax_k(w_j . v_k / tau_a)``, ``v~_j = sum_k a_jk v_k``, and
    ``S_t2i = masked mean_j cos(w_j, v~_j)``. Image -> text: patch ``v_k`` attends over the
    text's valid words the same way, ``S_i2t = mean_k cos(v_k, w~_k)``. ``S = (S_i2t + S_t2i)/2``
    (Xie et al., ACM MM 2022, TEAM). The attended tokens are never materialised:
    ``|v~_j|^2 = a_j^T (V V^T) a_j``.

    ``visual_tokens [I, L, D]``, ``text_tokens [T, N, D]``, ``text_mask [T, N]`` (1 = token).

    The intermediates are ``[I, T, L, N]``: B^2 L N values per batch. With ``block_mb`` > 0 and
    one such tensor larger than that many MB, rows of images are scored in blocks that fit, each
    under activation checkpointing (recomputed in backward), so training memory follows the
    block, not the batch. The scores are the same either way.
    """
    v = F.normalize(visual_tokens, dim=-1)
    w = F.normalize(text_tokens, dim=-1)
    mask = text_mask.bool()
    per_image_mb = w.shape[0] * v.shape[1] * w.shape[1] * v.element_size() / 2 ** 20
    rows = max(1, int(block_mb // per_image_mb)) if block_mb > 0 else len(v)
    if rows >= len(v):
        return _token_scores(v, w, mask, attention_tau, eps)
    from torch.utils.checkpoint import checkpoint

    return torch.cat([checkpoint(_token_scores, block, w, mask, attention_tau, eps,
                                 use_reentrant=False) for block in v.split(rows)])


def _token_scores(v: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, attention_tau: float,
                  eps: float) -> torch.Tensor:
    """:func:`token_alignment_scores` of normalised tokens, all images at once."""
    sims = torch.einsum("ild,tnd->itln", v, w)  # [I, T, L, N]

    attn_v = F.softmax(sims / attention_tau, dim=2)  # each word over the patches
    gram_v = v @ v.transpose(1, 2)  # [I, L, L]
    norm_v = (torch.einsum("itln,ilm->itmn", attn_v, gram_v) * attn_v).sum(dim=2)
    word_scores = (attn_v * sims).sum(dim=2) / norm_v.clamp_min(eps).sqrt()  # [I, T, N]
    maskf = mask.to(word_scores.dtype)
    s_t2i = (word_scores * maskf).sum(dim=-1) / maskf.sum(dim=-1)

    masked = sims.masked_fill(~mask[None, :, None, :], float("-inf"))
    attn_w = F.softmax(masked / attention_tau, dim=3)  # each patch over the valid words
    gram_w = w @ w.transpose(1, 2)  # [T, N, N]
    norm_w = (torch.einsum("itln,tnk->itlk", attn_w, gram_w) * attn_w).sum(dim=3)
    patch_scores = (attn_w * sims).sum(dim=3) / norm_w.clamp_min(eps).sqrt()  # [I, T, L]
    s_i2t = patch_scores.mean(dim=-1)
    return (s_i2t + s_t2i) / 2


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
    """Logit-level fusion from CF-VQA (two-branch form, methods §1.4).

    ``sum``: ``log sigmoid(z_a + z_b)``. ``hm``: ``p = sigmoid(z_a) sigmoid(z_b)``,
    ``z = log(p + eps) - log1p(p)``. The result is used as logits of a softmax CE.
    """
    if mode == "sum":
        return F.logsigmoid(z_a + z_b)
    if mode == "hm":
        p = torch.sigmoid(z_a) * torch.sigmoid(z_b)
        return torch.log(p + eps) - torch.log1p(p)
    raise ValueError(f"unknown logit fusion {mode!r}")
