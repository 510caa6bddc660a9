"""Figures of a run: t-SNE, confidence histograms and curves, each a PNG plus its data."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from marnet.cli import app
from marnet.pipeline.engine.training import TrainConfig
from marnet.pipeline.stage2.train import train_heads
from marnet.pipeline.tools.plots import pick_rows, plot_run, read_curves

MARNET_SMALL = {"diffusion.hidden": 32, "diffusion.schedule.steps": 20, "fusion_samples": 2}
SEDA_SMALL = {"dsl.hidden": 32, "dst.hidden": 32, "dsl.schedule.steps": 20,
              "dst.schedule.steps": 20, "dsl.steps": 5, "dst.steps": 5}
FILES = ("tsne.png", "tsne.npz", "tsne.json", "confidence.png", "confidence.npz",
         "confidence.json", "curves.png", "curves.json", "plots.json")


def test_pick_rows_takes_n_samples_of_k_classes():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1 + [3] * 5)
    rows = pick_rows(labels, classes=3, samples=4, seed=0)
    picked = labels[rows]
    assert len(np.unique(picked)) == 3 and 2 not in picked, "a 1-row class is never chosen"
    assert all((picked == k).sum() == min(4, (labels == k).sum()) for k in np.unique(picked))
    assert np.array_equal(rows, pick_rows(labels, classes=3, samples=4, seed=0))


@pytest.mark.parametrize("method,overrides,panels,branches", [
    ("marnet", MARNET_SMALL, ["x_v", "x_CDR"], ["EMA (visual)", "CDR (diffusion)",
                                                "fusion (MARNet)"]),
    ("seda", SEDA_SMALL, ["x_v", "z", "m", "s_hat_0"], ["DST + PFIN (diffusion)"]),
])
def test_plot_run_writes_figures_and_the_data_behind_them(tiny_cache, tmp_path, method,
                                                          overrides, panels, branches):
    run = tmp_path / "run"
    results = train_heads(tiny_cache, method, run, overrides,
                          TrainConfig(epochs=1, batch_size=8, device="cpu"), log=lambda _: None)
    report = plot_run(run, samples=3, classes=3, log=lambda _: None)
    out = run / "plots"
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    tsne = json.loads((out / "tsne.json").read_text())
    assert list(tsne["panels"]) == [*panels, "x_s (text, reference)"]
    points = np.load(out / "tsne.npz")
    assert len(points["rows"]) == tsne["rows"] == 9 and len(tsne["classes"]) == 3
    for name in tsne["panels"]:
        assert points[tsne["keys"][name]].shape == (9, 2)
    confidence = json.loads((out / "confidence.json").read_text())
    assert list(confidence["branches"]) == branches
    for branch in confidence["branches"].values():
        assert sum(branch["counts"]) == results["test"]["n"]
        assert 1 / 4 <= branch["mean_confidence"] <= 1
    # the final branch is the run's own image-only prediction, with the same noise
    final = confidence["branches"][branches[-1]]
    assert final["top1"] == pytest.approx(results["test"]["top1"], abs=1e-3)
    curves = json.loads((out / "curves.json").read_text())
    stages = (["ema+cdr", "fusion"] if method == "marnet" else
              ["dsl", *(f"dsl-fold{k}" for k in range(5)), "dst+pfin", "classifier"])
    assert curves == read_curves(run / "metrics.jsonl") and list(curves) == stages
    assert curves[stages[0]]["epoch"] == [1] and len(curves[stages[0]]["loss"]) == 1
    assert report["files"] == sorted(str(out / name) for name in FILES)


def test_plot_cli(tiny_cache, tmp_path):
    run = tmp_path / "run"
    train_heads(tiny_cache, "visual", run, {}, TrainConfig(epochs=1, batch_size=8, device="cpu"),
                log=lambda _: None)
    result = CliRunner().invoke(app, ["plot", "--run", str(run), "--out", str(tmp_path / "fig"),
                                      "--samples", "2", "--classes", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "prediction (visual)" in result.output and "silhouette" in result.output
    assert (tmp_path / "fig" / "tsne.png").is_file()


def test_a_text_ceiling_run_is_refused_with_a_message(tiny_cache, tmp_path):
    from marnet.pipeline.engine.training import TrainConfig
    from marnet.pipeline.stage2.train import train_heads
    from marnet.pipeline.tools.plots import plot_run

    run = tmp_path / "ceiling"
    train_heads(tiny_cache, "visual", run, {}, TrainConfig(epochs=1, batch_size=8, device="cpu"),
                log=lambda _: None, features="text")
    with pytest.raises(ValueError, match="text-only ceiling"):
        plot_run(run, log=lambda _: None)
