"""The round state of this member's outer-rounds stage group: what its members announce, whether
this member holds it, and reading it from them.

A member reads the group's state when it joins a running group (it must hold the group's bits
before its first round), after a round it missed (undecided or failed for it while the others may
have applied it), and when the members' records show that it holds other bits than the group
(``behind_group``: a join that was refused, a round it applied differently). A group that holds
this member's bits already, at whatever round count, is joined without a read
(``rounds_behind_on_same_bits``: peers that start together from the spec's init).

What the group holds is what its members' records announce: (round, base digest) alike in two
records, or the only mate's when the spec accepts live state from one peer. Members serve
(round, base weights, outer momentum) over the state RPC. Without outer momentum (the default)
a joiner reads the base weights from one member and checks them against that announcement; with
momentum, which no record's digest covers, it asks every member at once and takes a state two
of them serve bit for bit. A state is only taken when read between two rounds: one read while
the group exchanges round r would miss r's update.

``OuterGroup`` is the object the outer optimizer is built with; the rules are pure functions.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from peer.averaging.flat import flat_of, round_digest
from protocol.records import PeerInfo, PeerState
from protocol.rpc import MOMENTUM_PREFIX

__all__ = [
    "OuterGroup",
    "RoundState",
    "behind_group",
    "group_states",
    "rounds_behind_on_same_bits",
]

RECORD_LAG_S = 10  # two of a peer's announce periods
READ_TRIES = 3  # windows between rounds a read may take


@dataclasses.dataclass(frozen=True)
class RoundState:
    """A round state as members serve it: rounds applied, base weights, and the outer momentum
    (None when it was not read)."""

    round: int
    base: np.ndarray
    momentum: Optional[np.ndarray] = None
    sources: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        return round_digest(self.base)


# --- the rules (pure) ---------------------------------------------------------------------------


def group_states(mates: Sequence[tuple[int, str]], lone_mate_trusted: bool) -> list[tuple[int, str]]:
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
    for e, d in group_states(mates, lone_mate_trusted):
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
    for e, d in group_states(mates, lone_mate_trusted=False):
        if e > epoch:
            return f"the group is at round {e} (base {d}), this member at {epoch}"
        if e in mine and mine[e] != d:
            return f"the group holds round {e} as base {d}, this member as {mine[e]}"
    if len(mates) == 1 and announced and lone_mate_trusted and announced[0][0] > epoch:
        # One mate: the one behind yields; at the same round neither can tell who is right.
        return f"the only other member is at round {announced[0][0]} (base {announced[0][1]}), this member at {epoch}"
    return None


# --- the group, as this member sees and reads it ------------------------------------------------


class OuterGroup:
    """This member's stage group: its mates' records (``records()``: a fresh snapshot of the
    swarm's peer records) and the states they serve (``reader``: a ``StateReader``).

    ``names``: the stage's trainable parameter names in the optimizer's order (how a served state
    is flattened); ``event(name, text, **fields)`` says what happened."""

    def __init__(
        self,
        spec,
        stage: int,
        me: str,
        *,
        names: Sequence[str],
        records: Callable[[], Sequence[PeerInfo]],
        reader,
        event: Callable,
    ):
        self.spec, self.stage, self.me, self.names = spec, stage, me, list(names)
        self.records, self.reader, self.event = records, reader, event
        self.lone_mate_trusted = spec.trust.accept_untrusted_live_state

    def online_mates(self) -> list[PeerInfo]:
        return [
            p for p in self.records() if p.stage == self.stage and p.peer_id != self.me and p.state == PeerState.ONLINE
        ]

    def announced(self) -> list[tuple[int, str]]:
        """(round, digest) of each online mate's record."""
        return [(p.epoch, p.state_digest) for p in self.online_mates()]

    def rounds_behind_on_same_bits(self, history: Mapping[int, str]) -> Optional[int]:
        return rounds_behind_on_same_bits(history, self.announced(), lone_mate_trusted=self.lone_mate_trusted)

    def behind(self, history: Mapping[int, str], epoch: int) -> Optional[str]:
        return behind_group(history, epoch, self.announced(), lone_mate_trusted=self.lone_mate_trusted)

    def read(self, purpose: str, *, round_busy_s: float) -> Optional[RoundState]:
        """The group's round state, or None (said in an event ``outer_<purpose>_refused`` when
        there were members to ask). Read after the first ``round_busy_s`` of a round (its
        gathering and agreement), in up to three windows between rounds."""
        from hivemind.utils import get_dht_time

        from peer.averaging.deadlines import reads_momentum, state_read_seconds

        mates = self.online_mates()[:4]
        if not mates:
            return None
        period = self.spec.training.outer.round_seconds
        momentum = reads_momentum(self.spec)
        quiet = round_busy_s + 5.0  # the round applied, with a margin
        needed = state_read_seconds(self.spec, self.stage, len(mates) if momentum else 1, momentum=momentum)
        why = "no members to read from"
        for attempt in range(READ_TRIES):
            since = get_dht_time() % period
            if since < quiet:
                time.sleep(quiet - since)
            window = int(get_dht_time() // period)
            # A read that ends after the next round began is of no use: it is cut off there.
            timeout = max(1.0, min(needed, (window + 1) * period - get_dht_time()))
            if momentum:
                got, why = self._two_alike(mates, timeout)
            else:
                got, why = self._one_checked(self.online_mates()[:4], attempt, timeout)
            if got is None:
                continue
            if int(get_dht_time() // period) == window:
                return got
            why = "the read ended after the next round began"
        self._refused(
            purpose,
            f"no round state read between two rounds ({READ_TRIES} tries; the read may take up to {needed:.0f}s "
            f"on a slow line, a round leaves {period - quiet:.0f}s for it: a spec written by `spec init` has "
            f"rounds long enough; last: {why})",
        )
        return None

    def _refused(self, purpose: str, why: str) -> None:
        self.event(
            f"outer_{purpose}_refused",
            f"stage {self.stage}: {why}; keeping this peer's weights",
            stage=self.stage,
            why=why,
        )

    def _skip(self, source: str, why: str, text: Optional[str] = None) -> None:
        self.event("outer_join_skip", f"stage {self.stage}: {text or why}", source=source, why=why)

    def _one_checked(self, mates: Sequence[PeerInfo], attempt: int, timeout: float):
        """(RoundState, None) read from one member that announces the group's state, checked
        against it; or (None, why not). Each attempt asks the next such member."""
        group = group_states([(p.epoch, p.state_digest) for p in mates], self.lone_mate_trusted)
        if not group:
            return None, f"no two of {len(mates)} members announce the same round state"
        epoch, digest = group[0]
        # In peer id order, the next one on each try: a member serving other bits than it
        # announces costs one try; when all are spent the read is refused, and ``behind`` has the
        # member read again after a round.
        holders = sorted((p for p in mates if (p.epoch, p.state_digest) == (epoch, digest)), key=lambda p: p.peer_id)
        source = holders[attempt % len(holders)].peer_id
        try:
            round_, tensors = self.reader.one(source, timeout=timeout)
        except Exception as err:
            why = f"{source[:16]}: {err}"
            self._skip(source, why, f"no round state from {why}")
            return None, why
        state = RoundState(int(round_), flat_of(tensors, self.names), None, (source,))
        served, asked = (state.round, state.digest[:16]), {m.peer_id for m in mates}
        # A member that applied a round since its record serves a later one: taken once the
        # group's records announce it (members announce every few seconds).
        waits = RECORD_LAG_S if state.round > epoch else 0
        while served != (epoch, digest):
            fresh = [(p.epoch, p.state_digest) for p in self.records() if p.peer_id in asked]
            if served in group_states(fresh, self.lone_mate_trusted):
                break
            if waits <= 0:
                why = f"{source[:16]} served round {state.round} base {served[1]}, the group announces {epoch} {digest}"
                self._skip(source, why)
                return None, why
            waits -= 1
            time.sleep(1.0)
        return state, None

    def _two_alike(self, mates: Sequence[PeerInfo], timeout: float):
        """(RoundState, None) that two members serve bit for bit, base and momentum (the only
        member's, when the spec accepts live state from one peer); or (None, why not)."""
        served: dict[tuple, list] = {}
        answers = self.reader.each([p.peer_id for p in mates], timeout=timeout, momentum=True)
        for p, got in zip(mates, answers):
            if isinstance(got, BaseException):
                why = f"{p.peer_id[:16]}: {got}"
                self._skip(p.peer_id, why, f"no round state from {why}")
                continue
            round_, tensors = got
            state = RoundState(
                int(round_), flat_of(tensors, self.names), flat_of(tensors, self.names, MOMENTUM_PREFIX), (p.peer_id,)
            )
            served.setdefault((state.round, state.digest, round_digest(state.momentum)), []).append(state)
        agreed = [k for k, v in served.items() if len(v) >= 2]
        alone = len(mates) == 1 and len(served) == 1 and self.lone_mate_trusted
        if not agreed and not alone:
            return None, f"no two members serve the same round state ({len(served)} different)"
        states = served[max(agreed) if agreed else next(iter(served))]
        return dataclasses.replace(states[0], sources=tuple(s.sources[0] for s in states)), None
