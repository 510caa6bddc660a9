"""Images (files, or stored in tar shards or tables) -> visual features, batched as extraction batches them: the one image-encoding
path of extraction, end-to-end evaluation (clean or corrupted), prediction and fine-tuning's
evaluation passes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from ..core.progress import progress_bar
from ..datasets.corruptions import CorruptedImageFiles, Corruption
from ..datasets.device_decode import device_image_batches
from ..datasets.images import ImageFiles, Preprocess
from ..datasets.sources import ImageRef
from ..store import from_storage, to_storage


def image_loader(paths: list[ImageRef], data_config: dict[str, Any], batches: list[list[int]],
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


def encode_images(vision, paths: list[ImageRef], batch_size: int, precision: str, dtype: str,
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


def readable(errors: list[str], log: Callable[[str], None] | None = None) -> torch.Tensor:
    """The mask of the images that decoded (an empty error message); ``log`` says how many
    were left out and why the first one was."""
    keep = torch.tensor([not e for e in errors], dtype=torch.bool)
    if log is not None and not keep.all():
        log(f"{int((~keep).sum())} unreadable images left out (first: "
            f"{next(e for e in errors if e)})")
    return keep


def encode_records(vision, records: list, batch_size: int, precision: str, num_workers: int,
                   description: str, log: Callable[[str], None] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 features and labels of the records' images that decode (eval mode, the
    un-augmented preprocessing), and the mask of those records; unreadable images are left
    out, and ``log`` says how many."""
    feats, errors = encode_images(vision, [r.image for r in records], batch_size, precision,
                                  "float32", num_workers, description)
    keep = readable(errors, log)
    return feats[keep], torch.tensor([r.label for r in records], dtype=torch.long)[keep], keep


def encode_corrupted(vision, paths: list[ImageRef], keys: list[str], settings: Sequence[Corruption],
                     batch_size: int, precision: str, dtype: str, num_workers: int = 2,
                     description: str = "corrupted images"
                     ) -> Iterator[tuple[Corruption, torch.Tensor, list[str], float]]:
    """``(setting, features, errors, seconds spent corrupting)`` per corruption setting, in
    order, as :func:`encode_images` computes them from the corrupted images (same batches,
    precision and storage dtype).

    One DataLoader serves every setting, so its workers start once: they decode each image,
    corrupt it (``settings[s](image, keys[i])``) and preprocess it; a batch never mixes
    settings. The progress line reports what corruption costs per image in the workers.
    """
    vision.model.eval()
    n = len(paths)
    if not n or not settings:
        return
    batches = [list(range(s * n + i, s * n + min(i + batch_size, n)))
               for s in range(len(settings)) for i in range(0, n, batch_size)]
    dataset = CorruptedImageFiles(paths, keys, Preprocess.from_data_config(vision.data_config),
                                  settings)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers,
        pin_memory=vision.device.type == "cuda", prefetch_factor=4 if num_workers else None)
    feats: list[torch.Tensor] = []
    errors = [""] * n
    corrupt_s, setting_s, done = 0.0, 0.0, 0
    with progress_bar(description, len(dataset)) as advance:
        for images, indices, errs, setting, seconds in loader:
            with torch.inference_mode():
                out = to_storage(vision.features(images, precision), dtype)
            feats.append(from_storage(out, dtype).float())
            for i, e in zip(indices.tolist(), errs):
                errors[i] = e
            setting_s += float(seconds.sum())
            done += len(indices)
            advance(len(indices),
                    info=f"corrupting {1000 * (corrupt_s + setting_s) / done:.1f} ms/img")
            if done % n == 0:  # the setting's last batch
                yield settings[int(setting[0])], torch.cat(feats), errors, setting_s
                feats, errors, corrupt_s, setting_s = [], [""] * n, corrupt_s + setting_s, 0.0


@dataclass
class ImageSource:
    """A split's images and the backbone that encodes them, with the settings that make the
    features equal to the ones a cache (or a fine-tune's evaluation) holds."""

    vision: Any  # a VisionBackbone ready for inference
    paths: list[ImageRef]  # image files, or images inside tar shards or tables
    keys: list[str]  # record ids (corruption noise is keyed by them)
    labels: torch.Tensor
    batch_size: int
    precision: str
    dtype: str  # the storage dtype features are cast through (a cache's, or float32)
    num_workers: int = 2
    decode: str = "workers"  # clean images only: corrupted ones are always worker-decoded

    def encode(self, description: str = "images") -> tuple[torch.Tensor, list[str]]:
        """:func:`encode_images` of the clean images."""
        return encode_images(self.vision, self.paths, self.batch_size, self.precision,
                             self.dtype, self.num_workers, description, self.decode)

    def encode_corrupted(self, settings: Sequence[Corruption]
                         ) -> Iterator[tuple[Corruption, torch.Tensor, list[str], float]]:
        """:func:`encode_corrupted` of the images under each setting."""
        return encode_corrupted(self.vision, self.paths, self.keys, settings, self.batch_size,
                                self.precision, self.dtype, self.num_workers)
