"""``marnet bench``: throughput ratios measured side by side in one run, against targets.

Timing follows timm's benchmark.py: warm-up iterations, then repeated synchronised timed
iterations, and the median. Every figure is a ratio of two measurements taken in the same run
on the same machine, so the ratios travel between machines better than raw speeds do:

- ``extract_vs_model``: end-to-end extraction images/s (decode, preprocess, both backbones,
  cache write) over model-only images/s (both backbones' forward on pre-made tensors).
- ``heads_vs_naive``: MARNet head-training samples/s on the in-memory path over a DataLoader
  reading one row at a time from HDF5 with default collate (same model, same batch).
- ``ablation_vs_end_to_end``: the Table-2 ablation (5 rows x 3 seeds) from one cache, over the
  same runs done end to end (a backbone forward over the train and val images for every epoch
  of every stage; timed for one epoch and extrapolated; forward only, so a lower bound).
- ``heads_vs_gemm``: achieved FLOP/s of the head training step over the machine's matmul
  FLOP/s at the same shapes.
- ``cache_read_vs_npy``: loading a split from the cache over ``np.load`` of the same bytes.
- ``ddim_vs_ddpm``: CDR sampling speed-up of DDIM-k over the full DDPM chain, with the top-1
  difference between them.
- ``inference_fold_vs_plain``: the vision forward of extraction with batch norms folded into
  their convolutions over the same network unfolded (and the features' largest difference).
- ``finetune_marnet_vs_ce``: the rate of one end-to-end MARNet training step (backbone +
  EMA + CDR) over a plain CE step with the same backbone and batch.
- peak memory of extraction at two dataset sizes (must not grow with the dataset) and of
  head training.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..core.config import (
    ConfigError,
    require_choice,
    require_device,
    require_positive,
    require_range,
)
from ..datasets.device_decode import DECODE_MODES
from ..engine.backbones import TextSpec, VisionSpec, build_vision, resolve_device, resolve_precision
from ..engine.training import train_step
from ..models.heads import Dims, SplitData, Standardizer, TrainContext, build_head, method_config
from ..store import CacheWriter, FeatureCache, FieldSpec, SplitLayout, to_storage

# ratio -> target per device type (None: reported, no target)
TARGETS: dict[str, dict[str, float] | None] = {
    "extract_vs_model": {"cuda": 0.9, "cpu": 0.7},
    "heads_vs_naive": {"cuda": 20.0, "cpu": 1.0},
    "ablation_vs_end_to_end": None,
    "heads_vs_gemm": {"cuda": 0.5, "cpu": 0.5},
    "cache_read_vs_npy": {"cuda": 0.8, "cpu": 0.8},
    "ddim_vs_ddpm": {"cuda": 20.0, "cpu": 20.0},
    "finetune_marnet_vs_ce": {"cuda": 0.85, "cpu": 0.85},
    "inference_fold_vs_plain": None,
    "fingerprint_vs_decode": None,
}
DDIM_MAX_TOP1_DROP = 0.5
BENCH_TEXT = TextSpec("minilm", "mean", 64)  # the bundled text model, as the demo uses it


@dataclass
class BenchConfig:
    device: str = "auto"
    visual: str = "tf_efficientnet_lite0"
    image_size: int | None = None  # None: 96 on CPU, 224 on GPU
    batch_size: int = 64
    images: int | None = None  # extraction images; None: 512 on CPU, 4096 on GPU
    head_rows: int = 20_000
    head_batch: int = 256
    visual_dim: int = 1280
    text_dim: int = 384
    classes: int = 20
    read_rows: int = 100_000
    ablation_epochs: int = 5
    ddim_steps: int = 4
    sample_rows: int = 2000  # test rows for the DDIM vs DDPM comparison (2x as many train)
    head_overrides: dict[str, Any] = field(default_factory=dict)  # MARNet settings ({}: paper scale)
    warmup: int = 3
    iters: int = 10
    num_workers: int = 2
    decode: str = "workers"  # extraction's --decode: workers | device
    workdir: Path | None = None

    def __post_init__(self) -> None:
        """Refuse a bad option before anything is measured."""
        require_device("--device", self.device)
        for name in ("image_size", "batch_size", "images", "head_rows"):
            require_positive(f"--{name.replace('_', '-')}", getattr(self, name))
        require_range("--num-workers", self.num_workers, 0)
        require_choice("--decode", self.decode, DECODE_MODES)
        if self.head_rows < self.head_batch:
            raise ConfigError(f"--head-rows {self.head_rows} is less than one head batch "
                              f"({self.head_batch} rows); give at least {self.head_batch}")


def timed(fn: Callable[[], Any], warmup: int, iters: int, device: torch.device) -> float:
    """Median seconds of ``fn`` over ``iters`` synchronised runs after ``warmup`` runs."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _status(name: str, value: float, device: torch.device, extra_ok: bool = True) -> str:
    target = TARGETS.get(name)
    if target is None:
        return "report"
    return "pass" if value >= target[device.type] and extra_ok else "short"


# --------------------------------------------------------------------------- synthetic data


def clustered_features(rows: int, cfg: BenchConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Features with class structure: noisy class means in both modalities (for head benches)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, cfg.classes, (rows,), generator=g)
    v_means = torch.randn(cfg.classes, cfg.visual_dim, generator=g)
    s_means = torch.randn(cfg.classes, cfg.text_dim, generator=g)
    visual = v_means[labels] + 2.0 * torch.randn(rows, cfg.visual_dim, generator=g)
    text = s_means[labels] + 0.5 * torch.randn(rows, cfg.text_dim, generator=g)
    return {"visual": visual, "text": text, "label": labels}


def _split(data: dict[str, torch.Tensor], device: torch.device) -> SplitData:
    """Standardised features on ``device``, as the trainer hands them to a head."""
    def z(x: torch.Tensor) -> torch.Tensor:
        return Standardizer(x.shape[1]).fit(x)(x).to(device)
    return SplitData({"visual": z(data["visual"]), "text": z(data["text"]),
                      "label": data["label"].to(device)})


def _marnet_stage_a(cfg: BenchConfig, device: torch.device, train: SplitData):
    """MARNet's first training stage (EMA + CDR, the paper-scale 1024-wide denoiser)."""
    dims = Dims(cfg.visual_dim, cfg.text_dim, cfg.classes)
    head = build_head("marnet", method_config("marnet", cfg.head_overrides), dims).to(device)
    ctx = TrainContext(device, torch.Generator(device=device).manual_seed(0))
    stage = head.stages(train, train, ctx)[0]
    params = [p for m in stage.modules for p in m.parameters()]
    return head, stage, torch.optim.AdamW(params, lr=1e-3), ctx


# --------------------------------------------------------------------------- the benches


def bench_heads_vs_naive(cfg: BenchConfig, device: torch.device, precision: str,
                         workdir: Path) -> dict[str, Any]:
    """In-memory index batches vs a row-at-a-time HDF5 DataLoader, same model and step."""
    import h5py

    data = clustered_features(cfg.head_rows, cfg)
    train = _split(data, device)
    _, stage, optimizer, _ = _marnet_stage_a(cfg, device, train)
    g = torch.Generator(device=device).manual_seed(0)

    def ours() -> None:
        index = torch.randint(0, len(train), (cfg.head_batch,), device=device, generator=g)
        batch = {k: train[k][index] for k in ("visual", "text", "label")}
        train_step(stage, optimizer, batch, precision, device.type)

    ours_s = timed(ours, cfg.warmup, cfg.iters, device)
    path = workdir / "naive.h5"
    with h5py.File(path, "w") as f:
        for k, v in train.tensors.items():
            f.create_dataset(k, data=v.cpu().numpy())
    loader = torch.utils.data.DataLoader(_H5Rows(path), batch_size=cfg.head_batch, shuffle=True,
                                         num_workers=cfg.num_workers, drop_last=True,
                                         persistent_workers=cfg.num_workers > 0)
    batches = iter(loader)

    def naive() -> None:
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        train_step(stage, optimizer, batch, precision, device.type)

    naive_s = timed(naive, cfg.warmup, cfg.iters, device)
    return {"ratio": naive_s / ours_s, "ours_samples_per_s": cfg.head_batch / ours_s,
            "naive_samples_per_s": cfg.head_batch / naive_s, "batch": cfg.head_batch,
            "rows": cfg.head_rows}


class _H5Rows(torch.utils.data.Dataset):
    """The naive baseline: one HDF5 row read per sample."""

    def __init__(self, path: Path):
        self.path = path
        self.file = None
        import h5py
        with h5py.File(path, "r") as f:
            self.n = len(f["label"])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        import h5py
        if self.file is None:
            self.file = h5py.File(self.path, "r")
        return {k: torch.as_tensor(self.file[k][i]) for k in ("visual", "text", "label")}


def _linear_shapes(head) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in head.modules()
            if isinstance(m, torch.nn.Linear)]


def bench_heads_vs_gemm(cfg: BenchConfig, device: torch.device, precision: str) -> dict[str, Any]:
    """FLOP/s of a MARNet stage-a training step vs plain matmuls of the same shapes (forward,
    input gradient and weight gradient of every linear layer, back to back); the two are timed
    interleaved, so the machine's drift hits both alike."""
    train = _split(clustered_features(max(cfg.head_batch * 4, 2048), cfg), device)
    head, stage, optimizer, _ = _marnet_stage_a(cfg, device, train)
    index = torch.arange(cfg.head_batch, device=device)
    batch = {k: train[k][index] for k in ("visual", "text", "label")}
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    b = cfg.head_batch
    operands = [(torch.randn(b, fan_in, device=device, dtype=dtype),
                 torch.randn(fan_in, fan_out, device=device, dtype=dtype),
                 torch.randn(b, fan_out, device=device, dtype=dtype))
                for fan_in, fan_out in _linear_shapes(head.ema) + _linear_shapes(head.cdr)]
    flops = sum(3 * 2 * b * w.shape[0] * w.shape[1] for _, w, _ in operands)

    def gemms() -> None:
        for x, w, dy in operands:
            x @ w  # forward
            dy @ w.T  # input gradient
            x.T @ dy  # weight gradient

    seconds = timed_interleaved(
        {"step": lambda: train_step(stage, optimizer, batch, precision, device.type),
         "gemm": gemms}, cfg.warmup, cfg.iters, device)
    step_s, gemm_s = seconds["step"], seconds["gemm"]
    return {"ratio": gemm_s / step_s, "step_gflops": flops / step_s / 1e9,
            "gemm_gflops": flops / gemm_s / 1e9, "step_ms": 1e3 * step_s, "batch": b}


def bench_finetune_step(cfg: BenchConfig, device: torch.device, precision: str,
                        size: int) -> dict[str, Any]:
    """One end-to-end MARNet training step (backbone + EMA + CDR under L_EMA + L_CDR, the
    paper-scale 1024-wide denoiser) against a plain CE step (backbone + the visual head), same
    backbone, batch and trained blocks as the demo (the last 3, or all for models without
    ``.blocks``), timed interleaved; the ratio is MARNet's step rate over CE's. A third step,
    CE without the training speed paths (frozen norms folded, the depthwise weight gradient),
    gives what those paths are worth (``speed_paths_vs_plain``)."""
    from ..engine.training import HeadsModel
    from ..stage1.finetune import EndToEnd, prepare_backbone, trainable_prefix

    g = torch.Generator().manual_seed(0)
    b = cfg.batch_size
    images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, cfg.classes, (b,), generator=g).to(device)
    text = torch.randn(b, cfg.text_dim, generator=g).to(device)
    index = torch.arange(b, device=device)
    steps, blocks = {}, "all"
    for name, method, overrides in (("ce", "visual", {}), ("marnet", "marnet", cfg.head_overrides),
                                    ("ce_plain", "visual", {})):
        vision = build_vision(VisionSpec(cfg.visual, "random", image_size=size))
        blocks = "last-3" if len(getattr(vision.model, "blocks", ())) > 3 else "all"
        if name == "ce_plain":
            trainable_prefix(vision.model, blocks)
            vision.to_runtime(device)
        else:
            prepare_backbone(vision, blocks, device)
        vision.model.train()
        heads = HeadsModel(method, method_config(method, overrides),
                           Dims(vision.dim, cfg.text_dim, cfg.classes)).to(device)
        ctx = TrainContext(device, torch.Generator(device=device).manual_seed(0),
                           moving_features=True)
        split = SplitData({"label": labels, "text": text})
        stage = heads.head.stages(split, split, ctx)[0]
        params = [p for m in (vision.model, *stage.modules) for p in m.parameters()
                  if p.requires_grad]
        net = EndToEnd(vision, heads, precision, 0.1)
        steps[name] = partial(net.step, stage, torch.optim.AdamW(params, lr=1e-4), images,
                              index, split)
    seconds = timed_interleaved(steps, cfg.warmup, cfg.iters, device)
    return {"ratio": seconds["ce"] / seconds["marnet"], "ce_step_ms": 1e3 * seconds["ce"],
            "marnet_step_ms": 1e3 * seconds["marnet"],
            "ce_plain_step_ms": 1e3 * seconds["ce_plain"],
            "speed_paths_vs_plain": seconds["ce_plain"] / seconds["ce"], "batch": b,
            "image_size": size, "trained_blocks": blocks}


def timed_interleaved(fns: dict[str, Callable[[], Any]], warmup: int, iters: int,
                      device: torch.device) -> dict[str, float]:
    """Median seconds of each of ``fns``, timed in turn within every round (A, B, C, A, B,
    C...) so that drift in the machine's state (page cache, other load) hits all alike."""
    rounds = {name: [] for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(iters):
        for name, fn in fns.items():
            rounds[name].append(timed(fn, 0, 1, device))
    return {name: statistics.median(times) for name, times in rounds.items()}


def bench_cache_read(cfg: BenchConfig, device: torch.device, workdir: Path) -> dict[str, Any]:
    """Whole-split read from the zarr cache (and HDF5) vs ``np.load`` of the same bytes, each
    with the per-shard checksum check stage two runs; and zarr without it (the check's cost)."""
    g = torch.Generator().manual_seed(0)
    values = to_storage(torch.randn(cfg.read_rows, 768, generator=g), "float16")
    npy = workdir / "visual.npy"
    np.save(npy, values)
    readers: dict[str, Callable[[], Any]] = {"npy": partial(np.load, npy)}
    for fmt in ("zarr", "hdf5"):
        root = workdir / f"read-{fmt}"
        layout = SplitLayout(cfg.read_rows, 16_384, (FieldSpec("visual", (768,), "float16"),))
        writer = CacheWriter.open(root, {"key": "bench", "inputs": {}, "format": fmt,
                                         "dtype": "float16"}, {"train": layout})
        for i in writer.pending("train"):
            start, stop = layout.shard_range(i)
            writer.commit_shard("train", i, {"visual": values[start:stop]},
                                [str(r) for r in range(start, stop)])
        writer.close()
        readers[fmt] = partial(FeatureCache(root).read_numpy, "train", "visual")
        if fmt == "zarr":
            readers["zarr_unchecked"] = partial(FeatureCache(root).read_numpy, "train",
                                                "visual", check=False)
    seconds = timed_interleaved(readers, 1, 7, device)
    mb = values.nbytes / 2 ** 20
    out: dict[str, Any] = {"rows": cfg.read_rows, "mb": round(mb, 1)}
    for name, sec in seconds.items():
        out[f"{name}_mb_per_s"] = round(mb / sec, 1)
        if name != "npy":
            out[f"{name}_vs_npy"] = seconds["npy"] / sec
    # the ratio is the storage path; the checksum check stage two adds is reported beside it
    out["ratio"] = out["zarr_unchecked_vs_npy"]
    out["check_cost"] = seconds["zarr"] / seconds["zarr_unchecked"] - 1  # x the raw read time
    out["check_ms_per_100mb"] = 1e3 * (seconds["zarr"] - seconds["zarr_unchecked"]) * 100 / mb
    return out


def _head_epoch(train: SplitData, stage: Any, optimizer: torch.optim.Optimizer,
                generator: torch.Generator, batch_size: int, precision: str,
                device: torch.device) -> None:
    """One epoch of in-memory index batches through ``stage`` (the scaling bench's unit)."""
    perm = torch.randperm(len(train), device=device, generator=generator)
    for index in perm.split(batch_size):
        batch = {k: train[k][index] for k in ("visual", "text", "label")}
        train_step(stage, optimizer, batch, precision, device.type)


def bench_fingerprint(workdir: Path) -> dict[str, Any]:
    """The image fingerprints the cache key hashes vs decoding the same images once (what
    extraction does anyway): the key's cost as a fraction of the decode."""
    from ..datasets.base import image_fingerprints
    from ..datasets.images import load_rgb

    paths = sorted((workdir / "synthfood").rglob("*.jpg"))
    fingerprint_s = timed(partial(image_fingerprints, paths), 1, 3, torch.device("cpu"))
    decode_s = timed(lambda: [load_rgb(p) for p in paths], 0, 1, torch.device("cpu"))
    return {"images": len(paths), "fingerprint_ms_per_img": 1e3 * fingerprint_s / len(paths),
            "decode_ms_per_img": 1e3 * decode_s / len(paths), "ratio": decode_s / fingerprint_s}


def bench_ddim_vs_ddpm(cfg: BenchConfig, device: torch.device, precision: str) -> dict[str, Any]:
    """Train a CDR head briefly, then compare DDPM (T steps) and DDIM-k sampling (timed
    interleaved)."""
    n_train = 2 * cfg.sample_rows
    rows = _split(clustered_features(3 * cfg.sample_rows, cfg, seed=1), device)
    train = SplitData({k: v[:n_train] for k, v in rows.tensors.items()})
    test = SplitData({k: v[n_train:] for k, v in rows.tensors.items()})
    dims = Dims(cfg.visual_dim, cfg.text_dim, cfg.classes)
    head = build_head("marnet", method_config("marnet", {**cfg.head_overrides, "variant": "cdr"}),
                      dims).to(device)
    ctx = TrainContext(device, torch.Generator(device=device).manual_seed(0))
    stage = head.stages(train, test, ctx)[0]
    optimizer = torch.optim.AdamW([p for m in stage.modules for p in m.parameters()], lr=1e-3)
    for _ in range(3):
        for index in torch.randperm(len(train), device=device).split(cfg.head_batch):
            batch = {k: train[k][index] for k in ("visual", "text", "label")}
            train_step(stage, optimizer, batch, precision, device.type)
    head.eval()
    schedule = head.schedule_on(device)

    def run(method: str, steps: int) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            x = head.cdr.generate(test["visual"], schedule, gen, 8192, method, steps)
            return head.cdr.classifier(x)

    chains = {"ddpm": ("ddpm", schedule.T), "ddim": ("ddim", cfg.ddim_steps)}
    seconds = timed_interleaved({name: partial(run, *chain) for name, chain in chains.items()},
                                1, 3, device)
    results = {}
    for name, (method, steps) in chains.items():
        top1 = 100 * (run(method, steps).argmax(1) == test["label"]).float().mean().item()
        results[name] = {"seconds": seconds[name], "steps": steps, "top1": round(top1, 2)}
    drop = results["ddpm"]["top1"] - results["ddim"]["top1"]

    def unconditioned() -> None:  # the same DDPM chain with the condition re-projected per step
        gen = torch.Generator(device=device).manual_seed(0)
        cond = test["visual"]
        with torch.no_grad():
            schedule.sample(lambda x, t: head.cdr.denoiser(x, t, cond),
                            (len(cond), cfg.text_dim), device, "ddpm", schedule.T, 0.0, gen)

    split_first_layer = timed_interleaved({"conditioned": partial(run, "ddpm", schedule.T),
                                           "per_step": unconditioned}, 1, 3, device)
    return {"ratio": results["ddpm"]["seconds"] / results["ddim"]["seconds"],
            "top1_drop": round(drop, 2), **results,
            "conditioned_vs_per_step": split_first_layer["per_step"]
            / split_first_layer["conditioned"]}


def bench_inference_fold(cfg: BenchConfig, device: torch.device, precision: str,
                         size: int) -> dict[str, Any]:
    """The vision forward of extraction and evaluation with its batch norms folded into the
    convolutions (:meth:`VisionBackbone.for_inference`) against the same network unfolded,
    timed interleaved; also the largest difference between their features."""
    batch = torch.randint(0, 256, (cfg.batch_size, 3, size, size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    plain = build_vision(VisionSpec(cfg.visual, "random", image_size=size)).to_runtime(device)
    plain.model.eval()
    folded = build_vision(VisionSpec(cfg.visual, "random", image_size=size)).to_runtime(device)
    folded.for_inference()

    def forward(vision) -> torch.Tensor:
        with torch.inference_mode():
            return vision.features(batch, precision)

    seconds = timed_interleaved({"plain": partial(forward, plain),
                                 "folded": partial(forward, folded)}, cfg.warmup, cfg.iters,
                                device)
    diff = (forward(plain) - forward(folded)).abs().max().item()
    return {"ratio": seconds["plain"] / seconds["folded"],
            "plain_ms_per_image": 1e3 * seconds["plain"] / cfg.batch_size,
            "folded_ms_per_image": 1e3 * seconds["folded"] / cfg.batch_size,
            "max_abs_difference": diff, "batch": cfg.batch_size, "image_size": size}


def _synthfood_subset(cfg: BenchConfig, root: Path, images: int) -> None:
    from ..datasets.synthfood import SynthFoodConfig, ensure_synthfood

    classes = 8
    per_class = max(2, images // classes)
    ensure_synthfood(root, SynthFoodConfig(num_classes=classes, train_per_class=per_class,
                                           val_per_class=max(1, per_class // 8),
                                           test_per_class=max(1, per_class // 8),
                                           image_size=96))


def _extract_cfg(cfg: BenchConfig, root: Path, cache_dir: Path, size: int):
    from ..stage1.extract import ExtractConfig

    return ExtractConfig(dataset="synthfood", root=root, cache_dir=cache_dir,
                         vision=VisionSpec(cfg.visual, "random", image_size=size, crop_pct=1.0),
                         text=BENCH_TEXT, batch_size=cfg.batch_size,
                         shard_rows=cfg.batch_size * 8, num_workers=cfg.num_workers,
                         device=cfg.device, weights_dir=cache_dir / "weights", decode=cfg.decode)


def _text_model_seconds(cfg: BenchConfig, device: torch.device, root: Path) -> float:
    """Forward time of the text backbone alone over the subset's unique texts, tokenized
    beforehand, in extraction's batches (the text half of the model-only time)."""
    from ..datasets import load_dataset
    from ..engine.backbones import build_text
    from ..stage1.extract import TEXT_BATCH

    info = load_dataset("synthfood", root)
    texts = sorted({rec.text for recs in info.splits.values() for rec in recs})
    text = build_text(BENCH_TEXT)
    text.model.to(device)
    batches = [text.tokenize(texts[i:i + TEXT_BATCH]).to(device)
               for i in range(0, len(texts), TEXT_BATCH)]

    def forward() -> None:
        with torch.inference_mode():
            for enc in batches:
                text.model(**enc)

    return timed(forward, 1, 3, device)


def bench_extract_vs_model(cfg: BenchConfig, device: torch.device, precision: str,
                           workdir: Path, size: int, images: int) -> tuple[dict[str, Any], Path]:
    """Extraction images/s (from the manifest's last-run wall times) over model-only images/s.

    Both sides run both backbones: end to end, the image loops (decode, vision forward, write)
    plus the text features (tokenize, text forward, table write); model only, the vision
    forward on pre-made uint8 batches plus the text forward on pre-tokenized texts. The ratio
    is therefore the share of extraction time the model itself takes: what decode, tokenize,
    writes and orchestration cost on top shows as the gap to 1.
    """
    from ..stage1.extract import extract

    root = workdir / "synthfood"
    _synthfood_subset(cfg, root, images)
    result = extract(_extract_cfg(cfg, root, workdir / "cache", size), log=lambda _: None)
    run = result.manifest["last_run"]
    e2e = run["images"] / (run["images_s"] + run["text_s"])
    vision = build_vision(VisionSpec(cfg.visual, "random", image_size=size)).to_runtime(device)
    vision.for_inference()  # as extraction runs it
    batch = torch.randint(0, 256, (cfg.batch_size, 3, size, size), dtype=torch.uint8)
    if device.type == "cuda":
        batch = batch.pin_memory()

    def forward() -> None:
        with torch.inference_mode():
            vision.features(batch, precision)

    vision_per_s = cfg.batch_size / timed(forward, cfg.warmup, cfg.iters, device)
    text_model_s = _text_model_seconds(cfg, device, root)
    model = run["images"] / (run["images"] / vision_per_s + text_model_s)
    timings = result.manifest["timings"]
    return ({"ratio": e2e / model, "extract_images_per_s": e2e, "model_images_per_s": model,
             "vision_model_images_per_s": vision_per_s, "text_model_s": text_model_s,
             "vision_only_ratio": e2e / vision_per_s,
             "images": run["images"], "image_size": size, "batch": cfg.batch_size,
             "text_s": run["text_s"], "images_s": run["images_s"],
             "read_s": timings.get("read_s"), "model_s": timings.get("model_s"),
             "write_s": timings.get("write_s")},
            result.path)


def bench_ablation(cfg: BenchConfig, device: torch.device, precision: str, cache: Path,
                   workdir: Path, size: int) -> dict[str, Any]:
    """Table-2 rows x 3 seeds on the cache vs the same epochs with a backbone pass each."""
    from ..core.defaults import DEMO_HEAD_OVERRIDES
    from ..datasets import load_dataset
    from ..engine.encode import encode_images
    from ..engine.training import TrainConfig
    from .ablate import TABLE2_ROWS, run_matrix

    out = workdir / "ablation"
    t0 = time.perf_counter()
    rows = run_matrix(cache, TABLE2_ROWS, (0, 1, 2), out,
                      TrainConfig(epochs=cfg.ablation_epochs, device=cfg.device),
                      DEMO_HEAD_OVERRIDES, log=lambda _: None).rows
    ours_s = time.perf_counter() - t0
    epochs = sum(len((Path(r["run"]) / "metrics.jsonl").read_text().splitlines()) for r in rows)
    info = load_dataset("synthfood", workdir / "synthfood")
    vision = build_vision(VisionSpec(cfg.visual, "random", image_size=size)).to_runtime(device)
    vision.for_inference()
    paths = [r.image for s in ("train", "val") for r in info.splits[s]]
    t0 = time.perf_counter()
    encode_images(vision, paths, cfg.batch_size, precision, "float32", cfg.num_workers,
                  decode=cfg.decode)
    backbone_epoch_s = time.perf_counter() - t0
    e2e_s = ours_s + epochs * backbone_epoch_s
    return {"ratio": e2e_s / ours_s, "cache_s": round(ours_s, 2),
            "end_to_end_estimate_s": round(e2e_s, 2), "stage_epochs": epochs,
            "backbone_epoch_s": round(backbone_epoch_s, 3), "runs": len(rows),
            "train_val_images": len(paths)}


_PEAK_PROBE = """
def _peak_mb():
    try:  # VmHWM is this process's own peak; ru_maxrss carries the parent's across fork/exec
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("PEAK", _peak_mb())
"""


def _peak_rss_mb_of(code: str) -> float:
    """Peak RSS (MiB) of a fresh Python process running ``code`` (main process only)."""
    out = subprocess.run([sys.executable, "-c", code + "\n" + _PEAK_PROBE], capture_output=True,
                         text=True, env={**os.environ, "MARNET_PROGRESS": "0"}, check=True)
    line = next(l for l in out.stdout.splitlines() if l.startswith("PEAK"))
    return float(line.split()[1])


def bench_memory(cfg: BenchConfig, workdir: Path, size: int, images: int,
                 cache: Path) -> dict[str, Any]:
    """Peak RSS of extraction at two dataset sizes, and of head training on a cache."""
    out = {}
    for n in (images // 2, images):
        root = workdir / f"mem-{n}"
        _synthfood_subset(cfg, root, n)
        ext = _extract_cfg(cfg, root, workdir / f"mem-cache-{n}", size)
        code = ("from pathlib import Path\nfrom marnet.pipeline.stage1.extract import extract, ExtractConfig\n"
                "from marnet.pipeline.engine.backbones import VisionSpec, TextSpec\n"
                f"cfg = ExtractConfig(**{_cfg_literal(ext)})\n"
                "extract(cfg, log=lambda _: None)")
        out[f"extract_{n}_images_peak_mb"] = round(_peak_rss_mb_of(code), 1)
    code = ("from marnet.pipeline.stage2.train import train_heads, TrainConfig\n"
            f"train_heads({str(cache)!r}, 'marnet', {str(workdir / 'mem-run')!r}, "
            "{'diffusion.hidden': 512, 'fusion_samples': 2}, TrainConfig(epochs=2, device="
            f"{cfg.device!r}), log=lambda _: None)")
    out["train_heads_peak_mb"] = round(_peak_rss_mb_of(code), 1)
    return out


def _cfg_literal(ext) -> str:
    """A Python literal rebuilding an ExtractConfig in a subprocess."""
    d = asdict(ext)
    vision, text = d.pop("vision"), d.pop("text")
    d = {k: (f"Path({str(v)!r})" if isinstance(v, Path) else repr(v)) for k, v in d.items()}
    d["vision"] = f"VisionSpec(**{vision!r})"
    d["text"] = f"TextSpec(**{text!r})"
    return "{" + ", ".join(f"{k!r}: {v}" for k, v in d.items()) + "}"


def bench_scaling(cfg: BenchConfig, device: torch.device, precision: str, workdir: Path,
                  size: int, head_rows: tuple[int, ...] = (1_000, 10_000, 100_000),
                  images: tuple[int, ...] = (128, 256, 512)) -> dict[str, Any]:
    """Throughput at several dataset sizes: constant samples/s means cost linear in size.

    Heads: one epoch of MARNet's first stage (EMA + CDR) over synthetic features of each size,
    in-memory index batches. Extraction: end-to-end images/s of fresh caches of each size.
    """
    from ..stage1.extract import extract

    heads = []
    for rows in head_rows:
        train = _split(clustered_features(rows, cfg), device)
        _, stage, optimizer, _ = _marnet_stage_a(cfg, device, train)
        g = torch.Generator(device=device).manual_seed(0)
        seconds = timed(partial(_head_epoch, train, stage, optimizer, g, cfg.head_batch,
                                precision, device), 1, 2, device)
        heads.append({"rows": rows, "epoch_s": round(seconds, 6),
                      "samples_per_s": round(rows / seconds, 1)})
    extraction = []
    for n in images:
        root = workdir / f"scale-{n}"
        _synthfood_subset(cfg, root, n)
        result = extract(_extract_cfg(cfg, root, workdir / f"scale-cache-{n}", size),
                         log=lambda _: None)
        run = result.manifest["last_run"]
        seconds = run["images_s"] + run["text_s"]
        extraction.append({"images": run["images"], "seconds": round(seconds, 3),
                           "images_per_s": round(run["images"] / seconds, 1)})
    return {"heads": heads, "extraction": extraction}


def run_bench(cfg: BenchConfig = BenchConfig(), log: Callable[[str], None] = print,
              scaling: bool = False) -> dict[str, Any]:
    """Run every bench; return ``{"device", "config", "results": {name: {...}}}``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = resolve_device(cfg.device)
    cfg = replace(cfg, device=device.type)
    precision = resolve_precision("auto", device)
    size = cfg.image_size or (224 if device.type == "cuda" else 96)
    images = cfg.images or (4096 if device.type == "cuda" else 512)
    tmp = tempfile.TemporaryDirectory(prefix="marnet-bench-") if cfg.workdir is None else None
    workdir = Path(tmp.name if tmp else cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    try:
        log("extraction vs model forward")
        results["extract_vs_model"], cache = bench_extract_vs_model(
            cfg, device, precision, workdir, size, images)
        log("image fingerprints (cache key) vs decoding")
        results["fingerprint_vs_decode"] = bench_fingerprint(workdir)
        log("head training: in-memory vs HDF5 DataLoader")
        results["heads_vs_naive"] = bench_heads_vs_naive(cfg, device, precision, workdir)
        log("Table-2 ablation from the cache vs end to end")
        results["ablation_vs_end_to_end"] = bench_ablation(cfg, device, precision, cache,
                                                           workdir, size)
        log("head step vs matmul FLOP/s")
        results["heads_vs_gemm"] = bench_heads_vs_gemm(cfg, device, precision)
        log("cache read vs np.load")
        results["cache_read_vs_npy"] = bench_cache_read(cfg, device, workdir)
        log("DDIM vs DDPM sampling")
        results["ddim_vs_ddpm"] = bench_ddim_vs_ddpm(cfg, device, precision)
        log("inference forward: batch norms folded vs not")
        results["inference_fold_vs_plain"] = bench_inference_fold(cfg, device, precision, size)
        log("end-to-end training step: MARNet vs CE")
        results["finetune_marnet_vs_ce"] = bench_finetune_step(cfg, device, precision, size)
        log("peak memory")
        results["memory"] = bench_memory(cfg, workdir, size, images, cache)
        if scaling:
            log("scaling with dataset size")
            results["scaling"] = bench_scaling(cfg, device, precision, workdir, size)
    finally:
        if tmp:
            tmp.cleanup()
    for name, res in results.items():
        if "ratio" in res:
            ok = name != "ddim_vs_ddpm" or res["top1_drop"] <= DDIM_MAX_TOP1_DROP
            res["status"] = _status(name, res["ratio"], device, ok)
            target = TARGETS.get(name)
            res["target"] = target[device.type] if target else None
    return {"device": _device_name(device), "precision": precision,
            "config": {**asdict(cfg), "workdir": None, "image_size": size, "images": images},
            "torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")
