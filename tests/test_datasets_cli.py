"""`marnet datasets` and `marnet datasets check` on fixture roots of each format."""

import json

import pytest
from typer.testing import CliRunner

from marnet.cli import app

runner = CliRunner()


def _check(*args):
    return runner.invoke(app, ["datasets", "check", *args])


def _report(result, exit_code=0):
    assert result.exit_code == exit_code, result.output + repr(result.exception)
    return json.loads(result.stdout)


def test_datasets_lists_every_adapter():
    result = runner.invoke(app, ["datasets"])
    assert result.exit_code == 0
    for name in ("vireo172", "ingredient101", "folder", "synthfood"):
        assert name in result.output


def test_check_vireo172_summary(tmp_path, write_vireo):
    root = write_vireo(tmp_path / "vireo172")
    report = _report(_check("--dataset", "vireo172", "--root", str(root), "--json"))
    assert report["ok"] and report["images_scanned"] and report["bad_images"] == 0
    assert report["num_classes"] == 3 and report["ingredient_vocabulary"] == 5
    splits = report["splits"]
    assert {s: v["images"] for s, v in splits.items()} == {"train": 6, "val": 3, "test": 3}
    assert splits["train"]["ingredients_per_image"] == {"mean": 2.0, "min": 1, "max": 3}
    assert splits["test"]["ingredients_per_image"] == {"mean": 1.0, "min": 0, "max": 2}
    assert all(v["missing"] == 0 and v["unreadable"] == 0 for v in splits.values())
    assert any("train 6 (official 66,071)" in w for w in report["warnings"])


def test_check_ingredient101_with_options(tmp_path, write_ingredient101):
    images = tmp_path / "food-101" / "images"
    root = write_ingredient101(tmp_path / "i101", images_root=images)
    report = _report(_check("--dataset", "ingredient101", "--root", str(root),
                            "--images-root", str(images), "--ingredients", "simplified",
                            "--json"))
    assert report["options"] == {"images_root": str(images.resolve()),
                                 "ingredients": "simplified"}
    assert report["class_names"] == ["apple_pie", "cheesecake", "cheese_plate"]
    assert report["ingredient_vocabulary"] == 8 and report["unique_texts"] == 3
    assert report["extra"]["text_level"] == "class"
    assert report["splits"]["val"]["classes_present"] == 3 and report["ok"]


def test_check_folder_prints_a_readable_summary(tmp_path, write_folder):
    root = write_folder(tmp_path / "own", with_val=False)
    result = _check("--dataset", "folder", "--root", str(root))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "3 (dumpling, ramen, salad)" in out and "6 ingredients" in out
    lines = {line.split("│")[1].strip(): line for line in out.splitlines()
             if line.count("│") > 3}
    assert set(lines) >= {"train", "test"} and "val" not in lines
    assert [c.strip() for c in lines["train"].split("│")[2:4]] == ["6", "3"]
    assert "ok: folder" in out


def test_check_reports_missing_and_unreadable_images(tmp_path, write_vireo, write_image_file):
    root = write_vireo(tmp_path / "vireo172")
    images = root / "ready_chinese_food"
    (images / "1" / "1_0.jpg").unlink()
    write_image_file(images / "2" / "2_5.jpg", "truncated")
    write_image_file(images / "3" / "3_11.jpg", "zero")
    report = _report(_check("--dataset", "vireo172", "--root", str(root), "--json",
                            "--workers", "2"), exit_code=1)
    assert not report["ok"] and report["bad_images"] == 3
    assert report["splits"]["train"]["missing"] == 1
    assert report["splits"]["train"]["unreadable"] == 1
    assert report["splits"]["test"]["unreadable"] == 1
    failures = {f["id"]: f for f in report["failures"]}
    assert failures["/1/1_0.jpg"]["kind"] == "missing"
    assert "cannot decode" in failures["/2/2_5.jpg"]["reason"]
    assert "empty file (0 bytes)" in failures["/3/3_11.jpg"]["reason"]
    text = _check("--dataset", "vireo172", "--root", str(root))
    assert text.exit_code == 1 and "3 bad images" in text.output
    assert "missing: [train]" in text.output and "unreadable: [test]" in text.output

    skipped = _report(_check("--dataset", "vireo172", "--root", str(root), "--json",
                             "--no-images"))
    assert skipped["ok"] and not skipped["images_scanned"]
    assert skipped["splits"]["train"]["missing"] is None


def test_check_format_error_is_one_line_with_exit_2(tmp_path, write_vireo):
    root = write_vireo(tmp_path / "vireo172")
    (root / "SplitAndIngreLabel" / "TR.txt").write_text("1/1_0.jpg\n")
    result = _check("--dataset", "vireo172", "--root", str(root))
    assert result.exit_code == 2 and "TR.txt:1: expected an image path" in result.output
    assert "Traceback" not in result.output
    report = _report(_check("--dataset", "vireo172", "--root", str(root), "--json"), 2)
    assert report["ok"] is False and "TR.txt:1:" in report["error"]


@pytest.mark.parametrize("command", ["extract", "finetune"])
def test_dataset_options_reach_the_adapter_only_when_given(tmp_path, write_vireo, command):
    root = write_vireo(tmp_path / "vireo172")
    extra = ["--out", str(tmp_path / "ft.safetensors")] if command == "finetune" else []
    base = [command, "--dataset", "vireo172", "--root", str(root), "--cache-dir",
            str(tmp_path / "cache"), *extra]
    result = runner.invoke(app, [*base, "--images-root", str(tmp_path), "--ingredients",
                                 "simplified"])
    assert result.exit_code == 2
    assert "does not take the option(s) images_root, ingredients" in result.output


def test_check_reports_through_the_callers_progress_and_datasets_import_no_ui(tmp_path,
                                                                             write_vireo):
    import ast
    from contextlib import contextmanager
    from pathlib import Path

    from marnet.pipeline.datasets.check import check_dataset

    seen = []

    @contextmanager
    def progress(description, total):
        seen.append((description, total))
        yield lambda n=1: seen.append(n)

    check_dataset("vireo172", write_vireo(tmp_path / "v"), progress=progress)
    assert seen == [("checking images", 12)] + [1] * 12
    package = Path(__file__).parents[1] / "pipeline" / "datasets"
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "progress" not in (node.module or ""), f"{source.name} imports a UI module"
