"""The outer optimizer of outer rounds: Nesterov momentum on the round's aggregated update.

Element-wise float32 numpy arithmetic only (each element one IEEE operation), so every member
that applies the same aggregate to the same weights holds the same bits afterwards, on any
machine and thread count (DiLoCo's outer optimizer; its paper uses lr 0.7, momentum 0.9).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

__all__ = ["OuterNesterov"]


@dataclasses.dataclass
class OuterNesterov:
    lr: float = 0.7
    momentum: float = 0.9
    buffer: Optional[np.ndarray] = None  # float32, the momentum; part of a checkpoint

    def __post_init__(self) -> None:
        if not (self.lr > 0 and 0 <= self.momentum < 1):
            raise ValueError(f"need lr > 0 and 0 <= momentum < 1, got {self.lr}, {self.momentum}")

    def step(self, start: np.ndarray, update: np.ndarray) -> np.ndarray:
        """The weights after the round: ``start`` (the round's starting weights, flat float32)
        moved against ``update`` (the aggregated pseudo-gradient, start minus trained)."""
        if start.shape != update.shape or start.dtype != np.float32 or update.dtype != np.float32:
            raise ValueError(
                f"start {start.dtype}{start.shape} and update {update.dtype}{update.shape} must be float32 alike"
            )
        lr, mu = np.float32(self.lr), np.float32(self.momentum)
        if self.buffer is None:
            self.buffer = np.zeros_like(update)
        self.buffer = mu * self.buffer + update
        return start - lr * (update + mu * self.buffer)
