"""Building blocks shared by the heads. Plain ``nn.Module``s; no I/O."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..schedule import NoiseSchedule


class Standardizer(nn.Module):
    """Per-dimension z-score with train-split statistics (methods §3.7, SeDA R-0).

    A dimension (nearly) constant on train, like a dead ReLU unit, would be divided by ~0 and
    blow test rows that are not constant up to huge values; its std is floored at
    ``floor_ratio`` x the median per-dimension std.
    """

    def __init__(self, dim: int, floor_ratio: float = 0.1, eps: float = 1e-6):
        super().__init__()
        self.floor_ratio, self.eps = floor_ratio, eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> "Standardizer":
        std = features.float().std(dim=0, unbiased=False)
        floor = max(self.eps, self.floor_ratio * std.median().item())
        self.mean.copy_(features.float().mean(dim=0))
        self.std.copy_(std.clamp(min=floor))
        return self

    @torch.no_grad()
    def update(self, features: torch.Tensor, momentum: float) -> None:
        """Running statistics for features that move (a backbone trained end to end).

        ``mean <- (1 - m) mean + m batch_mean`` and the same for the variance, as BatchNorm's
        running estimates (``momentum = 1`` takes the batch's statistics: the first batch).
        The statistics are never differentiated, and the same ones standardise in training
        and evaluation, so a head sees at test what it was trained on.
        """
        feats = features.float()
        running_var = self.std.pow(2)
        self.mean.lerp_(feats.mean(dim=0), momentum)
        running_var.lerp_(feats.var(dim=0, unbiased=False), momentum)
        std = running_var.sqrt()
        self.std.copy_(std.clamp(min=max(self.eps, self.floor_ratio * std.median().item())))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std


class ProjectionEncoder(nn.Module):
    """``g(E x)``: one linear layer and LeakyReLU(0.01) (MARNet Eq. 5-6, ``E_v`` / ``E_s``)."""

    def __init__(self, in_dim: int, out_dim: int, negative_slope: float = 0.01):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.act = nn.LeakyReLU(negative_slope)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(features))


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of integer timesteps, ``[B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


def row_chunks(rows: int, chunk_rows: int) -> list[slice]:
    """The row slices ``[0, c), [c, 2c), ...`` of ``rows`` rows, ``c = chunk_rows``: one
    ``slice(None)`` when they fit in one chunk, so that a traced graph (an ONNX export) keeps
    its batch size symbolic instead of looping over it; none for no rows."""
    if rows == 0:
        return []
    if rows <= chunk_rows:
        return [slice(None)]
    return [slice(start, start + chunk_rows) for start in range(0, rows, chunk_rows)]


class MLP(nn.Module):
    """``layers`` linear layers with SiLU between them (MARNet: "an MLP of four linear layers")."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int = 4):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            blocks.append(nn.Linear(a, b))
            if i < layers - 1:
                blocks.append(nn.SiLU())
        self.net = nn.Sequential(*blocks)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    def hidden_features(self, features: torch.Tensor) -> torch.Tensor:
        """The first hidden activation (SeDA's "interactive feature", R-1)."""
        return self.net[1](self.net[0](features))


class ConditionalDenoiser(nn.Module):
    """x0-predicting denoiser ``X_theta(x_t, t, c)``: an :class:`MLP` on ``[x_t ; c ; emb(t)]``.

    MARNet Eq. 19/22 with the layout of methods §3.5 (concatenation conditioning, sinusoidal
    time embedding, 4 linear layers, SiLU).
    """

    def __init__(self, x_dim: int, cond_dim: int, hidden: int = 1024, t_dim: int = 128,
                 layers: int = 4):
        super().__init__()
        self.t_dim = t_dim
        self.mlp = MLP(x_dim + cond_dim + t_dim, hidden, x_dim, layers)

    def inputs(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return torch.cat([x_t, cond, sinusoidal_embedding(t, self.t_dim).to(x_t.dtype)], dim=-1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.inputs(x_t, t, cond))

    def conditioned(self, cond: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(x_t, t) -> X_theta(x_t, t, cond)`` for a reverse chain on a fixed condition.

        The condition is the same at every step, so its share of the first layer,
        ``W_c cond + b``, is computed once per chain instead of once per step (with the 1280-d
        visual condition of EfficientNet features and a 384-d text state that is 40% of a
        4-layer denoiser's work). The same function as :meth:`forward`, with the first layer's
        sum split over its three input blocks.
        """
        first = self.mlp.net[0]
        x_dim = first.in_features - cond.shape[1] - self.t_dim
        w_x, w_c, w_t = first.weight.split([x_dim, cond.shape[1], self.t_dim], dim=1)
        cond_part = nn.functional.linear(cond, w_c, first.bias)
        rest = self.mlp.net[1:]

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            emb = sinusoidal_embedding(t, self.t_dim).to(x_t.dtype)
            hidden = (cond_part + nn.functional.linear(x_t, w_x)
                      + nn.functional.linear(emb, w_t))
            return rest(hidden)

        return denoise

    def interactive_features(self, x_t: torch.Tensor, t: torch.Tensor,
                             cond: torch.Tensor) -> torch.Tensor:
        return self.mlp.hidden_features(self.inputs(x_t, t, cond))


class ScheduleOwner(nn.Module):
    """A module with its own noise schedule (a pure object, not a buffer), moved lazily to the
    device it is used on."""

    schedule: NoiseSchedule

    def schedule_on(self, device: torch.device) -> NoiseSchedule:
        if self.schedule.betas.device != device:
            self.schedule = self.schedule.to(device)
        return self.schedule


def val_top1(logits: Callable[[], torch.Tensor], labels: torch.Tensor) -> Callable[[], float]:
    """A selection metric for :class:`Stage`: top-1 of ``logits()`` on ``labels``, no grad."""
    def metric() -> float:
        with torch.no_grad():
            return (logits().argmax(dim=1) == labels).float().mean().item()
    return metric


