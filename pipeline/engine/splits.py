"""Validation splits drawn from train, shared by fine-tuning (stage one) and the heads (stage
two): model selection never looks at test."""

from __future__ import annotations

import torch


def held_out_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified ``(train_rows, val_rows)``: ``fraction`` of each class held out (>= 1 each)."""
    g = torch.Generator().manual_seed(seed)
    train_rows, val_rows = [], []
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        n_val = max(1, int(round(fraction * len(rows)))) if len(rows) > 1 else 0
        val_rows.append(rows[:n_val])
        train_rows.append(rows[n_val:])
    return torch.cat(train_rows).sort().values, torch.cat(val_rows).sort().values
