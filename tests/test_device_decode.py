"""``--decode device``: JPEGs decoded and resized where the backbone runs (nvJPEG on CUDA; the
same code on CPU here). It must give the workers' images to within resize rounding, keep
every bad-file rule, and be a cache of its own that eval and predict decode the same way."""

import numpy as np
import pytest
import torch
from PIL import Image

from marnet.pipeline.datasets import device_decode, load_dataset
from marnet.pipeline.datasets.device_decode import (
    DeviceDecoder,
    EncodedImageFiles,
    device_decodable,
    device_image_batches,
)
from marnet.pipeline.datasets.images import ImageFiles, Preprocess
from marnet.pipeline.engine.backbones import build_vision
from marnet.pipeline.engine.encode import encode_images
from marnet.pipeline.stage1.extract import ExtractConfig, extract
from marnet.pipeline.stage2.evaluate import end_to_end_features
from marnet.pipeline.store import FeatureCache

CPU = torch.device("cpu")


def _smooth_image(width: int, height: int) -> Image.Image:
    """Gradients and a bright left half: resizing rounds, but nothing aliases."""
    x = np.linspace(0, 1, width)[None, :]
    y = np.linspace(0, 1, height)[:, None]
    rgb = np.stack([200 * x + 40 * y, 220 * y + 0 * x, 120 + 100 * (x < 0.5) + 0 * y], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("size_wh", [(90, 60), (50, 120), (20, 14)])  # 20x14: smaller: padded
def test_tensor_geometry_equals_the_pil_geometry(crop_mode, size_wh):
    img = _smooth_image(*size_wh)
    pre = Preprocess(32, crop_pct=0.875, crop_mode=crop_mode, fill=(10, 20, 30))
    from_pil = pre(img).int()
    from_tensor = pre.tensor(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)).int()
    assert from_tensor.shape == from_pil.shape == (3, 32, 32)
    diff = (from_tensor - from_pil).abs()
    assert diff.max() <= 2 and diff.float().mean() < 0.3


def test_lanczos_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match="lanczos .* use --decode workers"):
        DeviceDecoder([], Preprocess(32, interpolation="lanczos"), CPU)


def _exif_rotated(path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to view
    _smooth_image(48, 30).save(path, format="JPEG", quality=95, exif=exif)
    return path


def test_mixed_files_decode_as_the_workers_do_and_bad_files_name_themselves(
        tmp_path, write_image_file):
    good = {kind: write_image_file(tmp_path / f"{kind}.{'png' if kind == 'png_alpha' else 'jpg'}",
                                   kind, size=(48, 30)) for kind in ("rgb", "gray", "cmyk",
                                                                     "png_alpha")}
    good["smooth"] = tmp_path / "smooth.jpg"
    _smooth_image(64, 40).save(good["smooth"], format="JPEG", quality=95)
    good["exif"] = _exif_rotated(tmp_path / "exif.jpg")
    bad = {kind: write_image_file(tmp_path / f"bad-{kind}.jpg", kind)
           for kind in ("zero", "truncated", "text")}
    bad["missing"] = tmp_path / "missing.jpg"
    paths = [*good.values(), *bad.values()]

    assert [device_decodable(good[k]) for k in ("rgb", "gray", "smooth")] == [True] * 3
    assert [device_decodable(good[k]) for k in ("cmyk", "png_alpha", "exif")] == [False] * 3
    pre = Preprocess(24)
    # one batch holding good and bad files: the truncated JPEG fails the batch decode, is
    # found, and the other JPEGs of the batch still decode
    (images, indices, errors), = list(device_image_batches(paths, pre, [list(range(len(paths)))],
                                                           0, CPU))
    assert indices.tolist() == list(range(len(paths)))
    workers = ImageFiles(paths, pre)
    for i, path in enumerate(paths):
        expected, _, expected_error = workers[i]
        if path in bad.values():
            assert errors[i] == expected_error and errors[i].startswith(f"{path}: ")
            assert not images[i].any()
        else:
            assert errors[i] == ""
            diff = (images[i].int() - expected.int()).abs()
            assert diff.float().mean() < 1.0, path  # EXIF rotation applied as the workers do


def test_a_jpeg_the_device_decoder_rejects_goes_to_pil_and_is_not_lost(tmp_path, monkeypatch):
    paths = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    _smooth_image(64, 40).save(paths[0], format="JPEG", quality=95)
    _smooth_image(50, 70).save(paths[1], format="JPEG", quality=95)
    rejected = paths[1].stat().st_size
    device_call = device_decode._decode_jpeg

    def unsupported_variant(payloads, device):  # as nvJPEG answers a JPEG it cannot decode
        if any(p.numel() == rejected for p in payloads):
            raise RuntimeError("decode_jpeg, nvjpeg.cpp:1, unsupported JPEG variant")
        return device_call(payloads, device)

    monkeypatch.setattr(device_decode, "_decode_jpeg", unsupported_variant)
    pre = Preprocess(24)
    images, _, errors = next(iter(device_image_batches(paths, pre, [[0, 1]], 0, CPU)))
    assert errors == ["", ""]
    for i, path in enumerate(paths):
        diff = (images[i].int() - ImageFiles(paths, pre)[i][0].int()).abs()
        assert diff.float().mean() < 1.0, path


def test_encoded_files_send_bytes_for_plain_jpegs_and_pixels_for_the_rest(tmp_path,
                                                                         write_image_file):
    jpeg = write_image_file(tmp_path / "a.jpg", "rgb", size=(30, 20))
    png = write_image_file(tmp_path / "b.png", "png_alpha", size=(30, 20))
    files = EncodedImageFiles([jpeg, png])
    payload, _, error = files[0]
    assert error == "" and payload.ndim == 1 and payload.numel() == jpeg.stat().st_size
    payload, _, error = files[1]
    assert error == "" and payload.shape == (3, 20, 30)


def test_a_device_decoded_cache_is_its_own_and_eval_decodes_as_it_did(
        synth_root, tiny_cache, make_extract_config, tmp_path):
    result = extract(make_extract_config(synth_root, tmp_path / "cache", decode="device"),
                     log=lambda _: None)
    assert result.path.name != tiny_cache.name  # another decode, other features: another key
    manifest = result.manifest
    assert manifest["inputs"]["decode"] == "device" and manifest["settings"]["decode"] == "device"
    assert "decode" not in FeatureCache(tiny_cache).manifest["inputs"]  # old keys stay valid

    device_feats = FeatureCache(result.path).load_split("test", ("visual",))["visual"]
    worker_feats = FeatureCache(tiny_cache).load_split("test", ("visual",))["visual"]
    cosine = torch.nn.functional.cosine_similarity(device_feats, worker_feats, dim=1)
    assert cosine.min() > 0.99

    visual, _ = end_to_end_features(FeatureCache(result.path), "test", synth_root, CPU, 0,
                                    tmp_path / "weights", lambda _: None)
    assert torch.equal(visual, device_feats)  # end to end follows the cache's decode mode
    vision = build_vision(make_extract_config(synth_root, tmp_path).vision, tmp_path / "weights")
    vision.to_runtime(CPU)
    paths = [r.image for r in load_dataset("synthfood", synth_root).splits["test"]]
    by_workers, _ = encode_images(vision, paths, 8, "fp32", manifest["dtype"], 0)
    assert not torch.equal(by_workers, device_feats)  # so the mode is what made them equal


def test_an_unknown_decode_mode_is_refused(synth_root, tmp_path):
    with pytest.raises(ValueError, match="--decode"):
        ExtractConfig(dataset="synthfood", root=synth_root, decode="gpu")
