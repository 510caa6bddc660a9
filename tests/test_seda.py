"""SeDA (reconstructed from the abstract, methods §2.3): DSL centres, PFIN, the DST chain,
every methods §2.4 variant trained on the tiny cache and classifying from visual features only."""

import json

import pytest
import torch
from typer.testing import CliRunner

from marnet.cli import app
from marnet.pipeline.engine.runs import load_run
from marnet.pipeline.engine.training import HeadsModel, TrainConfig, run_stage
from marnet.pipeline.models.heads import Dims, SplitData, TrainContext, build_head, method_config
from marnet.pipeline.models.heads.seda import (
    PFIN,
    DSTConfig,
    PFINConfig,
    class_centres,
    prototype_logits,
)
from marnet.pipeline.stage2.evaluate import evaluate_run
from marnet.pipeline.stage2.train import train_heads
from marnet.pipeline.store import FeatureCache

SMALL = {"dsl.hidden": 32, "dst.hidden": 32, "dsl.schedule.steps": 20,
         "dst.schedule.steps": 20, "dsl.steps": 5, "dst.steps": 5, "dsl.val_steps": 3,
         "dst.val_steps": 3}


def test_class_centres_are_exact_means():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 3, generator=g)
    y = torch.tensor([0, 2, 2, 0, 1, 2, 0, 0, 1, 2, 2])
    centres = class_centres(x, y, classes=4)
    for k in range(3):
        assert torch.allclose(centres[k], x[y == k].mean(dim=0), atol=1e-6)
    assert torch.equal(centres[3], torch.zeros(3)), "a class with no rows has a zero centre"


def test_prototype_logits_are_negative_scaled_squared_distances():
    g = torch.Generator().manual_seed(1)
    z, c = torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g)
    expected = torch.tensor([[-((zi - ck) ** 2).sum().item() / 0.5 for ck in c] for zi in z])
    assert torch.allclose(prototype_logits(z, c, 0.5), expected, atol=1e-4)


def _pfin(interact: bool, recurrent: bool = False) -> PFIN:
    torch.manual_seed(0)
    return PFIN(semantic_dim=6, text_dim=5, dst=DSTConfig(hidden=16, t_dim=8),
                cfg=PFINConfig(recurrent=recurrent), interact=interact)


def test_pfin_gate_shapes_and_gated_update():
    pfin = _pfin(interact=True)
    z, s_t, t = torch.randn(4, 6), torch.randn(4, 5), torch.tensor([1, 3, 7, 20])
    base = pfin.project(z)
    gate = pfin.gate(base, s_t, t)
    assert gate.shape == (4, 5) and bool(((gate > 0) & (gate < 1)).all())
    context = pfin._context(base, s_t, t)
    assert context.shape == (4, 5 + 5 + 8)
    mapped, s_hat = pfin(base, s_t, t)
    assert torch.allclose(mapped, base + gate * pfin.update(context), atol=1e-6)
    assert torch.allclose(s_hat, pfin.denoiser(s_t, t, mapped), atol=1e-6)
    assert s_hat.shape == (4, 5)


def test_no_pfin_mapped_feature_is_the_projection():
    pfin = _pfin(interact=False)
    assert pfin.update is None and pfin.gate_layer is None
    z, s_t, t = torch.randn(4, 6), torch.randn(4, 5), torch.tensor([2, 4, 6, 8])
    mapped, _ = pfin(pfin.project(z), s_t, t)
    assert torch.equal(mapped, pfin.project(z))
    # through the whole no-pfin head: the chain's final m is P z
    head = build_head("seda", method_config("seda", {**SMALL, "variant": "no-pfin"}),
                      Dims(visual=6, text=5, classes=3))
    with torch.no_grad():
        chain_mapped, _ = head.dst.translate(z, torch.Generator().manual_seed(0), 64)
        assert torch.equal(chain_mapped, head.dst.pfin.project(z))


def _manual_translate(head, z, seed):
    """The DST reverse chain written out with NoiseSchedule's DDIM step (independent loop)."""
    dst = head.dst
    schedule = dst.schedule
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(len(z), dst.text_dim, generator=g)
    start = mapped = dst.pfin.project(z)
    grid = schedule.ddim_timesteps(dst.cfg.steps)
    for i, t in enumerate(grid):
        tt = torch.full((len(z),), t)
        mapped, s_hat = dst.pfin(mapped if dst.pfin_cfg.recurrent else start, s, tt)
        if i == len(grid) - 1:
            return mapped, s_hat
        s = schedule.ddim_step(s_hat, s, t, grid[i + 1])


@pytest.mark.parametrize("recurrent", [False, True])
def test_translate_runs_pfin_at_every_reverse_step(recurrent):
    dims = Dims(visual=6, text=5, classes=3)
    head = build_head("seda", method_config("seda", {**SMALL, "pfin.recurrent": recurrent}), dims)
    z = torch.randn(7, 6)
    with torch.no_grad():
        mapped, s_hat = head.dst.translate(z, torch.Generator().manual_seed(3), chunk_rows=64)
        exp_mapped, exp_s_hat = _manual_translate(head, z, seed=3)
        chunked = head.dst.translate(z, torch.Generator().manual_seed(3), chunk_rows=3)
    assert torch.allclose(mapped, exp_mapped, atol=1e-5)
    assert torch.allclose(s_hat, exp_s_hat, atol=1e-5)
    assert chunked[0].shape == chunked[1].shape == (7, 5)


def test_recurrent_pfin_differs_from_non_recurrent():
    dims = Dims(visual=6, text=5, classes=3)
    z = torch.randn(3, 6)
    outs = []
    for recurrent in (False, True):
        torch.manual_seed(0)
        head = build_head("seda", method_config("seda", {**SMALL, "pfin.recurrent": recurrent}),
                          dims)
        with torch.no_grad():
            outs.append(head.dst.translate(z, torch.Generator().manual_seed(0), 64)[0])
    assert not torch.allclose(outs[0], outs[1]), "the recurrent m carries state across steps"


def test_predict_averages_the_logits_of_four_chains_by_default():
    dims = Dims(visual=6, text=5, classes=3)
    head = build_head("seda", method_config("seda", SMALL), dims).eval()
    visual = torch.randn(7, 6)
    chains = []
    translate = head.dst.translate
    head.dst.translate = lambda *a, **k: chains.append(1) or translate(*a, **k)
    logits = head.predict(visual, torch.Generator().manual_seed(0))
    assert len(chains) == head.cfg.dst.test_samples == 4
    gen = torch.Generator().manual_seed(0)
    each = [head.representations(visual, gen)["logits"] for _ in range(4)]
    assert torch.allclose(logits, torch.stack(each).mean(0), atol=1e-6)


def test_every_knob_is_a_setting():
    cfg = method_config("seda", {"dsl.hidden": 7, "dsl.lambda_h": 0.5, "dst.schedule.steps": 30,
                                 "dst.classifier_input": "s", "pfin.recurrent": "true",
                                 "pfin.hidden": 9, "dst.test_samples": 2})
    head = build_head("seda", cfg, Dims(visual=6, text=5, classes=3))
    assert head.dsl.denoiser.mlp.net[0].out_features == 7
    assert head.dsl.hidden_map.in_features == 7, "variant B maps the interactive feature"
    assert head.dst.schedule.T == 30 and head.dst.pfin_cfg.recurrent
    assert head.dst.classifier.in_features == 5, "C_f on s_hat_0 alone"
    assert head.dst.pfin.update.net[0].out_features == 9
    assert cfg.dsl.sampler == "ddim" and cfg.dsl.eta == 0.0 and cfg.dsl.schedule.steps == 100
    with pytest.raises(ValueError, match="variant"):
        build_head("seda", method_config("seda", {"variant": "bogus"}), Dims(6, 5, 3))
    with pytest.raises(ValueError, match="classifier_input"):
        build_head("seda", method_config("seda", {"dst.classifier_input": "x"}), Dims(6, 5, 3))


def test_only_stage_2_reads_text_and_dsl_learns_exact_centres(tiny_cache):
    """Stage 1 is intra-modal: with the text poisoned it trains, its centres are the exact
    train means of standardised x_v, and z for stage 2 comes from x_v alone. The C_f refit
    (stage 3) trains on sampled chains: poisoned text does not reach it either."""
    cache = FeatureCache(tiny_cache)
    train, val = cache.load_split("train"), cache.load_split("val")
    dims = Dims(cache.dim("visual"), cache.dim("text"), 4)
    model = HeadsModel("seda", method_config("seda", {**SMALL, "dst.refit_samples": 2,
                                                             "dsl.cross_fit": 1}), dims)
    model.norm_visual.fit(train["visual"])
    model.norm_text.fit(train["text"])
    norm = lambda d: SplitData({"visual": model.norm_visual(d["visual"]),
                                "text": torch.full_like(d["text"], float("nan")),
                                "label": d["label"]})
    tr, va = norm(train), norm(val)
    ctx = TrainContext(torch.device("cpu"), torch.Generator().manual_seed(0))
    head = model.head
    dsl_stage, dst_stage, refit_stage = head.stages(tr, va, ctx)
    records = []
    run_stage(dsl_stage, tr, TrainConfig(epochs=1, batch_size=8), ctx, "fp32", records.append)
    assert records and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    for k in range(4):
        expected = tr["visual"][tr["label"] == k].mean(dim=0)
        assert torch.allclose(head.dsl.centres[k], expected, atol=1e-5)
    rows = dst_stage.prepare()
    assert rows["z"].shape == tr["visual"].shape and torch.isfinite(rows["z"]).all()
    tr.tensors["text"] = model.norm_text(train["text"])
    run_stage(dst_stage, tr, TrainConfig(epochs=1, batch_size=8), ctx, "fp32", records.append)
    tr.tensors["text"] = torch.full_like(tr["text"], float("nan"))
    run_stage(refit_stage, tr, TrainConfig(epochs=1, batch_size=8), ctx, "fp32", records.append)
    assert [r["stage"] for r in records] == ["dsl", "dst+pfin", "classifier"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert torch.isfinite(model.predict(val["visual"], torch.Generator().manual_seed(0))).all()


AS_WRITTEN = {"dsl.cross_fit": 1, "dst.classifier_input": "m+s", "dst.refit_samples": 0}
FOLDS = [f"dsl-fold{k}" for k in range(5)]


@pytest.mark.parametrize("overrides,stages", [
    ({"variant": "full"}, ["dsl", *FOLDS, "dst+pfin", "classifier"]),
    ({"variant": "full", **AS_WRITTEN}, ["dsl", "dst+pfin"]),
    ({"variant": "full", "pfin.recurrent": True, "dsl.lambda_h": 0.5, "dsl.cross_fit": 1,
      "dst.refit_samples": 0}, ["dsl", "dst+pfin"]),
    ({"variant": "full", "dst.refit_samples": 2, "dsl.cross_fit": 1},
     ["dsl", "dst+pfin", "classifier"]),
    ({"variant": "one-step"}, ["one-step"]),
    ({"variant": "dst-only"}, ["dst+pfin", "classifier"]),
    ({"variant": "dsl-only"}, ["dsl"]),
    ({"variant": "no-pfin", **AS_WRITTEN}, ["dsl", "dst"]),
])
def test_each_variant_trains_and_predicts_from_visual_only(tiny_cache, tmp_path, overrides,
                                                           stages):
    out = tmp_path / "run"
    results = train_heads(tiny_cache, "seda", out, {**SMALL, **overrides},
                          TrainConfig(epochs=1, batch_size=8, device="cpu"), log=lambda _: None)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["stage"] for l in lines] == stages
    assert all(any(k.startswith("val_top1") for k in l) for l in lines)
    config = json.loads((out / "config.json").read_text())
    assert "reconstructed from the abstract" in config["summary"]
    assert config["method_config"]["variant"] == overrides["variant"]
    reloaded = evaluate_run(out, "test", device="cpu", log=lambda _: None)
    assert (reloaded["top1"], reloaded["top5"]) == (results["test"]["top1"],
                                                    results["test"]["top5"])  # what was saved
    model, _ = load_run(out)
    visual = torch.randn(3, config["dims"]["visual"])
    a = model.predict(visual, torch.Generator().manual_seed(1))
    b = model.predict(visual, torch.Generator().manual_seed(1))
    assert a.shape == (3, 4) and torch.equal(a, b), "image-only and repeatable given the noise"


def _seda_splits(tiny_cache, overrides):
    cache = FeatureCache(tiny_cache)
    train, val = cache.load_split("train"), cache.load_split("val")
    model = HeadsModel("seda", method_config("seda", {**SMALL, **overrides}),
                       Dims(cache.dim("visual"), cache.dim("text"), 4))
    model.norm_visual.fit(train["visual"])
    model.norm_text.fit(train["text"])
    norm = lambda d: SplitData({"visual": model.norm_visual(d["visual"]),  # noqa: E731
                                "text": model.norm_text(d["text"]), "label": d["label"]})
    return model, norm(train), norm(val)


def test_cross_fitting_gives_each_train_row_z_from_a_dsl_that_never_saw_it(tiny_cache):
    model, tr, va = _seda_splits(tiny_cache, {"dsl.cross_fit": 3})
    ctx = TrainContext(torch.device("cpu"), torch.Generator().manual_seed(0))
    stages = model.head.stages(tr, va, ctx)
    assert [s.name for s in stages] == ["dsl", "dsl-fold0", "dsl-fold1", "dsl-fold2", "dst+pfin",
                                       "classifier"]
    row_of = {tuple(v.tolist()): i for i, v in enumerate(tr["visual"])}
    seen: dict[str, set[int]] = {}
    for stage in stages[1:4]:  # record the rows each fold DSL is trained on, batch by batch
        fit = stage.loss

        def recording(batch, fit=fit, name=stage.name):
            seen.setdefault(name, set()).update(row_of[tuple(v.tolist())] for v in batch["visual"])
            return fit(batch)

        stage.loss = recording
    cfg = TrainConfig(epochs=2, batch_size=8)
    for stage in stages[:4]:
        run_stage(stage, tr, cfg, ctx, "fp32", lambda _: None)
    state = stages[4].prepare()
    z_fold = state["z_fold"]
    # the stage's diagnostics read the out-of-fold z it hands stage 2, and val's z
    centres = model.head.dsl.centres
    hit = lambda z, y: 100 * (torch.cdist(z, centres).argmin(1) == y).float().mean().item()  # noqa: E731
    val_z = model.head.semantic(va["visual"], ctx.eval_generator(), ctx.chunk_rows)
    assert stages[4].diagnostics(state) == pytest.approx(
        {"z_top1_train": hit(state["z"], tr["label"]), "z_top1_val": hit(val_z, va["label"])},
        abs=1e-3)
    assert set(z_fold.tolist()) == {0, 1, 2} and torch.isfinite(state["z"]).all()
    for row, fold in enumerate(z_fold.tolist()):
        name = f"dsl-fold{fold}"
        assert row not in seen[name], (row, name)  # never in a batch of its z's model
        assert row not in set(stages[1 + fold].train_rows.tolist())
    for k in range(3):  # each fold DSL trains on all the other folds' rows, stratified
        fitted = set(stages[1 + k].train_rows.tolist())
        assert seen[f"dsl-fold{k}"] <= fitted
        assert fitted == {r for r, f in enumerate(z_fold.tolist()) if f != k}
        held = tr["label"][z_fold == k]
        assert torch.bincount(held, minlength=4).min() >= 1
    # the saved head keeps the DSL fitted on all rows only
    assert not any(k.startswith("fold") for k in model.head.state_dict())


def test_cross_fit_defaults_to_five_folds_where_stage_two_reads_z_and_one_is_r2_as_written(
        tiny_cache, tmp_path):
    _, tr, va = _seda_splits(tiny_cache, {})
    ctx = TrainContext(torch.device("cpu"), torch.Generator().manual_seed(0))
    names = lambda overrides: [s.name for s in  # noqa: E731
                               _seda_splits(tiny_cache, overrides)[0].head.stages(tr, va, ctx)]
    assert names({}) == ["dsl", *FOLDS, "dst+pfin", "classifier"]
    assert names({"dsl.cross_fit": 1}) == ["dsl", "dst+pfin", "classifier"]
    assert names(AS_WRITTEN) == ["dsl", "dst+pfin"]
    for overrides in ({"joint": True}, {"variant": "dsl-only"}, {"variant": "dst-only"}):
        assert method_config("seda", overrides).cross_fit_folds == 1  # nothing reads train z
    # K = 1 hands stage 2 the z of the DSL fitted on all rows, as the reconstruction does
    model, tr, va = _seda_splits(tiny_cache, AS_WRITTEN)
    dsl_stage, dst_stage = model.head.stages(tr, va, ctx)
    run_stage(dsl_stage, tr, TrainConfig(epochs=1, batch_size=8), ctx, "fp32", lambda _: None)
    before = torch.Generator().set_state(ctx.generator.get_state())
    state = dst_stage.prepare()
    assert set(state) == {"z"}
    assert torch.equal(state["z"], model.head.semantic(tr["visual"], before, ctx.chunk_rows))
    for bad in ({"dsl.cross_fit": 2, "joint": True}, {"dsl.cross_fit": 2, "variant": "dsl-only"},
                {"dsl.cross_fit": 0}):
        with pytest.raises(ValueError, match="cross_fit"):
            method_config("seda", bad)


@pytest.mark.parametrize("cross_fit", [1, 2])
def test_a_run_records_how_well_z_classifies_train_val_and_test(tiny_cache, tmp_path, cross_fit):
    cfg = TrainConfig(epochs=1, batch_size=8, device="cpu", seed=3)
    out = tmp_path / "run"
    results = train_heads(tiny_cache, "seda", out, {**SMALL, "dsl.cross_fit": cross_fit}, cfg,
                          log=lambda _: None)
    prepared = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    prepared = [(r["stage"], r["epoch"], r["prepared"]) for r in prepared if "prepared" in r]
    assert prepared == [("dst+pfin", 1, results["diagnostics"]["dst+pfin"])]
    # val z at evaluation is the z stage 2 was selected with: one chain, the eval seed
    assert results["val"]["diagnostics"]["z_top1"] == \
        results["diagnostics"]["dst+pfin"]["z_top1_val"]
    model, _ = load_run(out)
    fc = FeatureCache(tiny_cache)
    test = fc.load_split("test")
    z = model.head.semantic(model.norm_visual(torch.as_tensor(test["visual"]).float()),
                            torch.Generator().manual_seed(3), 8192)
    nearest = torch.cdist(z, model.head.dsl.centres).argmin(1)
    expected = 100 * (nearest == torch.as_tensor(test["label"])).float().mean().item()
    assert results["test"]["diagnostics"]["z_top1"] == pytest.approx(expected, abs=1e-3)
    assert 0 <= results["diagnostics"]["dst+pfin"]["z_top1_train"] <= 100
    evaluated = evaluate_run(out, "test", device="cpu", log=lambda _: None)
    assert evaluated["diagnostics"] == results["test"]["diagnostics"]
    printed = CliRunner().invoke(app, ["eval", "--run", str(out), "--device", "cpu"])
    assert printed.exit_code == 0, printed.output
    assert f"head diagnostics: z_top1 {evaluated['diagnostics']['z_top1']:.2f}" in printed.output


def test_visual_ce_adds_a_class_signal_on_the_visual_feature_and_nothing_else(tiny_cache):
    """``dsl.visual_ce = w`` adds ``w * CE(W x_v, y)`` to the DSL's loss: the same draw gives
    the R-1 loss plus that term, and the gradient reaching ``x_v`` (end to end: the backbone)
    gains exactly w times the CE's. Without it the DSL has no such head."""
    plain, tr, _ = _seda_splits(tiny_cache, {})
    assert plain.head.dsl.visual_head is None
    aided, _, _ = _seda_splits(tiny_cache, {"dsl.visual_ce": 0.5})
    aided.head.dsl.load_state_dict(plain.head.dsl.state_dict(), strict=False)
    plain.head.dsl.fit_centres(tr["visual"], tr["label"])
    aided.head.dsl.fit_centres(tr["visual"], tr["label"])
    schedule = plain.head.dsl.schedule
    batch = {"visual": tr["visual"][:16].clone().requires_grad_(), "label": tr["label"][:16]}
    grads = []
    for head in (plain.head.dsl, aided.head.dsl):
        loss, parts = head.loss(batch, schedule, torch.Generator().manual_seed(4))
        grads.append(torch.autograd.grad(loss, batch["visual"])[0])
        totals = (loss, parts)
    ce = torch.nn.functional.cross_entropy(aided.head.dsl.visual_head(batch["visual"]),
                                           batch["label"])
    plain_loss = plain.head.dsl.loss(batch, schedule, torch.Generator().manual_seed(4))[0]
    assert torch.allclose(totals[0], plain_loss + 0.5 * ce, rtol=1e-6)
    assert torch.allclose(totals[1]["dsl_visual_ce"], ce.detach())
    ce_grad = torch.autograd.grad(ce, batch["visual"])[0]
    assert torch.allclose(grads[1], grads[0] + 0.5 * ce_grad, atol=1e-6)
    with pytest.raises(ValueError, match="visual_ce"):
        method_config("seda", {"dsl.visual_ce": -1.0})


def test_tau_c_none_is_the_semantic_dim(tiny_cache):
    """``dsl.tau_c = none`` divides the squared centre distances by ``d_z = d_v`` (the prototype
    logits per dimension); a given value is used as is, and a temperature must be positive."""
    by_dim, tr, _ = _seda_splits(tiny_cache, {"dsl.tau_c": None})
    given, _, _ = _seda_splits(tiny_cache, {"dsl.tau_c": 3.0})
    d_z = tr["visual"].shape[1]
    for head in (by_dim.head.dsl, given.head.dsl):
        head.fit_centres(tr["visual"], tr["label"])
    z = tr["visual"][:8]
    sq_dist = torch.cdist(z, by_dim.head.dsl.centres).pow(2)
    assert torch.allclose(by_dim.head.dsl.classify(z), -sq_dist / d_z, atol=1e-4)
    assert torch.allclose(given.head.dsl.classify(z), -sq_dist / 3.0, atol=1e-3)
    for bad in (0.0, -2.0):
        with pytest.raises(ValueError, match="tau_c"):
            method_config("seda", {"dsl.tau_c": bad})


def test_target_mix_moves_the_dsl_target_from_the_centre_toward_the_visual_feature(tiny_cache):
    """``dsl.target_mix = a``: the DSL regresses ``c_y + a (x_v - c_y)``; 0 is the class centre
    (R-1), 1 the visual feature, and no gradient reaches ``x_v`` through the target."""
    model, tr, _ = _seda_splits(tiny_cache, {"dsl.target_mix": 0.25})
    dsl = model.head.dsl
    dsl.fit_centres(tr["visual"], tr["label"])
    visual = tr["visual"][:8].clone().requires_grad_()
    labels = tr["label"][:8]
    centres = dsl.centres[labels]
    target = dsl.target(visual, labels)
    assert torch.allclose(target, 0.75 * centres + 0.25 * visual.detach(), atol=1e-6)
    assert not target.requires_grad
    for mix, expected in ((0.0, centres), (1.0, visual.detach())):
        dsl.cfg.target_mix = mix
        assert torch.allclose(dsl.target(visual, labels), expected, atol=1e-6)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="target_mix"):
            method_config("seda", {"dsl.target_mix": bad})
