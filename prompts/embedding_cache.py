"""On-disk cache of text-encoder outputs, so a prompt is encoded once per encoder.

    root/<key[:2]>/<key>.safetensors      key = sha256(encoder_id, text_len, prompt)
        tensors:  {"embedding": the encoder output, as given to put()}
        metadata: {"encoder_id", "text_len", "prompt"}  (checked on read, so a hash clash or a
                                                         foreign file is a miss)

Writes go to a temporary file in the same folder and are renamed into place, so readers on other
processes see either the whole file or none. An unreadable file counts as a miss and is removed;
the next put() writes it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

logger = logging.getLogger(__name__)

TENSOR_NAME = "embedding"


class EmbeddingCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path_for(self, encoder_id: str, prompt: str, *, text_len: int | None = None) -> Path:
        key = hashlib.sha256(json.dumps([encoder_id, text_len, prompt]).encode("utf-8")).hexdigest()
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, encoder_id: str, prompt: str, *, text_len: int | None = None) -> torch.Tensor | None:
        """The cached embedding on CPU, or None on a miss."""
        path = self.path_for(encoder_id, prompt, text_len=text_len)
        try:
            with safe_open(str(path), framework="pt") as f:
                if f.metadata() != _metadata(encoder_id, prompt, text_len):
                    return None
                return f.get_tensor(TENSOR_NAME)
        except FileNotFoundError:
            return None
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            logger.warning("embedding cache: unreadable %s (%s); treating it as a miss", path, exc)
            path.unlink(missing_ok=True)
            return None

    def put(self, encoder_id: str, prompt: str, tensor: torch.Tensor, *,
            text_len: int | None = None) -> Path:
        """Store the embedding (copied to CPU) atomically; returns the file path."""
        path = self.path_for(encoder_id, prompt, text_len=text_len)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = save({TENSOR_NAME: tensor.detach().to("cpu").contiguous()},
                    metadata=_metadata(encoder_id, prompt, text_len))
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return path


def _metadata(encoder_id: str, prompt: str, text_len: int | None) -> dict[str, str]:
    return {"encoder_id": encoder_id, "prompt": prompt,
            "text_len": "" if text_len is None else str(text_len)}
