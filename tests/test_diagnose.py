"""Feature diagnostics (methods §2.5) against independent computations on toy cases."""

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from marnet.cli import app
from marnet.pipeline.store import FeatureCache
from marnet.pipeline.tools.diagnose import (
    cosine_matrix,
    cosine_matrix_correlation,
    diagnose,
    feature_summary,
    frechet_distance,
    linear_cka,
    rotation_invariant_frechet,
    standardise,
    variance_ratio,
)


def _rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q


def _gram_cka(a: np.ndarray, b: np.ndarray) -> float:
    """CKA through centred Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = len(a)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = h @ a @ a.T @ h, h @ b @ b.T @ h
    return float(np.trace(k @ l) / math.sqrt(np.trace(k @ k) * np.trace(l @ l)))


def test_linear_cka_matches_the_gram_formula_and_its_invariances():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((10, 4)), rng.standard_normal((10, 6))
    assert linear_cka(a, a) == pytest.approx(1.0)
    assert linear_cka(a, 3.0 * a @ _rotation(4, rng) + 5.0) == pytest.approx(1.0)
    assert linear_cka(a, b) == pytest.approx(_gram_cka(a, b))
    assert linear_cka(a, b) < 0.9


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 3))
    mean, cov = x.mean(0), np.cov(x, rowvar=False)
    assert frechet_distance(mean, cov, mean, cov) == pytest.approx(0.0, abs=1e-8)
    # diagonal covariances: |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    va, vb = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    ma, mb = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2
    assert frechet_distance(ma, np.diag(va), mb, np.diag(vb)) == pytest.approx(expected)


def test_rotation_invariant_frechet_ignores_rotations_and_pads_dims():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 4)) * np.array([3.0, 2.0, 1.0, 0.5])
    y = x @ _rotation(4, rng)
    gx = (x.mean(0), np.cov(x, rowvar=False))
    gy = (y.mean(0), np.cov(y, rowvar=False))
    assert frechet_distance(*gx, *gy) > 1.0, "the coordinates differ"
    assert rotation_invariant_frechet(*gx, *gy) == pytest.approx(0.0, abs=1e-8)
    # 2-d var (1, 1), padded with a zero-variance axis, against 3-d var (4, 1, 1): the sorted
    # square roots (1, 1, 0) vs (2, 1, 1) differ by 1 twice
    assert rotation_invariant_frechet(np.zeros(2), np.eye(2), np.zeros(3),
                                      np.diag([1.0, 1.0, 4.0])) == pytest.approx(2.0)


def test_variance_ratio_on_constructed_classes():
    x = np.array([[0.0], [2.0], [10.0], [12.0]])
    y = np.array([0, 0, 1, 1])
    # centres 1 and 11, overall mean 6: intra = 1, inter = 25
    assert variance_ratio(x, y) == pytest.approx(1 / 25)
    per_class_text = np.array([[1.0, 2.0], [1.0, 2.0], [3.0, 0.0], [3.0, 0.0]])
    assert variance_ratio(per_class_text, y) == 0.0, "per-class text has no intra-class spread"
    assert variance_ratio(np.ones((4, 2)), y) is None


def test_cosine_matrix_correlation():
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((5, 8))
    cos = cosine_matrix(centres)
    assert np.allclose(np.diag(cos), 1.0)
    assert cosine_matrix_correlation(cos, cos) == pytest.approx(1.0)
    assert cosine_matrix_correlation(cos, -cos) == pytest.approx(-1.0)
    assert cosine_matrix_correlation(cos[:2, :2], cos[:2, :2]) is None, "one pair: undefined"


def test_standardise_uses_reference_stats_and_floors_constant_dims():
    reference = np.array([[0.0, 1.0, 5.0], [2.0, 3.0, 5.0], [4.0, 5.0, 5.0]])
    z = standardise(np.array([[2.0, 5.0, 7.0]]), reference)
    std = reference.std(axis=0)
    assert z[0, :2] == pytest.approx([0.0, 2.0 / std[1]])
    # the constant dim is scaled by 0.1 x the median std, not by ~0
    assert z[0, 2] == pytest.approx(2.0 / (0.1 * np.median(std)))


def test_feature_summary_matches_numpy():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 3)) * np.array([1.0, 10.0, 0.1]) + 2.0
    s = feature_summary(x, bins=10)
    assert s["min"] == x.min() and s["max"] == x.max()
    assert s["p01"] == pytest.approx(np.percentile(x, 1))
    assert s["per_dim_std"]["max"] == pytest.approx(x.std(0).max())
    assert s["l2_norm"]["mean"] == pytest.approx(np.linalg.norm(x, axis=1).mean())
    assert sum(s["l2_norm"]["histogram"]["counts"]) == 50
    assert sum(s["values_histogram"]["counts"]) == 150


def test_diagnose_cache_prints_and_writes(tiny_cache, tmp_path):
    out = tmp_path / "diag"
    result = CliRunner().invoke(app, ["diagnose", "--cache", str(tiny_cache), "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "linear CKA" in result.output and "intra/inter" in result.output
    for name in ("diagnose.json", "diagnose_ranges.png", "diagnose_centres.png"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "diagnose.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    raw = FeatureCache(tiny_cache).load_split("train")
    visual, text = raw["visual"].double().numpy(), raw["text"].double().numpy()
    assert [report["modalities"][m]["dim"] for m in ("visual", "text")] == [256, 384]
    assert report["modalities"]["visual"]["max"] == pytest.approx(visual.max())
    assert report["modalities"]["text"]["p99"] == pytest.approx(np.percentile(text, 99))
    assert report["modalities"]["text"]["variance_ratio"]["raw"] == pytest.approx(
        variance_ratio(text, raw["label"].numpy()))
    assert report["cross_modal"]["frechet"]["coordinatewise"] is None, "256 vs 384 dims"
    assert report["cross_modal"]["frechet"]["rotation_invariant"] > 0
    assert 0 <= report["cross_modal"]["centre_linear_cka"] <= 1
    assert len(report["cross_modal"]["centre_cosine"]["visual"]) == 4
    # another split is standardised with the train statistics and still analysed itself
    test_report = diagnose(tiny_cache, "test")
    assert test_report["modalities"]["visual"]["rows"] == 16
