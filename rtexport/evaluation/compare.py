"""A markdown table comparing the quality of several models (full, pruned by each method, at each skip ratio)."""

from __future__ import annotations

import math
from typing import Any, Sequence

MISSING = "–"


def format_layers(layers: Sequence[int] | None) -> str:
    """``[3, 7, 8, 9, 12]`` -> ``3, 7–9, 12``; an empty list -> ``none``."""
    if layers is None:
        return MISSING
    values = sorted(set(int(x) for x in layers))
    if not values:
        return "none"
    parts: list[str] = []
    start = prev = values[0]
    for v in values[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}–{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def _skip_ratio(value: Any) -> str:
    if value is None:
        return MISSING
    value = float(value)
    return f"{value:.0%}" if value <= 1 else f"{value:g}"


def _number(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return format(float(value), fmt)


def quality_table(entries: list[dict[str, Any]], metric: str = "acc") -> str:
    """Render one row per entry: method, skip ratio, skipped layers, perplexity, per-task accuracy (%), mean.

    An entry: ``{"method": "router-tuning", "skip_ratio": 0.25, "skipped_layers": [..], "perplexity": 23.1,
    "tasks": {task: {"acc": .., "acc_norm": .., "n": ..}}}`` (``tasks`` as returned by ``evaluation.evaluate``).
    Task columns are the union of the entries' tasks in first-seen order; a task cell shows ``metric`` and falls back
    to ``acc`` where the task has no such metric (lambada has no ``acc_norm``). The mean is over every task column,
    shown only for rows that have them all, so means in one column are comparable.
    """
    columns: list[str] = []
    for entry in entries:
        for task in entry.get("tasks") or {}:
            if task not in columns:
                columns.append(task)
    header = ["Method", "Skip ratio", "Skipped layers", "Perplexity", *columns]
    if columns:
        header.append(f"Mean {metric}")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for entry in entries:
        tasks = entry.get("tasks") or {}
        scores: list[float] = []
        cells = [
            str(entry.get("method", MISSING)),
            _skip_ratio(entry.get("skip_ratio")),
            format_layers(entry.get("skipped_layers", entry.get("skip"))),
            _number(entry.get("perplexity"), ".2f"),
        ]
        for task in columns:
            result = tasks.get(task) or {}
            value = result.get(metric, result.get("acc"))
            if value is not None:
                scores.append(float(value))
            cells.append(_number(None if value is None else 100 * float(value), ".1f"))
        if columns:
            mean = 100 * sum(scores) / len(scores) if len(scores) == len(columns) else None
            cells.append(_number(mean, ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
