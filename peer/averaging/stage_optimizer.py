"""What a stage's optimizer is to the rest of the peer, in either averaging mode.

``per_step`` (``peer.averaging.per_step.PerStepOptimizer``, a hivemind.Optimizer) and ``outer``
(``peer.averaging.outer.OuterOptimizer``) both implement ``StageOptimizer``: the stage slot opens
and closes it, the stage worker steps it, the state RPC serves its state, and the status line,
the peer's record and /metrics read ``figures()``, counters the optimizer keeps itself.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Protocol

import torch

__all__ = ["OptimizerFigures", "StageOptimizer", "StateSnapshot"]

# (names, tensors, epoch) of a served state
StateSnapshot = tuple[list[str], list[torch.Tensor], int]


@dataclasses.dataclass(frozen=True)
class OptimizerFigures:
    """A stage optimizer's figures at one moment; counters are cumulative since it was built."""

    epoch: int = 0  # per_step: averaged updates applied; outer: rounds applied
    state_digest: str = ""  # outer: the round state's digest (16 hex digits), as records announce it
    # per_step
    global_epoch: Optional[int] = None  # the group's epoch as hivemind's progress tracker sees it
    samples_accumulated: Optional[int] = None  # towards the group's next update
    allreduce: Mapping[str, int] = dataclasses.field(default_factory=dict)  # averaged, failed, skipped, alone
    load_state_error: Optional[str] = None  # the last failure to load state from peers (None: it worked)
    epoch_claims_ignored: Optional[int] = None  # progress records claiming an epoch far ahead
    # outer
    rounds: Mapping[str, int] = dataclasses.field(default_factory=dict)  # applied, undecided, failed
    contributions: Mapping[str, int] = dataclasses.field(default_factory=dict)  # used, clipped, dropped
    dropped: Mapping[str, int] = dataclasses.field(default_factory=dict)  # by reason


class StageOptimizer(Protocol):
    """A stage's optimizer and its group's averaging, as the slot, the worker and readers use it."""

    @property
    def local_epoch(self) -> int: ...

    def join(self, restored_step: Optional[int]) -> None:
        """Take the group's state, as far as the spec's trust allows, before the stage serves."""

    def attach(self, worker) -> None:
        """The stage worker that owns the weights from now on (its thread runs every change)."""

    def step(self, batch_size: int = 1, **kwargs) -> None: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def tick(self) -> None:
        """Called by an idle worker: what a step would do besides accumulating."""

    def round_state(self, momentum: bool = False) -> Optional[StateSnapshot]:
        """The state the state RPC serves, or None: the stage's own parameters."""

    def resume_if_alone(self, others_online: bool) -> Optional[int]:
        """Continue the group's epoch count when this peer is the only one left; the epoch, or None."""

    def hand_back(self, *, partners: bool, budget: float, give_up: Callable[[], bool], event: Callable) -> None:
        """Before leaving: let the group's next update take what this peer accumulated."""

    def figures(self) -> OptimizerFigures: ...

    def shutdown(self) -> None: ...
