"""The noise schedule against closed forms derived independently."""

import pytest
import torch

from marnet.pipeline.models.schedule import NoiseSchedule, ScheduleConfig


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("steps", [10, 100, 1000])
def test_endpoints(kind, steps):
    s = NoiseSchedule(ScheduleConfig(steps=steps, kind=kind))
    assert s.abar[0] == 1.0 and s.betas[0] == 0.0
    assert s.abar[-1] < 1e-3, "sampling starts from N(0, I), so abar_T must be ~0"
    assert torch.all(s.abar[1:] < s.abar[:-1]), "abar decreases strictly"
    assert s.posterior_variance[1] == 0.0, "no noise is added on the last reverse step"


def test_posterior_is_the_gaussian_product_of_prior_and_likelihood():
    s = NoiseSchedule(ScheduleConfig(steps=50, kind="linear"))
    g = torch.Generator().manual_seed(0)
    x0, xt = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    t = torch.tensor([2, 5, 10, 20, 30, 40, 50])
    mean, var = s.posterior(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        abar_prev = float(s.abar[ti - 1])
        alpha, beta = float(s.alphas[ti]), float(s.betas[ti])
        # prior x_{t-1} ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}); x_t | x_{t-1} ~ N(sqrt(alpha) x_{t-1}, beta)
        precision = 1 / (1 - abar_prev) + alpha / beta
        exp_var = 1 / precision
        exp_mean = exp_var * (abar_prev ** 0.5 * x0[i] / (1 - abar_prev) + alpha ** 0.5 * xt[i] / beta)
        assert torch.allclose(mean[i], exp_mean, atol=1e-4)
        assert torch.allclose(var[i].flatten(), torch.tensor([exp_var]), rtol=1e-4)


def test_add_noise_marginal_statistics():
    s = NoiseSchedule(ScheduleConfig(steps=100))
    x0 = torch.full((20000, 1), 2.0)
    t = torch.full((20000,), 40)
    xt = s.add_noise(x0, torch.randn(20000, 1, generator=torch.Generator().manual_seed(0)), t)
    abar = float(s.abar[40])
    assert abs(xt.mean().item() - 2.0 * abar ** 0.5) < 0.03
    assert abs(xt.var().item() - (1 - abar)) < 0.03


def test_ddim_with_eta_one_on_consecutive_steps_is_the_ddpm_posterior():
    s = NoiseSchedule(ScheduleConfig(steps=30))
    g = torch.Generator().manual_seed(1)
    x0, xt = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    t = 17
    mean, var = s.posterior(x0, xt, torch.full((4,), t))
    ddim_mean = s.ddim_step(x0, xt, t, t - 1, eta=1.0, noise=torch.zeros(4, 5))
    assert torch.allclose(ddim_mean, mean, atol=1e-5)
    noise = torch.randn(4, 5, generator=g)
    assert torch.allclose(s.ddim_step(x0, xt, t, t - 1, eta=1.0, noise=noise) - ddim_mean,
                          var.sqrt() * noise, atol=1e-5)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_a_perfect_denoiser_recovers_its_target(method):
    s = NoiseSchedule(ScheduleConfig(steps=40))
    target = torch.tensor([[1.5, -0.5, 3.0]])
    out = s.sample(lambda x, t: target.expand_as(x), (4, 3), torch.device("cpu"), method,
                   steps=8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, target.expand(4, 3), atol=1e-5)


def test_ddim_timesteps_span_the_chain():
    s = NoiseSchedule(ScheduleConfig(steps=100))
    ts = s.ddim_timesteps(10)
    assert ts[0] == 100 and ts[-1] == 1 and len(ts) == 10 and ts == sorted(ts, reverse=True)
