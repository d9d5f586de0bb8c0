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
    """A stored cell counts as done unless both it and this run name a setting and differ in it.

    Settings only one side names (a setting added to the model since) do not count, so that a
    new setting at its default value keeps earlier cells.
    """
    if stored is None or current is None:
        return True
    shared = sorted(set(stored) & set(current))
    as_json = lambda settings: json.dumps({key: settings[key] for key in shared}, sort_keys=True, default=str)  # noqa: E731
    return as_json(stored) == as_json(current)


def is_done(row: dict | None, settings: dict | None) -> bool:
    """Finished with the same settings; a cell skipped for want of weights is tried again."""
    return row is not None and "skipped" not in row and same_settings(row.get("settings"), settings)
