"""Stage-one fine-tuning: train the vision backbone on the train split before caching.

``--method ce`` trains backbone + linear head with cross-entropy. ``ita``, ``ita-mp`` and
``sdm`` add ``beta *`` an alignment loss between the backbone feature and the text feature of
the same image, through MARNet's projection heads ``E_v`` / ``E_s`` (METHODS §1.2): ITA
(symmetric InfoNCE), ITA with same-class positives (§3 #18), or SDM (§4.2). Text features are
read from an existing cache of the same dataset (computed once by the frozen text backbone),
never recomputed per step. This is where privileged text reaches the backbone; heads trained on
frozen features can only reshape what the features already hold.

Each epoch ends with a validation top-1 (linear head, un-augmented val images) and a resumable
state file; the final checkpoint holds the best epoch's backbone and head plus provenance
(method, beta, base weights, data digest, seed...). ``extract --finetuned CKPT`` puts that
provenance into the cache key and manifest.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .backbones import VisionSpec, build_vision, resolve_device, resolve_precision
from .datasets import DEFAULT_TEMPLATE, DatasetInfo, load_dataset
from .datasets.images import ImageFiles, Preprocess, TrainAugment
from .extract import encode_images
from .heads import Dims, Standardizer, method_config
from .heads.alignment import AlignedClassifier
from .progress import progress_bar
from .splits import held_out_split
from .store import CacheError, FeatureCache

FINETUNE_METHODS = ("ce", "ita", "ita-mp", "sdm")


@dataclass
class FinetuneConfig:
    """What ``marnet finetune`` trains and how."""

    dataset: str
    root: Path
    out: Path  # the checkpoint (.safetensors); resumable state lives in <out>.state/
    vision: VisionSpec = field(default_factory=VisionSpec)
    method: str = "ce"  # ce | ita | ita-mp | sdm
    beta: float = 1.0
    text_cache: Path | None = None  # a cache of this dataset with text features
    proj_dim: int | None = None  # projection dim d (None: the text dim)
    tau: float | None = None  # None: 0.07 for ita/ita-mp, 0.02 for sdm
    epochs: int = 5
    lr: float = 3e-4  # backbone learning rate
    head_lr: float = 3e-3  # linear head and projections
    weight_decay: float = 0.01
    batch_size: int = 64
    train_blocks: str = "all"  # all | last-K (the last K entries of model.blocks + the head)
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    num_workers: int = 2
    template: str | None = None  # None: the text cache's template (aligned), else the default
    dataset_options: dict[str, Any] = field(default_factory=dict)
    weights_dir: Path = Path("cache/weights")

    def __post_init__(self) -> None:
        if self.method not in FINETUNE_METHODS:
            raise FinetuneError(f"unknown method {self.method!r}; choose "
                                f"{', '.join(FINETUNE_METHODS)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise FinetuneError("epochs and batch_size must be >= 1")


class FinetuneError(RuntimeError):
    """Fine-tuning cannot run as asked (bad option, missing text cache...)."""


def trainable_prefix(model: nn.Module, train_blocks: str) -> list[nn.Module]:
    """Freeze all but the last K ``model.blocks`` (and what follows them); return the frozen
    modules (kept in eval mode so their norm statistics do not move)."""
    if train_blocks == "all":
        return []
    if not train_blocks.startswith("last-") or not train_blocks[5:].isdigit():
        raise FinetuneError(f"--train-blocks expects all or last-K, got {train_blocks!r}")
    k = int(train_blocks[5:])
    blocks = getattr(model, "blocks", None)
    if blocks is None or not 0 < k <= len(blocks):
        raise FinetuneError(f"--train-blocks {train_blocks}: the model has "
                            f"{len(blocks) if blocks is not None else 'no'} .blocks; use all")
    first_trainable = f"blocks.{len(blocks) - k}."
    for name, param in model.named_parameters():  # the module's own parameters come first
        if name.startswith(first_trainable):      # (ViT's cls_token, pos_embed), then its
            break                                 # children in order: stem, blocks, head
        param.requires_grad_(False)
    frozen_modules = []
    for name, child in model.named_children():
        if name == "blocks":
            frozen_modules += list(blocks)[:len(blocks) - k]
            break
        frozen_modules.append(child)
    return frozen_modules


def _template(cfg: FinetuneConfig) -> str:
    """The sentence template: as given, else the one the text cache was extracted with (its
    text features are what the alignment reads), else the default."""
    if cfg.template is not None:
        return cfg.template
    if cfg.method != "ce" and cfg.text_cache is not None:
        return FeatureCache(cfg.text_cache).manifest["dataset"]["template"]
    return DEFAULT_TEMPLATE


def train_text_features(cache_path: Path, info: DatasetInfo, split: str = "train") -> torch.Tensor:
    """Text features of ``info.splits[split]`` from a cache of the same dataset, in record order."""
    fc = FeatureCache(cache_path).require_complete()
    if fc.manifest["inputs"]["dataset"]["digest"] != info.digest():
        raise CacheError(f"the text cache {cache_path} was made from another dataset than "
                         f"{info.root} with template {info.template!r} (dataset digests "
                         "differ: other annotation files, images or template); extract this "
                         "dataset first, or pass the template the cache was made with")
    data = fc.load_split(split, ("text", "id"), valid_only=False)
    row = {id_: i for i, id_ in enumerate(data["id"])}
    return data["text"][[row[r.id] for r in info.splits[split]]]


# fine-tuning method -> (head method, its overrides): the heads' own aligned classifier
FINETUNE_HEADS: dict[str, tuple[str, dict[str, Any]]] = {
    "ce": ("visual", {}), "ita": ("ita", {}), "ita-mp": ("ita", {"multi_positive": True}),
    "sdm": ("sdm", {}),
}


class FinetuneHead(nn.Module):
    """The heads' aligned classifier (``E_v``, ``E_s``, ``C``, a registered alignment loss:
    ITA, multi-positive ITA or SDM, METHODS §1.2, §4.2) on backbone features, trained with
    the backbone, plus the standardiser of the cached text features."""

    def __init__(self, method: str, visual_dim: int, text_dim: int, classes: int,
                 beta: float = 1.0, proj_dim: int | None = None, tau: float | None = None):
        super().__init__()
        name, overrides = FINETUNE_HEADS[method]
        overrides = {**overrides, "weight": beta,
                     **({"d": proj_dim} if proj_dim else {}),
                     **({"tau": tau} if tau is not None else {})}
        self.model = AlignedClassifier(method_config(name, overrides),
                                       Dims(visual_dim, text_dim or visual_dim, classes))
        self.text_norm = Standardizer(text_dim) if method != "ce" else None

    def _batch(self, feats: torch.Tensor, labels: torch.Tensor,
               text: torch.Tensor | None) -> dict[str, torch.Tensor]:
        batch = {"visual": feats, "label": labels}
        if self.text_norm is not None:
            batch["text"] = self.text_norm(text)
        return batch

    def loss(self, feats: torch.Tensor, labels: torch.Tensor, text: torch.Tensor | None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``CE(C(E_v f), y) + beta * L_align(E_v f, E_s x_s)``."""
        return self.model.loss(self._batch(feats, labels, text))

    def align(self, feats: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``L_align`` alone, with gradients."""
        f_v = self.model.embed(feats)
        return self.model.alignment_terms(self._batch(feats, labels, text), f_v,
                                          self.model.classifier(f_v))[0]

    def predict(self, feats: torch.Tensor) -> torch.Tensor:
        return self.model.predict(feats)


def selection_split(info: DatasetInfo, text: torch.Tensor | None, seed: int,
                    fraction: float = 0.1) -> tuple[list, list, torch.Tensor | None, str]:
    """Train records, validation records (never test), train text rows, and a description.

    The dataset's val split when it has one; else a stratified ``fraction`` of train held
    out, as the head trainer does.
    """
    train = info.splits["train"]
    if info.splits.get("val"):
        return train, info.splits["val"], text, "val split"
    keep, held = held_out_split(torch.tensor([r.label for r in train]), fraction, seed)
    return ([train[i] for i in keep.tolist()], [train[i] for i in held.tolist()],
            text[keep] if text is not None else None,
            f"{fraction:.0%} of train held out (stratified, seed {seed})")


def provenance(cfg: FinetuneConfig, info: DatasetInfo, base: dict[str, Any],
               text_key: str | None) -> dict[str, Any]:
    """How a checkpoint was made (method, beta, base weights, data, seed...): stored in the
    checkpoint and, through ``extract --finetuned``, in the cache key and manifest."""
    return {
        "model": base["model"], "base_weights": base["weights"],
        "base_weights_digest": base["weights_digest"], "method": cfg.method, "beta": cfg.beta,
        "tau": cfg.tau, "proj_dim": cfg.proj_dim, "epochs": cfg.epochs, "lr": cfg.lr,
        "head_lr": cfg.head_lr, "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
        "train_blocks": cfg.train_blocks, "augment": cfg.augment, "seed": cfg.seed,
        "image_size": base["data_config"]["input_size"][-1],
        "crop_pct": base["data_config"]["crop_pct"],
        "dataset": info.name, "dataset_digest": info.digest(), "text_cache_key": text_key,
    }


def finetune(cfg: FinetuneConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune; resume from ``<out>.state/`` if it holds the same run; return provenance."""
    if cfg.method != "ce" and cfg.text_cache is None:
        raise FinetuneError(f"--method {cfg.method} aligns with text features: pass "
                            "--text-cache CACHE_DIR (run `marnet extract` on this dataset first)")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    info = load_dataset(cfg.dataset, cfg.root, _template(cfg), **cfg.dataset_options)
    vision = build_vision(cfg.vision, cfg.weights_dir)
    aligned = cfg.method != "ce"
    text = train_text_features(Path(cfg.text_cache), info) if aligned else None
    text_key = FeatureCache(cfg.text_cache).key if aligned else None
    train_records, val_records, text, validation = selection_split(info, text, cfg.seed)
    meta = {**provenance(cfg, info, vision.description, text_key), "validation": validation}
    head = FinetuneHead(cfg.method, vision.dim, text.shape[1] if text is not None else 0,
                        info.num_classes, cfg.beta, cfg.proj_dim, cfg.tau)
    if text is not None:
        head.text_norm.fit(text)
        text = text.to(device)
    frozen = trainable_prefix(vision.model, cfg.train_blocks)
    vision.to_runtime(device)
    head.to(device)
    backbone_params = [p for p in vision.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": backbone_params, "lr": cfg.lr},
        {"params": [p for p in head.parameters() if p.requires_grad], "lr": cfg.head_lr},
    ], weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train_records) // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[cfg.lr, cfg.head_lr], total_steps=cfg.epochs * steps_per_epoch,
        pct_start=min(0.3, 1 / max(cfg.epochs, 1)))
    state_dir = Path(f"{cfg.out}.state")
    start_epoch, best, history = _resume(state_dir, meta, vision.model, head, optimizer,
                                         scheduler, log)
    labels = torch.tensor([r.label for r in train_records])
    size = vision.data_config["input_size"][-1]
    preprocess = TrainAugment(size) if cfg.augment else Preprocess.from_data_config(vision.data_config)
    dataset = ImageFiles([r.image for r in train_records], preprocess)
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
            num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        vision.model.train()
        for module in frozen:
            module.eval()
        sums: dict[str, torch.Tensor] = {}
        with progress_bar(f"finetune {cfg.method} epoch {epoch}/{cfg.epochs}", len(loader)) as advance:
            for images, index, errors in loader:
                ok = torch.tensor([not e for e in errors])
                images, index = images[ok], index[ok]
                y = labels[index].to(device)
                feats = vision.features(images, precision)
                loss, parts = head.loss(feats, y, text[index.to(device)] if text is not None
                                        else None)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                for k, v in {"loss": loss.detach(), **parts}.items():
                    sums[k] = sums.get(k, 0) + v
                advance(1)
        val_top1 = _val_top1(vision, head, val_records, precision, cfg)
        record = {"epoch": epoch, **{k: round(float(v) / len(loader), 5) for k, v in sums.items()},
                  "val_top1": round(val_top1, 3), "seconds": round(time.perf_counter() - t0, 1)}
        history.append(record)
        log(json.dumps(record))
        if best is None or val_top1 > best["val_top1"]:
            best = {"epoch": epoch, "val_top1": val_top1}
            _save_weights(state_dir / "best.safetensors", vision.model, head, meta)
        _save_state(state_dir, epoch, best, history, meta, vision.model, head, optimizer, scheduler)
    meta = {**meta, "best_epoch": best["epoch"], "val_top1": round(best["val_top1"], 3),
            "history": history}
    _save_weights(Path(cfg.out), *_load_best(state_dir, vision.model, head), meta)
    log(f"saved {cfg.out} (best epoch {best['epoch']}, val top-1 {best['val_top1']:.2f}%)")
    return meta


def _val_top1(vision, head: FinetuneHead, records, precision: str, cfg: FinetuneConfig) -> float:
    feats, errors = encode_images(vision, [r.image for r in records], cfg.batch_size, precision,
                                  "float32", cfg.num_workers, "validate")
    keep = torch.tensor([not e for e in errors])
    labels = torch.tensor([r.label for r in records])[keep].to(vision.device)
    with torch.no_grad():
        pred = head.predict(feats[keep].to(vision.device)).argmax(1)
    return 100.0 * (pred == labels).float().mean().item()


def _save_weights(path: Path, model: nn.Module, head: nn.Module, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"backbone.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"marnet": json.dumps(meta, default=str)})
    tmp.replace(path)


def _load_best(state_dir: Path, model: nn.Module, head: nn.Module) -> tuple[nn.Module, nn.Module]:
    from safetensors.torch import load_file

    state = load_file(str(state_dir / "best.safetensors"))
    model.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("backbone.")})
    head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
    return model, head


def _save_state(state_dir: Path, epoch: int, best: dict, history: list, meta: dict,
                model: nn.Module, head: nn.Module, optimizer, scheduler) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / "last.pt.tmp"
    torch.save({"epoch": epoch, "best": best, "history": history, "meta": meta,
                "model": model.state_dict(), "head": head.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp)
    tmp.replace(state_dir / "last.pt")


def _resume(state_dir: Path, meta: dict, model: nn.Module, head: nn.Module, optimizer,
            scheduler, log: Callable[[str], None]) -> tuple[int, dict | None, list]:
    path = state_dir / "last.pt"
    if not path.is_file():
        return 1, None, []
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["meta"] != meta:
        raise FinetuneError(f"{state_dir} holds a fine-tuning run with other settings; "
                            "remove it or choose another --out")
    model.load_state_dict(state["model"])
    head.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log(f"resuming fine-tuning after epoch {state['epoch']} from {path}")
    return state["epoch"] + 1, state["best"], state["history"]


__all__ = ["FINETUNE_METHODS", "FinetuneConfig", "FinetuneError", "finetune"]
