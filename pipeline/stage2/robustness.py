"""Corruption robustness of trained classifiers, measured as ImageNet-C measures it.

The split's images are corrupted after decoding and before preprocessing, in the loader
workers, by the 15 corruptions x 5 severities of ImageNet-C (:mod:`..datasets.corruptions`);
the backbone encodes them exactly as end-to-end evaluation encodes the clean images (same
batches, precision and storage dtype), and every classifier on that backbone is scored on the
same features, setting by setting. Reported per classifier: clean top-1/top-5, top-1 per
corruption and severity, the mean over each family, the mean corruption accuracy (mCA: the
mean top-1 over every corruption and severity evaluated) and relative robustness
(mCA / clean top-1). Corrupted features live in memory one setting at a time and never enter
a cache.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.config import ConfigError
from ..datasets.corruptions import (
    CORRUPTIONS,
    FAMILIES,
    SEVERITIES,
    Corruption,
    corruption_function,
    family_of,
)
from ..engine.backbones import resolve_device
from ..engine.encode import ImageSource, readable
from ..engine.runs import load_run, run_cache
from ..engine.training import HeadsModel, topk_metrics
from ..store import write_json_atomic
from .evaluate import cache_image_source, finetuned_image_source


@dataclass(frozen=True)
class CorruptionSweep:
    """Which settings to evaluate: corruptions x severities, with the noise seed."""

    corruptions: tuple[str, ...] = CORRUPTIONS
    severities: tuple[int, ...] = SEVERITIES
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.corruptions or not self.severities:
            raise ConfigError("a corruption sweep needs at least one corruption and severity")
        self.settings()  # each Corruption checks its name and severity, before any work

    def settings(self) -> list[Corruption]:
        return [Corruption(name, severity, self.seed)
                for name in self.corruptions for severity in self.severities]

    def record(self) -> dict[str, Any]:
        return {"corruptions": list(self.corruptions), "severities": list(self.severities),
                "seed": self.seed}


@dataclass
class Scorer:
    """One classifier on the source's backbone: raw visual features -> logits. ``predict``
    is called once per setting and should draw its own noise afresh (a seeded generator),
    so every setting sees the same sampling noise."""

    name: str
    predict: Callable[[torch.Tensor], torch.Tensor]


def _score(scorer: Scorer, features: torch.Tensor, labels: torch.Tensor,
           classes: int) -> dict[str, Any]:
    logits = scorer.predict(features.to(labels.device))
    return topk_metrics(logits.float(), labels, classes)


def robustness_sweep(source: ImageSource, scorers: list[Scorer], sweep: CorruptionSweep,
                     classes: int, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Clean and corrupted accuracy of every scorer; ``{scorer name: summary}``."""
    corruption_function()  # the install hint now, before the clean pass
    if len({s.name for s in scorers}) != len(scorers):
        raise ValueError(f"scorer names repeat: {[s.name for s in scorers]}")
    t0 = time.perf_counter()
    clean, errors = source.encode("clean images")
    keep = readable(errors, log)
    labels = source.labels[keep]
    clean_metrics = {s.name: _score(s, clean[keep], labels, classes) for s in scorers}
    settings = sweep.settings()
    log(f"corrupting {len(source.paths):,} images x {len(settings)} settings "
        f"({len(sweep.corruptions)} corruptions x severities "
        f"{','.join(map(str, sweep.severities))}, seed {sweep.seed})")
    corrupt_s = 0.0
    top1: dict[str, dict[str, dict[int, float]]] = {s.name: {} for s in scorers}
    for setting, features, _, seconds in source.encode_corrupted(settings):
        corrupt_s += seconds
        for scorer in scorers:
            top1[scorer.name].setdefault(setting.name, {})[setting.severity] = _score(
                scorer, features[keep], labels, classes)["top1"]
    wall_s = time.perf_counter() - t0
    images = len(source.paths) * len(settings)
    log(f"corruption sweep: {wall_s:.0f} s, corrupting {1000 * corrupt_s / images:.2f} ms/img "
        "in the workers")
    return {s.name: summarise(clean_metrics[s.name], top1[s.name], sweep, wall_s, images,
                              corrupt_s) for s in scorers}


def summarise(clean: dict[str, Any], top1: dict[str, dict[int, float]], sweep: CorruptionSweep,
              seconds: float, images: int, corrupt_s: float = 0.0) -> dict[str, Any]:
    """mCA, relative robustness and family means from per-setting top-1 (%)."""
    values = [v for per_severity in top1.values() for v in per_severity.values()]
    mca = statistics.fmean(values)
    families = {family: round(statistics.fmean(
        v for name in names if name in top1 for v in top1[name].values()), 3)
        for family, names in FAMILIES.items() if any(name in top1 for name in names)}
    by_severity = {severity: round(statistics.fmean(top1[name][severity] for name in top1), 3)
                   for severity in sweep.severities}
    return {"clean_top1": clean["top1"], "clean_top5": clean["top5"], "n": clean["n"],
            "mca": round(mca, 3), "relative": round(mca / clean["top1"], 4) if clean["top1"]
            else None, "families": families, "by_severity": by_severity,
            "top1": {name: {str(k): v for k, v in per.items()} for name, per in top1.items()},
            "family_of": {name: family_of(name) for name in top1}, **sweep.record(),
            "seconds": round(seconds, 1), "images_corrupted": images,
            "corrupt_ms_per_image": round(1000 * corrupt_s / images, 3) if images else None}


def seeded_scorer(name: str, model: HeadsModel, seed: int, chunk_rows: int = 8192) -> Scorer:
    """A trained model scored as its evaluation scores it: diffusion heads sample with a
    generator seeded with ``seed`` afresh for every setting."""
    def predict(visual: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=visual.device).manual_seed(seed)
        return model.predict(visual, generator, chunk_rows)

    return Scorer(name, predict)


def run_robustness(run_dir: Path | str, sweep: CorruptionSweep, split: str = "test",
                   cache: Path | str | None = None, root: Path | str | None = None,
                   device: str = "auto", num_workers: int = 2,
                   weights_dir: Path | str = "cache/weights", log: Callable[[str], None] = print,
                   overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Robustness of a stage-two run: the cache's backbone re-encodes the corrupted images."""
    dev = resolve_device(device)
    model, config = load_run(run_dir, dev, overrides)
    if config.get("features", "visual") != "visual":
        raise ConfigError("a corrupted evaluation needs a run trained on visual features")
    source = cache_image_source(run_cache(config, cache), split, root, dev, num_workers,
                                weights_dir)
    scorer = seeded_scorer("run", model, config["train"]["seed"], config["train"]["chunk_rows"])
    summary = robustness_sweep(source, [scorer], sweep, len(config["class_names"]), log)["run"]
    return {"split": split, "source": "images, corrupted", **summary}


def finetuned_robustness(checkpoint: Path | str, sweep: CorruptionSweep, split: str = "test",
                         root: Path | str | None = None, device: str = "auto",
                         num_workers: int = 2, weights_dir: Path | str = "cache/weights",
                         log: Callable[[str], None] = print,
                         overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Robustness of a fine-tuned checkpoint (its own backbone and head)."""
    dev = resolve_device(device)
    heads, source, meta = finetuned_image_source(checkpoint, split, root, dev, num_workers,
                                                 weights_dir, overrides)
    scorer = seeded_scorer("checkpoint", heads, meta["seed"])
    summary = robustness_sweep(source, [scorer], sweep, len(meta["class_names"]),
                               log)["checkpoint"]
    return {"split": split, "source": "images, corrupted (fine-tuned)", "method": meta["method"],
            **summary}


# --------------------------------------------------------------------------- many runs at once

ROBUSTNESS_FILE = "robustness.json"  # in a run's folder: its summary, reused for equal sweeps


@dataclass(frozen=True)
class RobustnessRun:
    """How an ablation measures robustness: the sweep and where it runs."""

    sweep: CorruptionSweep
    device: str = "auto"
    num_workers: int = 2
    weights_dir: Path = Path("cache/weights")


def _saved(run_dir: Path, sweep: CorruptionSweep, split: str) -> dict[str, Any] | None:
    path = Path(run_dir) / ROBUSTNESS_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    same = saved.get("split") == split and all(saved.get(k) == v
                                               for k, v in sweep.record().items())
    return saved if same else None


def _save(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    write_json_atomic(Path(run_dir) / ROBUSTNESS_FILE, summary)
    return summary


def runs_robustness(run_dirs: list[Path], spec: RobustnessRun, split: str = "test",
                    log: Callable[[str], None] = print) -> dict[Path, dict[str, Any]]:
    """Robustness of stage-two runs, one sweep per cache (every run trained on a cache is
    scored on the same corrupted features); runs measured earlier with the same sweep are
    read back from their ``robustness.json``. Runs that classify text features (the text-only
    ceiling) are left out."""
    out = {Path(d): _saved(d, spec.sweep, split) for d in run_dirs}
    by_cache: dict[str, list[Path]] = {}
    for run_dir in (d for d, saved in out.items() if saved is None):
        config = json.loads((run_dir / "config.json").read_text())
        if config.get("features", "visual") != "visual":
            del out[run_dir]  # it reads text at test time: not an image classifier
            continue
        by_cache.setdefault(config["cache"]["path"], []).append(run_dir)
    dev = resolve_device(spec.device)
    for cache, dirs in by_cache.items():
        models = [load_run(d, dev) for d in dirs]
        source = cache_image_source(run_cache(models[0][1], cache), split, None, dev,
                                    spec.num_workers, spec.weights_dir)
        scorers = [seeded_scorer(str(d), m, c["train"]["seed"], c["train"]["chunk_rows"])
                   for d, (m, c) in zip(dirs, models)]
        log(f"robustness of {len(dirs)} runs on {cache}")
        summaries = robustness_sweep(source, scorers, spec.sweep,
                                     len(models[0][1]["class_names"]), log)
        for d in dirs:
            out[d] = _save(d, {"split": split, **summaries[str(d)]})
    return out


def checkpoint_robustness(run_dir: Path, checkpoint: Path, spec: RobustnessRun,
                          split: str = "test", log: Callable[[str], None] = print
                          ) -> dict[str, Any]:
    """Robustness of a fine-tuned checkpoint, kept in ``run_dir/robustness.json``."""
    saved = _saved(run_dir, spec.sweep, split)
    if saved is not None:
        return saved
    result = finetuned_robustness(checkpoint, spec.sweep, split, None, spec.device,
                                  spec.num_workers, spec.weights_dir, log)
    return _save(run_dir, result)


def robustness_columns(summary: dict[str, Any]) -> dict[str, float]:
    """The per-run numbers a results table carries: mCA, relative robustness, family means."""
    return {"mca": summary["mca"], "relative": summary["relative"], **summary["families"]}
