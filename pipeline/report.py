"""Result tables: mean +- std over seeds, as Markdown, CSV and JSON (Table-2 layout)."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any, Sequence

METRICS = ("top1", "top5")


def aggregate(rows: Sequence[dict[str, Any]], group_keys: Sequence[str] = ("row",)
              ) -> list[dict[str, Any]]:
    """Group per-seed rows by ``group_keys`` (first-seen order); mean and std per metric."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in group_keys), []).append(row)
    out = []
    for key, members in groups.items():
        entry: dict[str, Any] = dict(zip(group_keys, key))
        entry["seeds"] = [m["seed"] for m in members]
        for metric in METRICS:
            values = [float(m[metric]) for m in members]
            entry[f"{metric}_mean"] = round(statistics.fmean(values), 2)
            entry[f"{metric}_std"] = round(statistics.stdev(values), 2) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def cell(entry: dict[str, Any], metric: str) -> str:
    """``mean ± std`` of a metric (the mean alone for a single seed)."""
    if len(entry["seeds"]) == 1:
        return f"{entry[f'{metric}_mean']:.2f}"
    return f"{entry[f'{metric}_mean']:.2f} ± {entry[f'{metric}_std']:.2f}"


def to_markdown(table: Sequence[dict[str, Any]], group_keys: Sequence[str] = ("row",),
                title: str | None = None) -> str:
    """The summary table as Markdown, in the papers' layout (optionally titled)."""
    header = [*group_keys, "Acc-1 (%)", "Acc-5 (%)", "seeds"]
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in table:
        seeds = ",".join(str(s) for s in entry["seeds"])
        lines.append("| " + " | ".join([*(str(entry[k]) for k in group_keys), cell(entry, "top1"),
                                         cell(entry, "top5"), seeds]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Sequence[dict[str, Any]]) -> str:
    """The summary table as CSV (one row per group; seeds space-separated)."""
    buf = io.StringIO()
    fields = [k for k in table[0] if k != "seeds"] + ["seeds"] if table else []
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for entry in table:
        writer.writerow({**entry, "seeds": " ".join(str(s) for s in entry["seeds"])})
    return buf.getvalue()


def write_tables(out_dir: Path | str, rows: Sequence[dict[str, Any]],
                 group_keys: Sequence[str] = ("row",), title: str | None = None,
                 extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Write ``results.md``, ``results.csv`` and ``results.json`` (per-seed rows + summary)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = aggregate(rows, group_keys)
    (out / "results.md").write_text(to_markdown(table, group_keys, title))
    (out / "results.csv").write_text(to_csv(table))
    (out / "results.json").write_text(json.dumps(
        {"rows": list(rows), "summary": table, **(extra or {})}, indent=2) + "\n")
    return table
