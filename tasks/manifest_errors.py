"""The manifest's two errors (kept apart from tasks/manifest.py so the error tree imports no polars)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.errors import ManifestError
from tasks.text import shown

if TYPE_CHECKING:
    from tasks.manifest import RowError

__all__ = ["ManifestFileError", "ManifestRowsError", "count_rows"]

MAX_REASON = 1000   # a file-level reason quotes at most this many characters


def count_rows(errors: Sequence[RowError]) -> str:
    """"29 invalid rows (33 errors)": bad rows are distinct row numbers, errors are bad cells."""
    rows, cells = len({e.row for e in errors}), len(errors)
    return (f"{rows} invalid row{'' if rows == 1 else 's'} "
            f"({cells} error{'' if cells == 1 else 's'})")


class ManifestFileError(ManifestError):
    """The manifest as a whole cannot be used (the CLI exits 2).

    `reason` is one line with control characters escaped (it may quote header names or cells)."""

    def __init__(self, source: str | Path, reason: str):
        self.source = str(source)
        self.reason = shown(" ".join(str(reason).split()), limit=MAX_REASON)
        super().__init__(f"manifest {shown(self.source, limit=MAX_REASON)}: {self.reason}")

    def __reduce__(self):
        return (type(self), (self.source, self.reason))


class ManifestRowsError(ManifestError):
    """strict=True and some rows are bad."""

    def __init__(self, errors: Sequence[RowError]):
        self.errors = list(errors)
        lines = [str(e) for e in self.errors[:20]]
        more = len(self.errors) - len(lines)
        super().__init__(f"{count_rows(self.errors)}:\n" + "\n".join(lines)
                         + (f"\n… and {more} more" if more > 0 else ""))

    def __reduce__(self):
        return (type(self), (self.errors,))
