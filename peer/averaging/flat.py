"""A stage's trainable weights as one flat float32 vector, the form outer rounds work on, and the
one digest of a round state.

Every member flattens in the same order (the module's ``named_parameters``), so the same weights
are the same bytes, and their SHA-256 is what members announce and the keeper checks.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

import numpy as np
import torch

__all__ = ["FlatParams", "flat_of", "round_digest"]


def round_digest(base: np.ndarray) -> str:
    """The digest of a round state: SHA-256 of its base weights, flat float32 in the stage's
    parameter order. Records announce its first 16 hex digits; the keeper and joiners check it."""
    return hashlib.sha256(np.ascontiguousarray(base, dtype=np.float32).tobytes()).hexdigest()


def flat_of(tensors: Mapping[str, torch.Tensor], names: Sequence[str], prefix: str = "") -> np.ndarray:
    """``tensors[prefix + name]`` for each of ``names``, flat float32 in that order."""
    return torch.cat([tensors[prefix + n].reshape(-1).float() for n in names]).numpy().copy()


class FlatParams:
    """The trainable parameters of ``module`` read and written as one flat float32 vector."""

    def __init__(self, module: torch.nn.Module):
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]

    def read(self) -> np.ndarray:
        return torch.cat([p.detach().reshape(-1).float() for p in self.params]).numpy().copy()

    def write(self, flat: np.ndarray) -> None:
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                p.copy_(torch.from_numpy(flat[offset : offset + n]).view_as(p))
                offset += n

    def split(self, flat: np.ndarray) -> list[torch.Tensor]:
        """One tensor per parameter, shaped as it, copied out of ``flat``."""
        out, offset = [], 0
        for p in self.params:
            out.append(torch.from_numpy(flat[offset : offset + p.numel()]).view_as(p).clone())
            offset += p.numel()
        return out
