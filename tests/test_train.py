"""The trainer: best-validation selection, class-balanced batches, row state handed to the
losses, learning on separable data; every registered head keeps the head contract."""

import numpy as np
import torch

from marnet.pipeline.engine.training import BatchSampler, TrainConfig, run_stage
from marnet.pipeline.models.heads import (
    METHODS,
    Dims,
    Head,
    SplitData,
    Stage,
    TrainContext,
    build_head,
    method_config,
)
from marnet.pipeline.stage2.train import train_heads
from marnet.pipeline.store import CacheWriter, FieldSpec, SplitLayout, to_storage


def test_each_group_keeps_its_best_validation_epoch_not_the_last():
    module = torch.nn.Linear(2, 1)
    scores = iter([0.2, 0.9, 0.1])
    snapshots = []

    def metric() -> float:
        snapshots.append({k: v.clone() for k, v in module.state_dict().items()})
        return next(scores)

    def loss(batch):
        out = module(batch["visual"]).pow(2).mean()
        return out, {}

    train = SplitData({"visual": torch.randn(16, 2), "label": torch.zeros(16, dtype=torch.long)})
    stage = Stage("stub", [module], loss, {"g": ([module], metric)}, fields=("visual",))
    ctx = TrainContext(torch.device("cpu"), torch.Generator().manual_seed(0))
    best = run_stage(stage, train, TrainConfig(epochs=3, batch_size=4, lr=0.1), ctx, "fp32",
                     lambda _: None)
    assert best == {"g": 0.9}
    for key, value in module.state_dict().items():
        assert torch.equal(value, snapshots[1][key]), "weights must be those of epoch 2"
        assert not torch.equal(value, snapshots[2][key])


def test_row_state_from_prepare_reaches_each_batch_at_its_rows():
    """What a stage's prepare() returns, one row per train row, joins every batch at the
    batch's own rows (the loss sees row state, never row indices)."""
    rows = 24
    train = SplitData({"visual": torch.randn(rows, 3), "label": torch.arange(rows) % 3})
    module = torch.nn.Linear(3, 1)
    seen = []

    def loss(batch):
        assert set(batch) == {"visual", "label", "row_id", "doubled"}
        assert torch.equal(batch["doubled"], 2 * batch["visual"])
        seen.append(batch["row_id"])
        return module(batch["visual"]).pow(2).mean(), {}

    def prepare():
        return {"row_id": torch.arange(rows), "doubled": 2 * train["visual"]}

    stage = Stage("rows", [module], loss, prepare=prepare, fields=("visual", "label"))
    ctx = TrainContext(torch.device("cpu"), torch.Generator().manual_seed(0))
    run_stage(stage, train, TrainConfig(epochs=2, batch_size=8), ctx, "fp32", lambda _: None)
    assert len(seen) == 2 * (rows // 8)
    for epoch in (seen[:3], seen[3:]):  # each epoch a permutation of the rows
        assert sorted(torch.cat(epoch).tolist()) == list(range(rows))


def test_every_registered_head_keeps_the_contract_and_stashes_no_tensors():
    """Each method builds a :class:`Head`; after all its stages train, the module holds its
    parameters and buffers only (stage state went to the losses through the batches), and
    its representations include the logits its prediction averages."""
    dims = Dims(12, 10, 3)
    gen = torch.Generator().manual_seed(0)
    data = {"visual": torch.randn(48, 12, generator=gen),
            "text": torch.randn(48, 10, generator=gen),
            "label": torch.arange(48) % 3}
    split = SplitData(data)
    small = {"marnet": {"variant": "full", "diffusion.hidden": 16, "diffusion.schedule.steps": 10,
                        "fusion_samples": 2, "fusion_epochs": 1},
             "seda": {"dst.refit_samples": 2, "dsl.hidden": 16, "dst.hidden": 16,
                      "dsl.schedule.steps": 10, "dst.schedule.steps": 10, "dsl.epochs": 1,
                      "dst.epochs": 1, "dst.steps": 5, "dsl.steps": 5}}
    for name in ("visual", "ita", "sdm", "swd", "ssan", "cdd", "marnet", "seda"):
        cfg = method_config(name, small.get(name, {}))
        head = build_head(name, cfg, dims)
        assert isinstance(head, Head), name
        ctx = TrainContext(torch.device("cpu"), torch.Generator().manual_seed(0))
        for stage in head.stages(split, split, ctx):
            run_stage(stage, split, TrainConfig(epochs=1, batch_size=16), ctx, "fp32",
                      lambda _: None)
        stashed = [key for module in head.modules() for key, value in vars(module).items()
                   if isinstance(value, torch.Tensor)]
        assert stashed == [], (name, stashed)
        rep = head.representations(data["visual"], torch.Generator().manual_seed(1))
        logits = head.predict(data["visual"], torch.Generator().manual_seed(1))
        assert logits.shape == (48, 3) and any(k.endswith("logits") for k in rep), (name, rep)
    assert set(METHODS) - {"team"} == {"visual", "ita", "sdm", "swd", "ssan", "cdd", "marnet",
                                       "seda"}


def test_balanced_batches_draw_classes_times_samples():
    labels = torch.arange(10).repeat_interleave(7)  # 10 classes x 7 rows
    sampler = BatchSampler(labels, batch_size=24, generator=torch.Generator().manual_seed(0),
                           balanced=True, classes_per_batch=4)
    for batch in sampler.epoch():
        counts = torch.bincount(labels[batch], minlength=10)
        assert (counts > 0).sum() == 4 and set(counts[counts > 0].tolist()) == {6}


def _separable_cache(root, rows=None, classes=4, dims=(16, 8)):
    rows = rows or {"train": 300, "val": 60, "test": 120}
    g = torch.Generator().manual_seed(0)
    v_means, s_means = 3 * torch.randn(classes, dims[0], generator=g), torch.randn(classes, dims[1], generator=g)
    fields = (FieldSpec("visual", (dims[0],), "float16"), FieldSpec("text", (dims[1],), "float16"),
              FieldSpec("label", (), "int32"), FieldSpec("id", (), "str"),
              FieldSpec("valid", (), "uint8"))
    layouts = {s: SplitLayout(n, 512, fields) for s, n in rows.items()}
    manifest = {"key": "separable", "inputs": {"dataset": {"name": "toy"}, "visual": {"model": "toy"},
                                               "text": {"model": "toy"}},
                "format": "zarr", "dtype": "float16", "class_names": [f"c{i}" for i in range(classes)],
                "dataset": {"name": "toy"}}
    with CacheWriter.open(root, manifest, layouts) as writer:
        for split, layout in layouts.items():
            labels = torch.arange(layout.rows) % classes
            visual = v_means[labels] + torch.randn(layout.rows, dims[0], generator=g)
            text = s_means[labels] + 0.1 * torch.randn(layout.rows, dims[1], generator=g)
            ids = [f"{split}{i}" for i in range(layout.rows)]
            writer.commit_shard(split, 0, {"visual": to_storage(visual, "float16"),
                                           "text": to_storage(text, "float16"),
                                           "label": labels.numpy().astype(np.int32),
                                           "id": np.array(ids),
                                           "valid": np.ones(layout.rows, np.uint8)}, ids)
        writer.finalise()
    return root


def test_methods_learn_separable_classes(tmp_path):
    cache = _separable_cache(tmp_path / "cache")
    cfg = TrainConfig(epochs=10, batch_size=32, lr=1e-2, device="cpu")
    small = {"diffusion.hidden": 64, "diffusion.schedule.steps": 20, "fusion_samples": 2}
    for method, overrides in (("visual", {}), ("ita", {}), ("marnet", small)):
        results = train_heads(cache, method, tmp_path / method, overrides, cfg, log=lambda _: None)
        assert results["test"]["top1"] > 90, (method, results["test"])


def test_ablation_without_a_test_split_says_it_reports_validation(tmp_path):
    from marnet.pipeline.tools.ablate import RowSpec, run_matrix

    cache = _separable_cache(tmp_path / "cache", rows={"train": 200, "val": 40})
    rows = run_matrix(cache, [RowSpec("Baseline (visual)", "visual")], [0], tmp_path / "ab",
                      TrainConfig(epochs=2, batch_size=32, device="cpu"), log=lambda _: None).rows
    assert rows[0]["split"] == "val"
    assert "VALIDATION split" in (tmp_path / "ab" / "results.md").read_text()
