"""Whom to believe when teachers disagree: the pure half of spot checks.

Two teachers holding the same weights (the same ``model_digest``) answer the same token ids
with the same soft targets, up to float rounding (float16 on the wire, the order of float
sums on another machine). A trainer sends a fraction of its micro-batches to a second such
teacher and compares (``distance``). Two that disagree cannot tell who lied, so a third decides
(``verdict``): a teacher whose answer agrees with no other while two others agree is outvoted
(banned); when no two answers agree nobody can be believed, and every one of them is set aside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

__all__ = ["AGREE_DISTANCE", "Verdict", "distance", "verdict"]

# Mean distance (below) above which two answers disagree. Honest teachers on different thread
# counts measure about 1e-3 apart (float16 rounding); a teacher that returns another model's
# targets, shifted tokens or noise measures 0.3-1.
AGREE_DISTANCE = 0.05


def distance(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    """How far apart two answers (ids, log-probabilities; ``[batch, length, k]``) for the same
    token ids are: at each position, half the summed absolute difference of the probabilities
    each puts on the tokens either names (a token only the other names counts as 0 in the top
    k, its mass being in the rest bucket) and of the two rest buckets; the mean over positions.
    0 for equal answers, at most 1."""
    ids_a, lp_a = a
    ids_b, lp_b = b
    if ids_a.shape != ids_b.shape:
        return 1.0
    k = ids_a.shape[-1]
    ids_a, ids_b = ids_a.reshape(-1, k), ids_b.reshape(-1, k)
    p_a, p_b = lp_a.reshape(-1, k).double().exp(), lp_b.reshape(-1, k).double().exp()
    same = ids_a[:, :, None] == ids_b[:, None, :]  # [positions, a's token, b's token]
    b_at_a = (same * p_b[:, None, :]).sum(-1)
    only_b = (~same.any(1)) * p_b
    rest_a, rest_b = (1 - p_a.sum(-1)).clamp(min=0), (1 - p_b.sum(-1)).clamp(min=0)
    per_position = (p_a - b_at_a).abs().sum(-1) + only_b.sum(-1) + (rest_a - rest_b).abs()
    return float(0.5 * per_position.mean()) if per_position.numel() else 0.0


@dataclass(frozen=True)
class Verdict:
    trusted: frozenset  # teachers whose answer agrees with another's
    outvoted: frozenset  # their answer agrees with none while two others agree
    undecided: frozenset  # no two answers agree: none can be believed


def verdict(answers: Mapping[str, tuple[torch.Tensor, torch.Tensor]], limit: float = AGREE_DISTANCE) -> Verdict:
    """Who to believe among the answers of several teachers (by peer id) to the same ids."""
    names = sorted(answers)
    agrees = {n: set() for n in names}
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            if distance(answers[x], answers[y]) <= limit:
                agrees[x].add(y)
                agrees[y].add(x)
    trusted = frozenset(n for n in names if agrees[n])
    if not trusted:
        return Verdict(frozenset(), frozenset(), frozenset(names))
    return Verdict(trusted, frozenset(names) - trusted, frozenset())
