"""Figures of a trained run (matplotlib, Agg): each a PNG plus the data behind it.

- ``tsne.png`` (MARNet Figure 3, methods §1.10 and methods §2.5): t-SNE of the standardised visual
  features ``x_v`` next to the features the run generates from them, image only: ``x_CDR``
  for MARNet runs with a CDR branch, ``z`` / ``m`` / ``s_hat_0`` for SeDA (reconstructed from
  the abstract), the one-step map's output; the split's text features ``x_s`` are shown as a
  reference panel (read for the figure only, never by a prediction). N samples of each of K
  classes; the silhouette score of each panel's features (in their own space) quantifies
  "clusters better". Data: ``tsne.npz`` (2-D points, labels, rows), ``tsne.json``.
- ``confidence.png`` (MARNet Figure 4; methods §1.10): histograms of the max softmax probability of
  each branch the run has on the whole split (MARNet full: EMA (visual) vs CDR (diffusion) vs
  fusion). Data: ``confidence.npz`` (per-row confidence and correctness), ``confidence.json``.
- ``curves.png``: training loss and validation top-1 per stage from ``metrics.jsonl``. Data:
  ``curves.json``.

:func:`plot_run` is what ``marnet plot`` and the ablation runner call; :func:`plot_finetuned`
draws the same figures for a fine-tuned checkpoint (``marnet plot --finetuned``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..engine.training import topk_metrics
from ..store import write_json_atomic

TensorMap = dict[str, torch.Tensor]


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------- what a run produces

MARNET_FEATURES = {"mlp_map": "MLP map", "x_cdr": "x_CDR"}
MARNET_LOGITS = {"ema_logits": "EMA (visual)", "mlp_logits": "MLP (visual)",
                 "cdr_logits": "CDR (diffusion)", "fusion_logits": "fusion (MARNet)"}


def _marnet_outputs(head, visual: torch.Tensor, generator: torch.Generator,
                    chunk_rows: int) -> tuple[TensorMap, TensorMap]:
    """MARNet (methods §1): ``x_CDR`` and the EMA / CDR / fusion logits the variant has, from the
    head's own :meth:`MARNet.representations`, under the figures' names."""
    rep = head.representations(visual, generator, chunk_rows)
    return ({MARNET_FEATURES[k]: v for k, v in rep.items() if k in MARNET_FEATURES},
            {MARNET_LOGITS[k]: v for k, v in rep.items() if k in MARNET_LOGITS})


def _seda_outputs(head, visual: torch.Tensor, generator: torch.Generator,
                  chunk_rows: int) -> tuple[TensorMap, TensorMap]:
    """SeDA (reconstructed; methods §2.3): ``z``, ``m``, ``s_hat_0`` and the variant's logits."""
    rep = head.representations(visual, generator, chunk_rows)
    names = {"one-step": "one-step map (visual)", "dsl-only": "DSL prototypes (diffusion)"}
    logits = {names.get(head.cfg.variant, "DST + PFIN (diffusion)"): rep.pop("logits")}
    return rep, logits


def _generic_outputs(model, visual_raw: torch.Tensor, generator: torch.Generator,
                     chunk_rows: int) -> tuple[TensorMap, TensorMap]:
    return {}, {"prediction (visual)": model.predict(visual_raw, generator, chunk_rows)}


def run_outputs(model, method: str, visual_raw: torch.Tensor, generator: torch.Generator,
                chunk_rows: int) -> tuple[TensorMap, TensorMap]:
    """``(features, logits)`` of a run on raw visual features: ``features`` starts with the
    standardised ``x_v`` and adds what the method generates; ``logits`` has one entry per
    branch. Image only: no text is passed."""
    visual = model.norm_visual(visual_raw)
    outputs = {"marnet": _marnet_outputs, "seda": _seda_outputs}.get(method)
    with torch.no_grad():
        model.eval()
        if outputs is None:
            features, logits = _generic_outputs(model, visual_raw, generator, chunk_rows)
        else:
            # the last branch is the run's own prediction: drawn first, as evaluation draws it,
            # and with all its test-time samples (one chain below feeds the figures)
            prediction = model.head.predict(visual, generator, chunk_rows)
            features, logits = outputs(model.head, visual, generator, chunk_rows)
            logits[next(reversed(logits))] = prediction
    return {"x_v": visual, **features}, logits


# ---------------------------------------------------------------------- t-SNE

def pick_rows(labels: np.ndarray, classes: int, samples: int, seed: int) -> np.ndarray:
    """Up to ``samples`` rows of each of ``classes`` classes (seeded random choices among the
    classes with at least 2 rows), sorted."""
    rng = np.random.default_rng(seed)
    values, counts = np.unique(labels, return_counts=True)
    eligible = values[counts >= 2]
    chosen = rng.choice(eligible, size=min(classes, len(eligible)), replace=False)
    rows = [rng.choice(np.flatnonzero(labels == k), size=min(samples, int((labels == k).sum())),
                       replace=False) for k in chosen]
    return np.sort(np.concatenate(rows)) if rows else np.zeros(0, dtype=int)


def tsne_embed(features: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """2-D t-SNE (scikit-learn) and the perplexity used (at most 30, below N / 3).

    Up to 200 points use the exact gradient: Barnes-Hut's OpenMP threads are slower there,
    badly so on a busy machine.
    """
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (len(features) - 1) / 3)))
    method = "exact" if len(features) <= 200 else "barnes_hut"
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                  method=method).fit_transform(features)
    return points, perplexity


def silhouette(features: np.ndarray, labels: np.ndarray) -> float | None:
    """Silhouette score of the labels in the features' own space (None if undefined)."""
    from sklearn.metrics import silhouette_score

    if not 2 <= len(np.unique(labels)) <= len(labels) - 1:
        return None
    return float(silhouette_score(features, labels))


def plot_tsne(panels: dict[str, np.ndarray], labels: np.ndarray, rows: np.ndarray,
              class_names: list[str], out: Path, seed: int) -> dict[str, Any]:
    """One t-SNE panel per feature set of the selected rows; writes PNG, NPZ and JSON."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    points, summary = {}, {}
    for ax, (name, features) in zip(axes[0], panels.items()):
        points[name], perplexity = tsne_embed(features, seed)
        summary[name] = {"silhouette": silhouette(features, labels), "dim": features.shape[1]}
        for k in np.unique(labels):
            mask = labels == k
            ax.scatter(*points[name][mask].T, s=10, label=class_names[k])
        score = summary[name]["silhouette"]
        ax.set_title(name if score is None else f"{name} (silhouette {score:.2f})")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out / "tsne.png", dpi=120)
    plt.close(fig)
    np.savez(out / "tsne.npz", labels=labels, rows=rows,
             **{_key(name): p for name, p in points.items()})
    data = {"panels": summary, "keys": {name: _key(name) for name in panels},
            "classes": [class_names[k] for k in np.unique(labels)], "rows": len(rows),
            "perplexity": perplexity, "seed": seed}
    write_json_atomic(out / "tsne.json", data)
    return data


def _key(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


# ---------------------------------------------------------------------- confidence

def plot_confidence(logits: TensorMap, labels: torch.Tensor, out: Path,
                    bins: int = 20) -> dict[str, Any]:
    """Histograms of the max softmax probability per branch; writes PNG, NPZ and JSON."""
    plt = pyplot()
    edges = np.linspace(0.0, 1.0, bins + 1)
    arrays, summary = {}, {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, branch in logits.items():
        probs = torch.softmax(branch.float(), dim=1)
        confidence, predicted = probs.max(dim=1)
        confidence = confidence.cpu().numpy()
        correct = (predicted == labels).cpu().numpy()
        counts, _ = np.histogram(confidence, bins=edges)
        arrays[f"{_key(name)}_confidence"], arrays[f"{_key(name)}_correct"] = confidence, correct
        summary[name] = {"counts": counts.tolist(), "mean_confidence": float(confidence.mean()),
                         "top1": float(100 * correct.mean()),
                         "top5": topk_metrics(branch.float(), labels, branch.shape[1])["top5"]}
        ax.stairs(counts, edges, label=f"{name} (top-1 {summary[name]['top1']:.1f}%)",
                  linewidth=1.5)
    ax.set_xlabel("max softmax probability")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "confidence.png", dpi=120)
    plt.close(fig)
    np.savez(out / "confidence.npz", edges=edges, labels=labels.cpu().numpy(), **arrays)
    data = {"edges": edges.tolist(), "branches": summary}
    write_json_atomic(out / "confidence.json", data)
    return data


# ---------------------------------------------------------------------- training curves

def read_curves(records: Path | list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """``{stage: {series: values}}`` from ``metrics.jsonl`` (or its records): loss, loss parts,
    val top-1 (fractions)."""
    if isinstance(records, Path):
        records = [json.loads(line) for line in records.read_text().splitlines()]
    curves: dict[str, dict[str, list[float]]] = {}
    for record in records:
        stage = curves.setdefault(record["stage"], {})
        for key, value in record.items():
            if key not in ("stage", "seconds", "lr") and isinstance(value, (int, float)):
                stage.setdefault(key, []).append(value)
    return curves


def checkpoint_records(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """A fine-tuned checkpoint's training history as ``metrics.jsonl`` records: the end-to-end
    epochs (val top-1 in % there, fractions here; the selection mean left out), then the
    stages trained on the frozen backbone."""
    first = [{"stage": "end to end", **{k: (v / 100 if k.startswith("val_top1_") else v)
                                        for k, v in record.items() if k != "val_top1"}}
             for record in meta.get("history", [])]
    return first + list(meta.get("head_stages", []))


def plot_curves(metrics: Path | list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Loss and validation top-1 per stage, stages laid end to end; writes PNG and JSON."""
    plt = pyplot()
    curves = read_curves(metrics)
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for stage, series in curves.items():
        epochs = np.asarray(series["epoch"]) + offset
        loss_ax.plot(epochs, series["loss"], marker=".", label=stage)
        for key, values in series.items():
            if key.startswith("val_top1"):
                val_ax.plot(epochs, 100 * np.asarray(values), marker=".",
                            label=f"{stage}: {key.removeprefix('val_top1_')}")
        offset = int(epochs[-1]) if len(epochs) else offset
    loss_ax.set(title="training loss", xlabel="epoch (stages in sequence)")
    val_ax.set(title="validation top-1 (%)", xlabel="epoch (stages in sequence)")
    loss_ax.legend(fontsize=8)
    val_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    write_json_atomic(out / "curves.json", curves)
    return curves


# ---------------------------------------------------------------------- a run

def plot_run(run_dir: Path | str, out_dir: Path | str | None = None, samples: int = 100,
             classes: int = 5, split: str = "test", device: str = "cpu",
             seed: int | None = None, cache: Path | str | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the t-SNE, confidence and training-curve figures of a run (PNG + data) into
    ``out_dir`` (default ``<run>/plots``); return what was written and the key numbers.

    ``samples`` rows of each of ``classes`` classes of ``split`` go into the t-SNE (the papers
    use 100 x 5); the confidence histograms use the whole split. ``seed`` defaults to the run's.
    """
    from ..engine.backbones import resolve_device
    from ..engine.runs import load_run, run_cache

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    dev = resolve_device(device)
    model, config = load_run(run_dir, dev)
    if config.get("features", "visual") != "visual":
        raise ValueError(f"{run_dir} classifies {config['features']} features (the text-only "
                         "ceiling); the figures compare what a method makes of visual features")
    fc = run_cache(config, cache)
    seed = config["train"]["seed"] if seed is None else seed
    data = fc.load_split(split, ("visual", "text", "label"), dev)
    log(f"plotting {run_dir} ({config['method']}) on {split}: {len(data['label']):,} rows")
    metrics = run_dir / "metrics.jsonl"
    return _plot(model, config["method"], data["visual"], data["label"],
                 model.norm_text(data["text"]), config["class_names"], out,
                 {"run": str(run_dir), "method": config["method"],
                  "summary": config.get("summary"), "split": split},
                 samples, classes, seed, config["train"]["chunk_rows"],
                 metrics if metrics.is_file() else None)


def plot_finetuned(checkpoint: Path | str, out_dir: Path | str | None = None,
                   samples: int = 100, classes: int = 5, split: str = "test",
                   device: str = "cpu", seed: int | None = None, num_workers: int = 2,
                   weights_dir: Path | str = "cache/weights",
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """:func:`plot_run` for a fine-tuned checkpoint: its backbone encodes the split's images
    and its head makes the branches (no text reference panel: the checkpoint holds no text);
    the curves come from its training history. Default ``out_dir``: ``<checkpoint>.plots``."""
    from ..engine.backbones import resolve_device
    from ..stage2.evaluate import finetuned_features

    checkpoint = Path(checkpoint)
    out = Path(out_dir) if out_dir is not None else Path(f"{checkpoint}.plots")
    dev = resolve_device(device)
    model, visual, labels, meta = finetuned_features(checkpoint, split, None, dev, num_workers,
                                                     weights_dir, log)
    seed = meta["seed"] if seed is None else seed
    log(f"plotting {checkpoint} ({meta['method']}) on {split}: {len(labels):,} rows")
    return _plot(model, meta["head_method"], visual, labels, None, meta["class_names"], out,
                 {"checkpoint": str(checkpoint), "method": meta["head_method"],
                  "summary": f"fine-tuned end to end with --method {meta['method']}",
                  "split": split},
                 samples, classes, seed, 8192, checkpoint_records(meta))


def _plot(model, method: str, visual: torch.Tensor, labels: torch.Tensor,
          text: torch.Tensor | None, class_names: list[str], out: Path, about: dict[str, Any],
          samples: int, classes: int, seed: int, chunk_rows: int,
          curves: Path | list[dict[str, Any]] | None) -> dict[str, Any]:
    """The figures of a head on a split's raw visual features (``text``: the standardised
    text features for the reference panel, or None)."""
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=visual.device).manual_seed(seed)
    features, logits = run_outputs(model, method, visual, generator, chunk_rows)
    if text is not None:
        features["x_s (text, reference)"] = text
    label_array = labels.cpu().numpy()
    rows = pick_rows(label_array, classes, samples, seed)
    panels = {name: f[torch.as_tensor(rows, device=f.device)].float().cpu().numpy()
              for name, f in features.items()}
    report = {**about, "out": str(out),
              "tsne": plot_tsne(panels, label_array[rows], rows, class_names, out, seed),
              "confidence": plot_confidence(logits, labels, out)}
    if curves is not None:
        plot_curves(curves, out)
    report["files"] = sorted({str(p) for p in out.iterdir() if p.is_file()}
                             | {str(out / "plots.json")})
    write_json_atomic(out / "plots.json", report)
    return report


# ---------------------------------------------------------------------- corruption robustness

def robustness_curves(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"severities": [0, ...], "families": {family: {row: top-1 per severity}}}``
    (severity 0 = clean): each row's mean over its seeds and over the family's corruptions,
    from the runs' ``robustness.json``."""
    per_row: dict[str, dict[str, list[list[float]]]] = {}
    severities: list[int] = []
    for row in rows:
        path = Path(row["run"]) / "robustness.json"
        if not path.is_file():
            continue  # a row without robustness (the text-only ceiling)
        summary = json.loads(path.read_text())
        severities = [0, *summary["severities"]]
        for family in summary["families"]:
            names = [n for n, f in summary["family_of"].items() if f == family]
            curve = [summary["clean_top1"]] + [
                float(np.mean([summary["top1"][n][str(s)] for n in names]))
                for s in summary["severities"]]
            per_row.setdefault(family, {}).setdefault(row["row"], []).append(curve)
    return {"severities": severities,
            "families": {family: {row: np.mean(curves, axis=0).round(3).tolist()
                                  for row, curves in by_row.items()}
                         for family, by_row in per_row.items()}}


def plot_robustness(ablation_dir: Path | str, out_dir: Path | str | None = None
                    ) -> dict[str, Any]:
    """Top-1 against severity per ImageNet-C family, one line per row (mean over seeds),
    from an ablation run with ``--robustness``: ``robustness.png`` and its data as JSON."""
    ablation_dir = Path(ablation_dir)
    results = ablation_dir / "results.json"
    if not results.is_file():
        raise FileNotFoundError(f"{ablation_dir} holds no results.json: give the folder of "
                                "`marnet ablate ... --robustness`")
    curves = robustness_curves(json.loads(results.read_text())["rows"])
    families = curves["families"]
    if not families:
        raise FileNotFoundError(f"no run under {ablation_dir} has a robustness.json: run the "
                                "ablation with --robustness first")
    out = Path(out_dir) if out_dir is not None else ablation_dir
    out.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.8),
                             sharey=True, squeeze=False)
    for ax, (family, by_row) in zip(axes[0], families.items()):
        for row, curve in by_row.items():
            ax.plot(curves["severities"], curve, marker="o", label=row)
        ax.set_title(family)
        ax.set_xticks(curves["severities"])
        ax.set_xlabel("severity (0 = clean)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 (%)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "robustness.png", dpi=120)
    plt.close(fig)
    write_json_atomic(out / "robustness_curves.json", curves)
    return {"out": str(out), "curves": curves,
            "files": [str(out / "robustness.png"), str(out / "robustness_curves.json")]}


def plot_corruption_samples(image: Path | str, key: str, out: Path | str,
                            corruptions: tuple[str, ...] | None = None, seed: int = 0) -> Path:
    """One image under every corruption (rows) at severities 0 (clean) to 5 (columns), at its
    own resolution, as the classifiers see it: what each setting does at that size."""
    from ..datasets.corruptions import CORRUPTIONS, Corruption
    from ..datasets.images import load_rgb

    clean = load_rgb(image)
    names = corruptions or CORRUPTIONS
    plt = pyplot()
    fig, axes = plt.subplots(len(names), 6, figsize=(6 * 1.3, len(names) * 1.3), squeeze=False)
    for row, name in enumerate(names):
        for severity in range(6):
            ax = axes[row][severity]
            ax.imshow(np.asarray(Corruption(name, severity, seed)(clean, key)))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title("clean" if severity == 0 else f"severity {severity}", fontsize=8)
            if severity == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
