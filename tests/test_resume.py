"""Crash safety: `marnet extract` SIGKILLed at several moments (text features, mid-shard,
between a shard's data and its record, after some shards), each time started again, gives a
cache identical value for value to an uninterrupted run: no lost or duplicated rows."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from marnet.pipeline.stage1.extract import extract
from marnet.pipeline.store import FeatureCache, cache_info, stale_temp_files

CRASH = Path(__file__).with_name("crash_extract.py")
MOMENTS = ("text-table", "after-3-records", "mid-shard", "before-record")


def _kill_sequence(cache_dir, args, env):
    """Run `marnet extract ARGS` once per moment, SIGKILLed there; what each kill left."""
    proc = subprocess.run([sys.executable, str(CRASH), str(cache_dir), ",".join(MOMENTS), *args],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    states = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [s["moment"] for s in states] == list(MOMENTS), proc.stdout + proc.stderr
    return {s["moment"]: s for s in states}


def _assert_same_values(cache, reference):
    assert cache.splits == reference.splits
    for split in reference.splits:
        fields = reference.manifest["splits"][split]["fields"]
        assert set(cache.manifest["splits"][split]["fields"]) == set(fields)
        for field in fields:
            a, b = cache.read_numpy(split, field), reference.read_numpy(split, field)
            assert a.shape == b.shape and np.array_equal(a, b), (split, field)


def test_sigkill_at_several_moments_then_resume_equals_uninterrupted_run(
        synth_root, tiny_cache, tmp_path, make_extract_config, extract_cli, subprocess_env):
    cache_dir = tmp_path / "cache"
    # 8-row shards (one batch each): 8 shards over train/val/test, so kills land mid-run
    states = _kill_sequence(cache_dir, extract_cli(make_extract_config(
        synth_root, cache_dir, shard_rows=8)), subprocess_env)
    assert all(s["sigkilled"] and s["lock"] and not s["complete"] for s in states.values())

    text = states["text-table"]  # died after encoding the texts, before renaming their file
    assert not text["text_table"] and text["records"] == [] and text["temp_files"]
    after = states["after-3-records"]  # resumed (stale lock taken over), killed from outside
    assert after["text_table"] and 3 <= len(after["records"]) < 8
    for moment in ("mid-shard", "before-record"):  # a shard written (partly), never recorded
        assert states[moment]["records"] == after["records"]
        assert len(states[moment]["visual_shards"]) == len(after["records"]) + 1

    (path,) = list((cache_dir / "synthfood").iterdir())
    assert path.name == tiny_cache.name  # the same settings: the same key as the reference
    assert cache_info(path)["locked_by"]["stale"]  # the dead writer's lock, recognised as such
    logs = []  # started again, even with another batch and shard size: the run's own are kept
    again = make_extract_config(synth_root, cache_dir, shard_rows=16, batch_size=4)
    result = extract(again, log=logs.append)
    assert result.path == path and not result.reused
    assert any("resuming" in line and "batch size 8, 8 rows per shard" in line for line in logs)
    cache, reference = FeatureCache(path), FeatureCache(tiny_cache)
    assert cache.complete and cache.verify() == []
    assert cache.manifest["splits"]["train"]["shard_rows"] == 8
    assert cache.manifest["settings"]["batch_size"] == 8
    assert [s["rows"] for s in cache.manifest["splits"]["train"]["shards"]] == [8, 8, 8, 8]
    _assert_same_values(cache, reference)
    assert not (path / ".lock").exists() and stale_temp_files(path) == []
