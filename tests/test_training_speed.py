"""The speed paths of end-to-end training compute what the plain paths compute."""

import torch
from torch import nn

from marnet.pipeline.engine.backbones import (
    VisionSpec,
    build_vision,
    depthwise_weight_grad,
    fold_batchnorm,
    speed_up_depthwise_backward,
    unfold_batchnorm,
)
from marnet.pipeline.models.heads.common import ConditionalDenoiser, Standardizer
from marnet.pipeline.stage1.finetune import trainable_prefix


def test_depthwise_weight_gradient_equals_autograd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 3, 3, generator=g)
    grad_out = torch.randn(4, 6, 3, 3, generator=g)
    weight = torch.randn(6, 1, 5, 5, generator=g, requires_grad=True)
    nn.functional.conv2d(x, weight, padding=2, groups=6).backward(grad_out)
    assert torch.allclose(depthwise_weight_grad(x, grad_out, (5, 5), (2, 2)), weight.grad,
                          atol=1e-5)


def test_switched_depthwise_layers_give_the_same_values_and_gradients():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(8, 8, 5, padding=2, groups=8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False))
    fast = nn.Sequential(*(m for m in __import__("copy").deepcopy(plain)))
    assert speed_up_depthwise_backward(fast) == 2
    assert fast.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 8, 3, 3, requires_grad=True)  # kernel 5 > map 3: the switched path
    for model in (plain, fast):
        model(x).square().sum().backward()
    assert torch.allclose(plain(x), fast(x))
    for a, b in zip(plain.parameters(), fast.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_folding_frozen_batch_norms_keeps_outputs_and_state_dict():
    vision = build_vision(VisionSpec("test_efficientnet", "random", image_size=32))
    with torch.no_grad():  # non-trivial statistics, so a wrong fold would show
        for m in vision.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    frozen = trainable_prefix(vision.model, "last-1")
    vision.to_runtime(torch.device("cpu"))
    vision.model.eval()
    images = torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8)
    keys = list(vision.model.state_dict())
    with torch.no_grad():
        before = vision.features(images)
    pairs = fold_batchnorm(vision, frozen)
    with torch.no_grad():
        after = vision.features(images)
    assert torch.allclose(before, after, atol=1e-4)
    assert list(vision.model.state_dict()) == keys
    norms = [m for f in frozen for m in f.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all("forward" in vars(m) for m in norms)  # folded: the norms only act
    assert fold_batchnorm(vision, frozen) == []  # folded once
    unfold_batchnorm(pairs)
    assert not any("forward" in vars(m) for m in norms)
    with torch.no_grad():
        assert torch.equal(vision.features(images), before)


def test_a_conditioned_denoiser_is_the_denoiser():
    torch.manual_seed(0)
    denoiser = ConditionalDenoiser(6, 10, hidden=16, t_dim=8)
    x_t, cond, t = torch.randn(5, 6), torch.randn(5, 10), torch.randint(1, 100, (5,))
    assert torch.allclose(denoiser.conditioned(cond)(x_t, t), denoiser(x_t, t, cond), atol=1e-6)


def test_running_statistics_follow_the_features():
    norm = Standardizer(3)
    g = torch.Generator().manual_seed(0)
    first = torch.randn(64, 3, generator=g) * 2 + 5
    norm.update(first, 1.0)  # the first batch: its own statistics
    assert torch.allclose(norm.mean, first.mean(0)) and torch.allclose(norm.std, first.std(0, unbiased=False))
    for _ in range(200):  # the features move: the statistics follow them
        norm.update(torch.randn(64, 3, generator=g) - 3, 0.1)
    assert torch.allclose(norm.mean, torch.full((3,), -3.0), atol=0.2)
    assert torch.allclose(norm.std, torch.ones(3), atol=0.2)
