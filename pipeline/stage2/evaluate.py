"""Evaluation of a trained run: top-1/top-5 and per-class accuracy, from the cache or images.

From the cache, the run's heads read the cached visual features of a split. End to end, the
dataset is re-read (its digest must be the cache's: the same records, wherever the root now
is), the vision backbone the cache was made with is rebuilt (its weights digest is checked),
the split's images are decoded and encoded exactly as extraction did (same batches, same
precision, same on-disk dtype), and the same heads classify them: text is never read. On the
same device the two paths give identical predictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..datasets import DatasetInfo, Record, load_dataset
from ..engine.backbones import VisionSpec, build_vision, resolve_device, resolve_precision
from ..engine.encode import ImageSource, readable
from ..engine.runs import load_run, run_cache
from ..engine.training import HeadsModel, evaluate_features
from ..models.heads import TrainContext
from ..store import CacheError, FeatureCache
from .train import load_features


def rebuild_vision(manifest: dict[str, Any], device: torch.device, weights_dir: Path | str):
    """The exact vision backbone a cache was made with; refuses if its weights changed."""
    spec = VisionSpec(**manifest["vision_spec"])
    vision = build_vision(spec, weights_dir)
    expected = manifest["inputs"]["visual"]["weights_digest"]
    if vision.description["weights_digest"] != expected:
        raise CacheError(f"the vision weights ({spec.finetuned or spec.weights}) no longer match "
                         f"the cache (digest {vision.description['weights_digest']} != {expected})")
    return vision.to_runtime(device, manifest["settings"]["channels_last"]).for_inference()


def run_inputs(run_dir: Path | str, split: str = "test", cache: Path | str | None = None,
               end_to_end: bool = False, root: Path | str | None = None,
               device: str = "auto", num_workers: int = 2,
               weights_dir: Path | str = "cache/weights",
               log: Callable[[str], None] = print, overrides: dict[str, Any] | None = None
               ) -> tuple[HeadsModel, torch.Tensor, torch.Tensor, dict[str, Any], TrainContext]:
    """The run at ``run_dir`` (its heads and config), the raw visual features and labels of
    ``split`` (the readable images' rows end to end), and the context it evaluates in: the
    run's seed and chunk size. ``end_to_end`` reruns the backbone on the images;
    ``overrides`` change test-time settings (see :func:`pipeline.engine.runs.load_run`)."""
    dev = resolve_device(device)
    model, config = load_run(run_dir, dev, overrides)
    fc = run_cache(config, cache)
    ctx = TrainContext(dev, torch.Generator(device=dev), eval_seed=config["train"]["seed"],
                       chunk_rows=config["train"]["chunk_rows"])
    features = config.get("features", "visual")
    if end_to_end and features != "visual":
        raise ValueError("an end-to-end evaluation needs a run trained on visual features; "
                         f"this run classifies {features} features")
    if end_to_end:
        visual, labels = end_to_end_features(fc, split, root, dev, num_workers, weights_dir, log)
    else:
        data = load_features(fc, split, dev, features, ("visual", "label"))
        visual, labels = data["visual"], data["label"]
    return model, visual.to(dev), labels.to(dev), config, ctx


def run_logits(run_dir: Path | str, split: str = "test", cache: Path | str | None = None,
               end_to_end: bool = False, root: Path | str | None = None,
               device: str = "auto", num_workers: int = 2,
               weights_dir: Path | str = "cache/weights",
               log: Callable[[str], None] = print, overrides: dict[str, Any] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Logits and labels of the run at ``run_dir`` on ``split`` (:func:`run_inputs`), and its
    config; diffusion heads sample with the run's seed, over the whole split at once."""
    model, visual, labels, config, ctx = run_inputs(run_dir, split, cache, end_to_end, root,
                                                    device, num_workers, weights_dir, log,
                                                    overrides)
    return model.predict(visual, ctx.eval_generator(), ctx.chunk_rows), labels, config


def evaluate_run(run_dir: Path | str, split: str = "test", cache: Path | str | None = None,
                 end_to_end: bool = False, root: Path | str | None = None,
                 device: str = "auto", num_workers: int = 2,
                 weights_dir: Path | str = "cache/weights",
                 log: Callable[[str], None] = print,
                 overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics of the run at ``run_dir`` on ``split`` (:func:`run_logits`), with the head's
    own diagnostics of the split (SeDA's ``z_top1``) when it has some."""
    model, visual, labels, config, ctx = run_inputs(run_dir, split, cache, end_to_end, root,
                                                    device, num_workers, weights_dir, log,
                                                    overrides)
    settings = {"overrides": config["eval_overrides"]} if overrides else {}
    metrics = evaluate_features(model, visual, labels, len(config["class_names"]), ctx)
    return {"split": split, "source": "images" if end_to_end else "cache", **settings,
            **metrics}


def finetuned_features(checkpoint: Path | str, split: str = "test",
                       root: Path | str | None = None, device: torch.device | str = "cpu",
                       num_workers: int = 2, weights_dir: Path | str = "cache/weights",
                       log: Callable[[str], None] = print,
                       overrides: dict[str, Any] | None = None
                       ) -> tuple[Any, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """A fine-tuned checkpoint's head, the raw visual features its backbone computes from the
    images of ``split`` (readable ones), their labels, and the checkpoint's provenance."""
    heads, source, meta = finetuned_image_source(checkpoint, split, root, torch.device(device),
                                                 num_workers, weights_dir, overrides)
    log(f"encoding {len(source.paths):,} {split} images with the fine-tuned {meta['model']}")
    visual, errors = source.encode(f"{split} images")
    keep = readable(errors, log)
    dev = torch.device(device)
    return heads, visual[keep].to(dev), source.labels[keep].to(dev), meta


def trained_split(name: str, root: Path | str, template: str, options: dict[str, Any],
                  digest: str, trained: str, split: str) -> list[Record]:
    """The records of ``split`` of the dataset ``trained`` (a checkpoint, a model) was trained
    on: read again from ``root`` and refused unless its digest is the one recorded (the same
    records, wherever the root now is)."""
    info = load_dataset(name, root, template, **options)
    if info.digest() != digest:
        raise CacheError(f"the dataset at {info.root} is not the one {trained} was trained "
                         "on (split files, labels, texts or image paths differ); pass --root "
                         "with that dataset")
    if split not in info.splits:
        raise CacheError(f"split {split!r} is not in dataset {name} "
                         f"(it has {', '.join(info.splits)})")
    return info.splits[split]


def finetuned_image_source(checkpoint: Path | str, split: str, root: Path | str | None,
                           device: torch.device, num_workers: int, weights_dir: Path | str,
                           overrides: dict[str, Any] | None = None
                           ) -> tuple[HeadsModel, ImageSource, dict[str, Any]]:
    """A fine-tuned checkpoint's head, ``split``'s images with its backbone (encoded as the
    fine-tune's own evaluation encodes them: float32, un-augmented) and its provenance."""
    from ..engine.runs import load_finetuned

    vision, heads, meta = load_finetuned(checkpoint, device, weights_dir, overrides)
    source = meta["source"]
    records = trained_split(meta["dataset"], root or source["root"], meta["template"],
                            source.get("options", {}), meta["dataset_digest"], str(checkpoint),
                            split)
    precision = resolve_precision(meta.get("precision", "auto"), device)
    return heads, ImageSource(vision, [r.image for r in records], [r.id for r in records],
                              torch.tensor([r.label for r in records], dtype=torch.long),
                              meta["batch_size"], precision, "float32", num_workers), meta


def finetuned_logits(checkpoint: Path | str, split: str = "test",
                     root: Path | str | None = None, device: str = "auto",
                     num_workers: int = 2, weights_dir: Path | str = "cache/weights",
                     log: Callable[[str], None] = print,
                     overrides: dict[str, Any] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Logits and labels of a fine-tuned checkpoint (``marnet finetune``) on ``split``, from
    the images alone: its backbone encodes them, its head (with its standardisers) classifies
    them, and diffusion heads sample with the fine-tune's seed, as stage two's evaluation
    does. Also returns the checkpoint's provenance."""
    heads, visual, labels, meta = finetuned_features(checkpoint, split, root,
                                                     resolve_device(device), num_workers,
                                                     weights_dir, log, overrides)
    generator = torch.Generator(device=visual.device).manual_seed(meta["seed"])
    return heads.predict(visual, generator), labels, meta


def evaluate_finetuned(checkpoint: Path | str, split: str = "test",
                       root: Path | str | None = None, device: str = "auto",
                       num_workers: int = 2, weights_dir: Path | str = "cache/weights",
                       log: Callable[[str], None] = print,
                       overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Top-1/top-5 and per-class accuracy of :func:`finetuned_logits`, with the head's own
    diagnostics of the split (SeDA's ``z_top1``) when it has some."""
    heads, visual, labels, meta = finetuned_features(checkpoint, split, root,
                                                     resolve_device(device), num_workers,
                                                     weights_dir, log, overrides)
    ctx = TrainContext(visual.device, torch.Generator(device=visual.device),
                       eval_seed=meta["seed"])
    settings = {"overrides": {k: str(v) for k, v in overrides.items()}} if overrides else {}
    return {"split": split, "source": "images (fine-tuned)", "method": meta["method"],
            **settings, **evaluate_features(heads, visual, labels, len(meta["class_names"]), ctx)}


def require_same_dataset(info: DatasetInfo, fc: FeatureCache) -> None:
    """Refuse a dataset whose digest differs from the one cache ``fc`` was extracted from."""
    expected = fc.manifest["inputs"]["dataset"]["digest"]
    found = info.digest()
    if found != expected:
        raise CacheError(
            f"the dataset at {info.root} is not the one the cache {fc.root} was extracted from "
            f"({fc.manifest['dataset']['root']}): split files, labels, texts or image paths "
            f"differ (dataset digest {found[:12]}, cache {expected[:12]}). Pass --root with the "
            "dataset the cache was made from, or extract this dataset and train on that cache")


def cache_image_source(fc: FeatureCache, split: str, root: Path | str | None,
                       device: torch.device, num_workers: int, weights_dir: Path | str
                       ) -> ImageSource:
    """``split``'s images and the backbone cache ``fc`` was made with, encoded as extraction
    encoded them (batches, precision, storage dtype, decode mode)."""
    manifest = fc.manifest
    ds = manifest["dataset"]
    info = load_dataset(ds["name"], root or ds["root"], ds["template"], **ds.get("options", {}))
    require_same_dataset(info, fc)
    if split not in info.splits:
        raise CacheError(f"split {split!r} is not in dataset {ds['name']}")
    records = info.splits[split]
    settings = manifest["settings"]
    return ImageSource(rebuild_vision(manifest, device, weights_dir), [r.image for r in records],
                       [r.id for r in records], torch.tensor([r.label for r in records]),
                       settings["batch_size"], settings["precision"], manifest["dtype"],
                       num_workers, settings.get("decode", "workers"))


def end_to_end_features(fc: FeatureCache, split: str, root: Path | str | None,
                        device: torch.device, num_workers: int, weights_dir: Path | str,
                        log: Callable[[str], None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Visual features and labels of ``split`` computed from the images (no text is read)."""
    source = cache_image_source(fc, split, root, device, num_workers, weights_dir)
    log(f"encoding {len(source.paths):,} {split} images with "
        f"{fc.manifest['vision_spec']['model']}")
    visual, errors = source.encode(f"{split} images")
    keep = readable(errors, log)
    return visual[keep], source.labels[keep]


__all__ = ["HeadsModel", "evaluate_finetuned", "evaluate_run", "finetuned_features", "run_inputs",
           "finetuned_logits", "end_to_end_features", "rebuild_vision", "require_same_dataset",
           "run_logits"]
