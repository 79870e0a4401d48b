"""Timeouts that fit the link: derived from what is sent and from measured call times, never
constants tuned on loopback.

Two sources:

- **What the bytes need on the slowest link swarmtrain is built for** (``SLOW_LINK``: a
  volunteer 150 ms away on a 10 Mbit/s line, with a margin of two on both), before anything is
  measured. A small preset's activations and a large preset's contribution to an outer round
  then get the seconds that their own size needs, on every peer alike (an outer round's
  deadlines must be the same on every member: they are a function of the spec alone).
- **What calls to a peer were measured to take** (RFC 6298's retransmission timer: smoothed
  time plus four times its mean deviation, doubled after each expiry), once there is a
  measurement, in place of the size-based guess: a stage call gets what that peer's calls
  took, and a call that expired gets twice as long next time.

The configured request timeout stays the floor of a stage call (a busy peer on a fast link is
not cut off sooner than before), and every timeout here is a pure function of its inputs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Hashable, Optional

from protocol.rpc import MAX_TIMEOUT


@dataclasses.dataclass(frozen=True)
class Link:
    rtt_s: float  # round trip, seconds
    rate: float  # bytes per second, the slower direction


# The `far` profile of the network lab (75 ms each way, 10 Mbit/s), at twice its round trip and
# half its rate: jitter, loss recovery, and other traffic on the same line.
SLOW_LINK = Link(rtt_s=0.3, rate=10e6 / 8 / 2)
CONNECT_RTTS = 6  # a fresh connection (TCP, noise, yamux), a stream and its request and answer
MIN_TIMEOUT_S = 10.0  # the least any one call is given: a busy peer on a loaded machine
DHT_RTTS = 8  # a hivemind DHT request: possibly a fresh connection, then request and reply
OUTER_FETCHERS = 3  # an outer round's author serves its contribution to a group of four alone
AGREE_RTTS = 12  # store this member's holding and read the others' (a few DHT hops each)


def transfer_seconds(nbytes: float, link: Link = SLOW_LINK) -> float:
    """Seconds for one request/response moving ``nbytes`` in all over ``link``."""
    return CONNECT_RTTS * link.rtt_s + nbytes / link.rate


def transfer_timeout(
    nbytes: float, link: Link = SLOW_LINK, *, floor: float = MIN_TIMEOUT_S, ceiling: float = MAX_TIMEOUT
) -> float:
    """``transfer_seconds``, at least ``floor`` and at most ``ceiling`` (by default the longest a
    stage request may ask for)."""
    return min(ceiling, max(floor, transfer_seconds(nbytes, link)))


def dht_wait_timeout(value_bytes: int, link: Link = SLOW_LINK) -> float:
    """hivemind's per-request wait for a DHT reply carrying up to ``value_bytes``; never below
    hivemind's own 3 s."""
    return max(3.0, DHT_RTTS * link.rtt_s + value_bytes / link.rate)


class RoundTooShort(ValueError):
    pass


def outer_round_times(
    round_seconds: float, gather_seconds: float, agree_seconds: float, contribution_bytes: int, link: Link = SLOW_LINK
) -> tuple[float, float]:
    """(gather, agree) seconds of an outer round whose contributions are ``contribution_bytes``
    each: the spec's values, lengthened to what an author serving its contribution to
    ``OUTER_FETCHERS`` members over ``link`` needs, and the DHT exchanges of the agreement.
    Every member computes the same. Raises RoundTooShort when they do not fit in the round."""
    gather = max(gather_seconds, transfer_seconds(OUTER_FETCHERS * contribution_bytes, link))
    agree = max(agree_seconds, AGREE_RTTS * link.rtt_s)
    if gather + agree >= round_seconds:
        raise RoundTooShort(
            f"an outer round of {round_seconds:.0f}s cannot carry contributions of {contribution_bytes / 1e3:,.0f} kB: "
            f"serving them to {OUTER_FETCHERS} members at {link.rate * 8 / 1e6:.0f} Mbit/s (a 10 Mbit/s line with a "
            f"margin of two) takes {gather:.0f}s and agreeing {agree:.0f}s; raise training.outer.round_seconds "
            f"above {gather + agree:.0f}"
        )
    return gather, agree


@dataclasses.dataclass
class _Timer:
    srtt: Optional[float] = None
    rttvar: float = 0.0
    backoff: int = 0


class CallTimer:
    """RFC 6298's retransmission timer per key (a peer, and the kind of call), bounded by
    ``floor`` and ``MAX_TIMEOUT``."""

    ALPHA, BETA, K = 1 / 8, 1 / 4, 4
    MAX_BACKOFF = 5

    def __init__(self, *, floor: float = MIN_TIMEOUT_S):
        self.floor = floor
        self._timers: dict[Hashable, _Timer] = {}

    def timeout(self, key: Hashable, initial: float) -> float:
        """Seconds to give the next call under ``key``; ``initial`` before one was measured."""
        t = self._timers.get(key) or _Timer()
        base = initial if t.srtt is None else t.srtt + self.K * t.rttvar
        return min(MAX_TIMEOUT, max(self.floor, base) * 2**t.backoff)

    def observe(self, key: Hashable, seconds: float) -> None:
        """A call under ``key`` answered after ``seconds``."""
        if not (math.isfinite(seconds) and seconds >= 0):
            return
        t = self._timers.setdefault(key, _Timer())
        if t.srtt is None:
            t.srtt, t.rttvar = seconds, seconds / 2
        else:
            t.rttvar = (1 - self.BETA) * t.rttvar + self.BETA * abs(t.srtt - seconds)
            t.srtt = (1 - self.ALPHA) * t.srtt + self.ALPHA * seconds
        t.backoff = 0

    def expired(self, key: Hashable) -> None:
        """A call under ``key`` got no answer in time: the next one waits twice as long."""
        t = self._timers.setdefault(key, _Timer())
        t.backoff = min(self.MAX_BACKOFF, t.backoff + 1)
