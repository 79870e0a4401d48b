"""The round state of this peer's outer-rounds stage group, as its members serve it.

A peer reads it when it joins a running group (it must hold the group's bits before its first
round), after a round it missed (undecided or failed for it while the others may have
applied it), and when the members' records show that it holds other bits than the group
(``behind_group``: a join that was refused, a round it applied differently). Members serve
(round, base weights, outer momentum) over the state RPC; a state is taken only when two of them
serve it bit for bit (or the only member's, when the spec accepts live state from one peer), and
only when read between two rounds: a state read while the group exchanges round r would miss
r's update. The members are asked at once, so that on a thin link the read fits between two
rounds (two tiny-preset states at 10 Mbit/s: 3 s at once, 6 s one after the other).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from typing import Callable, Mapping, Optional, Sequence

from protocol.records import PeerState

__all__ = ["GroupState", "behind_group", "read_group_state", "rounds_behind_on_same_bits", "state_digest"]


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


def _group_states(mates: Sequence[tuple[int, str]], lone_mate_trusted: bool) -> list[tuple[int, str]]:
    """The (round, digest) pairs that stand for the group, highest first: what two mates
    announce alike, or the only mate's when the spec accepts live state from one peer."""
    announced = [(e, d) for e, d in mates if d]
    counts: dict[tuple[int, str], int] = {}
    for key in announced:
        counts[key] = counts.get(key, 0) + 1
    agreed = sorted((key for key, n in counts.items() if n >= 2), reverse=True)
    if not agreed and len(mates) == 1 and announced and lone_mate_trusted:
        agreed = announced
    return agreed


def rounds_behind_on_same_bits(
    mine: Mapping[int, str], mates: Sequence[tuple[int, str]], *, lone_mate_trusted: bool
) -> Optional[int]:
    """How many rounds this member counts behind a group that holds its own bits, or None when
    the group holds none of them (or there is no group to tell).

    ``mine``: round -> base digest this member held after each recent round. Rounds that applied
    nothing (a member alone with no progress, a group starting from the spec's init) leave the
    bits as they were but are counted, so members with the same bits may count differently; and
    a mate's record lags it. Either way nothing needs reading: the count is taken from the
    group's. Peers that start a run together hold the spec's init and read nothing from each
    other (on a thin line a small model's state takes minutes)."""
    for e, d in _group_states(mates, lone_mate_trusted):
        held = [r for r, digest in mine.items() if digest == d]
        if held:
            return max(0, e - max(held))
    return None


def behind_group(
    mine: Mapping[int, str], epoch: int, mates: Sequence[tuple[int, str]], *, lone_mate_trusted: bool
) -> Optional[str]:
    """Why this member should read its group's round state again, or None.

    ``mine``: round -> base digest (16 hex digits) this member held after each recent round;
    ``epoch``: its round now; ``mates``: (round, digest) the other members' records announce.
    A group state is what two mates announce alike (or the only mate's, when the spec accepts
    live state from one peer). This member is behind when such a state is of a later round than
    its own, or of a round it held with other bits (one mate only: of a later round; at the same
    round two members that disagree, with nobody to decide, both keep theirs)."""
    announced = [(e, d) for e, d in mates if d]
    for e, d in _group_states(mates, lone_mate_trusted=False):
        if e > epoch:
            return f"the group is at round {e} (base {d}), this member at {epoch}"
        if e in mine and mine[e] != d:
            return f"the group holds round {e} as base {d}, this member as {mine[e]}"
    if len(mates) == 1 and announced and lone_mate_trusted and announced[0][0] > epoch:
        # One mate: the one behind yields; at the same round neither can tell who is right.
        return f"the only other member is at round {announced[0][0]} (base {announced[0][1]}), this member at {epoch}"
    return None


def read_group_state(
    ctx, stage: int, me: str, *, refused: Callable[[str], None], round_busy_s: float
) -> Optional[GroupState]:
    """The state two online members of ``stage`` serve identically (the highest round, when
    several pairs agree), or None (``refused(why)`` is called when there were members to ask).
    Read after the first ``round_busy_s`` of a round (its gathering and agreement)."""
    from hivemind.utils import get_dht_time

    swarm = ctx.checkpoints().swarm
    mates = [p for p in (swarm.snapshot() if swarm is not None else []) if p.stage == stage and p.peer_id != me]
    mates = [p for p in mates if p.state == PeerState.ONLINE][:4]
    if not mates:
        return None
    from peer.averaging.deadlines import state_read_seconds

    outer = ctx.spec.training.outer
    quiet = round_busy_s + 5.0  # the round applied, with a margin
    needed = state_read_seconds(ctx.spec, stage, len(mates))
    for _ in range(3):  # up to three windows between rounds
        since = get_dht_time() % outer.round_seconds
        if since < quiet:
            time.sleep(quiet - since)
        window = int(get_dht_time() // outer.round_seconds)
        # A read that ends after the next round began is of no use: it is cut off there.
        left = (window + 1) * outer.round_seconds - get_dht_time()
        groups = _round_states(ctx, stage, mates, timeout=max(1.0, min(needed, left)))
        if int(get_dht_time() // outer.round_seconds) == window:
            break
    else:
        refused(
            f"no round state read between two rounds (three tries; {len(mates)} states of this stage may take "
            f"up to {needed:.0f}s on a slow line, a round leaves {outer.round_seconds - quiet:.0f}s for it: "
            "a spec written by `spec init` has rounds long enough)"
        )
        return None
    agreed = [k for k, v in groups.items() if len(v) >= 2]
    alone = len(mates) == 1 and len(groups) == 1 and ctx.spec.trust.accept_untrusted_live_state
    if not agreed and not alone:
        refused(f"no two members serve the same round state ({len(groups)} different)")
        return None
    key = max(agreed) if agreed else next(iter(groups))
    served = groups[key]
    return GroupState(key[0], key[1], served[0][1], tuple(pid for pid, _ in served))


def _round_states(ctx, stage: int, mates, *, timeout: float) -> dict[tuple, list]:
    """(round, state digest) -> [(peer id, tensors)] of what each of ``mates`` serves."""
    from peer.checkpoints.state_pull import pull_stage_state

    async def pull_all():
        pulls = [pull_stage_state(ctx.p2p, p.peer_id, ctx.spec, stage, momentum=True, timeout=timeout) for p in mates]
        return await asyncio.gather(*pulls, return_exceptions=True)

    groups: dict[tuple, list] = {}
    for p, got in zip(mates, ctx.loop.run(pull_all(), timeout + 10)):
        if isinstance(got, BaseException):
            ctx.event("outer_join_skip", f"stage {stage}: no round state from {p.peer_id[:16]}: {got}")
            continue
        round_, tensors = got
        groups.setdefault((round_, state_digest(tensors)), []).append((p.peer_id, tensors))
    return groups
