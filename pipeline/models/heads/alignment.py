"""The shared alignment wrapper (methods §4): ``CE(C(E_v x_v), y) + lambda * L_align``.

``E_v`` / ``E_s`` are MARNet's EMA encoders (linear + LeakyReLU to ``d``), ``C`` is a linear
classifier on the visual side, and the test prediction is ``C(E_v x_v)``: image only. With
``loss="ita"`` this *is* MARNet's EMA module (Table 2 "+EMA" = Table 1 "ITA"); with
``loss="none"`` it is the visual baseline with the same architecture. The Table 1 baselines
register in :data:`ALIGNMENT_LOSSES`: ``ita``, ``sdm``, ``swd``, ``ssan``, ``cdd``, ``team``.
A registered loss may bring its own config subclass, extra modules (SWD's text classifier),
extra cache fields (TEAM's tokens), auxiliary terms and the class-balanced sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import (
    cdd_loss,
    ita_loss,
    random_directions,
    sdm_loss,
    sliced_wasserstein,
    ssan_esa_loss,
    ssan_isa_loss,
    symmetric_infonce,
    token_alignment_scores,
)
from .common import ProjectionEncoder, val_top1
from .contract import Batch, Dims, SplitData, Stage


@dataclass
class AlignConfig:
    """EMA / alignment-baseline knobs (methods §1.2, §3.1-3.3, §3.13, §3.18, §4)."""

    loss: str = "ita"  # none | a name in ALIGNMENT_LOSSES
    d: int | None = None  # shared dim; None = the text dim (methods §3.1)
    tau: float = 0.07
    learnable_tau: bool = False
    weight: float = 1.0  # beta (EMA) / lambda (baselines)
    ce_weight: float = 1.0  # alpha1
    multi_positive: bool = False  # same-class pairs are positives in ITA / TEAM (methods §3.18)


@dataclass
class SWDConfig(AlignConfig):
    """SWD (methods §4.3): ``lambda SWD(softmax C(f_v), softmax C_s(f_s))`` plus the CE of
    ``C_s``."""

    loss: str = "swd"
    projections: int = 128  # M random unit directions, drawn afresh every step
    text_ce_weight: float = 1.0  # CE of the separate text classifier C_s


@dataclass
class SSANConfig(AlignConfig):
    """SSAN (methods §4.4) with BIT-DA/SSAN's defaults; ``weight`` is the ESA weight beta.

    The total is ``CE_text + ISA + beta * ESA`` with a shared classifier. ISA holds the visual
    hard CE (``(1 - a) CE + a L_soft``), so the wrapper's own CE weight is 0.
    """

    loss: str = "ssan"
    weight: float = 0.004  # beta (ESA)
    ce_weight: float = 0.0  # the visual CE is inside ISA
    isa_alpha: float = 0.1  # a
    temperature: float = 5.0  # T of the text soft labels
    text_ce_weight: float = 1.0  # CE of the shared classifier on text (the source domain)


@dataclass
class CDDConfig(AlignConfig):
    """CDD (methods §4.5): class-aware multi-kernel MMD between ``f_v`` and ``f_s``."""

    loss: str = "cdd"
    kernels: int = 5
    kernel_mul: float = 2.0


@dataclass
class TEAMConfig(AlignConfig):
    """TEAM (methods §4.6): InfoNCE on token-level scores plus ``global_weight`` * global ITA."""

    loss: str = "team"
    attention_tau: float = 0.1  # tau_a of the token attention
    global_weight: float = 1.0
    # largest [B, B, L, W] intermediate (MB) scored at once; above it, image blocks under
    # activation checkpointing (same scores, memory per block; 0 = always the whole batch)
    block_mb: float = 512.0


@dataclass
class AlignInputs:
    """What an alignment loss sees for one batch."""

    batch: Batch  # the stage's fields: visual, text, label and any extra fields
    f_v: torch.Tensor  # g(E_v x_v)
    f_s: torch.Tensor  # g(E_s x_s)
    logits: torch.Tensor  # C(f_v)
    generator: torch.Generator | None  # the training RNG (random directions)

    @property
    def labels(self) -> torch.Tensor:
        return self.batch["label"]


# (L_align, auxiliary terms): the total is
# ce_weight * CE + weight * L_align + sum(auxiliary terms, each already weighted)
LossTerms = tuple[torch.Tensor, dict[str, torch.Tensor]]
AlignLoss = Callable[["AlignedClassifier", AlignInputs], LossTerms]


@dataclass(frozen=True)
class AlignmentLoss:
    """A registered alignment loss and what it needs from the wrapper and the trainer."""

    compute: AlignLoss
    balanced: bool = False  # needs class-balanced batches (class statistics)
    config: type = AlignConfig  # the config class carrying its knobs
    parts: Callable[[Any, Dims, int], dict[str, nn.Module]] | None = None  # extra modules
    fields: tuple[str, ...] = ()  # extra cache fields it reads


def _ita(model: "AlignedClassifier", x: AlignInputs) -> LossTerms:
    return ita_loss(x.f_v, x.f_s, model.tau(), model.positives(x.labels)), {}


def _sdm(model: "AlignedClassifier", x: AlignInputs) -> LossTerms:
    return sdm_loss(x.f_v, x.f_s, x.labels, tau=model.cfg.tau), {}


def _swd_parts(cfg: SWDConfig, dims: Dims, d: int) -> dict[str, nn.Module]:
    return {"text_classifier": nn.Linear(d, dims.classes)}


def _swd(model: "AlignedClassifier", x: AlignInputs) -> LossTerms:
    cfg: SWDConfig = model.cfg
    text_logits = model.parts["text_classifier"](x.f_s)
    directions = random_directions(x.logits.shape[1], cfg.projections, x.generator,
                                   x.logits.device)
    swd = sliced_wasserstein(F.softmax(x.logits, dim=1), F.softmax(text_logits, dim=1),
                             directions)
    return swd, {"text_ce": cfg.text_ce_weight * F.cross_entropy(text_logits, x.labels)}


def _ssan(model: "AlignedClassifier", x: AlignInputs) -> LossTerms:
    cfg: SSANConfig = model.cfg
    text_logits = model.classifier(x.f_s)  # the shared classifier
    isa = ssan_isa_loss(x.logits, text_logits, x.labels, cfg.isa_alpha, cfg.temperature)
    text_ce = cfg.text_ce_weight * F.cross_entropy(text_logits, x.labels)
    return ssan_esa_loss(x.f_s, x.f_v, x.labels), {"isa": isa, "text_ce": text_ce}


def _cdd(model: "AlignedClassifier", x: AlignInputs) -> LossTerms:
    cfg: CDDConfig = model.cfg
    return cdd_loss(x.f_v, x.f_s, x.labels, cfg.kernels, cfg.kernel_mul), {}


TOKEN_FIELDS = ("visual_tokens", "text_tokens", "text_mask")


def _team(model: "AlignedClassifier", x: AlignInputs) -> LossTerms:
    """Tokens go through the same ``E_v`` / ``E_s`` as the pooled features, so the token-level
    alignment shapes the encoder the classifier uses (the backbone is shared in TEAM)."""
    cfg: TEAMConfig = model.cfg
    mask = x.batch["text_mask"].bool()
    words = mask.any(dim=0)  # drop the padding columns no text of the batch uses
    visual_tokens = model.visual_encoder(x.batch["visual_tokens"].to(x.f_v.dtype))
    text_tokens = model.text_encoder(x.batch["text_tokens"][:, words].to(x.f_s.dtype))
    scores = token_alignment_scores(visual_tokens, text_tokens, mask[:, words], cfg.attention_tau,
                                    block_mb=cfg.block_mb)
    positives = model.positives(x.labels)
    token_loss = symmetric_infonce(scores / model.tau(), positives)
    return token_loss + cfg.global_weight * ita_loss(x.f_v, x.f_s, model.tau(), positives), {}


ALIGNMENT_LOSSES: dict[str, AlignmentLoss] = {
    "ita": AlignmentLoss(_ita),
    "sdm": AlignmentLoss(_sdm, balanced=True),
    "swd": AlignmentLoss(_swd, config=SWDConfig, parts=_swd_parts),
    "ssan": AlignmentLoss(_ssan, balanced=True, config=SSANConfig),
    "cdd": AlignmentLoss(_cdd, balanced=True, config=CDDConfig),
    "team": AlignmentLoss(_team, config=TEAMConfig, fields=TOKEN_FIELDS),
}


def alignment_fields(cfg: AlignConfig) -> tuple[str, ...]:
    """Cache fields an aligned classifier reads beyond ``visual``, ``text`` and ``label``."""
    return ALIGNMENT_LOSSES[cfg.loss].fields if cfg.loss in ALIGNMENT_LOSSES else ()


class AlignedClassifier(nn.Module):
    """``E_v``, ``E_s`` and a linear classifier trained with CE + weight * alignment loss."""

    def __init__(self, cfg: AlignConfig, dims: Dims):
        super().__init__()
        if cfg.loss != "none" and cfg.loss not in ALIGNMENT_LOSSES:
            raise ValueError(f"unknown alignment loss {cfg.loss!r}; known: none, "
                             f"{', '.join(ALIGNMENT_LOSSES)}")
        self.spec = ALIGNMENT_LOSSES.get(cfg.loss)
        if self.spec is not None and not isinstance(cfg, self.spec.config):
            raise ValueError(f"alignment loss {cfg.loss!r} needs its own settings "
                             f"({self.spec.config.__name__}); use --method {cfg.loss}")
        self.cfg = cfg
        self.d = cfg.d or dims.text
        self.visual_encoder = ProjectionEncoder(dims.visual, self.d)
        self.text_encoder = ProjectionEncoder(dims.text, self.d) if self.spec else None
        self.classifier = nn.Linear(self.d, dims.classes)
        parts = self.spec.parts(cfg, dims, self.d) if self.spec and self.spec.parts else {}
        self.parts = nn.ModuleDict(parts)
        if cfg.learnable_tau:
            self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.tau)))

    def tau(self) -> torch.Tensor | float:
        """Fixed tau, or ``1 / exp(log_scale)`` with the scale clamped at 100 (methods §3.2)."""
        if self.cfg.learnable_tau:
            return 1.0 / self.log_scale.exp().clamp(max=100.0)
        return self.cfg.tau

    def positives(self, labels: torch.Tensor) -> torch.Tensor | None:
        """The labels for multi-positive InfoNCE (methods §3.18), or None for one positive
        per row."""
        return labels if self.cfg.multi_positive else None

    def embed(self, visual: torch.Tensor) -> torch.Tensor:
        """``x_EMA = x_v' = g(E_v x_v)`` (methods §3.3)."""
        return self.visual_encoder(visual)

    def predict(self, visual: torch.Tensor, generator: torch.Generator | None = None,
                chunk_rows: int = 8192) -> torch.Tensor:
        """Class logits from visual features alone (the test-time contract)."""
        return self.classifier(self.embed(visual))

    def representations(self, visual: torch.Tensor, generator: torch.Generator | None = None,
                        chunk_rows: int = 8192) -> dict[str, torch.Tensor]:
        """The image-only pass: ``embedding`` (``x_EMA`` / ``f_v``) and its ``logits``."""
        embedding = self.embed(visual)
        return {"embedding": embedding, "logits": self.classifier(embedding)}

    def loss(self, batch: Batch, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``ce_weight * CE + weight * L_align + auxiliary terms`` (MARNet Eq. 13 for ITA)."""
        f_v = self.embed(batch["visual"])
        logits = self.classifier(f_v)
        ce = F.cross_entropy(logits, batch["label"])
        parts = {"ce": ce.detach()}
        total = self.cfg.ce_weight * ce
        if self.spec is not None:
            align, aux = self.alignment_terms(batch, f_v, logits, generator)
            parts[self.cfg.loss] = align.detach()
            total = total + self.cfg.weight * align
            for name, term in aux.items():
                parts[name] = term.detach()
                total = total + term
        return total, parts

    def alignment_terms(self, batch: Batch, f_v: torch.Tensor, logits: torch.Tensor,
                        generator: torch.Generator | None = None) -> LossTerms:
        """``(L_align, auxiliary terms)`` of the registered loss for one batch (with grads)."""
        inputs = AlignInputs(batch, f_v, self.text_encoder(batch["text"]), logits, generator)
        return self.spec.compute(self, inputs)

    def balanced(self) -> bool:
        return self.spec is not None and self.spec.balanced

    def stages(self, train: SplitData, val: SplitData, ctx) -> list[Stage]:
        fields = ("visual", "text", "label") + (self.spec.fields if self.spec else ())
        metric = val_top1(lambda: self.predict(val["visual"]), val["label"])
        return [Stage("align", [self], lambda batch: self.loss(batch, ctx.generator),
                      {"align": ([self], metric)},
                      sampler="balanced" if self.balanced() else "random", fields=fields)]
