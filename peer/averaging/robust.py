"""Robust, reproducible aggregation of an outer round's contributions.

Every member of a stage group that aggregates the same set of contributions must hold the same
bits afterwards, whatever its CPU, SIMD width or thread count. So nothing here reduces with
torch (whose sums depend on threads and vector width) or with numpy's pairwise summation over
a long axis. Only these are used:

- element-wise float64 arithmetic (each element is one IEEE operation: the same everywhere);
- sums over contributions in a fixed order (sorted by contribution digest), element-wise;
- norms of sparse updates from exact integer sums of the quantized values per chunk, combined
  with ``math.fsum`` (correctly rounded, hence order-independent) over chunks;
- norms of dense vectors from a sequential float64 running sum (``np.cumsum``: one IEEE add
  after the other, left to right, whatever the SIMD width).

The policy (``aggregate``): drop contributions that are not finite; clip each contribution's
norm to the median norm of the round; with three or more, drop one that points against most
of the others (a minority only); with four or more contributions, CenteredClip
(Karimireddy et al., 2021): starting from the weighted mean, ``CENTERED_CLIP_ITERATIONS`` times
move the center by the weighted mean of each contribution's distance to it, each distance
clipped to the median distance, so that no single member pulls the result by more than an
honest member's spread. Not a coordinate-wise trimmed mean: contributions are top-k sparse,
so most coordinates are nonzero in one contribution only, and trimming would drop them all
(measured: the held-out loss of ``scripts/bench_outer.py`` rose by 16% with it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from peer.averaging.sparse import SparseUpdate, decode_dense

__all__ = ["Aggregate", "aggregate", "update_norm", "OPPOSED_FROM", "ROBUST_FROM"]

OPPOSED_FROM = 3  # contributions from which one pointing against the others is dropped
ROBUST_FROM = 4  # contributions from which CenteredClip applies
CENTERED_CLIP_ITERATIONS = 3


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
    (samples each member claims, capped at ``max_weight``)."""
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
    if len(dense) >= OPPOSED_FROM:
        keep = _not_opposed(dense)
        if len(keep) < len(dense):
            for i in sorted(set(range(len(dense))) - set(keep)):
                dropped[order[i]] = "points against most of the others"
            order, dense = [order[i] for i in keep], [dense[i] for i in keep]
            clipped = tuple(d for d in clipped if d in order)
    caps = [min(weights[d], max_weight) for d in order]
    total = math.fsum(caps)
    shares = [w / total for w in caps]
    update = _weighted_sum(dense, shares)
    if len(dense) >= ROBUST_FROM:
        update = _centered_clip(dense, shares, update)
    return Aggregate(update.astype(np.float32), tuple(order), clipped, dropped)


def _weighted_sum(vectors: Sequence[np.ndarray], shares: Sequence[float]) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for x, w in zip(vectors, shares):  # element-wise, in the given (digest) order
        total = total + x * w
    return total


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.cumsum(a * b)[-1]) if a.size else 0.0


def _not_opposed(dense: Sequence[np.ndarray]) -> list[int]:
    """Indices of the contributions that agree (a positive dot product) with at least half of
    the others. Honest pseudo-gradients of one round share a direction (pairwise cosines
    0.02-0.2 measured on the tiny preset, never below 0); a sign-flipped one agrees with none.
    When most would go, the round is not what this rule assumes, and all stay."""
    n = len(dense)
    agree = [[False] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            agree[i][j] = agree[j][i] = _dot(dense[i], dense[j]) > 0
    keep = [i for i in range(n) if 2 * sum(agree[i]) >= n - 1]
    return keep if len(keep) > n // 2 else list(range(n))


def dense_norm(x: np.ndarray) -> float:
    """The L2 norm of a float64 vector, the same bits on any machine: a sequential running sum."""
    return math.sqrt(float(np.cumsum(x * x)[-1])) if x.size else 0.0


def _centered_clip(dense: Sequence[np.ndarray], shares: Sequence[float], center: np.ndarray) -> np.ndarray:
    for _ in range(CENTERED_CLIP_ITERATIONS):
        diffs = [x - center for x in dense]
        distances = [dense_norm(d) for d in diffs]
        tau = sorted(distances)[(len(distances) - 1) // 2]  # the lower median: one real distance
        if tau == 0:
            break
        scaled = [d * min(1.0, tau / r) if r > 0 else d for d, r in zip(diffs, distances)]
        center = center + _weighted_sum(scaled, shares)
    return center
