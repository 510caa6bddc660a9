"""Alignment baselines (methods §4) on the shared wrapper, and the opt-in token features."""

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from marnet.cli import app
from marnet.pipeline.datasets import load_dataset
from marnet.pipeline.engine.backbones import (
    VisionSpec,
    build_vision,
    feature_tokens,
    pool_tokens,
    resolve_text_model,
)
from marnet.pipeline.engine.runs import load_run
from marnet.pipeline.engine.training import TrainConfig
from marnet.pipeline.models.heads import Dims, SplitData, TrainContext, build_head, method_config
from marnet.pipeline.models.heads.alignment import AlignConfig, AlignedClassifier
from marnet.pipeline.models.losses import (
    cdd_loss,
    ita_loss,
    random_directions,
    sliced_wasserstein,
    ssan_esa_loss,
    ssan_isa_loss,
)
from marnet.pipeline.stage2.evaluate import evaluate_run
from marnet.pipeline.stage2.train import train_heads
from marnet.pipeline.store import CacheError, FeatureCache

DIMS = Dims(visual=6, text=5, classes=3)


def _batch(g, n=9, tokens=False):
    batch = {"visual": torch.randn(n, 6, generator=g), "text": torch.randn(n, 5, generator=g),
             "label": torch.arange(n) % 3}
    if tokens:
        batch.update(visual_tokens=torch.randn(n, 4, 6, generator=g),
                     text_tokens=torch.randn(n, 7, 5, generator=g),
                     text_mask=(torch.arange(7)[None, :] < torch.randint(1, 8, (n, 1), generator=g)
                                ).to(torch.uint8))
    return batch


def test_token_cache_holds_tokens_consistent_with_pooled_features(tiny_token_cache, tiny_cache,
                                                                   synth_root):
    fc = FeatureCache(tiny_token_cache)
    assert fc.manifest["inputs"]["tokens"] is True
    assert "tokens" not in FeatureCache(tiny_cache).manifest["inputs"]  # old keys unchanged
    data = fc.load_split("train", ("visual", "text", "visual_tokens", "text_tokens", "text_mask"))
    n = len(data["visual"])
    assert data["visual_tokens"].shape == (n, 4, 256)
    assert data["text_tokens"].shape == (n, 32, 384) and data["text_mask"].shape == (n, 32)
    # a CNN's tokens are its last map: their mean is the average-pooled feature
    assert torch.allclose(data["visual_tokens"].mean(1), data["visual"], atol=2e-2, rtol=2e-2)
    # the text tokens mean-pool (over the mask) to the cached text feature
    pooled = pool_tokens(data["text_tokens"], data["text_mask"], "mean")
    assert torch.allclose(pooled, data["text"], atol=2e-3)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model("minilm"))
    records = load_dataset("synthfood", synth_root).splits["train"]
    lengths = [len(tokenizer(r.text, truncation=True, max_length=32)["input_ids"]) for r in records]
    assert data["text_mask"].sum(1).tolist() == lengths
    assert all(m[:n].all() and not m[n:].any() for m, n in zip(data["text_mask"], lengths))


def test_features_and_tokens_pool_exactly_like_features():
    vision = build_vision(VisionSpec("test_efficientnet", "random", image_size=64, crop_pct=1.0))
    vision.to_runtime(torch.device("cpu"))
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    pooled, tokens = vision.features_and_tokens(images)
    assert torch.equal(pooled, vision.features(images))
    assert tokens.shape == (3, 4, 256) and vision.token_shape() == (4, 256)
    fmap = torch.randn(2, 5, 3, 4)  # NCHW -> tokens in row-major spatial order
    assert torch.equal(feature_tokens(fmap)[:, 6], fmap[:, :, 1, 2])
    assert torch.equal(feature_tokens(fmap.permute(0, 2, 3, 1), "NHWC"), feature_tokens(fmap))


@pytest.mark.parametrize("method,parts", [
    ("ita", {"ita"}), ("sdm", {"sdm"}), ("swd", {"swd", "text_ce"}),
    ("ssan", {"ssan", "isa", "text_ce"}), ("cdd", {"cdd"}), ("team", {"team"}),
])
def test_each_baseline_trains_and_classifies_from_visual_features(
        tiny_cache, tiny_token_cache, tmp_path, method, parts):
    cache = tiny_token_cache if method == "team" else tiny_cache
    out = tmp_path / method
    results = train_heads(cache, method, out, {"d": 16},
                          TrainConfig(epochs=1, batch_size=8, device="cpu", balanced_classes=4),
                          log=lambda _: None)
    (record,) = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert parts | {"ce", "loss"} <= set(record)
    assert all(torch.isfinite(torch.tensor(record[k])) for k in parts)
    reloaded = evaluate_run(out, "test", device="cpu", log=lambda _: None)
    assert (reloaded["top1"], reloaded["top5"]) == (results["test"]["top1"],
                                                    results["test"]["top5"])  # what was saved
    model, config = load_run(out)
    assert config["method_config"]["loss"] == method
    visual = FeatureCache(cache).load_split("test", ("visual",))["visual"]
    assert model.predict(visual).shape == (len(visual), 4)


def test_team_is_refused_on_a_cache_without_tokens(tiny_cache, tmp_path):
    with pytest.raises(CacheError, match="--tokens"):
        train_heads(tiny_cache, "team", tmp_path / "run", cfg=TrainConfig(epochs=1, device="cpu"),
                    log=lambda _: None)
    assert not (tmp_path / "run").exists()
    result = CliRunner().invoke(app, ["train-heads", "--cache", str(tiny_cache), "--out",
                                      str(tmp_path / "run"), "--method", "team"])
    assert result.exit_code == 2 and "re-extract it with" in result.output


@pytest.mark.parametrize("method,sampler", [
    ("ita", "random"), ("sdm", "balanced"), ("swd", "random"), ("ssan", "balanced"),
    ("cdd", "balanced"), ("team", "random"),
])
def test_losses_with_class_statistics_get_class_balanced_batches(method, sampler):
    head = build_head(method, method_config(method), DIMS)
    data = SplitData(_batch(torch.Generator().manual_seed(0)))
    ctx = TrainContext(torch.device("cpu"), torch.Generator())
    (stage,) = head.stages(data, data, ctx)
    assert stage.sampler == sampler
    assert set(stage.fields) >= {"visual", "text", "label"}
    assert ("visual_tokens" in stage.fields) == (method == "team")


def _encoded(head, batch):
    f_v, f_s = head.embed(batch["visual"]), head.text_encoder(batch["text"])
    return f_v, f_s, head.classifier(f_v)


def test_swd_objective_is_ce_plus_swd_plus_text_classifier_ce():
    g = torch.Generator().manual_seed(1)
    head = build_head("swd", method_config("swd", {"projections": 16}), DIMS)
    batch = _batch(g)
    total, parts = head.loss(batch, torch.Generator().manual_seed(5))
    f_v, f_s, logits = _encoded(head, batch)
    text_logits = head.parts["text_classifier"](f_s)
    swd = sliced_wasserstein(logits.softmax(1), text_logits.softmax(1),
                             random_directions(3, 16, torch.Generator().manual_seed(5)))
    expected = (F.cross_entropy(logits, batch["label"]) + swd
                + F.cross_entropy(text_logits, batch["label"]))
    assert torch.isclose(total, expected, rtol=1e-5)
    assert torch.isclose(parts["swd"], swd)
    # fresh directions each step, reproducible from the training generator
    again, _ = head.loss(batch, torch.Generator().manual_seed(5))
    other, _ = head.loss(batch, torch.Generator().manual_seed(6))
    assert torch.equal(total, again) and not torch.equal(total, other)


def test_ssan_objective_uses_the_shared_classifier_for_text():
    g = torch.Generator().manual_seed(2)
    head = build_head("ssan", method_config("ssan"), DIMS)
    assert len(head.parts) == 0  # no text classifier of its own
    batch = _batch(g)
    total, _ = head.loss(batch)
    f_v, f_s, logits = _encoded(head, batch)
    text_logits = head.classifier(f_s)
    y = batch["label"]
    expected = (ssan_isa_loss(logits, text_logits, y, 0.1, 5.0) + F.cross_entropy(text_logits, y)
                + 0.004 * ssan_esa_loss(f_s, f_v, y))
    assert torch.isclose(total, expected, rtol=1e-5)


def test_cdd_objective_is_ce_plus_cdd():
    g = torch.Generator().manual_seed(3)
    head = build_head("cdd", method_config("cdd", {"weight": 0.5}), DIMS)
    batch = _batch(g)
    total, _ = head.loss(batch)
    f_v, f_s, logits = _encoded(head, batch)
    expected = F.cross_entropy(logits, batch["label"]) + 0.5 * cdd_loss(f_v, f_s, batch["label"])
    assert torch.isclose(total, expected, rtol=1e-5)


def test_team_token_alignment_trains_the_shared_visual_encoder():
    g = torch.Generator().manual_seed(4)
    cfg = method_config("team", {"ce_weight": 0.0, "global_weight": 0.0})
    head = build_head("team", cfg, DIMS)
    batch = _batch(g, tokens=True)
    total, parts = head.loss(batch)
    total.backward()
    assert head.visual_encoder.linear.weight.grad.abs().sum() > 0  # tokens pass through E_v
    assert head.classifier.weight.grad is None or head.classifier.weight.grad.abs().sum() == 0
    # the global term is plain ITA on the pooled features
    with_global = build_head("team", method_config("team", {"ce_weight": 0.0}), DIMS)
    with_global.load_state_dict(head.state_dict())
    f_v, f_s, _ = _encoded(head, batch)
    plus, _ = with_global.loss(batch)
    assert torch.isclose(plus - total.detach(), ita_loss(f_v, f_s, 0.07), rtol=1e-4)


def test_a_baseline_loss_needs_its_own_settings():
    with pytest.raises(ValueError, match="--method swd"):
        AlignedClassifier(AlignConfig(loss="swd"), DIMS)


def test_multi_positive_reaches_ita_and_team_contrastive_terms():
    g = torch.Generator().manual_seed(9)
    dims = Dims(visual=6, text=5, classes=9)  # room for one class per sample below
    batch = _batch(g, tokens=True)
    y = batch["label"]
    ita = build_head("ita", method_config("ita", {"multi_positive": True, "ce_weight": 0.0}), dims)
    f_v, f_s, _ = _encoded(ita, batch)
    assert torch.isclose(ita.loss(batch)[0], ita_loss(f_v, f_s, 0.07, y))
    heads = {gw: build_head("team", method_config("team", {"multi_positive": True,
                                                          "ce_weight": 0.0,
                                                          "global_weight": gw}), dims)
             for gw in (0.0, 1.0)}
    heads[1.0].load_state_dict(heads[0.0].state_dict())
    f_v, f_s, _ = _encoded(heads[0.0], batch)
    global_term = heads[1.0].loss(batch)[0] - heads[0.0].loss(batch)[0]
    assert torch.isclose(global_term, ita_loss(f_v, f_s, 0.07, y), rtol=1e-4)
    # with one sample per class, multi-positive is the one-positive InfoNCE
    distinct = {**batch, "label": torch.arange(len(y))}
    single = build_head("team", method_config("team", {"ce_weight": 0.0}), dims)
    single.load_state_dict(heads[1.0].state_dict())
    assert torch.isclose(heads[1.0].loss(distinct)[0], single.loss(distinct)[0])
    assert not torch.isclose(heads[1.0].loss(batch)[0], single.loss(batch)[0])
