"""``marnet export``: a trained run (with its cache's backbone) or a fine-tuned checkpoint as
one folder that classifies images alone (:mod:`pipeline.engine.standalone`), optionally with
the image-only classifier as ONNX (:mod:`pipeline.engine.onnx_graph`), checked against
PyTorch with onnxruntime.

The classifiers built here are the ones ``eval --end-to-end`` and ``predict`` use: a run's
backbone is rebuilt from its cache's manifest (weights digest checked) and encodes images as
extraction did; a checkpoint's backbone and head encode as the fine-tune's evaluation does.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..engine.backbones import resolve_device, weights_provenance
from ..engine.onnx_graph import OnnxClassifier, agreement, check_graph, export_onnx
from ..engine.runs import load_finetuned, load_run, run_cache
from ..engine.standalone import (
    MODEL_JSON,
    ONNX_FILE,
    Encoding,
    ImageClassifier,
    save_classifier,
    write_model_json,
)
from .evaluate import rebuild_vision, trained_split


def run_classifier(run_dir: Path | str, cache: Path | str | None = None,
                   device: str = "auto", weights_dir: Path | str = "cache/weights",
                   overrides: dict[str, Any] | None = None) -> ImageClassifier:
    """A trained run's heads on the backbone its cache was made with, encoding images as
    extraction did (batches, precision, storage dtype, decode mode)."""
    dev = resolve_device(device)
    model, config = load_run(run_dir, dev, overrides)
    if config.get("features", "visual") != "visual":
        raise ValueError(f"{run_dir} classifies {config['features']} features, not images: "
                         "only a run trained on visual features classifies images")
    fc = run_cache(config, cache)
    manifest = fc.manifest
    settings = manifest["settings"]
    encoding = Encoding(settings["batch_size"], settings["precision"], manifest["dtype"],
                        settings.get("decode", "workers"))
    dataset = {**{k: manifest["dataset"].get(k) for k in ("name", "root", "template")},
               "options": manifest["dataset"].get("options", {}),
               "digest": manifest["inputs"]["dataset"]["digest"]}
    results = Path(run_dir) / "results.json"
    provenance = {
        "source": "run", "run": str(Path(run_dir).resolve()), "method": config["method"],
        "train": config["train"], "dataset": dataset,
        "cache": {"path": str(fc.root), "key": fc.key, "inputs": manifest["inputs"]},
        "results": json.loads(results.read_text()) if results.is_file() else None,
        "eval_overrides": config.get("eval_overrides")}
    return ImageClassifier(rebuild_vision(manifest, dev, weights_dir), model, encoding,
                           list(config["class_names"]), dict(config["dims"]),
                           config["method_config"], int(config["train"]["seed"]),
                           int(config["train"]["chunk_rows"]), provenance)


def finetuned_classifier(checkpoint: Path | str, device: str = "auto",
                         weights_dir: Path | str = "cache/weights",
                         overrides: dict[str, Any] | None = None) -> ImageClassifier:
    """A fine-tuned checkpoint's backbone and head, encoding images as ``eval --finetuned``
    does (float32 features, the fine-tune's precision and batch size, its seed)."""
    dev = resolve_device(device)
    vision, heads, meta = load_finetuned(checkpoint, dev, weights_dir, overrides)
    source = meta.get("source", {})
    dataset = {"name": meta["dataset"], "root": source.get("root"),
               "template": meta["template"], "options": source.get("options", {}),
               "digest": meta["dataset_digest"]}
    provenance = {"source": "finetuned", "checkpoint": str(Path(checkpoint).resolve()),
                  "method": meta["method"], "dataset": dataset,
                  "finetune": weights_provenance(meta),
                  "eval_overrides": meta.get("eval_overrides")}
    encoding = Encoding(meta["batch_size"], meta.get("precision", "auto"), "float32", "workers")
    return ImageClassifier(vision, heads, encoding, list(meta["class_names"]),
                           dict(meta["dims"]), meta["method_config"], int(meta["seed"]),
                           8192, provenance)


def split_images(dataset: dict[str, Any], split: str, root: Path | str | None = None
                 ) -> list[Path]:
    """The image files of ``split`` of the dataset a model was trained on (its digest must
    match: the same records, wherever the root now is)."""
    records = trained_split(dataset["name"], root or dataset["root"], dataset["template"],
                            dataset.get("options") or {}, dataset["digest"], "the model", split)
    return [record.image for record in records]


def folder_bytes(path: Path | str) -> int | None:
    """Bytes of the files under a local folder (None for a URL)."""
    root = Path(path)
    if not root.is_dir():
        return None
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def share_as_umask_allows(folder: Path) -> None:
    """Give ``folder`` and its files the permissions a new folder and file get (a temporary
    folder, and safetensors' files, are private to their owner)."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~mask)


def refuse_existing(out: Path, overwrite: bool) -> None:
    """An existing non-empty ``out`` needs ``overwrite``, and is replaced only if it is a model
    folder (never an unrelated folder)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if not (out / MODEL_JSON).is_file():
        raise FileExistsError(f"{out} exists and is not a model folder (no {MODEL_JSON}); "
                              "choose another --out")


def onnx_section(classifier: ImageClassifier, folder: Path, check_split: str | None,
                 root: Path | str | None, num_workers: int,
                 log: Callable[[str], None]) -> dict[str, Any]:
    """Export ``model.onnx`` into ``folder`` and check it against PyTorch: on random images,
    and on ``check_split``'s images through both runtimes (PyTorch = eval's logits)."""
    log("exporting the classifier to ONNX")
    section = export_onnx(classifier, folder / ONNX_FILE)
    checks = [check_graph(classifier, folder / ONNX_FILE)]
    if check_split:
        images = split_images(classifier.provenance["dataset"], check_split, root)
        log(f"checking ONNX against PyTorch on {len(images):,} {check_split} images")
        meta = {**classifier.describe(), "onnx": section}
        reference = classifier.logits(images, num_workers)
        other = OnnxClassifier(folder, meta).logits(images, num_workers)
        checks.append({"on": f"{check_split} split ({classifier.provenance['dataset']['name']})",
                       **agreement(reference, other)})
    return {**section, "checks": checks}


def export_model(out: Path | str, run: Path | str | None = None,
                 finetuned: Path | str | None = None, cache: Path | str | None = None,
                 onnx: bool = False, check_split: str | None = None,
                 root: Path | str | None = None, overrides: dict[str, Any] | None = None,
                 overwrite: bool = False, weights_dir: Path | str = "cache/weights",
                 num_workers: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the classifier of ``run`` (or of checkpoint ``finetuned``) to the folder ``out``
    (built beside it, then renamed into place); ``onnx`` adds ``model.onnx``, checked on
    random images and, with ``check_split``, on that split's images. ``overrides`` fix
    test-time sampling settings (as ``eval --set``). Returns ``model.json`` plus ``path`` and
    ``sizes`` (bytes of the folder, its files and the run's cache)."""
    if (run is None) == (finetuned is None):
        raise ValueError("pass either --run RUN or --finetuned CKPT")
    if check_split and not onnx:
        raise ValueError("--check-split compares the ONNX graph with PyTorch: add --onnx")
    out = Path(out)
    refuse_existing(out, overwrite)
    classifier = run_classifier(run, cache, "cpu", weights_dir, overrides) if run is not None \
        else finetuned_classifier(finetuned, "cpu", weights_dir, overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        meta = save_classifier(classifier, scratch)
        if onnx:
            meta["onnx"] = onnx_section(classifier, scratch, check_split, root, num_workers, log)
            write_model_json(scratch, meta)
        share_as_umask_allows(scratch)
        if out.exists():
            shutil.rmtree(out)
        os.replace(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    cache_path = (meta["provenance"].get("cache") or {}).get("path")
    sizes = {"folder": folder_bytes(out),
             **{p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()},
             "cache": folder_bytes(cache_path) if cache_path else None}
    return {**meta, "path": str(out), "sizes": sizes}


__all__ = ["export_model", "finetuned_classifier", "run_classifier", "split_images"]
