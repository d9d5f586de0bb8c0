"""Result rows of ``evaluate``: the columns, the mean row, the text table and the metrics files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..engine.atomic_files import atomic_path

#: The keys of every result row (``metrics.json``, ``metrics.csv``, ``--json``), in order.
KEYS = (
    "category",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "fit_seconds",
    "ms_per_image",
    "memory_bank_size",
    "backbone",
    "coreset_ratio",
    "defect_image_auroc",
)


def percent(value: Any) -> str:
    """A rate in percent with one decimal, as the paper's tables; ``-`` for none."""
    return "-" if value is None else f"{100 * value:.1f}"


def number(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def json_default(value):
    """``json.dumps`` ``default=`` for numpy scalars."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _mean_or_none(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def public_row(row: dict) -> dict:
    """A row with exactly :data:`KEYS` (and ``error`` when the data set failed)."""
    public = {key: row.get(key) for key in KEYS}
    if row.get("error") is not None:
        public["error"] = row["error"]
    return public


def mean_row(rows: Sequence[dict]) -> dict:
    """The ``"mean"`` row: averages over the successful data sets (None where there are no values)."""
    ok = [row for row in rows if row.get("error") is None and row.get("category") != "mean"]
    mean: dict[str, Any] = {"category": "mean"}
    for key in KEYS[1:]:
        values = [row.get(key) for row in ok]
        if key == "backbone":
            names = sorted({str(v) for v in values if v is not None})
            mean[key] = names[0] if len(names) == 1 else (", ".join(names) or None)
        elif key == "defect_image_auroc":
            mean[key] = None
        else:
            mean[key] = _mean_or_none(values)
    return mean


def write_summary(output: Path, rows: list[dict]) -> None:
    """``metrics.json`` (rows + mean) and ``metrics.csv`` in ``output``, each replaced atomically."""
    output.mkdir(parents=True, exist_ok=True)
    public = [public_row(row) for row in rows] + [mean_row(rows)]
    with atomic_path(output / "metrics.json") as temporary:
        temporary.write_text(json.dumps(public, indent=2, default=json_default) + "\n")
    columns = [key for key in KEYS if key != "defect_image_auroc"]
    with atomic_path(output / "metrics.csv") as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*columns, "error"])
        writer.writeheader()
        for row in public:
            writer.writerow({key: ("" if row.get(key) is None else row.get(key)) for key in (*columns, "error")})


def format_table(rows: Sequence[dict]) -> str:
    """A paper-like table: AUROCs and AUPRO in percent with one decimal; the mean row last, then
    image AUROC per defect type."""
    rows = list(rows)
    body = [row for row in rows if row.get("category") != "mean"]
    mean = next((row for row in rows if row.get("category") == "mean"), None) or mean_row(body)
    header = ("category", "image AUROC", "pixel AUROC", "AUPRO", "fit s", "ms/img", "bank size")

    def cells(row: dict) -> list[str]:
        if row.get("error") is not None:
            return [str(row["category"]), f"error: {row['error']}"]
        return [
            str(row["category"]),
            percent(row.get("image_auroc")),
            percent(row.get("pixel_auroc")),
            percent(row.get("aupro")),
            number(row.get("fit_seconds"), ".1f"),
            number(row.get("ms_per_image"), ".1f"),
            number(row.get("memory_bank_size"), ".0f"),
        ]

    table = [cells(row) for row in body]
    mean_cells = cells(mean)
    widths = [len(h) for h in header]
    for line in table + [mean_cells]:
        if len(line) == len(header):
            widths = [max(w, len(c)) for w, c in zip(widths, line)]
    widths[0] = max([widths[0]] + [len(line[0]) for line in table] + [len(mean_cells[0])])

    def render(line: list[str]) -> str:
        if len(line) != len(header):  # an error row
            return f"{line[0]:<{widths[0]}}  {line[1]}"
        return "  ".join([f"{line[0]:<{widths[0]}}"] + [f"{c:>{w}}" for c, w in zip(line[1:], widths[1:])])

    rule = "-" * len(render(list(header)))
    lines = [render(list(header)), rule, *(render(line) for line in table), rule, render(mean_cells)]
    return "\n".join(lines + format_defect_table(body))


def format_defect_table(rows: Sequence[dict]) -> list[str]:
    """Lines of image AUROC per defect type (each against the good test images), or none."""
    entries = [(str(row["category"]), defect, auroc) for row in rows
               for defect, auroc in (row.get("defect_image_auroc") or {}).items()]
    if not entries:
        return []
    width = max(len("category"), *(len(c) for c, _, _ in entries))
    defect_width = max(len("defect type"), *(len(d) for _, d, _ in entries))
    lines = ["", f"{'category':<{width}}  {'defect type':<{defect_width}}  image AUROC"]
    lines += [f"{c:<{width}}  {d:<{defect_width}}  {percent(a):>11}" for c, d, a in entries]
    return lines
