"""The manifest's two errors (kept apart from tasks/manifest.py so the error tree imports no polars)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.errors import ManifestError

if TYPE_CHECKING:
    from tasks.manifest import RowError

__all__ = ["ManifestFileError", "ManifestRowsError"]


class ManifestFileError(ManifestError):
    """The manifest as a whole cannot be used (the CLI exits 2)."""

    def __init__(self, source: str | Path, reason: str):
        self.source, self.reason = str(source), " ".join(str(reason).split())
        super().__init__(f"manifest {self.source}: {self.reason}")

    def __reduce__(self):
        return (type(self), (self.source, self.reason))


class ManifestRowsError(ManifestError):
    """strict=True and some rows are bad."""

    def __init__(self, errors: Sequence[RowError]):
        self.errors = list(errors)
        lines = [str(e) for e in self.errors[:20]]
        more = len(self.errors) - len(lines)
        super().__init__(f"{len(self.errors)} bad manifest cell(s):\n" + "\n".join(lines)
                         + (f"\n… and {more} more" if more > 0 else ""))

    def __reduce__(self):
        return (type(self), (self.errors,))
