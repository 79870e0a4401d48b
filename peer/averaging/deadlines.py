"""An outer round's deadlines for a spec: what its largest stage's contribution needs on a slow
line (``peer.net.timeouts.outer_round_times``), and a round long enough to hold them."""

from __future__ import annotations

import math

from peer.averaging.sparse import SparseConfig, encoded_size
from peer.net.timeouts import RoundTooShort, outer_round_times
from protocol.spec import RunSpec

__all__ = ["contribution_bytes", "fit_round_seconds"]


def contribution_bytes(spec: RunSpec, stage: int) -> int:
    """The encoded size of one member's contribution to a round of ``stage``."""
    from peer.model.llama import stage_param_shapes

    o = spec.training.outer
    numel = sum(math.prod(shape) for shape in stage_param_shapes(spec, stage).values())
    return encoded_size(numel, SparseConfig(chunk=o.chunk, k=o.k, bits=o.bits))


def fit_round_seconds(spec: RunSpec) -> RunSpec:
    """``spec`` with ``training.outer.round_seconds`` raised, in whole minutes, to at least twice
    what gathering and agreeing on its largest stage's contributions take, when the spec's
    round is too short for them (a large model's rounds). Unchanged otherwise."""
    o = spec.training.outer
    largest = max(contribution_bytes(spec, s) for s in range(spec.num_stages))
    try:
        outer_round_times(o.round_seconds, o.gather_seconds, o.agree_seconds, largest)
        return spec
    except RoundTooShort:
        pass
    gather, agree = outer_round_times(math.inf, o.gather_seconds, o.agree_seconds, largest)
    seconds = 60.0 * math.ceil(2 * (gather + agree) / 60.0)
    training = spec.training.model_copy(update={"outer": o.model_copy(update={"round_seconds": seconds})})
    return spec.model_copy(update={"training": training})
