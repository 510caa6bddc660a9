"""Data-parallel fine-tuning on CPU (torchrun, gloo, 2 processes): the same fine-tune as one
process with the same global batch, validation counting every image once, and a run stopped
under torchrun resumed in one process."""

import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from marnet.pipeline.datasets.synthfood import SynthFoodConfig, generate
from marnet.pipeline.engine.backbones import read_checkpoint_meta
from marnet.pipeline.stage1.extract import extract

# 9 validation images: they do not divide over 2 ranks
ODD = SynthFoodConfig(num_classes=3, train_per_class=8, val_per_class=3, test_per_class=3,
                      image_size=40, seed=5)
# float summation order differs between a batch and its two halves: weights agree to 1e-5,
# but for the attention biases of the keys, whose gradient is zero in exact arithmetic (softmax
# ignores a constant per query): Adam scales their float noise to steps of the learning rate
WEIGHT_TOLERANCE = 1e-5
NOISE_DRIVEN = "attn.qkv.bias"


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory, make_extract_config):
    root = tmp_path_factory.mktemp("odd") / "synthfood"
    generate(root, ODD)
    cache = extract(make_extract_config(root, root.parent / "cache"), log=lambda _: None).path
    return root, cache


def _args(root, cache, out, epochs=2):
    # a LayerNorm backbone: batch norm would see each rank's half batch (see the README)
    return ["-m", "marnet.cli", "finetune", "--dataset", "synthfood", "--root", str(root),
            "--out", str(out), "--visual", "test_vit", "--visual-weights", "random",
            "--image-size", "32", "--crop-pct", "1.0", "--method", "ita", "--text-cache",
            str(cache), "--epochs", str(epochs), "--batch-size", "8", "--num-workers", "0",
            "--device", "cpu", "--head-epochs", "1", "--no-augment"]


def _command(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(ranks)]


def _finetune(ranks, args, env):
    done = subprocess.run(_command(ranks) + args, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _close(a, b):
    """The largest weight difference of two checkpoints (noise-driven tensors left out)."""
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max())
               for k in wa if NOISE_DRIVEN not in k)


def test_two_processes_equal_one_with_the_same_global_batch(odd_dataset, tmp_path,
                                                            subprocess_env):
    root, cache = odd_dataset
    _finetune(1, _args(root, cache, tmp_path / "one.safetensors"), subprocess_env)
    log = _finetune(2, _args(root, cache, tmp_path / "two.safetensors"), subprocess_env)
    one, two = (read_checkpoint_meta(tmp_path / f"{n}.safetensors") for n in ("one", "two"))
    assert two["ranks"] == 2 and one["ranks"] == 1
    assert [h["val_top1"] for h in one["history"]] == [h["val_top1"] for h in two["history"]]
    assert [round(h["loss"], 3) for h in one["history"]] == [
        round(h["loss"], 3) for h in two["history"]]
    assert one["val_images"] == two["val_images"] == 9  # each once, none padded in
    assert one["val_top1"] == two["val_top1"]
    assert _close(tmp_path / "one.safetensors", tmp_path / "two.safetensors") < WEIGHT_TOLERANCE
    assert log.count("saved ") == 1  # rank 0 alone logs and writes


def test_a_run_stopped_under_torchrun_resumes_in_one_process(odd_dataset, tmp_path,
                                                             subprocess_env):
    root, cache = odd_dataset
    _finetune(1, _args(root, cache, tmp_path / "whole.safetensors", epochs=3), subprocess_env)
    out = tmp_path / "stopped.safetensors"
    state = tmp_path / "stopped.safetensors.state" / "last.pt"
    proc = subprocess.Popen(_command(2) + _args(root, cache, out, epochs=3), env=subprocess_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun stops its workers mid-run, as a job's end does
    proc.wait(timeout=120)
    assert state.exists() and not out.exists()
    stopped_after = torch.load(state, weights_only=False)["epoch"]
    log = _finetune(1, _args(root, cache, out, epochs=3), subprocess_env)
    assert f"resuming fine-tuning after epoch {stopped_after}" in log
    meta = read_checkpoint_meta(out)
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3] and meta["ranks"] == 1
    assert _close(out, tmp_path / "whole.safetensors") < WEIGHT_TOLERANCE


def _gradient_worker(rank: int, world: int, init: str, out: str) -> None:
    """One rank: its half of a batch through a linear 'backbone', a whole-batch loss of the
    gathered rows, then the gradients synchronised as data-parallel fine-tuning does."""
    from marnet.pipeline.engine.distributed import RankInfo, gather_rows, shard, sync_gradients

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    ranks = RankInfo(rank, world, True)
    backbone, head = _gradient_problem()
    images = torch.arange(10 * 3, dtype=torch.float32).view(10, 3) / 30
    local = torch.stack(shard(list(images), ranks))
    feats = gather_rows(backbone(local), ranks)
    _whole_batch_loss(head(feats)).backward()
    sync_gradients(backbone.parameters(), ranks, average=False)
    sync_gradients(head.parameters(), ranks, average=True)
    if rank == 0:
        torch.save({"backbone": backbone.weight.grad, "head": head.weight.grad}, out)
    torch.distributed.destroy_process_group()


def _gradient_problem():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)


def _whole_batch_loss(logits: torch.Tensor) -> torch.Tensor:
    """A loss that couples the rows (a softmax over the batch, as InfoNCE's)."""
    return -torch.log_softmax(logits[:, 0], dim=0)[0] + logits.pow(2).mean()


def test_gathered_rows_and_synchronised_gradients_equal_the_whole_batch_gradient(tmp_path):
    backbone, head = _gradient_problem()
    images = torch.arange(10 * 3, dtype=torch.float32).view(10, 3) / 30
    _whole_batch_loss(head(backbone(images))).backward()
    out = tmp_path / "grads.pt"
    torch.multiprocessing.spawn(_gradient_worker, args=(2, f"file://{tmp_path / 'rdzv'}",
                                                        str(out)), nprocs=2)
    grads = torch.load(out)
    assert torch.allclose(grads["backbone"], backbone.weight.grad, atol=1e-6)
    assert torch.allclose(grads["head"], head.weight.grad, atol=1e-6)


def test_ablate_finetune_under_torchrun_says_it_runs_in_one_process(monkeypatch):
    from marnet.pipeline.core.config import ConfigError
    from marnet.pipeline.tools.ablate import require_one_process

    require_one_process()  # alone: fine
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="runs in one process.*torchrun .* finetune"):
        require_one_process()
