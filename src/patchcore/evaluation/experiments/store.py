"""The record of finished cells, ``cells.jsonl``: one JSON line per cell, so that a rerun resumes."""

from __future__ import annotations

import json
from pathlib import Path


def cell_key(cell: dict) -> str:
    return json.dumps(cell, sort_keys=True)


def read_cells(path: Path) -> dict[str, dict]:
    """Finished cells of ``cells.jsonl`` by key (a truncated last line, from an interrupted run, is ignored)."""
    done: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[cell_key(row["cell"])] = row
    return done


def append_cell(path: Path, row: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row, default=float) + "\n")


def same_settings(stored: dict | None, current: dict | None) -> bool:
    """A stored cell counts as done unless both it and this run name settings and they differ."""
    if stored is None or current is None:
        return True
    return json.dumps(stored, sort_keys=True, default=str) == json.dumps(current, sort_keys=True, default=str)


def is_done(row: dict | None, settings: dict | None) -> bool:
    """Finished with the same settings; a cell skipped for want of weights is tried again."""
    return row is not None and "skipped" not in row and same_settings(row.get("settings"), settings)
