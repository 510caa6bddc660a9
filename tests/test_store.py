"""The feature cache: round trips in both formats, verification, resume, lock, key."""

import json

import numpy as np
import pytest
import torch

from marnet.pipeline.store import (
    CacheError,
    CacheLock,
    CacheWriter,
    FeatureCache,
    FieldSpec,
    SplitLayout,
    content_key,
    to_storage,
)

FIELDS = (FieldSpec("visual", (6,), "float16"), FieldSpec("text", (3,), "float16"),
          FieldSpec("label", (), "int32"), FieldSpec("id", (), "str"),
          FieldSpec("valid", (), "uint8"))


def _manifest(fmt, dtype="float16"):
    return {"key": "k", "inputs": {"x": 1}, "format": fmt, "dtype": dtype,
            "class_names": ["a", "b", "c"]}


def _shard(layout, index, seed=0, dtype="float16"):
    start, stop = layout.shard_range(index)
    n = stop - start
    g = torch.Generator().manual_seed(seed * 100 + index)
    ids = [f"/1/{i}.jpg" for i in range(start, stop)]
    return {"visual": to_storage(torch.randn(n, 6, generator=g), dtype),
            "text": to_storage(torch.randn(n, 3, generator=g), dtype),
            "label": np.arange(start, stop, dtype=np.int32) % 3, "id": np.array(ids),
            "valid": np.ones(n, dtype=np.uint8)}, ids


def _write(root, fmt, shards=None, dtype="float16"):
    fields = tuple(FieldSpec(f.name, f.row_shape, "uint16" if dtype == "bfloat16" and
                             f.name in ("visual", "text") else f.dtype) for f in FIELDS)
    layout = SplitLayout(rows=11, shard_rows=4, fields=fields)
    with CacheWriter.open(root, _manifest(fmt, dtype), {"train": layout}) as writer:
        for index in writer.pending("train") if shards is None else shards:
            arrays, ids = _shard(layout, index, dtype=dtype)
            writer.commit_shard("train", index, arrays, ids)
        if not writer.pending("train"):
            writer.finalise()
    return layout


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_round_trip(tmp_path, fmt):
    layout = _write(tmp_path / fmt, fmt)
    cache = FeatureCache(tmp_path / fmt)
    data = cache.load_split("train", ("visual", "text", "label", "id"))
    expected = np.concatenate([_shard(layout, i)[0]["visual"] for i in range(3)])
    assert data["visual"].dtype == torch.float32 and data["visual"].shape == (11, 6)
    assert torch.equal(data["visual"], torch.from_numpy(expected).float())
    assert data["label"].tolist() == [i % 3 for i in range(11)]
    assert data["id"][10] == "/1/10.jpg"
    assert cache.verify() == []


def test_zarr_and_hdf5_hold_identical_values(tmp_path):
    _write(tmp_path / "z", "zarr")
    _write(tmp_path / "h", "hdf5")
    a, b = FeatureCache(tmp_path / "z"), FeatureCache(tmp_path / "h")
    for field in ("visual", "text", "label", "id"):
        assert np.array_equal(a.read_numpy("train", field), b.read_numpy("train", field))


def test_bfloat16_round_trip(tmp_path):
    _write(tmp_path / "bf", "zarr", dtype="bfloat16")
    data = FeatureCache(tmp_path / "bf").load_split("train", ("visual",), dtype=torch.bfloat16)
    assert data["visual"].dtype == torch.bfloat16 and torch.isfinite(data["visual"].float()).all()


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_verify_detects_a_changed_shard(tmp_path, fmt):
    _write(tmp_path / fmt, fmt)
    cache = FeatureCache(tmp_path / fmt)
    target = next(p for p in (tmp_path / fmt).rglob("*") if p.is_file() and (
        (fmt == "zarr" and "visual/c" in str(p)) or (fmt == "hdf5" and p.name == "shard-00001.h5")))
    if fmt == "zarr":
        raw = bytearray(target.read_bytes())
        raw[5] ^= 0xFF  # a feature byte (the shard index at the end has its own crc)
        target.write_bytes(bytes(raw))
    else:
        import h5py
        with h5py.File(target, "r+") as f:
            f["visual"][0, 0] = 123.0
    problems = cache.verify()
    assert any("checksum mismatch" in p for p in problems), problems


def test_partial_write_is_incomplete_and_resumes(tmp_path):
    root = tmp_path / "c"
    _write(root, "zarr", shards=[0, 2])
    cache = FeatureCache(root)
    assert not cache.complete
    with pytest.raises(CacheError, match="incomplete"):
        cache.load_split("train")
    _write(root, "zarr")  # resume: only shard 1 is pending
    cache = FeatureCache(root)
    assert cache.complete and cache.verify() == []
    _write(tmp_path / "ref", "zarr")
    assert np.array_equal(cache.read_numpy("train", "visual"),
                          FeatureCache(tmp_path / "ref").read_numpy("train", "visual"))


def test_non_finite_features_are_refused_with_the_record_id(tmp_path):
    layout = SplitLayout(rows=4, shard_rows=4, fields=FIELDS)
    with CacheWriter.open(tmp_path, _manifest("zarr"), {"train": layout}) as writer:
        arrays, ids = _shard(layout, 0)
        arrays["visual"][2, 1] = np.nan
        with pytest.raises(CacheError, match=r"/1/2\.jpg"):
            writer.commit_shard("train", 0, arrays, ids)
        assert writer.pending("train") == [0]


def test_lock_refuses_a_second_writer_and_takes_over_a_stale_one(tmp_path):
    with CacheLock(tmp_path):
        with pytest.raises(CacheError, match="another extraction"):
            CacheLock(tmp_path).acquire()
    (tmp_path / ".lock").write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": __import__(
        "socket").gethostname(), "started": 0}))
    lock = CacheLock(tmp_path).acquire()  # the pid is dead: stale, taken over
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_other_inputs_never_share_a_directory(tmp_path):
    _write(tmp_path, "zarr")
    layout = SplitLayout(rows=11, shard_rows=4, fields=FIELDS)
    other = {**_manifest("zarr"), "inputs": {"x": 2}}
    with pytest.raises(CacheError, match="other inputs"):
        CacheWriter.open(tmp_path, other, {"train": layout})


def test_content_key_is_stable_and_sensitive():
    a = {"visual": {"model": "m", "digest": "1"}, "dtype": "float16"}
    assert content_key(a) == content_key(json.loads(json.dumps(a)))
    assert content_key(a) != content_key({**a, "dtype": "bfloat16"})
