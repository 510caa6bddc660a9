"""Image-only inference with a trained run: top-k classes with probabilities per image.

The vision backbone the run's cache was made with is rebuilt from the cache manifest (its
weights digest is checked), the images are decoded and encoded exactly as extraction did (same
preprocessing, precision and on-disk dtype cast), and the run's heads classify the features.
Text is never read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..core.config import require_positive
from ..datasets.images import BadImageError, load_rgb
from ..engine.backbones import resolve_device, resolve_precision
from ..engine.encode import encode_images
from ..engine.runs import load_finetuned, load_run, run_cache
from .evaluate import rebuild_vision


def check_images(paths: Sequence[Path]) -> None:
    """Decode every image once; the first unreadable one raises, naming the file and why."""
    for path in paths:
        if path.is_dir():
            raise BadImageError(f"{path} is a folder; pass image files (e.g. {path}/*.jpg)")
        load_rgb(path)


def top_classes(logits: torch.Tensor, class_names: Sequence[str], topk: int
                ) -> list[list[dict[str, Any]]]:
    """Per row, the ``topk`` classes by softmax probability: rank, class, index, probability."""
    probs = torch.softmax(logits.float(), dim=1)
    values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
    return [[{"rank": rank + 1, "class": class_names[i], "index": i, "probability": p}
             for rank, (i, p) in enumerate(zip(idx.tolist(), val.tolist()))]
            for idx, val in zip(indices, values)]


def predict_images(run_dir: Path | str | None, images: Sequence[Path | str], topk: int = 5,
                   device: str = "auto", num_workers: int = 0,
                   weights_dir: Path | str = "cache/weights", cache: Path | str | None = None,
                   finetuned: Path | str | None = None) -> list[dict[str, Any]]:
    """``[{"image": path, "predictions": [{rank, class, index, probability}, ...]}, ...]``
    with a trained run (its cache's backbone) or a fine-tuned checkpoint (``finetuned``: its
    own backbone and head)."""
    require_positive("--topk", topk)
    paths = [Path(p) for p in images]
    if not paths:
        raise BadImageError("no images given")
    if (run_dir is None) == (finetuned is None):
        raise ValueError("pass either --run RUN or --finetuned CKPT")
    check_images(paths)
    dev = resolve_device(device)
    if finetuned is not None:
        vision, model, meta = load_finetuned(finetuned, dev, weights_dir)
        encoding = {"batch_size": meta["batch_size"], "precision": resolve_precision("auto", dev),
                    "dtype": "float32", "decode": "workers"}
        class_names, seed, chunk = meta["class_names"], meta["seed"], 8192
    else:
        model, config = load_run(run_dir, dev)
        fc = run_cache(config, cache)
        vision = rebuild_vision(fc.manifest, dev, weights_dir)
        settings = fc.manifest["settings"]
        encoding = {"batch_size": settings["batch_size"], "precision": settings["precision"],
                    "dtype": fc.manifest["dtype"], "decode": settings.get("decode", "workers")}
        class_names, seed = config["class_names"], config["train"]["seed"]
        chunk = config["train"]["chunk_rows"]
    visual, errors = encode_images(vision, paths, encoding["batch_size"], encoding["precision"],
                                   encoding["dtype"], num_workers, "images", encoding["decode"])
    bad = [e for e in errors if e]
    if bad:
        raise BadImageError(f"cannot read {bad[0]}")
    generator = torch.Generator(device=dev).manual_seed(seed)
    logits = model.predict(visual.to(dev), generator, chunk)
    return [{"image": str(path), "predictions": top}
            for path, top in zip(paths, top_classes(logits, class_names, topk))]


__all__ = ["predict_images", "top_classes"]
