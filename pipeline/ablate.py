"""Run a matrix of methods/switches x seeds on one cache and tabulate it (Table 2 layout).

Each (row, seed) trains into ``<out>/runs/<row>/seed<k>/``; a run whose ``results.json``
exists is skipped, so an interrupted ablation resumes where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from .report import write_tables
from .train import TrainConfig, train_heads


@dataclass(frozen=True)
class RowSpec:
    """One table row: a display name, a method, its overrides and its input features."""

    row: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)
    features: str = "visual"  # "text": the text-only ceiling (reads text at test time)


# MARNet Table 2 rows (METHODS §1.9): baseline, +EMA, +MLP, +CDR(MLP), +Fusion
TABLE2_ROWS = (
    RowSpec("Baseline (visual)", "visual"),
    RowSpec("+EMA", "marnet", {"variant": "ema"}),
    RowSpec("+MLP", "marnet", {"variant": "mlp"}),
    RowSpec("+CDR(MLP)", "marnet", {"variant": "cdr"}),
    RowSpec("+Fusion (MARNet)", "marnet", {"variant": "full"}),
)

TEXT_CEILING = RowSpec("Text-only ceiling (reads text at test)", "visual", features="text")


def slug(name: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in name.lower())
    return "-".join(p for p in keep.split("-") if p)


def run_matrix(cache: Path | str, rows: Sequence[RowSpec], seeds: Sequence[int],
               out_dir: Path | str, train_cfg: TrainConfig = TrainConfig(),
               shared_overrides: dict[str, dict[str, Any]] | None = None,
               title: str | None = None, log: Callable[[str], None] = print
               ) -> list[dict[str, Any]]:
    """Train every row for every seed (skipping finished runs) and write the result tables.

    ``shared_overrides`` maps a method name to overrides applied to all its rows (e.g. the
    demo's smaller denoiser) before the row's own.
    """
    out = Path(out_dir)
    results = []
    for spec in rows:
        overrides = {**(shared_overrides or {}).get(spec.method, {}), **spec.overrides}
        for seed in seeds:
            run_dir = out / "runs" / slug(spec.row) / f"seed{seed}"
            done = run_dir / "results.json"
            if done.is_file():
                log(f"{spec.row} seed {seed}: finished earlier, reusing {run_dir}")
                res = json.loads(done.read_text())
            else:
                log(f"{spec.row} seed {seed}")
                res = train_heads(cache, spec.method, run_dir, overrides,
                                  replace(train_cfg, seed=seed), log, spec.features)
            test = res.get("test") or res["val"]
            results.append({"row": spec.row, "method": spec.method, "seed": seed,
                            "top1": test["top1"], "top5": test["top5"],
                            "val_top1": res["val"]["top1"], "run": str(run_dir),
                            "train_seconds": res.get("train_seconds")})
    write_tables(out, results, ("row",), title, {"cache": str(cache), "seeds": list(seeds)})
    return results
