"""End-to-end training: the vision backbone and any registered method's head, from images.

``marnet finetune --method M`` trains the backbone together with the head of method ``M``
(``visual``/``ce``, ``ita``, ``ita-mp``, ``sdm``, ``swd``, ``ssan``, ``cdd``, ``team``,
``marnet`` and its Table 2 rows, ``seda``) under that head's own objective: the loss of the
head's first training stage, the very function stage two trains on cached features
(:class:`~.heads.common.Stage`), fed with features the backbone computes for the batch. Text
features come from a text cache (computed once by the frozen text backbone), never per step.

How a head's stages map onto end-to-end training (the decision the papers leave open):

- **The first stage trains with the backbone.** Its loss reads only the batch (visual and text
  features, labels), so the same definition serves a live backbone and a cache. For MARNet that
  is stage (a), ``L_EMA`` (Eq. 13) + ``L_CDR`` (Eq. 20) through one shared backbone; for the
  alignment baselines their whole objective; for SeDA its stage 1 (the DSL, with running class
  centres, R-1), or with ``--set joint=true`` DSL and DST together.
- **Later stages train on the frozen fine-tuned backbone's features**, with the stage-two
  trainer (:func:`~.train.run_stage`): MARNet's fusion classifier on *sampled* ``x_CDR``
  (methods §3.14: it must see what it will see at test), SeDA's stage 2 on its generated ``z``.
  ``--set joint=true`` (MARNet: fusion on the one-step reconstruction) makes the whole method
  one stage, so everything trains with the backbone.
- **Standardisation.** Stage two z-scores features with exact train statistics; here the
  features move, so the visual standardiser keeps running statistics (BatchNorm-style,
  ``norm_momentum``; the first batch starts them), never differentiated and used unchanged at
  evaluation. Text features are fixed: their statistics are exact.
- **Selection.** After each epoch the un-augmented val images are encoded and the first
  stage's validation metrics computed (their mean when it has several groups, such as MARNet's
  EMA and CDR branches); the whole network (backbone, head, standardiser) is kept at its best
  epoch. Later stages select as in stage two. Never on test.

A checkpoint holds the backbone, the head (with its standardisers) and the provenance:
``marnet eval --finetuned`` and ``predict --finetuned`` classify with it from images alone, and
``extract --finetuned`` caches its backbone's features for the two-stage path.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core.config import (
    ConfigError,
    require_choice,
    require_device,
    require_positive,
    require_range,
    require_template,
)
from ..core.progress import progress_bar
from ..datasets import DEFAULT_TEMPLATE, DatasetInfo, Record, load_dataset
from ..datasets.images import ImageFiles, Preprocess, TrainAugment
from ..engine.backbones import (
    PRECISIONS,
    BackboneError,
    FoldedPairs,
    VisionBackbone,
    VisionSpec,
    build_vision,
    fold_batchnorm,
    folded_batchnorm,
    read_checkpoint_meta,
    resolve_device,
    resolve_precision,
    speed_up_depthwise_backward,
    unfold_batchnorm,
)
from ..engine.distributed import (
    RankInfo,
    distributed,
    gather_rows,
    local_device,
    rank_barrier,
    shard,
    sync_gradients,
)
from ..engine.encode import encode_records
from ..engine.runs import FinetuneError, load_finetuned, split_checkpoint
from ..engine.splits import held_out_split
from ..engine.tensorboard import ScalarLog, require_tensorboard
from ..engine.training import (
    BatchSampler,
    HeadsModel,
    TrainConfig,
    evaluate_features,
    run_stage,
    standardise_tokens,
    train_step,
)
from ..models.heads import (
    METHODS,
    Dims,
    SplitData,
    Stage,
    TrainContext,
    method_config,
    method_fields,
    method_reads_text,
    resolve_overrides,
)
from ..models.heads.alignment import TOKEN_FIELDS, AlignConfig
from ..store import CacheError, FeatureCache

# names finetune accepts beyond the registered methods: -> (method, its overrides)
METHOD_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "ce": ("visual", {}),
    "ita-mp": ("ita", {"multi_positive": True}),
}
FINETUNE_METHODS = ("ce", *METHODS, "ita-mp")


def seda_end_to_end(overrides: dict[str, Any]) -> dict[str, Any]:
    """SeDA's defaults when a backbone trains with it, each chosen on val end to end (README,
    "SeDA", "End to end"); ``overrides`` (``--set``) win. Staged, its DSL regresses running
    class centres and gives the backbone no class boundary and no text, so: R-3 step 1's
    visual classifier trained with the DSL (``dsl.visual_ce``, val top-1 49.5 -> 61.6), the
    prototype CE's temperature the semantic dim so that it no longer dominates the backbone's
    gradient (``dsl.tau_c``, -> 64.1), and DSL and DST trained together through the backbone
    where both stages exist (``joint``, -> 66.0), the mapping where the text reaches it; not
    when ``dsl.cross_fit`` is set, a setting of the staged mapping. On cached features these
    stay the head's own defaults."""
    joint = (overrides.get("variant", "full") in ("full", "no-pfin")
             and "dsl.cross_fit" not in overrides)
    return {"dsl.visual_ce": 1.0, "dsl.tau_c": None, **({"joint": True} if joint else {})}


# a method's defaults when its first stage trains a backbone, from the resolved overrides
END_TO_END_DEFAULTS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "seda": seda_end_to_end,
}


@dataclass
class FinetuneConfig:
    """What ``marnet finetune`` trains and how."""

    dataset: str
    root: Path
    out: Path  # the checkpoint (.safetensors); resumable state lives in <out>.state/
    vision: VisionSpec = field(default_factory=VisionSpec)
    method: str = "ce"  # a registered method, or an alias (ce, ita-mp)
    ablation: str | None = None  # marnet: ema | mlp | cdr | fusion (the Table 2 rows)
    settings: dict[str, Any] = field(default_factory=dict)  # --set KEY=VALUE of the method
    beta: float | None = None  # alignment weight (ema.weight for marnet); None: the method's
    text_cache: Path | None = None  # a cache of this dataset with text features
    proj_dim: int | None = None  # projection dim d (None: the text dim)
    tau: float | None = None  # None: the method's temperature (0.07 ITA, 0.02 SDM)
    epochs: int = 5
    lr: float = 3e-4  # backbone learning rate
    head_lr: float = 3e-3  # the head trained with the backbone
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
    norm_momentum: float = 0.1  # running statistics of the visual standardiser
    head_epochs: int = 30  # epochs of the stages trained on the frozen backbone
    balanced_classes: int = 32  # classes per batch for methods using class statistics
    overwrite: bool = False  # replace a checkpoint at ``out`` made with other settings
    tensorboard: Path | None = None  # also write each epoch's record as TensorBoard scalars

    def __post_init__(self) -> None:
        if self.method not in FINETUNE_METHODS:
            raise FinetuneError(f"unknown method {self.method!r}; choose "
                                f"{', '.join(FINETUNE_METHODS)}")
        for name in ("epochs", "batch_size", "head_epochs", "balanced_classes", "proj_dim"):
            require_positive(f"--{name.replace('_', '-')}", getattr(self, name))
        require_range("--tau", self.tau, 0.0, low_open=True)
        for name in ("lr", "head_lr", "weight_decay", "beta", "num_workers"):
            require_range(f"--{name.replace('_', '-')}", getattr(self, name), 0.0)
        require_range("--norm-momentum", self.norm_momentum, 0.0, 1.0, low_open=True)
        require_device("--device", self.device)
        require_choice("--precision", self.precision, PRECISIONS)
        if self.template is not None:
            require_template("--template", self.template)
        if self.tensorboard is not None:
            require_tensorboard()  # the install hint before any work
        if Path(self.out).is_dir():
            raise ConfigError(f"--out {self.out} is a folder: give the checkpoint's file path, "
                              f"e.g. {Path(self.out) / 'backbone.safetensors'}")
        blocks = self.train_blocks
        if blocks != "all" and not (blocks.startswith("last-") and blocks[5:].isdigit()
                                    and int(blocks[5:]) >= 1):
            raise ConfigError(f"--train-blocks expects all or last-K with K >= 1, got {blocks!r}")

    def head(self) -> tuple[str, Any]:
        """The registered method this fine-tune trains and its resolved config."""
        name, base = METHOD_ALIASES.get(self.method, (self.method, {}))
        sugar = {"weight": self.beta, "d": self.proj_dim, "tau": self.tau}
        given = {k: v for k, v in sugar.items() if v is not None}
        cfg_class = METHODS[name].config
        if given and name == "marnet":
            given = {f"ema.{k}": v for k, v in given.items()}
        elif given and not issubclass(cfg_class, AlignConfig):
            raise FinetuneError(f"--beta, --proj-dim and --tau set the alignment loss of "
                                f"aligned classifiers and MARNet's EMA; --method {self.method} "
                                "has none: use --set KEY=VALUE")
        try:
            overrides = {**base, **given, **resolve_overrides(name, self.ablation, None,
                                                              self.settings)}
            end_to_end = END_TO_END_DEFAULTS.get(name, lambda _: {})(overrides)
            return name, method_config(name, {**end_to_end, **overrides})
        except ValueError as exc:
            raise FinetuneError(str(exc)) from exc


RANK_TIMEOUT_S = 3600.0  # how long a rank waits for the others at a collective
# FinetuneConfig fields that do not change what a fine-tune computes (where it runs and
# writes) or that are checked otherwise (the dataset by its digest)
RUNTIME_FIELDS = ("out", "root", "device", "num_workers", "weights_dir", "text_cache",
                  "overwrite", "tensorboard")


def finetune_settings(cfg: FinetuneConfig) -> dict[str, Any]:
    """Everything that shapes a fine-tune's weights, as JSON: equal settings, equal run. The
    method's config is the resolved one, so a changed default is a changed run."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS}
    return _jsonable({**settings, "method_config": asdict(cfg.head()[1])})


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


def prepare_backbone(vision: VisionBackbone, train_blocks: str,
                     device: torch.device) -> tuple[list[nn.Module], FoldedPairs]:
    """Freeze all but ``train_blocks``, move to ``device`` and set the training speed paths
    (frozen batch norms folded; on CPU, the depthwise weight gradient); returns the frozen
    modules, which stay in eval mode, and their folded norms."""
    frozen = trainable_prefix(vision.model, train_blocks)
    vision.to_runtime(device)
    folds = fold_batchnorm(vision, frozen)
    if device.type == "cpu":
        speed_up_depthwise_backward(vision.model)
    return frozen, folds


def _template(cfg: FinetuneConfig) -> str:
    """The sentence template: as given, else the one the text cache was extracted with (its
    text features are what the alignment reads), else the default."""
    if cfg.template is not None:
        return cfg.template
    if cfg.text_cache is not None:
        return FeatureCache(cfg.text_cache).manifest["dataset"]["template"]
    return DEFAULT_TEMPLATE


def text_tables(cache_path: Path, info: DatasetInfo, fields: tuple[str, ...],
                split: str = "train") -> dict[str, torch.Tensor]:
    """``fields`` (``text``, token fields) of ``info.splits[split]`` from a cache of the same
    dataset, in record order (the cache's own dtype for tokens, float32 for ``text``)."""
    fc = FeatureCache(cache_path).require_complete()
    if fc.manifest["inputs"]["dataset"]["digest"] != info.digest():
        raise CacheError(f"the text cache {cache_path} was made from another dataset than "
                         f"{info.root} with template {info.template!r} (dataset digests "
                         "differ: other annotation files, images or template); extract this "
                         "dataset first, or pass the template the cache was made with")
    missing = [f for f in fields if not fc.has_field(f)]
    if missing:
        raise FinetuneError(f"the text cache {cache_path} holds no {', '.join(missing)}: token "
                            "methods (team) align the backbone's tokens with the text's token "
                            "features; extract the text cache with `marnet extract ... --tokens`")
    ids = fc.load_split(split, ("id",), valid_only=False)["id"]
    row = {id_: i for i, id_ in enumerate(ids)}
    order = torch.tensor([row[r.id] for r in info.splits[split]], dtype=torch.long)
    out = {}
    for name in fields:
        dtype = torch.float32 if name == "text" else getattr(torch, fc.dtype)
        values = fc.load_split(split, (name,), dtype=dtype, valid_only=False)[name]
        out[name] = values[order]
    return out


def selection_split(info: DatasetInfo, text: dict[str, torch.Tensor], seed: int,
                    fraction: float = 0.1
                    ) -> tuple[list[Record], list[Record], dict[str, torch.Tensor], str]:
    """Train records, validation records (never test), the train rows' text tables, and a
    description: the dataset's val split when it has one, else a stratified ``fraction`` of
    train held out, as the head trainer does."""
    train = info.splits["train"]
    if info.splits.get("val"):
        return train, info.splits["val"], text, "val split"
    keep, held = held_out_split(torch.tensor([r.label for r in train]), fraction, seed)
    return ([train[i] for i in keep.tolist()], [train[i] for i in held.tolist()],
            {k: v[keep] for k, v in text.items()},
            f"{fraction:.0%} of train held out (stratified, seed {seed})")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def provenance(cfg: FinetuneConfig, info: DatasetInfo, base: dict[str, Any], method: str,
               method_cfg: Any, dims: Dims, text_key: str | None) -> dict[str, Any]:
    """How a checkpoint was made (method and its settings, base weights, data, seed...) and
    what rebuilds its head: stored in the checkpoint and, through ``extract --finetuned``, in
    the cache key and manifest (without ``source``, where the data was read from)."""
    return _jsonable({
        "model": base["model"], "base_weights": base["weights"],
        "base_weights_digest": base["weights_digest"], "method": cfg.method,
        "head_method": method, "method_config": asdict(method_cfg), "epochs": cfg.epochs,
        "lr": cfg.lr, "head_lr": cfg.head_lr, "weight_decay": cfg.weight_decay,
        "batch_size": cfg.batch_size, "train_blocks": cfg.train_blocks, "augment": cfg.augment,
        "seed": cfg.seed, "norm_momentum": cfg.norm_momentum, "head_epochs": cfg.head_epochs,
        "balanced_classes": cfg.balanced_classes,
        "image_size": base["data_config"]["input_size"][-1],
        "crop_pct": base["data_config"]["crop_pct"], "dataset": info.name,
        "dataset_digest": info.digest(), "template": info.template, "text_cache_key": text_key,
        "dims": asdict(dims), "class_names": info.class_names,
        "source": {"root": str(Path(info.root).resolve()), "options": cfg.dataset_options,
                   "text_cache": str(Path(cfg.text_cache).resolve()) if cfg.text_cache else None},
    })


@dataclass
class EndToEnd:
    """A backbone and a head trained together: turns image batches into the batches a head's
    loss reads (live standardised features, plus the split's text and labels).

    Data-parallel (``ranks.world`` > 1), each rank encodes its part of the global batch and
    the parts are gathered in rank order, so the running statistics and every loss (ITA's
    similarity matrix, CDD's class statistics...) see the whole global batch, as one process
    would; each rank backpropagates through its own part, and the backbone's gradients are
    summed over the ranks (the head's, identical on every rank, averaged)."""

    vision: VisionBackbone
    heads: HeadsModel
    precision: str
    norm_momentum: float
    steps: int = 0  # optimisation steps so far (the first one starts the running statistics)
    ranks: RankInfo = field(default_factory=RankInfo)

    def _local_features(self, stage: Stage, images: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled (and token) features of this rank's images; none for an empty part."""
        if "visual_tokens" in stage.fields:
            return self.vision.features_and_tokens(images, self.precision)
        if not len(images):  # every image of this rank's part was unreadable
            return torch.zeros(0, self.vision.dim, device=self.vision.device), None
        return self.vision.features(images, self.precision), None

    def batch(self, stage: Stage, images: torch.Tensor, index: torch.Tensor,
              split: SplitData, update_norm: bool = True) -> dict[str, torch.Tensor]:
        """The stage's batch for these images: the backbone's features (with gradients),
        standardised with the running statistics (updated first), and ``split``'s rows; under
        several ranks, of the whole global batch."""
        norm = self.heads.norm_visual
        pooled, tokens = self._local_features(stage, images)
        pooled, index = gather_rows(pooled, self.ranks), gather_rows(index, self.ranks)
        if tokens is not None:
            tokens = gather_rows(tokens, self.ranks)
        if update_norm:
            norm.update(pooled.detach(), 1.0 if self.steps == 0 else self.norm_momentum)
        batch = {"visual": norm(pooled)}
        if tokens is not None:
            if tokens.shape[-1] != pooled.shape[-1]:
                raise FinetuneError(f"the backbone's tokens have width {tokens.shape[-1]} but "
                                    f"its pooled features {pooled.shape[-1]}; token methods "
                                    "share the encoder between them")
            batch["visual_tokens"] = norm(tokens)
        for name in stage.fields:  # a method that reads no text trains without a text cache
            if name not in batch and name in split.tensors:
                batch[name] = split[name][index]
        return batch

    def step(self, stage: Stage, optimizer: torch.optim.Optimizer, images: torch.Tensor,
             index: torch.Tensor, split: SplitData) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step of backbone and head under ``stage.loss``."""
        batch = self.batch(stage, images, index, split)
        loss, parts = train_step(stage, optimizer, batch, self.precision,
                                 self.vision.device.type, self._sync_gradients(stage))
        self.steps += 1
        return loss, parts

    def _sync_gradients(self, stage: Stage):
        """Data-parallel: sum the backbone's gradients over the ranks (each holds its part's
        share of the global loss's gradient), average the head's (the same on every rank)."""
        if self.ranks.world == 1:
            return None

        def sync() -> None:
            sync_gradients(self.vision.model.parameters(), self.ranks, average=False)
            sync_gradients((p for m in stage.modules for p in m.parameters()), self.ranks,
                           average=True)

        return sync


@dataclass
class Run:
    """One fine-tune's data and network, as :func:`finetune` builds them."""

    cfg: FinetuneConfig
    info: DatasetInfo
    net: EndToEnd
    frozen: list[nn.Module]
    ctx: TrainContext
    first: Stage  # trains with the backbone
    later: list[Stage]  # train on the frozen backbone's features
    train_records: list[Record]
    val_records: list[Record]
    train_split: SplitData
    val_split: SplitData
    meta: dict[str, Any]
    frozen_folds: FoldedPairs  # the frozen part's batch norms, folded for the whole run


def finetune(cfg: FinetuneConfig, log: Callable[[str], None] = print,
             evaluate: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train backbone and head end to end; resume from ``<out>.state/`` if it holds the same
    run; write the checkpoint and return its provenance (with the training history), plus
    under ``evaluation`` the metrics of the finished network on the ``evaluate`` splits
    (computed as ``marnet eval --finetuned`` does).

    Under torchrun (or an ``srun`` that exports the rendezvous variables) every rank runs
    this: it joins the process group (NCCL on GPU, gloo on CPU) and trains data-parallel;
    rank 0 alone logs and writes (see :class:`EndToEnd` for how the ranks share a batch)."""
    device = local_device(resolve_device(cfg.device))
    with distributed(device, RANK_TIMEOUT_S) as ranks:
        if ranks.world > 1 and not ranks.group:
            raise FinetuneError(
                f"RANK/WORLD_SIZE describe rank {ranks.rank} of {ranks.world}, but no process "
                "group can be formed (MASTER_ADDR is not set): start data-parallel fine-tuning "
                "with torchrun, or export MASTER_ADDR and MASTER_PORT in the job script")
        if not ranks.is_main:
            os.environ["MARNET_PROGRESS"] = "0"  # one progress display, rank 0's
        return _finetune(cfg, device, ranks, log if ranks.is_main else _quiet, evaluate)


def _quiet(_: str) -> None:
    """The log of ranks other than 0."""


def _finetune(cfg: FinetuneConfig, device: torch.device, ranks: RankInfo,
              log: Callable[[str], None], evaluate: tuple[str, ...]) -> dict[str, Any]:
    if ranks.world > cfg.batch_size:
        raise FinetuneError(f"--batch-size {cfg.batch_size} is the global batch, split over "
                            f"{ranks.world} ranks: give at least one image per rank")
    run = _build(cfg, device, ranks)
    previous = _previous_checkpoint(cfg, run.meta)
    if previous is not None and not evaluate:
        log(f"{cfg.out} holds this fine-tune, finished with the same settings: reusing it "
            "(pass --overwrite to train it again)")
        return previous
    with ScalarLog(cfg.tensorboard if ranks.is_main else None, "backbone") as board:
        best, history = _train_backbone(run, log, board)
        vision = run.net.vision
        with folded_batchnorm(vision, [vision.model]):  # the whole backbone is frozen now
            head_history = _later_stages(run, log, board)
            val_metrics = _metrics(run, run.val_records, "validate")
    meta = {**run.meta, "best_epoch": best["epoch"], "val_top1": val_metrics["top1"],
            "val_images": val_metrics["n"], "ranks": ranks.world,
            "val_top5": val_metrics["top5"], "history": history, "head_stages": head_history,
            **({"val_diagnostics": val_metrics["diagnostics"]} if "diagnostics" in val_metrics
               else {})}
    _save_weights(Path(cfg.out), run.net, meta)
    log(f"saved {cfg.out} (backbone: best epoch {best['epoch']}; {cfg.method} val top-1 "
        f"{val_metrics['top1']:.2f}%)")
    unfold_batchnorm(run.frozen_folds)  # evaluated exactly as a checkpoint loaded afresh
    evaluation = {split: _metrics(run, run.info.splits[split], f"{split} images")
                  for split in evaluate}
    return {**meta, "evaluation": evaluation} if evaluate else meta


def _previous_checkpoint(cfg: FinetuneConfig, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The provenance of the checkpoint at ``cfg.out`` when it was made with these settings
    (``meta``), None when there is none or ``cfg.overwrite``; any other file is refused."""
    out = Path(cfg.out)
    if cfg.overwrite or not out.exists():
        return None
    try:
        previous = read_checkpoint_meta(out)
    except BackboneError:
        raise FinetuneError(f"--out {out} exists and is not a marnet checkpoint; choose another "
                            "--out, or pass --overwrite to replace it") from None
    differs = next((key for key, value in meta.items()
                    if key != "source" and previous.get(key) != value), None)  # source: where
    if differs is None:  # the data was read from, not how the weights were made
        return previous
    raise FinetuneError(f"--out {out} holds a fine-tune made with another {differs}; choose a "
                        "new --out, or pass --overwrite to replace it")


def _build(cfg: FinetuneConfig, device: torch.device, ranks: RankInfo = RankInfo()) -> Run:
    """Dataset, text tables, backbone (frozen part folded), head and its stages."""
    name, method_cfg = cfg.head()
    token_fields = tuple(f for f in method_fields(name, method_cfg) if f in TOKEN_FIELDS)
    if method_reads_text(name, method_cfg) and cfg.text_cache is None:
        raise FinetuneError(f"--method {cfg.method} trains with text features: pass "
                            "--text-cache CACHE_DIR (a cache of this dataset made by `marnet "
                            "extract`; its text features are read, never recomputed)")
    torch.manual_seed(cfg.seed)
    precision = resolve_precision(cfg.precision, device)
    info = load_dataset(cfg.dataset, cfg.root, _template(cfg), **cfg.dataset_options)
    text_fields = ("text", *(f for f in token_fields if f.startswith("text_")))
    text = text_tables(Path(cfg.text_cache), info, text_fields) if cfg.text_cache else {}
    text_key = FeatureCache(cfg.text_cache).key if cfg.text_cache else None
    vision = build_vision(cfg.vision, cfg.weights_dir)
    train_records, val_records, text, validation = selection_split(info, text, cfg.seed)
    dims = Dims(vision.dim, text["text"].shape[1] if text else vision.dim, info.num_classes)
    heads = HeadsModel(name, method_cfg, dims)
    meta = {**provenance(cfg, info, vision.description, name, method_cfg, dims, text_key),
            "validation": validation, "precision": precision}
    frozen, folds = prepare_backbone(vision, cfg.train_blocks, device)
    heads.to(device)
    train_split = SplitData({"label": _labels(train_records, device),
                             **_standardised_text(heads, text, device)})
    val_split = SplitData({"label": _labels(val_records, device)})
    ctx = TrainContext(device, torch.Generator(device=device).manual_seed(cfg.seed),
                       eval_seed=cfg.seed, moving_features=True)
    first, *later = heads.head.stages(train_split, val_split, ctx)
    if first.prepare is not None or first.train_rows is not None:
        raise FinetuneError(f"--method {cfg.method}: its first training stage ({first.name}) "
                            "needs whole-split features before it starts (or trains on a "
                            "fold of the rows), so it cannot train through a backbone")
    return Run(cfg, info, EndToEnd(vision, heads, precision, cfg.norm_momentum, ranks=ranks),
               frozen, ctx, first, later, train_records, val_records, train_split, val_split,
               meta, folds)


def _labels(records: list[Record], device: torch.device) -> torch.Tensor:
    return torch.tensor([r.label for r in records], device=device)


def _train_backbone(run: Run, log: Callable[[str], None],
                    board: ScalarLog) -> tuple[dict[str, Any], list]:
    """The first stage with the backbone, epoch by epoch (resumable), each epoch selected on
    val; leaves the network at its best epoch and returns that epoch and the history. Each
    epoch's record also goes to ``board`` (with the two learning rates)."""
    cfg, net, first = run.cfg, run.net, run.first
    optimizer = torch.optim.AdamW([
        {"params": [p for p in net.vision.model.parameters() if p.requires_grad], "lr": cfg.lr},
        {"params": [p for m in first.modules for p in m.parameters() if p.requires_grad],
         "lr": cfg.head_lr},
    ], weight_decay=cfg.weight_decay)
    steps = _sampler(cfg, first, run.train_records, epoch=0).steps
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[cfg.lr, cfg.head_lr], total_steps=cfg.epochs * steps,
        pct_start=min(0.3, 1 / max(cfg.epochs, 1)))
    state_dir = Path(f"{cfg.out}.state")
    start, best, history = _resume(state_dir, run.meta, net, optimizer, scheduler, run.ctx, log)
    augment = (TrainAugment(net.vision.data_config["input_size"][-1]) if cfg.augment
               else Preprocess.from_data_config(net.vision.data_config))
    images = ImageFiles([r.image for r in run.train_records], augment)
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.perf_counter()
        sums = _train_epoch(run, optimizer, scheduler, images, epoch)
        with folded_batchnorm(net.vision, [net.vision.model]):  # evaluation: norms stay put
            _set_features(run, run.val_split, run.val_records, "validate")
        scores = _select_scores(first)
        record = {"epoch": epoch, **{k: round(float(v) / max(1, steps), 5)
                                     for k, v in sums.items()},
                  **{f"val_top1_{g}": round(100 * s, 3) for g, s in scores.items()},
                  "val_top1": round(100 * statistics.fmean(scores.values()), 3),
                  "seconds": round(time.perf_counter() - t0, 1)}
        history.append(record)
        log(json.dumps(record))
        board(record, **dict(zip(("lr", "head_lr"), scheduler.get_last_lr())))
        if best is None or record["val_top1"] > best["val_top1"]:
            best = {"epoch": epoch, "val_top1": record["val_top1"]}
            _save_weights(state_dir / "best.safetensors", net, run.meta)
        _save_state(state_dir, epoch, best, history, run.meta, net, optimizer, scheduler,
                    run.ctx)
    _load_weights(state_dir / "best.safetensors", net)
    net.vision.model.eval()
    return best, history


def _standardised_text(heads: HeadsModel, text: dict[str, torch.Tensor],
                       device: torch.device) -> dict[str, torch.Tensor]:
    """The train rows' text tables on ``device``, z-scored with their exact statistics (text
    features do not move); token fields with the pooled text feature's statistics."""
    if not text:
        return {}
    heads.norm_text.fit(text["text"])
    heads.norm_text.to(device)
    out = {"text": heads.norm_text(text["text"].to(device))}
    if "text_tokens" in text:
        out["text_tokens"] = standardise_tokens(heads.norm_text, text["text_tokens"].to(device),
                                                "text")
        out["text_mask"] = text["text_mask"].to(device)
    return out


def _sampler(cfg: FinetuneConfig, stage: Stage, records: list[Record], epoch: int) -> BatchSampler:
    """The epoch's index batches: a permutation, or class-balanced draws when the stage uses
    class statistics (as in stage two); seeded by (seed, epoch), so a resumed run repeats them."""
    labels = torch.tensor([r.label for r in records])
    return BatchSampler(labels, cfg.batch_size, torch.Generator().manual_seed(cfg.seed * 1000 + epoch),
                        stage.sampler == "balanced", cfg.balanced_classes)


def _train_epoch(run: Run, optimizer, scheduler, images: ImageFiles,
                 epoch: int) -> dict[str, torch.Tensor]:
    """One epoch over the train images; returns the summed loss parts. Each global batch
    (``--batch-size`` rows, the same on every rank) is split into contiguous rank parts; this
    rank loads its part."""
    cfg, net, stage = run.cfg, run.net, run.first
    epoch_seed = cfg.seed * 1000 + epoch
    torch.manual_seed(epoch_seed)  # augmentation in the main process (num_workers=0)
    batches = [shard(b.tolist(), net.ranks)
               for b in _sampler(cfg, stage, run.train_records, epoch).epoch()]
    loader = torch.utils.data.DataLoader(
        images, batch_sampler=batches, num_workers=cfg.num_workers,
        pin_memory=net.vision.device.type == "cuda",
        generator=torch.Generator().manual_seed(epoch_seed))
    net.vision.model.train()
    for module in run.frozen:
        module.eval()
    for module in stage.modules:
        module.train()
    sums: dict[str, torch.Tensor] = {}
    device = net.vision.device
    with progress_bar(f"finetune {cfg.method} epoch {epoch}/{cfg.epochs}", len(batches)) as advance:
        for batch_images, index, errors in loader:
            ok = torch.tensor([not e for e in errors], dtype=torch.bool)
            if ok.any() or net.ranks.world > 1:  # every rank joins every step's collectives
                loss, parts = net.step(stage, optimizer, batch_images[ok],
                                       index[ok].to(device), run.train_split)
                for k, v in {"loss": loss, **parts}.items():
                    sums[k] = sums.get(k, 0) + v.float()
            scheduler.step()
            advance(1)
    for module in stage.modules:
        module.eval()
    return sums


def _select_scores(stage: Stage) -> dict[str, float]:
    """The stage's validation metric per selection group (top-1 fractions)."""
    return {group: metric() for group, (_, metric) in stage.select.items()}


def _encode(run: Run, records: list[Record], description: str,
            log: Callable[[str], None] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`encode_records` of ``records`` on the device, split over the ranks: each rank
    encodes its contiguous part and the parts are gathered in rank order, so every record is
    counted exactly once, whatever the number of ranks (no padded duplicates)."""
    net = run.net
    feats, labels, keep = encode_records(net.vision, shard(records, net.ranks),
                                         run.cfg.batch_size, net.precision,
                                         run.cfg.num_workers, description, log)
    device = net.vision.device
    keep = gather_rows(keep.to(device, torch.uint8), net.ranks).bool()
    return (gather_rows(feats.to(device), net.ranks), gather_rows(labels.to(device), net.ranks),
            keep)


def _set_features(run: Run, split: SplitData, records: list[Record], description: str) -> None:
    """Put the current network's standardised features of ``records`` (and their labels,
    without unreadable images) into ``split``: what the stages' validation metrics read."""
    feats, labels, _ = _encode(run, records, description)
    split.tensors = {**split.tensors, "label": labels, "visual": run.net.heads.norm_visual(feats)}


def _later_stages(run: Run, log: Callable[[str], None],
                  board: ScalarLog) -> list[dict[str, Any]]:
    """The head's later stages on the frozen backbone's features, as stage two trains them
    (un-augmented train images, standardised with the checkpoint's running statistics); each
    epoch's record is logged and written to ``board``."""
    if not run.later:
        return []
    cfg, device = run.cfg, run.net.vision.device
    feats, _, keep = _encode(run, run.train_records, "train images", log)
    # unreadable images leave with their text rows and labels
    run.train_split.tensors = {**{k: v[keep] for k, v in run.train_split.tensors.items()},
                               "visual": run.net.heads.norm_visual(feats)}
    _set_features(run, run.val_split, run.val_records, "validate")  # the selected network
    records: list[dict[str, Any]] = []

    def log_metrics(record: dict) -> None:
        log(json.dumps(record))
        board(record)
        records.append({k: v for k, v in record.items() if k != "seconds"})

    train_cfg = TrainConfig(epochs=cfg.head_epochs, seed=cfg.seed, device=str(device),
                            balanced_classes=cfg.balanced_classes)
    for stage in run.later:
        run_stage(stage, run.train_split, train_cfg, run.ctx, run.net.precision, log_metrics)
    return records


def _metrics(run: Run, records: list[Record], description: str) -> dict[str, Any]:
    """Metrics of the network on ``records``, predicting as evaluation does (full test-time
    chains, a generator seeded with the fine-tune's seed, as ``eval --finetuned``), with the
    head's own diagnostics of them (SeDA's ``z_top1``) when it has some."""
    feats, labels, _ = _encode(run, records, description)
    return evaluate_features(run.net.heads, feats, labels, run.info.num_classes, run.ctx)


def _state_tensors(net: EndToEnd) -> dict[str, torch.Tensor]:
    tensors = {f"backbone.{k}": v for k, v in net.vision.model.state_dict().items()}
    tensors.update({f"heads.{k}": v for k, v in net.heads.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _save_weights(path: Path, net: EndToEnd, meta: dict[str, Any]) -> None:
    """Rank 0 writes the network (atomically); every rank waits until it is on disk."""
    from safetensors.torch import save_file

    if net.ranks.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(_state_tensors(net), str(tmp),
                  metadata={"marnet": json.dumps(meta, default=str)})
        tmp.replace(path)
    rank_barrier(net.ranks)


def _load_weights(path: Path, net: EndToEnd) -> None:
    from safetensors.torch import load_file

    backbone, heads = split_checkpoint(load_file(str(path)))
    net.vision.model.load_state_dict(backbone)
    net.heads.load_state_dict(heads)


def _save_state(state_dir: Path, epoch: int, best: dict, history: list, meta: dict,
                net: EndToEnd, optimizer, scheduler, ctx: TrainContext) -> None:
    """Rank 0 writes the resumable state (replicas are equal: one state serves any number of
    ranks when resumed); every rank waits until it is on disk."""
    if net.ranks.is_main:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_dir / "last.pt.tmp"
        torch.save({"epoch": epoch, "best": best, "history": history, "meta": meta,
                    "model": net.vision.model.state_dict(), "heads": net.heads.state_dict(),
                    "steps": net.steps, "generator": ctx.generator.get_state(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp)
        tmp.replace(state_dir / "last.pt")
    rank_barrier(net.ranks)


def _resume(state_dir: Path, meta: dict, net: EndToEnd, optimizer, scheduler,
            ctx: TrainContext, log: Callable[[str], None]) -> tuple[int, dict | None, list]:
    path = state_dir / "last.pt"
    if not path.is_file():
        return 1, None, []
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["meta"] != meta or "heads" not in state:
        raise FinetuneError(f"{state_dir} holds a fine-tuning run with other settings; "
                            "remove it or choose another --out")
    net.vision.model.load_state_dict(state["model"])
    net.heads.load_state_dict(state["heads"])
    net.steps = state["steps"]
    ctx.generator.set_state(state["generator"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log(f"resuming fine-tuning after epoch {state['epoch']} from {path}")
    return state["epoch"] + 1, state["best"], state["history"]


# --------------------------------------------------------------------------- using a checkpoint


__all__ = ["EndToEnd", "FINETUNE_METHODS", "FinetuneConfig", "FinetuneError", "finetune",
           "finetune_settings", "load_finetuned"]
