"""`marnet export`: a run or a checkpoint as one folder that classifies images with no cache,
no dataset and no network, exactly as `eval --end-to-end` does; its ONNX graph against
PyTorch with onnxruntime."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import marnet
from marnet.cli import app
from marnet.pipeline.core.config import ConfigError
from marnet.pipeline.datasets import load_dataset
from marnet.pipeline.engine.onnx_graph import draw_noise, require_onnx
from marnet.pipeline.engine.standalone import ModelFolderError, top_classes
from marnet.pipeline.engine.training import TrainConfig
from marnet.pipeline.models.schedule import NoiseFeed, NoiseSchedule, NoiseTally, ScheduleConfig
from marnet.pipeline.stage1.finetune import finetune
from marnet.pipeline.stage2.evaluate import finetuned_logits, run_logits
from marnet.pipeline.stage2.export import export_model
from marnet.pipeline.stage2.train import train_heads
from marnet.pipeline.store import FeatureCache

TINY_MARNET = {"diffusion.hidden": 32, "diffusion.schedule.steps": 10, "fusion_samples": 1}
DDIM_2 = {"diffusion.sampler": "ddim", "diffusion.steps": "2"}
# ONNX Runtime and PyTorch order float sums differently: logits of these tiny models (|z| < 5)
# agree to about 1e-5; the bound leaves room for other CPUs' kernels
ONNX_TOLERANCE = 1e-4


def _no_network(*args, **kwargs):
    raise AssertionError("a model folder must load and classify without the network")


def _private_copies(synth_root, tiny_cache, tmp_path):
    """A copy of the dataset and of the cache (its manifest pointing at the copied dataset),
    which the test may delete."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(synth_root, data)
    shutil.copytree(tiny_cache, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["dataset"]["root"] = str(data)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return data, cache


def _photos(data, tmp_path):
    """The test images copied out of the dataset (a user's photos), in split order."""
    photos = tmp_path / "photos"
    photos.mkdir()
    records = load_dataset("synthfood", data).splits["test"]
    return [Path(shutil.copy(r.image, photos / f"{i:02d}-{r.image.name}"))
            for i, r in enumerate(records)]


def test_a_model_folder_classifies_alone_as_eval_end_to_end(synth_root, tiny_cache, tmp_path,
                                                           monkeypatch):
    data, cache = _private_copies(synth_root, tiny_cache, tmp_path)
    run = tmp_path / "run"
    train_heads(cache, "visual", run, cfg=TrainConfig(epochs=1, batch_size=8, device="cpu"),
                log=lambda _: None)
    expected, _, _ = run_logits(run, end_to_end=True, root=data, device="cpu", num_workers=0,
                                log=lambda _: None)
    photos = _photos(data, tmp_path)
    meta = export_model(tmp_path / "model", run=run, log=lambda _: None)
    assert meta["sizes"]["cache"] == sum(p.stat().st_size for p in cache.rglob("*")
                                         if p.is_file())
    shutil.rmtree(cache)
    shutil.rmtree(data)
    shutil.rmtree(run)
    monkeypatch.setattr(socket.socket, "connect", _no_network)

    model = marnet.load_model(tmp_path / "model", device="cpu")
    assert torch.equal(model.logits(photos), expected)
    in_memory = [Image.open(p) for p in photos[:3]]
    assert torch.equal(model.logits(in_memory), model.logits(photos[:3]))
    result = CliRunner().invoke(app, ["predict", *map(str, photos), "--model",
                                      str(tmp_path / "model"), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    described = json.loads((tmp_path / "model" / "model.json").read_text())
    assert json.loads(result.stdout) == [
        {"image": str(p), "predictions": top}
        for p, top in zip(photos, top_classes(expected, described["class_names"], 5))]
    assert described["provenance"]["cache"]["key"] == FeatureCache(tiny_cache).key


@pytest.fixture(scope="module")
def marnet_export(tiny_cache, synth_root, tmp_path_factory):
    """A tiny MARNet (EMA + CDR + fusion) exported with ONNX, its chain set to DDIM-2."""
    base = tmp_path_factory.mktemp("marnet-export")
    train_heads(tiny_cache, "marnet", base / "run", TINY_MARNET,
                TrainConfig(epochs=1, batch_size=8, device="cpu"), log=lambda _: None)
    meta = export_model(base / "model", run=base / "run", onnx=True, check_split="test",
                        overrides=DDIM_2, log=lambda _: None)
    images = [r.image for r in load_dataset("synthfood", synth_root).splits["test"]]
    return base, meta, images


def test_marnet_samples_as_eval_does_and_its_onnx_graph_agrees(marnet_export):
    base, meta, images = marnet_export
    expected, _, _ = run_logits(base / "run", end_to_end=True, device="cpu", num_workers=0,
                                log=lambda _: None, overrides=DDIM_2)
    model = marnet.load_model(base / "model", device="cpu")
    assert torch.equal(model.logits(images), expected)  # the chains seeded as eval seeds them
    assert meta["head"]["method_config"]["diffusion"]["sampler"] == "ddim"
    assert meta["provenance"]["eval_overrides"] == DDIM_2
    # one DDIM chain with eta = 0 draws its start once: 384 (MiniLM) noise values per image
    assert meta["onnx"]["inputs"]["noise"] == ["batch", 384]
    random_check, split_check = meta["onnx"]["checks"]
    assert split_check["images"] == len(images) and split_check["top1_agreement"] == 1.0
    assert random_check["max_abs_logit_diff"] < ONNX_TOLERANCE
    assert split_check["max_abs_logit_diff"] < ONNX_TOLERANCE
    onnx_logits = marnet.load_model(base / "model", runtime="onnx").logits(images)
    assert (onnx_logits - expected).abs().max() < ONNX_TOLERANCE


def test_predict_runs_the_onnx_graph(marnet_export):
    base, _, images = marnet_export
    args = ["predict", *map(str, images[:4]), "--model", str(base / "model"), "--json",
            "--device", "cpu"]
    torch_out = CliRunner().invoke(app, args)
    onnx_out = CliRunner().invoke(app, [*args, "--onnx"])
    assert torch_out.exit_code == onnx_out.exit_code == 0, onnx_out.output
    for a, b in zip(json.loads(torch_out.stdout), json.loads(onnx_out.stdout)):
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        assert [p["probability"] for p in a["predictions"]] == pytest.approx(
            [p["probability"] for p in b["predictions"]], abs=ONNX_TOLERANCE)
    refused = CliRunner().invoke(app, ["predict", str(images[0]), "--run", str(base / "run"),
                                       "--onnx"])
    assert refused.exit_code == 2 and "pass --model DIR" in refused.output


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.5)])
def test_noise_drawn_for_the_graph_is_the_noise_the_chains_draw(sampler, eta):
    """The noise input the ONNX runtime draws from the seed equals the draws the PyTorch
    chain makes from a generator with that seed, so the two sample the same chain."""
    schedule = NoiseSchedule(ScheduleConfig(steps=6))
    weight = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))

    def denoise(x, t):
        return torch.tanh(x @ weight) * t[:, None] / 6

    def sample(generator):
        return schedule.sample(denoise, (4, 5), torch.device("cpu"), sampler, 3, eta, generator)

    tally = NoiseTally()
    sample(tally)
    assert len(tally.draws) == (6 if sampler == "ddpm" else 3)  # T - 1 steps + start; jumps
    noise = draw_noise(tally.draws, 4, torch.Generator().manual_seed(7))
    assert torch.equal(sample(NoiseFeed(noise)), sample(torch.Generator().manual_seed(7)))


def test_a_finetuned_checkpoint_exports_as_eval_finetuned_classifies(synth_root, tmp_path):
    from marnet.pipeline.engine.backbones import VisionSpec
    from marnet.pipeline.stage1.finetune import FinetuneConfig

    ckpt = tmp_path / "ce.safetensors"
    finetune(FinetuneConfig(dataset="synthfood", root=synth_root, out=ckpt, method="ce",
                            vision=VisionSpec("test_efficientnet", "random", image_size=32,
                                              crop_pct=1.0),
                            epochs=1, batch_size=8, num_workers=0, device="cpu"),
             log=lambda _: None)
    expected, _, _ = finetuned_logits(ckpt, "test", device="cpu", num_workers=0,
                                      log=lambda _: None)
    meta = export_model(tmp_path / "model", finetuned=ckpt, log=lambda _: None)
    assert meta["provenance"]["source"] == "finetuned"
    assert meta["provenance"]["finetune"]["method"] == "ce"
    images = [r.image for r in load_dataset("synthfood", synth_root).splits["test"]]
    ckpt.unlink()
    assert torch.equal(marnet.load_model(tmp_path / "model", "cpu").logits(images), expected)


def test_a_damaged_or_foreign_folder_is_refused(synth_root, tiny_cache, tmp_path):
    run = tmp_path / "run"
    train_heads(tiny_cache, "visual", run, cfg=TrainConfig(epochs=1, batch_size=8,
                                                           device="cpu"), log=lambda _: None)
    folder = tmp_path / "model"
    export_model(folder, run=run, log=lambda _: None)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        export_model(folder, run=run, log=lambda _: None)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a model folder"):
        export_model(tmp_path / "notes", run=run, overwrite=True, log=lambda _: None)
    with pytest.raises(ConfigError, match="has no ONNX graph"):
        marnet.load_model(folder, runtime="onnx")
    state = load_file(str(folder / "backbone.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 1
    save_file(state, str(folder / "backbone.safetensors"))
    with pytest.raises(ModelFolderError, match="was changed or damaged"):
        marnet.load_model(folder, "cpu")
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ModelFolderError, match="upgrade marnet"):
        marnet.load_model(folder, "cpu")
    result = CliRunner().invoke(app, ["predict", str(synth_root), "--model", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.output


def test_a_missing_onnx_install_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'marnet\[onnx\]'"):
        require_onnx()


def test_importing_marnet_stays_cheap():
    code = "import sys, marnet; print(sorted({'torch', 'timm'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
    assert callable(marnet.load_model)
