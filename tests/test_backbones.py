"""Backbone ids as users write them: timm's `local-dir:PATH` and `hf-hub:ORG/NAME` for the
vision backbone, an HF id or a local folder for the text backbone; all offline."""

import json
from pathlib import Path

import pytest
import timm
import torch
from typer.testing import CliRunner

from marnet.cli import app
from marnet.pipeline.engine.backbones import (
    BackboneError,
    TextSpec,
    VisionSpec,
    build_text,
    build_vision,
    resolve_text_model,
    state_dict_digest,
)
from marnet.pipeline.store import FeatureCache, content_key


def _save_timm_folder(folder: Path, seed: int) -> torch.nn.Module:
    """A tiny timm model with its own weights (and a 7-class classifier), saved in timm's hub
    format: config.json + model.safetensors."""
    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=7)
    timm.models.save_for_hf(model, folder, safe_serialization=True)
    return model


def _pooled(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(images), pre_logits=True)


def _fake_hub_cache(cache: Path, repo: str, files: Path) -> None:
    """The Hugging Face cache layout of ``repo`` at one revision, its files linked from
    ``files``: what a download leaves behind."""
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for path in files.iterdir():
        if path.is_file():
            (snapshot / path.name).symlink_to(path)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)


def test_local_dir_builds_the_saved_model_with_its_weights_and_preprocessing(tmp_path):
    folder = tmp_path / "tiny"
    saved = _save_timm_folder(folder, seed=5).eval()
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"].update(mean=[0.5, 0.5, 0.5], interpolation="bilinear")
    (folder / "config.json").write_text(json.dumps(config))

    vision = build_vision(VisionSpec(f"local-dir:{folder}", image_size=32))
    expected = {k: v for k, v in saved.state_dict().items() if not k.startswith("classifier")}
    state = vision.model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert vision.data_config["mean"] == [0.5, 0.5, 0.5]
    assert vision.data_config["interpolation"] == "bilinear"
    assert vision.data_config["input_size"] == [3, 32, 32]
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vision.model(images), _pooled(saved, images), atol=1e-6)
    assert vision.description["model"] == f"local-dir:{folder}"
    assert vision.description["weights_digest"] == state_dict_digest(vision.model)
    random = build_vision(VisionSpec(f"local-dir:{folder}", "random", image_size=32))
    assert random.description["weights_digest"] == build_vision(
        VisionSpec("test_efficientnet", "random", image_size=32)).description["weights_digest"]


def test_extract_with_local_dir_keys_on_the_folders_weights(write_folder, tmp_path):
    folder = tmp_path / "tiny"
    _save_timm_folder(folder, seed=5)
    root = write_folder(tmp_path / "data")
    result = CliRunner().invoke(app, [
        "extract", "--dataset", "folder", "--root", str(root), "--cache-dir",
        str(tmp_path / "cache"), "--visual", f"local-dir:{folder}", "--image-size", "32",
        "--crop-pct", "1.0", "--text", "minilm", "--pooling", "mean", "--max-length", "32",
        "--batch-size", "4", "--shard-rows", "4", "--num-workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "cache" / "folder").iterdir()
    cache = FeatureCache(path)
    inputs = cache.manifest["inputs"]
    assert cache.complete and inputs["visual"]["model"] == f"local-dir:{folder}"
    reference = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    reference.load_state_dict(_safetensors(folder))
    assert inputs["visual"]["weights_digest"] == state_dict_digest(reference)
    assert content_key(inputs) == cache.key

    _save_timm_folder(folder, seed=6)  # other weights in the same folder: another key
    changed = build_vision(VisionSpec(f"local-dir:{folder}", image_size=32, crop_pct=1.0))
    assert changed.description["weights_digest"] != inputs["visual"]["weights_digest"]
    assert content_key({**inputs, "visual": changed.description}) != cache.key


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(folder / "model.safetensors")).items()
            if not k.startswith("classifier")}


def test_hf_hub_ids_load_from_the_local_hf_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # the tests never reach the network
    saved = _save_timm_folder(tmp_path / "files", seed=5)
    _fake_hub_cache(tmp_path / "hub", "marnet-test/tiny", tmp_path / "files")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    vision = build_vision(VisionSpec("hf-hub:marnet-test/tiny", image_size=32))
    assert torch.equal(vision.model.conv_stem.weight, saved.conv_stem.weight)

    for size in (None, 32):  # an input size override builds a probe first: the same error
        with pytest.raises(BackboneError) as missing:
            build_vision(VisionSpec("hf-hub:marnet-test/not-downloaded", image_size=size))
        assert ("HF_HUB_OFFLINE is set and marnet-test/not-downloaded is not in the local "
                f"Hugging Face cache ({tmp_path / 'hub'})") in str(missing.value)
        assert "--visual local-dir:PATH" in str(missing.value)


def test_bad_local_dirs_and_ids_say_what_is_wrong(tmp_path):
    folder = tmp_path / "tiny"
    _save_timm_folder(folder, seed=5)
    cases = {
        f"local-dir:{tmp_path / 'none'}": "is not a folder",
        "vit_small/patch16": "hf-hub:vit_small/patch16 or local-dir:vit_small/patch16",
    }
    for model, message in cases.items():
        with pytest.raises(BackboneError, match=message):
            build_vision(VisionSpec(model))
    with pytest.raises(BackboneError, match="brings its own weights"):
        build_vision(VisionSpec(f"local-dir:{folder}", str(folder / "model.safetensors")))
    (folder / "model.safetensors").unlink()
    with pytest.raises(BackboneError, match="no weights in .*--visual-weights random"):
        build_vision(VisionSpec(f"local-dir:{folder}"))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(BackboneError, match="config.json is not a timm model config"):
        build_vision(VisionSpec(f"local-dir:{folder}", "random"))
    (folder / "config.json").write_text(json.dumps({"architecture": "no_such_net"}))
    with pytest.raises(BackboneError, match="architecture 'no_such_net'"):
        build_vision(VisionSpec(f"local-dir:{folder}", "random"))
    (folder / "config.json").unlink()
    with pytest.raises(BackboneError, match="config.json is missing"):
        build_vision(VisionSpec(f"local-dir:{folder}", "random"))


def test_text_backbones_from_a_folder_or_an_hf_id_in_the_local_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    bundled = build_text(TextSpec("minilm", "mean", 32))
    folder = Path(resolve_text_model("minilm"))
    _fake_hub_cache(tmp_path / "hub", "marnet-test/minilm", folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    texts = ["Ingredients: egg, tomato.", "Ingredients: rice."]
    for name in (str(folder), "marnet-test/minilm"):
        text = build_text(TextSpec(name, "mean", 32))
        assert text.description["weights_digest"] == bundled.description["weights_digest"]
        assert text.description["tokenizer_digest"] == bundled.description["tokenizer_digest"]
        assert torch.equal(text.encode(texts, torch.device("cpu")),
                           bundled.encode(texts, torch.device("cpu")))
    with pytest.raises(BackboneError, match="from the local HF cache or the hub"):
        build_text(TextSpec("marnet-test/not-downloaded", "mean", 32))
