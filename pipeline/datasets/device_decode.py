"""``--decode device``: JPEGs decoded on the backbone's device (nvJPEG on CUDA).

With the default ``--decode workers`` DataLoader workers decode and resize every image with PIL
(:class:`~pipeline.datasets.images.ImageFiles`). On a GPU machine that can bind: a ViT-B/16
forward is faster than a few CPU cores decode full-size food photos. Here the workers only read
bytes (:class:`EncodedImageFiles`) and :class:`DeviceDecoder` decodes a whole batch with
``torchvision.io.decode_jpeg(..., device=...)`` (nvJPEG on CUDA, libjpeg-turbo on CPU), then
resizes and crops each image on the device with the geometry of
:class:`~pipeline.datasets.images.Preprocess` (:meth:`Preprocess.tensor`).

What the device cannot take falls back, per image, so nothing is lost or mixed up:

- not a JPEG (PNG, WebP...), a CMYK JPEG, or a JPEG with an EXIF rotation: the worker decodes it
  with PIL at full size (:func:`~pipeline.datasets.images.load_rgb`) and the device resizes it
  like the rest;
- a file the device decoder rejects (truncated or corrupt, or a JPEG variant it does not
  support): the batch is decoded again one image at a time, and that image goes to PIL on the
  host; only a file PIL cannot decode either gets an error, the workers' message for it
  (``--on-bad-image`` applies as with workers).

The two modes differ in the last bits (full-size decode vs PIL's draft-mode decode of large
JPEGs, tensor vs PIL antialiasing), so the mode is part of the cache key, and ``eval
--end-to-end`` and ``predict`` decode the way the cache did.

torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec; the pinned
torch/torchvision pair still ships them, and the warning is silenced around the one call.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .images import BadImageError, Preprocess, load_rgb, open_image
from .sources import ImageRef, StoredImage, as_image_ref

DECODE_MODES = ("workers", "device")
_EXIF_ORIENTATION = 0x0112


def device_decodable(path: ImageRef) -> bool:
    """Whether the device decoder takes ``path`` as it is: a JPEG in RGB or greyscale with no
    EXIF rotation (reads the header only; raises :class:`BadImageError` for a bad file)."""
    img = open_image(path)
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return False
    return img.getexif().get(_EXIF_ORIENTATION, 1) == 1


def encoded_bytes(image: ImageRef) -> np.ndarray:
    """The encoded image as ``uint8 [n]``: a file's bytes, or a stored image's."""
    if isinstance(image, StoredImage):
        try:
            return np.frombuffer(bytearray(image.read()), dtype=np.uint8)
        except OSError as exc:
            raise BadImageError(f"{image}: cannot read ({exc})") from None
    return np.fromfile(image, dtype=np.uint8)


class EncodedImageFiles(torch.utils.data.Dataset):
    """``(payload, index, error or "")`` per image (a file or a stored image), for
    :class:`DeviceDecoder`.

    ``payload`` is the encoded bytes (``uint8 [n]``) when the device can decode it, else the
    image decoded here with PIL at full size (``uint8 [3, H, W]``); empty with an error message
    for a file that cannot be read.
    """

    def __init__(self, paths: Sequence[ImageRef]):
        self.paths = [as_image_ref(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        path = self.paths[index]
        try:
            if device_decodable(path):
                return torch.from_numpy(encoded_bytes(path)), index, ""
            rgb = np.asarray(load_rgb(path), dtype=np.uint8)
            return torch.from_numpy(rgb.copy()).permute(2, 0, 1), index, ""
        except BadImageError as exc:
            return torch.empty(0, dtype=torch.uint8), index, str(exc)


def keep_samples(samples: list[Any]) -> list[Any]:
    """Collate that keeps a batch as its list of samples (the images differ in size)."""
    return samples


class DeviceDecoder:
    """Turns a batch of :class:`EncodedImageFiles` samples into what
    :class:`~pipeline.datasets.images.ImageFiles` batches hold: ``(uint8 [B, 3, S, S] on
    device, indices, errors)``, a zero image where ``errors`` names why."""

    def __init__(self, paths: Sequence[ImageRef], preprocess: Preprocess, device: torch.device):
        self.paths = [as_image_ref(p) for p in paths]
        self.preprocess = preprocess
        self.device = device
        preprocess.tensor_interpolation()  # refuse a filter with no tensor resize up front

    def __call__(self, samples: list[tuple[torch.Tensor, int, str]]
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        errors = [error for _, _, error in samples]
        jpegs = [i for i, (payload, _, error) in enumerate(samples)
                 if not error and payload.ndim == 1]
        decoded = dict(zip(jpegs, self._decode([samples[i] for i in jpegs])))
        size = self.preprocess.size
        images = []
        for i, (payload, _, _error) in enumerate(samples):
            image = decoded.get(i) if payload.ndim == 1 else payload.to(self.device,
                                                                       non_blocking=True)
            if isinstance(image, str):
                errors[i] = image
            images.append(self.preprocess.tensor(image) if isinstance(image, torch.Tensor)
                          else torch.zeros(3, size, size, dtype=torch.uint8, device=self.device))
        indices = torch.tensor([index for _, index, _ in samples])
        return torch.stack(images), indices, errors

    def _decode(self, samples: list[tuple[torch.Tensor, int, str]]) -> list[torch.Tensor | str]:
        """Decoded ``uint8 [3, H, W]`` per JPEG sample, all in one device call when it can."""
        if not samples:
            return []
        try:
            return list(_decode_jpeg([payload for payload, _, _ in samples], self.device))
        except RuntimeError:  # one file fails the whole call: decode them one by one
            return [self._decode_one(payload, index) for payload, index, _ in samples]

    def _decode_one(self, payload: torch.Tensor, index: int) -> torch.Tensor | str:
        """One JPEG alone on the device; if the device decoder rejects it (a variant it does
        not support, or a broken file), PIL on the host decodes it as the workers would; the
        reason, naming the file, when neither can."""
        try:
            return _decode_jpeg([payload], self.device)[0]
        except RuntimeError:
            try:
                rgb = np.asarray(load_rgb(self.paths[index]), dtype=np.uint8)
            except BadImageError as exc:
                return str(exc)
            return torch.from_numpy(rgb.copy()).permute(2, 0, 1).to(self.device)


def _decode_jpeg(payloads: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # see the module docstring
        return decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device)


def device_image_batches(paths: Sequence[ImageRef], preprocess: Preprocess,
                         batches: list[list[int]], num_workers: int, device: torch.device
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Image batches as :func:`pipeline.extract.image_loader` yields them, decoded on
    ``device``: workers read the bytes (pinned for the copy), the device decodes and resizes."""
    decoder = DeviceDecoder(paths, preprocess, device)
    loader = torch.utils.data.DataLoader(
        EncodedImageFiles(paths), batch_sampler=batches, num_workers=num_workers,
        collate_fn=keep_samples, pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers else None)
    return map(decoder, loader)
