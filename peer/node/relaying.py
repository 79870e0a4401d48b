"""Reachability at start, and the relay of a peer that others cannot dial.

Before the DHT starts the peer asks its relays to dial it back (``peer.net.reach``). Reachable:
nothing changes. Not reachable: it joins the DHT as a client (others would wait on a server they
cannot dial), takes a reservation at the first relay that grants one, serves the streams that
relay forwards (``peer.net.relay.RelayedEndpoint``) and announces it (``PeerInfo.via``), so that
every other peer's RPCs to it go through the relay. The reservation is renewed while it runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Optional, Sequence

from peer.base.config import NetworkConfig
from peer.net.reach import Reachability, check_reachability
from peer.net.relay import RESERVATION_S, RelayedEndpoint, ask_relay, split_maddr

log = logging.getLogger("swarmtrain.peer")


def relays_of(net: NetworkConfig) -> list[str]:
    return list(net.relays) or list(net.initial_peers)


def check_at_start(net: NetworkConfig, event: Callable) -> Reachability:
    """Asked once, before the DHT; says what it found in one event."""
    if net.client_mode:
        return Reachability(None, "", "--client-mode: not checked")
    got = asyncio.run(check_reachability(relays_of(net), net.host_maddrs, net.announce_maddrs))
    if got.reachable:
        event("reachable", f"others can dial this peer ({got.why})", reachable=True, observed=got.observed)
    elif got.reachable is False:
        event(
            "unreachable",
            f"others cannot dial this peer: {got.why}. Behind a home router this is expected: "
            + (
                "it serves through a relay"
                if net.use_relay
                else "--no-relay: it serves unrelayed, and others will fail to reach it"
            ),
            reachable=False,
            observed=got.observed,
        )
    else:
        event(
            "reachability_unknown", f"could not check whether others can dial this peer ({got.why}): assuming they can"
        )
    return got


class RelayedSide:
    """This peer's reservation at a relay, renewed, and the endpoint its relay forwards to."""

    def __init__(self, p2p, loop, relays: Sequence[str], event: Callable):
        self.p2p, self.loop, self.relays, self.event = p2p, loop, list(relays), event
        self.via: Optional[str] = None
        self.endpoint: Optional[RelayedEndpoint] = None
        self._renewed = 0.0
        self._renewal = None

    def start(self) -> Optional[str]:
        """The relay's peer id once one grants a reservation, or None (said in an event)."""
        errors = []
        for maddr in self.relays:
            try:
                _, relay = split_maddr(maddr)
                got = self.loop.run(ask_relay(self.p2p, relay, reserve=True), timeout=30)
            except Exception as err:
                errors.append(f"{maddr}: {err}")
                continue
            if got.error or got.reserved_s <= 0:
                errors.append(f"{relay[:12]}: {got.error_code or 'no reservation'} {got.error}".strip())
                continue
            self.via = relay
            self.endpoint = RelayedEndpoint(self.p2p, [relay])
            self.loop.run(self.endpoint.start(), timeout=10)
            self._renewed = time.monotonic()
            self.event("relayed", f"serving through relay {relay}", via=relay)
            return relay
        self.event(
            "no_relay",
            "others cannot dial this peer and no relay took it ("
            + ("; ".join(errors) or "no relays given")
            + "): it trains through others, but nobody can reach the stage it serves. Forward a port "
            "(--announce-maddrs) or name a relay (--trusted-relay)",
        )
        return None

    def renew_if_due(self) -> None:
        """Called often; renews a third of the way through the reservation, never blocking."""
        if self.via is None or time.monotonic() - self._renewed < RESERVATION_S / 3:
            return
        if self._renewal is not None and not self._renewal.done():
            return
        self._renewed = time.monotonic()
        self._renewal = self.loop.submit(self._renew())

    async def _renew(self) -> None:
        try:
            got = await ask_relay(self.p2p, self.via, reserve=True)
            if got.error:
                log.warning("relay %s refused to renew the reservation: %s", self.via, got.error)
        except Exception as err:
            log.warning("renewing the reservation at relay %s failed: %s", self.via, err)

    def stop(self) -> None:
        if self.endpoint is not None:
            try:
                self.loop.run(self.endpoint.stop(), timeout=5)
            except Exception:
                pass
