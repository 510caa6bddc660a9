"""Result tables: mean +- std over seeds, as Markdown, CSV and JSON (Table-2 layout)."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

METRICS = ("top1", "top5")
# robustness columns, present when every row of a table was measured (``--robustness``):
# metric -> (header, decimals)
ROBUSTNESS_METRICS = {"mca": ("mCA (%)", 2), "relative": ("rel.", 3),
                      "noise": ("noise", 2), "blur": ("blur", 2), "weather": ("weather", 2),
                      "digital": ("digital", 2)}


def table_metrics(rows: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """Top-1 and top-5, and the robustness metrics any row has (a row that reads text at
    test time, such as the text-only ceiling, has none)."""
    return METRICS + tuple(m for m in ROBUSTNESS_METRICS if any(m in r for r in rows))


def aggregate(rows: Sequence[dict[str, Any]], group_keys: Sequence[str] = ("row",)
              ) -> list[dict[str, Any]]:
    """Group per-seed rows by ``group_keys`` (first-seen order); mean and std per metric."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in group_keys), []).append(row)
    out = []
    metrics = table_metrics(rows)
    for key, members in groups.items():
        entry: dict[str, Any] = dict(zip(group_keys, key))
        entry["seeds"] = [m["seed"] for m in members]
        for metric in metrics:
            if not all(metric in m for m in members):
                continue
            digits = ROBUSTNESS_METRICS.get(metric, ("", 2))[1]
            values = [float(m[metric]) for m in members]
            entry[f"{metric}_mean"] = round(statistics.fmean(values), digits)
            entry[f"{metric}_std"] = (round(statistics.stdev(values), digits)
                                      if len(values) > 1 else 0.0)
        out.append(entry)
    return out


def cell(entry: dict[str, Any], metric: str) -> str:
    """``mean ± std`` of a metric (the mean alone for a single seed)."""
    digits = ROBUSTNESS_METRICS.get(metric, ("", 2))[1]
    if f"{metric}_mean" not in entry:
        return "-"
    if len(entry["seeds"]) == 1:
        return f"{entry[f'{metric}_mean']:.{digits}f}"
    return f"{entry[f'{metric}_mean']:.{digits}f} ± {entry[f'{metric}_std']:.{digits}f}"


def metric_header(metric: str) -> str:
    """A metric's column header."""
    return {"top1": "Acc-1 (%)", "top5": "Acc-5 (%)"}.get(metric) or ROBUSTNESS_METRICS[metric][0]


def table_columns(table: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """The metrics any entry of a summary table holds, in column order."""
    return tuple(m for m in (*METRICS, *ROBUSTNESS_METRICS)
                 if m in METRICS or any(f"{m}_mean" in entry for entry in table))


def to_markdown(table: Sequence[dict[str, Any]], group_keys: Sequence[str] = ("row",),
                title: str | None = None) -> str:
    """The summary table as Markdown, in the papers' layout (optionally titled)."""
    metrics = table_columns(table)
    header = [*group_keys, *(metric_header(m) for m in metrics), "seeds"]
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in table:
        seeds = ",".join(str(s) for s in entry["seeds"])
        lines.append("| " + " | ".join([*(str(entry[k]) for k in group_keys),
                                         *(cell(entry, m) for m in metrics), seeds]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Sequence[dict[str, Any]]) -> str:
    """The summary table as CSV (one row per group; seeds space-separated)."""
    buf = io.StringIO()
    keys = dict.fromkeys(k for entry in table for k in entry if k != "seeds")
    fields = [*keys, "seeds"] if table else []
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for entry in table:
        writer.writerow({**entry, "seeds": " ".join(str(s) for s in entry["seeds"])})
    return buf.getvalue()


@dataclass(frozen=True)
class Matrix:
    """What a matrix of runs produced: one result per (row, seed) and the summary table of
    them (mean ± std per row), as :func:`write_tables` wrote it."""

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]


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


def noise_notes(rows: Sequence[dict[str, Any]], metric: str = "top1",
                sampling_error: bool = True) -> list[str]:
    """One line per row after the first: its difference from the first row (the baseline) and
    whether it is beyond twice the standard error of that difference.

    With two or more seeds per row the error comes from the seed spread (``s_a^2 / k_a +
    s_b^2 / k_b``); with one seed only the test-set sampling error of two accuracies on ``n``
    images is known, and the line says that training noise is not in it (with
    ``sampling_error`` False, as for mCA, whose settings share their images, single-seed rows
    get no line).
    """
    table = aggregate(rows)
    if len(table) < 2:
        return []
    sizes = {row["row"]: row.get("n") for row in rows}
    base = table[0]
    lines = []
    for entry in table[1:]:
        diff = entry[f"{metric}_mean"] - base[f"{metric}_mean"]
        seeds = min(len(entry["seeds"]), len(base["seeds"]))
        if seeds >= 2:
            se = math.sqrt(entry[f"{metric}_std"] ** 2 / len(entry["seeds"])
                           + base[f"{metric}_std"] ** 2 / len(base["seeds"]))
            basis = f"the spread over {seeds} seeds"
        elif sampling_error and sizes.get(entry["row"]):
            n = sizes[entry["row"]]
            p1, p2 = entry[f"{metric}_mean"] / 100, base[f"{metric}_mean"] / 100
            se = 100 * math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / n)
            basis = (f"sampling {n:,} test images only; one seed cannot show the training "
                     "noise, which adds to it")
        else:
            continue
        beyond = abs(diff) >= 2 * se
        verdict = (("better" if diff > 0 else "worse") + " than the baseline beyond the noise"
                   if beyond else "inside the noise")
        lines.append(f"{entry['row']}: {diff:+.2f} {metric} against {base['row']} "
                     f"(2 SE = {2 * se:.2f}, {basis}): {verdict}")
    return lines


def write_sections(out_dir: Path | str, sections: Sequence[tuple[str, Sequence[dict[str, Any]]]],
                   extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Several titled tables in one ``results.md`` (each followed by its noise notes) and
    ``results.json``; returns ``[{title, summary, notes}, ...]``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables, parts = [], []
    for title, rows in sections:
        summary, notes = aggregate(rows), noise_notes(rows)
        if "mca" in table_metrics(rows):
            notes += noise_notes([r for r in rows if "mca" in r], "mca", sampling_error=False)
        tables.append({"title": title, "summary": summary, "notes": notes, "rows": list(rows)})
        parts.append(to_markdown(summary, ("row",), title)
                     + "".join(f"\n- {line}" for line in notes) + "\n")
    (out / "results.md").write_text("\n".join(parts))
    (out / "results.json").write_text(json.dumps({"tables": tables, **(extra or {})},
                                                 indent=2) + "\n")
    return tables
