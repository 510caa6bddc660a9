"""`marnet predict`: image-only top-k with the backbone the run's cache was made with."""

import json

import pytest
import torch
from typer.testing import CliRunner

from marnet.cli import app
from marnet.pipeline.datasets import load_dataset
from marnet.pipeline.engine.runs import load_run
from marnet.pipeline.engine.training import TrainConfig
from marnet.pipeline.stage2.predict import predict_images, top_classes
from marnet.pipeline.stage2.train import train_heads
from marnet.pipeline.store import FeatureCache


@pytest.fixture(scope="module")
def visual_run(tiny_cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("predict") / "run"
    train_heads(tiny_cache, "visual", run, cfg=TrainConfig(epochs=1, batch_size=8, device="cpu"),
                log=lambda _: None)
    return run


def test_top_classes_are_sorted_softmax_probabilities():
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    (top,) = top_classes(logits, ["a", "b", "c"], topk=5)
    assert [p["class"] for p in top] == ["b", "c", "a"] and [p["rank"] for p in top] == [1, 2, 3]
    expected = torch.softmax(logits, 1)[0]
    assert [p["probability"] for p in top] == pytest.approx(expected[[1, 2, 0]].tolist())


def test_predict_matches_the_cached_features_of_the_same_images(tiny_cache, synth_root,
                                                                visual_run):
    records = load_dataset("synthfood", synth_root).splits["test"][:3]
    out = predict_images(visual_run, [r.image for r in records], topk=2, device="cpu")
    cached = FeatureCache(tiny_cache).load_split("test", ("visual", "id"))
    rows = [cached["id"].index(r.id) for r in records]
    model, config = load_run(visual_run)
    probs = torch.softmax(model.predict(cached["visual"][rows]), dim=1)
    for item, record, p in zip(out, records, probs):
        assert item["image"] == str(record.image) and len(item["predictions"]) == 2
        best = item["predictions"][0]
        assert best["index"] == int(p.argmax())
        assert best["class"] == config["class_names"][best["index"]]
        assert best["probability"] == pytest.approx(float(p.max()), abs=1e-3)


def test_predict_cli_prints_json_and_names_unreadable_images(synth_root, visual_run, tmp_path):
    image = load_dataset("synthfood", synth_root).splits["test"][0].image
    result = CliRunner().invoke(app, ["predict", str(image), "--run", str(visual_run), "--json",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    (item,) = json.loads(result.stdout)
    assert len(item["predictions"]) == 4  # topk 5, but the tiny dataset has 4 classes
    assert sum(p["probability"] for p in item["predictions"]) == pytest.approx(1.0, abs=1e-5)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    for path, reason in ((bad, "cannot decode"), (tmp_path / "missing.jpg", "file not found")):
        result = CliRunner().invoke(app, ["predict", str(image), str(path), "--run",
                                          str(visual_run), "--device", "cpu"])
        assert result.exit_code == 2
        assert path.name in result.output and reason in result.output
