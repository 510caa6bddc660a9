"""The bench's measurements run and report sane, internally consistent figures (no timing
thresholds are asserted: the machine decides those)."""

from dataclasses import replace

import pytest
import torch

from marnet.pipeline.store import FeatureCache
from marnet.pipeline.tools.bench import (
    BenchConfig,
    _status,
    bench_cache_read,
    bench_ddim_vs_ddpm,
    bench_extract_vs_model,
    bench_finetune_step,
    bench_heads_vs_gemm,
    bench_heads_vs_naive,
    bench_inference_fold,
    timed,
)

TINY = BenchConfig(device="cpu", head_rows=512, head_batch=32, visual_dim=16, text_dim=8,
                   classes=3, read_rows=2000, warmup=1, iters=2, num_workers=0, sample_rows=40,
                   head_overrides={"diffusion.hidden": 32, "diffusion.schedule.steps": 20})
CPU = torch.device("cpu")


def test_timed_returns_the_median(monkeypatch):
    import marnet.pipeline.tools.bench as bench

    calls = []
    # a scripted clock: the five timed runs take 3, 1, 9, 2 and 5 s (the warm-ups read none)
    ticks = iter([0, 3, 10, 11, 20, 29, 30, 32, 40, 45])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks))
    assert timed(lambda: calls.append(1), 2, 5, CPU) == 3
    assert len(calls) == 7


def test_status_marks_pass_and_short_against_the_device_target():
    assert _status("heads_vs_naive", 25.0, torch.device("cuda")) == "pass"
    assert _status("heads_vs_naive", 5.0, torch.device("cuda")) == "short"
    assert _status("heads_vs_naive", 1.5, CPU) == "pass"
    assert _status("ddim_vs_ddpm", 30.0, CPU, extra_ok=False) == "short"
    assert _status("ablation_vs_end_to_end", 3.0, CPU) == "report"


def test_head_benches_report_consistent_ratios(tmp_path):
    naive = bench_heads_vs_naive(TINY, CPU, "fp32", tmp_path)
    assert naive["ratio"] == pytest.approx(naive["ours_samples_per_s"] / naive["naive_samples_per_s"])
    gemm = bench_heads_vs_gemm(TINY, CPU, "fp32")
    assert gemm["ratio"] == pytest.approx(gemm["step_gflops"] / gemm["gemm_gflops"])


def test_cache_read_bench_reads_both_formats(tmp_path):
    res = bench_cache_read(TINY, CPU, tmp_path)
    assert res["ratio"] == res["zarr_unchecked_vs_npy"]
    assert {"npy_mb_per_s", "zarr_mb_per_s", "zarr_unchecked_mb_per_s", "hdf5_mb_per_s",
            "check_cost", "check_ms_per_100mb"} <= set(res)


def test_fingerprint_bench_times_the_images_of_the_extraction_bench(tmp_path):
    from marnet.pipeline.tools.bench import _synthfood_subset, bench_fingerprint

    _synthfood_subset(TINY, tmp_path / "synthfood", 40)
    res = bench_fingerprint(tmp_path)
    assert res["images"] == len(list((tmp_path / "synthfood").rglob("*.jpg"))) >= 40
    assert res["ratio"] == pytest.approx(res["decode_ms_per_img"] / res["fingerprint_ms_per_img"])


def test_ddim_vs_ddpm_compares_step_counts_and_accuracy():
    res = bench_ddim_vs_ddpm(TINY, CPU, "fp32")
    assert res["ddpm"]["steps"] == 20 and res["ddim"]["steps"] == TINY.ddim_steps
    assert res["top1_drop"] == pytest.approx(res["ddpm"]["top1"] - res["ddim"]["top1"], abs=0.01)


def test_scaling_reports_throughput_per_size(tmp_path):
    from marnet.pipeline.tools.bench import bench_scaling

    res = bench_scaling(TINY, CPU, "fp32", tmp_path, size=32, head_rows=(64, 128), images=())
    assert [r["rows"] for r in res["heads"]] == [64, 128]
    assert all(r["samples_per_s"] == pytest.approx(r["rows"] / r["epoch_s"], rel=0.01)
               for r in res["heads"])
    assert res["extraction"] == []


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_extraction_bench_uses_the_chosen_decode_and_counts_both_backbones(tmp_path, decode):
    cfg = replace(TINY, visual="test_efficientnet", batch_size=8, decode=decode)
    res, cache = bench_extract_vs_model(cfg, CPU, "fp32", tmp_path, 32, 16)
    assert FeatureCache(cache).manifest["settings"]["decode"] == decode
    assert res["ratio"] == pytest.approx(res["extract_images_per_s"] / res["model_images_per_s"])
    # the model side is the vision forward plus the text forward, never the vision one alone
    assert res["model_images_per_s"] == pytest.approx(
        res["images"] / (res["images"] / res["vision_model_images_per_s"] + res["text_model_s"]))


def test_finetune_step_bench_times_both_training_steps_on_the_demo_blocks():
    res = bench_finetune_step(replace(TINY, visual="test_efficientnet", batch_size=4), CPU,
                              "fp32", 32)
    assert res["trained_blocks"] == "last-3" and res["batch"] == 4
    assert res["ce_step_ms"] > 0 and res["marnet_step_ms"] > 0 and res["ce_plain_step_ms"] > 0


def test_inference_fold_bench_compares_equal_features():
    res = bench_inference_fold(replace(TINY, visual="test_efficientnet", batch_size=4), CPU,
                               "fp32", 32)
    assert res["max_abs_difference"] < 1e-3 and res["plain_ms_per_image"] > 0
