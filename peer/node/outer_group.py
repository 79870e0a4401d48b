"""The round state of this peer's outer-rounds stage group, as its members serve it.

A peer reads it when it joins a running group (it must hold the group's bits before its first
round), after a round it missed (undecided or failed for it while the others may have
applied it), and when the members' records show that it holds other bits than the group
(``behind_group``: a join that was refused, a round it applied differently). A group that
holds this peer's bits already, at whatever round count, is joined without a read
(``rounds_behind_on_same_bits``: peers that start together from the spec's init).

What the group holds is what its members' records announce: (round, base digest) alike in two
records, or the only mate's when the spec accepts live state from one peer. Members serve
(round, base weights, outer momentum) over the state RPC. Without outer momentum (the default)
a joiner reads the base weights from one member and checks them against that announcement; with
momentum, which no record's digest covers, it asks every member at once and takes a state two
of them serve bit for bit. A state is only taken when read between two rounds: one read while
the group exchanges round r would miss r's update.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from typing import Callable, Mapping, Optional, Sequence

from protocol.records import PeerState

__all__ = ["GroupState", "behind_group", "read_group_state", "rounds_behind_on_same_bits", "state_digest"]


RECORD_LAG_S = 10  # two of a peer's announce periods


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
    ctx,
    stage: int,
    me: str,
    *,
    refused: Callable[[str], None],
    round_busy_s: float,
    base_digest: Callable[[Mapping], str],
) -> Optional[GroupState]:
    """The group's round state, or None (``refused(why)`` is called when there were members to
    ask). Read after the first ``round_busy_s`` of a round (its gathering and agreement), up to
    three windows between rounds.

    Without outer momentum (the default) the state is the base weights, read from one member
    and taken when their digest (``base_digest``, what members announce) and round are what the
    group announces (``_group_states``): on a thin line one copy costs half of two. With
    momentum, which no announced digest covers, every member is asked at once and a state is
    taken when two of them serve it bit for bit (the only member's, when the spec accepts live
    state from one peer)."""
    from hivemind.utils import get_dht_time

    from peer.averaging.deadlines import reads_momentum, state_read_seconds

    swarm = ctx.checkpoints().swarm

    def online_mates():
        mates = [p for p in (swarm.snapshot() if swarm is not None else []) if p.stage == stage and p.peer_id != me]
        return [p for p in mates if p.state == PeerState.ONLINE][:4]

    mates = online_mates()
    if not mates:
        return None
    outer, lone = ctx.spec.training.outer, ctx.spec.trust.accept_untrusted_live_state
    momentum = reads_momentum(ctx.spec)
    quiet = round_busy_s + 5.0  # the round applied, with a margin
    needed = state_read_seconds(ctx.spec, stage, len(mates) if momentum else 1, momentum=momentum)
    why = "no members to read from"
    for attempt in range(3):  # up to three windows between rounds
        since = get_dht_time() % outer.round_seconds
        if since < quiet:
            time.sleep(quiet - since)
        window = int(get_dht_time() // outer.round_seconds)
        # A read that ends after the next round began is of no use: it is cut off there.
        left = (window + 1) * outer.round_seconds - get_dht_time()
        timeout = max(1.0, min(needed, left))
        if momentum:
            groups = _round_states(ctx, stage, mates, timeout=timeout, momentum=True)
        else:
            got, why = _one_checked_state(ctx, stage, online_mates(), attempt, timeout, lone, base_digest)
            if got is None:
                continue
        if int(get_dht_time() // outer.round_seconds) == window:
            break
        why = "the read ended after the next round began"
    else:
        refused(
            f"no round state read between two rounds (three tries; the read may take up to {needed:.0f}s on a "
            f"slow line, a round leaves {outer.round_seconds - quiet:.0f}s for it: a spec written by `spec init` "
            f"has rounds long enough; last: {why})"
        )
        return None
    if not momentum:
        return got
    agreed = [k for k, v in groups.items() if len(v) >= 2]
    alone = len(mates) == 1 and len(groups) == 1 and lone
    if not agreed and not alone:
        refused(f"no two members serve the same round state ({len(groups)} different)")
        return None
    key = max(agreed) if agreed else next(iter(groups))
    served = groups[key]
    return GroupState(key[0], key[1], served[0][1], tuple(pid for pid, _ in served))


def _one_checked_state(ctx, stage: int, mates, attempt: int, timeout: float, lone: bool, base_digest):
    """(GroupState, None) read from one member that announces the group's state, checked against
    it; or (None, why not). Each attempt asks the next such member."""
    from peer.checkpoints.state_pull import pull_stage_state

    group = _group_states([(p.epoch, p.state_digest) for p in mates], lone)
    if not group:
        return None, f"no two of {len(mates)} members announce the same round state"
    epoch, digest = group[0]
    # In peer id order, the next one on each try: a member serving other bits than it announces
    # costs one try; when all three are spent the join is refused, and ``behind_group`` has the
    # member read again after a round.
    holders = sorted((p for p in mates if (p.epoch, p.state_digest) == (epoch, digest)), key=lambda p: p.peer_id)
    source = holders[attempt % len(holders)]
    try:
        round_, tensors = ctx.loop.run(
            pull_stage_state(ctx.p2p, source.peer_id, ctx.spec, stage, timeout=timeout), timeout + 10
        )
    except Exception as err:
        why = f"{source.peer_id[:16]}: {err}"
        ctx.event("outer_join_skip", f"stage {stage}: no round state from {why}", source=source.peer_id, why=why)
        return None, why
    full = base_digest(tensors)
    served, asked = (round_, full[:16]), {m.peer_id for m in mates}
    # A member that applied a round since its record serves a later one: taken once the group's
    # records announce it (members announce every few seconds).
    waits = RECORD_LAG_S if round_ > epoch else 0
    while served != (epoch, digest):
        fresh = [(p.epoch, p.state_digest) for p in ctx.checkpoints().swarm.snapshot() if p.peer_id in asked]
        if served in _group_states(fresh, lone):
            break
        if waits <= 0:
            why = f"{source.peer_id[:16]} served round {round_} base {full[:16]}, the group announces {epoch} {digest}"
            ctx.event("outer_join_skip", f"stage {stage}: {why}", source=source.peer_id, why=why)
            return None, why
        waits -= 1
        time.sleep(1.0)
    return GroupState(round_, full, tensors, (source.peer_id,)), None


def _round_states(ctx, stage: int, mates, *, timeout: float, momentum: bool) -> dict[tuple, list]:
    """(round, state digest) -> [(peer id, tensors)] of what each of ``mates`` serves."""
    from peer.checkpoints.state_pull import pull_stage_state

    async def pull_all():
        pulls = [
            pull_stage_state(ctx.p2p, p.peer_id, ctx.spec, stage, momentum=momentum, timeout=timeout) for p in mates
        ]
        return await asyncio.gather(*pulls, return_exceptions=True)

    groups: dict[tuple, list] = {}
    for p, got in zip(mates, ctx.loop.run(pull_all(), timeout + 10)):
        if isinstance(got, BaseException):
            why = f"{p.peer_id[:16]}: {got}"
            ctx.event("outer_join_skip", f"stage {stage}: no round state from {why}", source=p.peer_id, why=why)
            continue
        round_, tensors = got
        groups.setdefault((round_, state_digest(tensors)), []).append((p.peer_id, tensors))
    return groups
