"""Can others dial this peer? Asked of the relays at start, before the peer joins the DHT.

A peer behind a home router dials out fine but nobody can dial in; it must not join the DHT as
a server (others would wait on it) nor announce a stage others cannot reach. At start, a
short-lived daemon listening where the peer will listen asks each relay (by default the initial
peers) to dial it back with a fresh connection (``peer.net.relay.RelayService``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Optional, Sequence

from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from peer.net.relay import ask_relay, split_maddr

log = logging.getLogger("swarmtrain.reach")


@dataclasses.dataclass(frozen=True)
class RelayAnswer:
    relay: str  # its peer id
    reachable: Optional[bool]  # None: it did not answer (no relay there, or unreachable)
    observed: str = ""
    error: str = ""


@dataclasses.dataclass(frozen=True)
class Reachability:
    reachable: Optional[bool]  # None: no relay answered, nobody could tell
    observed: str  # the address a relay saw this peer's connection come from
    why: str


def verdict(answers: Sequence[RelayAnswer]) -> Reachability:
    """One relay that dialed this peer back is enough (someone can reach it); every answering
    relay failing means nobody can; no answer at all means nobody could tell."""
    answered = [a for a in answers if a.reachable is not None]
    observed = next((a.observed for a in answered if a.observed), "")
    if any(a.reachable for a in answered):
        who = next(a.relay for a in answered if a.reachable)
        return Reachability(True, observed, f"relay {who[:12]} dialed this peer back")
    if answered:
        return Reachability(
            False, observed, f"{len(answered)} relay(s) could not dial this peer back (seen from {observed or '?'})"
        )
    errors = "; ".join(f"{a.relay[:12]}: {a.error}" for a in answers if a.error)
    return Reachability(None, "", "no relay answered" + (f" ({errors})" if errors else ""))


async def check_reachability(
    relays: Sequence[str], host_maddrs: Sequence[str], announce_maddrs: Sequence[str] = (), timeout: float = 20.0
) -> Reachability:
    """Ask ``relays`` (full multiaddrs) whether they can dial a daemon listening on
    ``host_maddrs`` (announcing ``announce_maddrs``, when given: a forwarded port)."""
    kwargs = {"announce_maddrs": list(announce_maddrs)} if announce_maddrs else {}
    probe = await P2P.create(host_maddrs=list(host_maddrs), dht_mode="client", auto_nat=False, **kwargs)
    try:
        addrs = [str(m).split("/p2p/")[0] for m in await probe.get_visible_maddrs()]

        async def ask(maddr: str) -> RelayAnswer:
            try:
                base, relay = split_maddr(maddr)
            except ValueError as err:
                return RelayAnswer("?", None, error=str(err))
            try:
                await asyncio.wait_for(probe._client.connect(PeerID.from_base58(relay), [Multiaddr(base)]), timeout)
                got = await ask_relay(probe, relay, addrs=addrs, dial=True, timeout=timeout)
            except Exception as err:
                return RelayAnswer(relay, None, error=f"{type(err).__name__}: {err}"[:200])
            if got.error:
                return RelayAnswer(relay, None, error=f"{got.error_code}: {got.error}"[:200])
            return RelayAnswer(relay, got.reachable, observed=got.observed)

        answers = await asyncio.gather(*(ask(m) for m in relays[:4]))
    finally:
        await probe.shutdown()
    return verdict(answers)
