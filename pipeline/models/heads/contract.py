"""The head contract: what the trainers hand a head and what they expect back.

A head is a plain ``nn.Module`` that satisfies :class:`Head`:

- ``stages(train, val, ctx) -> list[Stage]``: its training phases, in order. Each
  :class:`Stage` names the modules it trains, its loss on one batch, its model-selection
  metrics, and the split fields its batches hold. The trainer (``engine.training.run_stage``
  on cached features; ``stage1.finetune.EndToEnd`` with a live backbone for a head's first
  stage) owns the optimiser, the batches and the epochs.
- ``predict(visual, generator, chunk_rows) -> logits``: classification from standardised
  visual features alone. Test time never sees text.
- ``representations(visual, generator, chunk_rows) -> dict``: one image-only pass with every
  intermediate a figure or a diagnosis reads, under the names the head documents (MARNet:
  ``x_cdr``, ``mlp_map``, ``ema_logits``, ``cdr_logits``, ``fusion_logits``; SeDA: ``z``,
  ``m``, ``s_hat_0``, ``logits``; aligned classifiers: ``embedding``, ``logits``). Figures
  and probes read these instead of re-running a branch themselves.
- optionally ``split_diagnostics(visual, labels, generator, chunk_rows) -> dict``: the head's
  own measurements on a split (SeDA: ``z_top1``); a head run records them with its val and
  test metrics.

Per-row state: a stage whose loss needs values computed once from the whole train split
(MARNet's sampled ``x_CDR`` for the fusion stage, SeDA's semantic features ``z``) makes them
in ``prepare()`` and returns them as a :data:`RowState`, one row per train row. The trainer
indexes them with each batch's rows and hands them to the loss as batch fields, exactly as it
hands the split's own fields; nothing is stashed on the module, and a loss never sees row
indices. A stage with a ``prepare`` therefore needs the whole split's features up front, so it
cannot be a head's first stage under end-to-end training (the backbone moves).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn

Batch = dict[str, torch.Tensor]
# per-train-row tensors a stage makes once in ``prepare()``; first dimension = train rows
RowState = dict[str, torch.Tensor]
LossFn = Callable[[Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Dims:
    """Feature and label sizes a head is built for."""

    visual: int
    text: int
    classes: int


@dataclass
class SplitData:
    """One split on the device, standardised: ``visual``, ``text``, ``label`` (and extras)."""

    tensors: Batch

    def __len__(self) -> int:
        return len(self.tensors["label"])

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]


@dataclass
class Stage:
    """One training phase of a head.

    ``modules`` are trained with ``loss(batch) -> (loss, parts)``. ``select`` maps a group name
    to ``(modules, val_metric)``: after each epoch each group keeps its parameters from the
    epoch with the best validation metric (groups with disjoint parameters select
    independently). ``prepare`` runs once before the first epoch and may return a
    :data:`RowState`, whose rows the trainer adds to every batch. ``sampler`` is ``random``
    (a permutation) or ``balanced`` (classes x samples per class). ``fields`` are the split's
    fields a batch holds. ``train_rows`` restricts training to those train rows (a fold of a
    cross-fit); None trains on all of them. ``diagnostics`` measures the prepared row state
    once (SeDA: how well ``z`` classifies the train and val rows); the trainer logs what it
    returns, and a head run keeps it in ``results.json``.
    """

    name: str
    modules: list[nn.Module]
    loss: LossFn
    select: dict[str, tuple[list[nn.Module], Callable[[], float]]] = field(default_factory=dict)
    epochs: int | None = None  # None: the trainer's default
    prepare: Callable[[], RowState | None] | None = None
    sampler: str = "random"
    fields: tuple[str, ...] = ("visual", "text", "label")
    train_rows: torch.Tensor | None = None
    diagnostics: Callable[[RowState], dict[str, float]] | None = None


def stage_batch(stage: Stage, split: SplitData, rows: RowState, index: torch.Tensor) -> Batch:
    """The batch ``stage.loss`` reads for the train rows ``index``: the stage's fields of
    ``split`` and its prepared row state, both at those rows."""
    batch = {name: split[name][index] for name in stage.fields}
    batch.update({name: values[index] for name, values in rows.items()})
    return batch


@dataclass
class TrainContext:
    """What a head needs from the trainer: the device, the training RNG, the eval seed."""

    device: torch.device
    generator: torch.Generator
    eval_seed: int = 0
    chunk_rows: int = 8192
    # True when a backbone trains with the head (``marnet finetune``): the visual features of
    # a split are not known in advance, so statistics of them (SeDA's class centres) are
    # running estimates updated from each batch instead of exact train-split values
    moving_features: bool = False

    def eval_generator(self) -> torch.Generator:
        """A fresh generator seeded with ``eval_seed``: evaluations are repeatable."""
        return torch.Generator(device=self.device).manual_seed(self.eval_seed)


@runtime_checkable
class Head(Protocol):
    """What every registered method builds (see the module docstring)."""

    def stages(self, train: SplitData, val: SplitData, ctx: TrainContext) -> list[Stage]: ...

    def predict(self, visual: torch.Tensor, generator: torch.Generator | None = None,
                chunk_rows: int = 8192) -> torch.Tensor: ...

    def representations(self, visual: torch.Tensor, generator: torch.Generator | None = None,
                        chunk_rows: int = 8192) -> dict[str, torch.Tensor]: ...
