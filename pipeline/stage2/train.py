"""Stage two: train a head on cached features, select on validation, save a run directory.

The whole split lives in device memory; batches are index permutations (or class-balanced
index draws), with no DataLoader and no per-sample Python. Loss parts accumulate on the device
and are read once per epoch, so the loop never waits on the host. A run directory holds
``config.json`` (everything resolved), ``metrics.jsonl`` (one line per epoch),
``heads.safetensors`` and ``results.json`` (val and test top-1/top-5 of the selected weights).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core.config import (
    ConfigError,
    apply_overrides,
    from_dict,
    require_choice,
    require_device,
    require_positive,
    require_range,
)
from ..core.progress import progress_bar
from ..engine.backbones import PRECISIONS, resolve_device, resolve_precision
from ..engine.splits import held_out_split
from ..models.heads import (
    METHODS,
    Dims,
    SplitData,
    Stage,
    Standardizer,
    TrainContext,
    build_head,
    method_config,
    method_fields,
)
from ..store import CacheError, FeatureCache, canonical, require_expected, write_json_atomic


@dataclass
class TrainConfig:
    """Optimisation and data settings shared by every method (METHODS §3 #20)."""

    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    warmup_epochs: int = 1
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    val_fraction: float = 0.1  # held out of train when the cache has no val split
    balanced_classes: int = 32  # classes per batch for the class-balanced sampler
    chunk_rows: int = 8192  # rows per chunk when sampling diffusion chains

    def __post_init__(self) -> None:
        """Refuse a bad option now, before a cache is read."""
        for name in ("epochs", "batch_size", "balanced_classes", "chunk_rows"):
            require_positive(f"--{name.replace('_', '-')}", getattr(self, name))
        require_range("--lr", self.lr, 0.0)  # 0 is allowed: the heads stay at their init
        require_range("weight_decay", self.weight_decay, 0.0)
        require_range("warmup_epochs", self.warmup_epochs, 0)
        require_range("val_fraction", self.val_fraction, 0.0, 1.0, low_open=True)
        if self.val_fraction == 1:
            raise ConfigError("val_fraction must be < 1 (some rows must stay for training)")
        require_device("--device", self.device)
        require_choice("--precision", self.precision, PRECISIONS)


class HeadsModel(nn.Module):
    """What a run saves: feature standardisers plus the method's head."""

    def __init__(self, method: str, cfg: Any, dims: Dims):
        super().__init__()
        self.method = method
        self.norm_visual = Standardizer(dims.visual)
        self.norm_text = Standardizer(dims.text)
        self.head = build_head(method, cfg, dims)

    @torch.no_grad()
    def predict(self, visual: torch.Tensor, generator: torch.Generator | None = None,
                chunk_rows: int = 8192) -> torch.Tensor:
        """Logits from raw (cached or freshly extracted) visual features: image only."""
        self.eval()
        return self.head.predict(self.norm_visual(visual), generator, chunk_rows)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


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


class BatchSampler:
    """Index batches on the device: a permutation per epoch, or class-balanced draws."""

    def __init__(self, labels: torch.Tensor, batch_size: int, generator: torch.Generator,
                 balanced: bool, classes_per_batch: int):
        self.n = len(labels)
        self.batch_size = min(batch_size, self.n)
        self.steps = max(1, self.n // self.batch_size)
        self.generator = generator
        self.balanced = balanced
        if balanced:
            classes = int(labels.max()) + 1
            counts = torch.bincount(labels, minlength=classes)
            present = (counts > 0).nonzero().flatten()
            self.present = present
            self.per_batch = min(classes_per_batch, len(present))
            self.per_class = max(2, self.batch_size // self.per_batch)
            order = torch.argsort(labels, stable=True)
            self.offsets = torch.cumsum(counts, 0) - counts
            self.counts = counts
            self.order = order

    def epoch(self) -> list[torch.Tensor]:
        device = self.order.device if self.balanced else self.generator.device
        if not self.balanced:
            perm = torch.randperm(self.n, device=device, generator=self.generator)
            return [perm[i * self.batch_size:(i + 1) * self.batch_size] for i in range(self.steps)]
        out = []
        for _ in range(self.steps):
            pick = torch.randperm(len(self.present), device=device, generator=self.generator)
            classes = self.present[pick[:self.per_batch]]
            u = torch.rand(len(classes), self.per_class, device=device, generator=self.generator)
            pos = (u * self.counts[classes, None]).long()
            out.append(self.order[(self.offsets[classes, None] + pos).flatten()])
        return out


def _lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def train_step(stage: Stage, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               precision: str, device_type: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step of ``stage.loss`` (bf16 autocast when asked); returns the
    detached loss and its parts, still on the device (no host sync)."""
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss, parts = stage.loss(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), parts


def run_stage(stage: Stage, train: SplitData, cfg: TrainConfig, ctx: TrainContext,
              precision: str, log_metrics: Callable[[dict], None]) -> dict[str, float]:
    """Train ``stage.modules``; keep each selection group at its best validation epoch."""
    if stage.prepare:
        stage.prepare()
    epochs = stage.epochs if stage.epochs is not None else cfg.epochs
    params = [p for m in stage.modules for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = BatchSampler(train["label"], cfg.batch_size, ctx.generator,
                           stage.sampler == "balanced", cfg.balanced_classes)
    total = epochs * sampler.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total, min(total // 2, cfg.warmup_epochs * sampler.steps)))
    best: dict[str, tuple[float, list[dict[str, torch.Tensor]]]] = {}
    device_type = ctx.device.type
    with progress_bar(f"train {stage.name}", epochs) as advance:
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            for m in stage.modules:
                m.train()
            sums: dict[str, torch.Tensor] = {}
            for index in sampler.epoch():
                batch = {k: train[k][index] for k in stage.fields}
                batch["index"] = index
                loss, parts = train_step(stage, optimizer, batch, precision, device_type)
                scheduler.step()
                for k, v in {"loss": loss, **parts}.items():
                    sums[k] = sums.get(k, 0) + v.float()
            for m in stage.modules:
                m.eval()
            record = {"stage": stage.name, "epoch": epoch,
                      **{k: round(float(v) / sampler.steps, 5) for k, v in sums.items()},
                      "lr": scheduler.get_last_lr()[0]}
            for group, (modules, metric) in stage.select.items():
                score = metric()
                record[f"val_top1_{group}"] = round(score, 5)
                if group not in best or score > best[group][0]:
                    best[group] = (score, [_clone_state(m) for m in modules])
            record["seconds"] = round(time.perf_counter() - t0, 3)
            log_metrics(record)
            advance(1, info=" ".join(f"{k}={v:.3g}" for k, v in record.items()
                                     if k.startswith(("loss", "val_top1"))))
    for group, (modules, _) in stage.select.items():
        for m, state in zip(modules, best[group][1]):
            m.load_state_dict(state)
    return {group: score for group, (score, _) in best.items()}


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def topk_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (%) and per-class top-1 (%; None for classes with no samples)."""
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    hit1 = topk[:, 0] == labels
    hit5 = (topk == labels[:, None]).any(dim=1)
    per_class = []
    for c in range(num_classes):
        mask = labels == c
        per_class.append(round(100 * hit1[mask].float().mean().item(), 3) if mask.any() else None)
    return {"top1": round(100 * hit1.float().mean().item(), 3),
            "top5": round(100 * hit5.float().mean().item(), 3),
            "n": int(len(labels)), "per_class_top1": per_class}


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
                expect: dict[str, str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train ``method`` on the cache at ``cache_path``; write and return the run's results.

    The cache must be complete, and match ``expect`` (dotted key inputs such as
    ``visual.model`` or ``dtype``, or ``key``, mapped to their expected values).
    ``features="text"`` classifies text features instead of visual ones: the text-only
    ceiling of a dataset (it reads text at test time, so it is a reference, not a method).
    A finished run in ``out_dir`` with the same settings is reused (its results returned);
    a different one is refused unless ``overwrite``.
    """
    _require_features(method, features)
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
    with open(out / "metrics.jsonl", "w") as metrics_file:
        def log_metrics(record: dict) -> None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

        for stage in model.head.stages(train, val, ctx):
            run_stage(stage, train, cfg, ctx, precision, log_metrics)
    train_seconds = time.perf_counter() - t0
    save_heads(model, out / "heads.safetensors")
    results = {"method": method, "seed": cfg.seed, "train_seconds": round(train_seconds, 2),
               **_split_metrics(model, cache, val_raw, features, ctx)}
    write_json_atomic(out / "results.json", results)
    return results


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


def standardise_tokens(norm: Standardizer, tokens: torch.Tensor, name: str,
                       chunk_rows: int = 4096) -> torch.Tensor:
    """``norm`` applied to every token, chunk by chunk, kept in the tokens' dtype."""
    if tokens.shape[-1] != norm.mean.shape[0]:
        raise CacheError(f"{name}_tokens have width {tokens.shape[-1]} but the pooled {name} "
                         f"features {norm.mean.shape[0]}; token methods share the encoder "
                         "between them, so they need a backbone whose token width equals its "
                         "feature width")
    out = torch.empty_like(tokens)
    for start in range(0, len(tokens), chunk_rows):
        out[start:start + chunk_rows] = norm(tokens[start:start + chunk_rows].float())
    return out


def evaluate_features(model: HeadsModel, visual: torch.Tensor, labels: torch.Tensor,
                      num_classes: int, ctx: TrainContext) -> dict[str, Any]:
    """Metrics of ``model`` on raw visual features, with the run's fixed evaluation noise."""
    logits = model.predict(visual, ctx.eval_generator(), ctx.chunk_rows)
    return topk_metrics(logits.float(), labels, num_classes)


def save_heads(model: HeadsModel, path: Path) -> None:
    """Write the run's weights (standardisers + head) as safetensors, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"method": model.method})
    tmp.replace(path)


# leaf names of the sampling-chain settings that may change after training (``eval --set``);
# the noise schedule itself (``*.schedule.*``) is what the denoisers were trained on
TEST_TIME_SETTINGS = frozenset({"sampler", "steps", "eta", "test_samples", "val_sampler",
                                "val_steps"})


def is_test_time_setting(key: str) -> bool:
    """Whether ``--set key=...`` only changes how a trained run samples at test time."""
    parts = key.split(".")
    return parts[-1] in TEST_TIME_SETTINGS and "schedule" not in parts


def rebuild_heads(method: str, method_config: dict[str, Any], dims: dict[str, int],
                  state: dict[str, torch.Tensor], where: str,
                  overrides: dict[str, Any] | None = None) -> tuple[HeadsModel, Any]:
    """A trained :class:`HeadsModel` from its saved settings and weights (a run, or a
    fine-tuned checkpoint), with ``overrides`` of test-time settings only
    (:func:`is_test_time_setting`); returns the model (eval mode) and its resolved config."""
    if method not in METHODS:
        raise ConfigError(f"{where}: unknown method {method!r}")
    saved = from_dict(METHODS[method].config, method_config)
    apply_overrides(saved, overrides or {})  # unknown keys and bad values are named first
    trained = [key for key in overrides or {} if not is_test_time_setting(key)]
    if trained:
        raise ConfigError(f"{where}: --set {', '.join(trained)} changes the trained heads "
                          "(what the weights were fitted to), so it needs a new training run; "
                          "only test-time settings of the sampling chains ("
                          f"{', '.join(sorted(TEST_TIME_SETTINGS))}) can change after training")
    method_cfg = apply_overrides(saved, overrides or {})
    model = HeadsModel(method, method_cfg, Dims(**dims))
    model.load_state_dict(state)
    return model.eval(), method_cfg


def load_run(run_dir: Path | str, device: torch.device | str = "cpu",
             overrides: dict[str, Any] | None = None) -> tuple[HeadsModel, dict[str, Any]]:
    """Rebuild a trained run's model from ``config.json`` and ``heads.safetensors``.

    ``overrides`` (``KEY=VALUE`` as for training) change test-time settings of the trained
    heads, e.g. ``diffusion.sampler=ddim``, ``diffusion.steps=10``, ``diffusion.test_samples``
    (:func:`is_test_time_setting`); any other setting is refused. The returned config records
    them.
    """
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    for name in ("config.json", "heads.safetensors"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir} is not a finished run: {name} is missing "
                                    "(train it with `marnet train-heads`)")
    config = json.loads((run_dir / "config.json").read_text())
    model, method_cfg = rebuild_heads(config["method"], config["method_config"], config["dims"],
                                      load_file(str(run_dir / "heads.safetensors")),
                                      str(run_dir), overrides)
    if overrides:
        config = {**config, "method_config": asdict(method_cfg),
                  "eval_overrides": {k: str(v) for k, v in overrides.items()}}
    return model.to(device), config
