"""The embedded demo dataset: deterministic, VIREO layout, text that names what is drawn; it
never replaces a folder it did not write."""

import hashlib
from pathlib import Path

import pytest

from marnet.pipeline.datasets import DatasetError, load_dataset
from marnet.pipeline.datasets.synthfood import (
    INGREDIENTS,
    SynthFoodConfig,
    ensure_synthfood,
    generate,
    is_generated,
    make_dishes,
)

SMALL = SynthFoodConfig(num_classes=3, train_per_class=3, val_per_class=1, test_per_class=2,
                        image_size=32, seed=11)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_same_config_gives_identical_files(tmp_path):
    generate(tmp_path / "a", SMALL)
    generate(tmp_path / "b", SMALL)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_another_seed_gives_other_images(tmp_path):
    generate(tmp_path / "a", SMALL)
    generate(tmp_path / "b", SynthFoodConfig(**{**SMALL.__dict__, "seed": 12}))
    assert _digest(tmp_path / "a") != _digest(tmp_path / "b")


def test_written_in_the_vireo_layout_and_read_by_its_parser(tmp_path):
    root = tmp_path / "sf"
    generate(root, SMALL)
    for name in ("TR.txt", "VAL.txt", "TE.txt", "IngreLabel.txt", "IngredientList.txt",
                 "FoodList.txt"):
        assert (root / "SplitAndIngreLabel" / name).is_file()
    first = (root / "SplitAndIngreLabel" / "TR.txt").read_text().splitlines()[0]
    assert first == "/1/1_0.jpg" and (root / "ready_chinese_food" / "1" / "1_0.jpg").is_file()
    info = load_dataset("synthfood", root)
    assert {s: len(r) for s, r in info.splits.items()} == {"train": 9, "val": 3, "test": 6}
    assert info.ingredients == [name for name, *_ in INGREDIENTS]
    for rec in info.splits["train"]:
        names = [info.ingredients[i] for i in rec.ingredients]
        assert rec.text == "Ingredients: " + ", ".join(names) + "."
        assert rec.ingredients, "every image shows at least one ingredient"


def test_dishes_share_ingredients_and_differ():
    dishes = make_dishes(SynthFoodConfig())
    assert len(dishes) == 20
    assert len({(d.style, d.core) for d in dishes}) == 20
    assert len({d.name for d in dishes}) == 20, "class names are unique"
    counts = {}
    for d in dishes:
        for i in d.core:
            counts[i] = counts.get(i, 0) + 1
    assert max(counts.values()) >= 3, "common ingredients recur across dishes"


def test_ensure_generates_once(tmp_path):
    root = tmp_path / "sf"
    assert ensure_synthfood(root, SMALL) is True
    stamp = (root / "SplitAndIngreLabel" / "TR.txt").stat().st_mtime_ns
    assert ensure_synthfood(root, SMALL) is False
    assert (root / "SplitAndIngreLabel" / "TR.txt").stat().st_mtime_ns == stamp


def test_a_folder_that_is_not_a_demo_is_refused_and_left_alone(tmp_path):
    root = tmp_path / "vireo172"
    (root / "SplitAndIngreLabel").mkdir(parents=True)
    real = root / "SplitAndIngreLabel" / "TR.txt"
    real.write_text("/1/1_0.jpg\n")
    with pytest.raises(DatasetError, match=f"{root}: the folder is not empty and holds no "
                                           "synthfood.json.*new or empty folder"):
        load_dataset("synthfood", root)
    assert real.read_text() == "/1/1_0.jpg\n"


def test_an_empty_folder_or_a_demo_of_another_config_is_generated_over(tmp_path):
    root = tmp_path / "sf"
    root.mkdir()
    generate(root, SMALL)
    other = SynthFoodConfig(**{**SMALL.__dict__, "seed": 12})
    assert ensure_synthfood(root, other) is True
    assert is_generated(root, other)
