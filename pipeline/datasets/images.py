"""Image decoding to uint8 tensors, shared by extraction, fine-tuning, evaluation and predict.

Workers decode and resize to ``uint8 [3, H, W]``; normalisation happens later on the device
(:meth:`pipeline.backbones.VisionBackbone.features`). Every mode (L, CMYK, P, RGBA, I;16) is
converted to RGB (alpha composited on white). Large JPEGs are decoded at reduced size through
PIL's draft mode. A file that cannot be decoded raises :class:`BadImageError` with the reason.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .sources import ImageRef, StoredImage, as_image_ref

Image.MAX_IMAGE_PIXELS = 400_000_000  # real food photos are large; still refuse absurd files

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
_TENSOR_RESAMPLE = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST"}


class BadImageError(ValueError):
    """An image file that cannot be decoded (missing, empty, truncated, not an image)."""


def load_rgb(path: ImageRef | str, draft_size: int | None = None) -> Image.Image:
    """Open ``path`` (an image file, or a stored image) fully decoded as RGB; raise
    :class:`BadImageError` with the reason."""
    path = as_image_ref(path)
    img = open_image(path)
    try:
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"{path}: cannot decode ({exc})") from None
    return to_rgb(img)


def open_image(path: ImageRef) -> Image.Image:
    """Open ``path`` lazily (header read, pixels not decoded); raise :class:`BadImageError` for
    a missing, empty or unrecognised file or one over the pixel limit. A stored image is read
    into memory and opened from there."""
    if isinstance(path, StoredImage):
        return _open_stored(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(f"{path}: empty file (0 bytes)")
        img = Image.open(path)
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"{path}: cannot decode ({exc})") from None
    refuse_huge(path, img)
    return img


def _open_stored(image: StoredImage) -> Image.Image:
    """:func:`open_image` of an image inside a tar shard or a table."""
    try:
        data = image.read()
    except FileNotFoundError:
        raise BadImageError(f"{image}: file not found ({image.container})") from None
    except OSError as exc:
        raise BadImageError(f"{image}: cannot read ({exc})") from None
    if not data:
        raise BadImageError(f"{image}: empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"{image}: cannot decode ({exc})") from None
    refuse_huge(image, img)
    return img


def refuse_huge(path: ImageRef, img: Image.Image) -> None:
    """Raise :class:`BadImageError` for more pixels than ``Image.MAX_IMAGE_PIXELS``.

    PIL itself only warns between one and two times the limit; this check is explicit (not a
    warnings filter) so that it holds in threads too.
    """
    pixels = img.width * img.height
    if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
        raise BadImageError(f"{path}: cannot decode ({img.width}x{img.height} = {pixels:,} "
                            f"pixels, over the {Image.MAX_IMAGE_PIXELS:,} limit: a corrupt "
                            "header or a decompression bomb)")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on white."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        arr = (arr / max(arr.max(), 1) * 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    return img.convert("RGB")


CROP_MODES = ("center", "squash", "border")  # timm's eval crop modes (data config crop_mode)


@dataclass(frozen=True)
class Preprocess:
    """Eval-time geometry from a timm data config, pixel for pixel as timm's eval transform
    (``timm.data.create_transform(**data_config)``) but kept as uint8:

    - ``center``: resize the short side to ``size / crop_pct``, centre-crop ``size``;
    - ``squash``: resize both sides to ``size / crop_pct`` (aspect ratio not kept), centre-crop;
    - ``border``: resize the long side to ``size / crop_pct``, pad with ``fill`` (the mean
      colour) and centre-crop to ``size``.

    A crop larger than the resized image pads (``fill``; black unless ``border``), as timm does.
    """

    size: int
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    crop_mode: str = "center"
    fill: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self) -> None:
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"the model's data config asks for crop_mode {self.crop_mode!r}, "
                             f"which marnet does not implement; it implements "
                             f"{', '.join(CROP_MODES)}")

    @classmethod
    def from_data_config(cls, cfg: dict[str, Any]) -> "Preprocess":
        mode = str(cfg.get("crop_mode") or "center")
        fill = (tuple(round(255 * v) for v in cfg["mean"]) if mode == "border" else (0, 0, 0))
        return cls(int(cfg["input_size"][-1]), float(cfg.get("crop_pct", 1.0)),
                   str(cfg.get("interpolation", "bicubic")), mode, fill)

    @property
    def scale_size(self) -> int:
        return int(math.floor(self.size / self.crop_pct))

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """The size an image of ``width`` x ``height`` is resized to before the crop."""
        scale = self.scale_size
        if self.crop_mode == "squash":
            return scale, scale
        if self.crop_mode == "border":  # the long side to ``scale`` (timm's ResizeKeepRatio)
            ratio = max(width, height) / scale
            return round(width / ratio), round(height / ratio)
        if width <= height:  # the short side to ``scale`` (torchvision's Resize(int))
            return scale, int(scale * height / width)
        return int(scale * width / height), scale

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """``uint8 [3, size, size]``."""
        img = img.resize(self.resized(*img.size),
                         _RESAMPLE.get(self.interpolation, Image.Resampling.BICUBIC))
        img = _center_crop_or_pad(img, self.size, self.fill)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)

    def tensor_interpolation(self) -> TF.InterpolationMode:
        """The tensor resize matching this config's PIL filter; ``lanczos`` has none and is
        refused (``--decode device`` checks this before any image is read)."""
        if self.interpolation == "lanczos":
            raise ValueError("the model's data config asks for lanczos interpolation, which has "
                             "no tensor resize; use --decode workers")
        return TF.InterpolationMode[_TENSOR_RESAMPLE.get(self.interpolation, "BICUBIC")]

    def tensor(self, image: torch.Tensor) -> torch.Tensor:
        """The same geometry on a decoded ``uint8 [3, H, W]`` tensor, on its device:
        ``uint8 [3, size, size]``. Resizing is torchvision's antialiased tensor resize (PIL's
        filters to within one grey level)."""
        width, height = self.resized(image.shape[-1], image.shape[-2])
        image = TF.resize(image, [height, width], interpolation=self.tensor_interpolation(),
                          antialias=True)
        return _center_crop_or_pad_tensor(image, self.size, self.fill)


def _center_crop_or_pad(img: Image.Image, size: int, fill: tuple[int, int, int]) -> Image.Image:
    """The central ``size`` x ``size`` of ``img``, padded with ``fill`` where it is smaller
    (offsets rounded as torchvision's ``CenterCrop`` and timm's ``CenterCropOrPad`` do)."""
    width, height = img.size
    if width < size or height < size:
        padded = Image.new("RGB", (max(width, size), max(height, size)), fill)
        padded.paste(img, (max(size - width, 0) // 2, max(size - height, 0) // 2))
        img, (width, height) = padded, padded.size
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _center_crop_or_pad_tensor(image: torch.Tensor, size: int, fill: tuple[int, int, int]
                               ) -> torch.Tensor:
    """:func:`_center_crop_or_pad` for a ``[3, H, W]`` tensor (same offsets, same fill)."""
    height, width = image.shape[-2:]
    if width < size or height < size:
        padded = torch.tensor(fill, dtype=image.dtype, device=image.device).view(3, 1, 1).expand(
            3, max(height, size), max(width, size)).clone()
        top, left = max(size - height, 0) // 2, max(size - width, 0) // 2
        padded[:, top:top + height, left:left + width] = image
        image, (height, width) = padded, padded.shape[-2:]
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return image[:, top:top + size, left:left + size]


ImageInput = Union[ImageRef, str, Image.Image]  # a file, a stored image, or one in memory


def decode_input(image: ImageInput, draft_size: int | None = None) -> Image.Image:
    """An image file decoded as :func:`load_rgb` decodes it, or an in-memory PIL image
    converted to RGB as :func:`to_rgb` converts it."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    return load_rgb(image, draft_size)


class ImageFiles(torch.utils.data.Dataset):
    """Decode ``paths[i]`` (an image file, a stored image or a PIL image) to ``(uint8 image,
    index, error message or "")``.

    A bad file yields a zero image and its reason instead of raising inside a worker, so the
    caller can apply ``--on-bad-image skip|fail`` with the file name in hand.
    """

    def __init__(self, paths: Sequence[ImageInput], preprocess: Preprocess):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            img = decode_input(self.paths[index], draft_size=self.preprocess.scale_size)
            return self.preprocess(img), index, ""
        except BadImageError as exc:
            size = self.preprocess.size
            return torch.zeros(3, size, size, dtype=torch.uint8), index, str(exc)


@dataclass(frozen=True)
class TrainAugment:
    """Training geometry: random resized crop (``scale`` of the area) and horizontal flip."""

    size: int
    scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True

    @property
    def scale_size(self) -> int:
        """Decode large JPEGs down to about twice the crop (PIL draft mode)."""
        return 2 * self.size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        ops = [v2.RandomResizedCrop(self.size, scale=self.scale, antialias=True)]
        if self.hflip:
            ops.append(v2.RandomHorizontalFlip())
        img = v2.Compose(ops)(img)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
