"""Row identity: what makes two rows the same item, and the object key its outputs get.

    row_hash = sha256(canonical JSON of {recipe version, model identity, mode, prompt,
                                         generation fields, inputs, post-process fields})
    output_key = "<output_name>-<row_hash[:12]>"      (the flow appends .mp4 / .jpg / .webp)

The id, the row number and the output name are left out on purpose: renaming or reordering rows
must not regenerate anything. Local input files enter the hash by content, so the same manifest
hashes the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from engine.config import WanConfig
from tasks.manifest import GENERATION_COLUMNS, INPUT_COLUMNS, ManifestRow

# Bump when the generation or post-processing recipe changes in a way that changes the output
# for the same fields (new encoder settings, a different upscaler …): every key changes with it.
RECIPE_VERSION = 1
_READ_CHUNK = 1 << 20


def model_identity(model: str, checkpoints_dir: Path | None) -> str:
    """A string that changes when the weights a row would run with change.

    Random-init presets: their name and the engine's weight seed. Real presets: the checkpoint file
    names with size and mtime_ns (stat only, no read); files that are missing contribute their
    names only (the generate stage reports them).
    """
    config = WanConfig.from_name(model)
    if config.random_init:
        from engine.pipeline import WEIGHT_SEED  # the pipeline module pulls in every model class
        return f"{config.name}/random-init-seed-{WEIGHT_SEED}"
    names = [n for n in (config.files.dit, config.files.dit_quant, config.files.vae,
                         config.files.text_encoder) if n]
    parts = [config.name]
    for name in names:
        path = Path(checkpoints_dir, name) if checkpoints_dir is not None else None
        if path is not None and path.is_file():
            stat = path.stat()
            parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
        else:
            parts.append(name)
    return "|".join(parts)


def row_hash(row: ManifestRow, model_id: str) -> str:
    """sha256 hex of everything that determines the row's outputs."""
    post = row.postprocess_fields()
    post["audio"] = _reference_identity(row.audio)
    if row.watermark_is_image:
        post["watermark"] = _reference_identity(row.watermark)
    payload: dict[str, Any] = {
        "recipe_version": RECIPE_VERSION,
        "model": model_id,
        "mode": row.mode,
        "prompt": row.prompt,
        # every request field after defaults; the sampler is not a column but still changes the video
        "generation": {**{c: getattr(row, c) for c in GENERATION_COLUMNS},
                       "sampler": row.request().sampler},
        "inputs": {c: _reference_identity(getattr(row, c)) for c in INPUT_COLUMNS},
        "postprocess": post,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                           allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def output_key(row: ManifestRow, hash: str) -> str:
    return f"{row.output_name}-{hash[:12]}"


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
