"""Losses against independent computations on small tensors."""

import math

import torch
import torch.nn.functional as F

from marnet.pipeline.models import losses
from marnet.pipeline.models.losses import (
    cdd_loss,
    fuse_features,
    fuse_logits,
    ita_loss,
    random_directions,
    sdm_loss,
    sliced_wasserstein,
    ssan_esa_loss,
    ssan_isa_loss,
    token_alignment_scores,
)


def _loop_infonce(a, b, tau):
    """-log softmax of the matching pair, anchor by anchor, with explicit sums."""
    total = 0.0
    for i in range(len(a)):
        sims = [F.cosine_similarity(a[i], b[j], dim=0).item() / tau for j in range(len(b))]
        total += -(sims[i] - math.log(sum(math.exp(s) for s in sims)))
    return total / len(a)


def test_ita_is_the_sum_of_both_infonce_directions():
    g = torch.Generator().manual_seed(0)
    v, s = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    expected = _loop_infonce(v, s, 0.07) + _loop_infonce(s, v, 0.07)
    assert math.isclose(ita_loss(v, s, 0.07).item(), expected, rel_tol=1e-5)


def test_ita_is_small_for_aligned_pairs_and_large_for_shuffled():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(8, 16, generator=g)
    assert ita_loss(v, v, 0.07).item() < 0.01
    assert ita_loss(v, v[torch.randperm(8, generator=g)], 0.07).item() > 5


def test_multi_positive_ita_uses_uniform_targets_over_same_class():
    g = torch.Generator().manual_seed(2)
    v, s = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    labels = torch.tensor([0, 0, 1, 2])
    logits = F.normalize(v, dim=1) @ F.normalize(s, dim=1).T / 0.1
    q = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, 1., 0], [0, 0, 0, 1.]])
    expected = sum(-(q[i] * F.log_softmax(logits[i], 0)).sum() for i in range(4)) / 4 + \
        sum(-(q[i] * F.log_softmax(logits.T[i], 0)).sum() for i in range(4)) / 4
    assert torch.isclose(ita_loss(v, s, 0.1, labels), expected, rtol=1e-5)
    # with all-distinct labels the multi-positive loss is the plain ITA
    distinct = torch.arange(4)
    assert torch.isclose(ita_loss(v, s, 0.1, distinct), ita_loss(v, s, 0.1), rtol=1e-5)


def test_sdm_matches_a_direct_kl_formula():
    g = torch.Generator().manual_seed(3)
    v, s = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    labels = torch.tensor([1, 0, 1, 2, 0])
    tau, eps = 0.02, 1e-8
    cos = F.normalize(v, dim=1) @ F.normalize(s, dim=1).T
    y = (labels[:, None] == labels[None, :]).float()
    q = y / y.sum(1, keepdim=True)

    def direct(scores):
        total = 0.0
        for i in range(5):
            p = torch.softmax(scores[i] / tau, 0)
            total += sum(p[j] * (math.log(p[j]) - math.log(q[i, j] + eps)) for j in range(5))
        return total / 5

    expected = direct(cos) + direct(cos.T)
    assert math.isclose(sdm_loss(v, s, labels, tau).item(), float(expected), rel_tol=1e-4)


def test_fusions_follow_their_definitions():
    a, b = torch.tensor([[1., -2.]]), torch.tensor([[3., 4.]])
    assert torch.equal(fuse_features(a, b, "concat"), torch.tensor([[1., -2., 3., 4.]]))
    assert torch.equal(fuse_features(a, b, "add"), torch.tensor([[4., 2.]]))
    assert torch.equal(fuse_features(a, b, "mul"), torch.tensor([[3., -8.]]))
    assert torch.allclose(fuse_logits(a, b, "sum"), torch.log(torch.sigmoid(a + b)))
    p = torch.sigmoid(a) * torch.sigmoid(b)
    assert torch.allclose(fuse_logits(a, b, "hm"), torch.log(p + 1e-12) - torch.log(1 + p))


def test_random_directions_are_unit_columns_and_reproducible():
    a = random_directions(5, 7, torch.Generator().manual_seed(0))
    b = random_directions(5, 7, torch.Generator().manual_seed(0))
    assert a.shape == (5, 7) and torch.equal(a, b)
    assert torch.allclose(a.norm(dim=0), torch.ones(7))


def test_swd_matches_sorting_projections_by_hand():
    g = torch.Generator().manual_seed(4)
    a, b = torch.rand(6, 3, generator=g), torch.rand(6, 3, generator=g)
    theta = random_directions(3, 4, g)
    total = 0.0
    for m in range(4):
        pa = sorted(sum(a[i, k].item() * theta[k, m].item() for k in range(3)) for i in range(6))
        pb = sorted(sum(b[i, k].item() * theta[k, m].item() for k in range(3)) for i in range(6))
        total += sum((x - y) ** 2 for x, y in zip(pa, pb))
    assert math.isclose(sliced_wasserstein(a, b, theta).item(), total / 24, rel_tol=1e-5)
    # a distribution-level distance: reordering one batch changes nothing, a copy is at 0
    assert torch.isclose(sliced_wasserstein(a, b.flip(0), theta), sliced_wasserstein(a, b, theta))
    assert sliced_wasserstein(a, a[torch.randperm(6, generator=g)], theta).item() < 1e-12


def _ssan_isa_by_hand(target, source, labels, alpha, temperature):
    p = torch.softmax(target, dim=1)
    soft = 0.0
    for k in labels.unique().tolist():
        rows = [i for i in range(len(labels)) if labels[i] == k]
        q = sum(torch.softmax(source[i] / temperature, 0) for i in rows) / len(rows)
        soft += sum(-(q * torch.log(p[i] + 1e-5)).sum() for i in rows) / len(rows)
    return (1 - alpha) * F.cross_entropy(target, labels) + alpha * soft


def test_ssan_isa_uses_class_mean_text_soft_labels():
    g = torch.Generator().manual_seed(5)
    target, source = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 3])
    expected = _ssan_isa_by_hand(target, source, labels, 0.1, 5.0)
    assert torch.isclose(ssan_isa_loss(target, source, labels, 0.1, 5.0), expected, rtol=1e-5)
    # alpha = 0 is plain cross-entropy
    plain = F.cross_entropy(target, labels)
    assert torch.isclose(ssan_isa_loss(target, source, labels, 0.0), plain)


def test_ssan_esa_is_the_triplet_centroid_sum():
    source = torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]])
    target = torch.tensor([[1.0, 1.0], [1.0, 3.0], [4.0, 5.0]])
    labels = torch.tensor([0, 0, 1])
    # class 0: mu_s = (1, 0), mu_t = (1, 2), mu_st = (1, 1) -> 4 + 1 + 1
    # class 1: mu_s = (5, 5), mu_t = (4, 5), mu_st = (4.5, 5) -> 1 + 0.25 + 0.25
    assert math.isclose(ssan_esa_loss(source, target, labels).item(), 7.5, rel_tol=1e-6)
    assert ssan_esa_loss(source, source, labels).item() == 0.0


def _cdd_by_hand(v, s, labels):
    pooled = torch.cat([v, s])
    n = len(pooled)
    sigma0 = sum(((pooled[i] - pooled[j]) ** 2).sum().item()
                 for i in range(n) for j in range(n) if i != j) / (n * n - n)

    def k(a, b):
        d = ((a - b) ** 2).sum().item()
        return sum(math.exp(-d / (sigma0 * 2.0 ** (i - 2))) for i in range(5))

    def mean_k(xs, ys):
        return sum(k(x, y) for x in xs for y in ys) / (len(xs) * len(ys))

    classes = labels.unique().tolist()
    members = {c: [i for i in range(len(labels)) if labels[i] == c] for c in classes}

    def disc(c1, c2):
        vs, ss = [v[i] for i in members[c1]], [s[j] for j in members[c2]]
        return mean_k(vs, vs) + mean_k(ss, ss) - 2 * mean_k(vs, ss)

    m = len(classes)
    intra = sum(disc(c, c) for c in classes) / m
    inter = sum(disc(a, b) for a in classes for b in classes if a != b) / (m * (m - 1))
    return intra - inter


def test_cdd_matches_explicit_kernel_sums():
    g = torch.Generator().manual_seed(6)
    v, s = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1, 2, 2])
    assert math.isclose(cdd_loss(v, s, labels).item(), _cdd_by_hand(v, s, labels), rel_tol=1e-4,
                        abs_tol=1e-6)


def test_cdd_is_lower_when_modalities_share_class_structure():
    g = torch.Generator().manual_seed(7)
    centres = 3 * torch.randn(4, 8, generator=g)
    labels = torch.arange(4).repeat_interleave(4)
    v = centres[labels] + 0.1 * torch.randn(16, 8, generator=g)
    s = centres[labels] + 0.1 * torch.randn(16, 8, generator=g)
    aligned = cdd_loss(v, s, labels)
    swapped = cdd_loss(v, s[torch.roll(torch.arange(16), 4)], labels)  # text of another class
    assert aligned.item() < 0 < swapped.item()


def _team_by_hand(vt, wt, mask, tau_a):
    scores = torch.zeros(len(vt), len(wt))
    for i in range(len(vt)):
        v = F.normalize(vt[i], dim=-1)
        for t in range(len(wt)):
            w = F.normalize(wt[t][mask[t].bool()], dim=-1)
            word = []
            for j in range(len(w)):
                a = torch.softmax(v @ w[j] / tau_a, 0)
                word.append(F.cosine_similarity(w[j], (a[:, None] * v).sum(0), dim=0))
            patch = []
            for k in range(len(v)):
                b = torch.softmax(w @ v[k] / tau_a, 0)
                patch.append(F.cosine_similarity(v[k], (b[:, None] * w).sum(0), dim=0))
            scores[i, t] = (torch.stack(word).mean() + torch.stack(patch).mean()) / 2
    return scores


def test_team_scores_match_attention_by_hand_and_ignore_padding():
    g = torch.Generator().manual_seed(8)
    vt, wt = torch.randn(3, 4, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    scores = token_alignment_scores(vt, wt, mask, 0.1)
    assert scores.shape == (3, 2)
    assert torch.allclose(scores, _team_by_hand(vt, wt, mask, 0.1), atol=1e-5)
    noisy = wt.clone()
    noisy[mask == 0] = 100 * torch.randn(int((mask == 0).sum()), 5, generator=g)
    assert torch.allclose(token_alignment_scores(vt, noisy, mask, 0.1), scores, atol=1e-6)


def test_team_scores_in_checkpointed_blocks_equal_the_whole_batch_with_gradients(monkeypatch):
    g = torch.Generator().manual_seed(9)
    vt = torch.randn(10, 4, 5, generator=g, requires_grad=True)
    wt = torch.randn(10, 6, 5, generator=g, requires_grad=True)
    mask = (torch.rand(10, 6, generator=g) > 0.3).long()
    mask[:, 0] = 1
    weights = torch.randn(10, 10, generator=g)
    block_calls = []
    score_block = losses._token_scores
    monkeypatch.setattr(losses, "_token_scores",
                        lambda v, *rest: block_calls.append(len(v)) or score_block(v, *rest))
    grads = []
    for block_mb in (0.0, 3 * 10 * 4 * 6 * 4 / 2 ** 20):  # whole batch; 3 images a block
        scores = token_alignment_scores(vt, wt, mask, 0.1, block_mb=block_mb)
        grads.append((scores, *torch.autograd.grad((scores * weights).sum(), (vt, wt))))
    (whole, *whole_grads), (blocked, *blocked_grads) = grads
    assert torch.allclose(blocked, whole, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(blocked_grads, whole_grads))
    # one call for the whole batch; blocks of 3, 3, 3, 1 images, each run again in backward
    assert block_calls == [10, 3, 3, 3, 1, 1, 3, 3, 3]
