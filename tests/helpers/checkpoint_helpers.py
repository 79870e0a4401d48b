"""Helpers for the keeper and checkpoint-transfer tests: real p2pd instances on 127.0.0.1 in
one asyncio loop thread, keys, and a fake DHT view (the network part is real, the DHT is not
needed to test one RPC)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

from hivemind.p2p import P2P

from peer.base import LoopThread
from protocol import signing
from protocol.records import CheckpointAnnouncement, PeerInfo


class P2PHost:
    """A loop thread and the P2P daemons started on it; ``close`` stops them all."""

    def __init__(self):
        self.loop = LoopThread()
        self.nodes: list[P2P] = []

    def run(self, coro, timeout: Optional[float] = 60):
        return self.loop.run(coro, timeout)

    def new(self, *connect_to: P2P) -> P2P:
        async def create():
            initial = []
            for other in connect_to:
                initial += [str(m) for m in await other.get_visible_maddrs()]
            return await P2P.create(initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"])

        node = self.run(create())
        self.nodes.append(node)
        return node

    def kill(self, node: P2P) -> None:
        """Stop a daemon, as a peer that dies would."""
        with contextlib.suppress(Exception):
            self.run(node.shutdown(), 20)

    def close(self) -> None:
        for node in reversed(self.nodes):
            self.kill(node)
        self.loop.stop()


def peer_id(node: P2P) -> str:
    return node.peer_id.to_base58()


def make_keys(directory):
    return {name: signing.write_keypair(directory / f"{name}.pem") for name in ("keeper", "mallory")}


@dataclasses.dataclass
class FakeSwarm:
    """What the keeper and the checkpoint service read from and write to the DHT."""

    peer_id: str
    peers: list = dataclasses.field(default_factory=list)
    announced: list = dataclasses.field(default_factory=list)
    announcements: list = dataclasses.field(default_factory=list)

    def snapshot(self) -> list[PeerInfo]:
        return list(self.peers)

    def announce_checkpoint(self, stage: int, record: dict, ttl: float) -> bool:
        self.announced.append((stage, dict(record)))
        return True

    def checkpoint_announcements(self, stage=None):
        """Typed, as SwarmDHT's: the fake's records are plain dicts."""
        typed = [(p, CheckpointAnnouncement.from_record(r)) for p, r in self.announcements]
        return [(p, r) for p, r in typed if stage is None or r.stage == stage]


class Events:
    """Collects ``Output.event`` calls."""

    def __init__(self):
        self.items: list[tuple[str, str, dict]] = []

    def __call__(self, name: str, text: str, **fields) -> None:
        self.items.append((name, text, fields))

    def named(self, name: str) -> list[tuple[str, dict]]:
        return [(text, fields) for n, text, fields in self.items if n == name]
