"""Writing tensors to safetensors files: one way, for checkpoints, final states and exports.

A stage with tied embeddings holds one tensor under two names (``state_dict()`` lists both);
safetensors refuses shared memory, so every writer goes through ``unaliased`` first.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from safetensors.torch import save_file

from protocol.signing import fsync_file

METADATA = {"format": "pt"}  # transformers refuses safetensors files without it


def unaliased(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors; a tensor aliased under several names (tied embeddings) is kept
    once, under its first name, as HF checkpoints and ``named_parameters()`` do."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model state {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            continue
        seen[key] = name
        t = t.cpu().contiguous()
        out[name] = t
    # safetensors refuses tensors that still share memory (partial views of one storage).
    ptrs: dict[int, str] = {}
    for name, t in out.items():
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in ptrs:
            out[name] = t.clone()
        else:
            ptrs[ptr] = name
    return out


def save_tensors(
    state: Mapping[str, torch.Tensor], path: Union[str, Path], metadata: Optional[Mapping[str, str]] = None
) -> Path:
    """Write ``state`` (un-aliased) to ``path`` atomically: a temporary file, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        save_file(unaliased(state), tmp, metadata={**METADATA, **(metadata or {})})
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
