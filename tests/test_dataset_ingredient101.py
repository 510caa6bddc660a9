"""The ingredient101 adapter on a small root in the real format, and every kind of bad input."""

import re

import pytest

from marnet.pipeline.datasets import DatasetError, DatasetWarning, load_dataset

pytestmark = pytest.mark.filterwarnings("ignore::marnet.pipeline.datasets.base.DatasetWarning")


@pytest.fixture
def i101(tmp_path, write_ingredient101):
    return write_ingredient101(tmp_path / "ingredient101")


def _ann(root, name):
    return root / "Annotations" / name


def _set_line(path, line_no, text):
    lines = path.read_text().splitlines()
    lines[line_no - 1] = text
    path.write_text("\n".join(lines) + "\n")


def test_reads_class_order_from_the_file_and_per_class_ingredients(i101):
    info = load_dataset("ingredient101", i101)
    # Food-101 order, not sorted order (sorting puts cheese_plate first)
    assert info.class_names == ["apple_pie", "cheesecake", "cheese_plate"]
    assert sorted(info.class_names) != info.class_names
    assert {s: len(r) for s, r in info.splits.items()} == {"train": 6, "val": 3, "test": 3}
    cake = [r for recs in info.splits.values() for r in recs if r.id.startswith("cheesecake/")]
    assert len(cake) == 4 and {r.label for r in cake} == {1}
    assert cake[0].image == i101 / "images" / "cheesecake" / "2000.jpg"
    # per class: every image of a class has the same text and ingredients
    assert {r.text for r in cake} == {"Ingredients: cream cheese, sugar, egg, graham crackers."}
    assert len({r.ingredients for r in cake}) == 1
    # the vocabulary: stripped, de-duplicated, sorted; case kept
    assert info.ingredients == ["Cheese", "apple", "butter", "cheese", "crackers",
                                "cream cheese", "egg", "flour", "graham crackers", "grapes",
                                "sugar"]
    pie = info.splits["train"][0]
    assert pie.text == "Ingredients: flour, apple, sugar, butter."  # the repeated apple dropped
    assert [info.ingredients[i] for i in pie.ingredients] == ["apple", "butter", "flour",
                                                              "sugar"]
    assert info.extra["text_level"] == "class" and info.extra["ingredient_list"] == "complete"


def test_simplified_ingredients_option(i101):
    info = load_dataset("ingredient101", i101, ingredients="simplified")
    assert info.ingredients == ["apple", "butter", "cheese", "cracker", "egg", "flour", "grape",
                                "sugar"]
    assert info.splits["test"][2].text == "Ingredients: cheese, grape, cracker."
    assert info.extra["ingredient_list"] == "simplified"
    assert info.digest() != load_dataset("ingredient101", i101).digest()
    with pytest.raises(DatasetError, match="ingredients must be one of complete, simplified, "
                                           "not 'full'"):
        load_dataset("ingredient101", i101, ingredients="full")


def test_images_under_a_separate_food101_root_and_lowercase_annotations(tmp_path,
                                                                       write_ingredient101):
    images = tmp_path / "food-101" / "images"
    root = write_ingredient101(tmp_path / "i101", images_root=images, annotations="annotations")
    info = load_dataset("ingredient101", root, images_root=images)
    assert info.splits["val"][2].image == images / "cheese_plate" / "3002.jpg"
    assert info.splits["val"][2].image.is_file()
    with pytest.raises(DatasetError, match=r"expected a folder at .*i101/images\. .*--images-root"):
        load_dataset("ingredient101", root)
    with pytest.raises(DatasetError, match=r"did you mean .*food-101/images\?"):
        load_dataset("ingredient101", root, images_root=images.parent)


def test_vocabulary_size_and_case_merges_are_warnings(i101):
    with pytest.warns(DatasetWarning) as caught:
        load_dataset("ingredient101", i101)
    messages = [str(w.message) for w in caught]
    assert any("11 unique ingredients, the official release has 446" in m for m in messages)
    assert any("1 group(s) of ingredient names differ only in case" in m and "Cheese / cheese" in m
               for m in messages)
    assert any("classes 3 (official 101)" in m and "train 6 (official 68,175)" in m
               for m in messages)


def test_missing_root_annotations_and_files(tmp_path, i101):
    with pytest.raises(DatasetError, match=r"nope does not exist.*Annotations"):
        load_dataset("ingredient101", tmp_path / "nope")
    _ann(i101, "val_labels.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing val label list: expected a file at "
                                           r".*Annotations/val_labels.txt"):
        load_dataset("ingredient101", i101)
    (i101 / "Annotations").rename(i101 / "meta")
    with pytest.raises(DatasetError, match=r"expected .*Annotations \(any case\)"):
        load_dataset("ingredient101", i101)


def test_two_annotation_folders_are_ambiguous(i101):
    (i101 / "ANNOTATIONS").mkdir()
    with pytest.raises(DatasetError, match="2 annotation folders .*keep one"):
        load_dataset("ingredient101", i101)


def test_label_must_match_the_class_of_the_image_line(i101):
    _set_line(_ann(i101, "train_labels.txt"), 3, "2")  # cheesecake/2000 labelled cheese_plate
    with pytest.raises(DatasetError) as err:
        load_dataset("ingredient101", i101)
    assert re.search(r"train_images.txt:3: image 'cheesecake/2000' is in class folder "
                     r"'cheesecake' but its label 2 is 'cheese_plate'", str(err.value))


@pytest.mark.parametrize("label, problem", [
    ("3", "label 3 is outside 0..2"), ("-1", "label -1 is outside 0..2"),
    ("one", "expected an integer class index, found 'one'")])
def test_bad_label_names_file_and_line(i101, label, problem):
    _set_line(_ann(i101, "test_labels.txt"), 2, label)
    with pytest.raises(DatasetError, match=re.escape(f"test_labels.txt:2: {problem}")):
        load_dataset("ingredient101", i101)


@pytest.mark.parametrize("line", ["cheesecake/2003.jpg", "cheesecake", "a/b/c", "cheese cake/1"])
def test_malformed_image_line(i101, line):
    _set_line(_ann(i101, "test_images.txt"), 2, line)
    with pytest.raises(DatasetError, match=re.escape(
            "test_images.txt:2: expected '<class_name>/<id>' with no extension")):
        load_dataset("ingredient101", i101)


def test_images_and_labels_must_align(i101):
    path = _ann(i101, "val_labels.txt")
    path.write_text(path.read_text() + "\n0\n")
    with pytest.raises(DatasetError, match=r"val_images.txt has 3 non-empty lines but "
                                           r".*val_labels.txt has 4"):
        load_dataset("ingredient101", i101)


def test_ingredient_file_needs_one_line_per_class(i101):
    path = _ann(i101, "ingredients.txt")
    path.write_text("\n".join(path.read_text().splitlines()[:2]) + "\n\n")
    with pytest.raises(DatasetError, match=r"ingredients.txt: expected one non-empty line per "
                                           r"class of classes.txt \(3\), found 2"):
        load_dataset("ingredient101", i101)


def test_duplicate_class_and_duplicate_image(i101):
    path = _ann(i101, "train_images.txt")
    _set_line(path, 2, "apple_pie/1000")
    with pytest.raises(DatasetError, match=r"train_images.txt:2: duplicate id 'apple_pie/1000', "
                                           r"already listed at .*train_images.txt:1"):
        load_dataset("ingredient101", i101)
    classes = _ann(i101, "classes.txt")
    classes.write_text(classes.read_text() + "apple_pie\n")
    with pytest.raises(DatasetError, match=r"classes.txt:4: 'apple_pie' is already listed at "
                                           r"line 1"):
        load_dataset("ingredient101", i101)


def test_empty_split(i101):
    _ann(i101, "test_images.txt").write_text("")
    _ann(i101, "test_labels.txt").write_text("\n")
    with pytest.raises(DatasetError, match=r"test_images.txt: the test split is empty"):
        load_dataset("ingredient101", i101)


def test_non_utf8_names_file_and_line(i101):
    path = _ann(i101, "ingredients.txt")
    path.write_bytes(path.read_bytes().replace(b"grapes", b"grap\xe9s"))
    with pytest.raises(DatasetError, match=re.escape("ingredients.txt:3: not valid UTF-8")):
        load_dataset("ingredient101", i101)
