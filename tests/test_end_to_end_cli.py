"""The end-to-end commands: finetune any method, eval/predict a checkpoint from images alone,
and the end-to-end Table 2 (ablate --finetune), resumable."""

import json

import pytest
import torch
from typer.testing import CliRunner

from marnet.cli import app
from marnet.pipeline.datasets import load_dataset
from marnet.pipeline.engine.backbones import VisionSpec
from marnet.pipeline.engine.training import TrainConfig
from marnet.pipeline.stage2.evaluate import evaluate_finetuned
from marnet.pipeline.stage2.predict import predict_images
from marnet.pipeline.store import FeatureCache
from marnet.pipeline.tools.ablate import ablate_finetune, finetune_base, parse_rows

runner = CliRunner()
TINY_VISION = ["--visual", "test_efficientnet", "--visual-weights", "random", "--image-size",
               "32", "--crop-pct", "1.0"]


def _ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def _marnet_finetune_args(synth_root, tiny_cache, out):
    return ["finetune", "--dataset", "synthfood", "--root", str(synth_root), "--out", str(out),
            *TINY_VISION, "--method", "marnet", "--ablation", "fusion", "--text-cache",
            str(tiny_cache), "--epochs", "1", "--head-epochs", "1", "--batch-size", "8",
            "--num-workers", "0", "--device", "cpu", "--set", "diffusion.hidden=32",
            "--set", "diffusion.schedule.steps=10", "--set", "fusion_samples=1"]


@pytest.fixture(scope="module")
def marnet_checkpoint(synth_root, tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "marnet.safetensors"
    _ok(runner.invoke(app, _marnet_finetune_args(synth_root, tiny_cache, out)))
    return out


def test_finetune_never_overwrites_a_checkpoint_silently(marnet_checkpoint, synth_root,
                                                         tiny_cache):
    args = _marnet_finetune_args(synth_root, tiny_cache, marnet_checkpoint)
    before = marnet_checkpoint.read_bytes()
    assert "finished with the same settings: reusing it" in _ok(runner.invoke(app, args))
    assert marnet_checkpoint.read_bytes() == before
    other = runner.invoke(app, [*args, "--seed", "1"])
    assert other.exit_code == 2 and "holds a fine-tune made with another seed" in other.output
    assert "--overwrite" in other.output and marnet_checkpoint.read_bytes() == before


def test_eval_finetuned_classifies_the_test_images(marnet_checkpoint, tmp_path):
    report = tmp_path / "e.json"
    out = _ok(runner.invoke(app, ["eval", "--finetuned", str(marnet_checkpoint), "--device",
                                  "cpu", "--num-workers", "0", "--json", str(report)]))
    metrics = json.loads(report.read_text())
    assert "images (fine-tuned)" in out and metrics["n"] == 16 and metrics["method"] == "marnet"
    # a test-time setting changes the chain (and is recorded); a trained one is refused
    _ok(runner.invoke(app, ["eval", "--finetuned", str(marnet_checkpoint), "--device", "cpu",
                            "--num-workers", "0", "--set", "diffusion.sampler=ddim",
                            "--set", "diffusion.steps=5",
                            "--json", str(report)]))
    assert json.loads(report.read_text())["overrides"] == {"diffusion.sampler": "ddim",
                                                           "diffusion.steps": "5"}
    refused = runner.invoke(app, ["eval", "--finetuned", str(marnet_checkpoint),
                                  "--set", "diffusion.hidden=64"])
    assert refused.exit_code == 2 and "new training run" in refused.output
    both = runner.invoke(app, ["eval", "--finetuned", str(marnet_checkpoint), "--run", "x"])
    assert both.exit_code == 2 and "either --run RUN or --finetuned CKPT" in both.output


def test_predict_finetuned_gives_the_probabilities_of_eval(synth_root, tiny_cache, tmp_path):
    from marnet.pipeline.stage1.finetune import FinetuneConfig, finetune
    from marnet.pipeline.stage2.evaluate import finetuned_logits

    ckpt = tmp_path / "ce.safetensors"
    finetune(FinetuneConfig(dataset="synthfood", root=synth_root, out=ckpt, text_cache=tiny_cache,
                            vision=VisionSpec("test_efficientnet", "random", image_size=32,
                                              crop_pct=1.0), epochs=1, batch_size=8,
                            num_workers=0, device="cpu"), log=lambda _: None)
    records = load_dataset("synthfood", synth_root).splits["test"]
    logits, _, _ = finetuned_logits(ckpt, "test", device="cpu", num_workers=0,
                                    log=lambda _: None)
    out = _ok(runner.invoke(app, ["predict", str(records[0].image), str(records[1].image),
                                  "--finetuned", str(ckpt), "--device", "cpu", "--json"]))
    items = json.loads(out)
    probs = torch.softmax(logits[:2], dim=1)
    for item, record, p in zip(items, records, probs):
        assert item["image"] == str(record.image)
        top = item["predictions"][0]
        assert top["index"] == int(p.argmax()) and top["probability"] == pytest.approx(
            float(p.max()), abs=1e-5)
    with pytest.raises(ValueError, match="pass one of --run RUN, --finetuned CKPT or --model"):
        predict_images(None, [records[0].image], device="cpu")


def test_finetune_refuses_team_without_token_text(synth_root, tiny_cache, tmp_path):
    result = runner.invoke(app, [
        "finetune", "--dataset", "synthfood", "--root", str(synth_root), "--out",
        str(tmp_path / "t.safetensors"), *TINY_VISION, "--method", "team", "--text-cache",
        str(tiny_cache), "--device", "cpu"])
    assert result.exit_code == 2
    assert "holds no text_tokens" in result.output and "--tokens" in result.output


def test_ablate_finetune_tabulates_rows_over_finetuning_seeds_and_resumes(synth_root, tiny_cache,
                                                                          tmp_path):
    base = finetune_base(FeatureCache(tiny_cache), None, epochs=1, batch_size=8,
                         head_epochs=1, num_workers=0, device="cpu",
                         weights_dir=tmp_path / "cache" / "weights")
    assert base.vision.model == "test_efficientnet" and base.text_cache == tiny_cache
    rows = parse_rows("visual,marnet:fusion")
    shared = {"marnet": {"diffusion.hidden": 32, "diffusion.schedule.steps": 10,
                         "fusion_samples": 1}}
    heads = TrainConfig(epochs=1, batch_size=8, device="cpu")
    result = ablate_finetune(base, rows, [0, 1], tmp_path / "abl", shared, heads,
                             tmp_path / "cache", log=lambda _: None)
    summary = result["summary"]
    assert [(e["row"], e["path"]) for e in summary] == [
        ("Baseline (visual)", "end to end"), ("Baseline (visual)", "two-stage (heads on its cache)"),
        ("+Fusion (MARNet)", "end to end"), ("+Fusion (MARNet)", "two-stage (heads on its cache)")]
    assert all(e["seeds"] == [0, 1] for e in summary)
    runs = {r["run"] for r in result["rows"] if r["path"] == "end to end"}
    assert len(runs) == 4  # rows x seeds, each its own fine-tune
    checkpoints = {json.loads((tmp_path / "abl" / "runs" / "fusion-marnet" / f"seed{s}" /
                               "results.json").read_text())["checkpoint"] for s in (0, 1)}
    assert len(checkpoints) == 2
    # the table's test accuracy is what `marnet eval --finetuned` gives for the checkpoint
    for row in (r for r in result["rows"] if r["path"] == "end to end"):
        evaluated = evaluate_finetuned(f"{row['run']}/backbone.safetensors", device="cpu",
                                       num_workers=0, log=lambda _: None)
        assert (evaluated["top1"], evaluated["top5"]) == (row["top1"], row["top5"])
    logs = []
    again = ablate_finetune(base, rows, [0, 1], tmp_path / "abl", shared, heads,
                            tmp_path / "cache", log=logs.append)
    assert sum("finished earlier, reusing" in line for line in logs) == 8
    assert again["summary"] == summary
    md = (tmp_path / "abl" / "results.md").read_text()
    assert "fine-tuned end to end per row" in md and "±" in md


def test_ablate_finetune_cli_prints_the_table(synth_root, tiny_cache, tmp_path):
    out = _ok(runner.invoke(app, [
        "ablate", "--cache", str(tiny_cache), "--finetune", "--methods", "visual",
        "--finetune-seeds", "0", "--finetune-epochs", "1", "--finetune-batch-size", "8",
        "--epochs", "1", "--num-workers", "0", "--device", "cpu", "--out", str(tmp_path / "a")]))
    assert "Baseline (visual)" in out and (tmp_path / "a" / "results.csv").is_file()
    bad = runner.invoke(app, ["ablate", "--cache", str(tiny_cache), "--finetune", "--methods",
                              "visual", "--plots"])
    assert bad.exit_code == 2 and "--plots" in bad.output


def test_plot_finetuned_draws_the_branches_and_the_training_curves(marnet_checkpoint, tmp_path):
    out = _ok(runner.invoke(app, ["plot", "--finetuned", str(marnet_checkpoint), "--out",
                                  str(tmp_path / "p"), "--samples", "2", "--classes", "2",
                                  "--device", "cpu", "--num-workers", "0"]))
    report = json.loads((tmp_path / "p" / "plots.json").read_text())
    assert list(report["confidence"]["branches"]) == ["EMA (visual)", "CDR (diffusion)",
                                                      "fusion (MARNet)"]
    assert "x_CDR" in report["tsne"]["panels"] and "fusion (MARNet)" in out
    curves = json.loads((tmp_path / "p" / "curves.json").read_text())
    assert list(curves) == ["end to end", "fusion"]
    assert all(0 <= v <= 1 for v in curves["end to end"]["val_top1_ema"])


def test_diagnose_finetuned_probes_the_branch_gradients(marnet_checkpoint):
    from marnet.pipeline.stage1.probe import branch_gradients

    report = branch_gradients(marnet_checkpoint, batches=2, batch_size=4, device="cpu",
                              num_workers=0, log=lambda _: None)
    assert set(report["norms"]) == {"EMA: CE", "EMA: ITA", "CDR: CE", "CDR: MSE", "EMA (sum)",
                                    "CDR (sum)"}
    assert all(v > 0 for v in report["norms"].values())
    assert all(-1 <= v <= 1 for v in report["cosines"].values())
    # the sums are sums: each term's gradient points partly along its branch's total
    assert report["cosines"]["EMA: CE | EMA (sum)"] > 0
    out = _ok(runner.invoke(app, ["diagnose", "--finetuned", str(marnet_checkpoint),
                                  "--batches", "1", "--device", "cpu"]))
    assert "CDR: MSE" in out and "cosine" in out
