"""The GPU-path options of the vision backbone (uint8 batches normalised on the device,
channels_last, bf16 autocast, torch.compile) keep the features of the plain fp32 path, within
each option's tolerance. Run on CPU here; the same code paths run on a GPU."""

import copy

import pytest
import torch
import torch.nn.functional as F

from marnet.pipeline.engine.backbones import VisionSpec, build_vision

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def backbone():
    vision = build_vision(VisionSpec("test_efficientnet", "random", image_size=32, crop_pct=1.0))
    vision.model.eval()
    return vision


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def _features(backbone, images, precision="fp32", **runtime):
    vision = copy.deepcopy(backbone).to_runtime(CPU, **runtime)
    with torch.inference_mode():
        return vision.features(images, precision)


def test_uint8_batches_are_normalised_as_the_model_expects(backbone, images):
    vision = copy.deepcopy(backbone).to_runtime(CPU, channels_last=False)
    mean = torch.tensor(vision.data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(vision.data_config["std"]).view(1, 3, 1, 1)
    expected = (images.float() / 255.0 - mean) / std
    assert torch.allclose(vision.normalise(images), expected, atol=1e-5)


@pytest.mark.parametrize("option, precision, runtime, atol", [
    ("channels_last", "fp32", {"channels_last": True}, 1e-4),
    ("compile", "fp32", {"channels_last": False, "compile_model": True}, 1e-4),
])
def test_exact_options_keep_the_features(backbone, images, option, precision, runtime, atol):
    reference = _features(backbone, images, channels_last=False)
    assert torch.allclose(_features(backbone, images, precision, **runtime), reference,
                          atol=atol, rtol=1e-4), option
    vision = copy.deepcopy(backbone).to_runtime(CPU, **runtime)  # and the option took effect
    if option == "channels_last":
        assert any(w.dim() == 4 and not w.is_contiguous()
                   and w.is_contiguous(memory_format=torch.channels_last)
                   for w in vision.model.parameters())
    else:
        assert vision._forward is not vision.model


def test_bf16_autocast_stays_close_to_fp32(backbone, images):
    reference = _features(backbone, images, channels_last=False)
    bf16 = _features(backbone, images, "bf16", channels_last=True)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, reference)  # it did run in bf16
    assert F.cosine_similarity(bf16, reference, dim=1).min() > 0.99
