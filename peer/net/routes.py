"""Which peers are reached through a relay, and which handlers this process serves.

A peer that others cannot dial (behind a home router, no port forwarding) announces the relay
that forwards streams to it (``PeerInfo.via``). ``ROUTES`` holds what the swarm's records say,
so that every RPC of this process (``peer.net.rpc.call``) opens its stream to the relay instead
of to a peer it cannot reach; it is filled from each snapshot of the records.

``LOCAL`` holds this process's handlers by name (``RpcServer.add`` registers them), so that a
relayed peer answers a forwarded stream with the very handler a direct one would reach.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable, Optional


class Routes:
    """peer id -> the peer id of the relay that forwards to it (absent: dial it directly)."""

    def __init__(self):
        self._via: dict[str, str] = {}
        self._lock = threading.Lock()

    def via(self, peer_id: str) -> Optional[str]:
        return self._via.get(peer_id)

    def learn(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Replace what is known with (peer id, relay or "") pairs of one snapshot."""
        fresh = {peer: relay for peer, relay in pairs if relay and relay != peer}
        with self._lock:
            self._via = fresh

    def set(self, peer_id: str, relay: Optional[str]) -> None:
        with self._lock:
            if relay:
                self._via[peer_id] = relay
            else:
                self._via.pop(peer_id, None)


ROUTES = Routes()

# (id of the P2P instance, handler name) -> the stream handler RpcServer registered.
LOCAL: dict[tuple[int, str], Callable] = {}


def local_handler(p2p, name: str) -> Optional[Callable]:
    return LOCAL.get((id(p2p), name))
