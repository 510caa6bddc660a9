"""ImageNet-C corruptions of decoded images, for robustness evaluation.

The 15 corruptions x 5 severities of Hendrycks & Dietterich (ICLR 2019, "Benchmarking Neural
Network Robustness to Common Corruptions and Perturbations"), computed by the reference
functions of the ``imagecorruptions`` package. Its 1.1.2 release calls a scikit-image argument
that current releases removed; the maintained fork ``imagecorruptions-imaug`` (same module
name, same functions) works with the pinned stack and is what the optional extra
``marnet[robustness]`` installs.

A corrupted image is a pure function of (decoded image, corruption, severity, seed, the
image's key): most functions draw from NumPy's global generator, which is seeded from a hash of
those just before each call (and restored after it); the two that draw from their own
generator (impulse noise through scikit-image, glass blur through numba) get the same hash as
their ``seed`` argument. The worker that runs a call, the batch size and reruns never change
the pixels. Severity 0 returns the image unchanged.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..core.config import ConfigError, require_modules
from .images import BadImageError, Preprocess, load_rgb
from .sources import ImageRef

# the four families of ImageNet-C, in its order
FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
CORRUPTIONS: tuple[str, ...] = tuple(name for names in FAMILIES.values() for name in names)
# corruptions whose reference function draws from its own generator: it takes a ``seed``
OWN_GENERATOR = ("impulse_noise", "glass_blur")
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
INSTALL_HINT = ("corrupted evaluation needs the imagecorruptions package: "
                "pip install 'marnet[robustness]' (it installs imagecorruptions-imaug, the "
                "maintained fork of the ImageNet-C reference code)")


def family_of(name: str) -> str:
    """The ImageNet-C family (noise, blur, weather, digital) of corruption ``name``."""
    return next(family for family, names in FAMILIES.items() if name in names)


def corruption_function() -> Callable[..., np.ndarray]:
    """``imagecorruptions.corrupt``, or a :class:`ConfigError` with the install hint."""
    return require_modules(["imagecorruptions"], INSTALL_HINT)[0].corrupt


def corruption_seed(seed: int, name: str, severity: int, key: str) -> int:
    """The 32-bit NumPy seed of one corrupted image (a stable hash, not Python's ``hash``)."""
    return zlib.crc32(f"{seed}|{name}|{severity}|{key}".encode())


@dataclass(frozen=True)
class Corruption:
    """One ImageNet-C setting: ``name`` at ``severity`` (0 = clean), noise drawn from ``seed``."""

    name: str
    severity: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in CORRUPTIONS:
            raise ConfigError(f"unknown corruption {self.name!r}; known: {', '.join(CORRUPTIONS)}")
        if not 0 <= self.severity <= 5:
            raise ConfigError(f"severity {self.severity} of {self.name} is not in 0..5")

    def __call__(self, image: Image.Image, key: str) -> Image.Image:
        """The corrupted RGB image (same size); ``key`` identifies the image (its record id)."""
        if self.severity == 0:
            return image
        corrupt = corruption_function()
        seed = corruption_seed(self.seed, self.name, self.severity, key)
        extra = {"seed": seed} if self.name in OWN_GENERATOR else {}
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            pixels = corrupt(np.asarray(image.convert("RGB")), corruption_name=self.name,
                             severity=self.severity, **extra)
        finally:
            np.random.set_state(state)
        return Image.fromarray(np.uint8(pixels))


def parse_corruptions(text: str) -> tuple[str, ...]:
    """``all``, family names (``noise``, ``blur``, ``weather``, ``digital``) and corruption
    names, comma-separated, in ImageNet-C order without repeats."""
    wanted: set[str] = set()
    for item in (part.strip() for part in text.split(",")):
        if item == "all":
            wanted.update(CORRUPTIONS)
        elif item in FAMILIES:
            wanted.update(FAMILIES[item])
        elif item in CORRUPTIONS:
            wanted.add(item)
        else:
            raise ConfigError(f"--corruptions: unknown {item!r}; give all, a family "
                              f"({', '.join(FAMILIES)}) or corruptions ({', '.join(CORRUPTIONS)})")
    return tuple(name for name in CORRUPTIONS if name in wanted)


def parse_severities(text: str) -> tuple[int, ...]:
    """``1-5``, ``3`` or ``1,3,5`` (each in 1..5), sorted without repeats."""
    values: set[int] = set()
    try:
        for part in (p.strip() for p in text.split(",")):
            low, _, high = part.partition("-")
            values.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise ConfigError(f"--severities {text!r}: give a range (1-5) or a list (1,3,5)") from None
    if not values or min(values) < 1 or max(values) > 5:
        raise ConfigError(f"--severities {text!r}: severities run from 1 to 5")
    return tuple(sorted(values))


class CorruptedImageFiles(torch.utils.data.Dataset):
    """Every image under every setting, decoded, corrupted and preprocessed in the workers.

    Item ``s * N + i`` is image ``i`` under ``settings[s]``: ``(uint8 image, i, error or "",
    s, seconds spent corrupting)``. A file that cannot be decoded yields a zero image and its
    reason, as :class:`~.images.ImageFiles` does.
    """

    def __init__(self, paths: Sequence[ImageRef], keys: Sequence[str], preprocess: Preprocess,
                 settings: Sequence[Corruption]):
        if len(keys) != len(paths):
            raise ValueError(f"{len(keys)} keys for {len(paths)} images")
        self.paths, self.keys = list(paths), list(keys)
        self.preprocess, self.settings = preprocess, list(settings)

    def __len__(self) -> int:
        return len(self.settings) * len(self.paths)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, str, int, float]:
        setting, index = divmod(item, len(self.paths))
        try:
            img = load_rgb(self.paths[index], draft_size=self.preprocess.scale_size)
        except BadImageError as exc:
            size = self.preprocess.size
            return torch.zeros(3, size, size, dtype=torch.uint8), index, str(exc), setting, 0.0
        start = time.perf_counter()
        corruption = self.settings[setting]
        try:
            img = corruption(img, self.keys[index])
        except ConfigError:
            raise
        except Exception as exc:  # the reference code failing on one image: say which
            raise RuntimeError(f"{self.paths[index]}: {corruption.name} at severity "
                               f"{corruption.severity} failed ({type(exc).__name__}: {exc})"
                               ) from exc
        return self.preprocess(img), index, "", setting, time.perf_counter() - start
