"""``patchcore review export``: the reviewed photos of a history database as a plain evaluation
layout, so that ``patchcore evaluate`` measures a model on the line's own confirmed cases.

Each reviewed inspection counts by its latest review: a false alarm is a good photo
(``OUT/good/``), a confirmed defect a defective one (``OUT/defect/``). Photos are copied, never
moved, from where the record says they lie now, and only when they still hold the bytes that
were scored (SHA-256); each is named ``<inspection id>-<file name>`` so that photos of one name
from several days stay apart. ``OUT/reviews.csv`` lists what was exported and from where.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.atomic_files import atomic_path
from ..engine.digest import file_sha256
from .history import History
from .schema import Inspection

#: The folder of each review verdict in the layout.
FOLDERS = {"false_alarm": "good", "confirmed_defect": "defect"}


@dataclass
class ExportSummary:
    """What an export wrote: photos per folder, and the inspections left out with why."""

    written: dict[str, int] = field(default_factory=lambda: {folder: 0 for folder in FOLDERS.values()})
    skipped: list[tuple[int, str]] = field(default_factory=list)


def _photo(inspection: Inspection) -> Path | str:
    """Where the photo lies now, or why it cannot be exported."""
    if inspection.verdict == "error":
        return "the photo could not be read when it was scored"
    recorded = Path(inspection.stored_path or inspection.photo_path)
    if not recorded.is_absolute():
        return f"not stored: {recorded.name!r} is the name of an upload to the service"
    if not recorded.is_file():
        return f"{recorded}: no longer there"
    if file_sha256(recorded) != inspection.photo_sha256:
        return f"{recorded}: replaced since it was scored (other bytes)"
    return recorded


def export_reviewed(history: History, output: str | Path, model_name: str | None = None) -> ExportSummary:
    """Copy every reviewed photo (of ``model_name``, or of every model) into ``output``, which
    must be empty or not exist yet (a layout mixing two exports would count stale reviews)."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output}: exists and is not an empty folder; export into a new folder")
    for folder in FOLDERS.values():
        (output / folder).mkdir(parents=True, exist_ok=True)
    summary = ExportSummary()
    rows = []
    for inspection, review in history.reviewed(model_name=model_name):
        photo = _photo(inspection)
        if isinstance(photo, str):
            summary.skipped.append((inspection.id, photo))
            continue
        folder = FOLDERS[review.verdict]
        target = output / folder / f"{inspection.id}-{photo.name}"
        with atomic_path(target) as temporary:
            shutil.copyfile(photo, temporary)
        summary.written[folder] += 1
        rows.append([inspection.id, folder, target.name, inspection.at.isoformat(), inspection.model_name,
                     inspection.model_version, inspection.score, inspection.verdict, review.verdict, review.who,
                     review.at.isoformat(), str(photo), inspection.photo_sha256])
    with open(output / "reviews.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["inspection", "folder", "file", "scored_at", "model", "model_version", "score", "verdict",
                         "review", "reviewed_by", "reviewed_at", "copied_from", "sha256"])
        writer.writerows(rows)
    return summary
