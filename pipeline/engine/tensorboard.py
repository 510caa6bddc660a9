"""``--tensorboard DIR``: the per-epoch records a run logs (to ``metrics.jsonl``, or a
fine-tune's history) also written as TensorBoard scalars, through
``torch.utils.tensorboard.SummaryWriter``.

A record ``{"stage": "fusion", "epoch": 3, "loss": 0.41, "lr": 0.001, "val_top1_fusion": 62.5}``
becomes the scalars ``fusion/loss``, ``fusion/lr``, ``fusion/val_top1_fusion`` at step 3: every
number of the record under its own name, the epoch as the step, the stage as the group. The
values are the record's own, so the curves and the JSON lines agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.config import require_modules

INSTALL_HINT = "--tensorboard needs the tensorboard package: pip install 'marnet[tensorboard]'"
NOT_SCALARS = ("stage", "epoch")  # the group and the step, not values


def require_tensorboard() -> type:
    """``SummaryWriter``, or a :class:`ConfigError` with the install hint."""
    return require_modules(["torch.utils.tensorboard"], INSTALL_HINT)[0].SummaryWriter


class ScalarLog:
    """Writes records as scalars into ``log_dir``; with ``log_dir`` None it does nothing, so
    callers log unconditionally. ``group`` names records that carry no ``stage``."""

    def __init__(self, log_dir: Path | str | None, group: str = "train"):
        self.group = group
        self.writer = None if log_dir is None else require_tensorboard()(str(log_dir))

    def __call__(self, record: dict[str, Any], **extra: float) -> None:
        """Write the numbers of ``record`` (and ``extra``, e.g. a learning rate the record
        does not hold) at step ``record["epoch"]``, and flush them to disk."""
        if self.writer is None:
            return
        group = record.get("stage", self.group)
        for name, value in {**record, **extra}.items():
            if name in NOT_SCALARS or isinstance(value, bool) or \
                    not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(f"{group}/{name}", value, int(record["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> "ScalarLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["INSTALL_HINT", "ScalarLog", "require_tensorboard"]
