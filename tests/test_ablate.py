"""`marnet ablate`: parsing rows, the matrix with mean +- std, resume, refusals, plots hook."""

import json
import statistics
import sys
import types

import pytest
from typer.testing import CliRunner

from marnet.cli import app
from marnet.pipeline.core.config import ConfigError
from marnet.pipeline.engine.training import TrainConfig
from marnet.pipeline.store import CacheError
from marnet.pipeline.tools.ablate import ablate, parse_method_overrides, parse_rows, run_matrix

TINY = TrainConfig(epochs=1, batch_size=8, device="cpu", balanced_classes=4)


def quiet(_):
    pass


def test_rows_from_methods_table2_and_fusion():
    assert [r.row for r in parse_rows("visual,ita,table2")] == [
        "Baseline (visual)", "ITA", "+EMA", "+MLP", "+CDR(MLP)", "+Fusion (MARNet)"]
    rows = parse_rows("marnet", "all")  # MARNet's default fusion is concat: no duplicate row
    assert [r.row for r in rows] == ["MARNet", "MARNet (add)", "MARNet (mul)", "MARNet (sum)",
                                     "MARNet (hm)"]
    assert rows[-1].overrides == {"variant": "full", "fusion": "hm"}
    (cdr,) = parse_rows("marnet:cdr")
    assert (cdr.method, cdr.overrides) == ("marnet", {"variant": "cdr"})
    assert [r.row for r in parse_rows("ssan,cdd,team")] == ["SSAN", "CDD", "TEAM"]
    for bad, fusion in (("nope", None), ("marnet:xyz", None), ("ita", "concat,bad"), (",", None)):
        with pytest.raises(ConfigError):
            parse_rows(bad, fusion)


def test_per_method_overrides():
    assert parse_method_overrides(["marnet.diffusion.hidden=512", "swd.projections=8"]) == {
        "marnet": {"diffusion.hidden": "512"}, "swd": {"projections": "8"}}
    for bad in (["nope.x=1"], ["marnet=1"], ["marnet.x"]):
        with pytest.raises(ConfigError):
            parse_method_overrides(bad)


def test_ablate_cli_writes_one_row_per_method_with_mean_and_std(tiny_cache, tmp_path):
    out = tmp_path / "ablate"
    args = ["ablate", "--cache", str(tiny_cache), "--methods", "visual,ita,swd", "--seeds", "0,1",
            "--epochs", "1", "--batch-size", "8", "--device", "cpu",
            "--set", "swd.projections=8", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert [e["row"] for e in data["summary"]] == ["Baseline (visual)", "ITA", "SWD"]
    for entry in data["summary"]:
        per_seed = [r for r in data["rows"] if r["row"] == entry["row"]]
        assert entry["seeds"] == [0, 1] == [r["seed"] for r in per_seed]
        top1 = [r["top1"] for r in per_seed]
        assert entry["top1_mean"] == round(statistics.fmean(top1), 2)
        assert entry["top1_std"] == round(statistics.stdev(top1), 2)
    md = (out / "results.md").read_text()
    assert md.count("±") == 6 and "| SWD |" in md
    assert (out / "results.csv").read_text().splitlines()[0].startswith("row,")
    swd_config = json.loads((out / "runs" / "swd" / "seed1" / "config.json").read_text())
    assert swd_config["method_config"]["projections"] == 8 and swd_config["train"]["seed"] == 1
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and again.output.count("finished earlier") == 6
    assert json.loads((out / "results.json").read_text())["summary"] == data["summary"]


def test_a_run_with_other_settings_is_trained_again(tiny_cache, tmp_path):
    logs = []
    rows = parse_rows("visual")
    run_matrix(tiny_cache, rows, [0], tmp_path, TINY, log=logs.append)
    run_matrix(tiny_cache, rows, [0], tmp_path, TINY, log=logs.append)
    assert sum("finished earlier" in line for line in logs) == 1
    run_matrix(tiny_cache, rows, [0], tmp_path, TINY, {"visual": {"d": 8}}, log=logs.append)
    assert any("another method_config" in line for line in logs)
    run = tmp_path / "runs" / "baseline-visual" / "seed0"
    config = json.loads((run / "config.json").read_text())
    assert config["method_config"]["d"] == 8


def test_rows_are_checked_before_anything_trains(tiny_cache, tmp_path):
    with pytest.raises(CacheError, match="--tokens"):
        ablate(tiny_cache, parse_rows("visual,team"), [0], tmp_path / "a", TINY, log=quiet)
    with pytest.raises(ConfigError, match="ita"):
        ablate(tiny_cache, parse_rows("visual"), [0], tmp_path / "a", TINY,
               {"ita": {"tau": "0.1"}}, log=quiet)
    with pytest.raises(ConfigError, match="unknown setting"):
        ablate(tiny_cache, parse_rows("visual"), [0], tmp_path / "a", TINY,
               {"visual": {"nope": "1"}}, log=quiet)
    assert not (tmp_path / "a").exists()


def test_plots_flag_calls_the_plots_module_or_says_it_is_missing(tiny_cache, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setitem(sys.modules, "marnet.pipeline.tools.plots", None)
    with pytest.raises(ConfigError, match="--plots"):
        ablate(tiny_cache, parse_rows("visual"), [0], tmp_path / "a", TINY, plots=True, log=quiet)
    calls = []

    def plot_run(run_dir, out_dir):
        calls.append(run_dir)
        out_dir.mkdir(parents=True)

    monkeypatch.setitem(sys.modules, "marnet.pipeline.tools.plots",
                        types.SimpleNamespace(plot_run=plot_run))
    ablate(tiny_cache, parse_rows("visual"), [0, 1], tmp_path / "b", TINY, plots=True, log=quiet)
    assert [p.name for p in calls] == ["seed0", "seed1"]
    ablate(tiny_cache, parse_rows("visual"), [0, 1], tmp_path / "b", TINY, plots=True, log=quiet)
    assert len(calls) == 2  # figures of finished runs are not drawn again
