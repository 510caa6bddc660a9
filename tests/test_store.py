"""The feature cache: round trips in both formats, verification, resume, lock, key, storage
errors, fsspec reads, export, removal, and manifest matching."""

import errno
import hashlib
import json
import os
import socket
import sys

import numpy as np
import pytest
import torch

from marnet.pipeline.store import (
    CacheError,
    CacheLock,
    CacheWriter,
    FeatureCache,
    FieldSpec,
    LockError,
    SplitLayout,
    backends,
    content_key,
    diff_inputs,
    export_npy,
    list_caches,
    remove_cache,
    stale_temp_files,
    to_storage,
)
from marnet.pipeline.store import cache as store_cache
from marnet.pipeline.store.backends import page_aligned_empty
from marnet.pipeline.store.match import expectation_problems

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


def test_whole_field_reads_land_page_aligned(tmp_path):
    """The kernel copies into a buffer 16 bytes past a 64-byte boundary (numpy's usual large
    allocation) about 3x slower; reads allocate on a page boundary instead."""
    _write(tmp_path / "z", "zarr")
    _write(tmp_path / "h", "hdf5")
    for root in (tmp_path / "z", tmp_path / "h"):
        for field in ("visual", "label"):
            values = FeatureCache(root).read_numpy("train", field)
            assert values.ctypes.data % 4096 == 0 and values.flags.c_contiguous
    empty = page_aligned_empty((0, 768), np.float16)
    assert empty.shape == (0, 768) and empty.dtype == np.float16


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
    assert any("does not match the checksum" in p for p in problems), problems
    with pytest.raises(CacheError, match=r"shard \d of train/visual \(.*\) does not match the "
                       r"checksum.*cache verify .* --repair"):
        cache.load_split("train")


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


def _dead_holder(tmp_path, name=".lock") -> dict:
    """Write a lock-like file at ``tmp_path/name`` whose holder (this host) is dead."""
    holder = {"pid": 2 ** 22 + 12345, "host": socket.gethostname(), "started": 0}
    (tmp_path / name).write_text(json.dumps(holder))
    return holder


def test_two_processes_that_find_one_stale_lock_never_both_take_it(tmp_path):
    _dead_holder(tmp_path)
    first, late = CacheLock(tmp_path), CacheLock(tmp_path)
    real_stale = CacheLock.stale

    def slow_stale(holder):
        """``late`` saw the dead holder; ``first`` takes the lock over before it acts."""
        if not first.held:
            first.acquire()
        return real_stale(late, holder)

    late.stale = slow_stale
    with pytest.raises(LockError, match="another extraction is writing"):
        late.acquire()
    assert first.held and not late.held
    assert json.loads((tmp_path / ".lock").read_text())["started"] > 0  # first's lock, kept
    first.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_takeover_interrupted_by_death_is_taken_over_too(tmp_path):
    _dead_holder(tmp_path)
    digest = hashlib.sha256((tmp_path / ".lock").read_text().encode()).hexdigest()[:16]
    _dead_holder(tmp_path, f".lock.takeover-{digest}")  # its claimant died mid-takeover
    lock = CacheLock(tmp_path).acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


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


def _layout():
    return SplitLayout(rows=11, shard_rows=4, fields=FIELDS)


@pytest.mark.parametrize("where, code", [("data", errno.ENOSPC), ("record", errno.EACCES)])
def test_storage_errors_keep_committed_shards_and_say_how_to_resume(tmp_path, monkeypatch,
                                                                     where, code):
    root = tmp_path / "c"
    _write(root, "hdf5", shards=[0])
    writer = CacheWriter.open(root, _manifest("hdf5"), {"train": _layout()})
    with monkeypatch.context() as patch:
        def fail(*args, **kwargs):
            raise OSError(code, os.strerror(code))

        if where == "data":  # the disk fills while the shard file is being written
            patch.setattr(backends.os, "fsync", fail)
        else:  # the shard's data is written, its commit record cannot be
            patch.setattr(store_cache, "write_json_atomic", fail)
        arrays, ids = _shard(_layout(), 1)
        with pytest.raises(CacheError) as error:
            writer.commit_shard("train", 1, arrays, ids)
    message = str(error.value)
    assert str(root) in message and os.strerror(code) in message
    assert "1 of 3 shards are committed" in message and "run the same command again" in message
    assert writer.pending("train") == [1, 2] and stale_temp_files(root) == []
    problems = FeatureCache(root).verify()
    assert len(problems) == 1 and problems[0].startswith("incomplete: 1 of 3")
    writer.commit_shard("train", 1, arrays, ids)  # the cause fixed: the same shard again
    writer.commit_shard("train", 2, *_shard(_layout(), 2))
    writer.finalise()
    writer.close()
    assert FeatureCache(root).verify() == []


def test_an_unwritable_cache_location_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CacheError, match=r"opening the cache .*file/c failed: .*Not a directory"):
        CacheWriter.open(tmp_path / "file" / "c", _manifest("zarr"), {"train": _layout()})


def test_verify_checks_the_committed_shards_of_an_incomplete_cache(tmp_path):
    _write(tmp_path, "zarr", shards=[0, 2])
    target = tmp_path / "features.zarr/train/visual/c/2/0"
    raw = bytearray(target.read_bytes())
    raw[5] ^= 0xFF
    target.write_bytes(bytes(raw))
    problems = FeatureCache(tmp_path).verify()
    assert problems[0].startswith("incomplete: 2 of 3 shards committed")
    assert problems[1:] == [f"shard 2 of train/visual ({target}) does not match the checksum "
                            "recorded when it was written"]


def test_hdf5_reads_refuse_missing_rows(tmp_path):
    _write(tmp_path, "hdf5", shards=[0, 2])
    backend = FeatureCache(tmp_path).backend
    assert backend.read("train", "label", 8, 11).tolist() == [2, 0, 1]
    with pytest.raises(FileNotFoundError, match="rows 4-11 of train/label are missing"):
        backend.read("train", "label")


def test_resume_refuses_another_shard_geometry(tmp_path):
    _write(tmp_path, "zarr", shards=[0])
    other = SplitLayout(rows=11, shard_rows=8, fields=FIELDS)
    with pytest.raises(CacheError, match="started with 4 rows per shard, not 8"):
        CacheWriter.open(tmp_path, _manifest("zarr"), {"train": other})


def test_lock_held_from_another_host_names_it_and_is_never_released_by_others(tmp_path):
    holder = {"pid": os.getpid(), "host": "node-7", "started": 0}
    (tmp_path / ".lock").write_text(json.dumps(holder))
    with pytest.raises(LockError, match=r"pid \d+ on node-7.*delete .*\.lock"):
        CacheLock(tmp_path).acquire()
    ours = CacheLock(tmp_path)
    ours.held = True  # as if taken, then taken over by someone else: the file is theirs
    ours.release()
    assert json.loads((tmp_path / ".lock").read_text())["host"] == "node-7"


def test_a_zarr_cache_reads_from_an_fsspec_url_and_writes_are_refused_there(tmp_path):
    import fsspec

    _write(tmp_path / "c", "zarr")
    fsspec.filesystem("memory").put(str(tmp_path / "c"), "/tests/store/c", recursive=True)
    url = "memory://tests/store/c"
    remote, local = FeatureCache(url), FeatureCache(tmp_path / "c")
    assert remote.verify() == [] and list_caches("memory://tests/store") == [
        "memory:///tests/store/c"]
    assert torch.equal(remote.load_split("train")["visual"], local.load_split("train")["visual"])
    with pytest.raises(ValueError, match="local or mounted POSIX filesystem"):
        CacheWriter.open(url, _manifest("zarr"), {"train": _layout()})
    _write(tmp_path / "h", "hdf5")
    fsspec.filesystem("memory").put(str(tmp_path / "h"), "/tests/store/h", recursive=True)
    with pytest.raises(ValueError, match="HDF5 caches are read from a local or mounted path"):
        FeatureCache("memory://tests/store/h")


def test_a_url_without_fsspec_installed_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"cannot open memory://bucket/c/manifest\.json: .*"
                                         r"Install the missing package \(fsspec"):
        FeatureCache("memory://bucket/c")


def test_export_npy_writes_plain_arrays_ids_and_an_index(tmp_path):
    _write(tmp_path / "c", "zarr", dtype="bfloat16")
    cache = FeatureCache(tmp_path / "c")
    index = export_npy(tmp_path / "c", tmp_path / "out")
    visual = np.load(tmp_path / "out/train/visual.npy")
    assert visual.dtype == np.float32  # bfloat16 has no numpy dtype: exported exactly as float32
    assert np.array_equal(visual, cache.load_split("train", ("visual",))["visual"].numpy())
    assert np.array_equal(np.load(tmp_path / "out/train/label.npy"),
                          cache.read_numpy("train", "label"))
    ids = (tmp_path / "out/train/id.txt").read_text().splitlines()
    assert ids == [f"/1/{i}.jpg" for i in range(11)]
    on_disk = json.loads((tmp_path / "out/index.json").read_text())
    assert on_disk == json.loads(json.dumps(index)) and on_disk["key"] == "k"
    assert on_disk["splits"]["train"]["files"]["visual"] == {
        "file": "train/visual.npy", "dtype": "float32", "shape": [11, 6]}


def test_remove_cache_refuses_folders_that_are_not_caches_and_live_writers(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(CacheError, match="manifest.json is missing"):
        remove_cache(tmp_path / "notes")
    _write(tmp_path / "c", "zarr")
    (tmp_path / "c/.lock").write_text(json.dumps(  # a live process on this host holds it
        {"pid": os.getppid(), "host": socket.gethostname(), "started": 0}))
    with pytest.raises(LockError, match="another extraction is writing"):
        remove_cache(tmp_path / "c")
    (tmp_path / "c/.lock").write_text(json.dumps(  # its process is gone: stale
        {"pid": 2 ** 22 + 12345, "host": socket.gethostname(), "started": 0}))
    remove_cache(tmp_path / "c")
    assert not (tmp_path / "c").exists() and (tmp_path / "notes").exists()


def test_input_differences_and_expectations_are_named_field_by_field():
    run = {"visual": {"model": "m", "weights_digest": "a"}, "dtype": "float16"}
    cache = {"visual": {"model": "m", "weights_digest": "b"}, "dtype": "float16", "extra": 1}
    assert diff_inputs(run, cache, ("run", "cache")) == [
        'extra: run (absent), cache 1', 'visual.weights_digest: run "a", cache "b"']
    manifest = {"key": "abc", "inputs": cache}
    assert expectation_problems(manifest, {"visual.model": "m", "dtype": "float16",
                                           "key": "abc", "extra": "1"}) == []
    problems = expectation_problems(manifest, {"visual.model": "n", "visual.modle": "m"})
    assert problems[0] == "visual.model is \"m\", expected 'n'"
    assert problems[1].startswith("visual.modle: not a key input (known: dtype, extra, key,")


def test_direct_zarr_read_equals_zarr_for_every_row_range(tmp_path):
    """The shard-file fast path returns exactly what zarr's own reader returns."""
    import zarr

    from marnet.pipeline.store.backends import ZarrBackend, _raw_shard_layout

    backend = ZarrBackend(tmp_path)
    fields = [FieldSpec("visual", (5,), "float16"), FieldSpec("label", (), "int32"),
              FieldSpec("id", (), "str")]
    backend.create("train", 23, 8, fields)  # 3 shards, the last one partial
    g = torch.Generator().manual_seed(0)
    for index, start in enumerate(range(0, 23, 8)):
        n = min(8, 23 - start)
        backend.write_shard("train", index, start, {
            "visual": to_storage(torch.randn(n, 5, generator=g), "float16"),
            "label": np.arange(start, start + n, dtype=np.int32),
            "id": np.array([f"r{i}" for i in range(start, start + n)])})
    group = zarr.open_group(str(tmp_path / "features.zarr"), mode="r")
    assert _raw_shard_layout(tmp_path / "features.zarr" / "train" / "visual") is not None
    assert _raw_shard_layout(tmp_path / "features.zarr" / "train" / "id") is None
    for start, stop in [(0, 23), (3, 9), (8, 16), (15, 23), (22, 23), (0, None)]:
        for field in ("visual", "label", "id"):
            fast = backend.read("train", field, start, stop)
            assert np.array_equal(fast, np.asarray(group["train"][field][start:stop]))
    assert backend._direct_read("train", "id", 0, None) is None
