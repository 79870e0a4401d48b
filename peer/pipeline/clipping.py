"""Per micro-batch gradient clipping at a stage, against a running median norm.

A stage accumulates the gradients of every micro-batch it is sent, from any trainer. Finite and
well-shaped gradients scaled x1000 would otherwise be accumulated as they are, and through the
group's averaging they would move every member of the stage at once. So each micro-batch's
parameter gradient is clipped to ``factor`` times the median norm of the recent micro-batches
before it accumulates. Honest micro-batches rarely exceed a few times the median (their norms
vary with the data, by less than that); a poisoned one counts as at most ``factor`` honest ones.
"""

from __future__ import annotations

import collections
import math
from typing import Optional

__all__ = ["MicroBatchClip", "grad_norm"]


def grad_norm(grads) -> float:
    """The L2 norm over a micro-batch's parameter gradients (None entries skipped), in float64."""
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))


class MicroBatchClip:
    """The running bound. ``admit(norm)`` returns the scale (<= 1) to apply to a micro-batch's
    gradient and remembers its norm (a clipped one as the median), so that poisoned micro-batches
    cannot raise the bound. The first ``warmup`` norms are taken as they come (nothing to compare with yet)."""

    def __init__(self, *, factor: float = 3.0, window: int = 64, warmup: int = 8):
        if factor < 1 or window < 1 or not 1 <= warmup <= window:
            raise ValueError(f"need factor >= 1 and 1 <= warmup <= window, got {factor}, {window}, {warmup}")
        self.factor, self.warmup = factor, warmup
        self._norms: collections.deque = collections.deque(maxlen=window)

    def limit(self) -> Optional[float]:
        if len(self._norms) < self.warmup:
            return None
        ordered = sorted(self._norms)
        return self.factor * ordered[(len(ordered) - 1) // 2]

    def admit(self, norm: float) -> float:
        if not math.isfinite(norm) or norm < 0:
            raise ValueError(f"a gradient norm must be finite and >= 0, got {norm}")
        limit = self.limit()
        if limit is None or norm <= limit:
            self._norms.append(norm)
            return 1.0
        # A clipped micro-batch is remembered as the median, not at the bound: a run of them
        # would otherwise raise the median to the bound and the bound by ``factor`` each time.
        self._norms.append(limit / self.factor)
        return limit / norm
