"""An outer round long enough for a spec's model on a slow line: gathering and agreeing on its
largest stage's contributions (``peer.net.timeouts.outer_round_times``), and a joiner reading
two members' round states between two rounds."""

from __future__ import annotations

import math

from peer.averaging.sparse import SparseConfig, encoded_size
from peer.net.timeouts import outer_round_times, transfer_timeout
from protocol.spec import RunSpec

__all__ = ["contribution_bytes", "fit_round_seconds", "needed_round_seconds", "state_read_seconds"]


def contribution_bytes(spec: RunSpec, stage: int) -> int:
    """The encoded size of one member's contribution to a round of ``stage``."""
    from peer.model.llama import stage_param_shapes

    o = spec.training.outer
    numel = sum(math.prod(shape) for shape in stage_param_shapes(spec, stage).values())
    return encoded_size(numel, SparseConfig(chunk=o.chunk, k=o.k, bits=o.bits))


JOIN_MATES = 2  # a joiner reads the round state of two members at once: they must serve the same bits


def state_read_seconds(spec: RunSpec, stage: int, members: int) -> float:
    """What reading ``members`` round states of ``stage`` at once needs on a slow line (they
    share the reader's downlink); ``peer.node.outer_group`` reads with it."""
    from peer.checkpoints.state_pull import state_byte_limit

    return transfer_timeout(members * state_byte_limit(spec, stage, momentum=True), ceiling=math.inf)


def needed_round_seconds(spec: RunSpec) -> float:
    """The shortest round that holds, on a slow line, gathering and agreeing on the largest
    stage's contributions twice over, and a joiner's read of two members' round states in the
    quiet part of a round (``peer.node.outer_group``: after gathering, agreeing and 5 s)."""
    o = spec.training.outer
    largest = max(contribution_bytes(spec, s) for s in range(spec.num_stages))
    gather, agree = outer_round_times(math.inf, o.gather_seconds, o.agree_seconds, largest)
    read = max(state_read_seconds(spec, s, JOIN_MATES) for s in range(spec.num_stages))
    return max(2 * (gather + agree), gather + agree + 5.0 + read)


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
