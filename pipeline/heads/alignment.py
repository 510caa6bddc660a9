"""The shared alignment wrapper (METHODS §4): ``CE(C(E_v x_v), y) + lambda * L_align``.

``E_v`` / ``E_s`` are MARNet's EMA encoders (linear + LeakyReLU to ``d``), ``C`` is a linear
classifier on the visual side, and the test prediction is ``C(E_v x_v)``: image only. With
``loss="ita"`` this *is* MARNet's EMA module (Table 2 "+EMA" = Table 1 "ITA"); with
``loss="none"`` it is the visual baseline with the same architecture. Other alignment losses
register in :data:`ALIGNMENT_LOSSES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import ita_loss, sdm_loss
from .common import Batch, Dims, ProjectionEncoder, SplitData, Stage


@dataclass
class AlignConfig:
    """EMA / alignment-baseline knobs (METHODS §1.2, §3 #1-3, #13, #18, §4)."""

    loss: str = "ita"  # none | ita | sdm (| baselines registered in ALIGNMENT_LOSSES)
    d: int | None = None  # shared dim; None = the text dim (METHODS §3 #1)
    tau: float = 0.07
    learnable_tau: bool = False
    weight: float = 1.0  # beta (EMA) / lambda (baselines)
    ce_weight: float = 1.0  # alpha1
    multi_positive: bool = False  # same-class pairs are positives in ITA (§3 #18)


AlignLoss = Callable[["AlignedClassifier", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _ita(model: "AlignedClassifier", f_v: torch.Tensor, f_s: torch.Tensor,
         labels: torch.Tensor) -> torch.Tensor:
    return ita_loss(f_v, f_s, model.tau(), labels if model.cfg.multi_positive else None)


def _sdm(model: "AlignedClassifier", f_v: torch.Tensor, f_s: torch.Tensor,
         labels: torch.Tensor) -> torch.Tensor:
    return sdm_loss(f_v, f_s, labels, tau=model.cfg.tau)


# name -> (loss, needs a class-balanced sampler)
ALIGNMENT_LOSSES: dict[str, tuple[AlignLoss, bool]] = {
    "ita": (_ita, False),
    "sdm": (_sdm, True),
}


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == labels).float().mean().item()


class AlignedClassifier(nn.Module):
    """``E_v``, ``E_s`` and a linear classifier trained with CE + weight * alignment loss."""

    def __init__(self, cfg: AlignConfig, dims: Dims):
        super().__init__()
        if cfg.loss != "none" and cfg.loss not in ALIGNMENT_LOSSES:
            raise ValueError(f"unknown alignment loss {cfg.loss!r}; known: none, "
                             f"{', '.join(ALIGNMENT_LOSSES)}")
        self.cfg = cfg
        self.d = cfg.d or dims.text
        self.visual_encoder = ProjectionEncoder(dims.visual, self.d)
        self.text_encoder = ProjectionEncoder(dims.text, self.d) if cfg.loss != "none" else None
        self.classifier = nn.Linear(self.d, dims.classes)
        if cfg.learnable_tau:
            self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.tau)))

    def tau(self) -> torch.Tensor | float:
        """Fixed tau, or ``1 / exp(log_scale)`` with the scale clamped at 100 (§3 #2)."""
        if self.cfg.learnable_tau:
            return 1.0 / self.log_scale.exp().clamp(max=100.0)
        return self.cfg.tau

    def embed(self, visual: torch.Tensor) -> torch.Tensor:
        """``x_EMA = x_v' = g(E_v x_v)`` (METHODS §3 #3)."""
        return self.visual_encoder(visual)

    def predict(self, visual: torch.Tensor, generator: torch.Generator | None = None,
                chunk_rows: int = 8192) -> torch.Tensor:
        """Class logits from visual features alone (the test-time contract)."""
        return self.classifier(self.embed(visual))

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``alpha1 * CE + beta * L_align`` (MARNet Eq. 13 for ITA)."""
        f_v = self.embed(batch["visual"])
        ce = F.cross_entropy(self.classifier(f_v), batch["label"])
        parts = {"ce": ce.detach()}
        total = self.cfg.ce_weight * ce
        if self.text_encoder is not None:
            align_fn, _ = ALIGNMENT_LOSSES[self.cfg.loss]
            align = align_fn(self, f_v, self.text_encoder(batch["text"]), batch["label"])
            parts[self.cfg.loss] = align.detach()
            total = total + self.cfg.weight * align
        return total, parts

    def balanced(self) -> bool:
        return self.cfg.loss != "none" and ALIGNMENT_LOSSES[self.cfg.loss][1]

    def stages(self, train: SplitData, val: SplitData, ctx) -> list[Stage]:
        def val_top1() -> float:
            with torch.no_grad():
                return top1(self.predict(val["visual"]), val["label"])

        return [Stage("align", [self], self.loss, {"align": ([self], val_top1)},
                      sampler="balanced" if self.balanced() else "random")]
