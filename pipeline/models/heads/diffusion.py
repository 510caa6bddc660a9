"""What MARNet's CDR and SeDA's two stages share: the conditional diffusion's settings, the
chunked reverse chain, and the diffusion-free MLP map both ablate against."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import ConfigError, require_choice, require_positive, require_range
from ..losses import feature_mse
from ..schedule import NoiseSchedule, ScheduleConfig
from .common import MLP, ConditionalDenoiser, row_chunks
from .contract import Batch, Dims

SAMPLERS = ("ddpm", "ddim")


@dataclass
class DiffusionConfig:
    """The conditional diffusion shared by CDR and SeDA's stages (methods §3.5, #8-10).

    ``hidden``/``layers``/``t_dim``: the x0-denoiser MLP (width, linear layers, sinusoidal
    time-embedding size). ``schedule``: T and the beta schedule. ``sampler``: the test-time
    reverse chain, ``ddpm`` (full ancestral chain, the paper's) or ``ddim`` with ``steps``
    jumps and stochasticity ``eta``. ``test_samples``: average the logits of S chains.
    ``val_sampler``/``val_steps``: the cheaper chain used for per-epoch model selection.
    """

    hidden: int = 1024
    layers: int = 4
    t_dim: int = 128
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampler: str = "ddpm"
    steps: int = 20
    eta: float = 0.0
    test_samples: int = 1
    val_sampler: str = "ddim"
    val_steps: int = 10

    # settings that act only with another one (checked for every --set, config.apply_overrides)
    REQUIRES: ClassVar[dict[str, tuple[str, str]]] = {
        "steps": ("sampler", "ddim"), "eta": ("sampler", "ddim"),
        "val_steps": ("val_sampler", "ddim")}

    def __post_init__(self) -> None:
        require_choice("diffusion.sampler", self.sampler, SAMPLERS)
        require_choice("diffusion.val_sampler", self.val_sampler, SAMPLERS)
        for name in ("hidden", "layers", "t_dim", "steps", "test_samples", "val_steps"):
            require_positive(f"diffusion.{name}", getattr(self, name))
        require_positive("diffusion.schedule.steps", self.schedule.steps)
        for name, sampler in (("steps", self.sampler), ("val_steps", self.val_sampler)):
            if sampler == "ddim" and getattr(self, name) > self.schedule.steps:
                raise ConfigError(f"diffusion.{name} = {getattr(self, name)} exceeds the noise "
                                  f"schedule's T = {self.schedule.steps} "
                                  "(diffusion.schedule.steps): a DDIM chain visits at most T "
                                  f"steps; set diffusion.{name} to {self.schedule.steps} or less")
        require_range("diffusion.eta", self.eta, 0.0, 1.0)


def generate_chunked(schedule: NoiseSchedule, denoiser: ConditionalDenoiser, cond: torch.Tensor,
                     out_dim: int, method: str, steps: int, eta: float,
                     generator: torch.Generator, chunk_rows: int) -> torch.Tensor:
    """Reverse-chain samples for every row of ``cond``, ``chunk_rows`` at a time (the
    condition's share of the denoiser computed once per chunk:
    :meth:`ConditionalDenoiser.conditioned`)."""
    parts = []
    for rows in row_chunks(cond.shape[0], chunk_rows):
        c = cond[rows]
        parts.append(schedule.sample(denoiser.conditioned(c), (c.shape[0], out_dim),
                                     cond.device, method, steps, eta, generator))
    return torch.cat(parts) if parts else cond.new_zeros(0, out_dim)


class MLPControl(nn.Module):
    """A 4-layer MLP mapping ``x_v`` into the text space, no diffusion, trained with
    ``ce_weight * CE + mse_weight * MSE(map, x_s)``: MARNet's +MLP row (methods §3.15) and SeDA's
    one-step variant."""

    def __init__(self, dims: Dims, hidden: int, layers: int, ce_weight: float = 1.0,
                 mse_weight: float = 1.0):
        super().__init__()
        self.ce_weight, self.mse_weight = ce_weight, mse_weight
        self.mlp = MLP(dims.visual, hidden, dims.text, layers)
        self.classifier = nn.Linear(dims.text, dims.classes)

    def predict(self, visual: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.mlp(visual))

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mapped = self.mlp(batch["visual"])
        ce = F.cross_entropy(self.classifier(mapped), batch["label"])
        mse = feature_mse(mapped, batch["text"])
        return self.ce_weight * ce + self.mse_weight * mse, {"mlp_ce": ce.detach(),
                                                             "mse": mse.detach()}
