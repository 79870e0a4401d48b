"""The digest of a model's weights: the one definition of "which weights" a run starts from
(``init.weights_sha256`` in a spec) and a teacher serves (the teacher issue).

SHA-256 over lines ``"<file name> <sha256 of the file>\\n"``, one per ``*.safetensors`` file
directly in the model directory, sorted by name. Only weight files count: ``config.json`` is in
the spec already, and a sharded checkpoint's index only says which shard holds which tensor, so
re-sharding the same tensors gives another digest (the bytes that are hashed changed).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Union

__all__ = ["WeightsError", "weight_files", "weights_digest"]

_BLOCK = 1 << 20


class WeightsError(ValueError):
    """A directory with no weights to digest."""


def weight_files(directory: Union[str, Path]) -> list[Path]:
    root = Path(directory)
    files = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if not files:
        raise WeightsError(f"{root}: no *.safetensors files (only safetensors checkpoints are read)")
    return files


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(directory: Union[str, Path]) -> str:
    lines = "".join(f"{p.name} {file_sha256(p)}\n" for p in weight_files(directory))
    return hashlib.sha256(lines.encode()).hexdigest()
