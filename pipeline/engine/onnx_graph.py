"""The image-only classifier as one ONNX graph, and onnxruntime inference with it.

``model.onnx`` maps a batch of preprocessed ``uint8`` images ``[B, 3, H, W]`` (decoded,
resized and cropped as ``preprocessing`` in ``model.json`` says) to class logits ``[B, C]``:
normalisation, the backbone, the cast through the storage dtype, the standardiser and the
head, in float32. A head that samples (MARNet's CDR, SeDA) has its reverse chains unrolled
into the graph, and takes their standard normal noise as a second input ``noise`` ``[B, K]``:
each draw of a chain reads the next columns (:class:`~..models.schedule.NoiseFeed`), so the
graph itself is deterministic. A DDIM chain of k steps with ``eta = 0`` needs one draw per
chain (``K`` = the text dim); DDPM one per step. Rows never interact: each image's logits
depend on its image and its noise row alone, so any batching gives the same logits.

:class:`OnnxClassifier` runs the graph with onnxruntime on the folder's preprocessing, and
draws the noise from the model's seed exactly as the PyTorch chains draw it when the images
fit in one chunk (``chunk_rows``, 8,192 by default): then the two agree to float rounding.

The exporter is torch's (``torch.onnx.export(dynamo=True)``, which needs ``onnxscript``);
``onnx``, ``onnxscript`` and ``onnxruntime`` come with ``pip install 'marnet[onnx]'``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..core.config import ConfigError, require_modules
from ..datasets.images import BadImageError, ImageInput
from ..models.schedule import NoiseFeed, NoiseTally
from .encode import image_loader
from .standalone import ONNX_FILE, Classifier, ImageClassifier, require_files

INSTALL_HINT = ("ONNX export and inference need onnx, onnxscript and onnxruntime: "
                "pip install 'marnet[onnx]'")
OPSET = 18
# the largest batch the exported graph is traced for (its batch dimension is dynamic)
MAX_BATCH = 1 << 20


def require_onnx(*modules: str) -> None:
    """Import ``modules`` (default: all three), or a :class:`ConfigError` with the hint."""
    require_modules(modules or ("onnx", "onnxscript", "onnxruntime"), INSTALL_HINT)


class ClassifierGraph(nn.Module):
    """What ``model.onnx`` computes: ``uint8`` images (and the chains' noise) -> logits."""

    def __init__(self, classifier: ImageClassifier):
        super().__init__()
        config = classifier.vision.data_config
        std = torch.tensor(config["std"]).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", torch.tensor(config["mean"]).view(1, 3, 1, 1) / std)
        self.backbone = classifier.vision.model
        self.storage = getattr(torch, classifier.encoding.dtype)
        self.norm_visual = classifier.heads.norm_visual
        self.head = classifier.heads.head

    def forward(self, image: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        features = self.backbone(image.float() * self.scale - self.shift)
        visual = self.norm_visual(features.to(self.storage).float())
        return self.head.predict(visual, NoiseFeed(noise) if noise is not None else None,
                                 MAX_BATCH)


def noise_draws(classifier: ImageClassifier) -> list[tuple[int, ...]]:
    """The per-row shape of every standard normal draw the head's prediction makes, in order
    (none for a head that does not sample)."""
    tally = NoiseTally()
    visual = torch.zeros(2, classifier.dims["visual"], device=classifier.device)
    with torch.no_grad():
        classifier.heads.head.predict(visual, tally, MAX_BATCH)
    return tally.draws


def noise_width(draws: Sequence[tuple[int, ...]]) -> int:
    """``K``, the columns of the noise input: every draw's per-row size, summed."""
    return sum(math.prod(shape) for shape in draws)


def draw_noise(draws: Sequence[tuple[int, ...]], rows: int, generator: torch.Generator
               ) -> torch.Tensor:
    """``[rows, K]`` noise drawn as the PyTorch chains draw it for ``rows`` images in one
    chunk: each draw ``torch.randn((rows, *shape))`` from ``generator``, in order."""
    parts = [torch.randn((rows, *shape), generator=generator).reshape(rows, -1)
             for shape in draws]
    return torch.cat(parts, dim=1) if parts else torch.zeros(rows, 0)


def graph_inputs(classifier: ImageClassifier, rows: int, seed: int = 0
                 ) -> tuple[torch.Tensor, ...]:
    """Seeded random example inputs of the graph: ``rows`` images (and noise)."""
    generator = torch.Generator().manual_seed(seed)
    size = classifier.vision.data_config["input_size"]
    image = torch.randint(0, 256, (rows, *size), generator=generator, dtype=torch.uint8)
    draws = noise_draws(classifier)
    return (image, draw_noise(draws, rows, generator)) if draws else (image,)


def export_onnx(classifier: ImageClassifier, path: Path) -> dict[str, Any]:
    """Write ``classifier`` (on the CPU, float32) as ONNX to ``path``; returns the
    ``model.json`` section that says what it takes."""
    require_onnx()
    if classifier.device.type != "cpu":
        raise ValueError("the ONNX export traces the classifier on the CPU; load it there")
    draws = noise_draws(classifier)
    graph = ClassifierGraph(classifier).eval()
    example = graph_inputs(classifier, 2)
    names = ["image", "noise"][:len(example)]
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dynamic = {name: {0: batch} for name in names}
    with torch.no_grad(), warnings.catch_warnings():
        # the two inputs share one batch dimension, which the exporter names once
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints")
        program = torch.onnx.export(graph, example, dynamo=True, input_names=names,
                                    output_names=["logits"], dynamic_shapes=dynamic,
                                    opset_version=OPSET, verbose=False)
    program.save(str(path))
    return {"file": path.name, "opset": OPSET, "precision": "fp32",
            "inputs": {"image": ["batch", *classifier.vision.data_config["input_size"]],
                       **({"noise": ["batch", noise_width(draws)]} if draws else {})},
            "image_dtype": "uint8", "noise_draws": [list(d) for d in draws],
            "outputs": {"logits": ["batch", len(classifier.class_names)]}}


def onnx_session(path: Path) -> Any:
    """An onnxruntime CPU session of ``path``."""
    require_onnx("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_graph(session: Any, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The graph's logits of ``inputs`` (image, and noise when it takes noise)."""
    names = [i.name for i in session.get_inputs()]
    feed = {name: tensor.cpu().numpy() for name, tensor in zip(names, inputs)}
    return torch.from_numpy(session.run(["logits"], feed)[0])


class OnnxClassifier(Classifier):
    """A model folder's ``model.onnx`` through onnxruntime, on the folder's preprocessing."""

    def __init__(self, folder: Path | str, meta: dict[str, Any]):
        folder = Path(folder)
        spec = meta.get("onnx")
        if not spec or not (folder / spec["file"]).is_file():
            raise ConfigError(f"{folder} has no ONNX graph ({ONNX_FILE}); export it with "
                              "`marnet export ... --onnx`")
        self.session = onnx_session(folder / spec["file"])
        self.data_config = meta["preprocessing"]
        self.encoding = meta["encoding"]
        self.class_names = list(meta["class_names"])
        self.draws = [tuple(d) for d in spec.get("noise_draws", [])]
        self.seed = int(meta["head"].get("seed", 0))

    def logits(self, images: Sequence[ImageInput], num_workers: int = 0) -> torch.Tensor:
        """Class logits ``[len(images), classes]`` (float32); noise from the model's seed."""
        images = list(images)
        require_files(images, self.encoding["decode"])
        size = self.encoding["batch_size"]
        batches = [list(range(i, min(i + size, len(images))))
                   for i in range(0, len(images), size)]
        noise = draw_noise(self.draws, len(images), torch.Generator().manual_seed(self.seed))
        out = []
        for pixels, indices, errors in image_loader(images, self.data_config, batches,
                                                    num_workers, torch.device("cpu"),
                                                    self.encoding["decode"]):
            bad = next((e for e in errors if e), None)
            if bad:
                raise BadImageError(f"cannot read {bad}")
            inputs = (pixels, noise[indices]) if self.draws else (pixels,)
            out.append(run_graph(self.session, inputs))
        return torch.cat(out)


def agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, Any]:
    """Max absolute logit difference and top-1 agreement of two logit tables."""
    reference, other = reference.float().cpu(), other.float().cpu()
    return {"images": len(reference),
            "max_abs_logit_diff": float((reference - other).abs().max()) if len(reference)
            else 0.0,
            "max_abs_logit": float(reference.abs().max()) if len(reference) else 0.0,
            "top1_agreement": float((reference.argmax(1) == other.argmax(1)).float().mean())}


def check_graph(classifier: ImageClassifier, path: Path, rows: int = 8) -> dict[str, Any]:
    """``model.onnx`` against PyTorch on ``rows`` seeded random images (and noise): the
    graph's own computation, traced or run by onnxruntime."""
    inputs = graph_inputs(classifier, rows, seed=1)
    with torch.no_grad():
        reference = ClassifierGraph(classifier).eval()(*inputs)
    return {"on": f"{rows} random images", **agreement(reference, run_graph(
        onnx_session(path), inputs))}
