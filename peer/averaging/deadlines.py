"""An outer round long enough for a spec's model on a slow line: gathering and agreeing on its
largest stage's contributions (``peer.net.timeouts.outer_round_times``), and a joiner reading
the group's round state between two rounds (``peer.averaging.group``)."""

from __future__ import annotations

import math

from peer.averaging.sparse import SparseConfig, encoded_size
from peer.net.timeouts import outer_round_times, transfer_timeout
from protocol.spec import RunSpec

__all__ = [
    "check_rounds_fit",
    "contribution_bytes",
    "fit_round_seconds",
    "join_read_seconds",
    "needed_round_seconds",
    "reads_momentum",
    "state_read_seconds",
]


def contribution_bytes(spec: RunSpec, stage: int) -> int:
    """The encoded size of one member's contribution to a round of ``stage``."""
    from peer.model.llama import stage_param_shapes

    o = spec.training.outer
    numel = sum(math.prod(shape) for shape in stage_param_shapes(spec, stage).values())
    return encoded_size(numel, SparseConfig(chunk=o.chunk, k=o.k, bits=o.bits))


def reads_momentum(spec: RunSpec) -> bool:
    """Whether a joiner needs the group's outer momentum: not with ``outer_momentum = 0`` (the
    default), where the buffer never enters a step and the base weights are the whole state."""
    return spec.training.outer.outer_momentum > 0


def state_read_seconds(spec: RunSpec, stage: int, members: int = 1, *, momentum: bool = False) -> float:
    """What reading ``members`` round states of ``stage`` at once needs on a slow line (they
    share the reader's downlink)."""
    from peer.checkpoints.state_pull import state_byte_limit

    return transfer_timeout(members * state_byte_limit(spec, stage, momentum=momentum), ceiling=math.inf)


def join_read_seconds(spec: RunSpec, stage: int) -> float:
    """A joiner's read of ``stage``'s round state on a slow line: one member's base weights,
    checked against the digest the group announces; with outer momentum, which no announced
    digest covers, two members' weights and momentum, which must be the same bits."""
    momentum = reads_momentum(spec)
    return state_read_seconds(spec, stage, 2 if momentum else 1, momentum=momentum)


def needed_round_seconds(spec: RunSpec) -> float:
    """The shortest round that holds, on a slow line, gathering and agreeing on the largest
    stage's contributions twice over, and a joiner's read of the group's round state in the
    quiet part of a round (``peer.averaging.group``: after gathering, agreeing and 5 s)."""
    o = spec.training.outer
    largest = max(contribution_bytes(spec, s) for s in range(spec.num_stages))
    gather, agree = outer_round_times(math.inf, o.gather_seconds, o.agree_seconds, largest)
    read = max(join_read_seconds(spec, s) for s in range(spec.num_stages))
    return max(2 * (gather + agree), gather + agree + 5.0 + read)


def check_rounds_fit(spec: RunSpec) -> None:
    """Raise ``RoundTooShort`` when the spec's outer rounds cannot carry a stage's contributions
    on a slow line: every member would fail its rounds alike, so a peer says so at start."""
    if spec.training.averaging != "outer":
        return
    o = spec.training.outer
    for stage in range(spec.num_stages):
        outer_round_times(o.round_seconds, o.gather_seconds, o.agree_seconds, contribution_bytes(spec, stage))


def fit_round_seconds(spec: RunSpec) -> RunSpec:
    """``spec`` with ``training.outer.round_seconds`` raised, in whole minutes, to
    ``needed_round_seconds`` when it is shorter (a larger model's rounds). Unchanged otherwise."""
    o = spec.training.outer
    needed = needed_round_seconds(spec)
    if o.round_seconds >= needed:
        return spec
    seconds = 60.0 * math.ceil(needed / 60.0)
    training = spec.training.model_copy(update={"outer": o.model_copy(update={"round_seconds": seconds})})
    return spec.model_copy(update={"training": training})
