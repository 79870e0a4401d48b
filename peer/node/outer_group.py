"""The round state of this peer's outer-rounds stage group, as its members serve it.

A peer reads it when it joins a running group (it must hold the group's bits before its first
round) and after a round it missed (undecided or failed for it while the others may have
applied it). Members serve (round, base weights, outer momentum) over the state RPC; a state is
taken only when two of them serve it bit for bit (or the only member's, when the spec accepts
live state from one peer), and only when read between two rounds: a state read while the group
exchanges round r would miss r's update.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Callable, Optional

from protocol.records import PeerState

__all__ = ["GroupState", "read_group_state", "state_digest"]


@dataclasses.dataclass(frozen=True)
class GroupState:
    round: int
    digest: str
    tensors: dict
    sources: tuple[str, ...]


def state_digest(tensors) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def read_group_state(ctx, stage: int, me: str, *, refused: Callable[[str], None]) -> Optional[GroupState]:
    """The state two online members of ``stage`` serve identically (the highest round, when
    several pairs agree), or None (``refused(why)`` is called when there were members to ask)."""
    from hivemind.utils import get_dht_time

    swarm = ctx.checkpoints().swarm
    mates = [p for p in (swarm.snapshot() if swarm is not None else []) if p.stage == stage and p.peer_id != me]
    mates = [p for p in mates if p.state == PeerState.ONLINE][:4]
    if not mates:
        return None
    outer = ctx.spec.training.outer
    quiet = outer.gather_seconds + outer.agree_seconds + 5.0
    for _ in range(3):  # up to three windows between rounds
        since = get_dht_time() % outer.round_seconds
        if since < quiet:
            time.sleep(quiet - since)
        window = int(get_dht_time() // outer.round_seconds)
        groups = _round_states(ctx, stage, mates)
        if int(get_dht_time() // outer.round_seconds) == window:
            break
    else:
        refused("no round state read between two rounds")
        return None
    agreed = [k for k, v in groups.items() if len(v) >= 2]
    alone = len(mates) == 1 and len(groups) == 1 and ctx.spec.trust.accept_untrusted_live_state
    if not agreed and not alone:
        refused(f"no two members serve the same round state ({len(groups)} different)")
        return None
    key = max(agreed) if agreed else next(iter(groups))
    served = groups[key]
    return GroupState(key[0], key[1], served[0][1], tuple(pid for pid, _ in served))


def _round_states(ctx, stage: int, mates) -> dict[tuple, list]:
    """(round, state digest) -> [(peer id, tensors)] of what each of ``mates`` serves."""
    from peer.checkpoints.state_pull import pull_stage_state

    groups: dict[tuple, list] = {}
    for p in mates:
        try:
            round_, tensors = ctx.loop.run(
                pull_stage_state(ctx.p2p, p.peer_id, ctx.spec, stage, momentum=True, timeout=60), 70
            )
        except Exception as err:
            ctx.event("outer_join_skip", f"stage {stage}: no round state from {p.peer_id[:16]}: {err}")
            continue
        groups.setdefault((round_, state_digest(tensors)), []).append((p.peer_id, tensors))
    return groups
