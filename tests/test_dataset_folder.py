"""The generic folder adapter: images/ plus labels.csv or labels.jsonl, and bad input."""

import json
import re
from pathlib import Path

import pytest

from marnet.pipeline.datasets import DatasetError, DatasetWarning, load_dataset


def _csv(root):
    return root / "labels.csv"


def _set_csv_line(root, line_no, text):
    lines = _csv(root).read_text().splitlines()
    lines[line_no - 1] = text
    _csv(root).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_name_labels_sorted_classes_and_text(tmp_path, write_folder, fmt):
    root = write_folder(tmp_path / "own", fmt)
    info = load_dataset("folder", root)
    assert info.class_names == ["dumpling", "ramen", "salad"]
    assert info.extra["labels"] == "name" and info.extra["class_order"] == "sorted label names"
    assert {s: len(r) for s, r in info.splits.items()} == {"train": 6, "val": 3, "test": 3}
    assert info.ingredients == ["cabbage", "egg", "lettuce", "noodle", "pork", "tomato"]
    first, second = info.splits["train"][:2]
    assert first.id == "ramen/a.jpg" and first.label == 1
    assert first.image == root / "images" / "ramen" / "a.jpg"
    assert first.text == "noodles in broth, with egg"  # a CSV field with a comma
    assert first.ingredients == (1, 3)
    assert second.text == "Ingredients: noodle, pork."  # empty text: built from ingredients
    salad = info.splits["train"][3]
    assert salad.id == "salad/b.jpg" and salad.ingredients == (2, 5)  # repeat dropped
    assert info.splits["test"][1].id == "salad/nested/d.jpg"


def test_csv_and_jsonl_give_the_same_dataset(tmp_path, write_folder):
    csv_info = load_dataset("folder", write_folder(tmp_path / "a", "csv"))
    jsonl_info = load_dataset("folder", write_folder(tmp_path / "b", "jsonl"))
    for split in csv_info.splits:
        assert [(r.id, r.label, r.text, r.ingredients) for r in csv_info.splits[split]] == \
            [(r.id, r.label, r.text, r.ingredients) for r in jsonl_info.splits[split]]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_integer_labels_with_and_without_classes_txt(tmp_path, write_folder, fmt):
    plain = load_dataset("folder", write_folder(tmp_path / "a", fmt, integer_labels=True))
    assert plain.class_names == ["0", "1", "2"] and plain.extra["labels"] == "index"
    named = load_dataset("folder", write_folder(tmp_path / "b", fmt, integer_labels=True,
                                                classes=["dumpling", "ramen", "salad"]))
    assert named.class_names == ["dumpling", "ramen", "salad"]
    assert named.extra["class_order"] == "classes.txt"
    assert [r.label for r in named.splits["train"]] == [1, 1, 2, 2, 0, 0]


def test_classes_txt_fixes_the_order_of_name_labels(tmp_path, write_folder):
    root = write_folder(tmp_path / "own", classes=["salad", "ramen", "dumpling"])
    info = load_dataset("folder", root)
    assert info.class_names == ["salad", "ramen", "dumpling"]
    assert [r.label for r in info.splits["train"]] == [1, 1, 0, 0, 2, 2]
    (root / "classes.txt").write_text("salad\nramen\n")
    with pytest.raises(DatasetError, match=r"labels.csv:10: label 'dumpling' is not a class in "
                                           r"classes.txt"):
        load_dataset("folder", root)


def test_missing_val_split_is_allowed(tmp_path, write_folder):
    info = load_dataset("folder", write_folder(tmp_path / "own", with_val=False))
    assert set(info.splits) == {"train", "test"}


def test_one_based_integer_labels_warn(tmp_path, write_folder):
    root = write_folder(tmp_path / "own", integer_labels=True)
    text = _csv(root).read_text()
    for old, new in ((",2,", ",3,"), (",1,", ",2,"), (",0,", ",1,")):
        text = text.replace(old, new)
    _csv(root).write_text(text)
    with pytest.warns(DatasetWarning, match=r"1 of 0..3 have no image \(first: 0\); if your "
                                            r"labels start at 1"):
        load_dataset("folder", root)


def test_missing_or_ambiguous_label_table(tmp_path, write_folder):
    root = write_folder(tmp_path / "own")
    (root / "labels.jsonl").write_text("")
    with pytest.raises(DatasetError, match="has both labels.csv and labels.jsonl"):
        load_dataset("folder", root)
    (root / "labels.jsonl").unlink()
    _csv(root).unlink()
    with pytest.raises(DatasetError, match=r"expected .*own/labels.csv or .*own/labels.jsonl"):
        load_dataset("folder", root)
    with pytest.raises(DatasetError, match=r"nope does not exist"):
        load_dataset("folder", tmp_path / "nope")


def test_missing_images_folder(tmp_path, write_folder):
    root = write_folder(tmp_path / "own")
    (root / "images").rename(root / "pictures")
    with pytest.raises(DatasetError, match=r"missing image folder: expected a folder at "
                                           r".*own/images"):
        load_dataset("folder", root)


@pytest.mark.parametrize("line, problem", [
    ("ramen/x.jpg,ramen,t,training,", "split must be one of train, val, test, found 'training'"),
    ("ramen/x.jpg,ramen,t,train", "expected 5 comma-separated fields"),
    ("ramen/x.jpg,,t,train,", "label is empty"),
    ("ramen/x.jpg,ramen,,train,", "text and ingredients are both empty"),
    ("/abs/x.jpg,ramen,t,train,", "path '/abs/x.jpg' must be relative to images/"),
    ("../x.jpg,ramen,t,train,", "path '../x.jpg' must be relative to images/"),
    ("ramen/a.jpg,ramen,t,test,", "duplicate id 'ramen/a.jpg', already listed at"),
    ('ramen/x.jpg,"ramen,t,train,', "expected 5 comma-separated fields"),
])
def test_malformed_csv_row_names_file_and_line(tmp_path, write_folder, line, problem):
    root = write_folder(tmp_path / "own")
    _set_csv_line(root, 4, line)
    with pytest.raises(DatasetError, match=re.escape(f"labels.csv:4: {problem}")):
        load_dataset("folder", root)


def test_csv_header_must_name_the_columns(tmp_path, write_folder):
    root = write_folder(tmp_path / "own")
    _set_csv_line(root, 1, "file,label,caption,split")
    with pytest.raises(DatasetError, match=r"labels.csv:1: expected the columns path, label, "
                                           r"split and text and/or ingredients, found file"):
        load_dataset("folder", root)
    _set_csv_line(root, 1, "path,label,text,split,text")
    with pytest.raises(DatasetError, match=r"labels.csv:1: column 'text' is named twice"):
        load_dataset("folder", root)


@pytest.mark.parametrize("line, problem", [
    ('{"path": "x.jpg", "label": "ramen"', "expected one JSON object per line"),
    ('["x.jpg", "ramen"]', "expected a JSON object"),
    ('{"path": "x.jpg", "label": "ramen", "split": "train"}', "expected the columns"),
    ('{"path": "x.jpg", "label": "ramen", "split": "train", "ingredients": "egg"}',
     "ingredients must be a list of strings"),
    ('{"path": "x.jpg", "label": ["ramen"], "split": "train", "text": "t"}',
     'label must be a string or a number, found ["ramen"]'),
])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, write_folder, line, problem):
    root = write_folder(tmp_path / "own", "jsonl")
    lines = (root / "labels.jsonl").read_text().splitlines()
    lines[2] = line
    (root / "labels.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=re.escape(f"labels.jsonl:3: {problem}")):
        load_dataset("folder", root)


def test_integer_label_out_of_range_and_mixed_labels(tmp_path, write_folder):
    root = write_folder(tmp_path / "own", integer_labels=True, classes=["a", "b", "c"])
    _set_csv_line(root, 3, "ramen/b.jpg,3,t,train,")
    with pytest.raises(DatasetError, match=re.escape("labels.csv:3: label 3 is outside 0..2")):
        load_dataset("folder", root)
    _set_csv_line(root, 3, "ramen/b.jpg,ramen,t,train,")
    with pytest.raises(DatasetError, match=re.escape("labels.csv:3: label 'ramen' mixes with "
                                                     "line 2's '1'")):
        load_dataset("folder", root)


def test_empty_required_split(tmp_path, write_folder):
    root = write_folder(tmp_path / "own")
    text = _csv(root).read_text().replace(",test,", ",val,")
    _csv(root).write_text(text)
    with pytest.raises(DatasetError, match=r"labels.csv: no rows with split 'test'; train and "
                                           r"test are required"):
        load_dataset("folder", root)
    _csv(root).write_text("path,label,text,split\n")
    with pytest.raises(DatasetError, match=r"labels.csv: no rows"):
        load_dataset("folder", root)


def test_non_utf8_csv_names_the_line(tmp_path, write_folder):
    root = write_folder(tmp_path / "own")
    data = _csv(root).read_bytes().replace(b"green salad", b"green sal\xe4d")
    _csv(root).write_bytes(data)
    with pytest.raises(DatasetError, match=re.escape("labels.csv:6: not valid UTF-8")):
        load_dataset("folder", root)


def test_jsonl_integer_labels_are_numbers(tmp_path, write_folder):
    root = write_folder(tmp_path / "own", "jsonl", integer_labels=True)
    first = json.loads((root / "labels.jsonl").read_text().splitlines()[0])
    assert first["label"] == 1
    assert load_dataset("folder", root).splits["train"][0].label == 1


def test_the_readme_example_reads_as_documented(tmp_path, write_image_file):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("```csv\n", 1)[1].split("```", 1)[0]
    root = tmp_path / "mine"
    root.mkdir()
    (root / "labels.csv").write_text(example)
    for line in example.splitlines()[1:]:
        path = line.split(",")[0]
        write_image_file(root / "images" / path, "png_alpha" if path.endswith(".png") else "rgb")
    info = load_dataset("folder", root)
    assert info.class_names == ["ramen", "salad"]
    assert {s: len(r) for s, r in info.splits.items()} == {"train": 3, "val": 1, "test": 2}
    assert info.splits["train"][0].text == "pork broth, noodles and a soft egg"
    assert info.splits["train"][1].text == "Ingredients: noodle, scallion."
