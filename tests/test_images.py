"""Image decoding: odd modes are converted, broken and absurd files give a clear reason."""

import numpy as np
import pytest
import torch
from PIL import Image

from marnet.pipeline.datasets import images
from marnet.pipeline.datasets.images import BadImageError, ImageFiles, Preprocess, load_rgb


@pytest.mark.parametrize("kind", ["gray", "cmyk", "png_alpha", "rgb"])
def test_odd_modes_are_converted_to_rgb(tmp_path, write_image_file, kind):
    suffix = ".png" if kind == "png_alpha" else ".jpg"
    path = write_image_file(tmp_path / f"x{suffix}", kind, size=(20, 10), colour=(200, 80, 40))
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (20, 10)
    pixel = np.asarray(img)[5, 10]
    if kind == "png_alpha":  # fully transparent: composited on white
        assert pixel.tolist() == [255, 255, 255]
    elif kind == "gray":
        assert pixel[0] == pixel[1] == pixel[2]
    else:  # colour survives the conversion (JPEG is lossy)
        assert abs(int(pixel[0]) - 200) < 12 and abs(int(pixel[2]) - 40) < 12


@pytest.mark.parametrize("kind, reason", [
    ("zero", "empty file (0 bytes)"), ("truncated", "cannot decode"),
    ("text", "cannot decode")])
def test_broken_files_raise_with_the_path_and_reason(tmp_path, write_image_file, kind, reason):
    path = write_image_file(tmp_path / "bad.jpg", kind)
    with pytest.raises(BadImageError) as err:
        load_rgb(path)
    assert str(err.value).startswith(f"{path}: {reason}")


def test_missing_file(tmp_path):
    with pytest.raises(BadImageError, match="nothere.jpg: file not found"):
        load_rgb(tmp_path / "nothere.jpg")


def test_a_large_photo_goes_through_image_files(tmp_path):
    path = tmp_path / "large.jpg"
    Image.new("RGB", (6000, 4000), (30, 140, 90)).save(path, quality=50)
    image, index, error = ImageFiles([path], Preprocess(32))[0]
    assert error == "" and index == 0
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert abs(int(image[1, 16, 16]) - 140) < 6


def test_an_absurdly_large_image_is_a_bad_image_not_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(images.Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadImageError, match="bomb.png: cannot decode .*decompression bomb"):
        load_rgb(path)
    # between one and two times the limit PIL only warns; it is still refused
    monkeypatch.setattr(images.Image, "MAX_IMAGE_PIXELS", 6000)
    with pytest.warns(Image.DecompressionBombWarning):
        with pytest.raises(BadImageError, match=r"bomb.png: cannot decode \(100x100 = 10,000 "
                                                r"pixels, over the 6,000 limit"):
            load_rgb(path)
        image, _, error = ImageFiles([path], Preprocess(16))[0]
    assert "decompression bomb" in error and int(image.sum()) == 0


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_preprocess_matches_timms_eval_transform(crop_mode):
    import timm

    rng = np.random.default_rng(0)
    for (width, height), size, crop_pct in [((37, 23), 32, 1.0), ((50, 61), 32, 0.875),
                                            ((33, 90), 24, 0.9), ((41, 40), 28, 0.95),
                                            ((64, 64), 32, 1.0), ((20, 30), 32, 1.1)]:
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        config = {"input_size": (3, size, size), "interpolation": "bicubic", "crop_pct": crop_pct,
                  "crop_mode": crop_mode, "mean": (0.485, 0.456, 0.406),
                  "std": (0.229, 0.224, 0.225)}
        mean, std = (torch.tensor(config[k]).view(3, 1, 1) for k in ("mean", "std"))
        expected = (timm.data.create_transform(**config)(img) * std + mean) * 255
        ours = Preprocess.from_data_config(config)(img)
        assert ours.shape == expected.shape, (width, height, size, crop_pct)
        assert (ours.float() - expected).abs().max() <= 0.51, (width, height, size, crop_pct)


def test_preprocess_refuses_a_crop_mode_it_does_not_implement():
    with pytest.raises(ValueError, match="crop_mode 'zoom'.*implements center, squash, border"):
        Preprocess.from_data_config({"input_size": (3, 32, 32), "crop_mode": "zoom",
                                     "mean": (0.5, 0.5, 0.5)})
