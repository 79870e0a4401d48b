"""What a peer says about itself, and what it hears of the others.

``Presence`` owns the peer's status: one immutable ``PeerStatus``, replaced whole under a lock
(``update``), so that every reader (the announcer, the info RPC, metrics, the status line) sees
a stage and a state that belong together. A move announces ``joining`` at its target in one
step; no reader can see the target stage with the old ``online`` state.

It also runs the announcer thread (the peer's DHT record every ``period`` seconds) and keeps
the latest snapshot of the swarm's records (``peers``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable, Optional, Sequence

from peer.swarm.view import SwarmView
from protocol.records import PeerInfo, PeerState, online_per_stage

log = logging.getLogger("swarmtrain.peer")


@dataclasses.dataclass(frozen=True)
class PeerStatus:
    """One consistent view of this peer: what it announces and reports."""

    stage: Optional[int] = None
    state: PeerState = PeerState.JOINING
    throughput: float = 1.0  # samples/s announced for the stage (peer.model.capacity)
    via: str = ""  # the relay that forwards to this peer, when others cannot dial it


@dataclasses.dataclass(frozen=True)
class TrainingFigures:
    """The live figures of the peer's stage and trainer, read when a record is made."""

    epoch: int = 0
    loss: Optional[float] = None
    tokens: int = 0
    samples_per_s: float = 0.0
    has_data: bool = False
    state_digest: str = ""  # outer rounds: the round state's digest (16 hex digits)


class Presence:
    def __init__(
        self,
        peer_id: str,
        version: str,
        started: float,
        *,
        period: float,
        figures: Callable[[], TrainingFigures] = TrainingFigures,
    ):
        self.peer_id, self.version, self.started, self.period = peer_id, version, started, period
        self.figures = figures
        self.swarm: Optional[SwarmView] = None
        self._status = PeerStatus()
        # Held while the status changes and while a record of it is published: records reach
        # the DHT in the order of the statuses they describe, and a record in flight never
        # describes a stage the peer has already closed.
        self._lock = threading.RLock()
        self._peers: list[PeerInfo] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.on_update: Optional[Callable[[PeerStatus], None]] = None  # for tests: sees every status

    # --- this peer's status ------------------------------------------------------------------

    @property
    def status(self) -> PeerStatus:
        return self._status

    def update(self, **changes) -> PeerStatus:
        """Replace the status with ``changes`` applied, atomically; returns the new one."""
        with self._lock:
            self._status = dataclasses.replace(self._status, **changes)
            status = self._status
        if self.on_update is not None:
            self.on_update(status)
        return status

    def record(self, status: Optional[PeerStatus] = None) -> PeerInfo:
        status = status or self._status
        try:
            figures = self.figures()
        except Exception as err:  # the record still says where this peer is and in what state
            log.warning("reading the live figures for the record failed: %s", err)
            figures = TrainingFigures()
        return PeerInfo(
            peer_id=self.peer_id,
            stage=status.stage,
            state=status.state,
            throughput=status.throughput,
            epoch=figures.epoch,
            loss=figures.loss,
            tokens=figures.tokens,
            samples_per_s=figures.samples_per_s,
            has_data=figures.has_data,
            state_digest=figures.state_digest,
            via=status.via,
            version=self.version,
            started=self.started,
        )

    def announce(self, ttl: Optional[float] = None) -> bool:
        """Publish the current status now. Never raises: a failed announce is logged, and the
        announcer tries again within a period."""
        with self._lock:
            if self.swarm is None or self._status.stage is None:
                return False
            try:
                return self.swarm.announce(self.record(), ttl=ttl or 3 * self.period)
            except Exception as err:
                log.warning("announce failed: %s", err)
                return False

    # --- the others ------------------------------------------------------------------------

    @property
    def peers(self) -> Sequence[PeerInfo]:
        """The latest snapshot of the swarm's records (refreshed by the announcer thread)."""
        return self._peers

    def refresh(self) -> None:
        if self.swarm is None:
            return
        try:
            self._peers = self.swarm.snapshot()
        except Exception as err:
            log.debug("snapshot failed: %s", err)

    def online_per_stage(self, num_stages: int) -> list[int]:
        return online_per_stage(self._peers, num_stages)

    def others_on(self, stage: int, states: Sequence[PeerState]) -> list[PeerInfo]:
        return [p for p in self._peers if p.stage == stage and p.state in states and p.peer_id != self.peer_id]

    # --- the announcer thread ----------------------------------------------------------------

    def start(self, swarm: SwarmView) -> None:
        """Keep the record alive (also while the stage loads: a record that expires meanwhile
        makes the stage look empty to the others' balancing policy)."""
        self.swarm = swarm
        self._thread = threading.Thread(target=self._announcer, name="announcer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _announcer(self) -> None:
        next_announce = 0.0
        while not self._stop.is_set() and self._status.state != PeerState.LEAVING:
            now = time.monotonic()
            if now >= next_announce:
                self.announce()
                next_announce = now + self.period
            self.refresh()
            self._stop.wait(min(1.0, self.period / 2))
