"""``synthfood``: the embedded offline demo, a small VIREO-Food-172-like dataset.

Dishes are defined by ingredient sets that overlap (several dishes share egg, rice, chili...)
and by a cooking style (the sauce under the food). Each image renders the ingredients that are
present in *that* image as pieces with a colour, shape and texture of their own, on a plate,
under the nuisances of a real photo: lighting and colour cast, table clutter that is not an
ingredient, occlusion, blur, scale and position jitter, JPEG noise. The text is the list of the
ingredients actually present, which the pixels show only noisily (pieces are small, occluded,
recoloured by the light, and some ingredients look alike), so the text is useful privileged
information. The style is visible but never written in the text, so the text alone cannot name
every dish either.

Everything is drawn from a seeded generator, so the same config gives byte-identical files.
The dataset is written in the VIREO Food-172 layout and read back by the same parser as the
real data (:func:`pipeline.datasets.vireo172.read_vireo_layout`).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .base import DEFAULT_TEMPLATE, DatasetError, DatasetInfo
from .vireo172 import ANNOTATION_DIR, IMAGE_DIR, SPLIT_FILES, read_vireo_layout

GENERATOR_VERSION = 2  # 2: dish names are unique
MARKER = "synthfood.json"

# name, RGB colour, piece shape, texture. Some pairs look alike on purpose (egg/corn, pork/
# chicken, chili/tomato), so that the pixels alone cannot always tell which is present.
INGREDIENTS: list[tuple[str, tuple[int, int, int], str, str]] = [
    ("egg", (246, 208, 60), "blob", "solid"),
    ("tomato", (214, 48, 38), "wedge", "solid"),
    ("rice", (244, 242, 232), "dots", "speckle"),
    ("scallion", (96, 176, 64), "ring", "solid"),
    ("pork", (196, 120, 96), "square", "stripes"),
    ("beef", (122, 56, 40), "square", "speckle"),
    ("chicken", (226, 184, 140), "square", "solid"),
    ("tofu", (238, 232, 200), "square", "solid"),
    ("chili", (200, 30, 30), "stick", "solid"),
    ("carrot", (240, 124, 32), "disc", "solid"),
    ("broccoli", (40, 110, 40), "blob", "speckle"),
    ("mushroom", (150, 110, 80), "cap", "solid"),
    ("shrimp", (246, 150, 120), "arc", "stripes"),
    ("noodle", (236, 214, 150), "stick", "solid"),
    ("potato", (226, 196, 110), "stick", "speckle"),
    ("cucumber", (120, 190, 90), "disc", "speckle"),
    ("corn", (250, 214, 70), "dots", "solid"),
    ("green pepper", (60, 150, 50), "wedge", "solid"),
    ("onion", (220, 200, 230), "ring", "solid"),
    ("cabbage", (200, 226, 160), "blob", "stripes"),
    ("eggplant", (90, 40, 110), "stick", "solid"),
    ("peanut", (200, 150, 90), "dots", "solid"),
    ("bean sprout", (240, 240, 210), "arc", "solid"),
    ("lotus root", (230, 220, 200), "ring", "speckle"),
    ("fish", (210, 200, 190), "blob", "stripes"),
    ("celery", (150, 200, 110), "stick", "stripes"),
    ("spinach", (30, 90, 40), "blob", "solid"),
    ("black fungus", (40, 30, 30), "blob", "speckle"),
    ("bamboo shoot", (226, 210, 160), "wedge", "stripes"),
    ("pumpkin", (236, 140, 40), "square", "speckle"),
    ("squid", (244, 230, 236), "ring", "stripes"),
    ("sausage", (170, 50, 60), "disc", "speckle"),
]

STYLES: list[tuple[str, tuple[int, int, int]]] = [
    ("stir-fried", (180, 120, 60)),
    ("braised", (110, 50, 30)),
    ("steamed", (235, 235, 225)),
    ("spicy", (200, 60, 30)),
    ("cold", (200, 220, 210)),
]

TABLE_COLOURS = [(120, 80, 50), (160, 120, 80), (90, 90, 95), (200, 190, 170), (60, 45, 35),
                 (140, 150, 160)]
PLATE_COLOURS = [(245, 245, 240), (235, 240, 250), (250, 240, 225), (225, 230, 235)]


@dataclass(frozen=True)
class SynthFoodConfig:
    """Size and difficulty of the generated dataset.

    ``difficulty`` in [0, 1] scales the nuisances (colour cast, occlusion, blur, clutter, how
    often a listed ingredient is drawn hard to see). It was calibrated so that a fine-tuned
    visual model lands well above chance and well below a classifier on the text (README).
    """

    num_classes: int = 20
    train_per_class: int = 150
    val_per_class: int = 25
    test_per_class: int = 50
    image_size: int = 96
    seed: int = 0
    difficulty: float = 0.6
    core_size: int = 4
    optional_size: int = 3
    core_prob: float = 0.8
    optional_prob: float = 0.3

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.train_per_class, "val": self.val_per_class,
                "test": self.test_per_class}


@dataclass(frozen=True)
class Dish:
    name: str
    style: int
    core: tuple[int, ...]
    optional: tuple[int, ...]


def make_dishes(cfg: SynthFoodConfig) -> list[Dish]:
    """Draw the dish definitions: a style plus overlapping core and optional ingredient sets.

    Ingredient popularity follows a Zipf-like law, so common ingredients (egg, rice, chili...)
    recur across many dishes, as they do in VIREO Food-172. Two dishes never share both their
    style and their core set.
    """
    rng = np.random.default_rng([cfg.seed, 7919])
    n_ing = len(INGREDIENTS)
    popularity = 1.0 / np.arange(1, n_ing + 1) ** 0.7
    popularity = popularity[rng.permutation(n_ing)]
    popularity /= popularity.sum()
    dishes: list[Dish] = []
    seen: set[tuple[int, tuple[int, ...]]] = set()
    while len(dishes) < cfg.num_classes:
        picks = rng.choice(n_ing, size=cfg.core_size + cfg.optional_size, replace=False,
                           p=popularity)
        core = tuple(sorted(int(i) for i in picks[: cfg.core_size]))
        optional = tuple(sorted(int(i) for i in picks[cfg.core_size:]))
        style = int(rng.integers(len(STYLES)))
        if (style, core) in seen:
            continue
        seen.add((style, core))
        name = _dish_name(style, core, {d.name for d in dishes})
        dishes.append(Dish(name, style, core, optional))
    return dishes


def _dish_name(style: int, core: tuple[int, ...], taken: set[str]) -> str:
    """"<style> <a> with <b>" for the first pair of core ingredients whose name is free."""
    from itertools import combinations

    for a, b in combinations(core, 2):
        name = f"{STYLES[style][0]} {INGREDIENTS[a][0]} with {INGREDIENTS[b][0]}"
        if name not in taken:
            return name
    return f"{STYLES[style][0]} {', '.join(INGREDIENTS[i][0] for i in core)}"


def sample_ingredients(dish: Dish, cfg: SynthFoodConfig, rng: np.random.Generator) -> list[int]:
    """The ingredients present in one image of ``dish`` (never empty)."""
    present = [i for i in dish.core if rng.random() < cfg.core_prob]
    present += [i for i in dish.optional if rng.random() < cfg.optional_prob]
    if not present:
        present = [int(rng.choice(dish.core))]
    return sorted(present)


def _jitter(colour: tuple[int, int, int], amount: float, rng: np.random.Generator) -> tuple:
    return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in colour)


def _draw_piece(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                colour: tuple, rng: np.random.Generator) -> None:
    angle = rng.uniform(0, np.pi)
    if shape in ("blob", "disc", "cap"):
        rx, ry = r * rng.uniform(0.8, 1.2), r * rng.uniform(0.6, 1.0)
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        if shape == "cap":
            draw.pieslice(box, 180, 360, fill=colour)
        else:
            draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(r / 2.5)))
    elif shape == "square":
        d = np.array([[np.cos(angle + k * np.pi / 2), np.sin(angle + k * np.pi / 2)]
                      for k in range(4)]) * r
        draw.polygon([(cx + x, cy + y) for x, y in d], fill=colour)
    elif shape == "wedge":
        d = np.array([[np.cos(angle + k * 2 * np.pi / 3), np.sin(angle + k * 2 * np.pi / 3)]
                      for k in range(3)]) * r * 1.2
        draw.polygon([(cx + x, cy + y) for x, y in d], fill=colour)
    elif shape == "stick":
        dx, dy = np.cos(angle) * r * 1.6, np.sin(angle) * r * 1.6
        draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=colour, width=max(2, int(r / 2)))
    elif shape == "arc":
        start = np.degrees(angle)
        draw.arc([cx - r, cy - r, cx + r, cy + r], start, start + 200, fill=colour,
                 width=max(2, int(r / 2.2)))
    elif shape == "dots":
        for _ in range(6):
            ox, oy = rng.normal(0, r * 0.7, size=2)
            dr = max(1.0, r * 0.28)
            draw.ellipse([cx + ox - dr, cy + oy - dr, cx + ox + dr, cy + oy + dr], fill=colour)
    else:
        raise ValueError(f"unknown piece shape {shape!r}")


def _paste_piece(img: Image.Image, shape: str, texture: str, cx: float, cy: float, r: float,
                 colour: tuple, rng: np.random.Generator) -> None:
    """Draw one textured ingredient piece; the texture stays inside the piece's outline."""
    half = int(2.2 * r) + 2
    mask = Image.new("L", (2 * half, 2 * half), 0)
    _draw_piece(ImageDraw.Draw(mask), shape, half, half, r, 255, rng)
    layer = Image.new("RGB", mask.size, colour)
    shade = tuple(int(c * 0.7) for c in colour)
    draw = ImageDraw.Draw(layer)
    if texture == "speckle":
        for x, y in rng.uniform(0, 2 * half, size=(int(half * half / 3), 2)):
            draw.point((float(x), float(y)), fill=shade)
    elif texture == "stripes":
        for x in range(-2 * half, 2 * half, 4):
            draw.line([x, 0, x + 2 * half, 2 * half], fill=shade, width=1)
    img.paste(layer, (int(cx) - half, int(cy) - half), mask)


def render_image(ingredients: list[int], dish: Dish, cfg: SynthFoodConfig,
                 rng: np.random.Generator) -> Image.Image:
    """Draw one photo of ``dish`` showing ``ingredients``, with the nuisances of a real photo
    (the steps below draw from ``rng`` in this order, which fixes every generated byte)."""
    size = cfg.image_size * 2  # supersample, then downsample with antialiasing
    hard = cfg.difficulty
    table = _jitter(TABLE_COLOURS[rng.integers(len(TABLE_COLOURS))], 20, rng)
    img = Image.new("RGB", (size, size), table)
    draw = ImageDraw.Draw(img, "RGBA")
    plate = _draw_plate(draw, dish, size, rng)
    _draw_pieces(img, ingredients, plate, size, hard, rng)
    _draw_clutter(draw, size, hard, rng)
    _draw_occlusion(draw, plate, size, hard, rng)
    return _photograph(img, cfg.image_size, hard, rng)


def _draw_plate(draw: ImageDraw.ImageDraw, dish: Dish, size: int, rng: np.random.Generator
                ) -> tuple[float, float, float, float]:
    """The plate (position and scale jitter) and its sauce; returns (x, y, plate r, sauce r)."""
    plate_r = size * rng.uniform(0.34, 0.47)
    pcx = size / 2 + rng.normal(0, size * 0.06)
    pcy = size / 2 + rng.normal(0, size * 0.06)
    draw.ellipse([pcx - plate_r, pcy - plate_r, pcx + plate_r, pcy + plate_r],
                 fill=_jitter(PLATE_COLOURS[rng.integers(len(PLATE_COLOURS))], 8, rng))
    sauce_r = plate_r * rng.uniform(0.7, 0.85)
    sauce = _jitter(STYLES[dish.style][1], 18, rng)
    draw.ellipse([pcx - sauce_r, pcy - sauce_r, pcx + sauce_r, pcy + sauce_r],
                 fill=(*sauce, int(rng.uniform(140, 220))))
    return pcx, pcy, plate_r, sauce_r


def _draw_pieces(img: Image.Image, ingredients: list[int], plate: tuple[float, ...],
                 size: int, hard: float, rng: np.random.Generator) -> None:
    """Ingredient pieces on the sauce, in random order so none is always on top."""
    pcx, pcy, _, sauce_r = plate
    pieces = []
    for ing in ingredients:
        n = int(rng.integers(2, 6))
        if rng.random() < 0.35 * hard:  # a listed ingredient drawn hard to see: one small piece
            n = 1
        pieces += [ing] * n
    rng.shuffle(pieces)
    for ing in pieces:
        _, colour, shape, texture = INGREDIENTS[ing]
        r = size * rng.uniform(0.045, 0.085) * rng.uniform(1 - 0.4 * hard, 1.0)
        ang, dist = rng.uniform(0, 2 * np.pi), sauce_r * np.sqrt(rng.uniform(0, 0.8))
        cx, cy = pcx + dist * np.cos(ang), pcy + dist * np.sin(ang)
        _paste_piece(img, shape, texture, cx, cy, r, _jitter(colour, 10 + 20 * hard, rng), rng)


def _draw_clutter(draw: ImageDraw.ImageDraw, size: int, hard: float,
                  rng: np.random.Generator) -> None:
    """Clutter that is not an ingredient: chopsticks, a cup, crumbs in food-like colours."""
    for _ in range(int(rng.integers(0, 2 + int(4 * hard)))):
        kind = rng.integers(3)
        colour = _jitter(INGREDIENTS[rng.integers(len(INGREDIENTS))][1], 30, rng) \
            if kind == 2 else _jitter((150, 110, 70), 40, rng)
        x, y = rng.uniform(0, size, size=2)
        if kind == 0:
            dx, dy = rng.normal(0, size * 0.3, size=2)
            draw.line([x, y, x + dx, y + dy], fill=colour, width=int(size * 0.02) + 1)
        elif kind == 1:
            r = size * rng.uniform(0.06, 0.12)
            draw.ellipse([x - r, y - r, x + r, y + r], outline=(220, 220, 220), width=4,
                         fill=(230, 230, 225))
        else:
            r = size * rng.uniform(0.02, 0.04)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def _draw_occlusion(draw: ImageDraw.ImageDraw, plate: tuple[float, ...], size: int,
                    hard: float, rng: np.random.Generator) -> None:
    """Sometimes a napkin or a hand over part of the plate."""
    pcx, pcy, plate_r, _ = plate
    if rng.random() < 0.5 * hard:
        w, h = size * rng.uniform(0.2, 0.45), size * rng.uniform(0.2, 0.45)
        x, y = pcx + rng.normal(0, plate_r * 0.6), pcy + rng.normal(0, plate_r * 0.6)
        draw.rectangle([x - w / 2, y - h / 2, x + w / 2, y + h / 2],
                       fill=_jitter((225, 200, 180), 25, rng))


def _photograph(img: Image.Image, image_size: int, hard: float,
                rng: np.random.Generator) -> Image.Image:
    """Downsample, blur, then light the frame: brightness, a colour cast, a gradient, noise."""
    img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    blur = rng.uniform(0, 1.2 * hard)
    if blur > 0.2:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(img, dtype=np.float32)
    cast = 1.0 + rng.normal(0, 0.12 * hard, size=3)
    ramp = np.linspace(1 - 0.25 * hard * rng.random(), 1.0, image_size, dtype=np.float32)
    ramp = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
    arr = arr * cast[None, None, :] * ramp[..., None] * rng.uniform(0.8, 1.15)
    arr += rng.normal(0, 4 * hard, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _jpeg_bytes(img: Image.Image, rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(80, 96)))
    return buf.getvalue()


def _render_class(args: tuple[Path, SynthFoodConfig, int, Dish]) -> tuple[dict[str, list[str]], list[str]]:
    """Render and write every image of one dish; return its split lines and label lines."""
    tmp, cfg, k, dish = args
    folder = tmp / IMAGE_DIR / str(k + 1)
    folder.mkdir(parents=True, exist_ok=True)
    split_lines: dict[str, list[str]] = {s: [] for s in SPLIT_FILES}
    label_lines: list[str] = []
    index = 0
    for split_no, (split, per_class) in enumerate(cfg.split_sizes().items()):
        for _ in range(per_class):
            rng = np.random.default_rng([cfg.seed, k, split_no, index])
            present = sample_ingredients(dish, cfg, rng)
            img = render_image(present, dish, cfg, rng)
            rel = f"/{k + 1}/{k + 1}_{index}.jpg"
            (folder / f"{k + 1}_{index}.jpg").write_bytes(_jpeg_bytes(img, rng))
            split_lines[split].append(rel)
            flags = ["-1"] * len(INGREDIENTS)
            for i in present:
                flags[i] = "1"
            label_lines.append(rel + " " + " ".join(flags))
            index += 1
    return split_lines, label_lines


def generate(root: Path, cfg: SynthFoodConfig = SynthFoodConfig(),
             on_image: Callable[[int], None] | None = None, workers: int | None = None) -> None:
    """Write the dataset to ``root`` in the VIREO Food-172 layout (fresh; replaces a demo there).

    ``root`` must be new, empty, or a dataset this generator wrote (it has ``synthfood.json``):
    anything else is refused, never deleted.

    Dishes are rendered in parallel processes (each image has its own seeded generator, so
    the files do not depend on the number of workers). Writes into ``<root>.partial`` and
    renames at the end, so a killed run leaves no half-written dataset behind. ``on_image(n)``
    reports progress.
    """
    from concurrent.futures import ProcessPoolExecutor

    root = Path(root)
    refuse_foreign_root(root)
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    ann = tmp / ANNOTATION_DIR
    ann.mkdir(parents=True)
    dishes = make_dishes(cfg)
    jobs = [(tmp, cfg, k, dish) for k, dish in enumerate(dishes)]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    per_class = sum(cfg.split_sizes().values())
    label_lines: list[str] = []
    split_lines: dict[str, list[str]] = {s: [] for s in SPLIT_FILES}
    with ProcessPoolExecutor(workers) if workers > 1 else _Serial() as pool:
        for lines, labels in pool.map(_render_class, jobs):
            for split in SPLIT_FILES:
                split_lines[split] += lines[split]
            label_lines += labels
            if on_image:
                on_image(per_class)
    for split, fname in SPLIT_FILES.items():
        (ann / fname).write_text("".join(line + "\n" for line in split_lines[split]))
    (ann / "IngreLabel.txt").write_text("".join(line + "\n" for line in label_lines))
    (ann / "IngredientList.txt").write_text("".join(name + "\n" for name, *_ in INGREDIENTS))
    (ann / "FoodList.txt").write_text("".join(d.name + "\n" for d in dishes))
    (tmp / MARKER).write_text(json.dumps(marker(cfg), indent=2) + "\n")
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)


def refuse_foreign_root(root: Path) -> None:
    """Raise :class:`DatasetError` if ``root`` holds files that this generator did not write.

    Generating replaces ``root`` as a whole, so only a missing or empty folder, or one with the
    ``synthfood.json`` marker of an earlier run, may be used.
    """
    if not root.exists() or (root / MARKER).is_file():
        return
    if not root.is_dir():
        raise DatasetError(f"cannot generate the synthfood demo at {root}: it is a file, not a "
                           "folder; pass --root with a new or empty folder")
    if any(root.iterdir()):
        raise DatasetError(f"cannot generate the synthfood demo at {root}: the folder is not "
                           f"empty and holds no {MARKER}, so it is not a demo this generator "
                           "wrote, and generating would replace it. Pass --root with a new or "
                           "empty folder (or delete this one yourself if you mean to)")


class _Serial:
    """A stand-in for a process pool that maps in this process."""

    def __enter__(self) -> "_Serial":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @staticmethod
    def map(fn, items):
        return map(fn, items)


def marker(cfg: SynthFoodConfig) -> dict:
    return {"generator_version": GENERATOR_VERSION, "config": asdict(cfg)}


def is_generated(root: Path, cfg: SynthFoodConfig) -> bool:
    """True if ``root`` holds a complete dataset generated with ``cfg``."""
    path = Path(root) / MARKER
    return path.is_file() and json.loads(path.read_text()) == marker(cfg)


def ensure_synthfood(root: Path, cfg: SynthFoodConfig = SynthFoodConfig(),
                     on_image: Callable[[int], None] | None = None) -> bool:
    """Generate the demo dataset at ``root`` unless it is already there; True if generated."""
    if is_generated(root, cfg):
        return False
    generate(root, cfg, on_image)
    return True


def total_images(cfg: SynthFoodConfig) -> int:
    return cfg.num_classes * sum(cfg.split_sizes().values())


def load_synthfood(root: Path, template: str = DEFAULT_TEMPLATE,
                   config: SynthFoodConfig | None = None) -> DatasetInfo:
    """The ``synthfood`` adapter: generate on first use, then read through the VIREO parser.

    With ``config`` given, the data at ``root`` is regenerated if it was made with another
    config; without, whatever complete dataset is at ``root`` is read as it is.
    """
    if config is not None or not (Path(root) / MARKER).is_file():
        ensure_synthfood(root, config or SynthFoodConfig())
    info = read_vireo_layout(root, "synthfood", template, expected_counts=None)
    info.source_files.append(Path(root) / MARKER)
    return info
