"""The imagefolder, hf and webdataset adapters: the records they read equal what the Hugging Face
``datasets`` and ``webdataset`` libraries read from the same files, equal the folder layout's,
and bad input names its file, row or key."""

import gzip
import os
import shutil
import sys
import tarfile
from pathlib import Path

import pytest

from marnet.pipeline.datasets import DatasetError, load_dataset
from marnet.pipeline.datasets.base import image_fingerprint, render_text
from marnet.pipeline.datasets.images import load_rgb
from marnet.pipeline.datasets.sources import TableCell, TarMember, buffer_fingerprint

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()


def _summary(info):
    """Per split: (label name, text, ingredient names) of each record, in order."""
    return {split: [(info.class_names[r.label], r.text,
                     tuple(info.ingredients[i] for i in r.ingredients)) for r in records]
            for split, records in info.splits.items()}


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory, write_folder):
    return write_folder(tmp_path_factory.mktemp("formats") / "folder")


@pytest.fixture(scope="module")
def folder_info(folder_root):
    return load_dataset("folder", folder_root)


def _hf_rows(root, tmp_path, **options):
    """``datasets.load_dataset("imagefolder")`` of ``root``: per split, rows with the image
    path relative to the root."""
    loaded = datasets.load_dataset("imagefolder", data_dir=str(root),
                                   cache_dir=str(tmp_path / "hf-cache"), **options)
    out = {}
    for split, part in loaded.items():
        rows = part.cast_column("image", datasets.Image(decode=False)).to_list()
        for row in rows:
            row["id"] = Path(os.path.relpath(row.pop("image")["path"], root)).as_posix()
        out[{"validation": "val"}.get(split, split)] = (rows, part.features)
    return out


def _expected_text(row):
    """The text marnet builds from an HF row: its text, else the template over its ingredients
    (each name once)."""
    text = row["text"]
    if isinstance(text, str) and text:
        return text
    names = row["ingredients"]
    return render_text("Ingredients: {ingredients}.",
                       list(dict.fromkeys(names.split(";") if isinstance(names, str) else names)))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_imagefolder_with_a_label_column_equals_datasets(tmp_path, folder_root, folder_info,
                                                         write_imagefolder, fmt):
    root = write_imagefolder(tmp_path / "hf", folder_root, fmt, fill="water")
    info = load_dataset("imagefolder", root)
    hf = _hf_rows(root, tmp_path)
    assert set(hf) == set(info.splits) == {"train", "val", "test"}
    for split, (rows, _) in hf.items():
        ours = [(r.id, info.class_names[r.label], r.text) for r in info.splits[split]]
        assert ours == [(row["id"], row["label"], _expected_text(row)) for row in rows]
    assert [(name, text) for name, text, _ in _summary(info)["train"]] == \
        [(name, text) for name, text, _ in _summary(folder_info)["train"]]
    assert info.splits["train"][0].image == root / "train" / "ramen" / "a.jpg"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_imagefolder_labels_from_class_folders_equal_datasets(tmp_path, folder_root,
                                                              folder_info, write_imagefolder,
                                                              fmt):
    root = write_imagefolder(tmp_path / "hf", folder_root, fmt, labels="folder", fill="water")
    info = load_dataset("imagefolder", root)
    with_metadata = _hf_rows(root, tmp_path / "a")
    # datasets labels by class folder only where there is no metadata: the same images bare
    bare = shutil.copytree(root, tmp_path / "bare")
    for path in bare.glob("*/metadata.*"):
        path.unlink()
    folder_labels = _hf_rows(bare, tmp_path / "b")
    for split, (rows, _) in with_metadata.items():
        assert [(r.id, r.text) for r in info.splits[split]] == \
            [(row["id"], _expected_text(row)) for row in rows]
        labels, features = folder_labels[split]
        assert features["label"].names == info.class_names  # sorted folder names
        by_id = {row["id"]: row["label"] for row in labels}
        assert [r.label for r in info.splits[split]] == [by_id[r.id] for r in info.splits[split]]
    assert [(name, text) for name, text, _ in _summary(info)["train"]] == \
        [(name, text) for name, text, _ in _summary(folder_info)["train"]]


def test_imagefolder_metadata_at_the_root(tmp_path, folder_root, folder_info,
                                          write_imagefolder):
    root = write_imagefolder(tmp_path / "hf", folder_root, "csv", metadata="root")
    info = load_dataset("imagefolder", root)
    assert info.source_files == [root / "metadata.csv"]
    assert [r.id for r in info.splits["val"]] == [
        "validation/ramen/c.jpg", "validation/salad/c.jpg", "validation/dumpling/c.jpg"]
    assert _summary(info) == _summary(folder_info)


def test_imagefolder_split_mapping(tmp_path, folder_root, write_imagefolder):
    root = write_imagefolder(tmp_path / "hf", folder_root, "jsonl")
    (root / "validation").rename(root / "holdout")
    with pytest.warns(UserWarning, match="split\\(s\\) 'holdout' not read"):
        assert "val" not in load_dataset("imagefolder", root).splits
    mapped = load_dataset("imagefolder", root, splits="val=holdout")
    assert [r.id for r in mapped.splits["val"]][0] == "holdout/ramen/c.jpg"
    with pytest.raises(DatasetError, match="--splits test=final: there is no split 'final'; "
                                           "found 'holdout', 'test', 'train'"):
        load_dataset("imagefolder", root, splits="test=final")
    with pytest.raises(DatasetError, match="'dev' is not one of marnet's splits"):
        load_dataset("imagefolder", root, splits="dev=holdout")


@pytest.mark.parametrize("layout", ["saved", "parquet"])
def test_hf_reads_images_from_their_bytes(tmp_path, folder_root, folder_info, write_hf, layout):
    root = write_hf(tmp_path / "hf", folder_root, layout)
    info = load_dataset("hf", root)
    assert _summary(info) == _summary(folder_info)
    assert info.class_names == ["dumpling", "ramen", "salad"]  # the ClassLabel's names
    first = info.splits["test"][1]
    assert first.id == "test/1" and isinstance(first.image, TableCell) and first.image.row == 1
    original = folder_root / "images" / "salad" / "nested" / "d.jpg"
    assert first.image.read() == original.read_bytes()
    assert first.image.fingerprint() == image_fingerprint(original)
    assert load_rgb(first.image).tobytes() == load_rgb(original).tobytes()


def test_hf_plain_parquet_without_hugging_face_metadata(tmp_path, folder_root, folder_info,
                                                        write_hf):
    import pyarrow.parquet as pq

    root = write_hf(tmp_path / "hf", folder_root, "parquet")
    for path in (root / "data").glob("*.parquet"):  # as pandas or pyarrow alone write them
        pq.write_table(pq.read_table(path).replace_schema_metadata(None), path)
    info = load_dataset("hf", root)
    assert info.class_names == ["0", "1", "2"]  # no ClassLabel: indices name the classes
    assert [r.label for r in info.splits["train"]] == \
        [r.label for r in folder_info.splits["train"]]
    assert info.splits["train"][0].image.read() == \
        (folder_root / "images" / "ramen" / "a.jpg").read_bytes()


def test_hf_parquet_rows_without_bytes_read_their_path(tmp_path, folder_root):
    part = datasets.Dataset.from_dict(
        {"image": [str(folder_root / "images" / "ramen" / "a.jpg")] * 2, "label": [0, 1],
         "text": ["a", "b"]}, features=datasets.Features(
            image=datasets.Image(), label=datasets.Value("int64"), text=datasets.Value("string")))
    for split in ("train", "test"):
        part.to_parquet(str(tmp_path / f"{split}.parquet"))
    info = load_dataset("hf", tmp_path)
    assert info.splits["train"][0].image == folder_root / "images" / "ramen" / "a.jpg"
    assert info.class_names == ["0", "1"]


def test_hf_bad_input_names_the_file_and_row(tmp_path, folder_root, write_hf):
    root = write_hf(tmp_path / "hf", folder_root, "parquet")
    train = root / "data" / "train-00000-of-00001.parquet"
    with pytest.raises(DatasetError, match=f"{train}: no label column 'class'.*--label-column"):
        load_dataset("hf", root, label_column="class")
    with pytest.raises(DatasetError, match=f"{train}: no image column 'picture'"):
        load_dataset("hf", root, image_column="picture")
    with pytest.raises(DatasetError, match=f"{train}: column 'text' is .*not an Image column"):
        load_dataset("hf", root, image_column="text")
    part = datasets.Dataset.from_dict({"image": [None], "label": [0], "text": ["t"]},
                                      features=datasets.Features(image=datasets.Image(),
                                                                 label=datasets.Value("int64"),
                                                                 text=datasets.Value("string")))
    part.to_parquet(str(train))
    with pytest.raises(DatasetError, match=f"{train} row 0: the image column 'image' has no "
                                           "bytes and its path None is not a file"):
        load_dataset("hf", root)
    part.save_to_disk(str(tmp_path / "single"))
    with pytest.raises(DatasetError, match="holds a single Dataset, not a DatasetDict"):
        load_dataset("hf", tmp_path / "single")


def test_webdataset_records_follow_webdataset_order(tmp_path, folder_root, folder_info,
                                                    write_webdataset):
    wds = pytest.importorskip("webdataset")
    pattern = write_webdataset(tmp_path / "shards", folder_root)
    info = load_dataset("webdataset", pattern)
    streamed = [s for s in wds.WebDataset(pattern, shardshuffle=False, empty_check=False)]
    ours = [r for split in ("train", "val", "test") for r in info.splits[split]]
    assert [r.id.rsplit("/", 1)[1] for r in ours] == [s["__key__"] for s in streamed]
    for record, sample in zip(ours, streamed):
        assert record.label == int(sample["cls"]) and record.image.read() == sample.get(
            "jpg", sample.get("png"))
        assert record.text == (sample["txt"].decode() if "txt" in sample else record.text)
    assert [r.id for r in info.splits["train"]][2:4] == ["train-00000.tar/salad_a",
                                                         "train-00001.tar/salad_b"]
    assert _summary(info)["train"] == [(str(folder_info.class_names.index(name)), text, ingr)
                                       for name, text, ingr in _summary(folder_info)["train"]]


def test_webdataset_json_labels_and_fingerprints(tmp_path, folder_root, folder_info,
                                                 write_webdataset):
    info = load_dataset("webdataset", write_webdataset(tmp_path / "shards", folder_root, "json"))
    assert _summary(info) == _summary(folder_info)
    in_folder = load_dataset("webdataset", tmp_path / "shards")  # every .tar, sorted: the same
    assert [r.id for r in in_folder.splits["train"]] == [r.id for r in info.splits["train"]]
    image = info.splits["train"][2].image
    original = folder_root / "images" / "salad" / "a.png"
    assert isinstance(image, TarMember) and image.member == "salad_a.png"
    assert image.fingerprint() == image_fingerprint(original) == buffer_fingerprint(
        original.read_bytes())
    assert str(image) == f"{tmp_path / 'shards' / 'train-00000.tar'}:salad_a.png"


def test_missing_packages_give_the_install_hint(tmp_path, monkeypatch, folder_root, write_hf,
                                                write_webdataset):
    pattern = write_webdataset(tmp_path / "shards", folder_root)
    root = write_hf(tmp_path / "hf", folder_root, "parquet")
    monkeypatch.setitem(sys.modules, "webdataset", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DatasetError, match=r"needs the webdataset package: pip install "
                                           r"'marnet\[webdataset\]'"):
        load_dataset("webdataset", pattern)
    with pytest.raises(DatasetError, match=r"needs the datasets package: pip install "
                                           r"'marnet\[hf\]'"):
        load_dataset("hf", root)



def test_imagefolder_bad_input_names_the_file_and_line(tmp_path, folder_root,
                                                       write_imagefolder):
    root = write_imagefolder(tmp_path / "hf", folder_root, "csv")
    train = root / "train" / "metadata.csv"
    with pytest.raises(DatasetError, match=f"{train}: no column 'caption' or 'parts' for the "
                                           "text"):
        load_dataset("imagefolder", root, text_column="caption", ingredients_column="parts")
    lines = train.read_text().splitlines()
    train.write_text("\n".join([lines[0], "../x.jpg,ramen,t,", *lines[2:]]) + "\n")
    with pytest.raises(DatasetError, match=f"{train}:2: file_name '../x.jpg' must be a relative"):
        load_dataset("imagefolder", root)
    train.write_text("\n".join(["name,label,text,ingredients", *lines[1:]]) + "\n")
    with pytest.raises(DatasetError, match=f"{train}: no file_name column"):
        load_dataset("imagefolder", root)
    train.unlink()
    with pytest.raises(DatasetError, match=f"{root / 'train'}: no metadata.csv or "
                                           "metadata.jsonl"):
        load_dataset("imagefolder", root)


def test_imagefolder_without_label_column_needs_class_folders(tmp_path, folder_root,
                                                              write_imagefolder):
    root = write_imagefolder(tmp_path / "hf", folder_root, "jsonl", labels="folder")
    test = root / "test" / "metadata.jsonl"
    test.write_text(test.read_text().replace('"ramen/d.jpg"', '"d.jpg"'))
    with pytest.raises(DatasetError, match=f"{test}:1: no label: the metadata has no 'label' "
                                           "column and d.jpg is not in a class sub-folder"):
        load_dataset("imagefolder", root)
    shutil.rmtree(root / "test")
    with pytest.raises(DatasetError, match="no test split \\(found 'train', 'validation'\\)"):
        load_dataset("imagefolder", root)


def _shards(tmp_path, folder_root, write_webdataset, labels="cls"):
    pattern = write_webdataset(tmp_path / "shards", folder_root, labels)
    return pattern, tmp_path / "shards" / "train-00001.tar"


def test_webdataset_key_without_label_or_image(tmp_path, folder_root, write_webdataset,
                                               write_tar):
    from marnet.pipeline.datasets.wds import load_webdataset

    pattern, shard = _shards(tmp_path, folder_root, write_webdataset)
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    write_tar(shard, [(n, d) for n, d in members if n != "salad_b.cls"])
    with pytest.raises(DatasetError, match=f"{shard} key 'salad_b': no label: no .cls member "
                                           "and no 'label' in its .json"):
        load_webdataset(pattern)
    write_tar(shard, [(n, d) for n, d in members if n != "salad_b.jpg"])
    with pytest.raises(DatasetError, match=f"{shard} key 'salad_b': expected one image member, "
                                           "found none"):
        load_webdataset(pattern)
    write_tar(shard, members[1:] + members[:1])
    with pytest.raises(DatasetError, match=f"{shard}: key 'salad_b' appears again at member "
                                           "'salad_b.jpg'"):
        load_webdataset(pattern)


def test_webdataset_corrupt_truncated_and_compressed_shards(tmp_path, folder_root,
                                                            write_webdataset):
    pattern, shard = _shards(tmp_path, folder_root, write_webdataset)
    data = shard.read_bytes()
    second = data.index(b"salad_b.json")  # the second member's header
    shard.write_bytes(data[:second + 100] + b"garbage" + data[second + 107:])
    with pytest.raises(DatasetError, match=f"{shard}: corrupt tar: the header at byte "
                                           f"{second}, after 'salad_b.jpg', cannot be read"):
        load_dataset("webdataset", pattern)
    for cut in (second - 600, second - 100):  # in the image's data, in its padding
        shard.write_bytes(data[:cut])
        with pytest.raises(DatasetError, match=f"{shard}: truncated: the file ends inside member "
                                               "'salad_b.jpg'"):
            load_dataset("webdataset", pattern)
    shard.write_bytes(gzip.compress(data))
    with pytest.raises(DatasetError, match=f"{shard}: a compressed tar"):
        load_dataset("webdataset", pattern)
    shard.unlink()
    with pytest.raises(DatasetError, match=f"{shard}: shard not found \\(1 of the 4 shards"):
        load_dataset("webdataset", pattern)
