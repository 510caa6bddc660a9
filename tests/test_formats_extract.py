"""Extraction from the imagefolder, hf and webdataset formats: the same images, labels and texts
as a folder dataset give the folder dataset's cache, value for value, through the real
extraction path (images inside Parquet, Arrow and tar shards decoded from their bytes)."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from marnet.cli import app
from marnet.pipeline.datasets import load_dataset
from marnet.pipeline.datasets.device_decode import EncodedImageFiles
from marnet.pipeline.datasets.images import ImageFiles, Preprocess
from marnet.pipeline.stage1.extract import extract
from marnet.pipeline.store import FeatureCache

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()
FIELDS = ("visual", "text", "label", "valid", "ingredients")


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory, write_folder):
    return write_folder(tmp_path_factory.mktemp("formats") / "folder")


@pytest.fixture(scope="module")
def folder_cache(folder_root, tmp_path_factory, make_extract_config):
    cfg = make_extract_config(folder_root, tmp_path_factory.mktemp("cache"), dataset="folder")
    return FeatureCache(extract(cfg, log=lambda _: None).path)


def _assert_same_cache(cache: FeatureCache, folder: FeatureCache) -> None:
    assert cache.splits == folder.splits and cache.key != folder.key
    assert cache.manifest["ingredients"] == folder.manifest["ingredients"]
    for split in folder.splits:
        for field in FIELDS:
            assert np.array_equal(cache.read_numpy(split, field),
                                  folder.read_numpy(split, field)), (split, field)


@pytest.mark.parametrize("fmt", ["imagefolder", "hf-saved", "hf-parquet", "webdataset"])
def test_each_format_extracts_the_folder_cache(fmt, tmp_path, folder_root, folder_cache,
                                               make_extract_config, write_imagefolder,
                                               write_hf, write_webdataset):
    name, _, layout = fmt.partition("-")
    root = {"imagefolder": lambda: write_imagefolder(tmp_path / "data", folder_root, "csv"),
            "hf": lambda: write_hf(tmp_path / "data", folder_root, layout),
            "webdataset": lambda: write_webdataset(tmp_path / "data", folder_root, "json")}[name]()
    cfg = make_extract_config(root, tmp_path / "cache", dataset=name)
    cache = FeatureCache(extract(cfg, log=lambda _: None).path)
    _assert_same_cache(cache, folder_cache)
    assert cache.manifest["class_names"] == folder_cache.manifest["class_names"]
    assert cache.verify() == []


def test_webdataset_cli_extract_with_cls_labels_and_a_split_map(tmp_path, folder_root,
                                                                folder_cache, write_webdataset,
                                                                make_extract_config,
                                                                extract_cli):
    pattern = write_webdataset(tmp_path / "shards", folder_root, "cls")
    for shard in (tmp_path / "shards").glob("validation-*.tar"):
        shard.rename(shard.with_name(shard.name.replace("validation", "holdout")))
    pattern = pattern.replace("validation", "holdout")
    cfg = make_extract_config(pattern, tmp_path / "cache", dataset="webdataset")
    result = CliRunner().invoke(app, [*extract_cli(cfg), "--splits", "val=holdout"])
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "cache" / "webdataset").iterdir()
    cache = FeatureCache(path)
    _assert_same_cache(cache, folder_cache)
    assert cache.manifest["class_names"] == ["0", "1", "2"]  # .cls holds indices only
    assert cache.manifest["dataset"]["options"] == {"splits": "val=holdout"}
    assert cache.manifest["dataset"]["root"].endswith("{train-{00000..00001},holdout-00000,"
                                                      "test-00000}.tar")


def test_datasets_check_scans_stored_images(tmp_path, folder_root, write_hf, write_webdataset):
    root = write_hf(tmp_path / "hf", folder_root, "parquet")
    pattern = write_webdataset(tmp_path / "shards", folder_root)
    for dataset, where in (("hf", root), ("webdataset", pattern)):
        result = CliRunner().invoke(app, ["datasets", "check", "--dataset", dataset, "--root",
                                          str(where), "--json"])
        report = json.loads(result.output)
        assert result.exit_code == 0 and report["ok"], result.output
        assert {s: v["images"] for s, v in report["splits"].items()} == {
            "train": 6, "val": 3, "test": 3}
    shard = tmp_path / "shards" / "test-00000.tar"
    data = shard.read_bytes()
    start = data.index(b"\xff\xd8", data.index(b"ramen_d.jpg"))  # the JPEG's first bytes
    shard.write_bytes(data[:start] + bytes(64) + data[start + 64:])
    result = CliRunner().invoke(app, ["datasets", "check", "--dataset", "webdataset", "--root",
                                      pattern, "--json"])
    report = json.loads(result.output)
    assert result.exit_code == 1 and report["splits"]["test"]["unreadable"] == 1
    assert report["failures"][0]["path"] == f"{shard}:ramen_d.jpg"


def test_stored_images_decode_like_their_files(tmp_path, folder_root, write_hf,
                                               write_webdataset):
    files = [r.image for r in load_dataset("folder", folder_root).splits["train"]]
    preprocess = Preprocess(32)
    for info in (load_dataset("hf", write_hf(tmp_path / "hf", folder_root, "saved")),
                 load_dataset("webdataset", write_webdataset(tmp_path / "w", folder_root))):
        stored = [r.image for r in info.splits["train"]]
        for ours, theirs in zip(ImageFiles(stored, preprocess), ImageFiles(files, preprocess)):
            assert torch.equal(ours[0], theirs[0]) and ours[2] == theirs[2] == ""
        for ours, theirs in zip(EncodedImageFiles(stored), EncodedImageFiles(files)):
            assert torch.equal(ours[0], theirs[0]) and ours[2] == theirs[2] == ""


def test_webdataset_cache_repaired_by_verify_then_extract(tmp_path, folder_root,
                                                          write_webdataset, make_extract_config):
    """A damaged cache shard dropped by `cache verify --repair` is rewritten from the same
    records: a cache shard's rows map to the same tar members in every run (train shard 1 holds
    rows 2-3, the last sample of train-00000.tar and the first of train-00001.tar)."""
    pattern = write_webdataset(tmp_path / "shards", folder_root, "json")
    cfg = make_extract_config(pattern, tmp_path / "cache", dataset="webdataset", batch_size=2,
                              shard_rows=2)
    path = extract(cfg, log=lambda _: None).path
    before = {f: FeatureCache(path).read_numpy("train", f) for f in FIELDS}
    shard = path / "features.zarr" / "train" / "visual" / "c" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[100:110] = bytes(10)
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(app, ["cache", "verify", str(path), "--repair"])
    assert result.exit_code == 1 and "dropped 1 damaged shards (train/1)" in result.output
    logs = []
    again = extract(cfg, log=logs.append)
    assert again.path == path and not again.reused and any("resuming" in x for x in logs)
    for field, values in before.items():
        assert np.array_equal(FeatureCache(path).read_numpy("train", field), values), field


def test_device_decoding_reads_stored_images(tmp_path, folder_root, write_webdataset,
                                             make_extract_config):
    """``--decode device`` (here libjpeg-turbo on the CPU; nvJPEG on CUDA) takes the bytes of
    tar members as it takes files: the webdataset cache equals the folder one."""
    pattern = write_webdataset(tmp_path / "shards", folder_root, "json")
    caches = [FeatureCache(extract(make_extract_config(root, tmp_path / "cache", dataset=name,
                                                       decode="device"),
                                   log=lambda _: None).path)
              for name, root in (("folder", folder_root), ("webdataset", pattern))]
    assert caches[0].manifest["settings"]["decode"] == "device"
    _assert_same_cache(caches[1], caches[0])
