"""The device-resident trainer both stages run on: training settings, the model a run saves,
index batches, one optimisation step, a stage's epochs with model selection, top-k metrics.

The whole split lives in device memory; batches are index permutations (or class-balanced
index draws), with no DataLoader and no per-sample Python. Loss parts accumulate on the device
and are read once per epoch, so the loop never waits on the host. ``train-heads`` feeds it
cached features; ``finetune`` feeds the same stages live backbone features.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..core.config import (
    ConfigError,
    require_choice,
    require_device,
    require_positive,
    require_range,
)
from ..core.progress import progress_bar
from ..models.heads import (
    Dims,
    SplitData,
    Stage,
    Standardizer,
    TrainContext,
    build_head,
    stage_batch,
)
from ..store import CacheError
from .backbones import PRECISIONS


@dataclass
class TrainConfig:
    """Optimisation and data settings shared by every method (methods §3.20)."""

    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    warmup_epochs: int = 1
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    val_fraction: float = 0.1  # held out of train when the cache has no val split
    balanced_classes: int = 32  # classes per batch for the class-balanced sampler
    chunk_rows: int = 8192  # rows per chunk when sampling diffusion chains

    def __post_init__(self) -> None:
        """Refuse a bad option now, before a cache is read."""
        for name in ("epochs", "batch_size", "balanced_classes", "chunk_rows"):
            require_positive(f"--{name.replace('_', '-')}", getattr(self, name))
        require_range("--lr", self.lr, 0.0)  # 0 is allowed: the heads stay at their init
        require_range("weight_decay", self.weight_decay, 0.0)
        require_range("warmup_epochs", self.warmup_epochs, 0)
        require_range("val_fraction", self.val_fraction, 0.0, 1.0, low_open=True)
        if self.val_fraction == 1:
            raise ConfigError("val_fraction must be < 1 (some rows must stay for training)")
        require_device("--device", self.device)
        require_choice("--precision", self.precision, PRECISIONS)


class HeadsModel(nn.Module):
    """What a run saves: feature standardisers plus the method's head."""

    def __init__(self, method: str, cfg: Any, dims: Dims):
        super().__init__()
        self.method = method
        self.norm_visual = Standardizer(dims.visual)
        self.norm_text = Standardizer(dims.text)
        self.head = build_head(method, cfg, dims)

    @torch.no_grad()
    def predict(self, visual: torch.Tensor, generator: torch.Generator | None = None,
                chunk_rows: int = 8192) -> torch.Tensor:
        """Logits from raw (cached or freshly extracted) visual features: image only."""
        self.eval()
        return self.head.predict(self.norm_visual(visual), generator, chunk_rows)

    @torch.no_grad()
    def diagnostics(self, visual: torch.Tensor, labels: torch.Tensor,
                    generator: torch.Generator | None = None,
                    chunk_rows: int = 8192) -> dict[str, float]:
        """The head's own measurements on a split (its optional ``split_diagnostics``, e.g.
        SeDA's ``z_top1``), from raw visual features and labels; empty when it has none."""
        probe = getattr(self.head, "split_diagnostics", None)
        if probe is None:
            return {}
        self.eval()
        return probe(self.norm_visual(visual), labels, generator, chunk_rows)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


class BatchSampler:
    """Index batches on the device: a permutation per epoch, or class-balanced draws."""

    def __init__(self, labels: torch.Tensor, batch_size: int, generator: torch.Generator,
                 balanced: bool, classes_per_batch: int):
        self.n = len(labels)
        self.batch_size = min(batch_size, self.n)
        self.steps = max(1, self.n // self.batch_size)
        self.generator = generator
        self.balanced = balanced
        if balanced:
            classes = int(labels.max()) + 1
            counts = torch.bincount(labels, minlength=classes)
            present = (counts > 0).nonzero().flatten()
            self.present = present
            self.per_batch = min(classes_per_batch, len(present))
            self.per_class = max(2, self.batch_size // self.per_batch)
            order = torch.argsort(labels, stable=True)
            self.offsets = torch.cumsum(counts, 0) - counts
            self.counts = counts
            self.order = order

    def epoch(self) -> list[torch.Tensor]:
        device = self.order.device if self.balanced else self.generator.device
        if not self.balanced:
            perm = torch.randperm(self.n, device=device, generator=self.generator)
            return [perm[i * self.batch_size:(i + 1) * self.batch_size] for i in range(self.steps)]
        out = []
        for _ in range(self.steps):
            pick = torch.randperm(len(self.present), device=device, generator=self.generator)
            classes = self.present[pick[:self.per_batch]]
            u = torch.rand(len(classes), self.per_class, device=device, generator=self.generator)
            pos = (u * self.counts[classes, None]).long()
            out.append(self.order[(self.offsets[classes, None] + pos).flatten()])
        return out


def _lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def train_step(stage: Stage, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               precision: str, device_type: str,
               after_backward: Callable[[], None] | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step of ``stage.loss`` (bf16 autocast when asked); returns the
    detached loss and its parts, still on the device (no host sync). ``after_backward`` runs
    between the backward pass and the update (data-parallel gradient synchronisation)."""
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss, parts = stage.loss(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:
        after_backward()
    optimizer.step()
    return loss.detach(), parts


def run_stage(stage: Stage, train: SplitData, cfg: TrainConfig, ctx: TrainContext,
              precision: str, log_metrics: Callable[[dict], None]) -> dict[str, float]:
    """Train ``stage.modules``; keep each selection group at its best validation epoch.

    The stage's ``prepare`` runs first; the row state it returns joins every batch
    (:func:`~marnet.pipeline.models.heads.stage_batch`), and the stage's ``diagnostics`` of it
    join the first epoch's record as ``prepared``. With ``stage.train_rows`` only those
    train rows are sampled."""
    rows = (stage.prepare() if stage.prepare else None) or {}
    prepared = {"prepared": stage.diagnostics(rows)} if stage.diagnostics is not None else {}
    epochs = stage.epochs if stage.epochs is not None else cfg.epochs
    params = [p for m in stage.modules for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    subset = stage.train_rows
    labels = train["label"] if subset is None else train["label"][subset]
    sampler = BatchSampler(labels, cfg.batch_size, ctx.generator, stage.sampler == "balanced",
                           cfg.balanced_classes)
    total = epochs * sampler.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total, min(total // 2, cfg.warmup_epochs * sampler.steps)))
    best: dict[str, tuple[float, list[dict[str, torch.Tensor]]]] = {}
    device_type = ctx.device.type
    with progress_bar(f"train {stage.name}", epochs) as advance:
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            for m in stage.modules:
                m.train()
            sums: dict[str, torch.Tensor] = {}
            for index in sampler.epoch():
                if subset is not None:  # positions in the subset -> train rows
                    index = subset[index]
                batch = stage_batch(stage, train, rows, index)
                loss, parts = train_step(stage, optimizer, batch, precision, device_type)
                scheduler.step()
                for k, v in {"loss": loss, **parts}.items():
                    sums[k] = sums.get(k, 0) + v.float()
            for m in stage.modules:
                m.eval()
            record = {"stage": stage.name, "epoch": epoch,
                      **{k: round(float(v) / sampler.steps, 5) for k, v in sums.items()},
                      "lr": scheduler.get_last_lr()[0], **(prepared if epoch == 1 else {})}
            for group, (modules, metric) in stage.select.items():
                score = metric()
                record[f"val_top1_{group}"] = round(score, 5)
                if group not in best or score > best[group][0]:
                    best[group] = (score, [_clone_state(m) for m in modules])
            record["seconds"] = round(time.perf_counter() - t0, 3)
            log_metrics(record)
            advance(1, info=" ".join(f"{k}={v:.3g}" for k, v in record.items()
                                     if k.startswith(("loss", "val_top1"))))
    for group, (modules, _) in stage.select.items():
        for m, state in zip(modules, best[group][1]):
            m.load_state_dict(state)
    return {group: score for group, (score, _) in best.items()}


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def topk_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (%) and per-class top-1 (%; None for classes with no samples)."""
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    hit1 = topk[:, 0] == labels
    hit5 = (topk == labels[:, None]).any(dim=1)
    per_class = []
    for c in range(num_classes):
        mask = labels == c
        per_class.append(round(100 * hit1[mask].float().mean().item(), 3) if mask.any() else None)
    return {"top1": round(100 * hit1.float().mean().item(), 3),
            "top5": round(100 * hit5.float().mean().item(), 3),
            "n": int(len(labels)), "per_class_top1": per_class}


def evaluate_features(model: HeadsModel, visual: torch.Tensor, labels: torch.Tensor,
                      num_classes: int, ctx: TrainContext) -> dict[str, Any]:
    """Metrics of ``model`` on raw visual features, with the run's fixed evaluation noise,
    and the head's own diagnostics of the split when it has some (:meth:`HeadsModel.diagnostics`)."""
    logits = model.predict(visual, ctx.eval_generator(), ctx.chunk_rows)
    metrics = topk_metrics(logits.float(), labels, num_classes)
    diagnostics = model.diagnostics(visual, labels, ctx.eval_generator(), ctx.chunk_rows)
    return {**metrics, "diagnostics": diagnostics} if diagnostics else metrics


def standardise_tokens(norm: Standardizer, tokens: torch.Tensor, name: str,
                       chunk_rows: int = 4096) -> torch.Tensor:
    """``norm`` applied to every token, chunk by chunk, kept in the tokens' dtype."""
    if tokens.shape[-1] != norm.mean.shape[0]:
        raise CacheError(f"{name}_tokens have width {tokens.shape[-1]} but the pooled {name} "
                         f"features {norm.mean.shape[0]}; token methods share the encoder "
                         "between them, so they need a backbone whose token width equals its "
                         "feature width")
    out = torch.empty_like(tokens)
    for start in range(0, len(tokens), chunk_rows):
        out[start:start + chunk_rows] = norm(tokens[start:start + chunk_rows].float())
    return out
