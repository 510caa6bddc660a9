"""marnet: image classifiers aligned with training-only text on a two-stage feature cache.

``marnet.load_model(DIR).predict(images)`` classifies images with a model folder written by
``marnet export``; importing ``marnet`` itself loads nothing heavy.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_model(path: Any, device: str = "auto", runtime: str = "torch",
               overrides: dict[str, Any] | None = None) -> Any:
    """The classifier of a model folder (``marnet export``), with no cache, dataset or
    network: ``.predict(images, topk=5)`` (top-k classes with probabilities per image) and
    ``.logits(images)``; images are file paths or PIL images. ``runtime="onnx"`` runs the
    folder's ONNX graph with onnxruntime. See ``pipeline.stage2.predict.load_model``."""
    from .pipeline.stage2.predict import load_model as load

    return load(path, device, runtime, overrides)


__all__ = ["__version__", "load_model"]
