"""Read users' labelled or unlabelled text files."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["CommandError", "Table", "read_table"]


class CommandError(ValueError):
    """Bad input to a command: the CLI prints the message and exits with 2."""


class Table:
    """Texts and, if the file has the label column, their raw labels.

    Attributes
    ----------
    texts : list[str]
    labels : list[str] or None
        As written in the file (strings; integers are kept as their text).
    path : Path
    """

    def __init__(self, texts: list[str], labels: list[str] | None, path: Path):
        self.texts, self.labels, self.path = texts, labels, path

    def __len__(self) -> int:
        return len(self.texts)


def _rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8-sig")  # a leading BOM is dropped
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise CommandError(
                        f"{path}: line {i} is not JSON ({err})."
                    ) from None
        return rows
    if suffix not in (".csv", ".tsv"):
        raise CommandError(
            f"{path}: unknown file type {suffix!r}; use .csv, .tsv or .jsonl."
        )
    delimiter = "\t" if suffix == ".tsv" else ","
    rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))
    for i, row in enumerate(rows, 2):
        if None in row:
            raise CommandError(
                f"{path}: row {i} has more fields than the header (an unquoted "
                f"{'tab' if delimiter == chr(9) else 'comma'} in a text?); quote it."
            )
    return rows


def read_table(
    path: str | os.PathLike,
    text_column: str = "text",
    label_column: str = "label",
    require_labels: bool = False,
) -> Table:
    """The texts and labels of a CSV, TSV or JSONL file.

    Returns
    -------
    Table

    Raises
    ------
    CommandError
        Missing, empty or non-UTF-8 file, unknown type, missing text column,
        or a missing / incomplete label column when `require_labels`.
    """
    path = Path(path)
    if not path.is_file():
        raise CommandError(f"{path}: no such file.")
    try:
        rows = _rows(path)
    except UnicodeDecodeError as err:
        raise CommandError(
            f"{path}: not UTF-8 ({err.reason} at byte {err.start}); re-save it "
            "as UTF-8."
        ) from None
    if not rows:
        raise CommandError(f"{path}: no rows.")
    columns = sorted(rows[0])
    if text_column not in rows[0]:
        raise CommandError(
            f"{path}: no column {text_column!r} (columns: {columns}); choose the "
            "text column with --text-column."
        )
    texts = [str(r.get(text_column) or "") for r in rows]
    has_labels = label_column in rows[0]
    if require_labels and not has_labels:
        raise CommandError(
            f"{path}: no label column {label_column!r} (columns: {columns}); "
            "choose it with --label-column."
        )
    labels = None
    if has_labels:
        labels = [r.get(label_column) for r in rows]
        missing = [i for i, v in enumerate(labels, 1) if v in (None, "")]
        if missing and require_labels:
            raise CommandError(
                f"{path}: {len(missing)} row(s) without a label (first: row "
                f"{missing[0]})."
            )
        labels = None if missing else [str(v) for v in labels]
    return Table(texts, labels, path)
