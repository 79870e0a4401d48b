"""Which peers are reached through a relay, and which handlers this process serves.

A peer that others cannot dial (behind a home router, no port forwarding) announces the relay
that forwards streams to it (``PeerInfo.via``, ``TeacherInfo.via``). ``ROUTES`` holds what the
swarm's records say, so that every RPC of this process (``peer.net.rpc.call``) opens its stream
to the relay instead of to a peer it cannot reach. Each source of records (the peer records, the
teacher records) owns its own table and replaces only that one when it reads its records again:
a read of the teachers never drops a relayed stage peer's route, nor the reverse.

``LOCAL`` holds this process's handlers by name (``RpcServer.add`` registers them), so that a
relayed peer answers a forwarded stream with the very handler a direct one would reach.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable, Optional


class Routes:
    """peer id -> the peer id of the relay that forwards to it (absent: dial it directly),
    merged from one table per source of records."""

    def __init__(self):
        self._tables: dict[str, dict[str, str]] = {}
        self._via: dict[str, str] = {}  # the merge: the first source (in learning order) that names a peer
        self._lock = threading.Lock()

    def via(self, peer_id: str) -> Optional[str]:
        return self._via.get(peer_id)

    def learn(self, source: str, pairs: Iterable[tuple[str, str]]) -> None:
        """Replace what ``source`` said with its (peer id, relay or "") pairs of one read."""
        fresh = {peer: relay for peer, relay in pairs if relay and relay != peer}
        with self._lock:
            self._tables[source] = fresh
            merged: dict[str, str] = {}
            for table in self._tables.values():
                for peer, relay in table.items():
                    merged.setdefault(peer, relay)
            self._via = merged

    def set(self, peer_id: str, relay: Optional[str], source: str = "set") -> None:
        """Name (or with None, forget) one peer's relay under ``source``."""
        with self._lock:
            table = dict(self._tables.get(source, {}))
        if relay:
            table[peer_id] = relay
        else:
            table.pop(peer_id, None)
        self.learn(source, table.items())


ROUTES = Routes()

# (id of the P2P instance, handler name) -> the stream handler RpcServer registered.
LOCAL: dict[tuple[int, str], Callable] = {}


def local_handler(p2p, name: str) -> Optional[Callable]:
    return LOCAL.get((id(p2p), name))
