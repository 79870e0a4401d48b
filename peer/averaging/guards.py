"""What per_step averaging guards at hivemind's depth (docs/security.md says what it cannot).

hivemind's all-reduce (``hivemind.averaging``) decodes every part a group member sends with the
deserializer that trusts the sender's dtype string, adds it to the average with the weight the
sender claims, and has no notion of a non-finite part: one NaN from one member made every
member skip every step. ``install`` (called before the averagers fork, so that the averager
processes inherit it) puts three checks in front of that:

- a received part goes through ``protocol.codecs.check_buffer`` before it is deserialized (a
  refused part fails that sender's stream, and hivemind excludes the sender from the round),
  and so does every tensor of a live state downloaded from a member (a refused one makes the
  download try the next member);
- a part that is not finite counts with weight 0 (the others' average is unchanged);
- a claimed weight counts for at most ``max_weight`` (the spec's target batch size: no member
  accumulates more samples than the whole group needs for a step), and a negative or
  non-finite one for nothing.
"""

from __future__ import annotations

import logging
import math

import torch
from hivemind.averaging import allreduce, averager, partition

from protocol.codecs import TensorRejected, check_buffer

log = logging.getLogger("swarmtrain.averaging")

_state = {"installed": False, "max_weight": math.inf, "refused": 0}


def install(*, max_weight: float) -> None:
    """Idempotent; a later call only updates the weight cap (the same spec after a move)."""
    _state["max_weight"] = float(max_weight)
    if _state["installed"]:
        return
    _state["installed"] = True
    original_deserialize = allreduce.deserialize_torch_tensor

    def checked_deserialize(proto):
        try:
            check_buffer(proto, name="averaged part")
        except TensorRejected:
            _state["refused"] += 1
            raise
        return original_deserialize(proto)

    allreduce.deserialize_torch_tensor = checked_deserialize
    averager.deserialize_torch_tensor = checked_deserialize  # live state downloaded from a member

    original_accumulate = partition.TensorPartReducer.accumulate_part

    async def accumulate_part(self, sender_index, part_index, tensor_part, weight=1.0):
        return await original_accumulate(self, sender_index, part_index, *guarded_part(tensor_part, weight))

    partition.TensorPartReducer.accumulate_part = accumulate_part

    original_finished = partition.TensorPartReducer.check_current_part_finished

    def check_current_part_finished(self):
        # Every part of a round refused (weight 0): an average of nothing is zero, not 0/0 = NaN.
        if self.current_part_accumulated_from == self.num_current_senders and self.denominator == 0:
            self.denominator = 1.0
        return original_finished(self)

    partition.TensorPartReducer.check_current_part_finished = check_current_part_finished


def guarded_part(tensor_part: torch.Tensor, weight: float) -> tuple[torch.Tensor, float]:
    """(part, weight) as they may enter an average: capped weight, nothing non-finite."""
    if not math.isfinite(weight) or weight < 0:
        weight = 0.0
    weight = min(weight, _state["max_weight"])
    if not bool(torch.isfinite(tensor_part).all()):
        _state["refused"] += 1
        return torch.zeros_like(tensor_part), 0.0
    return tensor_part, weight


def refused() -> int:
    """Parts refused in this process (an averager's, after the fork)."""
    return _state["refused"]
