"""Claims of other peers that were not taken at their word, tallied for the log and /metrics."""

from __future__ import annotations

import threading
from typing import Callable


class DistrustTally:
    """Distinct peers per reason (``claim_capped``, ``no_server``, ``checkpoint_step``...): a
    peer is counted and reported once per reason, so a liar that repeats itself every few
    seconds makes one log line, not a flood. ``event(name, text, **fields)`` reports."""

    MAX_REMEMBERED = 4096  # peer ids are free: the memory of who was reported is bounded

    def __init__(self, event: Callable):
        self.event = event
        self.counts: dict[str, int] = {}
        self._reported: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def report(self, peer_id: str, reason: str, message: str, **fields) -> None:
        with self._lock:
            if (peer_id, reason) in self._reported:
                return
            if len(self._reported) >= self.MAX_REMEMBERED:
                self._reported.clear()
            self._reported.add((peer_id, reason))
            self.counts[reason] = self.counts.get(reason, 0) + 1
        self.event("record_distrusted", message, peer_id=peer_id, reason=reason, **fields)
