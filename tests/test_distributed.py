"""Distributed extraction on CPU: torchrun with 2 processes (gloo), and Slurm-style ranks that
share only RANK/WORLD_SIZE and the cache folder. Each must equal a single-process run."""

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from marnet.pipeline.stage1.extract import extract
from marnet.pipeline.store import CacheError, FeatureCache
from marnet.pipeline.store.cache import read_records


def _check_two_rank_cache(cache_dir, reference_path, coordination):
    (path,) = list((cache_dir / "synthfood").iterdir())
    cache, reference = FeatureCache(path), FeatureCache(reference_path)
    assert cache.key == reference.key and cache.complete and cache.verify() == []
    assert cache.manifest["settings"]["world_size"] == 2
    assert cache.manifest["settings"]["coordination"] == coordination
    assert cache.manifest["finalised_by"]["rank"] == 0
    writers = set()
    for split in cache.splits:
        for record in read_records(path, split):
            assert record["writer"]["rank"] == record["index"] % 2, record  # its owner wrote it
            writers.add((record["writer"]["rank"], record["writer"]["pid"]))
        for field in reference.manifest["splits"][split]["fields"]:
            assert np.array_equal(cache.read_numpy(split, field),
                                  reference.read_numpy(split, field)), (split, field)
    assert {rank for rank, _ in writers} == {0, 1} and len(writers) == 2
    assert not (path / ".lock").exists()


def test_torchrun_two_processes_equal_a_single_process_run(
        synth_root, tiny_cache, tmp_path, make_extract_config, extract_cli, subprocess_env):
    cfg = make_extract_config(synth_root, tmp_path / "cache", shard_rows=8)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "marnet.cli", *extract_cli(cfg), "--rank-timeout", "240"],
        env=subprocess_env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cache complete" in proc.stdout
    _check_two_rank_cache(tmp_path / "cache", tiny_cache, "gloo")


def test_slurm_style_ranks_coordinate_through_the_cache_folder(
        synth_root, tiny_cache, tmp_path, make_extract_config, extract_cli, subprocess_env):
    cfg = make_extract_config(synth_root, tmp_path / "cache", shard_rows=8)
    command = [sys.executable, "-m", "marnet.cli", *extract_cli(cfg), "--rank-timeout", "240"]
    procs = [subprocess.Popen(command, env={**subprocess_env, "RANK": str(rank),
                                            "WORLD_SIZE": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (1, 0)]  # rank 1 first: it must wait for rank 0's manifest and text
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    assert "rank 0 finalises" in outputs[0] and "cache complete" in outputs[1]
    _check_two_rank_cache(tmp_path / "cache", tiny_cache, "filesystem")


def test_a_rank_left_alone_times_out_and_one_process_finishes_the_cache(
        synth_root, tiny_cache, tmp_path, make_extract_config, monkeypatch):
    cfg = replace(make_extract_config(synth_root, tmp_path, shard_rows=8), rank_timeout_s=1)
    with monkeypatch.context() as env:  # rank 0 of 2 (Slurm-style); rank 1 never comes
        env.setenv("RANK", "0")
        env.setenv("WORLD_SIZE", "2")
        env.delenv("MASTER_ADDR", raising=False)
        with pytest.raises(CacheError, match=r"waited 1 s for shards .*without RANK/WORLD_SIZE"):
            extract(cfg, log=lambda _: None)
    path = tmp_path / "synthfood" / tiny_cache.name
    assert sorted(r["index"] for r in read_records(path, "train")) == [0, 2]
    result = extract(cfg, log=lambda _: None)  # one process writes rank 1's shards, finalises
    cache = FeatureCache(result.path)
    assert result.path == path and cache.complete and cache.verify() == []
    assert {r["writer"]["rank"] for r in read_records(path, "train")} == {0}
    for split in cache.splits:
        for field in ("visual", "text", "label", "id"):
            assert np.array_equal(cache.read_numpy(split, field),
                                  FeatureCache(tiny_cache).read_numpy(split, field))
