"""End-to-end evaluation re-reads the dataset: only the one the cache was extracted from (moved
or not) is accepted."""

import re
import shutil

import pytest
import torch

from marnet.pipeline.core.config import ConfigError
from marnet.pipeline.datasets.synthfood import SynthFoodConfig, generate
from marnet.pipeline.engine.runs import load_run
from marnet.pipeline.engine.training import TrainConfig
from marnet.pipeline.stage2.evaluate import end_to_end_features, evaluate_run
from marnet.pipeline.stage2.train import train_heads
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


def _denoiser_calls(model, config) -> int:
    """Denoiser forwards in one ``predict`` over 4 rows (one chunk: one call per chain step)."""
    calls = []
    hook = model.head.cdr.denoiser.mlp.net[-1].register_forward_hook(lambda *_: calls.append(1))
    generator = torch.Generator().manual_seed(0)
    model.predict(torch.randn(4, config["dims"]["visual"]), generator,
                  config["train"]["chunk_rows"])
    hook.remove()
    return len(calls)


def test_eval_changes_test_time_sampling_but_refuses_settings_that_change_weights(tiny_cache,
                                                                                  tmp_path):
    run = tmp_path / "cdr"
    train_heads(tiny_cache, "marnet", run, {"variant": "cdr", "diffusion.hidden": 32,
                                            "diffusion.schedule.steps": 20},
                TrainConfig(epochs=1, batch_size=8, device="cpu"), log=lambda _: None)
    ddpm = evaluate_run(run, device="cpu", log=lambda _: None)
    ddim = evaluate_run(run, device="cpu", log=lambda _: None,
                        overrides={"diffusion.sampler": "ddim", "diffusion.steps": "2"})
    assert "overrides" not in ddpm
    assert ddim["overrides"] == {"diffusion.sampler": "ddim", "diffusion.steps": "2"}
    model, config = load_run(run, "cpu", {"diffusion.sampler": "ddim", "diffusion.steps": "2"})
    assert config["method_config"]["diffusion"]["sampler"] == "ddim"
    assert model.head.cfg.diffusion.steps == 2
    assert _denoiser_calls(model, config) == 2  # predict samples with the overridden chain
    assert _denoiser_calls(*load_run(run, "cpu")) == 20  # the trained DDPM chain otherwise
    with pytest.raises(ConfigError, match="changes the trained heads"):
        evaluate_run(run, device="cpu", log=lambda _: None, overrides={"diffusion.hidden": "8"})
    # the same shapes, but not what the denoiser was trained on: refused too
    with pytest.raises(ConfigError, match="diffusion.schedule.steps changes the trained heads"):
        evaluate_run(run, device="cpu", log=lambda _: None,
                     overrides={"diffusion.schedule.steps": "40"})
