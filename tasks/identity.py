"""Row identity: what makes two rows the same item, and the object key its outputs get.

    row_hash = sha256(canonical JSON of {recipe version, model identity, mode, prompt,
                                         generation fields, inputs, post-process fields})
    output_key = "<output_name>-<row_hash[:12]>"      (the flow appends .mp4 / .jpg / .webp)

It is computed on the host that generates, after the inputs are fetched: the model identity is
the engine's (`Engine.model_identity`: every resolved checkpoint file by name, size and content
digest), and every input file (image, driving video, audio, watermark image) enters by the
digest of the bytes fetched. Same files, same row: skipped; a replaced checkpoint or input:
regenerated. The id, the row number and the output name are left out on purpose: renaming or
reordering rows must not regenerate anything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.manifest import INPUT_COLUMNS, ManifestRow, request_columns

if TYPE_CHECKING:
    from engine.family import Engine, LoadSpec
    from service.client import EngineClient, RemoteSpec

__all__ = ["RECIPE_VERSION", "output_key", "row_hash", "row_key"]

# Bump when the generation or post-processing recipe changes in a way that changes the output
# for the same fields (new encoder settings, a different upscaler …): every key changes with it.
RECIPE_VERSION = 1
_READ_CHUNK = 1 << 20


def row_hash(row: ManifestRow, model_id: str, input_digests: Mapping[str, str] | None = None) -> str:
    """sha256 hex of everything that determines the row's outputs.

    input_digests: "sha256:<hex>" per fetched column (the fetch stage's); a column missing there
    enters by the content of the local file it names, or as written."""
    digests = dict(input_digests or {})

    def reference(column: str, value: str | None) -> str | None:
        return digests.get(column) or _reference_identity(value)

    post = row.postprocess_fields()
    post["audio"] = reference("audio", row.audio)
    if row.watermark_is_image:
        post["watermark"] = reference("watermark", row.watermark)
    payload: dict[str, Any] = {
        "recipe_version": RECIPE_VERSION,
        "model": model_id,
        "mode": row.mode,
        "prompt": row.prompt,
        # every request field after defaults; the sampler is not a column but still changes the video
        # (i2v rows add I2V_COLUMNS; other rows' payload is as before, so their keys are unchanged)
        "generation": {**{c: getattr(row, c) for c in request_columns(row.mode)},
                       "sampler": row.request().sampler},
        "inputs": {c: reference(c, getattr(row, c)) for c in INPUT_COLUMNS},
        "postprocess": post,
    }
    if row.mode == "dance":   # the pose stage's settings and version (other modes' keys unchanged)
        from tasks.pose import POSE_VERSION
        payload["pose"] = {"fill": row.fill, "align_frame": row.align_frame, "version": POSE_VERSION}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                           allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def output_key(row: ManifestRow, hash: str) -> str:
    return f"{row.output_name}-{hash[:12]}"


def row_key(row: ManifestRow, engine: Engine | EngineClient, spec: LoadSpec | RemoteSpec,
            input_digests: Mapping[str, str] | None = None) -> str:
    """The one identity: the row's output key from its fields, its inputs and the resolved weights."""
    return output_key(row, row_hash(row, engine.model_identity(spec), input_digests))  # type: ignore[arg-type]  # each engine takes its own spec


def _reference_identity(reference: str | None) -> str | None:
    """A local file by its content (portable across machines); a URI as written."""
    if reference is None or reference.startswith(("s3://", "https://")):
        return reference
    path = Path(reference)
    if not path.is_file():
        return reference
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_READ_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"
