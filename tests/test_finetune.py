"""End-to-end training: every method trains its backbone, one loss definition for both paths,
resume, the checkpoint classifies on its own, provenance."""

import json

import pytest
import torch
from safetensors.torch import load_file

from marnet.pipeline.core.config import ConfigError
from marnet.pipeline.engine.backbones import VisionSpec, build_vision, read_checkpoint_meta
from marnet.pipeline.engine.runs import FinetuneError, load_finetuned
from marnet.pipeline.engine.training import HeadsModel
from marnet.pipeline.models.heads import Dims, SplitData, TrainContext, method_config
from marnet.pipeline.stage1.extract import extract
from marnet.pipeline.stage1.finetune import (
    END_TO_END_DEFAULTS,
    FINETUNE_METHODS,
    EndToEnd,
    FinetuneConfig,
    finetune,
    finetune_settings,
    trainable_prefix,
)
from marnet.pipeline.stage2.evaluate import evaluate_finetuned, finetuned_logits
from marnet.pipeline.store import FeatureCache
from marnet.pipeline.tools.ablate import _finetuned_result

SMALL = {"marnet": {"diffusion.hidden": 32, "diffusion.schedule.steps": 10,
                    "fusion_samples": 1},
         "seda": {"dsl.hidden": 32, "dst.hidden": 32, "dsl.schedule.steps": 10,
                  "dst.schedule.steps": 10, "dsl.steps": 3, "dst.steps": 3,
                  "dst.test_samples": 1}}

# every method finetune takes, with its Table 2 rows and staged/joint variants
METHOD_CASES = [(m, None, {}) for m in FINETUNE_METHODS if m != "team"] + [
    ("marnet", row, {}) for row in ("ema", "mlp", "cdr")] + [
    ("marnet", None, {"joint": True}), ("seda", None, {"joint": False}),
    ("seda", None, {"variant": "dst-only"}), ("seda", None, {"variant": "dsl-only"}),
    ("seda", None, {"variant": "one-step"}), ("seda", None, {"dsl.visual_ce": 0.0})]


def test_seda_fine_tunes_with_its_end_to_end_defaults_unless_set_otherwise():
    """When a backbone trains, SeDA's DSL has R-3 step 1's visual classifier on, its prototype
    temperature is the semantic dim, and DSL and DST train jointly where both exist (not when
    a staged setting is asked for); on cached features none of it; --set wins."""
    def seda(**settings):
        cfg = FinetuneConfig(dataset="synthfood", root=".", out="x", method="seda",
                             settings=settings)
        return cfg.head()[1]

    default = seda()
    assert (default.dsl.visual_ce, default.dsl.tau_c, default.joint) == (1.0, None, True)
    assert default.cross_fit_folds == 1
    assert seda(**{"dsl.visual_ce": 0.0}).dsl.visual_ce == 0.0
    assert seda(**{"dsl.visual_ce": 2.5, "dsl.tau_c": 1.0}).dsl.tau_c == 1.0
    staged = seda(joint=False)
    assert not staged.joint and staged.cross_fit_folds == 5 and staged.dsl.visual_ce == 1.0
    assert not seda(**{"dsl.cross_fit": "3"}).joint
    single = seda(variant="dst-only")
    assert not single.joint and single.dsl.visual_ce == 1.0
    on_cache = method_config("seda", {})
    assert (on_cache.dsl.visual_ce, on_cache.dsl.tau_c, on_cache.joint) == (0.0, 1.0, False)
    ce = FinetuneConfig(dataset="synthfood", root=".", out="x", method="ce").head()[1]
    assert not hasattr(ce, "dsl")


def test_a_changed_default_changes_the_settings_a_fine_tune_is_reused_by(monkeypatch):
    """``ablate --finetune`` reuses a fine-tune with equal settings: they hold the method's
    resolved config, so a run made under other defaults is trained again."""
    cfg = FinetuneConfig(dataset="synthfood", root=".", out="x", method="seda")
    before = finetune_settings(cfg)
    assert before["method_config"]["dsl"]["visual_ce"] == 1.0
    monkeypatch.setitem(END_TO_END_DEFAULTS, "seda", lambda _: {})
    after = finetune_settings(cfg)
    assert after["method_config"]["dsl"]["visual_ce"] == 0.0
    assert {k: v for k, v in after.items() if k != "method_config"} == {
        k: v for k, v in before.items() if k != "method_config"}


def _cfg(synth_root, tmp_path, method, cache=None, **changes):
    name = changes.pop("name", method)
    settings = dict(dataset="synthfood", root=synth_root, out=tmp_path / f"{name}.safetensors",
                    vision=VisionSpec("test_efficientnet", "random", image_size=32, crop_pct=1.0),
                    method=method, text_cache=cache, epochs=1, batch_size=8, num_workers=0,
                    device="cpu", head_epochs=2,
                    settings=dict(SMALL.get(method, {}), **changes.pop("settings", {})))
    return FinetuneConfig(**{**settings, **changes})


def _live(method, ablation, settings, tokens=False, seed=0):
    """A backbone, its head and the head's first stage on a batch of random images."""
    cfg = FinetuneConfig(dataset="synthfood", root=".", out="x", method=method,
                         ablation=ablation, settings={**SMALL.get(method, {}), **settings})
    name, method_cfg = cfg.head()
    torch.manual_seed(seed)
    vision = build_vision(VisionSpec("test_efficientnet", "random", image_size=32))
    vision.to_runtime(torch.device("cpu"))
    dims = Dims(vision.dim, 12, 3)
    heads = HeadsModel(name, method_cfg, dims)
    g = torch.Generator().manual_seed(seed)
    rows = 12
    tensors = {"label": torch.arange(rows) % 3, "text": torch.randn(rows, 12, generator=g)}
    if tokens:
        tensors.update(text_tokens=torch.randn(rows, 5, 12, generator=g),
                       text_mask=(torch.arange(5) < 3).repeat(rows, 1))
    ctx = TrainContext(torch.device("cpu"), torch.Generator().manual_seed(seed),
                       moving_features=True)
    split = SplitData(tensors)
    stage = heads.head.stages(split, SplitData({"label": tensors["label"]}), ctx)[0]
    images = torch.randint(0, 255, (rows, 3, 32, 32), dtype=torch.uint8, generator=g)
    return vision, heads, stage, split, images, ctx


@pytest.mark.parametrize("method,ablation,settings", METHOD_CASES + [("team", None, {})])
def test_one_end_to_end_step_moves_the_backbone(method, ablation, settings):
    vision, heads, stage, split, images, _ = _live(method, ablation, settings,
                                                   tokens=method == "team")
    start = {k: v.clone() for k, v in vision.model.state_dict().items()}
    vision.model.train()
    params = [*vision.model.parameters(), *(p for m in stage.modules for p in m.parameters())]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    net = EndToEnd(vision, heads, "fp32", 0.1)
    loss, _ = net.step(stage, optimizer, images, torch.arange(len(images)), split)
    assert torch.isfinite(loss)
    moved = [k for k, v in vision.model.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, start[k])]
    assert any(k.endswith("weight") for k in moved), "the step must train the backbone"


class FixedFeatures:
    """A 'backbone' whose features are given: the end-to-end path on fixed features."""

    def __init__(self, features):
        self.features_of = features

    def features(self, images, precision="fp32"):
        return self.features_of[images]


@pytest.mark.parametrize("method,ablation,settings", METHOD_CASES)
def test_end_to_end_loss_on_fixed_features_is_the_stage_two_loss(method, ablation, settings):
    """The loss a fine-tune trains with is the stage-two loss of the same head: with the same
    features, statistics and noise, the two paths give the same number."""
    _, heads, stage, split, _, ctx = _live(method, ablation, settings)
    feats = torch.randn(len(split), heads.norm_visual.mean.shape[0],
                        generator=torch.Generator().manual_seed(1))
    index = torch.arange(len(split))
    net = EndToEnd(FixedFeatures(feats), heads, "fp32", 0.1)  # first step: batch statistics
    ctx.generator.manual_seed(5)
    live = stage.loss(net.batch(stage, index, index, split))[0]
    heads.norm_visual.fit(feats)  # stage two: exact statistics of the (same) rows
    cached = {"visual": heads.norm_visual(feats),
              **{k: split[k] for k in stage.fields if k != "visual"}}
    ctx.generator.manual_seed(5)
    assert torch.allclose(live, stage.loss(cached)[0], rtol=1e-5)


@pytest.mark.parametrize("method", ["ce", "ita", "marnet", "seda"])
def test_finetune_trains_and_saves_a_network_that_classifies(synth_root, tiny_cache, tmp_path,
                                                             method):
    start = build_vision(VisionSpec("test_efficientnet", "random")).model.state_dict()
    meta = finetune(_cfg(synth_root, tmp_path, method, tiny_cache), log=lambda _: None)
    tuned = load_file(str(tmp_path / f"{method}.safetensors"))
    assert any(v.is_floating_point() and not torch.equal(v, tuned[f"backbone.{k}"])
               for k, v in start.items())
    assert any(k.startswith("heads.head.") for k in tuned)
    assert meta["method"] == method and len(meta["history"]) == 1
    assert 0 <= meta["val_top1"] <= 100
    saved = read_checkpoint_meta(tmp_path / f"{method}.safetensors")
    assert saved["head_method"] == {"ce": "visual"}.get(method, method)
    if method == "marnet":  # the fusion stage ran on the frozen backbone, after the first stage
        assert [r["stage"] for r in saved["head_stages"]] == ["fusion", "fusion"]


def test_resume_after_an_interrupted_run_gives_the_uninterrupted_network(synth_root, tiny_cache,
                                                                         tmp_path, monkeypatch):
    import marnet.pipeline.stage1.finetune as ft

    full = _cfg(synth_root, tmp_path, "marnet", tiny_cache, epochs=2, name="full")
    finetune(full, log=lambda _: None)
    cfg = _cfg(synth_root, tmp_path, "marnet", tiny_cache, epochs=2, name="resumed")
    real = ft._save_state
    calls = []

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(args[1])
        raise KeyboardInterrupt  # killed right after epoch 1 was saved

    monkeypatch.setattr(ft, "_save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, log=lambda _: None)
    monkeypatch.setattr(ft, "_save_state", real)
    logs = []
    meta = finetune(cfg, log=logs.append)
    assert calls == [1]
    assert any("resuming fine-tuning after epoch 1" in line for line in logs)
    assert [h["epoch"] for h in meta["history"]] == [1, 2]
    resumed, uninterrupted = (load_file(str(tmp_path / f"{n}.safetensors"))
                              for n in ("resumed", "full"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_a_run_with_other_settings_is_not_resumed(synth_root, tiny_cache, tmp_path, monkeypatch):
    import marnet.pipeline.stage1.finetune as ft

    monkeypatch.setattr(ft, "_later_stages", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        finetune(_cfg(synth_root, tmp_path, "ita", tiny_cache), log=lambda _: None)
    with pytest.raises(FinetuneError, match="other settings"):
        finetune(_cfg(synth_root, tmp_path, "ita", tiny_cache, beta=0.5), log=lambda _: None)


def test_the_checkpoint_classifies_as_its_head_does_on_its_extracted_features(
        synth_root, tiny_cache, tmp_path, make_extract_config):
    """``eval --finetuned`` (backbone + head from the images) equals the checkpoint's head on
    the features ``extract --finetuned`` caches (float32, same batches): both paths agree."""
    ckpt = tmp_path / "marnet.safetensors"
    finetune(_cfg(synth_root, tmp_path, "marnet", tiny_cache), log=lambda _: None)
    logits, labels, meta = finetuned_logits(ckpt, "test", device="cpu", num_workers=0,
                                            log=lambda _: None)
    cache = extract(make_extract_config(synth_root, tmp_path / "cache", dtype="float32",
                                        vision=VisionSpec(finetuned=str(ckpt))),
                    log=lambda _: None).path
    test = FeatureCache(cache).load_split("test", ("visual", "label"))
    _, heads, _ = load_finetuned(ckpt, torch.device("cpu"), tmp_path / "cache" / "weights")
    cached = heads.predict(test["visual"], torch.Generator().manual_seed(meta["seed"]))
    assert torch.equal(labels, test["label"])
    assert torch.allclose(logits, cached, atol=1e-4)
    assert torch.equal(logits.argmax(1), cached.argmax(1))


def test_team_needs_token_text_features(synth_root, tiny_cache, tiny_token_cache, tmp_path):
    with pytest.raises(FinetuneError, match="--tokens"):
        finetune(_cfg(synth_root, tmp_path, "team", tiny_cache), log=lambda _: None)
    meta = finetune(_cfg(synth_root, tmp_path, "team", tiny_token_cache), log=lambda _: None)
    assert meta["head_method"] == "team" and meta["history"][0]["team"] > 0


def test_ce_trains_without_a_text_cache(synth_root, tmp_path):
    meta = finetune(_cfg(synth_root, tmp_path, "ce", head_epochs=1), log=lambda _: None)
    assert meta["text_cache_key"] is None and len(meta["history"]) == 1
    assert (tmp_path / "ce.safetensors").is_file()


def test_methods_reading_text_need_a_text_cache(synth_root, tmp_path):
    for method in ("ita", "marnet", "seda"):
        with pytest.raises(FinetuneError, match="--text-cache"):
            finetune(_cfg(synth_root, tmp_path, method), log=lambda _: None)


def test_sugar_options_map_onto_the_method_settings():
    cfg = FinetuneConfig(dataset="d", root=".", out="x", method="marnet", beta=0.5, tau=0.1)
    name, method_cfg = cfg.head()
    assert name == "marnet" and method_cfg.ema.weight == 0.5 and method_cfg.ema.tau == 0.1
    name, method_cfg = FinetuneConfig(dataset="d", root=".", out="x", method="ita-mp").head()
    assert name == "ita" and method_cfg.multi_positive
    with pytest.raises(FinetuneError, match="--set"):
        FinetuneConfig(dataset="d", root=".", out="x", method="seda", beta=1.0).head()
    with pytest.raises(FinetuneError, match="ablation"):
        FinetuneConfig(dataset="d", root=".", out="x", method="ita", ablation="ema").head()
    with pytest.raises(ConfigError, match="--lr must be >= 0, got -1"):
        FinetuneConfig(dataset="d", root=".", out="x", lr=-1)


@pytest.mark.parametrize("model", ["test_efficientnet", "test_vit"])
def test_last_k_freezes_the_rest(model):
    net = build_vision(VisionSpec(model, "random")).model
    frozen = trainable_prefix(net, "last-1")
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(f"blocks.{len(net.blocks) - 1}.") or
                             not n.startswith(("blocks.", "patch_embed", "conv_stem", "bn1"))
                             for n in trainable)
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in net.blocks[-1].parameters())
    # module-level parameters before the blocks (ViT's cls_token and pos_embed) are frozen too
    assert not any(n in trainable for n in ("cls_token", "pos_embed"))
    with pytest.raises(FinetuneError, match="last-K"):
        trainable_prefix(net, "some")


def test_extract_with_a_finetuned_checkpoint_records_its_provenance(synth_root, tiny_cache,
                                                                    tmp_path, make_extract_config):
    finetune(_cfg(synth_root, tmp_path, "ita", tiny_cache, beta=0.5), log=lambda _: None)
    cfg = make_extract_config(synth_root, tmp_path / "cache",
                              vision=VisionSpec(finetuned=str(tmp_path / "ita.safetensors")))
    result = extract(cfg, log=lambda _: None)
    manifest = FeatureCache(result.path).manifest
    prov = manifest["inputs"]["visual"]["finetuned"]
    assert prov["method"] == "ita" and prov["method_config"]["weight"] == 0.5
    assert prov["model"] == "test_efficientnet" and "source" not in prov
    assert manifest["inputs"]["visual"]["data_config"]["input_size"] == [3, 32, 32]
    assert result.path.name != tiny_cache.name

    # the same fine-tune again (same weights, other epoch times) is the same cache
    again = tmp_path / "again" / "ita.safetensors"
    finetune(_cfg(synth_root, tmp_path, "ita", tiny_cache, beta=0.5, out=again),
             log=lambda _: None)
    assert read_checkpoint_meta(again)["history"][0]["seconds"] >= 0  # still in the checkpoint
    rerun = extract(make_extract_config(synth_root, tmp_path / "cache",
                                        vision=VisionSpec(finetuned=str(again))),
                    log=lambda _: None)
    assert rerun.reused and rerun.path == result.path
    assert "seconds" not in json.dumps(manifest["inputs"])


def test_without_a_val_split_selection_holds_out_train_never_test(tmp_path, write_folder):
    """A folder dataset with train and test only: validation comes from train."""
    from marnet.pipeline.datasets import load_dataset
    from marnet.pipeline.stage1.finetune import selection_split

    root = write_folder(tmp_path / "f", with_val=False)
    info = load_dataset("folder", root)
    text = {"text": torch.arange(len(info.splits["train"]))}
    train, val, rows, how = selection_split(info, text, seed=0)
    test_ids = {r.id for r in info.splits["test"]}
    assert val and not test_ids & {r.id for r in val}
    assert not {r.id for r in train} & {r.id for r in val}
    assert len(train) + len(val) == len(info.splits["train"]) and "held out" in how
    ids = [r.id for r in info.splits["train"]]
    assert [ids[i] for i in rows["text"].tolist()] == [r.id for r in train]


def test_seda_cross_fits_and_refits_after_the_backbone_is_frozen(synth_root, tiny_cache,
                                                                  tmp_path):
    """End to end, SeDA's DSL trains with the backbone; the fold DSLs of ``dsl.cross_fit``, DST
    and the ``C_f`` refit train on the frozen backbone's features afterwards. The ablation's
    results hold how well ``z`` classifies the train rows stage 2 learnt from, val and test,
    and ``eval --finetuned`` measures test's as the fine-tune did."""
    settings = {"dsl.cross_fit": 2, "dst.classifier_input": "v+m+s", "dst.refit_samples": 2}
    cfg = _cfg(synth_root, tmp_path, "seda", tiny_cache, settings=settings)
    (tmp_path / "row").mkdir()
    result = _finetuned_result(tmp_path / "row", cfg, lambda _: None)
    assert json.loads((tmp_path / "row" / "results.json").read_text()) == result
    prepared = result["diagnostics"]["dst+pfin"]
    assert set(prepared) == {"z_top1_train", "z_top1_val"}
    assert result["val"]["diagnostics"]["z_top1"] == prepared["z_top1_val"]
    evaluated = evaluate_finetuned(cfg.out, "test", device="cpu", num_workers=0,
                                   log=lambda _: None)
    assert evaluated["diagnostics"] == result["test"]["diagnostics"]
    assert evaluated["top1"] == result["test"]["top1"]
    saved = read_checkpoint_meta(tmp_path / "seda.safetensors")
    stages = [r["stage"] for r in saved["head_stages"]]
    assert stages == [s for s in ("dsl-fold0", "dsl-fold1", "dst+pfin", "classifier")
                      for _ in range(2)]
    tuned = load_file(str(tmp_path / "seda.safetensors"))
    assert not any(".fold" in k for k in tuned)  # fold DSLs are not part of the network
