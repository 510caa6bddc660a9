"""A DDPM noise schedule as a pure object (no parameters, no I/O), shared by CDR and SeDA.

Timesteps are 1-based, ``t = 1..T``, with ``abar_0 := 1`` (methods §1.3). Tables have length
``T + 1`` and index 0 holds the ``t = 0`` values. The networks predict the clean sample
(x0-parameterisation, MARNet Eq. 22); every method here takes ``x0_hat``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> x0_hat


class NoiseFeed:
    """Standard normal draws read from a given tensor instead of drawn from a generator, so
    that a traced graph (an ONNX export) takes a chain's noise as an input.

    ``noise`` is ``[rows, K]``: each draw of shape ``(rows, *dims)`` takes the next
    ``prod(dims)`` columns, in the order the chains draw. Pass it where a head takes its
    ``generator``; :class:`NoiseTally` finds the draws' shapes.
    """

    def __init__(self, noise: torch.Tensor):
        self.noise = noise
        self.offset = 0

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The next ``shape`` of noise (``shape[0]`` rows)."""
        width = math.prod(shape[1:])
        if self.offset + width > self.noise.shape[1]:
            raise ValueError(f"the noise input has {self.noise.shape[1]} columns per row; the "
                             f"chains draw more (the next draw needs {width} from column "
                             f"{self.offset})")
        out = self.noise[:, self.offset:self.offset + width].reshape(shape)
        self.offset += width
        return out


@dataclass
class NoiseTally:
    """A stand-in generator that records the per-row shape of every draw (and returns zeros):
    run a head once with it to learn the noise input its chains need."""

    draws: list[tuple[int, ...]] = field(default_factory=list)

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        self.draws.append(tuple(shape[1:]))
        return torch.zeros(shape)


NoiseSource = Union[torch.Generator, NoiseFeed, NoiseTally, None]


def standard_normal(shape: tuple[int, ...], device: torch.device | str,
                    generator: NoiseSource = None) -> torch.Tensor:
    """``N(0, I)`` of ``shape``: from ``generator``, or the next draw of a noise feed."""
    if isinstance(generator, (NoiseFeed, NoiseTally)):
        return generator.draw(shape).to(device)
    return torch.randn(shape, device=device, generator=generator)


@dataclass(frozen=True)
class ScheduleConfig:
    """``T`` steps; ``cosine`` (Nichol & Dhariwal) or ``linear`` betas.

    The linear default runs from ``0.1 / T`` to ``20 / T`` so that ``abar_T`` is ~0 for any T
    (methods §3.8: the DDPM pair 1e-4..0.02 is meant for T = 1000).
    """

    steps: int = 100
    kind: str = "cosine"
    beta_start: float | None = None
    beta_end: float | None = None
    cosine_s: float = 0.008
    max_beta: float = 0.999


class NoiseSchedule:
    """Forward noising, the x0-parameterised posterior, and DDPM / DDIM reverse steps."""

    def __init__(self, cfg: ScheduleConfig = ScheduleConfig(), device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.T = int(cfg.steps)
        betas = _betas(cfg).to(torch.float64)
        betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])  # beta_0 := 0
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)  # abar_0 = 1
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        post_var = torch.zeros_like(betas)
        post_var[1:] = (1 - abar_prev[1:]) / (1 - abar[1:]) * betas[1:]  # Eq. 21
        tables = {
            "betas": betas, "alphas": alphas, "abar": abar, "abar_prev": abar_prev,
            "posterior_variance": post_var,
            "coef_x0": torch.zeros_like(betas), "coef_xt": torch.zeros_like(betas),
        }
        tables["coef_x0"][1:] = abar_prev[1:].sqrt() * betas[1:] / (1 - abar[1:])  # Eq. 22
        tables["coef_xt"][1:] = alphas[1:].sqrt() * (1 - abar_prev[1:]) / (1 - abar[1:])
        self._tables = {k: v.to(device=device, dtype=torch.float32) for k, v in tables.items()}

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        out = NoiseSchedule.__new__(NoiseSchedule)
        out.cfg, out.T = self.cfg, self.T
        out._tables = {k: v.to(device) for k, v in self._tables.items()}
        return out

    def __getattr__(self, name: str) -> torch.Tensor:
        tables = self.__dict__.get("_tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(name)

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table[t].view(-1, *([1] * (like.dim() - 1)))

    def sample_timesteps(self, n: int, device: torch.device,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform ``t ~ U{1..T}`` (methods §3.9)."""
        return torch.randint(1, self.T + 1, (n,), device=device, generator=generator)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (MARNet Eq. 15)."""
        abar = self._at(self.abar, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def posterior(self, x0_hat: torch.Tensor, x_t: torch.Tensor,
                  t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (Eq. 22) and variance (Eq. 21) of ``q(x_{t-1} | x_t, x0_hat)``."""
        mean = self._at(self.coef_x0, t, x_t) * x0_hat + self._at(self.coef_xt, t, x_t) * x_t
        return mean, self._at(self.posterior_variance, t, x_t)

    def ddpm_step(self, x0_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
        """Ancestral step ``x_{t-1} = mu + sqrt(beta_hat_t) z`` (Eq. 23); no noise at t = 1."""
        mean, var = self.posterior(x0_hat, x_t, t)
        return mean + var.sqrt() * noise  # var is exactly 0 at t = 1

    def ddim_step(self, x0_hat: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int,
                  eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM update from ``t`` to ``t_prev < t`` with x0-prediction (eta = 0: deterministic)."""
        abar_t, abar_prev = self.abar[t], self.abar[t_prev]
        eps_hat = (x_t - abar_t.sqrt() * x0_hat) / (1 - abar_t).sqrt()
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).clamp(min=0).sqrt()
        direction = (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps_hat
        out = abar_prev.sqrt() * x0_hat + direction
        if eta > 0 and noise is not None:
            out = out + sigma * noise
        return out

    def ddim_timesteps(self, steps: int) -> list[int]:
        """``steps`` evenly spaced timesteps from T down to 1 (T and 1 included)."""
        steps = max(1, min(int(steps), self.T))
        if steps == 1:
            return [self.T]
        return sorted({round(self.T - i * (self.T - 1) / (steps - 1)) for i in range(steps)},
                      reverse=True)

    @torch.no_grad()
    def sample(self, denoise: Denoiser, shape: tuple[int, ...], device: torch.device,
               method: str = "ddpm", steps: int | None = None, eta: float = 0.0,
               generator: NoiseSource = None) -> torch.Tensor:
        """Run the reverse chain from ``N(0, I)`` and return ``x_0``.

        ``ddpm``: the full ancestral chain T..1 (the paper's sampler). ``ddim``: ``steps``
        deterministic (eta = 0) or stochastic jumps. The noise comes from ``generator``, or
        from a :class:`NoiseFeed` (an exported graph's noise input).
        """
        x = standard_normal(shape, device, generator)
        if method == "ddpm":
            for t in range(self.T, 0, -1):
                tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
                x0_hat = denoise(x, tt)
                noise = standard_normal(shape, device, generator) if t > 1 else \
                    torch.zeros(shape, device=device)
                x = self.ddpm_step(x0_hat, x, tt, noise)
            return x
        if method == "ddim":
            ts = self.ddim_timesteps(steps or self.T)
            for i, t in enumerate(ts):
                tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
                x0_hat = denoise(x, tt)
                if i == len(ts) - 1:
                    return x0_hat  # the last jump lands on t = 0: x_0 is the prediction
                noise = standard_normal(shape, device, generator) if eta > 0 else None
                x = self.ddim_step(x0_hat, x, t, ts[i + 1], eta, noise)
            return x
        raise ValueError(f"unknown sampler {method!r}; choose ddpm or ddim")


def _betas(cfg: ScheduleConfig) -> torch.Tensor:
    T = int(cfg.steps)
    if T < 1:
        raise ValueError("schedule steps must be >= 1")
    if cfg.kind == "linear":
        start = cfg.beta_start if cfg.beta_start is not None else 0.1 / T
        end = cfg.beta_end if cfg.beta_end is not None else min(20.0 / T, cfg.max_beta)
        return torch.linspace(start, end, T, dtype=torch.float64)
    if cfg.kind == "cosine":
        def f(t: float) -> float:
            return math.cos((t / T + cfg.cosine_s) / (1 + cfg.cosine_s) * math.pi / 2) ** 2
        abar = torch.tensor([f(t) / f(0) for t in range(T + 1)], dtype=torch.float64)
        return (1 - abar[1:] / abar[:-1]).clamp(max=cfg.max_beta)
    raise ValueError(f"unknown schedule kind {cfg.kind!r}; choose cosine or linear")
