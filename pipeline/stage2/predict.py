"""Image-only inference: top-k classes with probabilities per image, from a trained run, a
fine-tuned checkpoint, or a model folder written by ``marnet export``.

A run's backbone is the one its cache was made with, rebuilt from the cache manifest (its
weights digest is checked); a checkpoint holds its own; a model folder holds both backbone and
head and needs neither cache nor dataset. In every case the images are decoded and encoded as
the features the head was trained on were (same preprocessing, precision and storage dtype
cast), so the logits are those ``eval --end-to-end`` gives. Text is never read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..core.config import require_positive
from ..datasets.images import BadImageError, load_rgb
from ..engine.standalone import Classifier, load_classifier, read_model_json, top_classes
from .export import finetuned_classifier, run_classifier

RUNTIMES = ("torch", "onnx")


def check_images(paths: Sequence[Path]) -> None:
    """Decode every image once; the first unreadable one raises, naming the file and why."""
    for path in paths:
        if path.is_dir():
            raise BadImageError(f"{path} is a folder; pass image files (e.g. {path}/*.jpg)")
        load_rgb(path)


def load_model(path: Path | str, device: str = "auto", runtime: str = "torch",
               overrides: dict[str, Any] | None = None) -> Classifier:
    """The classifier of a model folder (``marnet export``): ``.predict(images, topk=5)``
    gives the top-k classes per image, ``.logits(images)`` the logits; images are file paths
    or PIL images. ``runtime="onnx"`` runs its ``model.onnx`` with onnxruntime on the CPU
    instead of PyTorch; ``overrides`` change the sampling chains' test-time settings
    (PyTorch only)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime takes {' or '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "torch":
        return load_classifier(path, device, overrides)
    from ..engine.onnx_graph import OnnxClassifier

    if overrides:
        raise ValueError("the ONNX graph's sampling chain is fixed at export: export again "
                         "with --set to change it")
    return OnnxClassifier(path, read_model_json(path))


def predict_images(run_dir: Path | str | None, images: Sequence[Path | str], topk: int = 5,
                   device: str = "auto", num_workers: int = 0,
                   weights_dir: Path | str = "cache/weights", cache: Path | str | None = None,
                   finetuned: Path | str | None = None, model: Path | str | None = None,
                   runtime: str = "torch") -> list[dict[str, Any]]:
    """``[{"image": path, "predictions": [{rank, class, index, probability}, ...]}, ...]``
    with a trained run (its cache's backbone), a fine-tuned checkpoint (``finetuned``: its
    own backbone and head) or a model folder (``model``; ``runtime="onnx"`` runs its ONNX
    graph)."""
    require_positive("--topk", topk)
    paths = [Path(p) for p in images]
    if not paths:
        raise BadImageError("no images given")
    if sum(source is not None for source in (run_dir, finetuned, model)) != 1:
        raise ValueError("pass one of --run RUN, --finetuned CKPT or --model DIR")
    if runtime != "torch" and model is None:
        raise ValueError("--onnx runs a model folder's ONNX graph: pass --model DIR")
    check_images(paths)
    classifier: Classifier
    if model is not None:
        classifier = load_model(model, device, runtime)
    elif finetuned is not None:
        classifier = finetuned_classifier(finetuned, device, weights_dir)
    else:
        classifier = run_classifier(run_dir, cache, device, weights_dir)
    return classifier.predict(paths, topk, num_workers)


__all__ = ["load_model", "predict_images", "top_classes"]
