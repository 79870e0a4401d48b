"""The swarm as the other parts use it: the interface of ``SwarmDHT`` (tests pass fakes)."""

from __future__ import annotations

from typing import Optional, Protocol

from protocol.records import CheckpointAnnouncement, PeerInfo


class SwarmView(Protocol):
    peer_id: str  # this peer's id (base58)

    def announce(self, info: PeerInfo, ttl: float) -> bool:
        """Store this peer's record under its own signed subkey for ``ttl`` seconds."""

    def snapshot(self) -> list[PeerInfo]:
        """The run's live peers, as their signed records say (compatible versions only)."""

    def announce_checkpoint(self, stage: int, record: dict, ttl: float) -> bool:
        """Announce a verified checkpoint of ``stage`` this peer serves (``VerifiedCheckpoint.to_record()``)."""

    def checkpoint_announcements(self, stage: Optional[int] = None) -> list[tuple[str, CheckpointAnnouncement]]:
        """(peer id, announcement) of every valid checkpoint announcement, newest step first."""
