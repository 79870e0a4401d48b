"""Routing policy, the pure half: whom to send a micro-batch to, and whom to avoid.

The network half (the trainer's RPC loop) owns the clock and the randomness and passes them
in, so these policies are tested without a network and without sleeping.
"""

from __future__ import annotations

import math
import random
from types import MappingProxyType
from typing import Mapping, Optional, Sequence

__all__ = ["BanList", "ThroughputEMA", "capped_priors", "choose_peer"]

# A peer that has not reported (or measured) a throughput yet still gets this fraction of the
# mean known throughput as weight: new peers must be tried to be measured at all, but should
# not take a full share of traffic before they have shown what they can do.
UNKNOWN_WEIGHT_FRACTION = 0.1


class BanList:
    """Peers that failed recently, banned for a time that doubles with each consecutive failure.

    Failures reported while a peer is still banned do not lengthen the ban: they are the other
    micro-batches that were in flight when it failed, the same incident, and counting each of
    them would push one outage straight to `max_s`.
    """

    def __init__(self, base_s: float = 2.0, max_s: float = 60.0) -> None:
        if base_s <= 0 or max_s < base_s:
            raise ValueError(f"need 0 < base_s <= max_s, got base_s={base_s}, max_s={max_s}")
        self.base_s = base_s
        self.max_s = max_s
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def ban(self, peer_id: str, now: float) -> float:
        """Record a failure of `peer_id`; returns how long (s) it stays banned from `now`."""
        if self.is_banned(peer_id, now):
            return self._until[peer_id] - now
        self._forget_expired(now)
        failures = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = failures
        # The exponent is capped so that a peer failing for days does not overflow the float.
        duration = min(self.max_s, self.base_s * 2.0 ** min(failures - 1, 64))
        self._until[peer_id] = now + duration
        return duration

    def is_banned(self, peer_id: str, now: float) -> bool:
        return self._until.get(peer_id, -math.inf) > now

    def record_success(self, peer_id: str) -> None:
        """A peer that answered is healthy again: its next failure starts from `base_s`.

        The current ban (if any) still runs out: a late reply is no proof the peer keeps up.
        """
        self._failures.pop(peer_id, None)

    def banned(self, now: float) -> set[str]:
        # Read from other threads too (a peer's snapshot): a copy of the items first, in one step.
        return {peer_id for peer_id, until in list(self._until.items()) if until > now}

    # Peer ids are free to make: the table must not grow with every id ever banned.
    MAX_ENTRIES = 4096

    def _forget_expired(self, now: float) -> None:
        if len(self._until) < self.MAX_ENTRIES:
            return
        for peer_id in [p for p, until in self._until.items() if until <= now]:
            self._until.pop(peer_id, None)
            self._failures.pop(peer_id, None)
        while len(self._until) >= self.MAX_ENTRIES:  # all banned right now: drop the oldest bans
            peer_id = next(iter(self._until))
            self._until.pop(peer_id)
            self._failures.pop(peer_id, None)


def _weights(candidates: Sequence[tuple[str, float, int]]) -> list[float]:
    throughputs = [t if math.isfinite(t) and t > 0 else 0.0 for _, t, _ in candidates]
    known = [t for t in throughputs if t > 0]
    floor = UNKNOWN_WEIGHT_FRACTION * sum(known) / len(known) if known else 1.0
    # Dividing by the queue length is SWARM's idea of expected finish time: a fast peer with a
    # long queue is no better than a slow idle one.
    return [(t if t > 0 else floor) / (1 + max(in_flight, 0)) for t, (_, _, in_flight) in zip(throughputs, candidates)]


def choose_peer(candidates: Sequence[tuple[str, float, int]], *, banned: set[str], rng: random.Random) -> Optional[str]:
    """Pick a peer of a stage for the next micro-batch (SWARM's stochastic wiring).

    `candidates` are (peer_id, throughput in samples/s, micro-batches in flight on it). The
    pick is random with weight throughput / (1 + in_flight): drawing rather than always taking
    the best spreads load over the stage and keeps measuring every peer.
    Returns None if there is no candidate that is not banned.
    """
    allowed = [c for c in candidates if c[0] not in banned]
    if not allowed:
        return None
    return rng.choices([peer_id for peer_id, _, _ in allowed], weights=_weights(allowed))[0]


# An announced throughput is a peer's claim: it counts for at most this many times what the
# others of the stage are measured (or, before any is measured, announce) to do.
PRIOR_CAP_FACTOR = 2.0


# A relayed peer's streams cross its relay twice (Petals weighs relayed servers down too): its
# announced throughput counts this much until the trainer has measured it.
RELAYED_PRIOR_FACTOR = 0.5


def announced_prior(throughput: float, relayed: bool) -> float:
    return throughput * RELAYED_PRIOR_FACTOR if relayed else throughput


def capped_priors(
    candidates: Sequence[tuple[str, float, int]], measured: Optional[Mapping[str, float]] = None
) -> list[tuple[str, float, int]]:
    """(peer, announced throughput, load) with each announced figure capped at
    ``PRIOR_CAP_FACTOR`` times a reference: the best measured figure among the candidates when
    there is one, else the lower median of the announced ones. A peer announcing 1e9 samples/s
    then gets at most a fair share until it is measured (and banned if it fails)."""
    measured = measured or {}
    known = [measured[p] for p, _, _ in candidates if p in measured and measured[p] > 0]
    if known:
        reference = max(known)
    else:
        announced = sorted(a for _, a, _ in candidates if a > 0 and math.isfinite(a))
        if not announced:
            return list(candidates)
        reference = announced[(len(announced) - 1) // 2]
    cap = PRIOR_CAP_FACTOR * reference
    return [(p, min(a, cap) if math.isfinite(a) else cap, load) for p, a, load in candidates]


class ThroughputEMA:
    """Measured samples/s per peer, to replace the throughput that a peer announces.

    An announced number is a peer's own claim (and ignores the network between us); what we
    measure on our own requests is what routing should trust once we have it.
    """

    MAX_ENTRIES = 4096

    def __init__(self, alpha: float = 0.3) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._value: dict[str, float] = {}

    def update(self, peer_id: str, samples: float, seconds: float) -> float:
        """Record that `peer_id` processed `samples` in `seconds`; returns the new estimate."""
        if seconds <= 0 or samples < 0 or not math.isfinite(samples / seconds):
            return self._value.get(peer_id, 0.0)  # nothing measurable (clock skew, empty batch)
        rate = samples / seconds
        old = self._value.get(peer_id)
        if old is None and len(self._value) >= self.MAX_ENTRIES:
            self._value.pop(next(iter(self._value)))  # the oldest measured peer: ids are free to make
        # The first measurement replaces the announced value outright, which was only a guess.
        self._value[peer_id] = rate if old is None else self.alpha * rate + (1 - self.alpha) * old
        return self._value[peer_id]

    def get(self, peer_id: str, default: float = 0.0) -> float:
        return self._value.get(peer_id, default)

    def known(self) -> Mapping[str, float]:
        """The measured figures, read-only (no copy: routing reads it on every pick)."""
        return MappingProxyType(self._value)

    def forget(self, peer_id: str) -> None:
        """Drop a peer that left, so that the table does not grow with every peer ever seen."""
        self._value.pop(peer_id, None)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._value
