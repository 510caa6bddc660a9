"""Image files -> visual features, batched as extraction batches them: the one image-encoding
path of extraction, end-to-end evaluation, prediction and fine-tuning's evaluation passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..core.progress import progress_bar
from ..datasets.device_decode import device_image_batches
from ..datasets.images import ImageFiles, Preprocess
from ..store import from_storage, to_storage


def image_loader(paths: list[Path], data_config: dict[str, Any], batches: list[list[int]],
                 num_workers: int, device: torch.device, decode: str = "workers"
                 ) -> Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """``(uint8 images, indices, errors)`` in exactly the row batches given, decoded by the
    workers (``decode="workers"``) or on ``device`` (``"device"``: see
    :mod:`pipeline.datasets.device_decode`)."""
    preprocess = Preprocess.from_data_config(data_config)
    if decode == "device":
        return device_image_batches(paths, preprocess, batches, num_workers, device)
    return torch.utils.data.DataLoader(
        ImageFiles(paths, preprocess), batch_sampler=batches, num_workers=num_workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers else None)


def encode_images(vision, paths: list[Path], batch_size: int, precision: str, dtype: str,
                  num_workers: int = 2, description: str = "images", decode: str = "workers"
                  ) -> tuple[torch.Tensor, list[str]]:
    """Visual features of ``paths`` as the cache would hold them (cast through ``dtype``).

    Batches are ``[0, B), [B, 2B), ...`` as in extraction (shards are multiples of B), so with
    the cache's ``decode`` mode the features equal the cached ones bit for bit on the same device
    and precision. Returns the float32 features and one error message per path ("" when the
    image decoded).
    """
    vision.model.eval()  # inference: norm layers use running statistics, which stay put
    batches = [list(range(i, min(i + batch_size, len(paths))))
               for i in range(0, len(paths), batch_size)]
    loader = image_loader(paths, vision.data_config, batches, num_workers, vision.device, decode)
    feats, errors = [], [""] * len(paths)
    with progress_bar(description, len(paths)) as advance:
        for images, indices, errs in loader:
            with torch.inference_mode():
                out = to_storage(vision.features(images, precision), dtype)
            feats.append(from_storage(out, dtype).float())
            for i, e in zip(indices.tolist(), errs):
                errors[i] = e
            advance(len(indices))
    return (torch.cat(feats) if feats else torch.empty(0, vision.dim)), errors


def encode_records(vision, records: list, batch_size: int, precision: str, num_workers: int,
                   description: str, log: Callable[[str], None] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 features and labels of the records' images that decode (eval mode, the
    un-augmented preprocessing), and the mask of those records; unreadable images are left
    out, and ``log`` says how many."""
    feats, errors = encode_images(vision, [r.image for r in records], batch_size, precision,
                                  "float32", num_workers, description)
    keep = torch.tensor([not e for e in errors], dtype=torch.bool)
    if log is not None and not keep.all():
        log(f"{int((~keep).sum())} unreadable images left out (first: "
            f"{next(e for e in errors if e)})")
    return feats[keep], torch.tensor([r.label for r in records], dtype=torch.long)[keep], keep
