"""`--tensorboard DIR` on train-heads, finetune and ablate: the event files, read back with
TensorBoard's EventAccumulator, hold every number of each epoch's record."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from marnet.cli import app
from marnet.pipeline.engine.backbones import VisionSpec
from marnet.pipeline.engine.training import TrainConfig
from marnet.pipeline.stage1.finetune import FinetuneConfig, finetune
from marnet.pipeline.tools.ablate import ablate, parse_rows

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
SMALL_MARNET = ["--set", "diffusion.hidden=32", "--set", "diffusion.schedule.steps=10",
                "--set", "fusion_samples=1"]


def _run(*args, code=0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


def _scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the event files in ``folder``: tag -> {step: value}."""
    board = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0})
    board.Reload()
    out = {}
    for tag in board.Tags()["scalars"]:
        events = board.Scalars(tag)
        out[tag] = {e.step: e.value for e in events}
        assert len(out[tag]) == len(events), f"{tag}: a step written twice"
    return out


def _expected(records: list[dict], group: str = "train") -> dict[str, dict[int, float]]:
    """What the records must become: each number under <stage>/<name> at step epoch, as the
    float32 TensorBoard stores."""
    out: dict[str, dict[int, float]] = {}
    for record in records:
        for name, value in record.items():
            if name not in ("stage", "epoch"):
                tag = f"{record.get('stage', group)}/{name}"
                out.setdefault(tag, {})[record["epoch"]] = float(np.float32(value))
    return out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_heads_writes_metrics_jsonl_as_scalars(tiny_cache, tmp_path):
    _run("train-heads", "--cache", tiny_cache, "--out", tmp_path / "run", "--method", "marnet",
         "--epochs", "2", "--batch-size", "8", "--device", "cpu", *SMALL_MARNET,
         "--tensorboard", tmp_path / "tb")
    records = _metrics(tmp_path / "run")
    assert {r["stage"] for r in records} == {"ema+cdr", "fusion"} and len(records) == 4
    scalars = _scalars(tmp_path / "tb")
    assert scalars == _expected(records)
    assert {"ema+cdr/loss", "ema+cdr/lr", "ema+cdr/val_top1_ema", "fusion/val_top1_fusion"} \
        <= set(scalars)


def test_ablate_writes_one_folder_per_row_and_seed(tiny_cache, tmp_path):
    tiny = TrainConfig(epochs=2, batch_size=8, device="cpu", balanced_classes=4)
    result = ablate(tiny_cache, parse_rows("visual,sdm"), [0, 1], tmp_path / "out", tiny,
                    log=lambda _: None, tensorboard=tmp_path / "tb")
    runs = {Path(r["run"]) for r in result["rows"]}
    assert len(runs) == 4
    for run in runs:
        row, seed = run.parts[-2:]
        assert _scalars(tmp_path / "tb" / row / seed) == _expected(_metrics(run)), run
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["baseline-visual", "sdm"]


def test_finetune_writes_its_history_and_head_stages_as_scalars(synth_root, tiny_cache,
                                                                 tmp_path):
    cfg = FinetuneConfig(
        dataset="synthfood", root=synth_root, out=tmp_path / "m.safetensors",
        vision=VisionSpec("test_efficientnet", "random", image_size=32, crop_pct=1.0),
        method="marnet", text_cache=tiny_cache, epochs=2, batch_size=8, num_workers=0,
        device="cpu", head_epochs=2, tensorboard=tmp_path / "tb",
        settings={"diffusion.hidden": 32, "diffusion.schedule.steps": 10, "fusion_samples": 1})
    meta = finetune(cfg, log=lambda _: None)
    scalars = _scalars(tmp_path / "tb")
    # beyond the history: the two learning rates, and the later stages' epoch times (which
    # the checkpoint's head_stages leave out)
    extra = {tag: scalars.pop(tag) for tag in ("backbone/lr", "backbone/head_lr",
                                               "fusion/seconds")}
    assert scalars == _expected(meta["history"], "backbone") | _expected(meta["head_stages"])
    assert all(set(steps) == {1, 2} for steps in extra.values())
    assert extra["backbone/head_lr"][1] > extra["backbone/lr"][1]
    assert [r["stage"] for r in meta["head_stages"]] == ["fusion", "fusion"]


def test_missing_tensorboard_is_an_install_hint(tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    for command in (["train-heads", "--cache", tiny_cache, "--out", tmp_path / "run"],
                    ["ablate", "--cache", tiny_cache, "--out", tmp_path / "ab"],
                    ["finetune", "--dataset", "synthfood", "--out", tmp_path / "f.safetensors"]):
        out = _run(*command, "--tensorboard", tmp_path / "tb", code=2)
        assert "pip install 'marnet[tensorboard]'" in out
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()
