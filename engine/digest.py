"""Content digests of checkpoint files, computed once and cached beside the file.

    <file>.sha256      {"size", "mtime_ns", "ctime_ns", "inode", "sha256"}   (JSON)

A digest is trusted while the file's size, modification and change times and inode match what
it was computed from. The change time cannot be set back by hand (`touch -d` and a copy that
keeps the old mtime both move it), so a replaced file (same name, new bytes) is always read again.
When the checkpoint folder is read-only, the record goes to a cache folder instead
(`EngineSettings.digest_cache_dir`), keyed by the file's absolute path. Reading a 28 GB file
costs about 15 s once per host and file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["file_digest", "path_digest"]

_CHUNK = 8 << 20


def file_digest(path: Path, cache_dir: Path | None = None) -> str:
    """sha256 hex of the file's bytes, from its cached record when that is still current."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
             "inode": st.st_ino}
    for record in _record_paths(path, cache_dir):
        try:
            data = json.loads(record.read_text())
            if {k: data.get(k) for k in stamp} == stamp and isinstance(data.get("sha256"), str):
                return str(data["sha256"])
        except (OSError, ValueError):
            continue
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    _save({**stamp, "sha256": value}, path, cache_dir)
    return value


def path_digest(path: Path, cache_dir: Path | None = None) -> str:
    """A file's digest, or a folder's: the digest of its files' relative names and digests."""
    path = Path(path)
    if path.is_file():
        return file_digest(path, cache_dir)
    parts = [f"{p.relative_to(path)}:{file_digest(p, cache_dir)}"
             for p in sorted(path.rglob("*")) if p.is_file() and not p.name.endswith(".sha256")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _record_paths(path: Path, cache_dir: Path | None) -> list[Path]:
    beside = path.with_name(path.name + ".sha256")
    if cache_dir is None:
        return [beside]
    keyed = Path(cache_dir) / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    return [beside, keyed]


def _save(record: dict, path: Path, cache_dir: Path | None) -> None:
    text = json.dumps(record, sort_keys=True)
    for target in _record_paths(path, cache_dir):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                os.replace(tmp, target)
            finally:
                Path(tmp).unlink(missing_ok=True)
            return
        except OSError as e:   # read-only folder: try the next place
            log.debug("cannot write digest record %s: %s", target, e)
    log.warning("no writable place for the digest of %s: it will be computed again next time", path)
