"""The vireo172 adapter on a small root in the real format, and every kind of bad input."""

import re

import pytest

from marnet.pipeline.datasets import DatasetError, DatasetWarning, load_dataset

pytestmark = pytest.mark.filterwarnings("ignore::marnet.pipeline.datasets.base.DatasetWarning")


@pytest.fixture
def vireo(tmp_path, write_vireo):
    return write_vireo(tmp_path / "vireo172")


def _ann(root, name):
    return root / "SplitAndIngreLabel" / name


def _edit(path, old, new):
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_reads_labels_images_and_text_of_present_ingredients(vireo):
    info = load_dataset("vireo172", vireo)
    assert {s: len(r) for s, r in info.splits.items()} == {"train": 6, "val": 3, "test": 3}
    assert info.class_names == ["Scrambled egg with tomato", "Yangzhou fried rice",
                                "Braised pork"]  # BOM dropped
    assert info.ingredients[-1] == "pork;lean"  # kept verbatim
    first = info.splits["train"][0]
    assert first.id == "/1/1_0.jpg" and first.label == 0
    assert first.image == vireo / "ready_chinese_food" / "1" / "1_0.jpg"
    assert first.ingredients == (0, 1) and first.text == "Ingredients: egg, tomato."
    # joined by path though IngreLabel.txt is reversed, tab- and multi-space separated
    rec = next(r for r in info.splits["train"] if r.id == "/2/2_4.jpg")
    assert rec.label == 1 and rec.ingredients == (0, 2, 3)
    assert rec.text == "Ingredients: egg, rice, green onion."
    val = info.splits["val"]  # CRLF file
    assert [r.id for r in val] == ["/1/1_2.jpg", "/2/2_6.jpg", "/3/3_10.jpg"]
    assert [r.label for r in info.splits["test"]] == [0, 1, 2]  # no final newline
    assert info.splits["test"][2].ingredients == ()
    assert info.extra["text_level"] == "image"


def test_template_is_configurable_and_changes_the_digest(vireo):
    plain = load_dataset("vireo172", vireo)
    custom = load_dataset("vireo172", vireo, template="A dish with {n} ingredients: {ingredients}")
    assert custom.splits["train"][0].text == "A dish with 2 ingredients: egg, tomato"
    assert custom.template == "A dish with {n} ingredients: {ingredients}"
    assert custom.digest() != plain.digest()


def test_counts_unlike_the_official_release_are_one_warning_not_an_error(vireo):
    with pytest.warns(DatasetWarning) as caught:
        load_dataset("vireo172", vireo)
    messages = [str(w.message) for w in caught]
    (counts,) = [m for m in messages if "official release" in m]
    for part in ("classes 3 (official 172)", "ingredients 5 (official 353)",
                 "train 6 (official 66,071)", "val 3 (official 11,016)",
                 "test 3 (official 33,154)"):
        assert part in counts


def test_a_dish_name_listed_twice_is_a_warning_and_lines_keep_their_class(vireo):
    _edit(_ann(vireo, "FoodList.txt"), "Braised pork", "Yangzhou fried rice")
    with pytest.warns(DatasetWarning, match=r"FoodList.txt: 1 name\(s\) listed more than once, "
                                            r"e.g. 'Yangzhou fried rice' \(lines 2 and 3\)"):
        info = load_dataset("vireo172", vireo)
    assert info.class_names == ["Scrambled egg with tomato", "Yangzhou fried rice",
                                "Yangzhou fried rice"]


def test_an_empty_name_list_names_the_file(vireo):
    _ann(vireo, "FoodList.txt").write_text("\n")
    with pytest.raises(DatasetError, match=r"FoodList.txt: no names found \(the file is empty\); "
                                           r"expected the dish list \(FoodList.txt\)"):
        load_dataset("vireo172", vireo)


def test_unknown_option_is_refused(vireo):
    with pytest.raises(DatasetError, match="does not take the option.*images_root.*none"):
        load_dataset("vireo172", vireo, images_root=vireo)


def test_missing_root_names_the_path_and_the_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"nope does not exist.*SplitAndIngreLabel"):
        load_dataset("vireo172", tmp_path / "nope")


@pytest.mark.parametrize("name", ["TR.txt", "VAL.txt", "TE.txt", "IngreLabel.txt",
                                  "IngredientList.txt", "FoodList.txt"])
def test_missing_file_names_the_expected_path(vireo, name):
    _ann(vireo, name).unlink()
    with pytest.raises(DatasetError, match="missing .*expected a file at") as err:
        load_dataset("vireo172", vireo)
    assert str(_ann(vireo, name)) in str(err.value)


def test_missing_annotation_folder(vireo):
    (vireo / "SplitAndIngreLabel").rename(vireo / "labels")
    with pytest.raises(DatasetError, match="expected a folder at .*SplitAndIngreLabel"):
        load_dataset("vireo172", vireo)


@pytest.mark.parametrize("bad", ["1/1_0.jpg", "/1/1_0.jpg 1 -1", "/one/1_0.jpg", "/1/x/1_0.jpg"])
def test_malformed_split_line_names_file_line_and_shape(vireo, bad):
    _edit(_ann(vireo, "TR.txt"), "/1/1_1.jpg", bad)
    with pytest.raises(DatasetError) as err:
        load_dataset("vireo172", vireo)
    assert "TR.txt:2: expected an image path like '/1/4_41.jpg'" in str(err.value)
    assert repr(bad) in str(err.value)


def test_wrong_number_of_ingredient_values(vireo):
    label_file = _ann(vireo, "IngreLabel.txt")
    lines = label_file.read_text().splitlines()
    lines[3] = lines[3].rstrip() + " -1"
    label_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"IngreLabel.txt:4: expected 5 ingredient values "
                                           r".* found 6"):
        load_dataset("vireo172", vireo)


@pytest.mark.parametrize("value", ["0", "2", "yes"])
def test_ingredient_value_other_than_plus_minus_one(vireo, value):
    label_file = _ann(vireo, "IngreLabel.txt")
    lines = label_file.read_text().splitlines()
    parts = lines[0].split()
    lines[0] = " ".join([parts[0], *parts[1:3], value, *parts[4:]])
    label_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=rf"IngreLabel.txt:1: ingredient value '{value}' in "
                                           r"column 3 is not 1 \(present\) or -1"):
        load_dataset("vireo172", vireo)


def test_class_folder_out_of_range(vireo):
    _edit(_ann(vireo, "TE.txt"), "/3/3_11.jpg", "/4/4_11.jpg")
    with pytest.raises(DatasetError, match=r"TE.txt:3: class folder 4 is outside 1..3"):
        load_dataset("vireo172", vireo)
    _edit(_ann(vireo, "TE.txt"), "/4/4_11.jpg", "/0/0_11.jpg")
    with pytest.raises(DatasetError, match=r"TE.txt:3: class folder 0 is outside 1..3"):
        load_dataset("vireo172", vireo)


def test_split_path_absent_from_the_label_file(vireo):
    _edit(_ann(vireo, "IngreLabel.txt"), "/2/2_6.jpg", "/2/2_66.jpg")
    with pytest.raises(DatasetError, match=r"VAL.txt:2: '/2/2_6.jpg' has no line in "
                                           r"IngreLabel.txt \(paths are matched exactly\)"):
        load_dataset("vireo172", vireo)


def test_label_paths_in_no_split_are_a_warning(vireo):
    label_file = _ann(vireo, "IngreLabel.txt")
    extra = "/3/3_99.jpg" + " -1" * 5
    label_file.write_text(label_file.read_text() + extra + "\n")
    with pytest.warns(DatasetWarning, match=r"1 paths are in no split file .*'/3/3_99.jpg'"):
        load_dataset("vireo172", vireo)


def test_duplicate_id_within_a_split(vireo):
    tr = _ann(vireo, "TR.txt")
    tr.write_text(tr.read_text() + "/1/1_0.jpg\n")
    with pytest.raises(DatasetError, match=r"TR.txt:7: duplicate id '/1/1_0.jpg', already "
                                           r"listed at .*TR.txt:1"):
        load_dataset("vireo172", vireo)


def test_duplicate_id_across_splits(vireo):
    te = _ann(vireo, "TE.txt")
    te.write_text(te.read_text() + "\n/1/1_1.jpg\n")
    with pytest.raises(DatasetError, match=r"TE.txt:4: duplicate id '/1/1_1.jpg', already "
                                           r"listed at .*TR.txt:2"):
        load_dataset("vireo172", vireo)


def test_duplicate_path_in_the_label_file(vireo):
    label_file = _ann(vireo, "IngreLabel.txt")
    first = label_file.read_text().splitlines()[0]
    label_file.write_text(label_file.read_text() + first + "\n")
    with pytest.raises(DatasetError, match=r"IngreLabel.txt:13: duplicate id .* already listed "
                                           r"at .*IngreLabel.txt:1; every image has one "
                                           r"ingredient line"):
        load_dataset("vireo172", vireo)


def test_empty_split(vireo):
    _ann(vireo, "VAL.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match=r"VAL.txt: the val split is empty"):
        load_dataset("vireo172", vireo)


def test_non_utf8_text_names_file_and_line(vireo):
    path = _ann(vireo, "IngredientList.txt")
    path.write_bytes(path.read_bytes().replace(b"tomato", b"tom\xe0to"))
    with pytest.raises(DatasetError, match=re.escape("IngredientList.txt:2: not valid UTF-8")):
        load_dataset("vireo172", vireo)


def test_demo_dataset_still_reads_through_this_parser(synth_root):
    info = load_dataset("synthfood", synth_root)
    assert info.name == "synthfood" and info.extra["text_level"] == "image"
    assert {s: len(r) for s, r in info.splits.items()} == {"train": 32, "val": 12, "test": 16}
