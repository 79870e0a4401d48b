"""Robust, reproducible aggregation of an outer round's contributions.

Every member of a stage group that aggregates the same set of contributions must hold the same
bits afterwards, whatever its CPU, SIMD width or thread count. So nothing here reduces with
torch (whose sums depend on threads and vector width) or with numpy's pairwise summation over
a long axis. Only these are used:

- element-wise float64 arithmetic (each element is one IEEE operation: the same everywhere);
- sums over contributions in a fixed order (sorted by contribution digest), element-wise;
- norms from exact integer sums of the quantized values per chunk, combined with
  ``math.fsum`` (correctly rounded, hence order-independent) over chunks.

The policy (``aggregate``): drop contributions that are not finite; clip each contribution's
norm to the median norm of the round; with four or more contributions, a coordinate-wise
trimmed mean (a quarter of them trimmed at each end) instead of the weighted mean, so that no
single member moves any coordinate by more than the honest spread.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from peer.averaging.sparse import SparseUpdate, decode_dense

__all__ = ["Aggregate", "aggregate", "update_norm", "TRIM_FROM"]

TRIM_FROM = 4  # contributions from which a coordinate-wise trimmed mean applies


@dataclasses.dataclass(frozen=True)
class Aggregate:
    """The round's update (float32, dense) and what happened to each contribution."""

    update: np.ndarray
    used: tuple[str, ...]  # digests, in the order they were summed
    clipped: tuple[str, ...]  # digests whose norm was scaled down to the median
    dropped: Mapping[str, str]  # digest -> why


def update_norm(update: SparseUpdate) -> float:
    """The L2 norm of a sparse update, exactly reproducible: per chunk an exact integer sum of
    squared quantized values, times that chunk's (scale / qmax)^2, summed with ``math.fsum``."""
    squares = (update.values.astype(np.int64) ** 2).sum(axis=1)  # exact integers
    per = (update.scales.astype(np.float64) / update.config.qmax) ** 2
    return math.sqrt(math.fsum((per * squares.astype(np.float64)).tolist()))


def aggregate(
    contributions: Mapping[str, SparseUpdate], weights: Mapping[str, float], *, max_weight: float
) -> Aggregate:
    """The round's update from ``contributions`` (digest -> update), weighted by ``weights``
    (samples each member claims, capped at ``max_weight``; with ``TRIM_FROM`` or more the
    trimmed mean is unweighted)."""
    dropped: dict[str, str] = {}
    norms: dict[str, float] = {}
    for digest in sorted(contributions):
        u = contributions[digest]
        if not np.isfinite(u.scales).all():
            dropped[digest] = "not finite"
            continue
        w = weights.get(digest, 0.0)
        if not (math.isfinite(w) and w > 0):
            dropped[digest] = f"weight {w!r} is not a positive number"
            continue
        norms[digest] = update_norm(u)
    if not norms:
        raise ValueError(
            "no usable contribution in this round: " + "; ".join(f"{d[:12]}: {r}" for d, r in dropped.items())
        )
    order = sorted(norms)
    ordered_norms = sorted(norms[d] for d in order)
    median = ordered_norms[(len(ordered_norms) - 1) // 2]  # the lower median: one of the real norms
    clipped = tuple(d for d in order if norms[d] > median)
    dense = []
    for d in order:
        x = decode_dense(contributions[d])
        if norms[d] > median:
            x = x * (median / norms[d])
        dense.append(x)
    if len(dense) >= TRIM_FROM:
        update = _trimmed_mean(dense, trim=len(dense) // 4)
    else:
        caps = [min(weights[d], max_weight) for d in order]
        total = math.fsum(caps)
        update = np.zeros_like(dense[0])
        for x, w in zip(dense, caps):
            update = update + x * (w / total)
    return Aggregate(update.astype(np.float32), tuple(order), clipped, dropped)


def _trimmed_mean(dense: Sequence[np.ndarray], *, trim: int) -> np.ndarray:
    """Per coordinate: sort the values, drop ``trim`` at each end, average the rest, summing
    element-wise in sorted order (np.sort over the stacked axis is exact)."""
    stacked = np.sort(np.stack(dense), axis=0)
    kept = stacked[trim : len(dense) - trim]
    total = np.zeros_like(kept[0])
    for row in kept:
        total = total + row
    return total / len(kept)
