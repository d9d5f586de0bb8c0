"""An experiment's results as tables: text for the terminal, ``results.md`` and ``results.csv``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ...engine.atomic_files import atomic_path
from ..summary import number, percent

#: Per-cell values shown for every experiment, after the cell's own columns.
METRIC_COLUMNS = ("image_auroc", "pixel_auroc", "aupro", "fit_seconds", "ms_per_image", "memory_bank_size")


def shots_summary(rows: list[dict]) -> list[dict]:
    """Per number of shots: mean and standard deviation over seeds."""
    summary = []
    for shots in sorted({row["cell"]["shots"] for row in rows if "skipped" not in row}):
        group = [row for row in rows if row["cell"]["shots"] == shots and "skipped" not in row]
        entry = {"shots": shots, "seeds": len(group)}
        for key in ("image_auroc", "pixel_auroc", "aupro", "fit_seconds"):
            values = [row[key] for row in group if row.get(key) is not None]
            entry[f"{key}_mean"] = float(np.mean(values)) if values else None
            entry[f"{key}_std"] = float(np.std(values)) if values else None
        summary.append(entry)
    return summary


def _shots_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["shots", "seeds", "image AUROC", "pixel AUROC", "AUPRO", "fit s"]
    lines = []
    for s in shots_summary(rows):
        def spread(key: str) -> str:
            if s[f"{key}_mean"] is None:
                return "-"
            return f"{100 * s[f'{key}_mean']:.1f} ± {100 * s[f'{key}_std']:.1f}"

        lines.append([str(s["shots"]), str(s["seeds"]), spread("image_auroc"), spread("pixel_auroc"), spread("aupro"),
                      number(s["fit_seconds_mean"], ".1f")])
    return header, lines


def table_rows(name: str, columns: list[str], rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and text cells of experiment ``name``'s table (AUROC/AUPRO in percent)."""
    if name == "shots":
        return _shots_table(rows)
    split = ["ms backbone", "ms search", "ms map"] if name in ("speed", "resolution") else []
    memory = ["features MiB"] if name == "resolution" else []
    coverage = name == "coreset"
    header = [*columns, "image AUROC", "pixel AUROC", "AUPRO", "fit s", "bank size", "ms/img", *split, *memory]
    if coverage:
        header.append("coverage radius")
    lines = []
    for row in rows:
        cell = [str(row["cell"].get(c, "")) for c in columns]
        if "skipped" in row:
            lines.append(cell + [f"skipped: {row['skipped']}"])
            continue
        line = cell + [percent(row["image_auroc"]), percent(row["pixel_auroc"]), percent(row["aupro"]),
                       number(row["fit_seconds"], ".1f"), number(row["memory_bank_size"], "d"),
                       number(row["ms_per_image"], ".1f")]
        line += [number(row.get(f"ms_{k}"), ".1f") for k in ("backbone", "search", "map")] if split else []
        line += [number(row.get("feature_matrix_mib"), ".0f")] if memory else []
        if coverage:
            line.append(number(row.get("coverage_radius"), ".3f"))
        lines.append(line)
    return header, lines


def format_text_table(header: list[str], lines: list[list[str]]) -> str:
    """Right-aligned columns; a shorter line (a skipped cell) ends with its message, outside the columns."""
    full = [line for line in lines if len(line) == len(header)]
    widths = [max([len(h)] + [len(line[i]) for line in full]) for i, h in enumerate(header)]

    def render(cells):
        if len(cells) < len(header):
            return "  ".join(f"{c:>{w}}" for c, w in zip(cells[:-1], widths)) + "  " + cells[-1]
        return "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths))

    return "\n".join([render(header), "-" * len(render(header)), *(render(line) for line in lines)])


def format_markdown(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    out += ["| " + " | ".join(line + [""] * (len(header) - len(line))) + " |" for line in lines]
    return "\n".join(out)


def write_csv(rows: list[dict], path: Path) -> None:
    """One line per cell with every measured value (fit stages as ``fit_<stage>_s``), replaced atomically."""
    flat = []
    for row in rows:
        entry = dict(row["cell"])
        entry.update({k: v for k, v in row.items() if k not in ("cell", "fit_timings", "settings", "defect_image_auroc")})
        for key, value in (row.get("fit_timings") or {}).items():
            entry[f"fit_{key}_s"] = value
        flat.append(entry)
    fields: list[str] = []
    for entry in flat:
        fields += [k for k in entry if k not in fields]
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for entry in flat:
            writer.writerow({k: ("" if entry.get(k) is None else entry.get(k)) for k in fields})


def markdown_page(name: str, notes: list[str], header: list[str], lines: list[list[str]], eval_size: int | None) -> str:
    pixel = "full resolution" if eval_size is None else f"{eval_size} x {eval_size} (maps and masks resized)"
    text = [f"# Experiment: {name}", "", *notes,
            f"Pixel AUROC and AUPRO computed at {pixel}. AUROC/AUPRO in percent; ms/img is the whole "
            "per-image inference time (backbone + search + map).", "", format_markdown(header, lines), ""]
    return "\n".join(text)
