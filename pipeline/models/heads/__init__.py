"""The method registry: name -> config dataclass, defaults, and the head module it builds.

Every head satisfies :class:`~.contract.Head`: ``stages(train, val, ctx) -> list[Stage]`` for
the trainers, ``predict(visual, generator) -> logits`` for evaluation (test time sees visual
features only) and ``representations(visual, ...)``, its named intermediate outputs.
Ablations are configuration: ``visual`` is the aligned classifier with no alignment loss, the
Table 2 rows are ``marnet`` variants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ...core.config import apply_overrides
from .alignment import (
    ALIGNMENT_LOSSES,
    AlignConfig,
    AlignedClassifier,
    CDDConfig,
    SSANConfig,
    SWDConfig,
    TEAMConfig,
    alignment_fields,
)
from .common import Standardizer
from .contract import Dims, Head, RowState, SplitData, Stage, TrainContext, stage_batch
from .diffusion import DiffusionConfig
from .marnet import VARIANTS, MARNet, MARNetConfig
from .seda import SeDA, SeDAConfig


def no_fields(cfg: Any) -> tuple[str, ...]:
    return ()


def always(cfg: Any) -> bool:
    return True


def aligns(cfg: AlignConfig) -> bool:
    """An aligned classifier reads text unless it has no alignment loss (the visual head)."""
    return cfg.loss != "none"


def seda_reads_text(cfg: SeDAConfig) -> bool:
    """Every SeDA variant but ``dsl-only`` (stage 1 alone never reads text)."""
    return cfg.variant != "dsl-only"


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its config class, the defaults it sets, its builder, a summary."""
    config: type
    defaults: dict[str, Any]
    build: Callable[[Any, Dims], Head]
    summary: str
    fields: Callable[[Any], tuple[str, ...]] = no_fields  # extra cache fields (tokens)
    reads_text: Callable[[Any], bool] = always  # whether training reads text features


METHODS: dict[str, MethodSpec] = {
    "visual": MethodSpec(AlignConfig, {"loss": "none"}, AlignedClassifier,
                         "classifier on visual features (E_v + linear), CE only: the baseline",
                         reads_text=aligns),
    "ita": MethodSpec(AlignConfig, {"loss": "ita"}, AlignedClassifier,
                      "ITA (MGCA): symmetric InfoNCE + CE; identical to MARNet's EMA",
                      reads_text=aligns),
    "sdm": MethodSpec(AlignConfig, {"loss": "sdm", "tau": 0.02}, AlignedClassifier,
                      "SDM (IRRA): KL between image-text similarity and label matching",
                      reads_text=aligns),
    "swd": MethodSpec(SWDConfig, {}, AlignedClassifier,
                      "SWD: sliced Wasserstein distance between image and text class posteriors",
                      alignment_fields, aligns),
    "ssan": MethodSpec(SSANConfig, {}, AlignedClassifier,
                       "SSAN: shared classifier, text soft labels (ISA), triplet centroids (ESA)",
                       alignment_fields, aligns),
    "cdd": MethodSpec(CDDConfig, {}, AlignedClassifier,
                      "CDD (CAN): class-aware multi-kernel MMD, intra minus inter class",
                      alignment_fields, aligns),
    "team": MethodSpec(TEAMConfig, {}, AlignedClassifier,
                       "TEAM: token-level attention alignment scores + InfoNCE (needs --tokens)",
                       alignment_fields, aligns),
    "marnet": MethodSpec(MARNetConfig, {}, MARNet,
                         "MARNet: EMA + CDR (conditional feature diffusion) + fusion"),
    "seda": MethodSpec(SeDAConfig, {}, SeDA,
                       "SeDA (reconstructed from the abstract, methods §2.3 [R]): DSL toward "
                       "visual class centres, then DST + PFIN toward the text distribution",
                       reads_text=seda_reads_text),
}

# `--ablation` names (Table 2 rows) -> MARNet variants
ABLATIONS = {"ema": "ema", "mlp": "mlp", "cdr": "cdr", "fusion": "full"}


def resolve_overrides(method: str, ablation: str | None = None, fusion: str | None = None,
                      settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Method overrides from the command line: ``--ablation`` (a MARNet Table 2 row),
    ``--fusion`` and ``--set KEY=VALUE`` pairs."""
    overrides = dict(settings or {})
    if ablation is not None:
        if method != "marnet" or ablation not in ABLATIONS:
            raise ValueError(f"--ablation takes {', '.join(ABLATIONS)} with --method marnet")
        overrides["variant"] = ABLATIONS[ablation]
    if fusion is not None:
        if method != "marnet":
            raise ValueError(f"--fusion sets MARNet's fusion; --method {method} has none")
        overrides["fusion"] = fusion
    return overrides


def method_config(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The resolved config of method ``name`` with its defaults and ``overrides`` applied."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    spec = METHODS[name]
    return apply_overrides(apply_overrides(spec.config(), spec.defaults), overrides or {})


def build_head(name: str, cfg: Any, dims: Dims) -> Head:
    """The head module of method ``name`` for features of ``dims``, configured by ``cfg``."""
    return METHODS[name].build(cfg, dims)


def method_fields(name: str, cfg: Any) -> tuple[str, ...]:
    """Cache fields method ``name`` reads beyond visual/text/label (TEAM: token features)."""
    return METHODS[name].fields(cfg)


def method_reads_text(name: str, cfg: Any) -> bool:
    """Whether training method ``name`` reads text features (the visual head does not)."""
    return METHODS[name].reads_text(cfg)


__all__ = [
    "ABLATIONS",
    "ALIGNMENT_LOSSES",
    "AlignConfig",
    "DiffusionConfig",
    "Dims",
    "Head",
    "MARNetConfig",
    "METHODS",
    "RowState",
    "SplitData",
    "Stage",
    "Standardizer",
    "TrainContext",
    "VARIANTS",
    "build_head",
    "method_config",
    "method_fields",
    "method_reads_text",
    "resolve_overrides",
    "stage_batch",
]
