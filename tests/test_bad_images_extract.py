"""`extract --on-bad-image skip|fail` on an Ingredient-101 root with two broken images."""

import pytest

from marnet.pipeline.stage1.extract import extract
from marnet.pipeline.store import CacheError, FeatureCache

pytestmark = pytest.mark.filterwarnings("ignore::marnet.pipeline.datasets.base.DatasetWarning")

BROKEN = {"apple_pie/1001": ("zero", "empty file (0 bytes)"),
          "cheese_plate/3003": ("truncated", "cannot decode")}


@pytest.fixture
def broken_i101(tmp_path, write_ingredient101, write_image_file):
    images = tmp_path / "food-101" / "images"
    root = write_ingredient101(tmp_path / "i101", images_root=images)
    for image_id, (kind, _) in BROKEN.items():
        write_image_file(images / f"{image_id}.jpg", kind)
    return root, images


def test_skip_records_each_bad_image_and_the_counts_add_up(broken_i101, tmp_path,
                                                           make_extract_config):
    root, images = broken_i101
    cfg = make_extract_config(root, tmp_path / "cache", dataset="ingredient101",
                              on_bad_image="skip", dataset_options={"images_root": images})
    manifest = extract(cfg, log=lambda _: None).manifest
    skipped = {s["id"]: s for s in manifest["skipped"]}
    assert set(skipped) == set(BROKEN)
    for image_id, (_, reason) in BROKEN.items():
        assert reason in skipped[image_id]["reason"]
        assert skipped[image_id]["path"] == str(images / f"{image_id}.jpg")
    assert skipped["apple_pie/1001"]["split"] == "train"
    assert skipped["cheese_plate/3003"]["split"] == "test"
    rows = {s: m["rows"] for s, m in manifest["splits"].items()}
    valid = {s: m["valid_rows"] for s, m in manifest["splits"].items()}
    assert rows == {"train": 6, "val": 3, "test": 3}
    assert valid == {"train": 5, "val": 3, "test": 2}
    assert sum(rows.values()) - sum(valid.values()) == len(manifest["skipped"])
    cache = FeatureCache(manifest_path := tmp_path / "cache" / "ingredient101" / manifest["key"])
    assert manifest_path.is_dir()
    train = cache.load_split("train", ("id", "label", "visual"))
    assert "apple_pie/1001" not in train["id"] and len(train["id"]) == 5
    assert train["visual"].shape[0] == 5 and train["label"].tolist() == [0, 1, 1, 2, 2]
    assert cache.load_split("test", ("id",))["id"] == ["apple_pie/1003", "cheesecake/2003"]
    # the adapter's choices are recorded for later stages
    assert manifest["dataset"]["options"] == {"images_root": str(images)}
    assert manifest["dataset"]["extra"]["text_level"] == "class"
    assert manifest["class_names"] == ["apple_pie", "cheesecake", "cheese_plate"]
    assert "graham crackers" in manifest["ingredients"]


def test_fail_names_the_image(broken_i101, tmp_path, make_extract_config):
    root, images = broken_i101
    cfg = make_extract_config(root, tmp_path / "cache", dataset="ingredient101",
                              dataset_options={"images_root": images})
    with pytest.raises(CacheError) as err:
        extract(cfg, log=lambda _: None)
    message = str(err.value)
    assert "'apple_pie/1001'" in message and str(images / "apple_pie" / "1001.jpg") in message
    assert "empty file (0 bytes)" in message and "--on-bad-image skip" in message
