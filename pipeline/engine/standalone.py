"""A classifier that stands alone: a vision backbone, a trained head and the settings that
make its features, saved in one folder and loaded with no cache, no dataset and no network.

A model folder (``marnet export``) holds:

- ``model.json``: the format and its version; the backbone (timm model name, the arguments
  that rebuild its architecture, its weights digest, memory format); the preprocessing (the
  timm data config as resolved when the features were made); the encoding (batch size,
  precision, storage dtype, decode mode); the head (method, resolved settings, dims, the seed
  and chunk size its sampling chains use); the class names; the provenance (run or
  checkpoint, cache key, dataset digest, training settings, marnet and library versions);
  and, with an ONNX export, what ``model.onnx`` takes and how well it agrees with PyTorch;
- ``backbone.safetensors`` (the backbone's state dict, batch norms unfolded) and
  ``heads.safetensors`` (standardisers + head, as a run saves them);
- ``model.onnx`` (optional): the image-only classifier as one ONNX graph (:mod:`.onnx_graph`).

:class:`ImageClassifier` classifies images exactly as ``eval --end-to-end`` does: the same
decoding, preprocessing, batches, precision and storage cast, the same standardiser and head,
diffusion chains seeded with the run's seed over the images given, in their order.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..core.config import require_positive
from ..datasets.images import BadImageError, ImageInput
from .backbones import VisionBackbone, resolve_device, resolve_precision, timm_backbone
from .encode import encode_images
from .runs import rebuild_heads
from .training import HeadsModel

FORMAT = "marnet-model"
FORMAT_VERSION = 1
MODEL_JSON = "model.json"
BACKBONE_FILE = "backbone.safetensors"
HEADS_FILE = "heads.safetensors"
ONNX_FILE = "model.onnx"


class ModelFolderError(ValueError):
    """A model folder that cannot be read: missing files, another format, damaged weights."""


@dataclass(frozen=True)
class Encoding:
    """How images become the features a head was trained on: batches, compute precision,
    the storage dtype features are cast through (a cache's, or float32), the decode mode."""

    batch_size: int
    precision: str
    dtype: str = "float32"
    decode: str = "workers"


def image_name(image: ImageInput, index: int) -> str:
    """A file's path, or ``<image N>`` for an image given in memory."""
    return str(image) if isinstance(image, (str, Path)) else f"<image {index}>"


def top_classes(logits: torch.Tensor, class_names: Sequence[str], topk: int
                ) -> list[list[dict[str, Any]]]:
    """Per row, the ``topk`` classes by softmax probability: rank, class, index, probability."""
    probs = torch.softmax(logits.float(), dim=1)
    values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
    return [[{"rank": rank + 1, "class": class_names[i], "index": i, "probability": p}
             for rank, (i, p) in enumerate(zip(idx.tolist(), val.tolist()))]
            for idx, val in zip(indices, values)]


class Classifier:
    """What every classifier of images offers: ``logits`` (each runtime its own) and
    ``predict``, the top-k classes from them."""

    class_names: list[str]

    def logits(self, images: Sequence[ImageInput], num_workers: int = 0) -> torch.Tensor:
        """Class logits ``[len(images), classes]`` of image files or PIL images."""
        raise NotImplementedError

    def predict(self, images: Sequence[ImageInput], topk: int = 5, num_workers: int = 0
                ) -> list[dict[str, Any]]:
        """``[{"image": path, "predictions": [{rank, class, index, probability}, ...]}]``,
        one entry per image, in order."""
        require_positive("topk", topk)
        images = list(images)
        tops = top_classes(self.logits(images, num_workers), self.class_names, topk)
        return [{"image": image_name(image, i), "predictions": top}
                for i, (image, top) in enumerate(zip(images, tops))]


def require_files(images: Sequence[ImageInput], decode: str) -> None:
    """Refuse no images, and in-memory images where the features were made from files
    decoded on the device (``--decode device`` reads the encoded bytes)."""
    if not images:
        raise BadImageError("no images given")
    if decode == "device" and not all(isinstance(i, (str, Path)) for i in images):
        raise BadImageError("this model's features were made with --decode device, which "
                            "decodes image files: pass file paths, not images in memory")


@dataclass
class ImageClassifier(Classifier):
    """A backbone ready for inference and the head it feeds, with everything that makes its
    logits equal to ``eval --end-to-end``'s (see the module docstring)."""

    vision: VisionBackbone
    heads: HeadsModel
    encoding: Encoding
    class_names: list[str]
    dims: dict[str, int]
    method_config: dict[str, Any]
    seed: int = 0
    chunk_rows: int = 8192
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.vision.device

    def features(self, images: Sequence[ImageInput], num_workers: int = 0) -> torch.Tensor:
        """Raw visual features of ``images`` (files or PIL images), as a cache holds them;
        the first unreadable image raises, naming it."""
        require_files(images, self.encoding.decode)
        enc = self.encoding
        visual, errors = encode_images(self.vision, list(images), enc.batch_size,
                                       resolve_precision(enc.precision, self.device), enc.dtype,
                                       num_workers, "images", enc.decode)
        bad = next((e for e in errors if e), None)
        if bad:
            raise BadImageError(f"cannot read {bad}")
        return visual

    def logits(self, images: Sequence[ImageInput], num_workers: int = 0) -> torch.Tensor:
        """Class logits ``[len(images), classes]``; diffusion heads sample with the seed."""
        return self.logits_of(self.features(images, num_workers))

    def logits_of(self, visual: torch.Tensor) -> torch.Tensor:
        """The head's logits of raw visual features, sampling seeded as evaluation seeds it."""
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        return self.heads.predict(visual.to(self.device), generator, self.chunk_rows)

    def describe(self) -> dict[str, Any]:
        """``model.json`` without its ``onnx`` section: what :func:`load_classifier` reads."""
        from ... import __version__

        vision = self.vision
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "marnet_version": __version__,
            "versions": library_versions(),
            "backbone": {"timm_model": vision.description["model"],
                         "create_kwargs": vision.create_kwargs, "num_features": vision.dim,
                         "weights_digest": vision.description["weights_digest"],
                         "channels_last": bool(getattr(vision, "channels_last", False)),
                         "file": BACKBONE_FILE},
            "preprocessing": vision.data_config,
            "encoding": asdict(self.encoding),
            "head": {"method": self.heads.method, "method_config": self.method_config,
                     "dims": self.dims, "seed": self.seed, "chunk_rows": self.chunk_rows,
                     "file": HEADS_FILE},
            "class_names": list(self.class_names),
            "provenance": self.provenance,
        }


def library_versions() -> dict[str, str]:
    """The versions of the libraries that rebuild and run a saved model."""
    import safetensors
    import timm

    return {"torch": torch.__version__, "timm": timm.__version__,
            "safetensors": safetensors.__version__}


def save_classifier(classifier: ImageClassifier, folder: Path) -> dict[str, Any]:
    """Write ``classifier`` into ``folder`` (created): both safetensors files and
    ``model.json``; returns what ``model.json`` holds."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    meta = classifier.describe()
    tag = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    for module, name in ((classifier.vision.model, BACKBONE_FILE),
                         (classifier.heads, HEADS_FILE)):
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(folder / name), metadata=tag)
    write_model_json(folder, meta)
    return meta


def write_model_json(folder: Path, meta: dict[str, Any]) -> None:
    """``model.json`` of ``folder`` (indented, sorted as written)."""
    (folder / MODEL_JSON).write_text(json.dumps(meta, indent=2, default=str) + "\n")


REQUIRED_KEYS = ("backbone", "preprocessing", "encoding", "head", "class_names")


def read_model_json(folder: Path | str) -> dict[str, Any]:
    """``model.json`` of a model folder, checked: its format, a version this marnet reads,
    every section present."""
    path = Path(folder) / MODEL_JSON
    if not path.is_file():
        raise ModelFolderError(f"{folder} is not a model folder: {MODEL_JSON} is missing "
                               "(write one with `marnet export`)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFolderError(f"{path}: not a marnet model (format {meta.get('format')!r}, "
                               f"expected {FORMAT!r})" if isinstance(meta, dict) else
                               f"{path}: not a marnet model")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFolderError(f"{path}: format version {version!r}; this marnet reads "
                               f"version {FORMAT_VERSION} and earlier: upgrade marnet")
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise ModelFolderError(f"{path}: missing {', '.join(missing)}")
    return meta


def read_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``folder/name``; a missing or damaged file names itself."""
    from safetensors.torch import load_file

    path = folder / name
    if not path.is_file():
        raise ModelFolderError(f"{path} is missing: the model folder is incomplete; "
                               "export it again")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ModelFolderError(f"{path}: cannot read the weights ({type(exc).__name__}: "
                               f"{str(exc)[:200]}); export the model again") from None


def load_classifier(folder: Path | str, device: str = "auto",
                    overrides: dict[str, Any] | None = None) -> ImageClassifier:
    """The classifier saved in ``folder``, on ``device``: the backbone rebuilt from its timm
    name with ``pretrained=False`` and the saved weights (their digest checked), the head from
    its settings; ``overrides`` change test-time settings of the sampling chains only (as
    ``eval --set``)."""
    folder = Path(folder)
    meta = read_model_json(folder)
    dev = resolve_device(device)
    backbone, head = meta["backbone"], meta["head"]
    vision = timm_backbone(backbone["timm_model"], backbone.get("create_kwargs", {}),
                           meta["preprocessing"], read_weights(folder, BACKBONE_FILE),
                           str(folder / BACKBONE_FILE))
    if vision.description["weights_digest"] != backbone["weights_digest"]:
        raise ModelFolderError(f"{folder / BACKBONE_FILE}: the weights' digest "
                               f"{vision.description['weights_digest']} is not the one "
                               f"{MODEL_JSON} records ({backbone['weights_digest']}): the file "
                               "was changed or damaged; export the model again")
    vision = vision.to_runtime(dev, backbone.get("channels_last", False)).for_inference()
    heads, method_cfg = rebuild_heads(head["method"], head["method_config"], head["dims"],
                                      read_weights(folder, HEADS_FILE),
                                      str(folder / HEADS_FILE), overrides)
    provenance = dict(meta.get("provenance", {}))
    if overrides:
        provenance["eval_overrides"] = {k: str(v) for k, v in overrides.items()}
    return ImageClassifier(vision, heads.to(dev), Encoding(**meta["encoding"]),
                           list(meta["class_names"]), dict(head["dims"]), asdict(method_cfg),
                           int(head.get("seed", 0)), int(head.get("chunk_rows", 8192)),
                           provenance)
