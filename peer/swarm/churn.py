"""Churn at the peer level: when a running peer checks for a move, whether a planned move
still holds right before it is made, who refills an empty stage when the peer the policy
named does not, and what a recovered stage lost. (When a lagging peer's gradients are stale
is ``peer.averaging.staleness``.)

Pure functions over snapshots (lists of ``PeerInfo``) and plain numbers, like
``peer.swarm.balancing``: the node (``peer.node.mover``) does the I/O.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from peer.swarm.balancing import RebalancePolicy, plan_move
from protocol.records import ACTIVE_STATES, PeerInfo, PeerState

__all__ = [
    "DEFAULT_REBALANCE_PERIOD",
    "next_check_delay",
    "MoveCheck",
    "check_move",
    "recovery_fallback",
    "EmptyStages",
    "StageEpochs",
    "epochs_lost",
]

# Seconds between two looks at the snapshot (randomised around it, see next_check_delay).
DEFAULT_REBALANCE_PERIOD = 15.0


def next_check_delay(period: float, rng: random.Random) -> Optional[float]:
    """Seconds until the next rebalancing check, or None when rebalancing is off (period <= 0).

    Uniform in [2/3, 4/3] of the period (10-20 s for 15 s): peers that started together do
    not all read the DHT and act in the same second."""
    if period <= 0:
        return None
    return rng.uniform(period * 2 / 3, period * 4 / 3)


def _active(peers: Sequence[PeerInfo], stage: int, exclude: str = "") -> list[PeerInfo]:
    return [p for p in peers if p.stage == stage and p.state in ACTIVE_STATES and p.peer_id != exclude]


@dataclass(frozen=True)
class MoveCheck:
    """The verdict on a planned move: ``target`` is None when the peer stays (``why`` says
    why); ``recovery`` is True when the target stage has no active peer (the pipeline is
    stalled there and the mover must restore it from a checkpoint)."""

    target: Optional[int]
    recovery: bool = False
    why: str = ""


def recovery_fallback(
    peers: Sequence[PeerInfo],
    num_stages: int,
    *,
    my_peer_id: str,
    now: float,
    empty_since: Mapping[int, float],
    grace: float,
) -> Optional[int]:
    """The empty stage this peer should refill because the peer the policy named did not.

    ``plan_move`` names one peer per empty stage, but that peer may never move (a peer with a
    fixed ``--stage`` and no ``--rebalance-period``), and the stage would stay empty for good.
    So the candidates take turns: the policy's choice first, then the online peers of stages
    that keep an active peer without them, most populated stage first, then by peer id (an
    order every peer computes alike); the one at rank r acts once the stage has been empty
    for r x ``grace`` seconds (``empty_since``: when this peer first saw it empty). ``grace``
    must exceed the time a mover's 'joining' record takes to be seen, so that one refill is
    seen before the next candidate's turn.
    """
    active = [p for p in peers if p.state in ACTIVE_STATES and 0 <= p.stage < num_stages]
    count = Counter(p.stage for p in active)
    empty = [s for s in range(num_stages) if count[s] == 0]
    if not empty:
        return None
    target = empty[0]
    since = empty_since.get(target)
    if since is None:
        return None
    candidates = [p for p in active if p.state == PeerState.ONLINE and count[p.stage] >= 2]
    named = {
        p.peer_id
        for p in candidates
        if plan_move(peers, num_stages, my_peer_id=p.peer_id, now=now, last_move_at=None) == target
    }
    order = sorted(candidates, key=lambda p: (p.peer_id not in named, -count[p.stage], p.peer_id))
    rank = next((i for i, p in enumerate(order) if p.peer_id == my_peer_id), None)
    if rank is None or now - since < rank * grace:
        return None
    return target


class EmptyStages:
    """When each stage was first seen with no active peer (for ``recovery_fallback``)."""

    def __init__(self):
        self.since: dict[int, float] = {}

    def observe(self, peers: Sequence[PeerInfo], num_stages: int, now: float) -> None:
        served = {p.stage for p in peers if p.state in ACTIVE_STATES}
        for stage in range(num_stages):
            if stage in served:
                self.since.pop(stage, None)
            else:
                self.since.setdefault(stage, now)


def check_move(
    peers: Sequence[PeerInfo],
    num_stages: int,
    *,
    my_peer_id: str,
    my_stage: int,
    now: float,
    last_move_at: Optional[float],
    policy: RebalancePolicy,
    planned: Optional[int] = None,
    empty_since: Optional[Mapping[int, float]] = None,
    fallback_grace: float = 30.0,
) -> MoveCheck:
    """Whether to move now, from a snapshot.

    Called twice per move: on the periodic snapshot to plan it, and on a snapshot read right
    before moving with ``planned`` set, so that a move planned on stale records (a peer that
    left, another that moved meanwhile) is dropped. A move is made only if both agree, the
    snapshot shows this peer where it is, and the stage it leaves keeps an active peer. With
    ``empty_since``, a stage left empty by the peer the policy named is refilled by the next
    candidates in turn (``recovery_fallback``).
    """
    me = [p for p in peers if p.peer_id == my_peer_id]
    if not me or me[0].stage != my_stage or me[0].state != PeerState.ONLINE:
        return MoveCheck(None, why="this peer is not announced online at its stage yet")
    target = plan_move(peers, num_stages, my_peer_id=my_peer_id, now=now, last_move_at=last_move_at, policy=policy)
    if target is None and empty_since is not None:
        target = recovery_fallback(
            peers, num_stages, my_peer_id=my_peer_id, now=now, empty_since=empty_since, grace=fallback_grace
        )
    if target is None:
        return MoveCheck(None, why="the policy keeps this peer where it is")
    if planned is not None and target != planned:
        return MoveCheck(None, why=f"the fresh snapshot plans stage {target}, not {planned}")
    if target == my_stage or not 0 <= target < num_stages:
        return MoveCheck(None, why=f"stage {target} is not a move")
    if not _active(peers, my_stage, exclude=my_peer_id):
        return MoveCheck(None, why=f"stage {my_stage} would be left empty")
    recovery = not _active(peers, target, exclude=my_peer_id)
    return MoveCheck(target, recovery=recovery, why="recovery" if recovery else "rebalance")


@dataclass
class StageEpochs:
    """The highest epoch seen for each stage in any snapshot: what a stage group had reached
    before it vanished, to report the work a recovery from a checkpoint loses."""

    seen: dict = field(default_factory=dict)

    def observe(self, peers: Sequence[PeerInfo]) -> None:
        for p in peers:
            if p.state in ACTIVE_STATES and p.epoch > self.seen.get(p.stage, -1):
                self.seen[p.stage] = p.epoch

    def last(self, stage: int) -> Optional[int]:
        return self.seen.get(stage)


def epochs_lost(last_seen_epoch: Optional[int], restored_step: Optional[int]) -> Optional[int]:
    """Epochs of a stage's training lost when it restarts from ``restored_step`` (None: the
    spec's init, epoch 0); None when the stage's progress was never seen."""
    if last_seen_epoch is None:
        return None
    return max(0, last_seen_epoch - (restored_step or 0))
