"""End-to-end evaluation re-reads the dataset: only the one the cache was extracted from (moved
or not) is accepted."""

import re
import shutil

import pytest
import torch

from marnet.pipeline.datasets.synthfood import SynthFoodConfig, generate
from marnet.pipeline.evaluate import end_to_end_features
from marnet.pipeline.store import CacheError, FeatureCache


def _features(cache, root, tmp_path):
    return end_to_end_features(FeatureCache(cache), "test", root, torch.device("cpu"), 0,
                               tmp_path / "weights", lambda _: None)


def test_end_to_end_refuses_another_dataset_and_accepts_a_moved_copy(synth_root, tiny_cache,
                                                                     tmp_path):
    other = tmp_path / "other"
    generate(other, SynthFoodConfig(num_classes=4, train_per_class=8, val_per_class=3,
                                    test_per_class=4, image_size=40, seed=4))
    message = (f"the dataset at {other} is not the one the cache {tiny_cache} was extracted "
               f"from ({synth_root})")
    with pytest.raises(CacheError, match=re.escape(message)):
        _features(tiny_cache, other, tmp_path)

    moved = tmp_path / "moved"
    shutil.copytree(synth_root, moved)
    visual, labels = _features(tiny_cache, moved, tmp_path)
    assert visual.shape[0] == labels.shape[0] == FeatureCache(tiny_cache).manifest[
        "splits"]["test"]["rows"]
