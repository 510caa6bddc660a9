"""Feature-range and distribution diagnostics of a cache (methods §2.5 [R]).

SeDA's abstract blames one-step visual-to-text mappings on two gaps between the modalities:
the class-wise sample distribution and the range of feature values (methods §2.1 item 3). These
numbers check whether the premise holds for a given pair of backbones:

- per modality, on the **raw** cached features: per-dimension mean and std (summarised),
  global min/max, 1st/99th percentiles, L2-norm and value histograms;
- per modality: the intra- to inter-class variance ratio, raw and standardised;
- across modalities, on standardised features (train-split statistics, as the heads see
  them): linear CKA of the class centres, the correlation of the two K x K class-centre
  cosine matrices, and the Fréchet distance between the two feature Gaussians.

The two backbones' coordinates are unrelated, so next to the plain (coordinate-wise) Fréchet
distance, defined only when the dims agree, we report its minimum over rotations, which
compares the covariance spectra and is defined for any dims.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.heads.common import Standardizer
from ..store import FeatureCache, write_json_atomic

MODALITIES = ("visual", "text")


def feature_summary(features: np.ndarray, bins: int = 30) -> dict[str, Any]:
    """Range statistics of one modality's raw features ``[N, D]`` (methods §2.5)."""
    per_dim_mean, per_dim_std = features.mean(axis=0), features.std(axis=0)
    norms = np.linalg.norm(features, axis=1)
    p01, p99 = np.percentile(features, [1, 99])
    norm_counts, norm_edges = np.histogram(norms, bins=bins)
    value_counts, value_edges = np.histogram(features, bins=2 * bins)
    return {
        "rows": int(features.shape[0]), "dim": int(features.shape[1]),
        "min": float(features.min()), "max": float(features.max()),
        "p01": float(p01), "p99": float(p99),
        "per_dim_mean": _spread(per_dim_mean), "per_dim_std": _spread(per_dim_std),
        "l2_norm": {**_spread(norms), "std": float(norms.std()),
                    "histogram": {"counts": norm_counts.tolist(), "edges": norm_edges.tolist()}},
        "values_histogram": {"counts": value_counts.tolist(), "edges": value_edges.tolist()},
    }


def _spread(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}


def class_centres(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(classes present, their centres [K, D])``: per-class means of ``features``."""
    classes = np.unique(labels)
    return classes, np.stack([features[labels == k].mean(axis=0) for k in classes])


def variance_ratio(features: np.ndarray, labels: np.ndarray) -> float | None:
    """Intra- over inter-class variance: ``mean_i ||x_i - c_{y_i}||^2 / mean_i ||c_{y_i} - mu||^2``.

    The two terms add up to the total variance (law of total variance). 0 means every class is
    one point (e.g. per-class text such as Ingredient-101's); None means all centres coincide.
    """
    classes, centres = class_centres(features, labels)
    row_centres = centres[np.searchsorted(classes, labels)]
    intra = float(((features - row_centres) ** 2).sum(axis=1).mean())
    inter = float(((row_centres - features.mean(axis=0)) ** 2).sum(axis=1).mean())
    return intra / inter if inter > 0 else None


def linear_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA of two representations of the same rows (Kornblith et al. 2019):
    ``||B^T A||_F^2 / (||A^T A||_F ||B^T B||_F)`` on column-centred ``A``, ``B``."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    cross = np.linalg.norm(b.T @ a) ** 2
    return float(cross / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)))


def cosine_matrix(centres: np.ndarray) -> np.ndarray:
    """``K x K`` cosine similarities between class centres."""
    unit = centres / np.linalg.norm(centres, axis=1, keepdims=True).clip(min=1e-12)
    return unit @ unit.T


def cosine_matrix_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of the off-diagonal entries (i < j) of two cosine matrices (None
    when undefined: fewer than 3 classes or a constant matrix)."""
    upper = np.triu_indices(len(a), k=1)
    x, y = a[upper], b[upper]
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


def frechet_distance(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray,
                     cov_b: np.ndarray) -> float:
    """``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2})`` between two
    Gaussians of the same dim (the FID formula)."""
    root_a = _psd_sqrt(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)
    value = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) \
        - 2 * np.sqrt(cross).sum()
    return float(max(value, 0.0))


def rotation_invariant_frechet(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray,
                               cov_b: np.ndarray) -> float:
    """The Fréchet distance with each term minimised over rotations (the smaller Gaussian
    zero-padded to the larger dim): ``(||mu_a|| - ||mu_b||)^2 + sum_i (sqrt(l_a,i) -
    sqrt(l_b,i))^2`` over the descending covariance eigenvalues. A lower bound of the distance
    under any rotation; exactly its minimum when the means are zero (standardised train
    features)."""
    la = np.sort(np.linalg.eigvalsh(cov_a).clip(min=0))[::-1]
    lb = np.sort(np.linalg.eigvalsh(cov_b).clip(min=0))[::-1]
    size = max(len(la), len(lb))
    la, lb = np.pad(la, (0, size - len(la))), np.pad(lb, (0, size - len(lb)))
    mean_term = (np.linalg.norm(mean_a) - np.linalg.norm(mean_b)) ** 2
    return float(mean_term + ((np.sqrt(la) - np.sqrt(lb)) ** 2).sum())


def _gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


def standardise(features: np.ndarray, reference: np.ndarray, floor: float = 0.1) -> np.ndarray:
    """Per-dimension z-score with the statistics of ``reference`` (methods §3.7), exactly as
    the heads see it: :class:`~.heads.common.Standardizer`, whose std floor (``floor`` x the
    median std) keeps a dimension dead on train from exploding another split's rows."""
    norm = Standardizer(reference.shape[1], floor_ratio=floor).fit(torch.from_numpy(reference))
    return norm(torch.from_numpy(features).float()).numpy()


def cross_modal(visual: np.ndarray, text: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Class-level agreement and distribution distance of standardised visual/text features."""
    classes, visual_centres = class_centres(visual, labels)
    _, text_centres = class_centres(text, labels)
    visual_cos, text_cos = cosine_matrix(visual_centres), cosine_matrix(text_centres)
    gauss_v, gauss_s = _gaussian(visual), _gaussian(text)
    same_dim = visual.shape[1] == text.shape[1]
    return {
        "classes": classes.tolist(),
        "centre_linear_cka": linear_cka(visual_centres, text_centres),
        "centre_cosine_correlation": cosine_matrix_correlation(visual_cos, text_cos),
        "frechet": {"coordinatewise": frechet_distance(*gauss_v, *gauss_s) if same_dim else None,
                    "rotation_invariant": rotation_invariant_frechet(*gauss_v, *gauss_s)},
        "centre_cosine": {"visual": visual_cos.tolist(), "text": text_cos.tolist()},
    }


def diagnose_arrays(raw: dict[str, np.ndarray], labels: np.ndarray,
                    reference: dict[str, np.ndarray]) -> dict[str, Any]:
    """All methods §2.5 numbers for raw ``{"visual", "text"}`` features of one split; ``reference``
    holds the train features whose statistics standardise them."""
    standardised = {m: standardise(raw[m], reference[m]) for m in MODALITIES}
    modalities = {m: {**feature_summary(raw[m]), "variance_ratio": {
        "raw": variance_ratio(raw[m], labels),
        "standardised": variance_ratio(standardised[m], labels)}} for m in MODALITIES}
    return {"modalities": modalities,
            "cross_modal": cross_modal(standardised["visual"], standardised["text"], labels)}


def diagnose(cache_path: Path | str, split: str = "train",
             out_dir: Path | str | None = None) -> dict[str, Any]:
    """Diagnostics of ``split`` of a cache (methods §2.5); with ``out_dir``, write
    ``diagnose.json``, ``diagnose_ranges.png`` and ``diagnose_centres.png`` there."""
    cache = FeatureCache(cache_path).require_complete()
    data = cache.load_split(split, ("visual", "text", "label"))
    raw = {m: data[m].numpy().astype(np.float64) for m in MODALITIES}
    reference = raw if split == "train" else {
        m: v.numpy().astype(np.float64)
        for m, v in cache.load_split("train", MODALITIES).items()}
    report = {
        "cache": str(Path(cache_path).resolve()), "key": cache.key, "split": split,
        "inputs": {"dataset": cache.manifest["dataset"]["name"],
                   "visual": cache.manifest["inputs"]["visual"]["model"],
                   "text": cache.manifest["inputs"]["text"]["model"],
                   "text_spec": cache.manifest.get("text_spec"),
                   "dtype": cache.dtype},
        "standardised_with": "train split statistics",
        **diagnose_arrays(raw, data["label"].numpy(), reference),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "diagnose.json", report)
        report["files"] = [str(p) for p in (out / "diagnose.json", *write_figures(report, out))]
    return report


def write_figures(report: dict[str, Any], out: Path) -> list[Path]:
    """``diagnose_ranges.png`` (L2-norm and value histograms per modality) and
    ``diagnose_centres.png`` (the two class-centre cosine matrices)."""
    from .plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, ax, title in (("l2_norm", axes[0], "L2 norm per row (raw)"),
                           ("values", axes[1], "feature values (raw)")):
        for m in MODALITIES:
            summary = report["modalities"][m]
            hist = (summary["l2_norm"]["histogram"] if key == "l2_norm"
                    else summary["values_histogram"])
            ax.stairs(hist["counts"], hist["edges"], label=m, fill=True, alpha=0.5)
        ax.set_title(title)
        ax.set_yscale("log" if key == "values" else "linear")
        ax.legend()
    ranges = out / "diagnose_ranges.png"
    fig.tight_layout()
    fig.savefig(ranges, dpi=120)
    plt.close(fig)

    cosine = report["cross_modal"]["centre_cosine"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, m in zip(axes, MODALITIES):
        image = ax.imshow(np.asarray(cosine[m]), vmin=-1, vmax=1, cmap="coolwarm")
        ax.set_title(f"{m}: class-centre cosine")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.yaxis.get_major_locator().set_params(integer=True)
    fig.colorbar(image, ax=list(axes))
    fig.suptitle(f"linear CKA {_fmt(report['cross_modal']['centre_linear_cka'])}, "
                 f"cosine-matrix r {_fmt(report['cross_modal']['centre_cosine_correlation'])}")
    centres = out / "diagnose_centres.png"
    fig.savefig(centres, dpi=120)
    plt.close(fig)
    return [ranges, centres]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
