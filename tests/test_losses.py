"""Losses against independent computations on small tensors."""

import math

import torch
import torch.nn.functional as F

from marnet.pipeline.losses import fuse_features, fuse_logits, ita_loss, sdm_loss


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
