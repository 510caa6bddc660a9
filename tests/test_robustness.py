"""Corruption robustness: the ImageNet-C corruptions, their determinism, the clean pass equal to
end-to-end evaluation, mCA bookkeeping, the ablation columns and the install hint."""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from marnet.pipeline.core.config import ConfigError
from marnet.pipeline.datasets.corruptions import (
    CORRUPTIONS,
    FAMILIES,
    Corruption,
    parse_corruptions,
    parse_severities,
)
from marnet.pipeline.engine.encode import ImageSource, encode_corrupted, encode_images
from marnet.pipeline.engine.training import TrainConfig
from marnet.pipeline.stage2.evaluate import evaluate_run
from marnet.pipeline.stage2.robustness import (
    CorruptionSweep,
    Scorer,
    robustness_sweep,
    run_robustness,
)
from marnet.pipeline.stage2.train import train_heads


def _photo(size: int = 48, seed: int = 0) -> Image.Image:
    """A textured colour image (gradients, a disc, noise): every corruption has work to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    pixels = np.stack([x, y, 0.5 + 0.3 * np.sin(8 * x * y)], axis=-1) * 200
    pixels[(x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.08] = (220, 40, 60)
    pixels += rng.normal(0, 8, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_corruption_changes_the_image_and_keeps_its_shape_and_dtype(name):
    image = _photo()
    corrupted = Corruption(name, 3)(image, "img-0")
    before, after = np.asarray(image), np.asarray(corrupted)
    assert after.shape == before.shape and after.dtype == np.uint8
    assert np.abs(after.astype(int) - before.astype(int)).mean() > 0.5, name


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_corruption_is_a_function_of_image_setting_seed_and_key(name):
    image = _photo(seed=1)
    first = np.asarray(Corruption(name, 5, seed=2)(image, "k"))
    assert np.array_equal(first, np.asarray(Corruption(name, 5, seed=2)(image, "k"))), name


def test_the_same_seed_gives_the_same_pixels_and_the_global_rng_is_left_alone():
    image = _photo()
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    first = np.asarray(Corruption("gaussian_noise", 4, seed=7)(image, "a"))
    assert np.random.rand() == expected_next  # the caller's NumPy stream is untouched
    again = np.asarray(Corruption("gaussian_noise", 4, seed=7)(image, "a"))
    other_seed = np.asarray(Corruption("gaussian_noise", 4, seed=8)(image, "a"))
    other_image = np.asarray(Corruption("gaussian_noise", 4, seed=7)(image, "b"))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other_seed) and not np.array_equal(first, other_image)


def test_severity_zero_is_the_clean_image():
    image = _photo()
    assert Corruption("frost", 0)(image, "x") is image


def test_parsers_take_all_families_names_and_ranges():
    assert parse_corruptions("all") == CORRUPTIONS
    assert parse_corruptions("fog,noise") == (*FAMILIES["noise"], "fog")
    assert parse_severities("1-5") == (1, 2, 3, 4, 5)
    assert parse_severities("5,1,3") == (1, 3, 5)
    for bad in ("fogg", "noise,"):
        with pytest.raises(ConfigError, match="--corruptions"):
            parse_corruptions(bad)
    for bad in ("0-2", "6", "a-b", ""):
        with pytest.raises(ConfigError, match="--severities"):
            parse_severities(bad)


def test_a_missing_package_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)  # import fails as if absent
    with pytest.raises(ConfigError, match=r"pip install 'marnet\[robustness\]'"):
        Corruption("fog", 2)(_photo(), "x")


def test_the_cli_says_how_to_install_it_instead_of_a_traceback(tiny_cache, tmp_path):
    import subprocess

    code = ("import sys; sys.modules['imagecorruptions'] = None; from marnet.cli import main; "
            "sys.argv = ['marnet', 'eval', '--run', 'r', '--end-to-end', '--corruptions', "
            "'fog']; main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode != 0
    assert "pip install 'marnet[robustness]'" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- sweeps


@dataclass
class TextureEnergy:
    """A stand-in backbone: the feature of an image is its mean absolute horizontal gradient
    (texture energy), so smooth images and fine stripes separate perfectly when clean."""

    data_config: dict = field(default_factory=lambda: {"input_size": (3, 32, 32),
                                                       "crop_pct": 1.0,
                                                       "interpolation": "bilinear"})
    device: torch.device = torch.device("cpu")
    dim: int = 1
    model: torch.nn.Module = field(default_factory=torch.nn.Identity)

    def features(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        x = images.float() / 255
        return (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))[:, None]


def _texture_source(tmp_path: Path, workers: int = 0) -> ImageSource:
    paths, labels = [], []
    for i in range(12):
        textured = i % 2
        pixels = np.full((32, 32, 3), 128, np.uint8)
        if textured:
            pixels[:, ::4] = 150  # faint stripes: low contrast, so strong noise swamps them
        path = tmp_path / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
        labels.append(textured)
    return ImageSource(TextureEnergy(), paths, [p.stem for p in paths], torch.tensor(labels),
                       batch_size=5, precision="fp32", dtype="float32", num_workers=workers)


def _threshold_scorer(threshold: float = 0.01) -> Scorer:
    return Scorer("texture", lambda f: torch.cat([threshold - f, f - threshold], dim=1))


def test_strong_noise_lowers_accuracy_where_clean_accuracy_is_perfect(tmp_path):
    source = _texture_source(tmp_path)
    sweep = CorruptionSweep(("gaussian_noise", "contrast"), (1, 5))
    result = robustness_sweep(source, [_threshold_scorer()], sweep, 2, lambda _: None)["texture"]
    assert result["clean_top1"] == 100.0
    assert result["top1"]["gaussian_noise"]["5"] < result["clean_top1"]
    values = [v for per in result["top1"].values() for v in per.values()]
    assert result["mca"] == pytest.approx(sum(values) / len(values), abs=1e-3)
    assert result["relative"] == pytest.approx(result["mca"] / 100, abs=1e-4)
    assert set(result["families"]) == {"noise", "digital"}
    assert result["images_corrupted"] == 12 * 4


def test_corrupted_features_do_not_depend_on_workers_and_severity_zero_is_clean(tmp_path):
    source = _texture_source(tmp_path)
    settings = [Corruption("impulse_noise", 5, seed=3), Corruption("fog", 0)]
    serial = list(encode_corrupted(source.vision, source.paths, source.keys, settings, 5,
                                   "fp32", "float32", num_workers=0))
    parallel = list(encode_corrupted(source.vision, source.paths, source.keys, settings, 5,
                                     "fp32", "float32", num_workers=2))
    assert [s for s, *_ in serial] == settings
    for (_, a, _, _), (_, b, _, _) in zip(serial, parallel):
        assert torch.equal(a, b)
    clean, _ = encode_images(source.vision, source.paths, 5, "fp32", "float32", 0)
    assert torch.equal(serial[1][1], clean)
    assert not torch.equal(serial[0][1], clean)


def test_the_clean_pass_of_a_sweep_equals_end_to_end_evaluation(tiny_cache, tmp_path):
    run = tmp_path / "run"
    train_heads(tiny_cache, "marnet", run, {"variant": "cdr", "diffusion.hidden": 16,
                                            "diffusion.schedule.steps": 10},
                TrainConfig(epochs=1, batch_size=8, device="cpu"), log=lambda _: None)
    plain = evaluate_run(run, end_to_end=True, device="cpu", num_workers=0,
                         weights_dir=tmp_path / "w", log=lambda _: None)
    robust = run_robustness(run, CorruptionSweep(("pixelate",), (5,)), device="cpu",
                            num_workers=0, weights_dir=tmp_path / "w", log=lambda _: None)
    assert (robust["clean_top1"], robust["clean_top5"], robust["n"]) == (
        plain["top1"], plain["top5"], plain["n"])
    assert set(robust["top1"]) == {"pixelate"}


def test_ablate_robustness_adds_columns_and_reuses_measurements(tiny_cache, tmp_path):
    from marnet.pipeline.stage2.robustness import RobustnessRun
    from marnet.pipeline.tools.ablate import ablate, parse_rows
    from marnet.pipeline.tools.plots import plot_robustness

    spec = RobustnessRun(CorruptionSweep(("gaussian_noise", "fog"), (2, 4)), "cpu", 0,
                         tmp_path / "w")
    logs: list[str] = []
    cfg = TrainConfig(epochs=1, batch_size=8, device="cpu")
    result = ablate(tiny_cache, parse_rows("visual,ita"), [0, 1], tmp_path / "ab", cfg,
                    log=logs.append, robustness=spec)
    assert sum(line.startswith("corrupting ") for line in logs) == 1  # one sweep, one cache
    for row in result["rows"]:
        saved = json.loads((Path(row["run"]) / "robustness.json").read_text())
        assert row["mca"] == saved["mca"] and row["noise"] == saved["families"]["noise"]
    baseline = result["summary"][0]
    seeds = [r["mca"] for r in result["rows"] if r["row"] == baseline["row"]]
    assert baseline["mca_mean"] == pytest.approx(sum(seeds) / 2, abs=0.01)
    table = (tmp_path / "ab" / "results.md").read_text()
    assert "mCA (%)" in table and "rel." in table and "weather" in table
    logs.clear()
    ablate(tiny_cache, parse_rows("visual,ita"), [0, 1], tmp_path / "ab", cfg, log=logs.append,
           robustness=spec)
    assert not any(line.startswith("corrupting ") for line in logs)  # read back, not redone
    report = plot_robustness(tmp_path / "ab")
    assert Path(report["files"][0]).stat().st_size > 0
    assert report["curves"]["severities"] == [0, 2, 4]
    assert set(report["curves"]["families"]) == {"noise", "weather"}
