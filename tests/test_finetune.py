"""Backbone fine-tuning: weights move, alignment losses decrease, resume, provenance."""

import json

import pytest
import torch
from safetensors.torch import load_file

from marnet.pipeline.backbones import VisionSpec, build_vision, read_checkpoint_meta
from marnet.pipeline.extract import extract
from marnet.pipeline.finetune import (
    FinetuneConfig,
    FinetuneError,
    FinetuneHead,
    finetune,
    trainable_prefix,
)
from marnet.pipeline.store import FeatureCache


def _cfg(synth_root, tmp_path, method, cache=None, **changes):
    settings = dict(dataset="synthfood", root=synth_root, out=tmp_path / f"{method}.safetensors",
                    vision=VisionSpec("test_efficientnet", "random", image_size=32, crop_pct=1.0),
                    method=method, text_cache=cache, epochs=1, batch_size=8, num_workers=0,
                    device="cpu")
    return FinetuneConfig(**{**settings, **changes})


@pytest.mark.parametrize("method", ["ce", "ita", "ita-mp", "sdm"])
def test_one_epoch_changes_the_backbone(synth_root, tiny_cache, tmp_path, method):
    start = build_vision(VisionSpec("test_efficientnet", "random")).model.state_dict()
    meta = finetune(_cfg(synth_root, tmp_path, method, tiny_cache), log=lambda _: None)
    tuned = load_file(str(tmp_path / f"{method}.safetensors"))
    changed = [k for k, v in start.items() if v.is_floating_point()
               and not torch.equal(v, tuned[f"backbone.{k}"])]
    assert changed, "fine-tuning must move the backbone weights"
    assert meta["method"] == method and len(meta["history"]) == 1
    assert read_checkpoint_meta(tmp_path / f"{method}.safetensors")["method"] == method


@pytest.mark.parametrize("method", ["ita", "ita-mp", "sdm"])
def test_alignment_loss_decreases_on_a_fixed_batch(method):
    torch.manual_seed(0)
    head = FinetuneHead(method, 16, 8, 3, proj_dim=8)
    feats = torch.randn(12, 16, requires_grad=True)
    text, labels = torch.randn(12, 8), torch.arange(12) % 3
    head.text_norm.fit(text)
    opt = torch.optim.Adam([feats, *head.parameters()], lr=0.05)
    losses = []
    for _ in range(30):
        loss = head.align(feats, labels, text)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_resume_after_an_interrupted_run(synth_root, tmp_path, monkeypatch):
    import marnet.pipeline.finetune as ft

    cfg = _cfg(synth_root, tmp_path, "ce", epochs=2)
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


def test_alignment_needs_a_text_cache(synth_root, tmp_path):
    with pytest.raises(FinetuneError, match="--text-cache"):
        finetune(_cfg(synth_root, tmp_path, "ita"), log=lambda _: None)


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
    assert prov["method"] == "ita" and prov["beta"] == 0.5 and prov["model"] == "test_efficientnet"
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
    from marnet.pipeline.finetune import selection_split

    root = write_folder(tmp_path / "f", with_val=False)
    info = load_dataset("folder", root)
    train, val, _, how = selection_split(info, None, seed=0)
    test_ids = {r.id for r in info.splits["test"]}
    assert val and not test_ids & {r.id for r in val}
    assert not {r.id for r in train} & {r.id for r in val}
    assert len(train) + len(val) == len(info.splits["train"]) and "held out" in how
