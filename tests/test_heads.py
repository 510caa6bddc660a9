"""Heads: each MARNet variant trains, selects on val, and classifies from visual features only."""

import json

import pytest
import torch

from marnet.pipeline.engine.runs import load_run
from marnet.pipeline.engine.splits import held_out_split
from marnet.pipeline.engine.training import TrainConfig
from marnet.pipeline.models.heads import Dims, build_head, method_config
from marnet.pipeline.models.heads.common import ConditionalDenoiser, ProjectionEncoder
from marnet.pipeline.models.heads.marnet import FusionHead
from marnet.pipeline.models.losses import fuse_logits
from marnet.pipeline.stage2.evaluate import evaluate_run
from marnet.pipeline.stage2.train import train_heads

SMALL = {"diffusion.hidden": 32, "diffusion.schedule.steps": 20, "fusion_samples": 2}


def test_ema_encoder_is_linear_plus_leaky_relu():
    enc = ProjectionEncoder(3, 2)
    x = torch.tensor([[1.0, -2.0, 0.5]])
    pre = enc.linear(x)
    assert torch.allclose(enc(x), torch.where(pre >= 0, pre, 0.01 * pre))


def test_denoiser_is_four_linear_layers_on_concatenated_inputs():
    den = ConditionalDenoiser(x_dim=5, cond_dim=7, hidden=16, t_dim=8)
    linears = [m for m in den.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4
    assert linears[0].in_features == 5 + 7 + 8 and linears[-1].out_features == 5
    assert den(torch.randn(3, 5), torch.tensor([1, 5, 9]), torch.randn(3, 7)).shape == (3, 5)


def test_add_and_mul_fusion_need_equal_dims():
    with pytest.raises(ValueError, match="equal"):
        FusionHead("add", 8, 16, 3)
    assert FusionHead("concat", 8, 16, 3)(torch.randn(2, 8), torch.randn(2, 16)).shape == (2, 3)


def test_predict_uses_visual_features_only():
    dims = Dims(visual=6, text=4, classes=3)
    head = build_head("marnet", method_config("marnet", SMALL), dims)
    visual = torch.randn(5, 6)
    logits = head.predict(visual, torch.Generator().manual_seed(0))
    assert logits.shape == (5, 3)
    with torch.no_grad():  # the text side (E_s) is trained, never used at test time
        for param in head.ema.text_encoder.parameters():
            param.add_(torch.randn_like(param))
    assert torch.equal(head.predict(visual, torch.Generator().manual_seed(0)), logits)
    with torch.no_grad():  # while the visual side is
        for param in head.ema.visual_encoder.parameters():
            param.add_(torch.randn_like(param))
    assert not torch.equal(head.predict(visual, torch.Generator().manual_seed(0)), logits)
    # the same noise gives the same prediction; the chain is stochastic otherwise
    a = head.predict(torch.ones(2, 6), torch.Generator().manual_seed(1))
    b = head.predict(torch.ones(2, 6), torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_held_out_split_is_stratified_and_disjoint():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2)
    tr, va = held_out_split(labels, 0.2, seed=0)
    assert set(tr.tolist()).isdisjoint(va.tolist()) and len(tr) + len(va) == 17
    assert sorted(labels[va].tolist()) == [0, 0, 1, 2]


@pytest.mark.parametrize("method,overrides,stages", [
    ("visual", {}, ["align"]),
    ("marnet", {"variant": "ema"}, ["align"]),
    ("marnet", {"variant": "mlp"}, ["mlp"]),
    ("marnet", {"variant": "cdr"}, ["cdr"]),
    ("marnet", {"variant": "full"}, ["ema+cdr", "fusion"]),
    ("marnet", {"variant": "full", "fusion": "hm"}, ["ema+cdr", "fusion"]),
    ("marnet", {"variant": "full", "fusion": "mul", "joint": True}, ["ema+cdr"]),
])
def test_each_variant_trains_and_writes_a_run(tiny_cache, tmp_path, method, overrides, stages):
    out = tmp_path / "run"
    results = train_heads(tiny_cache, method, out, {**(SMALL if method == "marnet" else {}),
                                                    **overrides},
                          TrainConfig(epochs=2, batch_size=8, device="cpu"), log=lambda _: None)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["stage"] for l in lines] == [s for s in stages for _ in range(2)]
    assert all(any(k.startswith("val_top1") for k in l) for l in lines)
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["validation"] == "val split"
    reloaded = evaluate_run(out, "test", device="cpu", log=lambda _: None)
    assert (reloaded["top1"], reloaded["top5"]) == (results["test"]["top1"],
                                                    results["test"]["top5"])  # what was saved
    model, _ = load_run(out)
    assert model.predict(torch.randn(3, config["dims"]["visual"])).shape == (3, 4)


def test_fusion_stage_never_reads_text(tiny_cache):
    """Stage (b) trains on x_CDR sampled from noise given x_v, as at test: poisoning the text
    after stage (a) must not reach it."""
    from marnet.pipeline.engine.training import HeadsModel, run_stage
    from marnet.pipeline.models.heads import SplitData, TrainContext
    from marnet.pipeline.store import FeatureCache

    cache = FeatureCache(tiny_cache)
    train = cache.load_split("train")
    val = cache.load_split("val")
    dims = Dims(cache.dim("visual"), cache.dim("text"), 4)
    model = HeadsModel("marnet", method_config("marnet", SMALL), dims)
    model.norm_visual.fit(train["visual"])
    model.norm_text.fit(train["text"])
    norm = lambda d: SplitData({"visual": model.norm_visual(d["visual"]),
                                "text": model.norm_text(d["text"]), "label": d["label"]})
    tr, va = norm(train), norm(val)
    ctx = TrainContext(torch.device("cpu"), torch.Generator().manual_seed(0))
    stage_a, stage_b = model.head.stages(tr, va, ctx)
    cfg = TrainConfig(epochs=1, batch_size=8)
    run_stage(stage_a, tr, cfg, ctx, "fp32", lambda _: None)
    tr.tensors["text"] = torch.full_like(tr["text"], float("nan"))
    records, prepared = [], {}
    make_rows = stage_b.prepare
    stage_b.prepare = lambda: prepared.update(make_rows()) or prepared
    run_stage(stage_b, tr, cfg, ctx, "fp32", records.append)
    assert records and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert torch.isfinite(prepared["x_cdr_draws"]).all()
    assert prepared["x_cdr_draws"].shape[:2] == (len(tr), 2)  # 2 sampled x_CDR per train row
    assert prepared["x_ema"].shape[0] == len(tr)


def test_standardizer_floors_dims_that_are_constant_on_train():
    from marnet.pipeline.models.heads import Standardizer

    train = torch.randn(100, 4)
    train[:, 3] = 0.0  # a ReLU unit dead on the train split
    norm = Standardizer(4).fit(train)
    assert torch.allclose(norm(train)[:, :3].std(0, unbiased=False), torch.ones(3), atol=1e-4)
    test_row = torch.tensor([[0.0, 0.0, 0.0, 0.5]])  # the dead unit fires at test time
    floor = 0.1 * train.std(0, unbiased=False).median()  # over every dim, the dead one too
    assert torch.isclose(norm(test_row)[0, 3], 0.5 / floor, rtol=1e-3)
    assert norm(test_row).abs().max() < 100


@pytest.mark.parametrize("mode", ["concat", "sum", "hm"])
def test_fusion_can_start_from_the_branch_classifiers(mode):
    ema, cdr = torch.nn.Linear(4, 3), torch.nn.Linear(6, 3)
    fusion = FusionHead(mode, 4, 6, 3)
    fusion.init_from_branches(ema, cdr)
    x_ema, x_cdr = torch.randn(5, 4), torch.randn(5, 6)
    with torch.no_grad():
        if mode == "concat":  # starts as the sum of the two branches' logits
            assert torch.allclose(fusion(x_ema, x_cdr), ema(x_ema) + cdr(x_cdr), atol=1e-6)
        else:
            assert torch.allclose(fusion(x_ema, x_cdr), fuse_logits(ema(x_ema), cdr(x_cdr), mode))


def test_marnet_fusion_stage_starts_from_its_trained_branches(tiny_cache, tmp_path):
    out = tmp_path / "run"  # lr 0: nothing moves after init, so the saved fusion is its start
    train_heads(tiny_cache, "marnet", out, SMALL,
                TrainConfig(epochs=1, batch_size=8, lr=0.0, device="cpu"), log=lambda _: None)
    head = load_run(out)[0].head
    d = head.ema.classifier.in_features
    weight = head.fusion.classifier.weight
    assert torch.equal(weight[:, :d], head.ema.classifier.weight)
    assert torch.equal(weight[:, d:], head.cdr.classifier.weight)
    assert torch.equal(head.fusion.classifier.bias,
                       head.ema.classifier.bias + head.cdr.classifier.bias)


@pytest.mark.parametrize("variant, names", [
    ("full", {"ema_logits", "x_cdr", "cdr_logits", "fusion_logits"}),
    ("cdr", {"x_cdr", "cdr_logits"}), ("mlp", {"mlp_map", "mlp_logits"}), ("ema", {"ema_logits"})])
def test_marnet_representations_are_its_prediction_branch_by_branch(variant, names):
    head = build_head("marnet", method_config("marnet", {**SMALL, "variant": variant}),
                      Dims(visual=6, text=4, classes=3))
    visual = torch.randn(5, 6)
    rep = head.representations(visual, torch.Generator().manual_seed(3))
    assert set(rep) == names
    prediction = {"full": "fusion_logits", "cdr": "cdr_logits", "mlp": "mlp_logits",
                  "ema": "ema_logits"}[variant]
    assert torch.allclose(rep[prediction], head.predict(visual, torch.Generator().manual_seed(3)))
