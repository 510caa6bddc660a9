"""Extraction and the cache together, in process: both formats hold the same values, storage
errors mid-run keep committed shards and resume, a live lock stops a second run, the key
follows every setting that changes features (and where the images are, not where the dataset
root is), and per-stage timings reach the manifest."""

import errno
import json
import os
import shutil
import socket
from dataclasses import replace

import numpy as np
import pytest

from marnet.pipeline.datasets import load_dataset
from marnet.pipeline.engine.backbones import VisionSpec, build_text, build_vision
from marnet.pipeline.stage1.extract import _timing_line, extract, key_inputs
from marnet.pipeline.store import CacheError, FeatureCache, LockError, content_key
from marnet.pipeline.store.backends import ZarrBackend


def test_extract_refuses_to_write_to_a_url(synth_root, tmp_path, make_extract_config):
    cfg = replace(make_extract_config(synth_root, tmp_path), cache_dir="s3://bucket/cache")
    with pytest.raises(ValueError, match="local or mounted POSIX filesystem"):
        extract(cfg, log=lambda _: None)


def _same_values(a: FeatureCache, b: FeatureCache) -> None:
    for split in b.splits:
        for field in b.manifest["splits"][split]["fields"]:
            assert np.array_equal(a.read_numpy(split, field), b.read_numpy(split, field)), (
                split, field)


def test_hdf5_extraction_holds_the_values_of_the_zarr_one(synth_root, tiny_cache, tmp_path,
                                                          make_extract_config):
    logs = []
    result = extract(make_extract_config(synth_root, tmp_path, format="hdf5"), log=logs.append)
    hdf5, zarr = FeatureCache(result.path), FeatureCache(tiny_cache)
    assert (result.path / "features.hdf5/train/shard-00001.h5").is_file()
    assert hdf5.verify() == [] and hdf5.key != zarr.key
    assert {k: v for k, v in hdf5.manifest["inputs"].items() if k != "format"} == {
        k: v for k, v in zarr.manifest["inputs"].items() if k != "format"}
    _same_values(hdf5, zarr)
    timings = hdf5.manifest["timings"]
    assert timings["rows"] == 60 and set(timings["ms_per_row"]) == {"read", "model", "write"}
    assert timings["model_s"] > 0 and timings["write_s"] > 0 and "text_s" in timings
    split_lines = [line for line in logs if line.startswith(("train:", "val:", "test:"))]
    assert len(split_lines) == 3 and all("model" in line and "ms/img" in line
                                         for line in split_lines)


def test_timing_line_shows_ms_per_image_and_shares():
    line = _timing_line({"read_s": 1.0, "model_s": 2.0}, 1.0, 100)
    assert line == "read 10.0 ms/img (25%) · model 20.0 ms/img (50%) · write 10.0 ms/img (25%)"


def test_storage_error_mid_run_then_a_live_lock_then_resume(synth_root, tiny_cache, tmp_path,
                                                            make_extract_config, monkeypatch):
    cfg = make_extract_config(synth_root, tmp_path, shard_rows=8)
    real_write, calls = ZarrBackend.write_shard, []

    def disk_full_on_third(self, split, index, start, arrays):
        calls.append((split, index))
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, split, index, start, arrays)

    with monkeypatch.context() as patch:
        patch.setattr(ZarrBackend, "write_shard", disk_full_on_third)
        with pytest.raises(CacheError) as error:
            extract(cfg, log=lambda _: None)
    path = tmp_path / "synthfood" / tiny_cache.name
    message = str(error.value)
    assert f"writing shard train/2 of the cache {path} failed" in message
    assert "No space left on device" in message and "2 of 8 shards are committed" in message
    assert "run the same command again to resume" in message
    problems = FeatureCache(path).verify()  # the committed shards are intact
    assert len(problems) == 1 and problems[0].startswith("incomplete: 2 of 8")
    assert not (path / ".lock").exists()

    (path / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                            "started": 0}))
    with pytest.raises(LockError, match=f"another extraction is writing {path}"):
        extract(cfg, log=lambda _: None)
    (path / ".lock").unlink()

    logs = []
    result = extract(cfg, log=logs.append)
    assert result.path == path and any("resuming" in line for line in logs)
    cache = FeatureCache(path)
    assert cache.complete and cache.verify() == []
    _same_values(cache, FeatureCache(tiny_cache))


def test_the_key_follows_every_setting_that_changes_features(synth_root, tmp_path,
                                                             make_extract_config):
    cfg = make_extract_config(synth_root, tmp_path)
    info = load_dataset("synthfood", synth_root)
    vision = build_vision(cfg.vision).description
    text = build_text(cfg.text).description

    def key(cfg=cfg, info=info, vision=vision, text=text, precision="fp32"):
        return content_key(key_inputs(cfg, info, vision, text, precision))

    changed_files = tmp_path / "synth"
    shutil.copytree(synth_root, changed_files)
    labels = changed_files / "SplitAndIngreLabel" / "TE.txt"
    labels.write_text("\n".join(labels.read_text().splitlines()[:-1]) + "\n")
    keys = {
        "same": key(),
        "backbone": key(vision={**vision, "model": "resnet18"}),
        "weights": key(vision=build_vision(VisionSpec(
            "test_efficientnet", str(_saved_weights(tmp_path)), image_size=32,
            crop_pct=1.0)).description),
        "preprocessing": key(vision=build_vision(VisionSpec(
            "test_efficientnet", "random", image_size=40, crop_pct=1.0)).description),
        "text pooling": key(text={**text, "pooling": "cls"}),
        "template": key(info=load_dataset("synthfood", synth_root, "Contains {ingredients}.")),
        "dtype": key(cfg=make_extract_config(synth_root, tmp_path, dtype="bfloat16")),
        "precision": key(precision="bf16"),
        "dataset files": key(info=load_dataset("synthfood", changed_files)),
        "bad images": key(cfg=make_extract_config(synth_root, tmp_path, on_bad_image="skip")),
    }
    assert keys["same"] == key(text=json.loads(json.dumps(text)))
    assert len(set(keys.values())) == len(keys), keys


@pytest.mark.filterwarnings("ignore::marnet.pipeline.datasets.base.DatasetWarning")
def test_the_key_follows_where_the_images_are_not_where_the_root_is(write_ingredient101,
                                                                    tmp_path,
                                                                    make_extract_config):
    root = write_ingredient101(tmp_path / "i101")
    moved = tmp_path / "elsewhere" / "i101"
    shutil.copytree(root, moved)
    for copy in ("a", "b"):
        shutil.copytree(root / "images", tmp_path / copy / "images")

    def key(root, images_root=None):
        options = {} if images_root is None else {"images_root": images_root}
        cfg = make_extract_config(root, tmp_path, dataset="ingredient101",
                                  dataset_options=options)
        info = load_dataset("ingredient101", root, **options)
        return content_key(key_inputs(cfg, info, {"model": "v"}, {"model": "t"}, "fp32"))

    assert key(moved) == key(root)
    assert key(moved, moved / "images") == key(root, root / "images")
    keys = {key(root), key(root, tmp_path / "a" / "images"), key(root, tmp_path / "b" / "images")}
    assert len(keys) == 3
    # the dataset digest alone (what eval --end-to-end compares) tells the images folders apart
    digests = {load_dataset("ingredient101", root, images_root=tmp_path / c / "images").digest()
               for c in "ab"}
    assert len(digests) == 2
    assert load_dataset("ingredient101", moved).digest() == load_dataset("ingredient101",
                                                                         root).digest()


def _saved_weights(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
