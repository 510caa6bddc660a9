"""Stage two: train a head on cached features, select on validation, save a run directory.

The cache's splits are loaded onto the device once and standardised; each of the head's stages
then runs on :func:`~marnet.pipeline.engine.training.run_stage` (the device-resident trainer
that fine-tuning's later stages use too). A run directory holds
``config.json`` (everything resolved), ``metrics.jsonl`` (one line per epoch),
``heads.safetensors`` and ``results.json`` (val and test top-1/top-5 of the selected weights).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from ..engine.backbones import resolve_device, resolve_precision
from ..engine.runs import save_heads
from ..engine.splits import held_out_split
from ..engine.tensorboard import ScalarLog, require_tensorboard
from ..engine.training import (
    HeadsModel,
    TrainConfig,
    evaluate_features,
    run_stage,
    seed_everything,
    standardise_tokens,
)
from ..models.heads import (
    METHODS,
    Dims,
    SplitData,
    TrainContext,
    method_config,
    method_fields,
)
from ..store import CacheError, FeatureCache, canonical, require_expected, write_json_atomic


def load_features(cache: FeatureCache, split: str, device: torch.device,
                  features: str = "visual", fields: tuple[str, ...] = ("visual", "text", "label")
                  ) -> dict[str, torch.Tensor]:
    """A split's tensors; with ``features="text"`` the classifier input is the text feature
    (the text-only ceiling: a reference that reads text at test time, not a method)."""
    data = cache.load_split(split, tuple(dict.fromkeys(
        f if f != "visual" else features for f in fields)), device)
    if features != "visual":
        data["visual"] = data[features]
    return data


def load_training_data(cache: FeatureCache, cfg: TrainConfig, device: torch.device,
                       features: str = "visual", extra_fields: tuple[str, ...] = ()
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """Train and validation tensors on ``device``: the cache's val split, or a held-out slice.

    ``features="text"`` feeds text features as the classifier input (the text-only ceiling).
    ``extra_fields`` (token features) are loaded for train only, in the cache's own dtype: they
    feed training losses, never validation, and float32 copies would double their memory.
    """
    fields = ("visual", "text", "label")
    train = load_features(cache, "train", device, features)
    if extra_fields:
        train.update(cache.load_split("train", extra_fields, device, storage_torch_dtype(cache)))
    if "val" in cache.splits:
        return train, load_features(cache, "val", device, features), "val split"
    tr, va = held_out_split(train["label"].cpu(), cfg.val_fraction, cfg.seed)
    tr, va = tr.to(device), va.to(device)
    return ({k: v[tr] for k, v in train.items()}, {k: train[k][va] for k in fields},
            f"{cfg.val_fraction:.0%} of train held out (stratified, seed {cfg.seed})")


def storage_torch_dtype(cache: FeatureCache) -> torch.dtype:
    """The torch dtype a cache stores its features in (float16, bfloat16 or float32)."""
    return getattr(torch, cache.dtype)


def require_fields(cache: FeatureCache, method: str, fields: tuple[str, ...]) -> None:
    """Refuse a method whose extra fields the cache lacks, saying how to get them."""
    missing = [f for f in fields if not cache.has_field(f)]
    if missing:
        raise CacheError(f"--method {method} needs the token features {', '.join(missing)}, "
                         f"which the cache at {cache.root} does not hold; re-extract it with "
                         "`marnet extract ... --tokens` (token features are opt-in)")


def run_differs(run_dir: Path, method: str, method_cfg: Any, cfg: TrainConfig, cache_key: str,
                features: str = "visual") -> str | None:
    """The first setting in which the run recorded in ``run_dir`` differs from the one asked
    for (method, its settings, training settings but the device, cache key, features); None
    when equal."""
    path = run_dir / "config.json"
    if not path.is_file():
        return "config.json is missing"
    try:
        done = json.loads(path.read_text())
    except json.JSONDecodeError:
        return "config.json is unreadable"
    wanted = {"method": method, "method_config": asdict(method_cfg),
              "train": {k: v for k, v in asdict(cfg).items() if k != "device"},
              "cache": cache_key, "features": features}
    have = {"method": done.get("method"), "method_config": done.get("method_config"),
            "train": {k: v for k, v in done.get("train", {}).items() if k != "device"},
            "cache": done.get("cache", {}).get("key"),
            "features": done.get("features", "visual")}
    wanted = json.loads(json.dumps(wanted, default=str))
    return next((key for key, value in wanted.items() if have[key] != value), None)


def _previous_run(out: Path, method: str, method_cfg: Any, cfg: TrainConfig, cache_key: str,
                  features: str, overwrite: bool) -> dict[str, Any] | None:
    """The results of a finished run in ``out`` with these very settings (reused), None when
    ``out`` is free (absent, empty, an unfinished run of these settings) or ``overwrite``;
    otherwise a ``FileExistsError`` saying what is there."""
    if overwrite or not out.exists():
        return None
    if not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a run directory; choose another path")
    if not any(out.iterdir()):
        return None
    differs = run_differs(out, method, method_cfg, cfg, cache_key, features)
    if differs is None and (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    if differs is None:  # an unfinished run of the same settings: train it again
        return None
    what = ("holds files that are not a marnet run" if differs == "config.json is missing"
            else f"holds a run trained with another {differs}")
    raise FileExistsError(f"--out {out} {what}; choose a new --out, or pass --overwrite to "
                          "replace it")


def train_heads(cache_path: Path | str, method: str, out_dir: Path | str,
                overrides: dict[str, Any] | None = None, cfg: TrainConfig = TrainConfig(),
                log: Callable[[str], None] = print, features: str = "visual",
                expect: dict[str, str] | None = None, overwrite: bool = False,
                tensorboard: Path | str | None = None) -> dict[str, Any]:
    """Train ``method`` on the cache at ``cache_path``; write and return the run's results.

    The cache must be complete, and match ``expect`` (dotted key inputs such as
    ``visual.model`` or ``dtype``, or ``key``, mapped to their expected values).
    ``features="text"`` classifies text features instead of visual ones: the text-only
    ceiling of a dataset (it reads text at test time, so it is a reference, not a method).
    A finished run in ``out_dir`` with the same settings is reused (its results returned);
    a different one is refused unless ``overwrite``. ``tensorboard``: a folder that also
    receives each epoch's ``metrics.jsonl`` record as TensorBoard scalars.
    """
    _require_features(method, features)
    if tensorboard is not None:
        require_tensorboard()  # the install hint before the cache is read
    cache = FeatureCache(cache_path).require_complete()
    require_expected(cache.manifest, expect or {}, str(cache.root))
    method_cfg = method_config(method, overrides)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    extra_fields = method_fields(method, method_cfg)
    require_fields(cache, method, extra_fields)
    out = Path(out_dir)
    previous = _previous_run(out, method, method_cfg, cfg, cache.key, features, overwrite)
    if previous is not None:
        log(f"{out} holds this run, finished with the same settings: its results are reused "
            "(pass --overwrite to train it again)")
        return previous
    seed_everything(cfg.seed)
    train_raw, val_raw, val_source = load_training_data(cache, cfg, device, features,
                                                        extra_fields)
    out.mkdir(parents=True, exist_ok=True)  # only once the cache has read back intact
    dims = Dims(cache.dim(features), cache.dim("text"), len(cache.class_names))
    model = HeadsModel(method, method_cfg, dims).to(device)
    model.norm_visual.fit(train_raw["visual"])
    model.norm_text.fit(train_raw["text"])
    train = SplitData(_standardise(model, train_raw))
    val = SplitData(_standardise(model, val_raw))
    ctx = TrainContext(device, torch.Generator(device=device).manual_seed(cfg.seed),
                       eval_seed=cfg.seed, chunk_rows=cfg.chunk_rows)
    write_json_atomic(out / "config.json", {
        "method": method, "method_config": asdict(method_cfg), "train": asdict(cfg),
        "summary": METHODS[method].summary, "cache": _cache_record(cache),
        "dims": asdict(dims), "class_names": cache.class_names, "validation": val_source,
        "features": features, "device": str(device), "precision": precision})
    log(f"training {method} on {cache.root} ({len(train):,} train rows, validation: {val_source})")
    t0 = time.perf_counter()
    diagnostics = _train_stages(model, train, val, ctx, cfg, precision, out / "metrics.jsonl",
                                tensorboard)
    train_seconds = time.perf_counter() - t0
    save_heads(model, out / "heads.safetensors")
    results = {"method": method, "seed": cfg.seed, "train_seconds": round(train_seconds, 2),
               **_split_metrics(model, cache, val_raw, features, ctx),
               **({"diagnostics": diagnostics} if diagnostics else {})}
    write_json_atomic(out / "results.json", results)
    return results


def _train_stages(model: HeadsModel, train: SplitData, val: SplitData, ctx: TrainContext,
                  cfg: TrainConfig, precision: str, metrics: Path,
                  tensorboard: Path | str | None) -> dict[str, dict[str, float]]:
    """Every stage of the head, one ``metrics`` line (and with ``tensorboard`` one set of
    scalars) per epoch; returns each stage's diagnostics of its prepared rows."""
    diagnostics: dict[str, dict[str, float]] = {}
    with open(metrics, "w") as metrics_file, ScalarLog(tensorboard) as board:
        def log_metrics(record: dict) -> None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            board(record)
            if "prepared" in record:
                diagnostics[record["stage"]] = record["prepared"]

        for stage in model.head.stages(train, val, ctx):
            run_stage(stage, train, cfg, ctx, precision, log_metrics)
    return diagnostics


def _require_features(method: str, features: str) -> None:
    if features not in ("visual", "text"):
        raise ValueError(f"features must be visual or text, got {features!r}")
    if features == "text" and method != "visual":
        raise ValueError("the text-only ceiling trains the plain classifier: use --method visual")


def _split_metrics(model: HeadsModel, cache: FeatureCache, val: dict[str, torch.Tensor],
                   features: str, ctx: TrainContext) -> dict[str, dict[str, Any]]:
    """Val (the rows model selection used) and, when the cache has it, test metrics."""
    classes = len(cache.class_names)
    metrics = {"val": evaluate_features(model, val["visual"], val["label"], classes, ctx)}
    if "test" in cache.splits:
        test = load_features(cache, "test", ctx.device, features, ("visual", "label"))
        metrics["test"] = evaluate_features(model, test["visual"], test["label"], classes, ctx)
    return metrics


def _cache_record(cache: FeatureCache) -> dict[str, Any]:
    """What a run records of the cache it was trained on (``eval`` checks it again)."""
    inputs = cache.manifest["inputs"]
    return {"path": canonical(cache.root), "key": cache.key,
            "dataset": cache.manifest["dataset"]["name"], "visual": inputs["visual"]["model"],
            "text": inputs["text"]["model"], "inputs": inputs}


def _standardise(model: HeadsModel, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """z-scored features; token fields (``visual_tokens``, ``text_tokens``) with the statistics
    of their pooled feature, so that tokens and pooled features share one input space."""
    out = {**data, "visual": model.norm_visual(data["visual"]),
           "text": model.norm_text(data["text"])}
    for name, norm in (("visual", model.norm_visual), ("text", model.norm_text)):
        if f"{name}_tokens" in data:
            out[f"{name}_tokens"] = standardise_tokens(norm, data[f"{name}_tokens"], name)
    return out


