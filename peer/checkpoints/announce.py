"""Announcing the checkpoints this peer holds, and reading the swarm's announcements."""

from __future__ import annotations

import logging
import threading
from typing import Iterable, Optional

from peer.swarm.view import SwarmView
from protocol.records import CheckpointAnnouncement

log = logging.getLogger("swarmtrain.ckpt")


# ---------------------------------------------------------------------------------------------
# announcing


class CheckpointAnnouncer:
    """Keeps this peer's newest verified checkpoint of each stage announced in the DHT."""

    def __init__(self, swarm: SwarmView, period: float):
        self.swarm, self.period = swarm, period
        self._records: dict[int, dict] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def publish(self, stage: int, record: dict) -> None:
        with self._lock:
            current = self._records.get(stage)
            if current is not None and current["step"] > record["step"]:
                return
            self._records[stage] = dict(record)
        self._wake.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ckpt-announcer", daemon=True)
            self._thread.start()

    def records(self) -> dict[int, dict]:
        with self._lock:
            return dict(self._records)

    def _loop(self) -> None:
        while True:  # at least one pass: what was published before stop() is announced once
            for stage, record in self.records().items():
                try:
                    self.swarm.announce_checkpoint(stage, record, ttl=3 * self.period)
                except Exception as err:
                    log.debug("announcing checkpoint of stage %d failed: %s", stage, err)
            if self._stop.is_set():
                return
            self._wake.wait(self.period)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)


# ---------------------------------------------------------------------------------------------
# listing the swarm's checkpoints (``swarmtrain checkpoint list``)


def announced_checkpoints(announcements: Iterable[tuple[str, CheckpointAnnouncement]]) -> list[dict]:
    """Announcements grouped by (stage, manifest digest): one row per checkpoint with the peers
    that serve it, by stage then newest step first. Announced fields are claims: only a
    fetched and verified checkpoint is known to be what it says."""
    rows: dict[tuple[int, str], dict] = {}
    for peer_id, rec in announcements:
        key = (rec.stage, rec.manifest_digest)
        row = rows.get(key)
        if row is None:
            row = rows[key] = {
                "stage": rec.stage,
                "step": rec.step,
                "manifest_digest": rec.manifest_digest,
                "signers": sorted(rec.signers),
                "files": rec.files,
                "total_bytes": rec.total_bytes,
                "served_by": [],
            }
        row["step"] = min(row["step"], rec.step)  # announcers may disagree: the smallest claim
        row["signers"] = sorted(set(row["signers"]) | set(rec.signers))
        if peer_id not in row["served_by"]:
            row["served_by"].append(peer_id)
    return sorted(rows.values(), key=lambda r: (r["stage"], -r["step"], r["manifest_digest"]))
