"""Bad input and misuse, run as a user runs the CLI: each is refused with one line that says
what is wrong, where and what to do, before any work starts, and never with a traceback."""

import json
import shutil
import sys

import pytest
from typer.testing import CliRunner

from marnet import cli
from marnet.cli import app
from marnet.pipeline.datasets.base import image_fingerprint
from marnet.pipeline.store import CacheError, FeatureCache

runner = CliRunner()


def _run(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    # anything but a clean exit (SystemExit) would reach a user as a traceback
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    return result.output


@pytest.fixture(scope="module")
def visual_run(tiny_cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "visual"
    _run("train-heads", "--cache", tiny_cache, "--out", run, "--method", "visual",
         "--epochs", "1", "--batch-size", "8", "--device", "cpu")
    return run


def _flip_bytes(path, at=40):
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_stage_two_refuses_a_bit_flipped_shard(tiny_cache, tmp_path):
    copy = shutil.copytree(tiny_cache, tmp_path / "flipped")
    shard = copy / "features.zarr" / "train" / "visual" / "c" / "1" / "0"
    _flip_bytes(shard)
    out = _run("train-heads", "--cache", copy, "--out", tmp_path / "run", "--method", "visual",
               "--epochs", "1", "--device", "cpu", code=2)
    assert f"shard 1 of train/visual ({shard}) does not match the checksum" in out
    assert f"marnet cache verify {copy} --repair" in out
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_truncated_shard_names_its_file_and_the_repair(tiny_cache, tmp_path):
    copy = shutil.copytree(tiny_cache, tmp_path / "truncated")
    shard = copy / "features.zarr" / "val" / "text" / "c" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-100])
    out = _run("train-heads", "--cache", copy, "--out", tmp_path / "run", "--method", "visual",
               "--device", "cpu", code=2)
    assert f"shard 0 of val/text ({shard})" in out and "--repair" in out
    out = _run("cache", "verify", copy, code=1)
    assert f"shard 0 of val/text ({shard})" in out
    assert f"to repair: `marnet cache verify {copy} --repair`" in out


def test_shard_checks_pass_an_intact_cache_and_can_be_skipped(tiny_cache, tmp_path):
    cache = FeatureCache(tiny_cache)
    checked = cache.load_split("train", ("visual", "label"))
    unchecked = cache.load_split("train", ("visual", "label"), check=False)
    assert checked["visual"].equal(unchecked["visual"])
    copy = shutil.copytree(tiny_cache, tmp_path / "flipped")
    _flip_bytes(copy / "features.zarr" / "train" / "visual" / "c" / "0" / "0")
    damaged = FeatureCache(copy)
    with pytest.raises(CacheError, match="does not match the checksum"):
        damaged.load_split("train", ("visual", "label"))
    flipped = damaged.load_split("train", ("visual", "label"), check=False)["visual"]
    assert not flipped.equal(checked["visual"])  # skipping the check reads the damage as is


def test_an_image_changed_under_the_same_labels_makes_a_new_cache(
        synth_root, tiny_cache, make_extract_config, tmp_path):
    from PIL import Image

    from marnet.pipeline.stage1.extract import extract

    root = shutil.copytree(synth_root, tmp_path / "synth")
    same = extract(make_extract_config(root, tiny_cache.parent.parent), log=lambda _: None)
    assert same.reused and same.path == tiny_cache  # a copied root keeps the key
    image = next((root / "ready_chinese_food").rglob("*.jpg"))
    with Image.open(image) as im:
        im.convert("RGB").rotate(90).save(image)  # other pixels, same file name and labels
    logs = []
    changed = extract(make_extract_config(root, tiny_cache.parent.parent), log=logs.append)
    assert not changed.reused and changed.path != tiny_cache
    assert not any("reusing" in line for line in logs)


def test_the_image_fingerprint_follows_content_not_copies(tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(bytes(range(256)) * 100)
    b = shutil.copy(a, tmp_path / "b.bin")  # a copy: new modification time, same content
    assert image_fingerprint(a) == image_fingerprint(b)
    _flip_bytes(b, at=-10)  # same size, one byte changed near the end
    assert image_fingerprint(a) != image_fingerprint(b)
    assert image_fingerprint(tmp_path / "missing.jpg") == "missing"


def test_train_heads_never_overwrites_a_run_silently(tiny_cache, visual_run, tmp_path):
    run = shutil.copytree(visual_run, tmp_path / "run")
    before = (run / "results.json").read_text()
    same = ["train-heads", "--cache", tiny_cache, "--out", run, "--method", "visual",
            "--epochs", "1", "--batch-size", "8", "--device", "cpu"]
    assert "finished with the same settings: its results are reused" in _run(*same)
    assert (run / "results.json").read_text() == before
    out = _run(*same[:-4], "--epochs", "2", "--device", "cpu", code=2)
    assert f"--out {run} holds a run trained with another train" in out and "--overwrite" in out
    _run(*same[:-4], "--epochs", "2", "--device", "cpu", "--overwrite")
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    out = _run("train-heads", "--cache", tiny_cache, "--out", other, "--method", "visual",
               code=2)
    assert "holds files that are not a marnet run" in out


def test_case_only_class_names_and_misspelt_columns(tmp_path, write_folder):
    root = write_folder(tmp_path / "own")
    labels = root / "labels.csv"
    lines = labels.read_text().splitlines()
    lines[1] = lines[1].replace(",ramen,", ",Ramen,", 1)  # the label field, not the path
    labels.write_text("\n".join(lines) + "\n")
    out = _run("datasets", "check", "--dataset", "folder", "--root", root, "--no-images")
    assert "class names differ only in case and are separate classes" in out
    assert "Ramen / ramen" in out or "ramen / Ramen" in out
    lines[0] = lines[0].replace("ingredients", "ingredient")
    labels.write_text("\n".join(lines) + "\n")
    out = _run("datasets", "check", "--dataset", "folder", "--root", root, "--no-images",
               code=2)
    assert f"{labels}:1: column 'ingredient' is not one marnet reads; did you mean " \
           "'ingredients'?" in out
    lines[0] = lines[0].replace("ingredient", "ingredients") + ",source"
    labels.write_text("\n".join(line + ",x" if k else line for k, line in enumerate(lines)) + "\n")
    out = _run("datasets", "check", "--dataset", "folder", "--root", root, "--no-images")
    assert "column(s) 'source' are not read" in out


def test_ablate_refuses_repeated_seeds(tiny_cache):
    out = _run("ablate", "--cache", tiny_cache, "--methods", "visual", "--seeds", "0,0", code=2)
    assert "--seeds '0,0' repeats seed 0" in out
    out = _run("ablate", "--cache", tiny_cache, "--finetune", "--finetune-seeds", "1,2,1",
               code=2)
    assert "--finetune-seeds '1,2,1' repeats seed 1" in out


def test_skipped_images_are_counted_per_split_and_class(tiny_cache, synth_root,
                                                       make_extract_config, tmp_path):
    from marnet.pipeline.stage1.extract import extract

    root = shutil.copytree(synth_root, tmp_path / "synth")
    broken = sorted((root / "ready_chinese_food").rglob("*.jpg"))[:2]
    for path in broken:
        path.write_bytes(b"")
    logs = []
    extract(make_extract_config(root, tmp_path / "cache", on_bad_image="skip"), log=logs.append)
    summary = next(line for line in logs if line.startswith("skipped"))
    assert summary.startswith("skipped 2 unreadable image(s), left out of the cache (")
    assert "by class:" in summary and "`marnet cache info`" in summary


def test_interrupt_and_unexpected_errors_print_one_line(monkeypatch, capsys):
    import marnet.pipeline.store.manage as manage

    def interrupted(root):
        raise KeyboardInterrupt

    monkeypatch.setattr(manage, "list_caches", interrupted)
    monkeypatch.setattr("marnet.pipeline.store.list_caches", interrupted)
    monkeypatch.setattr(sys, "argv", ["marnet", "extract", "--dataset", "synthfood"])
    assert cli.interrupted_advice(sys.argv[1:]).startswith("committed shards are kept")
    monkeypatch.setattr(sys, "argv", ["marnet", "cache", "ls", "."])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 130
    assert "interrupted; nothing needs cleaning up" in capsys.readouterr().out

    def broken(root):
        raise TypeError("a bug")

    monkeypatch.setattr("marnet.pipeline.store.list_caches", broken)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    out = capsys.readouterr().out
    assert exit_.value.code == 1 and "unexpected TypeError: a bug" in out
    assert "MARNET_DEBUG=1" in out and "Traceback" not in out


BAD_OPTIONS = [  # (arguments after the command, what the one-line message must say)
    (["--image-size", "0"], "--image-size must be >= 1, got 0"),
    (["--crop-pct", "2.5"], "--crop-pct must be > 0 and <= 1, got 2.5"),
    (["--crop-pct", "0"], "--crop-pct must be > 0 and <= 1, got 0"),
    (["--max-length", "0"], "--max-length must be >= 1, got 0"),
    (["--device", "tpu"], "--device 'tpu' is not a device marnet runs on"),
    (["--template", "Has {bogus}."], "uses the field {bogus}"),
    (["--template", "Has {"], "is not a valid template"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--shard-rows", "-4"], "--shard-rows must be >= 1, got -4"),
    (["--num-workers", "-1"], "--num-workers must be >= 0, got -1"),
    (["--precision", "fp8"], "--precision 'fp8' is not supported"),
    (["--dtype", "int8"], "--dtype 'int8' is not supported"),
    (["--pooling", "max"], "--pooling 'max' is not supported"),
]


@pytest.mark.parametrize("args, message", BAD_OPTIONS, ids=[a[0] for a, _ in BAD_OPTIONS])
def test_extract_refuses_bad_options_before_any_work(args, message, synth_root, tmp_path):
    out = _run("extract", "--dataset", "synthfood", "--root", synth_root, "--cache-dir",
               tmp_path / "cache", "--visual", "test_efficientnet", "--visual-weights", "random",
               "--text", "minilm", *args, code=2)
    assert message in out
    assert not (tmp_path / "cache").exists()  # nothing left behind


def test_weights_and_paths_that_are_not_what_they_should_be(synth_root, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_text("not weights")
    out = _run("extract", "--dataset", "synthfood", "--root", synth_root, "--cache-dir",
               tmp_path / "c", "--visual", "test_efficientnet", "--visual-weights", junk,
               "--text", "minilm", code=2)
    assert f"--visual-weights {junk}: cannot load it into 'test_efficientnet'" in out
    out = _run("extract", "--dataset", "synthfood", "--root", synth_root, "--cache-dir",
               junk, "--visual", "test_efficientnet", "--visual-weights", "random",
               "--text", "minilm", code=2)
    assert "is a file where a folder is needed" in out
    out = _run("eval", "--finetuned", junk, code=2)
    assert f"{junk} is not a safetensors file" in out
    assert "cache root" in _run("cache", "ls", tmp_path / "nowhere", code=2)


def test_commands_refuse_bad_values(tiny_cache, visual_run, tmp_path):
    image = next(p for p in tiny_cache.parent.parent.rglob("*") if p.suffix == ".json")
    cases = [
        (["predict", image, "--run", visual_run, "--topk", "0"], "'--topk'"),
        (["predict", image, "--run", visual_run, "--topk", "-2"], "'--topk'"),
        (["train-heads", "--cache", tiny_cache, "--out", tmp_path / "r", "--lr", "-1"],
         "--lr must be >= 0, got -1"),
        (["train-heads", "--cache", tiny_cache, "--out", tmp_path / "r", "--device", "gpu"],
         "--device 'gpu' is not a device"),
        (["finetune", "--dataset", "synthfood", "--out", tmp_path / "f.safetensors",
          "--lr", "-1"], "--lr must be >= 0, got -1"),
        (["finetune", "--dataset", "synthfood", "--out", tmp_path / "f.safetensors",
          "--train-blocks", "last-0"], "--train-blocks expects all or last-K with K >= 1"),
        (["ablate", "--cache", tiny_cache, "--seeds", "a"], "--seeds expects comma-separated"),
        (["demo", "--seeds", "x"], "--seeds expects comma-separated integers"),
        (["demo", "--head-epochs", "0"], "--head-epochs must be >= 1"),
        (["bench", "--images", "0"], "--images must be >= 1, got 0"),
        (["eval", "--run", visual_run, "--device", "tpu"], "--device 'tpu'"),
        (["eval", "--run", tmp_path], "is not a finished run"),
        (["eval", "--run", visual_run, "--json", tmp_path], "is a folder; give a file path"),
        (["diagnose", "--cache", tmp_path / "none"], "manifest.json is missing"),
        (["diagnose", "--cache", tiny_cache, "--split", "nope"], "split 'nope' is not in"),
        (["plot", "--run", visual_run, "--samples", "1"], "'--samples'"),
        (["datasets", "check", "--dataset", "nope"], "nope"),
        (["datasets", "check", "--dataset", "synthfood", "--workers", "0"], "'--workers'"),
        (["cache", "info", tmp_path / "none"], "manifest.json is missing"),
        (["cache", "verify", tmp_path / "none"], "manifest.json is missing"),
        (["cache", "rm", tmp_path, "--yes"], "manifest.json is missing"),
        (["cache", "export", tmp_path / "none", "--npy", tmp_path / "npy"],
         "manifest.json is missing"),
        (["cache", "ls", image], "is a file"),
    ]
    for args, message in cases:
        assert message in _run(*args, code=2), args


def test_test_time_steps_beyond_the_schedule_are_refused(tiny_cache, tmp_path):
    run = tmp_path / "cdr"
    _run("train-heads", "--cache", tiny_cache, "--out", run, "--method", "marnet",
         "--ablation", "cdr", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
         "--set", "diffusion.hidden=16", "--set", "diffusion.schedule.steps=10")
    out = _run("eval", "--run", run, "--device", "cpu", "--set", "diffusion.sampler=ddim",
               "--set", "diffusion.steps=1000", code=2)
    assert "diffusion.steps = 1000 exceeds the noise schedule's T = 10" in out
    out = _run("eval", "--run", run, "--device", "cpu", "--set", "diffusion.steps=5", code=2)
    assert "diffusion.steps has no effect while diffusion.sampler is 'ddpm'" in out
    _run("eval", "--run", run, "--device", "cpu", "--set", "diffusion.steps=5",
         "--set", "diffusion.sampler=ddim")


def test_the_readme_folder_command_runs_offline(tmp_path, write_folder):
    """The README's "Your own data" extract command, as written, on a folder root."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    command = next(line for line in readme.splitlines()
                   if line.startswith("marnet extract --dataset folder --root data/mine"))
    args = command.split()[1:]
    args[args.index("data/mine")] = str(write_folder(tmp_path / "mine"))
    out = _run(*args, "--cache-dir", tmp_path / "cache", "--num-workers", "0")
    assert "cache complete" in out
