"""Run a matrix of methods/switches x seeds on one cache and tabulate it (Tables 1-2 layout).

Each (row, seed) trains into ``<out>/runs/<row>/seed<k>/``; a run whose ``results.json``
exists and whose ``config.json`` holds the same settings is skipped, so an interrupted
ablation resumes where it stopped (a run made with other settings is trained again).

Rows are written as a comma list (``marnet ablate --methods``): method names (``visual``,
``ita``, ``sdm``, ``swd``, ``ssan``, ``cdd``, ``team``, ``marnet``, ...), MARNet's Table 2 rows
(``marnet:ema|mlp|cdr|fusion``) or fusion modes (``marnet:concat|add|mul|sum|hm``), and
``table2`` for the five Table 2 rows.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from ..core.config import ConfigError, parse_overrides
from ..engine.backbones import VisionSpec
from ..engine.training import TrainConfig
from ..models.heads import ABLATIONS, METHODS, method_config, method_fields
from ..models.losses import FUSIONS
from ..stage1.extract import extract, extract_config_like
from ..stage1.finetune import FinetuneConfig, finetune, finetune_settings
from ..stage2.robustness import (
    RobustnessRun,
    checkpoint_robustness,
    robustness_columns,
    runs_robustness,
)
from ..stage2.train import require_fields, run_differs, train_heads
from ..store import FeatureCache
from .report import Matrix, write_tables


@dataclass(frozen=True)
class RowSpec:
    """One table row: a display name, a method, its overrides and its input features."""

    row: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)
    features: str = "visual"  # "text": the text-only ceiling (reads text at test time)


# MARNet Table 2 rows (methods §1.9): baseline, +EMA, +MLP, +CDR(MLP), +Fusion
TABLE2_ROWS = (
    RowSpec("Baseline (visual)", "visual"),
    RowSpec("+EMA", "marnet", {"variant": "ema"}),
    RowSpec("+MLP", "marnet", {"variant": "mlp"}),
    RowSpec("+CDR(MLP)", "marnet", {"variant": "cdr"}),
    RowSpec("+Fusion (MARNet)", "marnet", {"variant": "full"}),
)

TEXT_CEILING = RowSpec("Text-only ceiling (reads text at test)", "visual", features="text")
# row names as the papers print them (Table 1); other methods show their name upper-cased
DISPLAY_NAMES = {"visual": "Baseline (visual)", "marnet": "MARNet", "seda": "SeDA"}
DEFAULT_METHODS = "visual,ita,sdm,swd,ssan,cdd,marnet,seda"


def slug(name: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in name.lower())
    return "-".join(p for p in keep.split("-") if p)


def fusion_row(mode: str) -> RowSpec:
    return RowSpec(f"MARNet ({mode})", "marnet", {"variant": "full", "fusion": mode})


def parse_row(token: str) -> list[RowSpec]:
    """The rows one ``--methods`` entry stands for."""
    if token == "table2":
        return list(TABLE2_ROWS)
    method, _, switch = token.partition(":")
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r} in --methods; known: {', '.join(METHODS)}, "
                          "marnet:<ema|mlp|cdr|fusion>, marnet:<fusion mode>, table2")
    if not switch:
        return [RowSpec(DISPLAY_NAMES.get(method, method.upper()), method)]
    if method == "marnet" and switch in ABLATIONS:
        return [next(r for r in TABLE2_ROWS if r.overrides.get("variant") == ABLATIONS[switch])]
    if method == "marnet" and switch in FUSIONS:
        return [fusion_row(switch)]
    raise ConfigError(f"unknown row {token!r}; after 'marnet:' use one of "
                      f"{', '.join([*ABLATIONS, *FUSIONS])}")


def parse_rows(methods: str, fusion: str | None = None) -> list[RowSpec]:
    """Rows for ``--methods`` and ``--fusion`` (``all`` or a comma list of modes: one MARNet row
    each, appended). Rows that resolve to the same settings as an earlier row are dropped."""
    rows = [r for token in methods.split(",") if token.strip() for r in parse_row(token.strip())]
    if fusion:
        modes = FUSIONS if fusion == "all" else tuple(m.strip() for m in fusion.split(","))
        unknown = [m for m in modes if m not in FUSIONS]
        if unknown:
            raise ConfigError(f"unknown fusion {', '.join(unknown)}; use all or "
                              f"{', '.join(FUSIONS)}")
        rows += [fusion_row(m) for m in modes]
    if not rows:
        raise ConfigError("--methods names no rows")
    unique, seen = [], set()
    for spec in rows:
        settings = json.dumps([spec.method, asdict(method_config(spec.method, spec.overrides))],
                              sort_keys=True, default=str)
        if settings not in seen:
            seen.add(settings)
            unique.append(spec)
    return unique


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; a repeated seed is refused (it would enter the mean and
    std twice)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{option} expects comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError(f"{option} names no seed")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(f"{option} {text!r} repeats seed {', '.join(map(str, repeated))}: each "
                          "seed is one run, and a run counted twice would shrink the std; list "
                          "each seed once")
    return seeds


def parse_method_overrides(items: list[str] | None) -> dict[str, dict[str, str]]:
    """``["marnet.diffusion.hidden=512"]`` -> ``{"marnet": {"diffusion.hidden": "512"}}``."""
    out: dict[str, dict[str, str]] = {}
    for key, value in parse_overrides(items).items():
        method, _, setting = key.partition(".")
        if method not in METHODS or not setting:
            raise ConfigError(f"--set expects METHOD.KEY=VALUE with METHOD one of "
                              f"{', '.join(METHODS)}; got {key!r}")
        out.setdefault(method, {})[setting] = value
    return out


def check_rows(cache: FeatureCache, rows: Sequence[RowSpec],
               shared_overrides: dict[str, dict[str, Any]]) -> None:
    """Fail before training anything: every row's settings resolve, the cache has its fields,
    and every ``--set`` method has a row."""
    unused = set(shared_overrides) - {r.method for r in rows}
    if unused:
        raise ConfigError(f"--set names {', '.join(sorted(unused))}, which no row uses")
    for spec in rows:
        overrides = {**shared_overrides.get(spec.method, {}), **spec.overrides}
        cfg = method_config(spec.method, overrides)
        require_fields(cache, spec.method, method_fields(spec.method, cfg))


def run_matrix(cache: Path | str, rows: Sequence[RowSpec], seeds: Sequence[int],
               out_dir: Path | str, train_cfg: TrainConfig = TrainConfig(),
               shared_overrides: dict[str, dict[str, Any]] | None = None,
               title: str | None = None, log: Callable[[str], None] = print,
               on_run: Callable[[Path], None] | None = None,
               robustness: RobustnessRun | None = None,
               tensorboard: Path | None = None) -> Matrix:
    """Train every row for every seed (skipping finished runs) and write the result tables.

    ``shared_overrides`` maps a method name to overrides applied to all its rows (e.g. the
    demo's smaller denoiser) before the row's own. ``on_run(run_dir)`` is called after each run
    (trained or reused), e.g. to draw its figures. ``robustness`` adds each run's corruption
    robustness (:func:`with_robustness`). ``tensorboard``: each run trained now writes its
    scalars into ``<tensorboard>/<row>/seed<k>``.
    """
    out = Path(out_dir)
    cache_key = FeatureCache(cache).key
    results = []
    for spec in rows:
        overrides = {**(shared_overrides or {}).get(spec.method, {}), **spec.overrides}
        for seed in seeds:
            run_dir = out / "runs" / slug(spec.row) / f"seed{seed}"
            cfg = replace(train_cfg, seed=seed)
            done = run_dir / "results.json"
            stale = run_differs(run_dir, spec.method, method_config(spec.method, overrides),
                                cfg, cache_key, spec.features) \
                if done.is_file() else "not finished"
            if stale is None:
                log(f"{spec.row} seed {seed}: finished earlier, reusing {run_dir}")
                res = json.loads(done.read_text())
            else:
                if done.is_file():
                    log(f"{spec.row} seed {seed}: {run_dir} was trained with another {stale}; "
                        "training it again")
                else:
                    log(f"{spec.row} seed {seed}")
                res = train_heads(cache, spec.method, run_dir, overrides, cfg, log, spec.features,
                                  overwrite=True,
                                  tensorboard=_board_dir(tensorboard, spec.row, seed))
            if on_run is not None:
                on_run(run_dir)
            split = "test" if "test" in res else "val"  # a cache without a test split
            results.append({"row": spec.row, "method": spec.method, "seed": seed,
                            "split": split, "top1": res[split]["top1"],
                            "top5": res[split]["top5"], "n": res[split]["n"],
                            "val_top1": res["val"]["top1"], "run": str(run_dir),
                            "train_seconds": res.get("train_seconds")})
    if any(r["split"] == "val" for r in results):  # never pass selection-split numbers as test
        title = f"{title or 'results'} (VALIDATION split: the cache has no test split)"
    if robustness is not None:
        results = with_robustness(results, robustness, log)
    summary = write_tables(out, results, ("row",), title,
                           {"cache": str(cache), "seeds": list(seeds)})
    return Matrix(results, summary)


def _board_dir(tensorboard: Path | None, row: str, seed: int) -> Path | None:
    """The TensorBoard folder of one (row, seed): ``<tensorboard>/<row>/seed<k>``."""
    return None if tensorboard is None else Path(tensorboard) / slug(row) / f"seed{seed}"


def with_robustness(results: list[dict[str, Any]], spec: RobustnessRun,
                    log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each result row with its run's mCA, relative robustness and family means: stage-two
    runs share one sweep per cache, a fine-tuned checkpoint gets its own; measured runs are
    read back from their ``robustness.json``."""
    split = results[0]["split"] if results else "test"
    head_runs = [Path(r["run"]) for r in results if (Path(r["run"]) / "config.json").is_file()]
    measured = runs_robustness(head_runs, spec, split, log)
    out = []
    for row in results:
        run = Path(row["run"])
        if run in head_runs:
            summary = measured.get(run)  # None: a text-reading row, without robustness
        else:
            summary = checkpoint_robustness(run, run / "backbone.safetensors", spec, split, log)
        out.append({**row, **robustness_columns(summary)} if summary else row)
    return out


def load_plotter() -> Callable[[Path], None]:
    """``run_dir -> None`` drawing a run's figures into ``<run_dir>/plots`` (the plots module)."""
    try:
        from .plots import plot_run
    except ImportError as exc:
        raise ConfigError("--plots needs the plots module (marnet.pipeline.tools.plots, as used by "
                          f"`marnet plot`), which this installation lacks ({exc}); run the "
                          "ablation without --plots") from exc

    def plot(run_dir: Path) -> None:
        if not (run_dir / "plots").is_dir():
            plot_run(run_dir, run_dir / "plots")

    return plot


def cache_title(cache: FeatureCache) -> str:
    """``<dataset>, <vision> [fine-tuned] + <text>: test accuracy``."""
    inputs = cache.manifest["inputs"]
    tuned = " fine-tuned" if inputs["visual"].get("finetuned") else ""
    return (f"{cache.manifest['dataset']['name']}, {inputs['visual']['model']}{tuned} + "
            f"{inputs['text']['model']}: test accuracy")


def default_out(cache: FeatureCache) -> Path:
    return Path("runs") / "ablate" / cache.key


def ablate(cache_path: Path | str, rows: Sequence[RowSpec], seeds: Sequence[int],
           out_dir: Path | str | None = None, train_cfg: TrainConfig = TrainConfig(),
           shared_overrides: dict[str, dict[str, Any]] | None = None, plots: bool = False,
           log: Callable[[str], None] = print,
           robustness: RobustnessRun | None = None,
           tensorboard: Path | None = None) -> dict[str, Any]:
    """``marnet ablate``: check every row, run the matrix, return rows, summary and paths;
    with ``tensorboard``, each run trained writes its scalars to ``<tensorboard>/<row>/seed<k>``."""
    cache = FeatureCache(cache_path).require_complete()
    shared = shared_overrides or {}
    check_rows(cache, rows, shared)
    on_run = load_plotter() if plots else None
    out = Path(out_dir) if out_dir else default_out(cache)
    title = cache_title(cache)
    matrix = run_matrix(cache_path, rows, seeds, out, train_cfg, shared, title, log, on_run,
                        robustness, tensorboard)
    return {"rows": matrix.rows, "summary": matrix.summary, "out": out, "title": title}


# --------------------------------------------------------------------------- end to end

END_TO_END = "end to end"
TWO_STAGE = "two-stage (heads on its cache)"


def finetune_base(cache: FeatureCache, vision: VisionSpec | None = None,
                  **settings: Any) -> FinetuneConfig:
    """A fine-tune of the dataset of ``cache`` against its text features, starting from
    ``vision`` or else from the backbone the cache was extracted with (its base weights)."""
    if vision is None:
        spec = dict(cache.manifest["vision_spec"])
        if spec.get("finetuned"):
            raise ConfigError(f"{cache.root} was extracted with a fine-tuned checkpoint; pass "
                              "--visual/--visual-weights for the backbone to start from")
        vision = VisionSpec(**spec)
    ds = cache.manifest["dataset"]
    return FinetuneConfig(dataset=ds["name"], root=Path(ds["root"]), out=Path("unset"),
                          vision=vision, text_cache=cache.root, template=ds["template"],
                          dataset_options=dict(ds.get("options", {})), **settings)


def _finetuned_result(run_dir: Path, cfg: FinetuneConfig, log: Callable[[str], None]
                      ) -> dict[str, Any]:
    """Fine-tune ``cfg`` into ``run_dir`` (reused when it finished with the same settings;
    resumed when it was interrupted) and evaluate it on test from the images."""
    done = run_dir / "results.json"
    settings = finetune_settings(cfg)
    if done.is_file():
        result = json.loads(done.read_text())
        if result.get("settings") == settings:
            log(f"{run_dir}: finished earlier, reusing it")
            return result
        log(f"{run_dir} was fine-tuned with other settings; training it again")
        done.unlink()
        shutil.rmtree(Path(f"{cfg.out}.state"), ignore_errors=True)
    # evaluated as `marnet eval --finetuned` does; the checkpoint of a run whose results were
    # not written is trained again (resumed from its state when it holds these settings)
    meta = finetune(replace(cfg, overwrite=True), log, evaluate=("test",))
    test = meta["evaluation"]["test"]
    result = {"settings": settings, "checkpoint": str(cfg.out), "best_epoch": meta["best_epoch"],
              "val": {"top1": meta["val_top1"], "top5": meta["val_top5"],
                      **_diagnostics(meta.get("val_diagnostics"))},
              "test": {**{k: test[k] for k in ("top1", "top5", "n", "per_class_top1")},
                       **_diagnostics(test.get("diagnostics"))},
              **_diagnostics({r["stage"]: r["prepared"] for r in meta["head_stages"]
                              if "prepared" in r})}
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _diagnostics(found: dict[str, Any] | None) -> dict[str, Any]:
    """``{"diagnostics": found}``, or nothing when the head measured none; the layout of a
    stage-two run's ``results.json``."""
    return {"diagnostics": found} if found else {}


def _two_stage_result(run_dir: Path, spec: RowSpec, overrides: dict[str, Any], seed: int,
                      text_cache: FeatureCache, checkpoint: Path, head_cfg: TrainConfig,
                      cache_dir: Path, log: Callable[[str], None],
                      tensorboard: Path | None = None) -> dict[str, Any]:
    """The same row on the two-stage path: extract with the fine-tuned backbone, then train
    the row's head on that cache (head seed = fine-tuning seed); its scalars go to
    ``<tensorboard>/<row>/seed<k>``."""
    cache = extract(extract_config_like(text_cache.manifest, VisionSpec(finetuned=str(checkpoint)),
                                        cache_dir), log).path
    return run_matrix(cache, [spec], [seed], run_dir / "two-stage", head_cfg,
                      {spec.method: overrides}, log=log, tensorboard=tensorboard).rows[0]


def run_finetune_matrix(base: FinetuneConfig, rows: Sequence[RowSpec], seeds: Sequence[int],
                        out_dir: Path | str,
                        shared_overrides: dict[str, dict[str, Any]] | None = None,
                        title: str | None = None, log: Callable[[str], None] = print,
                        two_stage: TrainConfig | None = None,
                        cache_dir: Path = Path("cache"),
                        robustness: RobustnessRun | None = None,
                        tensorboard: Path | None = None) -> Matrix:
    """Every row fine-tunes the backbone end to end under its own objective, once per seed
    (the fine-tuning seed), into ``<out>/runs/<row>/seed<k>/backbone.safetensors``, and is
    evaluated from the test images; finished runs are reused and interrupted ones resumed.
    With ``two_stage`` (the head settings), each checkpoint's features are also cached and
    the row's head trained on them, as a second table row per method. ``tensorboard``: each
    fine-tune trained now writes its scalars to ``<tensorboard>/<row>/seed<k>``, its two-stage
    head to ``<tensorboard>/two-stage/<row>/seed<k>``."""
    out = Path(out_dir)
    text_cache = FeatureCache(base.text_cache).require_complete()
    results = []
    for spec in rows:
        if spec.features != "visual":
            raise ConfigError(f"{spec.row} reads text at test time; it has no end-to-end form")
        overrides = {**(shared_overrides or {}).get(spec.method, {}), **spec.overrides}
        for seed in seeds:
            run_dir = out / "runs" / slug(spec.row) / f"seed{seed}"
            cfg = replace(base, method=spec.method, settings=overrides, seed=seed,
                          out=run_dir / "backbone.safetensors",
                          tensorboard=_board_dir(tensorboard, spec.row, seed))
            log(f"{spec.row}, fine-tuning seed {seed}")
            res = _finetuned_result(run_dir, cfg, log)
            results.append(_result_row(spec.row, seed, res, END_TO_END, str(run_dir)))
            if two_stage is not None:
                heads = _two_stage_result(
                    run_dir, spec, overrides, seed, text_cache, cfg.out,
                    replace(two_stage, seed=seed), cache_dir, log,
                    None if tensorboard is None else Path(tensorboard) / "two-stage")
                results.append({**heads, "path": TWO_STAGE})
    keys = ("row", "path") if two_stage is not None else ("row",)
    if robustness is not None:
        results = with_robustness(results, robustness, log)
    summary = write_tables(out, results, keys, title, {"text_cache": str(text_cache.root),
                                                       "finetune_seeds": list(seeds),
                                                       "finetune": finetune_settings(base)})
    return Matrix(results, summary)


def _result_row(row: str, seed: int, res: dict[str, Any], path: str, run: str) -> dict[str, Any]:
    return {"row": row, "path": path, "seed": seed, "split": "test",
            "top1": res["test"]["top1"], "top5": res["test"]["top5"], "n": res["test"]["n"],
            "val_top1": res["val"]["top1"], "run": run}


def require_one_process() -> None:
    """Refuse ``ablate --finetune`` under torchrun: besides its fine-tunes it extracts
    two-stage caches, trains heads, measures robustness and writes one set of tables, which
    every rank would do at once. Each row can train data-parallel with ``marnet finetune``
    under torchrun instead."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "ablate --finetune runs in one process (besides fine-tuning it extracts, trains "
            "heads and writes the tables, which every rank would do at once); to fine-tune a "
            "row data-parallel, run it with `torchrun ... -m marnet.cli finetune --method M`")


def ablate_finetune(base: FinetuneConfig, rows: Sequence[RowSpec], seeds: Sequence[int],
                    out_dir: Path | str | None = None,
                    shared_overrides: dict[str, dict[str, Any]] | None = None,
                    two_stage: TrainConfig | None = None, cache_dir: Path = Path("cache"),
                    log: Callable[[str], None] = print,
                    robustness: RobustnessRun | None = None,
                    tensorboard: Path | None = None) -> dict[str, Any]:
    """``marnet ablate --finetune``: check the rows, fine-tune every row x seed, tabulate
    (two-stage caches go under ``cache_dir``; scalars under ``tensorboard``, see
    :func:`run_finetune_matrix`). One process only: see :func:`require_one_process`."""
    require_one_process()
    text_cache = FeatureCache(base.text_cache).require_complete()
    shared = shared_overrides or {}
    check_rows(text_cache, rows, shared)
    for spec in rows:  # every row's fine-tune settings resolve before anything trains
        replace(base, method=spec.method,
                settings={**shared.get(spec.method, {}), **spec.overrides}).head()
    out = Path(out_dir) if out_dir else Path("runs") / "ablate-finetune" / text_cache.key
    title = (f"{text_cache.manifest['dataset']['name']}, {base.vision.model} fine-tuned end to "
             f"end per row + {text_cache.manifest['inputs']['text']['model']}: test accuracy "
             "(mean ± std over fine-tuning seeds)")
    matrix = run_finetune_matrix(base, rows, seeds, out, shared, title, log, two_stage,
                                 cache_dir, robustness, tensorboard)
    return {"rows": matrix.rows, "summary": matrix.summary, "out": out, "title": title}
