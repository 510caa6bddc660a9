"""`marnet cache export --parquet`: every value of the cache read back through pyarrow, pandas
and Hugging Face datasets; one row group per shard; metadata; sentences; refusals."""

import json
import shutil
import sys
import types

import numpy as np
import pytest
from typer.testing import CliRunner

from marnet.cli import app
from marnet.pipeline.datasets import load_dataset
from marnet.pipeline.store import CacheError, FeatureCache, export_parquet, from_storage
from marnet.pipeline.store.parquet import Sentences

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _run(*args, code=0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture(scope="module")
def hdf5_bf16_cache(synth_root, tmp_path_factory, make_extract_config):
    from marnet.pipeline.stage1.extract import extract

    cfg = make_extract_config(synth_root, tmp_path_factory.mktemp("hdf5"), format="hdf5",
                              dtype="bfloat16")
    return extract(cfg, log=lambda _: None).path


def _cache_values(cache: FeatureCache, split: str, field: str) -> np.ndarray:
    """A field as the export must hold it: bfloat16 features exactly as float32."""
    values = cache.read_numpy(split, field)
    if field in ("visual", "text", "visual_tokens", "text_tokens") and cache.dtype == "bfloat16":
        return from_storage(values, "bfloat16").float().numpy()
    return values


def _column(table, name: str) -> np.ndarray:
    """A fixed-size-list column (any depth) as one numpy array of shape [rows, ...]."""
    column = table.column(name).combine_chunks()
    shape = [len(column)]
    while pa.types.is_fixed_size_list(column.type):
        shape.append(column.type.list_size)
        column = column.flatten()
    return column.to_numpy(zero_copy_only=False).reshape(shape)


@pytest.mark.parametrize("which", ["zarr float16", "hdf5 bfloat16"])
def test_parquet_holds_every_value_of_the_cache(which, tiny_cache, hdf5_bf16_cache, synth_root,
                                                tmp_path):
    path = tiny_cache if which.startswith("zarr") else hdf5_bf16_cache
    cache = FeatureCache(path)
    assert cache.manifest["format"] == which.split()[0] and cache.dtype == which.split()[1]
    _run("cache", "export", path, "--parquet", tmp_path / "pq")
    texts = {r.id: r.text for recs in load_dataset("synthfood", synth_root).splits.values()
             for r in recs}
    for split in cache.splits:
        file = pq.ParquetFile(tmp_path / "pq" / f"{split}.parquet")
        shards = cache.manifest["splits"][split]["shards"]
        assert [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)] == [
            s["rows"] for s in sorted(shards, key=lambda s: s["index"])]
        table = file.read()
        assert table.column_names == ["id", "label", "valid", "sentence", "visual", "text",
                                      "ingredients"]
        ids = table.column("id").to_pylist()
        assert ids == [str(i) for i in cache.read_numpy(split, "id")]
        assert table.column("sentence").to_pylist() == [texts[i] for i in ids]
        for field in ("label", "valid"):
            assert np.array_equal(table.column(field).to_numpy(), cache.read_numpy(split, field))
        for field in ("visual", "text", "ingredients"):
            expected = _cache_values(cache, split, field)
            got = _column(table, field)
            assert got.dtype == expected.dtype and np.array_equal(got, expected), (split, field)
    meta = json.loads(file.schema_arrow.metadata[b"marnet"])
    assert meta["key"] == cache.key and meta["inputs"] == cache.manifest["inputs"]
    assert meta["class_names"] == cache.class_names and meta["split"] == "test"
    flat = file.schema_arrow.metadata
    assert flat[b"marnet.dataset_digest"].decode() == cache.manifest["inputs"]["dataset"]["digest"]
    assert flat[b"marnet.visual"] == b"test_efficientnet" and flat[b"marnet.text"] == b"minilm"


def test_pandas_and_hf_datasets_read_the_export(tiny_cache, tmp_path):
    pd = pytest.importorskip("pandas")
    datasets = pytest.importorskip("datasets")
    export_parquet(tiny_cache, tmp_path / "pq")
    cache = FeatureCache(tiny_cache)
    visual = cache.read_numpy("train", "visual")
    frame = pd.read_parquet(tmp_path / "pq" / "train.parquet")
    assert list(frame["id"]) == [str(i) for i in cache.read_numpy("train", "id")]
    assert np.array_equal(np.stack(frame["visual"].to_numpy()), visual)
    loaded = datasets.load_dataset("parquet", cache_dir=str(tmp_path / "hf"), data_files={
        s: str(tmp_path / "pq" / f"{s}.parquet") for s in cache.splits})
    assert {s: len(d) for s, d in loaded.items()} == {"train": 32, "val": 12, "test": 16}
    train = loaded["train"].with_format("numpy")
    assert np.array_equal(train["visual"], visual)
    assert np.array_equal(train["label"], cache.read_numpy("train", "label"))
    assert str(loaded["train"].features["visual"]) == "List(Value('float16'), length=256)"


def test_token_fields_only_on_request(tiny_token_cache, tiny_cache, tmp_path):
    plain = export_parquet(tiny_token_cache, tmp_path / "plain")
    assert "visual_tokens" not in plain["splits"]["train"]["columns"]
    export_parquet(tiny_token_cache, tmp_path / "tok", tokens=True)
    cache = FeatureCache(tiny_token_cache)
    table = pq.read_table(tmp_path / "tok" / "val.parquet")
    for field in ("visual_tokens", "text_tokens", "text_mask"):
        expected = cache.read_numpy("val", field)
        got = _column(table, field)
        assert got.shape == expected.shape and np.array_equal(got, expected), field
    with pytest.raises(CacheError, match="extracted without `--tokens`"):
        export_parquet(tiny_cache, tmp_path / "none", tokens=True)


def test_refusals_incomplete_cache_existing_files_and_missing_pyarrow(tiny_cache, tmp_path,
                                                                      monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "status": "incomplete"}))
    assert "is incomplete" in _run("cache", "export", copy, "--parquet", tmp_path / "a", code=2)
    assert not (tmp_path / "a").exists()

    _run("cache", "export", tiny_cache, "--parquet", tmp_path / "b")
    out = _run("cache", "export", tiny_cache, "--parquet", tmp_path / "b", code=2)
    assert f"{tmp_path / 'b' / 'train.parquet'} exists" in out and "--force" in out
    _run("cache", "export", tiny_cache, "--parquet", tmp_path / "b", "--force")
    _run("cache", "export", tiny_cache, "--npy", tmp_path / "n")
    assert "index.json exists" in _run("cache", "export", tiny_cache, "--npy", tmp_path / "n",
                                       code=2)
    assert "--npy DIR and/or --parquet DIR" in _run("cache", "export", tiny_cache, code=2)

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    out = _run("cache", "export", tiny_cache, "--parquet", tmp_path / "c", code=2)
    assert "pip install 'marnet[parquet]'" in out and not (tmp_path / "c").exists()


def test_sentences_null_where_texts_share_their_features(tmp_path):
    """Texts whose stored features are bit-identical cannot be told apart: null, counted; a
    row matching no text means the table is not the cache's."""
    table = np.array([[1, 2], [1, 2], [3, 4]], dtype=np.float32)
    np.save(tmp_path / "text_table.npy", table)
    (tmp_path / "text_table.json").write_text(json.dumps({"texts": ["a", "a b", "c"]}))
    sentences = Sentences.read(types.SimpleNamespace(root=tmp_path, dtype="float16"))
    rows = table.astype(np.float16)[[2, 0, 2]]
    assert sentences.ambiguous_texts == 1
    assert sentences.of_rows(rows, np.array(["x", "y", "z"])) == ["c", None, "c"]
    with pytest.raises(CacheError, match="row 'w' match no text"):
        sentences.of_rows(np.array([[5, 6]], dtype=np.float16), np.array(["w"]))
    assert Sentences.read(types.SimpleNamespace(root=tmp_path / "gone", dtype="float16")) is None
