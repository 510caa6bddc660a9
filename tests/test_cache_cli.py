"""`marnet cache ls|info|verify|export|rm` and stage two's refusal of caches it was not asked
for (incomplete, other inputs, failed --expect), on the session's tiny cache."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from marnet.cli import app
from marnet.pipeline.store import FeatureCache

runner = CliRunner()


def _run(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result.output


def _copy(cache, dest, **manifest_changes):
    shutil.copytree(cache, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest.update(manifest_changes)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_cache_ls_info_verify_export_and_rm(tiny_cache, tmp_path):
    root = tmp_path / "root"
    skipped = {"split": "train", "id": "/1/bad.jpg", "path": "x/bad.jpg", "reason": "truncated"}
    copy = _copy(tiny_cache, root / "synthfood" / tiny_cache.name, skipped=[skipped])
    listing = _run("cache", "ls", root)
    assert f"synthfood/{tiny_cache.name}  complete  zarr float16" in listing
    assert "train 32 · val 12 · test 16" in listing

    info = json.loads(_run("cache", "info", copy, "--json"))
    assert info["complete"] and info["committed_shards"] == info["total_shards"] == 4
    assert {s: m["rows"] for s, m in info["splits"].items()} == {"train": 32, "val": 12,
                                                                 "test": 16}
    assert info["dims"] == {"visual": 256, "text": 384} and info["dtype"] == "float16"
    assert info["inputs"]["text"]["pooling"] == "mean" and info["skipped"] == [skipped]
    assert set(info["timings"]["ms_per_row"]) == {"read", "model", "write"}
    human = _run("cache", "info", copy)
    assert "complete" in human and "visual.weights_digest" in human
    assert "skipped records: 1\n  train /1/bad.jpg: truncated" in human

    assert "ok" in _run("cache", "verify", copy)
    export = tmp_path / "export"
    _run("cache", "export", copy, "--npy", export)
    cache = FeatureCache(copy)
    for split in cache.splits:
        for field in ("visual", "text", "label", "ingredients", "valid"):
            assert np.array_equal(np.load(export / split / f"{field}.npy"),
                                  cache.read_numpy(split, field)), (split, field)
        assert (export / split / "id.txt").read_text().splitlines() == [
            str(i) for i in cache.read_numpy(split, "id")]
    assert json.loads((export / "index.json").read_text())["key"] == cache.key

    shard = copy / "features.zarr/val/text/c/0/0"
    raw = bytearray(shard.read_bytes())
    raw[7] ^= 0xFF
    shard.write_bytes(bytes(raw))
    out = _run("cache", "verify", copy, code=1)
    assert f"shard 0 of val/text ({shard}) does not match the checksum" in out
    assert f"marnet cache verify {copy} --repair" in out
    assert "does not match the checksum" in _run("cache", "export", copy, "--npy",
                                                 tmp_path / "e2", code=2)

    _run("cache", "rm", tmp_path, "--yes", code=2)  # not a cache: refused
    assert "removed" in _run("cache", "rm", copy, "--yes")
    assert not copy.exists() and "manifest.json is missing" in _run("cache", "info", copy, code=2)


def test_stage_two_refuses_incomplete_mismatched_and_unexpected_caches(tiny_cache, tmp_path):
    incomplete = _copy(tiny_cache, tmp_path / "incomplete", status="incomplete")
    (incomplete / "shards/test/00000.json").unlink()
    out = _run("train-heads", "--cache", incomplete, "--out", tmp_path / "r0", code=2)
    assert "incomplete (3 of 4 shards committed" in out and "again to resume" in out
    out = _run("cache", "verify", incomplete, code=1)
    assert "incomplete: 3 of 4 shards committed" in out
    info = json.loads(_run("cache", "info", incomplete, "--json"))
    assert not info["complete"] and info["splits"]["test"]["committed_shards"] == 0

    out = _run("train-heads", "--cache", tiny_cache, "--out", tmp_path / "r1", "--method",
               "visual", "--expect", "visual.model=vit_base_patch16_224", "--expect",
               "dtype=float16", code=2)
    assert "visual.model is \"test_efficientnet\", expected 'vit_base_patch16_224'" in out
    assert "dtype" not in out.split("match what was asked for")[1]  # only the mismatch named

    url = f"file://{tiny_cache}"  # stage two reads a zarr cache through fsspec too
    run = tmp_path / "run"
    _run("train-heads", "--cache", url, "--out", run, "--method", "visual", "--epochs", "1",
         "--device", "cpu", "--expect", f"key={tiny_cache.name}", "--expect", "dtype=float16")
    assert json.loads((run / "config.json").read_text())["cache"]["path"] == url
    _run("eval", "--run", run, "--device", "cpu")  # the recorded URL is the default cache
    assert "incomplete" in _run("eval", "--run", run, "--cache", incomplete, code=2)

    manifest = json.loads((tiny_cache / "manifest.json").read_text())
    inputs = {**manifest["inputs"], "text": {**manifest["inputs"]["text"], "pooling": "cls"}}
    other = _copy(tiny_cache, tmp_path / "other", key="0123456789abcdef", inputs=inputs)
    out = _run("eval", "--run", run, "--cache", other, "--device", "cpu", code=2)
    assert "is not the one the run was trained on" in out
    assert 'text.pooling: run "mean", cache "cls"' in out and "weights_digest" not in out


@pytest.mark.parametrize("damage", ["overwrite", "truncate-last"])
def test_verify_repair_drops_damaged_shards_and_extract_rewrites_only_those(
        tiny_cache, synth_root, make_extract_config, tmp_path, damage):
    """Damaged values in a full shard, or the split's last, partial shard cut short (its
    rewrite fills a partial chunk, which reads the old bytes unless repair deleted them)."""
    from marnet.pipeline.stage1.extract import extract

    copy = _copy(tiny_cache, tmp_path / "cache" / "synthfood" / tiny_cache.name)
    index = 1 if damage == "overwrite" else len(list((copy / "shards" / "train").glob("*.json"))) - 1
    shard = copy / "features.zarr" / "train" / "visual" / "c" / str(index) / "0"
    data = bytearray(shard.read_bytes())
    if damage == "overwrite":
        data[100:110] = bytes(10)  # damage a few stored values of train shard 1
    else:
        data = data[: len(data) // 2]
    shard.write_bytes(bytes(data))
    records = {str(p.relative_to(copy)): p.read_text() for p in (copy / "shards").rglob("*.json")}

    out = _run("cache", "verify", copy, code=1)
    assert f"shard {index} of train/visual" in out
    out = _run("cache", "verify", copy, "--repair", code=1)
    assert f"dropped 1 damaged shards (train/{index})" in out and "marnet extract" in out
    assert not FeatureCache(copy).complete
    assert "incomplete" in _run("cache", "verify", copy, code=1)

    log = []
    result = extract(make_extract_config(synth_root, tmp_path / "cache"), log=log.append)
    assert result.path == copy and not result.reused
    assert any("resuming" in line for line in log)
    assert "ok" in _run("cache", "verify", copy)
    after = {str(p.relative_to(copy)): p.read_text() for p in (copy / "shards").rglob("*.json")}
    rewritten = {name for name in records if after[name] != records[name]}
    assert rewritten == {f"shards/train/{index:05d}.json"}  # every other shard kept as it was
    original, repaired = FeatureCache(tiny_cache), FeatureCache(copy)
    for split in original.splits:
        assert np.array_equal(original.read_numpy(split, "visual"),
                              repaired.read_numpy(split, "visual"))
