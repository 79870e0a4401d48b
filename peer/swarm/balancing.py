"""Stage choice and rebalancing: pure functions over a snapshot of the swarm.

A snapshot is a list of `PeerInfo` read from the DHT. Nothing here touches the network or the
clock (time is passed in), so the policies can be tested on synthetic swarms and every peer
that sees the same snapshot reaches the same decision.

The swarm is as fast as its slowest stage, so every decision here maximises the minimum total
throughput over stages (as Petals' block selection does for block ranges).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Optional, Sequence

from protocol.records import ACTIVE_STATES, PeerInfo, PeerState

__all__ = [
    "RebalancePolicy",
    "capped_claims",
    "choose_stage",
    "overclaims",
    "plan_move",
    "stage_throughputs",
    "without_unproven",
]

# ACTIVE_STATES: a leaving peer has announced that it is going away: plan as if it were gone.

# Stages differ in cost (the last one runs the head) and machines differ: a peer may be this
# many times the median peer before its claim is capped (capped_claims).
CLAIM_CAP_FACTOR = 4.0

# Float sums of the same peers in a different order differ in the last bits; stage totals that
# close are the same total for the purpose of a tie.
_TIE_REL_TOL = 1e-9


@dataclasses.dataclass(frozen=True)
class RebalancePolicy:
    # The slowest stage must get this much faster, so that noise in measured throughput and
    # minutes of reloading weights are not spent on a marginal gain.
    margin: float = 1.25
    # Petals servers were seen reloading the same blocks over and over; a peer that just moved
    # (or joined) stays put for a while so that the swarm can see the effect of the move first.
    cooldown_s: float = 120.0
    # A move never leaves its stage with fewer peers than this (in normal rebalancing).
    min_peers_left: int = 1

    def __post_init__(self) -> None:
        if self.margin < 1.0:
            raise ValueError(f"margin must be >= 1 (a move must not make the swarm slower), got {self.margin}")
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {self.cooldown_s}")
        if self.min_peers_left < 1:
            raise ValueError(f"min_peers_left must be >= 1 (never empty a stage), got {self.min_peers_left}")


def _active(peers: Sequence[PeerInfo], num_stages: int, exclude: Optional[str] = None) -> list[PeerInfo]:
    # Sorted so that totals are summed in the same order by every peer (see _TIE_REL_TOL).
    active = sorted(
        (p for p in peers if p.state in ACTIVE_STATES and p.peer_id != exclude and 0 <= p.stage < num_stages),
        key=lambda p: p.peer_id,
    )
    return capped_claims(active)


def capped_claims(peers: Sequence[PeerInfo]) -> list[PeerInfo]:
    """The peers with each announced throughput capped at ``CLAIM_CAP_FACTOR`` times the lower
    median of all of them: a record claiming 1e9 samples/s counts as a fast peer, not as a
    stage's whole capacity, so a few fake records cannot steer newcomers away from a stage or
    move honest peers out of it. (Sybils that outnumber the honest peers move the median too:
    docs/security.md.)"""
    figures = sorted(p.throughput for p in peers if p.throughput > 0)
    if not figures:
        return list(peers)
    cap = CLAIM_CAP_FACTOR * figures[(len(figures) - 1) // 2]
    return [p if p.throughput <= cap else dataclasses.replace(p, throughput=cap) for p in peers]


def overclaims(peers: Sequence[PeerInfo], num_stages: int) -> list[tuple[str, float, float]]:
    """(peer id, announced, counted) of each active peer whose claim ``capped_claims`` caps, as
    the balancing policy sees them (reported: an overclaim is a sign of a lying peer)."""
    active = sorted(
        (p for p in peers if p.state in ACTIVE_STATES and 0 <= p.stage < num_stages), key=lambda p: p.peer_id
    )
    return [(p.peer_id, p.throughput, c.throughput) for p, c in zip(active, capped_claims(active)) if c != p]


def without_unproven(peers: Sequence[PeerInfo], stage: int, proven: set[str], my_peer_id: str) -> list[PeerInfo]:
    """The snapshot without the records of ``stage``'s other peers that did not prove they serve
    it (``proven``: the ids that answered as its server). A move out of a stage is planned on
    this: a record costs nothing to publish, so records alone must never make a peer leave its
    stage to them (only fakes would serve it then)."""
    return [p for p in peers if p.stage != stage or p.peer_id == my_peer_id or p.peer_id in proven]


def _members(peers: Sequence[PeerInfo], num_stages: int, exclude: Optional[str] = None) -> list[list[PeerInfo]]:
    members: list[list[PeerInfo]] = [[] for _ in range(num_stages)]
    for peer in _active(peers, num_stages, exclude):
        members[peer.stage].append(peer)
    return members


def _online(stage: Sequence[PeerInfo]) -> list[PeerInfo]:
    return [p for p in stage if p.state == PeerState.ONLINE]


def _totals(members: Sequence[Sequence[PeerInfo]]) -> list[float]:
    return [sum(max(p.throughput, 0.0) for p in stage) for stage in members]


def stage_throughputs(peers: Sequence[PeerInfo], num_stages: int, *, exclude: Optional[str] = None) -> list[float]:
    """Total throughput (samples/s) of each stage, counting joining and online peers only."""
    return _totals(_members(peers, num_stages, exclude))


def _is_tie(a: float, b: float) -> bool:
    return abs(a - b) <= _TIE_REL_TOL * max(abs(a), abs(b), 1.0)


def _spread(tied: Sequence[int], peer_id: str) -> int:
    # A stable hash (not Python's salted hash()) so that a peer's choice is reproducible, and
    # peers that join at once into the same snapshot land on different tied stages.
    digest = hashlib.sha256(peer_id.encode()).digest()
    return sorted(tied)[int.from_bytes(digest[:8], "big") % len(tied)]


def choose_stage(peers: Sequence[PeerInfo], num_stages: int, *, my_throughput: float, my_peer_id: str = "") -> int:
    """The stage a new peer should serve: an empty one if any, else the least-served one.

    `my_throughput` does not change the choice: adding any throughput to the least-served
    stage raises the swarm's minimum at least as much as adding it anywhere else. It is part of
    the signature so that callers state what they bring and the policy can weigh it later.
    """
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if my_throughput < 0:
        raise ValueError(f"my_throughput must be >= 0, got {my_throughput}")
    members = _members(peers, num_stages, exclude=my_peer_id or None)
    # An empty stage halts the whole pipeline, even if another stage's peers announce zero
    # throughput (they are still loading): fill holes first.
    empty = [s for s in range(num_stages) if not members[s]]
    if empty:
        return _spread(empty, my_peer_id)
    totals = _totals(members)
    least = min(totals)
    return _spread([s for s in range(num_stages) if _is_tie(totals[s], least)], my_peer_id)


def _best_target(totals: Sequence[float], source: int, throughput: float) -> tuple[float, int]:
    """(new swarm minimum, target) of the best move of a peer whose throughput is already
    subtracted from `totals[source]`; ties go to the least-served target, then the lowest index."""
    options = []
    for target in range(len(totals)):
        if target == source:
            continue
        after = list(totals)
        after[target] += throughput
        options.append((min(after), -totals[target], -target))
    new_min, _, neg_target = max(options)
    return new_min, -neg_target


def _recovery_moves(members: list[list[PeerInfo]]) -> dict[str, int]:
    """Who fills which empty stage: one peer per empty stage, each from the stage with the
    most peers (it can best afford to lose one), never emptying the donor."""
    members = [list(stage) for stage in members]
    moves: dict[str, int] = {}
    for target in [s for s, stage in enumerate(members) if not stage]:
        donors = [s for s, stage in enumerate(members) if len(stage) >= 2 and _online(stage)]
        if not donors:
            break
        totals = _totals(members)
        donor = max(donors, key=lambda s: (len(members[s]), totals[s], -s))
        # The mover that leaves both the donor and the new stage fastest; a joining peer is
        # still loading its weights, so only online peers are asked to move.
        mover = max(
            _online(members[donor]),
            key=lambda p: (min(p.throughput, totals[donor] - p.throughput), p.peer_id),
        )
        members[donor].remove(mover)
        members[target].append(mover)
        moves[mover.peer_id] = target
    return moves


def _best_move(members: list[list[PeerInfo]], policy: RebalancePolicy) -> Optional[tuple[float, str, int]]:
    """The swarm's single best move (new minimum, peer id, target), if any peer may move.

    Among the moves that clear the margin, the best one picks the source stage, and the peer
    that moves out of it is the one with the smallest peer id among that stage's peers whose
    move clears the margin, not the one with the best exact figure. Throughput reports vary
    from one read to the next and each peer reads at its own moment: ranked by exact
    throughput, several peers of one stage each found themselves named in their own snapshot
    and left together, emptying their stage (tests/integration/test_churn_swarm.py)."""
    totals = _totals(members)
    old_min = min(totals)
    moves: list[tuple[float, int, str, int]] = []  # (new minimum, source, peer id, target)
    for source, stage in enumerate(members):
        if len(stage) - 1 < policy.min_peers_left:
            continue
        for peer in _online(stage):
            without = list(totals)
            without[source] -= max(peer.throughput, 0.0)
            new_min, target = _best_target(without, source, max(peer.throughput, 0.0))
            moves.append((new_min, source, peer.peer_id, target))
    if not moves:
        return None
    clearing = [m for m in moves if m[0] > old_min and m[0] >= policy.margin * old_min]
    if not clearing:
        best = max(moves, key=lambda m: (m[0], -m[1]))
        return best[0], best[2], best[3]
    source = max(clearing, key=lambda m: (m[0], -m[1]))[1]
    new_min, _, peer_id, target = min((m for m in clearing if m[1] == source), key=lambda m: m[2])
    return new_min, peer_id, target


def plan_move(
    peers: Sequence[PeerInfo],
    num_stages: int,
    *,
    my_peer_id: str,
    now: float,
    last_move_at: Optional[float],
    policy: RebalancePolicy = RebalancePolicy(),
) -> Optional[int]:
    """The stage this peer should move to, or None to stay.

    Peers of one stage read the same snapshot at about the same time; if each of them acted on
    its own best move, they could all leave together and empty their stage. So the policy plans
    the swarm's best move and only the peer it names acts; the others see the new snapshot on
    their next check. The price: while the named peer is in its cool-down, nobody moves.
    `last_move_at` is when this peer last moved or joined (None: never).
    """
    if num_stages < 2:
        return None  # nowhere to go
    members = _members(peers, num_stages)
    if not any(p.peer_id == my_peer_id for stage in members for p in stage):
        return None  # not announced yet (or leaving): nothing to move

    if any(not stage for stage in members):
        # A stage with no peers stalls every trainer; refilling it outweighs both the cool-down
        # and min_peers_left (the donor still keeps a peer).
        return _recovery_moves(members).get(my_peer_id)

    if last_move_at is not None and now - last_move_at < policy.cooldown_s:
        return None
    move = _best_move(members, policy)
    if move is None or move[1] != my_peer_id:
        return None
    new_min, _, target = move
    old_min = min(_totals(members))
    if new_min > old_min and new_min >= policy.margin * old_min:
        return target
    return None
