"""Run `marnet extract` again and again and SIGKILL it at chosen moments (used by test_resume).

``python crash_extract.py CACHE_DIR MOMENT[,MOMENT...] EXTRACT_ARGS...`` imports marnet and its heavy
dependencies once, then for each moment forks a child process that runs the real
``marnet extract`` command line and dies by SIGKILL at that moment: no cleanup runs, so the
lock, temp files and partly written shards stay behind exactly as after ``kill -9``. After each
kill it prints one JSON line describing what the child left on disk. Forking from one warm
process keeps the test fast on small CPU machines (one import of torch, timm and transformers
instead of one per kill).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import timm  # noqa: F401 - the slow imports, once, before forking
import transformers  # noqa: F401
import zarr  # noqa: F401
from transformers.models.bert import modeling_bert  # noqa: F401 - the MiniLM text model's code

import marnet.pipeline.stage1.extract  # noqa: F401
from marnet.cli import app
from marnet.pipeline.store import cache as store_cache
from marnet.pipeline.store.backends import ZarrBackend


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def in_text_table() -> None:
    """The unique-text features are encoded and saved to a temp file, not yet renamed."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith("text_table.npy"):
            die()
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace


def mid_shard() -> None:
    """The next shard is half written (its first two fields), with no commit record."""
    real_write = ZarrBackend.write_shard

    def write_shard(self, split, index, start, arrays):
        real_write(self, split, index, start, dict(list(arrays.items())[:2]))
        die()

    ZarrBackend.write_shard = write_shard


def before_record() -> None:
    """The next shard's data is fully written; its commit record is about to be."""
    real_write = store_cache.write_json_atomic

    def write_json_atomic(path, data):
        if "shards" in Path(path).parts:
            die()
        real_write(path, data)

    store_cache.write_json_atomic = write_json_atomic


def nothing() -> None:
    """No arranged death: the parent kills the child from outside."""


MOMENTS: dict[str, tuple[Callable[[], None], int | None]] = {
    # name: (what the child arranges, kill from outside once this many records exist)
    "text-table": (in_text_table, None),
    "mid-shard": (mid_shard, None),
    "before-record": (before_record, None),
    "after-3-records": (nothing, 3),
}


def records(cache_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(cache_dir)) for p in cache_dir.glob("*/*/shards/*/*.json"))


def run_child(arrange: Callable[[], None], args: list[str]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            arrange()
            app(args, prog_name="marnet")
        finally:
            os._exit(3)  # never return into the parent's loop
    return pid


def kill_at(cache_dir: Path, moment: str, args: list[str]) -> dict:
    arrange, after_records = MOMENTS[moment]
    pid = run_child(arrange, args)
    status = None
    deadline = time.time() + 300
    while after_records is not None and status is None and time.time() < deadline:
        if len(records(cache_dir)) >= after_records:
            os.kill(pid, signal.SIGKILL)
            break
        done, code = os.waitpid(pid, os.WNOHANG)
        status = code if done else None
        time.sleep(0.005)
    if status is None:
        status = os.waitpid(pid, 0)[1]
    (path,) = list(cache_dir.glob("*/*/manifest.json")) or [None]
    return {"moment": moment,
            "sigkilled": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
            "records": records(cache_dir),
            "visual_shards": sorted(str(p.relative_to(cache_dir)) for p in
                                    cache_dir.glob("*/*/features.zarr/*/visual/c/*")),
            "lock": bool(list(cache_dir.glob("*/*/.lock"))),
            "text_table": bool(list(cache_dir.glob("*/*/text_table.json"))),
            "temp_files": [str(p) for p in store_cache.stale_temp_files(cache_dir)],
            "complete": bool(path) and json.loads(path.read_text())["status"] == "complete"}


def main() -> None:
    cache_dir, moments, args = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]
    for moment in moments:
        print(json.dumps(kill_at(cache_dir, moment, args)), flush=True)


if __name__ == "__main__":
    main()
